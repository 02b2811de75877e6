"""ultralytics YOLO models with random weights and calibrated BatchNorm (nothing
is downloaded: every model is built from ultralytics' own yaml or from its
modules), shared by the tests, the benchmarks and the demo.

ultralytics is imported lazily, inside the functions, and only after
``YOLO_OFFLINE``, ``YOLO_AUTOINSTALL`` and ``YOLO_CONFIG_DIR`` are set (where
unset): at import it would otherwise probe public DNS servers, may pip-install
packages, and writes a settings file under the home directory.

Models (:data:`MODELS`):

- ``yolov8n``, ``yolo11n``: ``ultralytics.nn.tasks.DetectionModel("<name>.yaml")``,
  80 classes, 57 and 81 BatchNorm2d.
- ``yolov9t``: ``yolov9t.yaml``, whose RepNCSPELAN4 blocks hold RepConv modules,
  221 BatchNorm2d.
- ``convtranspose``: a small :class:`SmallNet` (an ultralytics ``BaseModel``, so
  ``model.fuse()`` is ultralytics' own): ``Conv(3, 8, 3, 2)`` ->
  ``ConvTranspose(8, 8, bn=True)`` (k=2, s=2) -> ``nn.Conv2d(8, 4, 1)``.
- ``convtranspose_grouped``: the same with ``groups=4`` in the transposed conv.
  ultralytics' ``ConvTranspose(c1, c2, k=2, s=2, p=0, bn=True, act=True)`` has no
  groups argument (8.4.190), so its ``conv_transpose`` attribute is replaced by
  ``nn.ConvTranspose2d(8, 8, 2, 2, groups=4, bias=False)``: the module's own
  ``forward`` and ``forward_fuse``, and ultralytics' ``fuse_deconv_and_bn``, read
  nothing but that attribute and ``bn``.
- ``repconv``: the same with ``RepConv(8, 8, 3, 1)`` in the middle: two
  Conv+BN branches (3x3 and 1x1) summed, then SiLU. Each BN folds into its own
  branch's conv; ultralytics' fuser also merges the two branches into one conv
  (``fuse_convs``), which is a reparameterisation, not a BN fold.
"""
from typing import List, Tuple

import torch
from torch import nn

from .models import calibrate
from .offline import ultralytics_offline

__all__ = ["MODELS", "DETECTION", "SMALL", "build", "input_shape", "raw_outputs",
           "max_rel_err", "rel_err", "count_norms", "ultralytics_version"]

#: Detection models built from ultralytics' yaml: name -> yaml.
DETECTION = {"yolov8n": "yolov8n.yaml", "yolo11n": "yolo11n.yaml", "yolov9t": "yolov9t.yaml"}
#: The small models built from ultralytics' modules (SmallNet).
SMALL = ["convtranspose", "convtranspose_grouped", "repconv"]
#: Every model :func:`build` makes.
MODELS = ["yolov8n", "yolo11n", "yolov9t"] + SMALL

_SIZE = {name: 32 for name in SMALL}


def _offline():
    """The environment ultralytics reads at import; set before importing it."""
    ultralytics_offline()


def ultralytics_version() -> str:
    _offline()
    import ultralytics

    return ultralytics.__version__


_SMALL_CLASS = None


def _small_class():
    """SmallNet, made on first use (its base class is ultralytics' BaseModel,
    which is imported only then); the module's ``__getattr__`` serves it under
    its name, so that pickled instances load in any process."""
    global _SMALL_CLASS
    if _SMALL_CLASS is not None:
        return _SMALL_CLASS
    _offline()
    from ultralytics.nn.modules import Conv, ConvTranspose, RepConv
    from ultralytics.nn.tasks import BaseModel

    class SmallNet(BaseModel):
        """``Conv(3, 8, 3, 2)`` -> a middle block -> ``nn.Conv2d(8, 4, 1)``, run by
        BaseModel's own forward (``_predict_once``) and fused by BaseModel's own
        ``fuse()``. The middle block: ``ConvTranspose(8, 8, bn=True)`` (k=2, s=2),
        the same with a grouped ``conv_transpose``, or ``RepConv(8, 8)``."""

        def __init__(self, kind="convtranspose"):
            super().__init__()
            if kind == "repconv":
                middle = RepConv(8, 8, 3, 1)
            else:
                middle = ConvTranspose(8, 8, bn=True)
                if kind == "convtranspose_grouped":
                    middle.conv_transpose = nn.ConvTranspose2d(8, 8, 2, 2, 0, groups=4,
                                                               bias=False)
            layers = [Conv(3, 8, 3, 2), middle, nn.Conv2d(8, 4, 1)]
            for i, m in enumerate(layers):
                m.i, m.f, m.type = i, -1, type(m).__name__
            self.model = nn.Sequential(*layers)
            self.save = []
            self.stride = torch.tensor([2.0])

    SmallNet.__module__ = __name__
    SmallNet.__qualname__ = "SmallNet"
    _SMALL_CLASS = SmallNet
    return SmallNet


