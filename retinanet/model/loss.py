"""Anchor matching, sigmoid focal loss and smooth L1."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..config import LABEL_CROWD, ModelConfig
from ..ops import box as box_ops
from ..ops import rotated as rotated_ops

IGNORE = -1  # per-anchor label of the ignored IoU band and crowd regions
BACKGROUND = -2


def match(anchors: Tensor, targets: Tensor, ious: tuple[float, float], offset: float = 0.0) -> tuple[Tensor, Tensor]:
    """Assign each anchor a class, BACKGROUND or IGNORE, and its box.

    anchors [N, 4]; targets [B, M, 5] rows (x1, y1, x2, y2, label) with label
    >= 0 for objects, LABEL_CROWD for crowd regions and anything else negative
    for padding. Returns labels [B, N] and matched boxes [B, N, 4]. offset: the
    box convention (ops.box); the targets' x2, y2 are then the last pixels inside.
    """
    batch, m = targets.shape[:2]
    if m == 0:
        return _unmatched(anchors, batch, 4)
    boxes = targets[..., :4].float()
    iou = box_ops.box_iou(anchors[None], boxes, offset)  # [B, N, M]

    def inside() -> Tensor:
        return box_ops.intersection(anchors[None], boxes, offset) / box_ops.area(anchors, offset)[None, :, None]

    return _assign(iou, boxes, targets[..., 4].long(), ious, inside)


def match_rotated(anchors: Tensor, targets: Tensor, ious: tuple[float, float]) -> tuple[Tensor, Tensor]:
    """match() for rotated boxes: anchors [N, 5], targets [B, M, 6] rows (cx, cy, w, h, θ, label);
    rotated IoU (the CUDA op on the GPU, the reference on the CPU). Returns labels [B, N] and
    matched boxes [B, N, 5]."""
    batch, m = targets.shape[:2]
    if m == 0:
        return _unmatched(anchors, batch, 5)
    n = anchors.shape[0]
    boxes = targets[..., :5].float()
    cls = targets[..., 5].long()
    iou = _anchor_ious(anchors, boxes.reshape(-1, 5), cls.reshape(-1), ious[0])
    iou = iou.reshape(n, batch, m).permute(1, 0, 2)  # [B, N, M]

    def inside() -> Tensor:
        # The intersection follows from the IoU: I = IoU (A + B) / (1 + IoU).
        anchor_area = (anchors[:, 2] * anchors[:, 3])[None, :, None]
        inter = iou * (anchor_area + (boxes[..., 2] * boxes[..., 3])[:, None, :])
        return inter / (1 + iou) / anchor_area

    return _assign(iou, boxes, cls, ious, inside)


def _unmatched(anchors: Tensor, batch: int, values: int) -> tuple[Tensor, Tensor]:
    """Every anchor BACKGROUND, no box: an image batch without targets."""
    n = anchors.shape[0]
    labels = torch.full((batch, n), BACKGROUND, dtype=torch.long, device=anchors.device)
    return labels, torch.zeros(batch, n, values, device=anchors.device)


def _assign(
    iou: Tensor, boxes: Tensor, cls: Tensor, ious: tuple[float, float], inside: Callable[[], Tensor]
) -> tuple[Tensor, Tensor]:
    """Labels [B, N] and matched boxes [B, N, V] from the IoUs [B, N, M] of anchors with boxes
    [B, M, V] of labels cls [B, M]; inside() gives each anchor's share inside each box, asked
    for only when there are crowd regions."""
    bg_iou, fg_iou = ious
    objects = torch.where((cls >= 0)[:, None, :], iou, torch.full_like(iou, -1.0))
    best_iou, best = objects.max(dim=2)
    labels = torch.full(best.shape, BACKGROUND, dtype=torch.long, device=iou.device)
    labels = torch.where(best_iou >= fg_iou, cls.gather(1, best), labels)
    labels = torch.where((best_iou >= bg_iou) & (best_iou < fg_iou), IGNORE, labels)
    matched = boxes.gather(1, best[..., None].expand(-1, -1, boxes.shape[-1]))
    is_crowd = cls == LABEL_CROWD
    if bool(is_crowd.any()):
        # A background anchor mostly inside a crowd region may cover unlabelled
        # objects: ignore it rather than teach "background" there.
        in_crowd = ((inside() > 0.5) & is_crowd[:, None, :]).any(dim=2)
        labels = torch.where((labels == BACKGROUND) & in_crowd, IGNORE, labels)
    return labels, matched


def _anchor_ious(anchors: Tensor, boxes: Tensor, cls: Tensor, bg_iou: float) -> Tensor:
    """Rotated IoU of anchors [N, 5] x boxes [M, 5]: the CUDA op on the GPU. The CPU reference
    computes the pairs that can decide a label only: IoU <= smaller area / larger area, so a
    pair whose areas differ more than bg_iou allows stays background whatever its IoU (0 here);
    crowd regions keep every pair (the anchor's share inside them counts)."""
    if anchors.is_cuda:
        return ops.rotated_iou(anchors, boxes)
    area_a = (anchors[:, 2] * anchors[:, 3])[:, None]
    area_b = (boxes[:, 2] * boxes[:, 3])[None, :]
    bound = torch.minimum(area_a, area_b) / torch.maximum(area_a, area_b).clamp(min=1e-12)
    wanted = (bound >= bg_iou) | (cls == LABEL_CROWD)[None, :]
    return rotated_ops.masked_iou_pairs(anchors[:, None, :], boxes[None, :, :], wanted)


def inclusive_ends(targets: Tensor, offset: float) -> Tensor:
    """Targets [B, M, 5] with x2, y2 moved in by `offset`: a box of w pixels from x ends at
    x + w - 1 in the +1 convention, where data rows hold x + w."""
    if not offset:
        return targets
    shift = torch.tensor([0.0, 0.0, offset, offset, 0.0], device=targets.device, dtype=targets.dtype)
    return targets - shift


def focal_loss(logits: Tensor, targets: Tensor, alpha: float, gamma: float) -> Tensor:
    """Elementwise sigmoid focal loss, FL = -alpha_t (1 - p_t)^gamma log(p_t)."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * (1 - p_t) ** gamma * ce


def flatten_heads(outputs: list[Tensor], width: int) -> Tensor:
    """[B, A*K, H, W] per level -> [B, sum(A*H*W), K], matching all_anchors order."""
    flat = []
    for o in outputs:
        b, ak, h, w = o.shape
        flat.append(o.reshape(b, ak // width, width, h, w).permute(0, 1, 3, 4, 2).reshape(b, -1, width))
    return torch.cat(flat, dim=1)


def detection_loss(
    cls_heads: list[Tensor],
    box_heads: list[Tensor],
    anchors: Tensor,
    targets: Tensor,
    config: ModelConfig,
    count_foreground: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """Focal + smooth L1, each summed and divided by max(1, #foreground) over the batch.

    count_foreground: maps this batch's foreground count to the one to divide
    by; data-parallel training passes the sum over all ranks, so that the
    ranks' losses add up to the loss of the whole global batch.
    """
    cls_logits = flatten_heads(cls_heads, config.classes).float()
    deltas = flatten_heads(box_heads, config.box_deltas).float()
    with torch.no_grad():
        bg, fg = config.anchor_ious
        if config.rotated:
            labels, matched = match_rotated(anchors, targets, (bg, fg))
        else:
            labels, matched = match(anchors, inclusive_ends(targets, config.box_offset), (bg, fg), config.box_offset)
        foreground = labels >= 0
        num_fg = foreground.sum().float()
        if count_foreground is not None:
            num_fg = count_foreground(num_fg)
        num_fg = num_fg.clamp(min=1)
        onehot = torch.zeros_like(cls_logits)
        onehot[foreground] = F.one_hot(labels[foreground], config.classes).to(onehot.dtype)
    counted = labels != IGNORE
    cls_loss = focal_loss(cls_logits[counted], onehot[counted], config.focal_alpha, config.focal_gamma).sum()
    anchors_b = anchors[None].expand(labels.shape[0], -1, -1)
    if config.rotated:
        box_targets = rotated_ops.encode(matched[foreground], anchors_b[foreground])
    else:
        box_targets = box_ops.encode(matched[foreground], anchors_b[foreground], config.box_offset)
    box_loss = F.smooth_l1_loss(deltas[foreground], box_targets, beta=config.smooth_l1_beta, reduction="sum")
    return {"cls_loss": cls_loss / num_fg, "box_loss": box_loss / num_fg}
