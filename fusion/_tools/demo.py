"""The demo behind ``fusion demo`` and ``make demo``: real models, fused
(torchvision's, and timm's and ultralytics' YOLO where those are installed).

Each model is built with random weights (nothing is downloaded), its norms get a
random affine map, and its BatchNorm statistics are calibrated on random data so
that they match the data the model then sees (an uncalibrated deep ResNet with
random weights has activations that are out of scale with its default statistics,
and its error figures would mean nothing). It is then fused, and the demo measures
what fusion promises: what was folded and removed, the relative output error
against the original, and the CPU latency before and after at batch 1.

Like the rest of the library this module computes and formats, and never prints:
:mod:`fusion.cli` prints.
"""
import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

from ..api import fuse
from ..report import FusionReport
from .machine import environment, format_environment, set_threads
from .models import build, input_shape, outputs

__all__ = [
    "DEFAULT_MODELS",
    "STEPS",
    "DemoResult",
    "environment",
    "set_threads",
    "relative_error",
    "Latency",
    "measure_latency",
    "run_model",
    "format_environment",
    "format_result",
    "format_summary",
]

#: The models ``fusion demo`` runs when none are named.
DEFAULT_MODELS = ("resnet50", "mobilenet_v2")

Progress = Optional[Callable[[str], None]]

#: How many times :func:`run_model` reports a step to its ``progress`` callback.
STEPS = 4


# --- Models ------------------------------------------------------------------------


def relative_error(reference: torch.Tensor, output: torch.Tensor) -> Optional[float]:
    """``||output - reference||_2 / ||reference||_2``, computed in float64; None
    when the reference is all zeros (a randomly initialised ViT's head is) and
    the output is too: there is nothing to compare. An output that is not zero
    against a zero reference is infinitely wrong."""
    ref, out = reference.detach().double(), output.detach().double()
    size, diff = float(ref.norm()), float((out - ref).norm())
    if size == 0:
        return None if diff == 0 else float("inf")
    return diff / size


@dataclass
class Latency:
    """Median seconds per forward of two models timed side by side."""

    first_s: float
    second_s: float
    runs: int  # timed runs of each


def measure_latency(first: nn.Module, second: nn.Module, x: torch.Tensor,
                    repeats: Optional[int] = None, budget_s: float = 6.0) -> Latency:
    """Median latency of two models, timed in interleaved runs.

    Interleaving, with the order swapped every round, spreads slow periods of a
    shared machine (other processes, frequency changes) over both models
    instead of charging them to whichever ran second.

    Args:
        first: a model in eval mode.
        second: another model, taking the same input.
        x: the input.
        repeats: runs of each model; by default as many as fit in ``budget_s``,
            between 5 and 50.
        budget_s: the time the timed runs of both models may take, roughly.

    Returns:
        A :class:`Latency`.
    """
    def once(model):
        start = time.perf_counter()
        model(x)
        return time.perf_counter() - start

    with torch.no_grad():
        warm = [once(first), once(second), once(first), once(second)]
        if repeats is None:
            per_round = warm[2] + warm[3]
            repeats = int(min(50, max(5, budget_s / max(per_round, 1e-6))))
        times_a, times_b = [], []
        for i in range(repeats):
            if i % 2 == 0:
                times_a.append(once(first))
                times_b.append(once(second))
            else:
                times_b.append(once(second))
                times_a.append(once(first))
    return Latency(statistics.median(times_a), statistics.median(times_b), repeats)


# --- One model -------------------------------------------------------------------


@dataclass
class DemoResult:
    """What the demo measured on one model.

    Attributes:
        name: the model name (torchvision, timm:NAME or yolo:NAME).
        parameters_before: parameter elements of the original model.
        parameters_after: parameter elements of the fused model.
        report: fuse's :class:`FusionReport` (verified on one example input).
        rel_err: relative output error of the fused model on fresh inputs, or
            None where both outputs are all zeros (nothing to compare).
        error_samples: how many fresh inputs ``rel_err`` was measured on.
        latency_before_s: median latency of the original at batch 1.
        latency_after_s: median latency of the fused model at batch 1.
        runs: timed runs of each model.
        fuse_s: how long ``fuse`` took (copy, discovery, fold, verification).
    """

    name: str
    parameters_before: int
    parameters_after: int
    report: FusionReport
    rel_err: Optional[float]
    error_samples: int
    latency_before_s: float
    latency_after_s: float
    runs: int
    fuse_s: float

    @property
    def speedup(self) -> float:
        return self.latency_before_s / self.latency_after_s

    @property
    def ok(self) -> bool:
        """The fresh-input error is within the tolerance fuse calibrated."""
        tolerance = self.report.tolerance
        return self.rel_err is None or tolerance is None or self.rel_err <= tolerance

    @property
    def rel_err_text(self) -> str:
        return "n/a" if self.rel_err is None else f"{self.rel_err:.2g}"


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run_model(name: str, *, repeats: Optional[int] = None, seed: int = 0,
              progress: Progress = None) -> DemoResult:
    """Builds, calibrates, fuses, checks and times one model.

    Args:
        name: a model builder in ``torchvision.models``, ``timm:NAME`` or
            ``yolo:NAME``.
        repeats: timed runs of each model; by default as many as fit in a few
            seconds.
        seed: the seed of the weights and data.
        progress: called with a short description as each step starts.

    Returns:
        A :class:`DemoResult`.

    Raises:
        ValueError: ``name`` is not a torchvision model builder.
        FusionError: fusion or its verification failed.
    """
    step = progress or (lambda what: None)
    step(f"{name}: building, calibrating BatchNorm")
    model = build(name, seed, shape=input_shape(name, batch=8))
    gen = torch.Generator().manual_seed(seed + 3)
    example = torch.randn(input_shape(name), generator=gen)
    fresh = torch.randn(input_shape(name, batch=4), generator=gen)

    step(f"{name}: fusing and verifying")
    start = time.perf_counter()
    fused, report = fuse(model, example_inputs=example, return_report=True)
    fuse_s = time.perf_counter() - start

    step(f"{name}: measuring the error")
    rel_err = relative_error(outputs(name, model, fresh), outputs(name, fused, fresh))
    step(f"{name}: timing")
    latency = measure_latency(model, fused, example, repeats)
    return DemoResult(name, _count(model), _count(fused), report, rel_err,
                      fresh.shape[0], latency.first_s, latency.second_s, latency.runs,
                      fuse_s)


