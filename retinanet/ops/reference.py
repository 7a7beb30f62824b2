"""Decode and class-aware NMS in pure PyTorch, batched: the executable spec, for
axis-aligned boxes (x1, y1, x2, y2) and rotated ones (cx, cy, w, h, θ; docs/rotated.md).

Every other implementation (the CUDA custom ops, the TensorRT plugins, the
portable ONNX graph) is tested against these functions. They run on any
device and in any float dtype; arithmetic is done in float32 (the rotated IoU in
float64).

Conventions shared by all implementations
-----------------------------------------
* Head layout: scores [B, A*C, H, W] (sigmoid already applied), deltas
  [B, A*4, H, W]; channel a*C + c is anchor a, class c. A candidate's flat
  index is ((a*C + c)*H + y)*W + x.
* Ordering: by score descending, ties by the smaller flat index (decode) or the
  smaller input position (NMS). Outputs are written in that order.
* Padding: fixed-size outputs; unused slots have score 0, box 0 and class -1.
  NMS ignores inputs with score <= 0, so decode's padding never survives.
* Rotated heads have 6 deltas per anchor, [B, A*6, H, W]; their boxes have 5 values.
* Axis-aligned boxes are clipped to the network input, [0, W*stride] x [0, H*stride];
  rotated boxes are not (clipping their extents would move and resize them).
* box_offset 1 (converted ODTK models) counts both end pixels in a width:
  decode takes anchor widths as x2 - x1 + 1 and ends boxes at cx + w/2 - 1,
  clips to [0, W*stride - 1], and NMS measures IoU on widths x2 - x1 + 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import box as box_ops
from . import rotated as rotated_ops


def _stable_desc_order(scores: Tensor) -> Tensor:
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


def _candidates(
    order: Tensor, box_deltas: Tensor, num_anchors: int, num_classes: int, values: int
) -> tuple[Tensor, ...]:
    """The index math of the head layout above for the candidates at flat head indices
    `order` [B, k]: anchor a, class c, cell (x, y), each [B, k], and the candidates' deltas
    [B, k, V] (float32) from box_deltas [B, A*V, H, W], V = `values` per anchor (a Python
    number, not a traced size, so that the ONNX export keeps a constant reshape)."""
    batch, _, height, width = box_deltas.shape
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
    deltas = box_deltas.reshape(batch, num_anchors, values, hw).float().permute(0, 1, 3, 2)
    index = (a * hw + cell)[..., None].expand(-1, -1, values)
    d = deltas.reshape(batch, num_anchors * hw, values).gather(1, index)
    return a, c, x, y, d


def candidate_boxes(
    order: Tensor,
    box_deltas: Tensor,
    anchors: Tensor,
    stride: int,
    num_classes: int,
    box_clamp: float,
    box_offset: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """The boxes and classes of the candidates at flat head indices `order` [B, k], shared
    by decode() and the portable ONNX export.

    box_deltas [B, A*4, H, W]. Returns boxes [B, k, 4] float32, decoded from their anchors
    and clipped to the network input, and classes [B, k] (int64).
    """
    _, _, height, width = box_deltas.shape
    a, c, x, y, d = _candidates(order, box_deltas, anchors.shape[0], num_classes, 4)
    cx = (x.float() + 0.5) * stride
    cy = (y.float() + 0.5) * stride
    anchor_boxes = anchors.to(device=order.device, dtype=torch.float32)[a] + torch.stack([cx, cy, cx, cy], dim=-1)
    boxes = box_ops.decode(d, anchor_boxes, box_clamp, box_offset)
    # With the +1 convention the last pixel of the input is at W*stride - 1.
    limits = torch.tensor(
        [width * stride - box_offset, height * stride - box_offset] * 2, device=order.device, dtype=torch.float32
    )
    return torch.minimum(boxes.clamp(min=0), limits), c


def rotated_candidate_boxes(
    order: Tensor, box_deltas: Tensor, anchors: Tensor, stride: int, num_classes: int, box_clamp: float
) -> tuple[Tensor, Tensor]:
    """candidate_boxes() for rotated boxes: box_deltas [B, A*6, H, W], anchors [A, 5] about
    the cell centre. Returns boxes [B, k, 5] float32, not clipped (docs/rotated.md), and classes."""
    a, c, x, y, d = _candidates(order, box_deltas, anchors.shape[0], num_classes, 6)
    cx = (x.float() + 0.5) * stride
    cy = (y.float() + 0.5) * stride
    zero = torch.zeros_like(cx)
    shift = torch.stack([cx, cy, zero, zero, zero], dim=-1)
    anchor_boxes = anchors.to(device=order.device, dtype=torch.float32)[a] + shift
    return rotated_ops.decode(d, anchor_boxes, box_clamp), c


def _select(cls_scores: Tensor, score_threshold: float, top_n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Decode's choice: the flat indices [B, k] of the best k = min(top_n, A*C*H*W) entries,
    candidates (score > score_threshold) first, their scores and whether each is a candidate."""
    batch = cls_scores.shape[0]
    scores = cls_scores.reshape(batch, -1).float()
    candidates = scores > score_threshold
    # Below-threshold entries sort after every candidate.
    ranked = torch.where(candidates, scores, torch.full_like(scores, -1.0))
    k = min(top_n, ranked.shape[1])
    order = _stable_desc_order(ranked)[:, :k]
    return order, scores.gather(1, order), candidates.gather(1, order)


