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

from ..config import LABEL_CROWD, LABEL_PAD, ModelConfig
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
    # Where each box came from, for messages about checks that need the
    # decoded image: the annotation file's name, annotations[i] and their ids.
    source: str = ""
    annotation_index: list[int] = field(default_factory=list)
    annotation_ids: list = field(default_factory=list)


def _require(record, keys, where: str) -> None:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected an object, got {type(record).__name__}")
    for k in keys:
        if k not in record:
            raise UserError(f"{where}: missing required key {k!r}")


def _id(value, where: str, key: str) -> int:
    """A JSON integer. Strings and floats are refused, not converted: "5" next
    to 5 would otherwise be two images, or one behind the duplicate check."""
    if type(value) is not int:  # bool is an int subclass, and no id
        raise UserError(f"{where}: {key} must be an integer, got {json.dumps(value)}")
    return value


def _size(record: dict, key: str, where: str) -> int | None:
    """An optional image width or height: a positive whole number (640.0 is 640)."""
    value = record.get(key)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value != int(value)
        or value <= 0
    ):
        raise UserError(f"{where}: {key} must be a positive integer, got {json.dumps(value)}")
    return int(value)


def _outside(x1: float, y1: float, x2: float, y2: float, width: int, height: int) -> bool:
    return x1 < -EDGE_TOLERANCE or y1 < -EDGE_TOLERANCE or x2 > width + EDGE_TOLERANCE or y2 > height + EDGE_TOLERANCE


def _load_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: annotation file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read annotation file ({e})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


