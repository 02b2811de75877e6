"""The ``fusion`` command line (also ``python -m fusion``): fuse, analyze, demo.

The library never prints; this module is where printing happens. Results go to
stdout (the report table, or with ``--json`` the report's JSON and nothing else);
progress, log messages and errors go to stderr.

Exit codes:
    0: done.
    1: fusion failed (a ``FusionError``), verification exceeded the tolerance, or
       ``--strict`` found norms left unfused.
    2: a usage error, a file that cannot be read (or an output that cannot be
       written), or example inputs the model does not run on.
"""
import argparse
import contextlib
import importlib
import inspect
import logging
import os
import re
import shutil
import sys
import tempfile
import textwrap
import traceback
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .errors import FusionError
from ._tools.offline import ultralytics_offline

__all__ = ["main", "build_parser", "load_source", "load_weights", "parse_example_input",
           "make_example_inputs", "UsageError", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

_PROG = "fusion"

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "double": torch.float64, "fp64": torch.float64,
}

# ``package.module:callable``, the callable possibly a dotted attribute path.
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def _has_weights_only() -> bool:
    # torch.load gained ``weights_only`` in 1.13, and defaults it to True from 2.6,
    # where loading a whole pickled model needs weights_only=False.
    try:
        return "weights_only" in inspect.signature(torch.load).parameters
    except (TypeError, ValueError):  # a wrapped torch.load without a signature
        return False


_HAS_WEIGHTS_ONLY = _has_weights_only()

_TRUST = ("SRC is unpickled, which runs code from the file: use only files you trust. "
          "Files given to --weights and --example-inputs are loaded with "
          "weights_only=True (tensors and plain containers only).")


class UsageError(Exception):
    """A bad argument or an unreadable file: exit code 2."""


# --- Loading -----------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _torch_load(path: str, *, trusted: bool) -> Any:
    """``torch.load`` onto the CPU; ``trusted`` allows arbitrary pickled objects."""
    kwargs = {"map_location": "cpu"}
    if _HAS_WEIGHTS_ONLY:
        kwargs["weights_only"] = not trusted
    return torch.load(path, **kwargs)


def _read(path: str, what: str, *, trusted: bool) -> Any:
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file ({what})")
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a directory, not a file ({what})")
    try:
        return _torch_load(path, trusted=trusted)
    except ModuleNotFoundError as exc:
        raise UsageError(
            f"{path}: cannot load {what}: {_first_line(exc)}; the module that defines "
            f"the model's class must be importable (run from its directory or set "
            f"PYTHONPATH)") from exc
    except AttributeError as exc:
        # the class was looked up in the running program's __main__ (fusion's own,
        # under `python -m fusion`), since pickle recorded __main__ as its module
        found = re.search(r"Can't get attribute '([^']+)' on <module '[\w.]*__main__'",
                          str(exc))
        if found is None:
            raise UsageError(f"{path}: cannot load {what}: {_first_line(exc)}") from exc
        raise UsageError(
            f"{path}: cannot load {what}: its class {found.group(1)} was defined in the "
            f"script that saved it (module __main__), which no other program can "
            f"import. Move the class into a module, save the weights with "
            f"torch.save(model.state_dict(), 'weights.pt'), and pass the factory: "
            f"fusion fuse yourmodule:{found.group(1)} --weights weights.pt -o OUT") \
            from exc
    except Exception as exc:  # torch.load raises many types for a bad file
        text = str(exc)
        if not trusted and "WeightsUnpickler error:" in text:
            # torch's message is a paragraph; its last sentence names the class.
            why = " ".join(text.split("WeightsUnpickler error:", 1)[1].split())
            raise UsageError(
                f"{path}: cannot load {what}: it holds pickled objects, not only tensors "
                f"and plain containers ({why}); it is loaded with weights_only=True, so "
                f"save it as tensors (e.g. torch.save(model.state_dict()))") from exc
        raise UsageError(f"{path}: cannot load {what}: {_first_line(exc)}") from exc


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _import_factory(spec: str):
    module_name, _, attr_path = spec.partition(":")
    # The console script's sys.path starts with its own bin directory, not the
    # current one; look up factories (and pickled classes) where the user is,
    # as `python -m fusion` would.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"{spec}: no such file, and as a factory: cannot import "
                         f"{module_name}: {_first_line(exc)}") from exc
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{spec}: {module_name} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{spec}: {attr_path} is not callable")
    return obj


