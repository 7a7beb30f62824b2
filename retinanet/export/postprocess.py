"""Decode and class-aware NMS written for ONNX export: the portable form's tail.

Same behaviour as ops/reference.py (the oracle), expressed with operators that
map onto standard ONNX: TopK (ties: lower index first, which is the
reference's "ties by smaller flat index / input position"), Gather, Where,
and NonMaxSuppression. The box formula is ops/box.py's, traced, not repeated.

Only the NMS needs an ONNX operator with no torch counterpart. It is a torch
custom op here (`retinanet_export::nms_keep`) that the exporter translates to
NonMaxSuppression + ScatterND (NMS_TRANSLATION below); its eager kernel
(torchvision's NMS) lets the module run in PyTorch too.

config.box_offset (1: the "+1 pixel" widths of converted ODTK models) reaches
decode through the reference's candidate_boxes. Neither NonMaxSuppression nor
torchvision's NMS has such an option, so the boxes they compare are widened by
it instead (nms_boxes): the IoU of the widened boxes is the reference's IoU.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ..config import ModelConfig
from ..model.detector import clip_boxes
from ..ops.reference import candidate_boxes


@torch.library.custom_op("retinanet_export::nms_keep", mutates_args=())
def nms_keep(boxes: Tensor, class_scores: Tensor, max_per_class: int, iou_threshold: float) -> Tensor:
    """Greedy NMS per image and class: [B, N] bool, True where a candidate survives.

    boxes [B, N, 4]; class_scores [B, C, N], 0 where the candidate is not of
    class c (a candidate belongs to one class, so this is class-aware NMS).
    At most `max_per_class` survivors per image and class (highest scores).
    """
    from torchvision.ops import batched_nms

    scores, classes = class_scores.max(dim=1)
    keep = torch.zeros(scores.shape, dtype=torch.bool)
    for b in range(scores.shape[0]):
        live = (scores[b] > 0).nonzero().flatten()
        kept = live[batched_nms(boxes[b, live].float(), scores[b, live].float(), classes[b, live], iou_threshold)]
        for c in range(class_scores.shape[1]):  # NonMaxSuppression's cap per class
            keep[b, kept[classes[b, kept] == c][:max_per_class]] = True
    return keep


@nms_keep.register_fake
def _nms_keep_fake(boxes, class_scores, max_per_class, iou_threshold):
    return boxes.new_empty(boxes.shape[:2], dtype=torch.bool)


def _nms_keep_onnx(boxes, class_scores, max_per_class: int, iou_threshold: float):
    """ONNX translation of nms_keep: NonMaxSuppression, then its [K, 3] selection
    (image, class, box) scattered into a [B, N] mask."""
    import onnx
    from onnxscript import opset18

    # onnxscript's stubs give Constant's output every tensor type, which the typed inputs of
    # the ops below refuse; the graph is checked by onnx.checker and ONNX Runtime instead.
    op: Any = opset18

    # Score threshold 0: padding (score 0) never enters NMS, as in the reference.
    selected = op.NonMaxSuppression(
        boxes,
        class_scores,
        op.Constant(value_ints=[max_per_class]),
        op.Constant(value_floats=[iou_threshold]),
        op.Constant(value_floats=[0.0]),
        center_point_box=0,
    )
    positions = op.Gather(selected, op.Constant(value_ints=[0, 2]), axis=1)  # (image, box)
    shape = op.Slice(op.Shape(boxes), op.Constant(value_ints=[0]), op.Constant(value_ints=[2]))
    false = onnx.helper.make_tensor("false", onnx.TensorProto.BOOL, [1], [False])
    true = onnx.helper.make_tensor("true", onnx.TensorProto.BOOL, [1], [True])
    count = op.Slice(op.Shape(selected), op.Constant(value_ints=[0]), op.Constant(value_ints=[1]))
    return op.ScatterND(op.ConstantOfShape(shape, value=false), positions, op.Expand(op.Constant(value=true), count))


NMS_TRANSLATION = {torch.ops.retinanet_export.nms_keep.default: _nms_keep_onnx}


def decode_level(
    scores: Tensor,
    deltas: Tensor,
    anchors: Tensor,
    stride: int,
    score_threshold: float,
    top_n: int,
    box_clamp: float,
    box_offset: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """reference.decode() for export: scores [B, A*C, H, W] (sigmoid applied), deltas [B, A*4, H, W].

    Returns scores [B, k], boxes [B, k, 4], classes [B, k] int32 with
    k = min(top_n, A*C*H*W) (the reference pads to top_n; the tail it adds is
    padding, which NMS ignores, so it is left out here). With a dynamic input
    size H and W are symbolic, and so is k (torch.sym_min: a Min in the graph).
    """
    batch = scores.shape[0]
    _, channels, height, width = scores.shape
    num_anchors = anchors.shape[0]
    num_classes = channels // num_anchors
    hw = height * width

    flat = scores.reshape(batch, -1)
    ranked = torch.where(flat > score_threshold, flat, torch.full_like(flat, -1.0))
    k = torch.sym_min(top_n, channels * hw)
    top, order = torch.topk(ranked, k, dim=1, largest=True, sorted=True)
    valid = top >= 0  # ranked is -1 exactly for the non-candidates

    boxes, c = candidate_boxes(order, deltas, anchors, stride, num_classes, box_clamp, box_offset)

    zero = torch.zeros((), dtype=torch.float32)
    return (
        torch.where(valid, top, zero),
        torch.where(valid.unsqueeze(-1), boxes, zero),
        torch.where(valid, c, torch.full_like(c, -1)).to(torch.int32),
    )


def nms_boxes(boxes: Tensor, box_offset: float) -> Tensor:
    """The boxes NMS compares: (x1, y1, x2 + p, y2 + p) for box_offset p. Their plain widths,
    intersections and areas are the reference's with the offset (x2 - x1 + p, min x2 - max x1 + p),
    which lets NonMaxSuppression, which has no such option, measure the reference's IoU.
    No node at all for p = 0, so that exports without the offset keep their graph."""
    if not box_offset:
        return boxes
    return boxes + torch.tensor([0.0, 0.0, box_offset, box_offset], dtype=boxes.dtype)


def class_aware_nms(
    scores: Tensor,
    boxes: Tensor,
    classes: Tensor,
    num_classes: int,
    iou_threshold: float,
    detections: int,
    box_offset: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """reference.nms() for export: the `detections` best survivors, padded."""
    n = scores.shape[1]
    if not isinstance(n, int) or n < detections:
        # Fewer candidates than detections, or a count known only at run time (a dynamic
        # input size): padding candidates (score 0, never kept) make `detections` the top-k.
        scores = torch.nn.functional.pad(scores, (0, detections))
        boxes = torch.nn.functional.pad(boxes, (0, 0, 0, detections))
        classes = torch.nn.functional.pad(classes, (0, detections), value=-1)
    class_ids = torch.arange(num_classes, dtype=torch.int32).view(1, -1, 1)
    zero = torch.zeros((), dtype=torch.float32)
    class_scores = torch.where(classes.unsqueeze(1) == class_ids, scores.unsqueeze(1), zero)
    # No class can place more than `detections` boxes among the best `detections`.
    keep = torch.ops.retinanet_export.nms_keep(nms_boxes(boxes, box_offset), class_scores, detections, iou_threshold)
    kept = torch.where(keep, scores, torch.zeros((), dtype=torch.float32))
    top, order = torch.topk(kept, detections, dim=1, largest=True, sorted=True)  # ties: earlier input first
    valid = top > 0
    out_boxes = torch.gather(boxes, 1, order.unsqueeze(-1).expand(-1, -1, 4))
    out_classes = torch.gather(classes, 1, order)
    return (
        torch.where(valid, top, zero),
        torch.where(valid.unsqueeze(-1), out_boxes, zero),
        torch.where(valid, out_classes, torch.full_like(out_classes, -1)),
    )


class PortablePostprocess(nn.Module):
    """Per-level sigmoid scores and box deltas -> scores [B, D], boxes [B, D, 4], classes [B, D]."""

    def __init__(self, config: ModelConfig, base_anchors: list[Tensor]):
        super().__init__()
        self.config = config
        for i, base in enumerate(base_anchors):
            self.register_buffer(f"anchors_{i}", base.float().clone(), persistent=False)

    def candidates(self, heads: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
        """Every level's decoded candidates, concatenated: scores [B, N], boxes [B, N, 4], classes [B, N]."""
        c = self.config
        levels = len(c.strides)
        parts = [
            decode_level(
                s, d, getattr(self, f"anchors_{i}"), stride, c.score_threshold, c.top_n, c.box_clamp, c.box_offset
            )
            for i, (s, d, stride) in enumerate(zip(heads[:levels], heads[levels:], c.strides))
        ]
        scores, boxes, classes = (torch.cat(p, dim=1) for p in zip(*parts))
        return scores, boxes, classes

    def forward(self, *heads: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c = self.config
        scores, boxes, classes = self.candidates(heads)
        return class_aware_nms(scores, boxes, classes, c.classes, c.nms_iou, c.detections, c.box_offset)


class ClippingPostprocess(PortablePostprocess):
    """The tail of models that take image_sizes (GroupNorm heads, clip_to_image): inputs heads...,
    image_sizes; the candidates' boxes are clipped to each image's valid size before NMS, as
    RetinaNet.postprocess does with sizes."""

    def forward(self, *inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c = self.config
        *heads, sizes = inputs
        scores, boxes, classes = self.candidates(tuple(heads))
        boxes = clip_boxes(boxes, sizes)
        return class_aware_nms(scores, boxes, classes, c.classes, c.nms_iou, c.detections, c.box_offset)
