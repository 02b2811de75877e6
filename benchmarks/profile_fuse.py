"""Where fuse() spends its time: a per-phase profile of fusion.fuse (copy and
in place) and of torch.fx's fuse, on one model (resnet50 by default).

Phases are timed with perf_counter wrappers installed around the functions
each fuser calls (in this process only; nothing in fusion/ is changed), so
there is no profiler overhead in the phase times:

* fusion: deepcopy, discover (torch.fx trace into a flow),
  plan, prepare (Python part) and the core's ``_C.prepare`` (check: reads
  every weight), report, write (Python part) and the core's ``Fold.apply``
  (writes every weight), and the rest of fuse().
* torch.fx fuse: deepcopy of the model, symbolic_trace, deepcopy of the
  graph, fuse_conv_bn_eval (the fold), replace_node_module, GraphModule.

Each fuser runs ``--rounds`` times on a fresh copy, in alternating order; the
median of each phase is reported. Then one cProfile run of fusion's fuse
prints the functions with the largest own time (profiler overhead included).

Usage:
    benchmarks/profile_fuse.py --model resnet50 --rounds 5 \
        --out benchmarks/results/raw/profile.json
"""
import argparse
import copy
import cProfile
import io
import os
import pstats
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import fusion  # noqa: E402
import fusion.api  # noqa: E402
import fusion.rewrite  # noqa: E402


class Phases:
    """Accumulates wall time per phase for one call of a fuser."""

    def __init__(self):
        self.t = defaultdict(float)
        self.patched = []

    def wrap(self, owner, attr, phase, pick=None):
        original = getattr(owner, attr)
        acc = self.t

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                acc[pick(args) if pick else phase] += time.perf_counter() - t0

        setattr(owner, attr, timed)
        self.patched.append((owner, attr, original))

    def restore(self):
        for owner, attr, original in reversed(self.patched):
            setattr(owner, attr, original)
        self.patched.clear()


class _TimedFold:
    def __init__(self, handle, acc):
        self._h, self._acc = handle, acc

    def apply(self):
        t0 = time.perf_counter()
        try:
            return self._h.apply()
        finally:
            self._acc["core apply (Fold.apply)"] += time.perf_counter() - t0

    def __getattr__(self, name):
        return getattr(self._h, name)