def parse_factory_kwargs(text: str) -> dict:
    """``--factory-kwargs``: a JSON object of keyword arguments (``null`` is None),
    parsed as JSON, never evaluated."""
    import json

    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"{text!r}: must be a JSON object, e.g. '{{\"weights_backbone\": null}}'")
    return value


#: SRC prefixes that name a model of a model library, built with its own
#: initial weights (nothing is downloaded; load yours with --weights).
LIBRARY_PREFIXES = ("timm:", "yolo:")


def _library_model(spec: str, kwargs: dict) -> nn.Module:
    """``timm:NAME`` (timm.create_model(NAME, pretrained=False, **kwargs)) or
    ``yolo:NAME`` (ultralytics' DetectionModel from NAME.yaml, or NAME itself
    where it ends in .yaml)."""
    library, _, name = spec.partition(":")
    if not name:
        raise UsageError(f"{spec}: name a model after {library}:, e.g. "
                         f"{'timm:efficientnet_b0' if library == 'timm' else 'yolo:yolov8n'}")
    try:
        if library == "timm":
            import timm

            if not timm.is_model(name):
                raise UsageError(f"{spec}: timm has no model {name!r} (timm.list_models() "
                                 f"lists them)")
            return timm.create_model(name, pretrained=False, **kwargs)
        from ultralytics.nn.tasks import DetectionModel

        yaml = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
        return DetectionModel(yaml, verbose=False, **kwargs)
    except UsageError:
        raise
    except ImportError as exc:
        package = "timm" if library == "timm" else "ultralytics"
        raise UsageError(f"{spec}: needs {package} ({_first_line(exc)}); install it, e.g. "
                         f"pip install fusion[models]") from exc
    except Exception as exc:
        raise UsageError(f"{spec}: building it raised {_first_line(exc)}") from exc


def load_source(spec: str, factory_kwargs: Optional[dict] = None) -> nn.Module:
    """The model named by SRC: a file saved with ``torch.save(model)``, a factory,
    or a model library's model.

    Args:
        spec: a path, ``package.module:callable``, ``timm:NAME`` or ``yolo:NAME``.
        factory_kwargs: the keyword arguments a factory is called with (none by
            default); an error for a file.

    Returns:
        The model, on the CPU.

    Raises:
        UsageError: the file cannot be read, the factory cannot be imported or
            called, or the result is not an ``nn.Module``.
    """
    if spec.startswith(LIBRARY_PREFIXES) and not os.path.exists(spec):
        obj = _library_model(spec, factory_kwargs or {})
        what = spec
    elif os.path.exists(spec) or not _FACTORY.match(spec):
        if factory_kwargs:
            raise UsageError(f"{spec}: --factory-kwargs applies to a factory "
                             f"(package.module:callable), not to a saved model")
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # where pickled classes are looked up
        obj = _read(spec, "the model", trusted=True)
        if isinstance(obj, torch.jit.ScriptModule):
            raise UsageError(f"{spec}: holds a TorchScript module: fuse the eager model "
                             f"before scripting it, or use torch.jit.freeze")
        if _is_state_dict(obj):
            raise UsageError(
                f"{spec}: holds a state_dict, not a whole model; pass the factory that "
                f"builds the model as SRC (package.module:callable) and this file as "
                f"--weights")
        what = spec
    else:
        factory = _import_factory(spec)
        kwargs = factory_kwargs or {}
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        try:
            obj = factory(**kwargs)
        except Exception as exc:
            hint = ("" if kwargs else "; give it arguments with --factory-kwargs "
                    "'{\"name\": value}' (JSON)")
            raise UsageError(f"{spec}: calling it with "
                             f"{'(' + shown + ')' if kwargs else 'no arguments'} raised "
                             f"{_first_line(exc)}{hint}") from exc
        what = f"{spec}({shown})"
    if not isinstance(obj, nn.Module):
        raise UsageError(f"{what}: holds a {type(obj).__name__}, not a torch.nn.Module")
    return obj


def _looks_fused(model, missing, unexpected) -> bool:
    """Whether a state_dict lacks exactly norm entries and adds only biases, as the
    state_dict of a fused model of the same architecture does."""
    from .layers import is_norm_module

    norms = [name + "." for name, m in model.named_modules() if is_norm_module(m)]
    return bool(missing) and all(any(k.startswith(n) for n in norms) for k in missing) \
        and all(k.endswith(".bias") for k in unexpected)


