"""Turns the raw results of the bench_*.py scripts into the committed report:
benchmarks/results/RESULTS.md (every table, the environment of every
measurement, and the targets with whether each is met), README-table.md (the
headline table for the project README) and PNG plots (matplotlib, Agg).

It measures nothing. A raw file that is missing leaves its section out.

Usage:
    benchmarks/report.py --raw benchmarks/results/raw --out benchmarks/results
"""
import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

LABELS = {
    "fusion_copy": "fusion (copy)",
    "fusion_inplace": "fusion (in place)",
    "fx_copy": "torch.fx fuse (copy)",
    "fx_inplace": "torch.fx fuse (in place)",
    "fuse_modules_copy": "fuse_modules (copy)",
    "fuse_modules_inplace": "fuse_modules (in place)",
    "naive_inplace": "naive fuse_conv_bn_eval loop",
    "diag_inplace": "diag-mm fold",
}
COLORS = {
    "fusion_copy": "#1f5fa8", "fusion_inplace": "#6fa8dc",
    "fx_copy": "#b03a2e", "fx_inplace": "#e6887d",
    "fuse_modules_copy": "#7d6608", "fuse_modules_inplace": "#d4ac0d",
    "naive_inplace": "#5e5e5e", "diag_inplace": "#1e8449",
}
TARGETS = {"inplace_mem": 0.05, "copy_mem": 1.1, "memcpy": 0.5, "fp64": 3.0,
           "latency": 1.03, "identical": 0.999, "max_ulp": 1}


def _load(raw, name):
    path = os.path.join(raw, f"{name}.json")
    return common.load_json(path) if os.path.exists(path) else None


def _ms(s):
    return f"{s * 1e3:.1f}" if s >= 0.01 else f"{s * 1e3:.2f}"


def _footer(fig, data):
    """The environment of a plot's numbers, printed on the plot itself."""
    env = (data or {}).get("environment", {})
    blas = common.blas_label(env)
    line = (f"{env.get('date', '?')[:16]}  torch {env.get('torch')}  threads "
            f"{env.get('threads')}  BLAS {blas}  {env.get('cpu')} x{env.get('nproc')}  "
            f"load {', '.join(f'{x:.1f}' for x in env.get('loadavg_start', []))}  "
            f"commit {env.get('commit')}")
    fig.text(0.005, 0.005, line, fontsize=6, color="#555555", ha="left", va="bottom")


def _save(fig, path, data):
    _footer(fig, data)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _log_y(ax):
    """A log y axis with plain numbers at 1, 2, 5 x 10^k."""
    from matplotlib.ticker import FuncFormatter, LogLocator
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(LogLocator(base=10, subs=()))


def _ok(flag):
    return "**met**" if flag else "**missed**"


def env_table(sections):
    keys = ["date", "torch", "torchvision", "python", "threads", "blas",
            "blas_libraries", "torch_blas_info", "torch_parallel", "cpu", "nproc",
            "loadavg_start", "loadavg_end", "commit", "argv"]
    rows = []
    for title, data in sections:
        if data is None:
            continue
        env = data["environment"]
        for k in keys:
            v = env.get(k)
            if isinstance(v, list) and k.startswith("loadavg"):
                v = ", ".join(f"{x:.2f}" for x in v)
            elif isinstance(v, list):
                v = " ".join(str(x) for x in v)
            rows.append((title, k, v))
    # One table: a column per section, a row per field.
    titles = [t for t, d in sections if d is not None]
    by = {(t, k): v for t, k, v in rows}
    table = [[k] + [f"`{by.get((t, k))}`" if k in ("argv", "blas_libraries", "commit")
                    else str(by.get((t, k))) for t in titles] for k in keys]
    return common.md_table(["field"] + titles, table, align=["---"] * (len(titles) + 1))


# --- 1. fuse() time -------------------------------------------------------------


def fuse_time_section(data, title):
    rows = data["results"]
    keys = list(rows[0]["contenders"]) if rows else []
    out = []
    for r in rows:
        cells = [r["model"], f"{r['model_bytes'] / 2**20:.0f}", r["threads"]]
        for k in keys:
            c = r["contenders"][k]
            if "seconds" in c:
                s = c["seconds"]
                cells.append(f"{_ms(s['median'])} ({_ms(s['p25'])}–{_ms(s['p75'])})")
            else:
                cells.append("fails")
        dc = r.get("deepcopy_seconds")
        cells += [_peer_cell(r, "inplace"), _peer_cell(r, "copy"),
                  f"{_ms(dc['median'])}" if dc else "–", _copy_cell(r)]
        out.append(cells)
    header = ["model", "MiB", "threads"] + [LABELS[k] for k in keys] + \
        ["in place / fastest in-place peer", "copy / fastest copy peer",
         "bare deepcopy", "copy / (deepcopy + in place)"]
    text = [f"### {title}", "",
            f"Median ms of {data.get('rounds')} alternating rounds (p25–p75); each call "
            f"fuses a fresh deep copy (made untimed), after gc.collect() and "
            f"malloc_trim(0), so that each call faults in the pages it allocates. A "
            f"ratio is of medians, with its "
            f"spread from the quartiles (fusion's p25 over the peer's p75, to p75 over "
            f"p25); in-place peers are torch.fx, fuse_modules, the naive loop and the "
            f"diag-mm fold, copy peers torch.fx and fuse_modules. A bare "
            f"`copy.deepcopy` of the model is timed in the same rotation.", "",
            common.md_table(header, out)]
    checks = []
    for r in rows:
        for k in keys:
            c = r["contenders"][k]
            if "error" in c and "seconds" not in c:
                checks.append([r["model"], LABELS[k], "fails", c["error"][:90]])
            elif c.get("bn_left", 0) or c.get("rel_err", 0) > 1e-3:
                checks.append([r["model"], LABELS[k], c.get("bn_left"),
                               f"rel_err {c.get('rel_err', float('nan')):.2e}"])
    if checks:
        text += ["", "Results that fail, leave BatchNorms, or change the output "
                 "(rel_err > 1e-3 on a random input):", "",
                 common.md_table(["model", "contender", "BN left", "note"], checks,
                                 align=["---"] * 4)]
    else:
        text += ["", "Every contender removed every BatchNorm it was given, with "
                 "output rel_err <= 1e-3 on a random input."]
    return "\n".join(text)


