"""The demo behind ``fusion demo`` and ``make demo``: real torchvision models, fused.

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
import ctypes
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .api import fuse
from .report import FusionReport

__all__ = [
    "DEFAULT_MODELS",
    "STEPS",
    "DemoResult",
    "Environment",
    "environment",
    "set_threads",
    "build_model",
    "calibrate",
    "relative_error",
    "measure_latency",
    "run_model",
    "format_environment",
    "format_result",
    "format_summary",
]

#: The models ``fusion demo`` runs when none are named.
DEFAULT_MODELS = ("resnet50", "mobilenet_v2")

# Debian's alternatives link that decides which libblas.so.3 every program loads:
# OpenBLAS or the reference (netlib) BLAS, which is several times slower.
_BLAS_ALTERNATIVE = "/etc/alternatives/libblas.so.3-x86_64-linux-gnu"

# Models whose stem expects another input size than 224.
_IMAGE_SIZE = {"inception_v3": 299}

Progress = Optional[Callable[[str], None]]

#: How many times :func:`run_model` reports a step to its ``progress`` callback.
STEPS = 5


# --- The machine -----------------------------------------------------------------


@dataclass
class Environment:
    """What a latency figure depends on: torch's threads and the BLAS in use.

    Attributes:
        torch_version: ``torch.__version__``.
        threads: ``torch.get_num_threads()``.
        interop_threads: ``torch.get_num_interop_threads()``.
        blas_info: ``BLAS_INFO`` from ``torch.__config__.show()`` (``generic``
            means torch calls whatever ``libblas.so.3`` the system provides).
        blas_alternative: where Debian's ``libblas.so.3`` alternative points, or
            ``None`` where there is no such link.
        blas_loaded: the BLAS libraries mapped into this process.
        blas_name: a short name: ``OpenBLAS 0.3.21``, ``netlib`` or ``unknown``.
        blas_threads: OpenBLAS's own thread count, where OpenBLAS is loaded. It
            has a pool of its own, separate from torch's.
        mkldnn: whether torch can use oneDNN for convolutions.
    """

    torch_version: str
    threads: int
    interop_threads: int
    blas_info: str
    blas_alternative: Optional[str]
    blas_loaded: List[str] = field(default_factory=list)
    blas_name: str = "unknown"
    blas_threads: Optional[int] = None
    mkldnn: bool = False


def _loaded_libraries(pattern: str) -> List[str]:
    """Shared objects mapped into this process whose path matches ``pattern``."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:  # not Linux
        return []
    return sorted(p for p in paths if re.search(pattern, os.path.basename(p)))


def _openblas() -> Optional[ctypes.CDLL]:
    """The OpenBLAS library this process already uses, or ``None``.

    Opening the already mapped file returns the same library, so its thread
    count is the one torch's BLAS calls run with."""
    for path in _loaded_libraries(r"^lib(open)?blas"):
        try:
            lib = ctypes.CDLL(path)
            lib.openblas_get_num_threads  # noqa: B018  (raises if not OpenBLAS)
        except (OSError, AttributeError):
            continue
        return lib
    return None


def environment() -> Environment:
    """Reads torch's threads and the BLAS in use from torch and the system.

    Returns:
        An :class:`Environment`.
    """
    config = torch.__config__.show()
    found = re.search(r"BLAS_INFO=([^,\s]+)", config)
    alternative = None
    if os.path.islink(_BLAS_ALTERNATIVE):
        alternative = os.path.realpath(_BLAS_ALTERNATIVE)
    env = Environment(
        torch_version=torch.__version__,
        threads=torch.get_num_threads(),
        interop_threads=torch.get_num_interop_threads(),
        blas_info=found.group(1) if found else "unknown",
        blas_alternative=alternative,
        blas_loaded=_loaded_libraries(r"^lib(open)?blas"),
        mkldnn=bool(torch.backends.mkldnn.is_available()),
    )
    if env.blas_info not in ("generic", "unknown"):
        # pip's torch links its own BLAS (MKL on x86-64) into libtorch_cpu; the
        # system's libblas.so.3, even where loaded by another library, is not it.
        env.blas_name = f"{env.blas_info.upper()}, built into torch"
        return env
    lib = _openblas()
    if lib is not None:
        lib.openblas_get_config.restype = ctypes.c_char_p
        config = lib.openblas_get_config().decode(errors="replace").split()
        env.blas_name = " ".join(config[:2]) if config else "OpenBLAS"
        env.blas_threads = int(lib.openblas_get_num_threads())
    elif alternative is not None and "openblas" not in alternative:
        # Debian's reference BLAS lives in .../blas/libblas.so.3.
        env.blas_name = "netlib" if "/blas/" in alternative else os.path.basename(
            os.path.dirname(alternative))
    return env


