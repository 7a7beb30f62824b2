"""ONNX Runtime backend: an exported portable-form model (.onnx).

The model carries its settings in metadata_props (export/onnx.py writes them):
the ModelConfig, the category ids and the fixed input size H x W. Batches are
padded up to that size with the mean colour; the preprocessing sizes are
capped so that images fit it (`fit_config`).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import torch
from torch import Tensor

from ..config import ModelConfig
from ..data.coco import mean_pixel
from ..errors import UserError

# The metadata keys written by export/onnx.py (repeated here as plain strings:
# runtime/ sits below export/ and must not import it).
_CONFIG, _CATEGORY_IDS, _INPUT_SIZE, _FORM = (
    "retinanet.config",
    "retinanet.category_ids",
    "retinanet.input_size",
    "retinanet.form",
)
_FORMAT_VERSION = "retinanet.format_version"
# The metadata layout this runtime reads; export/onnx.py's FORMAT_VERSION (a test holds them equal).
FORMAT_VERSION = 1


def fit_config(config: ModelConfig, size: tuple[int, int]) -> ModelConfig:
    """The config with resize/max_size capped so that a resized image fits an H x W input."""
    h, w = size
    return dataclasses.replace(config, resize=min(config.resize, h, w), max_size=min(config.max_size, max(h, w)))


def pad_to(images: Tensor, size: tuple[int, int], fill) -> Tensor:
    """Pad a [B, 3, h, w] batch right/bottom to [B, 3, H, W] with the fill colour."""
    b, c, h, w = images.shape
    if (h, w) == tuple(size):
        return images
    if h > size[0] or w > size[1]:
        raise UserError(
            f"image batch of {h}x{w} pixels does not fit the model input {size[0]}x{size[1]}: "
            f"lower --resize/--max-size or export with a larger --size"
        )
    out = torch.tensor(fill, dtype=images.dtype, device=images.device).view(1, 3, 1, 1).repeat(b, 1, *size)
    out[:, :, :h, :w] = images
    return out


def valid_sizes(images: Tensor, sizes: Tensor | None) -> Tensor:
    """int32 [B, 2] valid (h, w) per image; None: the whole batch tensor, before
    any padding up to the model's input size."""
    if sizes is None:
        return torch.tensor([list(images.shape[-2:])] * images.shape[0], dtype=torch.int32)
    return sizes.to(device="cpu", dtype=torch.int32).contiguous()


def providers_for(device) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    want = torch.device(device).type if device is not None else None
    if want == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise UserError(
                "device cuda asked for, but this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if want is None and "CUDAExecutionProvider" in available and torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def read_model_metadata(path: str, props: dict) -> tuple[ModelConfig, tuple[int, int], list[int]]:
    """config, input size and category ids from an export's metadata_props, checked: a model
    whose metadata is broken, incomplete or of another format version is one line naming it."""
    if not any(k.startswith("retinanet.") for k in props):
        raise UserError(f"{path}: not a retinanet ONNX export (no retinanet.* metadata)")
    values = {}
    for key, text in props.items():
        if key.startswith("retinanet."):
            try:
                values[key] = json.loads(text)
            except ValueError as e:
                raise UserError(f"{path}: metadata {key} is not valid JSON ({e}); re-export the model") from None
    version = values.get(_FORMAT_VERSION)
    if version != FORMAT_VERSION:
        got = "missing" if version is None else f"{version!r}"
        raise UserError(
            f"{path}: metadata format version {got}, this retinanet reads version {FORMAT_VERSION}: "
            f"re-export the model with this retinanet"
        )
    missing = [k for k in (_CONFIG, _CATEGORY_IDS, _INPUT_SIZE) if k not in values]
    if missing:
        raise UserError(f"{path}: not a complete retinanet ONNX export (metadata {', '.join(missing)} missing)")
    if values.get(_FORM, "portable") != "portable":
        raise UserError(f"{path}: this is the TensorRT (plugin) form; ONNX Runtime runs the portable form")
    key = _CONFIG
    try:
        config = ModelConfig.from_dict(values[_CONFIG])
        key = _INPUT_SIZE
        h, w = (_count(v) for v in values[_INPUT_SIZE])
        key = _CATEGORY_IDS
        category_ids = [_count(v, 0) for v in values[_CATEGORY_IDS]]
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: bad metadata {key} ({str(e).splitlines()[0][:120]})") from None
    if len(category_ids) != config.classes:
        raise UserError(
            f"{path}: metadata {_CATEGORY_IDS} lists {len(category_ids)} ids for a model of {config.classes} classes"
        )
    return config, (h, w), category_ids


def _count(value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{value!r} is not an integer >= {low}")
    return value


class OnnxRuntimeBackend:
    """Runs the portable form; outputs as CPU torch tensors (scores, boxes float32; classes int32)."""

    def __init__(self, path: str, device=None, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError(f"{path}: running ONNX models needs onnxruntime: pip install 'retinanet[onnx]'") from None
        if not os.path.isfile(path):
            raise UserError(f"{path}: ONNX model not found")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        providers = providers_for(device)
        try:
            self.session = ort.InferenceSession(path, options, providers=providers)
        except Exception as e:  # ORT raises its own exception types for bad files and unknown ops
            text = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            if "RetinaNetDecode" in text or "RetinaNetNMS" in text or "trt.plugins" in text:
                raise UserError(
                    f"{path}: this is the TensorRT (plugin) form; ONNX Runtime runs the portable "
                    f"form (export without --plugin-form) or build a TensorRT engine from it"
                ) from None
            raise UserError(f"{path}: ONNX Runtime cannot load the model ({text})") from None
        config, self.input_size, self.category_ids = read_model_metadata(
            path, self.session.get_modelmeta().custom_metadata_map
        )
        self.config = fit_config(config, self.input_size)
        self.fill = mean_pixel(config.mean)
        self.providers = self.session.get_providers()
        # Results come back through host memory either way; the data loader pins nothing.
        self.device = torch.device("cpu")
        inputs = [i.name for i in self.session.get_inputs()]
        self.input_name = inputs[0]
        # GroupNorm-head models also take each image's valid (h, w) (export/onnx.py).
        self.sizes_name = inputs[1] if len(inputs) > 1 else None
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, images: Tensor, sizes: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        batch = pad_to(images.cpu(), self.input_size, self.fill)
        feed = {self.input_name: np.ascontiguousarray(batch.numpy(), dtype=np.float32)}
        if self.sizes_name is not None:
            feed[self.sizes_name] = valid_sizes(images, sizes).numpy()
        out = dict(zip(self.output_names, self.session.run(self.output_names, feed)))
        return (torch.from_numpy(out["scores"]), torch.from_numpy(out["boxes"]), torch.from_numpy(out["classes"]))
