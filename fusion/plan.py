"""Deciding, from the evidence, which norms fold into which layers.

Every norm module in the model ends up in exactly one place: a :class:`Fold`,
or :class:`Left` with a reason code from :data:`REASONS`. Nothing here writes
to the model.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .discover import OTHER, Call, Cat, Flow, View
from .errors import FusionError
from .layers import (
    ModuleIndex,
    compose,
    describe,
    has_hooks,
    in_channels,
    is_layer,
    is_norm_module,
    layer_kind,
    norm_params,
    norm_remainder,
    norm_spec,
    out_channels,
    own_forward,
    plain_layer_kind,
    uses_batch_statistics,
)

__all__ = ["REASONS"]

#: How reports name a model that is itself a norm (its qualified name is "").
ROOT = "(model)"

#: Why a norm is left unfused. Each code is documented in the README.
REASONS = {
    "not_after_producer": "its input is not the output of a conv or linear layer, "
    "and it does not feed one directly either",
    "producer_output_reused": "the layer's output is also used elsewhere (a residual, "
    "a returned value, an in-place op)",
    "called_twice": "the norm or its layer runs more than once per forward",
    "not_called": "the forward never calls it",
    "batch_statistics": "it normalises with batch statistics (track_running_stats=False)",
    "has_hooks": "the norm or its layer has hooks or a parametrization",
    "params_used_elsewhere": "the forward reads its parameters or buffers outside "
    "its own call",
    "unknown_norm": "its class is not a known norm (a subclass with its own forward, "
    "InstanceNorm); see fusion.register_norm",
    "unsupported_layer": "the layer it meets is not a plain Conv/ConvTranspose/Linear "
    "(or, for a norm before it, is not a plain Conv/Linear)",
    "needs_example_inputs": "there is no proof of the data flow without a recorded run; "
    "pass example_inputs",
    "zero_padding": "it runs before a conv that pads with zeros, so folding would "
    "change the padded border",
    "overflow": "a fused value would not fit the dtype",
    "evidence_disagrees": "torch.fx and the recorded run disagree about its input",
    "value_dependent_flow": "the forward branches on tensor values and the recorded "
    "run left some layers or norms uncalled, so another input may take a path where "
    "the fold is wrong",
    "shape_dependent_flow": "only a recorded run proves it, the forward reads input "
    "sizes, and a run at another size disagrees or could not be made",
}


@dataclass
class Fold:
    """One layer and the norms folded into it."""

    layer: str
    after: Optional[str] = None  # the norm that follows the layer
    before: Optional[str] = None  # the norm that precedes it
    # Chains: the norms after ``after``, in order, and those applied before
    # ``before``, in order (x -> before_more... -> before -> layer).
    after_more: List[str] = field(default_factory=list)
    before_more: List[str] = field(default_factory=list)
    # The channels of ``after`` that this layer's output is, where the norm
    # follows a torch.cat of several layers' outputs; None for all of them.
    after_channels: Optional[Tuple[int, int]] = None
    evidence: str = ""
    untie: bool = False  # the layer's weight is shared: give it its own
    bias_added: bool = False

    def norms(self) -> List[str]:
        return self.before_norms() + self.after_norms()

    def before_norms(self) -> List[str]:
        """The norms before the layer, in the order the forward applies them."""
        return self.before_more + [self.before] if self.before is not None else []

    def after_norms(self) -> List[str]:
        return [self.after] + self.after_more if self.after is not None else []

    def after_map(self, norms: Dict[str, nn.Module]):
        """The NormParams that fold into this layer's output: the norm after it
        (its slice of the channels where it follows a torch.cat), or the chain
        of norms after it composed into one. ``norms``: modules by name."""
        maps = [norm_params(norms[n]) for n in self.after_norms()]
        if self.after_channels is not None:
            maps = [m.channels(*self.after_channels) for m in maps]
        return compose(maps)

    def before_map(self, norms: Dict[str, nn.Module]):
        """The NormParams that fold into this layer's input (a chain composed)."""
        return compose([norm_params(norms[n]) for n in self.before_norms()])


