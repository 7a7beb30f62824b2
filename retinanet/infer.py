"""Batched inference over an image folder, COCO results JSON, optional mAP."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Subset

from . import distributed, evaluate, infer_video, runtime
from .data.batch import Collate
from .data.coco import CocoAnnotations, DetectionDataset, check_box_form, folder_records
from .data.gpu import GpuBatches
from .draw import DRAW_THRESHOLD, draw
from .errors import UserError
from .files import atomic_write, check_output
from .images import CorruptImage, mean_pixel, read_image
from .runtime import Detections, Detector
from .video import VIDEO_TIMEOUT


def detection_records(detector: Detector, loader, log=None, timing: dict | None = None) -> list[dict]:
    """Run the detector over a loader of Batches; COCO result records in original pixels.

    One batch deep: batch k's detections are copied back and turned into
    records while the device runs batch k + 1. `timing` (when given) receives
    the time the first batch was done, the seconds of the whole loop, and the image count."""
    records: list[dict] = []
    done, start = 0, time.perf_counter()
    pending = None
    for batch in loader:
        if batch.errors:
            raise UserError(batch.errors[0])
        if not batch.image_ids:
            continue
        outputs = [t.to("cpu", non_blocking=True) for t in detector.run(batch.images, batch.valid)]
        event = torch.cuda.Event() if outputs[0].is_pinned() else None
        if event is not None:
            event.record()
        if pending is not None:
            records += batch_records(detector, *pending)
        pending = (batch, outputs, event)
        if timing is not None and "first_batch_at" not in timing:
            if event is not None:
                event.synchronize()
            timing["first_batch_at"] = time.time()
        done += len(batch.image_ids)
        if log is not None:
            rate = done / max(time.perf_counter() - start, 1e-9)
            log(f"\rinfer {done}/{len(loader.dataset)} images, {rate:.1f} img/s")
    if pending is not None:
        records += batch_records(detector, *pending)
    if timing is not None:
        timing["total_s"], timing["images"] = time.perf_counter() - start, done
    if log is not None and done:
        log("\n")
    return records


def batch_records(detector: Detector, batch, outputs, event) -> list[dict]:
    """COCO result records of one batch's outputs (scores, boxes, classes), once they arrived."""
    if event is not None:
        event.synchronize()
    dets = detector.to_original(*outputs, batch.scales, batch.sizes)
    offset = detector.config.box_offset
    return [r for image_id, d in zip(batch.image_ids, dets) for r in d.records(image_id, offset)]


def choose_loader(device: torch.device, with_dali: bool) -> str:
    """Which loader feeds the detector: "dali" when asked, "gpu" (nvJPEG decoding, resizing and
    padding on the GPU) for detectors on a GPU, else "cpu" (PyTorch's
    DataLoader: worker processes decode and resize)."""
    if with_dali:
        return "dali"
    return "gpu" if device.type == "cuda" else "cpu"


def make_loader(
    detector: Detector,
    images: str,
    annotations: CocoAnnotations | None,
    batch: int,
    resize: int,
    max_size: int,
    workers: int,
    rank: int = 0,
    world: int = 1,
    with_dali: bool = False,
):
    """Every image on exactly one rank: rank r of `world` reads images r, r + world, ...;
    with DALI a contiguous shard."""
    dataset = DetectionDataset(images, annotations, resize, max_size)
    kind = choose_loader(detector.device, with_dali)
    fill = mean_pixel(detector.config.mean)
    if kind == "dali":
        from .data import dali

        return dali.inference_loader(
            images,
            dataset.records,
            batch,
            resize,
            max_size,
            detector.config.pad_multiple,
            fill,
            detector.device,
            max(workers, 1),
            rank,
            world,
        )
    if kind == "gpu":
        records = dataset.records[rank::world]
        multiple = detector.config.pad_multiple
        return GpuBatches(images, records, batch, resize, max_size, multiple, fill, detector.device, workers)
    if world > 1:
        dataset = Subset(dataset, range(rank, len(dataset), world))
    return DataLoader(
        dataset,
        batch_size=batch,
        shuffle=False,
        num_workers=workers,
        collate_fn=Collate(detector.config.pad_multiple, fill),
        pin_memory=detector.device.type == "cuda",
    )