PEERS = {"inplace": ("fx_inplace", "fuse_modules_inplace", "naive_inplace", "diag_inplace"),
         "copy": ("fx_copy", "fuse_modules_copy")}


def peer_ratio(r, mode):
    """(fusion / the fastest peer of ``mode``, its low, its high, that peer), or None."""
    a = r["contenders"].get(f"fusion_{mode}", {}).get("seconds")
    peers = [(r["contenders"][k]["seconds"], k) for k in PEERS[mode]
             if "seconds" in r["contenders"].get(k, {})]
    if not a or not peers:
        return None
    b, k = min(peers, key=lambda p: p[0]["median"])
    return a["median"] / b["median"], a["p25"] / b["p75"], a["p75"] / b["p25"], k


def _peer_cell(r, mode):
    q = peer_ratio(r, mode)
    if q is None:
        return "n/a"
    return f"{q[0]:.2f} ({q[1]:.2f}–{q[2]:.2f}) vs {LABELS[q[3]]}"


def copy_overhead(r):
    """fusion copy / (bare deepcopy + fusion in place), medians; None if unmeasured."""
    a = r["contenders"].get("fusion_copy", {}).get("seconds")
    b = r["contenders"].get("fusion_inplace", {}).get("seconds")
    dc = r.get("deepcopy_seconds")
    if not (a and b and dc):
        return None
    return a["median"] / (dc["median"] + b["median"])


def _copy_cell(r):
    q = copy_overhead(r)
    return "n/a" if q is None else f"{q:.2f}"


def _ratio(r, a, b):
    ca, cb = r["contenders"].get(a, {}), r["contenders"].get(b, {})
    if "seconds" in ca and "seconds" in cb:
        return f"{ca['seconds']['median'] / cb['seconds']['median']:.2f}"
    return "n/a"


