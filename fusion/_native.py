"""Loads fusion._C, the native core, with an error that says how to rebuild it."""
import glob
import importlib.machinery
import os

import torch

_REBUILD = (
    "Rebuild it against the installed torch: from the source tree run "
    "`make setup`, or `pip install --no-build-isolation --force-reinstall "
    "--no-deps .`"
)


_MARKER = b"fusion-built-against-torch="


def _built_for():
    """The torch version recorded in the fusion._C file, read without loading it,
    or None (no such file, or no marker in it)."""
    spec = importlib.machinery.PathFinder.find_spec(
        "_C", [os.path.dirname(os.path.abspath(__file__))])
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return None
    with open(spec.origin, "rb") as f:
        data = f.read()
    start = data.find(_MARKER)
    if start < 0:
        return None
    start += len(_MARKER)
    return data[start:data.find(b"\0", start)].decode("ascii", "replace")


def _mismatch(built, running):
    return ImportError(
        f"fusion's native module was built against torch {built}, but torch "
        f"{running} is installed; its tensor layout may differ. {_REBUILD}.")


def _load():
    running = torch.__version__.split("+")[0]
    built = _built_for()
    if built is not None and built != running:
        # Loading it would load the other torch's libraries too.
        raise _mismatch(built, running)
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
    if _C.torch_version != running:
        raise _mismatch(_C.torch_version, running)
    return _C


_C = _load()
