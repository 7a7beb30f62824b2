"""Inference batches decoded, resized and padded on the GPU.

Reader threads read files ahead of the network and parse their JPEG headers
(jpeg.py); the annotations are checked against the header's size before any
decoding. JPEGs that nvJPEG takes are decoded a batch at a time on the GPU, on
a side stream, so that decoding overlaps the previous batch's network; the
rest (PNG, progressive, CMYK, greyscale, EXIF-rotated) are decoded by the
reader threads on the CPU (images.read_image) and resized on the GPU with them.

Every batch has the full batch size: a short last batch is filled with padding
images, so that CUDA graphs and compiled networks see one input shape.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import jpeg
from ..images import CorruptImage, pad_images, padded_size, read_image
from . import transforms as T
from .batch import Batch
from .coco import ImageRecord, check_decoded_size

PREFETCH_BATCHES = 4  # batches being read ahead by the reader threads
READY_BATCHES = 2  # batches decoded and padded ahead of the network (GPU memory: 2 x 16 x 3 x 800 x 1344 B)


@dataclass
class Item:
    """One image as a reader thread leaves it: JPEG bytes for the GPU, or CPU pixels, or an error."""

    record: ImageRecord
    size: tuple[int, int] = (0, 0)  # (h, w) as decoded
    data: Tensor | None = None  # uint8 [n]: the file, for nvJPEG
    image: Tensor | None = None  # uint8 [3, h, w]: decoded on the CPU
    error: str | None = None


def read_bytes(path: str) -> bytearray:
    """The file's bytes; empty when it cannot be read (read_image then names the problem)."""
    try:
        with open(path, "rb") as f:
            return bytearray(f.read())
    except OSError:
        return bytearray()


def read_item(folder: str, record: ImageRecord) -> Item:
    path = os.path.join(folder, record.file_name)
    data = read_bytes(path)
    header = jpeg.for_gpu(data)
    if header is not None:
        size = (header.height, header.width)
        error = check_decoded_size(record, *size, path)
        return Item(record, size, data=torch.frombuffer(data, dtype=torch.uint8), error=error)
    try:
        image = read_image(path)
    except CorruptImage as e:
        return Item(record, error=f"{e} (image id {record.id})")
    size = (int(image.shape[1]), int(image.shape[2]))
    return Item(record, size, image=image, error=check_decoded_size(record, *size, path))


