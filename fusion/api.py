"""The public entry points: fuse, analyze, fuse_conv_and_bn, apply_plan."""
import contextlib
import copy
import itertools
import json
import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
from torch import nn

from . import rewrite
from .discover import (
    MODEL_LOCK,
    Flow,
    flow_from_fx,
    flow_from_run,
    flow_from_sequentials,
    resized_inputs,
)
from .errors import FusionError
from .layers import (
    ModuleIndex,
    classifying,
    describe,
    is_known_norm,
    layer_kind,
    norm_remainder,
    out_channels,
    replace_module,
    replacement,
    tensors,
)
from .plan import ROOT, Fold, Plan, check_pair, make_plan
from .report import FusedPair, FusionReport, LeftNorm
from .verify import Verification, run_model, verify_fused

__all__ = ["fuse", "analyze", "fuse_conv_and_bn", "apply_plan"]

log = logging.getLogger("fusion")

PLAN_VERSION = 1

_INFERENCE_NOTE = ("fused under torch.inference_mode(): the tensors fusion made (a copy "
                   "of the model, added biases) are inference tensors, so the fused "
                   "model runs only under inference_mode; fuse outside it to get an "
                   "ordinary model")


def _check_model(model, name="model") -> ModuleIndex:
    """Raises TypeError or FusionError for a model fusion cannot fuse; returns
    the model's :class:`ModuleIndex`, made in checking it."""
    if not isinstance(model, nn.Module):
        hint = ""
        if isinstance(model, (list, tuple)):
            hint = " (pass one module, not a list)"
        elif type(model).__name__ == "ExportedProgram":
            hint = (" (a torch.export program holds no norm modules to fold: fuse the "
                    "eager model, then export the fused one)")
        raise TypeError(f"{name} must be a torch.nn.Module, got "
                        f"{type(model).__name__}{hint}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"{name} is a TorchScript module ({type(model).__name__}): its forward is "
            f"compiled code that fusion cannot see or change, so nothing would be "
            f"fused. Fuse the eager model before torch.jit.script or torch.jit.trace, "
            f"or use torch.jit.freeze, which folds BatchNorm in a scripted module.")
    # Classes of modules not imported yet cannot be in the model: looked up, not imported.
    fake = getattr(sys.modules.get("torch._subclasses.fake_tensor"), "FakeTensor", None)
    compiled = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)
    graphs = False
    index = ModuleIndex(model)
    for qualname, m in index.modules.items():
        if compiled is not None and isinstance(m, compiled):
            _refuse_compiled(qualname or ROOT)
        if fake is not None:
            _refuse_fake(qualname or ROOT, m, fake)
        graphs = graphs or isinstance(m, torch.fx.GraphModule)
    if graphs:
        _refuse_exported(model)
    return index


_PLAIN = (torch.Tensor, nn.Parameter, type(None))


def _refuse_fake(qualname, module, fake):
    """Fake tensors have no values; refused before the model is copied or traced
    (tracing a copy of a fake model can crash torch 2.14 when it is collected)."""
    for what, t in itertools.chain(module._parameters.items(), module._buffers.items()):
        if type(t) not in _PLAIN and isinstance(t, fake):
            raise FusionError(
                f"{qualname}: {what} is a FakeTensor, not a plain tensor (made under a "
                f"FakeTensorMode), so it has no values fusion can fold or write. Build "
                f"the model outside that mode, with real weights, then fuse it.",
                qualname, "tensor_subclass")


def _refuse_compiled(qualname):
    """A torch.compile'd module (OptimizedModule) holds graphs compiled from the
    unfused model, guarded on its modules: folding under it would either serve
    them stale or recompile behind the user's back."""
    raise TypeError(
        f"{qualname} is a torch.compile'd module (OptimizedModule). Fuse the eager "
        f"module before compiling it: fused = fuse(compiled._orig_mod), then "
        f"torch.compile(fused).")


def _refuse_exported(model):
    """A module from torch.export (ExportedProgram.module(), unflatten) computes
    batch norm as aten calls in its graph, with no norm module to fold."""
    for m in model.modules():
        graph = getattr(m, "graph", None) if isinstance(m, torch.fx.GraphModule) else None
        if graph is None:
            continue
        for node in graph.nodes:
            target = node.target
            if (node.op == "call_function" and isinstance(target, torch._ops.OpOverload)
                    and "batch_norm" in target.name()):
                raise TypeError(
                    f"this module comes from torch.export: batch norm is the aten call "
                    f"{target.name()} in its graph (node {node.name}), not a module "
                    f"fusion can fold. Fuse the eager model before exporting it, then "
                    f"export the fused model.")


