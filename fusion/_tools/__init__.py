"""Support for the demo, the benchmarks and the tests, shipped beside the library
so that ``fusion demo`` works from an installed wheel: the machine probe (torch,
threads, BLAS), and real models with random weights and calibrated BatchNorm.

The library itself (``fusion.api``, ``plan``, ``discover``, ``rewrite``,
``verify``) never imports this package.
"""
