"""Backends that run a model file, and the user-facing Detector.

`retinanet.load(path)` and `retinanet infer` both come through here, so every
model format behaves alike.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from ..config import ModelConfig
from ..data import transforms as T
from ..data.gpu import decode_file
from ..errors import UserError
from ..images import CorruptImage, mean_pixel, pad_images, padded_size
from ..ops import rotated as rotated_ops


@dataclass
class Detections:
    boxes: Tensor  # [N, 4] x1 y1 x2 y2 in the image's pixels; rotated models: [N, 5] cx cy w h θ
    scores: Tensor  # [N]
    category_ids: Tensor  # [N] original category ids
    names: dict[int, str] | None = None  # category id -> class name (what retinanet.draw shows)

    def records(self, image_id: int, box_offset: float = 0.0) -> list[dict]:
        """COCO result records: bbox [x, y, w, h] (box_offset 1: the width counts both end
        pixels). Rotated boxes: bbox [x, y, w, h, θ], the unrotated rectangle and its turn,
        and their corners as a `segmentation` polygon, which COCO's segm evaluation scores."""
        scores, ids = self.scores.tolist(), self.category_ids.tolist()
        if self.boxes.shape[-1] == 5:
            xywha, corners = rotated_ops.to_xywha(self.boxes).tolist(), rotated_ops.polygons(self.boxes).tolist()
            return [
                {
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": [round(v, 2) for v in box[:4]] + [round(box[4], 5)],
                    "segmentation": [[round(v, 2) for v in polygon]],
                    "score": round(score, 5),
                }
                for box, polygon, score, cat in zip(xywha, corners, scores, ids)
            ]
        xywh = torch.cat([self.boxes[:, :2], self.boxes[:, 2:] - self.boxes[:, :2] + box_offset], dim=1)
        return [
            {"image_id": image_id, "category_id": cat, "bbox": [round(v, 2) for v in box], "score": round(score, 5)}
            for box, score, cat in zip(xywh.tolist(), scores, ids)
        ]


