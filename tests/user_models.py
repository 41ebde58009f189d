"""A researcher's own model and dataset, defined outside nslab and named by import path in configs:
`model: user_models:tiny_mlp`, `dataset: user_models:blobs` (the tests put this folder on PYTHONPATH)."""

import torch
from torch import nn

from ns_core.data import DataSource, Split


class TinyMLP(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        channels, height, width = input_shape
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(channels * height * width, 32)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(32, num_classes)
        self.default_layers = ["act1"]  # the activations nslab studies

    def forward(self, x):
        return self.fc2(self.act1(self.fc1(self.flatten(x))))


def tiny_mlp(input_shape, num_classes):
    """The model factory contract: (input_shape (C, H, W), num_classes) -> nn.Module with default_layers."""
    return TinyMLP(input_shape, num_classes)


def blobs(root, download):
    """The dataset factory contract: (root, download) -> DataSource. Four Gaussian blobs of 1x4x4 images."""
    generator = torch.Generator().manual_seed(0)
    y = torch.arange(600) % 4
    x = (0.2 * torch.randn(600, 1, 4, 4, generator=generator) + 0.2 * y.view(-1, 1, 1, 1) + 0.2).clamp(0, 1)
    return DataSource(Split(x[:400], y[:400]), Split(x[400:], y[400:]), num_classes=4, val_size=80)


class TinyCNN(nn.Module):
    """A CNN without `default_layers`: nslab proposes its three activations (each its own module, run once)."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        channels, height, width = input_shape
        self.conv1 = nn.Conv2d(channels, 4, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(32, 16)
        self.act3 = nn.ReLU()
        self.fc2 = nn.Linear(16, num_classes)
        self.out = nn.Sigmoid()  # after the logits layer: never proposed

    def forward(self, x):
        z = self.pool(self.act2(self.conv2(self.act1(self.conv1(x))))).flatten(1)  # (B, 32)
        return self.out(self.fc2(self.act3(self.fc1(z))))


def tiny_cnn_no_layers(input_shape, num_classes):
    """nslab's contract without default_layers: the layers come from the config or nslab's proposal."""
    return TinyCNN(input_shape, num_classes)


class SharedReLUCNN(nn.Module):
    """One ReLU module used after both convolutions (as in torchvision's BasicBlock): its hook would mix them."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(input_shape[0], 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc1 = nn.Linear(4 * input_shape[1] * input_shape[2], 8)
        self.act_fc = nn.ReLU()
        self.fc2 = nn.Linear(8, num_classes)

    def forward(self, x):
        z = self.relu(self.conv2(self.relu(self.conv1(x)))).flatten(1)
        return self.fc2(self.act_fc(self.fc1(z)))


def shared_relu_cnn(input_shape, num_classes):
    return SharedReLUCNN(input_shape, num_classes)


def wrong_logits(input_shape, num_classes):
    """A factory whose model returns features, not (batch, num_classes) logits."""
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0] * input_shape[1] * input_shape[2], num_classes + 1))


def classes_only_cnn(num_classes):
    """A plain classifier for 3-channel 32x32+ images that knows only its number of classes (torchvision-style):
    nslab adapts it (normalization, input channels, small-input stem)."""
    return nn.Sequential(nn.Conv2d(3, 8, 7, stride=2, padding=3), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                         nn.MaxPool2d(3, stride=2, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


def no_contract(depth, width=4):
    """A factory that takes neither input_shape nor num_classes."""
    return nn.Linear(depth, width)


class ClassesOnlyMLP(nn.Module):
    """A user's MLP for the 8x8 digits whose factory knows only its number of classes, trained on raw [0, 1]
    inputs: an analysis of its state_dict must see it exactly so (no normalization put in front)."""

    def __init__(self, num_classes):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64, 32)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc2(self.act1(self.fc1(self.flatten(x))))


def classes_only_mlp(num_classes):
    return ClassesOnlyMLP(num_classes)
