"""Which modules fusion knows: the norms it can fold, and the layers it folds into.

A module is known only by its class *and* its forward: a subclass that
overrides ``forward`` computes something else (a weight-standardised conv, a
norm with extra terms), so it is never folded just because it has the same
parameters. User classes are added with :func:`register_norm` and
:func:`register_layer`.

A known norm is an affine map, possibly followed by a *remainder* that stays in
the model when the map is folded: timm's ``BatchNormAct2d`` is batch norm, then
its ``drop`` and ``act`` modules. timm's classes are recognised without
importing timm: only when timm's module is already loaded can a model hold one.
"""
import contextlib
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional

import torch
from torch import nn

__all__ = ["NormParams", "register_norm", "unregister_norm", "register_layer",
           "unregister_layer"]


@dataclass(frozen=True)
class NormParams:
    """The eval-mode affine map of a norm: ``y = (x - mean) / sqrt(var + eps) * weight + bias``.

    Args:
        running_mean: 1-D tensor of C channels.
        running_var: 1-D tensor of C channels.
        weight: 1-D tensor of C channels, or ``None`` for 1.
        bias: 1-D tensor of C channels, or ``None`` for 0.
        eps: the epsilon added to the variance.
    """

    running_mean: torch.Tensor
    running_var: torch.Tensor
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    eps: float

    def channels(self, start: int, stop: int) -> "NormParams":
        """The map of channels ``start:stop`` alone."""
        def cut(t):
            return None if t is None else t[start:stop]
        return NormParams(cut(self.running_mean), cut(self.running_var), cut(self.weight),
                          cut(self.bias), self.eps)


def compose(maps: List[NormParams]) -> NormParams:
    """One NormParams for several norms applied in turn (a chain), computed in
    float64: ``weight`` the product of their scales, ``bias`` the shift carried
    through, with mean 0, variance 1 and eps 0. A single map is returned as it
    is, so that a lone norm is folded from its own values."""
    if len(maps) == 1:
        return maps[0]
    scale = shift = None
    for p in maps:
        s = torch.rsqrt(p.running_var.detach().double().cpu() + p.eps)
        if p.weight is not None:
            s = s * p.weight.detach().double().cpu()
        t = -p.running_mean.detach().double().cpu() * s
        if p.bias is not None:
            t = t + p.bias.detach().double().cpu()
        scale, shift = (s, t) if scale is None else (scale * s, shift * s + t)
    return NormParams(torch.zeros_like(scale), torch.ones_like(scale), scale, shift, 0.0)


NormAdapter = Callable[[nn.Module], NormParams]
#: Takes a norm module and returns the module that stays in its place when its
#: affine map is folded, or None for nothing (nn.Identity).
Remainder = Callable[[nn.Module], Optional[nn.Module]]


@dataclass(frozen=True)
class NormSpec:
    """How to fold one norm class: its affine map, and what remains after it."""

    adapter: NormAdapter
    remainder: Optional[Remainder] = None


_REGISTRY: Dict[type, NormSpec] = {}


