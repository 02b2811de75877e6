"""The tracer's shortcuts prove exactly what a full torch.fx trace proves.

fusion's tracer keeps a *chain* (an ``nn.Sequential`` that keeps its class's
``forward`` and ``__iter__``, has no hooks, and holds only leaves or chains)
as one graph node, and expands it into its children's calls afterwards. Every
test here traces the same model both ways and compares the two flows call by
call: who feeds each call, who uses its output, and the proven rank of its
input. A model with a forward set on one of its modules' instances is traced
through that module, and such a module is never folded.
"""
import types
from collections import Counter

import pytest
import torch
from torch import nn

from conftest import rel_err
from fusion import discover, fuse
from fusion.discover import OTHER, Cat, View, flow_from_fx
from zoo import build, calibrate


def _key(flow, c):
    if c is None:
        return None
    if c is OTHER:
        return "other"
    if isinstance(c, Cat):
        return ("cat", tuple(_key(flow, p) for p in c.parts))
    if isinstance(c, View):
        return ("view", _key(flow, c.src))
    return (c.name, next(i for i, x in enumerate(flow.calls[c.name]) if x is c))


def signature(flow):
    """Every call of every tracked module: (its source, its users, counted, and
    the proven rank of its input); and the modules whose tensors escape."""
    calls = {name: [(_key(flow, c.src), Counter(_key(flow, u) for u in c.users), c.in_ndim)
                    for c in calls] for name, calls in flow.calls.items()}
    return calls, sorted(flow.escaped)


def graph_size(model, collapse):
    return len(discover._LeafTracer(model, collapse).trace(model).nodes)


def assert_same_flow(model):
    full = flow_from_fx(model, collapse=False)
    short = flow_from_fx(model, collapse=True)
    assert signature(short) == signature(full)
    return full, short


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0", "resnet18",
                                  "mobilenet_v3_small", "regnet_y_400mf", "densenet121",
                                  "mnasnet0_5", "vgg11_bn", "googlenet"])
def test_zoo_model_flows_are_the_same(name):
    model = build(name)
    full, short = assert_same_flow(model)
    assert sum(len(c) for c in full.calls.values()) > 10


def test_chains_shrink_the_graph():
    """The shortcut is taken: mobilenet_v2's Conv2dNormActivation blocks are
    one node each (a model with no chain keeps its size)."""
    model = build("mobilenet_v2")
    assert graph_size(model, True) < graph_size(model, False) / 3


class Wrap(nn.Module):
    """A model around one Sequential (``seq``), used as ``use`` says."""

    def __init__(self, seq, use="plain", head=None):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.seq = seq
        self.use = use
        self.head = head if head is not None else nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.stem(x)
        if self.use == "twice":
            return self.head(self.seq(self.seq(y)))
        z = self.seq(y)
        if self.use == "reused":
            return self.head(z) + z
        if self.use == "cat":
            return torch.cat([z, self.head(y)], 1)
        if self.use == "flatten":
            return self.head(z.flatten(1))
        return self.head(z)


def conv_bn():
    return [nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)]


class OwnIter(nn.Sequential):
    def __iter__(self):
        return iter(list(self._modules.values())[::-1])


class OwnForward(nn.Sequential):
    def forward(self, x):
        return super().forward(x) * 2


CASES = {
    "conv_bn_relu": lambda: Wrap(nn.Sequential(*conv_bn(), nn.ReLU())),
    "bn_first": lambda: Wrap(nn.Sequential(nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1))),
    "relu_first": lambda: Wrap(nn.Sequential(nn.ReLU(), *conv_bn())),
    "pass_through": lambda: Wrap(nn.Sequential(nn.Conv2d(8, 8, 1), nn.Identity(),
                                               nn.Dropout2d(), nn.BatchNorm2d(8))),
    "all_pass_through": lambda: Wrap(nn.Sequential(nn.Identity(), nn.Dropout())),
    "empty": lambda: Wrap(nn.Sequential()),
    "nested": lambda: Wrap(nn.Sequential(nn.Sequential(nn.Conv2d(8, 8, 1)),
                                         nn.Sequential(nn.BatchNorm2d(8), nn.ReLU()),
                                         nn.Sequential())),
    "ends_in_conv": lambda: Wrap(nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 1)),
                                 head=nn.BatchNorm2d(8)),
    "ends_in_relu": lambda: Wrap(nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU()),
                                 head=nn.BatchNorm2d(8)),
    "called_twice": lambda: Wrap(nn.Sequential(*conv_bn()), use="twice"),
    "output_reused": lambda: Wrap(nn.Sequential(nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1)),
                                  use="reused", head=nn.BatchNorm2d(8)),
    "into_cat": lambda: Wrap(nn.Sequential(nn.Conv2d(8, 8, 1)), use="cat"),
    "shared_child": lambda: _shared_child(),
    "flatten_linear_bn": lambda: Wrap(
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6),
                      nn.BatchNorm1d(6), nn.Linear(6, 4)), head=nn.BatchNorm1d(4)),
    "with_hook": lambda: _hooked(),
    "own_iter": lambda: Wrap(OwnIter(*conv_bn())),
    "own_forward": lambda: Wrap(OwnForward(*conv_bn())),
    "instance_forward": lambda: _instance_forward(),
    "holds_a_block": lambda: Wrap(nn.Sequential(nn.Conv2d(8, 8, 1),
                                                Residual(nn.BatchNorm2d(8)))),
}