class _TimedC:
    """Stands in for fusion._C inside fusion.rewrite: times prepare, and
    returns Fold handles whose apply() is timed."""

    def __init__(self, real, acc):
        self._real, self._acc = real, acc

    def prepare(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return _TimedFold(self._real.prepare(*args, **kwargs), self._acc)
        finally:
            self._acc["core check (_C.prepare)"] += time.perf_counter() - t0

    def __getattr__(self, name):
        return getattr(self._real, name)


FUSION_PHASES = ["deepcopy", "discover (fx trace)", "plan",
                 "prepare (Python)", "core check (_C.prepare)", "report",
                 "write (Python)", "core apply (Fold.apply)", "other"]
FX_PHASES = ["deepcopy (model)", "symbolic_trace", "deepcopy (graph)",
             "fuse_conv_bn_eval", "replace_node_module", "GraphModule", "other"]


def profile_fusion(model, inplace):
    ph = Phases()
    api, rw = fusion.api, fusion.rewrite
    real_copy = api.copy
    api.copy = type("copy", (), {"deepcopy": staticmethod(real_copy.deepcopy)})
    ph.wrap(api.copy, "deepcopy", "deepcopy")
    ph.wrap(api, "flow_from_fx", "discover (fx trace)")
    ph.wrap(api, "make_plan", "plan")
    ph.wrap(rw, "prepare", "prepare")
    ph.wrap(api, "_report", "report")
    ph.wrap(rw, "write", "write")
    real_c = rw._C
    rw._C = _TimedC(real_c, ph.t)
    try:
        t0 = time.perf_counter()
        fusion.fuse(model, inplace=inplace)
        total = time.perf_counter() - t0
    finally:
        ph.restore()
        api.copy = real_copy
        rw._C = real_c
    t = dict(ph.t)
    t["prepare (Python)"] = t.pop("prepare", 0.0) - t.get("core check (_C.prepare)", 0.0)
    t["write (Python)"] = t.pop("write", 0.0) - t.get("core apply (Fold.apply)", 0.0)
    t["other"] = total - sum(t.values())
    t["total"] = total
    return t


def profile_fx(model, inplace):
    import torch.fx.experimental.optimization as opt
    ph = Phases()
    real_copy = opt.copy
    opt.copy = type("copy", (), {"deepcopy": staticmethod(real_copy.deepcopy)})
    ph.wrap(opt.copy, "deepcopy", None,
            pick=lambda a: "deepcopy (graph)" if isinstance(a[0], torch.fx.Graph)
            else "deepcopy (model)")
    ph.wrap(opt.fx, "symbolic_trace", "symbolic_trace")
    ph.wrap(opt, "fuse_conv_bn_eval", "fuse_conv_bn_eval")
    ph.wrap(opt, "replace_node_module", "replace_node_module")
    ph.wrap(opt.fx, "GraphModule", "GraphModule")
    try:
        t0 = time.perf_counter()
        opt.fuse(model, inplace=inplace)
        total = time.perf_counter() - t0
    finally:
        ph.restore()
        opt.copy = real_copy
    t = dict(ph.t)
    t["other"] = total - sum(t.values())
    t["total"] = total
    return t


def cprofile_top(model, inplace, top):
    pr = cProfile.Profile()
    pr.enable()
    fusion.fuse(model, inplace=inplace)
    pr.disable()
    buf = io.StringIO()
    st = pstats.Stats(pr, stream=buf)
    st.sort_stats("tottime").print_stats(top)
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, _) in sorted(
            st.stats.items(), key=lambda kv: -kv[1][2])[:top]:
        where = os.path.relpath(file, common.ROOT) if file.startswith(common.ROOT) \
            else os.path.basename(file)
        rows.append({"function": f"{where}:{line}({fn})", "calls": nc, "tottime": tt,
                     "cumtime": ct})
    return rows, st.total_tt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default=os.path.join(common.RAW, "profile.json"))
    args = ap.parse_args(argv)
    common.set_threads(args.threads)
    env = common.environment([args.threads])
    base = common.build_model(args.model, args.cache_dir)
    runs = {"fusion copy": lambda m: profile_fusion(m, False),
            "fusion in place": lambda m: profile_fusion(m, True),
            "torch.fx copy": lambda m: profile_fx(m, False),
            "torch.fx in place": lambda m: profile_fx(m, True)}
    samples = defaultdict(list)
    for name, fn in runs.items():  # warm-up: imports, code caches
        fn(copy.deepcopy(base))
    names = list(runs)
    for r in range(args.rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(runs[name](copy.deepcopy(base)))
    result = {"model": args.model, "model_bytes": common.model_bytes(base),
              "rounds": args.rounds, "phases": {}}
    for name in names:
        keys = FUSION_PHASES if name.startswith("fusion") else FX_PHASES
        result["phases"][name] = {k: common.summary([s.get(k, 0.0) for s in samples[name]])
                                  ["median"] for k in keys + ["total"]}
    top, total = cprofile_top(copy.deepcopy(base), False, args.top)
    result["cprofile_copy"] = {"total": total, "top": top}
    for name in names:
        p = result["phases"][name]
        rows = [[k, f"{v * 1e3:.1f}", f"{v / p['total']:.0%}"] for k, v in p.items()]
        print(f"{name}, {args.model}: median ms per phase")
        print(common.md_table(["phase", "ms", "share"], rows))
    print("cProfile of fusion.fuse (copy), own time:")
    print(common.md_table(["function", "calls", "tottime ms", "cumtime ms"],
                          [[r["function"], r["calls"], f"{r['tottime'] * 1e3:.1f}",
                            f"{r['cumtime'] * 1e3:.1f}"] for r in top]))
    common.save_json(args.out, env, result)


if __name__ == "__main__":
    main()
