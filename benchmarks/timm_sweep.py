"""Fuse every timm architecture that has a BatchNorm-like module, and tabulate
how much folds and why the rest is left.

    python -P benchmarks/timm_sweep.py            # run (resumes), then write the table
    python -P benchmarks/timm_sweep.py --table    # only regenerate the table
    python -P benchmarks/timm_sweep.py --limit-minutes 60

1. Every name of ``timm.list_models()`` (architectures, no pretrained tags) is
   built on the meta device (torch 2) to count its parameters and norm modules
   without computing anything. Models with no BatchNorm-like module, more than
   ``--max-params`` parameters, or that cannot even be built are skipped with
   the reason.
2. The rest run smallest first in a worker process (restarted when a model
   hangs or crashes it), one thread: build with random weights
   (``fusion._tools.timm_zoo.build``: random affine maps, calibrated running
   statistics), one forward at batch 2 at 128 px (then 160, 224 where the model
   refuses), which must take under ``--max-forward-s``; then ``fusion.fuse``
   with ``example_inputs`` (verified) in float32, and the same in bfloat16.
3. Raw results go to benchmarks/results/raw/timm.json after every model (a
   rerun skips what is there), and the table to benchmarks/results/timm.md.
"""
import argparse
import collections
import copy
import datetime
import json
import os
import platform
import select
import signal
import subprocess
import sys
import time
import traceback

os.environ.setdefault("YOLO_OFFLINE", "True")
os.environ.setdefault("YOLO_AUTOINSTALL", "False")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RAW = os.path.join(HERE, "results", "raw", "timm.json")
TABLE = os.path.join(HERE, "results", "timm.md")
# (size, create_model kwargs) tried in turn until one builds and runs: models
# sized at build time (attention biases, patch grids) take img_size.
ATTEMPTS = ((128, {}), (128, {"img_size": 128}), (160, {"img_size": 160}), (224, {}), (256, {}))


