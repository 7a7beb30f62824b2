"""The embedded demo dataset: generated, seeded, COCO format.

Small JPEGs of coloured shapes on textured backgrounds, with exact boxes:
three classes with non-contiguous category ids (so the id mapping is
exercised), varied sizes, overlaps, a few empty images, train and val splits.
Generated once into a cache folder; no network is ever needed.

The rotated demo (`rotated=True`, its own cache folder) has the same sizes
and counts, with each object turned by an angle in (−π, π] and annotated as
its tight rotated rectangle: a 5-value bbox [x, y, w, h, θ] and that
rectangle's corners as the segmentation (docs/rotated.md).
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

VERSION = 2
SIZE = 128
CATEGORIES = [{"id": 1, "name": "square"}, {"id": 3, "name": "disc"}, {"id": 7, "name": "triangle"}]
SPLITS = {"train": (600, 1), "val": (100, 2)}  # images, seed
ROTATED_VERSION = 1
# No circle nor square: every turn of those has the same tight rectangle, so
# their angle could not be learnt. Each class has an aspect ratio away from 1.
ROTATED_CATEGORIES = [{"id": 1, "name": "rectangle"}, {"id": 3, "name": "ellipse"}, {"id": 7, "name": "triangle"}]


def cache_dir(rotated: bool = False) -> Path:
    root = os.environ.get("RETINANET_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "retinanet")
    return Path(root) / (f"demo-rotated-v{ROTATED_VERSION}" if rotated else f"demo-v{VERSION}")


def _grey(rng: random.Random, low: int, high: int) -> np.ndarray:
    level = rng.randrange(low, high)
    return np.array([level + rng.randrange(-20, 21) for _ in range(3)], dtype=np.float32)


def _background(rng: random.Random) -> Image.Image:
    # Low-saturation backgrounds, so that the demo learns in minutes on a CPU.
    a, b = _grey(rng, 40, 215), _grey(rng, 40, 215)
    t = np.linspace(0, 1, SIZE, dtype=np.float32)[None, :, None]
    if rng.random() < 0.5:
        t = t.transpose(1, 0, 2)
    img = a * (1 - t) + b * t
    nprng = np.random.default_rng(rng.randrange(2**32))
    img = img + nprng.normal(0, 12, size=(SIZE, SIZE, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _overlap(a, b) -> float:
    """Intersection over the smaller box's area."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return ix * iy / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


def _draw_image(rng: random.Random):
    img = _background(rng)
    draw = ImageDraw.Draw(img)
    objects = []
    count = 0 if rng.random() < 0.08 else rng.randint(1, 4)
    for _ in range(count * 4):  # placement attempts
        if len(objects) == count:
            break
        cat = rng.randrange(len(CATEGORIES))
        w = rng.randint(24, 72)
        h = w if cat == 1 else int(w * rng.uniform(0.6, 1.6))
        h = max(20, min(h, SIZE - 2))
        x1 = rng.randint(0, SIZE - w)
        y1 = rng.randint(0, SIZE - h)
        box = (x1, y1, x1 + w, y1 + h)
        # Overlaps are welcome, but each object must stay clearly visible.
        if any(_overlap(box, o[0]) > 0.35 for o in objects):
            continue
        objects.append((box, cat))
    # Large shapes first, so a small one is never hidden under a large one.
    objects.sort(key=lambda o: -(o[0][2] - o[0][0]) * (o[0][3] - o[0][1]))
    for (x1, y1, x2, y2), cat in objects:
        # Each class leans to one hue (red, green, blue), with wide variation.
        colour = [rng.randrange(0, 110) for _ in range(3)]
        colour[cat] = rng.randrange(170, 256)
        colour = tuple(colour)
        # PIL fills inclusive pixel ranges; -1 makes the drawn extent exactly the box.
        if cat == 0:
            draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=colour)
        elif cat == 1:
            draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=colour)
        else:
            apex = rng.randint(x1, x2 - 1)
            draw.polygon([(apex, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)], fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(0.6))
    return img, objects


def corners(cx: float, cy: float, w: float, h: float, theta: float) -> list[tuple[float, float]]:
    """The corners of docs/rotated.md: unrotated top-left, top-right, bottom-right, bottom-left."""
    cos, sin = math.cos(theta), math.sin(theta)
    return [
        (cx + dx * cos + dy * sin, cy - dx * sin + dy * cos)
        for dx, dy in ((-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2))
    ]


