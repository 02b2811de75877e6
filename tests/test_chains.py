"""Norm chains: Conv -> BN -> BN and BN -> BN -> Conv compose to one affine map,
folded into the layer in float64 and rounded once; one fuse() reaches the
fixpoint. Each trap stands next to a control that folds, and every fused output
is compared with the original's."""
import pytest
import torch
from torch import nn

from conftest import assert_unchanged, rel_err, snapshot
from fusion import FusionError, apply_plan, fuse
from fusion.layers import NormParams, compose
from zoo import calibrate

SHAPE = (2, 3, 8, 8)


class Flow(nn.Module):
    """Modules called in ``order``; ``reuse`` adds a module's output to the end
    result (a second use), and ``twice`` calls a module twice."""

    def __init__(self, modules, order, reuse=None, twice=None, untraceable=False):
        super().__init__()
        for name, m in modules.items():
            self.add_module(name, m)
        self.order, self.reuse, self.twice, self.untraceable = order, reuse, twice, untraceable

    def forward(self, x):
        if self.untraceable and bool(x.sum() != x.sum()):  # never taken
            return x
        extra = 0
        for name in self.order:
            x = getattr(self, name)(x)
            if name == self.twice:
                x = getattr(self, name)(x)
            if name == self.reuse:
                extra = x.mean()
        return x + extra


def run(model, evidence="both"):
    calibrate(model, shape=SHAPE)
    x = torch.randn(*SHAPE)
    snap = snapshot(model)
    kwargs = {} if evidence == "fx" else {"example_inputs": (x,)}
    if evidence == "recorded":
        model.untraceable = True
    fused, report = fuse(model, return_report=True, **kwargs)
    assert_unchanged(model, snap)
    with torch.no_grad():
        assert rel_err(model(x), fused(x)) < 1e-5
    again = fuse(fused, return_report=True)[1]
    assert not again.fused, "one fuse() must reach the fixpoint"
    return fused, report


def pairs(report):
    return [(p.norm, p.layer, p.direction) for p in report.fused]


def left(report):
    return {n.norm: n.reason for n in report.left}


def bn(c=4):
    return nn.BatchNorm2d(c)


@pytest.mark.parametrize("evidence", ["fx", "recorded", "both"])
def test_conv_bn_bn_folds_the_chain(evidence):
    model = Flow({"conv": nn.Conv2d(3, 4, 3), "a": bn(), "b": bn()}, ["conv", "a", "b"])
    fused, report = run(model, evidence)
    assert pairs(report) == [("a", "conv", "after"), ("b", "conv", "after")]
    assert type(fused.a) is nn.Identity and type(fused.b) is nn.Identity
    assert report.plan["folds"][0]["after_more"] == ["b"]


@pytest.mark.parametrize("evidence", ["fx", "recorded", "both"])
def test_bn_bn_conv_folds_the_chain_forward(evidence):
    model = Flow({"a": bn(3), "b": bn(3), "conv": nn.Conv2d(3, 4, 3)}, ["a", "b", "conv"])
    _, report = run(model, evidence)
    assert sorted(pairs(report)) == [("a", "conv", "before"), ("b", "conv", "before")]
    assert report.plan["folds"][0]["before_more"] == ["a"]


def test_chains_on_both_sides_of_one_layer():
    model = Flow({"a": bn(3), "b": bn(3), "conv": nn.Conv2d(3, 4, 1), "c": bn(), "d": bn(),
                  "e": bn()}, ["a", "b", "conv", "c", "d", "e"])
    _, report = run(model)
    assert sorted(n for n, _, _ in pairs(report)) == ["a", "b", "c", "d", "e"]
    assert {layer for _, layer, _ in pairs(report)} == {"conv"}