@dataclass
class Left:
    norm: str
    reason: str
    detail: str


@dataclass(frozen=True)
class Reason:
    """Why a norm is left: a code from :data:`REASONS` and the specifics."""

    code: str
    detail: str


@dataclass(frozen=True)
class Decision:
    """What one flow proves about one norm: it folds ``"after"`` each of
    ``layers``, or ``"before"`` the one layer in ``layers``, or it is left, and
    ``reason`` says why."""

    direction: Optional[str] = None
    layers: Tuple[str, ...] = ()
    reason: Optional[Reason] = None
    # After a torch.cat: each layer's channels of the norm, in ``layers`` order.
    channels: Optional[Tuple[Tuple[int, int], ...]] = None
    # A chain: the norms between this one and its layer, from the layer's side
    # ("after": layer -> via... -> norm; "before": norm -> via... -> layer).
    via: Tuple[str, ...] = ()

    def __str__(self):
        if self.reason is not None:
            return f"left ({self.reason.code})"
        through = f" through {', '.join(self.via)}" if self.via else ""
        return f"folds {self.direction} {', '.join(self.layers)}{through}"


def _left(code, detail) -> Decision:
    return Decision(reason=Reason(code, detail))


@dataclass
class Plan:
    folds: List[Fold] = field(default_factory=list)
    left: List[Left] = field(default_factory=list)
    evidence: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


# --- What one flow proves --------------------------------------------------------


def _uncalled(flow: Flow, norm: str) -> Decision:
    if flow.source == "sequential":
        if norm in flow.placed:
            return _left("not_after_producer", "inside an nn.Sequential, the module "
                         "before it is not a conv or linear layer")
        return _left("needs_example_inputs",
                     f"torch.fx could not trace the model ({flow.note}), and it is not "
                     f"inside a plain nn.Sequential; pass example_inputs to record the "
                     f"data flow")
    where = "the recorded run on example_inputs" if flow.source == "recorded" else \
        "the traced forward"
    return _left("not_called", f"{where} never calls it")


def _producer_reason(flow: Flow, call: Call, modules) -> Optional[Reason]:
    """Rules 5-7 for one call of a norm after a layer: its input is the sole
    output of one call of a plain layer that runs once."""
    src = call.src
    if src is None:
        return Reason("not_after_producer",
                      "its input is not the direct output of a conv or linear layer")
    if isinstance(src, Cat):
        return _cat_reason(flow, call, src, modules)
    if isinstance(src, View):
        return _view_reason(flow, call, src, modules)
    layer = modules[src.name]
    if layer_kind(layer) is None:
        own = ", whose forward is set on the module itself" if own_forward(layer) else ""
        return Reason("unsupported_layer" if is_layer(layer) else "not_after_producer",
                      f"its input comes from {src.name} ({type(layer).__name__}{own})")
    if flow.count(src.name) > 1:
        return Reason("called_twice",
                      f"its layer {src.name} is called {flow.count(src.name)} times")
    if any(u is not call for u in src.users):
        return Reason("producer_output_reused",
                      f"the output of {src.name} is also used elsewhere")
    return None


def _view_reason(flow: Flow, call: Call, view: View, modules) -> Optional[Reason]:
    """Rule 6c: a norm after a view that merges a Linear's leading dims and
    keeps its last (``linear(x).flatten(0, 1)``, LeViT) folds into the Linear
    when the Linear runs once, the view is its output's one use, and the norm
    the view's (the norm's input being 2-D is rule 8's)."""
    lin = view.src
    layer = modules[lin.name]
    if layer_kind(layer) != "linear":
        return Reason("not_after_producer", f"its input is a flatten of the output of "
                      f"{lin.name} ({type(layer).__name__}); only a Linear's leading dims "
                      f"may be merged before its norm")
    if flow.count(lin.name) > 1:
        return Reason("called_twice",
                      f"its layer {lin.name} is called {flow.count(lin.name)} times")
    if len(lin.users) != 1 or lin.users[0] is not view:
        return Reason("producer_output_reused",
                      f"the output of {lin.name} is also used elsewhere")
    if any(u is not call for u in view.users):
        return Reason("producer_output_reused", f"the flattened output of {lin.name} is "
                      f"also used elsewhere")
    return None


