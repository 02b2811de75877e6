"""Copy mode folds each layer's weight from the original into the copy.

``fuse(model)`` copies the model with the weights of its convolutions and
linear layers left uninitialised (rewrite.DeferredCopy); each fold reads the
original weight and writes the copy's (``_C.prepare(out=)``), and every other
weight is copied after the plan. These tests fill the new weights with NaN
instead of leaving them uninitialised, so that a weight neither folded nor
copied, or a trace that saw one, shows: the fused copy must be bit for bit the
model fused in place, and the original must be untouched.
"""
import copy

import pytest
import torch
from torch import nn

from conftest import rel_err
from fusion import FusionError, NormParams, _C, fuse, rewrite
from zoo import build, calibrate


@pytest.fixture
def poisoned(monkeypatch):
    """The copy's deferred weights start as NaN, not as whatever memory held.
    Yields the list of the weights made so."""
    made = []
    real = rewrite.fresh_like

    def nan_like(t):
        out = real(t)
        if out is not None:
            out.fill_(float("nan"))
            made.append(out)
        return out

    monkeypatch.setattr(rewrite, "fresh_like", nan_like)
    yield made


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


_INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t):
    """A float tensor's bit patterns (NaN payloads and signed zeros included)."""
    t = t.detach().contiguous()
    return t.view(_INT_OF[t.element_size()]) if t.is_floating_point() else t


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].stride() == b[k].stride(), k
        assert torch.equal(bits(a[k]), bits(b[k])), k


def check_copy_is_in_place(model, x=None):
    """fuse(model) is fuse(deepcopy(model), inplace=True), bit for bit and
    report for report; the model is untouched."""
    before = state(model)
    want, want_report = fuse(copy.deepcopy(model), inplace=True, return_report=True)
    got, report = fuse(model, return_report=True)
    assert got is not model
    assert_same_state(state(got), state(want))
    assert [(p.norm, p.layer, p.untied) for p in report.fused] == \
        [(p.norm, p.layer, p.untied) for p in want_report.fused]
    assert [(n.norm, n.reason) for n in report.left] == \
        [(n.norm, n.reason) for n in want_report.left]
    assert_same_state(state(model), before)
    for t in got.state_dict().values():
        assert not (t.is_floating_point() and torch.isnan(t).any())
    if x is not None:
        with torch.no_grad():
            assert rel_err(model(x), got(x)) <= 1e-4  # float32 rounding, as in place
    return got, report


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
def test_zoo_models_fused_as_copies_are_the_models_fused_in_place(name, poisoned):
    model = build(name, seed=0, shape=(2, 3, 64, 64))
    got, report = check_copy_is_in_place(model, torch.randn(1, 3, 64, 64))
    assert poisoned and len(report.fused) > 10


class ReadsAWeight(nn.Module):
    """Whether ``bn`` follows ``conv`` depends on ``first``'s weight values,
    which the forward reads past torch.fx (through ``_parameters``): with real
    weights bn runs after conv, with NaN weights before it."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 4, 3)
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.first(x)
        if bool(torch.isfinite(self.first._parameters["weight"]).all()):
            return self.bn(self.conv(y))
        return self.conv(self.bn(y))


def test_a_trace_that_reads_a_weight_not_copied_yet_is_made_again(poisoned):
    model = calibrate(ReadsAWeight(), (2, 3, 8, 8))
    got, report = check_copy_is_in_place(model, torch.randn(2, 3, 8, 8))
    assert [(p.norm, p.layer, p.direction) for p in report.fused] == \
        [("bn", "conv", "after")]


class Tied(nn.Module):
    """Two convs share one weight, each with its own norm."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
        self.b.weight = self.a.weight
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn_a(self.a(x)) + self.bn_b(self.b(x))


def test_shared_weights_are_untied_from_the_original(poisoned):
    """Each conv gets its own fused weight, folded from the original."""
    got, report = check_copy_is_in_place(calibrate(Tied(), (2, 3, 8, 8)),
                                         torch.randn(2, 3, 8, 8))
    assert len(report.fused) == 2 and all(p.untied for p in report.fused)
    assert got.a.weight is not got.b.weight


