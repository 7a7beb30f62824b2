"""NVIDIA DALI pipelines (`--with-dali`): the PyTorch loader's batches, decoded
and augmented by DALI (on the GPU, or on the CPU where there is none).

Division of labour, so both loaders give the same batches:
- DALI reads (sharded per rank, reshuffled each epoch), decodes (ROI-only when
  cropping), crops, resizes, flips, rotates, adjusts colour and pads. It draws
  the random parameters itself and returns them with the images.
- The boxes come from the validated `CocoAnnotations` by image id and go
  through `transforms.transform_targets` with the reported parameters: the
  code the PyTorch loader runs. Crowd regions and the category-id map are thus
  handled identically by construction (DALI's own COCO reader would remap ids
  and return crowd boxes unmarked).
- Both decode the image as displayed: DALI's decoders and shape peeks apply
  the EXIF orientation (set explicitly below, not left to DALI's default) as
  `images.read_image` does, so boxes, sizes and crop windows all refer to the
  oriented image, and its size is checked against the annotations the same way.
- The result is the PyTorch loader's `Batch`: uint8 pixels (the model
  normalises, as for every input), padded to the model's multiple with the
  mean pixel.

DALI 2.x from PyPI (`nvidia-dali-cuda130`, the `[dali]` extra): the seed
design's nvidia-dali-cuda110 is a source-only stub that no longer installs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UserError
from . import transforms as T
from .batch import Batch, stack_targets
from .coco import CocoAnnotations, DetectionDataset, ImageRecord, check_decoded_size

INSTALL_HINT = "--with-dali needs NVIDIA DALI: pip install 'retinanet[dali]' (nvidia-dali-cuda130)"


def require_dali():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    import nvidia.dali as dali

    return dali


@dataclass
class PipelineOptions:
    batch: int
    max_size: int
    multiple: int  # pad height and width to a multiple of this
    threads: int = 4
    device_id: int | None = None  # None: CPU pipeline
    shard: int = 0
    shards: int = 1
    seed: int = 0  # this pipeline's random draws (differs per rank)
    shuffle_seed: int = 0  # the reader's epoch shuffle (the same on every rank: one global order)
    prefetch: int = 2


def shard_range(size: int, shard: int, shards: int) -> range:
    """The samples of shard `shard` of `shards`: DALI's readers' split, used for inference too."""
    return range(size * shard // shards, size * (shard + 1) // shards)


def _reader_annotations(coco: CocoAnnotations, folder: str) -> str:
    """A minimal COCO JSON for DALI's reader, written from the validated file.

    It only locates files and gives the crop search the object boxes: crowd
    regions are marked iscrowd (the reader then leaves them out) and every
    category is one id, so nothing in it can disagree with `coco`.
    """
    images, annotations = [], []
    for rec in coco.images:
        images.append({"id": rec.id, "file_name": rec.file_name})
        for (x1, y1, x2, y2), label in zip(rec.boxes, rec.labels):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": rec.id,
                    "category_id": 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": int(label < 0),
                }
            )
    path = os.path.join(folder, "reader.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "object"}]}, f)
    return path


def _float64(node):
    from nvidia.dali import fn, types

    return fn.cast(node, dtype=types.FLOAT64)


def _resize_to(images, height, width, short, max_size: int):
    """Resize to `transforms.resized_shape` of (height, width), same float64 arithmetic."""
    from nvidia.dali import fn, math, types

    scale = math.min(short / math.min(height, width), max_size / math.max(height, width))
    nh = math.max(math.floor(height * scale + 0.5), 1.0)
    nw = math.max(math.floor(width * scale + 0.5), 1.0)
    return fn.resize(
        images,
        resize_x=fn.cast(nw, dtype=types.FLOAT),
        resize_y=fn.cast(nh, dtype=types.FLOAT),
        interp_type=types.INTERP_LINEAR,
        antialias=True,
    )


def _crop_window(boxes, height, width):
    """Integer (x0, y0), (w, h) of DALI's random bounding-box crop.

    The window search is DALI's, with the thresholds, scaling and aspect of
    transforms.random_crop_window; it is rounded to whole pixels here so that
    the image slice and the boxes use the very same window.
    """
    from nvidia.dali import fn, math, types

    size = fn.stack(width, height, width, height)
    rel = fn.cast(boxes, dtype=types.FLOAT64) / size
    anchor, shape, _ = fn.random_bbox_crop(
        fn.cast(rel, dtype=types.FLOAT),
        bbox_layout="xyXY",
        thresholds=[t for t in T.CROP_THRESHOLDS if t],
        allow_no_crop=None in T.CROP_THRESHOLDS,
        scaling=list(T.CROP_SCALING),
        aspect_ratio=list(T.CROP_ASPECT),
        num_attempts=T.CROP_ATTEMPTS,
        total_num_attempts=10 * T.CROP_ATTEMPTS,
        quiet=True,
    )
    cw = math.clamp(math.floor(_float64(shape[0]) * width + 0.5), 1.0, width)
    ch = math.clamp(math.floor(_float64(shape[1]) * height + 0.5), 1.0, height)
    x0 = math.clamp(math.floor(_float64(anchor[0]) * width + 0.5), 0.0, width - cw)
    y0 = math.clamp(math.floor(_float64(anchor[1]) * height + 0.5), 0.0, height - ch)

    def as_int(v):
        return fn.cast(v, dtype=types.INT32)

    return fn.stack(as_int(x0), as_int(y0)), fn.stack(as_int(cw), as_int(ch))


def training_pipeline(
    images_dir: str, reader_json: str, opts: PipelineOptions, jitter: tuple[int, int], augment: T.Augment
):
    """Outputs: images (HWC, padded), image ids, original (h, w), shorter side,
    crop (x0, y0, w, h; the whole image when not cropping), flip, quarter turns."""
    from nvidia.dali import Pipeline, fn, types

    pipe = Pipeline(
        batch_size=opts.batch,
        num_threads=opts.threads,
        device_id=opts.device_id,
        seed=opts.seed,
        prefetch_queue_depth=opts.prefetch,
    )
    gpu = opts.device_id is not None
    with pipe:
        jpegs, boxes, _, ids = fn.readers.coco(
            name="reader",
            file_root=images_dir,
            annotations_file=reader_json,
            ltrb=True,
            image_ids=True,
            include_iscrowd=False,
            skip_empty=False,
            size_threshold=0.0,
            avoid_class_remapping=True,
            shuffle_after_epoch=True,
            shuffle_after_epoch_seed=opts.shuffle_seed,
            shard_id=opts.shard,
            num_shards=opts.shards,
        )
        shape = fn.peek_image_shape(jpegs, adjust_orientation=True)
        height, width = _float64(shape[0]), _float64(shape[1])
        short = _float64(fn.random.uniform(values=[float(v) for v in range(jitter[0], jitter[1] + 1)]))
        # The crop window is in oriented coordinates, as image_slice reads it.
        decode = dict(device="mixed" if gpu else "cpu", output_type=types.RGB, adjust_orientation=True)
        if augment.crop:
            anchor, size = _crop_window(boxes, height, width)
            images = fn.decoders.image_slice(jpegs, anchor, size, axis_names="WH", **decode)
            height, width = _float64(size[1]), _float64(size[0])
        else:
            images = fn.decoders.image(jpegs, **decode)
            anchor = fn.stack(fn.cast(0, dtype=types.INT32), fn.cast(0, dtype=types.INT32))
            size = fn.stack(fn.cast(width, dtype=types.INT32), fn.cast(height, dtype=types.INT32))
        images = _resize_to(images, height, width, short, opts.max_size)
        flip = fn.random.coin_flip(probability=0.5, dtype=types.INT32)
        images = fn.flip(images, horizontal=flip)
        turns = fn.random.uniform(values=[0, 1, 2, 3] if augment.rotate else [0], dtype=types.INT32)
        if augment.rotate:
            images = fn.rotate(
                images, angle=fn.cast(turns, dtype=types.FLOAT) * 90.0, keep_size=False, interp_type=types.INTERP_NN
            )
        if augment.brightness or augment.contrast:

            def factor(on, amp):
                return fn.random.uniform(range=[1 - amp, 1 + amp]) if on else 1.0

            images = fn.brightness_contrast(
                images,
                brightness=factor(augment.brightness, augment.brightness_range),
                contrast=factor(augment.contrast, augment.contrast_range),
            )
        if augment.saturation or augment.hue:
            sat = (
                fn.random.uniform(range=[1 - augment.saturation_range, 1 + augment.saturation_range])
                if augment.saturation
                else 1.0
            )
            hue = fn.random.uniform(range=[-360 * augment.hue_range, 360 * augment.hue_range]) if augment.hue else 0.0
            images = fn.hsv(images, saturation=sat, hue=hue)
        images = fn.pad(images, axes=(0, 1), align=(opts.multiple, opts.multiple), fill_value=0)
        window = fn.cat(anchor, size)
        pipe.set_outputs(
            images, ids, fn.stack(shape[0], shape[1]), fn.cast(short, dtype=types.INT32), window, flip, turns
        )
    return pipe


def inference_pipeline(images_dir: str, files: list[str], labels: list[int], opts: PipelineOptions, resize: int):
    """Outputs: images (HWC, padded), the label of each file, original (h, w).

    `files` is this rank's share already: DALI's own sharding refuses more
    shards than files, which a small validation set on many GPUs can meet."""
    from nvidia.dali import Pipeline, fn, types

    pipe = Pipeline(
        batch_size=opts.batch,
        num_threads=opts.threads,
        device_id=opts.device_id,
        seed=opts.seed,
        prefetch_queue_depth=opts.prefetch,
    )
    gpu = opts.device_id is not None
    with pipe:
        jpegs, index = fn.readers.file(
            name="reader", file_root=images_dir, files=files, labels=labels, pad_last_batch=True
        )
        shape = fn.peek_image_shape(jpegs, adjust_orientation=True)
        images = fn.decoders.image(
            jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB, adjust_orientation=True
        )
        images = _resize_to(images, _float64(shape[0]), _float64(shape[1]), float(resize), opts.max_size)
        images = fn.pad(images, axes=(0, 1), align=(opts.multiple, opts.multiple), fill_value=0)
        pipe.set_outputs(images, index, fn.stack(shape[0], shape[1]))
    return pipe


def _dali_reason(error: Exception) -> str:
    """The line of a DALI pipeline error that says what went wrong."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    if "encountered:" in lines:
        after = lines[lines.index("encountered:") + 1 :]
        if after:
            return after[0]
    return lines[-1] if lines else type(error).__name__


