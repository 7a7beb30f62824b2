"""Classification and box heads shared across pyramid levels (SPEC section 2)."""
from __future__ import annotations

import math

import torch.nn as nn


class Head(nn.Module):
    """4 x (3x3 conv + ReLU), then a 3x3 conv to `outputs` channels."""

    def __init__(self, outputs: int, channels: int = 256, depth: int = 4, bias_init: float = 0.0,
                 norm: bool = False):
        super().__init__()
        layers = []
        for _ in range(depth):
            layers.append(nn.Conv2d(channels, channels, 3, padding=1))
            if norm:
                layers.append(nn.GroupNorm(32, channels))
            layers.append(nn.ReLU(inplace=True))
        self.tower = nn.Sequential(*layers)
        self.out = nn.Conv2d(channels, outputs, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.out.bias, bias_init)

    def forward(self, x):
        return self.out(self.tower(x))


def classification_head(num_anchors: int, classes: int, prior: float, channels: int = 256,
                        depth: int = 4, norm: bool = False) -> Head:
    # Start every anchor at score ~prior so the background flood does not
    # swamp the focal loss in the first iterations.
    return Head(num_anchors * classes, channels, depth, bias_init=-math.log((1 - prior) / prior), norm=norm)


def box_head(num_anchors: int, channels: int = 256, depth: int = 4, norm: bool = False) -> Head:
    return Head(num_anchors * 4, channels, depth, norm=norm)
