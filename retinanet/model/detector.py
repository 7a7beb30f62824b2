"""The RetinaNet module: backbone + FPN + heads, loss and batched detection."""

from __future__ import annotations

from typing import cast

import torch
import torch.nn as nn
from torch import Tensor

from .. import ops
from ..config import ModelConfig
from . import backbones
from .anchors import all_anchors, level_base_anchors
from .fpn import FPN
from .heads import box_head, classification_head, valid_mask
from .loss import detection_loss


def clip_boxes(boxes: Tensor, sizes: Tensor) -> Tensor:
    """Boxes [B, N, 4] clipped to each image's valid (h, w) of sizes [B, 2].

    Decode clips to the padded input; NMS on those boxes would then depend on
    the padding for boxes that reach past the image."""
    limits = sizes.flip(-1).repeat(1, 2).unsqueeze(1).to(boxes.dtype)
    return torch.minimum(boxes, limits)


class RetinaNet(nn.Module):
    """Input: images [B, 3, H, W] as float pixels 0..255 (RGB), H and W
    multiples of config.pad_multiple; normalisation happens inside, so every
    runtime (ONNX, TensorRT) takes the same raw-pixel input.

    sizes [B, 2] (optional): each image's valid (h, w) in input pixels, the
    rest being padding. GroupNorm heads (config.head_norm) then normalise over
    the valid cells only, postprocess drops the padding's cells and clips the
    candidate boxes to the valid size before NMS, so that detections do not
    depend on how much padding the batch or the export size adds (up to the
    backbone's and FPN's convs seeing padded pixels near the border).
    BatchNorm-head models ignore it (their cost and exports stay as they were),
    unless config.clip_to_image asks for the clipping."""

    def __init__(self, config: ModelConfig, pretrained: bool = False, weights_file: str | None = None):
        super().__init__()
        self.config = config
        self.backbone = backbones.build(
            config.backbone, pretrained=pretrained, weights_file=weights_file, freeze_bn=config.freeze_bn
        )
        self.fpn = FPN(self.backbone.out_channels, config.channels, config.p6_input)
        self.cls_head = classification_head(
            config.num_anchors,
            config.classes,
            config.prior_probability,
            config.channels,
            config.head_depth,
            config.head_norm,
            config.head_conv_bias,
        )
        self.box_head = box_head(
            config.num_anchors,
            config.channels,
            config.head_depth,
            config.head_norm,
            config.head_conv_bias,
            config.box_deltas,
        )
        self._anchor_cache: dict = {}
        self._register_constants()

    def _register_constants(self) -> None:
        """The buffers computed from the config, which checkpoints do not hold."""
        config = self.config
        self.register_buffer("pixel_mean", torch.tensor(config.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.std).view(1, 3, 1, 1) * 255, persistent=False)
        for i, base in enumerate(level_base_anchors(config)):
            self.register_buffer(f"base_anchors_{i}", base, persistent=False)

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state_dict: dict) -> RetinaNet:
        """The model holding `state_dict`'s tensors, on the CPU. Built on the meta device, so that
        no weight is initialised only to be overwritten: a ResNet50's initialisation and copy are
        most of the time it takes to open a checkpoint. RuntimeError when the keys or shapes differ."""
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state_dict, assign=True)
        model._register_constants()  # the meta build made these on the meta device too
        return model

    def base_anchors(self) -> list[Tensor]:
        return [getattr(self, f"base_anchors_{i}") for i in range(len(self.config.strides))]

    def forward(self, images: Tensor, sizes: Tensor | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """Raw head outputs per level: class logits [B, A*C, h, w], box deltas [B, A*4, h, w]
        ([B, A*6, h, w] for rotated models)."""
        mean, std = cast(Tensor, self.pixel_mean), cast(Tensor, self.pixel_std)
        x = (images.to(mean.dtype) - mean) / std
        features = self.fpn(self.backbone(x))
        masks = self.valid_masks(sizes, [_hw(f) for f in features], features[0].dtype)
        return (
            [self.cls_head(f, m) for f, m in zip(features, masks)],
            [self.box_head(f, m) for f, m in zip(features, masks)],
        )

    def valid_masks(self, sizes: Tensor | None, shapes: list[tuple[int, int]], dtype: torch.dtype) -> list:
        """Per level, the [B, 1, h, w] mask of valid cells; Nones where padding does not matter."""
        if sizes is None or not self.config.head_norm:
            return [None] * len(shapes)
        return [valid_mask(sizes, stride, h, w, dtype) for stride, (h, w) in zip(self.config.strides, shapes)]

    def loss(self, images: Tensor, targets: Tensor, sizes: Tensor | None = None) -> dict[str, Tensor]:
        cls_heads, box_heads = self(images, sizes)
        return self.loss_from_heads(cls_heads, box_heads, targets)

    def loss_from_heads(
        self, cls_heads: list[Tensor], box_heads: list[Tensor], targets: Tensor, count_foreground=None
    ) -> dict[str, Tensor]:
        """Focal + smooth L1 of head outputs against targets [B, M, 5] in input pixels.

        count_foreground: see model.loss.detection_loss (data-parallel normalisation)."""
        shapes = tuple(_hw(c) for c in cls_heads)
        key = (shapes, targets.device)
        if key not in self._anchor_cache:  # input sizes repeat, anchors with them
            self._anchor_cache[key] = all_anchors(self.config, list(shapes), device=targets.device)
        return detection_loss(cls_heads, box_heads, self._anchor_cache[key], targets, self.config, count_foreground)

    def scores(self, cls_heads: list[Tensor], sizes: Tensor | None = None) -> list[Tensor]:
        """Sigmoid per level; 0 on cells outside the valid region (they would not
        exist without padding) where sizes are given and matter (valid_masks)."""
        masks = self.valid_masks(sizes, [_hw(c) for c in cls_heads], cls_heads[0].dtype)
        return [torch.sigmoid(c) if m is None else torch.sigmoid(c) * m for c, m in zip(cls_heads, masks)]

    def postprocess(
        self, cls_heads: list[Tensor], box_heads: list[Tensor], sizes: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Sigmoid, per-level decode, class-aware NMS: scores [B, D], boxes [B, D, 4], classes [B, D]
        (boxes [B, D, 5], (cx, cy, w, h, θ), for rotated models: never clipped, docs/rotated.md)."""
        c = self.config
        if c.rotated:
            return self._postprocess_rotated(cls_heads, box_heads, sizes)
        decoded = [
            ops.decode(scores, box, anchors, stride, c.score_threshold, c.top_n, c.box_clamp, c.box_offset)
            for scores, box, anchors, stride in zip(
                self.scores(cls_heads, sizes), box_heads, self.base_anchors(), c.strides
            )
        ]
        scores, boxes, classes = (torch.cat(parts, dim=1) for parts in zip(*decoded))
        if sizes is not None and c.takes_image_sizes:
            boxes = clip_boxes(boxes, sizes)
        return ops.nms(scores, boxes, classes, c.nms_iou, c.detections, c.box_offset)

    def _postprocess_rotated(
        self, cls_heads: list[Tensor], box_heads: list[Tensor], sizes: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        c = self.config
        decoded = [
            ops.decode_rotated(scores, box, anchors, stride, c.score_threshold, c.top_n, c.box_clamp)
            for scores, box, anchors, stride in zip(
                self.scores(cls_heads, sizes), box_heads, self.base_anchors(), c.strides
            )
        ]
        scores, boxes, classes = (torch.cat(parts, dim=1) for parts in zip(*decoded))
        return ops.nms_rotated(scores, boxes, classes, c.nms_iou, c.detections)

    @torch.no_grad()
    def detect(self, images: Tensor, sizes: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Detections in input-pixel coordinates, fixed size and padded (score 0)."""
        cls_heads, box_heads = self(images, sizes)
        return self.postprocess(cls_heads, box_heads, sizes)


def _hw(t: Tensor) -> tuple[int, int]:
    """The (height, width) of a [..., H, W] tensor."""
    h, w = t.shape[-2:]  # no int(): symbolic sizes stay symbolic under torch.compile/export
    return h, w
