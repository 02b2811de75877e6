"""Every foldable pattern, against the unfused model's output; each trap with a
control that must fold."""
import copy

import pytest
import torch
from torch import nn

from conftest import assert_unchanged, rel_err, snapshot
from fusion import NormParams, fuse, register_norm, unregister_norm
from zoo import calibrate

TOL = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 3e-3,
       torch.float64: 1e-10}


def check(model, x, example_inputs=None, dtype=torch.float32, **kwargs):
    """Fuses ``model``; asserts the original is untouched and the output matches
    (models in half precision run in float32). Returns (fused, report)."""
    model = model.to(dtype).eval()
    snap = snapshot(model)
    fused, report = fuse(model, example_inputs=example_inputs, return_report=True,
                         **kwargs)
    assert_unchanged(model, snap)
    run = (lambda m: copy.deepcopy(m).float()) if dtype in (torch.float16,
                                                            torch.bfloat16) else (lambda m: m)
    xx = x.to(torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    with torch.no_grad():
        y, y_fused = run(model)(xx), run(fused)(xx)
    assert rel_err(y, y_fused) <= TOL[dtype]
    return fused, report


def reasons(report):
    return {n.norm: n.reason for n in report.left}


def folded(report):
    return sorted((p.norm, p.layer, p.direction) for p in report.fused)


def stats(bn, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.normal_(0, 1, generator=gen)
        bn.running_var.uniform_(0.2, 2, generator=gen)
        if getattr(bn, "weight", None) is not None:
            bn.weight.normal_(1, 0.3, generator=gen)
            bn.bias.normal_(0, 0.3, generator=gen)
    return bn


# --- ConvTranspose, with groups ---------------------------------------------------

@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_conv_transpose_then_bn(dims, groups):
    ct = getattr(nn, f"ConvTranspose{dims}d")(8, 12, 3, stride=2, groups=groups)
    bn = stats(getattr(nn, f"BatchNorm{dims}d")(12))
    x = torch.randn(2, 8, *([5] * dims))
    fused, report = check(nn.Sequential(ct, bn), x)
    assert folded(report) == [("1", "0", "after")]


def test_torch_transposed_fold_is_wrong_for_groups():
    """The case the grouped test above guards: torch's own fold gets it wrong."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    ct = nn.ConvTranspose2d(8, 12, 3, groups=4)
    model = nn.Sequential(ct, stats(nn.BatchNorm2d(12))).eval()
    x = torch.randn(2, 8, 5, 5)
    try:
        theirs = fuse_conv_bn_eval(model[0], model[1], transpose=True)
        assert rel_err(model(x), theirs(x)) > 1e-3
    except RuntimeError:
        pass  # shapes that do not even broadcast are wrong too
    fused, _ = check(model, x)


# --- Conv variants ------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    dict(groups=1), dict(groups=4), dict(groups=8), dict(dilation=2, padding=2),
    dict(stride=2, padding=1), dict(padding=1, padding_mode="reflect"),
    dict(padding=1, padding_mode="circular", bias=False),
])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_then_bn_variants(dims, kwargs):
    conv = getattr(nn, f"Conv{dims}d")(8, 8, 3, **kwargs)
    bn = stats(getattr(nn, f"BatchNorm{dims}d")(8))
    fused, report = check(nn.Sequential(conv, bn), torch.randn(2, 8, *([6] * dims)))
    assert folded(report) == [("1", "0", "after")]
    assert fused[0].bias is not None


@pytest.mark.parametrize("affine", [True, False])
def test_affine_false_and_momentum_none(affine):
    bn = stats(nn.BatchNorm2d(8, affine=affine, momentum=None))
    fused, report = check(nn.Sequential(nn.Conv2d(4, 8, 3), bn), torch.randn(2, 4, 6, 6))
    assert folded(report) == [("1", "0", "after")]
    expected_params = {"1.weight": 8, "1.bias": 8} if affine else {}
    assert report.removed_parameters == expected_params
    assert report.removed_buffers == {"1.running_mean": 8, "1.running_var": 8,
                                      "1.num_batches_tracked": 1}


def test_sync_batchnorm_folds_like_batchnorm():
    bn = stats(nn.BatchNorm2d(8))
    ref = nn.Sequential(nn.Conv2d(4, 8, 3), bn).eval()
    sync = nn.Sequential(nn.Conv2d(4, 8, 3), nn.SyncBatchNorm(8)).eval()
    sync.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 6, 6)
    if int(torch.__version__.split(".")[0]) >= 2:
        with torch.no_grad():  # torch 2 runs it in eval without a process group
            assert torch.equal(sync(x), ref(x))
    else:
        with pytest.raises(Exception):
            sync(x)  # torch 1.13's SyncBatchNorm cannot run on CPU at all
    fused, report = fuse(sync, return_report=True)
    assert folded(report) == [("1", "0", "after")]
    with torch.no_grad():
        assert rel_err(ref(x), fused(x)) <= 1e-5


# --- Linear and BatchNorm1d ---------------------------------------------------------

def test_linear_bn1d_needs_example_inputs():
    model = nn.Sequential(nn.Linear(6, 4), stats(nn.BatchNorm1d(4)))
    x = torch.randn(5, 6)
    _, report = check(model, x)
    assert reasons(report) == {"1": "needs_example_inputs"}
    _, report = check(model, x, example_inputs=x)
    assert folded(report) == [("1", "0", "after")]


def test_linear_bn1d_on_3d_input_is_left():
    """(N, C, L) input: BatchNorm1d normalises C, Linear works on L. With
    C == out_features a fold would run, and be silently wrong."""
    model = nn.Sequential(nn.Linear(6, 4), stats(nn.BatchNorm1d(4)))
    x = torch.randn(5, 4, 6)
    _, report = check(model, x, example_inputs=x)
    assert reasons(report) == {"1": "not_after_producer"}
    assert "3-D" in report.left[0].detail


def test_bn1d_before_linear():
    model = nn.Sequential(stats(nn.BatchNorm1d(6)), nn.Linear(6, 4))
    x = torch.randn(5, 6)
    _, report = check(model, x)
    assert reasons(report) == {"0": "needs_example_inputs"}
    _, report = check(model, x, example_inputs=x)
    assert folded(report) == [("0", "1", "before")]


# --- a norm before a conv ------------------------------------------------------------

@pytest.mark.parametrize("padding,mode,folds", [
    (0, "zeros", True), (1, "reflect", True), (1, "replicate", True),
    (1, "circular", True), (1, "zeros", False), ("valid", "zeros", True),
    ("same", "zeros", False),
])
def test_bn_before_conv(padding, mode, folds):
    conv = nn.Conv2d(8, 6, 3, padding=padding, padding_mode=mode, groups=2)
    model = nn.Sequential(stats(nn.BatchNorm2d(8)), conv)
    _, report = check(model, torch.randn(2, 8, 7, 7))
    if folds:
        assert folded(report) == [("0", "1", "before")]
    else:
        assert reasons(report) == {"0": "zero_padding"}


def test_bn_before_zero_padded_conv_with_zero_shift_folds():
    bn = nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)  # mean 0, bias 0: the shift is exactly 0
    model = nn.Sequential(bn, nn.Conv2d(8, 6, 3, padding=1))
    _, report = check(model, torch.randn(2, 8, 7, 7))
    assert folded(report) == [("0", "1", "before")]


def test_bn_before_conv_transpose_is_left():
    model = nn.Sequential(stats(nn.BatchNorm2d(8)), nn.ConvTranspose2d(8, 6, 3))
    _, report = check(model, torch.randn(2, 8, 5, 5))
    assert reasons(report) == {"0": "unsupported_layer"}


# --- norms that are not _BatchNorm ------------------------------------------------------

def test_frozen_batchnorm_folds():
    from torchvision.ops.misc import FrozenBatchNorm2d
    frozen = FrozenBatchNorm2d(8)
    stats(frozen)
    fused, report = check(nn.Sequential(nn.Conv2d(4, 8, 3), frozen), torch.randn(2, 4, 6, 6))
    assert folded(report) == [("1", "0", "after")]


class ScaleShift(nn.Module):
    """A user norm: y = (x - mean) / sqrt(var + eps) * gamma + beta, channel dim 1."""

    def __init__(self, c):
        super().__init__()
        self.register_buffer("mu", torch.randn(c))
        self.register_buffer("sigma2", torch.rand(c) + 0.5)
        self.gamma = nn.Parameter(torch.randn(c))
        self.beta = nn.Parameter(torch.randn(c))

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mu.view(shape)) / torch.sqrt(self.sigma2.view(shape) + 1e-3) \
            * self.gamma.view(shape) + self.beta.view(shape)


def test_registered_norm_folds_and_unregistered_lookalike_does_not():
    model = nn.Sequential(nn.Conv2d(4, 8, 3), ScaleShift(8))
    x = torch.randn(2, 4, 6, 6)
    _, report = check(model, x)
    assert not report.fused and not report.left  # unknown classes are not norms
    register_norm(ScaleShift, lambda m: NormParams(m.mu, m.sigma2, m.gamma, m.beta, 1e-3))
    try:
        fused, report = check(model, x)
        assert folded(report) == [("1", "0", "after")]
        assert isinstance(fused[1], nn.Identity)
    finally:
        unregister_norm(ScaleShift)


def test_batchnorm_subclass_with_own_forward_is_left_unless_registered():
    class ShiftedBN(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) + 1.0

    model = nn.Sequential(nn.Conv2d(4, 8, 3), stats(ShiftedBN(8)))
    _, report = check(model, torch.randn(2, 4, 6, 6))
    assert reasons(report) == {"1": "unknown_norm"}


def test_instance_norm_with_running_stats_is_left():
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.InstanceNorm2d(8, track_running_stats=True))
    calibrate(model, shape=(2, 4, 6, 6))
    _, report = check(model, torch.randn(2, 4, 6, 6))
    assert reasons(report) == {"1": "unknown_norm"}


# --- shared and tied parameters ------------------------------------------------------------

class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.b.weight = self.a.weight  # tied
        self.bn_a, self.bn_b = stats(nn.BatchNorm2d(4), 1), stats(nn.BatchNorm2d(4), 2)

    def forward(self, x):
        return self.bn_a(self.a(x)) + self.bn_b(self.b(x))


def test_tied_weights_are_untied_never_written_through():
    model = Tied().eval()
    shared = model.a.weight
    before = shared.detach().clone()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        y = model(x)
    fused, report = fuse(model, inplace=True, return_report=True)
    assert folded(report) == [("bn_a", "a", "after"), ("bn_b", "b", "after")]
    assert all(p.untied for p in report.fused)
    assert torch.equal(shared, before)  # the shared storage holds the unfused weight
    assert fused.a.weight is not fused.b.weight
    with torch.no_grad():
        assert rel_err(y, fused(x)) <= 1e-5


# --- dtypes -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_small_model_in_dtype(dtype):
    model = nn.Sequential(nn.Conv2d(4, 8, 3), stats(nn.BatchNorm2d(8)), nn.ReLU(),
                          stats(nn.BatchNorm2d(8), 3), nn.Conv2d(8, 8, 1),
                          stats(nn.BatchNorm2d(8), 4))
    fused, report = check(model, torch.randn(2, 4, 6, 6), dtype=dtype)
    assert len(report.fused) == 3 and fused[0].weight.dtype == dtype


def test_overflow_is_left_and_never_written():
    conv = nn.Conv2d(4, 8, 3).half()
    bn = nn.BatchNorm2d(8).half()
    with torch.no_grad():
        conv.weight.fill_(30000.0)
        bn.running_var.fill_(1e-4)  # scale ~ 100: 3e6 does not fit float16
    model = nn.Sequential(conv, bn).eval()
    fused, report = fuse(model, return_report=True)
    assert reasons(report) == {"1": "overflow"}
    assert torch.isfinite(fused[0].weight).all()
    assert torch.equal(fused[0].weight, conv.weight)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_fold_is_identical_to_cpu(dtype):
    model = nn.Sequential(nn.Conv2d(4, 8, 3, bias=False), stats(nn.BatchNorm2d(8)),
                          nn.ConvTranspose2d(8, 8, 3, groups=2),
                          stats(nn.BatchNorm2d(8), 1)).to(dtype).eval()
    cpu = fuse(model)
    gpu = model.cuda()
    w_ptr = gpu[0].weight.data_ptr()
    fused = fuse(gpu, inplace=True)
    assert fused[0].weight.device.type == "cuda" and fused[0].weight.data_ptr() == w_ptr
    for a, b in zip(cpu.state_dict().values(), fused.state_dict().values()):
        assert torch.equal(a, b.cpu())
