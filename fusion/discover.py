"""Evidence of the model's data flow, from which folds are proven.

Three sources, from strongest to weakest:

* ``fx``: a torch.fx symbolic trace. Input independent, but not every model
  traces.
* ``recorded``: one forward run on the user's example inputs, watched by
  module hooks (who called whom with which tensor) and a TorchDispatchMode
  (every aten op that reads each tensor, indexing and in-place ops included).
  Works on any model; covers the control flow these inputs take.
* ``sequential``: with neither, adjacency inside a plain ``nn.Sequential``,
  whose forward passes each child's output to the next child alone.

Each source yields a :class:`Flow`: for every call of every layer and norm,
which call produced its sole input, and who else used its output.
"""
import contextlib
import functools
import sys
import threading
import types
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set

import torch
from torch import fx, nn
from torch.fx import _symbolic_trace
from torch.overrides import TorchFunctionMode

from .errors import FusionError
from .layers import (ModuleIndex, alias_names, canonical_names, has_hooks, is_layer,
                     is_norm_module, own_forward, tensors)

__all__ = []

OTHER = "other"  # a use of a tensor by anything but the next layer or norm

#: Held while fusion traces a model or runs one. torch.fx patches
#: nn.Module.__call__ and __getattr__ for the whole process while it traces, so
#: a module called in another thread meanwhile goes through that tracer (and
#: fails, or lands in its graph), and two traces at once can leave a patch
#: behind. With this lock, fuse() in two threads is safe; a user's own forward
#: in another thread during a trace is still not (a torch.fx limitation).
MODEL_LOCK = threading.RLock()


def is_interesting(module) -> bool:
    """Modules whose calls a flow tracks: norms, and layers a norm might fold into."""
    return is_norm_module(module) or is_layer(module)


@dataclass(eq=False)
class Call:
    """One call of a tracked module."""

    name: str
    src: Optional["Call"] = None  # the call whose output is exactly our sole input
    users: List[object] = field(default_factory=list)  # Calls, or OTHER
    in_ndim: Optional[int] = None


@dataclass(eq=False)
class Cat(Call):
    """A ``torch.cat`` along dim 1 of the outputs of tracked calls (``parts``,
    in order): the one function call a flow tracks. Its ``users`` are those of
    the concatenation; each part's users include it."""

    parts: List[Call] = field(default_factory=list)


@dataclass(eq=False)
class View(Call):
    """A view of one tracked call's output (``src``) that merges its leading
    dims and keeps its last (``x.flatten(0, 1)`` of a (B, N, C) Linear output,
    as timm's LeViT does before a BatchNorm1d): the other function call a flow
    tracks."""


VIEW = "flatten"
CAT = "torch.cat"
_CAT_FUNCTIONS = tuple(f for f in (torch.cat, getattr(torch, "concat", None),
                                   getattr(torch, "concatenate", None)) if f is not None)


@dataclass
class Flow:
    source: str  # "fx", "recorded" or "sequential"
    calls: Dict[str, List[Call]] = field(default_factory=dict)
    escaped: Set[str] = field(default_factory=set)  # params used outside own call
    placed: Set[str] = field(default_factory=set)  # sequential: input is a sibling's
    value_reads: int = 0  # recorded: tensor values read into Python (if x.sum() > 0)
    shape_reads: int = 0  # recorded: sizes read into Python (x.shape, x.size(), len(x))
    label: Optional[str] = None  # how reports name this flow, where not by source
    resized: bool = False  # recorded: the second run, at another input size
    shapes_unchecked: Optional[str] = None  # recorded: why no run at another size
    uncalled: List[str] = field(default_factory=list)  # recorded: tracked, never called
    note: Optional[str] = None

    def add(self, call: Call) -> Call:
        self.calls.setdefault(call.name, []).append(call)
        return call

    def count(self, name: str) -> int:
        return len(self.calls.get(name, ()))


# --- torch.fx ------------------------------------------------------------------


#: The process-wide module hooks that nn.Module.__call__ runs (torch 1.13 has
#: the first three): with any set, a traced call runs them, and nothing is taken
#: as read without tracing.
_GLOBAL_HOOKS = ("_global_forward_pre_hooks", "_global_forward_hooks",
                 "_global_backward_hooks", "_global_backward_pre_hooks")


class _Node:
    """One traced operation: as much of an ``fx.Node`` as :func:`flow_from_fx`
    reads (``op``, ``target``, ``args``, ``kwargs``, ``users``) and fx's Proxy
    touches (``name``, ``meta``), without fx.Graph's naming, lookup tables and
    argument maps, which nothing here reads. ``users`` is as fx fills it: each
    node whose arguments hold this one, once."""

    __slots__ = ("op", "target", "args", "kwargs", "users", "name", "meta", "type",
                 "stack_trace")

    def __init__(self, op, target, args, kwargs, name=None, type_expr=None):
        self.op, self.target, self.args, self.kwargs = op, target, args, kwargs
        self.name = name if name is not None else op
        self.type, self.meta, self.stack_trace = type_expr, {}, None
        self.users: Dict["_Node", None] = {}
        _link(args, self)
        _link(kwargs, self)

    def __repr__(self):
        return f"{self.op}[{self.target}]"

    def __deepcopy__(self, memo):
        # A Proxy that a forward kept (a cache on the module) is copied with the
        # model; its node is a record of the trace, shared, not copied node by
        # node through every user (which would recurse past Python's limit).
        return self


def _link(arg, user):
    """Adds ``user`` to the users of every node inside ``arg`` (fx's map_arg:
    through tuples, lists, dict values and slices)."""
    if type(arg) is _Node:
        arg.users[user] = None
    elif isinstance(arg, (tuple, list)):
        for a in arg:
            _link(a, user)
    elif isinstance(arg, dict):
        for a in arg.values():
            _link(a, user)
    elif isinstance(arg, slice):
        _link(arg.start, user)
        _link(arg.stop, user)
        _link(arg.step, user)


#: What a traced operation's arguments hold where they hold another's output.
_NODES = (_Node, fx.Node)


