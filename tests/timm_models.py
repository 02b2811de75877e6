"""The timm zoo of the tests: fusion._tools.timm_zoo (also used by
benchmarks/timm_sweep.py). Where the installed fusion predates that module
(it is installed by `make install`), it is loaded from this source tree; the
rest of fusion always comes from the installed package."""
import importlib.util
import os
import sys

try:
    from fusion._tools import timm_zoo as zoo
except ImportError:  # an installed fusion built before timm_zoo.py existed
    _path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "fusion", "_tools", "timm_zoo.py")
    _spec = importlib.util.spec_from_file_location("fusion._tools.timm_zoo", _path)
    zoo = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = zoo
    _spec.loader.exec_module(zoo)

__all__ = ["zoo"]
