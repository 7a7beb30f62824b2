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
    targets: Tensor  # [M, 5] x1 y1 x2 y2 label, or rotated [M, 6] cx cy w h θ label; resized coordinates
    image_id: int
    scale: tuple[float, float]  # resized / original, per axis (x, y)
    size: tuple[int, int]  # original (height, width)


@dataclass
class Batch:
    images: Tensor  # uint8 [B, 3, H, W], padded to the multiple with the mean pixel
    targets: Tensor  # [B, M, 5] (rotated: [B, M, 6]), rows padded with label LABEL_PAD
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
    """Pads images to a common size (a multiple of `multiple`) and stacks targets.

    `columns`: the width of a target row (5, or 6 for rotated boxes), for the
    targets of a batch left without samples.
    """

    def __init__(self, multiple: int, fill: tuple[int, int, int], columns: int = 5):
        self.multiple = multiple
        self.fill = fill
        self.columns = columns

    def __call__(self, samples: list[Sample | str | None]) -> Batch:
        skipped = sum(s is None for s in samples)
        errors = [s for s in samples if isinstance(s, str)]
        samples = [s for s in samples if isinstance(s, Sample)]
        if not samples:
            return Batch(
                torch.zeros(0, 3, self.multiple, self.multiple, dtype=torch.uint8),
                torch.zeros(0, 0, self.columns),
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


def stack_targets(targets: list[Tensor], columns: int | None = None) -> Tensor:
    """[B, M, C] from per-image [M_i, C] (C = 5, or 6 for rotated boxes; by
    default the first's, 5 for none); missing rows get label LABEL_PAD, in the
    last column."""
    columns = columns or (targets[0].shape[1] if targets else 5)
    out = torch.zeros(len(targets), max((t.shape[0] for t in targets), default=0), columns)
    out[..., -1] = LABEL_PAD
    for i, t in enumerate(targets):
        out[i, : t.shape[0]] = t
    return out