def _raise_if_sparse(model, exc):
    """torch cannot deepcopy a sparse Parameter; name the layer that holds one."""
    for name, m in model.named_modules():
        for what, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is not None and t.layout != torch.strided:
                raise FusionError(
                    f"{name}: {what} is a sparse tensor ({t.layout}), which torch cannot "
                    f"copy and fusion cannot fold. Convert it with .to_dense() first (or "
                    f"pass inplace=True if fusion need not fold this layer).",
                    name, "sparse") from exc


def _as_args(example_inputs):
    """A tuple is the positional arguments; anything else is the one argument."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, tuple):
        return example_inputs
    return (example_inputs,)


def _check_options(example_inputs, verify, rtol):
    """The forward's positional arguments (or None), and whether to verify."""
    args = _as_args(example_inputs)
    if verify is None:
        verify = args is not None
    if verify and args is None:
        raise FusionError("verify=True needs example_inputs to run the model on.",
                          None, "verify")
    if rtol is not None and not (float(rtol) > 0):
        raise FusionError(f"rtol must be a positive number, got {rtol!r}.", None, "rtol")
    return args, verify


def _copy(model, index: Optional[ModuleIndex] = None):
    """``copy.deepcopy(model)``, or with ``index`` (the model's) a
    :class:`rewrite.DeferredCopy` of it."""
    try:
        return copy.deepcopy(model) if index is None else rewrite.DeferredCopy(model, index)
    except Exception as exc:
        _raise_if_sparse(model, exc)
        raise FusionError(
            f"the model cannot be copied ({type(exc).__name__}: {exc}); pass "
            f"inplace=True to fuse it in place.", None, "copy") from exc


@contextlib.contextmanager
def _training_restored_on_error(modules, restore: bool):
    """Puts every module's training flag back if the block raises (``restore``),
    so that a model fused in place is left as it was."""
    flags = {m: m.training for m in modules}
    try:
        yield any(flags.values())
    except BaseException:
        if restore:
            for m, t in flags.items():
                m.training = t
        raise


# --- The stages ---------------------------------------------------------------------


@dataclass
class Evidence:
    """What discovery found: the flows that prove folds, the model's output on
    the example inputs (if given), and why torch.fx could not trace it (if not)."""

    flows: List[Flow]
    output: Any = None
    fx_error: Optional[str] = None
    shapes_note: Optional[str] = None  # what the check at another size showed

    def notes(self, recorded: bool) -> List[str]:
        out = []
        if self.fx_error and recorded:
            out.append(f"torch.fx could not trace the model ({self.fx_error}); the "
                       f"recorded run on example_inputs is the evidence")
        if self.shapes_note:
            out.append(self.shapes_note)
        return out


def _fx_error(exc) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first.split('. ')[0][:120]}"


def _shapes(args) -> str:
    shown = [tuple(t.shape) for t in tensors(args)]
    return ", ".join(str(s) for s in shown[:3]) + (" ..." if len(shown) > 3 else "")


