"""Video in and out with PyAV: files, rtsp/http URLs and cameras decoded to frames, and
annotated video encoded as H.264.

PyAV's wheels bundle FFmpeg (with libx264), so nothing is needed on the system. On
a GPU, frames can be decoded by NVDEC and stay on the GPU (DLPack), converted from
NV12 to RGB there; elsewhere FFmpeg decodes on the CPU with its frame threads.
"""

from __future__ import annotations

import ctypes
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
from torch import Tensor

from .errors import UserError
from .files import atomic_write

VIDEO_TIMEOUT = 10.0  # seconds a URL or camera may stay silent (infer --video-timeout)
DEFAULT_RATE = Fraction(30)  # written when a live source states no frame rate
DECODE_CHOICES = ("auto", "cpu", "gpu")
# Frames decoded ahead of the detector: enough to cover a batch being inferred.
READ_AHEAD = 64
# decode="auto" decodes on the CPU from this many cores up: on the H200 (16 cores, 1080p
# H.264, ResNet50FPN at 800, batch 16) FFmpeg's frame threads fed the network 581 frames/s
# against NVDEC's 384 (NVDEC alone: 563), and left the encoder more room; with few cores
# the CPU decoder falls behind the GPU.
CPU_DECODE_CORES = 8


def require_av():
    try:
        import av
    except ImportError:
        raise UserError("video needs PyAV: pip install 'retinanet[video]'") from None
    return av


@dataclass
class Frame:
    index: int  # 0, 1, ... in decoding order
    time: float  # seconds from the stream's start
    image: Tensor  # uint8 [3, H, W], on the device that will run the detector


def is_live(source: str) -> bool:
    return "://" in source or source.startswith("/dev/video")


def open_source(source: str, timeout: float = VIDEO_TIMEOUT, hwaccel=None):
    """The PyAV container of a file, URL or camera with a video stream; one line if not.

    With `hwaccel`, a source that the hardware decoder cannot open is opened for the CPU
    decoder instead."""
    av = require_av()
    if not is_live(source) and not os.path.isfile(source):
        raise UserError(f"{source}: video file not found")
    kwargs: dict = {"timeout": timeout, "hwaccel": hwaccel}
    if source.startswith("/dev/video"):
        kwargs["format"] = "v4l2"
    if source.startswith("rtsp://"):
        kwargs["options"] = {"rtsp_transport": "tcp"}  # UDP loses packets, and frames with them
    start = time.monotonic()
    try:
        container = av.open(source, **kwargs)
    except av.error.FFmpegError as e:
        # FFmpeg reports a timeout as "exit requested", or (RTSP) as bad data
        if isinstance(e, av.error.ExitError) or time.monotonic() - start >= timeout:
            raise UserError(f"{source}: no answer within {timeout:g} s (--video-timeout)") from None
        if hwaccel is not None:  # the reader gives the notice when CPU-decoded frames arrive
            return open_source(source, timeout)
        raise UserError(f"{source}: cannot read video ({e.strerror or e})") from None
    if not container.streams.video:
        container.close()
        raise UserError(f"{source}: no video stream in it")
    return container


def _matrix(frame) -> tuple[float, float]:
    """Kr, Kb of the frame's YUV matrix: BT.709 and BT.2020 where tagged, else BT.601,
    the default of FFmpeg's own conversion (swscale), so both paths agree."""
    return {1: (0.2126, 0.0722), 9: (0.2627, 0.0593), 10: (0.2627, 0.0593)}.get(int(frame.colorspace), (0.299, 0.114))


def yuv_to_rgb(y: Tensor, u: Tensor, v: Tensor, kr: float, kb: float, full_range: bool) -> Tensor:
    """uint8 planes (chroma at half resolution, nearest upsampled) -> uint8 RGB [3, H, W]."""
    h, w = y.shape
    u = u.repeat_interleave(2, 0).repeat_interleave(2, 1)[:h, :w].float() - 128
    v = v.repeat_interleave(2, 0).repeat_interleave(2, 1)[:h, :w].float() - 128
    yf = y.float()
    if full_range:
        scale_c = 1.0
    else:
        yf, scale_c = (yf - 16) * (255 / 219), 255 / 224
    r = yf + (2 * (1 - kr) * scale_c) * v
    b = yf + (2 * (1 - kb) * scale_c) * u
    g = (yf - kr * r - kb * b) / (1 - kr - kb)
    return torch.stack([r, g, b]).round_().clamp_(0, 255).to(torch.uint8)


