"""Loads fusion._C, the native core, with an error that says how to rebuild it."""
import glob
import os

import torch

_REBUILD = (
    "Rebuild it against the installed torch: from the source tree run "
    "`make setup`, or `pip install --no-build-isolation --force-reinstall "
    "--no-deps .`"
)


def _load():
    try:
        from . import _C
    except ImportError as exc:
        here = os.path.dirname(os.path.abspath(__file__))
        in_tree = os.path.exists(os.path.join(here, os.pardir, "setup.py"))
        if in_tree and not glob.glob(os.path.join(here, "_C*.so")):
            raise ImportError(
                f"fusion was imported from its source tree ({here}), which holds no "
                f"built extension: `make install` installs fusion into .venv, built "
                f"against that venv's torch. Import it from outside the tree, or "
                f"run `python -P` in it (keeps the current directory off sys.path)."
            ) from None
        raise ImportError(
            f"fusion's native module fusion._C could not be loaded ({exc}). This "
            f"happens when it was built against another torch than the one now "
            f"installed (torch {torch.__version__}), or was never built. {_REBUILD}."
        ) from None
    built = _C.torch_version
    running = torch.__version__.split("+")[0]
    if built != running:
        raise ImportError(
            f"fusion's native module was built against torch {built}, but torch "
            f"{running} is installed; its tensor layout may differ. {_REBUILD}."
        )
    return _C


_C = _load()
