"""Norms with a remainder (timm's norm-act classes, register_norm(remainder=)),
layers with their own forward (timm's Conv2dSame, register_layer), and the rule
for a norm after torch.cat of several convs: each fold is checked on the
output, with torch.fx's evidence, a recorded run's, and both."""
from collections import OrderedDict

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from conftest import assert_unchanged, rel_err, snapshot
from fusion import (FusionError, NormParams, analyze, apply_plan, fuse, fuse_conv_and_bn,
                    register_layer, register_norm, unregister_layer, unregister_norm)
from fusion.verify import _ulps
from zoo import calibrate

SHAPE = (2, 4, 8, 8)
EVIDENCE = ["fx", "recorded", "both"]


def run(model, how, shape=SHAPE):
    """fuse() with the evidence ``how`` names (fx alone, or with a recorded
    run), checking the output and that the original is untouched."""
    calibrate(model, shape=shape)
    x = torch.randn(*shape)
    snap = snapshot(model)
    kwargs = {} if how == "fx" else {"example_inputs": (x,)}
    if how == "recorded":
        model.fx_blocker = True  # see _Untraceable
    fused, report = fuse(model, return_report=True, **kwargs)
    assert report.evidence == {"fx": ["fx"], "recorded": ["recorded"],
                               "both": ["fx", "recorded"]}[how]
    assert_unchanged(model, snap)
    with torch.no_grad():
        assert rel_err(model(x), fused(x)) < 1e-5
    assert type(fused) is type(model)
    return fused, report


def pairs(report):
    return sorted((p.norm, p.layer, p.direction, tuple(p.channels or ()), p.replaced_by)
                  for p in report.fused)


def reasons(report):
    return {n.norm: n.reason for n in report.left}


class _Untraceable(nn.Module):
    """Makes torch.fx fail (a branch on a tensor's value), so that only the
    recorded run proves anything."""

    def untraceable(self, x):
        if getattr(self, "fx_blocker", False) and bool(x.sum() != x.sum()):
            return x * 2  # never taken: NaN != NaN only
        return x


# --- norms with a remainder ------------------------------------------------------


class NormAct(nn.BatchNorm2d):
    """A BatchNorm then ``drop`` then ``act``, like timm's BatchNormAct2d."""

    def __init__(self, c, act=None, drop=None):
        super().__init__(c)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


def _drop_act(m):
    if type(m.drop) is nn.Identity and type(m.act) is nn.Identity:
        return None
    return nn.Sequential(OrderedDict(drop=m.drop, act=m.act))


@pytest.fixture
def norm_act():
    register_norm(NormAct, remainder=_drop_act)
    yield NormAct
    unregister_norm(NormAct)


class ConvNormAct(_Untraceable):
    def __init__(self, act):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.bn = NormAct(6, act=act)
        self.head = nn.Conv2d(6, 3, 1)

    def forward(self, x):
        return self.head(self.bn(self.conv(self.untraceable(x))))


@pytest.mark.parametrize("how", EVIDENCE)
def test_norm_with_activation_folds_and_leaves_its_activation(norm_act, how):
    model = ConvNormAct(nn.SiLU())
    fused, report = run(model, how)
    assert pairs(report) == [("bn", "conv", "after", (), "Sequential(drop=Identity, act=SiLU)")]
    assert isinstance(fused.bn, nn.Sequential)
    assert list(fused.bn._modules) == ["drop", "act"]
    assert isinstance(fused.bn.act, nn.SiLU)  # model.bn.act still works
    assert fused.bn.act is not model.bn.act  # the copy's own module
    assert not report.left


def test_in_place_the_remainder_is_the_norms_own_modules(norm_act):
    model = calibrate(ConvNormAct(nn.ReLU(inplace=True)), shape=SHAPE)
    act = model.bn.act
    x = torch.randn(*SHAPE)
    with torch.no_grad():
        want = model(x)
    fused = fuse(model, inplace=True, example_inputs=(x,))
    assert fused is model and fused.bn.act is act
    with torch.no_grad():
        assert rel_err(want, fused(x)) < 1e-5


def test_identity_remainder_is_nn_identity_and_folds_either_way(norm_act):
    # act and drop are identities: the norm is a plain affine map and may also
    # fold into the layer it feeds.
    model = nn.Sequential(NormAct(4), nn.Conv2d(4, 6, 1))
    fused, report = run(model, "fx")
    assert pairs(report) == [("0", "1", "before", (), "Identity")]
    assert type(fused[0]) is nn.Identity


