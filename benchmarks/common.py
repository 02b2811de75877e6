"""Shared pieces of the benchmark scripts: the environment record, interleaved
timing, the models (torchvision zoo and synthetic Conv2d+BatchNorm2d stacks),
and the contenders (fusion and the fusers it is compared with).

Nothing here measures anything by itself; see the bench_*.py scripts.
"""
import copy
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
RAW = os.path.join(RESULTS, "raw")
sys.path.insert(0, os.path.join(ROOT, "tests"))  # zoo.py and exact.py live there
# fusion is the one installed in this venv (`make install`): the source tree's
# fusion/ holds no extension, so ROOT stays off sys.path.

import fusion  # noqa: E402
import fusion._tools.machine  # noqa: E402
import zoo  # noqa: E402

#: The representative subset of the zoo run in quick mode.
QUICK_ZOO = ["resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0"]
FULL_ZOO = list(zoo.ZOO)


# --- Environment ---------------------------------------------------------------


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit():
    try:
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--",
                                "fusion", "csrc"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return rev + (" (fusion/ or csrc/ modified)" if dirty else "")
    except Exception:
        return "unknown"


def environment(threads):
    """What a result depends on: torch, threads, BLAS, machine, date, load."""
    machine = fusion._tools.machine.environment()
    try:
        import torchvision
        tv = torchvision.__version__
    except Exception:
        tv = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "torchvision": tv,
        "python": platform.python_version(),
        "threads": threads,
        "blas": machine.blas_library,  # the threads are the row's, set per case
        "blas_libraries": [{k: i.get(k) for k in ("internal_api", "version",
                                                  "num_threads", "filepath")}
                           for i in machine.blas_libraries],
        "torch_blas_info": machine.blas_info,
        "torch_parallel": "OpenMP" if "OpenMP" in torch.__config__.parallel_info()
        else "other",
        "cpu": _cpu_model(),
        "nproc": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "commit": _git_commit(),
        "argv": sys.argv[1:],
    }


def blas_label(env):
    """One truthful name for the BLAS a result ran on (fusion._tools.machine);
    results written before it was recorded name Debian's alternatives link."""
    if env.get("blas"):
        return env["blas"]
    info = env.get("torch_blas_info")
    if info in (None, "generic") and env.get("blas_alternative"):
        return os.path.basename(os.path.dirname(str(env["blas_alternative"])))
    return f"{info} (built into torch)" if info else "unknown"


def set_threads(n):
    """torch's intra-op threads and every BLAS pool's; with libgomp this also sets
    the OpenMP thread count that fusion's core uses for large folds."""
    fusion._tools.machine.set_threads(n)
    return torch.get_num_threads()


def save_json(path, env, results, **extra):
    env = dict(env, loadavg_end=os.getloadavg())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(dict(environment=env, results=results, **extra), f, indent=1,
                  default=str)
    print(f"wrote {path}")


def load_json(path):
    with open(path) as f:
        return json.load(f)


# --- Timing --------------------------------------------------------------------


def summary(xs):
    """median, quartiles and p10/p90 of a list of numbers (linear interpolation)."""
    xs = sorted(xs)
    if not xs:
        return None

    def q(p):
        k = (len(xs) - 1) * p
        lo = int(k)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    return {"n": len(xs), "median": statistics.median(xs), "p10": q(0.1),
            "p25": q(0.25), "p75": q(0.75), "p90": q(0.9), "min": xs[0], "max": xs[-1]}


