"""Bad input gets a clear error and loses nothing.

Every case runs ``fuse`` twice, on fresh models: with ``inplace=True``, where
the model itself must come back bit for bit as it was, and with
``inplace=False``, where the caller's model must not be touched either. Each
error is a ``FusionError`` (a ``ValueError``) that names the layer at fault by
its qualified name, in ``.layer`` and in the message, and says what to do;
things that are not modules get a ``TypeError``. Where fusion's choice is to
leave a norm rather than raise (a fused value that overflows its dtype), the
test checks that choice instead.
"""
import copy

import pytest
import torch
from torch import nn

import fusion
from conftest import _bits, assert_unchanged, snapshot
from fusion import FusionError, NormParams, analyze, fuse, fuse_conv_and_bn
from fusion._native import _C
from zoo import calibrate

SHAPE = (2, 3, 8, 8)


class Block(nn.Module):
    """A nested conv -> bn pair, so qualified names have dots in them."""

    def __init__(self, cout=4, bn_features=None, bias=False):
        super().__init__()
        self.conv = nn.Conv2d(3, cout, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(cout if bn_features is None else bn_features)

    def forward(self, x):
        return self.bn(self.conv(x))


class Net(nn.Module):
    """stem (conv, bn) -> relu -> block.{conv, bn}: two foldable pairs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3))
        self.block = Block()

    def forward(self, x):
        return self.block(torch.relu(self.stem(x)))


def net():
    return calibrate(Net(), shape=SHAPE)


# --- snapshots that also work for sparse and meta tensors ---------------------


def _frozen(model):
    """Like conftest.snapshot, for models whose tensors conftest cannot read
    (sparse tensors have no data pointer, meta tensors have no values)."""
    tensors = {}
    for k, t in model.state_dict(keep_vars=True).items():
        if t.device.type == "meta":
            content = None
        elif t.layout == torch.sparse_coo:
            c = t.detach().coalesce()
            content = (c.indices().clone(), _bits(c.values()).clone())
        elif t.is_quantized:
            content = (t.int_repr().clone(), t.q_scale(), t.q_zero_point())
        else:
            content = _bits(t.detach()).clone()
        tensors[k] = (id(t), t.layout, t.dtype, t.device, tuple(t.shape), content)
    tree = [(n, type(m), id(m), m.training) for n, m in
            model.named_modules(remove_duplicate=False)]
    return tree, tensors


def _assert_frozen(model, frozen):
    tree, tensors = _frozen(model)
    assert tree == frozen[0], "module tree or training flags changed"
    assert tensors.keys() == frozen[1].keys()
    for k, (ident, layout, dtype, device, shape, content) in frozen[1].items():
        now = tensors[k]
        assert now[:5] == (ident, layout, dtype, device, shape), f"{k} was replaced"
        if isinstance(content, tuple):
            assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
                       for a, b in zip(now[5], content)), f"{k} changed"
        elif content is not None:
            assert torch.equal(now[5], content), f"{k} changed"


def expect_error(build, exc_type, layer, *phrases, code=None, snap=None, prefixed=True,
                 **kwargs):
    """Runs fuse(inplace=True) and fuse(inplace=False) on fresh models from
    ``build``; each must raise ``exc_type`` naming ``layer`` (the message starts
    with it when ``prefixed``), with every phrase in its message, and leave the
    model exactly as it was."""
    take, check = (snapshot, assert_unchanged) if snap is None else snap
    for inplace in (True, False):
        model = build()
        before = take(model)
        with pytest.raises(exc_type) as info:
            fuse(model, inplace=inplace, **kwargs)
        check(model, before)
        err = info.value
        message = str(err)
        if exc_type is FusionError:
            assert isinstance(err, ValueError)
            assert err.layer == layer, f"inplace={inplace}: names {err.layer!r}: {message}"
            if code is not None:
                assert err.code == code, message
            if layer is not None:
                assert layer in message, message
                if prefixed:
                    assert message.startswith(f"{layer}: "), message
        for phrase in phrases:
            assert phrase in message, f"inplace={inplace}: {phrase!r} not in {message!r}"
    return err


# --- not a module ---------------------------------------------------------------


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("thing", ["resnet18", None, 3.0, torch.ones(3)],
                         ids=["str", "None", "float", "tensor"])
def test_not_a_module_is_a_type_error(thing, inplace):
    with pytest.raises(TypeError, match=f"must be a torch.nn.Module, got {type(thing).__name__}"):
        fuse(thing, inplace=inplace)
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        analyze(thing)


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("container", [list, tuple])
def test_a_list_of_modules_is_a_type_error_and_says_pass_one(container, inplace):
    models = [net(), net()]
    snaps = [snapshot(m) for m in models]
    with pytest.raises(TypeError, match="pass one module, not a list"):
        fuse(container(models), inplace=inplace)
    for m, s in zip(models, snaps):
        assert_unchanged(m, s)


# --- shapes that cannot be right -------------------------------------------------


def test_bn_num_features_differing_from_conv_out_channels():
    def build():
        model = net()
        model.block.bn = nn.BatchNorm2d(5).eval()
        return model

    expect_error(build, FusionError, "block.bn", "5 channels", "block.conv has 4 output",
                 "Fix num_features of block.bn", code="shape")


@pytest.mark.parametrize("buffer", ["running_mean", "running_var"])
@pytest.mark.parametrize("length", [3, 5, 64])
def test_running_stat_of_wrong_length(buffer, length):
    # block.bn has 4 channels; 3 would have the core read a short buffer for
    # channel 3, 5 and 64 read only part of it. Either must be refused.
    def build():
        model = net()
        setattr(model.block.bn, buffer, torch.ones(length))
        return model

    err = expect_error(build, FusionError, "block.bn", buffer, "Reload its state_dict",
                       code="shape")
    # both lengths are shown, whichever of the two vectors is taken as the reference
    assert f"{length}" in str(err) and "4" in str(err)


def test_running_stats_consistent_with_each_other_but_not_with_the_conv():
    # No weight or bias to disagree with: only the conv's out_channels shows it.
    def build():
        model = net()
        model.block.bn = nn.BatchNorm2d(4, affine=False).eval()
        model.block.bn.running_mean = torch.zeros(3)
        model.block.bn.running_var = torch.ones(3)
        return model

    expect_error(build, FusionError, "block.bn", "has 3 channels",
                 "block.conv has 4 output channels", code="shape")


@pytest.mark.parametrize("slot", ["running_mean", "running_var", "norm_weight",
                                  "norm_bias", "bias_out"])
def test_core_refuses_short_vectors_on_its_own(slot):
    """Defence in depth: with the Python checks bypassed, the C core still
    refuses a vector shorter than the channels instead of reading past it."""
    weight = torch.randn(4, 3, 3, 3)
    norm = dict(running_mean=torch.zeros(4), running_var=torch.ones(4),
                norm_weight=torch.ones(4), norm_bias=torch.zeros(4))
    args = dict(weight=weight.clone(), bias_in=None, bias_out=torch.zeros(4),
                before=False, grouped=False, groups=1)
    # a view of the last two elements of 8: its storage is long enough, the view is not
    (args if slot == "bias_out" else norm)[slot] = torch.ones(8)[6:]
    args["norm"] = NormParams(norm["running_mean"], norm["running_var"],
                              norm["norm_weight"], norm["norm_bias"], 1e-5)
    with pytest.raises(_C.FoldError) as info:
        _C.prepare(**args)
    assert info.value.code == "shape"
    assert isinstance(info.value, ValueError)
    assert torch.equal(args["weight"], weight)


# --- values that cannot be folded -------------------------------------------------


def _set(path, index, value):
    def build():
        model = net()
        with torch.no_grad():
            t = model.get_parameter(path) if path.endswith(("weight", "bias")) \
                else model.get_buffer(path)
            t.view(-1)[index] = value
        return model
    return build


@pytest.mark.parametrize("path,layer,index,value", [
    ("block.bn.running_mean", "block.bn", 2, float("nan")),
    ("block.bn.running_var", "block.bn", 1, float("inf")),
    ("block.bn.running_var", "block.bn", 3, float("nan")),
    ("block.bn.weight", "block.bn", 0, float("-inf")),
    ("stem.1.bias", "stem.1", 2, float("nan")),
    ("block.conv.weight", "block.conv", 27, float("nan")),
    ("stem.0.weight", "stem.0", 5, float("-inf")),
    ("stem.0.bias", "stem.0", 1, float("inf")),
])
def test_nonfinite_value(path, layer, index, value):
    what = path.rpartition(".")[2]
    expect_error(_set(path, index, value), FusionError, layer,
                 f"{what}[{index}]", "NaN or infinite", "Reload a good checkpoint",
                 code="nonfinite")


@pytest.mark.parametrize("var,eps", [(-1.0, 1e-5), (-0.5, 0.5), (0.0, 0.0), (0.25, -0.5)])
def test_running_var_plus_eps_not_positive(var, eps):
    # (-0.5, 0.5) and (0.0, 0.0) are exactly zero in float32 and in float64;
    # every other channel is fine, so the message must point at channel 2
    def build():
        model = net()
        model.block.bn.running_var.fill_(1.0)
        model.block.bn.running_var[2] = var
        model.block.bn.eps = eps
        return model

    expect_error(build, FusionError, "block.bn", "running_var + eps is not positive",
                 f"running_var[2] = {var:g}", "recalibrate", code="variance")


@pytest.mark.parametrize("eps", [float("nan"), float("inf")])
def test_nonfinite_eps(eps):
    def build():
        model = net()
        model.block.bn.eps = eps
        return model

    expect_error(build, FusionError, "block.bn", "eps", code="nonfinite")


class PrePost(nn.Module):
    """pre -> conv (no padding) -> post: both norms fold into conv, in one pass."""

    def __init__(self):
        super().__init__()
        self.pre = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 1)
        self.post = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.post(self.conv(self.pre(x)))


def test_pre_and_post_norms_fold_into_one_layer():
    _, report = fuse(calibrate(PrePost(), shape=SHAPE), return_report=True)
    assert sorted((p.norm, p.layer, p.direction) for p in report.fused) == [
        ("post", "conv", "after"), ("pre", "conv", "before")]


@pytest.mark.parametrize("path,layer,value,code", [
    ("pre.running_var", "pre", float("nan"), "nonfinite"),
    ("post.running_var", "post", float("nan"), "nonfinite"),
    ("post.running_mean", "post", float("inf"), "nonfinite"),
    ("post.weight", "post", float("nan"), "nonfinite"),
    ("pre.bias", "pre", float("inf"), "nonfinite"),
    ("conv.bias", "conv", float("nan"), "nonfinite"),
    ("post.running_var", "post", -2.0, "variance"),
])
def test_pre_and_post_norm_errors_name_the_right_norm(path, layer, value, code):
    def build():
        model = calibrate(PrePost(), shape=SHAPE)
        with torch.no_grad():
            t = model.get_parameter(path) if path.endswith(("weight", "bias")) \
                else model.get_buffer(path)
            t[1] = value
        return model

    what = path.rpartition(".")[2]
    expect_error(build, FusionError, layer, what, code=code)


# torch warns when it initialises an empty conv
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_zero_size_layer():
    def build():
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                              nn.Conv2d(4, 0, 1), nn.BatchNorm2d(0))
        return model.eval()

    expect_error(build, FusionError, "2", "is empty", "(0, 4, 1, 1)",
                 "Remove the layer", code="empty")


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_zero_input_channels():
    def build():
        return nn.Sequential(nn.Conv2d(0, 4, 3), nn.BatchNorm2d(4)).eval()

    expect_error(build, FusionError, "0", "is empty", code="empty")


def test_meta_device_model_is_a_clear_error_with_no_values():
    def build():
        return net().to("meta")

    err = expect_error(build, FusionError, "stem.0", "meta device", "has no values",
                       "to_empty", code="meta", snap=(_frozen, _assert_frozen))
    # no numbers from a tensor that has none
    assert "nan" not in str(err).lower() and "[" not in str(err)


# --- layouts that cannot be folded --------------------------------------------------


def test_sparse_conv_weight():
    # A Conv2d cannot run with a sparse weight, but nothing stops one being set.
    def build():
        model = net()
        w = model.block.conv.weight
        model.block.conv.weight = nn.Parameter(w.detach().to_sparse(), requires_grad=False)
        return model

    expect_error(build, FusionError, "block.conv", "sparse", "to_dense()",
                 snap=(_frozen, _assert_frozen))


def test_sparse_running_mean():
    def build():
        model = net()
        model.block.bn.running_mean = model.block.bn.running_mean.to_sparse()
        return model

    expect_error(build, FusionError, "block.bn", "running_mean is a sparse tensor",
                 "to_dense()", code="sparse", snap=(_frozen, _assert_frozen))


def test_quantized_conv_weight():
    def build():
        model = net()
        w = model.block.conv.weight.detach()
        q = torch.quantize_per_tensor(w, 0.01, 0, torch.qint8)
        model.block.conv.weight = nn.Parameter(q, requires_grad=False)
        return model

    expect_error(build, FusionError, "block.conv", "weight is quantized",
                 "fuse the float model before quantizing", code="quantized",
                 snap=(_frozen, _assert_frozen))


def test_quantized_running_var():
    def build():
        model = net()
        var = model.block.bn.running_var
        model.block.bn.running_var = torch.quantize_per_tensor(var, 0.01, 0, torch.quint8)
        return model

    expect_error(build, FusionError, "block.bn", "running_var is quantized",
                 code="quantized", snap=(_frozen, _assert_frozen))


def test_integer_running_var():
    def build():
        model = net()
        model.block.bn.running_var = model.block.bn.running_var.round().int() + 1
        return model

    expect_error(build, FusionError, "block.bn", "dtype torch.int32", code="dtype")


# --- training mode ------------------------------------------------------------------


def test_model_in_training_mode_is_fused_with_eval_semantics():
    model = net().train()
    x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = copy.deepcopy(model).eval()(x)
    snap = snapshot(model)
    fused, report = fuse(model, return_report=True)
    assert_unchanged(model, snap)  # the training flags included
    assert all(m.training for m in model.modules())
    assert not any(m.training for m in fused.modules())
    assert len(report.fused) == 2
    note = " ".join(report.notes)
    assert "training mode" in note and "eval" in note
    with torch.no_grad():
        got = fused(x)
    assert float((got - want).norm() / want.norm()) <= 1e-5

    fused, report = fuse(model, inplace=True, return_report=True)
    assert fused is model and not any(m.training for m in model.modules())
    assert any("training mode" in n for n in report.notes)


def test_eval_model_gets_no_training_note():
    _, report = fuse(net(), return_report=True)
    assert not any("training mode" in n for n in report.notes)


def test_failed_fuse_restores_training_flags_inplace():
    def build():
        model = _set("block.bn.running_var", 0, float("nan"))()
        model.stem.train()  # mixed flags: only the stem trains
        return model

    expect_error(build, FusionError, "block.bn", code="nonfinite")


# --- options --------------------------------------------------------------------------


class Left2(nn.Module):
    """One foldable pair, and two norms after activations."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.post = nn.BatchNorm2d(4)
        self.tail = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4))

    def forward(self, x):
        return self.tail(self.post(torch.relu(self.bn(self.conv(x)))))


