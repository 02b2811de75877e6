"""fuse is transactional: it plans and checks everything before it writes.

A failure in any pair, found by Python or by the C core, leaves an in-place
model bit for bit as it was; the write phase cannot be left half done (see
test_write_phase.py); and a fused model that fails verification is restored.
"""
import gc
import types
import weakref

import pytest
import torch
from torch import nn

from conftest import _bits, assert_unchanged, snapshot
from fusion import FusionError, NormParams, analyze, fuse, rewrite
from fusion import verify as fusion_verify
from fusion._native import _C
from zoo import calibrate

SHAPE = (2, 3, 8, 8)


class Pair(nn.Module):
    def __init__(self, cin, cout, bias):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class Five(nn.Module):
    """Five conv -> bn pairs. Every other conv has no bias (fusion adds one),
    and pairs.1.bn is also reachable as ``alias``: undoing must put back both."""

    def __init__(self):
        super().__init__()
        chans = [3, 4, 6, 5, 4, 3]
        self.pairs = nn.ModuleList(
            [Pair(chans[i], chans[i + 1], bias=i % 2 == 0) for i in range(5)])
        self.alias = self.pairs[1].bn

    def forward(self, x):
        for p in self.pairs:
            x = p(x)
        return x


def five():
    return calibrate(Five(), shape=SHAPE)


def inputs():
    return torch.randn(*SHAPE, generator=torch.Generator().manual_seed(11))


class Spy:
    """Stands in for fusion.rewrite._C: logs every prepare and every apply that
    writes, and can make the n-th prepare raise."""

    def __init__(self, fail_on=None, error=None):
        self.events = []
        self.fail_on, self.error = fail_on, error
        self.calls = 0
        self.module = types.SimpleNamespace(prepare=self.prepare, FoldError=_C.FoldError)

    def prepare(self, **kwargs):
        self.calls += 1
        self.events.append("prepare")
        if self.calls == self.fail_on:
            raise self.error
        handle = _C.prepare(**kwargs)
        spy = self

        class Handle:
            def unchanged(self):
                return handle.unchanged()

            def apply(self):  # logged where it writes (a second call does not)
                if not handle.applied:
                    spy.events.append("apply")
                handle.apply()

        return Handle()


def fold_error(code, part, field, index=-1, value=0.0):
    exc = _C.FoldError(f"{part} {field}: planted {code}")
    exc.code, exc.part, exc.field, exc.index, exc.value = code, part, field, index, value
    return exc


# --- a failure in the third of five pairs writes nothing ------------------------------


def up_to_third(inplace):
    """The core's calls up to a failure in the third prepare: in place the first
    two pairs were checked and computed, and none was written; a copy has each
    written as soon as it is checked (the copy is dropped, and the model was never
    written)."""
    return ["prepare"] * 3 if inplace else ["prepare", "apply"] * 2 + ["prepare"]


@pytest.mark.parametrize("inplace", [True, False])
def test_nan_in_third_pair_writes_nothing(inplace, monkeypatch):
    model = five()
    model.pairs[2].bn.running_var[3] = float("nan")
    snap = snapshot(model)
    spy = Spy()
    monkeypatch.setattr(rewrite, "_C", spy.module)
    with pytest.raises(FusionError) as info:
        fuse(model, inplace=inplace)
    assert info.value.layer == "pairs.2.bn" and info.value.code == "nonfinite"
    assert "running_var[3]" in str(info.value)
    assert_unchanged(model, snap)
    assert spy.events == up_to_third(inplace)


@pytest.mark.parametrize("inplace", [True, False])
def test_shape_error_in_third_pair_writes_nothing(inplace):
    """The same, for a fault that the Python plan finds before the core runs."""
    model = five()
    model.pairs[2].bn.running_mean = torch.zeros(7)
    snap = snapshot(model)
    with pytest.raises(FusionError) as info:
        fuse(model, inplace=inplace)
    assert info.value.layer == "pairs.2.bn" and info.value.code == "shape"
    assert_unchanged(model, snap)