def _cat_reason(flow: Flow, call: Call, cat: Cat, modules) -> Optional[Reason]:
    """Rule 6b: a norm after ``torch.cat`` along dim 1 folds into each part's
    layer when every part is the sole output of a conv that runs once, no part
    is given twice, and the concatenation goes to this norm alone."""
    names = [p.name for p in cat.parts]
    shown = ", ".join(names)
    for part in cat.parts:
        layer = modules[part.name]
        if layer_kind(layer) not in ("conv", "conv_transpose"):
            code = "unsupported_layer" if is_layer(layer) and layer_kind(layer) is None \
                else "not_after_producer"
            return Reason(code, f"its input is a torch.cat of {shown}, and {part.name} "
                          f"({type(layer).__name__}) is not a conv, whose channels are "
                          f"dim 1")
        if flow.count(part.name) > 1:
            return Reason("called_twice", f"its input is a torch.cat of {shown}, and "
                          f"{part.name} is called {flow.count(part.name)} times")
        if len(part.users) != 1 or part.users[0] is not cat:
            return Reason("producer_output_reused", f"its input is a torch.cat of "
                          f"{shown}, and the output of {part.name} is also used "
                          f"elsewhere")
    if len(set(names)) != len(names):
        return Reason("called_twice", f"its input is a torch.cat that takes the same "
                      f"layer's output more than once ({shown})")
    if any(u is not call for u in cat.users):
        return Reason("producer_output_reused", f"the torch.cat of {shown} that it "
                      f"normalises is also used elsewhere")
    return None


def _cat_channels(norm: str, cat: Cat, modules, c: int) -> Tuple[Tuple[int, int], ...]:
    """Each part's channels of the norm after a cat, or FusionError where they
    do not add up to the norm's."""
    out, start = [], 0
    for part in cat.parts:
        n = out_channels(modules[part.name])
        out.append((start, start + n))
        start += n
    if start != c:
        raise FusionError(
            f"{norm}: has {c} channels but the torch.cat of "
            f"{', '.join(p.name for p in cat.parts)} before it gives {start}, so the "
            f"model cannot run as built. Fix num_features of {norm} (or the layers) and "
            f"reload the weights.", norm, "shape")
    return tuple(out)


def _chain_back(flow: Flow, call: Call, modules):
    """``(call, via)`` for a norm whose input is the sole output of another
    norm (Conv -> BN -> BN): the call that feeds the first norm of the chain,
    and the norms between it and ``call``, from the layer's side. Each norm in
    between is known, has no remainder, runs once and feeds the next alone."""
    via = []
    cur = call
    while cur.src is not None and not isinstance(cur.src, (Cat, View)):
        prev = cur.src
        module = modules[prev.name]
        if not is_norm_module(module) or norm_spec(module) is None:
            break
        if norm_remainder(module) is not None or flow.count(prev.name) != 1 or \
                len(prev.users) != 1 or prev.users[0] is not cur:
            break
        via.insert(0, prev.name)
        cur = prev
    return cur, tuple(via)


