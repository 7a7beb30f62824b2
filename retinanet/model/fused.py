"""Conv + bias + ReLU (+ a ResNet block's residual add) as one cuDNN call, for inference on the GPU.

Eager PyTorch runs a conv followed by ReLU as separate kernels, and each extra
kernel reads and writes the conv's whole output once more (the bias add where
cuDNN does not take it, the ReLU, the residual add). At detection input sizes
those passes are a large share of the network's time: torch.compile, which
fuses them, runs the network in about 60% of the eager time.
`torch.cudnn_convolution_relu` and `torch.cudnn_convolution_add_relu` apply
bias, residual and ReLU to the convolution's float32 result before it is
written, once, in the input's dtype.

fuse_for_inference rewrites an inference copy (BatchNorm already folded) in
place. Off the GPU the fused modules compute what the modules they replace
computed, with the same ops, so CPU outputs do not change by a bit.

Not fused: a conv whose ReLU comes after a norm (GroupNorm heads), and the
FPN's one ReLU, which is applied to P6 on its way into P7 while the
un-rectified P6 is itself an output.
"""

from __future__ import annotations

import warnings
from typing import TypeGuard, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.models import resnet


class FusedReLU(nn.ReLU):
    """Stands where a ReLU stood whose work the conv before it now does. Still
    an nn.ReLU: code that acts after each ReLU of a tower (Head masks the
    padding there) finds it where it was."""

    def forward(self, input: Tensor) -> Tensor:
        return input


def matched(weight: Tensor, x: Tensor) -> Tensor:
    """`weight` in x's dtype and memory format, as the fused ops need them alike.

    Without this cuDNN would convert the (much larger) input to the weight's
    format on every call; with TorchBackend's channels_last fp16 copy the
    weight already matches and nothing is copied."""
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    for layout in (torch.channels_last, torch.contiguous_format):
        # An input contiguous both ways (1 x 1 cells) takes the weight as it is.
        if x.is_contiguous(memory_format=layout) and weight.is_contiguous(memory_format=layout):
            return weight
    channels_last = x.is_contiguous(memory_format=torch.channels_last)
    return weight.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


class _Fused(nn.Module):
    """One conv (kept, with its parameters and its CPU behaviour) and the
    decision whether a call goes through the fused cuDNN op."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self.fused = True  # False once cuDNN has had no engine for this conv (see fused_or_none)

    def use_cudnn(self, x: Tensor) -> bool:
        # The fused ops have no backward, and they bypass the cudnn.enabled and
        # cudnn.deterministic switches: a caller who sets those gets plain convs.
        return (
            x.is_cuda
            and self.fused
            and not torch.is_grad_enabled()
            and torch.backends.cudnn.enabled
            and not torch.backends.cudnn.deterministic
        )

    def operands(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        bias = self.conv.bias
        return matched(self.conv.weight, x), None if bias is None else bias.to(x.dtype)

    def geometry(self) -> tuple:
        c = self.conv
        return c.stride, c.padding, c.dilation, c.groups

    def fused_or_none(self, op, *args) -> Tensor | None:
        """op(*args), or None where cuDNN finds no fused engine for this conv's
        shapes and dtype: the conv then runs unfused from here on, with a
        warning, rather than the whole network failing."""
        try:
            return op(*args)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:
            if args[0].is_cuda and torch.cuda.is_current_stream_capturing():  # a failed call spoilt the capture
                raise
            self.fused = False
            warnings.warn(
                f"{op.__name__} failed for {self.conv} on {args[0].dtype} input, running it unfused: {e}", stacklevel=3
            )
            return None


class ConvReLU(_Fused):
    """relu(conv(x)), the bias and the ReLU inside the cuDNN call on the GPU."""

    def forward(self, x: Tensor) -> Tensor:
        if self.use_cudnn(x):
            y = self.fused_or_none(torch.cudnn_convolution_relu, x, *self.operands(x), *self.geometry())
            if y is not None:
                return y
        return F.relu(self.conv(x), inplace=True)  # the conv's output is a new tensor


class ConvAddReLU(_Fused):
    """relu(conv(x) + z), the bias, the add of z and the ReLU inside the cuDNN call on the GPU."""

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        if self.use_cudnn(x):
            weight, bias = self.operands(x)
            z = z.to(x.dtype)
            y = self.fused_or_none(torch.cudnn_convolution_add_relu, x, weight, z, 1.0, bias, *self.geometry())
            if y is not None:
                return y
        out = self.conv(x)
        out += z  # as torchvision's blocks add the shortcut: in place on the conv's output
        return F.relu(out, inplace=True)


class FusedBlock(nn.Module):
    """A torchvision BasicBlock or Bottleneck with its BatchNorms folded: every
    conv but the last with its ReLU, the last with the shortcut's add and the
    final ReLU. The shortcut (downsample) is kept as it was."""

    def __init__(self, convs: list[nn.Conv2d], downsample: nn.Module | None):
        super().__init__()
        self.body = nn.Sequential(*(ConvReLU(c) for c in convs[:-1]))
        self.last = ConvAddReLU(convs[-1])
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.last(self.body(x), shortcut)


def fusable(conv: nn.Module) -> TypeGuard[nn.Conv2d]:
    """A plain 2-d conv with zero padding given as numbers, which the fused ops can run."""
    return (
        type(conv) is nn.Conv2d
        and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple)  # not "same" / "valid"
    )


def _block_convs(block: nn.Module) -> list[nn.Conv2d] | None:
    """The convs of a torchvision residual block whose BatchNorms were folded (bnN
    now Identity) and whose ReLU is a plain one; None for anything else."""
    if type(block) is resnet.BasicBlock:
        count = 2
    elif type(block) is resnet.Bottleneck:
        count = 3
    else:
        return None
    convs = [getattr(block, f"conv{i}") for i in range(1, count + 1)]
    norms = [getattr(block, f"bn{i}") for i in range(1, count + 1)]
    if type(block.relu) is not nn.ReLU or not all(type(n) is nn.Identity for n in norms):
        return None
    return convs if all(fusable(c) for c in convs) else None


def _fuse_sequential(seq: nn.Sequential) -> int:
    """conv, Identity (a folded BN)..., ReLU: the conv becomes a ConvReLU and the ReLU a FusedReLU."""
    count = 0
    items = list(seq)
    for i, item in enumerate(items):
        if not fusable(item):
            continue
        j = i + 1
        while j < len(items) and type(items[j]) is nn.Identity:
            j += 1
        if j < len(items) and type(items[j]) is nn.ReLU:
            seq[i] = ConvReLU(item)
            seq[j] = FusedReLU()
            count += 1
    return count


@torch.no_grad()
def fuse_for_inference(model: nn.Module) -> int:
    """Rewrite `model` in place (after fold_batchnorm): each conv followed by a
    ReLU, and each residual block's last conv with its add and ReLU, becomes
    one fused module. Returns how many convs were fused."""
    count = 0
    for name, child in list(model.named_children()):
        convs = _block_convs(child)
        if convs is not None:
            setattr(model, name, FusedBlock(convs, cast(nn.Module | None, child.downsample)))
            count += len(convs)
            continue
        if isinstance(child, nn.Sequential):
            count += _fuse_sequential(child)
        count += fuse_for_inference(child)
    return count