def _tensor_keys(t):
    """Keys that find ``t`` among the model's tensors: its id and, for a dense
    tensor with elements, the address of its storage (which its views share)."""
    yield ("id", id(t))
    try:
        if t.device.type != "meta" and not t.is_sparse and not t.is_quantized and t.numel():
            yield (t.device.type, t.data_ptr() - t.storage_offset() * t.element_size())
    except (RuntimeError, NotImplementedError):  # a tensor subclass without storage
        pass


def _real_tensors(obj):
    """The tensors in a torch function's arguments (through tuples, lists and
    dict values); a Proxy is not one."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _real_tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _real_tensors(o)


class _TensorReads(TorchFunctionMode):
    """While a :class:`_LeafTracer` traces: every torch function called on a
    real tensor that is (or views) a module's parameter or buffer adds that
    module to the tracer's ``read``."""

    def __init__(self, tracer):
        super().__init__()
        self.tracer = tracer
        self.thread = threading.get_ident()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        tracer = self.tracer
        if not tracer._internal and threading.get_ident() == self.thread:
            for t in _real_tensors((args, kwargs)):
                owner = tracer._owner(t)
                if owner is not None:
                    tracer.read.add(owner)
        return func(*args, **(kwargs or {}))


#: The torch.fx internals ``_LeafTracer._trace_module`` calls (torch 1.13 to 2.14);
#: without any of them, fx's own ``trace`` runs.
_FX_INTERNALS = all(hasattr(_symbolic_trace, n) for n in (
    "_orig_module_call", "_orig_module_getattr", "_autowrap_check",
    "_patch_wrapped_functions")) and (
    hasattr(_symbolic_trace, "_new_patcher") or hasattr(_symbolic_trace, "_Patcher")) and (
    hasattr(_symbolic_trace, "_set_is_fx_tracing") or
    hasattr(_symbolic_trace, "_is_fx_tracing_flag")) and \
    hasattr(fx.Tracer(), "_autowrap_search")


def _fx_patcher():
    """torch.fx's patcher context (torch 2 tracks the current one)."""
    return getattr(_symbolic_trace, "_new_patcher", None) or _symbolic_trace._Patcher


@contextlib.contextmanager
def _fx_tracing():
    """torch.fx's "tracing now" flag, set for the block (is_fx_tracing())."""
    st = _symbolic_trace
    if hasattr(st, "_set_is_fx_tracing"):
        old = st._get_is_fx_tracing()
        st._set_is_fx_tracing(True)
        try:
            yield
        finally:
            st._set_is_fx_tracing(old)
    else:
        old = st._is_fx_tracing_flag
        st._is_fx_tracing_flag = True
        try:
            yield
        finally:
            st._is_fx_tracing_flag = old


def _as_its_class(m) -> bool:
    """A call of ``m`` runs its class's forward and nothing else: no forward set
    on the instance, no hooks (backward pre-hooks included)."""
    return not own_forward(m) and has_hooks(m) is None and \
        not getattr(m, "_backward_pre_hooks", None)


def _tensor_constant():
    """The target of a node for a tensor made while tracing (``torch.ones(1)``
    in a forward): fx would store it on the model as ``_tensor_constantN``."""