def __getattr__(name):
    if name == "SmallNet":
        return _small_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def input_shape(name: str, batch: int = 1) -> Tuple[int, ...]:
    """The input shape used for ``name``: 64x64 for the detection models (a
    multiple of their stride 32: three heads of 8x8, 4x4 and 2x2 anchors), 32x32
    for the small models."""
    if name not in MODELS:
        raise ValueError(f"{name!r} is not one of {MODELS}")
    size = _SIZE.get(name, 64)
    return (batch, 3, size, size)


def build(name: str, seed: int = 0, shape=None):
    """A model of :data:`MODELS` with random weights (``torch.manual_seed(seed)``),
    every BatchNorm given a random affine map and calibrated statistics
    (:func:`fusion._tools.models.calibrate` on random batches of ``shape``,
    by default ``input_shape(name, batch=2)``), in eval mode.

    Raises:
        ValueError: ``name`` is not in :data:`MODELS`.
    """
    if name not in MODELS:
        raise ValueError(f"{name!r} is not one of {MODELS}")
    shape = tuple(shape) if shape is not None else input_shape(name, batch=2)
    _offline()
    torch.manual_seed(seed)
    if name in DETECTION:
        from ultralytics.nn.tasks import DetectionModel

        model = DetectionModel(DETECTION[name], verbose=False)
    else:
        model = _small_class()(name)
    return calibrate(model, shape=shape, steps=3, seed=seed)


def raw_outputs(model, x) -> List[torch.Tensor]:
    """The model's raw tensors before NMS, as a flat list.

    In eval mode ultralytics' ``DetectionModel`` returns ``(y, preds)``: ``y`` is
    the decoded ``[B, 4 + nc, anchors]`` (DFL-decoded boxes times the anchors'
    strides, and sigmoid scores), ``preds`` the dict ``{"boxes": [B, 4 * reg_max,
    anchors], "scores": [B, nc, anchors], "feats": [the three neck maps]}``; the
    end-to-end heads (YOLOv10, YOLO26) nest it under ``"one2many"`` and
    ``"one2one"``; with ``Detect.export`` set only ``y`` is returned.

    Returned: ``preds["boxes"]`` (the box-distribution logits) and
    ``preds["scores"]`` (the class logits), the head's outputs before any
    decoding, then the three feature maps the head reads; for an end-to-end head
    those of each branch. The decoded boxes are not compared: they are
    ``anchor ± distance`` times the stride, so the anchor grid (exact, the same
    in both models) dominates their norm and hides the error of the weights, and
    the sigmoid squashes the score logits. A model that returns something else
    (the small ConvTranspose models, an export-mode head) gives every tensor it
    returns, in order.
    """
    with torch.no_grad():
        out = model(x)
    if isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], dict):
        preds = out[1]
        branches = [preds[k] for k in ("one2many", "one2one") if k in preds] or [preds]
        parts = []
        for p in branches:
            parts += [p["boxes"], p["scores"], *p.get("feats", [])]
        return parts
    return _flatten(out)


def _flatten(obj) -> List[torch.Tensor]:
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _flatten(o)]
    return []


def rel_err(outputs, reference) -> float:
    """``||a - r||_2 / ||r||_2`` of all the tensors of two lists, flattened and
    concatenated in float64: the metric of fusion's verification, and so of
    ``report.tolerance``."""
    if len(outputs) != len(reference):
        raise ValueError(f"{len(outputs)} outputs against {len(reference)} references")
    a = torch.cat([t.detach().double().reshape(-1) for t in outputs])
    r = torch.cat([t.detach().double().reshape(-1) for t in reference])
    return float((a - r).norm() / r.norm())


def max_rel_err(outputs, reference) -> float:
    """The largest ``||a - r||_2 / ||r||_2`` over the tensors of two lists (as
    :func:`raw_outputs` gives them), computed in float64."""
    if len(outputs) != len(reference):
        raise ValueError(f"{len(outputs)} outputs against {len(reference)} references")
    worst = 0.0
    for a, r in zip(outputs, reference):
        a, r = a.detach().double(), r.detach().double()
        worst = max(worst, float((a - r).norm() / r.norm()))
    return worst


def count_norms(model) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
