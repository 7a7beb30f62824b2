"""Image files: the folder listing, decoding as viewers show them, the mean pixel and batch padding.

Every reader of images (datasets, the Python API, INT8 calibration) and every
padder of batches (collate, runtimes, calibration) uses these, so an image
decodes, and padding looks, the same everywhere.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from .config import ModelConfig
from .errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_images(folder: str, what: str = "image folder") -> list[str]:
    """The image file names in `folder`, sorted; one line naming the folder if there are none."""
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: {what} not found")
    try:
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
    except OSError as e:
        raise UserError(f"{folder}: cannot read the {what} ({e.strerror})") from None
    if not names:
        raise UserError(f"{folder}: no image files in the {what} ({', '.join(IMAGE_SUFFIXES)})")
    return names


class CorruptImage(Exception):
    pass


# PIL warns above Image.MAX_IMAGE_PIXELS (89 MP by default) and refuses twice
# that, a guard against decompression bombs. Aerial and satellite images of
# 100 MP and more are legitimate inputs, so the guard is raised to 16384 x 16384
# (0.8 GB decoded per image, per loader worker) and enforced at that value.
MAX_IMAGE_PIXELS = 16384 * 16384
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


def mean_pixel(mean: list[float]) -> tuple[int, int, int]:
    """Padding value: the mean colour, which normalises to ~0 inside the model."""
    return tuple(int(round(m * 255)) for m in mean)  # type: ignore[return-value]


DEFAULT_BACKGROUND = mean_pixel(ModelConfig().mean)


def padded_size(sizes: Sequence[Sequence[int]], multiple: int) -> tuple[int, int]:
    """(H, W): the largest height and width among `sizes`, each rounded up to `multiple`."""
    h = max(int(s[0]) for s in sizes)
    w = max(int(s[1]) for s in sizes)
    return -(-h // multiple) * multiple, -(-w // multiple) * multiple


def pad_images(images: Sequence[Tensor] | Tensor, size: tuple[int, int], fill: Sequence[int]) -> Tensor:
    """[B, 3, H, W] from images [3, h_i, w_i] (a list, or a batch tensor) placed top-left on the
    fill colour, on the images' device and in their dtype. The padding is the mean pixel, which
    normalises to ~0, so the network sees "nothing there"."""
    h, w = size
    if any(img.shape[-2] > h or img.shape[-1] > w for img in images):
        raise ValueError(f"an image is larger than the padded size {h}x{w}")
    first = images[0]
    colour = torch.tensor(list(fill), dtype=first.dtype).to(first.device, non_blocking=True).view(1, 3, 1, 1)
    out = colour.expand(len(images), 3, h, w).clone()
    if isinstance(images, Tensor):  # a batch tensor: one copy, not one per image
        out[:, :, : images.shape[-2], : images.shape[-1]] = images
        return out
    for i, img in enumerate(images):
        out[i, :, : img.shape[-2], : img.shape[-1]] = img
    return out