def test_norm_with_activation_does_not_fold_into_the_layer_it_feeds(norm_act):
    model = nn.Sequential(NormAct(4, act=nn.ReLU()), nn.Conv2d(4, 6, 1))
    _, report = run(model, "both")
    assert not report.fused
    left = report.left[0]
    assert (left.norm, left.reason) == ("0", "not_after_producer")
    assert "Sequential(drop=Identity, act=ReLU) runs in between" in left.detail


def test_remainder_survives_apply_plan_and_a_state_dict(norm_act):
    model = calibrate(ConvNormAct(nn.Hardswish()), shape=SHAPE)
    x = torch.randn(*SHAPE)
    fused, report = fuse(model, example_inputs=(x,), return_report=True)
    fresh = ConvNormAct(nn.Hardswish())
    apply_plan(fresh, report.plan)
    assert isinstance(fresh.bn, nn.Sequential) and isinstance(fresh.bn.act, nn.Hardswish)
    fresh.load_state_dict(fused.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), fused(x))


def test_analyze_reports_what_would_replace_the_norm(norm_act):
    model = calibrate(ConvNormAct(nn.GELU()), shape=SHAPE)
    report = analyze(model)
    assert report.fused[0].replaced_by == "Sequential(drop=Identity, act=GELU)"
    assert "replaced by Sequential(drop=Identity, act=GELU)" in str(report)
    assert isinstance(model.bn, NormAct)  # a dry run


def test_fuse_conv_and_bn_refuses_a_norm_with_a_remainder(norm_act):
    conv, bn = nn.Conv2d(4, 6, 3), calibrate(nn.Sequential(NormAct(6, act=nn.ReLU())),
                                             shape=(2, 6, 4, 4))[0]
    with pytest.raises(FusionError) as info:
        fuse_conv_and_bn(conv, bn)
    assert info.value.code == "remainder" and "fuse()" in str(info.value)


def test_subclass_of_a_registered_norm_with_another_forward_stays_unknown(norm_act):
    class Shifted(NormAct):
        def forward(self, x):
            return super().forward(x) + 1

    model = nn.Sequential(nn.Conv2d(4, 6, 3), Shifted(6, act=nn.ReLU()))
    _, report = run(model, "fx")
    assert reasons(report) == {"1": "unknown_norm"}


def test_a_remainder_that_is_not_a_module_is_an_error():
    register_norm(NormAct, remainder=lambda m: "relu")
    try:
        model = calibrate(nn.Sequential(nn.Conv2d(4, 6, 3), NormAct(6)), shape=SHAPE)
        with pytest.raises(TypeError, match="remainder"):
            fuse(model)
    finally:
        unregister_norm(NormAct)
    with pytest.raises(TypeError, match="callable"):
        register_norm(NormAct, remainder="act")


# --- layers with their own forward ------------------------------------------------


