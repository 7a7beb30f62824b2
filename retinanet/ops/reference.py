"""Decode and class-aware NMS in pure PyTorch, batched: the executable spec.

Every other implementation (the CUDA custom ops, the TensorRT plugins, the
portable ONNX graph) is tested against these two functions. They run on any
device and in any float dtype; arithmetic is done in float32.

Conventions shared by all implementations
-----------------------------------------
* Head layout: scores [B, A*C, H, W] (sigmoid already applied), deltas
  [B, A*4, H, W]; channel a*C + c is anchor a, class c. A candidate's flat
  index is ((a*C + c)*H + y)*W + x.
* Ordering: by score descending, ties by the smaller flat index (decode) or the
  smaller input position (NMS). Outputs are written in that order.
* Padding: fixed-size outputs; unused slots have score 0, box 0 and class -1.
  NMS ignores inputs with score <= 0, so decode's padding never survives.
* Boxes are clipped to the network input, [0, W*stride] x [0, H*stride].
* box_offset 1 (converted ODTK models) counts both end pixels in a width:
  decode takes anchor widths as x2 - x1 + 1 and ends boxes at cx + w/2 - 1,
  clips to [0, W*stride - 1], and NMS measures IoU on widths x2 - x1 + 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import box as box_ops


def _stable_desc_order(scores: Tensor) -> Tensor:
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


def candidate_boxes(
    order: Tensor,
    box_deltas: Tensor,
    anchors: Tensor,
    stride: int,
    num_classes: int,
    box_clamp: float,
    box_offset: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """The boxes and classes of the candidates at flat head indices `order` [B, k]: the index
    math of the head layout above, shared by decode() and the portable ONNX export.

    box_deltas [B, A*4, H, W]. Returns boxes [B, k, 4] float32, decoded from their anchors
    and clipped to the network input, and classes [B, k] (int64).
    """
    batch, _, height, width = box_deltas.shape
    num_anchors = anchors.shape[0]
    hw = height * width
    # torch.div with floor (not //) so that the ONNX exporter sees plain integer division,
    # and remainders as n - q * d: exported with a dynamic H x W, `% height` would take
    # a symbolic size as a Python number.
    channel = torch.div(order, hw, rounding_mode="floor")  # a * C + c
    cell = order - channel * hw
    a = torch.div(channel, num_classes, rounding_mode="floor")
    c = channel - a * num_classes
    y = torch.div(cell, width, rounding_mode="floor")
    x = cell - y * width
    # Gather (a, :, cell) per candidate: flatten anchors and cells together.
    deltas = box_deltas.reshape(batch, num_anchors, 4, hw).float().permute(0, 1, 3, 2)
    d = deltas.reshape(batch, num_anchors * hw, 4).gather(1, (a * hw + cell)[..., None].expand(-1, -1, 4))
    cx = (x.float() + 0.5) * stride
    cy = (y.float() + 0.5) * stride
    anchor_boxes = anchors.to(device=order.device, dtype=torch.float32)[a] + torch.stack([cx, cy, cx, cy], dim=-1)
    boxes = box_ops.decode(d, anchor_boxes, box_clamp, box_offset)
    # With the +1 convention the last pixel of the input is at W*stride - 1.
    limits = torch.tensor(
        [width * stride - box_offset, height * stride - box_offset] * 2, device=order.device, dtype=torch.float32
    )
    return torch.minimum(boxes.clamp(min=0), limits), c


def decode(
    cls_scores: Tensor,
    box_deltas: Tensor,
    anchors: Tensor,
    stride: int,
    score_threshold: float,
    top_n: int,
    box_clamp: float,
    box_offset: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Decode one FPN level.

    Returns scores [B, top_n], boxes [B, top_n, 4] (input dtype) and classes
    [B, top_n] (int32): the top_n candidates with score > score_threshold.
    """
    batch, channels, height, width = cls_scores.shape
    num_anchors = anchors.shape[0]
    num_classes = channels // num_anchors
    out_dtype = cls_scores.dtype
    device = cls_scores.device

    scores = cls_scores.reshape(batch, -1).float()
    candidates = scores > score_threshold
    # Below-threshold entries sort after every candidate.
    ranked = torch.where(candidates, scores, torch.full_like(scores, -1.0))
    k = min(top_n, ranked.shape[1])
    order = _stable_desc_order(ranked)[:, :k]
    top_scores = scores.gather(1, order)
    valid = candidates.gather(1, order)

    boxes, c = candidate_boxes(order, box_deltas, anchors, stride, num_classes, box_clamp, box_offset)

    out_scores = torch.zeros(batch, top_n, device=device, dtype=torch.float32)
    out_boxes = torch.zeros(batch, top_n, 4, device=device, dtype=torch.float32)
    out_classes = torch.full((batch, top_n), -1, device=device, dtype=torch.int32)
    out_scores[:, :k] = torch.where(valid, top_scores, 0.0)
    out_boxes[:, :k] = torch.where(valid[..., None], boxes, 0.0)
    out_classes[:, :k] = torch.where(valid, c.to(torch.int32), -1)
    return out_scores.to(out_dtype), out_boxes.to(out_dtype), out_classes


def nms(
    scores: Tensor,
    boxes: Tensor,
    classes: Tensor,
    iou_threshold: float,
    detections: int,
    box_offset: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Greedy class-aware NMS per image: scores [B, N], boxes [B, N, 4], classes [B, N].

    A candidate is suppressed by a kept one of the same class with IoU strictly
    above ``iou_threshold``. Returns the best ``detections`` survivors per image,
    padded: scores [B, D], boxes [B, D, 4], classes [B, D] (int32).
    """
    batch, n = scores.shape
    out_dtype = scores.dtype
    device = scores.device
    out_scores = torch.zeros(batch, detections, device=device, dtype=torch.float32)
    out_boxes = torch.zeros(batch, detections, 4, device=device, dtype=torch.float32)
    out_classes = torch.full((batch, detections), -1, device=device, dtype=torch.int32)
    if n == 0 or detections == 0:
        return out_scores.to(out_dtype), out_boxes.to(out_dtype), out_classes

    s = scores.float()
    order = _stable_desc_order(s)
    s = s.gather(1, order)
    b = boxes.float().gather(1, order[..., None].expand(-1, -1, 4))
    c = classes.gather(1, order)
    alive = s > 0
    rows = torch.arange(batch, device=device)
    # Greedy NMS keeps at most `detections` boxes, so pick the best alive
    # candidate per image that many times instead of walking all N.
    for k in range(detections):
        has = alive.any(dim=1)
        if not bool(has.any()):
            break
        first = alive.int().argmax(dim=1)  # first alive = best remaining
        kb = b[rows, first]
        kc = c[rows, first]
        out_scores[:, k] = torch.where(has, s[rows, first], 0.0)
        out_boxes[:, k] = torch.where(has[:, None], kb, 0.0)
        out_classes[:, k] = torch.where(has, kc.to(torch.int32), -1)
        iou = box_ops.box_iou(kb[:, None, :], b, box_offset)[:, 0]  # [B, N]
        alive &= ~((iou > iou_threshold) & (c == kc[:, None]))
        alive[rows, first] = False
    return out_scores.to(out_dtype), out_boxes.to(out_dtype), out_classes