class CocoAnnotations:
    """A validated COCO JSON: images, their boxes and the category-id map.

    ``category_ids[i]`` is the original id of contiguous class i (sorted ids).
    """

    def __init__(self, path: str, category_ids: list[int] | None = None):
        self.path = path
        self.name = name = os.path.basename(path)
        doc = _load_json(path)
        _require(doc, ["images", "annotations", "categories"], name)
        for key in ("images", "annotations", "categories"):
            if not isinstance(doc[key], list):
                raise UserError(f"{name}: {key} must be a list, got {type(doc[key]).__name__}")
        ids = self._categories(doc["categories"])
        self.category_ids = list(sorted(ids) if category_ids is None else category_ids)
        self.images: list[ImageRecord] = []
        by_id: dict[int, ImageRecord] = {}
        for i, im in enumerate(doc["images"]):
            where = f"{name}: images[{i}]"
            _require(im, ["id", "file_name"], where)
            image_id = _id(im["id"], where, "id")
            if image_id in by_id:
                raise UserError(f"{where}: duplicate image id {image_id}")
            rec = ImageRecord(
                image_id, str(im["file_name"]), _size(im, "width", where), _size(im, "height", where), source=name
            )
            by_id[rec.id] = rec
            self.images.append(rec)
        self._annotations(doc["annotations"], by_id)

    def _categories(self, categories: list) -> list[int]:
        if not categories:
            raise UserError(f"{self.name}: categories is empty; a detector needs at least one category")
        ids = []
        for i, c in enumerate(categories):
            where = f"{self.name}: categories[{i}]"
            _require(c, ["id"], where)
            ids.append(_id(c["id"], where, "id"))
        if len(set(ids)) != len(ids):
            raise UserError(f"{self.name}: categories: duplicate category ids")
        return ids

    def _annotations(self, annotations: list, by_id: dict[int, ImageRecord]) -> None:
        to_label = {cid: i for i, cid in enumerate(self.category_ids)}
        for i, a in enumerate(annotations):
            where = (
                f"{self.name}: annotations[{i}] (id {a.get('id')})"
                if isinstance(a, dict)
                else f"{self.name}: annotations[{i}]"
            )
            _require(a, ["id", "image_id", "category_id", "bbox"], where)
            rec = by_id.get(_id(a["image_id"], where, "image_id"))
            if rec is None:
                raise UserError(f"{where}: unknown image_id {a['image_id']}")
            if _id(a["category_id"], where, "category_id") not in to_label:
                raise UserError(f"{where}: unknown category_id {a['category_id']}")
            bbox = a["bbox"]
            if (
                not isinstance(bbox, list)
                or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
            ):
                raise UserError(f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
            x, y, w, h = (float(v) for v in bbox)
            if w <= 0 or h <= 0:
                raise UserError(f"{where}: bbox {bbox} has width or height <= 0")
            if rec.width is not None and rec.height is not None and _outside(x, y, x + w, y + h, rec.width, rec.height):
                raise UserError(
                    f"{where}: bbox {bbox} lies outside image {rec.id} ({rec.width}x{rec.height}, {rec.file_name})"
                )
            rec.boxes.append([x, y, x + w, y + h])
            rec.labels.append(LABEL_CROWD if a.get("iscrowd", 0) else to_label[a["category_id"]])
            rec.annotation_index.append(i)
            rec.annotation_ids.append(a["id"])

    @property
    def classes(self) -> int:
        return len(self.category_ids)


def check_decoded_size(rec: ImageRecord, height: int, width: int, path: str) -> str | None:
    """The data error of `rec` against the size of its decoded, EXIF-oriented
    image, as a message; None when there is none.

    The annotation's width and height, where given, must be that size (its
    boxes were checked against them at load). Where they are not given, the
    boxes are checked here, against the image itself.
    """
    stated = [
        (k, v, actual)
        for k, v, actual in (("width", rec.width, width), ("height", rec.height, height))
        if v is not None
    ]
    if any(v != actual for _, v, actual in stated):
        return (
            f"{rec.source}: image {rec.id} ({path}) has {', '.join(f'{k} {v}' for k, v, _ in stated)} in the "
            f"annotations but decodes to {width}x{height} (width x height, after its EXIF orientation)"
        )
    if rec.width is not None and rec.height is not None:
        return None
    for k, (x1, y1, x2, y2) in enumerate(rec.boxes):
        if _outside(x1, y1, x2, y2, width, height):
            bbox = [round(v, 2) for v in (x1, y1, x2 - x1, y2 - y1)]
            return (
                f"{rec.source}: annotations[{rec.annotation_index[k]}] (id {rec.annotation_ids[k]}): bbox "
                f"{bbox} lies outside image {rec.id} ({width}x{height} as decoded from {path})"
            )
    return None


@dataclass
class Sample:
    image: Tensor  # uint8 [3, h, w], resized
    targets: Tensor  # [M, 5] x1 y1 x2 y2 label, resized coordinates
    image_id: int
    scale: tuple[float, float]  # resized / original, per axis (x, y)
    size: tuple[int, int]  # original (height, width)


class CorruptImage(Exception):
    pass


# PIL warns above Image.MAX_IMAGE_PIXELS (89 MP by default) and refuses twice
# that, a guard against decompression bombs. Aerial and satellite images of
# 100 MP and more are legitimate inputs, so the guard is raised to 16384 x 16384
# (0.8 GB decoded per image, per loader worker) and enforced at that value.
MAX_IMAGE_PIXELS = 16384 * 16384
EXIF_ORIENTATION = 0x0112  # the tag's number
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def read_image(path: str, background: tuple[int, int, int] | None = None) -> Tensor:
    """Decode a file to uint8 RGB [3, H, W] as image viewers show it; CorruptImage
    if it cannot be read.

    - The EXIF orientation is applied: annotation tools draw boxes on the
      displayed image, and the DALI pipelines decode the same way.
    - 16-bit greyscale is scaled to 8 bits (round(v / 257), what DALI's
      decoder gives) instead of PIL's conversion, which saturates at 255.
    - Transparent pixels are composited onto `background` (default: the mean
      pixel of the default normalisation), the colour the model's padding has,
      which it reads as "nothing there".
    """
    from PIL import Image, ImageOps

    if not os.path.isfile(path):
        raise CorruptImage(f"{path}: image file not found")
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            # PIL only warns between the limit and twice it: refuse there too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                ImageOps.exif_transpose(im, in_place=True)
                rgb = _to_rgb(im, background or DEFAULT_BACKGROUND)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise CorruptImage(
            f"{path}: image has more than {MAX_IMAGE_PIXELS} pixels, the limit against "
            "decompression bombs; downscale or tile it"
        ) from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for bad or truncated files
        raise CorruptImage(f"{path}: cannot decode image ({str(e).splitlines()[0]})") from None
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def exif_orientation(path: str) -> int:
    """The EXIF orientation of an image file: 1 (upright) when it has none.

    For decoders that ignore it (nvJPEG): a file with another value must go
    through read_image to be decoded as displayed."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return int(im.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - unreadable: read_image will name the problem
        return 1


def _to_rgb(im, background: tuple[int, int, int]):
    """HxWx3 uint8 array of an opened PIL image (see read_image)."""
    import numpy as np

    if im.mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(im)
        if grey.dtype.kind == "i":  # mode I: 32-bit signed, 16-bit values
            grey = grey.clip(0, 65535)
        grey = ((grey.astype(np.uint32) + 128) // 257).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if im.has_transparency_data:
        rgba = np.asarray(im.convert("RGBA")).astype(np.uint16)  # 255 * 255 + 127 fits
        alpha = rgba[..., 3:]
        fill = np.asarray(background, dtype=np.uint16)
        return ((rgba[..., :3] * alpha + fill * (255 - alpha) + 127) // 255).astype(np.uint8)
    return np.array(im.convert("RGB"))  # a writable copy: torch.from_numpy needs one


class DetectionDataset(Dataset):
    """Images (with their annotations when given), resized and augmented.

    Training: scale jitter + flip + optional augmentations; a corrupt image is
    returned as None (collate drops it, the loop warns and counts). Data
    errors (an image whose size disagrees with its annotations or boxes)
    and, in inference, a missing or corrupt image are returned as a message:
    raised in a loader worker they would reach the user wrapped in the
    worker's traceback, so the collate gathers them in `Batch.errors` for the
    loop to raise.

    The random draws of sample `index` come from a generator seeded with
    (seed, epoch, index), so they depend neither on which loader worker reads
    it nor on where a run was interrupted and resumed: set `epoch` before
    each epoch's loader is created.
    """

    def __init__(
        self,
        images_dir: str,
        annotations: CocoAnnotations | None,
        resize: int,
        max_size: int,
        training: bool = False,
        jitter: tuple[int, int] | None = None,
        augment: T.Augment | None = None,
        seed: int = 0,
        fill: tuple[int, int, int] | None = None,
    ):
        self.images_dir = images_dir
        self.seed, self.epoch = seed, 0
        self.annotations = annotations
        self.resize, self.max_size = resize, max_size
        self.training = training
        self.jitter = jitter
        self.augment = augment or T.Augment()
        self.fill = fill  # behind transparent pixels; None: the default mean pixel
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
            image = read_image(path, self.fill)
        except CorruptImage as e:
            if self.training:
                warnings.warn(f"skipping {e}", stacklevel=1)
                return None
            return f"{e} (image id {rec.id})"
        height, width = (int(v) for v in image.shape[-2:])
        error = check_decoded_size(rec, height, width, path)
        if error is not None:
            return error
        targets = self.targets(rec)
        rng = self.rng(index)
        short = rng.randint(*self.jitter) if self.training and self.jitter is not None else self.resize
        if self.training:
            objects = targets[targets[:, 4] >= 0, :4]
            g = self.augment.geometry(rng, short, objects, height, width)
        else:
            g = T.Geometry(short)
        targets, _, scale = T.transform_targets(targets, g, height, width, self.max_size)
        image = T.transform_image(image, g, self.max_size)
        if self.training:
            image = self.augment.colour(image, rng)
        return Sample(image, targets, rec.id, scale, (height, width))

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
    # int32 [B, 2]: each image's (h, w) in `images` before padding, which
    # GroupNorm-head models need to ignore the padding (model.RetinaNet).
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
        self.fill = torch.tensor(fill, dtype=torch.uint8).view(3, 1, 1)

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
        h = max(s.image.shape[1] for s in samples)
        w = max(s.image.shape[2] for s in samples)
        h = -(-h // self.multiple) * self.multiple
        w = -(-w // self.multiple) * self.multiple
        images = self.fill.expand(len(samples), 3, h, w).clone()
        for i, s in enumerate(samples):
            images[i, :, : s.image.shape[1], : s.image.shape[2]] = s.image
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


def mean_pixel(mean: list[float]) -> tuple[int, int, int]:
    """Padding value: the mean colour, which normalises to ~0 inside the model."""
    return tuple(int(round(m * 255)) for m in mean)  # type: ignore[return-value]


DEFAULT_BACKGROUND = mean_pixel(ModelConfig().mean)
