"""Anchors for a padded input of a given size, all levels concatenated."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..config import ModelConfig
from ..ops import box as box_ops


def level_base_anchors(config: ModelConfig) -> list[Tensor]:
    """Per level, the [A, 4] anchor table relative to a cell's centre, (x + 0.5) * stride:
    the data that the reference ops, the CUDA ops, the plugins and the ONNX graph add
    to the cell centres. Placement conventions live here, and only here.

    Rotated models: [A, 5] rows (0, 0, w, h, angle in radians), each axis-aligned anchor
    at every config.anchor_angles, the angle varying slowest (docs/rotated.md)."""
    if config.rotated:
        return [
            _rotated_table(box_ops.base_anchors(s, config.anchor_ratios, config.anchor_scales), config)
            for s in config.strides
        ]
    if config.anchor_placement == "torchvision":
        return [_torchvision_table(s, config.anchor_ratios, config.anchor_scales) for s in config.strides]
    return [box_ops.base_anchors(s, config.anchor_ratios, config.anchor_scales) for s in config.strides]


def _torchvision_table(stride: int, ratios: list[float], scales: list[float]) -> Tensor:
    """torchvision's RetinaNet anchors: integer sizes (stride * scale truncated: 32, 40,
    50 on P3), corners computed in float32 and rounded, centred at x * stride rather
    than (x + 0.5) * stride; the last is folded into the table as -stride / 2."""
    sizes = torch.tensor([math.floor(stride * s + 1e-6) for s in scales], dtype=torch.float32)
    h_ratios = torch.sqrt(torch.tensor(ratios, dtype=torch.float32))
    ws = ((1 / h_ratios)[:, None] * sizes[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * sizes[None, :]).reshape(-1)
    corners = (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()
    return corners - stride / 2


def _rotated_table(axis: Tensor, config: ModelConfig) -> Tensor:
    wh = axis[:, 2:] - axis[:, :2]
    rows = [
        torch.cat([torch.zeros_like(wh), wh, torch.full_like(wh[:, :1], math.radians(angle))], dim=1)
        for angle in config.anchor_angles
    ]
    return torch.cat(rows)


def all_anchors(config: ModelConfig, shapes: list[tuple[int, int]], device=None) -> Tensor:
    """[N, 4] anchors of every level ([N, 5] for rotated models), in the order the
    flattened head outputs use."""
    out = []
    for base, stride, (h, w) in zip(level_base_anchors(config), config.strides, shapes):
        if config.rotated:  # the centre moves with the cell; size and angle stay
            grid = box_ops.grid_anchors(base[:, [0, 1, 0, 1]].to(device), stride, h, w)
            rest = base[:, None, None, 2:].to(device).expand(-1, h, w, -1)
            out.append(torch.cat([grid[..., :2], rest], dim=-1).reshape(-1, 5))
        else:
            out.append(box_ops.grid_anchors(base.to(device), stride, h, w).reshape(-1, 4))
    return torch.cat(out)