def register_norm(cls, adapter: Optional[NormAdapter] = None, *,
                  remainder: Optional[Remainder] = None):
    """Teach fusion a norm class of your own.

    The adapter returns the norm's eval-mode statistics as :class:`NormParams`.
    Register only classes whose forward in eval mode is exactly that affine map
    along dim 1, followed by what ``remainder`` returns. Usable as a decorator
    when ``adapter`` and ``remainder`` are omitted and the class has the
    BatchNorm attributes (``running_mean``, ``running_var``, ``weight``,
    ``bias``, ``eps``).

    Args:
        cls: the norm class. Its subclasses that override ``forward`` stay unknown.
        adapter: callable taking the module and returning :class:`NormParams`.
        remainder: for a norm whose forward goes on after the affine map (an
            activation, say): a callable taking the module and returning the
            module that computes the rest, made of the norm's own submodules so
            that their names keep working, or ``None`` where the rest is the
            identity. When the map is folded, the norm is replaced by it. Such
            a norm folds only into a layer before it, never into the one it feeds.

    Returns:
        ``cls``, so that it can decorate a class.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_norm expects an nn.Module subclass, got {cls!r}")
    if remainder is not None and not callable(remainder):
        raise TypeError(f"register_norm: remainder must be a callable taking the module, "
                        f"got {remainder!r}")
    _REGISTRY[cls] = NormSpec(adapter if adapter is not None else _batchnorm_params,
                              remainder)
    return cls


def unregister_norm(cls):
    """Forget a class added with :func:`register_norm`."""
    _REGISTRY.pop(cls, None)


def _batchnorm_params(m) -> NormParams:
    return NormParams(m.running_mean, m.running_var, m.weight, m.bias, float(m.eps))


def drop_then_act(m) -> Optional[nn.Module]:
    """The remainder of timm's norm-act classes: ``m.drop`` then ``m.act`` (each
    where the module has it), under those names; None when both are identities."""
    parts = OrderedDict((k, getattr(m, k)) for k in ("drop", "act")
                        if isinstance(getattr(m, k, None), nn.Module))
    if all(type(p) is nn.Identity for p in parts.values()):
        return None
    return nn.Sequential(parts)


def _frozen_bn_class():
    """torchvision's FrozenBatchNorm2d if torchvision is loaded, else None: no
    model can hold an instance of a class whose module was never imported, and
    importing torchvision to find out would cost every first fuse() ~40 MiB."""
    misc = sys.modules.get("torchvision.ops.misc")
    return getattr(misc, "FrozenBatchNorm2d", None)


def _timm_norm_classes() -> tuple:
    """timm's BatchNormAct2d, SyncBatchNormAct and FrozenBatchNormAct2d, where
    timm is loaded. Each is batch norm, then ``drop``, then ``act`` (timm
    1.0's forwards, read and tested against the real package)."""
    mod = sys.modules.get("timm.layers.norm_act")
    if mod is None:
        return ()
    return tuple(c for c in (getattr(mod, n, None) for n in
                             ("BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d"))
                 if isinstance(c, type))


_BATCHNORM_SPEC = NormSpec(_batchnorm_params)
_NORM_ACT_SPEC = NormSpec(_batchnorm_params, drop_then_act)


def _builtin_spec(module) -> Optional[NormSpec]:
    cls = type(module)
    for timm_cls in _timm_norm_classes():
        if isinstance(module, timm_cls):
            return _NORM_ACT_SPEC if cls.forward is timm_cls.forward else None
    if isinstance(module, nn.SyncBatchNorm):
        return _BATCHNORM_SPEC if cls.forward is nn.SyncBatchNorm.forward else None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        base = nn.modules.batchnorm._BatchNorm.forward
        return _BATCHNORM_SPEC if cls.forward is base else None
    frozen = _frozen_bn_class()
    if frozen is not None and isinstance(module, frozen):
        return _BATCHNORM_SPEC if cls.forward is frozen.forward else None
    return None


_per_class = threading.local()


@contextlib.contextmanager
def classifying():
    """Within the block (one call of fuse or analyze), what :func:`norm_spec`,
    :func:`is_norm_module`, :func:`layer_kind` and :func:`plain_layer_kind` say
    of a class is worked out once, on its first module; it is forgotten when
    the block ends. Registering classes inside the block is not seen."""
    outer = getattr(_per_class, "table", None)
    _per_class.table = {} if outer is None else outer
    try:
        yield
    finally:
        _per_class.table = outer


def _by_class(fn):
    """``fn(module)``, which depends on the module's class alone, memoised in
    :func:`classifying`'s table."""
    def of(module):
        table = getattr(_per_class, "table", None)
        if table is None:
            return fn(module)
        key = (fn, type(module))
        try:
            return table[key]
        except KeyError:
            out = table[key] = fn(module)
            return out

    of.__doc__, of.__name__ = fn.__doc__, fn.__name__
    return of


def own_forward(module) -> bool:
    """The module's forward is set on the instance (``m.forward = ...``), so its
    class does not say what it computes."""
    own = vars(module)
    return "forward" in own or "_conv_forward" in own


def norm_spec(module) -> Optional[NormSpec]:
    """How to fold a known norm, or ``None``: registered classes first, then the
    built-in ones; either only with the class's own forward (and not one set on
    the instance)."""
    return None if own_forward(module) else _class_norm_spec(module)


@_by_class
def _class_norm_spec(module) -> Optional[NormSpec]:
    for klass in type(module).__mro__:
        spec = _REGISTRY.get(klass)
        if spec is not None:
            return spec if type(module).forward is klass.forward else None
    return _builtin_spec(module)


def is_known_norm(module) -> bool:
    """A norm fusion can fold: built in, or registered, with its class's forward."""
    return norm_spec(module) is not None


def norm_params(module) -> NormParams:
    """The eval-mode affine map of a known norm."""
    return norm_spec(module).adapter(module)


def norm_adapter(module) -> Optional[NormAdapter]:
    """The adapter for a known norm, or ``None``."""
    spec = norm_spec(module)
    return None if spec is None else spec.adapter


def norm_remainder(module) -> Optional[nn.Module]:
    """What stays in a known norm's place once its map is folded: None for
    nothing, else a module made of the norm's own submodules."""
    spec = norm_spec(module)
    if spec is None or spec.remainder is None:
        return None
    rest = spec.remainder(module)
    if rest is not None and not isinstance(rest, nn.Module):
        raise TypeError(f"the remainder of {type(module).__name__} (register_norm) "
                        f"returned {type(rest).__name__}, not an nn.Module or None")
    return rest


def replacement(module) -> nn.Module:
    """The module that takes a folded norm's place: its remainder, or nn.Identity;
    in the norm's training mode (a fused model is wholly in eval mode)."""
    rest = norm_remainder(module)
    if rest is None:
        rest = nn.Identity()
        rest.training = module.training
    elif isinstance(rest, nn.Sequential):
        rest.training = module.training
    return rest


def describe(module: nn.Module) -> str:
    """A short name of a replacement: ``Identity``, or ``Sequential(drop=Identity,
    act=SiLU)``."""
    if isinstance(module, nn.Sequential) and type(module) is nn.Sequential:
        inner = ", ".join(f"{k}={type(v).__name__}" for k, v in module._modules.items())
        return f"Sequential({inner})"
    return type(module).__name__


@_by_class
def is_norm_module(module) -> bool:
    """Every module the report accounts for: known norms, and anything that looks
    like a batch or instance norm but is not foldable (reported with a reason)."""
    if _class_norm_spec(module) is not None:
        return True
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return True
    if any(isinstance(module, c) for c in _timm_norm_classes()):
        return True
    frozen = _frozen_bn_class()
    return frozen is not None and isinstance(module, frozen)


def uses_batch_statistics(module) -> bool:
    """True when an eval-mode forward normalises with the batch's own statistics."""
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return module.running_mean is None or module.running_var is None
    return False


# --- Layers that a norm folds into -------------------------------------------


def is_layer(module) -> bool:
    """A module of a class a norm could fold into, known forward or not: the
    modules a data flow tracks (see :func:`layer_kind` for which ones fold)."""
    return isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

_LAYERS: Dict[type, str] = {}


def _base_kind(cls) -> Optional[str]:
    if issubclass(cls, _CONV):
        return "conv"
    if issubclass(cls, _CONV_T):
        return "conv_transpose"
    if issubclass(cls, nn.Linear):
        return "linear"
    return None


def register_layer(cls):
    """Teach fusion a Conv or Linear subclass of your own with its own forward.

    Register only classes whose forward computes exactly what their base class's
    does with the module's ``weight`` and ``bias``, apart from what happens to
    the input first (a padding, say), so that scaling an output channel's
    weights and bias scales that output channel. A norm after such a layer
    folds into it; a norm before it is left (``unsupported_layer``), since what
    the forward does to its input may not commute with the norm. Subclasses of
    ``cls`` that override ``forward`` stay unknown.

    Args:
        cls: a subclass of ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` or
            ``nn.Linear``.

    Returns:
        ``cls``, so that it can decorate a class.
    """
    if not isinstance(cls, type) or _base_kind(cls) is None:
        raise TypeError(f"register_layer expects a subclass of nn.Conv1d/2d/3d, "
                        f"nn.ConvTranspose1d/2d/3d or nn.Linear, got {cls!r}")
    _LAYERS[cls] = _base_kind(cls)
    return cls


def unregister_layer(cls):
    """Forget a class added with :func:`register_layer`."""
    _LAYERS.pop(cls, None)


def _timm_layer_classes() -> tuple:
    """timm's Conv2dSame, where timm is loaded: its forward pads the input (TF's
    'SAME') and runs F.conv2d with the module's weight, bias, stride, dilation
    and groups (timm 1.0, read and tested against the real package)."""
    mod = sys.modules.get("timm.layers.conv2d_same")
    cls = getattr(mod, "Conv2dSame", None) if mod is not None else None
    return (cls,) if isinstance(cls, type) else ()


def _same_forward(cls, klass) -> bool:
    same = cls.forward is klass.forward
    if issubclass(klass, nn.modules.conv._ConvNd) and hasattr(klass, "_conv_forward"):
        same = same and cls._conv_forward is klass._conv_forward
    return same


def layer_kind(module) -> Optional[str]:
    """``"conv"``, ``"conv_transpose"``, ``"linear"``, or ``None`` for a module
    fusion cannot fold a following norm into (including subclasses with their
    own forward, unless registered or built in, and a forward set on the
    instance)."""
    return None if own_forward(module) else _class_layer_kind(module)


@_by_class
def _class_layer_kind(module) -> Optional[str]:
    cls = type(module)
    for klass in cls.__mro__:
        kind = _LAYERS.get(klass)
        if kind is not None:
            return kind if _same_forward(cls, klass) else None
    for klass in _timm_layer_classes():
        if isinstance(module, klass):
            return "conv" if _same_forward(cls, klass) else None
    return plain_layer_kind(module)


def plain_layer_kind(module) -> Optional[str]:
    """The kind of a layer with its base class's own forward, which alone a
    norm *before* it may fold into; None for anything else."""
    return None if own_forward(module) else _class_plain_layer_kind(module)


@_by_class
def _class_plain_layer_kind(module) -> Optional[str]:
    cls = type(module)
    for base in _CONV + _CONV_T + (nn.Linear,):
        if isinstance(module, base):
            return _base_kind(base) if _same_forward(cls, base) else None
    return None


def out_channels(module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    return module.out_channels


def in_channels(module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    return module.in_channels


# --- Names and tensors ---------------------------------------------------------


class ModuleIndex:
    """One walk of a model's module tree, made once per call of fuse() and
    shared by its stages (nothing outlives the call). It holds what
    ``named_modules()`` would give, and must not be used after the tree
    changes.

    ``modules``: canonical name -> module, in ``named_modules()`` order (a
    module reachable under several names is listed under the first).
    ``names``: id(module) -> canonical name. :meth:`aliases`: every name."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules: Dict[str, nn.Module] = {}
        self.names: Dict[int, str] = {}
        self.shared = False  # some module is reachable under more than one name
        stack = [("", model)]
        while stack:  # named_modules()'s pre-order walk, without its generators
            name, m = stack.pop()
            if id(m) in self.names:
                self.shared = True
                continue
            self.names[id(m)] = name
            self.modules[name] = m
            children = m._modules
            if children:
                prefix = name + "." if name else ""
                stack.extend((prefix + k, c) for k, c in reversed(children.items())
                             if c is not None)
        self._aliases: Optional[Dict[int, List[str]]] = None

    def aliases(self) -> Dict[int, List[str]]:
        """id(module) -> every qualified name it is reachable under."""
        if self._aliases is None:
            self._aliases = alias_names(self.model) if self.shared else \
                {i: [n] for i, n in self.names.items()}
        return self._aliases

    def get(self, name: str) -> nn.Module:
        """The module at qualified name ``name`` (an alias too), as ``get_submodule``."""
        m = self.modules.get(name)
        return m if m is not None else self.model.get_submodule(name)


def canonical_names(model) -> Dict[int, str]:
    """id(module) -> the first qualified name under which it is reachable."""
    return {id(m): name for name, m in model.named_modules()}


def alias_names(model) -> Dict[int, List[str]]:
    """id(module) -> every qualified name under which it is reachable."""
    out: Dict[int, List[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        out.setdefault(id(m), []).append(name)
    return out


def replace_module(model, name: str, new: nn.Module, get=None):
    """Puts ``new`` at the qualified name ``name`` (from ``named_modules()``).
    ``get``: name -> module (a :meth:`ModuleIndex.get`), for the parent."""
    parent, _, attr = name.rpartition(".")
    setattr((get or model.get_submodule)(parent), attr, new)


def tensors(obj, depth=0) -> Iterator[torch.Tensor]:
    """Every tensor inside nested containers (dicts, lists, tuples, sets) and
    plain objects' attributes, in order, to a depth of 6."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth > 6 or obj is None or isinstance(obj, (str, bytes, int, float, bool)):
        return
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from tensors(v, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
        for v in vars(obj).values():
            yield from tensors(v, depth + 1)


def map_tensors(fn, obj):
    """``obj`` with every tensor ``t`` inside tuples, lists and dicts replaced by
    ``fn(t)`` (the structures a forward takes and returns)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(fn, x) for x in obj)
    if isinstance(obj, list):
        return [map_tensors(fn, x) for x in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(fn, v) for k, v in obj.items()}
    return obj


def has_hooks(module) -> Optional[str]:
    """What makes a module's forward more than its parameters, or ``None``."""
    if getattr(module, "_forward_hooks", None):
        return "forward hook"
    if getattr(module, "_forward_pre_hooks", None):
        # weight_norm and spectral_norm are forward pre-hooks.
        names = {type(h).__name__ for h in module._forward_pre_hooks.values()}
        if "WeightNorm" in names:
            return "weight_norm"
        if "SpectralNorm" in names:
            return "spectral_norm"
        return "forward pre-hook"
    if getattr(module, "parametrizations", None) is not None:
        return "parametrization"
    if getattr(module, "_backward_hooks", None):
        return "backward hook"
    return None
