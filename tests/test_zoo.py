"""The torchvision classification zoo: one model of each family with BatchNorm,
random weights, statistics calibrated on random data."""
import copy

import pytest
import torch
from torch.fx.experimental.optimization import fuse as fx_fuse

from conftest import assert_unchanged, rel_err, snapshot
from fusion import fuse
from zoo import ZOO, build, count_norms

# The exact number of norms each model folds. Where torch.fx traces the model
# this is the count torch.fx's own fuser reaches (checked below); densenet's
# other norms are pre-activation (BN -> ReLU -> conv); shufflenet does not
# trace and all its 56 are inside plain nn.Sequential containers.
EXPECTED = {
    "resnet18": 20, "resnet50": 53, "resnext50_32x4d": 53, "wide_resnet50_2": 53,
    "mobilenet_v2": 52, "mobilenet_v3_small": 34, "mobilenet_v3_large": 46,
    "efficientnet_b0": 49, "efficientnet_v2_s": 110,
    "regnet_x_400mf": 71, "regnet_y_400mf": 53,
    "densenet121": 59, "googlenet": 57, "inception_v3": 94, "mnasnet0_5": 52,
    "vgg11_bn": 8, "shufflenet_v2_x0_5": 56,
}
FX_UNTRACEABLE = {"shufflenet_v2_x0_5"}


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_zoo_model(name):
    model = build(name)
    snap = snapshot(model)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y = model(x)
        exact = copy.deepcopy(model).double()(x.double())
    fused, report = fuse(model, return_report=True)
    with torch.no_grad():
        y_fused = fused(x)

    assert type(fused) is type(model)
    assert_unchanged(model, snap)
    # Against float64: the fused model's float32 error is of the model's own
    # (inception_v3's is 8e-5 at this size, which a comparison of the two
    # float32 outputs counts twice); a wrong fold is orders of magnitude more.
    assert rel_err(exact, y_fused) <= 2 * rel_err(exact, y) + 1e-6
    assert len(report.fused) == EXPECTED[name]
    assert count_norms(fused) == count_norms(model) - EXPECTED[name]
    # every norm exactly once, fused or left
    names = [p.norm for p in report.fused] + [n.norm for n in report.left]
    assert sorted(names) == sorted(n for n, m in model.named_modules()
                                   if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    if name not in FX_UNTRACEABLE:
        fx_left = count_norms(fx_fuse(copy.deepcopy(model)))
        assert count_norms(model) - fx_left == EXPECTED[name]
    # fusing again is a no-op that says so
    again, report2 = fuse(fused, return_report=True)
    assert not report2.fused and report2.parameters_reduced == 0
    assert any("nothing" in n for n in report2.notes) or report2.left
