"""Writing a plan into the model, in two phases.

``prepare`` runs every check, the C core's included, and computes every fused
bias, writing nothing. ``write`` then applies all of them. Nothing it does can
fail on a prepared plan; and what comes from outside cannot leave the model
half written: SIGINT (Ctrl-C) is held until every step has run, and an
exception raised anyway (by another signal's handler, a hook) does not stop
the write: the step it interrupted runs again, the rest run, the model is
fully fused, then the exception goes on. Tests raise both at every step.
"""
import contextlib
import copy
import dataclasses
import signal
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set

import torch
from torch import nn

from ._native import _C
from .errors import FusionError
from .layers import (
    ModuleIndex,
    NormParams,
    alias_names,
    norm_params,
    out_channels,
    replace_module,
    replacement,
)
from .plan import Fold, Left

__all__ = []


@dataclass
class Prepared:
    """One fold, checked and computed by the core, ready to write."""

    fold: Fold
    handle: object  # fusion._C.Fold
    layer: nn.Module
    install_weight: Optional[nn.Parameter] = None
    install_bias: Optional[nn.Parameter] = None
    copy_back: List["HostCopy"] = field(default_factory=list)
    norms: Dict[str, nn.Module] = field(default_factory=dict)
    fills: Optional[int] = None  # id of the DeferredCopy placeholder it writes


@dataclass
class HostCopy:
    """A host copy that the core writes, and the device tensor it goes back to."""

    device: torch.Tensor
    host: torch.Tensor


@dataclass
class Preparation:
    """What ``prepare`` made of a plan's folds."""

    folds: List[Prepared] = field(default_factory=list)
    overflow: List[Left] = field(default_factory=list)  # folds a value would overflow


@dataclass
class Replaced:
    """A norm module taken out of the model under one of its names, and what
    takes its place there: nn.Identity, or the norm's remainder."""

    name: str
    norm: nn.Module
    new: Optional[nn.Module] = None


@dataclass
class LayerState:
    """A folded layer's weight and bias Parameters, and copies of their values."""

    name: str
    layer: nn.Module
    weight: nn.Parameter
    weight_copy: torch.Tensor
    bias: Optional[nn.Parameter]
    bias_copy: Optional[torch.Tensor]


@dataclass
class Backup:
    """Exactly what ``write`` changes, so that ``restore`` can undo it bit for bit:
    the folded layers' weights and biases (copied), and the replaced norms."""

    layers: List[LayerState]
    replaced: List[Replaced] = field(default_factory=list)

    @classmethod
    def of(cls, prepared: List[Prepared]) -> "Backup":
        return cls([LayerState(p.fold.layer, p.layer, p.layer.weight,
                               p.layer.weight.detach().clone(),
                               p.layer.bias, None if p.layer.bias is None
                               else p.layer.bias.detach().clone()) for p in prepared])

    def restore(self, model):
        with torch.no_grad():
            for s in self.layers:
                s.weight.copy_(s.weight_copy)
                if s.bias is not None:
                    s.bias.copy_(s.bias_copy)
                s.layer.weight = s.weight
                if s.bias is None:
                    del s.layer.bias
                    s.layer.register_parameter("bias", None)
                else:
                    s.layer.bias = s.bias
        for r in self.replaced:
            replace_module(model, r.name, r.norm)


# --- copy mode -----------------------------------------------------------------