def plot_fuse_time(data, path):
    rows = [r for r in data["results"] if r["threads"] == data["results"][0]["threads"]]
    keys = list(rows[0]["contenders"])
    fig, ax = plt.subplots(figsize=(max(10, 1.3 * len(rows) + 2.5), 4.5))
    width = 0.8 / len(keys)
    for i, k in enumerate(keys):
        xs, ys, lo, hi = [], [], [], []
        for j, r in enumerate(rows):
            c = r["contenders"][k]
            if "seconds" in c:
                s = c["seconds"]
                xs.append(j + (i - len(keys) / 2 + 0.5) * width)
                ys.append(s["median"] * 1e3)
                lo.append((s["median"] - s["p25"]) * 1e3)
                hi.append((s["p75"] - s["median"]) * 1e3)
        ax.bar(xs, ys, width, yerr=[lo, hi], label=LABELS[k], color=COLORS[k],
               error_kw={"elinewidth": 0.7})
    _log_y(ax)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["model"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("fuse() wall time, ms (median, p25–p75)")
    ax.set_title(f"fuse() time, torch {data['environment']['torch']}, "
                 f"{rows[0]['threads']} thread(s)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path, data)


# --- 2. memory ------------------------------------------------------------------


def memory_section(data):
    rows = data["results"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    keys = list(dict.fromkeys(r["contender"] for r in rows))
    by = {(r["model"], r["contender"]): r for r in rows}
    out = []
    for m in models:
        size = next((r["model_bytes"] for r in rows if r["model"] == m and
                     "model_bytes" in r), None)
        cells = [m, f"{size / 2**20:.0f}" if size else "?"]
        for k in keys:
            r = by.get((m, k), {})
            if "error" in r:
                cells.append("fails")
            elif "peak_ratio" in r and r.get("runs", 1) > 1:
                cells.append(f"{r['peak_ratio']:.3f} ({r['peak_ratio_min']:.2f}–"
                             f"{r['peak_ratio_max']:.2f})")
            elif "peak_ratio" in r:
                cells.append(f"{r['peak_ratio']:.3f}")
            else:
                cells.append("-")
        out.append(cells)
    runs = max((r.get("runs", 1) for r in rows), default=1)
    text = ["Peak RSS rise during one fuse call / model bytes, each case in a fresh "
            f"process ({data['environment'].get('process_per_case', 'subprocess')}; peak: "
            f"{data['environment'].get('peak_method')}). Copy mode includes the fused "
            "copy, so it cannot be below 1."
            + (f" Each case ran {runs} times: the median run, (min–max)." if runs > 1
               else ""), "",
            common.md_table(["model", "MiB"] + [LABELS[k] for k in keys], out)]
    errs = [[r["model"], LABELS[r["contender"]], r["error"][:100]] for r in rows
            if "error" in r]
    if errs:
        text += ["", common.md_table(["model", "contender", "error"], errs,
                                     align=["---"] * 3)]
    return "\n".join(text)


def plot_memory(data, path):
    rows = data["results"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    keys = list(dict.fromkeys(r["contender"] for r in rows))
    by = {(r["model"], r["contender"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(max(10, 1.3 * len(models) + 2.5), 4.5))
    width = 0.8 / len(keys)
    for i, k in enumerate(keys):
        xs, ys = [], []
        for j, m in enumerate(models):
            r = by.get((m, k), {})
            if "peak_ratio" in r and "error" not in r:
                xs.append(j + (i - len(keys) / 2 + 0.5) * width)
                ys.append(max(r["peak_ratio"], 1e-4))
        ax.bar(xs, ys, width, label=LABELS[k], color=COLORS[k])
    ax.axhline(TARGETS["copy_mem"], color="k", ls="--", lw=0.8)
    ax.axhline(TARGETS["inplace_mem"], color="k", ls=":", lw=0.8)
    ax.text(len(models) - 0.5, TARGETS["copy_mem"] * 1.05, "copy target 1.1x",
            ha="right", fontsize=7)
    ax.text(len(models) - 0.5, TARGETS["inplace_mem"] * 1.1, "in-place target 0.05x",
            ha="right", fontsize=7)
    _log_y(ax)
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels(models, rotation=30, ha="right")
    ax.set_ylabel("peak extra RSS / model bytes")
    ax.set_title("Peak extra memory during fuse (fresh process per case)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path, data)


# --- 3. throughput --------------------------------------------------------------

TP_CASES = ["memcpy (copy_)", "memcpy (memmove)", "fusion prepare", "fusion apply",
            "fusion total", "torch fp32 fold", "torch fp64 fold", "torch mul_",
            "first touch"]


def _memcpy_gbps(r):
    vals = [r["cases"][c]["gbps"] for c in ("memcpy (copy_)", "memcpy (memmove)")
            if "gbps" in r["cases"].get(c, {})]
    return max(vals) if vals else None


def throughput_section(data):
    out = []
    for r in data["results"]:
        cells = [r["weight"], r["dtype"], r["threads"], f"{r['bytes'] / 2**20:.0f}"]
        for c in TP_CASES:
            v = r["cases"].get(c, {})
            cells.append(f"{v['gbps']:.2f}" if "gbps" in v else
                         ("fails" if "error" in v else "-"))
        mc = _memcpy_gbps(r)
        tot = r["cases"].get("fusion total", {}).get("gbps")
        f64 = r["cases"].get("torch fp64 fold", {}).get("gbps")
        cells.append(f"{tot / mc:.2f}" if tot and mc else "-")
        cells.append(f"{tot / f64:.1f}" if tot and f64 else "-")
        out.append(cells)
    header = ["weight", "dtype", "threads", "MiB"] + TP_CASES + \
        ["fusion total / memcpy", "fusion total / torch fp64"]
    return "\n".join([
        f"GB/s of weights (1e9 bytes/s), median of {data.get('rounds')} rounds. "
        "memcpy = the faster of copy_ and memmove; fusion total = prepare + apply.", "",
        common.md_table(header, out)])


def first_touch_note(data):
    """A warning when fresh memory is much slower to write than memcpy, as in a
    VM: then every contender that allocates its result pays page faults."""
    rows = [r for r in data["results"] if r["threads"] == 1 and
            "gbps" in r["cases"].get("first touch", {}) and _memcpy_gbps(r)]
    if not rows:
        return None
    ft = min(r["cases"]["first touch"]["gbps"] for r in rows)
    mc = max(_memcpy_gbps(r) for r in rows)
    if ft >= mc / 4:
        return None
    return (f"**On this machine fresh memory is slow to touch**: writing a newly "
            f"allocated block ran at {ft:.2f} GB/s against {mc:.1f} GB/s for memcpy into "
            f"memory already touched (page faults; freed large blocks go back to the "
            f"OS). Every fuser that allocates its result (copy modes, torch's folds, the "
            f"naive and diag-mm loops) pays this, so their times here are dominated by "
            f"it and depend on whether the allocator reuses freed memory; fusion in "
            f"place allocates nothing of the weights' size.")


def plot_throughput(data, path):
    rows = data["results"]
    cases = [c for c in TP_CASES if any("gbps" in r["cases"].get(c, {}) for r in rows)]
    fig, ax = plt.subplots(figsize=(max(11, 1.6 * len(rows) + 2.5), 4.8))
    width = 0.85 / len(cases)
    cmap = plt.get_cmap("tab10")
    for i, c in enumerate(cases):
        xs, ys, lo, hi = [], [], [], []
        for j, r in enumerate(rows):
            v = r["cases"].get(c, {})
            if "gbps" in v:
                xs.append(j + (i - len(cases) / 2 + 0.5) * width)
                ys.append(v["gbps"])
                lo.append(max(0.0, v["gbps"] - v["gbps_p25"]))
                hi.append(max(0.0, v["gbps_p75"] - v["gbps"]))
        ax.bar(xs, ys, width, yerr=[lo, hi], label=c, color=cmap(i % 10),
               error_kw={"elinewidth": 0.6})
    _log_y(ax)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['weight']}\n{r['dtype']}, {r['threads']} thr" for r in rows],
                       fontsize=7)
    ax.set_ylabel("GB/s of weights (median, p25–p75)")
    ax.set_title("Fold throughput of fusion's core against memcpy and torch's fold")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path, data)


# --- 4. latency -----------------------------------------------------------------


def latency_section(data):
    out = []
    variants = ["unfused", "fused (fusion)", "BN deleted", "fused (torch.fx)"]
    present = [v for v in variants if any(v in r["variants"] for r in data["results"])]
    for r in data["results"]:
        left = r.get("norms_left")
        cells = [r["model"], r["threads"], r["batch"], r["rounds"],
                 f"{left} of {r['norms']}" if left is not None else "-"]
        for v in present:
            s = r["variants"].get(v)
            cells.append(f"{_ms(s['median'])} ({_ms(s['p10'])}–{_ms(s['p90'])})"
                         if s else "-")
        for key in ("fused/deleted", "fused/unfused"):
            s = r["ratios"].get(key)
            cells.append(f"{s['median']:.3f} [{s['p10']:.3f}, {s['p90']:.3f}]"
                         if s else "-")
        cells.append(_LATENCY_VERDICT[_latency_state(r)] if r["ratios"].get("fused/deleted")
                     else "-")
        out.append(cells)
    header = ["model", "threads", "batch", "rounds", "norms left"] + \
        [f"{v}, ms (p10–p90)" for v in present] + \
        ["fused / deleted [p10, p90]", "fused / unfused [p10, p90]", "target"]
    return "\n".join([
        "Median latency per forward, input [batch, 3, 224, 224], torch.inference_mode; "
        "ratios are medians of per-round pairs (timed side by side) with p10–p90. "
        "Target: fused / deleted <= 1.03 at the median (**met**); otherwise 'within "
        "noise' when 1.0 lies inside its p10–p90 band, 'missed' when not. A band wider "
        f"than ±{NOISY:.0%} is marked (noisy): such a row cannot show a 3% difference. "
        "'BN deleted' drops every norm, also those no fold can remove ('norms left'), "
        "and changes every activation, so data-dependent kernels (torch's CPU max "
        "pooling branches on values) run at another speed: see bench_latency.py.", "",
        common.md_table(header, out)])


NOISY = 0.10
_LATENCY_VERDICT = {"met": "**met**", "met_noisy": "**met** (noisy)",
                    "noise": "within noise", "noise_noisy": "within noise (noisy)",
                    "missed": "**missed**", "missed_noisy": "**missed** (noisy)"}


def _latency_state(r):
    """met (median within 3%), noise (1.0 inside p10-p90), or missed; with
    _noisy when the p10-p90 band is wider than +-NOISY."""
    s = r["ratios"]["fused/deleted"]
    if s["median"] <= TARGETS["latency"]:
        state = "met"
    elif s["p10"] <= 1.0 <= s["p90"]:
        state = "noise"
    else:
        state = "missed"
    noisy = s["p90"] - s["p10"] > 2 * NOISY
    return state + ("_noisy" if noisy else "")


def _latency_met(r):
    return not _latency_state(r).startswith("missed")


def plot_latency(data, path):
    rows = data["results"]
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(rows)), 4.5))
    for i, key, color in ((0, "fused/deleted", "#1f5fa8"), (1, "fused/unfused", "#b03a2e")):
        xs, ys, lo, hi = [], [], [], []
        for j, r in enumerate(rows):
            s = r["ratios"].get(key)
            if s:
                xs.append(j + (i - 0.5) * 0.3)
                ys.append(s["median"])
                lo.append(max(0.0, s["median"] - s["p10"]))
                hi.append(max(0.0, s["p90"] - s["median"]))
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", color=color, label=key, capsize=2,
                    ms=4)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhspan(1.0, TARGETS["latency"], color="#1f5fa8", alpha=0.1)
    lows = [r["ratios"][k]["p10"] for r in rows for k in r["ratios"]]
    highs = [r["ratios"][k]["p90"] for r in rows for k in r["ratios"]]
    if lows:
        top = min(2.0, max(highs) * 1.05)
        ax.set_ylim(max(0.5, min(lows) * 0.95), top)
        if max(highs) > top:
            ax.text(0.99, 0.98, "whiskers clipped at 2.0", transform=ax.transAxes,
                    ha="right", va="top", fontsize=7)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['model']} b{r['batch']} t{r['threads']}" for r in rows],
                       rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("latency ratio (median, p10–p90)")
    ax.set_title("Fused model latency against the BN-deleted and the unfused model")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path, data)