def _check_other_size(target, args, flow: Flow, evidence: Evidence, fixed_shapes: bool):
    """A recorded run is the only evidence and the forward read input sizes: a
    branch on them could take another path at another size. Runs it again at
    another size derived from the inputs; the plan then requires both runs to
    agree (``shape_dependent_flow``), or, where it cannot run there, leaves
    what they prove unless ``fixed_shapes``."""
    n = flow.shape_reads
    reads = f"the forward read input sizes {n} time{'s' if n != 1 else ''} (x.shape, x.size())"
    if fixed_shapes:
        evidence.shapes_note = (f"{reads}; with fixed_shapes=True the folds hold for "
                                f"inputs of the example's shapes ({_shapes(args)}) only")
        return
    second = other = None
    tried = []
    for spatial in (True, False):
        other = None
        try:
            other = resized_inputs(args, spatial=spatial)
            if other is None:
                continue
            second, _ = run_model(target, other[0], flow_from_run)
            break
        except Exception as exc:
            at = f"at {other[1][0]}" if other is not None else "resizing the inputs"
            tried.append(f"{at} it raised {_first_line(exc)}")
    if second is None:
        why = "; ".join(tried) or "no input is an image-like tensor to resize"
        flow.shapes_unchecked = (
            f"{reads}, torch.fx could not trace it, and it could not be checked at "
            f"another size ({why}); the fold would hold for inputs of shape "
            f"{_shapes(args)} only. Pass fixed_shapes=True if the model only ever sees "
            f"inputs of these shapes")
        evidence.shapes_note = flow.shapes_unchecked
        return
    shown = ", ".join(map(str, other[1][:2]))
    second.resized = True
    second.label = f"the recorded run at {shown}"
    flow.label = f"the recorded run at {_shapes(args)}"
    evidence.flows.append(second)
    evidence.shapes_note = (f"{reads}, and torch.fx could not trace it: a second "
                            f"recorded run at another size ({shown}) had to agree on every "
                            f"fold; they hold for the sizes the two runs took, and a "
                            f"size test that neither reached is not seen")
    if tried:
        evidence.shapes_note += (f". It does not run at twice the spatial size ({tried[0]}), "
                                 f"so only the batch size was varied")


def _first_line(exc) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


def _discover(target, args, fixed_shapes=False, index=None, values_read=None) -> Evidence:
    evidence = Evidence([])
    try:
        evidence.flows.append(flow_from_fx(target, index=index, values_read=values_read))
    except Exception as exc:  # any model that fx cannot trace
        evidence.fx_error = _fx_error(exc)
    if args is not None:
        try:
            flow, evidence.output = run_model(target, args, flow_from_run)
        except FusionError:
            raise
        except Exception as exc:
            raise FusionError(
                f"the forward on example_inputs raised {type(exc).__name__}: {exc}. "
                f"Pass inputs the model accepts (a tuple is taken as positional "
                f"arguments).", None, "example_inputs") from exc
        evidence.flows.append(flow)
        if evidence.fx_error is not None and flow.shape_reads:
            _check_other_size(target, args, flow, evidence, fixed_shapes)
    if not evidence.flows:
        flow = flow_from_sequentials(target)
        flow.note = evidence.fx_error
        evidence.flows.append(flow)
    return evidence


def _listing(left, shown=5) -> str:
    """The left norms, each with its reason; by reason with the first few names
    when there are many."""
    if len(left) <= shown:
        return "; ".join(f"{n.norm} ({n.reason})" for n in left)
    by_reason: Dict[str, List[str]] = {}
    for n in left:
        by_reason.setdefault(n.reason, []).append(n.norm)
    parts = []
    for reason, names in by_reason.items():
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        parts.append(f"{len(names)} {reason} ({', '.join(names[:3])}{more})")
    return "; ".join(parts)


def _check_strict(strict, plan: Plan, preparation: rewrite.Preparation):
    left = plan.left + preparation.overflow
    if strict and left:
        listing = _listing(left)
        raise FusionError(
            f"strict=True and {len(left)} norm(s) would be left unfused: {listing}. "
            f"Pass example_inputs, or strict=False to accept.", left[0].norm, "strict")


def _originals(model, preparation, backup) -> Dict[str, Tuple]:
    """Each folded layer's (weight, bias) before the fold: copies made before
    writing in place, else the untouched original model's."""
    if backup is not None:
        return {s.name: (s.weight_copy, s.bias_copy) for s in backup.layers}
    out = {}
    for p in preparation.folds:
        layer = model.get_submodule(p.fold.layer)
        out[p.fold.layer] = (layer.weight, layer.bias)
    return out


def _verify(target, args, evidence, preparation, rtol, originals, backup) -> Verification:
    """Both checks of fusion.verify; on failure, undoes an in-place write."""
    try:
        with MODEL_LOCK:  # it runs the models; see discover.MODEL_LOCK
            return verify_fused(target, args, evidence.output, preparation.folds, rtol,
                                originals)
    except FusionError:
        if backup is not None:
            backup.restore(target)
        raise


# --- The report, built once from the stages' objects --------------------------------


