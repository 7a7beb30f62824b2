"""Drawing detections: boxes, class names and scores on an image (PIL's ImageDraw).

`layout` decides where everything goes and `render` paints it, so a test (or a
caller placing its own labels) can know exactly which pixels a drawing touches:
the outline of each box (inside the box's corners) and each label's rectangle.
Rotated boxes (cx, cy, w, h, θ; docs/rotated.md) are drawn as their polygon, the
outline again inside its corners.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from .errors import UserError
from .ops.rotated import corners

DRAW_THRESHOLD = 0.3  # detections below this score are not drawn (infer --draw-threshold)

# Well-separated colours; a category keeps its colour across images and frames.
PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
    (128, 128, 128),
)


@dataclass(frozen=True)
class Mark:
    """One drawn detection, in integer pixels, ends inclusive."""

    box: tuple[int, int, int, int]  # outline corners x1 y1 x2 y2, clipped to the image
    label: tuple[int, int, int, int]  # the label's filled rectangle x1 y1 x2 y2
    text: str
    colour: tuple[int, int, int]
    width: int  # outline width, drawn inwards from `box` (or from `polygon`)
    # A rotated box's 4 corners (docs/rotated.md order), rounded, not clipped; `box` is
    # then their extent clipped to the image. None for an axis-aligned box.
    polygon: tuple[tuple[int, int], ...] | None = None


def colour_of(category_id: int) -> tuple[int, int, int]:
    return PALETTE[category_id % len(PALETTE)]


@lru_cache(maxsize=8)
def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _sizes(height: int, width: int) -> tuple[int, int]:
    """Outline width and font size for an image: readable on 320 px and on 4K alike."""
    side = min(height, width)
    return max(1, round(side / 300)), max(10, round(side / 40))


def layout(detections, height: int, width: int, threshold: float = DRAW_THRESHOLD) -> list[Mark]:
    """Where each detection scoring at least `threshold` is drawn on an image of that size.

    The label sits on the box's top edge (a rotated box's top-most corner), above it
    where there is room, else just inside; it is shifted left to stay inside the
    image. Boxes outside the image draw nothing."""
    line, size = _sizes(height, width)
    font = _font(size)
    names = getattr(detections, "names", None) or {}
    marks = []
    rotated = detections.boxes.shape[-1] == 5
    boxes = detections.boxes.float().cpu()
    # A rotated box goes through ops.rotated.corners, the one corner formula, so the
    # drawing turns the way matching and the output polygons do.
    rows = (corners(boxes) if rotated else boxes).tolist()
    for row, score, cat in zip(rows, detections.scores.tolist(), detections.category_ids.tolist()):
        if score < threshold:
            continue
        polygon = None
        if rotated:
            polygon = tuple((round(x), round(y)) for x, y in row)
            xs, ys = [x for x, _ in polygon], [y for _, y in polygon]
            row = [min(xs), min(ys), max(xs), max(ys)]
        x1, y1 = max(0, round(row[0])), max(0, round(row[1]))
        x2, y2 = min(width - 1, round(row[2])), min(height - 1, round(row[3]))
        if x2 < x1 or y2 < y1:
            continue
        anchor = (x1, y1)
        if polygon is not None:  # the top-most corner, the left one of a level pair
            top = min(polygon, key=lambda p: (p[1], p[0]))
            anchor = (min(max(0, top[0]), width - 1), max(0, top[1]))
        text = f"{names.get(cat, str(cat))} {score:.2f}"
        label = _label(font, text, line, anchor, height, width)
        marks.append(Mark((x1, y1, x2, y2), label, text, colour_of(cat), line, polygon))
    return marks


def _label(font, text: str, line: int, anchor: tuple[int, int], height: int, width: int) -> tuple[int, int, int, int]:
    """The label's rectangle for a box whose top edge starts at `anchor` (in the image)."""
    x, y = anchor
    left, top, right, bottom = font.getbbox(text)
    tw, th = right - left + 2 * line, bottom + line
    ty = y - th if y - th >= 0 else y
    tx = max(0, min(x, width - tw))
    return (tx, ty, min(width - 1, tx + tw - 1), min(height - 1, ty + th - 1))


def render(rgb: np.ndarray, marks: list[Mark]) -> np.ndarray:
    """The marks painted on a copy of an HxWx3 uint8 image."""
    from PIL import Image, ImageDraw

    image = Image.fromarray(rgb)
    pen = ImageDraw.Draw(image)
    for m in marks:
        if m.polygon is None:
            pen.rectangle(m.box, outline=m.colour, width=m.width)
        else:  # PIL draws a wide polygon outline inwards too, and drops what falls outside
            pen.polygon(m.polygon, outline=m.colour, width=m.width)
    _, size = _sizes(rgb.shape[0], rgb.shape[1])
    font = _font(size)
    for m in marks:  # labels over every outline, so none is hidden by a neighbour's box
        pen.rectangle(m.label, fill=m.colour)
        ink = (0, 0, 0) if sum(m.colour) > 380 else (255, 255, 255)
        pen.text((m.label[0] + m.width, m.label[1]), m.text, fill=ink, font=font)
    return np.asarray(image)


def draw(image, detections, threshold: float = DRAW_THRESHOLD):
    """`image` with `detections` drawn (boxes, class names where the model has them, scores).

    image: an HxWx3 uint8 array, a PIL image, a 3xHxW tensor (uint8, or floats 0..1) or
    a file path; the result is of the same kind (an array for a path)."""
    rgb = _as_rgb(image)
    out = render(rgb, layout(detections, rgb.shape[0], rgb.shape[1], threshold))
    if isinstance(image, Tensor):
        chw = torch.from_numpy(out.copy()).permute(2, 0, 1)
        return chw.to(image.device) if not image.is_floating_point() else chw.to(image.device, image.dtype) / 255
    if type(image).__module__.startswith("PIL."):
        from PIL import Image

        return Image.fromarray(out)
    return out


def _as_rgb(image) -> np.ndarray:
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise UserError(f"draw: image array must be HxWx3 uint8, got {image.shape} {image.dtype}")
        return image
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise UserError(f"draw: image tensor must be 3xHxW, got {tuple(image.shape)}")
        if image.is_floating_point():
            image = (image.clamp(0, 1) * 255).round()
        return image.to("cpu", torch.uint8).permute(1, 2, 0).contiguous().numpy()
    if isinstance(image, str):
        from .images import CorruptImage, read_image

        try:
            return read_image(image).permute(1, 2, 0).numpy()
        except CorruptImage as e:
            raise UserError(str(e)) from None
    if type(image).__module__.startswith("PIL."):
        return np.asarray(image.convert("RGB"))
    raise UserError(f"draw: cannot draw on {type(image).__name__}")
