"""Geometric and colour transforms on uint8 image tensors and their boxes.

A sample's geometry (crop window, shorter side, flip, quarter turns) is drawn
once as a `Geometry`; `transform_targets` maps boxes through it and
`transform_image` maps pixels. The DALI pipelines draw the same parameters on
their side, report them, and the boxes go through `transform_targets` too, so
both loaders give identical boxes for identical parameters.

Targets are rows (x1, y1, x2, y2, label) or, for rotated boxes, (cx, cy, w,
h, θ, label) with θ anti-clockwise on screen (docs/rotated.md); the label is
the last column of both.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as F

# Random bounding-box crop (SSD style): a window whose IoU with every box is at
# least a threshold drawn from CROP_THRESHOLDS (None: keep the whole image),
# each side CROP_SCALING of the image's, aspect (w/h, relative to the image's)
# within CROP_ASPECT. Shared by the PyTorch loader and the DALI pipeline.
CROP_THRESHOLDS = (None, 0.1, 0.3, 0.5, 0.7, 0.9)
CROP_SCALING = (0.3, 1.0)
CROP_ASPECT = (0.5, 2.0)
CROP_ATTEMPTS = 50


def resized_shape(height: int, width: int, short: int, max_size: int) -> tuple[int, int]:
    """Shorter side to `short`, longer side capped at `max_size`, aspect kept.

    Rounds half up in float64 so the DALI pipelines, which compute the same
    expression with their float64 arithmetic, get the same integer sizes.
    """
    scale = min(short / min(height, width), max_size / max(height, width))
    return max(1, math.floor(height * scale + 0.5)), max(1, math.floor(width * scale + 0.5))


def resize_image(image: Tensor, short: int, max_size: int) -> tuple[Tensor, tuple[float, float]]:
    """The image at `resized_shape`, and the scale (x, y) applied."""
    h, w = image.shape[-2:]
    nh, nw = resized_shape(h, w, short, max_size)
    if (nh, nw) != (h, w):
        image = F.resize(image, [nh, nw], antialias=True)
    return image, (nw / w, nh / h)


def hflip_boxes(boxes: Tensor, width: int) -> Tensor:
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def rotate90_boxes(boxes: Tensor, width: int, height: int, k: int) -> Tensor:
    """Boxes of an image rotated counter-clockwise by k * 90 degrees."""
    for _ in range(k % 4):
        # (x, y) -> (y, w - x); the new width is the old height.
        boxes = torch.stack([boxes[:, 1], width - boxes[:, 2], boxes[:, 3], width - boxes[:, 0]], dim=1)
        width, height = height, width
    return boxes


def wrap_turn(theta: Tensor) -> Tensor:
    """Angles wrapped into (−π, π], the range annotations are given in."""
    return theta - 2 * math.pi * torch.ceil((theta - math.pi) / (2 * math.pi))


def hflip_rotated(boxes: Tensor, width: int) -> Tensor:
    """Rotated boxes [M, 5] of a horizontally flipped image: the mirror turns
    the other way, and its (w, h) corners are the mirrored ones."""
    theta = wrap_turn(-boxes[:, 4])
    return torch.stack([width - boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3], theta], dim=1)


def rotate90_rotated(boxes: Tensor, width: int, height: int, k: int) -> Tensor:
    """Rotated boxes [M, 5] of an image rotated anti-clockwise by k * 90 degrees:
    centres map as points, each box turns with the image, w and h stay."""
    for _ in range(k % 4):
        theta = wrap_turn(boxes[:, 4] + math.pi / 2)
        boxes = torch.stack([boxes[:, 1], width - boxes[:, 0], boxes[:, 2], boxes[:, 3], theta], dim=1)
        width, height = height, width
    return boxes


def rotated_extents(boxes: Tensor) -> Tensor:
    """[M, 4] x1 y1 x2 y2: the axis-aligned extent of rotated boxes [M, 5+]."""
    cos, sin = torch.cos(boxes[:, 4]).abs(), torch.sin(boxes[:, 4]).abs()
    half_w = (boxes[:, 2] * cos + boxes[:, 3] * sin) / 2
    half_h = (boxes[:, 2] * sin + boxes[:, 3] * cos) / 2
    cx, cy = boxes[:, 0], boxes[:, 1]
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=1)


def crop_targets(targets: Tensor, x0: int, y0: int, width: int, height: int) -> Tensor:
    """Targets [M, 5] of the window: boxes whose centre lies inside, clipped and shifted."""
    cx = (targets[:, 0] + targets[:, 2]) / 2
    cy = (targets[:, 1] + targets[:, 3]) / 2
    keep = (cx >= x0) & (cx <= x0 + width) & (cy >= y0) & (cy <= y0 + height)
    kept = targets[keep].clone()
    kept[:, 0:4:2] = (kept[:, 0:4:2] - x0).clamp(0, width)
    kept[:, 1:4:2] = (kept[:, 1:4:2] - y0).clamp(0, height)
    return kept


def _iou_with_window(boxes: Tensor, x0: float, y0: float, x1: float, y1: float) -> Tensor:
    iw = (torch.minimum(boxes[:, 2], torch.tensor(x1)) - torch.maximum(boxes[:, 0], torch.tensor(x0))).clamp(min=0)
    ih = (torch.minimum(boxes[:, 3], torch.tensor(y1)) - torch.maximum(boxes[:, 1], torch.tensor(y0))).clamp(min=0)
    inter = iw * ih
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + (x1 - x0) * (y1 - y0) - inter)


def random_crop_window(rng: random.Random, boxes: Tensor, width: int, height: int) -> tuple[int, int, int, int] | None:
    """A window (x0, y0, w, h) meeting a drawn IoU threshold with every box, or None."""
    threshold = rng.choice(CROP_THRESHOLDS)
    if threshold is None:
        return None
    for _ in range(CROP_ATTEMPTS):
        sw, sh = rng.uniform(*CROP_SCALING), rng.uniform(*CROP_SCALING)
        if not CROP_ASPECT[0] <= sw / sh <= CROP_ASPECT[1]:
            continue
        cw, ch = max(1, math.floor(sw * width + 0.5)), max(1, math.floor(sh * height + 0.5))
        x0, y0 = rng.randint(0, width - cw), rng.randint(0, height - ch)
        if len(boxes) == 0 or bool((_iou_with_window(boxes, x0, y0, x0 + cw, y0 + ch) >= threshold).all()):
            return x0, y0, cw, ch
    return None


@dataclass
class Geometry:
    """One sample's geometric transform, applied in this order."""

    short: int  # shorter side after resizing (longer side capped at max_size)
    crop: tuple[int, int, int, int] | None = None  # x0, y0, w, h in original pixels
    flip: bool = False
    quarter_turns: int = 0  # counter-clockwise


