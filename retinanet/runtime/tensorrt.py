"""TensorRT backend: a serialised engine (.plan/.engine) and its metadata (<plan>.json).

I/O by name (`images` in; `scores`, `boxes`, `classes` out), torch tensors as the
device buffers, set_input_shape / set_tensor_address / execute_async_v3 on the
current torch stream. The input shape is set per batch: its batch size, and for
an engine of a dynamic-size export its own padded H x W (within the profile).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import ModelConfig
from ..errors import UserError
from ..formats.input import InputSize, fit_config, from_json, pad_to, valid_sizes
from ..formats.onnx import IMAGE_SIZES, IMAGES
from ..formats.tensorrt import import_tensorrt, load_plugins, metadata_path, plan_digest, read_metadata
from ..images import mean_pixel

_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "INT32": torch.int32, "BF16": torch.bfloat16}


def check_batch(path: str, batch: int, batch_opts) -> None:
    lo, _, hi = batch_opts
    if not lo <= batch <= hi:
        raise UserError(
            f"{path}: batch of {batch} images is outside the engine's profile {lo}..{hi} "
            f"(use --batch within it or export with --dynamic-batch-opts)"
        )


def check_build_match(path: str, meta: dict, trt_version: str, gpu: str) -> None:
    if meta["tensorrt_version"] != trt_version:
        raise UserError(
            f"{path}: engine built with TensorRT {meta['tensorrt_version']}, this is {trt_version}: "
            f"rebuild it with `retinanet export`"
        )
    if meta["gpu"] != gpu:
        raise UserError(f"{path}: engine built on {meta['gpu']}, this GPU is {gpu}: rebuild it here")


def check_plan(path: str, meta: dict, plan: bytes) -> None:
    """The metadata must describe this very plan (a plan copied without its .json, or beside
    another build's, would run with the wrong config and category ids)."""
    if meta["plan_sha256"] != plan_digest(plan):
        raise UserError(
            f"{metadata_path(path)}: engine metadata is for another plan (sha256 "
            f"{str(meta['plan_sha256'])[:12]}..., {path} is {plan_digest(plan)[:12]}...): "
            f"copy the .json built with this plan, or rebuild it with `retinanet export`"
        )


def settings(path: str, meta: dict) -> tuple[ModelConfig, InputSize, list[int], tuple[int, int, int]]:
    """config, input size, category ids and batch range from the metadata; one line naming it if bad."""
    try:
        config = ModelConfig.from_dict(meta["config"])
        size = from_json(meta["input_size"])
        category_ids = [int(v) for v in meta["category_ids"]]
        lo, opt, hi = (int(v) for v in meta["batch_opts"])
    except (TypeError, ValueError) as e:
        raise UserError(f"{metadata_path(path)}: bad engine metadata ({str(e).splitlines()[0][:120]})") from None
    return config, size, category_ids, (lo, opt, hi)


class TensorRTBackend:
    def __init__(self, path: str, device=None):
        meta = read_metadata(path)
        config, self.input_size, self.category_ids, self.batch_opts = settings(path, meta)
        names = meta.get("category_names")
        fits = isinstance(names, list) and len(names) == len(self.category_ids)
        self.category_names = [str(n) for n in names] if fits else None  # only labels drawings
        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise UserError(f"{path}: TensorRT engines need a CUDA GPU")
        self.device = torch.device(device or "cuda")
        self.preprocess_device = self.device
        check_build_match(path, meta, trt.__version__, torch.cuda.get_device_name(self.device))
        try:
            with open(path, "rb") as f:
                plan = f.read()
        except OSError as e:
            raise UserError(f"{path}: cannot read the engine ({e.strerror})") from None
        check_plan(path, meta, plan)
        load_plugins(trt)
        self.path = path
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise UserError(f"{path}: TensorRT cannot deserialise the engine (another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.dtypes = {n: _TORCH_DTYPES[self.engine.get_tensor_dtype(n).name] for n in self.names}
        self.config = fit_config(config, self.input_size)
        self.fill = mean_pixel(config.mean)

    def __call__(self, images: Tensor, sizes: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        check_batch(self.path, images.shape[0], self.batch_opts)
        batch = pad_to(images.to(self.device), self.input_size, self.fill)
        feed = {IMAGES: batch}
        if IMAGE_SIZES in self.inputs:  # config.takes_image_sizes models (export/onnx.py)
            feed[IMAGE_SIZES] = valid_sizes(images, sizes, self.device)
        bound = []  # the inputs stay allocated, so the outputs below cannot take their memory
        for name, value in feed.items():
            x = value.to(self.dtypes[name]).contiguous()
            self.context.set_input_shape(name, tuple(x.shape))
            self.context.set_tensor_address(name, x.data_ptr())
            bound.append(x)
        outputs = {}
        for n in self.names:
            if n in self.inputs:
                continue
            t = torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=self.dtypes[n], device=self.device)
            self.context.set_tensor_address(n, t.data_ptr())
            outputs[n] = t
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.path}: TensorRT execution failed")
        return outputs["scores"], outputs["boxes"], outputs["classes"]