def test_strict_raises_listing_every_left_norm():
    def build():
        return calibrate(Left2(), shape=SHAPE)

    err = expect_error(build, FusionError, "post", "strict=True", "2 norm(s)",
                       "post (not_after_producer)", "tail.1 (not_after_producer)",
                       "example_inputs", code="strict", strict=True, prefixed=False)
    assert "bn (" not in str(err)  # the one that folds is not listed
    fused, report = fuse(calibrate(Left2(), shape=SHAPE), return_report=True)
    assert [p.norm for p in report.fused] == ["bn"]


def test_strict_passes_when_nothing_is_left():
    fused, report = fuse(net(), strict=True, return_report=True)
    assert len(report.fused) == 2 and not report.left


def test_verify_without_example_inputs():
    expect_error(net, FusionError, None, "verify=True needs example_inputs", code="verify",
                 verify=True)


@pytest.mark.parametrize("rtol", [0, -1e-3, float("nan")])
def test_rtol_not_positive(rtol):
    expect_error(net, FusionError, None, "rtol must be a positive number", code="rtol",
                 example_inputs=torch.randn(*SHAPE), rtol=rtol)


def test_example_inputs_the_model_rejects():
    # the first conv is where the forward fails
    expect_error(net, FusionError, "stem.0", "example_inputs", "RuntimeError",
                 "to have 3 channels", "Check that the model runs on these inputs",
                 code="example_inputs", example_inputs=torch.randn(2, 5, 8, 8))


