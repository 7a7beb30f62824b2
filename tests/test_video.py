"""`retinanet infer --video`, Detector.stream and the video pieces, on clips made here with PyAV."""

import http.server
import json
import socket
import threading
import time

import av
import numpy as np
import pytest
import torch
from conftest import BUSY, assert_user_error, in_process, run_cli, save_model, tiny_model
from matching import assert_same_detections
from video_clips import decoded_frames, frame, make_clip

import retinanet
from retinanet.draw import layout
from retinanet.video import VideoWriter, _matrix, yuv_to_rgb

FRAMES, W, H = 60, 160, 128


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    make_clip(path, FRAMES, W, H)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_model(tiny_model(BUSY), tmp_path_factory.mktemp("tiny") / "tiny.pth")


def records_of(dets, index, t):
    xywh = torch.cat([dets.boxes[:, :2], dets.boxes[:, 2:] - dets.boxes[:, :2]], 1)
    return [
        {"frame": index, "timestamp": round(t, 6), "category_id": c, "bbox": b, "score": s}
        for b, s, c in zip(xywh.tolist(), dets.scores.tolist(), dets.category_ids.tolist())
    ]


def assert_same_records(got, want):
    """Same detections, frame by frame: each wanted one found once, of the same class, the box
    and score equal to the JSON's rounding (2 and 5 decimals), and nothing else."""
    assert len(got) == len(want)
    for g in got:
        assert g["image_id"] == g["frame"]
    for index in sorted({r["frame"] for r in want}):
        g = [r for r in got if r["frame"] == index]
        w = [r for r in want if r["frame"] == index]
        assert len(g) == len(w) and {r["timestamp"] for r in g} == {w[0]["timestamp"]}
        gb, wb = np.array([r["bbox"] for r in g]), np.array([r["bbox"] for r in w])
        gs, ws = np.array([r["score"] for r in g]), np.array([r["score"] for r in w])
        gc, wc = np.array([r["category_id"] for r in g]), np.array([r["category_id"] for r in w])
        free = np.ones(len(g), bool)
        for box, score, cat in zip(wb, ws, wc):
            ok = free & (gc == cat) & (np.abs(gs - score) <= 2e-5) & (np.abs(gb - box).max(1) <= 0.011)
            assert ok.any(), (index, box, score, cat)
            free[np.argmax(ok)] = False


def mark_mask(marks, shape, grow=1):
    mask = np.zeros(shape[:2], bool)
    for m in marks:
        for x1, y1, x2, y2 in (m.box, m.label):
            mask[max(0, y1 - grow) : y2 + 1 + grow, max(0, x1 - grow) : x2 + 1 + grow] = True
    return mask


def test_stream_yields_every_frame_with_the_apis_detections(clip, tiny):
    detector = retinanet.load(tiny)
    decoded = decoded_frames(clip)
    got = list(detector.stream(str(clip), batch=4))
    assert [i for i, *_ in got] == list(range(FRAMES))
    assert [t for _, t, *_ in got] == pytest.approx([i / 30 for i in range(FRAMES)])
    for (_, _, image, dets), rgb in zip(got, decoded):
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), rgb)
        # A batch of 4 rounds otherwise than a batch of 1, so near-equal scores may swap places.
        assert_same_detections(dets, detector(rgb), score_tol=1e-5, box_tol=1e-3)
        assert dets.names == {1: "square", 3: "disc", 7: "triangle"}


def check_drawn_video(path, source_frames, detector, records, threshold):
    """out.mp4: H.264, every frame, the input size; frames differ from the input only where drawn."""
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.name == "h264"
        out = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
    assert len(out) == len(source_frames) and out[0].shape == (H, W, 3)
    drawn = 0
    for i, (got, src) in enumerate(zip(out, source_frames)):
        rows = [r for r in records if r["frame"] == i]
        boxes = torch.tensor([r["bbox"] for r in rows]).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        dets = retinanet.Detections(
            boxes,
            torch.tensor([r["score"] for r in rows]),
            torch.tensor([r["category_id"] for r in rows]),
            detector.category_names,
        )
        marks = layout(dets, H, W, threshold)
        mask = mark_mask(marks, src.shape, grow=2)
        diff = np.abs(got.astype(int) - src.astype(int)).max(-1)
        # outside the marks: only the encoder's loss (measured: mean below 1.5 levels)
        assert diff[~mask].mean() < 3, i
        if marks:  # the label drawn last (on top): a block of its class colour above its text
            x1, y1, _, _ = marks[-1].label
            assert np.abs(got[y1 + 1 : y1 + 3, x1 + 1 : x1 + 4].astype(int) - marks[-1].colour).mean() < 40
        drawn += bool(marks)
    return drawn