def _malloc_trim():
    """Gives the heap's free pages back to the OS (glibc), so that the next
    allocation faults its pages in whatever freed memory came before it."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def interleaved(cases, rounds, setup=None, teardown=None, trim=False):
    """Times each case once per round, in alternating order (ABAB, rotated each
    round so that no case always runs first or last).

    Args:
        cases: dict name -> callable(arg) to time.
        rounds: number of rounds.
        setup: optional callable(name) -> arg, run untimed before each call.
        teardown: optional callable(name, result), run untimed after each call.
        trim: malloc_trim(0) after gc.collect(), before each timed call. The
            rotation gives each case the same predecessor in every round, and
            without it a case that allocates hundreds of MiB gets whatever
            pages its predecessor left free: faulted in already, or not.

    Returns:
        dict name -> list of seconds, and dict name -> error string for a case
        that raised (it is then dropped from later rounds).
    """
    names = list(cases)
    times = {n: [] for n in names}
    errors = {}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if name in errors:
                continue
            arg = setup(name) if setup else None
            gc.collect()
            if trim:
                _malloc_trim()
            t0 = time.perf_counter()
            try:
                out = cases[name](arg)
            except Exception as exc:  # a contender that cannot fuse this model
                errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}" \
                    if str(exc) else type(exc).__name__
                continue
            times[name].append(time.perf_counter() - t0)
            if teardown:
                teardown(name, out)
            del out, arg
    return times, errors


# --- Models --------------------------------------------------------------------


def synthetic_stack(megabytes, channels=512, kernel=3, seed=0):
    """nn.Sequential of (Conv2d, BatchNorm2d, ReLU) blocks holding at least
    ``megabytes`` MiB of float32 conv weights, with random weights and
    plausible statistics (no calibration: only the fold is measured on it)."""
    gen = torch.Generator().manual_seed(seed)
    per = channels * channels * kernel * kernel * 4
    n = max(1, -(-megabytes * 2**20 // per))
    layers = []
    for _ in range(n):
        conv = nn.utils.skip_init(nn.Conv2d, channels, channels, kernel,
                                  padding=kernel // 2, bias=False)
        bound = (6.0 / (channels * kernel * kernel)) ** 0.5  # He-uniform, cheap to draw
        with torch.no_grad():
            conv.weight.uniform_(-bound, bound, generator=gen)
        bn = nn.BatchNorm2d(channels)
        with torch.no_grad():
            bn.running_mean.normal_(0, 0.1, generator=gen)
            bn.running_var.uniform_(0.5, 1.5, generator=gen)
            bn.weight.uniform_(0.5, 1.5, generator=gen)
            bn.bias.uniform_(-0.2, 0.2, generator=gen)
        layers += [conv, bn, nn.ReLU(inplace=True)]
    return nn.Sequential(*layers).eval()


def synthetic_name(megabytes):
    return f"synthetic-{megabytes}MB"


def parse_synthetic(name):
    m = re.fullmatch(r"synthetic-(\d+)MB", name)
    return int(m.group(1)) if m else None


def build_model(name, cache_dir=None):
    """A zoo model (fusion._tools.models: random weights, calibrated BatchNorm)
    or a synthetic stack ("synthetic-256MB"). Zoo models are cached in
    cache_dir as pickled modules, so that subprocesses need not calibrate again
    (this run wrote them: loading them whole, weights_only=False, is safe)."""
    mb = parse_synthetic(name)
    if mb is not None:
        return synthetic_stack(mb)
    return cached_model(cache_dir, f"{name}.pt", lambda: zoo.build(name)).eval()


def cached_model(cache_dir, filename, make):
    """``make()``, kept in ``cache_dir/filename`` as a pickled module and loaded
    from there when a previous step of this run wrote it (so loading it whole,
    weights_only=False, is safe); with no cache_dir, just ``make()``."""
    path = os.path.join(cache_dir, filename) if cache_dir else None
    if path and os.path.exists(path):
        return torch.load(path, weights_only=False).eval()
    model = make()
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + f".{os.getpid()}.tmp"
        torch.save(model, tmp)
        os.replace(tmp, path)
    return model


def model_bytes(model):
    """Bytes of the model's parameters and buffers, each storage counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        storage = t.untyped_storage() if hasattr(t, "untyped_storage") else t.storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def input_shape(name, batch=1):
    return (batch, 3, 224, 224)


def count_bn(model):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


# --- Contenders ----------------------------------------------------------------

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d,
        nn.Linear: nn.BatchNorm1d}


def pairs_for(model):
    """(conv name, bn name) pairs that torch's module-level fusers can take:
    the pairs fusion.analyze proves, with the norm after a plain Conv or
    Linear of the matching dimension. The names are what fuse_modules needs."""
    report = fusion.analyze(model)
    pairs = []
    for p in report.fused:
        if p.direction != "after":
            continue
        layer, norm = model.get_submodule(p.layer), model.get_submodule(p.norm)
        bn_cls = _BNS.get(type(layer))
        if bn_cls is not None and type(norm) is bn_cls:
            pairs.append([p.layer, p.norm])
    return pairs


