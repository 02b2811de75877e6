"""Real torchvision models with random weights and BatchNorm statistics
calibrated on random data (nothing can be downloaded), shared by tests, demo
and benchmarks."""
import torch
import torchvision
from torch import nn

__all__ = ["ZOO", "build", "calibrate", "count_norms"]

# One model of each torchvision classification family that has BatchNorm.
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


def calibrate(model, shape=(4, 3, 96, 96), steps=3, seed=0):
    """Gives every BatchNorm running statistics of random data, then eval()."""
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
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(**_KWARGS.get(name, {}))
    return calibrate(model, shape=shape, seed=seed)


def count_norms(model):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
