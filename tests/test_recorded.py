"""Models torch.fx cannot trace, fused with evidence from a recorded run on
example inputs: shufflenet_v2, maxvit_t, and full torchvision detection models."""
import pytest
import torch
import torchvision
from torch import nn

from conftest import assert_unchanged, rel_err, snapshot
from fusion import analyze, fuse
from zoo import build

TORCH_MAJOR = int(torch.__version__.split(".")[0])


def randomize_stats(model, seed=0):
    """Random running statistics and affine parameters for every BN-like norm
    (calibrating a detection model in train mode is not practical)."""
    gen = torch.Generator().manual_seed(seed)
    frozen = torchvision.ops.misc.FrozenBatchNorm2d
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, frozen)):
                m.running_mean.normal_(0, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.2, 0.2, generator=gen)
    return model.eval()


def fx_traces(model):
    """torch.fx traces shufflenet_v2 and maxvit_t in torch 2, not in 1.13 (its
    tracer cannot iterate a Proxy or read its shape there)."""
    try:
        torch.fx.symbolic_trace(model)
        return True
    except Exception:
        return False


def count_bn(model):
    frozen = torchvision.ops.misc.FrozenBatchNorm2d
    return sum(isinstance(m, (nn.modules.batchnorm._BatchNorm, frozen))
               for m in model.modules())


@pytest.mark.slow
def test_shufflenet_with_example_inputs():
    model = build("shufflenet_v2_x0_5")
    x = torch.randn(1, 3, 96, 96)
    traces = fx_traces(model)
    assert traces == (TORCH_MAJOR >= 2)
    fused, report = fuse(model, example_inputs=x, return_report=True)
    assert report.evidence == (["fx", "recorded"] if traces else ["recorded"])
    assert len(report.fused) == 56
    assert report.rel_err is not None and report.rel_err <= report.tolerance
    with torch.no_grad():
        assert rel_err(model(x), fused(x)) <= 1e-4


@pytest.mark.slow
def test_maxvit_folds_pre_norms_forward_with_example_inputs():
    torch.manual_seed(0)
    model = randomize_stats(torchvision.models.maxvit_t())
    x = torch.randn(1, 3, 224, 224)
    dry = analyze(model)
    if fx_traces(model):  # torch 2: the fx graph alone proves all 34, 11 of them forward
        assert not dry.left and len(dry.fused) == count_bn(model)
        unlock = [p for p in dry.fused if p.direction == "before"]
    else:  # torch 1.13: the report says which pairs example inputs unlock
        unlock = [n for n in dry.left if n.reason == "needs_example_inputs"]
    assert len(unlock) == 11
    snap = snapshot(model)
    fused, report = fuse(model, example_inputs=x, return_report=True)
    assert_unchanged(model, snap)
    before = [p for p in report.fused if p.direction == "before"]
    assert len(before) == 11 and len(report.fused) == count_bn(model)
    assert {p.norm for p in before} == {n.norm for n in unlock}
    with torch.no_grad():
        assert rel_err(model(x), fused(x)) <= 1e-4


DETECTION = {
    "fasterrcnn_mobilenet_v3_large_fpn": ["backbone", "rpn.head", "roi_heads.box_head",
                                          "roi_heads.box_predictor"],
    "retinanet_resnet50_fpn": ["backbone", "head"],
}


def _capture(model, names, images):
    """Intermediate tensors: with random weights the final boxes are empty, so
    comparing them would prove nothing."""
    out, handles = {}, []
    for name in names:
        handles.append(model.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: out.setdefault(name, o)))
    with torch.no_grad():
        model(images)
    for h in handles:
        h.remove()
    return out


def _flat(obj):
    if isinstance(obj, torch.Tensor):
        return [obj.reshape(-1)]
    if isinstance(obj, dict):
        obj = list(obj.values())
    return [t for o in obj for t in _flat(o)]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DETECTION))
def test_full_detection_model(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models.detection, name)(
        weights=None, weights_backbone=None, min_size=160, max_size=200)
    randomize_stats(model)
    images = [torch.rand(3, 160, 200)]
    n_bn = count_bn(model)
    dry = analyze(model)
    assert len(dry.fused) + len(dry.left) == n_bn
    snap = snapshot(model)
    fused, report = fuse(model, example_inputs=images, verify=False, return_report=True)
    assert_unchanged(model, snap)
    assert len(report.fused) == n_bn and not report.left
    assert "recorded" in report.evidence
    ref = _capture(model, DETECTION[name], images)
    got = _capture(fused, DETECTION[name], images)
    for key in DETECTION[name]:
        a, b = torch.cat(_flat(ref[key])), torch.cat(_flat(got[key]))
        assert a.numel() > 0 and rel_err(a, b) <= 1e-4, key
