"""Precision of fused weights and of fused models' outputs, fusion against
torch's fold.

1. Weights. One Conv2d(``--in-ch``, ``--out-ch``, 3) with a bias, followed by
   a BatchNorm2d whose statistics are calibrated on the conv's own outputs
   (so the running mean is close to the bias, and b - mean cancels, as in
   real models). The pair is cast to fp32, fp16 and bf16, and each method
   folds the stored values:

   * fusion: ``fusion.fuse_conv_and_bn`` (float64, rounded once);
   * torch fold: ``torch.nn.utils.fusion.fuse_conv_bn_eval``, in the dtype;
   * torch fold in fp64: the same with every tensor cast to float64 and the
     results cast back (two roundings: a reference for what fp64 buys);
   * diag-mm: the detector-code fold of benchmarks/common.py, in the dtype.

   Each fused weight and bias is compared with the exact fold (tests/exact.py:
   rational arithmetic, one rounding), as the share of values identical to it
   and the largest distance in ULP. DESIGN.md's criterion: >= 99.9%
   identical and all within 1 ULP. A method that raises (torch has no fp16
   kernels on CPU) is reported with its error.

2. Outputs. Each zoo model is run in float64 on a fixed input: the reference.
   Then the model is cast to fp32, fp16 and bf16 and fused by fusion
   (``fuse``) and by torch's fold (``torch.fx.experimental.optimization.fuse``,
   which calls fuse_conv_bn_eval on every Conv+BN pair; where fx cannot trace,
   the naive loop). Every model, unfused included, runs in float32 (half
   models as float32 copies: CPU torch has no half kernels). Reported:
   ``rel_err = ||y - y64||_2 / ||y64||_2``; the unfused model's own error is
   the floor set by the dtype.

Usage:
    benchmarks/bench_precision.py --models resnet18 resnet50 \
        --out benchmarks/results/raw/precision.json
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
from exact import exact_after, ulp_distance  # noqa: E402 (tests/exact.py)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def calibrated_pair(in_ch, out_ch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=True)
    with torch.no_grad():
        conv.weight.normal_(0, (2.0 / (in_ch * 9)) ** 0.5, generator=gen)
        conv.bias.normal_(0, 0.5, generator=gen)
    bn = nn.BatchNorm2d(out_ch, momentum=None)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.bias.uniform_(-0.2, 0.2, generator=gen)
        bn.train()
        for _ in range(3):
            bn(conv(torch.randn(4, in_ch, 16, 16, generator=gen)))
    return conv.eval(), bn.eval()


def _fp64_fold(conv, bn):
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    fused = fuse_conv_bn_eval(copy.deepcopy(conv).double(), copy.deepcopy(bn).double())
    return fused.to(conv.weight.dtype)


def _torch_fold(conv, bn):
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    return fuse_conv_bn_eval(conv, bn)


def _fusion_fold(conv, bn):
    import fusion
    return fusion.fuse_conv_and_bn(conv, bn)


def _diag_fold(conv, bn):
    with torch.no_grad():
        return common.diag_fold(conv, bn)


METHODS = {"fusion": _fusion_fold, "torch fold": _torch_fold,
           "torch fold in fp64": _fp64_fold, "diag-mm": _diag_fold}


def _stats(values, exact):
    d = ulp_distance(values.detach().contiguous(), exact)
    return {"identical": float((d == 0).double().mean()), "max_ulp": int(d.max()),
            "within_1ulp": float((d <= 1).double().mean()), "n": int(d.numel())}


def weights(in_ch, out_ch, dtypes):
    rows = []
    conv32, bn32 = calibrated_pair(in_ch, out_ch)
    for dname in dtypes:
        dtype = DTYPES[dname]
        conv, bn = copy.deepcopy(conv32).to(dtype), copy.deepcopy(bn32).to(dtype)
        t0 = time.perf_counter()
        w_exact, b_exact = exact_after(conv.weight, conv.bias, bn)
        print(f"[precision] exact reference {dname}: {time.perf_counter() - t0:.1f} s",
              flush=True)
        for method, fn in METHODS.items():
            row = {"dtype": dname, "method": method,
                   "layer": f"Conv2d({in_ch}, {out_ch}, 3) + BatchNorm2d"}
            try:
                fused = fn(conv, bn)
                if fused.weight.dtype != dtype:
                    raise TypeError(f"returned {fused.weight.dtype}")
                row["weight"] = _stats(fused.weight, w_exact)
                row["bias"] = _stats(fused.bias, b_exact)
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            rows.append(row)
    return rows


def _run32(model, x):
    with torch.no_grad():
        if any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters()):
            model = copy.deepcopy(model).float()
        return model(x).double()


def _rel(y, ref):
    return float((y - ref).norm() / ref.norm())


def _torch_model_fold(model):
    from torch.fx.experimental.optimization import fuse
    try:
        return fuse(model), "torch.fx fuse"
    except Exception:
        return common.naive_fuse(copy.deepcopy(model)), "naive loop"


def outputs(models, dtypes, cache_dir, shape):
    import fusion
    rows = []
    for name in models:
        base = common.build_model(name, cache_dir)
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = copy.deepcopy(base).double()(x.double())
        print(f"[precision] {name}", flush=True)
        for dname in dtypes:
            dtype = DTYPES[dname]
            m = copy.deepcopy(base).to(dtype)
            row = {"model": name, "dtype": dname, "input": list(shape)}
            y_unfused = _run32(m, x)
            row["unfused"] = _rel(y_unfused, ref)
            try:
                row["fusion"] = _rel(_run32(fusion.fuse(m), x), ref)
            except Exception as exc:
                row["fusion_error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
            try:
                fused, how = _torch_model_fold(m)
                row["torch_how"] = how
                row["torch fold"] = _rel(_run32(fused, x), ref)
            except Exception as exc:
                row["torch_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            rows.append(row)
    return rows


def print_tables(wrows, orows):
    out = []
    for r in wrows:
        if "error" in r:
            out.append([r["dtype"], r["method"], "fails", "", "", "", r["error"][:60]])
        else:
            w, b = r["weight"], r["bias"]
            out.append([r["dtype"], r["method"], f"{w['identical']:.4%}", w["max_ulp"],
                        f"{b['identical']:.2%}", b["max_ulp"], ""])
    print("fused values against the exact fold")
    print(common.md_table(["dtype", "method", "weights identical", "weights max ULP",
                           "bias identical", "bias max ULP", "error"], out))
    out = []
    for r in orows:
        out.append([r["model"], r["dtype"], f"{r['unfused']:.2e}",
                    f"{r['fusion']:.2e}" if "fusion" in r else "fails",
                    f"{r['torch fold']:.2e}" if "torch fold" in r else "fails"])
    print("output rel_err against a float64 run of the original")
    print(common.md_table(["model", "dtype", "unfused", "fusion", "torch fold"], out))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--in-ch", type=int, default=64)
    ap.add_argument("--out-ch", type=int, default=128)
    ap.add_argument("--input", type=int, nargs=4, default=[2, 3, 160, 160])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default=os.path.join(common.RAW, "precision.json"))
    args = ap.parse_args(argv)
    common.set_threads(args.threads)
    env = common.environment([args.threads])
    wrows = weights(args.in_ch, args.out_ch, args.dtypes)
    orows = outputs(args.models, args.dtypes, args.cache_dir, tuple(args.input))
    print_tables(wrows, orows)
    common.save_json(args.out, env, {"weights": wrows, "outputs": orows})


if __name__ == "__main__":
    main()