def _unreadable(images_dir: str, records: list[ImageRecord]) -> str | None:
    """The first record whose file does not open as an image (header check), as a message."""
    from PIL import Image

    for rec in records:
        path = os.path.join(images_dir, rec.file_name)
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
            return f"{path}: cannot decode image ({str(e).splitlines()[0]}) (image id {rec.id})"
    return None


def _to_torch(tensor_list, device: torch.device | None) -> Tensor:
    """A dense DALI batch as a torch tensor (a copy: DALI reuses its buffers)."""
    import numpy as np

    if (
        device is not None
        and device.type == "cuda"
        and hasattr(tensor_list, "as_cpu")
        and type(tensor_list).__name__ == "TensorListGPU"
    ):
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        dense = tensor_list.as_tensor()
        out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(tensor_list.as_tensor()))


class DaliLoader:
    """Iterates `Batch`es from a DALI pipeline.

    Training: each iteration over it is one epoch of `batches` batches (the
    reader reshuffles between epochs). Inference: one pass over the shard,
    every image exactly once.
    """

    def __init__(
        self,
        pipe,
        images_dir: str,
        records: list[ImageRecord],
        opts: PipelineOptions,
        fill: tuple[int, int, int],
        output_device: torch.device,
        batches: int,
        shard: range | None = None,
        resize: int = 0,
    ):
        self.pipe, self.images_dir, self.records, self.opts = pipe, images_dir, records, opts
        self.fill = torch.tensor(fill, dtype=torch.uint8)
        self.device = output_device
        self.training = shard is None
        self.batches, self.resize = batches, resize
        self.count = len(shard) if shard is not None else None
        self.by_id = {rec.id: rec for rec in records}
        if pipe is not None:
            pipe.build()
        # Read by progress logging: the images this loader delivers.
        self.dataset = records if shard is None else records[shard.start : shard.stop]

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        delivered = 0
        for _ in range(self.batches):
            outs = self.run()
            if self.training:
                batch = self._training_batch(outs)
            else:
                batch = self._inference_batch(outs, self.count - delivered)
            delivered += len(batch.image_ids)
            yield batch

    def run(self) -> tuple:
        """One batch of pipeline outputs. A DALI failure (a file it cannot
        decode, typically) becomes a UserError naming the file when a header
        check finds it, since DALI's message does not name it."""
        try:
            return self.pipe.run()
        except RuntimeError as e:
            reason = _dali_reason(e)
            bad = _unreadable(self.images_dir, self.dataset)
            if bad is not None:
                raise UserError(f"{bad}; DALI: {reason}") from None
            raise UserError(
                f"{self.images_dir}: DALI failed on an image ({reason}); run without --with-dali to find the file"
            ) from None

    def _output_device(self) -> torch.device | None:
        return self.device if self.opts.device_id is not None else None

    def _fill_padding(self, images: Tensor, sizes: list[tuple[int, int]]) -> Tensor:
        """NHWC images -> [B, 3, H, W] uint8 (a channels-last view), the padding set to the mean pixel."""
        images = images.permute(0, 3, 1, 2)
        hw = torch.tensor(sizes, device=images.device).reshape(-1, 2)
        rows = torch.arange(images.shape[2], device=images.device)
        cols = torch.arange(images.shape[3], device=images.device)
        inside = (rows[None, :, None] < hw[:, 0, None, None]) & (cols[None, None, :] < hw[:, 1, None, None])
        return torch.where(inside[:, None], images, self.fill.to(images.device).view(1, 3, 1, 1))

    def _batch(self, images: Tensor, samples: list[tuple[ImageRecord, T.Geometry, tuple[int, int]]]) -> Batch:
        """The `Batch` of DALI's images and, per image, its record, the Geometry DALI
        applied and the original (h, w): the targets come from the PyTorch loader's code."""
        targets, sizes, scales = [], [], []
        for rec, geometry, (h, w) in samples:
            error = check_decoded_size(rec, h, w, os.path.join(self.images_dir, rec.file_name))
            if error is not None:  # raised here: DALI runs in this process
                raise UserError(error)
            t, size, scale = T.transform_targets(DetectionDataset.targets(rec), geometry, h, w, self.opts.max_size)
            targets.append(t)
            sizes.append(size)
            scales.append(scale)
        return Batch(
            self._fill_padding(images, sizes),
            stack_targets(targets),
            [rec.id for rec, _, _ in samples],
            torch.tensor(scales, dtype=torch.float32).reshape(-1, 2),
            [hw for _, _, hw in samples],
            valid=torch.tensor(sizes, dtype=torch.int32).reshape(-1, 2),
        )

    def _training_batch(self, outs) -> Batch:
        samples = [(self.by_id[image_id], geometry, hw) for image_id, hw, geometry in training_params(outs)]
        return self._batch(_to_torch(outs[0], self._output_device()), samples)

    def _inference_batch(self, outs, remaining: int) -> Batch:
        import numpy as np

        images, index, shapes = outs
        index = np.array(index.as_tensor()).reshape(-1)
        shapes = np.array(shapes.as_tensor()).reshape(-1, 2)
        keep = min(remaining, len(index))  # the shard's last batch is padded with repeats
        samples = [
            (self.records[int(index[i])], T.Geometry(self.resize), (int(shapes[i, 0]), int(shapes[i, 1])))
            for i in range(keep)
        ]
        return self._batch(_to_torch(images, self._output_device())[:keep], samples)