@pytest.mark.parametrize("inplace", [True, False])
def test_shape_error_in_third_pair_with_example_inputs_writes_nothing(inplace):
    """With example_inputs the broken model already fails in the recorded run,
    before any plan: still nothing is written."""
    model = five()
    model.pairs[2].bn.running_mean = torch.zeros(7)
    snap = snapshot(model)
    with pytest.raises(FusionError):
        fuse(model, inplace=inplace, example_inputs=inputs())
    assert_unchanged(model, snap)


def test_shape_error_in_recorded_run_names_the_layer():
    model = five()
    model.pairs[2].bn.running_mean = torch.zeros(7)
    with pytest.raises(FusionError) as info:
        fuse(model, example_inputs=inputs())
    assert info.value.layer == "pairs.2.bn" and info.value.code == "example_inputs"
    assert str(info.value).startswith("pairs.2.bn: ")
    assert "running_mean should contain 5 elements not 7" in str(info.value)


@pytest.mark.parametrize("error,exc_type,layer", [
    (fold_error("nonfinite", "norm", "running_var", 1, float("nan")), FusionError,
     "pairs.2.bn"),
    (fold_error("variance", "norm", "running_var", 0, -1.0), FusionError, "pairs.2.bn"),
    (fold_error("nonfinite", "layer", "weight", 7, float("inf")), FusionError,
     "pairs.2.conv"),
    (fold_error("shape", "layer", "bias"), FusionError, "pairs.2.conv"),
    (MemoryError(), MemoryError, None),
    (RuntimeError("planted"), RuntimeError, None),
], ids=["nonfinite-var", "variance", "nonfinite-weight", "shape-bias", "nomem", "runtime"])
@pytest.mark.parametrize("inplace", [True, False])
def test_core_error_on_third_prepare_writes_nothing(error, exc_type, layer, inplace,
                                                    monkeypatch):
    model = five().train()  # and the training flags must come back too
    snap = snapshot(model)
    spy = Spy(fail_on=3, error=error)
    monkeypatch.setattr(rewrite, "_C", spy.module)
    with pytest.raises(exc_type) as info:
        fuse(model, inplace=inplace, example_inputs=inputs())
    if exc_type is FusionError:
        assert info.value.layer == layer
        assert str(info.value).startswith(f"{layer}: ")
        assert info.value.code == error.code
    assert spy.events == up_to_third(inplace)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("inplace", [True, False])
def test_overflow_in_third_pair_leaves_it_and_folds_the_rest(inplace, monkeypatch):
    """An overflow is not an error: that pair is left, with its reason, and
    the others fold."""
    model = five()
    third = {k: v.clone() for k, v in model.pairs[2].state_dict().items()}
    spy = Spy(fail_on=3, error=fold_error("overflow", "layer", "weight", 0, 1e300))
    monkeypatch.setattr(rewrite, "_C", spy.module)
    x = inputs()
    with torch.no_grad():
        want = model(x)
    fused, report = fuse(model, inplace=inplace, return_report=True)
    assert [(n.norm, n.reason) for n in report.left] == [("pairs.2.bn", "overflow")]
    assert sorted(p.norm for p in report.fused) == [f"pairs.{i}.bn" for i in (0, 1, 3, 4)]
    assert spy.events == (["prepare"] * 5 + ["apply"] * 4 if inplace else
                          ["prepare", "apply"] * 2 + ["prepare"] + ["prepare", "apply"] * 2)
    assert isinstance(fused.pairs[2].bn, nn.BatchNorm2d)
    for k, v in fused.pairs[2].state_dict().items():
        assert torch.equal(v, third[k]), k
    with torch.no_grad():
        got = fused(x)
    assert float((got - want).norm() / want.norm()) <= 1e-5