def _after(flow: Flow, calls: List[Call], modules, norm: str) -> Decision:
    """The norm folds after the layer of each of its calls, or why not."""
    if len(calls) == 1 and calls[0].src is not None and \
            not isinstance(calls[0].src, (Cat, View)) and \
            is_norm_module(modules[calls[0].src.name]):
        head, via = _chain_back(flow, calls[0], modules)
        if via and _producer_reason(flow, head, modules) is None and \
                not isinstance(head.src, (Cat, View)):
            return Decision("after", (head.src.name,), via=via)
    for call in calls:
        reason = _producer_reason(flow, call, modules)
        if reason is not None:
            return Decision(reason=reason)
    cats = [c.src for c in calls if isinstance(c.src, Cat)]
    if cats:
        if len(calls) > 1:
            return _left("called_twice", f"it is called {len(calls)} times, after a "
                         f"torch.cat")
        c = norm_params(modules[norm]).running_mean
        c = c.numel() if c is not None else 0
        return Decision("after", tuple(p.name for p in cats[0].parts),
                        channels=_cat_channels(norm, cats[0], modules, c))
    layers = tuple((c.src.src if isinstance(c.src, View) else c.src).name for c in calls)
    if len(set(layers)) != len(layers):
        return _left("called_twice", f"it follows {layers[0]} more than once")
    return Decision("after", layers)


def _before(flow: Flow, calls: List[Call], modules, norm: str) -> Optional[Decision]:
    """The norm folds into the one layer call it directly and alone feeds; None
    when it feeds no such call."""
    if len(calls) != 1 or len(calls[0].users) != 1 or calls[0].users[0] is OTHER:
        return None
    via = []
    cur, user = calls[0], calls[0].users[0]
    # A chain (BN -> BN -> Conv): through norms that run once, have no
    # remainder, and feed the next alone.
    while not isinstance(user, (Cat, View)) and user is not OTHER and user.src is cur and \
            is_norm_module(modules[user.name]) and norm_spec(modules[user.name]) is not None \
            and norm_remainder(modules[user.name]) is None and flow.count(user.name) == 1 \
            and len(user.users) == 1:
        via.append(user.name)
        cur, user = user, user.users[0]
    if user is OTHER or isinstance(user, (Cat, View)) or user.src is not cur or \
            not is_layer(modules[user.name]):
        return None
    layer = modules[user.name]
    if plain_layer_kind(layer) not in ("conv", "linear"):
        return _left("unsupported_layer", f"it feeds {user.name} "
                     f"({type(layer).__name__}), which a preceding norm does not fold into")
    rest = norm_remainder(modules[norm])
    if rest is not None:
        return _left("not_after_producer", f"it feeds {user.name}, but its "
                     f"{describe(rest)} runs in between, so it cannot fold into "
                     f"that layer's input")
    if flow.count(user.name) > 1:
        return _left("called_twice", f"the layer it feeds, {user.name}, is called "
                     f"{flow.count(user.name)} times")
    return Decision("before", (user.name,), via=tuple(via))


def decide(flow: Flow, norm: str, modules) -> Decision:
    """What ``flow`` proves about ``norm``: after its layers, before one, or left."""
    calls = flow.calls.get(norm, [])
    if not calls:
        return _uncalled(flow, norm)
    after = _after(flow, calls, modules, norm)
    if after.reason is None:
        return after
    before = _before(flow, calls, modules, norm)
    if before is not None:
        return before
    if len(calls) > 1 and after.reason.code != "called_twice":
        return _left("called_twice",
                     f"it is called {len(calls)} times, not each after its own layer")
    return after


# --- Checks on modules and tensors -------------------------------------------


