#!/usr/bin/env bash
# tests/sanitize.sh - the Python tests against fusion._C built with
# AddressSanitizer and UndefinedBehaviorSanitizer.
#
# The sanitized extension is built into build/asan-torch<version>, never into the source
# tree (other work imports fusion/_C*.so from there), with the package's
# Python files copied next to it. The uninstrumented interpreter needs the
# sanitizer runtimes preloaded; leak reports from torch and Python themselves
# are off. PYTHONPATH puts that build ahead of the installed package, and
# `python -P` keeps the working directory (the source tree) off sys.path, so
# that `import fusion` finds the sanitized copy; a pytest plugin fails the
# run if it does not.
#
# Runs: the fast Python tests (-m "not slow"; SANITIZE_PYTEST=0 skips them),
# then a script that drives fusion._C.prepare()/Fold.apply() directly over
# every dtype, layout and error path. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
# One sanitized build per torch, like the regular ones (setup.py).
TORCH=$("$PY" -P -c 'import torch; print(torch.__version__)')
OUT=build/asan-torch$TORCH
echo "== torch $TORCH ($PY)"

echo "== building fusion._C with FUSION_SANITIZE=1 into $OUT"
FUSION_SANITIZE=1 "$PY" setup.py -q build_ext --build-lib "$OUT" \
    --build-temp "$OUT-tmp"