def test_a_fold_that_would_overflow_leaves_the_weight_copied(poisoned):
    conv = nn.Conv2d(3, 4, 3).half()
    bn = nn.BatchNorm2d(4).half().eval()
    with torch.no_grad():
        conv.weight.fill_(1000.0)
        bn.weight.fill_(1000.0)
    model = nn.Sequential(conv, bn, nn.Conv2d(4, 2, 1).half()).eval()
    got, report = check_copy_is_in_place(model)
    assert [n.reason for n in report.left] == ["overflow"]
    assert torch.equal(got[0].weight, conv.weight)


def test_a_broken_weight_raises_as_in_place_and_nothing_changes(poisoned):
    model = calibrate(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), (2, 3, 8, 8))
    with torch.no_grad():
        model[0].weight[2, 1, 0, 0] = float("inf")
    before = state(model)
    with pytest.raises(FusionError) as in_place:
        fuse(copy.deepcopy(model), inplace=True)
    with pytest.raises(FusionError) as as_copy:
        fuse(model)
    assert str(as_copy.value) == str(in_place.value)
    assert as_copy.value.layer == "0" and as_copy.value.code == "nonfinite"
    assert_same_state(state(model), before)


def test_weights_that_are_not_deferred_are_copied_as_deepcopy_copies_them(poisoned):
    """Only host weights that are exactly nn.Parameter, dense, of a folded
    dtype, are deferred; the rest, and every bias and norm, deepcopy copies."""
    model = calibrate(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                                    nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)), (2, 3, 8, 8))
    model[2].weight = nn.Parameter(model[2].weight.detach().double().float())
    model[2].weight.tag = "kept"  # a Parameter's own attribute: deepcopy drops it
    check_copy_is_in_place(model, torch.randn(2, 3, 8, 8))
    assert len(poisoned) == 2  # both conv weights, the tagged one too


# --- the core's fold into another tensor ---------------------------------------------


def _norm(c):
    return NormParams(torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64),
                      torch.linspace(0.5, 2.0, c, dtype=torch.float64), None, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16,
                                   torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_a_fold_into_out_writes_what_the_fold_in_place_writes(dtype, layout):
    w = torch.randn(8, 6, 3, 3, generator=torch.Generator().manual_seed(3)).to(dtype)
    if layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        w = w.transpose(2, 3)
    source = w.clone(memory_format=torch.preserve_format)
    out = rewrite.fresh_like(w)
    assert out is not None and out.stride() == w.stride()
    in_place = w.clone(memory_format=torch.preserve_format)
    b1, b2 = torch.zeros(8, dtype=dtype), torch.zeros(8, dtype=dtype)
    version = w._version
    fold = _C.prepare(w, None, b1, _norm(8), before=False, grouped=False, groups=1, out=out)
    out_version = out._version
    fold.apply()
    _C.prepare(in_place, None, b2, _norm(8), before=False, grouped=False, groups=1).apply()
    assert torch.equal(w, source) and w._version == version  # only read
    assert out._version > out_version
    assert torch.equal(bits(out), bits(in_place))
    assert torch.equal(b1, b2)


@pytest.mark.parametrize("bad, code", [
    (lambda w: w, "overlap"),
    (lambda w: w.view(-1)[1:].view(-1)[:w.numel() - 1], None),  # wrong shape: below
    (lambda w: torch.empty_like(w, dtype=torch.float64), "dtype"),
    (lambda w: torch.empty(6, 8).t(), "shape"),
    (lambda w: torch.empty(8, 7), "shape"),
])
def test_an_out_that_is_not_a_fresh_tensor_of_the_weights_layout_is_refused(bad, code):
    w = torch.randn(8, 6)
    out = bad(w)
    if code is None:  # a view one element into the weight's own storage
        out = torch.as_strided(w, (7, 6), (6, 1), 1)
        w = torch.as_strided(w, (7, 6), (6, 1), 0)
        code = "overlap"
    before = w.clone()
    with pytest.raises(_C.FoldError) as err:
        _C.prepare(w, None, torch.zeros(w.shape[0]), _norm(w.shape[0]), before=False,
                   grouped=False, groups=1, out=out)
    assert err.value.code == code and err.value.part == "layer"
    assert torch.equal(w, before)


def test_an_out_changed_after_prepare_is_not_written():
    w, out = torch.ones(16, 4), torch.zeros(16, 4)
    fold = _C.prepare(w, None, torch.zeros(16), _norm(16), before=False, grouped=False,
                      groups=1, out=out)
    out.set_(torch.zeros(64))
    assert not fold.unchanged()
    fold.apply()
    assert not fold.applied and torch.equal(out, torch.zeros(64))
