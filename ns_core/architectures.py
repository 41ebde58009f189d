"""The built-in architectures, each registered in ns_core.models.MODELS under its config name. Every one takes
[0, 1] images and normalizes them itself (first submodule `normalize`), names its studied activations in
`default_layers`, and gives every ReLU its own non-inplace module (hooks read them; nothing may overwrite them).

    lenet5, small_cnn (MNIST-sized inputs), vgg16, resnet18, preact_resnet18, wrn34_10 (CIFAR-sized, any H, W)

ns_core/models.py imports this module once, at its end, so `create_model("lenet5", ...)` finds them.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ns_core.models import MODELS, Normalize


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998, "Gradient-based learning applied to document recognition") with ReLU and
    max pooling. conv2 is padded for inputs under 16 pixels (e.g. 8x8 digits) so any H, W >= 8 works."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.normalize = Normalize.for_channels(channels)
        self.conv1 = nn.Conv2d(channels, 6, 5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5, padding=0 if min(height, width) >= 16 else 2)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        with torch.no_grad():  # flatten size for this input shape, by a dummy forward
            flat = self.features(torch.zeros(1, *input_shape)).shape[1]
        self.fc1 = nn.Linear(flat, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)
        self.default_layers = ["relu1", "relu2", "relu3", "relu4"]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        z = self.pool1(self.relu1(self.conv1(self.normalize(x))))  # (B, 6, H/2, W/2)
        return self.pool2(self.relu2(self.conv2(z))).flatten(1)  # (B, 16*h*w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.relu4(self.fc2(self.relu3(self.fc1(self.features(x))))))  # (B, num_classes)


class SmallCNN(nn.Module):
    """The MNIST CNN of Madry et al. 2018 ("Towards deep learning models resistant to adversarial attacks",
    MadryLab/mnist_challenge model.py): conv32 5x5 -> pool -> conv64 5x5 -> pool -> fc1024 -> fc."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        self.normalize = Normalize.for_channels(input_shape[0])
        self.conv1 = nn.Conv2d(input_shape[0], 32, 5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *input_shape)).shape[1]
        self.fc1 = nn.Linear(flat, 1024)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(1024, num_classes)
        self.default_layers = ["relu1", "relu2", "relu3"]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        z = self.pool1(self.relu1(self.conv1(self.normalize(x))))  # (B, 32, H/2, W/2)
        return self.pool2(self.relu2(self.conv2(z))).flatten(1)  # (B, 64*h*w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu3(self.fc1(self.features(x))))


class VGG16(nn.Module):
    """VGG-16 with batch norm (Simonyan & Zisserman 2015) in its CIFAR form (kuangliu/pytorch-cifar vgg.py):
    13 conv-BN-ReLU in 5 stages, one linear classifier. Pools use ceil_mode so 28x28 inputs also work."""

    STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        self.normalize = Normalize.for_channels(input_shape[0])
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels = input_shape[0]
        for stage, widths in enumerate(self.STAGES, start=1):
            for i, width in enumerate(widths, start=1):
                layers[f"conv{stage}_{i}"] = nn.Conv2d(channels, width, 3, padding=1, bias=False)
                layers[f"bn{stage}_{i}"] = nn.BatchNorm2d(width)
                layers[f"relu{stage}_{i}"] = nn.ReLU()
                channels = width
            layers[f"pool{stage}"] = nn.MaxPool2d(2, ceil_mode=True)
        self.features = nn.Sequential(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(512, num_classes)
        self.default_layers = [f"features.relu{s}_{len(w)}" for s, w in enumerate(self.STAGES, start=1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.pool(self.features(self.normalize(x))).flatten(1)  # (B, 512)
        return self.classifier(z)


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation block (He et al. 2016, "Identity mappings in deep residual networks")."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(a)
        return self.conv2(self.relu2(self.bn2(self.conv1(a)))) + shortcut


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016) for CIFAR (kuangliu/pytorch-cifar resnet.py): 3x3 stem, no max pool.
    With `preact=True`, PreAct ResNet-18 (as in Rice et al. 2020) with a final BN-ReLU."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, preact: bool = False) -> None:
        super().__init__()
        block = PreActBlock if preact else BasicBlock
        self.normalize = Normalize.for_channels(input_shape[0])
        self.conv1 = nn.Conv2d(input_shape[0], 64, 3, padding=1, bias=False)
        # BasicBlock nets normalize the stem; pre-activation nets normalize inside the next block instead
        self.stem = nn.Sequential() if preact else nn.Sequential(nn.BatchNorm2d(64), nn.ReLU())
        in_planes = 64
        for i, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
            self.add_module(f"layer{i}", nn.Sequential(block(in_planes, planes, stride), block(planes, planes, 1)))
            in_planes = planes
        self.final = nn.Sequential(nn.BatchNorm2d(512), nn.ReLU()) if preact else nn.Sequential()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)
        self.default_layers = ["layer1", "layer2", "layer3", "layer4"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stem(self.conv1(self.normalize(x)))  # (B, 64, H, W)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))  # (B, 512, H/8, W/8)
        return self.linear(self.pool(self.final(out)).flatten(1))


class WideResNet(nn.Module):
    """WideResNet (Zagoruyko & Komodakis 2016) for CIFAR as used by TRADES (yaodongyu/TRADES wideresnet.py),
    pre-activation blocks, without TRADES' unused `sub_block1` and with non-inplace ReLUs."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, depth: int = 34,
                 widen: int = 10) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4 (e.g. 28, 34), got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.normalize = Normalize.for_channels(input_shape[0])
        self.conv1 = nn.Conv2d(input_shape[0], widths[0], 3, padding=1, bias=False)
        for i, stride in enumerate((1, 2, 2), start=1):
            blocks = [PreActBlock(widths[i - 1] if j == 0 else widths[i], widths[i], stride if j == 0 else 1)
                      for j in range(n)]
            self.add_module(f"block{i}", nn.Sequential(*blocks))
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        self.default_layers = ["block1", "block2", "block3", "relu"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(self.normalize(x)))))  # (B, 64*widen, H/4, W/4)
        return self.fc(self.pool(self.relu(self.bn(out))).flatten(1))


@MODELS.register("lenet5")
def lenet5(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    return LeNet5(input_shape, num_classes)


@MODELS.register("small_cnn")
def small_cnn(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    return SmallCNN(input_shape, num_classes)


@MODELS.register("vgg16")
def vgg16(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    return VGG16(input_shape, num_classes)


@MODELS.register("resnet18")
def resnet18(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    return ResNet18(input_shape, num_classes)


@MODELS.register("preact_resnet18")
def preact_resnet18(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    return ResNet18(input_shape, num_classes, preact=True)


@MODELS.register("wrn34_10")
def wrn34_10(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    return WideResNet(input_shape, num_classes, depth=34, widen=10)