class PadConv(nn.Conv2d):
    """A conv that pads its input itself (replicate), like timm's Conv2dSame."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), self.weight, self.bias,
                        self.stride, 0, self.dilation, self.groups)


class ConvBN(_Untraceable):
    def __init__(self, conv, bn_first=False):
        super().__init__()
        self.conv, self.bn, self.bn_first = conv, nn.BatchNorm2d(4), bn_first

    def forward(self, x):
        x = self.untraceable(x)
        return self.conv(self.bn(x)) if self.bn_first else self.bn(self.conv(x))


@pytest.mark.parametrize("how", EVIDENCE)
def test_registered_layer_takes_a_following_norm(how):
    model = ConvBN(PadConv(4, 4, 3))
    _, report = run(model, how)
    assert reasons(report) == {"bn": "unsupported_layer"}
    register_layer(PadConv)
    try:
        _, report = run(ConvBN(PadConv(4, 4, 3)), how)
        assert pairs(report) == [("bn", "conv", "after", (), "Identity")]
    finally:
        unregister_layer(PadConv)


def test_registered_layer_does_not_take_a_norm_before_it():
    register_layer(PadConv)
    try:
        _, report = run(ConvBN(PadConv(4, 4, 3), bn_first=True), "both")
        assert reasons(report) == {"bn": "unsupported_layer"}
    finally:
        unregister_layer(PadConv)


def test_a_subclass_of_a_registered_layer_with_another_forward_stays_unknown():
    class Doubled(PadConv):
        def forward(self, x):
            return super().forward(x) * 2

    register_layer(PadConv)
    try:
        _, report = run(ConvBN(Doubled(4, 4, 3)), "both")
        assert reasons(report) == {"bn": "unsupported_layer"}
    finally:
        unregister_layer(PadConv)


def test_register_layer_takes_only_conv_and_linear_subclasses():
    with pytest.raises(TypeError, match="register_layer"):
        register_layer(nn.ReLU)
    with pytest.raises(TypeError, match="register_layer"):
        register_layer("Conv2d")


# --- a norm after torch.cat --------------------------------------------------------


class CatNorm(_Untraceable):
    """Two convs (4 and 2 channels), concatenated, then one norm; ``variant``
    sets one of the traps."""

    def __init__(self, variant="plain"):
        super().__init__()
        self.variant = variant
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 2, 1, bias=False)
        c = 6 if variant != "dim0" else 4
        self.bn = nn.BatchNorm2d(c if variant != "with_input" else 10)
        self.act = nn.ReLU()

    def forward(self, x):
        x = self.untraceable(x)
        a, b = self.a(x), self.b(x)
        v = self.variant
        if v == "dim0":
            y = torch.cat([a, torch.cat([b, b], 1)], 0)
        elif v == "with_input":
            y = torch.cat([a, b, x], 1)
        elif v == "same_twice":
            y = torch.cat([a, b[:, :1], b[:, 1:]], 1)
        elif v == "reused_branch":
            y = torch.cat([a, b], 1)
            return self.act(self.bn(y)) + b.sum()
        elif v == "reused_cat":
            y = torch.cat([a, b], 1)
            return self.act(self.bn(y)) + y
        elif v == "negative_dim":
            y = torch.cat((a, b), dim=-3)
        else:
            y = torch.cat([a, b], 1)
        return self.act(self.bn(y))


@pytest.mark.parametrize("how", EVIDENCE)
def test_norm_after_cat_of_convs_folds_into_each_slice(how):
    fused, report = run(CatNorm(), how)
    assert pairs(report) == [("bn", "a", "after", (0, 4), "Identity"),
                             ("bn", "b", "after", (4, 6), "Identity")]
    assert report.norms_fused == 1 and type(fused.bn) is nn.Identity
    assert fused.b.bias is not None and report.fused[1].bias_added


def test_cat_along_a_negative_channel_dim_folds_with_a_recorded_run():
    # fx sees dim=-3 without the rank; the recorded run knows it is dim 1.
    _, report = run(CatNorm("negative_dim"), "recorded")
    assert [p.layer for p in report.fused] == ["a", "b"]


@pytest.mark.parametrize("how", EVIDENCE)
@pytest.mark.parametrize("variant, reason", [
    ("dim0", "not_after_producer"),
    ("with_input", "not_after_producer"),
    ("same_twice", "not_after_producer"),
    ("reused_branch", "producer_output_reused"),
    ("reused_cat", "producer_output_reused"),
])
def test_cat_traps_are_left(how, variant, reason):
    _, report = run(CatNorm(variant), how)
    assert reasons(report) == {"bn": reason}, report.left


def test_cat_of_a_conv_called_twice_is_left():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 3, 1)
            self.bn = nn.BatchNorm2d(6)

        def forward(self, x):
            return self.bn(torch.cat([self.a(x), self.a(x * 2)], 1))

    _, report = run(Twice(), "both")
    assert reasons(report) == {"bn": "called_twice"}


def test_cat_whose_channels_do_not_add_up_is_an_error():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 3, 1), nn.Conv2d(4, 3, 1)
            self.bn = nn.BatchNorm2d(5)  # 3 + 3 != 5: the model cannot run

        def forward(self, x):
            return self.bn(torch.cat([self.a(x), self.b(x)], 1))

    with pytest.raises(FusionError) as info:
        fuse(Broken())
    assert info.value.code == "shape" and info.value.layer == "bn"
    assert "torch.cat of a, b" in str(info.value)


def test_fused_slices_are_exact():
    model = calibrate(CatNorm(), shape=SHAPE)
    fused = fuse(model)
    bn = model.bn
    s = (bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps))
    t = bn.bias.double() - bn.running_mean.double() * s
    for conv, (lo, hi) in ((model.a, (0, 4)), (model.b, (4, 6))):
        name = "a" if conv is model.a else "b"
        want_w = conv.weight.double() * s[lo:hi].reshape(-1, 1, 1, 1)
        bias = conv.bias.double() if conv.bias is not None else 0
        want_b = bias * s[lo:hi] + t[lo:hi]
        got = getattr(fused, name)
        assert _ulps(got.weight, want_w) <= 1 and _ulps(got.bias, want_b) <= 1


def test_norm_params_channels():
    p = NormParams(torch.arange(6.0), torch.ones(6), None, torch.zeros(6), 1e-5)
    q = p.channels(2, 5)
    assert q.running_mean.tolist() == [2.0, 3.0, 4.0] and q.weight is None
    assert q.bias.numel() == 3 and q.eps == 1e-5