def load_weights(model: nn.Module, path: str) -> None:
    """Loads the state_dict in ``path`` into ``model``, strictly.

    Raises:
        UsageError: unreadable file, not a state_dict, or keys or shapes that do
            not match the model.
    """
    obj = _read(path, "the weights", trusted=False)
    if isinstance(obj, dict) and not _is_state_dict(obj) and _is_state_dict(
            obj.get("state_dict")):
        obj = obj["state_dict"]  # a training checkpoint that wraps the weights
    if not _is_state_dict(obj):
        raise UsageError(f"{path}: holds a {type(obj).__name__}, not a state_dict "
                         f"(a dict of name -> tensor)")
    own = model.state_dict()
    missing = [k for k in own if k not in obj]
    unexpected = [k for k in obj if k not in own]
    if missing or unexpected:
        def some(keys):
            return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3
                                          else "")
        parts = ([f"missing {some(missing)}"] if missing else []) + (
            [f"unexpected {some(unexpected)}"] if unexpected else [])
        hint = ""
        if _looks_fused(model, missing, unexpected):
            hint = ("; they look like fused weights: rebuild the fused structure with "
                    "fusion.apply_plan(model, report.plan) before loading them")
        raise UsageError(f"{path}: does not match the model: {'; '.join(parts)}{hint}")
    for name, tensor in obj.items():
        if own[name].shape != tensor.shape:
            raise UsageError(f"{path}: {name} has shape {tuple(tensor.shape)} but the "
                             f"model's has {tuple(own[name].shape)}")
    model.load_state_dict(obj)


def parse_example_input(text: str):
    """``SHAPE[:DTYPE]`` -> ``(shape, dtype)``, for ``--example-input``.

    ``SHAPE`` is comma-separated positive sizes (``1,3,224,224``); ``DTYPE`` is a
    float dtype name (``float32``, the default, ``float16``, ``bfloat16``,
    ``float64``).
    """
    shape_text, _, dtype_text = text.partition(":")
    try:
        shape = tuple(int(s) for s in shape_text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: the shape must be comma-separated integers, e.g. 1,3,224,224"
        ) from None
    if not shape or any(s < 1 for s in shape):
        raise argparse.ArgumentTypeError(f"{text!r}: every size must be at least 1")
    dtype = torch.float32
    if dtype_text:
        dtype = _DTYPES.get(dtype_text.lower())
        if dtype is None:
            raise argparse.ArgumentTypeError(
                f"{text!r}: unknown dtype {dtype_text!r}; use one of float32, float16, "
                f"bfloat16, float64")
    return shape, dtype


def make_example_inputs(specs, path: Optional[str]):
    """The ``example_inputs`` for fuse from ``--example-input`` or ``--example-inputs``.

    Random inputs come from a fixed seed, so that runs are repeatable. One
    ``--example-input`` is the single argument; several are positional arguments.
    """
    if path is not None:
        return _read(path, "the example inputs", trusted=False)
    if not specs:
        return None
    gen = torch.Generator().manual_seed(0)
    # randn in float32, then cast: not every torch has half randn on the CPU.
    tensors = [torch.randn(shape, generator=gen).to(dtype) for shape, dtype in specs]
    return tensors[0] if len(tensors) == 1 else tuple(tensors)


# --- Output ------------------------------------------------------------------------


