"""Part of issue 12: Linear with BatchNorm1d folds without example inputs where
the fx graph proves the norm's input is 2-D, and never where it is not proven.
Each trap has a control that folds; every fused output is compared."""
import pytest
import torch
from torch import nn

from conftest import rel_err
from fusion import fuse
from zoo import calibrate


class Head(nn.Module):
    """A conv stem, then a way to 2-D (or not), then Linear -> BatchNorm1d."""

    def __init__(self, to_2d, features=8, before=False):
        super().__init__()
        self.to_2d, self.before = to_2d, before
        self.conv = nn.Conv2d(3, 2, 3)  # (N, 2, 2, 2) on 4x4 input: 8 features
        self.flatten = nn.Flatten() if to_2d == "Flatten" else nn.Flatten(start_dim=2)
        self.bn0 = nn.BatchNorm1d(features)
        self.fc = nn.Linear(features, 4)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        if self.to_2d in ("Flatten", "Flatten(start_dim=2)"):
            x = self.flatten(x)
        elif self.to_2d == "torch.flatten(x, 1)":
            x = torch.flatten(x, 1)
        elif self.to_2d == "x.view(x.size(0), -1)":
            x = x.view(x.size(0), -1)
        elif self.to_2d == "x.reshape(n, -1)":
            x = x.reshape(x.shape[0], -1)
        elif self.to_2d == "x.view(n, c, -1)":
            x = x.view(x.size(0), 2, -1)
        elif self.to_2d == "torch.flatten(x, 0, 1)":
            x = torch.flatten(x, 0, 1)
        if self.before:
            return self.fc(self.bn0(x))
        return self.bn(self.fc2(self.act(self.fc(x))))


def _fused(model, shape):
    calibrate(model, shape=shape)
    x = torch.randn(*shape)
    fused, report = fuse(model, return_report=True)
    with torch.no_grad():
        assert rel_err(model(x), fused(x)) < 1e-5
    return report


@pytest.mark.parametrize("to_2d", ["Flatten", "torch.flatten(x, 1)",
                                   "x.view(x.size(0), -1)", "x.reshape(n, -1)"])
def test_a_proven_2d_input_folds_without_example_inputs(to_2d):
    report = _fused(Head(to_2d), (4, 3, 4, 4))
    assert ("bn", "fc2", "after") in {(p.norm, p.layer, p.direction) for p in report.fused}
    assert report.evidence == ["fx"]


@pytest.mark.parametrize("to_2d", ["Flatten", "x.view(x.size(0), -1)"])
def test_a_norm_before_a_linear_on_a_proven_2d_input_folds(to_2d):
    report = _fused(Head(to_2d, before=True), (4, 3, 4, 4))
    assert ("bn0", "fc", "before") in {(p.norm, p.layer, p.direction) for p in report.fused}


class ThreeD(nn.Module):
    """Linear over the last dim of a 3-D tensor (N, 2, L), then a BatchNorm1d of 2
    features: as many as the Linear has outputs, so only the rank tells dim 1
    (what BatchNorm1d normalises) from the last dim (what Linear maps). A fold
    would run, and be silently wrong."""

    def __init__(self, to_3d):
        super().__init__()
        self.to_3d = to_3d
        self.conv = nn.Conv2d(3, 2, 3)  # (N, 2, 2, 2) on 4x4 input
        self.flatten = nn.Flatten(start_dim=2)
        self.fc = nn.Linear(4 if to_3d != "torch.flatten(x, 0, 1)" else 2, 2)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x):
        x = self.conv(x)
        if self.to_3d == "Flatten(start_dim=2)":
            x = self.flatten(x)
        elif self.to_3d == "x.view(n, c, -1)":
            x = x.view(x.size(0), 2, -1)
        else:
            x = torch.flatten(x, 0, 1)  # (2N, 2, 2): batch and channel merged
        return self.bn(self.fc(x))


@pytest.mark.parametrize("to_3d", ["Flatten(start_dim=2)", "x.view(n, c, -1)",
                                   "torch.flatten(x, 0, 1)"])
def test_an_unproven_rank_is_left_for_example_inputs(to_3d):
    model = calibrate(ThreeD(to_3d), shape=(4, 3, 4, 4))
    report = fuse(model, return_report=True)[1]
    assert {n.norm: n.reason for n in report.left} == {"bn": "needs_example_inputs"}
    x = torch.randn(4, 3, 4, 4)
    report = fuse(model, example_inputs=x, return_report=True)[1]  # the run shows 3-D
    assert {n.norm: n.reason for n in report.left} == {"bn": "not_after_producer"}
    assert "3-D" in report.left[0].detail


def test_an_unknown_input_rank_is_never_folded():
    """The model's own input: its rank is whatever the caller passes."""
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
    calibrate(model, shape=(5, 6))
    report = fuse(model, return_report=True)[1]
    assert [(n.norm, n.reason) for n in report.left] == [("1", "needs_example_inputs")]