def decode_jpegs(data: list[Tensor], paths: list[str], device: torch.device) -> list[Tensor | str]:
    """JPEG files' bytes decoded on `device` in one batched call, per image where that fails;
    a file nvJPEG refuses goes through read_image, and one that cannot be decoded at all
    becomes its error message."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs in favour of torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            pass  # damaged data after a valid header fails the whole batch: find the file
        out: list[Tensor | str] = []
        for d, path in zip(data, paths):
            try:
                out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                try:
                    out.append(read_image(path).to(device))
                except CorruptImage as e:
                    out.append(str(e))
        return out


def decode_file(path: str, device: torch.device) -> Tensor:
    """One image file as uint8 [3, H, W] on `device`, decoded as image viewers show it: with
    nvJPEG where it gives what the CPU decoder gives (jpeg.gpu_decodable), else read_image.
    CorruptImage when it cannot be decoded."""
    if device.type != "cuda":
        return read_image(path).to(device)
    data = read_bytes(path)
    if jpeg.for_gpu(data) is None:
        return read_image(path).to(device)
    (image,) = decode_jpegs([torch.frombuffer(data, dtype=torch.uint8)], [path], device)
    if isinstance(image, str):
        raise CorruptImage(image)
    return image


class GpuBatches:
    """Iterable of Batches (images on `device`) over `records` of `folder`, in order."""

    def __init__(
        self,
        folder: str,
        records: list[ImageRecord],
        batch: int,
        resize: int,
        max_size: int,
        multiple: int,
        fill: tuple[int, int, int],
        device: torch.device,
        workers: int,
    ):
        self.folder, self.records, self.batch = folder, records, batch
        self.resize, self.max_size, self.multiple, self.fill = resize, max_size, multiple, fill
        self.device = device
        self.workers = max(workers, 1)
        self.dataset = records  # what progress counts, as for a DataLoader
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __len__(self) -> int:
        return -(-len(self.records) // self.batch)

    def __iter__(self):
        # A preparing thread decodes, resizes and pads ahead on its own stream, so
        # that this thread only launches the network and turns detections into records.
        ready: queue.Queue = queue.Queue(maxsize=READY_BATCHES)
        stop = threading.Event()
        worker = threading.Thread(target=self._prepare, args=(ready, stop), name="retinanet-prepare", daemon=True)
        worker.start()
        current = torch.cuda.current_stream(self.device) if self.stream is not None else None
        try:
            while True:
                got = ready.get()
                if got is None:
                    return
                if isinstance(got, BaseException):
                    raise got
                batch, event = got
                if current is not None and not batch.errors:
                    current.wait_event(event)
                    for t in (batch.images, batch.valid):
                        t.record_stream(current)  # made on the side stream, used on this one
                yield batch
        finally:
            stop.set()
            while worker.is_alive():  # unblock a put() waiting on a full queue
                with contextlib.suppress(queue.Empty):
                    ready.get(timeout=0.05)

    def _prepare(self, ready: queue.Queue, stop: threading.Event) -> None:
        """The preparing thread: Batches and their ready-events into `ready`, then None (or the exception)."""
        on_gpu = self.stream is not None
        try:
            with self._on_device():
                for items in self.item_batches():
                    batch = self._assemble(items)
                    event = torch.cuda.Event() if on_gpu else None
                    if event is not None:
                        event.record()
                    ready.put((batch, event))
                    if stop.is_set():
                        return
            ready.put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the consuming thread, which raises it
            ready.put(e)

    def _on_device(self) -> contextlib.ExitStack:
        """This loader's GPU and stream as the calling thread's current ones (nothing on the CPU)."""
        stack = contextlib.ExitStack()
        if self.stream is not None:
            # The device too: a new thread starts on GPU 0, whichever GPU this rank uses.
            stack.enter_context(torch.cuda.device(self.device))
            stack.enter_context(torch.cuda.stream(self.stream))
        return stack

    def item_batches(self):
        """Lists of read Items, one per batch, read ahead by the reader threads."""
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="retinanet-read")
        pending: deque[Future] = deque()
        todo = iter(self.records)
        try:
            for start in range(0, len(self.records), self.batch):
                while len(pending) < PREFETCH_BATCHES * self.batch:
                    record = next(todo, None)
                    if record is None:
                        break
                    pending.append(pool.submit(read_item, self.folder, record))
                n = min(self.batch, len(self.records) - start)
                yield [pending.popleft().result() for _ in range(n)]
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _assemble(self, items: list[Item]) -> Batch:
        jpegs = [it for it in items if it.data is not None]
        paths = [os.path.join(self.folder, it.record.file_name) for it in jpegs]
        decoded = decode_jpegs([it.data for it in jpegs], paths, self.device) if jpegs else []
        for it, image in zip(jpegs, decoded):
            if isinstance(image, str):
                it.error = f"{image} (image id {it.record.id})"
            else:
                it.image = image
        errors = [it.error for it in items if it.error]
        if errors:
            empty = torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
            return Batch(empty, torch.zeros(0, 0, 5), [], torch.zeros(0, 2), [], 0, errors)
        images, scales = [], []
        for it in items:
            assert it.image is not None
            img, scale = T.resize_image(it.image.to(self.device, non_blocking=True), self.resize, self.max_size)
            images.append(img)
            scales.append(scale)
        valid = [tuple(img.shape[-2:]) for img in images]
        size = padded_size(valid, self.multiple)
        # Padding images fill a short batch: one input shape for every batch.
        fill = self.batch - len(images)
        batch = pad_images(images + [images[0][:, :0, :0]] * fill, size, self.fill)
        return Batch(
            batch,
            torch.zeros(len(items), 0, 5),
            [it.record.id for it in items],
            torch.tensor(scales, dtype=torch.float32),
            [it.size for it in items],
            valid=torch.tensor(valid + [size] * fill, dtype=torch.int32, device=self.device),
        )
