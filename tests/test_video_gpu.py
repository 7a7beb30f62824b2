"""NVDEC decoding (frames kept on the GPU, NV12 converted there) against FFmpeg's CPU path."""

import av
import numpy as np
import pytest
import torch
from conftest import BUSY, save_model, tiny_model
from video_clips import make_clip

from retinanet import load
from retinanet.video import VideoReader

pytestmark = pytest.mark.gpu


def frames(clip, decode):
    reader = VideoReader(str(clip), torch.device("cuda"), decode=decode)
    try:
        out = [f for batch in reader.batches(8) for f in batch]
    finally:
        reader.close()
    return out, reader.decoder


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    if "cuda" not in av.codec.hwaccel.hwdevices_available():
        pytest.skip("this PyAV's FFmpeg has no CUDA hardware decoding")
    path = tmp_path_factory.mktemp("nvdec") / "clip.mp4"
    make_clip(path, frames=48, width=640, height=360)
    return path


def test_nvdec_frames_equal_the_cpu_decoders_within_colour_rounding(clip):
    gpu, decoder = frames(clip, "gpu")
    cpu, _ = frames(clip, "cpu")
    assert decoder == "nvdec", "NVDEC did not decode the clip"
    assert [f.index for f in gpu] == [f.index for f in cpu] == list(range(48))
    assert [f.time for f in gpu] == [f.time for f in cpu]
    assert all(f.image.is_cuda for f in gpu)
    diff = torch.stack([(g.image.int() - c.image.int()).abs() for g, c in zip(gpu, cpu)])
    print(
        f"NVDEC + our NV12->RGB vs FFmpeg's CPU decode + swscale: max {diff.max().item()}, "
        f"mean {diff.float().mean().item():.3f} levels"
    )
    # The decoded planes are the same (H.264 decoding is exact); what differs is the
    # YUV->RGB rounding: ours in float, swscale's in fixed point (measured on the CPU: <= 3).
    assert diff.max().item() <= 3


def test_nvdec_detections_equal_the_cpu_paths(clip, tmp_path):
    detector = load(save_model(tiny_model(BUSY), tmp_path / "tiny.pth"), device="cuda", full_precision=True)
    by = {d: list(detector.stream(str(clip), batch=8, decode=d)) for d in ("gpu", "cpu")}
    matched = total = 0
    for (i, t, _, g), (j, u, _, c) in zip(by["gpu"], by["cpu"]):
        assert (i, t) == (j, u)
        total += len(c.scores)
        for box, score, cat in zip(c.boxes, c.scores, c.category_ids):
            close = (
                (g.category_ids == cat) & ((g.boxes - box).abs().amax(1) <= 0.5) & ((g.scores - score).abs() <= 0.01)
            )
            matched += bool(close.any())
    assert len(by["gpu"]) == len(by["cpu"]) == 48
    print(f"detections of the CPU path found by the NVDEC path: {matched}/{total}")
    assert matched >= 0.95 * total


def test_nvdec_planes_equal_the_cpu_decoders(clip):
    """H.264 decoding is exact: NVDEC's NV12 planes hold the CPU decoder's Y, U and V."""
    from retinanet.video import _hwaccel

    with av.open(str(clip)) as c:
        cpu = [
            [np.asarray(p).reshape(p.height, p.line_size)[:, : p.width].copy() for p in f.planes]
            for f in c.decode(video=0)
        ]
    with av.open(str(clip), hwaccel=_hwaccel(torch.device("cuda"))) as c:
        for n, f in enumerate(c.decode(video=0)):
            assert f.format.name == "cuda", f"frame {n} was not decoded by NVDEC ({f.format.name})"
            y = torch.from_dlpack(f.planes[0].__dlpack__(stream=None)).cpu().numpy()
            uv = torch.from_dlpack(f.planes[1].__dlpack__(stream=None)).cpu().numpy()
            np.testing.assert_array_equal(y, cpu[n][0])
            np.testing.assert_array_equal(uv[..., 0], cpu[n][1])
            np.testing.assert_array_equal(uv[..., 1], cpu[n][2])
    assert n == 47
