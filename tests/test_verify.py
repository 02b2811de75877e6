"""verify: calibrated on the zoo (every correct fold passes in fp32, fp16 and
bf16) and on planted bugs (one channel's scale off by 1% fails, and is named)."""
import pytest
import torch

import fusion
from conftest import assert_unchanged, snapshot
from fusion import FusionError, fuse, rewrite, verify
from zoo import build


# The whole zoo in three dtypes is in benchmarks/verify_calibration.py (its
# results: benchmarks/results/verify_calibration.md); these are the models the
# tolerance is tightest on, and resnet50, whose half models err the most.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2", "densenet121"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_correct_folds_pass_verification(name, dtype):
    model = build(name).to(dtype)
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(5)).to(dtype)
    fused, report = fuse(model, example_inputs=x, return_report=True)
    assert report.rel_err is not None and 0 < report.rel_err <= report.tolerance
    assert report.max_abs_err > 0


def _plant(monkeypatch, layer, channel=3, factor=1.01):
    """After the write phase, one output channel of one fused layer is off by 1%."""
    original = rewrite.write

    def write(model, prepared):
        out = original(model, prepared)
        with torch.no_grad():
            model.get_submodule(layer).weight[channel] *= factor
        return out

    monkeypatch.setattr(rewrite, "write", write)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("inplace", [True, False])
def test_planted_bug_is_caught_named_and_undone(monkeypatch, dtype, inplace):
    model = build("resnet18").to(dtype)
    x = torch.randn(1, 3, 64, 64).to(dtype)
    snap = snapshot(model)
    _plant(monkeypatch, "layer3.0.conv2")
    with pytest.raises(FusionError) as err:
        fuse(model, example_inputs=x, inplace=inplace)
    assert err.value.layer == "layer3.0.conv2" and err.value.code == "verify"
    assert "ULP" in str(err.value)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("layer", ["conv1", "layer2.0.conv1", "layer4.1.conv2"])
def test_output_check_alone_catches_planted_bug_in_fp32(monkeypatch, layer):
    """With the exact weight check switched off, the calibrated output tolerance
    still fails a 1% error in one channel, and the local search names the pair."""
    monkeypatch.setattr(verify, "check_weights", lambda *a, **k: None)
    model = build("resnet18")
    x = torch.randn(1, 3, 96, 96)
    snap = snapshot(model)
    _plant(monkeypatch, layer)
    with pytest.raises(FusionError) as err:
        fuse(model, example_inputs=x, inplace=True)
    assert err.value.layer == layer and "exceeds the tolerance" in str(err.value)
    assert_unchanged(model, snap)


def test_explicit_rtol_is_used_and_reported():
    model = build("resnet18")
    x = torch.randn(1, 3, 64, 64)
    _, report = fuse(model, example_inputs=x, rtol=0.5, return_report=True)
    assert report.tolerance == 0.5
    with pytest.raises(FusionError):
        fuse(model, example_inputs=x, rtol=1e-12)


def test_verify_can_be_switched_off():
    model = build("resnet18")
    _, report = fuse(model, example_inputs=torch.randn(1, 3, 64, 64), verify=False,
                     return_report=True)
    assert report.rel_err is None


def test_tolerance_factor_is_documented_constant():
    assert verify.TOLERANCE_FACTOR > 1
    assert fusion.verify.FLOOR[torch.float32] > 0
