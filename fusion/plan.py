"""Deciding, from the evidence, which norms fold into which layers.

Every norm module in the model ends up in exactly one place: a :class:`Fold`,
or :class:`Left` with a reason code from :data:`REASONS`. Nothing here writes
to the model.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .discover import OTHER, Flow, canonical_names
from .errors import FusionError
from .layers import (
    has_hooks,
    in_channels,
    is_norm_module,
    layer_kind,
    norm_adapter,
    out_channels,
    uses_batch_statistics,
)

__all__ = ["REASONS"]

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
    "unsupported_layer": "the layer it meets is not a plain Conv/ConvTranspose/Linear",
    "needs_example_inputs": "there is no proof of the data flow without a recorded run; "
    "pass example_inputs",
    "zero_padding": "it runs before a conv that pads with zeros, so folding would "
    "change the padded border",
    "overflow": "a fused value would not fit the dtype",
    "evidence_disagrees": "torch.fx and the recorded run disagree about its input",
    "value_dependent_flow": "the forward branches on tensor values and the recorded "
    "run left some layers or norms uncalled, so another input may take a path where "
    "the fold is wrong",
}


@dataclass
class Fold:
    """One layer and the norms folded into it."""

    layer: str
    after: Optional[str] = None  # the norm that follows the layer
    before: Optional[str] = None  # the norm that precedes it
    evidence: str = ""
    untie: bool = False  # the layer's weight is shared: give it its own
    bias_added: bool = False

    def norms(self) -> List[str]:
        return [n for n in (self.before, self.after) if n is not None]


@dataclass
class Left:
    norm: str
    reason: str
    detail: str


@dataclass
class Plan:
    folds: List[Fold] = field(default_factory=list)
    left: List[Left] = field(default_factory=list)
    evidence: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


# --- Per-flow decisions ------------------------------------------------------


def _decide(flow: Flow, norm: str, modules) -> Tuple:
    """``("after", [layers])``, ``("before", layer)`` or ``("left", reason, detail)``."""
    calls = flow.calls.get(norm, [])
    if not calls:
        if flow.source == "sequential":
            if norm in flow.placed:
                return ("left", "not_after_producer",
                        "inside an nn.Sequential, the module before it is not a "
                        "conv or linear layer")
            return ("left", "needs_example_inputs",
                    f"torch.fx could not trace the model ({flow.note}), and it is not "
                    f"inside a plain nn.Sequential; pass example_inputs to record "
                    f"the data flow")
        where = "the recorded run on example_inputs" if flow.source == "recorded" else \
            "the traced forward"
        return ("left", "not_called", f"{where} never calls it")

    after_reason = None
    layers = []
    for call in calls:
        src = call.src
        if src is None:
            after_reason = ("not_after_producer",
                            "its input is not the direct output of a conv or linear layer")
            break
        if layer_kind(modules[src.name]) is None:
            after_reason = ("unsupported_layer" if isinstance(
                modules[src.name], (nn.Linear, nn.modules.conv._ConvNd)) else
                "not_after_producer",
                f"its input comes from {src.name} ({type(modules[src.name]).__name__})")
            break
        if flow.count(src.name) > 1:
            after_reason = ("called_twice",
                            f"its layer {src.name} is called {flow.count(src.name)} times")
            break
        if any(u is not call for u in src.users):
            after_reason = ("producer_output_reused",
                            f"the output of {src.name} is also used elsewhere")
            break
        layers.append(src.name)
    if after_reason is None:
        if len(set(layers)) != len(layers):
            after_reason = ("called_twice", f"it follows {layers[0]} more than once")
        else:
            return ("after", layers)

    # A norm that directly feeds exactly one layer call may fold forward into it.
    if len(calls) == 1 and len(calls[0].users) == 1 and calls[0].users[0] is not OTHER:
        user = calls[0].users[0]
        if user.src is calls[0] and is_layer(modules[user.name]):
            if layer_kind(modules[user.name]) not in ("conv", "linear"):
                return ("left", "unsupported_layer",
                        f"it feeds {user.name} ({type(modules[user.name]).__name__}), "
                        f"which a preceding norm does not fold into")
            if flow.count(user.name) > 1:
                return ("left", "called_twice",
                        f"the layer it feeds, {user.name}, is called "
                        f"{flow.count(user.name)} times")
            return ("before", user.name)
    if len(calls) > 1 and after_reason[0] != "called_twice":
        return ("left", "called_twice",
                f"it is called {len(calls)} times, not each after its own layer")
    return ("left",) + after_reason


def is_layer(module) -> bool:
    return isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))


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
    p = norm_adapter(module)(module)
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


def check_pair(layer_name, layer, norm_name, norm, direction):
    for what, t in (("weight", layer.weight), ("bias", layer.bias)):
        check_tensor(layer_name, what, t)
    _, c = _check_norm_tensors(norm_name, norm)
    want = out_channels(layer) if direction == "after" else in_channels(layer)
    if c != want:
        side = "output" if direction == "after" else "input"
        raise FusionError(
            f"{norm_name}: has {c} channels but {layer_name} has {want} {side} channels, "
            f"so the model cannot run as built. Fix num_features of {norm_name} "
            f"(or the layer) and reload the weights.", norm_name, "shape")


def _shares_storage(model) -> Dict[int, int]:
    """id(tensor) -> how many module parameter slots use the same storage."""
    counts: Dict[Tuple, int] = {}
    key_of = {}
    for m in model.modules():
        for t in m._parameters.values():
            if t is None:
                continue
            if t.device.type == "meta" or t.is_sparse or t.is_quantized:
                key = ("id", id(t))
            else:
                key = (t.device.type, t.untyped_storage().data_ptr()
                       if hasattr(t, "untyped_storage") else t.storage().data_ptr())
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


# --- The plan ----------------------------------------------------------------


def make_plan(model, flows: List[Flow]) -> Plan:
    """Decides every norm of ``model`` from the given flows (all must agree)."""
    names = canonical_names(model)
    modules = {names[id(m)]: m for m in model.modules()}
    recorded = next((f for f in flows if f.source == "recorded"), None)
    plan = Plan(evidence=[f.source for f in flows])
    for f in flows:
        if f.note and f.source == "recorded":
            plan.notes.append(f.note)
    fx_proven = any(f.source == "fx" for f in flows)
    branchy = recorded is not None and not fx_proven and recorded.value_reads > 0 \
        and recorded.uncalled
    shared = _shares_storage(model)
    escaped = set().union(*(f.escaped for f in flows)) if flows else set()
    by_layer: Dict[str, Fold] = {}

    def leave(norm, reason, detail):
        plan.left.append(Left(norm, reason, detail))

    for name, module in model.named_modules():
        if not is_norm_module(module):
            continue
        if norm_adapter(module) is None:
            leave(name, "unknown_norm",
                  f"{type(module).__name__} is not a known norm; register it with "
                  f"fusion.register_norm if its eval forward is a per-channel affine map")
            continue
        if uses_batch_statistics(module):
            leave(name, "batch_statistics",
                  "it has no running statistics (track_running_stats=False)")
            continue
        hook = has_hooks(module)
        if hook:
            leave(name, "has_hooks", f"it has a {hook}")
            continue
        if name in escaped:
            leave(name, "params_used_elsewhere",
                  "the forward reads its parameters or buffers outside its own call")
            continue
        if not flows:
            leave(name, "needs_example_inputs", "no evidence of the data flow")
            continue
        decisions = [_decide(f, name, modules) for f in flows]
        left = next((d for d in decisions if d[0] == "left"), None)
        if left is not None:
            leave(name, left[1], left[2])
            continue
        if any(d != decisions[0] for d in decisions[1:]):
            leave(name, "evidence_disagrees",
                  f"torch.fx and the recorded run disagree: {decisions}")
            continue
        decision = decisions[0]
        if branchy:
            shown = ", ".join(recorded.uncalled[:3])
            leave(name, "value_dependent_flow",
                  f"the forward branches on tensor values and the recorded run never "
                  f"called {shown}{' ...' if len(recorded.uncalled) > 3 else ''}; make the "
                  f"model traceable by torch.fx, or fold known pairs with fuse_conv_and_bn")
            continue
        targets = decision[1] if decision[0] == "after" else [decision[1]]
        direction = decision[0]
        reason = None
        for layer_name in targets:
            layer = modules[layer_name]
            hook = has_hooks(layer)
            if hook:
                reason = ("has_hooks", f"its layer {layer_name} has a {hook}")
            elif layer_name in escaped:
                reason = ("params_used_elsewhere",
                          f"the forward reads the parameters of {layer_name} outside "
                          f"its own call")
            elif isinstance(layer, nn.Linear):
                # BatchNorm normalises dim 1; Linear acts on the last dim. They are
                # the same dim only for 2-D input, which only a recorded run shows.
                if recorded is None:
                    reason = ("needs_example_inputs",
                              f"{type(layer).__name__} {layer_name} with BatchNorm folds "
                              f"only when a recorded run shows 2-D input; pass "
                              f"example_inputs")
                elif any(c.in_ndim != 2 for c in recorded.calls.get(name, [])):
                    dims = sorted({c.in_ndim for c in recorded.calls.get(name, [])})
                    reason = ("not_after_producer" if direction == "after" else
                              "unsupported_layer",
                              f"its input is {dims[0]}-D, so its channel dim is not the "
                              f"dim {layer_name} works on")
            if reason is None and direction == "before":
                existing = by_layer.get(layer_name)
                if existing is not None and existing.before is not None:
                    reason = ("called_twice", f"{layer_name} already folds another norm")
            if reason:
                break
        if reason is None:
            for layer_name in targets:
                check_pair(layer_name, modules[layer_name], name, module, direction)
            if direction == "before":
                why = _before_exact(modules[targets[0]], norm_adapter(module)(module))
                if why:
                    reason = ("zero_padding", why)
        if reason:
            leave(name, *reason)
            continue
        for layer_name in targets:
            fold = by_layer.get(layer_name)
            if fold is None:
                layer = modules[layer_name]
                fold = by_layer[layer_name] = Fold(layer_name, evidence="+".join(plan.evidence))
                fold.untie = any(shared.get(id(t), 1) > 1 or _self_overlapping(t)
                                 for t in (layer.weight, layer.bias) if t is not None)
                fold.bias_added = layer.bias is None
            if direction == "after":
                fold.after = name
            else:
                fold.before = name
    # A layer cannot hold two norms after it; decisions guarantee one. Keep the
    # order of the model.
    order = {n: i for i, n in enumerate(modules)}
    plan.folds = sorted(by_layer.values(), key=lambda f: order[f.layer])
    return plan
