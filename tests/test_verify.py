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

    def write(model, prepared, index=None):
        out = original(model, prepared, index)
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


# --- outputs that prove nothing: the layers are compared instead ---------------------


class ZeroHead(torch.nn.Module):
    """A conv and norm under a head initialised to zero: its output is all zeros,
    whatever the fold does (a randomly initialised ViT's head is)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8, 4)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


def _zero_head():
    from zoo import calibrate

    return calibrate(ZeroHead(), shape=(2, 3, 8, 8))


def test_all_zero_output_is_verified_layer_by_layer_and_says_so(caplog):
    import logging

    caplog.set_level(logging.INFO, logger="fusion")
    fused, report = fuse(_zero_head(), example_inputs=torch.randn(2, 3, 8, 8),
                         return_report=True)
    assert report.verified_by == "layers" and "all zeros" in report.verified_why
    assert report.tolerance is None  # no tolerance on an output that proves nothing
    note = next(n for n in report.notes if n.startswith("verification compared"))
    assert "1 fused layers" in note and "all zeros" in note
    assert "verified layer by layer" in str(report)
    assert "verification compared the outputs of the 1 fused layers" in caplog.text
    v = report.to_dict()["verification"]
    assert v["compared"] == "layers" and v["tolerance"] is None
    import json
    json.loads(report.to_json())  # strict JSON: no NaN


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_check_catches_a_planted_bug_the_outputs_cannot_see(monkeypatch, dtype):
    monkeypatch.setattr(verify, "check_weights", lambda *a, **k: None)
    model = _zero_head().to(dtype)
    snap = snapshot(model)
    _plant(monkeypatch, "conv", factor=1.05)
    with pytest.raises(FusionError) as err:
        fuse(model, example_inputs=torch.randn(2, 3, 8, 8).to(dtype), inplace=True)
    assert err.value.layer == "conv" and err.value.code == "verify"
    assert "rounding bound" in str(err.value)
    assert_unchanged(model, snap)


def test_a_one_ulp_change_stays_within_the_layer_bound(monkeypatch):
    """The bound is that of rounding: moving a fused weight by one ULP, as
    rounding may, never fails it."""
    monkeypatch.setattr(verify, "check_weights", lambda *a, **k: None)
    model = _zero_head()
    original = rewrite.write

    def write(m, prepared, index=None):
        out = original(m, prepared, index)
        with torch.no_grad():
            w = m.conv.weight
            w.copy_(torch.nextafter(w, torch.full_like(w, float("inf"))))
        return out

    monkeypatch.setattr(rewrite, "write", write)
    fused, report = fuse(model, example_inputs=torch.randn(2, 3, 8, 8), return_report=True)
    assert report.verified_by == "layers"


def test_ordinary_models_are_verified_on_their_outputs():
    fused, report = fuse(build("resnet18"), example_inputs=torch.randn(1, 3, 64, 64),
                         return_report=True)
    assert report.verified_by == "outputs" and report.verified_why is None
    assert not any(n.startswith("verification compared") for n in report.notes)


@pytest.mark.slow
def test_a_detector_with_a_discontinuous_output_is_verified_layer_by_layer():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    fused, report = fuse(model.eval(), example_inputs=[torch.rand(3, 160, 200)],
                         return_report=True)
    assert report.verified_by == "layers"
    assert "discontinuous" in report.verified_why or "no elements" in report.verified_why
    assert not report.left