def gpu_image(frame, device: torch.device) -> Tensor | None:
    """RGB of an NVDEC frame kept on the GPU; None for frames in another layout.

    The planes come through DLPack without a stream handshake (PyAV refuses one):
    FFmpeg copies the decoded surface on the legacy default stream of the primary
    context, torch's, which every kernel queued here on the default stream follows."""
    if getattr(frame.format, "name", "") != "cuda" or getattr(frame, "sw_format", None) is None:
        return None
    if frame.sw_format.name != "nv12":
        return None
    y = torch.from_dlpack(frame.planes[0].__dlpack__(stream=None))
    uv = torch.from_dlpack(frame.planes[1].__dlpack__(stream=None))
    kr, kb = _matrix(frame)
    return yuv_to_rgb(y.to(device), uv[..., 0], uv[..., 1], kr, kb, int(frame.color_range) == 2)


def cpu_image(frame) -> Tensor:
    return torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)


class _Stopped(Exception):
    """close() was called while frames were still being read."""


class VideoReader:
    """Frames of a source, decoded in a background thread, `READ_AHEAD` at most waiting.

    decode: "gpu" (NVDEC, frames stay on the GPU), "cpu" (FFmpeg's frame threads, frames
    uploaded to the detector's device), or "auto": NVDEC for a detector on a GPU in a
    machine of fewer than CPU_DECODE_CORES cores, else the CPU. Where NVDEC cannot decode
    the stream, frames come from the CPU decoder, with one notice."""

    def __init__(self, source: str, device: torch.device, timeout: float = VIDEO_TIMEOUT, decode: str = "auto"):
        if decode not in DECODE_CHOICES:
            raise UserError(f"decode must be one of {', '.join(DECODE_CHOICES)}, not {decode!r}")
        self.source, self.device, self.timeout = source, torch.device(device), timeout
        few_cores = (os.cpu_count() or 1) < CPU_DECODE_CORES
        gpu = self.device.type == "cuda" and (decode == "gpu" or (decode == "auto" and few_cores))
        hwaccel = _hwaccel(self.device) if gpu else None
        self._why = "" if hwaccel is not None else " (CUDA was set up before retinanet.video.prepare_nvdec())"
        self.container = open_source(source, timeout, hwaccel)
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"  # frame and slice threads for CPU decoding
        ctx = self.stream.codec_context
        self.width, self.height = ctx.width, ctx.height
        self.rate = self.stream.average_rate or self.stream.guessed_rate or DEFAULT_RATE
        self.error: str | None = None
        self._queue: queue.Queue = queue.Queue(READ_AHEAD)
        self._stop = threading.Event()
        self._notified = not gpu
        self._count = 0  # frames read so far
        self._upload = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.decoder = "nvdec" if gpu else "cpu"  # "cpu" once a frame comes from the CPU decoder
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _image(self, frame) -> Tensor:
        """The frame's RGB on the detector's device, ready: the GPU work is done on return.

        NVDEC frames are converted on the legacy default stream, after FFmpeg's copy of
        the surface; CPU frames are uploaded on a stream of their own. The detector runs on
        another non-blocking stream (Detector.detect_frames), so neither waits for it."""
        image = gpu_image(frame, self.device) if self.device.type == "cuda" else None
        if image is not None:
            torch.cuda.default_stream(self.device).synchronize()
            return image
        self.decoder = "cpu"
        if not self._notified:
            self._notified = True
            print(f"{self.source}: no NVDEC decoding here{self._why}; decoding on the CPU", file=sys.stderr)
        image = cpu_image(frame)
        if self._upload is not None:
            with torch.cuda.stream(self._upload):
                image = image.to(self.device)
            self._upload.synchronize()
        return image

    def _read(self) -> None:
        av = require_av()
        try:
            try:
                for packet in self.container.demux(self.stream):
                    self._put(packet.decode())
            except av.error.ExitError:
                self._put(self.stream.codec_context.decode(None))  # what was read before the silence
                raise
            except av.error.OSError:
                # A live stream that closes its connection ends with an I/O error, not an
                # EOF: take the frames still inside the decoder (its threads hold some).
                if not (is_live(self.source) and self._count):
                    raise
                self._put(self.stream.codec_context.decode(None))
        except _Stopped:
            pass
        except av.error.ExitError:
            self.error = f"{self.source}: no data for {self.timeout:g} s (--video-timeout); stopped there"
        except av.error.OSError as e:
            self.error = f"{self.source}: cannot read video ({e.strerror or e})"
        except (av.error.FFmpegError, RuntimeError) as e:
            self.error = f"{self.source}: cannot decode video ({str(e).splitlines()[0][:160]})"
        finally:
            self._queue.put(None)

    def _put(self, frames) -> None:
        for frame in frames:
            if self._stop.is_set():
                raise _Stopped
            index = self._count
            at = float(frame.time) if frame.time is not None else index / float(self.rate)
            self._queue.put(Frame(index, at, self._image(frame)))
            self._count += 1

    def batches(self, size: int) -> Iterator[list[Frame]]:
        """Lists of `size` frames (the last one shorter) until the source ends."""
        batch: list[Frame] = []
        while (frame := self._queue.get()) is not None:
            batch.append(frame)
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch
        if self.error is not None:
            raise UserError(self.error)

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():  # unblock a reader waiting on a full queue
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self.container.close()


