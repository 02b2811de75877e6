"""The tracer's shortcuts prove exactly what a full torch.fx trace proves.

fusion's tracer keeps a *chain* (an ``nn.Sequential`` that keeps its class's
``forward`` and ``__iter__``, has no hooks, and holds only leaves or chains)
as one graph node, and expands it into its children's calls afterwards; and it
records its operations as light nodes of its own rather than in an fx.Graph.
Every test here traces the same model the short way and the full way (every
chain traced through, into a real fx.Graph) and compares the two flows call by
call: who feeds each call, who uses its output, and the proven rank of its
input. A model with a forward set on one of its modules' instances is traced
through that module, and such a module is never folded. A tensor made in the
forward is not stored on the model, and a norm's buffer read outside its call
keeps the norm.
"""
import copy
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
    tracer = discover._LeafTracer(model, collapse)
    tracer.trace(model)
    return len(tracer.nodes)


def assert_same_flow(model):
    full = flow_from_fx(model, collapse=False, fx_graph=True)
    assert signature(flow_from_fx(model, collapse=False)) == signature(full)
    assert signature(flow_from_fx(model, collapse=True, fx_graph=True)) == signature(full)
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
    "plain_tensor_attribute": lambda: HoldsTensor(),
}


class HoldsTensor(nn.Module):
    """A tensor held as a plain attribute (not a buffer): fx's get_attr."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.t = torch.full((1, 8, 1, 1), 2.0)

    def forward(self, x):
        return self.bn(self.conv(x)) * self.t


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


def assert_trap_flows_the_same(make):
    """The short flow is the full one, and the fused model computes the same."""
    torch.manual_seed(0)
    model = calibrate(make(), shape=(2, 3, 8, 8))
    assert_same_flow(model)
    x = torch.randn(2, 3, 8, 8)
    fused = fuse(model)
    assert rel_err(model(x), fused(x)) < 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_sequential_traps_flow_the_same(case):
    assert_trap_flows_the_same(CASES[case])


@pytest.mark.parametrize("case", ["with_hook", "own_iter", "own_forward",
                                  "instance_forward"])
def test_not_a_chain_is_traced_through(case):
    model = CASES[case]()
    tracer = discover._LeafTracer(model)
    tracer.trace(model)
    assert not tracer.chains.get(id(model.seq))


def test_a_chain_is_one_node():
    model = CASES["conv_bn_relu"]()
    for fx_graph in (False, True):
        tracer = discover._LeafTracer(model, fx_graph=fx_graph)
        graph = tracer.trace(model)
        assert [n.target for n in tracer.nodes if n.op == "call_module"] == \
            ["stem", "seq", "head"]
        assert len(graph.nodes) == (len(tracer.nodes) if fx_graph else 0)
        assert tracer.chains[id(model.seq)]


def test_the_module_trace_skips_fx_walks():
    """On both torches the tracer takes its own copy of fx's trace, which
    collects the tensor attributes only when a tensor argument needs them
    (every other test compares its flow with fx's own trace)."""
    assert discover._FX_INTERNALS
    model = build("mobilenet_v2")
    tracer = discover._LeafTracer(model)
    tracer.trace(model)
    assert tracer.__dict__["_tensor_attrs"] is None and tracer.submodule_paths is None
    model = PlusConstant()
    tracer = discover._LeafTracer(model)
    tracer.trace(model)
    assert tracer.__dict__["_tensor_attrs"] == {}  # looked up: nothing is held as one


def test_light_nodes_have_fx_users():
    """Each light node's users are the fx.Node's users, in order, node by node
    (a use twice in one call counts once, as in fx; tuples, lists, dicts and
    slices are looked through)."""
    class Uses(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            z = torch.cat([y, y], 1) + y
            return {"a": z[:, y.shape[1]:], "b": (y * y, [z.sum(dim=1)])}

    model = Uses()
    light, full = discover._LeafTracer(model), discover._LeafTracer(model, fx_graph=True)
    light.trace(model)
    full.trace(model)
    assert len(light.nodes) == len(full.nodes) > 8

    def shape(nodes):
        where = {n: i for i, n in enumerate(nodes)}
        return [(n.op, str(n.target), [where[u] for u in n.users]) for n in nodes]

    assert shape(light.nodes) == shape(full.nodes)


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


# --- What fx itself would get wrong ---------------------------------------------


class PlusConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + torch.ones(1)


@pytest.mark.parametrize("inplace", [False, True])
def test_a_tensor_made_in_forward_is_not_stored_on_the_model(inplace):
    """torch.fx stores such a tensor on the root as ``_tensor_constant0``;
    fusion's trace leaves the model's attributes as they were, and folds."""
    torch.manual_seed(0)
    model = calibrate(PlusConstant(), shape=(2, 3, 8, 8))
    before = set(vars(model))
    x = torch.randn(2, 3, 8, 8)
    want = model(x)
    fused, report = fuse(model, inplace=inplace, return_report=True)
    assert [p.norm for p in report.fused] == ["bn"]
    assert set(vars(fused)) == before and set(vars(model)) == before
    assert rel_err(want, fused(x)) < 1e-5


def test_fx_itself_stores_a_tensor_made_in_forward():
    """The trap the test above guards against is real on this torch."""
    model = PlusConstant()
    torch.fx.Tracer().trace(model)
    assert isinstance(getattr(model, "_tensor_constant0", None), torch.Tensor)


class ReadsStats(nn.Module):
    """Reads the norm's running variance in its own forward, as ``how`` says:
    in arithmetic, to branch on, or through a list that holds it."""

    def __init__(self, how):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.how = how
        self.held = [self.bn.running_var]

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.how == "arithmetic":
            return y * self.bn.running_var.view(1, -1, 1, 1)
        if self.how == "branch":
            return y * 2 if float(self.bn.running_var.min()) > 0 else y
        return y + self.held[0].view(1, -1, 1, 1)


@pytest.mark.parametrize("how", ["arithmetic", "branch", "held"])
def test_a_norm_whose_buffer_is_read_outside_its_call_is_left(how):
    """fx hands a buffer read in the forward to the graph as a constant (or not
    at all, when only Python reads it), so its norm looked foldable and the
    fused model failed on the missing ``running_var``. It is left, and says why."""
    torch.manual_seed(0)
    model = calibrate(ReadsStats(how), shape=(2, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    fused, report = fuse(model, return_report=True)
    assert not report.fused
    (left,) = report.left
    assert left.norm == "bn" and left.reason == "params_used_elsewhere"
    assert torch.equal(model(x), fused(x))
    assert "bn" in flow_from_fx(model).escaped


class ScaledByBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.register_buffer("scale", torch.full((1, 4, 1, 1), 2.0))

    def forward(self, x):
        return self.bn(self.conv(x)) * self.scale


def test_a_buffer_of_another_module_keeps_the_fold():
    """Only a tracked module's buffers count: the model's own buffer, read in
    its forward, leaves the conv and norm foldable."""
    torch.manual_seed(0)
    model = calibrate(ScaledByBuffer(), shape=(2, 3, 8, 8))
    assert not flow_from_fx(model).escaped
    x = torch.randn(2, 3, 8, 8)
    fused, report = fuse(model, return_report=True)
    assert [p.norm for p in report.fused] == ["bn"]
    assert rel_err(model(x), fused(x)) < 1e-5


class HoldsWeight(nn.Module):
    """Computes on its conv's weight through a list that holds it, where fx
    sees no parameter: ``how`` is a view of it or a torch function on it."""

    def __init__(self, how):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.held = [self.conv.weight]
        self.how = how

    def forward(self, x):
        y = self.bn(self.conv(x))
        w = self.held[0]
        if self.how == "view":
            return y * w.view(4, -1)[:, :1].view(1, 4, 1, 1)
        return y * w.mean()


@pytest.mark.parametrize("how", ["view", "mean"])
def test_a_layer_weight_used_outside_its_call_keeps_the_pair(how):
    """fx runs ``w.mean()`` for real and bakes the result into the graph as a
    constant; folded in place, the fused model would compute it from the
    fused weight (an error of 0.1 with the view, 4e-4 with the mean)."""
    torch.manual_seed(0)
    model = calibrate(HoldsWeight(how), shape=(2, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    want = model(x).detach()
    fused, report = fuse(model, inplace=True, return_report=True)
    assert not report.fused
    assert [(n.norm, n.reason) for n in report.left] == [("bn", "params_used_elsewhere")]
    assert torch.equal(want, fused(x))


class CachesProxy(nn.Module):
    """Keeps a value of its forward in a dict on itself, keyed by str() of a
    value (timm's LeViT does this with its attention biases), so a trace
    leaves a Proxy in the model."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.cache = {}
        self.scale = nn.Parameter(torch.ones(1, 4, 1, 1))

    def forward(self, x):
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.scale * 2
        return self.bn(self.conv(x)) * self.cache[key]


def test_a_proxy_kept_by_the_model_copies_with_it():
    """The kept Proxy's node is shared, not copied node by node, when the
    fused model is copied again: a second fuse() of it works and is a no-op.
    (On torch 1.13 a Proxy cannot be copied, so such a model is fused in place.)"""
    torch.manual_seed(0)
    model = calibrate(CachesProxy(), shape=(2, 3, 8, 8))
    model.cache.clear()
    fused = fuse(model)
    assert any(isinstance(v, torch.fx.Proxy) for v in fused.cache.values())
    copyable = "__deepcopy__" in vars(torch.fx.Proxy)  # torch 1.13 cannot copy a Proxy
    if copyable:
        long = nn.Sequential(*[CachesProxy() for _ in range(150)])  # a long trace
        for m in long:
            m.conv, m.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        long = fuse(long.eval())
        copied = copy.deepcopy(long)
        assert len(list(copied.named_modules())) == len(list(long.named_modules()))
    again, report = fuse(fused, inplace=not copyable, return_report=True)
    assert not report.fused and not report.left


# --- Gates: torchvision's SqueezeExcitation, x * f(x) ---------------------------

from torchvision.ops.misc import SqueezeExcitation  # noqa: E402


class OwnScale(SqueezeExcitation):
    def _scale(self, x):
        return super()._scale(x) * 2


class OwnSEForward(SqueezeExcitation):
    def forward(self, x):
        return super().forward(x) + x


class TwoOutActivation(nn.Module):
    """Not a leaf: fx traces through it, and it calls a conv of the model."""

    def __init__(self, conv):
        super().__init__()
        self.conv = [conv]

    def forward(self, x):
        return torch.relu(x)


def se(**kw):
    return SqueezeExcitation(8, 4, **kw)


def _se_with(**parts):
    gate = se()
    for name, module in parts.items():
        setattr(gate, name, module)
    return gate


class CallsGate(nn.Module):
    """Calls a gate from its own forward, next to a conv whose output it gets."""

    def __init__(self, gate, bn_after=True):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.gate = gate
        self.out = nn.Conv2d(8, 8, 1)
        self.bn2 = nn.BatchNorm2d(8) if bn_after else nn.Identity()

    def forward(self, x):
        return self.bn2(self.out(self.gate(self.bn(self.conv(x)))))


def _hooked_gate():
    gate = se()
    gate.register_forward_hook(lambda m, i, o: o * 0.5)
    return gate


def _instance_scale():
    gate = se()
    gate._scale = types.MethodType(lambda self, x: self.fc2(self.fc1(x)).sigmoid(), gate)
    return gate


def _shared_fc1():
    model = Wrap(nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), se()))
    model.head = nn.Sequential(model.seq[2].fc1, nn.BatchNorm2d(4), nn.Conv2d(4, 8, 1))
    return model


GATE_CASES = {
    "in_a_chain": lambda: Wrap(nn.Sequential(*conv_bn(), nn.ReLU(), se(), *conv_bn())),
    "chain_starts_with_it": lambda: Wrap(nn.Sequential(se(), *conv_bn()),
                                         head=nn.BatchNorm2d(8)),
    "right_after_a_norm": lambda: Wrap(nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8),
                                                     se(), nn.BatchNorm2d(8))),
    "called_directly": lambda: CallsGate(se()),
    "silu_activation": lambda: CallsGate(se(activation=nn.SiLU)),
    "identity_activation": lambda: CallsGate(_se_with(activation=nn.Identity())),
    "norm_inside": lambda: CallsGate(_se_with(activation=nn.BatchNorm2d(4))),
    "conv_for_avgpool": lambda: CallsGate(_se_with(avgpool=nn.Conv2d(8, 8, 1))),
    "chain_for_activation": lambda: CallsGate(
        _se_with(activation=nn.Sequential(nn.BatchNorm2d(4), nn.ReLU()))),
    "all_pass_through": lambda: CallsGate(_se_with(
        avgpool=nn.Identity(), fc1=nn.Identity(), activation=nn.Identity(),
        fc2=nn.Identity(), scale_activation=nn.Identity())),
    "with_hook": lambda: CallsGate(_hooked_gate()),
    "own_scale": lambda: CallsGate(OwnScale(8, 4)),
    "own_forward": lambda: CallsGate(OwnSEForward(8, 4)),
    "instance_scale": lambda: CallsGate(_instance_scale()),
    "traced_activation": lambda: CallsGate(_se_with(activation=TwoOutActivation(None))),
    "shared_fc1": _shared_fc1,
    "twice": lambda: Wrap(nn.Sequential(*conv_bn(), se()), use="twice"),
}


@pytest.mark.parametrize("case", sorted(GATE_CASES))
def test_gate_traps_flow_the_same(case):
    assert_trap_flows_the_same(GATE_CASES[case])


@pytest.mark.parametrize("case, gate", [
    ("in_a_chain", True), ("called_directly", True), ("conv_for_avgpool", True),
    ("chain_for_activation", True), ("all_pass_through", False), ("with_hook", False),
    ("own_scale", False), ("own_forward", False), ("instance_scale", False),
    ("traced_activation", False)])
def test_which_modules_are_gates(case, gate):
    model = GATE_CASES[case]().eval()
    tracer = discover._LeafTracer(model)
    tracer.trace(model)
    found = [m for m in model.modules() if tracer.gates.get(id(m))]
    assert bool(found) == gate
    calls = [n.target for n in tracer.nodes if n.op == "call_module"]
    assert any("gate" in str(t) or "seq" == t for t in calls)


def test_gates_shrink_efficientnet():
    """efficientnet_b0's MBConv blocks become one node each: a chain holding
    a gate."""
    model = build("efficientnet_b0")
    assert graph_size(model, True) < graph_size(model, False) / 4


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_small_050", "seresnet18",
                                  "mixnet_s"])
def test_timm_model_flows_are_the_same(name):
    """timm's SqueezeExcite gates (x.mean first, then the children) are one
    node each, and the flow is the full trace's."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    full, short = assert_same_flow(model)
    assert sum(len(c) for c in full.calls.values()) > 10


def _timm_se(**kw):
    squeeze_excite = pytest.importorskip("timm.layers.squeeze_excite")
    return squeeze_excite.SEModule(8, rd_channels=4, gate_layer=nn.Sigmoid, **kw)


@pytest.mark.parametrize("kw, gate", [({}, True), ({"add_maxpool": True}, False),
                                      ({"norm_layer": nn.BatchNorm2d}, True)])
def test_timm_se_module_gate(kw, gate):
    """timm's SEModule is a gate unless its max pool reads x a third time; a
    norm inside it sits between fc1 and act, and folds into fc1."""
    torch.manual_seed(0)
    model = calibrate(CallsGate(_timm_se(**kw)), shape=(2, 3, 8, 8))
    tracer = discover._LeafTracer(model)
    tracer.trace(model)
    assert bool(tracer.gates.get(id(model.gate))) == gate
    assert_same_flow(model)
    x = torch.randn(2, 3, 8, 8)
    fused, report = fuse(model, return_report=True)
    assert rel_err(model(x), fused(x)) < 1e-5
    want = {"bn", "bn2"} | ({"gate.bn"} if "norm_layer" in kw else set())
    assert {p.norm for p in report.fused} == want


# --- Residual blocks: torchvision's InvertedResidual, MBConv -----------------------

from torchvision.models import efficientnet as tv_efficientnet  # noqa: E402
from torchvision.models import mobilenetv2 as tv_mobilenetv2  # noqa: E402
from torchvision.models import mobilenetv3 as tv_mobilenetv3  # noqa: E402


class Around(nn.Module):
    """A block between a conv + norm before it and a conv + norm after it."""

    def __init__(self, block, c):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(c)
        self.block = block
        self.head = nn.Conv2d(c, c, 1)
        self.bn1 = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn1(self.head(self.block(self.bn0(self.stem(x)))))


def _mbconv(residual=True, c=16):
    cnf = tv_efficientnet.MBConvConfig(4, 3, 1, c, c if residual else c + 8, 1)
    return tv_efficientnet.MBConv(cnf, 0.2, nn.BatchNorm2d)


def _fused_mbconv():
    cnf = tv_efficientnet.FusedMBConvConfig(4, 3, 1, 16, 16, 1)
    return tv_efficientnet.FusedMBConv(cnf, 0.2, nn.BatchNorm2d)


def _v3_block():
    cnf = tv_mobilenetv3.InvertedResidualConfig(16, 3, 32, 16, True, "HS", 1, 1, 1.0)
    return tv_mobilenetv3.InvertedResidual(cnf, nn.BatchNorm2d)


def _with(block, **parts):
    for name, value in parts.items():
        setattr(block, name, value)
    return block


class OwnBlockForward(tv_mobilenetv2.InvertedResidual):
    def forward(self, x):
        return self.conv(x) * 2 if self.use_res_connect else self.conv(x)


class Flagged(tv_mobilenetv2.InvertedResidual):
    use_res_connect = property(lambda self: True, lambda self, value: None)


def _hooked_block():
    block = tv_mobilenetv2.InvertedResidual(16, 16, 1, 2)
    block.register_forward_pre_hook(lambda m, i: None)
    return block


def _hooked_depth():
    block = _mbconv()
    block.stochastic_depth.register_forward_hook(lambda m, i, o: o * 2)
    return block


def _flag_tensor():
    block = tv_mobilenetv2.InvertedResidual(16, 16, 1, 2)
    block.__dict__["use_res_connect"] = torch.tensor(True)
    return block


RESIDUAL_CASES = {
    "v2_residual": (lambda: tv_mobilenetv2.InvertedResidual(16, 16, 1, 2), True),
    "v2_plain": (lambda: tv_mobilenetv2.InvertedResidual(16, 16, 1, 1), True),
    "v3_residual": (_v3_block, True),
    "mbconv_residual": (_mbconv, True),
    "fused_mbconv": (_fused_mbconv, True),
    "mbconv_depth_identity": (lambda: _with(_mbconv(), stochastic_depth=nn.Identity()), True),
    "mbconv_depth_conv": (lambda: _with(_mbconv(), stochastic_depth=nn.Conv2d(16, 16, 1)),
                          True),
    "mbconv_depth_hooked": (_hooked_depth, False),
    "mbconv_depth_custom": (lambda: _with(_mbconv(), stochastic_depth=Residual(nn.ReLU())),
                            False),
    "own_forward": (lambda: OwnBlockForward(16, 16, 1, 2), False),
    "flag_property": (lambda: Flagged(16, 16, 1, 2), False),
    "flag_tensor": (_flag_tensor, False),
    "hooked": (_hooked_block, False),
    "all_pass_through_main": (lambda: _with(tv_mobilenetv2.InvertedResidual(16, 16, 1, 2),
                                            conv=nn.Sequential(nn.Identity())), True),
}


@pytest.mark.parametrize("case", sorted(RESIDUAL_CASES))
def test_residual_traps_flow_the_same(case):
    make, known = RESIDUAL_CASES[case]
    channels = 16
    assert_trap_flows_the_same(lambda: Around(make(), channels))
    model = Around(make(), channels).eval()
    tracer = discover._LeafTracer(model)
    tracer.trace(model)
    assert bool(tracer.residuals.get(id(model.block))) == known


def test_residual_blocks_make_the_zoo_one_node():
    """mobilenet_v2's and efficientnet_b0's features are one chain node each."""
    for name in ("mobilenet_v2", "efficientnet_b0"):
        model = build(name)
        tracer = discover._LeafTracer(model)
        tracer.trace(model)
        assert [n.target for n in tracer.nodes if n.op == "call_module"][0] == "features"
        assert len(tracer.nodes) <= 8