#: The dtypes the core folds (plan.check_tensor refuses the others).
_FOLD_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class DeferredCopy:
    """A deep copy of a model, as ``copy.deepcopy`` makes it, except that the
    weights of its convolutions and linear layers are not copied yet: each is a
    new, uninitialised Parameter of the original's dtype, shape and strides
    (what ``Parameter.__deepcopy__`` makes, less the values). A fold then reads
    the original weight and writes the copy's once (``_C.prepare(out=)``), and
    :meth:`fill` copies every other one, so that no weight is copied and then
    rewritten. Until then the copy must not run: fuse() defers only where the
    evidence comes from torch.fx, and traces again after :meth:`fill` if the
    traced code read one of these weights' values.

    Deferred are the host weights that are exactly ``nn.Parameter`` (a subclass
    may copy itself otherwise), dense and of a dtype the core folds."""

    def __init__(self, model: nn.Module, index: ModuleIndex):
        memo: dict = {}
        self._sources: Dict[int, tuple] = {}  # id(placeholder) -> (it, original)
        self.written: set = set()  # ids of the placeholders a fold writes
        for m in index.modules.values():
            if not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
                continue
            w = m._parameters.get("weight")
            if type(w) is not nn.Parameter or id(w) in memo or w.is_quantized or \
                    w.layout != torch.strided or w.dtype not in _FOLD_DTYPES:
                continue
            fresh = fresh_like(w.data)
            if fresh is not None:
                placeholder = nn.Parameter(fresh, w.requires_grad)
                memo[id(w)] = placeholder
                self._sources[id(placeholder)] = (placeholder, w)
        self.copy = copy.deepcopy(model, memo)
        del memo  # (it holds the originals, which the caller's model holds anyway)

    def source_of(self, weight) -> Optional[torch.Tensor]:
        """The original weight whose values ``weight`` (the copy's) is still to
        receive, or None."""
        entry = self._sources.get(id(weight))
        return None if entry is None or entry[0] is not weight else entry[1].detach()

    def holders(self, index: ModuleIndex) -> Set[str]:
        """The names of the copy's modules that hold a weight not filled yet."""
        return {name for name, m in index.modules.items()
                if id(m._parameters.get("weight")) in self._sources}

    def fill(self, all_weights=False):
        """Copies the originals' values into every placeholder no prepared fold
        writes (into all of them with ``all_weights``)."""
        with torch.no_grad():
            for placeholder, original in self._sources.values():
                if all_weights or id(placeholder) not in self.written:
                    placeholder.data.copy_(original.data)
        self._sources = {}


# --- prepare -------------------------------------------------------------------