def object_mask(cx: float, cy: float, w: float, h: float, theta: float, cat: int, apex: float) -> np.ndarray:
    """bool [SIZE, SIZE]: the pixels whose centre lies in the object (shape `cat`)
    drawn in the rectangle (cx, cy, w, h) turned by `theta`. The triangle's apex
    is on the rectangle's top edge at `apex` (-0.5 .. 0.5 of w from the middle),
    its base the bottom edge: every shape touches all four sides, so the
    rectangle is its tight rotated box."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5
    cos, sin = math.cos(theta), math.sin(theta)
    # Offsets in the rectangle's own frame: the inverse of the corner formula.
    dx = (x - cx) * cos - (y - cy) * sin
    dy = (x - cx) * sin + (y - cy) * cos
    u, v = dx / (w / 2), dy / (h / 2)  # -1 .. 1 inside the rectangle
    if cat == 0:
        return (np.abs(u) <= 1) & (np.abs(v) <= 1)
    if cat == 1:
        return u * u + v * v <= 1
    t = (v + 1) / 2  # 0 at the apex's edge, 1 at the base
    a = 2 * apex
    return (t >= 0) & (t <= 1) & (u >= a + t * (-1 - a)) & (u <= a + t * (1 - a))


def _rotated_objects(rng: random.Random) -> list[tuple[tuple[float, ...], int, np.ndarray]]:
    """The objects of one rotated-demo image: ((cx, cy, w, h, θ), class, mask)."""
    objects: list[tuple[tuple[float, ...], int, np.ndarray]] = []
    count = 0 if rng.random() < 0.08 else rng.randint(1, 4)
    for _ in range(count * 4):  # placement attempts
        if len(objects) == count:
            break
        cat = rng.randrange(len(ROTATED_CATEGORIES))
        w = rng.randint(24, 72)
        h = min(100, max(14, round(w * rng.choice((rng.uniform(0.4, 0.7), rng.uniform(1.45, 2.2))))))
        theta = math.pi - 2 * math.pi * rng.random()  # (−π, π]
        xs, ys = zip(*corners(0, 0, w, h, theta))
        # Whole corners inside the image; skip a turn that cannot fit.
        if max(xs) - min(xs) > SIZE - 1 or max(ys) - min(ys) > SIZE - 1:
            continue
        cx = rng.uniform(-min(xs), SIZE - max(xs))
        cy = rng.uniform(-min(ys), SIZE - max(ys))
        mask = object_mask(cx, cy, w, h, theta, cat, rng.uniform(-0.5, 0.5))
        area = int(mask.sum())
        # Overlaps are welcome, but each object must stay clearly visible.
        if area == 0 or any((mask & m).sum() > 0.3 * min(area, int(m.sum())) for _, _, m in objects):
            continue
        objects.append(((cx, cy, float(w), float(h), theta), cat, mask))
    # Large shapes first, so a small one is never hidden under a large one.
    objects.sort(key=lambda o: -o[0][2] * o[0][3])
    return objects


def _draw_rotated_image(rng: random.Random):
    """The image and its objects ((cx, cy, w, h, θ), class, mask), in drawing order."""
    objects = _rotated_objects(rng)
    pixels = np.array(_background(rng))
    for _, cat, mask in objects:
        colour = [rng.randrange(0, 110) for _ in range(3)]
        colour[cat] = rng.randrange(170, 256)
        pixels[mask] = colour
    img = Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(0.6))
    return img, objects


def _annotation(index: int, image_id: int, box, cat: int, rotated: bool) -> dict:
    if not rotated:
        x1, y1, x2, y2 = box
        w, h = x2 - x1, y2 - y1
        bbox, extra = [x1, y1, w, h], {}
    else:
        cx, cy, w, h, theta = box
        bbox = [cx - w / 2, cy - h / 2, w, h, theta]
        extra = {"segmentation": [[v for corner in corners(cx, cy, w, h, theta) for v in corner]]}
    categories = ROTATED_CATEGORIES if rotated else CATEGORIES
    return {
        "id": index,
        "image_id": image_id,
        "category_id": categories[cat]["id"],
        "bbox": bbox,
        **extra,
        "area": w * h,
        "iscrowd": 0,
    }


def _write_split(root: Path, split: str, n: int, seed: int, rotated: bool = False) -> None:
    rng = random.Random(seed)
    img_dir = root / split
    img_dir.mkdir(parents=True, exist_ok=True)
    images: list[dict] = []
    annotations: list[dict] = []
    for i in range(n):
        img, objects = _draw_rotated_image(rng) if rotated else _draw_image(rng)
        name = f"{split}_{i:05d}.jpg"
        img.save(img_dir / name, quality=92)
        images.append({"id": i + 1, "file_name": name, "width": SIZE, "height": SIZE})
        for box, cat, *_ in objects:
            annotations.append(_annotation(len(annotations) + 1, i + 1, box, cat, rotated))
    doc = {"images": images, "annotations": annotations, "categories": ROTATED_CATEGORIES if rotated else CATEGORIES}
    tmp = root / f"{split}.json.tmp"
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, root / f"{split}.json")


def ensure(root: Path | None = None, rotated: bool = False) -> Path:
    """Generate the dataset (the rotated one with `rotated`) if needed; return its folder.

    Layout: train/, val/ image folders and train.json, val.json. The JSON is
    written last, so a folder with both JSON files is complete.
    """
    root = Path(root) if root is not None else cache_dir(rotated)
    for split, (n, seed) in SPLITS.items():
        if not (root / f"{split}.json").exists():
            _write_split(root, split, n, seed, rotated)
    return root


def paths(root: Path | None = None, rotated: bool = False) -> dict[str, str]:
    root = ensure(root, rotated)
    return {
        "images": str(root / "train"),
        "annotations": str(root / "train.json"),
        "val_images": str(root / "val"),
        "val_annotations": str(root / "val.json"),
    }