def sharded_records(
    detector: Detector,
    images: str,
    annotations: CocoAnnotations | None,
    batch: int,
    resize: int,
    max_size: int,
    workers: int,
    log=None,
    with_dali: bool = False,
    timing: dict | None = None,
) -> list[dict]:
    """Detections of every image, each inferred on exactly one rank, gathered on all ranks."""
    loader = make_loader(
        detector,
        images,
        annotations,
        batch,
        resize,
        max_size,
        workers,
        distributed.rank(),
        distributed.world_size(),
        with_dali,
    )
    if distributed.world_size() == 1:
        return detection_records(detector, loader, log, timing)
    # A bad image on one rank must not leave the others waiting in the gather:
    # every rank reaches it, and all raise the first error.
    try:
        records, error = detection_records(detector, loader, log, timing), []
    except UserError as e:
        records, error = [], [str(e)]
    errors = distributed.gather_lists(error)
    if errors:
        raise UserError(errors[0])
    return distributed.gather_lists(records)


def process_start() -> float | None:
    """When this process started, as time.time() (Linux), None where unknown: the start-up a user
    waits for includes the interpreter and imports, before any of our code runs."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def speed_line(timing: dict, started: float | None) -> str:
    """The closing line of an inference: images per second, and when the first batch was done."""
    total, first = timing.get("total_s"), timing.get("first_batch_at")
    if not total or first is None:
        return "infer: no images inferred"
    images = timing.get("images", 0)
    line = f"infer: {images} images in {total:.2f} s ({images / total:.1f} img/s)"
    if started is not None:
        line += f"; first batch done {first - started:.2f} s after the process started"
    return line


@dataclass
class InferOptions:
    """The settings of `retinanet infer`: the one place their defaults are defined."""

    images: str = "."
    annotations: str | None = None  # COCO JSON: only its images are inferred, and mAP is printed
    batch: int | None = None  # images per batch, per process; None: distributed.default_batch()
    resize: int | None = None  # None: the model's
    max_size: int | None = None  # None: the model's
    workers: int = 2
    with_dali: bool = False
    full_precision: bool = False
    compile: bool = False
    draw: str | None = None  # folder of annotated images, or OUT.mp4 with video
    draw_threshold: float = DRAW_THRESHOLD
    video: str | None = None  # a video file, rtsp/http URL or camera instead of --images
    video_timeout: float = VIDEO_TIMEOUT


def launch(
    model_path: str, output: str, options: InferOptions, override: bool = False, timeout_s: float | None = None
) -> list[float] | None:
    """infer() in this process, or in the process group torchrun set up (images sharded over it)."""
    check_output(output, override, "--output file")  # before the model is even loaded
    check_inputs(options, override)
    if options.video is not None and torch.cuda.is_available():
        from .video import prepare_nvdec

        prepare_nvdec()  # before the model makes the CUDA context: NVDEC decodes into it
    place = distributed.from_env()
    device = None
    if place is not None and place.world > 1:
        device = distributed.device_for(place)
        distributed.init(place, device, timeout_s=timeout_s)
    try:
        detector = runtime.load(
            model_path, device=device, full_precision=options.full_precision, compile=options.compile
        )
        if options.video is not None:
            batch = options.batch or distributed.default_batch()
            infer_video.infer_video(
                detector,
                options.video,
                output,
                batch,
                options.draw,
                options.draw_threshold,
                options.video_timeout,
                override,
            )
            return None
        return infer(
            detector,
            options.images,
            options.annotations,
            output,
            options.batch or distributed.default_batch(),
            options.resize,
            options.max_size,
            workers=options.workers,
            override=override,
            with_dali=options.with_dali,
            drawn=options.draw,
            draw_threshold=options.draw_threshold,
        )
    finally:
        distributed.shutdown()


def infer(
    detector: Detector,
    images: str,
    annotations: str | None,
    output: str,
    batch: int,
    resize: int | None,
    max_size: int | None,
    workers: int,
    override: bool = False,
    quiet: bool = False,
    with_dali: bool = False,
    drawn: str | None = None,
    draw_threshold: float = DRAW_THRESHOLD,
) -> list[float] | None:
    """Write COCO result records to `output`; return the 12 stats when annotated.

    In a process group (torchrun) the images are sharded over the ranks and
    gathered; rank 0 writes the file and prints. `batch` is per process.
    """
    check_output(output, override, "--output file")
    if drawn is not None:
        check_draw_folder(drawn, images, override)
    if with_dali:
        from .data.dali import require_dali

        require_dali()  # before any work
    coco = None
    if annotations is not None:
        coco = CocoAnnotations(annotations, category_ids=None)
        check_box_form(coco, detector.config.rotated)
        # A model may know more categories than a dataset has (torchvision's COCO models
        # keep its 91-slot label space); evaluation covers the dataset's.
        unknown = sorted(set(coco.category_ids) - set(detector.category_ids.tolist()))
        if unknown:
            raise UserError(
                f"{annotations}: categories {unknown} are not among the model's {detector.category_ids.tolist()}"
            )
    main = distributed.rank() == 0
    quiet = quiet or not main
    # A live counter on a terminal; in a log file only the final count.
    log = None if quiet or not sys.stderr.isatty() else (lambda s: print(s, end="", file=sys.stderr, flush=True))
    timing: dict = {}
    records = sharded_records(
        detector,
        images,
        coco,
        batch,
        resize or detector.config.resize,
        max_size or detector.config.max_size,
        workers,
        log,
        with_dali,
        timing,
    )
    if not main:
        return None
    with atomic_write(output, "w") as f:
        f.write(json.dumps(records))  # dumps: the C encoder; dump() encodes in Python, chunk by chunk
    if drawn is not None:
        names = draw_images(records, images, coco, drawn, draw_threshold, detector)
        if not quiet:
            print(f"drew {names} images into {drawn}")
    if not quiet:
        print(f"wrote {len(records)} detections to {output}")
        print(speed_line(timing, process_start()), file=sys.stderr)
    if coco is None:
        return None
    rotated = detector.config.rotated
    stats = evaluate.coco_stats(annotations, records, [r.id for r in coco.images], rotated)
    if not quiet:
        print(evaluate.format_stats(stats, rotated))
    return stats


def check_inputs(options: InferOptions, override: bool) -> None:
    """Flags that exclude each other, and the --draw output, before the model is loaded."""
    if options.video is not None:
        if options.annotations is not None:
            raise UserError("--video reads a video: it takes neither --images nor --annotations")
        if options.with_dali:
            raise UserError("--with-dali reads image folders; --video decodes with PyAV")
        if distributed.world_size() > 1:
            raise UserError("--video runs in one process: start it without torchrun")
        infer_video.check_drawn_video(options.draw, override)
    elif options.draw is not None:
        check_draw_folder(options.draw, options.images, override)


def check_draw_folder(folder: str, images: str, override: bool) -> None:
    """--draw OUT for images: a writable folder other than the image folder."""
    if folder.lower().endswith(".mp4"):
        raise UserError(f"{folder}: a .mp4 --draw output is for --video; for images give a folder")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"{folder}: --draw needs a folder, and this is a file")
    if os.path.isdir(images) and os.path.exists(folder) and os.path.samefile(folder, images):
        raise UserError(f"{folder}: --draw must not be the image folder (the images would be replaced)")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"{folder}: cannot create the --draw folder ({e.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"{folder}: the --draw folder is not writable")
    if not override and os.listdir(folder):
        raise UserError(f"{folder}: --draw folder is not empty; pass --override to replace its drawings")


def draw_images(records, images: str, coco: CocoAnnotations | None, folder: str, threshold: float, detector) -> int:
    """Each inferred image with its detections drawn, under its own name in `folder`."""
    from PIL import Image

    files = [(r.id, r.file_name) for r in (coco.images if coco is not None else folder_records(images))]
    by_image: dict[int, list[dict]] = {}
    for r in records:
        by_image.setdefault(r["image_id"], []).append(r)
    for image_id, name in files:
        path = os.path.join(images, name)
        try:
            rgb = read_image(path).permute(1, 2, 0).numpy()
        except CorruptImage as e:
            raise UserError(str(e)) from None
        out = os.path.join(folder, name)
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        drawn = Image.fromarray(draw(rgb, _detections(by_image.get(image_id, []), detector), threshold))
        kind = Image.registered_extensions().get(os.path.splitext(name)[1].lower(), "PNG")
        with atomic_write(out, "wb") as f:
            # no chroma subsampling: it smears thin coloured lines and text
            drawn.save(f, format=kind, **({"quality": 95, "subsampling": 0} if kind == "JPEG" else {}))
    return len(files)


def _detections(records: list[dict], detector) -> Detections:
    """Records (x, y, w, h) back to boxes (x1, y1, x2, y2), or (cx, cy, w, h, θ) when rotated."""
    if detector.config.rotated:
        xywha = torch.tensor([r["bbox"] for r in records], dtype=torch.float32).reshape(-1, 5)
        boxes = torch.cat([xywha[:, :2] + xywha[:, 2:4] / 2, xywha[:, 2:]], dim=1)
    else:
        offset = detector.config.box_offset
        xywh = torch.tensor([r["bbox"] for r in records], dtype=torch.float32).reshape(-1, 4)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:] - offset], dim=1)
    scores = torch.tensor([r["score"] for r in records], dtype=torch.float32)
    ids = torch.tensor([r["category_id"] for r in records], dtype=torch.long)
    return Detections(boxes, scores, ids, detector.category_names)
