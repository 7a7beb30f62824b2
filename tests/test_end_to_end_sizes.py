"""End to end where resize, padding and the export size are not no-ops.

Non-square images go through `--resize 96 --max-size 160`: scaled up and down,
the shorter side or the cap binding, batches padded to their largest image,
detections mapped back to each image's own pixels; an ONNX export is larger
than any of them. A tiny random-weight model with BatchNorm heads keeps this
fast; its heads are set so that it detects plenty (conftest.tiny_pth).
"""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import run_cli
from test_gpu_backend import Recording, assert_same_detections, rows_of

import retinanet
from retinanet.cli import main
from retinanet.data import transforms as T
from retinanet.images import mean_pixel

RESIZE, MAX_SIZE = 96, 160
# (h, w) of the images, and by hand their size after the resize: the shorter
# side to 96 unless the longer would pass 160, aspect kept, rounded.
SIZES = [(100, 170), (150, 90), (77, 203), (128, 128)]
RESIZED = [(94, 160), (160, 96), (61, 160), (96, 96)]  # 0.941 (cap), 1.067 (both), 0.788 (cap), 0.75
# Multiples of 32 but not of 128, as the batch's 160 x 160: P6 and P7 have partial cells.
EXPORT_SIZE = (192, 224)
# The CLI on the CPU, as the API here, also where there is a GPU (whose
# decoding, resizing and fp16 would round otherwise).
CPU = {"CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def images(tmp_path_factory, demo_root):
    """Demo images cut and scaled to SIZES, as JPEGs; paths in the CLI's image-id order."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("sizes")
    paths = []
    for i, (h, w) in enumerate(SIZES):
        with Image.open(demo_root / "val" / f"val_{i:05d}.jpg") as im:
            im.convert("RGB").resize((w, h), Image.BICUBIC).save(folder / f"img_{i}.jpg", quality=95)
        paths.append(str(folder / f"img_{i}.jpg"))
    return folder, paths


def as_records(detections, image_ids):
    """The Python API's detections as `retinanet infer` writes them (xywh, rounded)."""
    records = []
    for image_id, d in zip(image_ids, detections):
        for (x1, y1, x2, y2), score, cat in zip(d.boxes.tolist(), d.scores.tolist(), d.category_ids.tolist()):
            records.append(
                {
                    "image_id": image_id,
                    "category_id": cat,
                    "score": round(score, 5),
                    "bbox": [round(v, 2) for v in (x1, y1, x2 - x1, y2 - y1)],
                }
            )
    return records


def assert_same_records(got, want, image_ids, minimum=10):
    """Every record of every image, in the written order: category, box (0.01 px: the
    rounding of either side) and score (1e-5); at least `minimum` per image."""
    for image_id in image_ids:
        g = [r for r in got if r["image_id"] == image_id]
        w = [r for r in want if r["image_id"] == image_id]
        assert len(g) == len(w) >= minimum, (image_id, len(g), len(w))
        for k, (a, b) in enumerate(zip(g, w)):
            assert a["category_id"] == b["category_id"], (image_id, k, a, b)
            assert abs(a["score"] - b["score"]) <= 1e-5, (image_id, k, a, b)
            assert max(abs(u - v) for u, v in zip(a["bbox"], b["bbox"])) <= 0.0101, (image_id, k, a, b)
    assert len(got) == len(want)


def test_the_images_exercise_resize_and_padding():
    assert [T.resized_shape(h, w, RESIZE, MAX_SIZE) for h, w in SIZES] == RESIZED


def assert_mapped_back(detections, raw, fill):
    """The API's detections are the network's (raw, in the padded batch's pixels) scaled
    by the hand-worked factors of RESIZED and clipped to each image; the batch holds
    each resized image top-left, the rest the mean colour."""
    (batch,), (scores, boxes, classes) = raw.batches, raw.outputs[0]
    assert batch.shape[-2:] == (160, 160)  # the largest resized sides, 160 and 160, are multiples of 32
    fill = torch.tensor(fill, dtype=torch.uint8).view(3, 1, 1)
    for i, ((h, w), (rh, rw), d) in enumerate(zip(SIZES, RESIZED, detections)):
        pad = batch[i].clone()
        pad[:, :rh, :rw] = fill
        assert (pad == fill).all()
        keep = scores[i] > 0
        scale = torch.tensor([rw / w, rh / h, rw / w, rh / h])
        want = torch.minimum((boxes[i][keep] / scale).clamp(min=0), torch.tensor([w, h, w, h], dtype=torch.float32))
        torch.testing.assert_close(d.boxes, want)
        assert torch.equal(d.scores, scores[i][keep])
        assert d.category_ids.tolist() == [[1, 3, 7][c] for c in classes[i][keep]]
        # Some boxes end beyond the resized image: the mapping back is not a no-op.
        assert (boxes[i][keep][:, 2] > rw).any() or (boxes[i][keep][:, 3] > rh).any()


def infer_cli(model, folder, batch, output, cwd):
    """`retinanet infer` at RESIZE and MAX_SIZE, in a thread: the future of its process. A CLI run
    spends some 5 s importing on one core, the test works beside it on the other."""
    args = ["infer", model, "--images", str(folder), "--resize", str(RESIZE), "--max-size", str(MAX_SIZE)]
    args += ["--batch", str(batch), "--workers", "0", "--output", output]
    pool = ThreadPoolExecutor(1)
    future = pool.submit(run_cli, *args, cwd=cwd, env=CPU)
    pool.shutdown(wait=False)  # the thread ends with the run
    return future


def test_infer_cli_equals_python_api_in_original_pixels(tmp_path, tiny_pth, images):
    folder, paths = images
    ids = list(range(1, len(paths) + 1))  # the CLI numbers an annotation-less folder's files in name order
    # Each image padded to its own multiple of 32; all to 160 x 160 together.
    runs = {batch: infer_cli(tiny_pth, folder, batch, f"b{batch}.json", tmp_path) for batch in (1, len(paths))}
    det = retinanet.load(tiny_pth, device="cpu")
    api = {1: [det(p, resize=RESIZE, max_size=MAX_SIZE) for p in paths]}
    det.backend = raw = Recording(det.backend)
    api[len(paths)] = det(paths, resize=RESIZE, max_size=MAX_SIZE)
    assert_mapped_back(api[len(paths)], raw, mean_pixel(det.config.mean))
    for batch, run in runs.items():
        run.result()
        written = json.loads((tmp_path / f"b{batch}.json").read_text())
        assert_same_records(written, as_records(api[batch], ids), ids)


def test_onnx_export_larger_than_the_images_equals_pytorch(tmp_path, tiny_pth, images, monkeypatch):
    from retinanet.formats.input import pad_to

    folder, paths = images
    monkeypatch.chdir(tmp_path)
    # The export in this process (a subprocess adds 5 s of imports): on the CPU on any machine.
    assert main(["export", tiny_pth, "m.onnx", "--size", *map(str, EXPORT_SIZE), "--full-precision"]) == 0
    cli = infer_cli("m.onnx", folder, len(paths), "onnx.json", tmp_path)
    ort_det = retinanet.load(str(tmp_path / "m.onnx"), device="cpu")
    torch_det = retinanet.load(tiny_pth, device="cpu")
    ort_det.backend = ort_raw = Recording(ort_det.backend)
    torch_det.backend = torch_raw = Recording(torch_det.backend)
    got = ort_det(paths, resize=RESIZE, max_size=MAX_SIZE)
    want = torch_det(paths, resize=RESIZE, max_size=MAX_SIZE)
    assert_mapped_back(got, ort_raw, mean_pixel(ort_det.config.mean))
    assert_mapped_back(want, torch_raw, mean_pixel(torch_det.config.mean))
    # On the same 192 x 224 input ONNX Runtime and PyTorch differ by rounding
    # alone: measured 8e-8 in score, 2e-5 px in box. That swaps one pair of
    # overlapping boxes of one class whose scores lie 4.5e-8 apart: NMS keeps
    # the other one (every difference must be such an NMS flip).
    (batch,) = ort_raw.batches
    same_input = torch_raw.backend(pad_to(batch, EXPORT_SIZE, ort_det.fill))
    assert_same_detections(
        rows_of(ort_raw.outputs[0]), rows_of(same_input), 100, score_tol=1e-6, box_tol=1e-3, min_matched=0.99
    )
    # PyTorch runs this batch at 160 x 160. BatchNorm heads do not depend on the
    # padding, but the backbone's and FPN's convolutions see it, and on these
    # 160 px images their reach spans the whole image: measured, 19 to 83 of
    # each image's 100 detections (random weights, scores 1e-4 apart) have no
    # counterpart within 1e-4 in score. So the fixed-size export is held to
    # PyTorch on its own input size (above) only.
    # `retinanet infer` with the ONNX model writes what the API gives.
    cli.result()
    ids = list(range(1, len(paths) + 1))
    assert_same_records(json.loads((tmp_path / "onnx.json").read_text()), as_records(got, ids), ids)


def test_dynamic_onnx_export_runs_each_batch_at_the_pytorch_size(tmp_path, tiny_pth, images):
    """The default export (no --size) takes each batch at its own padded size, as the
    checkpoint does: alone, the images run at 96 x 128, 128 x 96, 64 x 128 and 128 x 128
    (the model's 128 px resize), together at 128 x 128; the detections are PyTorch's."""
    from retinanet.export import ExportOptions, export_onnx

    _, paths = images
    result = export_onnx(tiny_pth, str(tmp_path / "d.onnx"), ExportOptions(precision="fp32"))
    assert result["input"] == "dynamic HxW, multiples of 32 from 32x32 to 128x128"
    ort_det = retinanet.load(str(tmp_path / "d.onnx"), device="cpu")
    torch_det = retinanet.load(tiny_pth, device="cpu")
    ort_det.backend = ort_raw = Recording(ort_det.backend)
    torch_det.backend = torch_raw = Recording(torch_det.backend)
    for batch in [[p] for p in paths] + [paths]:
        got, want = ort_det(batch), torch_det(batch)
        assert [len(d.scores) for d in want] == [100] * len(batch)
        assert ort_raw.batches[-1].shape == torch_raw.batches[-1].shape
        # The same input: rounding alone (measured 9e-8 in score, 8e-6 px in box, same order).
        assert_same_detections(
            rows_of(ort_raw.outputs[-1]), rows_of(torch_raw.outputs[-1]), 100, 1e-6, 1e-3, min_matched=1.0
        )
        for g, w in zip(got, want):
            assert torch.equal(g.category_ids, w.category_ids)
    assert [tuple(b.shape[-2:]) for b in torch_raw.batches] == [(96, 128), (128, 96), (64, 128), (128, 128), (128, 128)]
