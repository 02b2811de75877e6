"""The one view family fusion folds through: a Linear's output with its
leading dims merged and its last kept (``linear(x).flatten(0, 1)`` into a
BatchNorm1d, then reshaped back, as timm's LeViT does). Each trap is next to a
control that folds, and every fused output is compared with the original's."""
import pytest
import torch
from torch import nn

from conftest import assert_unchanged, rel_err, snapshot
from fusion import analyze, fuse
from zoo import calibrate


class LinearNorm(nn.Module):
    """LeViT's LinearNorm, with the traps as variants."""

    def __init__(self, variant="plain", cin=6, c=8):
        super().__init__()
        self.variant = variant
        self.linear = nn.Linear(cin, c)
        self.bn = nn.BatchNorm1d(c if variant != "features" else 5 * c)

    def forward(self, x):  # x: (B, N, C) or (B, N, M, C)
        y = self.linear(x)
        v = self.variant
        if v == "features":  # merges the feature dim: (B, N * C)
            return self.bn(y.flatten(1, 2))
        if v == "reshape":  # the same view spelled as a reshape
            return self.bn(y.reshape(-1, y.shape[-1])).reshape_as(y)
        if v == "reused":
            return self.bn(y.flatten(0, 1)).reshape_as(y) + y
        if v == "view_reused":
            z = y.flatten(0, 1)
            return self.bn(z).reshape_as(y) + z.reshape_as(y)
        if v == "torch_flatten":
            return self.bn(torch.flatten(y, 0, 1)).reshape_as(y)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


def run(model, x, evidence=True):
    calibrate(model, shape=tuple(x.shape))
    snap = snapshot(model)
    fused, report = fuse(model, example_inputs=(x,) if evidence else None,
                         return_report=True)
    assert_unchanged(model, snap)
    with torch.no_grad():
        assert rel_err(model(x), fused(x)) < 1e-5
    return fused, report


def pairs(report):
    return [(p.norm, p.layer, p.direction) for p in report.fused]


def left(report):
    return {n.norm: n.reason for n in report.left}


@pytest.mark.parametrize("variant", ["plain", "torch_flatten"])
def test_linear_then_leading_flatten_then_bn_folds(variant):
    fused, report = run(LinearNorm(variant), torch.randn(2, 5, 6))
    assert pairs(report) == [("bn", "linear", "after")]
    assert report.evidence == ["fx", "recorded"]  # both agree on the view
    assert type(fused.bn) is nn.Identity


def test_without_example_inputs_the_rank_is_not_proven():
    _, report = run(LinearNorm(), torch.randn(2, 5, 6), evidence=False)
    assert left(report) == {"bn": "needs_example_inputs"}


def test_a_4d_output_flattened_to_3d_is_left():
    # (B, N, M, C).flatten(0, 1) is (B*N, M, C): BatchNorm1d normalises M
    model = LinearNorm(c=4)
    model.bn = nn.BatchNorm1d(3)
    _, report = run(model, torch.randn(2, 5, 3, 6))
    assert left(report) == {"bn": "not_after_producer"}


def test_a_flatten_that_merges_the_features_is_left():
    _, report = run(LinearNorm("features"), torch.randn(2, 5, 6))
    assert left(report) == {"bn": "not_after_producer"}


@pytest.mark.parametrize("variant", ["reused", "view_reused"])
def test_a_second_use_of_the_output_or_the_view_is_left(variant):
    _, report = run(LinearNorm(variant), torch.randn(2, 5, 6))
    assert left(report) == {"bn": "producer_output_reused"}


def test_the_same_view_as_a_reshape_is_left_where_fx_cannot_read_it():
    # The recorded run sees the same aten view; torch.fx sees a reshape to sizes
    # it cannot read, and both must agree: only the flatten form is the family.
    _, report = run(LinearNorm("reshape"), torch.randn(2, 5, 6))
    assert left(report) == {"bn": "not_after_producer"}


def test_a_conv_output_flattened_is_not_this_family():
    class ConvFlat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 6, 1)
            self.bn = nn.BatchNorm1d(5)

        def forward(self, x):  # (B, 4, L=5) -> (B, 6, 5) -> (B*6, 5)
            return self.bn(self.conv(x).flatten(0, 1))

    _, report = run(ConvFlat(), torch.randn(2, 4, 5))
    assert left(report) == {"bn": "not_after_producer"}


@pytest.mark.slow
def test_timm_levit_folds_every_linear_norm():
    timm = pytest.importorskip("timm")
    model = timm.create_model("levit_128s", pretrained=False)
    calibrate(model, shape=(2, 3, 224, 224))
    x = torch.randn(2, 3, 224, 224)
    report = analyze(model, example_inputs=x)
    folded = {p.norm for p in report.fused}
    linear_norms = [n for n, m in model.named_modules() if type(m).__name__ == "LinearNorm"]
    assert linear_norms and all(f"{n}.bn" in folded for n in linear_norms)
    # and the heads' BN -> Dropout -> Linear folds too: Dropout passes its
    # input through in eval
    assert not report.left and {"head.bn", "head_dist.bn"} <= folded


# --- modules that pass their input through in eval -----------------------------------


class Scaled(nn.Dropout):
    """A Dropout subclass with its own forward: not a pass-through."""

    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize("between", [nn.Identity, lambda: nn.Dropout(0.3),
                                     lambda: nn.Dropout2d(0.1)])
def test_conv_passthrough_bn_folds(between):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), between(), nn.BatchNorm2d(4))
    fused, report = run(model, torch.randn(2, 3, 8, 8))
    assert pairs(report) == [("2", "0", "after")]
    assert fused[1].__class__ is model[1].__class__  # the pass-through module stays


def test_bn_dropout_linear_folds_forward():
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Dropout(0.2), nn.Linear(4, 3))
    _, report = run(model, torch.randn(2, 4))
    assert pairs(report) == [("0", "2", "before")]


def test_a_dropout_subclass_with_its_own_forward_is_in_the_way():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), Scaled(0.0), nn.BatchNorm2d(4))
    _, report = run(model, torch.randn(2, 3, 8, 8))
    assert left(report) == {"2": "not_after_producer"}


def test_a_passthrough_with_a_hook_is_in_the_way():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.1), nn.BatchNorm2d(4))
    model[1].register_forward_hook(lambda m, i, o: o * 2)
    _, report = run(model, torch.randn(2, 3, 8, 8))
    assert left(report) == {"2": "not_after_producer"}


def test_verification_of_a_view_fold_works_on_the_features():
    """The diagnosis and the layer check apply the norm to the Linear's last
    dim, not dim 1 of its 3-D output."""
    from fusion import FusionError

    model = calibrate(LinearNorm(), shape=(2, 5, 6))
    with pytest.raises(FusionError) as info:  # an impossible tolerance: the diagnosis runs
        fuse(model, example_inputs=(torch.randn(2, 5, 6),), rtol=1e-30)
    assert info.value.code == "verify" and "linear" in str(info.value)

    class ZeroOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = LinearNorm(), nn.Linear(8, 2)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

        def forward(self, x):
            return self.head(self.body(x))

    model = calibrate(ZeroOut(), shape=(2, 5, 6))
    _, report = fuse(model, example_inputs=(torch.randn(2, 5, 6),), return_report=True)
    assert report.verified_by == "layers" and [p.norm for p in report.fused] == ["body.bn"]
