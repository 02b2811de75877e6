"""Hand-made models where naive fusers go wrong. Each trap has its expected
outcome, and a near-identical control that must fold, so that a fuser which
folds nothing fails too. Every fused output is compared with the original."""
import pytest
import torch
from torch import nn

from conftest import assert_unchanged, rel_err, snapshot
from fusion import fuse
from zoo import calibrate


def conv(cin=4, cout=4, k=3, padding=1, bias=False):
    return nn.Conv2d(cin, cout, k, padding=padding, bias=bias)


def run_case(model, example_inputs=None, shape=(2, 4, 8, 8)):
    calibrate(model, shape=shape)
    snap = snapshot(model)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = model(x)
    fused, report = fuse(model, example_inputs=example_inputs, return_report=True)
    with torch.no_grad():
        y_fused = fused(x)
    assert_unchanged(model, snap)
    assert rel_err(y, y_fused) <= 1e-5
    return fused, report


def reasons(report):
    return {n.norm: n.reason for n in report.left}


def fused_names(report):
    return {p.norm for p in report.fused}


# --- the conv's output is also used elsewhere --------------------------------

class OutputReused(nn.Module):
    def __init__(self, reuse):
        super().__init__()
        self.reuse = reuse
        self.conv, self.bn = conv(), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + (y if self.reuse else x)


def test_output_reused_is_left():
    _, report = run_case(OutputReused(True))
    assert reasons(report) == {"bn": "producer_output_reused"}


def test_output_reused_control_folds():
    _, report = run_case(OutputReused(False))
    assert fused_names(report) == {"bn"}


class ReturnsConvOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = conv(), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y), y


def test_returned_conv_output_is_left():
    model = calibrate(ReturnsConvOutput(), shape=(2, 4, 8, 8))
    _, report = fuse(model, return_report=True)
    assert reasons(report) == {"bn": "producer_output_reused"}
    _, report = fuse(model, example_inputs=torch.randn(1, 4, 8, 8), return_report=True)
    assert reasons(report) == {"bn": "producer_output_reused"}


# --- BN called before the conv, and declared before but called after ----------

class BNFirst(nn.Module):
    def __init__(self, call_bn_first, padding=1):
        super().__init__()
        self.call_bn_first = call_bn_first
        self.bn = nn.BatchNorm2d(4)  # declared first in both cases
        self.conv = conv(padding=padding)

    def forward(self, x):
        if self.call_bn_first:
            return self.conv(self.bn(x))
        return self.bn(self.conv(x))


def test_bn_called_before_padded_conv_is_left():
    _, report = run_case(BNFirst(True, padding=1))
    assert reasons(report) == {"bn": "zero_padding"}


def test_bn_called_before_unpadded_conv_folds_forward():
    fused, report = run_case(BNFirst(True, padding=0))
    assert [(p.norm, p.layer, p.direction) for p in report.fused] == [("bn", "conv", "before")]


def test_bn_declared_before_but_called_after_folds():
    fused, report = run_case(BNFirst(False))
    assert [(p.norm, p.layer, p.direction) for p in report.fused] == [("bn", "conv", "after")]
    assert isinstance(fused.bn, nn.Identity)


# --- not siblings ------------------------------------------------------------

