"""fuse() wall time of fusion and of torch's fusers, on the same models.

For every model, each contender (benchmarks/common.py: CONTENDERS) fuses a
fresh deep copy of the model (the copy is made untimed, so in-place contenders
never see a model another one changed). The contenders run in alternating,
rotated order (ABCD, BCDA, ...) for ``--rounds`` rounds and the median and
quartiles of each are reported. gc.collect() and malloc_trim(0) run before
every timed call, so that each call faults in the pages it allocates (a
deep copy of resnet50 is 98 MiB) instead of getting the ones the case before
it happened to leave free (common.interleaved: trim).

A bare ``copy.deepcopy`` of the model is timed in the same rotation: copy
mode's reference (deepcopy plus the in-place fuse).

The result of each contender's first timed call is checked (untimed): how
many BatchNorm modules it left, and the relative output error against the
original model on one small random input (a wrong fold shows up here).

Usage:
    benchmarks/bench_fuse_time.py --models resnet18 synthetic-64MB --rounds 5 \
        --threads 1 --out benchmarks/results/raw/fuse_time.json
"""
import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def _rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / a.norm())


def _probe_input(name, model):
    gen = torch.Generator().manual_seed(1)
    if common.parse_synthetic(name) is not None:
        return torch.randn(1, model[0].in_channels, 4, 4, generator=gen)
    return torch.randn(1, 3, 96, 96, generator=gen)


def bench_model(name, rounds, keys, cache_dir):
    base = common.build_model(name, cache_dir)
    pairs = common.pairs_for(base)
    row = {"model": name, "model_bytes": common.model_bytes(base),
           "bn": common.count_bn(base), "pairs_for_fuse_modules": len(pairs),
           "threads": torch.get_num_threads(), "contenders": {k: {} for k in keys}}
    x = _probe_input(name, base)
    with torch.no_grad():
        y = base(x)

    def check(key, fused):
        """BatchNorms left and output error of a contender's first result."""
        c = row["contenders"][key]
        if "bn_left" not in c:
            with torch.no_grad():
                c["bn_left"] = common.count_bn(fused)
                c["rel_err"] = _rel_err(y, fused(x))

    cases = {k: (lambda m, k=k: common.BY_KEY[k](m, pairs)) for k in keys}
    # The reference of copy mode: a bare deep copy, timed in the same rotation.
    cases[DEEPCOPY] = copy.deepcopy
    times, errors = common.interleaved(
        cases, rounds, setup=lambda k: common.fresh(base),
        teardown=lambda k, out: None if k == DEEPCOPY else check(k, out), trim=True)
    for k in keys:
        c = row["contenders"][k]
        if k in errors:
            c["error"] = errors[k]
        if times.get(k):
            c["seconds"] = common.summary(times[k])
    if times.get(DEEPCOPY):
        row["deepcopy_seconds"] = common.summary(times[DEEPCOPY])
    return row


DEEPCOPY = "deepcopy"


def print_table(rows, keys):
    header = ["model", "MB", "threads"] + keys
    out = []
    for r in rows:
        cells = [r["model"], f"{r['model_bytes'] / 2**20:.0f}", r["threads"]]
        for k in keys:
            c = r["contenders"][k]
            cells.append(f"{c['seconds']['median'] * 1e3:.1f}" if "seconds" in c
                         else "fails")
        out.append(cells)
    print(common.md_table(header, out))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=common.QUICK_ZOO)
    ap.add_argument("--contenders", nargs="+", default=common.contender_names(),
                    choices=common.contender_names())
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--cache-dir", default=None, help="where built zoo models are kept")
    ap.add_argument("--out", default=os.path.join(common.RAW, "fuse_time.json"))
    args = ap.parse_args(argv)
    env = common.environment(args.threads)
    rows = []
    for threads in args.threads:
        common.set_threads(threads)
        for name in args.models:
            print(f"[fuse_time] {name} threads={threads}", flush=True)
            rows.append(bench_model(name, args.rounds, args.contenders, args.cache_dir))
    print_table(rows, args.contenders)
    common.save_json(args.out, env, rows, rounds=args.rounds)


if __name__ == "__main__":
    main()