class _LeafTracer(fx.Tracer):
    """Keeps tracked modules as single call_module nodes (FrozenBatchNorm2d and
    registered norms would otherwise be traced through).

    With ``collapse``, a call of a *chain* is one call_module node too: an
    ``nn.Sequential`` whose class keeps its ``forward`` and ``__iter__``
    (each child called on the previous one's output), with no hooks, whose
    children are all leaves or chains. Tracing through it would give each
    child one node, fed the previous child's output and nothing else, and no
    other node; :func:`flow_from_fx` expands the chain's node into exactly
    those calls, so the flow is the same, from fewer nodes. Everything else
    is as ``fx.Tracer`` traces it, less the nodes' debugging metadata (module
    scopes and stacks), which nothing here reads, and with three differences:

    * the operations are :class:`_Node` objects in ``nodes`` (``fx_graph=True``:
      fx.Node objects in the returned fx.Graph, as torch.fx makes them);
    * a tensor made while tracing is a node of its own, where fx stores it on
      the model as an attribute (``_tensor_constant0``): the model is left as
      it was;
    * the modules whose tensors the traced code reads where fx sees no
      parameter are in ``read``, by name: a buffer read from its module
      (``self.bn.running_var``, which fx hands over as a plain tensor, or not at
      all when only Python reads it), a constant that is, or views, a module's
      parameter or buffer (``self.held[0].view(-1)``), and any torch function
      called on one (``self.held[0].mean()``, which fx runs for real and
      bakes into the graph as a constant)."""

    def __init__(self, model, collapse=True, index: Optional[ModuleIndex] = None,
                 fx_graph=False):
        super().__init__()
        self._leaf: Dict[int, bool] = {}
        self._leaf_class: Dict[type, bool] = {}
        self.chains: Dict[int, bool] = {}
        self.gates: Dict[int, Optional[List[nn.Module]]] = {}
        self.residuals: Dict[int, Optional[tuple]] = {}
        self.squeezes: Dict[int, bool] = {}  # a gate's -> it squeezes with an op
        self._collapse = collapse and not any(
            getattr(torch.nn.modules.module, h, None) for h in _GLOBAL_HOOKS)
        self._index = index
        self._fx_graph = fx_graph
        self._owners: Optional[Dict[tuple, str]] = None  # made on the first need
        self._internal = False  # in the tracer's own checks, not the traced code
        # fx's patch of nn.Module.__getattr__ is the whole process's: another
        # thread's attribute reads reach this tracer too, and are not its own.
        self._thread = threading.get_ident()
        self.nodes: list = []
        self.read: Set[str] = set()

    def trace(self, root, concrete_args=None):
        self.nodes = []
        self._thread = threading.get_ident()
        try:
            with _TensorReads(self):
                if self._fx_graph or not _FX_INTERNALS or not isinstance(root, nn.Module) or \
                        isinstance(root, fx.GraphModule) or \
                        not isinstance(getattr(type(root), self.traced_func_name, None),
                                       types.FunctionType):
                    graph = super().trace(root, concrete_args)
                else:
                    graph = self._trace_module(root, concrete_args)
        finally:
            # A forward can keep a Proxy (a cache on the module); what it keeps
            # of the tracer is not to hold the model's modules once more.
            self._index = self._owners = None
        if self._fx_graph:
            self.nodes = list(graph.nodes)
        return graph

    def _trace_module(self, root, concrete_args):
        """``fx.Tracer.trace`` of a module, step for step as torch 1.13 to 2.14
        write it, less two walks of the whole model made up front: the module
        paths come from the :class:`ModuleIndex`, and the tensor attributes,
        which only a tensor argument's lookup reads, are collected on the first
        lookup (see :attr:`tensor_attrs`). ``fx_graph=True`` traces with fx's
        own ``trace``, and the tests compare the two."""
        st = _symbolic_trace
        with _fx_tracing():
            self.root = root
            fn = getattr(type(root), self.traced_func_name)
            self.root_module_name = root._get_name()
            index = self._index or ModuleIndex(root)
            self.submodule_paths = {m: name for name, m in index.modules.items()}
            self.graph = fx.Graph(tracer_cls=type(self))
            self.__dict__["_tensor_attrs"] = None
            fn_globals = fn.__globals__  # before it is patched
            fn, args = self.create_args_for_root(fn, True, concrete_args)
            parameter_proxy_cache: Dict[str, fx.Proxy] = {}

            @functools.wraps(st._orig_module_getattr)
            def module_getattr_wrapper(mod, attr):
                attr_val = st._orig_module_getattr(mod, attr)
                return self.getattr(attr, attr_val, parameter_proxy_cache)

            @functools.wraps(st._orig_module_call)
            def module_call_wrapper(mod, *args, **kwargs):
                def forward(*args, **kwargs):
                    return st._orig_module_call(mod, *args, **kwargs)

                st._autowrap_check(patcher, getattr(getattr(mod, "forward", mod),
                                                    "__globals__", {}),
                                   self._autowrap_function_ids)
                return self.call_module(mod, forward, args, kwargs)

            with _fx_patcher()() as patcher:
                patcher.patch_method(nn.Module, "__getattr__", module_getattr_wrapper,
                                     deduplicate=False)
                patcher.patch_method(nn.Module, "__call__", module_call_wrapper,
                                     deduplicate=False)
                st._patch_wrapped_functions(patcher)
                st._autowrap_check(patcher, fn_globals, self._autowrap_function_ids)
                for module in self._autowrap_search:
                    st._autowrap_check(patcher, module.__dict__, self._autowrap_function_ids)
                self.create_node("output", "output", (self.create_arg(fn(*args)),), {})
            self.submodule_paths = None
        return self.graph

    @property
    def tensor_attrs(self):
        """fx's map of the tensors held as plain module attributes to their
        qualified names, collected as fx's ``trace`` collects it."""
        attrs = self.__dict__.get("_tensor_attrs")
        if attrs is None:
            attrs = self.__dict__["_tensor_attrs"] = {}
            kinds = getattr(_symbolic_trace, "_constant_attribute_types",
                            (torch.Tensor, torch.ScriptObject))

            def collect(m, prefix):
                for k, v in m.__dict__.items():
                    if isinstance(v, kinds):
                        attrs[v] = ".".join(prefix + [k])
                for k, v in m.named_children():
                    collect(v, prefix + [k])

            collect(self.root, [])
        return attrs

    @tensor_attrs.setter
    def tensor_attrs(self, value):
        self.__dict__["_tensor_attrs"] = value

    def _owner(self, t) -> Optional[str]:
        """The name of the module whose parameter or buffer ``t`` is, or views
        (shares storage with); None for any other tensor."""
        was, self._internal = self._internal, True  # reading sizes is a torch function
        try:
            return self._find_owner(t)
        finally:
            self._internal = was

    def _find_owner(self, t) -> Optional[str]:
        if self._owners is None:
            self._owners = {}
            for name, m in (self._index or ModuleIndex(self.root)).modules.items():
                for held in (m._parameters, m._buffers):
                    for b in held.values():
                        if b is not None:
                            for key in _tensor_keys(b):
                                self._owners.setdefault(key, name)
        for key in _tensor_keys(t):
            owner = self._owners.get(key)
            if owner is not None:
                return owner
        return None

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if threading.get_ident() != self._thread:
            return attr_val  # another thread's read, while this one traces
        if not self._internal and isinstance(attr_val, torch.Tensor) and \
                not isinstance(attr_val, nn.Parameter):
            owner = self._owner(attr_val)
            if owner is not None:
                self.read.add(owner)
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m, qualname):
        leaf = self._leaf.get(id(m))
        if leaf is None:
            # A forward set on the instance is traced: the class says nothing of it.
            # The rest depends on the class alone (fx's own test: a torch.nn class).
            cls = type(m)
            by_class = self._leaf_class.get(cls)
            if by_class is None:
                by_class = self._leaf_class[cls] = is_interesting(m) or \
                    super().is_leaf_module(m, qualname)
            leaf = self._leaf[id(m)] = by_class and not own_forward(m)
        return leaf

    def is_chain(self, m) -> bool:
        """A module whose call :func:`flow_from_fx` can expand (see the class):
        a chain, a gate (see :meth:`gate_children`) or a residual block (see
        :meth:`residual_parts`)."""
        chain = self.chains.get(id(m))
        if chain is None:
            chain = self.chains[id(m)] = self._collapse and _as_its_class(m) and (
                self._is_sequential_chain(m) or self.gate_children(m) is not None or
                self.residual_parts(m) is not None)
        return chain

    def residual_parts(self, m):
        """``(main, tail, added)`` of a *residual block*, or None.

        A residual block of a class whose forward is known (torchvision's
        MobileNetV2/V3 InvertedResidual, EfficientNet's MBConv and FusedMBConv)
        computes ``y = main(x)`` and, where its ``use_res_connect`` is True
        (``added``), ``y = tail(y) + x``; ``main`` and ``tail`` run their
        children one after the other. The tail is torchvision's StochasticDepth
        (one op the flow does not track, in fx's trace) or a leaf or chain."""
        parts = self.residuals.get(id(m), False)
        if parts is False:
            parts = self.residuals[id(m)] = self._residual_parts(m)
        return parts

    def _residual_parts(self, m):
        known = _known_block(type(m), _known_residuals())
        if known is None or any(n in vars(m) for n in known.methods):
            return None
        added = vars(m).get("use_res_connect")
        if type(added) is not bool:
            return None
        main = [m._modules.get(n) for n in known.children]
        tail = [m._modules.get(n) for n in known.tail] if added else []
        if any(c is None or not self._expandable(c) for c in main) or any(
                c is None or not (self._expandable(c) or self._is_known_op(c)) for c in tail):
            return None
        return main, tail, added

    def _is_known_op(self, m) -> bool:
        """torchvision's StochasticDepth as its class defines it: its call is
        one fx node (``stochastic_depth`` is wrapped for fx)."""
        cls = getattr(sys.modules.get("torchvision.ops.stochastic_depth"), "StochasticDepth",
                      None)
        return cls is not None and type(m) is cls and _as_its_class(m) and not m._modules

    def _is_sequential_chain(self, m) -> bool:
        cls = type(m)
        return isinstance(m, nn.Sequential) and cls.forward is nn.Sequential.forward and \
            cls.__iter__ is nn.Sequential.__iter__ and all(
                c is not None and self._expandable(c) for c in m._modules.values())

    def _expandable(self, child) -> bool:
        return self.is_leaf_module(child, "") or self.is_chain(child)

    def gate_children(self, m) -> Optional[List[nn.Module]]:
        """The children of a *gate*, in the order its forward runs them, or None.

        A gate computes ``x * f(x)``, where ``f`` runs its children one after
        the other, each on the previous one's output alone (after, in timm's,
        an op on ``x`` that the flow does not track); its class is one whose
        forward is known to do exactly that (see :func:`_known_gates`), and it
        keeps that forward (and, in a subclass, adds no class attribute of
        those names). Each child is a leaf or a
        chain, and one at least is not a pass-through, so ``f(x)`` is not ``x``.
        (Hooks and instance forwards are ruled out by :meth:`is_chain`.)"""
        gate = self.gates.get(id(m), False)
        if gate is False:
            gate = self.gates[id(m)] = self._gate_children(m)
        return gate

    def _gate_children(self, m) -> Optional[List[nn.Module]]:
        known = _known_gate(type(m))
        if known is None or any(n in vars(m) for n in known.methods) or \
                not known.holds(m):
            return None
        children = [m._modules.get(n) for n in known.children]
        if any(c is None or not self._expandable(c) for c in children) or (
                not known.squeeze and all(_passes_through(c) for c in children)):
            return None
        self.squeezes[id(m)] = known.squeeze
        return children

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)  # raises NameError for a module not in the model
        was, self._internal = self._internal, True
        try:
            short = self.is_leaf_module(m, name) or (
                len(args) == 1 and not kwargs and self.is_chain(m))
        finally:
            self._internal = was
        if short:
            return self.create_proxy("call_module", name, args, kwargs)
        return forward(*args, **kwargs)

    def create_arg(self, a):
        # The common arguments, as fx.Tracer.create_arg makes them, without its
        # checks for parameters, modules and constants (none of them is one).
        if type(a) is fx.Proxy:
            return a.node
        if type(a) is tuple and all(type(x) is fx.Proxy for x in a):
            return tuple(x.node for x in a)
        if type(a) is dict and not a:
            return {}
        if isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter):
            was, self._internal = self._internal, True  # hashing it is a torch function
            try:
                constant = a not in self.tensor_attrs
            finally:
                self._internal = was
            if constant:
                owner = self._owner(a)
                if owner is not None:
                    self.read.add(owner)
                return self.create_node("call_function", _tensor_constant, (), {})
        return super().create_arg(a)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        if self._fx_graph:
            return self.graph.create_node(kind, target, args, kwargs, name, type_expr)
        # A name of its own, as fx gives (a forward may key a cache on str(proxy)).
        node = _Node(kind, target, args, kwargs, f"{name or kind}_{len(self.nodes)}",
                     type_expr)
        self.nodes.append(node)
        return node