def set_threads(n: int) -> None:
    """Uses ``n`` threads in torch and, where it is loaded, in OpenBLAS.

    Setting only torch's count would leave OpenBLAS's own pool at its default
    (one thread per core), and the latency would not be that of ``n`` threads.

    Args:
        n: the number of threads, at least 1.
    """
    if n < 1:
        raise ValueError(f"threads must be at least 1, got {n}")
    torch.set_num_threads(n)
    lib = _openblas()
    if lib is not None:
        lib.openblas_set_num_threads(ctypes.c_int(n))


def format_environment(env: Environment) -> str:
    """One line naming the torch, its threads, and the BLAS it calls."""
    blas = env.blas_name
    if env.blas_threads is not None:
        blas += f" with {env.blas_threads} thread(s) of its own"
    if env.blas_info in ("generic", "unknown"):  # torch calls the system's libblas.so.3
        where = env.blas_alternative or (env.blas_loaded[0] if env.blas_loaded
                                         else "not found")
        blas += f" (libblas.so.3 -> {where})"
    return (f"torch {env.torch_version}: {env.threads} thread(s), "
            f"{env.interop_threads} inter-op; oneDNN {'on' if env.mkldnn else 'off'}; "
            f"BLAS: {blas}")


# --- Models ------------------------------------------------------------------------


