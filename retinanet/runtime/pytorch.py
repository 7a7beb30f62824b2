"""PyTorch backend: a checkpoint's model on CPU or GPU."""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .. import checkpoint
from ..errors import UserError
from ..model import RetinaNet


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_batch() -> int:
    """2 per visible GPU (SPEC), 2 on the CPU."""
    return 2 * max(1, torch.cuda.device_count())


class TorchBackend:
    def __init__(self, model: RetinaNet, category_ids: list[int], device=None, full_precision: bool = False):
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.eval().to(self.device)
        self.config = model.config
        self.category_ids = category_ids
        self.amp = self.device.type == "cuda" and not full_precision
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)

    @classmethod
    def from_checkpoint(cls, path: str, device=None, full_precision: bool = False) -> "TorchBackend":
        state = checkpoint.load(path)
        model = RetinaNet(state["config"])
        try:
            model.load_state_dict(state["state_dict"])
        except RuntimeError as e:
            raise UserError(f"{path}: weights do not fit a {state['backbone']} model "
                            f"({str(e).splitlines()[0][:160]})") from None
        return cls(model, state["category_ids"], device, full_precision)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = images.to(self.device, non_blocking=True).float()
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        amp = torch.autocast("cuda", dtype=torch.float16) if self.amp else contextlib.nullcontext()
        with amp:
            heads = self.model(x)
        # Decode and NMS in float32 whatever the network ran in.
        return self.model.postprocess([h.float() for h in heads[0]], [h.float() for h in heads[1]])
