"""Loading ImageNet weights for torchvision-defined backbones."""

from __future__ import annotations

import contextlib
import io

import torch
import torch.nn as nn

from ...errors import UserError
from ...files import load_tensors


class WeightsUnavailable(UserError):
    """ImageNet weights were requested but cannot be had."""


def load_imagenet(model: nn.Module, weights_enum, name: str, weights_file: str | None) -> None:
    """Load `weights_file` (a state dict) if given, else torchvision's weights.

    torchvision finds its weights in the torch hub cache or downloads them; when
    neither works the user gets one error naming both ways out.
    """
    if weights_file is not None:
        model.load_state_dict(_read_state_dict(model, name, weights_file), strict=False)
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


def _read_state_dict(model: nn.Module, name: str, weights_file: str) -> dict:
    """The state dict in a user's file, checked key by key and shape by shape
    against `model` (the classifier head aside, which the detector drops).

    weights_only: a user's file is data, never code to run while unpickling.
    """
    try:
        state = load_tensors(weights_file, "backbone weights file")
    except UserError as e:
        raise WeightsUnavailable(str(e)) from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise WeightsUnavailable(
            f"{weights_file}: not a {name} state dict (expected names mapped to tensors, got a {type(state).__name__})"
        )
    head = ("fc.", "classifier.")
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(head)}
    state = {k: v for k, v in state.items() if not k.startswith(head)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        detail = (
            f"missing {len(missing)} keys, e.g. {missing[0]}"
            if missing
            else f"{len(unexpected)} unknown keys, e.g. {unexpected[0]}"
            if unexpected
            else f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}, not {tuple(own[wrong[0]].shape)}"
        )
        raise WeightsUnavailable(f"{weights_file}: not a {name} state dict ({detail})")
    return state


def freeze_batchnorm(model: nn.Module) -> None:
    """Turn BatchNorm into fixed affine layers: no statistics updates, no gradients."""
    from ..batchnorm import freeze

    freeze(model)
