"""timm models: random weights, every BatchNorm given a random affine map and
calibrated statistics (fusion._tools.timm_zoo; timm zero-initialises the last
norm of each residual block, so without that a fold could be wrong unseen).

- SAMPLE (make test, ``slow``): a few models, one mechanism each.
- FAMILIES (make test-models, ``models``): the smallest model of each family.

Each model is checked for: the fused output within the calibrated tolerance;
the class kept; the original untouched; a second fuse a no-op; every norm
module accounted for exactly once; and the reasons true, by an independent
record of the data flow (below), not by fusion's own code.
"""
import collections
import copy
import inspect
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

timm = pytest.importorskip("timm")

from conftest import assert_unchanged, rel_err, snapshot  # noqa: E402
from fusion import REASONS, fuse  # noqa: E402
from fusion.layers import is_norm_module  # noqa: E402
from timm_models import zoo  # noqa: E402

FAMILY_IDS = list(zoo.FAMILIES)
FAMILY_MODELS = [m for m, _ in zoo.FAMILIES.values()]


# --- an independent record of the data flow --------------------------------------
#
# Method. The model runs once on the example input under no_grad, with
#  - forward hooks on every Conv1d/2d/3d and Linear module (any subclass: a
#    look-alike's output must be seen too) that keep the very output tensor
#    object of each call (tensor identity, ``is``; the tensors are kept alive,
#    so no id is reused);
#  - forward pre-hooks and hooks on every norm module (fusion.layers.is_norm_module
#    decides only which modules to watch) that keep the input and output tensor
#    of each call, and keep a stack of the norm calls under way;
#  - a TorchDispatchMode that sees every aten op and, for each tensor argument
#    that is a recorded layer output, notes one use: by the norm call under way
#    (the innermost) if there is one, else by "something else". aten.cat also
#    records which tensors its output was made of.
# A layer output's uses are then exact: a residual add, a view, an index, an
# in-place op or a second norm are all aten ops on that tensor; being returned
# from the model is counted too.
#
# What is asserted, for every norm:
#  - fused "after" a layer L: each call's input is L's output (or, with
#    ``channels``, a torch.cat output made of L's output);
#  - fused "before" L: its output is L's input;
#  - left ``not_after_producer``: its input is not the output of any conv or
#    linear call;
#  - left ``producer_output_reused``: its input is a layer output used elsewhere;
#  - and conversely: a norm of a plain class (BatchNorm1d/2d, BatchNormAct2d),
#    called once, whose input is the output of a plain Conv or Linear (or timm's
#    Conv2dSame) called once, used by nothing else (and 2-D for Linear), must be
#    fused after that layer.

def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


# reshapes that keep the data (LeViT's x.flatten(0, 1) before a BatchNorm1d)
_VIEW_OPS = {"view", "_unsafe_view", "reshape", "_reshape_alias", "flatten"}


class _Uses(TorchDispatchMode):
    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flow = self.flow
        inputs = list(_tensors(args)) + list(_tensors(kwargs))
        consumer = flow.active[-1] if flow.active else ("op", str(func), flow.counter)
        flow.counter += 1
        for t in inputs:
            k = id(t)
            if k in flow.layer_out and flow.layer_out[k][0] is t:
                flow.uses[k].append(consumer)
        op = str(func).split(".")[1] if str(func).startswith("aten.") else ""
        if op in _VIEW_OPS and torch.is_tensor(out) and inputs:
            src = inputs[0]
            if id(src) in flow.layer_out and flow.layer_out[id(src)][0] is src:
                flow.keep.append(out)
                flow.view_of[id(out)] = (out, src)
        if "aten.cat" in str(func) and torch.is_tensor(out):
            flow.keep.append(out)
            flow.cat_parts[id(out)] = [id(t) for t in inputs]
        return out


