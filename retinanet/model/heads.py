"""Classification and box heads shared across pyramid levels.

Padding: a batch pads each image right/bottom to a common size. With
GroupNorm heads the normalisation statistics would then depend on how much
padding an image got (batch composition, export size). Given a mask of each
image's valid cells, the heads normalise over those cells only and zero the
tower outside them, so that on the valid cells the head computes what it
computes on the features cropped to them (whose 3x3 convs see zero padding
at the border).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor


def valid_cells(sizes: Tensor, stride: int) -> Tensor:
    """[B, 2] rows and columns of a stride-`stride` level that hold image content.

    sizes [B, 2]: each image's (h, w) in input pixels. Every stride-2 step of
    the backbone and FPN (3x3 convs with padding 1, ResNet's 7x7/pad 3 stem and
    3x3/pad 1 max-pool, 1x1 stride-2 shortcuts) maps n cells to ceil(n / 2),
    and ceil(ceil(h / a) / b) = ceil(h / ab): h pixels cover ceil(h / s) cells.
    """
    sizes = sizes.to(torch.int64)
    return torch.div(sizes + (stride - 1), stride, rounding_mode="floor")


def valid_mask(sizes: Tensor, stride: int, height: int, width: int, dtype: torch.dtype) -> Tensor:
    """[B, 1, height, width]: 1 on the valid cells of a level, 0 on padding."""
    cells = valid_cells(sizes, stride)
    rows = torch.arange(height, device=sizes.device)
    cols = torch.arange(width, device=sizes.device)
    inside = (rows[None, :, None] < cells[:, 0, None, None]) & (cols[None, None, :] < cells[:, 1, None, None])
    return inside[:, None].to(dtype)


class MaskedGroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and state-dict keys) whose statistics,
    given a mask [B, 1, H, W], cover each image's masked-in cells only.

    The statistics are computed in float32 whatever the input dtype: sums over
    thousands of fp16 cells lose too many digits. Plain tensor ops, so the
    graph exports to ONNX and captures in CUDA graphs (no per-image shapes).
    """

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is None:
            return super().forward(x)
        b, c, h, w = x.shape
        g = self.num_groups
        xg = x.float().reshape(b, g, c // g, h, w)
        m = mask.float().reshape(b, 1, 1, h, w)
        dims = (2, 3, 4)
        count = (m.sum(dim=dims, keepdim=True) * (c // g)).clamp(min=1.0)
        mean = (xg * m).sum(dim=dims, keepdim=True) / count
        centred = xg - mean
        var = (centred * centred * m).sum(dim=dims, keepdim=True) / count
        y = (centred * torch.rsqrt(var + self.eps)).reshape(b, c, h, w)
        if self.affine:
            y = y * self.weight.float().view(1, -1, 1, 1) + self.bias.float().view(1, -1, 1, 1)
        return y.to(x.dtype)


class Head(nn.Module):
    """4 x (3x3 conv [+ GroupNorm] + ReLU), then a 3x3 conv to `outputs` channels.
    bias=False drops the tower convs' bias (a following GroupNorm shifts anyway)."""

    def __init__(
        self, outputs: int, channels: int, depth: int, bias_init: float = 0.0, norm: bool = False, bias: bool = True
    ):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers.append(nn.Conv2d(channels, channels, 3, padding=1, bias=bias))
            if norm:
                layers.append(MaskedGroupNorm(32, channels))
            layers.append(nn.ReLU(inplace=True))
        self.tower = nn.Sequential(*layers)
        self.out = nn.Conv2d(channels, outputs, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.out.bias, bias_init)  # type: ignore[arg-type]

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """mask [B, 1, H, W] (valid_mask, in x's dtype): on its cells the output
        equals the head's output on x cropped to them; None: the whole tensor."""
        if mask is None:
            return self.out(self.tower(x))
        x = x * mask
        for layer in self.tower:
            x = layer(x, mask) if isinstance(layer, MaskedGroupNorm) else layer(x)
            if isinstance(layer, nn.ReLU):
                x = x * mask
        return self.out(x)


def classification_head(
    num_anchors: int, classes: int, prior: float, channels: int, depth: int, norm: bool = False, bias: bool = True
) -> Head:
    # Start every anchor at score ~prior so the background flood does not
    # swamp the focal loss in the first iterations.
    bias_init = -math.log((1 - prior) / prior)
    return Head(num_anchors * classes, channels, depth, bias_init=bias_init, norm=norm, bias=bias)


def box_head(
    num_anchors: int, channels: int, depth: int, norm: bool = False, bias: bool = True, values: int = 4
) -> Head:
    # Bias 0: every box starts as its anchor (a rotated one at its anchor's angle, since
    # sin, cos = 0, 0 decodes to no turn), not shrunk by a prior meant for scores.
    return Head(num_anchors * values, channels, depth, norm=norm, bias=bias)
