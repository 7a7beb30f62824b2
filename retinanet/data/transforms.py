"""Geometric and colour transforms on uint8 image tensors and their boxes."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as F


def resized_shape(height: int, width: int, short: int, max_size: int) -> tuple[int, int]:
    """Shorter side to `short`, longer side capped at `max_size`, aspect kept."""
    scale = min(short / min(height, width), max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize(image: Tensor, boxes: Tensor, short: int, max_size: int) -> tuple[Tensor, Tensor, tuple[float, float]]:
    h, w = image.shape[-2:]
    nh, nw = resized_shape(h, w, short, max_size)
    sx, sy = nw / w, nh / h
    if (nh, nw) != (h, w):
        image = F.resize(image, [nh, nw], antialias=True)
    return image, boxes * torch.tensor([sx, sy, sx, sy]), (sx, sy)


def hflip(image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    w = image.shape[-1]
    return image.flip(-1), torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)


def rotate90(image: Tensor, boxes: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Rotate counter-clockwise by k * 90 degrees (as torch.rot90 on H, W)."""
    for _ in range(k % 4):
        w = image.shape[-1]
        image = torch.rot90(image, 1, dims=(-2, -1))
        # (x, y) -> (y, w - x)
        boxes = torch.stack([boxes[:, 1], w - boxes[:, 2], boxes[:, 3], w - boxes[:, 0]], dim=1)
    return image, boxes


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
    brightness_range: float = 0.25
    contrast_range: float = 0.25
    saturation_range: float = 0.25
    hue_range: float = 0.05

    def __call__(self, image: Tensor, boxes: Tensor,
                 rng: random.Random | None = None) -> tuple[Tensor, Tensor]:
        """rng: the draws come from it (default: the global `random` module)."""
        random_ = rng if rng is not None else random
        if random_.random() < 0.5:
            image, boxes = hflip(image, boxes)
        if self.rotate:
            image, boxes = rotate90(image, boxes, random_.randrange(4))
        if self.brightness:
            image = F.adjust_brightness(image, 1 + random_.uniform(-1, 1) * self.brightness_range)
        if self.contrast:
            image = F.adjust_contrast(image, 1 + random_.uniform(-1, 1) * self.contrast_range)
        if self.saturation:
            image = F.adjust_saturation(image, 1 + random_.uniform(-1, 1) * self.saturation_range)
        if self.hue:
            image = F.adjust_hue(image, random_.uniform(-1, 1) * self.hue_range)
        return image, boxes
