"""fusion: fold BatchNorm into the layers that feed it, exactly, for inference.

    from fusion import fuse
    fused = fuse(model)

See the README for the rules that decide which pairs fold, and for precision.
"""
from ._native import _C  # noqa: F401  (fails early, with how to rebuild)
from .api import analyze, apply_plan, fuse, fuse_conv_and_bn
from .errors import ERRORS, FusionError
from .layers import NormParams, register_layer, register_norm, unregister_layer, unregister_norm
from .plan import REASONS
from .report import FusedPair, FusionReport, LeftNorm

__all__ = [
    "fuse",
    "analyze",
    "fuse_conv_and_bn",
    "apply_plan",
    "register_norm",
    "unregister_norm",
    "register_layer",
    "unregister_layer",
    "NormParams",
    "FusionError",
    "FusionReport",
    "FusedPair",
    "LeftNorm",
    "REASONS",
    "ERRORS",
]

__version__ = "0.1.0"