def chain_children(tracer, module) -> List[nn.Module]:
    """The leaves and gates a chain's call runs, in order, nested chains
    expanded (a gate's call is the gate alone)."""
    if tracer.gates.get(id(module)) or tracer.residuals.get(id(module)):
        return [module]
    out = []
    for child in module._modules.values():
        if tracer.chains.get(id(child)) and not tracer.gates.get(id(child)) and \
                not tracer.residuals.get(id(child)):
            out.extend(chain_children(tracer, child))
        else:
            out.append(child)
    return out


class _KnownGate:
    """A gate class (see :meth:`_LeafTracer.gate_children`): the children its
    forward runs, in order; the methods that forward consists of; whether it
    first squeezes its input with an op the flow does not track (timm's
    ``x.mean((2, 3), keepdim=True)``) rather than a child; and what else an
    instance must hold for its forward to be the known one."""

    def __init__(self, cls, children, methods, squeeze=False, holds=None):
        self.cls, self.children, self.methods = cls, children, methods
        self.functions = {n: getattr(cls, n) for n in methods}
        self.squeeze = squeeze
        self.holds = holds or (lambda m: True)


def _known_gates() -> List[_KnownGate]:
    """The gate classes of the libraries loaded (none is imported to find out),
    each read against the forward of the versions tested."""
    out = []
    se = getattr(sys.modules.get("torchvision.ops.misc"), "SqueezeExcitation", None)
    if isinstance(se, type):
        out.append(_KnownGate(se, ("avgpool", "fc1", "activation", "fc2",
                                   "scale_activation"), ("forward", "_scale")))
    # timm: x * gate(...(x.mean((2, 3), keepdim=True))), the EfficientNet
    # family's SqueezeExcite and the ResNet family's SEModule (without its
    # experimental max pool, which reads x a third time).
    se = getattr(sys.modules.get("timm.models._efficientnet_blocks"), "SqueezeExcite", None)
    if isinstance(se, type):
        out.append(_KnownGate(se, ("conv_reduce", "act1", "conv_expand", "gate"),
                              ("forward",), squeeze=True))
    se = getattr(sys.modules.get("timm.layers.squeeze_excite"), "SEModule", None)
    if isinstance(se, type):
        out.append(_KnownGate(se, ("fc1", "bn", "act", "fc2", "gate"), ("forward",),
                              squeeze=True,
                              holds=lambda m: vars(m).get("add_maxpool", True) is False))
    return out