class NotSiblings(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(conv(), nn.ReLU())
        self.b = nn.ModuleDict({"conv": conv()})
        self.c = nn.ModuleList([nn.BatchNorm2d(4)])

    def forward(self, x):
        return self.c[0](self.b["conv"](self.a(x)))


def test_conv_and_bn_not_siblings_fold():
    _, report = run_case(NotSiblings())
    assert [(p.norm, p.layer) for p in report.fused] == [("c.0", "b.conv")]


# --- batch statistics ----------------------------------------------------------

@pytest.mark.parametrize("track", [False, True])
def test_track_running_stats(track):
    model = nn.Sequential(conv(), nn.BatchNorm2d(4, track_running_stats=track))
    _, report = run_case(model)
    if track:
        assert fused_names(report) == {"1"}
    else:
        assert reasons(report) == {"1": "batch_statistics"}


# --- one conv module called twice ----------------------------------------------

class ConvTwice(nn.Module):
    def __init__(self, shared):
        super().__init__()
        self.conv = conv()
        self.conv2 = self.conv if shared else conv()
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn1(self.conv(x)) + self.bn2(self.conv2(x))


def test_conv_called_twice_is_left():
    _, report = run_case(ConvTwice(True))
    assert reasons(report) == {"bn1": "called_twice", "bn2": "called_twice"}
    _, report = run_case(ConvTwice(True), example_inputs=torch.randn(1, 4, 8, 8))
    assert reasons(report) == {"bn1": "called_twice", "bn2": "called_twice"}


def test_conv_called_twice_control_folds():
    _, report = run_case(ConvTwice(False))
    assert fused_names(report) == {"bn1", "bn2"}


class BNTwice(nn.Module):
    """One BN after two different convs: it folds into each (the safe exception)."""

    def __init__(self, residual):
        super().__init__()
        self.residual = residual
        self.c1, self.c2, self.bn = conv(), conv(), nn.BatchNorm2d(4)

    def forward(self, x):
        a = self.bn(self.c1(x))
        b = self.bn(self.c2(x)) if not self.residual else self.bn(self.c2(x) + x)
        return a + b


def test_shared_bn_folds_into_each_producer():
    fused, report = run_case(BNTwice(False))
    assert sorted((p.norm, p.layer) for p in report.fused) == [("bn", "c1"), ("bn", "c2")]


def test_shared_bn_with_one_call_not_after_a_conv_is_left():
    _, report = run_case(BNTwice(True))
    assert reasons(report) == {"bn": "called_twice"}
    assert "not each after its own layer" in report.left[0].detail


# --- value-dependent control flow -----------------------------------------------

class Branchy(nn.Module):
    def __init__(self, branch):
        super().__init__()
        self.branch = branch
        self.conv, self.bn = conv(), nn.BatchNorm2d(4)

    def forward(self, x):
        if self.branch and x.sum() > 0:  # fx cannot trace this
            x = x * 2
        return self.bn(self.conv(x))


def test_value_dependent_control_flow_without_inputs_is_left():
    _, report = run_case(Branchy(True))
    assert reasons(report) == {"bn": "needs_example_inputs"}


def test_value_dependent_control_flow_control_folds():
    _, report = run_case(Branchy(False))
    assert fused_names(report) == {"bn"}


def test_value_dependent_control_flow_with_inputs_folds():
    _, report = run_case(Branchy(True), example_inputs=torch.randn(1, 4, 8, 8))
    assert fused_names(report) == {"bn"}
    assert report.evidence == ["recorded"]


class BranchesToOtherConv(nn.Module):
    """The recorded run takes one branch; the other would need the BN."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.bn = conv(), conv(), nn.BatchNorm2d(4)

    def forward(self, x):
        if x.mean() > 0:
            return self.bn(self.c1(x))
        return self.bn(self.c2(x))


def test_branch_not_taken_blocks_folds_from_one_run():
    model = calibrate(BranchesToOtherConv(), shape=(2, 4, 8, 8))
    pos = torch.rand(1, 4, 8, 8) + 0.1
    fused, report = fuse(model, example_inputs=pos, return_report=True)
    assert reasons(report) == {"bn": "value_dependent_flow"}
    neg = -pos
    with torch.no_grad():
        assert rel_err(model(neg), fused(neg)) <= 1e-5


# --- hooks and parametrizations -----------------------------------------------

def test_weight_norm_conv_is_left_and_control_folds():
    model = nn.Sequential(nn.utils.weight_norm(conv()), nn.BatchNorm2d(4))
    _, report = run_case(model)
    assert reasons(report) == {"1": "has_hooks"}
    _, report = run_case(nn.Sequential(conv(), nn.BatchNorm2d(4)))
    assert fused_names(report) == {"1"}


def test_parametrized_conv_is_left():
    layer = conv()
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", nn.Identity())
    _, report = run_case(nn.Sequential(layer, nn.BatchNorm2d(4)))
    assert reasons(report) == {"1": "has_hooks"}


def test_bn_with_forward_hook_is_left_and_keeps_its_hook():
    bn = nn.BatchNorm2d(4)
    seen = []
    bn.register_forward_hook(lambda m, i, o: seen.append(1))
    model = nn.Sequential(conv(), bn)
    fused, report = run_case(model)
    assert reasons(report) == {"1": "has_hooks"}
    seen.clear()
    fused(torch.randn(1, 4, 8, 8))
    assert seen == [1]


# --- one BN under two names ------------------------------------------------------

class Aliased(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = conv(), nn.BatchNorm2d(4)
        self.alias = self.bn

    def forward(self, x):
        return self.alias(self.conv(x))


def test_bn_reachable_under_two_names_is_rewritten_everywhere():
    fused, report = run_case(Aliased())
    assert fused_names(report) == {"bn"}
    assert isinstance(fused.bn, nn.Identity) and fused.alias is fused.bn
    assert report.plan["replaced"] == ["bn", "alias"]


# --- activation between conv and BN ---------------------------------------------

@pytest.mark.parametrize("between", [True, False])
def test_activation_between_conv_and_bn(between):
    layers = [conv(), nn.ReLU(), nn.BatchNorm2d(4)] if between else \
        [conv(), nn.BatchNorm2d(4), nn.ReLU()]
    _, report = run_case(nn.Sequential(*layers))
    if between:
        assert reasons(report) == {"2": "not_after_producer"}
    else:
        assert fused_names(report) == {"1"}


class InplaceBetween(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = conv(), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        y.add_(1.0)
        return self.bn(y)


def test_inplace_op_between_conv_and_bn_is_left():
    _, report = run_case(InplaceBetween())
    assert reasons(report) == {"bn": "producer_output_reused"}
    _, report = run_case(InplaceBetween(), example_inputs=torch.randn(1, 4, 8, 8))
    assert reasons(report) == {"bn": "producer_output_reused"}


class IndexedElsewhere(nn.Module):
    """Indexing is a use that Python-level tracing can miss."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = conv(), nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > -1e9:  # untraceable, so the recorded run is the evidence
            pass
        y = self.conv(x)
        return self.bn(y) + y[:, :1]


def test_indexing_of_conv_output_counts_as_use():
    _, report = run_case(IndexedElsewhere(), example_inputs=torch.randn(1, 4, 8, 8))
    assert reasons(report) == {"bn": "producer_output_reused"}


class ReadsBNWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = conv(), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) * self.bn.weight.mean()


@pytest.mark.parametrize("record", [False, True])
def test_norm_parameters_used_outside_its_call_is_left(record):
    inputs = torch.randn(1, 4, 8, 8) if record else None
    _, report = run_case(ReadsBNWeight(), example_inputs=inputs)
    assert reasons(report) == {"bn": "params_used_elsewhere"}


def test_custom_conv_subclass_with_own_forward_is_not_folded_into():
    class StdConv(nn.Conv2d):
        def forward(self, x):
            w = (self.weight - self.weight.mean()) / (self.weight.std() + 1e-5)
            return nn.functional.conv2d(x, w, None, 1, 1)

    _, report = run_case(nn.Sequential(StdConv(4, 4, 3, padding=1, bias=False),
                                       nn.BatchNorm2d(4)))
    assert reasons(report) == {"1": "unsupported_layer"}