def transform_targets(
    targets: Tensor, g: Geometry, height: int, width: int, max_size: int
) -> tuple[Tensor, tuple[int, int], tuple[float, float]]:
    """Targets [M, 5] or rotated [M, 6] (original pixels) through `g`.

    Returns the targets, the final image size (h, w) and the resize scale
    (x, y) of the (cropped) image. Rotated targets cannot be cropped (a crop
    clipping a rotated box has no rotated-box answer): ValueError.
    """
    rotated = targets.shape[1] == 6
    if g.crop is not None:
        if rotated:
            raise ValueError("the random crop augmentation does not support rotated boxes")
        x0, y0, width, height = g.crop
        targets = crop_targets(targets, x0, y0, width, height)
    nh, nw = resized_shape(height, width, g.short, max_size)
    sx, sy = nw / width, nh / height
    if rotated:
        # One scale for w and h whatever θ: sx and sy differ only by the rounding
        # of the resized size to whole pixels, which keeps the aspect ratio.
        s = (sx + sy) / 2
        boxes = torch.cat([targets[:, :4] * torch.tensor([sx, sy, s, s]), targets[:, 4:5]], dim=1)
        if g.flip:
            boxes = hflip_rotated(boxes, nw)
        boxes = rotate90_rotated(boxes, nw, nh, g.quarter_turns)
    else:
        boxes = targets[:, :4] * torch.tensor([sx, sy, sx, sy])
        if g.flip:
            boxes = hflip_boxes(boxes, nw)
        boxes = rotate90_boxes(boxes, nw, nh, g.quarter_turns)
    size = (nw, nh) if g.quarter_turns % 2 else (nh, nw)
    return torch.cat([boxes, targets[:, -1:]], dim=1), size, (sx, sy)


def transform_image(image: Tensor, g: Geometry, max_size: int) -> Tensor:
    if g.crop is not None:
        x0, y0, w, h = g.crop
        image = image[:, y0 : y0 + h, x0 : x0 + w]
    image, _ = resize_image(image, g.short, max_size)
    if g.flip:
        image = image.flip(-1)
    if g.quarter_turns % 4:
        image = torch.rot90(image, g.quarter_turns % 4, dims=(-2, -1))
    return image


@dataclass
class Augment:
    """Training augmentations. Flip (p=0.5) is always on; the rest are flags.

    Colour factors are drawn uniformly within these amplitudes around identity.
    """

    rotate: bool = False
    brightness: bool = False
    contrast: bool = False
    hue: bool = False
    saturation: bool = False
    crop: bool = False
    brightness_range: float = 0.25
    contrast_range: float = 0.25
    saturation_range: float = 0.25
    hue_range: float = 0.05  # fraction of a full turn of the colour wheel

    def geometry(self, rng: random.Random, short: int, boxes: Tensor, height: int, width: int) -> Geometry:
        crop = random_crop_window(rng, boxes, width, height) if self.crop else None
        flip = rng.random() < 0.5
        turns = rng.randrange(4) if self.rotate else 0
        return Geometry(short, crop, flip, turns)

    def colour(self, image: Tensor, rng: random.Random) -> Tensor:
        if self.brightness:
            image = F.adjust_brightness(image, 1 + rng.uniform(-1, 1) * self.brightness_range)
        if self.contrast:
            image = F.adjust_contrast(image, 1 + rng.uniform(-1, 1) * self.contrast_range)
        if self.saturation:
            image = F.adjust_saturation(image, 1 + rng.uniform(-1, 1) * self.saturation_range)
        if self.hue:
            image = F.adjust_hue(image, rng.uniform(-1, 1) * self.hue_range)
        return image