class _KnownResidual(_KnownGate):
    """A residual block class (see :meth:`_LeafTracer.residual_parts`): the
    children of its main path and of its tail, and its forward's methods."""

    def __init__(self, cls, children, tail):
        super().__init__(cls, children, ("forward",))
        self.tail = tail


def _known_residuals() -> List[_KnownResidual]:
    """The residual block classes of torchvision, where it is loaded."""
    out = []
    for module, name, main, tail in (
            ("torchvision.models.mobilenetv2", "InvertedResidual", ("conv",), ()),
            ("torchvision.models.mobilenetv3", "InvertedResidual", ("block",), ()),
            ("torchvision.models.efficientnet", "MBConv", ("block",), ("stochastic_depth",)),
            ("torchvision.models.efficientnet", "FusedMBConv", ("block",),
             ("stochastic_depth",))):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            out.append(_KnownResidual(cls, main, tail))
    return out


def _known_gate(cls) -> Optional[_KnownGate]:
    return _known_block(cls, _known_gates())


def _known_block(cls, knowns):
    """The entry of ``knowns`` for class ``cls``: its class or a subclass that
    keeps its methods and adds no class attribute of its children's names."""
    for known in knowns:
        if issubclass(cls, known.cls) and \
                all(getattr(cls, n) is f for n, f in known.functions.items()) and \
                cls.__getattr__ is nn.Module.__getattr__ and \
                not any(n in vars(k) for k in cls.__mro__ if k is not known.cls
                        for n in known.children + getattr(known, "tail", ()) +
                        ("add_maxpool", "use_res_connect")):
            return known
    return None


# Modules and functions whose output has the rank of their (first) input.
_RANK_KEEPING_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Sigmoid,
                         nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Dropout, nn.Identity)
_RANK_KEEPING_FUNCTIONS = {torch.relu, torch.sigmoid, torch.tanh, torch.nn.functional.relu,
                           torch.nn.functional.gelu, torch.nn.functional.silu,
                           torch.nn.functional.dropout}


def _module_rank(m, in_rank: Optional[int]) -> Optional[int]:
    """The rank of module ``m``'s output, from its input's (None: not proven)."""
    if isinstance(m, nn.Flatten):
        return 2 if (m.start_dim, m.end_dim) == (1, -1) else None
    if isinstance(m, (nn.Linear, nn.BatchNorm1d) + _RANK_KEEPING_MODULES):
        return in_rank
    return None


def _proven_rank(node, modules, rank) -> Optional[int]:
    """The rank of fx node ``node``'s output where the op defines it, from the
    ranks already proven for earlier nodes; None where it is not proven.

    2 after ``nn.Flatten()`` and ``torch.flatten(x, 1)`` with their default
    end, and after ``view``/``reshape`` to two sizes; a Linear, a BatchNorm1d or
    an elementwise activation keeps its input's rank."""
    def of(arg):
        return rank.get(arg) if isinstance(arg, _NODES) else None

    args = node.args
    if node.op == "call_module":
        return _module_rank(modules[node.target], of(args[0]) if args else None)
    if node.op == "call_function":
        if node.target is torch.flatten:
            start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
            return 2 if (start, end) == (1, -1) else None
        if node.target in _RANK_KEEPING_FUNCTIONS and not node.kwargs.get("inplace"):
            return of(args[0]) if args else None
        return None
    if node.op == "call_method" and node.target in ("view", "reshape"):
        sizes = args[1:]
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = sizes[0]
        return 2 if len(sizes) == 2 else None
    return None


#: What a chain's first child is to the users of the chain's input: the Call
#: that consumes it, or this (a module the flow does not track).
_UNTRACKED = object()
#: In expanding a chain: the value is the chain's input.
_ENTRY = object()


