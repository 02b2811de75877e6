"""Inference latency of the fused model, against the unfused model and against
the same model with every BatchNorm deleted (nn.Identity, no fold): the speed
limit that a fold can reach.

For each model, thread count and batch size, the variants run one forward
each per round, in rotated order (ABC, BCA, CAB, ...), under
torch.inference_mode(), on one fixed random input of shape [batch, 3, 224,
224], after ``--warmup`` untimed calls each. Rounds continue until
``--rounds`` or until ``--budget`` seconds have passed (at least
``--min-rounds``).

Reported: the median latency of each variant with p10-p90, and the paired
ratios per round (fused / deleted, fused / unfused: two variants timed side
by side in the same round share the machine's load at that moment), as
median and p10-p90. The fused model meets the target when fused / deleted is
within 3%, or its p10-p90 band reaches 1.

Two things keep a correct fold from that limit: norms fusion must leave
(densenet's BatchNorm -> ReLU -> Conv; the row records how many are left), and
data-dependent kernels: deleting the norms changes every activation, and
torch's CPU max-pooling branches on values (googlenet, fused or not, runs 5-8%
slower than with its norms deleted; the same network with the fused values
loaded into the BN-deleted structure is exactly as slow as the fused one).

Usage:
    benchmarks/bench_latency.py --models resnet18 mobilenet_v2 --threads 1 2 \
        --batches 1 8 --out benchmarks/results/raw/latency.json
"""
import argparse
import copy
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

VARIANTS = ["unfused", "fused (fusion)", "BN deleted", "fused (torch.fx)"]


def delete_norms(model):
    """A copy with every BatchNorm (and FrozenBatchNorm2d) replaced by nn.Identity."""
    from fusion.layers import is_norm_module
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if name and is_norm_module(m):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, nn.Identity())
    return model.eval()


def variants(model, names):
    out = {}
    for n in names:
        if n == "unfused":
            out[n] = model
        elif n == "fused (fusion)":
            import fusion
            out[n] = fusion.fuse(model)
        elif n == "BN deleted":
            out[n] = delete_norms(model)
        elif n == "fused (torch.fx)":
            try:
                from torch.fx.experimental.optimization import fuse
                out[n] = fuse(model)
            except Exception as exc:
                print(f"  torch.fx cannot fuse: {type(exc).__name__}", flush=True)
    return out


def _norms(model):
    from fusion.layers import is_norm_module
    return sum(1 for m in model.modules() if is_norm_module(m))


def measure(models, x, rounds, min_rounds, budget, warmup):
    names = list(models)
    times = {n: [] for n in names}
    with torch.inference_mode():
        for n in names:
            for _ in range(warmup):
                models[n](x)
        start = time.perf_counter()
        r = 0
        while r < rounds and (r < min_rounds or time.perf_counter() - start < budget):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                t0 = time.perf_counter()
                models[n](x)
                times[n].append(time.perf_counter() - t0)
            r += 1
    return times


def _ratio(a, b):
    return common.summary([x / y for x, y in zip(a, b)])


def print_table(rows):
    out = []
    for r in rows:
        v = r["variants"]
        cells = [r["model"], r["threads"], r["batch"], r["rounds"]]
        for n in VARIANTS:
            cells.append(f"{v[n]['median'] * 1e3:.2f}" if n in v else "-")
        for key in ("fused/deleted", "fused/unfused"):
            s = r["ratios"].get(key)
            cells.append(f"{s['median']:.3f} [{s['p10']:.3f}, {s['p90']:.3f}]" if s else "-")
        out.append(cells)
    print("latency, ms (median); ratios median [p10, p90] of per-round pairs")
    print(common.md_table(["model", "threads", "batch", "rounds"] +
                          [f"{n} ms" for n in VARIANTS] + ["fused/deleted",
                                                           "fused/unfused"], out))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=common.QUICK_ZOO)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--variants", nargs="+", default=VARIANTS[:3], choices=VARIANTS)
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--min-rounds", type=int, default=7)
    ap.add_argument("--budget", type=float, default=10.0,
                    help="seconds per (model, threads, batch) after the minimum rounds")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default=os.path.join(common.RAW, "latency.json"))
    args = ap.parse_args(argv)
    env = common.environment(args.threads)
    rows = []
    for name in args.models:
        base = common.build_model(name, args.cache_dir)
        models = variants(base, args.variants)
        left = _norms(models["fused (fusion)"]) if "fused (fusion)" in models else None
        for threads in args.threads:
            common.set_threads(threads)
            for batch in args.batches:
                print(f"[latency] {name} threads={threads} batch={batch}", flush=True)
                x = torch.randn(*common.input_shape(name, batch),
                                generator=torch.Generator().manual_seed(0))
                times = measure(models, x, args.rounds, args.min_rounds, args.budget,
                                args.warmup)
                row = {"model": name, "threads": threads, "batch": batch,
                       "norms": _norms(base), "norms_left": left,
                       "rounds": len(next(iter(times.values()))),
                       "variants": {n: common.summary(t) for n, t in times.items()},
                       "ratios": {}}
                f = times.get("fused (fusion)")
                if f and times.get("BN deleted"):
                    row["ratios"]["fused/deleted"] = _ratio(f, times["BN deleted"])
                if f and times.get("unfused"):
                    row["ratios"]["fused/unfused"] = _ratio(f, times["unfused"])
                if times.get("fused (torch.fx)") and times.get("BN deleted"):
                    row["ratios"]["fx/deleted"] = _ratio(times["fused (torch.fx)"],
                                                         times["BN deleted"])
                rows.append(row)
    print_table(rows)
    common.save_json(args.out, env, rows)


if __name__ == "__main__":
    main()