def check_tensor(layer: str, what: str, t: Optional[torch.Tensor]):
    """Raises FusionError for a tensor the core cannot fold."""
    if t is None:
        return
    if t.is_sparse or t.layout != torch.strided:
        raise FusionError(
            f"{layer}: {what} is a sparse tensor ({t.layout}); fusion folds dense "
            f"weights. Convert it with .to_dense() first.", layer, "sparse")
    if t.is_quantized:
        raise FusionError(
            f"{layer}: {what} is quantized ({t.dtype}); fuse the float model before "
            f"quantizing it.", layer, "quantized")
    if type(t) not in (torch.Tensor, nn.Parameter):
        raise FusionError(
            f"{layer}: {what} is a {type(t).__name__}, not a plain tensor (one made "
            f"under a FakeTensorMode, or another tensor subclass), so it has no values "
            f"fusion can fold or write. Build the model outside that mode, with real "
            f"weights, then fuse it.", layer, "tensor_subclass")
    if t.device.type == "meta":
        raise FusionError(
            f"{layer}: {what} is on the meta device and has no values to fold. "
            f"Load real weights first (e.g. model.to_empty(device='cpu') and "
            f"load_state_dict).", layer, "meta")
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise FusionError(
            f"{layer}: {what} has dtype {t.dtype}; fusion folds float16, bfloat16, "
            f"float32 and float64 weights.", layer, "dtype")
    if t.numel() == 0:
        raise FusionError(
            f"{layer}: {what} is empty (shape {tuple(t.shape)}); a zero-size layer "
            f"cannot be folded. Remove the layer or give it channels.", layer, "empty")


def _check_norm_tensors(name, module):
    p = norm_params(module)
    c = p.running_mean.numel() if p.running_mean is not None else 0
    for what, t in (("running_mean", p.running_mean), ("running_var", p.running_var),
                    ("weight", p.weight), ("bias", p.bias)):
        check_tensor(name, what, t)
        if t is not None and (t.dim() != 1 or t.numel() != c):
            raise FusionError(
                f"{name}: {what} has shape {tuple(t.shape)} but running_mean has {c} "
                f"elements; the norm's state is inconsistent. Reload its state_dict.",
                name, "shape")
    return p, c


def check_pair(layer_name, layer, norm_name, norm, direction, channels=None):
    """Checks a pair's tensors and that their channels match (``channels``: the
    norm's slice that this layer's output is, after a torch.cat)."""
    for what, t in (("weight", layer.weight), ("bias", layer.bias)):
        check_tensor(layer_name, what, t)
    _, c = _check_norm_tensors(norm_name, norm)
    if channels is not None:
        c = channels[1] - channels[0]
    want = out_channels(layer) if direction == "after" else in_channels(layer)
    if c != want:
        side = "output" if direction == "after" else "input"
        raise FusionError(
            f"{norm_name}: has {c} channels but {layer_name} has {want} {side} channels, "
            f"so the model cannot run as built. Fix num_features of {norm_name} "
            f"(or the layer) and reload the weights.", norm_name, "shape")


def _shares_storage(modules) -> Dict[int, int]:
    """id(tensor) -> how many module parameter slots use the same storage."""
    counts: Dict[Tuple, int] = {}
    key_of = {}
    for m in modules:
        for t in m._parameters.values():
            if t is None:
                continue
            if t.device.type == "meta" or t.is_sparse or t.is_quantized:
                key = ("id", id(t))
            else:  # the storage's address, without making a storage object
                key = (t.device.type, t.data_ptr() - t.storage_offset() * t.element_size())
            counts[key] = counts.get(key, 0) + 1
            key_of[id(t)] = key
    return {i: counts[k] for i, k in key_of.items()}


def _self_overlapping(t) -> bool:
    """An expanded tensor (a stride of 0) reaches one element from several
    indices: writing a fold into it would scale that element several times."""
    return any(stride == 0 and size > 1 for stride, size in zip(t.stride(), t.shape))


def _zero_shift(params) -> bool:
    mean = params.running_mean.double()
    s = torch.rsqrt(params.running_var.double() + params.eps)
    if params.weight is not None:
        s = s * params.weight.double()
    beta = params.bias.double() if params.bias is not None else torch.zeros_like(mean)
    return bool(torch.all(beta - mean * s == 0))


