"""Anchors for a padded input of a given size, all levels concatenated."""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import ModelConfig
from ..ops import box as box_ops


def level_base_anchors(config: ModelConfig) -> list[Tensor]:
    return [box_ops.base_anchors(s, config.anchor_ratios, config.anchor_scales) for s in config.strides]


def all_anchors(config: ModelConfig, shapes: list[tuple[int, int]], device=None) -> Tensor:
    """[N, 4] anchors of every level, in the order the flattened head outputs use."""
    out = []
    for base, stride, (h, w) in zip(level_base_anchors(config), config.strides, shapes):
        out.append(box_ops.grid_anchors(base.to(device), stride, h, w).reshape(-1, 4))
    return torch.cat(out)
