"""A padded batch of images with their targets, and the collate that builds it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import LABEL_PAD
from ..images import pad_images, padded_size


@dataclass
class Sample:
    image: Tensor  # uint8 [3, h, w], resized
    targets: Tensor  # [M, 5] x1 y1 x2 y2 label, resized coordinates
    image_id: int
    scale: tuple[float, float]  # resized / original, per axis (x, y)
    size: tuple[int, int]  # original (height, width)


@dataclass
class Batch:
    images: Tensor  # uint8 [B, 3, H, W], padded to the multiple with the mean pixel
    targets: Tensor  # [B, M, 5], rows padded with label LABEL_PAD
    image_ids: list[int]
    scales: Tensor  # [B, 2]
    sizes: list[tuple[int, int]]
    skipped: int = 0  # corrupt images dropped from this batch (training)
    errors: list[str] = field(default_factory=list)  # unreadable images (inference)
    # int32 [B, 2]: each image's (h, w) in `images` before padding, which
    # models with config.takes_image_sizes need to ignore the padding (model.RetinaNet).
    valid: Tensor | None = None

    def pin_memory(self):
        self.images = self.images.pin_memory()
        self.targets = self.targets.pin_memory()
        if self.valid is not None:
            self.valid = self.valid.pin_memory()
        return self


class Collate:
    """Pads images to a common size (a multiple of `multiple`) and stacks targets."""

    def __init__(self, multiple: int, fill: tuple[int, int, int]):
        self.multiple = multiple
        self.fill = fill

    def __call__(self, samples: list[Sample | str | None]) -> Batch:
        skipped = sum(s is None for s in samples)
        errors = [s for s in samples if isinstance(s, str)]
        samples = [s for s in samples if isinstance(s, Sample)]
        if not samples:
            return Batch(
                torch.zeros(0, 3, self.multiple, self.multiple, dtype=torch.uint8),
                torch.zeros(0, 0, 5),
                [],
                torch.zeros(0, 2),
                [],
                skipped,
                errors,
                torch.zeros(0, 2, dtype=torch.int32),
            )
        size = padded_size([s.image.shape[1:] for s in samples], self.multiple)
        images = pad_images([s.image for s in samples], size, self.fill)
        targets = stack_targets([s.targets for s in samples])
        scales = torch.tensor([s.scale for s in samples], dtype=torch.float32)
        valid = torch.tensor([tuple(s.image.shape[1:]) for s in samples], dtype=torch.int32)
        return Batch(
            images, targets, [s.image_id for s in samples], scales, [s.size for s in samples], skipped, errors, valid
        )


def stack_targets(targets: list[Tensor]) -> Tensor:
    """[B, M, 5] from per-image [M_i, 5]; missing rows get label LABEL_PAD."""
    out = torch.zeros(len(targets), max((t.shape[0] for t in targets), default=0), 5)
    out[..., 4] = LABEL_PAD
    for i, t in enumerate(targets):
        out[i, : t.shape[0]] = t
    return out
