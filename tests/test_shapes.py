"""Shape-dependent control flow under a recorded run. A branch on ``x.shape``
reads no tensor values, so the value-read check cannot see it; torch.fx cannot
trace it, so a recorded run is the only evidence. fusion then runs the forward
again at another size derived from the example (twice the spatial size, one
more in the batch) and folds only what both runs prove. Each trap is judged on
inputs of the other size, next to a control that must fold."""
import pytest
import torch
from torch import nn

from conftest import rel_err
from fusion import analyze, fuse
from zoo import calibrate


class Branchy(nn.Module):
    """conv -> bn, where a size test decides whether the conv's output is also
    added back (a fold would then be wrong) or the result merely scaled (a fold
    is right either way)."""

    def __init__(self, test, reuse=True):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.test, self.reuse = test, reuse

    def forward(self, x):
        y = self.conv(x)
        if self.test(x, y):
            return self.bn(y) + y if self.reuse else self.bn(y) * 2
        return self.bn(y)


TRAPS = {
    "height": lambda x, y: x.shape[2] > 16,
    "width": lambda x, y: x.size(-1) > 16,
    "batch": lambda x, y: len(x) > 1,
    "reshaped": lambda x, y: x.flatten(2).shape[-1] > 256,  # H * W of a view
}


def check_at(model, fused, shape):
    x = torch.randn(*shape)
    with torch.no_grad():
        return rel_err(model(x), fused(x))


@pytest.mark.parametrize("dim", sorted(TRAPS))
def test_a_size_branch_that_reuses_the_output_is_left(dim):
    model = calibrate(Branchy(TRAPS[dim]), shape=(2, 3, 16, 16))
    fused, report = fuse(model, example_inputs=torch.randn(1, 3, 16, 16),
                         return_report=True)
    assert [(n.norm, n.reason) for n in report.left] == [("bn", "shape_dependent_flow")]
    assert "disagree" in report.left[0].detail
    assert any("second recorded run at another size" in n for n in report.notes)
    # judged at the other size, where the branch is taken
    assert check_at(model, fused, (2, 3, 32, 32)) == 0.0


@pytest.mark.parametrize("dim", sorted(TRAPS))
def test_control_a_size_branch_that_keeps_the_pair_folds(dim):
    model = calibrate(Branchy(TRAPS[dim], reuse=False), shape=(2, 3, 16, 16))
    fused, report = fuse(model, example_inputs=torch.randn(1, 3, 16, 16),
                         return_report=True)
    assert [(p.norm, p.layer) for p in report.fused] == [("bn", "conv")]
    for shape in ((1, 3, 16, 16), (2, 3, 32, 32)):
        assert check_at(model, fused, shape) < 1e-5


def test_fixed_shapes_folds_what_the_one_run_proves_and_says_so():
    model = calibrate(Branchy(TRAPS["height"]), shape=(2, 3, 16, 16))
    fused, report = fuse(model, example_inputs=torch.randn(1, 3, 16, 16),
                         return_report=True, fixed_shapes=True)
    assert [p.norm for p in report.fused] == ["bn"]
    assert any("fixed_shapes=True" in n and "(1, 3, 16, 16)" in n for n in report.notes)
    assert check_at(model, fused, (1, 3, 16, 16)) < 1e-5  # right at its shapes


class FixedSize(nn.Module):
    """Runs at one spatial size only (a Linear over the flattened map), and at
    one batch size too where ``one_batch``; reads sizes; cannot be traced."""

    def __init__(self, one_batch=True):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 5)
        self.one_batch = one_batch

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.shape[-1] != 8 or (self.one_batch and len(y) != 1):  # fx cannot trace this
            raise ValueError("one 8x8 input only")
        return self.fc(y.reshape(y.size(0), -1))


def test_a_model_of_one_spatial_size_is_checked_at_another_batch_size():
    model = calibrate(FixedSize(one_batch=False), shape=(1, 3, 8, 8))
    fused, report = fuse(model, example_inputs=torch.randn(1, 3, 8, 8),
                         return_report=True)
    assert [p.norm for p in report.fused] == ["bn"]
    note = next(n for n in report.notes if "another size" in n)
    assert "(2, 3, 8, 8)" in note and "only the batch size was varied" in note
    assert check_at(model, fused, (3, 3, 8, 8)) < 1e-5


def test_a_model_that_runs_at_one_size_only_is_left_unless_fixed_shapes():
    model = calibrate(FixedSize(), shape=(1, 3, 8, 8))
    x = torch.randn(1, 3, 8, 8)
    report = analyze(model, example_inputs=x)
    assert [(n.norm, n.reason) for n in report.left] == [("bn", "shape_dependent_flow")]
    detail = report.left[0].detail
    assert "could not be checked at another size" in detail and "ValueError" in detail
    assert "fixed_shapes=True" in detail
    fused, report = fuse(model, example_inputs=x, fixed_shapes=True, return_report=True)
    assert [p.norm for p in report.fused] == ["bn"] and not report.left


class NoSizes(nn.Module):
    """Untraceable by a value branch that is never taken, reads no sizes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.calls = 0

    def forward(self, x):
        self.calls += isinstance(x, torch.Tensor)  # runs, not torch.fx's trace
        y = self.bn(self.conv(x))
        if bool(torch.isnan(y).any()):
            return y * 0
        return y


def test_no_second_run_without_size_reads():
    model = calibrate(NoSizes(), shape=(2, 3, 8, 8))
    model.calls = 0
    report = analyze(model, example_inputs=torch.randn(1, 3, 8, 8))
    assert model.calls == 1
    assert [p.norm for p in report.fused] == ["bn"]
    assert not any("another size" in n for n in report.notes)


def test_a_list_of_images_is_resized_image_by_image():
    from fusion.discover import resized_inputs

    images = [torch.randn(3, 20, 30), torch.randn(3, 24, 16)]
    (out,), shapes = resized_inputs((images,))
    assert [tuple(t.shape) for t in out] == [(3, 40, 60), (3, 48, 32)]
    (x,), _ = resized_inputs((torch.randn(2, 3, 5, 7),))
    assert tuple(x.shape) == (3, 3, 10, 14)
    assert resized_inputs((torch.arange(6).reshape(1, 2, 3),)) is None  # not floating


def test_half_inputs_are_resized_for_the_check():
    """torch 1.13 has no half interpolation on the CPU; the resize goes through
    float32, which nearest-neighbour copying keeps exact."""
    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            for _ in range(x.shape[0]):  # a size read that fx cannot trace
                pass
            return self.bn(self.conv(x))

    from fusion.discover import resized_inputs

    x = torch.randn(1, 3, 8, 8).half()
    (big,), _ = resized_inputs((x,))
    assert big.dtype == torch.float16 and torch.equal(big[:1, :, ::2, ::2], x)
    model = calibrate(Loop(), shape=(2, 3, 8, 8)).half()
    report = analyze(model, example_inputs=(x,))
    assert [p.norm for p in report.fused] == ["bn"]
    assert any("second recorded run" in n for n in report.notes)