def _norms(model) -> List[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def build_model(name: str, seed: int = 0) -> nn.Module:
    """A torchvision classification model with random weights and random norm affines.

    torchvision initialises every BatchNorm to weight 1 and bias 0, which would
    make the fold of the affine part trivially right; random values test it.

    Args:
        name: a model builder in ``torchvision.models``, e.g. ``"resnet50"``.
        seed: the seed of the random weights.

    Returns:
        The model, in train mode, statistics not yet calibrated.
    """
    import torchvision

    builder = getattr(torchvision.models, name, None)
    if not callable(builder) or not name[:1].islower():
        raise ValueError(f"{name!r} is not a model builder in torchvision.models")
    torch.manual_seed(seed)
    try:
        model = builder(weights=None)
    except TypeError:  # torchvision before 0.13 has no ``weights``
        model = builder(pretrained=False)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for bn in _norms(model):
            if bn.weight is not None:
                bn.weight.copy_(torch.rand(bn.weight.shape, generator=gen) + 0.5)
                bn.bias.copy_((torch.rand(bn.bias.shape, generator=gen) - 0.5) * 0.4)
    return model


def input_shape(name: str, batch: int = 1) -> Tuple[int, ...]:
    """The input shape a torchvision classification model expects."""
    size = _IMAGE_SIZE.get(name, 224)
    return (batch, 3, size, size)


def calibrate(model: nn.Module, shape: Sequence[int], passes: int = 2,
              seed: int = 1) -> nn.Module:
    """Sets every BatchNorm's running statistics to those of random normal data.

    With ``momentum=None`` a BatchNorm keeps the plain average of the batch
    statistics it sees, so after a few train-mode passes its running statistics
    are those of the data rather than an exponential blend with the defaults.

    Args:
        model: the model; its norms' statistics are reset and recomputed.
        shape: the shape of each calibration batch (more than one sample).
        passes: how many batches to average over.
        seed: the seed of the calibration data.

    Returns:
        ``model``, in eval mode, with each norm's momentum as it was.
    """
    norms = _norms(model)
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.momentum = None
        bn.reset_running_stats()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(passes):
            model(torch.randn(tuple(shape), generator=gen))
    for bn, momentum in zip(norms, momenta):
        bn.momentum = momentum
    return model.eval()


def relative_error(reference: torch.Tensor, output: torch.Tensor) -> float:
    """``||output - reference||_2 / ||reference||_2``, computed in float64."""
    ref, out = reference.detach().double(), output.detach().double()
    return float((out - ref).norm() / ref.norm())


def measure_latency(first: nn.Module, second: nn.Module, x: torch.Tensor,
                    repeats: Optional[int] = None,
                    budget_s: float = 6.0) -> Tuple[float, float, int]:
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
        ``(median seconds of first, median seconds of second, runs of each)``.
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
    return statistics.median(times_a), statistics.median(times_b), repeats


# --- One model -------------------------------------------------------------------


@dataclass
class DemoResult:
    """What the demo measured on one model.

    Attributes:
        name: the torchvision model name.
        parameters_before: parameter elements of the original model.
        parameters_after: parameter elements of the fused model.
        report: fuse's :class:`FusionReport` (verified on one example input).
        rel_err: relative output error of the fused model on fresh inputs.
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
    rel_err: float
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
        return tolerance is None or self.rel_err <= tolerance


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run_model(name: str, *, repeats: Optional[int] = None, seed: int = 0,
              progress: Progress = None) -> DemoResult:
    """Builds, calibrates, fuses, checks and times one torchvision model.

    Args:
        name: a model builder in ``torchvision.models``.
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
    step(f"{name}: building")
    model = build_model(name, seed)
    step(f"{name}: calibrating BatchNorm")
    calibrate(model, input_shape(name, batch=8), passes=2, seed=seed + 2)
    gen = torch.Generator().manual_seed(seed + 3)
    example = torch.randn(input_shape(name), generator=gen)
    fresh = torch.randn(input_shape(name, batch=4), generator=gen)

    step(f"{name}: fusing and verifying")
    start = time.perf_counter()
    fused, report = fuse(model, example_inputs=example, return_report=True)
    fuse_s = time.perf_counter() - start

    step(f"{name}: measuring the error")
    with torch.no_grad():
        rel_err = relative_error(model(fresh), fused(fresh))
    step(f"{name}: timing")
    before, after, runs = measure_latency(model, fused, example, repeats)
    return DemoResult(name, _count(model), _count(fused), report, rel_err,
                      fresh.shape[0], before, after, runs, fuse_s)


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


def format_result(res: DemoResult) -> str:
    """A block of lines describing one model's result."""
    r = res.report
    removed_p, removed_b = sum(r.removed_parameters.values()), r.buffers_removed
    added = sum(r.added_parameters.values())
    verified = ("" if r.rel_err is None else
                f"; fuse verified {r.rel_err:.2g} <= {r.tolerance:.2g} "
                f"on its example input")
    lines = [f"{res.name}", f"  pairs fused      {len(r.fused)}:"]
    lines += _wrapped(_pairs(r), 4)
    lines.append(f"  norms left       {len(r.left)}" + (":" if r.left else ""))
    lines += _wrapped([f"{n.norm} ({n.reason})" for n in r.left], 4)
    lines += [
        f"  removed          {removed_p:,} parameters in {len(r.removed_parameters)} "
        f"tensors, {removed_b:,} buffer elements in {len(r.removed_buffers)} tensors",
        f"  added            {added:,} bias parameters in {len(r.added_parameters)} "
        f"tensors",
        f"  parameters       {res.parameters_before:,} -> {res.parameters_after:,} "
        f"({res.parameters_after - res.parameters_before:+,})",
        f"  rel_err          {res.rel_err:.2g} on {res.error_samples} fresh inputs"
        f"{verified}" + ("" if res.ok else "  ** ABOVE TOLERANCE **"),
        f"  latency, batch 1 {res.latency_before_s * 1e3:.1f} ms -> "
        f"{res.latency_after_s * 1e3:.1f} ms ({res.speedup:.2f}x), median of "
        f"{res.runs} interleaved runs each",
        f"  fuse() took      {res.fuse_s:.2f} s (copy, discovery, fold, verification)",
    ]
    return "\n".join(lines)


def format_summary(results: Sequence[DemoResult]) -> str:
    """An aligned table of every model's headline figures."""
    head = ("model", "fused", "left", "net params removed", "rel_err", "before ms",
            "after ms", "speedup")
    rows = [(r.name, str(len(r.report.fused)), str(len(r.report.left)),
             f"{r.report.parameters_reduced:,}", f"{r.rel_err:.2g}",
             f"{r.latency_before_s * 1e3:.1f}", f"{r.latency_after_s * 1e3:.1f}",
             f"{r.speedup:.2f}x") for r in results]
    widths = [max(len(row[i]) for row in rows + [head]) for i in range(len(head))]
    fmt = "  ".join(("{:<%d}" if i == 0 else "{:>%d}") % w for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))]
                     + [fmt.format(*row) for row in rows])
