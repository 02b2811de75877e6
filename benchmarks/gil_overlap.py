"""Do two large folds in two Python threads overlap?

fusion._C releases the GIL around the check and the write of a fold of at
least 65,536 weight elements (csrc/module.c). This measures two threads, each
folding its own large weight, against the same two folds one after the other,
with OpenMP held to one thread so that each fold uses one core. With two cores
and the GIL released, the threaded wall time approaches half the sequential.

Writes benchmarks/results/gil_overlap.md.
"""
import argparse
import os
import statistics
import threading
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from fusion import _C  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def make(mib, seed):
    gen = torch.Generator().manual_seed(seed)
    out = 1024
    w = torch.randn(out, mib * 1024 * 1024 // 4 // out, generator=gen)
    stats = [torch.randn(out, generator=gen), torch.rand(out, generator=gen) + 0.5,
             torch.randn(out, generator=gen), torch.randn(out, generator=gen)]
    return w, torch.zeros(out), stats


def fold(w, b, stats):
    m, v, g, be = stats
    _C.prepare(w, None, b, m, v, g, be, 1e-5, False, False, 1).apply()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB per weight")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "gil_overlap.md"))
    args = parser.parse_args()
    jobs = [make(args.mib, 1), make(args.mib, 2)]
    seq, par = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        for job in jobs:
            fold(*job)
        seq.append(time.perf_counter() - t)
        threads = [threading.Thread(target=fold, args=job) for job in jobs]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        par.append(time.perf_counter() - t)
    s, p = statistics.median(seq), statistics.median(par)
    text = (f"# Two folds in two threads\n\n"
            f"torch {torch.__version__}; {os.cpu_count()} cores; OMP_NUM_THREADS="
            f"{os.environ['OMP_NUM_THREADS']}; two weights of {args.mib} MiB (float32), "
            f"median of {args.repeats}.\n\n"
            f"| one after the other | two threads | overlap (sequential / threaded) |\n"
            f"|---|---|---|\n| {s * 1e3:.0f} ms | {p * 1e3:.0f} ms | {s / p:.2f}x |\n")
    print(text)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
