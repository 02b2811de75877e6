"""An exact reference for folds: rational arithmetic (fractions), a 60-digit
square root, and one correct rounding to the target dtype. Independent of the
C core and of torch's arithmetic."""
from decimal import Decimal, localcontext
from fractions import Fraction

import torch

__all__ = ["exact_after", "exact_before", "round_to", "ulp_distance", "check_precision"]

_FORMATS = {  # significand bits (implicit bit included), smallest normal exponent
    torch.float16: (11, -14),
    torch.bfloat16: (8, -126),
    torch.float32: (24, -126),
    torch.float64: (53, -1022),
}


def round_to(q: Fraction, dtype) -> float:
    """q rounded once, to nearest even, to dtype (as a Python float, exact)."""
    if q == 0:
        return 0.0
    bits, emin = _FORMATS[dtype]
    a = abs(q)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if a < Fraction(2) ** e:
        e -= 1
    elif a >= Fraction(2) ** (e + 1):
        e += 1
    e = max(e, emin)
    quantum = Fraction(2) ** (e - (bits - 1))
    n = round(a / quantum)  # Fraction rounds half to even
    v = float(n * quantum)
    return v if q > 0 else -v


def _scale(gamma, var, eps):
    with localcontext() as ctx:
        ctx.prec = 60
        root = (Decimal(var) + Decimal(eps)).sqrt()
    return Fraction(gamma) / Fraction(root)


def _vals(t):
    return [Fraction(v) for v in t.detach().double().reshape(-1).tolist()]


def _norm(norm):
    c = norm.running_mean.numel()
    gamma = _vals(norm.weight) if getattr(norm, "weight", None) is not None else [1] * c
    beta = _vals(norm.bias) if getattr(norm, "bias", None) is not None else [0] * c
    mean, var = _vals(norm.running_mean), norm.running_var.double().tolist()
    s = [_scale(g, v, float(norm.eps)) for g, v in zip(gamma, var)]
    return s, mean, beta


def exact_after(weight, bias, norm, transpose=False, groups=1):
    """Exact fused (weight, bias) as nested Fractions: lists in weight's flat order."""
    s, mean, beta = _norm(norm)
    w = weight.detach().double()
    flat = _vals(w)
    inner = w[0, 0].numel()
    d0, d1 = w.shape[0], w.shape[1]
    out = []
    for i0 in range(d0):
        for i1 in range(d1):
            c = (i0 // (d0 // groups)) * d1 + i1 if transpose else i0
            base = (i0 * d1 + i1) * inner
            out.extend(flat[base + k] * s[c] for k in range(inner))
    b = _vals(bias) if bias is not None else [0] * len(s)
    new_b = [(b[c] - mean[c]) * s[c] + beta[c] for c in range(len(s))]
    return out, new_b


def exact_before(weight, bias, norm, groups=1, post=None):
    s, mean, beta = _norm(norm)
    t = [beta[c] - mean[c] * s[c] for c in range(len(s))]
    w = weight.detach().double()
    flat = _vals(w)
    inner = w[0, 0].numel()
    d0, d1 = w.shape[0], w.shape[1]
    b = _vals(bias) if bias is not None else [0] * d0
    out, new_b = [], []
    for i0 in range(d0):
        acc = b[i0]
        for i1 in range(d1):
            c = (i0 // (d0 // groups)) * d1 + i1
            base = (i0 * d1 + i1) * inner
            for k in range(inner):
                out.append(flat[base + k] * s[c])
                acc += flat[base + k] * t[c]
        new_b.append(acc)
    if post is not None:
        s2, mean2, beta2 = _norm(post)
        out = [v * s2[i // (d1 * inner)] for i, v in enumerate(out)]
        new_b = [(v - mean2[o]) * s2[o] + beta2[o] for o, v in enumerate(new_b)]
    return out, new_b


def _ordered(t):
    """Float bits mapped to integers that are monotonic in the value."""
    t = t.detach().reshape(-1)
    if t.dtype in (torch.float16, torch.bfloat16):
        i = t.view(torch.int16).long()
        return torch.where(i < 0, -(i & 0x7FFF), i)
    if t.dtype == torch.float32:
        i = t.view(torch.int32).long()
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)
    i = t.view(torch.int64)
    return torch.where(i < 0, -(i & 0x7FFFFFFFFFFFFFFF), i)


def ulp_distance(values: torch.Tensor, exact) -> torch.Tensor:
    """ULPs between stored values and the exact results rounded once."""
    ref = torch.tensor([round_to(q, values.dtype) for q in exact], dtype=torch.float64)
    ref = ref.to(values.dtype)
    return (_ordered(values.cpu()) - _ordered(ref)).abs()


def check_precision(values: torch.Tensor, exact, min_identical=0.999):
    """DESIGN.md's criterion: >= 99.9% identical to the exact result rounded once,
    all within 1 ULP. Returns (fraction identical, max ULP)."""
    d = ulp_distance(values.contiguous(), exact)
    identical = float((d == 0).double().mean())
    worst = int(d.max())
    assert worst <= 1, f"a fused value is {worst} ULP from the exact result"
    assert identical >= min_identical, f"only {identical:.4%} identical"
    return identical, worst