class _Progress:
    """Names the step under way, on stderr, when a person is watching.

    It counts steps (loading, fusing, saving), not work inside them: the library
    reports no finer progress, and a bar that moved on its own would be a guess.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self._started = False

    def start(self, total: int) -> None:
        if not self.enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:  # progress is a nicety
            return
        # tqdm ignores bar_format where it sees a zero-width terminal; the
        # line has no bar, so any width will do.
        width = shutil.get_terminal_size().columns or 80
        self.bar = tqdm(total=total, file=sys.stderr, leave=False, ncols=width,
                        bar_format="[{n_fmt}/{total_fmt}] {desc}...")

    def step(self, what: str) -> None:
        if self.bar is None:
            return
        if self._started:
            self.bar.update(1)
        self._started = True
        self.bar.set_description_str(what)

    def write(self, line: str, file=None) -> bool:
        """Prints a line above the bar; False when there is no bar."""
        if self.bar is None:
            return False
        self.bar.write(line, file=file or sys.stderr)
        return True

    def print(self, text: str = "") -> None:
        """Prints to stdout, clearing the bar first so that the two do not mix."""
        if not self.write(text, file=sys.stdout):
            print(text)
            sys.stdout.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _LogHandler(logging.Handler):
    """Sends the library's log records to stderr, above a progress bar if any."""

    def __init__(self, progress_ref):
        super().__init__()
        self.progress_ref = progress_ref
        self.setFormatter(logging.Formatter(f"{_PROG}: %(message)s"))

    def emit(self, record):
        try:
            line = self.format(record)
            progress = self.progress_ref()
            if progress is None or not progress.write(line):
                sys.stderr.write(line + "\n")
                sys.stderr.flush()
        except Exception:
            self.handleError(record)


def _counts(report) -> str:
    """The parameter and buffer counts, in words of a fusion done or planned."""
    r = report
    done = not r.dry_run
    rows = [
        ("parameters removed" if done else "parameters to remove",
         f"{sum(r.removed_parameters.values()):,} in {len(r.removed_parameters)} tensors"),
        ("buffers removed" if done else "buffers to remove",
         f"{r.buffers_removed:,} elements in {len(r.removed_buffers)} tensors"),
        ("biases added" if done else "biases to add",
         f"{sum(r.added_parameters.values()):,} in {len(r.added_parameters)} tensors"),
        ("net change", f"{-r.parameters_reduced:+,} parameters"),
    ]
    width = max(len(k) for k, _ in rows) + 1
    return "\n".join(f"{(k + ':').ljust(width)} {v}" for k, v in rows)


