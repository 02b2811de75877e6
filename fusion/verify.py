"""Checking a fused model against the original.

Two checks, both on by default when example inputs are given:

1. Weights. Every fused weight and bias is compared with the exact fold of the
   original values, computed here in float64 with torch (independently of the C
   core) and rounded once: each must be within 1 ULP. This catches any wrong
   fold, in any dtype, and names the pair.
2. Outputs. ``rel_err = ||y_fused - y||_2 / ||y||_2`` over every floating output
   tensor. A correct fold still changes the output by the rounding of the fused
   weights, amplified by the depth of the model, so the tolerance is measured on
   the model itself: the fused weights are perturbed at random by half an ULP of
   their dtype (of float32, where arithmetic runs in float32) and the model is
   run again. The change that causes, ``sigma``, is the size of the error a
   correct fold may make; the tolerance is ``TOLERANCE_FACTOR * sigma``, and
   never below ``FLOOR`` of the dtype. When the error is too large, the pair
   whose own output differs most (per channel, on the inputs it saw) is named.
3. Layers, where the outputs prove nothing: when the original's output is
   all zeros, empty or not finite (a randomly initialised ViT, a detector with
   no detections), or so sensitive that the tolerance calibrated from half an
   ULP on the fused weights exceeds ``DISCONTINUOUS`` (top-k and NMS reorder
   what they keep; a chaotic random model amplifies rounding),
   a comparison of outputs could not fail. Each fused layer is then run, in
   float64, on the input it received in the fused model's run, and compared
   with the original layer and norm (their affine map) on the same input:
   every element must be within the rounding bound of the fused weights,
   ``eps * (|W'| * |x| + |b'|)``, which a fold within its ULP allowance meets
   and a wrong one does not. The report says what was compared, and why.
"""
import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .errors import FusionError
from .layers import map_tensors, tensors

__all__ = ["TOLERANCE_FACTOR"]

#: The output tolerance is this many times the measured rounding sensitivity.
TOLERANCE_FACTOR = 8.0

#: The smallest default tolerance, per compute dtype.
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6}

#: A calibrated tolerance above this means the output is discontinuous in the
#: weights (or nearly so): comparing it proves nothing, and the layers are
#: compared instead.
DISCONTINUOUS = 0.01

_HALF = (torch.float16, torch.bfloat16)


def _has_half_on_cpu(model) -> bool:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.dtype in _HALF and t.device.type == "cpu":
            return True
    return False


def _to_float(obj):
    return map_tensors(lambda t: t.float() if t.dtype in _HALF else t, obj)


def run_model(model, args, fn=None):
    """Runs ``fn(model, args)`` (default: ``model(*args)`` without grad), on a
    float32 copy where the model holds float16/bfloat16 tensors on the CPU,
    which has no kernels for them in every torch."""
    if fn is None:
        def fn(m, a):
            with torch.no_grad():
                return m(*a)
    if _has_half_on_cpu(model):
        return fn(copy.deepcopy(model).float(), _to_float(args))
    return fn(model, args)


def _flat(obj):
    return [t.detach().double().reshape(-1) for t in tensors(obj) if t.is_floating_point()]


def outputs_error(reference, output):
    """``(rel_err, max_abs_err)`` between two outputs of the same structure."""
    a, b = _flat(reference), _flat(output)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        raise FusionError("the fused model's output has a different structure or shape "
                          "than the original's.", None, "verify")
    if not a:
        return 0.0, 0.0
    ref, out = torch.cat(a), torch.cat(b)
    diff = out - ref
    norm = float(ref.norm())
    rel = float(diff.norm()) / norm if norm > 0 else float(diff.norm())
    return rel, float(diff.abs().max()) if diff.numel() else 0.0


# --- 1. weights ----------------------------------------------------------------


