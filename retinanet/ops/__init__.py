"""decode(), nms() and their rotated forms, and rotated_iou(): the CUDA custom
operators when built, the reference otherwise.

Both paths have one behaviour (ops/reference.py and docs/rotated.md document it);
the tests hold the custom operators to the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference, rotated

try:  # The compiled extension registers torch.ops.retinanet.decode / .nms.
    from retinanet import _C  # type: ignore[attr-defined]  # noqa: F401

    HAVE_EXTENSION = True
except ImportError:  # pure-Python install, or torch without CUDA
    HAVE_EXTENSION = False


def _use_extension(t: Tensor, op: str = "") -> bool:
    """Whether to run the custom operator `op` on t: built, on CUDA, and (for ops newer
    than the extension may be) registered by this build."""
    return HAVE_EXTENSION and t.is_cuda and (not op or hasattr(torch.ops.retinanet, op))


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
    if _use_extension(cls_scores):
        anchors = anchors.to(cls_scores.device)
        args = (stride, score_threshold, top_n, box_clamp)
        # Only models with the +1 convention pass the offset: an extension built before it still runs the rest.
        extra = (box_offset,) if box_offset else ()
        return torch.ops.retinanet.decode(cls_scores, box_deltas, anchors, *args, *extra)
    return reference.decode(cls_scores, box_deltas, anchors, stride, score_threshold, top_n, box_clamp, box_offset)


def nms(
    scores: Tensor, boxes: Tensor, classes: Tensor, iou_threshold: float, detections: int, box_offset: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    if _use_extension(scores):
        extra = (box_offset,) if box_offset else ()
        return torch.ops.retinanet.nms(scores, boxes, classes, iou_threshold, detections, *extra)
    return reference.nms(scores, boxes, classes, iou_threshold, detections, box_offset)


def rotated_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU of rotated boxes: a [N, 5] x b [M, 5] -> [N, M] float32.

    Boxes are (cx, cy, w, h, θ), θ in radians turning anti-clockwise on screen
    (docs/rotated.md). The IoU is exact: the area of the convex intersection
    polygon over the union. A box of zero area has IoU 0 with every box, itself
    included; no input gives NaN. Runs the CUDA operator for CUDA tensors when the
    extension has it, the float64 reference (ops/rotated.py) otherwise.
    """
    if _use_extension(a, "rotated_iou"):
        return torch.ops.retinanet.rotated_iou(a, b.to(a.device))
    return rotated.rotated_iou_reference(a, b)


def decode_rotated(
    cls_scores: Tensor,
    box_deltas: Tensor,
    anchors: Tensor,
    stride: int,
    score_threshold: float,
    top_n: int,
    box_clamp: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """decode() for a rotated-box head (docs/rotated.md): boxes [B, top_n, 5], not clipped."""
    if _use_extension(cls_scores, "decode_rotated"):
        anchors = anchors.to(cls_scores.device)
        args = (stride, score_threshold, top_n, box_clamp)
        return torch.ops.retinanet.decode_rotated(cls_scores, box_deltas, anchors, *args)
    return reference.decode_rotated(cls_scores, box_deltas, anchors, stride, score_threshold, top_n, box_clamp)


def nms_rotated(
    scores: Tensor, boxes: Tensor, classes: Tensor, iou_threshold: float, detections: int
) -> tuple[Tensor, Tensor, Tensor]:
    """nms() for rotated boxes [B, N, 5]: suppression by rotated_iou, each box with its own angle."""
    if _use_extension(scores, "nms_rotated"):
        return torch.ops.retinanet.nms_rotated(scores, boxes, classes, iou_threshold, detections)
    return reference.nms_rotated(scores, boxes, classes, iou_threshold, detections)