class Residual(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return x + self.inner(x)


def _shared_child():
    conv = nn.Conv2d(8, 8, 1)
    model = Wrap(nn.Sequential(conv, nn.BatchNorm2d(8)), head=nn.Sequential(conv))
    return model


def _hooked():
    model = Wrap(nn.Sequential(*conv_bn()))
    model.seq.register_forward_hook(lambda m, i, o: o + 1)
    return model


def _instance_forward():
    model = Wrap(nn.Sequential(*conv_bn()))
    seq = model.seq
    seq.forward = types.MethodType(lambda self, x: self[1](self[0](x)) * 2, seq)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_sequential_traps_flow_the_same(case):
    torch.manual_seed(0)
    model = calibrate(CASES[case](), shape=(2, 3, 8, 8))
    assert_same_flow(model)
    x = torch.randn(2, 3, 8, 8)
    fused = fuse(model)
    assert rel_err(model(x), fused(x)) < 1e-5


@pytest.mark.parametrize("case", ["with_hook", "own_iter", "own_forward",
                                  "instance_forward"])
def test_not_a_chain_is_traced_through(case):
    model = CASES[case]()
    tracer = discover._LeafTracer(model)
    tracer.trace(model)
    assert not tracer.chains.get(id(model.seq))


def test_a_chain_is_one_node():
    model = CASES["conv_bn_relu"]()
    tracer = discover._LeafTracer(model)
    graph = tracer.trace(model)
    assert [n.target for n in graph.nodes if n.op == "call_module"] == ["stem", "seq", "head"]
    assert tracer.chains[id(model.seq)]


def test_global_hooks_turn_chains_off():
    model = CASES["conv_bn_relu"]()
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        tracer = discover._LeafTracer(model)
        tracer.trace(model)
        assert not tracer.chains.get(id(model.seq))
    finally:
        handle.remove()


# --- A forward set on the instance ---------------------------------------------


def _scaled_bn_forward(self, x):
    return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                    self.bias, False, 0.0, self.eps) * 2


@pytest.mark.parametrize("evidence", ["fx", "recorded", "sequential"])
def test_norm_with_instance_forward_is_left(evidence):
    torch.manual_seed(0)
    model = calibrate(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), shape=(2, 3, 8, 8))
    model[1].forward = types.MethodType(_scaled_bn_forward, model[1])
    x = torch.randn(2, 3, 8, 8)
    kwargs = {"example_inputs": x} if evidence == "recorded" else {}
    if evidence == "sequential":  # a model torch.fx cannot trace
        model = Untraceable(model)
    fused, report = fuse(model, return_report=True, **kwargs)
    assert not report.fused
    (left,) = report.left
    assert left.reason == "unknown_norm" and "set on the module itself" in left.detail
    assert torch.equal(model(x), fused(x))


class Untraceable(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if x.sum() > float("inf"):  # data-dependent: fx cannot trace this
            return x
        return self.inner(x)


def test_conv_with_instance_forward_is_left():
    torch.manual_seed(0)
    model = calibrate(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), shape=(2, 3, 8, 8))
    conv = model[0]
    conv.forward = types.MethodType(
        lambda self, x: nn.functional.conv2d(x.flip(-1), self.weight, self.bias), conv)
    x = torch.randn(2, 3, 8, 8)
    fused, report = fuse(model, return_report=True)
    assert not report.fused
    (left,) = report.left
    assert left.norm == "1"
    assert torch.equal(model(x), fused(x))


def test_instance_forward_calling_a_conv_is_seen():
    """A module whose instance forward calls another conv: traced through, so
    that conv's second call is seen and its norm is not folded."""
    torch.manual_seed(0)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)
            self.bn = nn.BatchNorm2d(4)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.bn(self.conv(x)))

    model = calibrate(Two(), shape=(2, 4, 8, 8))
    model.act.forward = types.MethodType(lambda self, x: model.conv(x).relu(), model.act)
    x = torch.randn(2, 4, 8, 8)
    assert flow_from_fx(model).count("conv") == 2
    fused, report = fuse(model, return_report=True)
    assert not report.fused
    assert [n.norm for n in report.left] == ["bn"]
    assert torch.equal(model(x), fused(x))


# --- The one module walk the stages share -----------------------------------------


def _aliased():
    model = Wrap(nn.Sequential(*conv_bn(), nn.ReLU()))
    model.alias = model.seq[1]  # one norm under two names
    model.block = nn.Sequential(model.seq, nn.Identity())  # a whole subtree twice
    model.seq.register_module("gap", None)
    return model


@pytest.mark.parametrize("make", [_aliased, lambda: build("mobilenet_v2"),
                                  lambda: build("googlenet")])
def test_module_index_is_named_modules(make):
    from fusion.layers import ModuleIndex, alias_names

    model = make()
    index = ModuleIndex(model)
    assert list(index.modules.items()) == list(model.named_modules())
    assert index.names == {id(m): n for n, m in model.named_modules()}
    assert index.aliases() == alias_names(model)
    assert index.shared == (len(list(model.named_modules(remove_duplicate=False)))
                            != len(index.modules))
    for name in ("block.0.1", "alias"):
        if hasattr(model, "alias"):
            assert index.get(name) is model.get_submodule(name)