def _check_writable(path: str, flag: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UsageError(f"{path}: directory {directory} does not exist ({flag})")
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a directory ({flag})")
    if not os.access(directory, os.W_OK):
        raise UsageError(f"{path}: directory {directory} is not writable ({flag})")


@contextlib.contextmanager
def _atomic_path(path: str):
    """A temporary path beside ``path`` that replaces it only on success, so a
    failed or interrupted save never leaves a truncated model behind."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".fusion-", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_text(path: str, text: str) -> None:
    with _atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text + "\n")


# --- Commands ------------------------------------------------------------------------


def _inputs_from(args):
    if args.example_input and args.example_inputs:
        raise UsageError("give --example-input or --example-inputs, not both")
    return make_example_inputs(args.example_input, args.example_inputs)


def _load_model(args) -> nn.Module:
    """SRC with its --weights, in eval mode: a factory builds a model in training
    mode, and fusing is for inference, so the CLI says nothing about it. What
    building or unpickling it prints (ultralytics' settings notice, a factory's
    own output) goes to stderr: stdout is the report's."""
    with contextlib.redirect_stdout(sys.stderr):
        model = load_source(args.src, args.factory_kwargs)
        if args.weights:
            load_weights(model, args.weights)
    return model.eval()


def _cmd_fuse(args, progress: _Progress) -> int:
    from .api import fuse

    if args.verify and not (args.example_input or args.example_inputs):
        raise UsageError("--verify needs --example-input or --example-inputs to run "
                         "the model on")
    if args.rtol is not None and (args.verify is False or not (
            args.example_input or args.example_inputs)):
        raise UsageError("--rtol applies to verification, which needs --example-input or "
                         "--example-inputs (and not --no-verify)")
    _check_writable(args.output, "-o")
    if args.report:
        _check_writable(args.report, "--report")
    progress.start(3)
    progress.step(f"loading {args.src}")
    model = _load_model(args)
    inputs = _inputs_from(args)
    verify = args.verify if args.verify is not None else inputs is not None
    progress.step("fusing and verifying" if verify else "fusing")
    fused, report = fuse(model, inplace=args.inplace_load, example_inputs=inputs,
                         verify=verify, rtol=args.rtol, strict=args.strict,
                         fixed_shapes=args.fixed_shapes,
                         return_report=True)
    progress.step(f"saving {args.output}")
    try:
        with _atomic_path(args.output) as tmp:
            torch.save(fused, tmp)
    except Exception as exc:
        raise FusionError(f"{args.output}: cannot save the fused model: "
                          f"{_first_line(exc)}", None, "save") from exc
    if args.report:
        _write_text(args.report, report.to_json())
    progress.close()
    if args.json:
        print(report.to_json())
    elif not args.quiet:
        print(report)
        print(_counts(report))
        print(f"saved the fused model to {args.output}")
    return EXIT_OK


def _cmd_analyze(args, progress: _Progress) -> int:
    from .api import analyze

    progress.start(2)
    progress.step(f"loading {args.src}")
    model = _load_model(args)
    inputs = _inputs_from(args)
    progress.step("analyzing")
    report = analyze(model, example_inputs=inputs, fixed_shapes=args.fixed_shapes)
    progress.close()
    if args.json:
        print(report.to_json())
    else:
        print(report)
        print(_counts(report))
    return EXIT_OK


def _demo_models():
    from ._tools.demo import DEFAULT_MODELS  # plain data; torchvision is not imported

    return DEFAULT_MODELS


def _check_demo_name(name: str) -> None:
    """Raises UsageError unless ``name`` is a torchvision builder, ``timm:NAME``
    or ``yolo:NAME`` of an installed library."""
    from ._tools import models

    library, bare = models.split_name(name)
    try:
        if library == "timm":
            import timm

            if not timm.is_model(bare):
                raise UsageError(f"{name!r}: timm has no model {bare!r}")
            return
        if library == "yolo":
            from ._tools import yolo

            if bare not in yolo.MODELS:
                raise UsageError(f"{name!r}: the demo builds {', '.join(yolo.MODELS)} "
                                 f"(as yolo:NAME)")
            import ultralytics  # noqa: F401
            return
        import torchvision
    except ImportError as exc:
        package = {"timm": "timm", "yolo": "ultralytics"}.get(library, "torchvision")
        raise UsageError(f"{name!r}: the demo needs {package} ({_first_line(exc)})") from exc
    if not bare[:1].islower() or not callable(getattr(torchvision.models, bare, None)):
        raise UsageError(f"--models: {name!r} is not a model builder in "
                         f"torchvision.models (e.g. resnet50, mobilenet_v2), nor "
                         f"timm:NAME or yolo:NAME")


def _cmd_demo(args, progress: _Progress) -> int:
    from ._tools import demo

    names = list(args.names) + [n.strip() for n in (args.models or "").split(",")
                                if n.strip()]
    if not names:
        names = list(_demo_models())
    for name in names:
        _check_demo_name(name)
    if args.threads is not None:
        demo.set_threads(args.threads)
    progress.print("fusion demo: models with random weights and BatchNorm statistics "
                   "calibrated on random data; nothing is downloaded.")
    progress.print(demo.format_environment(demo.environment()))
    progress.start(demo.STEPS * len(names))
    results = []
    for name in names:
        result = demo.run_model(name, repeats=args.repeats, progress=progress.step)
        progress.print()
        progress.print(demo.format_result(result, verbose=args.verbose))
        results.append(result)
    progress.close()
    print()
    print(demo.format_summary(results))
    bad = [r.name for r in results if not r.ok]
    if bad:
        raise FusionError(f"{', '.join(bad)}: the fused output differs from the original "
                          f"by more than fuse's verification tolerance", bad[0], "verify")
    return EXIT_OK


# --- The parser ------------------------------------------------------------------------


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


def _add_source(p: argparse.ArgumentParser, verifies: bool) -> None:
    p.add_argument("src", metavar="SRC",
                   help="a model saved with torch.save(model) (trusted files only: it is "
                        "unpickled; loaded onto the CPU), or a factory "
                        "package.module:callable, e.g. torchvision.models:resnet50, "
                        "called with --factory-kwargs (none by default); or timm:NAME "
                        "(timm.create_model, pretrained=False) or yolo:NAME "
                        "(ultralytics' DetectionModel from NAME.yaml)")
    p.add_argument("--weights", metavar="FILE",
                   help="a state_dict (torch.save(model.state_dict())) to load into the "
                        "model before fusing")
    p.add_argument("--factory-kwargs", metavar="JSON", type=parse_factory_kwargs,
                   help="keyword arguments for a factory SRC, as a JSON object, e.g. "
                        "'{\"weights_backbone\": null}' (null is None)")
    inputs = p.add_mutually_exclusive_group()
    inputs.add_argument("--example-input", metavar="SHAPE[:DTYPE]", action="append",
                        type=parse_example_input,
                        help="a random input (torch.randn, fixed seed) of this shape, e.g. "
                             "1,3,224,224 or 1,3,224,224:float16; it proves folds in "
                             "models torch.fx cannot trace"
                             + (" and feeds verification" if verifies else "")
                             + ". Repeat for a model that takes several positional "
                               "arguments")
    inputs.add_argument("--example-inputs", metavar="FILE.pt",
                        help="inputs saved with torch.save: a tensor (the argument), a "
                             "tuple (the positional arguments) or a list (one argument, "
                             "e.g. a list of images for detection models)")
    p.add_argument("--fixed-shapes", action="store_true",
                   help="the model only ever sees inputs of the example inputs' shapes: "
                        "do not check folds of an untraceable forward that reads sizes "
                        "at another size (see the README)")
    p.add_argument("--json", action="store_true",
                   help="print the report as JSON on stdout, and nothing else there")


def _add_common(p: argparse.ArgumentParser,
                quiet_help="print no progress, log messages or table (errors still)"
                ) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help=quiet_help)
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an error, and debug log messages")


