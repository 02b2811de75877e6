"""Fold throughput of fusion's C core, in GB/s of weights, against memcpy and
against torch's own fold.

On one large conv weight per shape (``--megabytes`` MiB; a 3x3 and a 1x1
conv by default), each round times, in rotated order:

* ``memcpy (copy_)``: torch's ``dst.copy_(src)`` into an existing, already
  touched tensor of the same size: one read and one write of every byte, the
  physical limit of an in-place fold;
* ``memcpy (memmove)``: ctypes.memmove of the same bytes, single-threaded;
* ``fusion prepare``: ``fusion._C.prepare(...)``, the check phase (reads every
  weight: finiteness and overflow, computes the new bias, writes nothing);
* ``fusion apply``: ``Fold.apply()``, the write phase (reads and writes every
  weight in place). ``fusion total`` is prepare + apply of the same round;
* ``torch fp32 fold``: ``torch.nn.utils.fusion.fuse_conv_bn_weights`` on the
  weight as stored (allocates the fused weight);
* ``torch fp64 fold``: the same fold with every input cast to float64, the
  fused weight cast back to the weight's dtype (what fusion computes, done
  with torch);
* ``torch mul_``: ``w.mul_(scale)`` in place, in the weight's dtype (no
  float64, no checks: the speed of the simplest in-place fold);
* ``first touch``: ``torch.empty_like(w).fill_(0)``, a fresh allocation
  written once. Large blocks come from mmap and go back on free, so this is
  the page-fault cost that every contender which allocates its result pays.

The weight is restored from a pristine copy (untimed) before every fusion and
mul_ call, so each call sees the same values. The cases that allocate nothing
run first, in alternating order; then the allocating ones (torch's folds,
first touch), also alternating: on a VM, freeing a large block slows memory
for a while after, which would otherwise penalise whichever in-place case
came next. GB/s = weight bytes / seconds
(1 GB = 1e9 bytes), median over rounds; the report also gives p25-p75.

A last case folds every Conv+BN pair of a zoo model (``--zoo-model``) layer by
layer through the core, to show the per-call overhead on real layer sizes.

Usage:
    benchmarks/bench_throughput.py --megabytes 256 --threads 1 2 --rounds 5 \
        --out benchmarks/results/raw/throughput.json
"""
import argparse
import ctypes
import gc
import os
import sys
import time

import torch
from torch.nn.utils.fusion import fuse_conv_bn_weights

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from fusion import NormParams  # noqa: E402
from fusion._native import _C  # noqa: E402

CASES = ["memcpy (copy_)", "memcpy (memmove)", "fusion prepare", "fusion apply",
         "torch fp32 fold", "torch fp64 fold", "torch mul_", "first touch"]