def training_params(outs) -> list[tuple[int, tuple[int, int], T.Geometry]]:
    """Per sample of a training pipeline's outputs: image id, original (h, w), its Geometry."""
    import numpy as np

    ids, shapes, shorts, windows, flips, turns = (np.array(o.as_tensor()).reshape(len(o), -1) for o in outs[1:])
    params = []
    for i in range(len(ids)):
        h, w = int(shapes[i, 0]), int(shapes[i, 1])
        window = tuple(int(v) for v in windows[i])
        crop = None if window == (0, 0, w, h) else window
        params.append(
            (int(ids[i, 0]), (h, w), T.Geometry(int(shorts[i, 0]), crop, bool(flips[i, 0]), int(turns[i, 0])))
        )
    return params


def _device_id(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def training_loader(
    images_dir: str,
    coco: CocoAnnotations,
    batch: int,
    max_size: int,
    multiple: int,
    fill: tuple[int, int, int],
    jitter: tuple[int, int],
    augment: T.Augment,
    device: torch.device,
    threads: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
) -> DaliLoader:
    require_dali()
    # The same number of steps on every rank: DDP needs every rank at every step.
    batches = (len(coco.images) // world) // batch
    if batches == 0:
        raise UserError(f"{coco.path}: {len(coco.images)} images are fewer than one batch of {batch} per rank")
    # One global shuffle (same seed on every rank) cut into disjoint shards;
    # per-rank augmentation draws.
    opts = PipelineOptions(
        batch, max_size, multiple, threads, _device_id(device), rank, world, seed=seed * 7919 + rank, shuffle_seed=seed
    )
    folder = tempfile.mkdtemp(prefix="retinanet-dali-")
    try:
        pipe = training_pipeline(images_dir, _reader_annotations(coco, folder), opts, jitter, augment)
        return DaliLoader(pipe, images_dir, coco.images, opts, fill, device, batches)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # the reader parsed it when the pipeline was built


def inference_loader(
    images_dir: str,
    records: list[ImageRecord],
    batch: int,
    resize: int,
    max_size: int,
    multiple: int,
    fill: tuple[int, int, int],
    device: torch.device,
    threads: int,
    rank: int = 0,
    world: int = 1,
) -> DaliLoader:
    require_dali()
    for rec in records:
        path = os.path.join(images_dir, rec.file_name)
        if not os.path.isfile(path):
            raise UserError(f"{path}: image file not found (image id {rec.id})")
    opts = PipelineOptions(batch, max_size, multiple, threads, _device_id(device), rank, world)
    mine = shard_range(len(records), rank, world)
    pipe = None
    if len(mine):  # an empty shard (more ranks than images) reads nothing
        pipe = inference_pipeline(images_dir, [records[i].file_name for i in mine], list(mine), opts, resize)
    return DaliLoader(pipe, images_dir, records, opts, fill, device, -(-len(mine) // batch), mine, resize)