class Backend(Protocol):
    """What a Detector runs: one model file, opened for one device."""

    config: ModelConfig  # the model's settings (resize/max_size fitted to an export's input)
    category_ids: list[int]  # original category id of each class
    category_names: list[str] | None  # the class names, where the model file has them
    device: torch.device  # where outputs come back; the loader pins batches when it is a GPU
    preprocess_device: torch.device  # where images are decoded, resized and padded

    def __call__(self, images: Tensor, sizes: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Padded uint8 batch [B, 3, H, W] (and each image's valid (h, w)) -> scores, boxes, classes."""
        ...


class Detector:
    """Callable on one image or a list: paths, HxWx3 uint8 arrays or CHW tensors."""

    def __init__(self, backend: Backend, config: ModelConfig, category_ids: list[int]):
        self.backend = backend
        self.config = config
        self.category_ids = torch.tensor(category_ids, dtype=torch.long)
        self.fill = mean_pixel(config.mean)
        names = getattr(backend, "category_names", None) or [str(i) for i in category_ids]
        self.category_names = dict(zip(category_ids, names))  # category id -> name (drawings)

    @property
    def device(self) -> torch.device:
        return self.backend.device

    def run(self, images: Tensor, sizes: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Padded uint8 batch [B, 3, H, W] -> scores [B, D], boxes [B, D, 4], classes [B, D].

        sizes: [B, 2] each image's (h, w) before padding (Batch.valid); None
        takes the whole [H, W] as image. Models with config.takes_image_sizes
        (GroupNorm heads, clipping to the image) need it for detections that do
        not depend on the padding (model.RetinaNet)."""
        return self.backend(images, sizes)

    def to_original(
        self, scores: Tensor, boxes: Tensor, classes: Tensor, scales: Tensor, sizes: list[tuple[int, int]]
    ) -> list[Detections]:
        """Per image: drop padding, undo the resize, clip to the image (not rotated boxes:
        docs/rotated.md), map category ids."""
        scores, boxes, classes, scales = (
            t.float().cpu() if t.is_floating_point() else t.cpu() for t in (scores, boxes, classes, scales)
        )
        out = []
        last = self.config.box_offset  # the +1 convention's boxes end on the last pixel, w - 1
        for i, (h, w) in enumerate(sizes):
            keep = scores[i] > 0
            if self.config.rotated:
                b = _rotated_to_original(boxes[i][keep], scales[i])
            else:
                b = boxes[i][keep] / scales[i].repeat(2)
                b = torch.minimum(b.clamp(min=0), torch.tensor([w - last, h - last] * 2, dtype=b.dtype))
            out.append(Detections(b, scores[i][keep], self.category_ids[classes[i][keep].long()], self.category_names))
        return out

    def __call__(self, images, resize: int | None = None, max_size: int | None = None):
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        resize = resize or self.config.resize
        max_size = max_size or self.config.max_size
        # Backends that run on a GPU decode (JPEG), resize and pad there too.
        device = self.backend.preprocess_device
        tensors, scales, sizes, valid = [], [], [], []
        for item in items:
            img = _as_chw_uint8(item, device)
            h, w = img.shape[-2:]
            img, scale = T.resize_image(img, resize, max_size)
            tensors.append(img)
            scales.append(scale)
            sizes.append((int(h), int(w)))
            valid.append(tuple(img.shape[-2:]))
        batch = pad_images(tensors, padded_size(valid, self.config.pad_multiple), self.fill)
        valid = torch.tensor(valid, dtype=torch.int32)
        dets = self.to_original(*self.run(batch, valid), torch.tensor(scales), sizes)
        return dets[0] if single else dets

    def stream(self, source: str, batch: int = 8, timeout: float | None = None, decode: str = "auto"):
        """Detect objects in every frame of a video file, an rtsp/http URL or a camera (/dev/videoN).

        Yields (index, timestamp in seconds, frame, detections) per frame, in order; the
        frame is a uint8 [3, H, W] tensor on the detector's device. Frames are decoded
        in a background thread while the detector runs, `batch` at a time. decode:
        "gpu" (NVDEC; frames stay on the GPU: call retinanet.video.prepare_nvdec() before
        loading the model), "cpu", or "auto" (NVDEC on machines of few CPU cores, see
        video.VideoReader). `timeout`: seconds a URL or camera may stay silent (default 10)."""
        reader = self.open_video(source, timeout, decode)
        try:
            yield from self.detect_frames(reader, batch)
        finally:
            reader.close()

    def open_video(self, source: str, timeout: float | None = None, decode: str = "auto"):
        """A video.VideoReader decoding `source` for this detector (see stream)."""
        from ..video import VIDEO_TIMEOUT, VideoReader

        return VideoReader(source, self.backend.preprocess_device, timeout or VIDEO_TIMEOUT, decode)

    def detect_frames(self, reader, batch: int):
        """(index, time, frame, detections) of each frame of a video.VideoReader, one batch in
        flight: batch k's detections come back while the device runs batch k + 1."""
        # A non-blocking stream: on the legacy default one, the network would wait for
        # FFmpeg's copies of decoded frames (and they for it), serialising decode and network.
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        pending = None
        for frames in reader.batches(batch):
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                launched = (frames, *self._launch([f.image for f in frames]))
            if pending is not None:
                yield from self._finish(*pending)
            pending = launched
        if pending is not None:
            yield from self._finish(*pending)

    def _launch(self, images: list[Tensor]):
        """Resize and pad same-size frames as one batch and start the network, without waiting."""
        stack = torch.stack(images).to(self.backend.preprocess_device)
        h, w = stack.shape[-2:]
        resized, scale = T.resize_image(stack, self.config.resize, self.config.max_size)
        valid = tuple(resized.shape[-2:])
        padded = pad_images(resized, padded_size([valid], self.config.pad_multiple), self.fill)
        outputs = self.run(padded, torch.tensor([valid] * len(images), dtype=torch.int32))
        on_gpu = outputs[0].is_cuda
        outputs = [t.to("cpu", non_blocking=on_gpu) for t in outputs]  # pinned, when from a GPU
        event = torch.cuda.Event() if on_gpu else None
        if event is not None:
            event.record()
        return outputs, event, torch.tensor([scale] * len(images)), [(int(h), int(w))] * len(images)

    def _finish(self, frames, outputs, event, scales, sizes):
        if event is not None:
            event.synchronize()
        for frame, dets in zip(frames, self.to_original(*outputs, scales, sizes)):
            yield frame.index, frame.time, frame.image, dets


def _rotated_to_original(boxes: Tensor, scale: Tensor) -> Tensor:
    """(cx, cy, w, h, θ) in input pixels -> original pixels. The x and y scales differ by the
    resize's rounding only: the size takes their mean, the angle stays."""
    sx, sy = scale.tolist()
    mean = (sx + sy) / 2
    return boxes / torch.tensor([sx, sy, mean, mean, 1.0], dtype=boxes.dtype)


def _as_chw_uint8(item, device: torch.device) -> Tensor:
    """One image as uint8 [3, H, W] on `device`; JPEG files nvJPEG takes decode on the GPU there."""
    if isinstance(item, (str, os.PathLike)):
        try:
            return decode_file(os.fspath(item), device)
        except CorruptImage as e:
            raise UserError(str(e)) from None
    if isinstance(item, np.ndarray):
        if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
            raise UserError(f"image array must be HxWx3 uint8, got {item.shape} {item.dtype}")
        if not item.flags.writeable:  # np.asarray(PIL image): torch warns on sharing read-only memory
            item = item.copy()
        return torch.from_numpy(np.ascontiguousarray(item)).permute(2, 0, 1).to(device)
    if isinstance(item, Tensor):
        if item.ndim != 3 or item.shape[0] != 3:
            raise UserError(f"image tensor must be 3xHxW, got {tuple(item.shape)}")
        if item.is_floating_point():  # 0..1 floats, the torchvision convention
            item = (item.clamp(0, 1) * 255).round()
        return item.to(device=device, dtype=torch.uint8)
    raise UserError(f"cannot read an image from {type(item).__name__}")


def load(path: str, device=None, full_precision: bool = False, compile: bool = False) -> Detector:
    """Open a checkpoint (.pth) or an exported ONNX model (.onnx, run with ONNX Runtime).

    full_precision: run a checkpoint's network in float32 on the GPU (default:
    fp16). compile: torch.compile a checkpoint's network. An ONNX model carries
    its precision and runs in ONNX Runtime; both flags are ignored for it.
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".pth", ".pt"):
        from .pytorch import TorchBackend

        backend = TorchBackend.from_checkpoint(path, device, full_precision, compile)
        return Detector(backend, backend.config, backend.category_ids)
    if suffix == ".onnx":
        from .onnxruntime import OnnxRuntimeBackend

        backend = OnnxRuntimeBackend(path, device)
        return Detector(backend, backend.config, backend.category_ids)
    if suffix in (".plan", ".engine"):
        from .tensorrt import TensorRTBackend

        backend = TensorRTBackend(path, device)
        return Detector(backend, backend.config, backend.category_ids)
    raise UserError(
        f"{path}: unknown model format {suffix!r} "
        f"(expected a .pth checkpoint, an .onnx model or a .plan/.engine TensorRT engine)"
    )