CU_CTX_SCHED_BLOCKING_SYNC = 4


def prepare_nvdec(index: int = 0) -> bool:
    """Make NVDEC able to decode into the CUDA context torch uses; True where it can.

    FFmpeg (through PyAV) decodes in the device's primary context, the one torch uses,
    so that torch reads the frames in place; but it refuses that context unless it was
    made with blocking synchronisation, and torch makes it with the driver's default.
    Called before CUDA is first used in the process, this sets that flag (measured on
    the H200: without it, opening NVDEC fails with "Operation not supported" once a
    model is on the GPU). `retinanet infer --video` calls it before loading the model;
    Python API users call it first, else frames are decoded on the CPU."""
    try:
        cu = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    dev, flags, active = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
    if cu.cuInit(0) or cu.cuDeviceGet(ctypes.byref(dev), index):
        return False
    if cu.cuDevicePrimaryCtxGetState(dev, ctypes.byref(flags), ctypes.byref(active)):
        return False
    if active.value:
        return flags.value & 7 == CU_CTX_SCHED_BLOCKING_SYNC
    return cu.cuDevicePrimaryCtxSetFlags(dev, CU_CTX_SCHED_BLOCKING_SYNC) == 0


def _hwaccel(device: torch.device):
    """NVDEC settings for `device`, or None where it cannot share torch's context."""
    from av.codec.hwaccel import HWAccel

    index = device.index if device.index is not None else torch.cuda.current_device()
    if not prepare_nvdec(index):
        return None
    return HWAccel(
        "cuda", device=str(index), allow_software_fallback=True, is_hw_owned=True, options={"primary_ctx": "1"}
    )


class VideoWriter:
    """An H.264 MP4 (yuv420p, libx264) written to a temp file and renamed into place on close.

    yuv420p needs even sizes: an odd width or height gets one repeated column or row."""

    def __init__(self, path: str, width: int, height: int, rate: Fraction):
        av = require_av()
        self.path = path
        self._files = ExitStack()
        f = self._files.enter_context(atomic_write(path, "wb"))
        self.container = av.open(f, "w", format="mp4")
        self.stream = self.container.add_stream("libx264", rate=rate)
        self.stream.width, self.stream.height = width + width % 2, height + height % 2
        self.stream.pix_fmt = "yuv420p"
        # ultrafast: encoding is the slowest stage on a GPU machine (no NVENC on data-centre GPUs).
        self.stream.options = {"preset": "ultrafast", "crf": "20"}
        self.stream.thread_type = "AUTO"
        self.frames = 0

    def write(self, rgb: np.ndarray) -> None:
        av = require_av()
        h, w = self.stream.height, self.stream.width
        if rgb.shape[:2] != (h, w):
            rgb = np.pad(rgb, ((0, h - rgb.shape[0]), (0, w - rgb.shape[1]), (0, 0)), mode="edge")
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = self.frames
        self.frames += 1
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self, failed: bool = False) -> None:
        """Flush and move the file into place; on failure remove the temp file instead."""
        try:
            if not failed:
                for packet in self.stream.encode():
                    self.container.mux(packet)
            self.container.close()
        except BaseException as e:
            self._files.__exit__(type(e), e, e.__traceback__)
            raise
        if failed:
            self._files.__exit__(RuntimeError, RuntimeError("failed"), None)
        else:
            self._files.close()
