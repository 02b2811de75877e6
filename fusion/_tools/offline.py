"""Keeps ultralytics off the network, in any process that may import it.

At import, ultralytics probes public DNS servers (``is_online()`` connects to
1.1.1.1 and 8.8.8.8) unless ``YOLO_OFFLINE`` is set, may pip-install packages
unless ``YOLO_AUTOINSTALL`` is off, and writes a settings directory. The CLI,
the demo and the model builders call :func:`ultralytics_offline` before
anything can import it; the Makefile, CI and the test session set the same
variables.
"""
import os

__all__ = ["ultralytics_offline"]


def ultralytics_offline():
    """Sets ``YOLO_OFFLINE=True`` and ``YOLO_AUTOINSTALL=False`` (whatever they
    were), and ``YOLO_CONFIG_DIR`` where it is unset (to ``~/.cache/fusion/
    ultralytics``). Call it before ultralytics is imported: it reads them then."""
    os.environ["YOLO_OFFLINE"] = "True"
    os.environ["YOLO_AUTOINSTALL"] = "False"
    if not os.environ.get("YOLO_CONFIG_DIR"):
        os.environ["YOLO_CONFIG_DIR"] = os.path.join(
            os.path.expanduser("~"), ".cache", "fusion", "ultralytics")
