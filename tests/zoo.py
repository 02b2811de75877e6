"""The model zoo of the tests: fusion._tools.models, which the demo and the
benchmarks use too (real torchvision models, random weights, calibrated
BatchNorm)."""
from fusion._tools.models import ZOO, build, calibrate, count_norms

__all__ = ["ZOO", "build", "calibrate", "count_norms"]
