"""The timm zoo of the tests: fusion._tools.timm_zoo (also used by
benchmarks/timm_sweep.py and the demo), from the installed package, which
`make install` rebuilds whenever fusion/_tools changes."""
from fusion._tools import timm_zoo as zoo

__all__ = ["zoo"]