def test_example_inputs_failing_outside_any_layer():
    def build():
        model = net()
        model.forward = lambda x: x.reshape(-1, 7)  # fails before any module runs
        return model

    expect_error(build, FusionError, None, "the forward on example_inputs raised",
                 "RuntimeError", code="example_inputs", example_inputs=torch.randn(*SHAPE))


# --- fuse_conv_and_bn -----------------------------------------------------------------


@pytest.mark.parametrize("conv,bn,match", [
    ("conv", nn.BatchNorm2d(4), "conv must be a torch.nn.Module, got str"),
    (None, nn.BatchNorm2d(4), "conv must be a torch.nn.Module, got NoneType"),
    (nn.Conv2d(3, 4, 3), "bn", "bn must be a torch.nn.Module, got str"),
    (nn.Conv2d(3, 4, 3), [nn.BatchNorm2d(4)], "bn must be a torch.nn.Module, got list"),
    (nn.BatchNorm2d(4), nn.Conv2d(3, 4, 3), "conv must be a Conv, ConvTranspose or Linear"),
    (nn.Conv2d(3, 4, 3), nn.ReLU(), "bn must be a BatchNorm-like norm, got ReLU"),
    (nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, track_running_stats=True),
     "register its class with fusion.register_norm"),
    (nn.Sequential(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4), "got Sequential"),
], ids=["str-conv", "None-conv", "str-bn", "list-bn", "swapped", "relu", "instancenorm",
        "sequential"])