_MAIN_EPILOG = """\
examples:
  fusion fuse model.pt -o fused.pt --example-input 1,3,224,224 --verify
  fusion fuse torchvision.models:resnet50 --weights resnet50.pth -o fused.pt
  fusion analyze torchvision.models:mobilenet_v2 --json
  fusion demo --models resnet50,mobilenet_v2 --threads 2

exit status: 0 done; 1 fusion failed, verification exceeded the tolerance, or
--strict found norms left; 2 usage error, unreadable file, or example inputs the
model does not run on.
"""

_FUSE_EPILOG = f"""\
examples:
  # a whole pickled model; verify the fused one on a random 224x224 image
  fusion fuse model.pt -o fused.pt --example-input 1,3,224,224 --verify

  # a factory and a state_dict; fail unless every norm is folded
  fusion fuse torchvision.models:resnet50 --weights resnet50.pth -o fused.pt --strict

  # a half model, with the report saved for fusion.apply_plan
  fusion fuse model.pt -o fused.pt --example-input 1,3,224,224:float16 \\
      --report report.json

  # a timm or ultralytics model by name, with your weights
  fusion fuse timm:efficientnet_b0 --weights effnet.pth -o fused.pt
  fusion fuse yolo:yolov8n --weights state_dict.pt -o fused.pt --example-input 1,3,640,640

{textwrap.fill(_TRUST, 79)}
The fused model is written with torch.save(model); load it with
torch.load(OUT, weights_only=False) where the module defining its class is
importable.
"""

_ANALYZE_EPILOG = f"""\
examples:
  fusion analyze model.pt
  fusion analyze torchvision.models:resnet50 --example-input 1,3,224,224 --json

{textwrap.fill(_TRUST, 79)}
"""