# --- 5. precision ---------------------------------------------------------------


def precision_section(data):
    w, o = data["results"]["weights"], data["results"]["outputs"]
    out = []
    for r in w:
        if "error" in r:
            out.append([r["dtype"], r["method"], "fails", "", "", "", r["error"][:70]])
        else:
            a, b = r["weight"], r["bias"]
            out.append([r["dtype"], r["method"], f"{a['identical']:.3%}", a["max_ulp"],
                        f"{b['identical']:.1%}", b["max_ulp"], ""])
    layer = w[0]["layer"] if w else ""
    n = w[0]["weight"]["n"] if w and "weight" in w[0] else "?"
    text = [f"Fused values of {layer} ({n} weights) against the exact fold (tests/exact.py: "
            "rational arithmetic, rounded once). BatchNorm statistics calibrated on "
            "the conv's outputs, so b - mean cancels as in real models.", "",
            common.md_table(["dtype", "method", "weights identical", "weights max ULP",
                             "bias identical", "bias max ULP", "error"], out,
                            align=["---", "---", "--:", "--:", "--:", "--:", "---"])]
    out = []
    for r in o:
        out.append([r["model"], r["dtype"], f"{r['unfused']:.2e}",
                    f"{r['fusion']:.2e}" if "fusion" in r else "fails",
                    f"{r['torch fold']:.2e}" if "torch fold" in r else
                    f"fails ({r.get('torch_error', '')[:60]})",
                    r.get("torch_how", "")])
    shape = o[0]["input"] if o else "?"
    text += ["", f"Output rel_err = ||y - y64|| / ||y64|| against a float64 run of the "
             f"original, input {shape}, every model run in float32 (half models as "
             f"float32 copies). 'unfused' is the dtype's own error.", "",
             common.md_table(["model", "dtype", "unfused", "fusion", "torch fold", "how"],
                             out)]
    return "\n".join(text)


# --- 6. profile -----------------------------------------------------------------


def profile_section(data, cprofile=True):
    res = data["results"]
    text = [f"{res['model']} ({res['model_bytes'] / 2**20:.0f} MiB), median of "
            f"{res['rounds']} rounds, {data['environment']['threads'][0]} thread(s); "
            "phases timed by wrappers around the functions each fuser calls.", ""]
    for name, phases in res["phases"].items():
        total = phases["total"]
        rows = [[k, _ms(v), f"{v / total:.0%}" if total else "-"]
                for k, v in phases.items()]
        text += [f"**{name}**", "", common.md_table(["phase", "ms", "share"], rows), ""]
    top = res.get("cprofile_copy", {}).get("top", []) if cprofile else []
    if top:
        text += ["cProfile of fusion.fuse (copy mode), by own time (profiler overhead "
                 "included):", "",
                 common.md_table(["function", "calls", "own ms", "cumulative ms"],
                                 [[f"`{r['function']}`", r["calls"],
                                   f"{r['tottime'] * 1e3:.1f}",
                                   f"{r['cumtime'] * 1e3:.1f}"] for r in top],
                                 align=["---", "--:", "--:", "--:"])]
    return "\n".join(text)


# --- 8. ultralytics YOLO -------------------------------------------------------


def yolo_section(data):
    """fusion against ultralytics' model.fuse() (bench_yolo.py, which formats it)."""
    if not data.get("results"):
        return f"Not measured: {data.get('skipped', 'no results')}."
    from bench_yolo import tables

    fuse_md, lat_md = tables(data["results"])
    env = data["environment"]
    return "\n".join([
        f"ultralytics {data.get('ultralytics')}, models built from its yaml (random "
        f"weights, calibrated BatchNorm), torch {env.get('torch')}, {env.get('threads')} "
        f"thread(s), BLAS {common.blas_label(env)}. fuse() ms: medians of "
        f"{data.get('rounds')} rounds on fresh copies, fusers' example input "
        "[1, 3, 64, 64]; 'max rel err': raw outputs before NMS against the unfused "
        "model. Ratios: medians [p10, p90] of per-round pairs. See bench_yolo.py.", "",
        fuse_md, "", "Latency per forward, batch 1, float32, torch.inference_mode:", "",
        lat_md])


# --- fold kernels per instruction-set path ------------------------------------------


def load_fold_isa(raw):
    """The sections of ``make bench-fold``'s Markdown (raw/fold_isa.md): a list of
    (title, reference line, rows), each row a dict by column; None if absent."""
    path = os.path.join(raw, "fold_isa.md")
    if not os.path.exists(path):
        return None
    sections, header = [], None
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("## "):
                sections.append([line[3:], "", []])
                header = None
            elif sections and line.startswith("read (memchr)"):
                sections[-1][1] = line
            elif sections and line.startswith("|") and not line.startswith("|---"):
                cells = [c.strip() for c in line.strip("|").split("|")]
                if header is None:
                    header = cells
                else:
                    sections[-1][2].append(dict(zip(header, cells)))
    return [tuple(x) for x in sections if x[2]] or None


