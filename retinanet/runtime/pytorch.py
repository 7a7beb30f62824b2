"""PyTorch backend: a checkpoint's model on CPU or GPU."""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from .. import checkpoint, ops
from ..model import RetinaNet
from ..model.batchnorm import fold_batchnorm
from ..model.fused import fuse_for_inference


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TorchBackend:
    """Runs a RetinaNet on a padded uint8 batch.

    On a GPU with the CUDA ops built, the whole step (network in fp16,
    decode, NMS) is captured once per input shape in a CUDA graph and replayed:
    no host synchronisation and no per-kernel launch cost. Not compiled, the
    network runs its convs with bias, ReLU and residual add fused (model.fused).
    """

    MAX_GRAPHS = 8  # input shapes kept captured; more shapes run eagerly

    def __init__(
        self,
        model: RetinaNet,
        category_ids: list[int],
        device=None,
        full_precision: bool = False,
        cuda_graphs: bool | None = None,
        compile: bool = False,
        owned: bool = False,
        category_names: list[str] | None = None,
    ):
        """owned: `model` is this backend's to change (no one else holds it): no copy is made."""
        self.device = torch.device(device) if device is not None else default_device()
        # An inference copy: BatchNorm folded into the convs, and on the GPU
        # fp16 weights (no per-call autocast casts) in channels_last.
        self.model = (model if owned else copy.deepcopy(model)).eval()
        fold_batchnorm(self.model)
        if self.device.type == "cuda" and not compile:
            # Each conv's bias add and ReLU (and a ResNet block's residual add)
            # inside its cuDNN call: eager PyTorch would make separate passes
            # over the conv's output for them. torch.compile fuses them itself.
            fuse_for_inference(self.model)
        self.model.to(self.device)
        self.config = model.config
        self.category_ids = category_ids
        self.category_names = category_names
        self.half = self.device.type == "cuda" and not full_precision
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.half:
            self.model.half()
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and ops.HAVE_EXTENSION
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple, tuple] = {}
        # torch.compile fuses each conv's bias add and ReLU into one pass over
        # its output, where eager PyTorch makes two extra passes per conv.
        self.network = torch.compile(self.model, dynamic=False) if compile else self.model

    @classmethod
    def from_checkpoint(
        cls, path: str, device=None, full_precision: bool = False, compile: bool = False
    ) -> TorchBackend:
        model, state = checkpoint.load_model(path)
        names = checkpoint.category_names(state)
        return cls(
            model, state["category_ids"], device, full_precision, compile=compile, owned=True, category_names=names
        )

    @property
    def preprocess_device(self) -> torch.device:
        return self.device

    def _detect(self, x: Tensor, sizes: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        cls_heads, box_heads = self.network(x.half() if self.half else x, sizes)
        # Decode and NMS in float32 whatever the network ran in.
        return self.model.postprocess([h.float() for h in cls_heads], [h.float() for h in box_heads], sizes)

    def _replay(self, x: Tensor, sizes: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        key = (tuple(x.shape), sizes is None)
        entry = self._graphs.get(key)
        if entry is None:
            static_in = x.clone()
            static_sizes = None if sizes is None else sizes.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: cuDNN picks its kernels outside the capture
                for _ in range(2):
                    self._detect(static_in, static_sizes)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the GPU loader's preparing thread keeps allocating and
            # launching on its own stream while this thread captures.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static_out = self._detect(static_in, static_sizes)
            entry = self._graphs[key] = (graph, static_in, static_sizes, static_out)
        graph, static_in, static_sizes, static_out = entry
        static_in.copy_(x)
        if static_sizes is not None:
            static_sizes.copy_(sizes)
        graph.replay()
        return tuple(t.clone() for t in static_out)  # type: ignore[return-value]

    @torch.no_grad()
    def __call__(self, images: Tensor, sizes: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """sizes: [B, 2] valid (h, w) per image, used by models with config.takes_image_sizes
        (GroupNorm heads, clipping to the image: model.RetinaNet)."""
        x = images.to(self.device, non_blocking=True).float()
        if sizes is not None and self.config.takes_image_sizes:
            sizes = sizes.to(self.device, torch.int64, non_blocking=True)
        else:  # the others do not depend on it: their step stays as it was
            sizes = None
        key = (tuple(x.shape), sizes is None)
        if self.cuda_graphs and (key in self._graphs or len(self._graphs) < self.MAX_GRAPHS):
            return self._replay(x, sizes)
        return self._detect(x, sizes)