class Flow:
    LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

    def __init__(self, model, x):
        self.layer_out = {}    # id(tensor) -> (tensor, layer name)
        self.layer_in = {}     # layer name -> [input tensors]
        self.layer_calls = collections.Counter()
        self.norm_in = collections.defaultdict(list)
        self.norm_out = collections.defaultdict(list)
        self.uses = collections.defaultdict(list)
        self.cat_parts = {}
        self.view_of = {}      # id(view) -> (view, the layer output it reshapes)
        self.active = []
        self.keep = []
        self.counter = 0
        self.names = {}
        handles = []
        for name, m in model.named_modules():
            if isinstance(m, self.LAYERS):
                handles.append(m.register_forward_pre_hook(self._layer_pre(name)))
                handles.append(m.register_forward_hook(self._layer_post(name)))
            elif is_norm_module(m):
                handles.append(m.register_forward_pre_hook(self._norm_pre(name)))
                handles.append(m.register_forward_hook(self._norm_post(name)))
        try:
            with torch.no_grad(), _Uses(self):
                y = model(x)
        finally:
            for h in handles:
                h.remove()
        for t in _tensors(y):
            if id(t) in self.layer_out and self.layer_out[id(t)][0] is t:
                self.uses[id(t)].append(("returned",))

    def _layer_pre(self, name):
        def hook(mod, inp):
            self.layer_in.setdefault(name, []).extend(inp[:1])
        return hook

    def _layer_post(self, name):
        def hook(mod, inp, out):
            self.layer_calls[name] += 1
            if torch.is_tensor(out):
                self.layer_out[id(out)] = (out, name)
        return hook

    def _norm_pre(self, name):
        def hook(mod, inp):
            self.norm_in[name].append(inp[0])
            self.active.append((name, len(self.norm_in[name])))
        return hook

    def _norm_post(self, name):
        def hook(mod, inp, out):
            self.active.pop()
            self.norm_out[name].append(out)
        return hook

    def producer(self, t):
        """The layer whose output tensor ``t`` is, or None."""
        hit = self.layer_out.get(id(t))
        return hit[1] if hit is not None and hit[0] is t else None

    def view_producer(self, t):
        """(layer, its output) when ``t`` is a reshape of a layer's output that
        keeps its last dim (the features of a Linear) and is that output's only use."""
        hit = self.view_of.get(id(t))
        if hit is None or hit[0] is not t:
            return None
        src = hit[1]
        uses = self.uses[id(src)]
        if len(uses) != 1 or t.shape[-1] != src.shape[-1]:
            return None
        return self.producer(src), src

    def cat_producers(self, t):
        return {self.layer_out[i][1] for i in self.cat_parts.get(id(t), ())
                if i in self.layer_out}

    def used_only_by(self, t, norm):
        return all(u[0] == norm for u in self.uses[id(t)])


def _plain_layer(m):
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    if type(m) in kinds:
        return True
    same = getattr(timm.layers, "Conv2dSame", None)
    return same is not None and type(m) is same


def _plain_norm(m):
    from timm.layers import BatchNormAct2d

    return type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, BatchNormAct2d)


def check_reasons(model, x, report):
    flow = Flow(model, x)
    mods = dict(model.named_modules())
    fused_after = collections.defaultdict(list)
    for p in report.fused:
        if p.direction == "after":
            fused_after[p.norm].append(p)
        else:
            assert p.direction == "before", p
            layer_inputs = flow.layer_in.get(p.layer, [])
            assert flow.norm_out[p.norm], f"{p.norm} fused but never called"
            for out in flow.norm_out[p.norm]:
                assert any(out is t for t in layer_inputs), \
                    f"{p.norm} fused before {p.layer}, but its output is not {p.layer}'s input"
    for norm, pairs in fused_after.items():
        assert flow.norm_in[norm], f"{norm} fused but never called"
        if any(p.channels for p in pairs):
            for t in flow.norm_in[norm]:
                assert flow.cat_producers(t) >= {p.layer for p in pairs}, \
                    f"{norm} fused after a cat of {[p.layer for p in pairs]}, but its input " \
                    f"is made of {flow.cat_producers(t)}"
        else:
            assert len(pairs) == 1, pairs
            for t in flow.norm_in[norm]:
                via = flow.view_producer(t)
                if via is not None and isinstance(mods[pairs[0].layer], nn.Linear):
                    # Linear -> flatten of the leading dims -> BatchNorm1d over the
                    # features: the fold is per feature, the same as on 2-D input
                    assert via[0] == pairs[0].layer and t.dim() == 2, (norm, via[0])
                    continue
                assert flow.producer(t) == pairs[0].layer, \
                    f"{norm} fused after {pairs[0].layer}, but it was fed by " \
                    f"{flow.producer(t)}"
    left = {n.norm: n for n in report.left}
    for name, entry in left.items():
        assert entry.reason in REASONS, entry
        inputs = flow.norm_in.get(name, [])
        if entry.reason == "not_after_producer":
            assert inputs, f"{name} left not_after_producer but never called"
            for t in inputs:  # (a reshape of a layer output may be left so)
                assert flow.producer(t) is None, \
                    f"{name} left not_after_producer, but fed by {flow.producer(t)}"
        elif entry.reason == "producer_output_reused":
            assert any(flow.producer(t) is not None and not flow.used_only_by(t, name)
                       for t in inputs), f"{name} left producer_output_reused, but is not"
        elif entry.reason == "not_called":
            assert not inputs, f"{name} left not_called, but was called"
    # the converse: every plainly foldable pair is folded
    must = {}
    for name, m in mods.items():
        if not is_norm_module(m) or not _plain_norm(m) or len(flow.norm_in.get(name, [])) != 1:
            continue
        t = flow.norm_in[name][0]
        layer = flow.producer(t)
        if layer is None or not _plain_layer(mods[layer]) or flow.layer_calls[layer] != 1:
            continue
        if not flow.used_only_by(t, name):
            continue
        if isinstance(mods[layer], nn.Linear) and t.dim() != 2:
            continue
        must[name] = layer
    for name, layer in must.items():
        assert [p.layer for p in fused_after.get(name, [])] == [layer], \
            f"{name} is fed only by {layer}'s output but was not fused after it: " \
            f"{left.get(name)}"
    return flow, must


