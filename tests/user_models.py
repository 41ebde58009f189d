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