def _before_exact(layer, params) -> Optional[str]:
    """None when folding a norm into this layer's input is exact, else why not."""
    if isinstance(layer, nn.Linear):
        return None
    padding = layer.padding
    if isinstance(padding, str):
        pads = padding != "valid"
    else:
        pads = any(p != 0 for p in padding)
    if not pads or layer.padding_mode != "zeros":
        return None
    if _zero_shift(params):
        return None
    return (f"it runs before {type(layer).__name__} with padding={layer.padding} and "
            f"padding_mode='zeros'; the zero border would no longer be zero after the "
            f"fold")


# --- The evidence rules, in the README's order -------------------------------------
# Each takes what it needs and returns a Reason to leave the norm, or None. The
# README's rules 1-4 for the norm (NORM_RULES), 5-7 from the flows (decide), 3,
# 4 and 8 for its layer (PAIR_RULES); 9 (untie) is a property of the Fold and 10
# (finite values) the C core's check in rewrite.prepare.


@dataclass
class _Context:
    """What every rule may consult: the model's modules by canonical name, the
    flows, and facts derived from them once."""

    modules: Dict[str, nn.Module]
    flows: List[Flow]
    recorded: Optional[Flow]
    escaped: set
    branchy: bool
    shared: Dict[int, int]


def _rule_known_norm(name, norm, ctx) -> Optional[Reason]:
    if own_forward(norm):
        return Reason("unknown_norm", "its forward is set on the module itself (m.forward "
                      "= ...), so its class does not say what it computes")
    if norm_spec(norm) is None:
        return Reason("unknown_norm", f"{type(norm).__name__} is not a known norm; "
                      f"register it with fusion.register_norm if its eval forward is a "
                      f"per-channel affine map")
    return None


def _rule_running_stats(name, norm, ctx) -> Optional[Reason]:
    if uses_batch_statistics(norm):
        return Reason("batch_statistics",
                      "it has no running statistics (track_running_stats=False)")
    return None


def _rule_no_hooks(name, norm, ctx) -> Optional[Reason]:
    hook = has_hooks(norm)
    return Reason("has_hooks", f"it has a {hook}") if hook else None


def _rule_params_own(name, norm, ctx) -> Optional[Reason]:
    if name in ctx.escaped:
        return Reason("params_used_elsewhere",
                      "the forward reads its parameters or buffers outside its own call")
    return None


def _rule_evidence(name, norm, ctx) -> Optional[Reason]:
    return None if ctx.flows else Reason("needs_example_inputs",
                                         "no evidence of the data flow")


NORM_RULES = [_rule_known_norm, _rule_running_stats, _rule_no_hooks, _rule_params_own,
              _rule_evidence]


def _agreed(name, ctx) -> Decision:
    """The one decision every flow agrees on (rules 5-7), or why there is none."""
    decisions = [decide(f, name, ctx.modules) for f in ctx.flows]
    resized = [(f, d) for f, d in zip(ctx.flows, decisions) if f.resized]
    if resized and any(d != decisions[0] for _, d in resized):
        shown = "; ".join(f"{f.label or f.source}: {d}" for f, d in zip(ctx.flows, decisions)
                          if f.source == "recorded")
        return _left("shape_dependent_flow", f"the forward reads input sizes and the "
                     f"recorded runs at two sizes disagree ({shown}), so the fold holds "
                     f"for some input sizes only")
    left = next((d for d in decisions if d.reason is not None), None)
    if left is not None:
        return left
    unchecked = next((f.shapes_unchecked for f in ctx.flows if f.shapes_unchecked), None)
    if unchecked is not None:
        return _left("shape_dependent_flow", unchecked)
    if any(d != decisions[0] for d in decisions[1:]):
        shown = "; ".join(f"{f.source}: {d}" for f, d in zip(ctx.flows, decisions))
        return _left("evidence_disagrees", f"torch.fx and the recorded run disagree "
                     f"({shown})")
    if ctx.branchy:
        uncalled = ctx.recorded.uncalled
        shown = ", ".join(uncalled[:3]) + (" ..." if len(uncalled) > 3 else "")
        return _left("value_dependent_flow",
                     f"the forward branches on tensor values and the recorded run never "
                     f"called {shown}; make the model traceable by torch.fx, or fold "
                     f"known pairs with fuse_conv_and_bn")
    return decisions[0]