def fold_isa_section(sections):
    title, ref, rows = sections[0]
    cols = ["dtype", "path", "check vs read", "prep+apply vs memcpy", "into out vs memcpy"]
    out = [[r.get(c, "") for c in cols] for r in rows]
    text = [f"`make bench-fold` (benchmarks/fold_speed.sh): the C core alone on one "
            f"64 MiB contiguous weight, per dtype and instruction-set path ({title}). "
            f"{ref}. *check vs read*: read time / check time (1.0 is read bandwidth); "
            f"*prep+apply vs memcpy*: memcpy time / fold time (target 0.6); *into out*: "
            f"the same fold writing another buffer, as copy mode folds from the original "
            f"into the copy. Every path writes bit-identical results "
            f"(`make -C tests/c run`).", "",
            common.md_table(cols, out, align=["---", "---", "--:", "--:", "--:"])]
    for title, ref, rows in sections[1:]:
        text += ["", f"{title}: prep+apply vs memcpy " + ", ".join(
            f"{r['dtype']} {r['path']} {r['prep+apply vs memcpy']}" for r in rows
            if r.get("path") != "baseline") + "."]
    text += ["", "The whole output, with milliseconds: `benchmarks/results/fold_isa.md` "
             "(committed, with the notes on what bounds each row)."]
    return "\n".join(text)


