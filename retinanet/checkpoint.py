"""Checkpoint files: atomic writes, validated reads."""

from __future__ import annotations

import os

import torch

from .config import FORMAT_VERSION, ModelConfig
from .errors import UserError
from .files import atomic_write, load_tensors

REQUIRED = ("format_version", "backbone", "classes", "config", "state_dict", "category_ids")


def save(path: str, state: dict) -> None:
    """Write `state` so that `path` always holds either the old or the new file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with atomic_write(path) as f:
        torch.save(state, f)


def load(path: str) -> dict:
    """Read and check a checkpoint; UserError with the path on any problem."""
    state = load_tensors(path, "checkpoint")
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED):
        missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
        raise UserError(f"{path}: not a retinanet checkpoint (missing {', '.join(missing)})")
    if state["format_version"] > FORMAT_VERSION:
        raise UserError(
            f"{path}: checkpoint format {state['format_version']} is newer than this "
            f"retinanet understands ({FORMAT_VERSION}); upgrade retinanet"
        )
    try:
        state["config"] = ModelConfig.from_dict(state["config"])
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: bad model config in checkpoint ({e})") from None
    return state


def model_state(
    config: ModelConfig, model: torch.nn.Module, category_ids: list[int], category_names: list[str] | None = None
) -> dict:
    """The model part of a checkpoint (what inference needs)."""
    state = {
        "format_version": FORMAT_VERSION,
        "backbone": config.backbone,
        "classes": config.classes,
        "config": config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "category_ids": list(category_ids),
    }
    if category_names is not None:
        state["category_names"] = list(category_names)
    return state


def category_names(state: dict) -> list[str] | None:
    """The checkpoint's class names, aligned with category_ids; None for checkpoints without
    them (written before names were stored), whose drawings show ids."""
    names = state.get("category_names")
    if not isinstance(names, list) or len(names) != len(state["category_ids"]):
        return None
    return [str(n) for n in names]


def load_model(path: str):
    """The checkpoint's RetinaNet (eval mode, CPU) and the checked state dict."""
    from .model import RetinaNet

    state = load(path)
    try:
        model = RetinaNet.from_state_dict(state["config"], state["state_dict"])
    except RuntimeError as e:
        raise UserError(
            f"{path}: weights do not fit a {state['backbone']} model ({str(e).splitlines()[0][:160]})"
        ) from None
    return model.eval(), state