#: Cases that allocate a weight-sized result (timed after the in-place ones).
ALLOCATING = {"torch fp32 fold", "torch fp64 fold", "first touch"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def conv_shape(megabytes, kernel, dtype, out_channels):
    """[out, in, k, k] with about ``megabytes`` MiB."""
    per_in = out_channels * kernel * kernel * torch.finfo(dtype).bits // 8
    return (out_channels, max(1, megabytes * 2**20 // per_in), kernel, kernel)


def norm_stats(channels, gen):
    return dict(running_mean=torch.randn(channels, generator=gen) * 0.1,
                running_var=torch.rand(channels, generator=gen) + 0.5,
                norm_weight=torch.rand(channels, generator=gen) + 0.5,
                norm_bias=torch.rand(channels, generator=gen) * 0.4 - 0.2)


def prepare_call(weight, bias_out, stats, eps=1e-5):
    """fusion._C.prepare as fusion/rewrite.py calls it for a Conv with the norm
    after it and no bias."""
    norm = NormParams(stats["running_mean"], stats["running_var"], stats["norm_weight"],
                      stats["norm_bias"], eps)
    return _C.prepare(weight=weight, bias_in=None, bias_out=bias_out, norm=norm,
                      before=False, grouped=False, groups=1)


def torch_fold(w, stats, eps=1e-5, dtype=None):
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    fw, fb = fuse_conv_bn_weights(cast(w), None, cast(stats["running_mean"]),
                                  cast(stats["running_var"]), eps,
                                  cast(stats["norm_weight"]), cast(stats["norm_bias"]))
    if dtype is not None:
        return fw.detach().to(w.dtype), fb.detach().to(w.dtype)
    return fw, fb


def bench_weight(shape, dtype, rounds, cases):
    gen = torch.Generator().manual_seed(0)
    pristine = (torch.randn(shape, generator=gen) * 0.05).to(dtype)
    stats = {k: v.to(dtype) for k, v in norm_stats(shape[0], gen).items()}
    w = pristine.clone()
    dst = torch.empty_like(pristine)
    dst.copy_(pristine)  # touch every page once
    bias = torch.zeros(shape[0], dtype=dtype)
    nbytes = pristine.numel() * pristine.element_size()
    scale = (stats["norm_weight"].double() /
             (stats["running_var"].double() + 1e-5).sqrt()).to(dtype).view(-1, 1, 1, 1)
    held = {}

    def restore(name):
        if name in ("fusion prepare", "torch mul_"):
            w.copy_(pristine)

    def run_prepare(_):
        held["fold"] = prepare_call(w, bias, stats)

    def run_apply(_):
        held.pop("fold").apply()

    fns = {
        "memcpy (copy_)": lambda _: dst.copy_(pristine),
        "memcpy (memmove)": lambda _: ctypes.memmove(dst.data_ptr(), pristine.data_ptr(),
                                                     nbytes),
        "fusion prepare": run_prepare,
        "fusion apply": run_apply,
        "torch fp32 fold": lambda _: torch_fold(pristine, stats),
        "torch fp64 fold": lambda _: torch_fold(pristine, stats, dtype=torch.float64),
        "torch mul_": lambda _: w.mul_(scale),
        "first touch": lambda _: torch.empty_like(pristine).fill_(0),
    }
    # apply must follow its own prepare: they run as one unit, timed apart.
    fused = [c for c in ("fusion prepare", "fusion apply") if c in cases]
    units = [c for c in cases if c not in fused] + (["fusion"] if fused else [])
    # Two phases, each in alternating order: first every case that allocates
    # nothing, then those that allocate (and free) a weight-sized block. On a
    # VM a large free is followed by a while of slow memory (free pages are
    # handed back to the host), which would slow whatever in-place case ran
    # next.
    phases = [[u for u in units if u not in ALLOCATING],
              [u for u in units if u in ALLOCATING]]
    times = {c: [] for c in cases}
    errors = {}
    for phase in phases:
        for r in range(rounds if phase else 0):
            k = r % len(phase)
            for unit in phase[k:] + phase[:k]:
                names = fused if unit == "fusion" else [unit]
                for name in names:
                    if name in errors:
                        break
                    restore(name)
                    t, err = _time(fns[name])
                    if err:
                        errors[name] = err
                        break
                    times[name].append(t)
    if "fusion prepare" in times and "fusion apply" in times:
        times["fusion total"] = [a + b for a, b in zip(times["fusion prepare"],
                                                       times["fusion apply"])]
    return nbytes, times, errors


def _time(fn):
    gc.collect()
    t0 = time.perf_counter()
    try:
        out = fn(None)
    except Exception as exc:
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    dt = time.perf_counter() - t0
    del out
    return dt, None


def bench_zoo(name, rounds, cache_dir):
    """Every Conv+BN pair of a zoo model through the core (prepare + apply, each
    weight restored before), against memcpy and torch's folds of the same
    weights, layer by layer."""
    model = common.build_model(name, cache_dir)
    pairs = common.pairs_for(model)
    items = []
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        w = conv.weight.detach()
        stats = dict(running_mean=bn.running_mean, running_var=bn.running_var,
                     norm_weight=bn.weight.detach(), norm_bias=bn.bias.detach())
        items.append((w.clone(), w, torch.empty_like(w).copy_(w),
                      torch.zeros(w.shape[0]), stats, bn.eps))
    nbytes = sum(i[0].numel() * i[0].element_size() for i in items)
    times = {"memcpy (copy_)": [], "memcpy (memmove)": [], "fusion prepare": [],
             "fusion apply": [], "torch fp32 fold": [], "torch fp64 fold": []}
    cases = [c for c in times if c != "fusion apply"]
    for phase in ([c for c in cases if c not in ALLOCATING],
                  [c for c in cases if c in ALLOCATING]):
        for r in range(rounds):
            k = r % len(phase)
            _zoo_round(phase[k:] + phase[:k], items, times)
    times["fusion total"] = [a + b for a, b in zip(times["fusion prepare"],
                                                   times["fusion apply"])]
    return nbytes, len(items), times


def _zoo_round(order, items, times):
    """One round of bench_zoo: each case over every layer, in this order."""
    for case in order:
        if case == "fusion prepare":
            for w0, w, _, _, _, _ in items:
                w.copy_(w0)
            t0 = time.perf_counter()
            folds = [prepare_call(w, b, s, eps) for _, w, _, b, s, eps in items]
            t1 = time.perf_counter()
            for f in folds:
                f.apply()
            t2 = time.perf_counter()
            times["fusion prepare"].append(t1 - t0)
            times["fusion apply"].append(t2 - t1)
            continue
        t0 = time.perf_counter()
        for w0, _, dst, _, s, eps in items:
            if case == "memcpy (copy_)":
                dst.copy_(w0)
            elif case == "memcpy (memmove)":
                ctypes.memmove(dst.data_ptr(), w0.data_ptr(),
                               w0.numel() * w0.element_size())
            elif case == "torch fp32 fold":
                torch_fold(w0, s, eps)
            else:
                torch_fold(w0, s, eps, dtype=torch.float64)
        times[case].append(time.perf_counter() - t0)


def _row(label, dtype, threads, nbytes, times, errors=None):
    res = {"weight": label, "dtype": dtype, "threads": threads, "bytes": nbytes,
           "cases": {}}
    for name, ts in times.items():
        if ts:
            s = common.summary(ts)
            res["cases"][name] = {"seconds": s, "gbps": nbytes / s["median"] / 1e9,
                                  "gbps_p25": nbytes / s["p75"] / 1e9,
                                  "gbps_p75": nbytes / s["p25"] / 1e9}
    for name, err in (errors or {}).items():
        res["cases"].setdefault(name, {})["error"] = err
    return res


def print_table(rows):
    names = CASES[:4] + ["fusion total"] + CASES[4:]
    out = []
    for r in rows:
        cells = [r["weight"], r["dtype"], r["threads"], f"{r['bytes'] / 2**20:.0f}"]
        for n in names:
            c = r["cases"].get(n, {})
            cells.append(f"{c['gbps']:.2f}" if "gbps" in c else
                         ("fails" if "error" in c else "-"))
        out.append(cells)
    print("GB/s of weights (median)")
    print(common.md_table(["weight", "dtype", "threads", "MiB"] + names, out))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--megabytes", type=int, default=256)
    ap.add_argument("--kernels", type=int, nargs="+", default=[3, 1])
    ap.add_argument("--out-channels", type=int, default=2048)
    ap.add_argument("--dtypes", nargs="+", default=["fp32"], choices=list(DTYPES))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--zoo-model", default="resnet50",
                    help="also fold every pair of this zoo model ('' for none)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default=os.path.join(common.RAW, "throughput.json"))
    args = ap.parse_args(argv)
    env = common.environment(args.threads)
    rows = []
    for threads in args.threads:
        common.set_threads(threads)
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            for k in args.kernels:
                shape = conv_shape(args.megabytes, k, dtype, args.out_channels)
                label = f"conv {k}x{k} [{', '.join(map(str, shape))}]"
                print(f"[throughput] {label} {dname} threads={threads}", flush=True)
                nbytes, times, errors = bench_weight(shape, dtype, args.rounds, CASES)
                rows.append(_row(label, dname, threads, nbytes, times, errors))
        if args.zoo_model:
            print(f"[throughput] {args.zoo_model} layer by layer threads={threads}",
                  flush=True)
            nbytes, n, times = bench_zoo(args.zoo_model, args.rounds, args.cache_dir)
            rows.append(_row(f"{args.zoo_model}, {n} conv weights", "fp32", threads,
                             nbytes, times))
    print_table(rows)
    common.save_json(args.out, env, rows, rounds=args.rounds)


if __name__ == "__main__":
    main()