@pytest.mark.slow
def test_video_cli_end_to_end_on_the_demo_model(clip, trained):
    work, _, env = trained
    proc = run_cli(
        "infer", "demo.pth", "--video", str(clip), "--output", "d.json", "--draw", "out.mp4", cwd=work, env=env
    )
    assert "60 frames" in proc.stdout
    records = json.loads((work / "d.json").read_text())
    detector = retinanet.load(str(work / "demo.pth"))
    assert detector.category_names == {1: "square", 3: "disc", 7: "triangle"}  # stored at training
    decoded = decoded_frames(clip)
    want = [r for i, rgb in enumerate(decoded) for r in records_of(detector(rgb), i, i / 30)]
    assert_same_records(records, want)
    assert check_drawn_video(work / "out.mp4", decoded, detector, records, 0.3) > FRAMES // 2


def test_video_cli_with_a_busy_model(clip, tiny, tmp_path):
    run_cli(
        "infer",
        tiny,
        "--video",
        str(clip),
        "--output",
        "d.json",
        "--draw",
        "out.mp4",
        "--draw-threshold",
        "0.125",
        "--batch",
        "8",
        cwd=tmp_path,
    )
    records = json.loads((tmp_path / "d.json").read_text())
    detector = retinanet.load(tiny)
    decoded = decoded_frames(clip)
    want = [r for i, rgb in enumerate(decoded) for r in records_of(detector(rgb), i, i / 30)]
    assert_same_records(records, want)
    assert check_drawn_video(tmp_path / "out.mp4", decoded, detector, records, 0.125) > 0


class LiveStream(http.server.BaseHTTPRequestHandler):
    """MPEG-TS encoded frame by frame as it is sent, at the clip's rate: a live source."""

    frames = 45

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "video/mp2t")
        self.end_headers()
        with av.open(self.wfile, "w", format="mpegts") as out:
            stream = out.add_stream("libx264", rate=30)
            stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
            stream.options = {"tune": "zerolatency"}
            for i in range(self.frames):
                f = av.VideoFrame.from_ndarray(frame(i, W, H), format="rgb24")
                f.pts = i
                for packet in stream.encode(f):
                    out.mux(packet)
                self.wfile.flush()
                time.sleep(1 / 30)
            for packet in stream.encode():
                out.mux(packet)

    def log_message(self, *args):
        pass


def test_a_live_stream_is_read_until_it_ends(tiny):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), LiveStream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        detector = retinanet.load(tiny)
        start = time.monotonic()
        got = list(detector.stream(f"http://127.0.0.1:{server.server_port}/live.ts", batch=4, timeout=5))
        took = time.monotonic() - start
    finally:
        server.shutdown()
    assert [i for i, *_ in got] == list(range(LiveStream.frames))
    assert took >= LiveStream.frames / 30 * 0.8  # read while it was produced, not after
    for i, _, image, dets in got[::10]:  # the frames are the served ones (lossy: close, not equal)
        assert np.abs(image.permute(1, 2, 0).numpy().astype(int) - frame(i, W, H)).mean() < 4
        assert len(dets.scores) == 100


class StallingStream(LiveStream):
    """Sends some frames, then keeps the connection open and silent."""

    frames = 20

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "video/mp2t")
        self.end_headers()
        out = av.open(self.wfile, "w", format="mpegts")
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"tune": "zerolatency"}
        for i in range(self.frames):
            f = av.VideoFrame.from_ndarray(frame(i, W, H), format="rgb24")
            f.pts = i
            for packet in stream.encode(f):
                out.mux(packet)
        self.wfile.flush()
        time.sleep(20)  # silent, the connection still open