def flow_from_fx(model, collapse=True, index: Optional[ModuleIndex] = None,
                 fx_graph=False, values_read: Optional[Set[str]] = None) -> Flow:
    """Traces ``model`` with torch.fx. Raises whatever tracing raises.

    ``collapse=False`` traces through every chain, and ``fx_graph=True`` builds
    an fx.Graph (see :class:`_LeafTracer`); the flow is the same either way.
    ``index``: the model's :class:`ModuleIndex`, if the caller has one.
    ``values_read`` receives the names of the modules whose parameters or
    buffers the traced code read as real tensors, also where tracing raises."""
    index = index or ModuleIndex(model)
    modules, names = index.modules, index.names
    tracer = _LeafTracer(model, collapse, index, fx_graph)
    with MODEL_LOCK:
        try:
            tracer.trace(model)
        finally:
            if values_read is not None:
                values_read.update(tracer.read)
    flow = Flow("fx")
    by_node: Dict[_Node, Call] = {}
    entry: Dict[_Node, list] = {}  # a chain's node -> the Calls that use its input
    rank: Dict[_Node, int] = {}
    through: Dict[_Node, _Node] = {}  # a pass-through module's node -> its input's

    def value(arg):
        return through.get(arg, arg) if isinstance(arg, _NODES) else arg

    def chain(node, module):
        """The calls of a chain's (or gate's) children, linked as tracing
        through it links them."""
        arg = node.args[0]
        prev = by_node.get(value(arg)) if isinstance(arg, _NODES) else None
        state = [_ENTRY, rank.get(arg) if isinstance(arg, _NODES) else None]

        def use(cur, consumer):
            """``consumer`` (a Call, or None for an untracked op) uses ``cur``."""
            if cur is _ENTRY:
                entry.setdefault(node, []).append(_UNTRACKED if consumer is None else consumer)
                if consumer is not None:
                    consumer.src = prev
            elif cur is not None:
                cur.users.append(OTHER if consumer is None else consumer)
                if consumer is not None:
                    consumer.src = cur

        def both(y, x, same):
            """One untracked op (x * y, y + x) on two values: one use of each;
            or, where no node lies between them (``same``: y is x itself), one
            use, as fx counts users."""
            use(y, None)
            if not same:
                use(x, None)
            state[:] = [None, None]

        def run(children):
            for child in children:
                inner = tracer.gates.get(id(child))
                if inner:  # x * f(x): f's children on x, then one op on both
                    x = state[0]
                    if tracer.squeezes[id(child)]:  # f starts with an op on x
                        use(x, None)
                        state[:] = [None, None]
                    inner = chain_children_of(inner)
                    run(inner)
                    both(state[0], x, same=not inner and not tracer.squeezes[id(child)])
                    continue
                parts = tracer.residuals.get(id(child))
                if parts:  # main(x), then tail(.) + x where it adds
                    main, tail, added = parts
                    x = state[0]
                    main = chain_children_of(main)
                    run(main)
                    if added:
                        for t in tail:
                            if tracer.chains.get(id(t)) or tracer.is_leaf_module(t, ""):
                                tail_children = chain_children_of([t])
                                run(tail_children)
                                main = main + tail_children
                            else:  # StochasticDepth: one op
                                use(state[0], None)
                                state[:] = [None, None]
                                main = main + [t]
                        both(state[0], x, same=not main)
                    continue
                cur, r = state
                state[1] = _module_rank(child, r)
                if _passes_through(child):
                    continue
                call = flow.add(Call(names[id(child)], in_ndim=r)) \
                    if is_interesting(child) else None
                use(cur, call)
                state[0] = call

        def chain_children_of(children):
            out = []
            for c in children:
                out.extend(chain_children(tracer, c) if tracer.chains.get(id(c)) else [c])
            return out

        run(chain_children(tracer, module))
        cur, r = state
        if r is not None:
            rank[node] = r
        if cur is _ENTRY:  # every child passes its input through
            if isinstance(arg, _NODES):
                through[node] = value(arg)
        elif cur is not None:
            by_node[node] = cur

    for node in tracer.nodes:
        if node.op == "call_module" and tracer.chains.get(id(modules[node.target])):
            chain(node, modules[node.target])
            continue
        proven = _proven_rank(node, modules, rank)
        if proven is not None:
            rank[node] = proven
        if node.op == "call_function" and node.target in _CAT_FUNCTIONS:
            cat = _fx_cat(node, by_node, value)
            if cat is not None:
                by_node[node] = cat
        elif _fx_leading_flatten(node) and value(node.args[0]) in by_node and \
                not isinstance(by_node[value(node.args[0])], (Cat, View)):
            by_node[node] = View(VIEW, src=by_node[value(node.args[0])])
        elif node.op == "call_module":
            module = modules[node.target]
            if _passes_through(module) and len(node.args) == 1 and not node.kwargs and \
                    isinstance(node.args[0], _NODES):
                through[node] = value(node.args[0])
                continue
            if not is_interesting(module):
                continue
            call = flow.add(Call(names[id(module)]))
            if node.args and isinstance(node.args[0], _NODES):
                call.in_ndim = rank.get(node.args[0])
            by_node[node] = call
            if len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], _NODES):
                src = by_node.get(value(node.args[0]))
                if src is not None:
                    call.src = src
        elif node.op == "get_attr":
            owner = node.target.rpartition(".")[0]
            module = modules.get(owner)
            if module is None:
                try:
                    module = model.get_submodule(owner)
                except AttributeError:
                    continue
            if is_interesting(module):
                flow.escaped.add(names[id(module)])
    for owner in tracer.read:  # a module's buffer read by the traced code
        if is_interesting(modules[owner]):
            flow.escaped.add(names[id(modules[owner])])

    def uses(node):
        """(user, the node it uses) of ``node``'s value, through pass-throughs."""
        for user in node.users:
            if user in through:
                yield from uses(user)
            else:
                yield user, node

    for node, call in by_node.items():
        for user, used in uses(node):
            for consumer in entry.get(user) or (by_node.get(user),):
                if isinstance(consumer, Call) and (consumer.src is call or (
                        isinstance(consumer, Cat) and call in consumer.parts)):
                    call.users.append(consumer)
                elif not _fx_shape_only(user, used):
                    call.users.append(OTHER)
    for node in tracer.nodes:  # users point forward, arguments back: free them now
        node.users = {}
    return flow


#: Modules whose eval-mode forward returns its input itself: nothing happens
#: between the modules on either side (a recorded run sees the same tensor).
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                 nn.AlphaDropout, nn.FeatureAlphaDropout)


def _passes_through(module) -> bool:
    return type(module) in _PASS_THROUGH and not module.training and \
        not module._forward_hooks and not module._forward_pre_hooks


def _fx_leading_flatten(node) -> bool:
    """``x.flatten(0, k)`` or ``torch.flatten(x, 0, k)`` with an explicit end
    (whether it leaves two dims is the plan's to prove, from the norm's rank)."""
    method = node.op == "call_method" and node.target == "flatten"
    function = node.op == "call_function" and node.target is torch.flatten
    if not (method or function) or not node.args or not isinstance(node.args[0], _NODES):
        return False
    args, kwargs = node.args, node.kwargs
    start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
    end = args[2] if len(args) > 2 else kwargs.get("end_dim")
    return start == 0 and isinstance(end, int) and end >= 1


def _fx_shape_only(user, node) -> bool:
    """A use of ``node`` that reads its shape, not its values: ``x.size()``,
    ``x.dim()``, ``x.shape``, or ``y.reshape_as(x)`` / ``y.view_as(x)``."""
    if user.op == "call_method":
        if user.target in ("size", "dim"):
            return user.args[:1] == (node,)
        if user.target in ("reshape_as", "view_as"):
            return len(user.args) == 2 and user.args[1] is node and user.args[0] is not node
        return False
    return user.op == "call_function" and user.target is getattr and \
        user.args[1:] == ("shape",)


