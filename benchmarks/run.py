"""Runs every benchmark and writes the committed report, in one command.

    benchmarks/run.py --quick   # `make bench`: a representative subset, minutes
    benchmarks/run.py --full    # `make bench-full`: the whole zoo, 1 GiB stack

Each step is its own script (see its docstring for what it measures and how),
run in its own process, one after another, writing raw JSON into
benchmarks/results/raw/; benchmarks/report.py then writes
benchmarks/results/RESULTS.md, README-table.md and the PNG plots. A step that
fails is reported and the others still run. Zoo models are built once
(tests/zoo.py: random weights, calibrated BatchNorm) and cached for the run.

Timings depend on the machine's load: run it on a quiet machine.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

QUICK_ZOO = ["resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0"]
PROFILED = [("profile", "resnet50"), ("profile_mobilenet_v2", "mobilenet_v2"),
            ("profile_efficientnet_b0", "efficientnet_b0")]


def full_zoo():
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    import zoo
    return list(zoo.ZOO)


def steps(mode, raw):
    """(name, script, arguments) of every step of a mode."""
    quick = mode == "quick"
    zoo = QUICK_ZOO if quick else full_zoo()
    sizes = [16, 64, 256] if quick else [16, 64, 256, 1024]
    synth = [f"synthetic-{s}MB" for s in sizes]
    big = synth[-1]

    def out(name):
        return ["--out", os.path.join(raw, f"{name}.json")]

    return [
        # fuse() on a zoo model is mostly single-threaded Python; threads matter
        # only for the large folds of the synthetic stacks (OpenMP in the core,
        # torch's own kernels).
        ("fuse_time", "bench_fuse_time.py",
         ["--models", *zoo, "--rounds", "5" if quick else "7", "--threads", "1"]
         + out("fuse_time")),
        ("fuse_time_synthetic", "bench_fuse_time.py",
         ["--models", *synth, "--rounds", "3" if quick else "5",
          "--threads", *(["1"] if quick else ["1", "2"])] + out("fuse_time_synthetic")),
        ("memory", "bench_memory.py",
         ["--models", *zoo, *([big] if quick else ["synthetic-256MB", big]),
          "--repeats", "3"] + out("memory")),
        ("throughput", "bench_throughput.py",
         ["--megabytes", "128" if quick else "256", "--threads", "1", "2",
          "--rounds", "3" if quick else "7",
          "--dtypes", *(["fp32"] if quick else ["fp32", "bf16", "fp16"])]
         + out("throughput")),
        ("latency", "bench_latency.py",
         ["--models", *zoo, "--threads", "1", "2", "--batches", "1", "8"]
         + (["--budget", "3", "--min-rounds", "5", "--rounds", "21"] if quick else
            ["--budget", "15", "--min-rounds", "9", "--rounds", "41", "--variants",
             "unfused", "fused (fusion)", "BN deleted", "fused (torch.fx)"])
         + out("latency")),
        ("precision", "bench_precision.py",
         ["--models", *(["resnet18", "resnet50"] if quick else zoo)] + out("precision")),
        # resnet50 (with a cProfile), and the two models whose folds are smallest
        *[(name, "profile_fuse.py", ["--model", model, "--rounds", "3" if quick else "7"]
           + out(name)) for name, model in PROFILED],
        # ultralytics YOLO against its own model.fuse(): fuse time and latency
        # (batch 1, fp32, 1 thread); records "skipped" where ultralytics is missing
        ("yolo", "bench_yolo.py",
         ["--models", "yolov8n", "yolo11n", "--threads", "1",
          "--rounds", "5" if quick else "9", "--latency-rounds", "21" if quick else "41",
          "--budget", "4" if quick else "15"] + out("yolo")),
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_const", dest="mode", const="quick")
    group.add_argument("--full", action="store_const", dest="mode", const="full")
    ap.add_argument("--only", nargs="+", default=None,
                    help="run only these steps (the report uses whatever raw files exist)")
    ap.add_argument("--raw", default=os.path.join(HERE, "results", "raw"))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--oldest-raw", default=None,
                    help="raw results of the oldest torch (make bench writes them first), "
                         "for the report's side-by-side table")
    ap.add_argument("--no-report", action="store_true",
                    help="write the raw results only")
    ap.add_argument("--cache-dir", default=None,
                    help="keep built zoo models here (default: a temporary directory)")
    args = ap.parse_args(argv)
    mode = args.mode or "quick"
    os.makedirs(args.raw, exist_ok=True)
    cache = args.cache_dir or tempfile.mkdtemp(prefix="fusion-bench-")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    failed = []
    try:
        for name, script, extra in steps(mode, args.raw):
            if args.only and name not in args.only:
                continue
            cmd = [sys.executable, os.path.join(HERE, script), "--cache-dir", cache] + extra
            root = os.path.dirname(HERE) + os.sep
            shown = " ".join(c[len(root):] if c.startswith(root) else c for c in cmd[1:])
            print(f"\n=== {name}: {shown}", flush=True)
            t0 = time.perf_counter()
            rc = subprocess.call(cmd, env=env)
            print(f"=== {name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
            if rc != 0:
                failed.append(name)
    finally:
        if not args.cache_dir:
            shutil.rmtree(cache, ignore_errors=True)
    elapsed = time.perf_counter() - start
    rc = 0
    if not args.no_report:
        rc = subprocess.call([sys.executable, os.path.join(HERE, "report.py"), "--raw",
                              args.raw, "--out", args.out, "--mode", mode,
                              "--elapsed", f"{elapsed:.0f}"]
                             + (["--oldest-raw", args.oldest_raw] if args.oldest_raw
                                else []), env=env)
    print(f"\nbenchmarks ({mode}) took {elapsed / 60:.1f} min"
          + (f"; failed steps: {', '.join(failed)}" if failed else ""))
    return 1 if failed or rc else 0


if __name__ == "__main__":
    sys.exit(main())
