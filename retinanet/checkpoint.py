"""Checkpoint files: atomic writes, validated reads (SPEC section 3)."""
from __future__ import annotations

import os

import torch

from .config import FORMAT_VERSION, ModelConfig
from .errors import UserError
from .files import atomic_write

REQUIRED = ("format_version", "backbone", "classes", "config", "state_dict", "category_ids")


def save(path: str, state: dict) -> None:
    """Write `state` so that `path` always holds either the old or the new file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with atomic_write(path) as f:
        torch.save(state, f)


def load(path: str) -> dict:
    """Read and check a checkpoint; UserError with the path on any problem."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: checkpoint not found")
    state = load_tensors(path, "checkpoint")
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED):
        missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
        raise UserError(f"{path}: not a retinanet checkpoint (missing {', '.join(missing)})")
    if state["format_version"] > FORMAT_VERSION:
        raise UserError(f"{path}: checkpoint format {state['format_version']} is newer than this "
                        f"retinanet understands ({FORMAT_VERSION}); upgrade retinanet")
    try:
        state["config"] = ModelConfig.from_dict(state["config"])
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: bad model config in checkpoint ({e})") from None
    return state


def load_tensors(path: str, what: str):
    """torch.load with weights_only=True: tensors, numbers, strings and containers
    only, so that a file someone sent cannot run code when opened. Everything
    this toolkit saves loads this way."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e) and "Weights only" not in str(e):
            raise UserError(f"{path}: not a readable {what} ({_first_line(e)})") from None
        raise UserError(f"{path}: refusing to load this {what}: it holds Python objects beyond tensors and "
                        f"plain containers, and unpickling them could run code; re-save its tensors "
                        f"(state_dict) alone") from None
    except Exception as e:  # torch raises many types for a damaged file
        raise UserError(f"{path}: not a readable {what} ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:160] if lines else type(e).__name__


def model_state(config: ModelConfig, model: torch.nn.Module, category_ids: list[int]) -> dict:
    """The model part of a checkpoint (what inference needs)."""
    return {
        "format_version": FORMAT_VERSION,
        "backbone": config.backbone,
        "classes": config.classes,
        "config": config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "category_ids": list(category_ids),
    }


def load_model(path: str):
    """The checkpoint's RetinaNet (eval mode, CPU) and the checked state dict."""
    from .model import RetinaNet

    state = load(path)
    model = RetinaNet(state["config"])
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit a {state['backbone']} model "
                        f"({str(e).splitlines()[0][:160]})") from None
    return model.eval(), state
