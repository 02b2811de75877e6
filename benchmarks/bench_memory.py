"""Peak extra memory of one fuse call, as a multiple of the model's bytes.

Each (contender, model) case runs in a fresh process, one at a time: forked
from a multiprocessing fork server that has only imported torch, torchvision
and fusion (no tensor work), which saves the interpreter start and imports of
every case; ``--spawn`` starts a whole new interpreter per case instead (this
script with ``--one``). In the process:

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

With ``--repeats N`` every case runs N times (rounds over all contenders,
alternating); the reported case is the run with the median peak, with the
smallest and largest peak beside it. torch's fusers allocate and free as they
go, so their peak depends on whether the allocator reuses freed blocks, and
varies from run to run; fusion's does not.

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


def _child(key, name, cache_dir, conn):
    try:
        conn.send(one(key, name, cache_dir))
    except BaseException as exc:
        conn.send({"contender": key, "model": name,
                   "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
    finally:
        conn.close()


def run_forked(key, name, cache_dir, timeout):
    import multiprocessing as mp
    ctx = mp.get_context("forkserver")
    # Modules on the default sys.path only: Python 3.11's fork server imports
    # its preload list before it applies the parent's sys.path.
    ctx.set_forkserver_preload(["torch", "torchvision", "torch.fx", "fusion"])
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(key, name, cache_dir, send))
    proc.start()
    send.close()
    result = None
    if recv.poll(timeout):
        try:
            result = recv.recv()
        except EOFError:
            pass
    proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return {"contender": key, "model": name, "error": f"timed out after {timeout} s"}
    if result is None:
        return {"contender": key, "model": name,
                "error": f"child exited {proc.exitcode} without a result"}
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


def _representative(results):
    """The run with the median peak, with the range over all runs."""
    good = sorted((r for r in results if "error" not in r), key=lambda r: r["peak_ratio"])
    if not good:
        return results[-1]
    rep = dict(good[(len(good) - 1) // 2])
    rep.update(runs=len(results), failed_runs=len(results) - len(good),
               peak_ratio_min=good[0]["peak_ratio"], peak_ratio_max=good[-1]["peak_ratio"])
    return rep


def print_table(rows, keys, models):
    by = {(r["model"], r["contender"]): r for r in rows}
    out = []
    for name in models:
        cells = [name]
        for k in keys:
            r = by.get((name, k), {})
            if "peak_ratio" in r and "error" not in r:
                spread = f" ({r['peak_ratio_min']:.2f}-{r['peak_ratio_max']:.2f})" \
                    if r.get("runs", 1) > 1 else ""
                cells.append(f"{r['peak_ratio']:.3f}{spread}")
            else:
                cells.append("fails")
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
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--spawn", action="store_true",
                    help="a new interpreter per case instead of a fork-server child")
    ap.add_argument("--out", default=os.path.join(common.RAW, "memory.json"))
    ap.add_argument("--one", nargs=2, metavar=("CONTENDER", "MODEL"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], args.cache_dir)), flush=True)
        return
    env = common.environment([1])
    env["peak_method"] = "VmHWM after clear_refs" if _reset_peak() else "sampled VmRSS"
    env["process_per_case"] = "spawned interpreter" if args.spawn else "fork-server child"
    run = run_case if args.spawn else run_forked
    rows = []
    for name in args.models:
        if common.parse_synthetic(name) is None:
            common.build_model(name, args.cache_dir)  # fill the cache once
        runs = {key: [] for key in args.contenders}
        for r in range(args.repeats):
            for key in args.contenders:
                print(f"[memory] {name} {key}" + (f" run {r + 1}" if args.repeats > 1
                                                  else ""), flush=True)
                runs[key].append(run(key, name, args.cache_dir, args.timeout))
        for key in args.contenders:
            rows.append(_representative(runs[key]))
    print_table(rows, args.contenders, args.models)
    common.save_json(args.out, env, rows)


if __name__ == "__main__":
    main()
