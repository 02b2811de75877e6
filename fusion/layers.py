"""Which modules fusion knows: the norms it can fold, and the layers it folds into.

A module is known only by its class *and* its forward: a subclass that
overrides ``forward`` computes something else (a weight-standardised conv, a
norm with extra terms), so it is never folded just because it has the same
parameters. User norm classes are added with :func:`register_norm`.
"""
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional

import torch
from torch import nn

__all__ = ["NormParams", "register_norm", "unregister_norm"]


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


NormAdapter = Callable[[nn.Module], NormParams]

_REGISTRY: Dict[type, NormAdapter] = {}


def register_norm(cls, adapter: Optional[NormAdapter] = None):
    """Teach fusion a norm class of your own.

    The adapter returns the norm's eval-mode statistics as :class:`NormParams`.
    Register only classes whose forward in eval mode is exactly that affine map
    along dim 1. Usable as a decorator when ``adapter`` is omitted and the class
    has the BatchNorm attributes (``running_mean``, ``running_var``, ``weight``,
    ``bias``, ``eps``).

    Args:
        cls: the norm class. Its subclasses that override ``forward`` stay unknown.
        adapter: callable taking the module and returning :class:`NormParams`.

    Returns:
        ``cls``, so that it can decorate a class.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_norm expects an nn.Module subclass, got {cls!r}")
    _REGISTRY[cls] = adapter if adapter is not None else _batchnorm_params
    return cls


def unregister_norm(cls):
    """Forget a class added with :func:`register_norm`."""
    _REGISTRY.pop(cls, None)


def _batchnorm_params(m) -> NormParams:
    return NormParams(m.running_mean, m.running_var, m.weight, m.bias, float(m.eps))


def _frozen_bn_class():
    """torchvision's FrozenBatchNorm2d if torchvision is loaded, else None: no
    model can hold an instance of a class whose module was never imported, and
    importing torchvision to find out would cost every first fuse() ~40 MiB."""
    misc = sys.modules.get("torchvision.ops.misc")
    return getattr(misc, "FrozenBatchNorm2d", None)


def _builtin_adapter(module) -> Optional[NormAdapter]:
    cls = type(module)
    if isinstance(module, nn.SyncBatchNorm):
        return _batchnorm_params if cls.forward is nn.SyncBatchNorm.forward else None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        base = nn.modules.batchnorm._BatchNorm.forward
        return _batchnorm_params if cls.forward is base else None
    frozen = _frozen_bn_class()
    if frozen is not None and isinstance(module, frozen):
        return _batchnorm_params if cls.forward is frozen.forward else None
    return None


def is_known_norm(module) -> bool:
    """A norm fusion can fold: built in, or registered, with its class's forward."""
    return norm_adapter(module) is not None


def norm_params(module) -> NormParams:
    """The eval-mode affine map of a known norm (see :func:`norm_adapter`)."""
    return norm_adapter(module)(module)


def norm_adapter(module) -> Optional[NormAdapter]:
    """The adapter for a known norm, or ``None``."""
    for klass in type(module).__mro__:
        adapter = _REGISTRY.get(klass)
        if adapter is not None:
            return adapter if type(module).forward is klass.forward else None
    return _builtin_adapter(module)


def is_norm_module(module) -> bool:
    """Every module the report accounts for: known norms, and anything that looks
    like a batch or instance norm but is not foldable (reported with a reason)."""
    if norm_adapter(module) is not None:
        return True
    if isinstance(module, nn.modules.batchnorm._NormBase):
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


def layer_kind(module) -> Optional[str]:
    """``"conv"``, ``"conv_transpose"``, ``"linear"``, or ``None`` for a module
    fusion cannot fold into (including subclasses with their own forward)."""
    cls = type(module)
    for base in _CONV:
        if isinstance(module, base):
            same = cls.forward is base.forward and cls._conv_forward is base._conv_forward
            return "conv" if same else None
    for base in _CONV_T:
        if isinstance(module, base):
            return "conv_transpose" if cls.forward is base.forward else None
    if isinstance(module, nn.Linear):
        return "linear" if cls.forward is nn.Linear.forward else None
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


def canonical_names(model) -> Dict[int, str]:
    """id(module) -> the first qualified name under which it is reachable."""
    return {id(m): name for name, m in model.named_modules()}


def alias_names(model) -> Dict[int, List[str]]:
    """id(module) -> every qualified name under which it is reachable."""
    out: Dict[int, List[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        out.setdefault(id(m), []).append(name)
    return out


def replace_module(model, name: str, new: nn.Module):
    """Puts ``new`` at the qualified name ``name`` (from ``named_modules()``)."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)


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
