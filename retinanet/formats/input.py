"""Exported models (ONNX, TensorRT engines) take a fixed input H x W: fitting images into it.

Shared by runtime/ (which runs exports) and export/ (INT8 calibration feeds the
network the way the runtime will).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..config import ModelConfig
from ..errors import UserError
from ..images import pad_images


def fit_config(config: ModelConfig, size: tuple[int, int]) -> ModelConfig:
    """The config with resize/max_size capped so that a resized image fits an H x W input."""
    h, w = size
    return dataclasses.replace(config, resize=min(config.resize, h, w), max_size=min(config.max_size, max(h, w)))


def pad_to(images: Tensor, size: tuple[int, int], fill) -> Tensor:
    """Pad a [B, 3, h, w] batch right/bottom to [B, 3, H, W] with the fill colour."""
    b, c, h, w = images.shape
    if (h, w) == tuple(size):
        return images
    if h > size[0] or w > size[1]:
        raise UserError(
            f"image batch of {h}x{w} pixels does not fit the model input {size[0]}x{size[1]}: "
            f"lower --resize/--max-size or export with a larger --size"
        )
    return pad_images(images, size, fill)


def valid_sizes(images: Tensor, sizes: Tensor | None, device: torch.device) -> Tensor:
    """int32 [B, 2] valid (h, w) per image on `device`; None: the whole batch tensor, before
    any padding up to the model's input size."""
    if sizes is None:
        return torch.tensor([list(images.shape[-2:])] * images.shape[0], dtype=torch.int32, device=device)
    return sizes.to(device=device, dtype=torch.int32).contiguous()
