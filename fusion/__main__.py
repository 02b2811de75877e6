"""``python -m fusion``: the same command as the ``fusion`` console script."""
import sys

from .cli import main

__all__ = []

if __name__ == "__main__":
    sys.exit(main())