def _plot_fold_isa(ax, sections):
    title, _, rows = sections[0]
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    paths = list(dict.fromkeys(r["path"] for r in rows))
    by = {(r["dtype"], r["path"]): r for r in rows}
    width = 0.8 / len(paths)
    shades = {"baseline": "#bbbbbb", "avx2": "#6fa8dc", "avx512": "#1f5fa8"}
    for i, path in enumerate(paths):
        xs, ys = [], []
        for j, d in enumerate(dtypes):
            r = by.get((d, path))
            try:
                ys.append(float(r["prep+apply vs memcpy"]))
            except (TypeError, ValueError, KeyError):
                continue
            xs.append(j + (i - len(paths) / 2 + 0.5) * width)
        ax.bar(xs, ys, width, label=path, color=shades.get(path))
    ax.axhline(0.6, color="k", ls="--", lw=0.8)
    ax.set_xticks(range(len(dtypes)))
    ax.set_xticklabels(dtypes)
    ax.set_ylabel("memcpy time / fold time")
    ax.set_title("C core: prepare + apply against memcpy (target 0.6)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)


def _plot_peer_ratios(ax, fuse):
    rows = [r for r in fuse["results"] if r["threads"] == fuse["results"][0]["threads"]]
    width = 0.38
    for i, (mode, color) in enumerate((("inplace", COLORS["fusion_inplace"]),
                                       ("copy", COLORS["fusion_copy"]))):
        xs, ys, lo, hi = [], [], [], []
        for j, r in enumerate(rows):
            q = peer_ratio(r, mode)
            if q is None:
                continue
            xs.append(j + (i - 0.5) * width)
            ys.append(q[0])
            lo.append(q[0] - q[1])
            hi.append(q[2] - q[0])
        ax.bar(xs, ys, width, yerr=[lo, hi], color=color, error_kw={"elinewidth": 0.7},
               label=f"fusion ({'in place' if mode == 'inplace' else 'copy'}) / fastest "
                     f"peer")
    ax.axhline(1.0, color="k", ls="--", lw=0.8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["model"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("fuse() time / fastest peer's (median)")
    ax.set_title("fuse() against the fastest peer (below 1: fusion is faster)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)


# --- headline -------------------------------------------------------------------


def plot_headline(scaling, memory, path, fuse=None, fold_isa=None):
    extra = [x for x in (fuse, fold_isa) if x]
    if extra:
        fig, grid = plt.subplots(2, 2, figsize=(12, 9.2))
        axes = list(grid.flat)
    else:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    if fuse:
        _plot_peer_ratios(axes[2], fuse)
    if fold_isa:
        _plot_fold_isa(axes[3 if fuse else 2], fold_isa)
    if len(axes) > 2 and len(extra) == 1:
        axes[3].axis("off")
    ax = axes[0]
    if scaling:
        rows = [r for r in scaling["results"] if r["threads"] == 1] or scaling["results"]
        rows = sorted(rows, key=lambda r: r["model_bytes"])
        for k in rows[0]["contenders"]:
            xs = [r["model_bytes"] / 2**20 for r in rows
                  if "seconds" in r["contenders"][k]]
            ys = [r["contenders"][k]["seconds"]["median"] for r in rows
                  if "seconds" in r["contenders"][k]]
            ax.plot(xs, ys, marker="o", color=COLORS[k], label=LABELS[k],
                    ls="-" if k.endswith("copy") else "--", ms=4)
        ax.set_xscale("log")
        _log_y(ax)
        sizes = [r["model_bytes"] / 2**20 for r in rows]
        ax.set_xticks(sizes)
        ax.set_xticklabels([f"{x:.0f}" for x in sizes])
        ax.minorticks_off()
        ax.set_xlabel("conv weights, MiB (synthetic Conv2d+BatchNorm2d stack)")
        ax.set_ylabel("fuse() wall time, s (median)")
        ax.set_title(f"fuse() time against model size, {rows[0]['threads']} thread(s)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    ax = axes[1]
    if memory:
        rows = memory["results"]
        models = list(dict.fromkeys(r["model"] for r in rows))
        keys = list(dict.fromkeys(r["contender"] for r in rows))
        by = {(r["model"], r["contender"]): r for r in rows}
        width = 0.8 / len(keys)
        for i, k in enumerate(keys):
            xs, ys = [], []
            for j, m in enumerate(models):
                r = by.get((m, k), {})
                if "peak_ratio" in r and "error" not in r:
                    xs.append(j + (i - len(keys) / 2 + 0.5) * width)
                    ys.append(max(r["peak_ratio"], 1e-4))
            ax.bar(xs, ys, width, color=COLORS[k], label=LABELS[k])
        ax.axhline(TARGETS["copy_mem"], color="k", ls="--", lw=0.8)
        ax.axhline(TARGETS["inplace_mem"], color="k", ls=":", lw=0.8)
        _log_y(ax)
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("peak extra RSS / model bytes")
        ax.set_title("Peak extra memory (targets: 1.1x copy, 0.05x in place)")
        ax.grid(axis="y", alpha=0.3)
        if not scaling:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path, scaling or memory)


# --- the two torches ---------------------------------------------------------------


def _env_line(data):
    env = data["environment"]
    threads = env["threads"]
    threads = ", ".join(map(str, threads)) if isinstance(threads, list) else threads
    return f"torch {env['torch']}, {common.blas_label(env)}, {threads} thread(s)"


def torches_table(fuse, latency, old_fuse, old_latency):
    """fuse() time and fused latency on the current torch beside the oldest."""
    rows = []
    old = {r["model"]: r for r in (old_fuse or {}).get("results", [])}
    for r in (fuse or {}).get("results", []):
        o = old.get(r["model"])
        if o is None:
            continue
        cells = [r["model"]]
        for k in ("fusion_copy", "fusion_inplace", "fx_copy"):
            a = r["contenders"].get(k, {}).get("seconds", {}).get("median")
            b = o["contenders"].get(k, {}).get("seconds", {}).get("median")
            cells.append(f"{_ms(a)} / {_ms(b)}" if a and b else "–")
        for mode in ("inplace", "copy"):
            a, b = peer_ratio(r, mode), peer_ratio(o, mode)
            cells.append(f"{a[0]:.2f} / {b[0]:.2f}" if a and b else "–")
        rows.append(cells)
    lat_rows = []
    old_lat = {(r["model"], r["threads"], r["batch"]): r
               for r in (old_latency or {}).get("results", [])}
    for r in (latency or {}).get("results", []):
        o = old_lat.get((r["model"], r["threads"], r["batch"]))
        if o is None:
            continue
        cells = [r["model"], r["threads"], r["batch"]]
        for v in ("unfused", "fused (fusion)"):
            a, b = r["variants"].get(v), o["variants"].get(v)
            cells.append(f"{_ms(a['median'])} / {_ms(b['median'])}" if a and b else "–")
        f = r["ratios"].get("fused/unfused", {}).get("median")
        g = o["ratios"].get("fused/unfused", {}).get("median")
        cells.append(f"{f:.2f} / {g:.2f}" if f and g else "–")
        lat_rows.append(cells)
    if not rows and not lat_rows:
        return ""
    cur = _env_line(fuse or latency)
    was = _env_line(old_fuse or old_latency)
    text = [f"Current ({cur}) / oldest ({was}), medians, same machine, one run after "
            f"the other."]
    if rows:
        text += ["", common.md_table(["model", "fusion fuse() ms, copy",
                                      "fusion fuse() ms, in place", "torch.fx fuse ms, copy",
                                      "in place / fastest peer", "copy / fastest peer"],
                                     rows)]
    if lat_rows:
        text += ["", common.md_table(["model", "threads", "batch", "unfused ms",
                                      "fused ms", "fused / unfused"], lat_rows)]
    return "\n".join(text)


README = os.path.join(os.path.dirname(common.RESULTS), os.pardir, "README.md")
BEGIN = "<!-- begin benchmarks/results/README-table.md -->"
END = "<!-- end benchmarks/results/README-table.md -->"


def update_readme(table, path=README):
    """Puts the generated table between the README's markers, so that the two
    cannot disagree (tests/test_docs.py checks it)."""
    with open(path) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        print(f"warning: {path} has no {BEGIN} ... {END} markers; not updated")
        return
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as f:
        f.write(head + BEGIN + "\n" + table + END + tail)


def readme_table(fuse, memory, throughput, precision, latency, torches="", goals=""):
    lines = ["<!-- generated by benchmarks/report.py from `make bench`; do not edit -->",
             ""]
    if fuse:
        env = fuse["environment"]
        blas = common.blas_label(env)
        lines.append(f"Measured {env['date'][:10]} on {env['cpu']} ({env['nproc']} cores), "
                     f"torch {env['torch']}, {', '.join(map(str, env['threads']))} "
                     f"thread(s), BLAS {blas}. "
                     "Full tables: [benchmarks/results/RESULTS.md]"
                     "(benchmarks/results/RESULTS.md).")
        lines.append("")
    mem = {}
    if memory:
        mem = {(r["model"], r["contender"]): r.get("peak_ratio") for r in memory["results"]
               if "error" not in r}
    rows = []
    for r in (fuse["results"] if fuse else []):
        c = r["contenders"]

        def t(k):
            return _ms(c[k]["seconds"]["median"]) if "seconds" in c.get(k, {}) else "fails"

        def m(k):
            v = mem.get((r["model"], k))
            return f"{v:.2f}x" if v is not None else "–"

        def peer(mode):
            q = peer_ratio(r, mode)
            return "–" if q is None else f"{q[0]:.2f} ({LABELS[q[3]]})"

        rows.append([r["model"], f"{r['model_bytes'] / 2**20:.0f}",
                     f"{t('fusion_copy')} / {t('fx_copy')}",
                     f"{t('fusion_inplace')} / {t('fx_inplace')}",
                     peer("copy"), peer("inplace"),
                     f"{m('fusion_copy')} / {m('fx_copy')}",
                     f"{m('fusion_inplace')} / {m('fx_inplace')}"])
    if rows:
        lines += [common.md_table(
            ["model", "MiB", "fuse() ms, copy: fusion / torch.fx",
             "fuse() ms, in place: fusion / torch.fx",
             "copy: fusion / fastest peer", "in place: fusion / fastest peer",
             "peak extra memory, copy: fusion / torch.fx",
             "peak extra memory, in place: fusion / torch.fx"], rows), ""]
    facts = []
    if precision:
        w = {(r["dtype"], r["method"]): r for r in precision["results"]["weights"]}
        for d in ("fp32", "bf16", "fp16"):
            f, t = w.get((d, "fusion")), w.get((d, "torch fold"))
            if f and "weight" in f:
                ts = (f"torch's fold {t['weight']['identical']:.0%} (bias up to "
                      f"{t['bias']['max_ulp']} ULP off)" if t and "weight" in t
                      else "torch's fold fails")
                facts.append(f"{d} fused weights identical to the exact fold: fusion "
                             f"{f['weight']['identical']:.2%} (max {f['weight']['max_ulp']} "
                             f"ULP), {ts}")
    if throughput:
        for r in throughput["results"]:
            if r["threads"] == 1 and r["weight"].startswith("conv"):
                tot = r["cases"].get("fusion total", {}).get("gbps")
                mc = _memcpy_gbps(r)
                f64 = r["cases"].get("torch fp64 fold", {}).get("gbps")
                if tot and mc:
                    facts.append(f"core fold of one {r['weight']} {r['dtype']} weight: "
                                 f"{tot:.2f} GB/s = {tot / mc:.2f}x memcpy"
                                 + (f", {tot / f64:.1f}x torch's fp64 fold" if f64 else ""))
    if latency:
        states = [_latency_state(r) for r in latency["results"]
                  if r["ratios"].get("fused/deleted")]
        quiet = [x for x in states if not x.endswith("_noisy")]
        facts.append(f"fused latency within 3% of the BN-deleted model (the speed limit) "
                     f"in {sum(x.startswith('met') for x in states)} of {len(states)} "
                     f"(model, batch, threads) cases; of the {len(quiet)} cases with a "
                     f"p10-p90 band narrower than ±{NOISY:.0%}, "
                     f"{sum(x == 'met' for x in quiet)} within 3%")
    lines += [f"- {f}" for f in facts]
    if torches:
        lines += ["", "fuse() time and fused latency on the two supported torches:", "",
                  torches]
    if goals:
        lines += ["", "The targets, from the same run:", "", goals]
    lines += ["", "Plot to show: `benchmarks/results/headline.png` (fuse() time against "
              "model size, peak extra memory, fuse() against the fastest peer on each "
              "model, and the C core's fold against memcpy per dtype and instruction-set "
              "path)."]
    return "\n".join(lines) + "\n"


# --- targets --------------------------------------------------------------------


def targets(fuse, memory, throughput, latency, precision):
    rows = []
    if memory:
        r_in = [r for r in memory["results"] if r["contender"] == "fusion_inplace"
                and "peak_ratio" in r]
        r_cp = [r for r in memory["results"] if r["contender"] == "fusion_copy"
                and "peak_ratio" in r]
        if r_in:
            worst = max(r_in, key=lambda r: r["peak_ratio"])
            rows.append(["in-place peak extra memory (no verify) <= 5% of model bytes",
                         f"worst {worst['peak_ratio']:.2%} ({worst['model']})",
                         _ok(worst["peak_ratio"] <= TARGETS["inplace_mem"])])
        if r_cp:
            worst = max(r_cp, key=lambda r: r["peak_ratio"])
            rows.append(["copy-mode peak <= 1.1x model bytes",
                         f"worst {worst['peak_ratio']:.3f}x ({worst['model']})",
                         _ok(worst["peak_ratio"] <= TARGETS["copy_mem"])])
    if throughput:
        ratios, f64 = [], []
        for r in throughput["results"]:
            tot = r["cases"].get("fusion total", {}).get("gbps")
            mc = _memcpy_gbps(r)
            if tot and mc and r["weight"].startswith("conv"):
                ratios.append((tot / mc, r))
            t64 = r["cases"].get("torch fp64 fold", {}).get("gbps")
            if tot and t64:
                f64.append((tot / t64, r))
        if ratios:
            worst = min(ratios, key=lambda x: x[0])
            best = max(ratios, key=lambda x: x[0])
            rows.append(["core fold throughput (prepare + apply) >= 0.5x memcpy",
                         f"{worst[0]:.2f}x ({worst[1]['weight']}, {worst[1]['dtype']}, "
                         f"{worst[1]['threads']} thr) to {best[0]:.2f}x",
                         _ok(worst[0] >= TARGETS["memcpy"])])
        if f64:
            worst = min(f64, key=lambda x: x[0])
            rows.append(["core fold throughput >= 3x torch's float64 fold",
                         f"worst {worst[0]:.1f}x ({worst[1]['weight']}, "
                         f"{worst[1]['threads']} thr)", _ok(worst[0] >= TARGETS["fp64"])])
    if fuse:
        for mode in ("copy", "inplace"):
            worse, n = [], 0
            for r in fuse["results"]:
                a, b = r["contenders"].get(f"fusion_{mode}", {}), \
                    r["contenders"].get(f"fx_{mode}", {})
                if "seconds" in a and "seconds" in b:
                    n += 1
                    q = a["seconds"]["median"] / b["seconds"]["median"]
                    if q > 1:
                        worse.append(f"{r['model']} {q:.2f}x")
            detail = f"slower on {len(worse)} of {n}" + \
                (": " + ", ".join(worse) if worse else "")
            rows.append([f"fuse() time <= torch.fx fuse on every zoo model ({mode})",
                         detail, _ok(not worse and n > 0)])
        for mode, what in (("inplace", "in place <= the fastest in-place peer"),
                           ("copy", "copy <= the fastest copy peer")):
            qs = [(peer_ratio(r, mode), r) for r in fuse["results"]]
            qs = [(q, r) for q, r in qs if q is not None]
            worse = [f"{r['model']} {q[0]:.2f}x {LABELS[q[3]]}" for q, r in qs if q[0] > 1]
            rows.append([f"{what} on every zoo model", f"slower on {len(worse)} of "
                         f"{len(qs)}" + (": " + ", ".join(worse) if worse else ""),
                         _ok(not worse and bool(qs))])
        cs = [(copy_overhead(r), r) for r in fuse["results"]]
        cs = [(q, r) for q, r in cs if q is not None]
        if cs:
            worst = max(cs, key=lambda x: x[0])
            rows.append(["copy within 10% of a bare deepcopy + in place",
                         f"worst {worst[0]:.2f}x ({worst[1]['model']})",
                         _ok(worst[0] <= 1.1)])
    if latency:
        rs = [r for r in latency["results"] if r["ratios"].get("fused/deleted")]
        states = [_latency_state(r) for r in rs]
        bad = [f"{r['model']} b{r['batch']} t{r['threads']} "
               f"{r['ratios']['fused/deleted']['median']:.3f}" for r, x in zip(rs, states)
               if x.startswith("missed")]
        met = sum(x.startswith("met") for x in states)
        noise = sum(x.startswith("noise") for x in states)
        noisy = sum(x.endswith("_noisy") for x in states)
        rows.append(["fused latency within 3% of BN-deleted, or within the noise band",
                     f"{met} of {len(rs)} within 3% at the median, {noise} more within "
                     f"the noise band; {noisy} of {len(rs)} rows noisy (p10-p90 wider "
                     f"than ±{NOISY:.0%})" + (" (missed: " + ", ".join(bad) + ")"
                                              if bad else ""), _ok(not bad)])
    if precision:
        for r in precision["results"]["weights"]:
            if r["method"] == "fusion" and r["dtype"] == "fp32" and "weight" in r:
                w, b = r["weight"], r["bias"]
                ok = w["identical"] >= TARGETS["identical"] and w["max_ulp"] <= 1 and \
                    b["max_ulp"] <= 1
                rows.append(["fused fp32 weights >= 99.9% identical to exact, all within "
                             "1 ULP", f"weights {w['identical']:.3%} (max {w['max_ulp']} "
                             f"ULP), bias {b['identical']:.1%} (max {b['max_ulp']} ULP)",
                             _ok(ok)])
    return common.md_table(["target", "measured", ""], rows, align=["---"] * 3)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw", default=common.RAW)
    ap.add_argument("--out", default=common.RESULTS)
    ap.add_argument("--mode", default="quick")
    ap.add_argument("--elapsed", type=float, default=None,
                    help="seconds the whole run took, for the header")
    ap.add_argument("--oldest-raw", default=None,
                    help="raw results of the same steps on the oldest torch, compared "
                         "side by side")
    ap.add_argument("--no-readme", action="store_true",
                    help="do not copy README-table.md into README.md")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    fuse = _load(args.raw, "fuse_time")
    scaling = _load(args.raw, "fuse_time_synthetic")
    memory = _load(args.raw, "memory")
    throughput = _load(args.raw, "throughput")
    latency = _load(args.raw, "latency")
    precision = _load(args.raw, "precision")
    profile = _load(args.raw, "profile")
    profiles = [p for p in (_load(args.raw, "profile_mobilenet_v2"),
                            _load(args.raw, "profile_efficientnet_b0")) if p]
    yolo = _load(args.raw, "yolo")
    sections = [("fuse time", fuse), ("fuse time, synthetic", scaling),
                ("memory", memory), ("throughput", throughput), ("latency", latency),
                ("precision", precision), ("profile", profile), ("yolo", yolo)] + [
                    (f"profile, {p['results']['model']}", p) for p in profiles]
    goals = targets(fuse, memory, throughput, latency, precision)
    plots = []
    if fuse:
        plot_fuse_time(fuse, os.path.join(args.out, "fuse_time.png"))
        plots.append("fuse_time.png")
    fold_isa = load_fold_isa(args.raw)
    if scaling or memory:
        plot_headline(scaling, memory, os.path.join(args.out, "headline.png"), fuse,
                      fold_isa)
        plots.append("headline.png")
    if memory:
        plot_memory(memory, os.path.join(args.out, "memory.png"))
        plots.append("memory.png")
    if throughput:
        plot_throughput(throughput, os.path.join(args.out, "throughput.png"))
        plots.append("throughput.png")
    if latency:
        plot_latency(latency, os.path.join(args.out, "latency.png"))
        plots.append("latency.png")

    md = ["# Benchmark results", "",
          f"Generated by `benchmarks/run.py --{args.mode}` (`make bench` runs --quick, "
          "`make bench-full` runs --full)"
          + (f" in {args.elapsed / 60:.1f} minutes" if args.elapsed else "")
          + ". Each script's docstring says what it measures and how; every number "
          "below comes from the raw files in benchmarks/results/raw/ (not committed).",
          "", "Contenders: fusion `fuse(m)` and `fuse(m, inplace=True)`; "
          "`torch.fx.experimental.optimization.fuse` copying and in place; "
          "`torch.ao.quantization.fuse_modules` with the Conv+BN pairs that "
          "`fusion.analyze` proves (computed untimed, as its caller would list them); the "
          "naive loop of `torch.nn.utils.fusion.fuse_conv_bn_eval` over adjacent children; "
          "and the diagonal-matrix fold of detector code (`torch.mm(torch.diag(scale), "
          "w.view(out, -1))` into a new conv). The last two change the model's module "
          "tree in place but allocate new weights.", "",
          "## Targets", "", goals, ""]
    if fuse or scaling:
        md += ["## 1. fuse() wall time", ""]
        if fuse:
            md += [fuse_time_section(fuse, "torchvision zoo"), "",
                   "![fuse time](fuse_time.png)", ""]
        if scaling:
            md += [fuse_time_section(scaling, "Synthetic Conv2d+BatchNorm2d stacks: "
                                     "cost against size"), "", "![headline](headline.png)",
                   ""]
    if memory:
        md += ["## 2. Peak extra memory during fuse", "", memory_section(memory), "",
               "![memory](memory.png)", ""]
    if throughput:
        md += ["## 3. Fold throughput of the core", "", throughput_section(throughput), "",
               "![throughput](throughput.png)", ""]
        note = first_touch_note(throughput)
        if note:
            md += [note, ""]
    if fold_isa:
        md += ["### Fold kernels per dtype and instruction-set path", "",
               fold_isa_section(fold_isa), ""]
    if latency:
        md += ["## 4. Fused-model inference latency", "", latency_section(latency), "",
               "![latency](latency.png)", ""]
    if precision:
        md += ["## 5. Precision", "", precision_section(precision), ""]
    if profile:
        md += ["## 6. Where fuse() spends its time", "", profile_section(profile), ""]
        for more in profiles:
            md += [profile_section(more, cprofile=False), ""]
    torches = ""
    if args.oldest_raw:
        old_fuse = _load(args.oldest_raw, "fuse_time")
        old_latency = _load(args.oldest_raw, "latency")
        torches = torches_table(fuse, latency, old_fuse, old_latency)
        if torches:
            md += ["## 7. The two torches", "", torches, ""]
            sections += [("fuse time, oldest torch", old_fuse),
                         ("latency, oldest torch", old_latency)]
    if yolo:
        md += ["## 8. ultralytics YOLO against model.fuse()", "", yolo_section(yolo), ""]
    md += ["## Environment of each measurement", "", env_table(sections), ""]
    with open(os.path.join(args.out, "RESULTS.md"), "w") as f:
        f.write("\n".join(md))
    table = readme_table(fuse, memory, throughput, precision, latency, torches, goals)
    with open(os.path.join(args.out, "README-table.md"), "w") as f:
        f.write(table)
    if not args.no_readme:
        update_readme(table)
    print(f"wrote {os.path.join(args.out, 'RESULTS.md')}, README-table.md and "
          f"{', '.join(plots)}")


if __name__ == "__main__":
    main()
