"""ONNX Runtime backend: an exported portable-form model (.onnx).

The model carries its settings in metadata_props (export/onnx.py writes them):
the ModelConfig, the category ids and the input size. A dynamic-size model runs
each batch at its own padded size (a multiple of the pad multiple); a fixed-size
one pads every batch up to its H x W with the mean colour. The preprocessing
sizes are capped so that images fit the (largest) input (`fit_config`).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError
from ..formats.input import fit_config, pad_to, valid_sizes
from ..formats.onnx import category_names, providers_for, read_model_metadata, session_options
from ..images import mean_pixel


class OnnxRuntimeBackend:
    """Runs the portable form; outputs as CPU torch tensors (scores, boxes float32; classes int32)."""

    def __init__(self, path: str, device=None, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError(f"{path}: running ONNX models needs onnxruntime: pip install 'retinanet[onnx]'") from None
        if not os.path.isfile(path):
            raise UserError(f"{path}: ONNX model not found")
        try:
            self.session = ort.InferenceSession(path, session_options(threads), providers=providers_for(device))
        except Exception as e:  # ORT raises its own exception types for bad files and unknown ops
            text = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            if "RetinaNetDecode" in text or "RetinaNetNMS" in text or "trt.plugins" in text:
                raise UserError(
                    f"{path}: this is the TensorRT (plugin) form; ONNX Runtime runs the portable "
                    f"form (export without --plugin-form) or build a TensorRT engine from it"
                ) from None
            raise UserError(f"{path}: ONNX Runtime cannot load the model ({text})") from None
        values = self.session.get_modelmeta().custom_metadata_map
        config, self.input_size, self.category_ids = read_model_metadata(path, values)
        self.category_names = category_names(values, config.classes)
        self.config = fit_config(config, self.input_size)
        self.fill = mean_pixel(config.mean)
        self.providers = self.session.get_providers()
        # Results come back through host memory either way; the data loader pins nothing.
        self.device = self.preprocess_device = torch.device("cpu")
        inputs = [i.name for i in self.session.get_inputs()]
        self.input_name = inputs[0]
        # GroupNorm-head and clip_to_image models also take each image's valid (h, w) (export/onnx.py).
        self.sizes_name = inputs[1] if len(inputs) > 1 else None
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, images: Tensor, sizes: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        batch = pad_to(images.cpu(), self.input_size, self.fill)
        feed = {self.input_name: np.ascontiguousarray(batch.numpy(), dtype=np.float32)}
        if self.sizes_name is not None:
            feed[self.sizes_name] = valid_sizes(images, sizes, torch.device("cpu")).numpy()
        out = dict(zip(self.output_names, self.session.run(self.output_names, feed)))
        return (torch.from_numpy(out["scores"]), torch.from_numpy(out["boxes"]), torch.from_numpy(out["classes"]))