def _load_zoo():
    """fusion._tools.timm_zoo from this source tree (an installed copy is as old
    as the last `make install`), else from the installed package."""
    import importlib.util

    path = os.path.join(ROOT, "fusion", "_tools", "timm_zoo.py")
    if not os.path.exists(path):
        from fusion._tools import timm_zoo
        return timm_zoo
    import fusion._tools  # noqa: F401  (its parent, installed)

    if "fusion._tools.timm_zoo" in sys.modules:
        return sys.modules["fusion._tools.timm_zoo"]
    spec = importlib.util.spec_from_file_location("fusion._tools.timm_zoo", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _bn_like(m):
    """A batch norm in the sense of this sweep: a torch _BatchNorm (any subclass),
    or one of timm's/torchvision's frozen batch norms."""
    import torch.nn as nn

    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return True
    return type(m).__name__ in ("FrozenBatchNorm2d", "FrozenBatchNormAct2d")


# --- raw results -----------------------------------------------------------------

def load_raw():
    if os.path.exists(RAW):
        with open(RAW) as f:
            return json.load(f)
    return {"meta": {}, "models": {}}


def save_raw(raw):
    os.makedirs(os.path.dirname(RAW), exist_ok=True)
    tmp = RAW + ".tmp"
    with open(tmp, "w") as f:
        json.dump(raw, f, indent=1, sort_keys=True)
    os.replace(tmp, RAW)


# --- phase 1: the meta device ---------------------------------------------------

def meta_scan(raw, names, log):
    import torch
    import timm
    from fusion.layers import is_norm_module

    todo = [n for n in names if n not in raw["meta"]]
    for i, name in enumerate(todo):
        entry = {}
        try:
            with torch.device("meta"):
                m = timm.create_model(name, pretrained=False)
            entry["params"] = sum(p.numel() for p in m.parameters())
            entry["norms"] = sum(1 for x in m.modules() if is_norm_module(x))
            entry["bn_like"] = sum(1 for x in m.modules() if _bn_like(x))
            del m
        except Exception as e:  # noqa: BLE001
            entry["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        raw["meta"][name] = entry
        if i % 50 == 0:
            log(f"meta {i}/{len(todo)}")
            save_raw(raw)
    save_raw(raw)


# --- phase 2: the worker ---------------------------------------------------------

class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def run_one(name, max_forward_s):
    """Everything measured for one model (runs in the worker)."""
    import torch
    from fusion import FusionError, fuse
    from fusion.layers import is_norm_module

    zoo = _load_zoo()
    out = {"name": name}
    t0 = time.perf_counter()
    last = None
    model = None
    for size, kw in ATTEMPTS:
        try:
            tb = time.perf_counter()
            model = zoo.build(name, size=size, **kw)
            x = zoo.example_input(name, size=size)
            tf = time.perf_counter()
            with torch.no_grad():
                y = model(x)
            out["forward_s"] = time.perf_counter() - tf
            out["build_s"] = tf - tb
            out["size"] = size
            out["build_kwargs"] = kw
            break
        except _Timeout:
            raise
        except Exception as e:  # noqa: BLE001
            last = f"{type(e).__name__}: {str(e)[:300]}"
            model = None
    if model is None:
        out["status"] = "build_or_forward_failed"
        out["error"] = last
        return out
    if out["forward_s"] > max_forward_s:
        out["status"] = "slow"
        return out
    if not torch.is_tensor(y):
        out["note"] = f"output is {type(y).__name__}"
    out["params"] = sum(p.numel() for p in model.parameters())
    out["norms"] = sum(1 for m in model.modules() if is_norm_module(m))
    out["bn_like"] = sum(1 for m in model.modules() if _bn_like(m))
    out["norm_classes"] = dict(collections.Counter(
        type(m).__name__ for m in model.modules() if is_norm_module(m)))

    def one(dtype):
        res = {}
        m = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
        xi = x.to(dtype)
        ts = time.perf_counter()
        try:
            fused, rep = fuse(m, example_inputs=(xi,), return_report=True)
        except FusionError as e:
            res["error"] = f"FusionError[{e.code}]: {str(e)[:300]}"
            return res
        res["fuse_s"] = time.perf_counter() - ts
        res["pairs"] = len(rep.fused)
        res["norms_fused"] = len({p.norm for p in rep.fused})
        res["left"] = dict(collections.Counter(n.reason for n in rep.left))
        res["left_names"] = {n.norm: n.reason for n in rep.left}
        res["rel_err"] = rep.rel_err
        res["tolerance"] = rep.tolerance
        res["evidence"] = list(rep.evidence)
        res["replaced_by"] = dict(collections.Counter(p.replaced_by for p in rep.fused))
        return res

    out["fp32"] = one(torch.float32)
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 0):
        try:
            out["bf16"] = one(torch.bfloat16)
        except _Timeout:
            out["bf16"] = {"error": "timeout"}
        except Exception as e:  # noqa: BLE001
            out["bf16"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    out["status"] = "ok" if "error" not in out["fp32"] else "fuse_failed"
    out["total_s"] = time.perf_counter() - t0
    return out


# What the norms left `not_after_producer` are, found from the data flow of one
# run (independently of fusion): a TorchDispatchMode carries a tag from each
# norm's output and each conv/linear output through elementwise activations
# (relu, hardswish, silu, gelu, ...) and in-place aliases; a conv/linear whose
# input carries a norm's tag makes that norm "pre-activation" (BN -> act ->
# conv, or a BatchNormAct2d straight into a conv); a norm whose input carries a
# conv's tag is "after an activation" (conv -> act -> BN); anything else
# (after a cat, a residual add, a reshape, a pooling, attention) is "other".
_ACT_OPS = {"relu", "relu_", "hardtanh", "hardtanh_", "hardswish", "hardswish_", "silu",
            "silu_", "gelu", "gelu_", "leaky_relu", "leaky_relu_", "elu", "elu_", "mish",
            "mish_", "sigmoid", "clone", "alias", "detach", "_to_copy", "celu", "selu",
            "prelu", "_prelu_kernel"}


def classify_left(model, x, names):
    import torch
    from torch import nn
    from torch.utils._python_dispatch import TorchDispatchMode
    from fusion.layers import is_norm_module

    tags = {}  # id(tensor) -> (tensor, ("norm"|"conv", name))

    def tag_of(t):
        hit = tags.get(id(t))
        return hit[1] if hit is not None and hit[0] is t else None

    class Carry(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            op = str(func).split(".")[1] if str(func).startswith("aten.") else str(func)
            if op in _ACT_OPS and args and torch.is_tensor(args[0]) and torch.is_tensor(out):
                t = tag_of(args[0])
                if t is not None:
                    tags[id(out)] = (out, t)
            return out

    kinds = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            def pre(mod, inp, name=name):
                t = tag_of(inp[0]) if inp and torch.is_tensor(inp[0]) else None
                if t is not None and t[0] == "norm" and t[1] in names:
                    kinds[t[1]] = "pre_activation"

            def post(mod, inp, out, name=name):
                if torch.is_tensor(out):
                    tags[id(out)] = (out, ("conv", name))
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
        elif is_norm_module(m):
            def npre(mod, inp, name=name):
                t = tag_of(inp[0]) if inp and torch.is_tensor(inp[0]) else None
                if name in names and t is not None and t[0] == "conv":
                    kinds.setdefault(name, "after_activation")

            def npost(mod, inp, out, name=name):
                if torch.is_tensor(out):
                    tags[id(out)] = (out, ("norm", name))
            handles += [m.register_forward_pre_hook(npre), m.register_forward_hook(npost)]
    try:
        with torch.no_grad(), Carry():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {n: kinds.get(n, "other") for n in names}


def classify_one(name, entry):
    zoo = _load_zoo()
    model = zoo.build(name, size=entry["size"], **entry.get("build_kwargs", {}))
    x = zoo.example_input(name, size=entry["size"])
    names = [n for n, r in entry["fp32"]["left_names"].items() if r == "not_after_producer"]
    got = classify_left(model, x, set(names))
    return dict(collections.Counter(got.values()))


def worker(max_forward_s, soft_s):
    import torch
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    signal.signal(signal.SIGALRM, _alarm)
    for line in sys.stdin:
        name = line.strip()
        if not name:
            continue
        signal.alarm(soft_s)
        try:
            if name.startswith("classify "):
                name = name.split()[1]
                entry = json.loads(sys.stdin.readline())
                res = {"name": name, "left_kinds": classify_one(name, entry)}
            else:
                res = run_one(name, max_forward_s)
        except _Timeout:
            res = {"name": name, "status": "timeout", "error": f"over {soft_s} s"}
        except Exception as e:  # noqa: BLE001
            res = {"name": name, "status": "error",
                   "error": f"{type(e).__name__}: {str(e)[:300]}",
                   "trace": traceback.format_exc()[-1500:]}
        finally:
            signal.alarm(0)
        sys.stdout.write("RESULT " + json.dumps(res) + "\n")
        sys.stdout.flush()


class Worker:
    def __init__(self, args):
        self.args = args
        self.proc = None

    def start(self):
        cmd = [sys.executable, "-P", os.path.abspath(__file__), "--worker",
               "--max-forward-s", str(self.args.max_forward_s), "--soft-s", str(self.args.soft_s)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, bufsize=1,
                                     preexec_fn=lambda: os.nice(10))

    def ask(self, name, entry=None):
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        if entry is not None:  # classify the norms left not_after_producer
            self.proc.stdin.write(f"classify {name}\n{json.dumps(entry)}\n")
        else:
            self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        deadline = time.time() + self.args.soft_s + 60
        while time.time() < deadline:
            r, _, _ = select.select([self.proc.stdout], [], [], 5)
            if r:
                line = self.proc.stdout.readline()
                if not line:
                    break  # died
                if line.startswith("RESULT "):
                    return json.loads(line[7:])
        code = self.proc.poll()
        self.kill()
        return {"name": name, "status": "crashed" if code is not None else "timeout",
                "error": f"worker exit {code}" if code is not None else "hard timeout"}

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


# --- the table ---------------------------------------------------------------------

def _fmt(v, f="{:.1e}"):
    return "" if v is None else f.format(v)


def write_table(raw):
    meta, models = raw["meta"], raw["models"]
    info = raw.get("machine", {})
    qualifying = {n for n, e in meta.items()
                  if "error" not in e and e.get("bn_like", 0) > 0 and e["params"] <= info.get(
                      "max_params", 30e6)}
    skipped = collections.Counter()
    skipped_names = collections.defaultdict(list)
    for n, e in sorted(meta.items()):
        if "error" in e:
            skipped["meta build failed"] += 1
            skipped_names["meta build failed"].append(n)
        elif e.get("bn_like", 0) == 0:
            skipped["no BatchNorm-like module"] += 1
        elif e["params"] > info.get("max_params", 30e6):
            skipped[f"over {info.get('max_params', 30e6) / 1e6:.0f}M parameters"] += 1
            skipped_names[f"over {info.get('max_params', 30e6) / 1e6:.0f}M parameters"].append(n)
    ok = {n: r for n, r in models.items() if r.get("status") == "ok"}
    for n, r in sorted(models.items()):
        if r.get("status") != "ok":
            skipped[r.get("status")] += 1
            skipped_names[r.get("status")].append(n)
    not_run = sorted(qualifying - set(models))

    bn_total = sum(r["norms"] for r in ok.values())
    fused_total = sum(r["fp32"]["norms_fused"] for r in ok.values())
    pairs_total = sum(r["fp32"]["pairs"] for r in ok.values())
    left = collections.Counter()
    for r in ok.values():
        left.update(r["fp32"]["left"])
    all_folded = sum(1 for r in ok.values() if r["fp32"]["norms_fused"] == r["norms"])
    none_folded = sum(1 for r in ok.values() if r["fp32"]["norms_fused"] == 0)
    bf16_ok = [r for r in ok.values() if "bf16" in r and "error" not in r["bf16"]]
    bf16_err = [r["name"] for r in ok.values() if "bf16" in r and "error" in r["bf16"]]
    errs = sorted(r["fp32"]["rel_err"] for r in ok.values() if r["fp32"]["rel_err"] is not None)
    # fuse compares the layers, not the output, where the tolerance is above
    # fusion.verify.DISCONTINUOUS (1%): the output proves nothing there
    layered = sorted(n for n, r in ok.items() if r["fp32"].get("tolerance")
                     and r["fp32"]["tolerance"] > 0.01)
    ratio = sorted(r["fp32"]["rel_err"] / r["fp32"]["tolerance"] for n, r in ok.items()
                   if r["fp32"]["rel_err"] is not None and r["fp32"].get("tolerance")
                   and n not in layered)

    L = []
    L.append("# fusion on the timm zoo")
    L.append("")
    L.append("<!-- generated by benchmarks/timm_sweep.py from benchmarks/results/raw/timm.json; "
             "do not edit -->")
    L.append("")
    L.append(f"Measured {info.get('date', '?')} on {info.get('cpu', '?')}, torch "
             f"{info.get('torch', '?')}, timm {info.get('timm', '?')}, Python "
             f"{info.get('python', '?')}, 1 thread. Random weights, every BatchNorm given a random "
             f"affine map and running statistics calibrated on random data "
             f"(`fusion._tools.timm_zoo.build`), batch 2 at 128 px (or the first of 128 px with "
             f"`img_size=128`, 160 px with `img_size=160`, 224 px, 256 px that builds and runs), "
             f"`fuse(model, example_inputs=(x,))`, verified; bf16: the same model cast to "
             f"bfloat16, fused and verified on the same input cast.")
    if info.get("note"):
        L.append("")
        L.append(f"Note: {info['note']}")
    L.append("")
    L.append("## Headline")
    L.append("")
    L.append(f"- timm.list_models(): {len(meta)} architectures; {len(qualifying)} qualify "
             f"(a BatchNorm-like module, at most {info.get('max_params', 30e6) / 1e6:.0f}M "
             f"parameters, built on the meta device).")
    L.append(f"- covered: **{len(ok)}** of them fused and verified; "
             f"{sum(1 for r in models.values() if r.get('status') != 'ok')} run but skipped "
             f"(below); {len(not_run)} not reached in the time the sweep had.")
    if bn_total:
        L.append(f"- norm modules in the covered models: **{bn_total}**; folded: "
                 f"**{fused_total} ({100 * fused_total / bn_total:.1f}%)** in {pairs_total} "
                 f"(norm, layer) pairs; left: {bn_total - fused_total} "
                 f"({100 * (bn_total - fused_total) / bn_total:.1f}%).")
    kinds = collections.Counter()
    classified = 0
    for r in ok.values():
        if "left_kinds" in r:
            kinds.update(r["left_kinds"])
            classified += 1
    with_nap = sum(1 for r in ok.values() if r["fp32"]["left"].get("not_after_producer"))
    L.append("- left by reason: " + ", ".join(f"`{k}` {v}" for k, v in left.most_common()))
    if kinds:
        pre = kinds["pre_activation"]
        L.append(f"- of the `not_after_producer` norms (classified from the data flow in "
                 f"{classified} of the {with_nap} models that have them): pre-activation "
                 f"(BN -> act -> conv, or BatchNormAct2d into a conv) **{pre}**, after an "
                 f"activation (conv -> act -> BN) {kinds['after_activation']}, other (after a "
                 f"cat, an add, a reshape, a pooling; a final norm) {kinds['other']}.")
    none_names = sorted(n for n, r in ok.items() if r["fp32"]["norms_fused"] == 0)
    L.append(f"- models with every norm folded: {all_folded}; with none folded: {none_folded}"
             + (f" ({', '.join(none_names)})" if none_names else "") + ".")
    if errs:
        L.append(f"- fp32 rel_err: median {errs[len(errs) // 2]:.1e}, max {errs[-1]:.1e}; "
                 f"rel_err / tolerance: median {ratio[len(ratio) // 2]:.2f}, max {ratio[-1]:.2f}"
                 + (f"; verified layer by layer, the tolerance being above 1%: "
                    f"{', '.join(layered)}" if layered else "") + ".")
    L.append(f"- bf16: fused and verified on {len(bf16_ok)} models"
             + (f"; failed on {len(bf16_err)}: {', '.join(bf16_err[:20])}" if bf16_err else "")
             + ".")
    L.append("")
    L.append("## Skipped")
    L.append("")
    L.append("| reason | models | names (first 40) |")
    L.append("|---|--:|---|")
    for k, v in skipped.most_common():
        names = skipped_names.get(k, [])
        L.append(f"| {k} | {v} | {', '.join(names[:40])}{' ...' if len(names) > 40 else ''} |")
    if not_run:
        L.append(f"| not reached (time) | {len(not_run)} | {', '.join(not_run[:40])}"
                 f"{' ...' if len(not_run) > 40 else ''} |")
    L.append("")
    errors = {}
    for n, r in models.items():
        if r.get("status") == "slow":
            errors[n] = f"one forward took {r.get('forward_s', 0):.1f} s at {r.get('size')} px"
        elif r.get("status") != "ok":
            errors[n] = r.get("error") or r.get("fp32", {}).get("error", "")
    if errors:
        L.append("<details><summary>errors of the skipped runs</summary>")
        L.append("")
        for n, e in sorted(errors.items()):
            L.append(f"- `{n}`: {str(e)[:400]}")
        L.append("")
        L.append("</details>")
        L.append("")
    L.append("## Per model")
    L.append("")
    L.append("| model | params M | px | norms | folded | pairs | left by reason | fp32 rel_err "
             "| tol | bf16 rel_err | bf16 tol |")
    L.append("|---|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|")
    for n in sorted(ok):
        r = ok[n]
        f = r["fp32"]
        b = r.get("bf16", {})
        lft = ", ".join(f"{k} {v}" for k, v in sorted(f["left"].items()))
        L.append(f"| {n} | {r['params'] / 1e6:.1f} | {r['size']} | {r['norms']} | "
                 f"{f['norms_fused']} | {f['pairs']} | {lft} | {_fmt(f['rel_err'])} | "
                 f"{_fmt(f['tolerance'])} | "
                 f"{_fmt(b.get('rel_err')) if 'error' not in b else 'error'} | "
                 f"{_fmt(b.get('tolerance'))} |")
    L.append("")
    with open(TABLE, "w") as fh:
        fh.write("\n".join(L))


# --- main --------------------------------------------------------------------------

def machine_info(args):
    import torch
    import timm

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        cpu += f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return {"date": datetime.date.today().isoformat(), "cpu": cpu,
            "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version(), "max_params": args.max_params,
            "max_forward_s": args.max_forward_s}


def classify_all(raw, w, args, start, log):
    """Which of the norms left not_after_producer are pre-activation (see classify_left)."""
    todo = [n for n, r in raw["models"].items() if r.get("status") == "ok"
            and r["fp32"]["left"].get("not_after_producer") and "left_kinds" not in r]
    todo.sort(key=lambda n: raw["models"][n]["params"])
    log(f"classifying the not_after_producer norms of {len(todo)} models")
    for i, name in enumerate(todo):
        if args.limit_minutes and time.time() - start > 60 * args.limit_minutes:
            log("time limit reached")
            break
        res = w.ask(name, raw["models"][name])
        if "left_kinds" in res:
            raw["models"][name]["left_kinds"] = res["left_kinds"]
        else:
            raw["models"][name]["left_kinds_error"] = res.get("error")
        save_raw(raw)
        log(f"classify {i + 1}/{len(todo)} {name}: {res.get('left_kinds', res.get('error'))}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--table", action="store_true", help="only write the table")
    ap.add_argument("--max-params", type=float, default=30e6)
    ap.add_argument("--max-forward-s", type=float, default=5.0,
                    help="skip models whose one forward (batch 2) takes longer")
    ap.add_argument("--soft-s", type=int, default=120, help="cap per model")
    ap.add_argument("--limit-minutes", type=float, default=None,
                    help="stop starting new models after this long")
    ap.add_argument("--models", default=None, help="comma-separated names (default: all)")
    ap.add_argument("--classify", action="store_true",
                    help="only classify the not_after_producer norms of the models run")
    args = ap.parse_args()
    if args.worker:
        worker(args.max_forward_s, args.soft_s)
        return
    raw = load_raw()
    if args.table:
        write_table(raw)
        return

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    import torch
    import timm

    torch.set_num_threads(1)
    raw["machine"] = {**raw.get("machine", {}), **machine_info(args)}
    if args.classify:
        w = Worker(args)
        try:
            classify_all(raw, w, args, time.time(), log)
        finally:
            w.kill()
            save_raw(raw)
            write_table(raw)
        return
    names = args.models.split(",") if args.models else timm.list_models()
    meta_scan(raw, names, log)
    todo = [n for n in names if n not in raw["models"]
            and "error" not in raw["meta"][n] and raw["meta"][n]["bn_like"] > 0
            and raw["meta"][n]["params"] <= args.max_params]
    todo.sort(key=lambda n: raw["meta"][n]["params"])
    log(f"{len(todo)} models to run")
    start = time.time()
    w = Worker(args)
    try:
        for i, name in enumerate(todo):
            if args.limit_minutes and time.time() - start > 60 * args.limit_minutes:
                log("time limit reached")
                break
            res = w.ask(name)
            raw["models"][name] = res
            save_raw(raw)
            f = res.get("fp32", {})
            log(f"{i + 1}/{len(todo)} {name}: {res.get('status')} "
                f"{f.get('norms_fused')}/{res.get('norms')} {f.get('left', '')} "
                f"{res.get('error', '')[:120] if res.get('error') else ''}")
            if i % 10 == 0:
                write_table(raw)
        classify_all(raw, w, args, start, log)
    finally:
        w.kill()
        save_raw(raw)
        write_table(raw)


if __name__ == "__main__":
    main()