rm -rf "$OUT"/fusion/*.py "$OUT"/fusion/_tools
cp fusion/*.py "$OUT/fusion/"
cp -r fusion/_tools "$OUT/fusion/"
so=$(ls "$OUT"/fusion/_C*.so)
# (grep -c, not grep -q: under pipefail an early exit would fail nm.)
[ "$(nm -D --undefined-only "$so" | grep -c __asan_report)" -gt 0 ] \
    || { echo "error: $so is not instrumented" >&2; exit 1; }

export PYTHONPATH="$PWD/$OUT"
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

# Fails the pytest session unless fusion._C is the sanitized build.
cat > "$OUT/fusion_sanitize_check.py" <<'EOF'
import os


def pytest_sessionstart(session):
    import fusion._C

    path = os.path.realpath(fusion._C.__file__)
    want = os.path.realpath(os.environ["PYTHONPATH"])
    print(f"\nfusion._C loaded from {path}")
    if not path.startswith(want + os.sep):
        raise RuntimeError(f"fusion._C is {path}, not the sanitized build in {want}")
EOF

# SANITIZE_PYTEST=0 skips them (they take minutes under the sanitizers).
if [ "${SANITIZE_PYTEST:-1}" != 0 ]; then
    echo "== fast Python tests against $so"
    "$PY" -P -m pytest -q -m "not slow" -p fusion_sanitize_check \
        -p no:cacheprovider "$@"
fi

echo "== fusion._C driven directly"
"$PY" -P - <<'EOF'
"""prepare()/apply() over every dtype, layout and map, and every error path,
with the values checked against a float64 fold."""
import ctypes
import dataclasses
import os

import torch

import fusion._C as C
from fusion import NormParams

# The preloaded runtime is live in this process, not merely linked.
assert hasattr(ctypes.CDLL(None), "__asan_region_is_poisoned")

assert os.path.realpath(C.__file__).startswith(
    os.path.realpath(os.environ["PYTHONPATH"]) + os.sep), C.__file__
print("fusion._C:", C.__file__)
torch.manual_seed(0)
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
checked = 0


def norm(c, dtype, affine=True):
    return NormParams(
        running_mean=torch.randn(c, dtype=torch.float64).to(dtype),
        running_var=(torch.rand(c, dtype=torch.float64) + 0.5).to(dtype),
        weight=torch.randn(c, dtype=torch.float64).to(dtype) if affine else None,
        bias=torch.randn(c, dtype=torch.float64).to(dtype) if affine else None,
        eps=1e-5)


def affine(n):
    var = n.running_var.double()
    g = n.weight.double() if n.weight is not None else torch.ones_like(var)
    b = n.bias.double() if n.bias is not None else torch.zeros_like(var)
    s = g / torch.sqrt(var + n.eps)
    return s, b - n.running_mean.double() * s


def close(got, want, dtype, scale):
    # A few ULPs of the dtype relative to the magnitudes involved: this
    # float64 reference is itself rounded (tests/c holds the exact criterion).
    tol = 4 * torch.finfo(dtype).eps * scale + 1e-300
    err = (got.double() - want).abs().max().item() if got.numel() else 0.0
    assert err <= tol.max().item() if torch.is_tensor(tol) else err <= tol, (err, tol)


def layouts(t):
    """Makers of fresh copies of t: contiguous, channels-last (transposed
    for 2-D), and a view at a storage offset inside a larger tensor."""
    perm = [0] + list(range(2, t.dim())) + [1] if t.dim() >= 3 else [1, 0]
    inv = [perm.index(d) for d in range(t.dim())]

    def contiguous():
        return t.clone(memory_format=torch.contiguous_format)

    def permuted():
        return t.permute(perm).contiguous().permute(inv)

    def offset():
        big = torch.empty(t.numel() + 7, dtype=t.dtype)
        view = big[3:3 + t.numel()].view(t.shape)
        view.copy_(t)
        return view

    return contiguous, permuted, offset


def copy(t):
    return None if t is None else t.clone()


def run(weight, bias, n, before, grouped, groups, post=None):
    global checked
    d0, d1 = weight.shape[0], weight.shape[1]
    s, t = affine(n)
    w64, b64 = weight.double(), None if bias is None else bias.double()
    out = weight.shape[0] if before else (d0 if not grouped else groups * d1)
    bias_out = bias if bias is not None else torch.zeros(out, dtype=weight.dtype)
    # The exact fold in float64.
    if not grouped:
        want_w = w64 * s.view(-1, *([1] * (weight.dim() - 1)))
    else:
        a = d0 // groups
        ch = (torch.arange(d0).view(-1, 1) // a) * d1 + torch.arange(d1).view(1, -1)
        want_w = w64 * s[ch].view(d0, d1, *([1] * (weight.dim() - 2)))
    b0 = b64 if b64 is not None else torch.zeros(out, dtype=torch.float64)
    if before:
        want_b = b0 + (w64 * t[ch].view(d0, d1, *([1] * (weight.dim() - 2)))).flatten(1).sum(1)
    else:
        want_b = (b0 - n.running_mean.double()) * s + (
            n.bias.double() if n.bias is not None else 0)
    if post is not None:
        ps, _ = affine(post)
        want_w = want_w * ps.view(-1, *([1] * (weight.dim() - 1)))
        want_b = (want_b - post.running_mean.double()) * ps + (
            post.bias.double() if post.bias is not None else 0)
    f = C.prepare(weight, bias, bias_out, n, before=before, grouped=grouped,
                  groups=groups, post=post)
    assert not f.applied and f.numel == weight.numel()
    f.apply()
    f.apply()  # a second call does nothing
    assert f.applied
    close(weight, want_w, weight.dtype, want_w.abs().max() + 1)
    close(bias_out, want_b, weight.dtype, want_b.abs().max() + w64.abs().sum() + 1)
    checked += 1


for dtype in DTYPES:
    for base in (torch.randn(8, 4, 3, 3), torch.randn(6, 5)):
        base = base.to(dtype)
        for groups in ((1, 2) if base.dim() == 4 else (1,)):
            for make in layouts(base):
                for has_bias in (False, True):
                    bias = torch.randn(base.shape[0]).to(dtype) if has_bias else None
                    # conv / linear, norm after
                    run(make(), copy(bias), norm(base.shape[0], dtype), False, False,
                        groups)
                    # norm before, with and without a post norm
                    c_in = groups * base.shape[1]
                    for post in (None, norm(base.shape[0], dtype, affine=has_bias)):
                        run(make(), copy(bias), norm(c_in, dtype), True, True, groups,
                            post)
        # ConvTranspose [C_in, C_out/G, k, k], G = 2, norm after
        wt = torch.randn(8, 3, 2, 2).to(dtype)
        run(wt, None, norm(6, dtype), False, True, 2)
print(f"{checked} folds match the float64 fold")

# Large enough to release the GIL and to take the OpenMP path.
for numel_side in (300, 1100):
    w = torch.randn(numel_side, numel_side)
    run(w, torch.randn(numel_side), norm(numel_side, torch.float32), False, False, 1)


def expect(code, text, part=None, field=None, changes=None, **kw):
    """prepare() with the layer arguments in kw and the norm's fields in changes
    fails with code, naming part and field, and writes nothing."""
    base = norm(4, torch.float32)
    args = dict(weight=torch.ones(4, 3), bias_in=None, bias_out=torch.zeros(4),
                before=False, grouped=False, groups=1,
                norm=dataclasses.replace(base, **(changes or {})))
    args.update(kw)
    snapshot = {k: v.clone() for k, v in args.items()
                if torch.is_tensor(v) and v.layout == torch.strided}
    try:
        C.prepare(**args)
    except C.FoldError as exc:
        assert exc.code == code, (exc.code, code, str(exc))
        assert text in str(exc), (text, str(exc))
        if part is not None:
            assert (exc.part, exc.field) == (part, field), (exc.part, exc.field, str(exc))
        for k, v in snapshot.items():  # a failed prepare writes nothing
            assert torch.equal(args[k].contiguous().view(-1).view(torch.uint8),
                               v.contiguous().view(-1).view(torch.uint8)), k
        return
    raise AssertionError(f"no FoldError for {code}")


nan_w = torch.ones(4, 3)
nan_w[2, 1] = float("nan")
expect("nonfinite", "weight", "layer", "weight", weight=nan_w)
expect("nonfinite", "running_mean", "norm", "running_mean",
       changes=dict(running_mean=torch.tensor([0, float("inf"), 0, 0.])))
expect("variance", "running_var", "norm", "running_var",
       changes=dict(running_var=torch.tensor([1, -1, 1, 1.])))
half = norm(4, torch.float16)
expect("overflow", "weight", "layer", "weight",
       weight=torch.full((4, 3), 60000, dtype=torch.float16),
       bias_out=torch.zeros(4, dtype=torch.float16),
       norm=dataclasses.replace(half, weight=torch.full((4,), 2, dtype=torch.float16)))
expect("shape", "running_mean", "norm", "running_mean",
       changes=dict(running_mean=torch.zeros(5)))
expect("shape", "bias", "layer", "bias", bias_out=torch.zeros(5))
expect("shape", "weight", "layer", "weight", weight=torch.ones(4))
expect("argument", "expected a torch.Tensor", "layer", "weight", weight=[1.0, 2.0])
expect("dtype", "not supported", weight=torch.ones(4, 3, dtype=torch.int64))
expect("dtype", "sparse", weight=torch.ones(4, 3).to_sparse())
expect("argument", "post", "post", "", post=norm(4, torch.float32))
# An expanded weight reaches one element through four indices: it must not
# be scaled in place (the core's FUSION_E_OVERLAP).
expect("overlap", "several indices", weight=torch.ones(1, 3).expand(4, 3))
expect("overlap", "several indices", bias_out=torch.zeros(1).expand(4))
# A Fold dropped without apply() frees what it holds.
for _ in range(100):
    C.prepare(torch.ones(4, 3), None, torch.zeros(4), norm(4, torch.float32),
              before=False, grouped=False, groups=1)
print("every error path raised FoldError with its code, writing nothing")
EOF
echo "== sanitize: all passed"
