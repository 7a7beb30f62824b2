"""The input size of an exported model (ONNX, TensorRT engine), and fitting image batches into it.

An export takes either one fixed H x W (`--size`), a tuple (H, W), or any H and W
that are multiples of the pad multiple within a range, a DynamicSize (the default).
Shared by runtime/ (which runs exports) and export/ (which writes the size into
the metadata, and whose INT8 calibration feeds the network the way the runtime will).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import ModelConfig
from ..errors import UserError
from ..images import pad_images


@dataclass(frozen=True)
class DynamicSize:
    """Any H x W with H and W multiples of `multiple`, from `min` to `max` (each (h, w))."""

    multiple: int
    min: tuple[int, int]
    max: tuple[int, int]


InputSize = tuple[int, int] | DynamicSize


def dynamic_size(config: ModelConfig) -> DynamicSize:
    """A dynamic export's range: from one multiple up to the model's max_size rounded up to it,
    in both axes (a resized image's longer side is at most max_size, and either side may be
    the longer). At least three multiples, so that the export can trace two sizes of more
    than one multiple each (export.onnx.example_size)."""
    m = config.pad_multiple
    top = max(-(-config.max_size // m) * m, 3 * m)
    return DynamicSize(m, (m, m), (top, top))


def largest(size: InputSize) -> tuple[int, int]:
    return size.max if isinstance(size, DynamicSize) else size


def fit_config(config: ModelConfig, size: InputSize) -> ModelConfig:
    """The config with resize/max_size capped so that a resized image fits the (largest) H x W input."""
    h, w = largest(size)
    return dataclasses.replace(config, resize=min(config.resize, h, w), max_size=min(config.max_size, max(h, w)))


def batch_input_size(size: InputSize, h: int, w: int) -> tuple[int, int]:
    """The model input for a batch of h x w pixels: the fixed size, or for a dynamic model h x w
    rounded up to its multiple (and to its minimum); an error if the batch does not fit."""
    if isinstance(size, DynamicSize):
        m = size.multiple
        target = (max(-(-h // m) * m, size.min[0]), max(-(-w // m) * m, size.min[1]))
        top = size.max
    else:
        target = top = size
    if max(h, target[0]) > top[0] or max(w, target[1]) > top[1]:
        what = f"the model input {top[0]}x{top[1]}"
        if isinstance(size, DynamicSize):
            what = f"the model's largest input {top[0]}x{top[1]}"
        raise UserError(
            f"image batch of {h}x{w} pixels does not fit {what}: "
            f"lower --resize/--max-size or export with a larger --size"
        )
    return target


def pad_to(images: Tensor, size: InputSize, fill) -> Tensor:
    """Pad a [B, 3, h, w] batch right/bottom with the fill colour to the model input for it."""
    h, w = images.shape[-2:]
    target = batch_input_size(size, int(h), int(w))
    if (h, w) == target:
        return images
    return pad_images(images, target, fill)


def valid_sizes(images: Tensor, sizes: Tensor | None, device: torch.device) -> Tensor:
    """int32 [B, 2] valid (h, w) per image on `device`; None: the whole batch tensor, before
    any padding up to the model's input size."""
    if sizes is None:
        return torch.tensor([list(images.shape[-2:])] * images.shape[0], dtype=torch.int32, device=device)
    return sizes.to(device=device, dtype=torch.int32).contiguous()


def describe(size: InputSize) -> str:
    """The input size in words, for messages: '800x1344' or 'HxW multiples of 32 up to 1344x1344'."""
    if isinstance(size, DynamicSize):
        lo, hi = size.min, size.max
        return f"dynamic HxW, multiples of {size.multiple} from {lo[0]}x{lo[1]} to {hi[0]}x{hi[1]}"
    return f"{size[0]}x{size[1]}"


def to_json(size: InputSize) -> list | dict:
    """The metadata value: [H, W] for a fixed size; for a dynamic one
    {"dynamic": true, "multiple": m, "min": [h, w], "max": [h, w]}."""
    if isinstance(size, DynamicSize):
        return {"dynamic": True, "multiple": size.multiple, "min": list(size.min), "max": list(size.max)}
    return list(size)


def from_json(value) -> InputSize:
    """to_json's value back; ValueError naming what is wrong."""
    if isinstance(value, list):
        h, w = _pair(value)
        return (h, w)
    if not isinstance(value, dict) or value.get("dynamic") is not True:
        raise ValueError(f"{value!r} is neither [H, W] nor a dynamic range")
    if set(value) != {"dynamic", "multiple", "min", "max"}:
        raise ValueError(f"dynamic range keys {sorted(value)} are not dynamic, multiple, min, max")
    m = _count(value["multiple"])
    lo, hi = _pair(value["min"]), _pair(value["max"])
    if any(v % m for v in lo + hi) or lo[0] > hi[0] or lo[1] > hi[1]:
        raise ValueError(f"min {list(lo)}, max {list(hi)} are not multiples of {m} with min <= max")
    return DynamicSize(m, lo, hi)


def _pair(value) -> tuple[int, int]:
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError(f"{value!r} is not [H, W]")
    return _count(value[0]), _count(value[1])


def _count(value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{value!r} is not an integer >= {low}")
    return value
