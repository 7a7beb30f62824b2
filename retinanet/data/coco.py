"""COCO-format annotations (validated) and the detection dataset."""

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

from ..config import LABEL_CROWD
from ..errors import UserError
from ..images import CorruptImage, list_images, read_image
from . import transforms as T
from .batch import Sample

# Boxes may poke out of the image by rounding in the annotation tool, not more.
EDGE_TOLERANCE = 1.0


@dataclass
class ImageRecord:
    id: int
    file_name: str
    width: int | None = None
    height: int | None = None
    boxes: list[list[float]] = field(default_factory=list)  # x1, y1, x2, y2 (of the unrotated rectangle)
    # Each box's θ: radians, anti-clockwise on screen, about the box's centre
    # (docs/rotated.md); 0 for a 4-value bbox.
    angles: list[float] = field(default_factory=list)
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


def _extent(x1: float, y1: float, x2: float, y2: float, theta: float) -> tuple[float, float, float, float]:
    """The axis-aligned extent of the rectangle turned by `theta` about its centre."""
    if theta == 0:  # exactly the rectangle, free of the trigonometry's rounding
        return x1, y1, x2, y2
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    cos, sin = abs(math.cos(theta)), abs(math.sin(theta))
    half_w = ((x2 - x1) * cos + (y2 - y1) * sin) / 2
    half_h = ((x2 - x1) * sin + (y2 - y1) * cos) / 2
    return cx - half_w, cy - half_h, cx + half_w, cy + half_h


def _finite_numbers(values) -> bool:
    return isinstance(values, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    )


def _bbox(bbox, where: str) -> tuple[float, float, float, float, float]:
    """x, y, w, h, θ of a validated 4- or 5-value bbox (θ 0 for 4 values)."""
    if isinstance(bbox, list) and len(bbox) == 5:
        if not _finite_numbers(bbox[:4]):
            raise UserError(f"{where}: bbox must be 4 finite numbers [x, y, w, h] or 5 [x, y, w, h, θ], got {bbox!r}")
        theta = bbox[4]
        if not (isinstance(theta, (int, float)) and not isinstance(theta, bool) and -math.pi < theta <= math.pi):
            # NaN fails the comparison too. An angle out of range is refused, not
            # wrapped: it is more likely degrees or another convention than a turn.
            raise UserError(f"{where}: bbox {bbox!r} has θ {theta!r}; θ must be radians within (−π, π]")
    elif not _finite_numbers(bbox) or len(bbox) != 4:
        raise UserError(f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox[:4])
    if w <= 0 or h <= 0:
        raise UserError(f"{where}: bbox {bbox} has width or height <= 0")
    return x, y, w, h, float(bbox[4]) if len(bbox) == 5 else 0.0


def angles(rec: ImageRecord) -> list[float]:
    """Each box's θ; 0 for boxes of a record built without angles."""
    return rec.angles + [0.0] * (len(rec.boxes) - len(rec.angles))


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
    ``first_rotated``: where the first 5-value (rotated) bbox is, as the start
    of a message ("file: annotations[i] (id n)"); None when every bbox has 4
    values.
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
        # Names are what drawn detections show; a category without one shows its id.
        named = {c["id"]: str(c.get("name", c["id"])) for c in doc["categories"]}
        self.category_names = [named.get(i, str(i)) for i in self.category_ids]
        self.images: list[ImageRecord] = []
        self.first_rotated: str | None = None
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
            x, y, w, h, theta = _bbox(a["bbox"], where)
            if len(a["bbox"]) == 5 and self.first_rotated is None:
                self.first_rotated = where
            bbox = a["bbox"]
            if rec.width is not None and rec.height is not None:
                if _outside(*_extent(x, y, x + w, y + h, theta), rec.width, rec.height):
                    raise UserError(
                        f"{where}: bbox {bbox} lies outside image {rec.id} ({rec.width}x{rec.height}, {rec.file_name})"
                    )
            rec.boxes.append([x, y, x + w, y + h])
            rec.angles.append(theta)
            rec.labels.append(LABEL_CROWD if a.get("iscrowd", 0) else to_label[a["category_id"]])
            rec.annotation_index.append(i)
            rec.annotation_ids.append(a["id"])

    @property
    def classes(self) -> int:
        return len(self.category_ids)

    @property
    def rotated(self) -> bool:
        """Whether any bbox has 5 values [x, y, w, h, θ]."""
        return self.first_rotated is not None


