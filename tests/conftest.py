"""Tiny models shared by the core tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class Stack(nn.Module):
    """An MLP: an input layer, ``depth`` same-shaped blocks, a head."""

    def __init__(self, depth: int = 4, width: int = 16, inp: int = 8, out: int = 3):
        super().__init__()
        self.inp = nn.Linear(inp, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, out)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(x)


class ConvStack(nn.Module):
    def __init__(self, depth: int = 3, ch: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, ch, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Conv2d(ch, ch, 3, padding=1) for _ in range(depth))
        self.head = nn.Linear(ch, 4)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(x.mean((2, 3)))


def copy_layer(dst: nn.Module, src: nn.Module) -> None:
    with torch.no_grad():
        for name, p in src.named_parameters():
            dst.get_parameter(name).copy_(p)


@pytest.fixture
def stack() -> Stack:
    torch.manual_seed(0)
    return Stack().eval()


@pytest.fixture
def copies() -> Stack:
    """An MLP whose blocks 1 and 3 are bit-identical copies of block 0."""
    torch.manual_seed(0)
    m = Stack(depth=5).eval()
    copy_layer(m.blocks[1], m.blocks[0])
    copy_layer(m.blocks[3], m.blocks[0])
    return m


@pytest.fixture
def convs() -> ConvStack:
    torch.manual_seed(0)
    return ConvStack().eval()
