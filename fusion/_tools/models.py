"""Real torchvision models with random weights and BatchNorm statistics
calibrated on random data (nothing is downloaded), shared by the demo, the
benchmarks and the tests.

torchvision initialises every BatchNorm to weight 1 and bias 0, which would
make the fold of the affine part trivially right, so each norm also gets a
random affine map; then its running statistics are calibrated on random data
so that they match the data the model sees (an uncalibrated deep ResNet with
random weights has activations out of scale with its default statistics, and
its error figures would mean nothing).
"""
from typing import Tuple

import torch
from torch import nn

__all__ = ["ZOO", "build", "calibrate", "count_norms", "input_shape", "split_name",
           "outputs"]

#: Name prefixes of the model libraries: ``timm:efficientnet_b0``, ``yolo:yolov8n``.
LIBRARIES = ("timm", "yolo")


def split_name(name: str):
    """``("timm", "efficientnet_b0")`` for ``timm:efficientnet_b0``; ``(None,
    name)`` for a torchvision model name."""
    library, sep, bare = name.partition(":")
    if sep and library in LIBRARIES:
        return library, bare
    return None, name


#: One model of each torchvision classification family that has BatchNorm.
ZOO = [
    "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2",
    "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
    "efficientnet_b0", "efficientnet_v2_s",
    "regnet_x_400mf", "regnet_y_400mf",
    "densenet121", "googlenet", "inception_v3", "mnasnet0_5", "vgg11_bn",
    "shufflenet_v2_x0_5",
]

_KWARGS = {
    "googlenet": dict(aux_logits=False, init_weights=True),
    "inception_v3": dict(aux_logits=False, init_weights=True),
}

# Models whose stem expects another input size than 224.
_IMAGE_SIZE = {"inception_v3": 299}


def input_shape(name: str, batch: int = 1) -> Tuple[int, ...]:
    """The input shape a model expects: a torchvision classification model by
    name, ``timm:NAME`` or ``yolo:NAME``."""
    library, bare = split_name(name)
    if library == "timm":
        from . import timm_zoo

        size = timm_zoo.input_size(bare)
        return (batch, 3, size, size)
    if library == "yolo":
        from . import yolo

        return tuple(yolo.input_shape(bare, batch=batch))
    size = _IMAGE_SIZE.get(name, 224)
    return (batch, 3, size, size)


def outputs(name: str, model, x) -> torch.Tensor:
    """The model's output on ``x`` as one flat float tensor, for comparing a
    fused model with its original: YOLO's raw head outputs before NMS
    (yolo.raw_outputs), else every output tensor, flattened and concatenated."""
    from ..layers import tensors

    library, _ = split_name(name)
    with torch.no_grad():
        if library == "yolo":
            from . import yolo

            parts = yolo.raw_outputs(model, x)
        else:
            parts = list(tensors(model(x)))
    return torch.cat([t.detach().reshape(-1).double() for t in parts])


def calibrate(model, shape=(4, 3, 96, 96), steps=3, seed=0):
    """Gives every BatchNorm a random affine map and the running statistics of
    random data (a plain average over ``steps`` batches of ``shape``), then eval().
    """
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration steps
            with torch.no_grad():
                if m.affine:
                    m.weight.uniform_(0.5, 1.5, generator=gen)
                    m.bias.uniform_(-0.2, 0.2, generator=gen)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(*shape, generator=gen))
    return model.eval()


def build(name, seed=0, shape=(4, 3, 96, 96)):
    """A model by name, calibrated: a torchvision classification model builder,
    ``timm:NAME`` or ``yolo:NAME``.

    Raises:
        ValueError: ``name`` is not a model builder in ``torchvision.models``.
    """
    library, bare = split_name(name)
    if library == "timm":
        from . import timm_zoo

        return timm_zoo.build(bare, seed=seed)
    if library == "yolo":
        from . import yolo

        return yolo.build(bare, seed=seed)
    import torchvision

    builder = getattr(torchvision.models, name, None)
    if not callable(builder) or not name[:1].islower():
        raise ValueError(f"{name!r} is not a model builder in torchvision.models")
    torch.manual_seed(seed)
    return calibrate(builder(**_KWARGS.get(name, {})), shape=shape, seed=seed)


def count_norms(model):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