# --- the per-model checks ---------------------------------------------------------

def check_model(name):
    model = zoo.build(name)
    snap = snapshot(model)
    x = zoo.example_input(name)
    with torch.no_grad():
        y = model(x)
    fused, report = fuse(model, example_inputs=(x,), return_report=True)
    with torch.no_grad():
        y_fused = fused(x)

    assert type(fused) is type(model)
    assert_unchanged(model, snap)
    assert report.tolerance is not None and report.rel_err is not None
    err = rel_err(y, y_fused)
    assert err <= report.tolerance, (err, report.tolerance)
    # every norm module exactly once, fused or left
    fused_norms = {p.norm for p in report.fused}
    left_norms = [n.norm for n in report.left]
    assert len(left_norms) == len(set(left_norms))
    assert not fused_norms & set(left_norms)
    assert sorted(fused_norms | set(left_norms)) == sorted(
        n for n, m in model.named_modules() if is_norm_module(m))
    pairs = [(p.norm, p.layer) for p in report.fused]
    assert len(pairs) == len(set(pairs)), "one pair per (norm, layer)"
    assert report.norms_fused == len(fused_norms)
    # the folded norms are gone from the fused model, the left ones stay
    assert zoo.count_norms(fused) == zoo.count_norms(model) - len(fused_norms)
    # the reasons are true
    _, must = check_reasons(model, x, report)
    # fusing again is a no-op
    again, report2 = fuse(fused, example_inputs=(x,), return_report=True)
    assert not report2.fused and report2.parameters_reduced == 0
    return report, must


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.SAMPLE)
def test_sample(name):
    report, must = check_model(name)
    assert report.fused  # every sample model folds something
    assert must  # and has plain pairs that the independent check demands


@pytest.mark.models
@pytest.mark.parametrize("name", FAMILY_MODELS, ids=FAMILY_IDS)
def test_family(name):
    check_model(name)


def test_families_cover_the_brief():
    wanted = """resnet-d resnext seresnext ecaresnet res2net resnest sknet regnetx regnety
    regnetz efficientnet tf_efficientnet efficientnetv2 mobilenetv2 mobilenetv3 mnasnet
    fbnet mixnet ghostnet rexnet lcnet hardcorenas tinynet cspnet cs3darknet darknet dla
    dpn densenet vovnet hrnet inception_v3 inception_v4 xception selecsls gernet repvgg
    mobileone fastvit mobilevit efficientformer levit""".split()
    assert set(wanted) <= set(zoo.FAMILIES)
    assert set(zoo.SAMPLE) <= set(timm.list_models())
    assert set(FAMILY_MODELS) <= set(timm.list_models())
    assert sum(s for _, s in zoo.FAMILIES.values()) < 12 * 60


# --- the mechanisms, pinned -------------------------------------------------------

@pytest.mark.slow
def test_mechanisms_of_the_sample():
    """What each sample model is there for is really in it."""
    from timm.layers import BatchNormAct2d

    got = {}
    for name in ("tf_efficientnet_lite0", "mixnet_s", "densenet121", "levit_128s"):
        model = zoo.build(name)
        _, report = fuse(model, example_inputs=(zoo.example_input(name),), return_report=True)
        got[name] = (model, report)
    model, report = got["tf_efficientnet_lite0"]
    same = {n for n, m in model.named_modules() if type(m).__name__ == "Conv2dSame"}
    assert same and same & {p.layer for p in report.fused}
    assert any(isinstance(m, BatchNormAct2d) for m in model.modules())
    assert {p.replaced_by for p in report.fused} >= {"Sequential(drop=Identity, act=ReLU6)"}
    model, report = got["mixnet_s"]
    assert any(p.channels for p in report.fused)  # a norm after a cat, folded per slice
    model, report = got["densenet121"]
    assert collections.Counter(n.reason for n in report.left)["not_after_producer"] > 0
    # LeViT: Linear -> x.flatten(0, 1) -> BatchNorm1d (rule 6c), and the heads'
    # BatchNorm1d -> Dropout -> Linear: every one folds, each into a Linear, and
    # check_reasons (test_sample) confirms each flatten keeps the features and
    # is the Linear output's one use.
    model, report = got["levit_128s"]
    bn1d = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm1d)}
    fused_bn1d = {p.norm for p in report.fused} & bn1d
    assert bn1d and fused_bn1d == bn1d and not report.left
    assert all(isinstance(model.get_submodule(p.layer), nn.Linear)
               for p in report.fused if p.norm in bn1d)