def _plan_dict(folds: List[Fold], replaced: List[str]) -> Dict:
    return {
        "version": PLAN_VERSION,
        "folds": [{"layer": f.layer, "after": f.after, "before": f.before,
                   "after_more": list(f.after_more), "before_more": list(f.before_more),
                   "after_channels": None if f.after_channels is None
                   else list(f.after_channels),
                   "bias_added": f.bias_added, "untie": f.untie} for f in folds],
        "replaced": list(replaced),
    }


def _replacement(new: Dict[int, nn.Module], norm: nn.Module) -> nn.Module:
    """What took ``norm``'s place in the write, or (a dry run) what would."""
    made = new.get(id(norm))
    return replacement(norm) if made is None else made


def _account(report: FusionReport, prepared: List[rewrite.Prepared],
             replaced: List[rewrite.Replaced]):
    """The pairs fused, the parameters added to their layers, and what the
    norms that go held."""
    new = {id(r.norm): r.new for r in replaced}
    seen = set()
    for p in prepared:
        fold = p.fold
        for norm, direction in [(n, "before") for n in fold.before_norms()] + \
                [(n, "after") for n in fold.after_norms()]:
            if norm is not None:
                channels = fold.after_channels if direction == "after" else None
                report.fused.append(FusedPair(
                    norm, fold.layer, direction, fold.evidence, fold.bias_added,
                    fold.untie, describe(_replacement(new, p.norms[norm])),
                    None if channels is None else list(channels)))
        if fold.bias_added:
            report.added_parameters[f"{fold.layer}.bias"] = out_channels(p.layer)
        if fold.untie:
            report.added_parameters[f"{fold.layer}.weight"] = p.layer.weight.numel()
        for name, norm in p.norms.items():
            if id(norm) in seen:
                continue
            seen.add(id(norm))
            # named_parameters/named_buffers(recurse=False): each tensor once
            for held, out in ((norm._parameters, report.removed_parameters),
                              (norm._buffers, report.removed_buffers)):
                counted = set()
                for n, t in held.items():
                    if t is not None and id(t) not in counted:
                        counted.add(id(t))
                        out[f"{name}.{n}"] = t.numel()


def _report(model, stages: "_Stages") -> FusionReport:
    plan, preparation, verification = stages.plan, stages.preparation, stages.verification
    report = FusionReport(dry_run=stages.dry_run, evidence=list(plan.evidence),
                          notes=list(plan.notes) + stages.notes)
    _account(report, preparation.folds, stages.replaced)
    report.left = [LeftNorm(x.norm, x.reason, x.detail)
                   for x in plan.left + preparation.overflow]
    report.plan = _plan_dict([p.fold for p in preparation.folds],
                             [r.name for r in stages.replaced])
    if verification is not None:
        report.rel_err = verification.rel_err
        report.max_abs_err = verification.max_abs_err
        report.tolerance = verification.tolerance
        report.verified_by = verification.compared
        if verification.compared == "layers":
            report.verified_why = verification.why
            note = (f"verification compared the outputs of the {verification.layers} fused "
                    f"layers, each with the original layer and norm on the input it "
                    f"received (the largest error was {verification.worst:.2g} of its "
                    f"rounding bound), not the model's output: {verification.why}")
            report.notes.append(note)
            log.info("%s", note)
    if report.nothing_to_do:
        report.notes.append("nothing to do: the model has no norm modules left to fuse")
    return report


@dataclass
class _Stages:
    """The stages' results, from which the report is built."""

    plan: Plan
    preparation: rewrite.Preparation
    replaced: List[rewrite.Replaced]
    notes: List[str] = field(default_factory=list)
    verification: Optional[Verification] = None
    dry_run: bool = False


# --- Data-parallel wrappers -----------------------------------------------------------

_WRAPPED = "module"  # the attribute of DataParallel and DistributedDataParallel