def _rule_layer_hooks(name, layer_name, decision, ctx) -> Optional[Reason]:
    hook = has_hooks(ctx.modules[layer_name])
    return Reason("has_hooks", f"its layer {layer_name} has a {hook}") if hook else None


def _rule_layer_params_own(name, layer_name, decision, ctx) -> Optional[Reason]:
    if layer_name in ctx.escaped:
        return Reason("params_used_elsewhere", f"the forward reads the parameters of "
                      f"{layer_name} outside its own call")
    return None


def _rule_linear_rank(name, layer_name, decision, ctx) -> Optional[Reason]:
    """BatchNorm normalises dim 1, Linear acts on the last dim: the same dim only
    for 2-D input, shown by a recorded run, or proven by rank propagation through
    the fx graph (a flatten, a view to two sizes, a Linear on 2-D input)."""
    if not isinstance(ctx.modules[layer_name], nn.Linear):
        return None
    source = ctx.recorded
    if source is None:
        fx_flow = next((f for f in ctx.flows if f.source == "fx"), None)
        calls = fx_flow.calls.get(name, []) if fx_flow is not None else []
        if calls and all(c.in_ndim == 2 for c in calls):
            return None
        return Reason("needs_example_inputs", f"Linear {layer_name} with BatchNorm folds "
                      f"only when its input is shown to be 2-D, by a recorded run or by "
                      f"the fx graph (a flatten or view before it); pass example_inputs")
    dims = sorted({c.in_ndim for c in source.calls.get(name, [])})
    if any(d != 2 for d in dims):
        code = "not_after_producer" if decision.direction == "after" else \
            "unsupported_layer"
        return Reason(code, f"its input is {dims[0]}-D, so its channel dim is not the "
                      f"dim {layer_name} works on")
    return None


PAIR_RULES = [_rule_layer_hooks, _rule_layer_params_own, _rule_linear_rank]


def _rule_one_norm_before(name, decision, by_layer) -> Optional[Reason]:
    existing = by_layer.get(decision.layers[0])
    if decision.direction == "before" and not decision.via and existing is not None and \
            existing.before is not None:
        return Reason("called_twice", f"{decision.layers[0]} already folds another norm")
    return None


def _rule_exact_before(name, norm, decision, ctx) -> Optional[Reason]:
    """Checks the pairs' tensors (raising for a broken model), then that a norm
    (or the chain from it) folded into a layer's input is exact there."""
    for i, layer_name in enumerate(decision.layers):
        check_pair(layer_name, ctx.modules[layer_name], name, norm, decision.direction,
                   decision.channels[i] if decision.channels else None)
    if decision.direction != "before":
        return None
    chain = [norm] + [ctx.modules[v] for v in decision.via]
    why = _before_exact(ctx.modules[decision.layers[0]],
                        compose([norm_params(m) for m in chain]))
    return Reason("zero_padding", why) if why else None


# --- The plan ----------------------------------------------------------------


def _context(index: ModuleIndex, flows: List[Flow]) -> _Context:
    recorded = next((f for f in flows if f.source == "recorded"), None)
    fx_proven = any(f.source == "fx" for f in flows)
    branchy = recorded is not None and not fx_proven and recorded.value_reads > 0 \
        and bool(recorded.uncalled)
    return _Context(index.modules, flows, recorded,
                    set().union(*(f.escaped for f in flows)) if flows else set(),
                    branchy, _shares_storage(index.modules.values()))