def test_fuse_conv_and_bn_wrong_types(conv, bn, match):
    snaps = [snapshot(m) for m in (conv, bn) if isinstance(m, nn.Module)]
    with pytest.raises(TypeError, match=match):
        fuse_conv_and_bn(conv, bn)
    for m, s in zip([m for m in (conv, bn) if isinstance(m, nn.Module)], snaps):
        assert_unchanged(m, s)


@pytest.mark.parametrize("bn,code,phrase", [
    (nn.BatchNorm2d(5), "shape", "has 5 channels but conv has 4"),
    (nn.BatchNorm2d(4, track_running_stats=False), "batch_statistics", "no running statistics"),
])
def test_fuse_conv_and_bn_bad_pair(bn, code, phrase):
    conv = nn.Conv2d(3, 4, 3)
    bn.eval()
    snaps = snapshot(conv), snapshot(bn)
    with pytest.raises(FusionError) as info:
        fuse_conv_and_bn(conv, bn)
    assert info.value.code == code and phrase in str(info.value)
    assert info.value.layer in ("conv", "bn")
    assert_unchanged(conv, snaps[0])
    assert_unchanged(bn, snaps[1])


def test_fuse_conv_and_bn_nonfinite_names_the_vector():
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4).eval()
    bn.running_var[1] = float("nan")
    snaps = snapshot(conv), snapshot(bn)
    with pytest.raises(FusionError, match=r"running_var\[1\]") as info:
        fuse_conv_and_bn(conv, bn)
    assert info.value.code == "nonfinite" and info.value.layer == "bn"
    assert_unchanged(conv, snaps[0])
    assert_unchanged(bn, snaps[1])


