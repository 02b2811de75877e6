"""fusion._C's Fold object: it holds what it writes, and writes nothing into a
tensor that changed after prepare()."""
import pytest
import torch
from torch import nn

from conftest import rel_err
from fusion import FusionError, NormParams, _C, fuse, rewrite


def _prepare(w):
    c = w.shape[0]
    norm = NormParams(torch.zeros(c), torch.ones(c), torch.full((c,), 2.0), None, 0.0)
    return _C.prepare(w, None, torch.zeros(c), norm, before=False, grouped=False,
                      groups=1)


@pytest.mark.parametrize("change", ["set_", "resize_"])
def test_a_tensor_changed_after_prepare_is_not_written(change):
    w = torch.ones(64, 64)
    fold = _prepare(w)
    assert fold.unchanged()
    if change == "set_":
        w.set_(torch.zeros(1))
    else:
        w.resize_(256, 256)  # reallocates the storage in place
    assert not fold.unchanged()
    before = w.clone()
    fold.apply()  # writes nothing, and touches no freed memory
    assert torch.equal(w.view(torch.int32), before.view(torch.int32))
    assert not fold.applied


def test_fold_holds_its_tensors():
    fold = _prepare(torch.ones(32, 32))  # no other reference to the weight
    fold.apply()
    assert fold.applied and fold.numel == 32 * 32


def test_fuse_refuses_to_write_a_weight_changed_during_fusion(monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    original = rewrite.prepare

    def prepare_then_change(*args, **kwargs):
        out = original(*args, **kwargs)
        with torch.no_grad():
            model[0].weight.set_(torch.ones(4, 3, 3, 3))  # another thread, say
        return out

    monkeypatch.setattr(rewrite, "prepare", prepare_then_change)
    with pytest.raises(FusionError) as err:
        fuse(model, inplace=True)
    assert err.value.layer == "0" and err.value.code == "changed"
    assert isinstance(model[1], nn.BatchNorm2d)


def test_expanded_weight_gets_its_own_copy():
    conv = nn.Conv2d(3, 4, 1, bias=False)
    conv.weight = nn.Parameter(torch.randn(1, 3, 1, 1).expand(4, 3, 1, 1))
    bn = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
    model = nn.Sequential(conv, bn).eval()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        y = model(x)
    fused, report = fuse(model, inplace=True, return_report=True)
    assert report.fused[0].untied
    with torch.no_grad():
        assert rel_err(y, fused(x)) <= 1e-6


@pytest.mark.parametrize("fault", ["nan", "overflow"])
def test_large_weight_faults_are_found_and_located(fault):
    """Weights of a million elements or more are checked by several threads
    first; a fault is still reported where it is, and nothing is written."""
    w = torch.randn(256, 64, 8, 8)  # 1,048,576 elements
    c = w.shape[0]
    where = (200, 17, 3, 5)
    var = torch.ones(c)
    if fault == "nan":
        w[where] = float("nan")
    else:
        w = w.half()
        w[where] = 60000.0
        var[200] = 0.25  # scale 2: 120000 does not fit float16
    before = w.clone()
    with pytest.raises(_C.FoldError) as err:
        _C.prepare(w, None, torch.zeros(c, dtype=w.dtype),
                   NormParams(torch.zeros(c), var, None, None, 0.0), before=False,
                   grouped=False, groups=1)
    assert err.value.code == ("nonfinite" if fault == "nan" else "overflow")
    if fault == "nan":
        assert err.value.index == sum(i * s for i, s in zip(where, w.stride()))
    bits = torch.int16 if w.dtype == torch.half else torch.int32
    assert torch.equal(w.view(bits), before.view(bits))