def check_box_form(coco: CocoAnnotations, rotated: bool) -> None:
    """UserError when `coco` holds rotated boxes and the model is not a rotated
    one: trained axis-aligned, their angles would silently be dropped. A
    rotated model takes 4-value boxes (θ = 0)."""
    if coco.first_rotated is not None and not rotated:
        raise UserError(
            f"{coco.first_rotated}: bbox has 5 values [x, y, w, h, θ]: a rotated-box annotation; "
            "train with --rotated-bbox"
        )


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
    for k, ((x1, y1, x2, y2), theta) in enumerate(zip(rec.boxes, angles(rec))):
        if _outside(*_extent(x1, y1, x2, y2, theta), width, height):
            bbox = [round(v, 2) for v in (x1, y1, x2 - x1, y2 - y1)] + ([round(theta, 4)] if theta else [])
            return (
                f"{rec.source}: annotations[{rec.annotation_index[k]}] (id {rec.annotation_ids[k]}): bbox "
                f"{bbox} lies outside image {rec.id} ({width}x{height} as decoded from {path})"
            )
    return None


def folder_records(images_dir: str) -> list[ImageRecord]:
    """The images of a folder inferred without annotations: ids 1, 2, ... in name order."""
    return [ImageRecord(i + 1, f) for i, f in enumerate(list_images(images_dir))]


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

    `rotated`: targets are rotated boxes [M, 6] (cx, cy, w, h, θ, label)
    instead of [M, 5] (x1, y1, x2, y2, label); the crop augmentation cannot
    take them (ValueError).
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
        rotated: bool = False,
    ):
        self.images_dir = images_dir
        self.seed, self.epoch = seed, 0
        self.annotations = annotations
        self.resize, self.max_size = resize, max_size
        self.training = training
        self.jitter = jitter
        self.augment = augment or T.Augment()
        self.rotated = rotated
        if rotated and training and self.augment.crop:
            # Here rather than in a loader worker, where it would come wrapped in its traceback.
            raise ValueError("the random crop augmentation does not support rotated boxes")
        self.fill = fill  # behind transparent pixels; None: the default mean pixel
        if annotations is not None:
            self.records = annotations.images
        else:
            self.records = folder_records(images_dir)

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
        targets = self.targets(rec, self.rotated)
        rng = self.rng(index)
        short = rng.randint(*self.jitter) if self.training and self.jitter is not None else self.resize
        if self.training:
            objects = targets[targets[:, -1] >= 0]
            objects = T.rotated_extents(objects) if self.rotated else objects[:, :4]
            g = self.augment.geometry(rng, short, objects, height, width)
        else:
            g = T.Geometry(short)
        targets, _, scale = T.transform_targets(targets, g, height, width, self.max_size)
        image = T.transform_image(image, g, self.max_size)
        if self.training:
            image = self.augment.colour(image, rng)
        return Sample(image, targets, rec.id, scale, (height, width))

    @staticmethod
    def targets(rec: ImageRecord, rotated: bool = False) -> Tensor:
        """[M, 5]: x1 y1 x2 y2 in original pixels, contiguous label (or LABEL_CROWD).

        Rotated: [M, 6], cx cy w h θ in original pixels, the label.
        """
        labels = torch.tensor(rec.labels, dtype=torch.float32).reshape(-1, 1)
        if not rotated:
            boxes = torch.tensor(rec.boxes, dtype=torch.float32).reshape(-1, 4)
            return torch.cat([boxes, labels], dim=1)
        # In float64 from the records: a centre from float32 corners would round twice.
        xyxy = torch.tensor(rec.boxes, dtype=torch.float64).reshape(-1, 4)
        theta = torch.tensor(angles(rec), dtype=torch.float64).reshape(-1, 1)
        boxes = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2], theta], dim=1).float()
        return torch.cat([boxes, labels], dim=1)

    def rng(self, index: int) -> random.Random:
        return random.Random((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index)
