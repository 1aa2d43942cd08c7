"""The demo's CNN, built so fusion is meaningful.

After a stride-2 stem and a pool, ``DEPTH`` residual blocks apply same-shaped
3x3 convolutions (role ``blocks.*.conv``) that hold almost all of the weights,
so a ratio of 3.33 over the whole model is within reach, as in the paper's CNN
experiments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEPTH = 7  # 7 blocks put 2.0 and 3.33 close to a group boundary: they plan to 2.28 and 3.36
WIDTH = 32


class Block(nn.Module):
    """``x + relu(bn(conv(x)))``: a residual 3x3 block that keeps the shape."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.relu(self.bn(self.conv(x)))


class DigitCNN(nn.Module):
    """28x28 digits -> 10 logits: stem (stride 2) + pool to 7x7, ``depth`` residual blocks, linear head."""

    def __init__(self, depth: int = DEPTH, width: int = WIDTH, in_channels: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.stem_bn(self.stem(x))), 2)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))


def build_cnn(seed: int = 0, depth: int = DEPTH, width: int = WIDTH) -> DigitCNN:
    """A freshly initialised :class:`DigitCNN`, the same for the same ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DigitCNN(depth, width)