def _fx_cat(node, by_node, value) -> Optional[Cat]:
    """A Cat for ``torch.cat(parts, 1)`` of distinct tracked calls' outputs, as
    the graph states it; None for any other concatenation."""
    args, kwargs = node.args, node.kwargs
    parts = args[0] if args else kwargs.get("tensors")
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if set(kwargs) - {"tensors", "dim"} or not isinstance(parts, (list, tuple)) or dim != 1:
        return None
    parts = [value(p) for p in parts]
    if len(parts) < 2 or not all(isinstance(p, _NODES) and p in by_node and
                                 not isinstance(by_node[p], (Cat, View)) for p in parts):
        return None
    if len(set(parts)) != len(parts):
        return None
    return Cat(CAT, parts=[by_node[p] for p in parts])


# --- A recorded run ----------------------------------------------------------


class _Recorder:
    def __init__(self, model):
        self.names = canonical_names(model)
        self.flow = Flow("recorded")
        self.stack: List[Call] = []
        self.entered: List[tuple] = []  # (module, its first argument), beside stack
        # id(tensor) -> (Call, weakref). The entry goes when the tensor dies, so
        # that an id reused by a later tensor is never mistaken for it, and the
        # run keeps no activation alive.
        self.origin: Dict[int, tuple] = {}
        self.owners: Dict[int, Set[str]] = {}  # id(param or buffer) -> module names
        self.thread = threading.get_ident()
        self.value_reads = 0
        self.shape_reads = 0
        self.internal = False  # inside the recorder's own hooks: not the model's reads
        for m in model.modules():
            if is_interesting(m):
                name = self.names[id(m)]
                for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
                    self.owners.setdefault(id(t), set()).add(name)

    def pre_hook(self, module, args):
        self.internal = True
        try:
            self._pre_hook(module, args)
        finally:
            self.internal = False

    def _pre_hook(self, module, args):
        call = Call(self.names[id(module)])
        self.flow.add(call)
        if len(args) == 1 and isinstance(args[0], torch.Tensor):
            x = args[0]
            call.in_ndim = x.dim()
            found = self._found(x)
            if found is not None:
                call.src = found
                found.users.append(call)
        self.stack.append(call)
        self.entered.append((module, args[0] if args else None))

    def _found(self, t) -> Optional[Call]:
        entry = self.origin.get(id(t))
        if entry is not None and entry[1]() is t:
            return entry[0]
        return None

    def post_hook(self, module, args, output):
        call = self.stack.pop()
        self.entered.pop()
        self.made(call, output)

    def cat_of(self, func, args, kwargs) -> Optional[Cat]:
        """A Cat for ``aten.cat(parts, 1)`` outside any tracked module, of the
        outputs of distinct tracked calls; None for any other op."""
        if func is not _ATEN_CAT or self.stack or threading.get_ident() != self.thread:
            return None
        parts = args[0] if args else kwargs.get("tensors")
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if not isinstance(parts, (list, tuple)) or len(parts) < 2:
            return None
        if not all(isinstance(t, torch.Tensor) for t in parts):
            return None
        if dim < 0:
            dim += parts[0].dim()
        calls = [self._found(t) for t in parts]
        if dim != 1 or any(c is None or isinstance(c, (Cat, View)) for c in calls) or \
                len({id(t) for t in parts}) != len(parts):
            return None
        return Cat(CAT, parts=calls)

    def view_of(self, func, args) -> Optional[View]:
        """A View for an aten view op outside any tracked module that turns a
        tracked call's output of rank >= 3 into (product of the leading dims,
        last dim); None for any other op."""
        if func not in _ATEN_VIEWS or self.stack or threading.get_ident() != self.thread:
            return None
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dim() < 3:
            return None
        src = self._found(x)
        if src is None or isinstance(src, (Cat, View)):
            return None
        return View(VIEW, src=src)

    def made(self, call: Call, output):
        """Records ``output`` as made by ``call`` (a module's, or a Cat)."""
        if isinstance(output, torch.Tensor):
            key = id(output)
            origin = self.origin
            origin[key] = (call, weakref.ref(output, lambda _, k=key: origin.pop(k, None)))

    def on_op(self, func, args, kwargs, cat: Optional[Call] = None):
        if threading.get_ident() != self.thread:
            return
        top = self.stack[-1] if self.stack else None
        if func in _VALUE_READS:
            self.value_reads += 1
        for t in tensors((args, kwargs)):
            call = self._found(t)
            if call is not None:
                if isinstance(cat, Cat) and call in cat.parts or \
                        isinstance(cat, View) and call is cat.src:
                    call.users.append(cat)
                elif top is None or not any(u is top for u in call.users):
                    call.users.append(OTHER)
            owners = self.owners.get(id(t))
            if owners is not None and (top is None or top.name not in owners):
                self.flow.escaped.update(owners)

    def finish(self, output):
        for t in tensors(output):
            call = self._found(t)
            if call is not None:
                call.users.append(OTHER)


_VALUE_READS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.is_nonzero.default,
}
_ATEN_CAT = torch.ops.aten.cat.default
# What x.flatten(0, k) / x.reshape(-1, c) dispatch to (torch 2: view; 1.13:
# _reshape_alias).
_ATEN_VIEWS = tuple(getattr(torch.ops.aten, n).default for n in
                    ("view", "_reshape_alias", "_unsafe_view", "reshape")
                    if hasattr(torch.ops.aten, n))


def _merges_leading(x, out) -> bool:
    """``out`` is ``x`` with its leading dims merged into one and its last kept."""
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or x.dim() < 3:
        return False
    lead = 1
    for d in x.shape[:-1]:
        lead *= d
    return tuple(out.shape) == (lead, x.shape[-1])


def _is_shape_read(func) -> bool:
    """``x.shape``, ``x.size()``, ``len(x)``, ``x.numel()``: what a forward
    reads to branch on sizes (not ``x.dim()``: a second run keeps the rank)."""
    if func is torch.Tensor.size or func is torch.Tensor.__len__ or \
            func is torch.Tensor.numel:
        return True
    return getattr(func, "__self__", None) is torch.Tensor.shape


