"""The embedded demo dataset: generated, seeded, COCO format.

Small JPEGs of coloured shapes on textured backgrounds, with exact boxes:
three classes with non-contiguous category ids (so the id mapping is
exercised), varied sizes, overlaps, a few empty images, train and val splits.
Generated once into a cache folder; no network is ever needed.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

VERSION = 2
SIZE = 128
CATEGORIES = [{"id": 1, "name": "square"}, {"id": 3, "name": "disc"}, {"id": 7, "name": "triangle"}]
SPLITS = {"train": (600, 1), "val": (100, 2)}  # images, seed


def cache_dir() -> Path:
    root = os.environ.get("RETINANET_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "retinanet")
    return Path(root) / f"demo-v{VERSION}"


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


def _write_split(root: Path, split: str, n: int, seed: int) -> None:
    rng = random.Random(seed)
    img_dir = root / split
    img_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        img, objects = _draw_image(rng)
        name = f"{split}_{i:05d}.jpg"
        img.save(img_dir / name, quality=92)
        images.append({"id": i + 1, "file_name": name, "width": SIZE, "height": SIZE})
        for (x1, y1, x2, y2), cat in objects:
            w, h = x2 - x1, y2 - y1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": CATEGORIES[cat]["id"],
                    "bbox": [x1, y1, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    doc = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    tmp = root / f"{split}.json.tmp"
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, root / f"{split}.json")


def ensure(root: Path | None = None) -> Path:
    """Generate the dataset if needed; return its folder.

    Layout: train/, val/ image folders and train.json, val.json. The JSON is
    written last, so a folder with both JSON files is complete.
    """
    root = Path(root) if root is not None else cache_dir()
    for split, (n, seed) in SPLITS.items():
        if not (root / f"{split}.json").exists():
            _write_split(root, split, n, seed)
    return root


def paths(root: Path | None = None) -> dict[str, str]:
    root = ensure(root)
    return {
        "images": str(root / "train"),
        "annotations": str(root / "train.json"),
        "val_images": str(root / "val"),
        "val_annotations": str(root / "val.json"),
    }