def test_a_source_that_goes_silent_stops_with_what_was_detected(tiny, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StallingStream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/live.ts"
        proc = run_cli(
            "infer",
            tiny,
            "--video",
            url,
            "--video-timeout",
            "1",
            "--output",
            "d.json",
            "--draw",
            "out.mp4",
            cwd=tmp_path,
            check=False,
            timeout=60,
        )
    finally:
        server.shutdown()
    assert_user_error(proc, url, "no data for 1 s", "--video-timeout")
    frames = sorted({r["frame"] for r in json.loads((tmp_path / "d.json").read_text())})
    assert frames == list(range(len(frames))) and len(frames) >= StallingStream.frames - 3
    with av.open(str(tmp_path / "out.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == len(frames)


def silent_server():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    held = []
    threading.Thread(target=lambda: [held.append(s.accept()) for _ in range(8)], daemon=True).start()
    return s


def test_a_source_that_never_answers_times_out(tiny, tmp_path):
    s = silent_server()
    try:
        url = f"http://127.0.0.1:{s.getsockname()[1]}/cam"
        start = time.monotonic()
        proc = run_cli(
            "infer",
            tiny,
            "--video",
            url,
            "--video-timeout",
            "1",
            "--output",
            "d.json",
            cwd=tmp_path,
            check=False,
            timeout=60,
        )
        took = time.monotonic() - start
    finally:
        s.close()
    assert_user_error(proc, url, "no answer within 1 s", "--video-timeout")
    assert took < 30
    assert not (tmp_path / "d.json").exists()


def test_video_errors(tiny, clip, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.mp4").write_text("not a video")
    (tmp_path / "taken.json").write_text("[]")
    cases = [
        (["--video", "missing.mp4"], ["missing.mp4", "video file not found"]),
        (["--video", "notes.mp4"], ["notes.mp4", "cannot read video"]),
        (["--video", str(clip), "--draw", "out.avi"], ["out.avi", ".mp4"]),
        (["--video", str(clip), "--draw", "nowhere/sub/out.mp4"], ["nowhere/sub/out.mp4"]),
        (["--video", str(clip), "--images", "."], ["--video", "--images"]),
        (["--video", str(clip), "--output", "taken.json"], ["taken.json", "--override"]),
    ]
    for args, words in cases:
        if "--output" not in args:
            args = [*args, "--output", "d.json"]
        code, lines = in_process(capsys, "infer", tiny, *args)
        assert code == 2 and len(lines) == 1, (args, lines)
        assert all(w in lines[0] for w in words), lines[0]
        assert not (tmp_path / "d.json").exists()
    assert (tmp_path / "taken.json").read_text() == "[]"


def test_without_pyav_one_line_names_the_extra(tiny, clip, tmp_path):
    shim = tmp_path / "shim" / "av"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('no av here')\n")
    proc = run_cli(
        "infer",
        tiny,
        "--video",
        str(clip),
        "--output",
        "d.json",
        cwd=tmp_path,
        check=False,
        env={"PYTHONPATH": str(shim.parent)},
    )
    assert_user_error(proc, "PyAV", "retinanet[video]")


def test_yuv_to_rgb_agrees_with_ffmpegs_conversion(tmp_path):
    """Our NV12/YUV -> RGB (used on NVDEC frames) against swscale, untagged and BT.709 clips;
    the other matrix is far off, so the tag is what picks it."""
    rng = np.random.default_rng(0)
    for tag in (None, 1):
        path = tmp_path / f"c{tag}.mp4"
        with av.open(str(path), "w") as out:
            stream = out.add_stream("libx264", rate=30)
            stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
            if tag:
                stream.codec_context.colorspace = tag
            for i in range(3):
                f = av.VideoFrame.from_ndarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8), format="rgb24")
                f.pts = i
                for packet in stream.encode(f):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        with av.open(str(path)) as c:
            for f in c.decode(video=0):
                planes = [
                    torch.from_numpy(np.asarray(p).reshape(p.height, p.line_size)[:, : p.width].copy())
                    for p in f.planes
                ]
                want = f.to_ndarray(format="rgb24").astype(int)
                kr, kb = _matrix(f)
                assert (kr, kb) == ((0.2126, 0.0722) if tag else (0.299, 0.114))
                got = yuv_to_rgb(*planes, kr, kb, False).permute(1, 2, 0).numpy().astype(int)
                assert np.abs(got - want).max() <= 3  # fixed-point rounding in swscale
                other = yuv_to_rgb(*planes, *((0.299, 0.114) if tag else (0.2126, 0.0722)), False)
                assert np.abs(other.permute(1, 2, 0).numpy().astype(int) - want).max() > 15


def test_writer_pads_odd_sizes_and_leaves_nothing_on_failure(tmp_path):
    rgb = np.full((127, 161, 3), 200, np.uint8)
    writer = VideoWriter(str(tmp_path / "odd.mp4"), 161, 127, 25)
    for _ in range(5):
        writer.write(rgb)
    writer.close()
    with av.open(str(tmp_path / "odd.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (128, 162, 3)
    assert np.abs(frames[0].astype(int) - 200).max() <= 2
    failed = VideoWriter(str(tmp_path / "failed.mp4"), 160, 128, 25)
    failed.write(np.zeros((128, 160, 3), np.uint8))
    failed.close(failed=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.mp4"]