def _set(model, name, module):
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def naive_fuse(model):
    """The naive fuser: every Conv child directly followed by a BatchNorm child
    of the same parent is replaced by fuse_conv_bn_eval(conv, bn), the norm
    by nn.Identity. It trusts the order of children, not the data flow."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    for parent in list(model.modules()):
        names = list(parent._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = parent._modules[a], parent._modules[b]
            if isinstance(conv, _CONVS) and isinstance(bn, nn.modules.batchnorm._BatchNorm) \
                    and bn.track_running_stats:
                parent._modules[a] = fuse_conv_bn_eval(conv, bn)
                parent._modules[b] = nn.Identity()
    return model


def diag_fold(conv, bn):
    """The fold found in detector code: a new conv whose weight is
    diag(scale) @ W viewed as [out, rest], with torch.mm."""
    fused = type(conv)(conv.in_channels, conv.out_channels, kernel_size=conv.kernel_size,
                       stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                       groups=conv.groups, bias=True, padding_mode=conv.padding_mode,
                       ).requires_grad_(False).to(conv.weight.device, conv.weight.dtype)
    w_conv = conv.weight.clone().view(conv.out_channels, -1)
    w_bn = torch.diag(bn.weight.div(torch.sqrt(bn.eps + bn.running_var)))
    fused.weight.copy_(torch.mm(w_bn, w_conv).view(fused.weight.shape))
    b_conv = torch.zeros(conv.weight.size(0), device=conv.weight.device,
                         dtype=conv.weight.dtype) if conv.bias is None else conv.bias
    b_bn = bn.bias - bn.weight.mul(bn.running_mean).div(torch.sqrt(bn.running_var + bn.eps))
    fused.bias.copy_(torch.mm(w_bn, b_conv.reshape(-1, 1)).reshape(-1) + b_bn)
    return fused


def diag_fuse(model, pairs):
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            conv = model.get_submodule(conv_name)
            if not isinstance(conv, _CONVS):
                continue
            _set(model, conv_name, diag_fold(conv, model.get_submodule(bn_name)))
            _set(model, bn_name, nn.Identity())
    return model


def _fx_fuse(model, inplace):
    from torch.fx.experimental.optimization import fuse
    return fuse(model, inplace=inplace)


def _fuse_modules(model, pairs, inplace):
    from torch.ao.quantization import fuse_modules
    return fuse_modules(model, pairs, inplace=inplace)


class Contender:
    """One way of fusing. ``mode`` is "copy" (the argument is left unchanged and
    a fused copy returned) or "inplace" (the argument itself is changed)."""

    def __init__(self, key, label, mode, fn):
        self.key, self.label, self.mode, self.fn = key, label, mode, fn

    def __call__(self, model, pairs):
        return self.fn(model, pairs)


CONTENDERS = [
    Contender("fusion_copy", "fusion", "copy", lambda m, p: fusion.fuse(m)),
    Contender("fusion_inplace", "fusion", "inplace",
              lambda m, p: fusion.fuse(m, inplace=True)),
    Contender("fx_copy", "torch.fx fuse", "copy", lambda m, p: _fx_fuse(m, False)),
    Contender("fx_inplace", "torch.fx fuse", "inplace", lambda m, p: _fx_fuse(m, True)),
    Contender("fuse_modules_copy", "fuse_modules", "copy",
              lambda m, p: _fuse_modules(m, p, False)),
    Contender("fuse_modules_inplace", "fuse_modules", "inplace",
              lambda m, p: _fuse_modules(m, p, True)),
    Contender("naive_inplace", "naive fuse_conv_bn_eval loop", "inplace",
              lambda m, p: naive_fuse(m)),
    Contender("diag_inplace", "diag-matrix mm fold", "inplace", diag_fuse),
]
BY_KEY = {c.key: c for c in CONTENDERS}


def contender_names():
    return [c.key for c in CONTENDERS]


def fresh(model):
    """An independent copy to fuse, so that in-place contenders never see a
    model another contender changed."""
    return copy.deepcopy(model)


def md_table(header, rows, align=None):
    """A markdown table as a string."""
    align = align or ["---"] + ["--:"] * (len(header) - 1)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)
