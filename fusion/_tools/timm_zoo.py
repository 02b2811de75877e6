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

__all__ = ["FAMILIES", "SAMPLE", "REPARAM", "build", "randomise_frozen", "input_size",
           "example_input", "count_norms", "family_of", "timed_check"]

#: family -> (the smallest timm model of that family by parameter count,
#: seconds of its ``test_family`` in tests/test_timm.py: build + calibrate +
#: fuse (verified) + the checks, the independent data-flow record included).
#: Measured 2026-12-01 with ``pytest --durations`` on torch 2.14.1, 2 threads,
#: a 2-core Xeon shared with a second test run and the timm sweep (so about 3x
#: an idle machine: build + calibrate + fuse alone, idle, totalled 36 s).
#: Total 486 s. ``python -P fusion/_tools/timm_zoo.py [names]`` re-times the
#: build + fuse part. Smallest picks of note: res2net50_14w_8s (res2next50 is
#: smaller by 0.4M but a ResNeXt), cspnext_tiny (cspnet.py's smallest that is
#: neither cs3darknet nor darknet), tf_efficientnetv2_b0 (smaller than
#: efficientnetv2_rw_t; it also runs Conv2dSame).
FAMILIES: "OrderedDict[str, Tuple[str, float]]" = OrderedDict([
    ("resnet-d", ("resnet10t", 5.9)),
    ("resnext", ("resnext26ts", 11.7)),
    ("seresnext", ("seresnext26ts", 7.9)),
    ("ecaresnet", ("ecaresnet26t", 11.4)),
    ("res2net", ("res2net50_14w_8s", 25.8)),
    ("resnest", ("resnest14d", 16.3)),
    ("sknet", ("skresnet18", 8.7)),
    ("regnetx", ("regnetx_002", 4.2)),
    ("regnety", ("regnety_002", 4.7)),
    ("regnetz", ("regnetz_005", 9.0)),
    ("efficientnet", ("efficientnet_lite0", 3.5)),
    ("tf_efficientnet", ("tf_efficientnet_lite0", 22.6)),
    ("efficientnetv2", ("tf_efficientnetv2_b0", 13.8)),
    ("mobilenetv2", ("mobilenetv2_035", 4.1)),
    ("mobilenetv3", ("mobilenetv3_small_050", 6.2)),
    ("mnasnet", ("mnasnet_small", 5.9)),
    ("fbnet", ("fbnetc_100", 14.1)),
    ("mixnet", ("mixnet_s", 10.6)),
    ("ghostnet", ("ghostnet_050", 9.5)),
    ("rexnet", ("rexnet_100", 21.3)),
    ("lcnet", ("lcnet_035", 6.6)),
    ("hardcorenas", ("hardcorenas_a", 6.1)),
    ("tinynet", ("tinynet_e", 4.8)),
    ("cspnet", ("cspnext_tiny", 4.5)),
    ("cs3darknet", ("cs3darknet_s", 5.2)),
    ("darknet", ("darknet17", 7.4)),
    ("dla", ("dla46x_c", 6.7)),
    ("dpn", ("dpn48b", 13.7)),
    ("densenet", ("densenet121", 15.5)),
    ("vovnet", ("ese_vovnet19b_slim_dw", 4.6)),
    ("hrnet", ("hrnet_w18_small", 11.5)),
    ("inception_v3", ("inception_v3", 24.3)),
    ("inception_v4", ("inception_v4", 38.6)),
    ("xception", ("legacy_xception", 12.0)),
    ("selecsls", ("selecsls42", 17.0)),
    ("gernet", ("gernet_s", 6.3)),
    ("repvgg", ("repvgg_a0", 8.9)),
    ("mobileone", ("mobileone_s0", 16.5)),
    ("fastvit", ("fastvit_t8", 10.7)),
    ("mobilevit", ("mobilevit_xxs", 7.6)),
    ("efficientformer", ("efficientformer_l1", 24.6)),
    ("levit", ("levit_128s", 16.0)),
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

# Models built for one input size (attention biases, window grids sized at
# build time) run at DEFAULT_SIZE when given it as ``img_size``; the others
# below need a larger input. Found by benchmarks/timm_sweep.py (timm 1.0.31):
# each model takes the first of 128 px, 128 px with img_size, 160 px with
# img_size, 224 px, 256 px that builds and runs.
_IMG_SIZE_KWARG = ("levit", "efficientformerv2")
_IMG_SIZE_NAMES = frozenset("""
    botnet26t_256 botnet50ts_256 coatnet_0_224 coatnet_0_rw_224 coatnet_bn_0_rw_224
    coatnet_nano_cc_224 coatnet_nano_rw_224 coatnet_pico_rw_224 coatnet_rmlp_0_rw_224
    coatnet_rmlp_nano_rw_224 eca_botnext26ts_256 halo2botnet50ts_256 lambda_resnet26rpt_256
    lamhalobotnet50ts_256 maxvit_nano_rw_256 maxvit_pico_rw_256 maxvit_rmlp_nano_rw_256
    maxvit_rmlp_pico_rw_256 maxvit_rmlp_tiny_rw_256 maxvit_tiny_rw_224 maxvit_tiny_rw_256
    sebotnet33ts_256 test_coatnet test_maxvit visformer_tiny volo_d1_224 volo_d1_384
""".split())
# EfficientFormer (v1) fixes its last stage's attention at 7x7 tokens: 224 only;
# the halo attention models need a multiple of their block size at every stage.
_MIN_SIZE: Dict[str, int] = {
    "efficientformer_l1": 224, "efficientformer_l3": 224, "efficientformer_l7": 224,
    "haloregnetz_b": 224, "bat_resnext26ts": 256, "eca_halonext26ts": 256,
    "halonet26t": 256, "halonet50ts": 256, "sehalonet33ts": 256,
}


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
    if name.startswith(_IMG_SIZE_KWARG) or name in _IMG_SIZE_NAMES:
        kw["img_size"] = size
    return kw


def randomise_frozen(model, gen):
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
    randomise_frozen(model, torch.Generator().manual_seed(seed + 1))
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
    # python -P fusion/_tools/timm_zoo.py [names]: time build + fuse of each
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
