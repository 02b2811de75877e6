"""ultralytics YOLO: fusion against ultralytics' own ``model.fuse()``, fuse time
and inference latency, side by side in one run.

Models: fusion._tools.yolo (``DetectionModel("<name>.yaml")``, random weights,
BatchNorm with a random affine map and calibrated statistics; nothing is
downloaded, ultralytics is kept offline). ultralytics' fuser works in place
(``BaseModel.fuse``: ``fuse_conv_and_bn`` per Conv, ``forward_fuse``), so every
contender gets a fresh deep copy of the model, made untimed:

- ``fusion (copy, verify)``: ``fusion.fuse(m, example_inputs=(x,))``, as the
  README shows it for a model torch.fx cannot trace: the recorded run that
  proves the folds, and verification (the ULP check and two more forwards);
- ``fusion (in place, verify=False)``: ``fusion.fuse(m, example_inputs=(x,),
  inplace=True, verify=False)``: the same evidence, no verification, written
  into the model's storage like ultralytics';
- ``ultralytics model.fuse()``: ``m.fuse(verbose=False)``, in place.

The example input of the fusers is [1, 3, 64, 64] (the recorded run's cost
scales with it). Contenders run in rotated order (ABC, BCA, ...) for
``--rounds`` rounds; gc.collect() before each timed call. The first result of
each is checked (untimed): BatchNorms left and the largest relative error of
its raw outputs before NMS (fusion._tools.yolo.raw_outputs: box and score
logits, neck maps) against the unfused model.

Latency: batch 1, float32, CPU, ``--threads`` threads, input [1, 3, size, size]
(``--size``, default 160), under torch.inference_mode: the unfused model,
fusion's result and ultralytics' result, one forward each per round in rotated
order after ``--warmup`` untimed calls, for ``--latency-rounds`` rounds or
``--budget`` seconds (at least ``--min-rounds``). Reported: medians with
p10-p90, and the median (p10-p90) of the per-round ratios, fused / unfused for
each fuser and fusion / ultralytics.

Usage:
    benchmarks/bench_yolo.py --models yolov8n yolo11n --rounds 7 --threads 1 \\
        --out benchmarks/results/raw/yolo.json
"""
import argparse
import copy
import importlib.util
import os
import sys

# before anything can import ultralytics: no DNS probe, no pip, no settings in $HOME
os.environ["YOLO_OFFLINE"] = "True"
os.environ["YOLO_AUTOINSTALL"] = "False"
os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "yolo-config"))

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_latency import measure  # noqa: E402

FUSERS = ["fusion (copy, verify)", "fusion (in place, verify=False)",
          "ultralytics model.fuse()"]
LATENCY = ["unfused", "fused (fusion)", "fused (ultralytics)"]


