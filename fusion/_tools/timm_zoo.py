"""timm models with random weights and calibrated BatchNorm statistics
(nothing is downloaded: ``pretrained=False`` always), shared by the timm tests
(tests/test_timm.py) and the sweep (benchmarks/timm_sweep.py).

timm zero-initialises the last BatchNorm weight of each residual block, so an
uncalibrated model would fold those trivially; :func:`build` gives every norm
a random affine map and running statistics (``fusion._tools.models.calibrate``
for the ``_BatchNorm`` classes; ``FrozenBatchNormAct2d``/``FrozenBatchNorm2d``,
which hold buffers and cannot be calibrated by a training pass, get random
statistics directly).

timm is imported inside the functions only: importing this module costs nothing.
"""
import time
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from fusion._tools.models import calibrate

__all__ = ["FAMILIES", "SAMPLE", "REPARAM", "build", "input_size", "example_input",
           "count_norms", "family_of", "timed_check"]

#: family -> (the smallest timm model of that family, seconds measured here for
#: build + calibrate + fuse + the checks of tests/test_timm.py, torch 2.14.1,
#: 1 thread, on a 2-core Xeon; see ``python -m fusion._tools.timm_zoo --time``).
FAMILIES: "OrderedDict[str, Tuple[str, float]]" = OrderedDict([
    ("resnet-d", ("resnet10t", 0.0)),
    ("resnext", ("resnext26ts", 0.0)),
    ("seresnext", ("seresnext26ts", 0.0)),
    ("ecaresnet", ("ecaresnet26t", 0.0)),
    ("res2net", ("res2net50_14w_8s", 0.0)),
    ("resnest", ("resnest14d", 0.0)),
    ("sknet", ("skresnet18", 0.0)),
    ("regnetx", ("regnetx_002", 0.0)),
    ("regnety", ("regnety_002", 0.0)),
    ("regnetz", ("regnetz_005", 0.0)),
    ("efficientnet", ("efficientnet_lite0", 0.0)),
    ("tf_efficientnet", ("tf_efficientnet_lite0", 0.0)),
    ("efficientnetv2", ("tf_efficientnetv2_b0", 0.0)),
    ("mobilenetv2", ("mobilenetv2_035", 0.0)),
    ("mobilenetv3", ("mobilenetv3_small_050", 0.0)),
    ("mnasnet", ("mnasnet_small", 0.0)),
    ("fbnet", ("fbnetc_100", 0.0)),
    ("mixnet", ("mixnet_s", 0.0)),
    ("ghostnet", ("ghostnet_050", 0.0)),
    ("rexnet", ("rexnet_100", 0.0)),
    ("lcnet", ("lcnet_035", 0.0)),
    ("hardcorenas", ("hardcorenas_a", 0.0)),
    ("tinynet", ("tinynet_e", 0.0)),
    ("cspnet", ("cspnext_tiny", 0.0)),
    ("cs3darknet", ("cs3darknet_s", 0.0)),
    ("darknet", ("darknet17", 0.0)),
    ("dla", ("dla46x_c", 0.0)),
    ("dpn", ("dpn48b", 0.0)),
    ("densenet", ("densenet121", 0.0)),
    ("vovnet", ("ese_vovnet19b_slim_dw", 0.0)),
    ("hrnet", ("hrnet_w18_small", 0.0)),
    ("inception_v3", ("inception_v3", 0.0)),
    ("inception_v4", ("inception_v4", 0.0)),
    ("xception", ("legacy_xception", 0.0)),
    ("selecsls", ("selecsls42", 0.0)),
    ("gernet", ("gernet_s", 0.0)),
    ("repvgg", ("repvgg_a0", 0.0)),
    ("mobileone", ("mobileone_s0", 0.0)),
    ("fastvit", ("fastvit_t8", 0.0)),
    ("mobilevit", ("mobilevit_xxs", 0.0)),
    ("efficientformer", ("efficientformer_l1", 0.0)),
    ("levit", ("levit_128s", 0.0)),
])