# --- Formatting --------------------------------------------------------------------


def _wrapped(items: Sequence[str], indent: int, width: int = 100) -> List[str]:
    """Items joined by ", " in lines of at most ``width`` columns."""
    lines, line = [], ""
    for item in items:
        piece = item if not line else ", " + item
        if line and indent + len(line) + len(piece) > width:
            lines.append(line + ",")
            line = item
        else:
            line += piece
    if line:
        lines.append(line)
    return [" " * indent + text for text in lines]


def _pairs(report: FusionReport) -> List[str]:
    """Each fused pair as "layer+norm" (norm after) or "norm+layer" (before)."""
    return [f"{p.layer}+{p.norm}" if p.direction == "after" else f"{p.norm}+{p.layer}"
            for p in report.fused]


def _grouped(names: Sequence[str]) -> List[str]:
    """Names grouped by their leading dotted components, at the shallowest depth
    that splits them into more than one group ("layer1.*: 6"; "features.3.*: 3"
    where everything is under features); a group of one is the name itself."""
    groups = {}
    for depth in range(1, 8):
        groups = {}
        for n in names:
            groups.setdefault(".".join(n.split(".")[:depth]), []).append(n)
        if len(groups) > 1:
            break
    return [items[0] if len(items) == 1 else f"{head}.*: {len(items)}"
            for head, items in groups.items()]


def format_result(res: DemoResult, verbose: bool = False) -> str:
    """A block of lines describing one model's result: the figures first, then
    the pairs fused (grouped by top-level module unless ``verbose``) and the
    norms left, each with its reason."""
    r = res.report
    removed_p, removed_b = sum(r.removed_parameters.values()), r.buffers_removed
    added = sum(r.added_parameters.values())
    if r.verified_by == "layers":
        verified = "; fuse verified it layer by layer (its outputs prove nothing)"
    elif r.rel_err is not None:
        verified = f"; fuse verified {r.rel_err:.2g} <= {r.tolerance:.2g} on its example input"
    else:
        verified = ""
    lines = [
        f"{res.name}",
        (f"  rel_err          n/a: on {res.error_samples} fresh inputs the output of "
         f"both models is all zeros, so there is nothing to compare"
         if res.rel_err is None else
         f"  rel_err          {res.rel_err:.2g} on {res.error_samples} fresh inputs"
         f"{verified}" + ("" if res.ok else "  ** ABOVE TOLERANCE **")),
        f"  latency, batch 1 {res.latency_before_s * 1e3:.1f} ms -> "
        f"{res.latency_after_s * 1e3:.1f} ms ({res.speedup:.2f}x), median of "
        f"{res.runs} interleaved runs each",
        f"  parameters       {res.parameters_before:,} -> {res.parameters_after:,} "
        f"({res.parameters_after - res.parameters_before:+,}): removed "
        f"{removed_p:,} in {len(r.removed_parameters)} tensors and {removed_b:,} buffer "
        f"elements in {len(r.removed_buffers)}, added {added:,} bias parameters in "
        f"{len(r.added_parameters)}",
        f"  fuse() took      {res.fuse_s:.2f} s (copy, discovery, fold, verification)",
        f"  pairs fused      {len(r.fused)}" + (":" if r.fused else ""),
    ]
    pairs = _pairs(r)
    grouped = _grouped(pairs)
    lines += _wrapped(pairs if verbose else grouped, 4)
    if r.fused and not verbose and len(grouped) < len(pairs):
        lines.append("    (--verbose lists every pair)")
    lines.append(f"  norms left       {len(r.left)}" + (":" if r.left else ""))
    shown = r.left if verbose else r.left[:3]
    lines += [f"    {n.norm} ({n.reason}): {n.detail}" for n in shown]
    if len(r.left) > 3 and not verbose:
        lines.append(f"    ... and {len(r.left) - 3} more (--verbose lists every one)")
    return "\n".join(lines)


def format_summary(results: Sequence[DemoResult]) -> str:
    """An aligned table of every model's headline figures."""
    head = ("model", "fused", "left", "net params removed", "rel_err", "before ms",
            "after ms", "speedup")
    rows = [(r.name, str(len(r.report.fused)), str(len(r.report.left)),
             f"{r.report.parameters_reduced:,}", r.rel_err_text,
             f"{r.latency_before_s * 1e3:.1f}", f"{r.latency_after_s * 1e3:.1f}",
             f"{r.speedup:.2f}x") for r in results]
    widths = [max(len(row[i]) for row in rows + [head]) for i in range(len(head))]
    fmt = "  ".join(("{:<%d}" if i == 0 else "{:>%d}") % w for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))]
                     + [fmt.format(*row) for row in rows])
