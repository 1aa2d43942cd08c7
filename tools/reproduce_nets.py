"""The CNNs of the paper's CIFAR experiments, for tools/reproduce.py.

- :func:`resnet_cifar`: He et al.'s CIFAR ResNet-(6n+2): a 3x3 stem, three
  stages of ``n`` basic blocks (conv-BN-ReLU-conv-BN plus the identity) of
  widths w, 2w, 4w (16/32/64 in the paper), the first block of stages 2 and 3
  downsampling with a 1x1 projection (so its convolutions have their own
  shapes), global average pooling, a linear head. n=3 is ResNet-20, n=9
  ResNet-56.
- :func:`vgg`: a VGG-style stack, ``convs`` conv-BN-ReLU layers per stage of
  widths w, 2w, 4w with a max-pool between stages: every stage after its first
  conv repeats one shape.

The ResNet keeps its shape-keeping blocks in ``blocks`` (a ModuleList, in order)
and the two downsampling blocks in ``transitions``, so layer dropping can take
``blocks`` as the residual stack; the roles lfpass sees are ``blocks.*.conv1``,
``blocks.*.conv2``, ``transitions.*.conv1`` ... (``features.*`` for the VGG).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); the shortcut is the identity unless the
    block changes width or resolution (then a 1x1 convolution with BatchNorm, option B)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + self.shortcut(x))


class ResNetCifar(nn.Module):
    """Stem, then ``blocks`` (the shape-keeping residual blocks, in order) with the two
    downsampling ``transitions`` run where stages 2 and 3 begin, then pooling and the head."""

    def __init__(self, n: int, width: int = 16, in_channels: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        blocks = [BasicBlock(width, width, 1) for _ in range(n)]
        transitions = []
        for cin, cout in ((width, 2 * width), (2 * width, 4 * width)):
            transitions.append(BasicBlock(cin, cout, 2))
            blocks += [BasicBlock(cout, cout, 1) for _ in range(n - 1)]
        self.blocks = nn.ModuleList(blocks)
        self.transitions = nn.ModuleList(transitions)
        self.starts = (n, 2 * n - 1)  # stage k+2 begins before block starts[k]
        self.head = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        for i, block in enumerate(self.blocks):
            for k, start in enumerate(self.starts):
                if i == start:
                    x = self.transitions[k](x)
            x = block(x)
        for k, start in enumerate(self.starts):
            if start >= len(self.blocks):
                x = self.transitions[k](x)
        return self.head(x.mean(dim=(2, 3)))


class VGG(nn.Module):
    def __init__(self, convs: int, width: int = 16, in_channels: int = 3, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            if stage:
                layers.append(nn.MaxPool2d(2))
            for _ in range(convs):
                layers += [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
                cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def resnet_cifar(depth: int, width: int = 16, in_channels: int = 3, seed: int = 0) -> ResNetCifar:
    """ResNet-``depth`` (20, 32, 44, 56, ...: 6n+2) for 32x32-ish images, the same for the same seed."""
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"a CIFAR ResNet has depth 6n+2, got {depth}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ResNetCifar((depth - 2) // 6, width, in_channels)


def vgg(convs: int = 6, width: int = 16, in_channels: int = 3, seed: int = 0) -> VGG:
    """A VGG-style net of 3 stages x ``convs`` conv-BN-ReLU layers, the same for the same seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VGG(convs, width, in_channels)
