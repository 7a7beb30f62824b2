"""Box math on tensors: anchors, encode/decode, IoU. Continuous coordinates;
an ``offset`` of 1 selects the "+1 pixel" convention of converted ODTK models.

Boxes are (x1, y1, x2, y2). These plain functions are shared by training (the
loss), the reference decode and the ONNX export, so the formulas exist once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def base_anchors(stride: int, ratios: Sequence[float], scales: Sequence[float]) -> Tensor:
    """Anchors of one level centred on (0, 0): [A, 4], A = len(ratios) * len(scales).

    Anchor a = ratio_index * len(scales) + scale_index; size = stride * scale,
    ratio = h / w at constant area size^2.
    """
    rows = []
    for r in ratios:
        for s in scales:
            size = stride * s
            w = size / math.sqrt(r)
            h = size * math.sqrt(r)
            rows.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(rows, dtype=torch.float32)


def grid_anchors(base: Tensor, stride: int, height: int, width: int) -> Tensor:
    """All anchors of a level for an H x W feature map: [A, H, W, 4].

    Anchor-major order matches the head channel layout (channel = a * K + k),
    so anchors.reshape(-1, 4) lines up with the head output flattened as [A, H, W].
    """
    device = base.device
    cx = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * stride
    cy = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * stride
    cy, cx = torch.meshgrid(cy, cx, indexing="ij")
    shift = torch.stack([cx, cy, cx, cy], dim=-1)  # [H, W, 4]
    return base[:, None, None, :] + shift[None]


def to_center(boxes: Tensor, offset: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(cx, cy, w, h); offset 1 counts both end pixels in the width (x2 - x1 + 1)."""
    w = boxes[..., 2] - boxes[..., 0] + offset
    h = boxes[..., 3] - boxes[..., 1] + offset
    return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode(boxes: Tensor, anchors: Tensor, offset: float = 0.0) -> Tensor:
    """Regression targets (dx, dy, dw, dh) of boxes relative to anchors."""
    acx, acy, aw, ah = to_center(anchors, offset)
    cx, cy, w, h = to_center(boxes, offset)
    return torch.stack([(cx - acx) / aw, (cy - acy) / ah, torch.log(w / aw), torch.log(h / ah)], dim=-1)


def decode(deltas: Tensor, anchors: Tensor, clamp: float, offset: float = 0.0) -> Tensor:
    """Boxes from (dx, dy, dw, dh); dw, dh clamped at ``clamp`` before exp. With offset 1
    the far corner is the last pixel inside the width: x2 = cx + w/2 - 1."""
    acx, acy, aw, ah = to_center(anchors, offset)
    dx, dy, dw, dh = deltas.unbind(-1)
    cx = acx + dx * aw
    cy = acy + dy * ah
    w = aw * torch.exp(dw.clamp(max=clamp))
    h = ah * torch.exp(dh.clamp(max=clamp))
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w - offset, cy + 0.5 * h - offset], dim=-1)


def area(boxes: Tensor, offset: float = 0.0) -> Tensor:
    w = (boxes[..., 2] - boxes[..., 0] + offset).clamp(min=0)
    return w * (boxes[..., 3] - boxes[..., 1] + offset).clamp(min=0)


def intersection(a: Tensor, b: Tensor, offset: float = 0.0) -> Tensor:
    """Pairwise intersection areas, a [..., N, 4] x b [..., M, 4] -> [..., N, M]."""
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt + offset).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def box_iou(a: Tensor, b: Tensor, offset: float = 0.0) -> Tensor:
    """Pairwise IoU, a [..., N, 4] x b [..., M, 4] -> [..., N, M]."""
    inter = intersection(a, b, offset)
    union = area(a, offset)[..., :, None] + area(b, offset)[..., None, :] - inter
    return inter / union.clamp(min=torch.finfo(inter.dtype).tiny)