def _yolo():
    """fusion._tools.yolo: from this source tree where it has one (the installed
    copy is what `make install` last copied), else the installed one."""
    path = os.path.join(common.ROOT, "fusion", "_tools", "yolo.py")
    if not os.path.exists(path):
        from fusion._tools import yolo
        return yolo
    spec = importlib.util.spec_from_file_location("fusion._tools.yolo", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    import fusion._tools
    fusion._tools.yolo = module
    return module


def build(yolo, name, cache_dir):
    """The calibrated model, cached as a pickled module in cache_dir (this run
    wrote it: loading it whole, weights_only=False, is safe)."""
    return common.cached_model(cache_dir, f"yolo-{name}.pt", lambda: yolo.build(name))


def _ratio(a, b):
    return common.summary([x / y for x, y in zip(a, b)])


def bench_model(yolo, name, args):
    import fusion

    base = build(yolo, name, args.cache_dir)
    x = torch.randn(*yolo.input_shape(name, batch=1), generator=torch.Generator().manual_seed(0))
    probe = torch.randn(*yolo.input_shape(name, batch=1),
                        generator=torch.Generator().manual_seed(1))
    want = yolo.raw_outputs(base, probe)
    row = {"model": name, "norms": yolo.count_norms(base), "model_bytes": common.model_bytes(base),
           "fuse_input": list(x.shape), "threads": torch.get_num_threads(),
           "fusers": {k: {} for k in FUSERS}}

    cases = {
        FUSERS[0]: lambda m: fusion.fuse(m, example_inputs=(x,)),
        FUSERS[1]: lambda m: fusion.fuse(m, example_inputs=(x,), inplace=True, verify=False),
        FUSERS[2]: lambda m: m.fuse(verbose=False),
    }
    kept = {}

    def check(key, fused):
        c = row["fusers"][key]
        if "bn_left" not in c:
            c["bn_left"] = yolo.count_norms(fused)
            c["max_rel_err"] = yolo.max_rel_err(yolo.raw_outputs(fused, probe), want)
            kept[key] = fused

    times, errors = common.interleaved(cases, args.rounds, setup=lambda k: copy.deepcopy(base),
                                       teardown=check)
    for k in FUSERS:
        if k in errors:
            row["fusers"][k]["error"] = errors[k]
        if times.get(k):
            row["fusers"][k]["seconds"] = common.summary(times[k])
    if times.get(FUSERS[0]) and times.get(FUSERS[2]):
        row["fuse_ratios"] = {
            "fusion copy+verify / ultralytics": _ratio(times[FUSERS[0]], times[FUSERS[2]]),
            "fusion in place / ultralytics": _ratio(times[FUSERS[1]], times[FUSERS[2]])
            if times.get(FUSERS[1]) else None}

    models = {"unfused": base}
    if FUSERS[1] in kept:
        models["fused (fusion)"] = kept[FUSERS[1]]
    if FUSERS[2] in kept:
        models["fused (ultralytics)"] = kept[FUSERS[2]]
    size = args.size
    xl = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    lat = measure(models, xl, args.latency_rounds, args.min_rounds, args.budget, args.warmup)
    row["latency"] = {"input": list(xl.shape), "rounds": len(lat["unfused"]),
                      "variants": {n: common.summary(t) for n, t in lat.items()},
                      "ratios": {}}
    r = row["latency"]["ratios"]
    if "fused (fusion)" in lat:
        r["fusion/unfused"] = _ratio(lat["fused (fusion)"], lat["unfused"])
    if "fused (ultralytics)" in lat:
        r["ultralytics/unfused"] = _ratio(lat["fused (ultralytics)"], lat["unfused"])
    if "fused (fusion)" in lat and "fused (ultralytics)" in lat:
        r["fusion/ultralytics"] = _ratio(lat["fused (fusion)"], lat["fused (ultralytics)"])
    return row


def _band(s, fmt="{:.3f}"):
    return f"{fmt.format(s['median'])} [{fmt.format(s['p10'])}, {fmt.format(s['p90'])}]" \
        if s else "-"


def tables(rows):
    """The two Markdown tables: fuse time, latency."""
    fuse = []
    for r in rows:
        cells = [r["model"], r["norms"]]
        for k in FUSERS:
            c = r["fusers"][k]
            cells.append(f"{c['seconds']['median'] * 1e3:.1f}" if "seconds" in c else
                         f"fails: {c.get('error', '?')[:60]}")
        for k in FUSERS:
            c = r["fusers"][k]
            cells.append(f"{c['bn_left']} / {c['max_rel_err']:.1e}" if "bn_left" in c else "-")
        ratios = r.get("fuse_ratios") or {}
        cells += [_band(ratios.get("fusion copy+verify / ultralytics"), "{:.1f}"),
                  _band(ratios.get("fusion in place / ultralytics"), "{:.1f}")]
        fuse.append(cells)
    fuse_md = common.md_table(
        ["model", "BNs"] + [f"{k} ms" for k in FUSERS]
        + [f"{k}: BNs left / max rel err" for k in FUSERS]
        + ["fusion copy+verify / ultralytics", "fusion in place / ultralytics"], fuse)
    lat = []
    for r in rows:
        L = r["latency"]
        cells = [r["model"], "x".join(str(d) for d in L["input"]), r["threads"], L["rounds"]]
        for v in LATENCY:
            s = L["variants"].get(v)
            cells.append(f"{s['median'] * 1e3:.2f} ({s['p10'] * 1e3:.2f}–{s['p90'] * 1e3:.2f})"
                         if s else "-")
        for k in ("fusion/unfused", "ultralytics/unfused", "fusion/ultralytics"):
            cells.append(_band(L["ratios"].get(k)))
        lat.append(cells)
    lat_md = common.md_table(
        ["model", "input", "threads", "rounds"] + [f"{v} ms (p10–p90)" for v in LATENCY]
        + ["fusion / unfused", "ultralytics / unfused", "fusion / ultralytics"], lat)
    return fuse_md, lat_md


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["yolov8n", "yolo11n"])
    ap.add_argument("--rounds", type=int, default=7, help="fuse-time rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", type=int, default=160, help="latency input size")
    ap.add_argument("--latency-rounds", type=int, default=31)
    ap.add_argument("--min-rounds", type=int, default=9)
    ap.add_argument("--budget", type=float, default=8.0,
                    help="latency seconds per model after the minimum rounds")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default=os.path.join(common.RAW, "yolo.json"))
    args = ap.parse_args(argv)
    common.set_threads(args.threads)
    env = common.environment(args.threads)
    try:
        yolo = _yolo()
        version = yolo.ultralytics_version()
    except ImportError as exc:
        print(f"[yolo] ultralytics is not installed ({exc}); nothing measured")
        common.save_json(args.out, env, [], skipped=str(exc))
        return 0
    env["ultralytics"] = version
    print(f"[yolo] torch {torch.__version__}, {torch.get_num_threads()} thread(s), BLAS "
          f"{common.blas_label(env)}; ultralytics {version}", flush=True)
    rows = []
    for name in args.models:
        print(f"[yolo] {name}", flush=True)
        rows.append(bench_model(yolo, name, args))
    fuse_md, lat_md = tables(rows)
    print("fuse time, ms (median); BNs left / max rel err of the raw outputs against the "
          "unfused model; ratios median [p10, p90] of per-round pairs")
    print(fuse_md)
    print("\nlatency, batch 1, float32; ratios median [p10, p90] of per-round pairs")
    print(lat_md)
    common.save_json(args.out, env, rows, rounds=args.rounds, ultralytics=version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