class CatNorm(nn.Module):
    """One norm after a torch.cat of two convs: two folds, one per slice."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(torch.cat([self.conv1(x), self.conv2(x)], 1))


class SharedNorm(nn.Module):
    """One norm module called after each of two convs."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv2(torch.relu(self.bn(self.conv1(x)))))


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("build", [CatNorm, SharedNorm])
@pytest.mark.parametrize("fail_on", [1, 2])
def test_overflow_in_one_fold_of_a_norm_leaves_the_norm(build, fail_on, inplace,
                                                        monkeypatch):
    """A norm that folds into two layers stays, and neither layer is written, when
    either fold would overflow: folding the other alone and removing the norm
    would drop the norm from the overflowing layer's output."""
    torch.manual_seed(0)
    model = calibrate(build(), shape=(2, 3, 8, 8)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
    snap = snapshot(model)
    assert len(analyze(model).fused) == 2
    spy = Spy(fail_on=fail_on, error=fold_error("overflow", "layer", "weight", 0, 1e300))
    monkeypatch.setattr(rewrite, "_C", spy.module)
    fused, report = fuse(model, inplace=inplace, return_report=True)
    assert [(n.norm, n.reason) for n in report.left] == [("bn", "overflow")]
    assert report.fused == [] and "apply" not in spy.events
    assert isinstance(fused.bn, nn.BatchNorm2d)
    with torch.no_grad():
        got = fused(x)
    assert torch.equal(got, want)
    if not inplace:
        assert_unchanged(model, snap)


def test_a_norm_buffer_on_a_layers_storage_folds_alike_in_both_modes():
    """bn2.running_mean lies on conv1.bias's storage, so writing conv1's fold
    first could change what bn2's fold reads; in place every fold is computed
    before the first write, and a copy, whose folds are written as they are
    checked, has conv1.bias on a storage of its own: both give the unfused
    model's outputs, bit for bit alike."""
    torch.manual_seed(0)
    model = calibrate(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4),
                                    nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)),
                      shape=(2, 3, 8, 8)).eval()
    with torch.no_grad():
        model[0].bias.copy_(model[3].running_mean)
    model[3].running_mean = model[0].bias.data  # a buffer on the bias's storage
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
    copied, report = fuse(model, return_report=True)
    assert len(report.fused) == 2
    in_place = fuse(model, inplace=True)
    with torch.no_grad():
        got_copy, got_in_place = copied(x), in_place(x)
    assert torch.equal(got_copy, got_in_place)
    assert float((got_copy - want).norm() / want.norm()) <= 1e-5


def test_every_check_runs_before_the_first_write(monkeypatch):
    spy = Spy()
    monkeypatch.setattr(rewrite, "_C", spy.module)
    _, report = fuse(five(), inplace=True, example_inputs=inputs(), return_report=True)
    assert len(report.fused) == 5
    assert spy.events == ["prepare"] * 5 + ["apply"] * 5


@pytest.mark.parametrize("example", [False, True])
def test_a_copy_is_written_fold_by_fold(example, monkeypatch):
    """Into fuse()'s own copy each fold is written as soon as it is checked (see
    test_fold_apply_releases for what that frees)."""
    spy = Spy()
    monkeypatch.setattr(rewrite, "_C", spy.module)
    model = five()
    x = inputs()
    with torch.no_grad():
        want = model(x)
    fused, report = fuse(model, example_inputs=x if example else None,
                         return_report=True)
    assert len(report.fused) == 5
    assert spy.events == ["prepare", "apply"] * 5
    with torch.no_grad():
        got = fused(x)
    assert float((got - want).norm() / want.norm()) <= 1e-5


# --- the write phase ---------------------------------------------------------------
# A fault or a Ctrl-C at each step of the write phase: tests/test_write_phase.py.


def test_fold_apply_writes_once():
    weight = torch.randn(4, 3, 3, 3)
    bias = torch.zeros(4)
    norm = NormParams(torch.full((4,), 0.5), torch.full((4,), 4.0), None, None, 0.0)
    handle = _C.prepare(weight=weight, bias_in=None, bias_out=bias, norm=norm,
                        before=False, grouped=False, groups=1)
    original = weight.clone()
    assert not handle.applied and torch.equal(weight, original)  # prepare writes nothing
    handle.apply()
    once = weight.clone()
    assert handle.applied and torch.equal(once, original * 0.5)
    assert torch.equal(bias, torch.full((4,), -0.25))
    handle.apply()
    assert torch.equal(weight, once)