#: A small, fixed sample for ``make test``, one mechanism each: BatchNormAct2d
#: (efficientnet), Conv2dSame (tf_ padding), MixedConv2d (mixnet: a norm after a
#: torch.cat of convs), pre-activation norms (densenet), LeViT's Linear +
#: BatchNorm1d over x.flatten(0, 1), and plain BatchNorm2d (resnet).
SAMPLE = ["resnet10t", "mobilenetv3_small_050", "tf_efficientnet_lite0", "mixnet_s",
          "densenet121", "levit_128s", "regnetx_002"]

#: timm's reparameterisable families (timm.utils.reparameterize_model), smallest each.
REPARAM = ["repvgg_a0", "mobileone_s0", "fastvit_t8"]

DEFAULT_SIZE = 128

# Models built for one input size (attention biases sized at build time) take
# the size as ``img_size`` at build time, so they can run at a small one.
_IMG_SIZE_KWARG = ("levit", "efficientformerv2")
# Models whose stem or stages need a larger input than DEFAULT_SIZE.
# EfficientFormer (v1) fixes its last stage's attention at 7x7 tokens: 224 only.
_MIN_SIZE: Dict[str, int] = {"efficientformer_l1": 224, "efficientformer_l3": 224,
                             "efficientformer_l7": 224}


def family_of(name: str) -> Optional[str]:
    for fam, (model, _) in FAMILIES.items():
        if model == name:
            return fam
    return None


def input_size(name: str) -> int:
    """The square input size (pixels) the tests and the sweep run ``name`` at."""
    return _MIN_SIZE.get(name, DEFAULT_SIZE)


def _kwargs(name: str, size: int) -> dict:
    kw = dict(pretrained=False)
    if name.startswith(_IMG_SIZE_KWARG):
        kw["img_size"] = size
    return kw


def _randomise_frozen(model, gen):
    """FrozenBatchNorm(Act)2d holds weight, bias and statistics as buffers: give
    them random values, as calibrate() does for the _BatchNorm classes."""
    import timm.layers.norm_act as na

    frozen = tuple(c for c in (getattr(na, "FrozenBatchNormAct2d", None),
                               getattr(na, "FrozenBatchNorm2d", None)) if isinstance(c, type))
    for m in model.modules():
        if frozen and isinstance(m, frozen):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.2, 0.2, generator=gen)
                m.running_mean.uniform_(-0.2, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)


def build(name: str, seed: int = 0, size: Optional[int] = None, batch: int = 4,
          steps: int = 3, **kwargs) -> nn.Module:
    """timm model ``name``, random weights (seeded), every BatchNorm given a
    random affine map and running statistics calibrated on ``steps`` random
    batches of ``batch`` at ``size`` (default :func:`input_size`); eval mode.
    ``kwargs`` go to ``timm.create_model`` (e.g. ``img_size``)."""
    import timm

    size = size or input_size(name)
    torch.manual_seed(seed)
    model = timm.create_model(name, **{**_kwargs(name, size), **kwargs})
    _randomise_frozen(model, torch.Generator().manual_seed(seed + 1))
    return calibrate(model, shape=(batch, 3, size, size), steps=steps, seed=seed)


def example_input(name: str, batch: int = 2, seed: int = 7, size: Optional[int] = None,
                  dtype=torch.float32) -> torch.Tensor:
    size = size or input_size(name)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return x.to(dtype)


def count_norms(model) -> int:
    """The norm modules fusion's report accounts for (fusion.layers.is_norm_module)."""
    from fusion.layers import is_norm_module

    return sum(1 for m in model.modules() if is_norm_module(m))


def timed_check(name: str) -> float:
    """Seconds for build + calibrate + fuse (verified) + a second fuse, as the
    models test does (without its hook check); for filling in FAMILIES."""
    from fusion import fuse

    t0 = time.perf_counter()
    model = build(name)
    x = example_input(name)
    fused, rep = fuse(model, example_inputs=(x,), return_report=True)
    fuse(fused, example_inputs=(x,), return_report=True)
    return time.perf_counter() - t0


if __name__ == "__main__":  # pragma: no cover - a maintenance tool
    import sys

    torch.set_num_threads(1)
    names = sys.argv[1:] or [m for m, _ in FAMILIES.values()]
    total = 0.0
    for n in names:
        try:
            s = timed_check(n)
            total += s
            print(f"{n:28s} {s:7.1f} s", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"{n:28s} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    print(f"total {total:.1f} s")
