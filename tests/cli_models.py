"""Small models for the CLI tests, in a module of their own so that a model
pickled with torch.save can be unpickled in a ``fusion`` subprocess (which finds
this module through PYTHONPATH)."""
import torch
from torch import nn

__all__ = ["SmallNet", "UnfusableNet", "TwoInputNet", "ListInputNet", "LinearNet",
           "calibrated", "small_net", "broken_factory", "not_a_model", "sized_net"]


class SmallNet(nn.Module):
    """conv-bn-relu, conv-bn-relu, pool, linear: two foldable pairs."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


class UnfusableNet(nn.Module):
    """One foldable pair, and a BatchNorm after a ReLU, which nothing can absorb."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.post_relu_bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.post_relu_bn(torch.relu(self.bn(self.conv(x)))).mean(dim=(2, 3))


class TwoInputNet(nn.Module):
    """Takes two positional tensors: tests that a tuple means positional arguments."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x, scale):
        return self.bn(self.conv(x)) * scale


class ListInputNet(nn.Module):
    """Takes one list of images, like torchvision's detection models."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, images):
        return self.bn(self.conv(torch.stack(images))).mean(dim=(2, 3))


def calibrated(model, seed=0):
    """Gives every BatchNorm random, non-trivial statistics and affine values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen))
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen))
    return model.eval()


def small_net():
    """A factory taking no arguments, for ``fusion fuse cli_models:small_net``."""
    torch.manual_seed(0)
    return SmallNet()


def broken_factory():
    raise RuntimeError("this factory always fails")


def not_a_model():
    return [1, 2, 3]


class LinearNet(nn.Module):
    """Linear -> BatchNorm1d, foldable with a recorded run on 2-D input."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.fc(x))


def sized_net(width, bias=True):
    """A factory that takes arguments, for --factory-kwargs."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, bias=bias), nn.BatchNorm2d(width))
