"""Calibration of verify's output tolerance on the torchvision zoo.

For every zoo model (random weights, BatchNorm calibrated on random data) in
float32, float16 and bfloat16, fuses with example inputs and verification and
records the relative output error, the tolerance fusion chose (TOLERANCE_FACTOR
times the measured sensitivity sigma) and their ratio in units of sigma. A
correct fold must pass everywhere; the largest ratio shows the margin.

Writes benchmarks/results/verify_calibration.md.
"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import fusion  # noqa: E402
from fusion import verify  # noqa: E402
from zoo import ZOO, build  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(ZOO))
    parser.add_argument("--out", default=os.path.join(HERE, "results",
                                                      "verify_calibration.md"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for name in args.models.split(","):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            model = build(name).to(dtype)
            x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(5))
            _, report = fusion.fuse(model, example_inputs=x.to(dtype), return_report=True)
            sigma = report.tolerance / verify.TOLERANCE_FACTOR
            rows.append((name, str(dtype).replace("torch.", ""), report.rel_err,
                         report.tolerance, report.rel_err / sigma))
            print("%-20s %-9s rel_err %.2e  tolerance %.2e  %.2f sigma" % rows[-1],
                  flush=True)
    worst = max(r[4] for r in rows)
    with open(args.out, "w") as f:
        f.write("# verify: output tolerance calibration\n\n")
        f.write(f"torch {torch.__version__}, {torch.get_num_threads()} threads; input "
                f"1x3x96x96; tolerance = {verify.TOLERANCE_FACTOR:g} sigma.\n\n")
        f.write("| model | dtype | rel_err | tolerance | rel_err / sigma |\n")
        f.write("|---|---|---|---|---|\n")
        for r in rows:
            f.write("| %s | %s | %.2e | %.2e | %.2f |\n" % r)
        f.write(f"\nLargest error: {worst:.2f} sigma, so a margin of "
                f"{verify.TOLERANCE_FACTOR / worst:.1f}x under the tolerance.\n")


if __name__ == "__main__":
    main()