# --- timm's own reparameterisation, side by side -----------------------------------

# Measured (seed 0, 128 px): (norm modules of the original, left by fusion,
# left by timm.utils.reparameterize_model). fusion folds each conv's own norm
# and never sums parallel branches, so the identity branches' norms (fed by the
# block's input, not by a conv) are left, reason not_after_producer;
# reparameterize_model merges the branches of its reparameterisable blocks but
# leaves fastvit's ConvMlp norms (a plain ConvNormAct) to nobody: fusing its
# result folds those too, leaving 0 everywhere.
REPARAM_NORMS = {"repvgg_a0": (61, 17, 0), "mobileone_s0": (226, 35, 0),
                 "fastvit_t8": (70, 24, 10)}


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.REPARAM)
def test_reparameterize_side_by_side(name):
    from timm.utils import reparameterize_model

    model = zoo.build(name)
    snap = snapshot(model)
    x = zoo.example_input(name)
    with torch.no_grad():
        y = model(x)
        rp = reparameterize_model(copy.deepcopy(model))
        y_rp = rp(x)
    fused, report = fuse(model, example_inputs=(x,), return_report=True)
    both, report_both = fuse(rp, example_inputs=(x,), return_report=True)
    with torch.no_grad():
        y_f = fused(x)
        y_both = both(x)
    assert_unchanged(model, snap)
    norms = zoo.count_norms(model)
    fused_left = zoo.count_norms(fused)
    rp_left = zoo.count_norms(rp)
    err_f, err_rp, err_both = rel_err(y, y_f), rel_err(y, y_rp), rel_err(y, y_both)
    print(f"{name}: norms {norms}, fusion leaves {fused_left} (err {err_f:.1e}, "
          f"tol {report.tolerance:.1e}), reparameterize_model leaves {rp_left} "
          f"(err {err_rp:.1e}), then fusion {zoo.count_norms(both)} (err {err_both:.1e})")
    assert (norms, fused_left, rp_left) == REPARAM_NORMS[name]
    assert fused_left == len(report.left)
    assert {n.reason for n in report.left} == {"not_after_producer"}
    assert err_f <= report.tolerance
    # timm's merge rounds differently (in float32, summing branches), but is as
    # close to the original as fusion's fold, within a few times its tolerance
    assert err_rp <= 4 * report.tolerance
    assert zoo.count_norms(both) == 0
    assert err_both <= 4 * report.tolerance


# --- look-alikes -----------------------------------------------------------------

def _calibrated(model, shape=(4, 3, 16, 16)):
    from fusion._tools.models import calibrate

    torch.manual_seed(0)
    return calibrate(model, shape=shape)


def test_std_conv_is_not_folded():
    """StdConv2d standardises its weight in its own forward: folding a norm into
    its weight would be undone by the standardisation."""
    from timm.layers import StdConv2d

    model = _calibrated(nn.Sequential(StdConv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                                      nn.ReLU()))
    snap = snapshot(model)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    fused, report = fuse(model, example_inputs=(x,), return_report=True)
    assert not report.fused
    assert [(n.norm, n.reason) for n in report.left] == [("1", "unsupported_layer")]
    assert_unchanged(model, snap)
    with torch.no_grad():
        assert torch.equal(model(x), fused(x))


def test_batchnormact_subclass_with_own_forward_is_unknown():
    from timm.layers import BatchNormAct2d

    class ScaledBNAct(BatchNormAct2d):
        def forward(self, x):
            return super().forward(x) * 2.0

    model = _calibrated(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False),
                                      ScaledBNAct(8), nn.Conv2d(8, 4, 1),
                                      BatchNormAct2d(4)))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    fused, report = fuse(model, example_inputs=(x,), return_report=True)
    assert [(n.norm, n.reason) for n in report.left] == [("1", "unknown_norm")]
    assert [(p.norm, p.layer) for p in report.fused] == [("3", "2")]
    assert type(fused[1]) is ScaledBNAct
    with torch.no_grad():
        assert rel_err(model(x), fused(x)) <= report.tolerance