def _exact_fold(weight, bias, p, direction, groups, transpose, post=None):
    """The fold of NormParams ``p`` in float64 with torch: the reference the C
    core must match."""
    mean, var = p.running_mean.double().cpu(), p.running_var.double().cpu()
    gamma = p.weight.double().cpu() if p.weight is not None else torch.ones_like(mean)
    beta = p.bias.double().cpu() if p.bias is not None else torch.zeros_like(mean)
    s = gamma / torch.sqrt(var + p.eps)
    w = weight.detach().double().cpu()
    b = bias.detach().double().cpu() if bias is not None else None
    if direction == "after":
        if transpose:
            cin = w.shape[0]
            w = w.reshape(groups, cin // groups, -1, *w.shape[2:])
            w = w * s.reshape(groups, 1, -1, *([1] * (w.dim() - 3)))
            w = w.reshape(cin, -1, *w.shape[3:])
        else:
            w = w * s.reshape(-1, *([1] * (w.dim() - 1)))
        nb = (b - mean) * s + beta if b is not None else beta - mean * s
        return w, nb
    t = beta - mean * s
    out = w.shape[0]
    wg = w.reshape(groups, out // groups, -1, *w.shape[2:])
    sg, tg = s.reshape(groups, 1, -1), t.reshape(groups, 1, -1)
    nb = (wg.reshape(groups, out // groups, wg.shape[2], -1).sum(-1) * tg).sum(-1)
    nb = nb.reshape(-1) + (b if b is not None else 0)
    w = (wg * sg.reshape(groups, 1, -1, *([1] * (w.dim() - 2)))).reshape(w.shape)
    if post is not None:
        w2, nb2 = _exact_fold(w, nb, post, "after", 1, False)
        return w2, nb2
    return w, nb


_INT_OF = {torch.float16: (torch.int16, 0x7FFF), torch.bfloat16: (torch.int16, 0x7FFF),
           torch.float32: (torch.int32, 0x7FFFFFFF),
           torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF)}


def _ordered(bits, mask):
    """Float bits (as integers) mapped to integers that are monotonic in the
    value: adjacent floats differ by 1, so a difference is a distance in ULPs."""
    i = bits.long()
    return torch.where(i < 0, -(i & mask), i)


def _ulps(value, reference) -> int:
    """Largest ULP distance of ``value`` from the float64 ``reference`` rounded to
    its dtype. Only the elements whose bits differ are converted, since nearly
    all are identical."""
    int_type, mask = _INT_OF[value.dtype]
    a = value.detach().cpu().contiguous().view(int_type)
    b = reference.to(value.dtype).contiguous().view(int_type)
    differ = a != b
    if not bool(differ.any()):
        return 0
    return int((_ordered(a[differ], mask) - _ordered(b[differ], mask)).abs().max())


#: ULPs allowed between a fused value and the float64 reference rounded once.
#: A float64 model's reference is itself computed in float64, a few ULPs off
#: the exact result that the core (in long double) rounds to.
MAX_ULPS = {torch.float64: 4}


@dataclass
class _PairUlps:
    """How far one fold's values are from the exact fold, and how far they may be."""

    fold: object
    ulps: int
    allowed: int

    @property
    def excess(self) -> float:
        return self.ulps / self.allowed


@dataclass
class Verification:
    """What verification measured: the output error against the original, and
    the tolerance it was held to (every fused value was also within its ULP
    allowance of the exact fold). ``compared`` is ``"outputs"``, or
    ``"layers"`` where the outputs proved nothing (``why``) and each fused layer
    was compared on its own input instead."""

    rel_err: float
    max_abs_err: float
    tolerance: Optional[float]  # None where the outputs proved nothing
    compared: str = "outputs"
    why: Optional[str] = None
    layers: int = 0  # fused layers compared, with "layers"
    worst: float = 0.0  # the largest error found, as a share of its bound


def _pair_ulps(p, originals) -> _PairUlps:
    f = p.fold
    weight, bias = originals[f.layer]
    transpose = isinstance(p.layer, nn.modules.conv._ConvTransposeNd)
    groups = getattr(p.layer, "groups", 1)
    after = f.after_map(p.norms) if f.after is not None else None
    if f.before is not None:
        w, b = _exact_fold(weight, bias, f.before_map(p.norms), "before", groups,
                           False, after)
    else:
        w, b = _exact_fold(weight, bias, after, "after", groups, transpose)
    ulps = max(_ulps(p.layer.weight, w), _ulps(p.layer.bias, b))
    return _PairUlps(f, ulps, MAX_ULPS.get(p.layer.weight.dtype, 1))


def check_weights(prepared, originals):
    """Raises FusionError naming a pair whose fused values are more than 1 ULP
    from the exact fold. ``originals`` maps layer name -> (weight, bias) before
    the fold."""
    pairs = [_pair_ulps(p, originals) for p in prepared]
    worst = max(pairs, key=lambda x: x.excess, default=None)
    if worst is not None and worst.excess > 1:
        f = worst.fold
        raise FusionError(
            f"{f.layer}: its fused weights are {worst.ulps} ULP from the exact fold of "
            f"{', '.join(f.norms())} (at most {worst.allowed} allowed). This is a bug in "
            f"fusion; please report it. The model was left as it was.", f.layer, "verify")


# --- 2. outputs ----------------------------------------------------------------


def _compute_dtype(model):
    for t in model.parameters():
        if t.is_floating_point():
            return torch.float32 if t.dtype in _HALF else t.dtype
    return torch.float32


def _sensitivity(fused, args, prepared, y_fused):
    """Output change when every fused weight moves by up to half an ULP."""
    gen = torch.Generator().manual_seed(0)
    saved = []
    with torch.no_grad():
        for p in prepared:
            for t in (p.layer.weight, p.layer.bias):
                eps = max(torch.finfo(t.dtype).eps, torch.finfo(torch.float32).eps) \
                    if t.dtype != torch.float64 else torch.finfo(torch.float64).eps
                saved.append((t, t.detach().clone()))
                # w * (1 + u), u uniform in [-eps/2, eps/2), formed in float64
                factor = torch.rand(t.shape, generator=gen, dtype=torch.float32).double()
                factor.sub_(0.5).mul_(eps).add_(1.0)
                t.copy_(factor.mul_(t.detach().cpu()))
        try:
            y = run_model(fused, args)
        finally:
            for t, v in saved:
                t.copy_(v)
    return outputs_error(y_fused, y)[0]


def _reference_layer(p, originals):
    """The original layer, in float64 on the CPU."""
    ref = copy.deepcopy(p.layer).double().cpu()
    w, b = originals[p.fold.layer]
    with torch.no_grad():
        ref.weight.copy_(w.double())
        if b is not None:
            ref.bias.copy_(b.double())
        else:
            ref.bias.zero_()
    return ref


def _affine(x, params, dim=1):
    """A norm's eval-mode affine map on ``dim``, in float64 (its remainder, such
    as timm's activation, stays in the model and is not part of the fold)."""
    mean, var = params.running_mean.double().cpu(), params.running_var.double().cpu()
    s = torch.rsqrt(var + params.eps)
    if params.weight is not None:
        s = s * params.weight.double().cpu()
    t = -mean * s
    if params.bias is not None:
        t = t + params.bias.double().cpu()
    shape = [1] * x.dim()
    shape[dim] = -1
    return x * s.reshape(shape) + t.reshape(shape)


def _channel_dim(layer) -> int:
    """Where a layer's channels are: a Linear's features are its last dim (a
    norm after it may see them flattened to 2-D, rule 6c), a conv's dim 1."""
    return -1 if isinstance(layer, nn.Linear) else 1


def _one_layer(p, x, originals):
    """``(got, ref, bound)`` of one fold on input ``x``, in float64: the fused
    layer's output, the original layer and norms' output, and the rounding
    bound of the fused weights, ``eps * (|W'| * |x| + |b'|)``."""
    x = x.detach().double().cpu()
    fused = copy.deepcopy(p.layer).double().cpu()
    ref = x
    if p.fold.before is not None:
        ref = _affine(ref, p.fold.before_map(p.norms), _channel_dim(p.layer))
    ref = _reference_layer(p, originals)(ref)
    if p.fold.after is not None:
        ref = _affine(ref, p.fold.after_map(p.norms), _channel_dim(p.layer))
    got = fused(x)
    absolute = copy.deepcopy(fused)
    with torch.no_grad():
        absolute.weight.abs_()
        absolute.bias.abs_()
    dtype = p.layer.weight.dtype
    eps = torch.finfo(dtype).eps * MAX_ULPS.get(dtype, 1)
    base = absolute(x.abs())
    # the fused weights' rounding, and float64's own in computing both sides
    bound = base * (eps * 1.001 + 4096 * torch.finfo(torch.float64).eps)
    return got, ref, bound


def _seen_inputs(fused, args, prepared, visit):
    """Runs the fused model once, calling ``visit(p, x)`` with each fused
    layer's input as it arrives (nothing is kept between layers)."""
    runner, run_args = fused, args
    if _has_half_on_cpu(fused):
        runner, run_args = copy.deepcopy(fused).float(), _to_float(args)
    done = set()

    def hook(module, inputs, p):
        if p.fold.layer not in done and inputs and isinstance(inputs[0], torch.Tensor):
            done.add(p.fold.layer)
            visit(p, inputs[0])

    handles = [runner.get_submodule(p.fold.layer).register_forward_pre_hook(
        lambda m, a, p=p: hook(m, a, p)) for p in prepared]
    try:
        with torch.no_grad():
            runner(*run_args)
    finally:
        for h in handles:
            h.remove()
    return done


def _locate(fused, args, prepared, originals):
    """The pair whose own output differs most, per channel, on the inputs it saw."""
    worst = [-1.0, None]

    def visit(p, x):
        with torch.no_grad():
            got, ref, _ = _one_layer(p, x, originals)
        dim = _channel_dim(p.layer)
        channels = ref.shape[dim]
        diff = (got - ref).transpose(0, dim).reshape(channels, -1).norm(dim=1)
        size = ref.transpose(0, dim).reshape(channels, -1).norm(dim=1)
        err = float((diff / size.clamp_min(1e-300)).max())
        if err > worst[0]:
            worst[:] = [err, p.fold]

    _seen_inputs(fused, args, prepared, visit)
    return tuple(worst)


def check_layers(fused, args, prepared, originals):
    """Check 3: every fused layer against the original layer and norms on the
    input it received. Returns ``(layers compared, worst error as a share of its
    bound)``; raises FusionError naming a pair outside its bound."""
    worst = [0.0, None]

    def visit(p, x):
        with torch.no_grad():
            got, ref, bound = _one_layer(p, x, originals)
            excess = float(((got - ref).abs() / bound.clamp_min(1e-300)).max()) \
                if got.numel() else 0.0
        if excess > worst[0]:
            worst[:] = [excess, p.fold]

    done = _seen_inputs(fused, args, prepared, visit)
    excess, fold = worst
    if excess > 1:
        raise FusionError(
            f"{fold.layer}: verification failed: on the input it received, the fused "
            f"layer differs from the original {', '.join(fold.norms())} and layer by "
            f"{excess:.3g} times the rounding bound of its fused weights. This is a "
            f"bug in fusion; please report it. The model was left as it was.",
            fold.layer, "verify")
    return len(done), excess


def _proves_nothing(reference) -> Optional[str]:
    """Why comparing with this output could not fail, or None."""
    flat = _flat(reference)
    if not flat or sum(t.numel() for t in flat) == 0:
        return "the original's output has no elements (e.g. a detector with no detections)"
    ref = torch.cat(flat)
    if not bool(torch.isfinite(ref).all()):
        return "the original's output is not finite"
    if float(ref.abs().max()) == 0:
        return "the original's output is all zeros (e.g. a randomly initialised head)"
    return None


def verify_fused(fused, args, reference, prepared, rtol: Optional[float],
                 originals) -> Verification:
    """Runs both checks and returns what they measured.

    ``originals`` maps each folded layer's name to its (weight, bias) before the
    fold. Raises FusionError when a check fails."""
    check_weights(prepared, originals)
    y = run_model(fused, args)
    rel, max_abs = outputs_error(reference, y)
    why = _proves_nothing(reference)
    if rtol is None and why is None:
        sigma = _sensitivity(fused, args, prepared, y) if prepared else 0.0
        dtype = _compute_dtype(fused)
        rtol = max(TOLERANCE_FACTOR * sigma, FLOOR.get(dtype, 1e-6))
        if rtol > DISCONTINUOUS:
            why = (f"half an ULP on the fused weights moves the output by {sigma:.2g} "
                   f"(relative): it is discontinuous in them (top-k, NMS) or too "
                   f"sensitive to rounding (a chaotic random model) for a tolerance on it "
                   f"to tell a wrong fold from rounding")
    if why is not None and prepared:
        layers, worst = check_layers(fused, args, prepared, originals)
        return Verification(rel, max_abs, None if rtol is None else float(rtol), "layers",
                            why, layers, worst)
    if rtol is None:
        rtol = FLOOR.get(_compute_dtype(fused), 1e-6)
    if not rel <= rtol:
        err, fold = _locate(fused, args, prepared, originals)
        name = fold.layer if fold is not None else None
        pair = f"{', '.join(fold.norms())} -> {fold.layer}" if fold else "no single pair"
        raise FusionError(
            f"{name}: verification failed: rel_err {rel:.3g} exceeds the tolerance "
            f"{rtol:.3g}. The pair that diverges most is {pair} (per-channel error "
            f"{err:.3g} on its own inputs). The model was left as it was; fuse without "
            f"verify to accept, or raise rtol.", name, "verify")
    return Verification(rel, max_abs, float(rtol))