def _padded(scores: Tensor, boxes: Tensor, classes: Tensor, valid: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """scores [B, k], boxes [B, k, V], classes [B, k] where `valid`, padding elsewhere and
    beyond k up to `size`: score 0, box 0, class -1 (float32, float32, int32)."""
    batch, k = scores.shape
    device = scores.device
    out_scores = torch.zeros(batch, size, device=device, dtype=torch.float32)
    out_boxes = torch.zeros(batch, size, boxes.shape[-1], device=device, dtype=torch.float32)
    out_classes = torch.full((batch, size), -1, device=device, dtype=torch.int32)
    out_scores[:, :k] = torch.where(valid, scores, 0.0)
    out_boxes[:, :k] = torch.where(valid[..., None], boxes, 0.0)
    out_classes[:, :k] = torch.where(valid, classes.to(torch.int32), -1)
    return out_scores, out_boxes, out_classes


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
    num_classes = cls_scores.shape[1] // anchors.shape[0]
    order, top_scores, valid = _select(cls_scores, score_threshold, top_n)
    boxes, c = candidate_boxes(order, box_deltas, anchors, stride, num_classes, box_clamp, box_offset)
    out_scores, out_boxes, out_classes = _padded(top_scores, boxes, c, valid, top_n)
    return out_scores.to(cls_scores.dtype), out_boxes.to(cls_scores.dtype), out_classes


def decode_rotated(
    cls_scores: Tensor,
    box_deltas: Tensor,
    anchors: Tensor,
    stride: int,
    score_threshold: float,
    top_n: int,
    box_clamp: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Decode one FPN level of a rotated-box head: box_deltas [B, A*6, H, W], anchors [A, 5].

    As decode(), with boxes [B, top_n, 5] (cx, cy, w, h, θ), θ in (−π/2, π/2], not clipped.
    """
    num_classes = cls_scores.shape[1] // anchors.shape[0]
    order, top_scores, valid = _select(cls_scores, score_threshold, top_n)
    boxes, c = rotated_candidate_boxes(order, box_deltas, anchors, stride, num_classes, box_clamp)
    out_scores, out_boxes, out_classes = _padded(top_scores, boxes, c, valid, top_n)
    return out_scores.to(cls_scores.dtype), out_boxes.to(cls_scores.dtype), out_classes


def _greedy_nms(
    scores: Tensor,
    boxes: Tensor,
    classes: Tensor,
    iou_threshold: float,
    detections: int,
    iou: Callable[[Tensor, Tensor, Tensor], Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """nms() with any box kind: boxes [B, N, V], iou(kept [B, V], boxes [B, N, V], wanted [B, N])
    -> [B, N], right where `wanted` (alive, of the kept box's class) and arbitrary elsewhere."""
    batch, n = scores.shape
    values = boxes.shape[-1]
    out_dtype = scores.dtype
    device = scores.device
    out_scores = torch.zeros(batch, detections, device=device, dtype=torch.float32)
    out_boxes = torch.zeros(batch, detections, values, device=device, dtype=torch.float32)
    out_classes = torch.full((batch, detections), -1, device=device, dtype=torch.int32)
    if n == 0 or detections == 0:
        return out_scores.to(out_dtype), out_boxes.to(out_dtype), out_classes

    s = scores.float()
    order = _stable_desc_order(s)
    s = s.gather(1, order)
    b = boxes.float().gather(1, order[..., None].expand(-1, -1, values))
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
        same = c == kc[:, None]
        alive &= ~((iou(kb, b, alive & same) > iou_threshold) & same)
        alive[rows, first] = False
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

    def iou(kept: Tensor, b: Tensor, wanted: Tensor) -> Tensor:
        return box_ops.box_iou(kept[:, None, :], b, box_offset)[:, 0]

    return _greedy_nms(scores, boxes, classes, iou_threshold, detections, iou)


def nms_rotated(
    scores: Tensor, boxes: Tensor, classes: Tensor, iou_threshold: float, detections: int
) -> tuple[Tensor, Tensor, Tensor]:
    """nms() for rotated boxes [B, N, 5]: the IoU is rotated_iou, each box with its own angle.

    Returns scores [B, D], boxes [B, D, 5], classes [B, D] (int32).
    """

    def iou(kept: Tensor, b: Tensor, wanted: Tensor) -> Tensor:
        # Only the pairs that matter: the polygon work is most of the reference's time.
        return rotated_ops.masked_iou_pairs(kept[:, None, :], b, wanted)

    return _greedy_nms(scores, boxes, classes, iou_threshold, detections, iou)