# --- ONNX Runtime ----------------------------------------------------------------

ONNX_MODELS = ["resnet10t", "tf_efficientnet_lite0", "mixnet_s"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ONNX_MODELS)
def test_onnx_runtime_runs_the_fused_timm_model(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = zoo.build(name)
    x = zoo.example_input(name)
    fused, report = fuse(model, example_inputs=(x,), return_report=True)
    kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters \
        else {}
    path = tmp_path / "fused.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(fused, (x,), str(path), do_constant_folding=False,
                          opset_version=14, **kwargs)
    import onnx

    graph = onnx.load(str(path))
    assert not [n for n in graph.graph.node if n.op_type == "BatchNormalization"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = fused(x)
    assert rel_err(want, torch.from_numpy(got)) <= report.tolerance


# --- bfloat16 ----------------------------------------------------------------------

@pytest.mark.slow
def test_bfloat16_sample_model():
    name = "mobilenetv3_small_050"
    model = zoo.build(name).to(torch.bfloat16)
    snap = snapshot(model)
    x = zoo.example_input(name, dtype=torch.bfloat16)
    with torch.no_grad():
        y = model(x)
    fused, report = fuse(model, example_inputs=(x,), return_report=True)
    with torch.no_grad():
        y_f = fused(x)
    assert_unchanged(model, snap)
    assert report.fused and all(p.dtype == torch.bfloat16 for p in fused.parameters())
    assert rel_err(y, y_f) <= report.tolerance
    assert report.rel_err <= report.tolerance


# --- frozen norms ------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "resnet10t"])
def test_frozen_norms_fold(name):
    """timm.layers.freeze_batch_norm_2d turns BatchNormAct2d into
    FrozenBatchNormAct2d and BatchNorm2d into (torchvision's) FrozenBatchNorm2d,
    buffers only: not a _BatchNorm, so they get random statistics directly."""
    from timm.layers import freeze_batch_norm_2d

    model = freeze_batch_norm_2d(zoo.build(name)).eval()
    zoo.randomise_frozen(model, torch.Generator().manual_seed(3))
    kinds = {type(m).__name__ for m in model.modules() if is_norm_module(m)}
    assert kinds == {"mobilenetv3_small_050": {"FrozenBatchNormAct2d"},
                     "resnet10t": {"FrozenBatchNorm2d"}}[name]
    snap = snapshot(model)
    x = zoo.example_input(name)
    with torch.no_grad():
        y = model(x)
    fused, report = fuse(model, example_inputs=(x,), return_report=True)
    with torch.no_grad():
        assert rel_err(y, fused(x)) <= report.tolerance
    assert_unchanged(model, snap)
    assert not report.left and zoo.count_norms(fused) == 0
    check_reasons(model, x, report)


# --- the independent check has teeth -------------------------------------------------

class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(3)      # fed by a, whose output is also added
        self.b = nn.Conv2d(3, 3, 1)
        self.bn_b = nn.BatchNorm2d(3)      # fed by b only: must fold
        self.bn_c = nn.BatchNorm2d(3)      # after a ReLU: not after a producer

    def forward(self, x):
        y = self.a(x)
        z = self.bn_a(y) + y
        return self.bn_c(torch.relu(self.bn_b(self.b(z))))


def test_the_independent_check_catches_false_reports():
    import dataclasses

    model = _calibrated(_Residual())
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    _, report = fuse(model, example_inputs=(x,), return_report=True)
    flow, must = check_reasons(model, x, report)
    assert must == {"bn_b": "b"}
    reasons = {n.norm: n.reason for n in report.left}
    assert reasons == {"bn_a": "producer_output_reused", "bn_c": "not_after_producer"}
    y = flow.norm_in["bn_a"][0]
    assert flow.producer(y) == "a" and not flow.used_only_by(y, "bn_a")
    # a report that names the wrong layer, drops a fold, or gives a false reason fails
    wrong_layer = dataclasses.replace(report, fused=[dataclasses.replace(
        report.fused[0], layer="a")])
    dropped = dataclasses.replace(report, fused=[], left=report.left + [
        dataclasses.replace(report.left[0], norm="bn_b", reason="not_after_producer")])
    false_reason = dataclasses.replace(report, left=[
        dataclasses.replace(n, reason="not_after_producer") for n in report.left])
    for bad in (wrong_layer, dropped, false_reason):
        with pytest.raises(AssertionError):
            check_reasons(model, x, bad)