def _reason(name, norm, ctx) -> Union[Reason, Decision]:
    """Applies every rule to one norm: the first Reason to leave it, or the
    Decision to fold it."""
    for rule in NORM_RULES:
        reason = rule(name, norm, ctx)
        if reason is not None:
            return reason
    decision = _agreed(name, ctx)
    if decision.reason is not None:
        return decision.reason
    for layer_name in decision.layers:
        for rule in PAIR_RULES:
            reason = rule(name, layer_name, decision, ctx)
            if reason is not None:
                return reason
    return _rule_exact_before(name, norm, decision, ctx) or decision


def _broken_chains(outcomes: Dict[str, Union[Reason, Decision]]):
    """A norm that folds through others (a chain) is left where one of them is
    left, or folds elsewhere; repeated until nothing changes."""
    changed = True
    while changed:
        changed = False
        for name, outcome in outcomes.items():
            if isinstance(outcome, Reason) or not outcome.via:
                continue
            for v in outcome.via:
                other = outcomes.get(v)
                if isinstance(other, Decision) and other.direction == outcome.direction \
                        and other.layers == outcome.layers:
                    continue
                why = other.code if isinstance(other, Reason) else "it folds elsewhere"
                where = "its input is the output of" if outcome.direction == "after" \
                    else "it feeds"
                outcomes[name] = Reason("not_after_producer", f"{where} the norm {v}, which "
                                        f"is left ({why}), so it cannot fold into "
                                        f"{outcome.layers[0]} through it")
                changed = True
                break


def _add_fold(name, decision, ctx, by_layer, evidence):
    for i, layer_name in enumerate(decision.layers):
        fold = by_layer.get(layer_name)
        if fold is None:
            layer = ctx.modules[layer_name]
            fold = by_layer[layer_name] = Fold(layer_name, evidence=evidence)
            fold.untie = any(ctx.shared.get(id(t), 1) > 1 or _self_overlapping(t)
                             for t in (layer.weight, layer.bias) if t is not None)
            fold.bias_added = layer.bias is None
        if decision.direction == "after" and not decision.via:
            fold.after = name
            fold.after_channels = decision.channels[i] if decision.channels else None
        elif decision.direction == "after":
            fold.after_more.append(name)
        elif not decision.via:
            fold.before = name
        else:
            fold.before_more.append(name)


def _chain_order(fold: Fold, outcomes):
    """Puts a fold's chain norms in the order the forward applies them."""
    fold.after_more.sort(key=lambda n: len(outcomes[n].via))
    fold.before_more.sort(key=lambda n: -len(outcomes[n].via))


def make_plan(model, flows: List[Flow], index: Optional[ModuleIndex] = None) -> Plan:
    """Decides every norm of ``model`` from the given flows (all must agree).
    ``index``: the model's :class:`ModuleIndex`, if the caller has one."""
    ctx = _context(index or ModuleIndex(model), flows)
    plan = Plan(evidence=list(dict.fromkeys(f.source for f in flows)),
                notes=list(dict.fromkeys(f.note for f in flows
                                         if f.note and f.source == "recorded")))
    outcomes: Dict[str, Union[Reason, Decision]] = {}
    for name, module in ctx.modules.items():
        if not is_norm_module(module):
            continue
        if name == "":
            plan.left.append(Left(ROOT, "not_after_producer", "the model is this norm "
                                  "alone: there is no layer to fold it into"))
            continue
        outcomes[name] = _reason(name, module, ctx)
    _broken_chains(outcomes)
    by_layer: Dict[str, Fold] = {}
    for name, outcome in outcomes.items():
        if isinstance(outcome, Decision):
            outcome = _rule_one_norm_before(name, outcome, by_layer) or outcome
        if isinstance(outcome, Reason):
            plan.left.append(Left(name, outcome.code, outcome.detail))
        else:
            _add_fold(name, outcome, ctx, by_layer, "+".join(plan.evidence))
    for fold in by_layer.values():
        _chain_order(fold, outcomes)
    # Keep the order of the model.
    order = {n: i for i, n in enumerate(ctx.modules)}
    plan.folds = sorted(by_layer.values(), key=lambda f: order[f.layer])
    return plan
