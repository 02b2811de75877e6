"""Inputs that only torch 2 users have, and the fused model in torch 2's tool chain:
torch.compile'd and torch.export'ed modules, new-style parametrizations, fake and
meta tensors, inference tensors. Each case gives a clear result or a clear error;
none gives an unfused model with a report of nothing to do."""
import gc

import pytest
import torch
from torch import nn

from conftest import assert_unchanged, rel_err, snapshot
from fusion import FusionError, analyze, fuse
from zoo import build, calibrate

TORCH2 = int(torch.__version__.split(".")[0]) >= 2
needs_torch2 = pytest.mark.skipif(not TORCH2, reason="a torch 2 feature")
X = (2, 3, 8, 8)


def net():
    """conv-bn-relu-conv-bn, calibrated: two pairs that fold."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
    return calibrate(model, shape=X)


def x_of(shape=X, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def run(model, x):
    with torch.no_grad():
        return model(x)


def test_control_both_pairs_fold():
    fused, report = fuse(net(), return_report=True)
    assert sorted(p.norm for p in report.fused) == ["1", "4"] and not report.left


# --- torch.compile and torch.export as inputs ------------------------------------------


@needs_torch2
@pytest.mark.parametrize("inplace", [False, True])
def test_compiled_model_is_refused_with_how(inplace):
    model = net()
    compiled = torch.compile(model)
    snap = snapshot(model)
    with pytest.raises(TypeError, match=r"\(model\) is a torch.compile'd module.*"
                       r"fuse\(compiled._orig_mod\)"):
        fuse(compiled, inplace=inplace)
    with pytest.raises(TypeError, match="torch.compile'd"):
        analyze(compiled)
    assert_unchanged(model, snap)
    fused = fuse(compiled._orig_mod)  # what the message says to do
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules()) == 0


@needs_torch2
def test_compiled_submodule_is_named():
    model = nn.Sequential(net(), nn.ReLU())
    model[0] = torch.compile(model[0])
    with pytest.raises(TypeError, match=r"^0 is a torch.compile'd module"):
        fuse(model)


@needs_torch2
def test_exported_module_is_refused_with_how():
    x = x_of()
    exported = torch.export.export(net(), (x,))
    module = exported.module()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in module.modules())
    for call in (fuse, analyze):
        with pytest.raises(TypeError, match=r"torch.export.*batch_norm.*Fuse the eager "
                           r"model before exporting"):
            call(module)
    with pytest.raises(TypeError, match="ExportedProgram.*fuse the eager model"):
        fuse(exported)


def test_symbolic_trace_graph_module_fuses_as_before():
    model = net()
    traced = torch.fx.symbolic_trace(model)
    x = x_of()
    fused, report = fuse(traced, return_report=True)
    # torch 2 gives each GraphModule (a copy too) a class of its own, GraphModuleImpl
    assert isinstance(fused, torch.fx.GraphModule)
    assert sorted(p.norm for p in report.fused) == ["1", "4"]
    assert rel_err(run(model, x), run(fused, x)) < 1e-5


# --- parametrizations: never written through --------------------------------------------


def _parametrize(kind, model):
    """Parametrizes one module's weight; returns (the norm left, that module)."""
    P = torch.nn.utils.parametrizations
    if kind == "weight_norm":
        if not hasattr(P, "weight_norm"):
            pytest.skip("torch.nn.utils.parametrizations.weight_norm is new in torch 2")
        P.weight_norm(model[0])
        return "1", "0"
    if kind == "spectral_norm":
        P.spectral_norm(model[3])
        return "4", "3"
    if kind == "conv":
        torch.nn.utils.parametrize.register_parametrization(model[0], "weight", Double())
        return "1", "0"
    torch.nn.utils.parametrize.register_parametrization(model[4], "weight", Double())
    return "4", "4"


