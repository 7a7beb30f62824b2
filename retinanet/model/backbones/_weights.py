"""Loading ImageNet weights for torchvision-defined backbones."""
from __future__ import annotations

import contextlib
import io

import torch
import torch.nn as nn

from ...errors import UserError


class WeightsUnavailable(UserError):
    """ImageNet weights were requested but cannot be had."""


def load_imagenet(model: nn.Module, weights_enum, name: str, weights_file: str | None) -> None:
    """Load `weights_file` (a state dict) if given, else torchvision's weights.

    torchvision finds its weights in the torch hub cache or downloads them; when
    neither works the user gets one error naming both ways out.
    """
    if weights_file is not None:
        try:
            state = torch.load(weights_file, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as e:
            raise WeightsUnavailable(f"{weights_file}: cannot read backbone weights ({e})") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(("fc.", "classifier."))]
        if missing:
            raise WeightsUnavailable(
                f"{weights_file}: not a {name} state dict (missing {len(missing)} keys, e.g. {missing[0]})")
        return
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # torch hub prints "Downloading: ..."
            state = weights_enum.get_state_dict(progress=False)
    except Exception as e:  # network errors come in many types
        raise WeightsUnavailable(
            f"ImageNet weights for {name} are not cached and cannot be downloaded ({type(e).__name__}); "
            "pass --backbone-weights FILE (a torchvision state dict) or --no-pretrained to train from scratch"
        ) from None
    model.load_state_dict(state)


def freeze_batchnorm(model: nn.Module) -> None:
    """Turn BatchNorm into fixed affine layers: no statistics updates, no gradients."""
    from ..batchnorm import freeze

    freeze(model)
