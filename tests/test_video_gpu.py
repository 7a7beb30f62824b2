"""NVDEC decoding (frames kept on the GPU, NV12 converted there) against FFmpeg's CPU path.

NVDEC shares torch's CUDA context only when video.prepare_nvdec() ran before CUDA was
first used in the process, and the other GPU tests of this session have used it: the
comparison runs in a child process (this file run as a script) and prints JSON.
"""

import json
import subprocess
import sys

import av
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu


def nvdec_planes(clip: str) -> int:
    """H.264 decoding is exact: NVDEC's NV12 planes hold the CPU decoder's Y, U and V."""
    from retinanet.video import _hwaccel

    with av.open(clip) as c:
        cpu = [
            [np.asarray(p).reshape(p.height, p.line_size)[:, : p.width].copy() for p in f.planes]
            for f in c.decode(video=0)
        ]
    count = 0
    with av.open(clip, hwaccel=_hwaccel(torch.device("cuda"))) as c:
        for n, f in enumerate(c.decode(video=0)):
            assert f.format.name == "cuda", f"frame {n} was not decoded by NVDEC ({f.format.name})"
            y = torch.from_dlpack(f.planes[0].__dlpack__(stream=None)).cpu().numpy()
            uv = torch.from_dlpack(f.planes[1].__dlpack__(stream=None)).cpu().numpy()
            np.testing.assert_array_equal(y, cpu[n][0])
            np.testing.assert_array_equal(uv[..., 0], cpu[n][1])
            np.testing.assert_array_equal(uv[..., 1], cpu[n][2])
            count += 1
    return count


def frames(clip: str, decode: str):
    from retinanet.video import VideoReader

    reader = VideoReader(clip, torch.device("cuda"), decode=decode)
    try:
        out = [f for batch in reader.batches(8) for f in batch]
    finally:
        reader.close()
    return out, reader.decoder


def compare(clip: str, model: str) -> dict:
    from retinanet import load

    result = {"planes_equal_frames": nvdec_planes(clip)}
    gpu, decoder = frames(clip, "gpu")
    cpu, _ = frames(clip, "cpu")
    result["decoder"] = decoder
    result["indices_equal"] = [f.index for f in gpu] == [f.index for f in cpu]
    result["times_equal"] = [f.time for f in gpu] == [f.time for f in cpu]
    result["on_gpu"] = all(f.image.is_cuda for f in gpu)
    diff = torch.stack([(g.image.int() - c.image.int()).abs() for g, c in zip(gpu, cpu)])
    result["rgb_max"], result["rgb_mean"] = diff.max().item(), diff.float().mean().item()
    detector = load(model, device="cuda", full_precision=True)
    by = {d: list(detector.stream(clip, batch=8, decode=d)) for d in ("gpu", "cpu")}
    matched = total = 0
    for (_, _, _, g), (_, _, _, c) in zip(by["gpu"], by["cpu"]):
        total += len(c.scores)
        for box, score, cat in zip(c.boxes, c.scores, c.category_ids):
            close = (g.category_ids == cat) & ((g.boxes - box).abs().amax(1) <= 0.5)
            matched += bool((close & ((g.scores - score).abs() <= 0.01)).any())
    result.update(frames=[len(by["gpu"]), len(by["cpu"])], matched=matched, total=total)
    return result


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    from conftest import BUSY, save_model, tiny_model
    from video_clips import make_clip

    if "cuda" not in av.codec.hwaccel.hwdevices_available():
        pytest.skip("this PyAV's FFmpeg has no CUDA hardware decoding")
    work = tmp_path_factory.mktemp("nvdec")
    make_clip(work / "clip.mp4", frames=48, width=640, height=360)
    model = save_model(tiny_model(BUSY), work / "tiny.pth")
    proc = subprocess.run(
        [sys.executable, __file__, str(work / "clip.mp4"), model], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(result)
    return result


def test_nvdec_planes_equal_the_cpu_decoders(measured):
    assert measured["planes_equal_frames"] == 48


def test_nvdec_frames_equal_the_cpu_decoders_within_colour_rounding(measured):
    assert measured["decoder"] == "nvdec", "NVDEC did not decode the clip"
    assert measured["indices_equal"] and measured["times_equal"] and measured["on_gpu"]
    # The planes are the same; what differs is the YUV->RGB rounding: ours in float,
    # swscale's in fixed point (measured on the CPU too: at most 3 levels).
    assert measured["rgb_max"] <= 3


def test_nvdec_detections_equal_the_cpu_paths(measured):
    assert measured["frames"] == [48, 48]
    assert measured["matched"] >= 0.95 * measured["total"]


if __name__ == "__main__":
    from retinanet.video import prepare_nvdec

    assert prepare_nvdec(), "could not prepare the CUDA context for NVDEC"
    print(json.dumps(compare(sys.argv[1], sys.argv[2])))