def _host(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if t is None or t.device.type == "cpu":
        return t
    return t.detach().to("cpu", copy=True)


def _host_norm(params: NormParams) -> NormParams:
    if all(t is None or t.device.type == "cpu" for t in (
            params.running_mean, params.running_var, params.weight, params.bias)):
        return params
    return dataclasses.replace(
        params, running_mean=_host(params.running_mean),
        running_var=_host(params.running_var), weight=_host(params.weight),
        bias=_host(params.bias))


def _culprit(exc, fold: Fold) -> str:
    """The module a FoldError is about, from the part of the fold it names."""
    if exc.part == "norm":
        return fold.before if fold.before is not None else fold.after
    if exc.part == "post":
        return fold.after
    return fold.layer


def _fold_error(exc, fold: Fold) -> FusionError:
    name = _culprit(exc, fold)
    at = f"[{exc.index}]" if exc.index >= 0 else ""
    if exc.code == "nonfinite":
        advice = ("holds a NaN or infinite value; the model's state is broken. Reload a "
                  "good checkpoint or recalibrate the norm's statistics")
    elif exc.code == "variance":
        advice = (f"+ eps is not positive (running_var{at} = {exc.value:g}), so the norm "
                  f"divides by zero; recalibrate its statistics or raise eps")
        at = ""
    else:
        advice = f"cannot be folded: {exc}"
    return FusionError(f"{name}: {exc.field or 'fold'}{at} {advice}.", name, exc.code)


def fresh_like(t: torch.Tensor) -> Optional[torch.Tensor]:
    """An uninitialised host tensor of ``t``'s dtype, shape and strides, for the
    core to fold ``t`` into (``_C.prepare(out=)``); None where ``t`` is not on the
    host, or torch lays the new tensor out otherwise (``t`` overlaps itself)."""
    if t.device.type != "cpu":
        return None
    out = torch.empty_like(t, memory_format=torch.preserve_format)
    return out if out.stride() == t.stride() else None


def _targets(p: Prepared, source: Optional[torch.Tensor]):
    """The tensors the core reads and writes for a fold: (weight read, weight
    written, bias written), installing fresh Parameters where the layer's weight
    is shared (untie) or it has no bias. ``source``: what the layer's weight is
    to hold before the fold, where it does not hold it yet (see
    :class:`DeferredCopy`)."""
    weight, bias, layer = p.layer.weight, p.layer.bias, p.layer
    read = weight if source is None else source
    target_w, target_b = weight, bias
    if p.fold.untie:
        fresh = fresh_like(read.detach())
        target_w = p.install_weight = nn.Parameter(
            read.detach().clone() if fresh is None else fresh, weight.requires_grad)
        if fresh is None:
            read = target_w
        if bias is not None:
            target_b = p.install_bias = nn.Parameter(bias.detach().clone(),
                                                     bias.requires_grad)
    if bias is None:
        target_b = p.install_bias = nn.Parameter(
            torch.zeros(out_channels(layer), dtype=weight.dtype, device=weight.device),
            weight.requires_grad)
    host_w, host_b = _host(target_w), _host(target_b)
    for device, host in ((target_w, host_w), (target_b, host_b)):
        if host is not device:
            p.copy_back.append(HostCopy(device, host))
    return (host_w if read is target_w else read), host_w, host_b


def _check_chain(names, norms):
    """The C core checks the one map it is given; a chain's is composed here
    first, so each norm of it is checked here, by name."""
    for name in names:
        params = norm_params(norms[name])
        for what, t in (("running_mean", params.running_mean),
                        ("running_var", params.running_var), ("weight", params.weight),
                        ("bias", params.bias)):
            if t is None:
                continue
            bad = (~torch.isfinite(t.detach())).nonzero()
            if bad.numel():
                raise FusionError(f"{name}: {what}[{int(bad[0, 0])}] holds a NaN or "
                                  f"infinite value; the model's state is broken. Reload a "
                                  f"good checkpoint or recalibrate the norm's statistics.",
                                  name, "nonfinite")
        low = ((params.running_var.detach().double() + params.eps) <= 0).nonzero()
        if low.numel():
            i = int(low[0, 0])
            raise FusionError(f"{name}: running_var + eps is not positive (running_var[{i}] "
                              f"= {float(params.running_var[i]):g}), so the norm divides by "
                              f"zero; recalibrate its statistics or raise eps.", name,
                              "variance")


def _prepare_one(get, fold: Fold, deferred: Optional["DeferredCopy"]) -> Prepared:
    """Raises _C.FoldError for what the core refuses. ``get``: name -> module."""
    layer = get(fold.layer)
    p = Prepared(fold, None, layer)
    had_bias = layer.bias is not None
    source = deferred.source_of(layer.weight) if deferred is not None else None
    weight, out, bias_out = _targets(p, source)
    for name in fold.norms():
        p.norms[name] = get(name)
    for chain in (fold.before_norms(), fold.after_norms()):
        if len(chain) > 1:
            _check_chain(chain, p.norms)
    if fold.before is not None:
        params = fold.before_map(p.norms)
        post = _host_norm(fold.after_map(p.norms)) if fold.after is not None else None
    else:
        params, post = fold.after_map(p.norms), None
    transpose = isinstance(layer, nn.modules.conv._ConvTransposeNd)
    p.handle = _C.prepare(weight=weight, bias_in=bias_out if had_bias else None,
                          bias_out=bias_out, norm=_host_norm(params),
                          before=fold.before is not None,
                          grouped=fold.before is not None or transpose,
                          groups=getattr(layer, "groups", 1), post=post,
                          out=None if out is weight else out)
    if deferred is not None and out is not weight:
        p.fills = id(out)
        deferred.written.add(p.fills)
    return p


def prepare(model, folds: List[Fold], index: Optional[ModuleIndex] = None,
            deferred: Optional["DeferredCopy"] = None, apply=False) -> Preparation:
    """Checks and computes every fold, writing nothing. A fold whose fused values
    would overflow is left (reason ``overflow``), and so is every other fold of
    its norms (a norm that folds into two layers, after a torch.cat or called
    after each, goes only if both folds do); any other fault raises.
    ``index``: the model's :class:`ModuleIndex`, if the caller has one.
    ``deferred``: where ``model`` is a :class:`DeferredCopy`'s copy; then each
    fold reads its layer's original weight and writes the copy's.

    ``apply``: writes a fold's weight and bias as soon as it is checked, for a
    model that is fuse()'s own copy: a fault later discards the copy, so
    nothing needs the all-or-nothing order there, and each fold's per-channel
    arrays are freed before the next is computed. What a fold writes there is
    a Parameter of the copy's own (``copy.deepcopy`` clones each Parameter on
    its own storage, and a tied one is untied), so no other fold reads it. A
    fold whose norm has another fold waits for the write (write() still
    installs the biases and replaces the norms)."""
    get = index.get if index is not None else model.get_submodule
    out = Preparation()
    folds_of: Dict[str, int] = {}
    for fold in folds:
        for n in fold.norms():
            folds_of[n] = folds_of.get(n, 0) + 1
    overflowed: Dict[str, str] = {}  # norm left -> the layer whose fold overflowed
    for fold in folds:
        try:
            p = _prepare_one(get, fold, deferred)
        except _C.FoldError as exc:
            if exc.code != "overflow":
                raise _fold_error(exc, fold) from None
            dtype = get(fold.layer).weight.dtype
            out.overflow += [Left(n, "overflow", f"folding it into {fold.layer} gives a "
                                  f"value that does not fit {dtype} ({exc})")
                             for n in fold.norms() if n not in overflowed]
            overflowed.update((n, fold.layer) for n in fold.norms())
            continue
        out.folds.append(p)
        if apply and all(folds_of[n] == 1 for n in fold.norms()):
            p.handle.apply()
    while overflowed:  # the other folds of an overflowing fold's norms, and theirs
        kept, more = [], {}
        for p in out.folds:
            hit = next((n for n in p.fold.norms() if n in overflowed), None)
            if hit is None:
                kept.append(p)
                continue
            if p.fills is not None:  # its placeholder is filled with the original
                deferred.written.discard(p.fills)
            for n in p.fold.norms():
                if n not in overflowed and n not in more:
                    more[n] = overflowed[hit]
                    out.overflow.append(Left(n, "overflow", (
                        f"it folds into {p.fold.layer} together with {hit}, which is left "
                        f"because a fold into {overflowed[hit]} gives a value that does "
                        f"not fit {get(overflowed[hit]).weight.dtype}")))
        out.folds = kept
        overflowed.update(more)
        if not more:
            break
    return out


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


# --- write ---------------------------------------------------------------------


def replacements(model, prepared: List[Prepared],
                 index: Optional[ModuleIndex] = None) -> List[Replaced]:
    """Every (name, norm) that writing ``prepared`` replaces: each folded norm
    under every name it is reachable by."""
    aliases = index.aliases() if index is not None else alias_names(model)
    out, done = [], set()
    for p in prepared:
        for norm in p.norms.values():
            if id(norm) not in done:
                done.add(id(norm))
                new = replacement(norm)
                out.extend(Replaced(name, norm, new) for name in aliases.get(id(norm), ()))
    return out


def _write_steps(model, prepared: List[Prepared], replaced: List[Replaced], get=None):
    """Every change ``write`` makes, in order, as a callable each. ``get``: name
    -> module, for the norms' parents (which the write does not replace)."""
    steps = []
    for p in prepared:
        steps.append(p.handle.apply)
        steps += [lambda c=c: c.device.copy_(c.host) for c in p.copy_back]
        if p.install_weight is not None:
            steps.append(lambda p=p: setattr(p.layer, "weight", p.install_weight))
        if p.install_bias is not None:
            steps.append(lambda p=p: setattr(p.layer, "bias", p.install_bias))
    for r in replaced:
        steps.append(lambda r=r: replace_module(model, r.name, r.new, get))
    return steps


@contextlib.contextmanager
def _sigint_held():
    """Holds SIGINT for the block and delivers it after, through the handler that
    was there. Signal handlers run in the main thread only: in another thread a
    Ctrl-C interrupts the main thread, never this one, and nothing is held."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield
        return
    caught = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            signal.raise_signal(signal.SIGINT)


def _run_every(steps):
    """Runs every step, even after one raised; then raises the first exception.

    Roll forward, not back: undoing a weight already scaled in place would need
    a copy of every weight. No step can fail on what prepare() made, so an
    exception here comes from outside (a signal handler, a hook), between
    bytecodes; every step is idempotent (a Fold applies once), so the step it
    interrupted is run again."""
    first = None
    for step in steps:
        for _ in range(2):
            try:
                step()
                break
            except BaseException as exc:
                first = first or exc
    if first is not None:
        raise first


def write(model, prepared: List[Prepared],
          index: Optional[ModuleIndex] = None) -> List[Replaced]:
    """Writes every prepared fold and replaces the folded norms (by nn.Identity,
    or their remainder) under every name they are reachable by: all of it, or (if it raises before
    starting) none of it. ``index``: the model's :class:`ModuleIndex` from
    before the write, if the caller has one.

    Returns every (name, norm) replaced."""
    replaced = replacements(model, prepared, index)
    steps = _write_steps(model, prepared, replaced, index.get if index is not None else None)
    with torch.no_grad(), _sigint_held():
        _run_every(steps)
    return replaced