class Double(nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "conv", "norm"])
def test_parametrized_layer_or_norm_is_left(kind, inplace):
    model = net()
    left, owner = _parametrize(kind, model)
    model.eval()
    x = x_of()
    want = run(model, x)
    snap = snapshot(model)
    fused, report = fuse(model, inplace=inplace, return_report=True)
    assert {n.norm: n.reason for n in report.left} == {left: "has_hooks"}
    assert len(report.fused) == 1  # the other pair still folds
    if not inplace:
        assert_unchanged(model, snap)
    stored = fused.get_submodule(owner).parametrizations.weight  # never written through
    for name, t in stored.named_parameters():
        assert torch.equal(t, snap["state"][f"{owner}.parametrizations.weight.{name}"])
    assert rel_err(want, run(fused, x)) < 1e-5


# --- tensors with no values ----------------------------------------------------------------


@needs_torch2
def test_model_built_on_the_meta_device_is_an_error():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    for inplace in (False, True):
        with pytest.raises(FusionError, match=r"^0: weight is on the meta device.*"
                           r"to_empty") as info:
            fuse(model, inplace=inplace)
        assert info.value.layer == "0" and info.value.code == "meta"
    assert all(t.is_meta for t in model.state_dict().values())


def test_model_built_under_a_fake_tensor_mode_is_an_error():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    for inplace in (False, True):
        with pytest.raises(FusionError, match=r"^0: weight is a FakeTensor, not a plain "
                           r"tensor.*Build the model outside that mode") as info:
            fuse(model, inplace=inplace)
        assert info.value.code == "tensor_subclass"
    assert isinstance(model[1], nn.BatchNorm2d)
    del model, info
    gc.collect()  # a fake model that was copied and traced crashes here (torch 2.14)


class Tagged(torch.Tensor):
    """A tensor subclass of the kind libraries use to carry metadata."""


def test_tensor_subclass_buffer_is_an_error_naming_it():
    model = net()
    model[1].running_var = model[1].running_var.as_subclass(Tagged)
    snap = snapshot(model)
    with pytest.raises(FusionError, match=r"^1: running_var is a Tagged, not a plain "
                       r"tensor") as info:
        fuse(model, inplace=True)
    assert info.value.layer == "1"
    assert_unchanged(model, snap)


# --- inference tensors -------------------------------------------------------------------


@pytest.mark.parametrize("inplace", [False, True])
def test_model_built_under_inference_mode_fuses(inplace):
    x = x_of()
    with torch.inference_mode():
        model = net()  # every parameter and buffer is an inference tensor
        want = model(x)
    assert model[1].running_mean.is_inference() and model[0].weight.is_inference()
    fused, report = fuse(model, inplace=inplace, return_report=True)
    assert sorted(p.norm for p in report.fused) == ["1", "4"]
    with torch.inference_mode():
        assert rel_err(want, fused(x)) < 1e-5


# --- the fused model in torch 2's tool chain ----------------------------------------------

TOOLCHAIN_ZOO = ["resnet18", "mobilenet_v3_small"]


@pytest.fixture(scope="module")
def fused_zoo():
    out = {}
    for name in TOOLCHAIN_ZOO:
        model = build(name, shape=(2, 3, 64, 64))
        out[name] = fuse(model)
    return out


@needs_torch2
@pytest.mark.slow
@pytest.mark.parametrize("name", TOOLCHAIN_ZOO)
def test_fused_model_runs_under_torch_compile(fused_zoo, name):
    fused = fused_zoo[name]
    x = x_of((2, 3, 64, 64))
    want = run(fused, x)
    compiled = torch.compile(fused)  # the default backend, inductor
    got = run(compiled, x)
    assert rel_err(want, got) < 1e-4


@needs_torch2
@pytest.mark.slow
@pytest.mark.parametrize("name", TOOLCHAIN_ZOO)
def test_fused_model_exports_with_torch_export(fused_zoo, name):
    fused = fused_zoo[name]
    x = x_of((2, 3, 64, 64))
    exported = torch.export.export(fused, (x,))
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert not any("batch_norm" in op for op in ops) and any("conv" in op for op in ops)
    assert rel_err(run(fused, x), run(exported.module(), x)) < 1e-5
