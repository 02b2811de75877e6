"""A fused model keeps working everywhere a model goes: saved and loaded,
copied, pickled, scripted, traced, rebuilt from its plan, and exported to
ONNX. Every output is compared bit for bit (``torch.equal``) with the fused
model's own."""
import copy
import inspect
import io
import json
import pickle
import warnings

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from fusion import analyze, apply_plan, fuse
from conftest import WEIGHTS_ONLY_BY_DEFAULT, load_whole, rel_err
from zoo import build, calibrate

RESNET_INPUT = (1, 3, 32, 32)
HEAD_INPUT = (2, 3, 8, 8)


class Head(nn.Module):
    """conv -> bn -> relu -> flatten -> fc -> bn1d -> out.

    torch.fx cannot trace it (it branches on ``x.dim()``), and Linear ->
    BatchNorm1d folds only when a recorded run shows 2-D input: without
    example_inputs neither pair folds, with them both do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 16, bias=False)
        self.bn1 = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 5)

    def forward(self, x):
        if x.dim() == 3:
            x = x.unsqueeze(0)
        x = torch.relu(self.bn(self.conv(x)))
        return self.out(self.bn1(self.fc(torch.flatten(x, 1))))


class Small(nn.Module):
    """A traceable hand-made model: conv stack with a residual and a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2, groups=2)
        self.bn_up = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.bn(self.conv(x)) + x)
        x = self.bn_up(self.up(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def x_of(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def head():
    torch.manual_seed(0)  # every build is the same model
    return calibrate(Head(), shape=HEAD_INPUT)


def small():
    torch.manual_seed(0)
    return calibrate(Small(), shape=HEAD_INPUT)


def resnet18():
    return build("resnet18", shape=(2, 3, 64, 64))


_CASES = {
    # name: (builder, input shape, fuse with example_inputs)
    "resnet18": (resnet18, RESNET_INPUT, False),
    "small": (small, HEAD_INPUT, False),
    "head": (head, HEAD_INPUT, True),
}
EXPECTED_FOLDS = {"resnet18": 20, "small": 3, "head": 2}
SLOW = pytest.mark.slow  # resnet18: a few seconds per test here
NAMES = [pytest.param("resnet18", marks=SLOW), "small", "head"]


@pytest.fixture(scope="module")
def cases():
    """name -> (builder, input, fused model, report), each fused on first use:
    resnet18, a traceable hand-made model, and one that folds only with
    example_inputs."""
    made = {}

    class Cases(dict):
        def __missing__(self, name):
            builder, shape, with_inputs = _CASES[name]
            x = x_of(shape)
            fused, report = fuse(builder(), example_inputs=x if with_inputs else None,
                                 return_report=True)
            made[name] = (builder, x, fused, report)
            return made[name]

        def __getitem__(self, name):
            return made[name] if name in made else self.__missing__(name)

    return Cases()


def run(model, x):
    with torch.no_grad():
        return model(x)


def bn_count(model):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name", NAMES)
def test_cases_are_fused(cases, name):
    builder, x, fused, report = cases[name]
    assert len(report.fused) == EXPECTED_FOLDS[name] and not report.left
    assert bn_count(fused) == 0
    y, y_fused = run(builder(), x), run(fused, x)
    assert float((y_fused - y).norm() / y.norm()) <= 1e-5


def test_head_folds_only_with_example_inputs():
    report = analyze(head())
    assert not report.fused
    assert {n.norm: n.reason for n in report.left} == {
        "bn": "needs_example_inputs", "bn1": "needs_example_inputs"}


# --- save, load, copy, pickle ---------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_torch_save_and_load_whole_model(cases, name):
    _, x, fused, _ = cases[name]
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    loaded = load_whole(buf)
    assert type(loaded) is type(fused) and loaded is not fused
    assert bn_count(loaded) == 0
    assert torch.equal(run(loaded, x), run(fused, x))


def test_plain_torch_load_of_a_whole_fused_model_follows_the_torch_default(cases):
    """torch 2.6 made torch.load weights-only: a pickled module is refused with
    plain torch.load there (the state_dict route below works on every torch),
    and loads as it always did before 2.6."""
    _, x, fused, _ = cases["small"]
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    if WEIGHTS_ONLY_BY_DEFAULT:
        with pytest.raises(pickle.UnpicklingError, match="weights_only"):
            torch.load(buf)
    else:
        assert torch.equal(run(torch.load(buf), x), run(fused, x))


@pytest.mark.parametrize("name", NAMES)
def test_torch_save_and_load_state_dict(cases, name):
    builder, x, fused, report = cases[name]
    buf = io.BytesIO()
    torch.save(fused.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)
    assert not any("running_mean" in k for k in state)
    # the added biases are in it
    for fold in report.plan["folds"]:
        assert f"{fold['layer']}.bias" in state
    fresh = apply_plan(builder(), report.plan)
    fresh.load_state_dict(state)
    assert torch.equal(run(fresh, x), run(fused, x))


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy(cases, name):
    _, x, fused, _ = cases[name]
    clone = copy.deepcopy(fused)
    for (k, a), (_, b) in zip(fused.state_dict().items(), clone.state_dict().items()):
        assert a.data_ptr() != b.data_ptr(), k
    assert torch.equal(run(clone, x), run(fused, x))


@pytest.mark.parametrize("name", NAMES)
def test_pickle(cases, name):
    _, x, fused, _ = cases[name]
    clone = pickle.loads(pickle.dumps(fused))
    assert torch.equal(run(clone, x), run(fused, x))


# --- TorchScript ----------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_jit_script(cases, name):
    _, x, fused, _ = cases[name]
    scripted = torch.jit.script(fused)
    want = run(fused, x)
    for _ in range(3):  # past the profiling runs of the executor
        assert torch.equal(run(scripted, x), want)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    assert torch.equal(run(torch.jit.load(buf), x), want)


@pytest.mark.parametrize("name", NAMES)
def test_jit_trace(cases, name):
    _, x, fused, _ = cases[name]
    with torch.no_grad():
        traced = torch.jit.trace(fused, x)
    want = run(fused, x)
    for _ in range(3):
        assert torch.equal(run(traced, x), want)
    assert "batch_norm" not in str(traced.inlined_graph)


# --- apply_plan -----------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_apply_plan_then_load_state_dict(cases, name):
    builder, x, fused, report = cases[name]
    fresh = builder()
    layer = report.plan["folds"][0]["layer"]  # not already the same weights:
    assert not torch.equal(fresh.get_submodule(layer).weight, fused.get_submodule(layer).weight)
    assert apply_plan(fresh, report.plan) is fresh
    assert fresh.state_dict().keys() == fused.state_dict().keys()
    fresh.load_state_dict(fused.state_dict())  # strict: no key missing or extra
    assert not fresh.training
    assert torch.equal(run(fresh, x), run(fused, x))
    assert [type(m) for m in fresh.modules()] == [type(m) for m in fused.modules()]
    assert [m.training for m in fresh.modules()] == [m.training for m in fused.modules()]


@pytest.mark.parametrize("name", NAMES)
def test_apply_plan_from_json(cases, name):
    builder, x, fused, report = cases[name]
    text = report.to_json()
    plan = json.loads(text)["plan"]
    for given in (plan, json.dumps(plan)):  # the dict, and the plan as JSON text
        fresh = apply_plan(builder(), given)
        fresh.load_state_dict(fused.state_dict())
        assert torch.equal(run(fresh, x), run(fused, x))


def test_apply_plan_of_a_plan_that_needed_example_inputs(cases):
    """The fresh model is untraceable: apply_plan must not need evidence of its own."""
    builder, x, fused, report = cases["head"]
    assert sorted(f["layer"] for f in report.plan["folds"]) == ["conv", "fc"]
    fresh = apply_plan(builder(), json.loads(report.to_json())["plan"])
    assert isinstance(fresh.bn1, nn.Identity) and fresh.fc.bias is not None
    fresh.load_state_dict(fused.state_dict())
    for batch in (x, x_of((5, 3, 8, 8), seed=9)):
        assert torch.equal(run(fresh, batch), run(fused, batch))


def test_state_dict_of_fused_model_does_not_load_into_unplanned_model(cases):
    """The control for the tests above: the structure really is what differs."""
    builder, _, fused, _ = cases["head"]
    with pytest.raises(RuntimeError, match="Missing key"):
        builder().load_state_dict(fused.state_dict())


# --- ONNX -----------------------------------------------------------------------------


# Each exporter with the one setting under which it keeps an unfused model's
# BatchNormalization nodes, measured on both torches (so that "no such node in the
# fused export" can fail):
# - the TorchScript-based exporter (torch.onnx.export up to 2.x's dynamo=False):
#   do_constant_folding=False and training=PRESERVE. With its defaults it folds
#   BN into a Conv, though not into a ConvTranspose (1 of 3 left in "small");
# - the dynamo-based exporter (torch 2's default, dynamo=True): optimize=False.
#   Its default optimize=True folds every BN; do_constant_folding=False alone
#   does not stop it. It does not exist in torch 1.13.
HAS_DYNAMO_EXPORTER = "dynamo" in inspect.signature(torch.onnx.export).parameters
EXPORTERS = ["torchscript", pytest.param("dynamo", marks=pytest.mark.skipif(
    not HAS_DYNAMO_EXPORTER, reason="torch.onnx.export has no dynamo exporter before 2.x"))]


def onnx_export(model, x, exporter, path):
    """Exports ``model`` to ``path`` with nothing folded by the exporter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation notes
        if exporter == "dynamo":
            program = torch.onnx.export(model, (x,), dynamo=True, optimize=False,
                                        verbose=False)
            program.save(str(path))
            return
        kwargs = {"dynamo": False} if HAS_DYNAMO_EXPORTER else {}
        torch.onnx.export(model, (x,), str(path), do_constant_folding=False,
                          training=torch.onnx.TrainingMode.PRESERVE, **kwargs)


def onnx_ops(model, x, exporter, path):
    onnx_export(model, x, exporter, path)
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    return [n.op_type for n in graph.graph.node]


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", [pytest.param("resnet18", marks=SLOW), "small"])
def test_onnx_export_has_no_batchnorm(cases, name, exporter, tmp_path):
    builder, x, fused, _ = cases[name]
    unfused = onnx_ops(builder(), x, exporter, tmp_path / "unfused.onnx")
    assert unfused.count("BatchNormalization") == EXPECTED_FOLDS[name]
    ops = onnx_ops(fused, x, exporter, tmp_path / "fused.onnx")
    assert "BatchNormalization" not in ops
    assert "Conv" in ops


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", [pytest.param("resnet18", marks=SLOW), "small"])
def test_onnx_runtime_runs_the_fused_export(cases, name, exporter, tmp_path):
    """The fused model's export computes what the fused model computes."""
    _, x, fused, _ = cases[name]
    onnx_export(fused, x, exporter, tmp_path / "fused.onnx")
    session = ort.InferenceSession(str(tmp_path / "fused.onnx"),
                                   providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert rel_err(run(fused, x), torch.from_numpy(got)) < 1e-5
