"""COCO-format annotations (validated), the dataset and the batch collate."""
from __future__ import annotations

import json
import math
import os
import random
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..config import LABEL_CROWD, LABEL_PAD
from ..errors import UserError
from . import transforms as T

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Boxes may poke out of the image by rounding in the annotation tool, not more.
EDGE_TOLERANCE = 1.0


@dataclass
class ImageRecord:
    id: int
    file_name: str
    width: int | None = None
    height: int | None = None
    boxes: list[list[float]] = field(default_factory=list)  # x1, y1, x2, y2
    labels: list[int] = field(default_factory=list)  # contiguous, or LABEL_CROWD


def _require(record, keys, where: str) -> None:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected an object, got {type(record).__name__}")
    for k in keys:
        if k not in record:
            raise UserError(f"{where}: missing required key {k!r}")


class CocoAnnotations:
    """A validated COCO JSON: images, their boxes and the category-id map.

    ``category_ids[i]`` is the original id of contiguous class i (sorted ids).
    """

    def __init__(self, path: str, category_ids: list[int] | None = None):
        self.path = path
        name = os.path.basename(path)
        try:
            with open(path) as f:
                doc = json.load(f)
        except FileNotFoundError:
            raise UserError(f"{path}: annotation file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: cannot read annotation file ({e})") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        _require(doc, ["images", "annotations", "categories"], name)

        ids = []
        for i, c in enumerate(doc["categories"]):
            _require(c, ["id"], f"{name}: categories[{i}]")
            ids.append(int(c["id"]))
        if len(set(ids)) != len(ids):
            raise UserError(f"{name}: categories: duplicate category ids")
        if category_ids is None:
            category_ids = sorted(ids)
        self.category_ids = list(category_ids)
        to_label = {cid: i for i, cid in enumerate(self.category_ids)}

        self.images: list[ImageRecord] = []
        by_id: dict[int, ImageRecord] = {}
        for i, im in enumerate(doc["images"]):
            _require(im, ["id", "file_name"], f"{name}: images[{i}]")
            if im["id"] in by_id:
                raise UserError(f"{name}: images[{i}]: duplicate image id {im['id']}")
            rec = ImageRecord(int(im["id"]), str(im["file_name"]), im.get("width"), im.get("height"))
            by_id[rec.id] = rec
            self.images.append(rec)

        for i, a in enumerate(doc["annotations"]):
            where = f"{name}: annotations[{i}] (id {a.get('id')})" if isinstance(a, dict) else f"{name}: annotations[{i}]"
            _require(a, ["id", "image_id", "category_id", "bbox"], where)
            rec = by_id.get(a["image_id"])
            if rec is None:
                raise UserError(f"{where}: unknown image_id {a['image_id']}")
            if a["category_id"] not in to_label:
                raise UserError(f"{where}: unknown category_id {a['category_id']}")
            bbox = a["bbox"]
            if (not isinstance(bbox, list) or len(bbox) != 4
                    or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
                raise UserError(f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
            x, y, w, h = (float(v) for v in bbox)
            if w <= 0 or h <= 0:
                raise UserError(f"{where}: bbox {bbox} has width or height <= 0")
            if rec.width is not None and rec.height is not None and (
                    x < -EDGE_TOLERANCE or y < -EDGE_TOLERANCE
                    or x + w > rec.width + EDGE_TOLERANCE or y + h > rec.height + EDGE_TOLERANCE):
                raise UserError(f"{where}: bbox {bbox} lies outside image {rec.id} "
                                f"({rec.width}x{rec.height}, {rec.file_name})")
            rec.boxes.append([x, y, x + w, y + h])
            rec.labels.append(LABEL_CROWD if a.get("iscrowd", 0) else to_label[a["category_id"]])

    @property
    def classes(self) -> int:
        return len(self.category_ids)


@dataclass
class Sample:
    image: Tensor  # uint8 [3, h, w], resized
    targets: Tensor  # [M, 5] x1 y1 x2 y2 label, resized coordinates
    image_id: int
    scale: tuple[float, float]  # resized / original, per axis (x, y)
    size: tuple[int, int]  # original (height, width)


class CorruptImage(Exception):
    pass


def read_image(path: str) -> Tensor:
    """Decode a file to uint8 RGB [3, H, W]; CorruptImage if it cannot be read."""
    import numpy as np
    from PIL import Image

    if not os.path.isfile(path):
        raise CorruptImage(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for bad or truncated files
        raise CorruptImage(f"{path}: cannot decode image ({str(e).splitlines()[0]})") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


class DetectionDataset(Dataset):
    """Images (with their annotations when given), resized and augmented.

    Training: scale jitter + flip + optional augmentations; a corrupt image is
    returned as None (collate drops it, the loop warns and counts). Inference:
    a missing or corrupt image is a UserError naming it.

    The random draws of sample `index` come from a generator seeded with
    (seed, epoch, index), so they depend neither on which loader worker reads
    it nor on where a run was interrupted and resumed: set `epoch` before
    each epoch's loader is created.
    """

    def __init__(self, images_dir: str, annotations: CocoAnnotations | None, resize: int, max_size: int,
                 training: bool = False, jitter: tuple[int, int] | None = None,
                 augment: T.Augment | None = None, seed: int = 0):
        self.images_dir = images_dir
        self.seed, self.epoch = seed, 0
        self.annotations = annotations
        self.resize, self.max_size = resize, max_size
        self.training = training
        self.jitter = jitter
        self.augment = augment or T.Augment()
        if annotations is not None:
            self.records = annotations.images
        else:
            if not os.path.isdir(images_dir):
                raise UserError(f"{images_dir}: image folder not found")
            files = sorted(p for p in os.listdir(images_dir) if p.lower().endswith(IMAGE_SUFFIXES))
            if not files:
                raise UserError(f"{images_dir}: no image files ({', '.join(IMAGE_SUFFIXES)})")
            self.records = [ImageRecord(i + 1, f) for i, f in enumerate(files)]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample | str | None:
        rec = self.records[index]
        path = os.path.join(self.images_dir, rec.file_name)
        try:
            image = read_image(path)
        except CorruptImage as e:
            if self.training:
                warnings.warn(f"skipping {e}", stacklevel=1)
                return None
            # Raised by the caller: an exception in a loader worker would
            # reach the user wrapped in the worker's traceback.
            return f"{e} (image id {rec.id})"
        height, width = image.shape[-2:]
        targets = self.targets(rec)
        rng = self.rng(index)
        short = rng.randint(*self.jitter) if self.training and self.jitter is not None else self.resize
        if self.training:
            objects = targets[targets[:, 4] >= 0, :4]
            g = self.augment.geometry(rng, short, objects, int(height), int(width))
        else:
            g = T.Geometry(short)
        targets, _, scale = T.transform_targets(targets, g, int(height), int(width), self.max_size)
        image = T.transform_image(image, g, self.max_size)
        if self.training:
            image = self.augment.colour(image, rng)
        return Sample(image, targets, rec.id, scale, (int(height), int(width)))

    @staticmethod
    def targets(rec: ImageRecord) -> Tensor:
        """[M, 5]: x1 y1 x2 y2 in original pixels, contiguous label (or LABEL_CROWD)."""
        boxes = torch.tensor(rec.boxes, dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor(rec.labels, dtype=torch.float32).reshape(-1, 1)
        return torch.cat([boxes, labels], dim=1)

    def rng(self, index: int) -> random.Random:
        return random.Random((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index)


@dataclass
class Batch:
    images: Tensor  # uint8 [B, 3, H, W], padded to the multiple with the mean pixel
    targets: Tensor  # [B, M, 5], rows padded with label LABEL_PAD
    image_ids: list[int]
    scales: Tensor  # [B, 2]
    sizes: list[tuple[int, int]]
    skipped: int = 0  # corrupt images dropped from this batch (training)
    errors: list[str] = field(default_factory=list)  # unreadable images (inference)

    def pin_memory(self):
        self.images = self.images.pin_memory()
        self.targets = self.targets.pin_memory()
        return self


class Collate:
    """Pads images to a common size (a multiple of `multiple`) and stacks targets."""

    def __init__(self, multiple: int, fill: tuple[int, int, int]):
        self.multiple = multiple
        self.fill = torch.tensor(fill, dtype=torch.uint8).view(3, 1, 1)

    def __call__(self, samples: list[Sample | str | None]) -> Batch:
        skipped = sum(s is None for s in samples)
        errors = [s for s in samples if isinstance(s, str)]
        samples = [s for s in samples if isinstance(s, Sample)]
        if not samples:
            return Batch(torch.zeros(0, 3, self.multiple, self.multiple, dtype=torch.uint8),
                         torch.zeros(0, 0, 5), [], torch.zeros(0, 2), [], skipped, errors)
        h = max(s.image.shape[1] for s in samples)
        w = max(s.image.shape[2] for s in samples)
        h = -(-h // self.multiple) * self.multiple
        w = -(-w // self.multiple) * self.multiple
        images = self.fill.expand(len(samples), 3, h, w).clone()
        for i, s in enumerate(samples):
            images[i, :, : s.image.shape[1], : s.image.shape[2]] = s.image
        targets = stack_targets([s.targets for s in samples])
        scales = torch.tensor([s.scale for s in samples], dtype=torch.float32)
        return Batch(images, targets, [s.image_id for s in samples], scales, [s.size for s in samples], skipped,
                     errors)


def stack_targets(targets: list[Tensor]) -> Tensor:
    """[B, M, 5] from per-image [M_i, 5]; missing rows get label LABEL_PAD."""
    out = torch.zeros(len(targets), max((t.shape[0] for t in targets), default=0), 5)
    out[..., 4] = LABEL_PAD
    for i, t in enumerate(targets):
        out[i, : t.shape[0]] = t
    return out


def mean_pixel(mean: list[float]) -> tuple[int, int, int]:
    """Padding value: the mean colour, which normalises to ~0 inside the model."""
    return tuple(int(round(m * 255)) for m in mean)  # type: ignore[return-value]