def _wrapped(model) -> Optional[nn.Module]:
    """The model inside nn.DataParallel or DistributedDataParallel, or None. The
    wrapper's forward scatters inputs and syncs buffers, which no tracer can see
    through; the wrapped model is what computes."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    return model.module if isinstance(model, wrappers) else None


def _prefixed(report: FusionReport, prefix: str) -> FusionReport:
    """The report of the wrapped model, with every name as the wrapper reaches it."""
    def name(n):
        return f"{prefix}.{n}" if n else prefix

    for p in report.fused:
        p.norm, p.layer = name(p.norm), name(p.layer)
    for n in report.left:
        n.norm = name(n.norm)
    for table in (report.removed_parameters, report.removed_buffers,
                  report.added_parameters):
        renamed = {name(k): v for k, v in table.items()}
        table.clear()
        table.update(renamed)
    for fold in report.plan.get("folds", []):
        for key in ("layer", "after", "before"):
            if fold[key] is not None:
                fold[key] = name(fold[key])
    report.plan["replaced"] = [name(n) for n in report.plan.get("replaced", [])]
    return report


def _fuse_wrapped(wrapper, inner, options, return_report):
    """Fuses the wrapped model with its own evidence; returns the wrapper, or
    unless in place a shallow copy of it around the fused copy (which shares the
    wrapper's process group and gradient reducer: fine for inference; to train
    the fused model, wrap it anew)."""
    fused, report = fuse(inner, return_report=True, **options)
    if options["inplace"]:
        result = wrapper
    else:
        result = copy.copy(wrapper)
        result._modules = dict(wrapper._modules, **{_WRAPPED: fused})
    result.training = False
    # DistributedDataParallel keeps a list of its module's buffers to broadcast
    # before each forward; the folded norms' buffers are gone from the module.
    refresh = getattr(result, "_assign_modules_buffers", None)
    if refresh is not None:
        refresh()
    report = _prefixed(report, _WRAPPED)
    return (result, report) if return_report else result


# --- The entry points -----------------------------------------------------------------


def fuse(model, *, inplace=False, example_inputs=None, verify=None, rtol=None,
         strict=False, fixed_shapes=False, return_report=False):
    """Fold every provably foldable norm of ``model`` into the layer it meets.

    The result is the same class, with the same attributes and forward; each
    folded layer holds the fused weight and bias (a bias Parameter is added where
    it had none) and each folded norm becomes ``nn.Identity``, or what its
    class computes after the affine map (timm's ``BatchNormAct2d`` leaves its
    ``drop`` and ``act``). Fused values are
    computed in float64 and rounded once. The result is in eval mode.

    Args:
        model: the ``nn.Module`` to fuse.
        inplace: fold into ``model`` itself, writing the fused weights into their
            existing storage. Otherwise ``model`` is left bit-for-bit unchanged
            and a fused copy is returned.
        example_inputs: inputs for one recorded forward run, which proves folds
            in models torch.fx cannot trace. A tuple is the positional arguments;
            anything else (a tensor, a list of images) is the one argument.
        verify: compare the outputs of the original and the fused model on
            ``example_inputs``. Defaults to on when example inputs are given.
        rtol: the tolerance on the relative output error; by default it is
            calibrated for the model (see the README).
        strict: raise ``FusionError`` if any norm module is left unfused.
        fixed_shapes: the model will only ever see inputs of ``example_inputs``'
            shapes. Where a recorded run is the only evidence and the forward
            reads input sizes, fusion otherwise runs it again at another size
            (twice the spatial size, one more in the batch), and folds only
            what both runs prove; with True it folds what the one run proves.
        return_report: return ``(model, FusionReport)`` instead of the model.

    Returns:
        The fused model, or ``(model, report)`` with ``return_report=True``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        FusionError: bad input, named by layer; or verification failed, or
            ``strict`` found norms left. The model is left as it was.
    """
    checked = _check_model(model)
    inner = _wrapped(model)
    if inner is not None:
        return _fuse_wrapped(model, inner, dict(
            inplace=inplace, example_inputs=example_inputs, verify=verify, rtol=rtol,
            strict=strict, fixed_shapes=fixed_shapes), return_report)
    args, verify = _check_options(example_inputs, verify, rtol)
    # A copy for torch.fx's evidence alone leaves its layers' weights to the folds
    # (the recorded run and the verification run the copy).
    deferred = _copy(model, checked) if not inplace and args is None and not verify \
        else None
    target = model if inplace else deferred.copy if deferred is not None else _copy(model)
    with classifying():
        # one walk, for every stage until the write
        index = checked if inplace else ModuleIndex(target)
        with _training_restored_on_error(index.modules.values(), inplace) as was_training:
            if was_training:  # (eval() of a model wholly in eval mode changes nothing)
                target.eval()
            read: Set[str] = set()
            evidence = _discover(target, args, fixed_shapes, index, read)
            if deferred is not None and read and read & deferred.holders(index):
                # the traced code read a weight not copied yet: trace the whole copy
                deferred.fill(all_weights=True)
                deferred = None
                evidence = _discover(target, args, fixed_shapes, index)
            plan = make_plan(target, evidence.flows, index)
            preparation = rewrite.prepare(target, plan.folds, index, deferred,
                                          apply=not inplace)
            if deferred is not None:
                deferred.fill()
            _check_strict(strict, plan, preparation)
            backup = rewrite.Backup.of(preparation.folds) if verify and inplace else None
            originals = _originals(model, preparation, backup) if verify else None
            rewrite.ensure_unchanged(preparation.folds)
            replaced = rewrite.write(target, preparation.folds, index)
            if backup is not None:
                backup.replaced = replaced
            verification = _verify(target, args, evidence, preparation, rtol, originals,
                                   backup) if verify else None
    notes = evidence.notes(args is not None)
    if was_training:
        notes.append("the model was in training mode; it was fused with eval-mode "
                     "semantics (running statistics) and the result is in eval mode")
    if torch.is_inference_mode_enabled():
        notes.append(_INFERENCE_NOTE)
        log.warning("%s", _INFERENCE_NOTE)
    report = _report(target, _Stages(plan, preparation, replaced, notes, verification))
    log.info("BatchNorm fusion completed. %d parameters were reduced after fusion.",
             report.parameters_reduced)
    if report.left:
        log.info("%d norm(s) were left unfused (%s); the report says why "
                 "(return_report=True, or fusion.analyze).", len(report.left),
                 _listing(report.left, shown=3))
    return (target, report) if return_report else target


def analyze(model, *, example_inputs=None, fixed_shapes=False):
    """A dry run of :func:`fuse`: the report of what it would do. Changes nothing.

    Args:
        model: the ``nn.Module`` to analyze.
        example_inputs: as for :func:`fuse`.
        fixed_shapes: as for :func:`fuse`.

    Returns:
        A :class:`FusionReport` with ``dry_run=True``.
    """
    index = _check_model(model)
    inner = _wrapped(model)
    if inner is not None:
        return _prefixed(analyze(inner, example_inputs=example_inputs,
                                 fixed_shapes=fixed_shapes), _WRAPPED)
    args = _as_args(example_inputs)
    with classifying():
        flags = {m: m.training for m in index.modules.values()}
        try:
            if any(flags.values()):
                model.eval()
            evidence = _discover(model, args, fixed_shapes, index)
            plan = make_plan(model, evidence.flows, index)
            preparation = rewrite.prepare(model, plan.folds, index)
        finally:
            for m, t in flags.items():
                m.training = t
        replaced = rewrite.replacements(model, preparation.folds, index)
    return _report(model, _Stages(plan, preparation, replaced,
                                  evidence.notes(args is not None), dry_run=True))


def fuse_conv_and_bn(conv, bn):
    """Fold one norm into the layer before it, and return a new fused layer.

    Unlike :func:`fuse`, this trusts the caller that ``bn`` is applied directly to
    the output of ``conv``. The inputs are not modified.

    Args:
        conv: ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` or ``nn.Linear``.
        bn: ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, ``FrozenBatchNorm2d``
            or a registered norm, with running statistics.

    Returns:
        A new layer of the same class as ``conv``, with the fused weight and bias.
    """
    _check_model(conv, "conv")
    _check_model(bn, "bn")
    if layer_kind(conv) is None:
        raise TypeError(f"conv must be a Conv, ConvTranspose or Linear module, got "
                        f"{type(conv).__name__}")
    if not is_known_norm(bn):
        raise TypeError(f"bn must be a BatchNorm-like norm, got {type(bn).__name__} "
                        f"(register its class with fusion.register_norm)")
    rest = norm_remainder(bn)
    if rest is not None:
        raise FusionError(f"bn: {type(bn).__name__} goes on after its affine map "
                          f"({describe(rest)}), and fuse_conv_and_bn returns the layer "
                          f"alone, which would drop that. Use fuse() on the model, which "
                          f"keeps it, or nn.Sequential(fuse_conv_and_bn(conv, bn), "
                          f"...) with the rest yourself.", "bn", "remainder")
    if getattr(bn, "running_mean", None) is None:
        raise FusionError("bn: has no running statistics (track_running_stats=False); "
                          "it normalises with batch statistics and cannot be folded.",
                          "bn", "batch_statistics")
    holder = nn.Sequential()
    holder.add_module("conv", copy.deepcopy(conv))
    holder.add_module("bn", bn)
    check_pair("conv", holder.conv, "bn", bn, "after")  # the pair is taken on trust
    fold = Fold("conv", after="bn", evidence="caller", bias_added=conv.bias is None)
    preparation = rewrite.prepare(holder, [fold])
    if preparation.overflow:
        raise FusionError(f"conv: {preparation.overflow[0].detail}", "conv", "overflow")
    for p in preparation.folds:
        p.norms.clear()  # the caller's bn stays where it is
    rewrite.write(holder, preparation.folds)
    fused = holder.conv
    fused.train(conv.training)
    return fused


def _as_plan(plan) -> Dict:
    """report.plan from a FusionReport, a report's dict or JSON text (as
    ``fusion fuse --report`` writes it), a plan dict or a plan's JSON text."""
    if isinstance(plan, FusionReport):
        plan = plan.plan
    if isinstance(plan, (str, bytes)):
        try:
            plan = json.loads(plan)
        except ValueError as exc:
            raise TypeError(f"plan is a string but not JSON ({exc}); pass the report, "
                            f"report.plan, or the JSON text of either") from None
    whole_report = isinstance(plan, dict) and "folds" not in plan
    if whole_report and isinstance(plan.get("plan"), dict):
        plan = plan["plan"]
    if not isinstance(plan, dict) or "folds" not in plan:
        raise TypeError("plan must be a FusionReport, report.plan, a report's dict "
                        "(report.to_dict(), or json.load of fusion fuse --report), or "
                        "the JSON text of any of these")
    return plan


def apply_plan(model, plan):
    """Give a freshly built model the fused structure, computing nothing.

    Adds the biases that fusion added and replaces the folded norms by
    ``nn.Identity`` (or their remainder, such as timm's ``drop`` and ``act``),
    so that ``load_state_dict`` of saved fused weights then gives
    the fused model. Works whatever evidence the plan came from.

    Args:
        model: an unfused model of the same architecture.
        plan: ``report.plan`` of the fusion, a :class:`FusionReport`, a report's
            dict (``report.to_dict()``, or ``json.load`` of the file that ``fusion
            fuse --report`` writes), or the JSON text of any of these.

    Returns:
        ``model``, changed in place and in eval mode.
    """
    _check_model(model)
    plan = _as_plan(plan)
    if plan.get("version") != PLAN_VERSION:
        raise FusionError(f"plan version {plan.get('version')} is not supported "
                          f"(expected {PLAN_VERSION}).", None, "plan")
    modules = dict(model.named_modules(remove_duplicate=False))
    for entry in plan["folds"]:
        name = entry["layer"]
        layer = modules.get(name)
        if layer is None or layer_kind(layer) is None:
            raise FusionError(f"{name}: the plan folds into this layer, but the model "
                              f"has no Conv/Linear there; build the same architecture "
                              f"the plan came from.", name, "plan")
        for norm in [entry.get("after"), entry.get("before")] + \
                list(entry.get("after_more", [])) + list(entry.get("before_more", [])):
            if norm is not None and norm not in modules:
                raise FusionError(f"{norm}: the plan folds this norm, but the model has "
                                  f"no module there.", norm, "plan")
    for name in plan["replaced"]:
        if name not in modules:
            raise FusionError(f"{name}: the plan replaces this module, but the model has "
                              f"none there.", name, "plan")
    with torch.no_grad():
        for entry in plan["folds"]:
            layer = modules[entry["layer"]]
            if entry.get("untie"):
                layer.weight = nn.Parameter(layer.weight.detach().clone(),
                                            layer.weight.requires_grad)
                if layer.bias is not None:
                    layer.bias = nn.Parameter(layer.bias.detach().clone(),
                                              layer.bias.requires_grad)
            if layer.bias is None:
                w = layer.weight
                layer.bias = nn.Parameter(torch.zeros(out_channels(layer), dtype=w.dtype,
                                                      device=w.device),
                                          w.requires_grad)
    new = {}
    for name in plan["replaced"]:
        norm = modules[name]
        replace_module(model, name, new.setdefault(id(norm), replacement(norm)))
    return model.eval()
