"""Writing a plan into the model, in two phases.

``prepare`` runs every check, the C core's included, and computes every fused
bias, writing nothing. ``write`` then applies all of them; it has no failure
path, so a model is either fully fused or untouched. Keep it that way: a test
reads ``write`` and fails if it gains a ``raise`` or a call that can fail on
bad input.
"""
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ._native import _C
from .discover import alias_names
from .errors import FusionError
from .layers import norm_adapter, out_channels
from .plan import Fold, Left

__all__ = []


@dataclass
class Prepared:
    fold: Fold
    handle: object  # fusion._C.Fold
    layer: nn.Module
    install_weight: Optional[nn.Parameter] = None
    install_bias: Optional[nn.Parameter] = None
    copy_back: List[Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    norms: Dict[str, nn.Module] = field(default_factory=dict)


def _host(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if t is None or t.device.type == "cpu":
        return t
    return t.detach().to("cpu", copy=True)


_WHAT_IS_NORM = {"running_mean", "running_var", "norm weight", "norm bias", "post", "eps"}


def _norm_at_fault(code, what, norms) -> Optional[str]:
    """The norm whose vector holds the fault the core reported, or None.

    The core reports a norm's ``weight`` and ``bias`` under the same names as
    the layer's, and does not say which of two norms (before and after one
    layer) it was reading. It checks the norms first, in the order given, then
    the layer; so the first norm that holds such a fault is the one it stopped
    at, and none means the layer."""
    for name, params in norms:
        if what == "eps":
            if not math.isfinite(params.eps):
                return name
            continue
        t = getattr(params, what, None)
        if t is None:
            continue
        v = t.detach().double().cpu()
        if code == "nonfinite" and not bool(torch.isfinite(v).all()):
            return name
        if code == "variance" and what == "running_var" and \
                not bool((v + params.eps > 0).all()):
            return name
    return None


def _fold_error(exc, fold: Fold, norms=()) -> FusionError:
    """``norms``: ``(name, NormParams)`` of the fold's norms, in the order the
    core checks them."""
    what = getattr(exc, "what", "")
    post = what.startswith("post ")
    what = what[5:] if post else what
    is_norm = what in _WHAT_IS_NORM
    what = what.replace("norm ", "")
    code = getattr(exc, "code", "argument")
    culprit = _norm_at_fault(code, what, norms) if code in ("nonfinite", "variance") \
        else None
    if culprit is not None:
        name = culprit
    elif is_norm:
        name = fold.after if (post or fold.before is None) else fold.before
    else:
        name = fold.layer
    index = getattr(exc, "index", -1)
    at = f"[{index}]" if index is not None and index >= 0 else ""
    if code == "nonfinite":
        advice = ("holds a NaN or infinite value; the model's state is broken. Reload a "
                  "good checkpoint or recalibrate the norm's statistics")
    elif code == "variance":
        advice = (f"+ eps is not positive (running_var{at} = {exc.value:g}), so the norm "
                  f"divides by zero; recalibrate its statistics or raise eps")
        at = ""
    else:
        advice = f"cannot be folded: {exc}"
    return FusionError(f"{name}: {what}{at} {advice}.", name, code)


def prepare(model, folds: List[Fold]) -> Tuple[List[Prepared], List[Left]]:
    """Checks and computes every fold. Returns the prepared folds and the folds
    skipped because a fused value would overflow. Writes nothing."""
    prepared, left = [], []
    for fold in folds:
        layer = model.get_submodule(fold.layer)
        weight, bias = layer.weight, layer.bias
        p = Prepared(fold, None, layer)
        target_w = weight
        if fold.untie:
            target_w = nn.Parameter(weight.detach().clone(), weight.requires_grad)
            p.install_weight = target_w
        target_b = bias
        if bias is not None and fold.untie:
            target_b = nn.Parameter(bias.detach().clone(), bias.requires_grad)
            p.install_bias = target_b
        if bias is None:
            target_b = nn.Parameter(
                torch.zeros(out_channels(layer), dtype=weight.dtype, device=weight.device),
                weight.requires_grad)
            p.install_bias = target_b
        host_w, host_b = _host(target_w), _host(target_b)
        if host_w is not target_w:
            p.copy_back.append((target_w, host_w))
        if host_b is not target_b:
            p.copy_back.append((target_b, host_b))
        args = dict(weight=host_w, bias_in=host_b if bias is not None else None,
                    bias_out=host_b)
        main = fold.before if fold.before is not None else fold.after
        norm = model.get_submodule(main)
        p.norms[main] = norm
        params = norm_adapter(norm)(norm)
        checked = [(main, params)]
        args.update(running_mean=_host(params.running_mean),
                    running_var=_host(params.running_var),
                    norm_weight=_host(params.weight), norm_bias=_host(params.bias),
                    eps=params.eps)
        transpose = isinstance(layer, nn.modules.conv._ConvTransposeNd)
        args.update(before=fold.before is not None,
                    grouped=fold.before is not None or transpose,
                    groups=getattr(layer, "groups", 1))
        if fold.before is not None and fold.after is not None:
            post = model.get_submodule(fold.after)
            p.norms[fold.after] = post
            pp = norm_adapter(post)(post)
            checked.append((fold.after, pp))
            args.update(post_mean=_host(pp.running_mean), post_var=_host(pp.running_var),
                        post_weight=_host(pp.weight), post_bias=_host(pp.bias),
                        post_eps=pp.eps)
        try:
            p.handle = _C.prepare(**args)
        except _C.FoldError as exc:
            if exc.code == "overflow":
                for n in fold.norms():
                    left.append(Left(n, "overflow",
                                     f"folding it into {fold.layer} gives a value that "
                                     f"does not fit {weight.dtype} ({exc})"))
                continue
            raise _fold_error(exc, fold, checked) from None
        prepared.append(p)
    return prepared, left


def ensure_unchanged(prepared: List[Prepared]):
    """Raises FusionError if a tensor a fold will write was resized or given
    another storage since ``prepare`` (by another thread, or a hook). Call it
    right before ``write``."""
    for p in prepared:
        if not p.handle.unchanged():
            raise FusionError(
                f"{p.fold.layer}: a tensor of this layer or its norm changed while "
                f"fusing (resized or given another storage); nothing was written. "
                f"Do not modify the model while fuse() runs.", p.fold.layer, "changed")


def write(model, prepared: List[Prepared]) -> List[Tuple[str, nn.Module]]:
    """Writes every prepared fold and replaces the folded norms by nn.Identity
    under every name they are reachable by. Has no failure path.

    Returns ``(qualified name, norm module)`` for every name replaced."""
    aliases = alias_names(model)
    replaced = []
    with torch.no_grad():
        for p in prepared:
            p.handle.apply()
            for device_tensor, host_tensor in p.copy_back:
                device_tensor.copy_(host_tensor)
            if p.install_weight is not None:
                p.layer.weight = p.install_weight
            if p.install_bias is not None:
                p.layer.bias = p.install_bias
    done = set()
    for p in prepared:
        for norm in p.norms.values():
            if id(norm) in done:
                continue
            done.add(id(norm))
            identity = nn.Identity()
            identity.training = norm.training  # a fused model is wholly in eval mode
            for name in aliases.get(id(norm), ()):
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent), attr, identity)
                replaced.append((name, norm))
    return replaced


def backup(prepared: List[Prepared]):
    """Copies of exactly what ``write`` changes in place: the folded layers'
    weights and biases. The cost of ``verify`` with ``inplace=True``."""
    return [(p.layer, p.layer.weight, p.layer.weight.detach().clone(), p.layer.bias,
             None if p.layer.bias is None else p.layer.bias.detach().clone())
            for p in prepared]


def undo(model, saved, replaced):
    """Restores what ``write`` did, bit for bit, from ``backup`` and the names
    ``write`` returned."""
    with torch.no_grad():
        for layer, weight, w_copy, bias, b_copy in saved:
            weight.copy_(w_copy)
            if bias is not None:
                bias.copy_(b_copy)
            layer.weight = weight
            if bias is None:
                del layer.bias
                layer.register_parameter("bias", None)
            else:
                layer.bias = bias
    for name, norm in replaced:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, norm)
