"""Frozen BatchNorm as a constant affine map, and conv+BN folding for inference."""

from __future__ import annotations

from typing import cast

import torch
import torch.nn as nn
from torch import Tensor


class FrozenBatchNorm2d(nn.Module):
    """y = x * scale + shift with scale, shift from fixed BN statistics.

    One fused elementwise op forward and one backward, where nn.BatchNorm2d in
    eval mode launches cuDNN's BN kernels and their backward (a third of a
    ResNet50 training step on an H100). Same state-dict keys as BatchNorm2d.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> FrozenBatchNorm2d:
        frozen = cls(bn.num_features, bn.eps)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, name).copy_(getattr(bn, name))
        return frozen

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # BatchNorm2d's counter
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = scale_shift(self)
        shape = (1, -1, 1, 1)
        return torch.addcmul(shift.to(x.dtype).view(shape), x, scale.to(x.dtype).view(shape))


def freeze(module: nn.Module) -> None:
    """Replace every BatchNorm2d below `module` by a FrozenBatchNorm2d."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d.from_batchnorm(child))
        else:
            freeze(child)


def scale_shift(bn: nn.BatchNorm2d | FrozenBatchNorm2d) -> tuple[Tensor, Tensor]:
    """Inference BatchNorm (BatchNorm2d or frozen) as y = x * scale + shift, per channel."""
    weight, bias, mean, var = (cast(Tensor, t) for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var))
    scale = weight * torch.rsqrt(var + bn.eps)
    return scale, bias - mean * scale


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d | FrozenBatchNorm2d) -> nn.Conv2d:
    scale, shift = scale_shift(bn)
    # Made on the meta device and given its tensors: initialising weights that are
    # overwritten anyway was half the time a ResNet50 took to fold.
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]  # a Conv2d's are 2-tuples
        conv.stride,  # type: ignore[arg-type]
        conv.padding,  # type: ignore[arg-type]
        conv.dilation,  # type: ignore[arg-type]
        conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
        device="meta",
    )
    bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
    fused.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), conv.weight.requires_grad)
    fused.bias = nn.Parameter(bias * scale + shift, conv.weight.requires_grad)
    return fused


@torch.no_grad()
def fold_batchnorm(module: nn.Module) -> int:
    """Fold each BN into the conv feeding it, for inference; returns how many.

    Pairs are found where torchvision's backbones put them: consecutive
    entries of a Sequential, and attributes convN/bnN or downsample[0]/[1].
    """
    count = 0
    for child in list(module.children()):
        count += fold_batchnorm(child)
    if isinstance(module, nn.Sequential):
        items = list(module)
        for i in range(len(items) - 1):
            conv, bn = items[i], items[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                module[i] = _fold(conv, bn)
                module[i + 1] = nn.Identity()
                count += 1
    for name, child in list(module.named_children()):
        if name.startswith("bn") and isinstance(child, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            partner = getattr(module, "conv" + name[2:], None)
            if isinstance(partner, nn.Conv2d):
                setattr(module, "conv" + name[2:], _fold(partner, child))
                setattr(module, name, nn.Identity())
                count += 1
    return count