def test_fold_apply_releases():
    """An applied fold holds none of its tensors (nor its per-channel arrays):
    they go at once, not when the handle does."""
    weight, bias = torch.randn(4, 3, 3, 3), torch.zeros(4)
    norm = NormParams(torch.full((4,), 0.5), torch.full((4,), 4.0), torch.ones(4), None,
                      0.0)
    handle = _C.prepare(weight=weight, bias_in=None, bias_out=bias, norm=norm,
                        before=False, grouped=False, groups=1)
    held = [weakref.ref(t) for t in (norm.running_mean, norm.running_var, norm.weight)]
    del norm
    gc.collect()
    assert all(r() is not None for r in held)  # the handle holds the norm's tensors
    handle.apply()
    assert all(r() is None for r in held)
    assert handle.applied and handle.unchanged()
    assert torch.equal(bias, torch.full((4,), -0.25))


# --- verification failure restores the model ------------------------------------------


def plant(monkeypatch, layer, channel=1, factor=1.01):
    """Makes write() scale one output channel of one fused weight by ``factor``:
    one channel's scale off by 1%."""
    real = rewrite.write

    def planted(model, prepared, index=None):
        out = real(model, prepared, index)
        with torch.no_grad():
            model.get_submodule(layer).weight[channel].mul_(factor)
        return out

    monkeypatch.setattr(rewrite, "write", planted)


@pytest.mark.parametrize("train", [False, True])
def test_verification_failure_in_place_restores_bit_for_bit(train, monkeypatch):
    model = five().train(train)
    snap = snapshot(model)
    plant(monkeypatch, "pairs.3.conv")
    with pytest.raises(FusionError) as info:
        fuse(model, inplace=True, example_inputs=inputs())
    err = info.value
    assert err.code == "verify" and err.layer == "pairs.3.conv"
    assert "pairs.3.bn" in str(err) and "left as it was" in str(err)
    assert_unchanged(model, snap)  # weights, added biases gone, both BN names back, flags
    assert model.alias is model.pairs[1].bn


def test_verification_failure_not_in_place_leaves_original(monkeypatch):
    model = five()
    snap = snapshot(model)
    plant(monkeypatch, "pairs.0.conv", channel=2)
    with pytest.raises(FusionError) as info:
        fuse(model, example_inputs=inputs())
    assert info.value.code == "verify" and info.value.layer == "pairs.0.conv"
    assert_unchanged(model, snap)


@pytest.mark.parametrize("layer", ["pairs.0.conv", "pairs.3.conv", "pairs.4.conv"])
def test_output_check_alone_catches_one_channel_off_by_one_percent(layer, monkeypatch):
    """With the weight check switched off, the calibrated output tolerance
    still fails the planted bug, and names the pair that diverges."""
    monkeypatch.setattr(fusion_verify, "check_weights", lambda prepared, originals: None)
    model = five()
    snap = snapshot(model)
    plant(monkeypatch, layer)
    with pytest.raises(FusionError, match="verification failed") as info:
        fuse(model, inplace=True, example_inputs=inputs())
    assert info.value.layer == layer
    assert_unchanged(model, snap)


def test_correct_fold_passes_the_same_checks(monkeypatch):
    """The control: without the planted bug the same fuse verifies."""
    monkeypatch.setattr(fusion_verify, "check_weights", lambda prepared, originals: None)
    model = five()
    fused, report = fuse(model, inplace=True, example_inputs=inputs(), return_report=True)
    assert len(report.fused) == 5 and report.rel_err <= report.tolerance


@pytest.mark.slow
def test_output_check_catches_planted_bug_in_resnet18(monkeypatch):
    from zoo import build

    monkeypatch.setattr(fusion_verify, "check_weights", lambda prepared, originals: None)
    model = build("resnet18", shape=(2, 3, 64, 64))
    snap = snapshot(model)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    plant(monkeypatch, "layer3.1.conv2", channel=5)
    with pytest.raises(FusionError, match="verification failed") as info:
        fuse(model, inplace=True, example_inputs=x)
    assert info.value.layer == "layer3.1.conv2"
    assert_unchanged(model, snap)
    monkeypatch.undo()
    # and the same model, fused correctly, passes
    monkeypatch.setattr(fusion_verify, "check_weights", lambda prepared, originals: None)
    fused, report = fuse(model, example_inputs=x, return_report=True)
    assert len(report.fused) == 20 and report.rel_err <= report.tolerance
    assert torch.equal(_bits(model.conv1.weight.detach()), _bits(snap["state"]["conv1.weight"]))