def _misfit(module, x) -> Optional[str]:
    """How input ``x`` does not fit a layer's channels or dtype, or None."""
    if not (is_layer(module) and isinstance(x, torch.Tensor)):
        return None
    linear = isinstance(module, nn.Linear)
    want = module.in_features if linear else module.in_channels
    dim = -1 if linear else 1
    got = x.shape[dim] if x.dim() > (0 if linear else 1) else None
    dtype = module.weight.dtype
    if got == want and x.dtype == dtype:
        return None
    return (f"it takes {want} input {'features (last dim)' if linear else 'channels (dim 1)'}"
            f" of {dtype}, and got a tensor of shape {tuple(x.shape)} of {x.dtype}")


def _forward_error(name, module, x, exc) -> FusionError:
    """The forward failed inside ``module``: blame the inputs when they do not fit
    it, else the module's state."""
    misfit = _misfit(module, x)
    if misfit is not None:
        advice = (f"The example inputs do not fit this layer: {misfit}. Check that the "
                  f"model runs on these inputs: pass inputs of that shape and dtype.")
    else:
        advice = ("Check that the model runs on these inputs; if it does not, fix this "
                  "module's state (e.g. reload its state_dict) or the inputs.")
    return FusionError(f"{name}: the forward on example_inputs raised "
                       f"{type(exc).__name__} inside this module: {exc}. {advice}",
                       name, "example_inputs")


def flow_from_run(model, example_inputs):
    """Runs ``model(*example_inputs)`` once under a recorder.

    Returns ``(flow, output)``. The model must already be in the mode to record
    (eval); the run is under ``torch.no_grad()``.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    rec = _Recorder(model)

    class _Shapes(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if not rec.internal and threading.get_ident() == rec.thread and \
                    _is_shape_read(func):
                rec.shape_reads += 1
            return func(*args, **(kwargs or {}))

    class _Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            made = rec.cat_of(func, args, kwargs) or rec.view_of(func, args)
            rec.on_op(func, args, kwargs, made)
            output = func(*args, **kwargs)
            if isinstance(made, View) and not _merges_leading(args[0], output):
                made.src.users[-1] = OTHER  # any other view: a use like any other
                made = None
            if made is not None:
                rec.made(made, output)
            return output

    handles = []
    try:
        for m in model.modules():
            if is_interesting(m):
                handles.append(m.register_forward_pre_hook(rec.pre_hook))
                handles.append(m.register_forward_hook(rec.post_hook))
        try:
            with MODEL_LOCK, torch.no_grad(), _Shapes(), _Mode():
                output = model(*example_inputs)
        except Exception as exc:
            if not rec.stack:
                raise
            # Tracked modules are leaves: one still running is where it failed.
            module, x = rec.entered[-1]
            raise _forward_error(rec.stack[-1].name, module, x, exc) from exc
        rec.finish(output)
    finally:
        for h in handles:
            h.remove()
    rec.flow.value_reads = rec.value_reads
    rec.flow.shape_reads = rec.shape_reads
    rec.flow.uncalled = [rec.names[id(m)] for m in model.modules()
                         if is_interesting(m) and rec.names[id(m)] not in rec.flow.calls]
    if rec.value_reads:
        rec.flow.note = (
            f"the forward read tensor values into Python {rec.value_reads} times "
            f"(e.g. `if x.sum() > 0`); folds found by the recorded run hold for the "
            f"control flow these example inputs take"
        )
    return rec.flow, output


def _resized_tensor(t: torch.Tensor, batched: bool, spatial: bool) -> torch.Tensor:
    """``t`` at twice its spatial size where ``spatial`` (nearest-neighbour, so
    every size stays a multiple of what it was), with one more batch element
    where ``batched``."""
    from torch.nn import functional as F

    x = t if batched else t.unsqueeze(0)  # (N, C, *spatial), or one image (C, *spatial)
    if spatial and x.dim() >= 3:
        # nearest copies values, so float32 and back is exact (torch 1.13 has no
        # half interpolation on the CPU)
        x = F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(t.dtype)
    if not batched:
        return x.squeeze(0)
    return torch.cat([x, x[:1].flip(-1)], 0)


def resized_inputs(args, spatial=True):
    """The example inputs at another size, derived from them, for a second
    recorded run: each floating tensor of rank 3 to 5 at twice its spatial size
    (unless not ``spatial``) with one more batch element (a list of images: each
    image at twice its size). ``(inputs, shapes)``, or None where no input can
    be resized."""
    changed = []

    def one(t, batched):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and
                3 <= t.dim() <= 5) or (not batched and not spatial):
            return t
        out = _resized_tensor(t, batched, spatial)
        changed.append(tuple(out.shape))
        return out

    out = []
    for a in args:
        if isinstance(a, (list, tuple)) and a and all(isinstance(t, torch.Tensor) and
                                                      t.dim() == 3 for t in a):
            out.append(type(a)(one(t, False) for t in a))  # a list of images
        else:
            out.append(one(a, True))
    return (tuple(out), changed) if changed else None


# --- nn.Sequential adjacency ---------------------------------------------------


def flow_from_sequentials(model) -> Flow:
    """Pairs of adjacent children inside plain ``nn.Sequential`` containers.

    Each module gets one call per name it is reachable under, so that a module
    reachable twice (and so possibly called twice) is never proven."""
    names = canonical_names(model)
    aliases = alias_names(model)
    flow = Flow("sequential")
    pending: Dict[str, Call] = {}
    for m in model.modules():
        if not (isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward
                and not own_forward(m)):
            continue
        children = [c for c in m._modules.values() if c is not None]
        for a, b in zip(children, children[1:]):
            flow.placed.add(names[id(b)])
            if not (is_interesting(a) and is_interesting(b)):
                continue
            ca = pending.get(names[id(a)]) or flow.add(Call(names[id(a)]))
            cb = pending.get(names[id(b)]) or flow.add(Call(names[id(b)]))
            pending[ca.name], pending[cb.name] = ca, cb
            cb.src = ca
            ca.users.append(cb)
    for m in model.modules():
        name = names[id(m)]
        if name in pending:
            for _ in aliases[id(m)][1:]:
                flow.add(Call(name, users=[OTHER]))
    return flow