# --- overflow: the norm is left, not an error -----------------------------------------


def _overflowing(dtype):
    """net() in ``dtype``, where folding block.bn overflows and stem.1 folds."""
    model = net().to(dtype)
    big = {torch.float16: 6e4, torch.bfloat16: 3e38, torch.float32: 3e38}[dtype]
    with torch.no_grad():
        model.block.bn.weight.fill_(big)
        model.block.bn.running_var.fill_(1e-4 if dtype == torch.float16 else 1e-30)
        model.block.bn.eps = 0.0 if dtype != torch.float16 else 1e-5
    return model


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("inplace", [False, True])
def test_overflow_leaves_the_norm_with_reason_overflow(dtype, inplace):
    model = _overflowing(dtype)
    snap = snapshot(model)
    conv_before = model.block.conv.weight.detach().clone()
    fused, report = fuse(model, inplace=inplace, return_report=True)
    if inplace:
        assert fused is model
    else:
        assert_unchanged(model, snap)
    assert [(n.norm, n.reason) for n in report.left] == [("block.bn", "overflow")]
    assert str(dtype) in report.left[0].detail and "block.conv" in report.left[0].detail
    assert [p.norm for p in report.fused] == ["stem.1"]
    # the pair that overflowed is exactly as it was, and still there
    assert isinstance(fused.block.bn, nn.BatchNorm2d)
    assert fused.block.conv.bias is None
    assert torch.equal(_bits(fused.block.conv.weight.detach()), _bits(conv_before))
    assert torch.isfinite(fused.stem[0].weight.float()).all()


def test_overflow_with_strict_is_an_error():
    expect_error(lambda: _overflowing(torch.float16), FusionError, "block.bn",
                 "block.bn (overflow)", code="strict", strict=True, prefixed=False)


def test_fuse_conv_and_bn_overflow_is_an_error():
    model = _overflowing(torch.float16)
    conv, bn = model.block.conv, model.block.bn
    snaps = snapshot(conv), snapshot(bn)
    with pytest.raises(FusionError, match="does not fit torch.float16") as info:
        fuse_conv_and_bn(conv, bn)
    assert info.value.code == "overflow"
    assert_unchanged(conv, snaps[0])
    assert_unchanged(bn, snaps[1])


def test_fusion_error_is_exported_and_a_value_error():
    assert fusion.FusionError is FusionError and issubclass(FusionError, ValueError)
    err = FusionError("x: broken. Do this.", "x", "code")
    assert (err.layer, err.code, str(err)) == ("x", "code", "x: broken. Do this.")