def test_chain_weights_are_the_exact_composition_rounded_once():
    model = calibrate(Flow({"conv": nn.Conv2d(3, 4, 3), "a": bn(), "b": bn()},
                           ["conv", "a", "b"]), shape=SHAPE)
    fused = fuse(model)
    s = torch.ones(4, dtype=torch.float64)
    t = torch.zeros(4, dtype=torch.float64)
    for m in (model.a, model.b):
        si = m.weight.double() / torch.sqrt(m.running_var.double() + m.eps)
        s, t = s * si, t * si + m.bias.double() - m.running_mean.double() * si
    w = model.conv.weight.double() * s.reshape(-1, 1, 1, 1)
    b = model.conv.bias.double() * s + t
    from fusion.verify import _ulps
    assert _ulps(fused.conv.weight, w) <= 1 and _ulps(fused.conv.bias, b) <= 1


def test_compose_of_one_map_is_that_map():
    p = NormParams(torch.zeros(2), torch.ones(2), None, None, 1e-5)
    assert compose([p]) is p


def test_an_activation_between_the_norms_ends_the_chain():
    model = Flow({"conv": nn.Conv2d(3, 4, 3), "a": bn(), "act": nn.ReLU(), "b": bn()},
                 ["conv", "a", "act", "b"])
    _, report = run(model)
    assert pairs(report) == [("a", "conv", "after")]
    assert left(report) == {"b": "not_after_producer"}


def test_a_reused_middle_norm_ends_the_chain():
    model = Flow({"conv": nn.Conv2d(3, 4, 3), "a": bn(), "b": bn()}, ["conv", "a", "b"],
                 reuse="a")
    _, report = run(model)
    assert pairs(report) == [("a", "conv", "after")]
    assert left(report) == {"b": "not_after_producer"}


def test_a_middle_norm_called_twice_ends_the_chain():
    model = Flow({"conv": nn.Conv2d(3, 4, 3), "a": bn(), "b": bn()}, ["conv", "a", "b"],
                 twice="a")
    _, report = run(model)
    assert "b" in left(report) and "a" in left(report)


def test_a_middle_norm_with_a_hook_leaves_the_rest_of_the_chain():
    model = Flow({"conv": nn.Conv2d(3, 4, 3), "a": bn(), "b": bn(), "c": bn()},
                 ["conv", "a", "b", "c"])
    model.b.register_forward_hook(lambda m, i, o: None)
    _, report = run(model)
    assert pairs(report) == [("a", "conv", "after")]
    assert left(report) == {"b": "has_hooks", "c": "not_after_producer"}
    assert "the norm b, which is left (has_hooks)" in report.left[-1].detail


def test_bn_bn_before_a_padded_conv_is_left_and_unpadded_folds():
    padded = Flow({"a": bn(3), "b": bn(3), "conv": nn.Conv2d(3, 4, 3, padding=1)},
                  ["a", "b", "conv"])
    _, report = run(padded)
    assert left(report) == {"a": "zero_padding", "b": "zero_padding"}


def test_a_broken_norm_in_a_chain_is_named():
    model = calibrate(Flow({"conv": nn.Conv2d(3, 4, 3), "a": bn(), "b": bn()},
                           ["conv", "a", "b"]), shape=SHAPE)
    with torch.no_grad():
        model.b.running_mean[2] = float("nan")
    with pytest.raises(FusionError) as info:
        fuse(model)
    assert info.value.layer == "b" and info.value.code == "nonfinite"
    assert "running_mean[2]" in str(info.value)


def test_apply_plan_rebuilds_a_chain():
    model = calibrate(Flow({"conv": nn.Conv2d(3, 4, 3), "a": bn(), "b": bn()},
                           ["conv", "a", "b"]), shape=SHAPE)
    fused, report = fuse(model, return_report=True)
    fresh = Flow({"conv": nn.Conv2d(3, 4, 3), "a": bn(), "b": bn()}, ["conv", "a", "b"])
    apply_plan(fresh, report.plan)
    fresh.load_state_dict(fused.state_dict())
    x = torch.randn(*SHAPE)
    with torch.no_grad():
        assert torch.equal(fresh(x), fused(x))
