"""Peak extra memory of one fuse call, as a multiple of the model's bytes.

Each (contender, model) case runs in a fresh subprocess (this script with
``--one``), one at a time:

1. build the model (zoo models come from the cache that run.py fills) and
   compute fuse_modules' pairs; fuse a tiny Conv+BN model once with the same
   contender, so that one-time costs (imports, code caches) are not counted;
2. gc.collect() and malloc_trim(0), so that freed heap is given back; the
   baseline is VmRSS now;
3. reset the peak (VmHWM) to the current RSS by writing 5 to
   /proc/self/clear_refs (Linux >= 4.0). Where that is refused, a thread
   samples VmRSS every millisecond instead (it can miss short peaks; the
   result says which method was used);
4. fuse once, keeping the result alive; peak extra = VmHWM - baseline, and
   retained = VmRSS - baseline after the call.

Model bytes count every parameter and buffer storage once. The fused copy of
a copy-mode contender is part of its peak, so copy mode cannot be below 1x.

Usage:
    benchmarks/bench_memory.py --models resnet50 synthetic-256MB \
        --out benchmarks/results/raw/memory.json
"""
import argparse
import ctypes
import gc
import json
import os
import re
import subprocess
import sys
import threading
import time

from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def _status_kb(field):
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) * 1024


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = _status_kb("VmRSS"), False

    def run(self):
        while not self.stop:
            self.peak = max(self.peak, _status_kb("VmRSS"))
            time.sleep(0.001)


def _tiny():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()


def one(key, name, cache_dir):
    """Runs in the child: measures one case, returns a dict."""
    common.set_threads(1)
    contender = common.BY_KEY[key]
    model = common.build_model(name, cache_dir)
    pairs = common.pairs_for(model)
    contender(_tiny(), [["0", "1"]])  # one-time costs, not proportional to the model
    size = common.model_bytes(model)
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    baseline = _status_kb("VmRSS")
    method = "VmHWM" if _reset_peak() else "sampled"
    sampler = None
    if method == "sampled":
        sampler = _Sampler()
        sampler.start()
    error = None
    try:
        out = contender(model, pairs)
    except Exception as exc:
        out, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    if sampler is not None:
        sampler.stop = True
        sampler.join()
        peak = sampler.peak
    else:
        peak = _status_kb("VmHWM")
    after = _status_kb("VmRSS")
    del out
    result = {"contender": key, "model": name, "model_bytes": size,
              "baseline_rss": baseline, "peak_rss": peak, "peak_extra": peak - baseline,
              "retained": after - baseline, "peak_ratio": (peak - baseline) / size,
              "method": method}
    if error:
        result["error"] = error
    return result


def run_case(key, name, cache_dir, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), "--one", key, name]
    if cache_dir:
        cmd += ["--cache-dir", cache_dir]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"contender": key, "model": name, "error": f"timed out after {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"contender": key, "model": name,
                "error": f"child exited {proc.returncode}: {tail[:200]}"}
    return json.loads(lines[-1])


def print_table(rows, keys, models):
    by = {(r["model"], r["contender"]): r for r in rows}
    out = []
    for name in models:
        cells = [name]
        for k in keys:
            r = by.get((name, k), {})
            cells.append(f"{r['peak_ratio']:.3f}" if "peak_ratio" in r and "error" not in r
                         else "fails")
        out.append(cells)
    print("peak extra memory / model bytes")
    print(common.md_table(["model"] + keys, out))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=common.QUICK_ZOO)
    ap.add_argument("--contenders", nargs="+", default=common.contender_names(),
                    choices=common.contender_names())
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", default=os.path.join(common.RAW, "memory.json"))
    ap.add_argument("--one", nargs=2, metavar=("CONTENDER", "MODEL"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], args.cache_dir)), flush=True)
        return
    env = common.environment([1])
    env["peak_method"] = "VmHWM after clear_refs" if _reset_peak() else "sampled VmRSS"
    rows = []
    for name in args.models:
        if common.parse_synthetic(name) is None:
            common.build_model(name, args.cache_dir)  # fill the cache once
        for key in args.contenders:
            print(f"[memory] {name} {key}", flush=True)
            rows.append(run_case(key, name, args.cache_dir, args.timeout))
    print_table(rows, args.contenders, args.models)
    common.save_json(args.out, env, rows)


if __name__ == "__main__":
    main()
