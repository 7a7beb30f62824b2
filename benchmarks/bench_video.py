"""Video throughput: decode alone, decode + detect, decode + detect + draw + encode, in frames
per second, against the network's own throughput on the same batches (ours, same run).

A generated H.264 clip (moving shapes on a noisy gradient; 1920x1080, 600 frames by
default) is decoded by NVDEC (frames stay on the GPU) and by FFmpeg on the CPU. The
detector: ResNet50FPN at 800 (random weights, fp16, CUDA graphs) on a GPU, or the
demo preset on the CPU (`--demo`). "network" is `Detector.run` on a batch already
resized and padded on the device: the ceiling the video path is measured against.
Medians over `--repeat` passes.

    python benchmarks/bench_video.py [--frames 600] [--size 1920 1080] [--batch 16] [--demo]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch


def make_clip(path: str, frames: int, width: int, height: int, rate: int = 30) -> float:
    """Write the clip; returns the seconds it took."""
    import av

    start = time.perf_counter()
    rng = np.random.default_rng(0)
    base = np.clip(np.linspace(40, 215, width)[None, :, None] + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(
        np.uint8
    )
    side = height // 5
    with av.open(path, "w") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "23"}
        for i in range(frames):
            img = base.copy()
            x = (i * 7) % (width - side)
            img[height // 4 : height // 4 + side, x : x + side] = (230, 40, 40)
            y = (i * 5) % (height - side)
            img[y : y + side, width // 2 : width // 2 + side] = (40, 220, 40)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeat: int) -> float:
    """Median seconds of fn() over `repeat` runs (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_only(clip: str, device: torch.device, decode: str) -> int:
    from retinanet.video import VideoReader

    reader = VideoReader(clip, device, decode=decode)
    count = 0
    try:
        for frames in reader.batches(16):
            count += len(frames)
    finally:
        reader.close()
    return count


def detect(detector, clip: str, batch: int, decode: str) -> int:
    return sum(1 for _ in detector.stream(clip, batch=batch, decode=decode))


def detect_encode(detector, clip: str, batch: int, decode: str, out: str) -> int:
    from retinanet import infer_video
    from retinanet.video import VideoReader

    reader = VideoReader(clip, detector.backend.preprocess_device, decode=decode)
    writer = infer_video.VideoWriter(out, reader.width, reader.height, reader.rate)
    annotator = infer_video.Annotator(writer, 0.3)
    count = 0
    try:
        for _, _, frame, dets in detector.detect_frames(reader, batch):
            annotator.put(frame, dets)
            count += 1
    finally:
        reader.close()
        annotator.close(False)
    return count


def encode_only(clip: str, frames: int, out: str):
    """fn encoding `frames` frames (120 distinct decoded ones, cycled) with our writer: libx264's own rate."""
    import av

    from retinanet.video import VideoWriter

    with av.open(clip) as c:
        images = [f.to_ndarray(format="rgb24") for _, f in zip(range(120), c.decode(video=0))]

    def run():
        writer = VideoWriter(out, images[0].shape[1], images[0].shape[0], 30)
        for i in range(frames):
            writer.write(images[i % len(images)])
        writer.close()

    return run


def network_only(detector, frames: int, batch: int, width: int, height: int, device: torch.device):
    """fn running the network over `frames` frames in batches already resized and padded on the device."""
    from retinanet.data import transforms as T
    from retinanet.images import pad_images, padded_size

    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, device=device)
    resized, _ = T.resize_image(image, detector.config.resize, detector.config.max_size)
    size = padded_size([tuple(resized.shape[-2:])], detector.config.pad_multiple)
    images = pad_images([resized] * batch, size, detector.fill)
    valid = torch.tensor([list(resized.shape[-2:])] * batch, dtype=torch.int32)

    def run():
        for _ in range(frames // batch):
            out = detector.run(images, valid)
        [t.cpu() for t in out]

    return run, frames // batch * batch


def build_detector(demo: bool, device: torch.device, work: str):
    from retinanet import checkpoint, load
    from retinanet.config import ModelConfig
    from retinanet.model import RetinaNet

    if demo:
        from retinanet.config import DEMO_MODEL

        config = ModelConfig(**DEMO_MODEL, classes=3)
    else:
        config = ModelConfig(backbone="ResNet50FPN", classes=80, resize=800, max_size=1333)
    torch.manual_seed(0)
    model = RetinaNet(config).eval()
    path = os.path.join(work, "model.pth")
    ids = list(range(1, config.classes + 1))
    checkpoint.save(path, checkpoint.model_state(config, model, ids))
    return load(path, device=device)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=600)
    p.add_argument("--size", type=int, nargs=2, default=(1920, 1080), metavar=("W", "H"))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--demo", action="store_true", help="the demo preset (default on a machine without CUDA)")
    a = p.parse_args()
    try:
        import av  # noqa: F401
    except ImportError:
        print("bench_video: PyAV is not installed (pip install 'retinanet[video]'), skipped")
        return
    cuda = torch.cuda.is_available()
    if cuda:
        from retinanet.video import prepare_nvdec

        print(f"NVDEC shares torch's CUDA context: {prepare_nvdec()}")  # before CUDA is first used
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cudnn.benchmark = True
    work = tempfile.mkdtemp()
    clip = os.path.join(work, "clip.mp4")
    width, height = a.size
    made = make_clip(clip, a.frames, width, height)
    detector = build_detector(a.demo or not cuda, device, work)
    name = "demo preset" if (a.demo or not cuda) else "ResNet50FPN at 800"
    print(f"clip: {width}x{height} H.264, {a.frames} frames, made in {made:.1f} s; {name}, batch {a.batch}, {device}")
    net, net_frames = network_only(detector, a.frames, a.batch, width, height, device)
    rows = [("network alone (bench_infer's path)", net_frames, timed(net, device, a.repeat))]
    encode = encode_only(clip, a.frames, os.path.join(work, "encoded.mp4"))
    rows.append(("encode alone (libx264, from decoded frames)", a.frames, timed(encode, device, a.repeat)))
    for decode in ("gpu", "cpu") if cuda else ("cpu",):
        rows.append(
            (f"decode ({decode})", a.frames, timed(lambda d=decode: decode_only(clip, device, d), device, a.repeat))
        )
        rows.append(
            (
                f"decode ({decode}) + detect",
                a.frames,
                timed(lambda d=decode: detect(detector, clip, a.batch, d), device, a.repeat),
            )
        )
        out = os.path.join(work, f"out_{decode}.mp4")
        rows.append(
            (
                f"decode ({decode}) + detect + draw + encode",
                a.frames,
                timed(lambda d=decode, o=out: detect_encode(detector, clip, a.batch, d, o), device, a.repeat),
            )
        )
    ceiling = net_frames / rows[0][2]
    print("\n| stage | frames | median s | frames/s | vs network |\n|---|---:|---:|---:|---:|")
    for label, frames, seconds in rows:
        fps = frames / seconds
        print(f"| {label} | {frames} | {seconds:.3f} | {fps:.1f} | {fps / ceiling:.2f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