_DEMO_EPILOG = """\
examples:
  fusion demo
  fusion demo --models resnet18 --threads 1 --repeats 10
  fusion demo timm:efficientnet_b0 yolo:yolov8n     (with timm and ultralytics)

The latency is the median of interleaved runs at batch 1 on the CPU; the thread
counts of torch and of the BLAS are printed with it.
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help at the terminal's width, or 100 columns where there is no terminal
    (argparse's default, 80 less the option column, leaves help about 50 wide)."""

    def __init__(self, prog):
        width = shutil.get_terminal_size((100, 24)).columns
        super().__init__(prog, width=max(60, min(width, 120)) - 2, max_help_position=30)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fusion`` command.

    Returns:
        An ``argparse.ArgumentParser`` with the subcommands fuse, analyze, demo.
    """
    from . import __version__

    fmt = _Formatter
    parser = argparse.ArgumentParser(
        prog=_PROG, formatter_class=fmt, epilog=_MAIN_EPILOG,
        description="Fold BatchNorm layers into the conv and linear layers next to them.")
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    parser.commands = {}  # name -> its parser, for errors in its own usage

    p = sub.add_parser("fuse", formatter_class=fmt, epilog=_FUSE_EPILOG,
                       help="fuse a model and save it",
                       description="Fuse a model's BatchNorm layers and save the fused "
                                   "model with torch.save.")
    _add_source(p, verifies=True)
    p.add_argument("-o", "--output", metavar="OUT", required=True,
                   help="where to save the fused model (torch.save of the whole model)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                   help="compare the fused model's output with the original's on the "
                        "example input (default: on when one is given)")
    p.add_argument("--rtol", type=_positive_float, metavar="R",
                   help="tolerance on the relative output error (default: calibrated "
                        "for the model, see the README)")
    p.add_argument("--strict", action="store_true",
                   help="fail (exit 1) if any norm would be left unfused")
    p.add_argument("--inplace-load", action="store_true",
                   help="fold into the loaded model itself instead of a copy: about half "
                        "the peak memory, for models that barely fit")
    p.add_argument("--report", metavar="FILE.json",
                   help="also write the report as JSON to this file")
    _add_common(p)
    p.set_defaults(run=_cmd_fuse)
    parser.commands["fuse"] = p

    p = sub.add_parser("analyze", formatter_class=fmt, epilog=_ANALYZE_EPILOG,
                       help="show what fuse would do, changing nothing",
                       description="A dry run: the pairs that would be folded, the norms\n"
                                   "that would be left and why, and the parameters and\n"
                                   "buffers that would be removed.")
    _add_source(p, verifies=False)
    _add_common(p, "print no progress (the table or JSON still)")
    p.set_defaults(run=_cmd_analyze)
    parser.commands["analyze"] = p

    p = sub.add_parser("demo", formatter_class=fmt, epilog=_DEMO_EPILOG,
                       help="fuse real models (torchvision, timm, YOLO) and measure them",
                       description="Build real models with random weights and\n"
                                   "calibrated BatchNorm statistics, fuse them, and show\n"
                                   "what was removed, the output error and the latency.")
    p.add_argument("names", nargs="*", metavar="MODEL",
                   help="a torchvision model name (resnet50), timm:NAME "
                        "(timm:efficientnet_b0) or yolo:NAME (yolo:yolov8n), where timm "
                        "or ultralytics is installed (default: "
                        f"{', '.join(_demo_models())})")
    p.add_argument("--models", metavar="NAMES",
                   help="the same, comma-separated")
    p.add_argument("--threads", type=_positive_int, metavar="N",
                   help="threads for torch and the BLAS (default: as they are)")
    p.add_argument("--repeats", type=_positive_int, metavar="N",
                   help="timed runs of each model (default: as many as fit in a few "
                        "seconds)")
    p.add_argument("--verbose", action="store_true",
                   help="list every pair fused and every norm left (default: grouped "
                        "by top-level module, and the first few left norms)")
    _add_common(p, "print no progress or log messages (the results still)")
    p.set_defaults(run=_cmd_demo)
    parser.commands["demo"] = p
    return parser


# --- Entry point -------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the ``fusion`` command.

    Args:
        argv: the arguments, without the program name; ``sys.argv[1:]`` by default.

    Returns:
        The exit code: 0 done, 1 fusion failed, 2 usage error or unreadable file.
    """
    # Before anything can import ultralytics: a yolo: source, a pickled YOLO
    # model, the demo.
    ultralytics_offline()
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # in the command's own usage, not the top-level one
            parser.commands[args.command].error(
                f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # argparse exits 2 on errors, 0 after --help
        return int(exc.code or 0)
    quiet = getattr(args, "quiet", False)
    debug = getattr(args, "debug", False)
    progress = _Progress(enabled=not quiet and sys.stderr.isatty())

    logger = logging.getLogger("fusion")
    handler = _LogHandler(lambda: progress)
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    logger.propagate = False  # this handler is the output; do not print twice
    try:
        return args.run(args, progress)
    except UsageError as exc:
        code, message, error = EXIT_USAGE, str(exc), exc
    except FusionError as exc:
        # the forward failed on the inputs given on the command line: a usage error
        usage = exc.code == "example_inputs"
        code, message, error = EXIT_USAGE if usage else EXIT_FAILED, str(exc), exc
    except KeyboardInterrupt as exc:
        code, message, error = 130, "interrupted", exc
    except Exception as exc:
        code, error = EXIT_FAILED, exc
        message = (f"unexpected {_first_line(exc)}"
                   + ("" if debug else " (run with --debug for the traceback)"))
    finally:
        progress.close()
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
    if debug:
        traceback.print_exception(type(error), error, error.__traceback__)
    # One line: the library's messages already name the layer or the file.
    print(f"{_PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return code
