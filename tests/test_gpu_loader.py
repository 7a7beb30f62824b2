"""The GPU-decoding inference loader, on the CPU: routing, fallbacks, batches and errors.

The loader (retinanet.data.gpu) decodes JPEGs with torchvision's decoder on its
device; on the CPU that is libjpeg-turbo, as PIL, so its batches and
detections must equal the DataLoader path's exactly. On a GPU (nvJPEG) they
differ within the bounds test_gpu_backend.py states.
"""

import io
import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from retinanet import infer as I
from retinanet import jpeg, runtime
from retinanet.data.coco import CocoAnnotations
from retinanet.data.gpu import GpuBatches, decode_file
from retinanet.errors import UserError
from retinanet.images import CorruptImage, read_image

CATEGORIES = [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}, {"id": 7, "name": "c"}]


def photo(h, w, seed=0):
    """A smooth colour image with some edges: what JPEG coding is made for."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    pixels = np.array(Image.fromarray(small).resize((w, h), Image.BILINEAR))
    pixels[h // 3 : h // 2, w // 4 : w // 2] = (230, 20, 40)
    return Image.fromarray(pixels)


def jpeg_bytes(image, **save):
    out = io.BytesIO()
    image.save(out, "JPEG", **save)
    return out.getvalue()


def with_orientation(h, w, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg_bytes(photo(h, w), quality=90, exif=exif.tobytes())


def with_adobe_transform(data: bytes, transform: int) -> bytes:
    """`data` with an APP14 "Adobe" segment right after SOI, as some encoders write for RGB JPEGs."""
    body = b"Adobe" + struct.pack(">HHHB", 100, 0, 0, transform)
    return data[:2] + b"\xff\xee" + struct.pack(">H", len(body) + 2) + body + data[2:]


# name -> (bytes, gpu_decodable); sizes 37 x 53 (h x w) unless the name says otherwise
def samples():
    base = photo(37, 53)
    return {
        "baseline 4:2:0": (jpeg_bytes(base, quality=90), True),
        "baseline 4:4:4": (jpeg_bytes(base, quality=90, subsampling=0), True),
        "optimised huffman": (jpeg_bytes(base, quality=75, optimize=True), True),
        "progressive": (jpeg_bytes(base, quality=90, progressive=True), False),
        "cmyk": (jpeg_bytes(base.convert("CMYK"), quality=90), False),
        "greyscale": (jpeg_bytes(base.convert("L"), quality=90), False),
        "exif rotated": (with_orientation(37, 53, 6), False),
        "exif upright": (with_orientation(37, 53, 1), True),
        "adobe rgb": (with_adobe_transform(jpeg_bytes(base, quality=90), 0), False),
        "adobe ycbcr": (with_adobe_transform(jpeg_bytes(base, quality=90), 1), True),
    }


def test_jpeg_headers_route_each_kind():
    """Size from the header; the GPU only for sequential 8-bit YCbCr JPEGs shown as stored."""
    got = {}
    for name, (data, _) in samples().items():
        header = jpeg.read_header(data)
        assert header is not None, name
        with Image.open(io.BytesIO(data)) as im:
            assert (header.height, header.width) == (im.height, im.width) == (37, 53), name
        got[name] = jpeg.gpu_decodable(header)
    assert got == {name: want for name, (_, want) in samples().items()}
    header = jpeg.read_header(samples()["exif rotated"][0])
    assert header is not None and header.orientation == 6 and header.frame == 0xC0
    header = jpeg.read_header(samples()["progressive"][0])
    assert header is not None and header.frame == 0xC2 and header.components == 3
    header = jpeg.read_header(samples()["cmyk"][0])
    assert header is not None and header.components == 4


def test_non_jpegs_have_no_header():
    png = io.BytesIO()
    photo(8, 8).save(png, "PNG")
    data = samples()["baseline 4:2:0"][0]
    sos = data.index(b"\xff\xda")
    for bad in (
        png.getvalue(),
        b"",
        b"\xff\xd8",
        b"text file",
        data[:20],
        data[:sos].replace(b"\xff\xc0", b"\xff\xdb"),
    ):
        assert jpeg.read_header(bad) is None
        assert not jpeg.gpu_decodable(jpeg.read_header(bad))


@pytest.mark.parametrize("order", ["<", ">"])
def test_exif_orientation_in_either_byte_order(order):
    mark = b"II" if order == "<" else b"MM"
    entries = [(0x010F, 2, 4, 0), (0x0112, 3, 1, 8 << (16 if order == ">" else 0))]
    ifd = struct.pack(order + "H", len(entries)) + b"".join(struct.pack(order + "HHII", *e) for e in entries)
    assert jpeg.exif_orientation(mark + struct.pack(order + "HI", 42, 8) + ifd) == 8
    assert jpeg.exif_orientation(mark + struct.pack(order + "HI", 42, 8) + ifd[:2]) == 1  # cut short
    assert jpeg.exif_orientation(b"XX" + ifd) == 1


def test_choose_loader():
    assert I.choose_loader(torch.device("cuda"), False) == "gpu"
    assert I.choose_loader(torch.device("cuda", 1), False) == "gpu"
    assert I.choose_loader(torch.device("cpu"), False) == "cpu"
    assert I.choose_loader(torch.device("cuda"), True) == "dali"
    assert I.choose_loader(torch.device("cpu"), True) == "dali"


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A folder of every kind the loader routes (JPEGs for the GPU and each CPU fallback, PNGs with
    and without alpha), of several sizes and orientations, with COCO annotations."""
    root = tmp_path_factory.mktemp("mixed")
    files = {
        "a.jpg": jpeg_bytes(photo(96, 128, 1), quality=92),
        "b.jpg": jpeg_bytes(photo(128, 80, 2), quality=85),
        "c.jpg": jpeg_bytes(photo(70, 150, 3), quality=90, progressive=True),
        "d.jpg": jpeg_bytes(photo(90, 90, 4).convert("CMYK"), quality=90),
        "e.jpg": with_orientation(60, 100, 6),
        "f.jpg": jpeg_bytes(photo(50, 200, 5).convert("L"), quality=90),
        "g.jpg": jpeg_bytes(photo(100, 64, 6), quality=95, subsampling=0),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    rgba = photo(80, 120, 7).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.arange(120, dtype=np.uint8) * 2, (80, 1))))
    rgba.save(root / "h.png")
    photo(120, 96, 8).save(root / "i.png")
    names = sorted(p.name for p in root.iterdir())
    images = []
    for i, name in enumerate(names):
        w, h = read_image(str(root / name)).shape[:0:-1]
        images.append({"id": 10 + i, "file_name": name, "width": w, "height": h})
    annotations = [{"id": 1, "image_id": 10, "category_id": 1, "bbox": [5, 5, 20, 30]}]
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return root


@pytest.fixture(scope="module")
def tiny_detector(tiny_pth):
    return runtime.load(tiny_pth, device="cpu")


def test_gpu_batches_equal_the_dataloader_batches(mixed, tiny_detector):
    """Same pixels, sizes, scales and ids as the DataLoader path; the short last batch filled
    with padding images to the full batch size."""
    coco = CocoAnnotations(str(mixed / "ann.json"), category_ids=None)
    fill = tiny_detector.fill
    cpu = list(I.make_loader(tiny_detector, str(mixed), coco, 4, 100, 160, workers=0))
    gpu = list(
        GpuBatches(
            str(mixed),
            coco.images,
            4,
            100,
            160,
            tiny_detector.config.pad_multiple,
            fill,
            torch.device("cpu"),
            workers=3,
        )
    )
    assert len(cpu) == len(gpu) == 3
    for a, b in zip(cpu, gpu):
        n = len(a.image_ids)
        assert b.images.shape[0] == 4 and b.valid.shape == (4, 2)
        assert a.image_ids == b.image_ids and a.sizes == b.sizes
        assert torch.equal(a.scales, b.scales) and torch.equal(a.valid, b.valid[:n])
        assert torch.equal(a.images, b.images[:n])
        padding = b.images[n:]
        assert torch.equal(padding, torch.tensor(fill, dtype=torch.uint8).view(1, 3, 1, 1).expand_as(padding))
        assert (b.valid[n:] == torch.tensor(b.images.shape[-2:], dtype=torch.int32)).all()
    assert [len(b.image_ids) for b in gpu] == [4, 4, 1]


def test_detections_equal_across_loaders(mixed, tiny_detector, tmp_path, monkeypatch):
    """`infer` writes the same records through either loader (the GPU one forced onto the CPU)."""
    ann = str(mixed / "ann.json")
    want = I.infer(tiny_detector, str(mixed), ann, str(tmp_path / "cpu.json"), 4, 100, 160, 0, quiet=True)
    monkeypatch.setattr(I, "choose_loader", lambda device, with_dali: "gpu")
    got = I.infer(tiny_detector, str(mixed), ann, str(tmp_path / "gpu.json"), 4, 100, 160, 2, quiet=True)
    records = json.loads((tmp_path / "gpu.json").read_text())
    assert len(records) > 100 and {r["image_id"] for r in records} == set(range(10, 19))
    assert records == json.loads((tmp_path / "cpu.json").read_text())
    assert got == want


def test_ranks_share_the_images(mixed, tiny_detector, monkeypatch):
    coco = CocoAnnotations(str(mixed / "ann.json"), category_ids=None)
    monkeypatch.setattr(I, "choose_loader", lambda device, with_dali: "gpu")
    shards = [
        [i for b in I.make_loader(tiny_detector, str(mixed), coco, 2, 100, 160, 1, rank, 3) for i in b.image_ids]
        for rank in range(3)
    ]
    assert shards == [[10, 13, 16], [11, 14, 17], [12, 15, 18]]


def bad_folder(root, case):
    good = jpeg_bytes(photo(40, 60), quality=90)
    (root / "a.jpg").write_bytes(good)
    images = [{"id": 1, "file_name": "a.jpg", "width": 60, "height": 40}]
    if case == "truncated":  # a valid header, then the data stops
        (root / "b.jpg").write_bytes(good[: len(good) // 2])
    elif case == "garbage":
        (root / "b.jpg").write_bytes(b"not an image at all")
    elif case == "wrong size":
        (root / "b.jpg").write_bytes(good)
    images.append({"id": 2, "file_name": "b.jpg", "width": 61 if case == "wrong size" else 60, "height": 40})
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": [], "categories": CATEGORIES}))
    return str(root / "ann.json")


@pytest.mark.parametrize("case", ["truncated", "garbage", "missing", "wrong size"])
def test_bad_images_give_the_dataloader_paths_error(tmp_path, tiny_detector, monkeypatch, case):
    ann = bad_folder(tmp_path, case)
    errors = []
    for kind in ("cpu", "gpu"):
        monkeypatch.setattr(I, "choose_loader", lambda device, with_dali, kind=kind: kind)
        with pytest.raises(UserError) as e:
            I.infer(tiny_detector, str(tmp_path), ann, str(tmp_path / f"{kind}.json"), 4, 100, 160, 1, quiet=True)
        errors.append(str(e.value))
        assert not (tmp_path / f"{kind}.json").exists()
    assert errors[0] == errors[1]
    assert "b.jpg" in errors[0] and "\n" not in errors[0]
    assert ("image id 2" in errors[0]) or ("image 2" in errors[0])


def test_decode_file_is_read_image_on_the_cpu(mixed, tmp_path):
    for path in sorted(mixed.iterdir()):
        if path.suffix != ".json":
            assert torch.equal(decode_file(str(path), torch.device("cpu")), read_image(str(path)))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(CorruptImage, match="bad.jpg"):
        decode_file(str(tmp_path / "bad.jpg"), torch.device("cpu"))


def test_speed_line():
    timing = {"total_s": 2.0, "images": 1000, "first_batch_at": 105.25}
    assert I.speed_line(timing, 100.0) == (
        "infer: 1000 images in 2.00 s (500.0 img/s); first batch done 5.25 s after the process started"
    )
    assert I.speed_line(timing, None) == "infer: 1000 images in 2.00 s (500.0 img/s)"
    assert I.speed_line({}, 100.0) == "infer: no images inferred"
    import time

    started = I.process_start()
    assert started is not None and 0 < time.time() - started < 3600


def test_only_complete_files_go_to_the_gpu():
    data = samples()["baseline 4:2:0"][0]
    assert jpeg.for_gpu(data) == jpeg.read_header(data)
    assert jpeg.for_gpu(data + b"\0" * 10) is not None  # padding after EOI
    assert jpeg.for_gpu(data[:-2]) is None  # cut off: the CPU decoder reports it
    assert jpeg.for_gpu(data[: len(data) // 2]) is None
    assert jpeg.for_gpu(samples()["progressive"][0]) is None


# --------------------------------------------------------------------------- GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
def test_gpu_loader_on_cuda_matches_the_cpu_loader(demo_root, tmp_path):
    """nvJPEG + GPU resize against libjpeg-turbo + CPU resize, on the images and settings whose
    bounds test_gpu_backend.py states (8 demo images, 96 px padded to 128): pixels within them,
    padding exact, the short last batch filled, and the same network's detections matched."""
    from test_gpu_backend import (
        GPU_DECODE_MAX_DIFF,
        GPU_DECODE_MEAN_DIFF,
        assert_same_detections,
        busy_model,
        rows_of,
    )

    from retinanet.config import ModelConfig
    from retinanet.runtime.pytorch import TorchBackend

    cfg = ModelConfig(backbone="ResNet18FPN", classes=3, channels=32, resize=96, max_size=96, pad_multiple=128)
    backend = TorchBackend(busy_model(cfg, weight_std=100.0), [1, 3, 7], "cuda", full_precision=True)
    doc = json.loads((demo_root / "val.json").read_text())
    doc["images"] = [im for im in doc["images"] if im["file_name"] < "val_00008.jpg"]
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] in {im["id"] for im in doc["images"]}]
    (tmp_path / "val8.json").write_text(json.dumps(doc))
    coco = CocoAnnotations(str(tmp_path / "val8.json"), category_ids=None)
    on_cpu = runtime.Detector(TorchBackend(busy_model(cfg, 1.0), [1, 3, 7], "cpu"), cfg, [1, 3, 7])
    cpu = list(I.make_loader(on_cpu, str(demo_root / "val"), coco, 3, 96, 96, workers=0))
    fill = on_cpu.fill
    gpu = list(GpuBatches(str(demo_root / "val"), coco.images, 3, 96, 96, 128, fill, backend.device, 4))
    assert [len(b.image_ids) for b in gpu] == [3, 3, 2] and len(cpu) == 3
    means = []
    for a, b in zip(cpu, gpu):
        n = len(a.image_ids)
        assert b.images.device.type == "cuda" and b.images.shape == (3, 3, 128, 128)
        assert a.image_ids == b.image_ids and a.sizes == b.sizes and torch.equal(a.scales, b.scales)
        assert torch.equal(a.valid, b.valid[:n].cpu())
        diff = (a.images.int() - b.images[:n].cpu().int()).abs()
        assert (diff[:, :, 96:] == 0).all() and (diff[:, :, :, 96:] == 0).all()  # the padding
        assert diff.max() <= GPU_DECODE_MAX_DIFF, diff.amax(dim=(1, 2, 3))
        means.append(diff[:, :, :96, :96].float().mean(dim=(1, 2, 3)))
        got, want = backend(b.images, b.valid), backend(a.images.cuda(), a.valid.cuda())
        assert_same_detections(
            rows_of(tuple(t[:n].cpu() for t in got)),
            rows_of(tuple(t.cpu() for t in want)),
            cfg.detections,
            score_tol=0.05,
            box_tol=0.5,
            min_matched=0.7,
        )
    means = torch.cat(means)
    print(f"GPU vs CPU loader, 8 demo images at 96 px: mean |diff| per image max {means.max():.3f} grey levels")
    assert (means <= GPU_DECODE_MEAN_DIFF).all(), means


@pytest.mark.slow
@needs_cuda
def test_demo_map_is_the_same_through_either_loader(trained, demo_root, tmp_path, monkeypatch):
    """The trained demo model on its val set: mAP through the GPU loader equals the CPU loader's
    within 0.005, and the confident detections of one are found by the other."""
    work, _, _ = trained
    detector = runtime.load(str(work / "demo.pth"))
    val, ann = str(demo_root / "val"), str(demo_root / "val.json")
    stats = {}
    for kind in ("gpu", "cpu"):
        monkeypatch.setattr(I, "choose_loader", lambda device, with_dali, kind=kind: kind)
        stats[kind] = I.infer(detector, val, ann, str(tmp_path / f"{kind}.json"), 16, None, None, 4, quiet=True)
    gpu, cpu = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("gpu", "cpu"))
    confident = [r for r in cpu if r["score"] >= CONFIDENT]
    found = sum(has_match(r, gpu) for r in confident)
    print(
        f"demo val mAP: GPU loader {stats['gpu'][0]:.4f}, CPU loader {stats['cpu'][0]:.4f}; "
        f"{len(gpu)} vs {len(cpu)} detections; {found} of the CPU loader's {len(confident)} with score >= "
        f"{CONFIDENT} found by the GPU loader (same class, IoU >= {MATCH_IOU}, score within {MATCH_SCORE})"
    )
    assert abs(stats["gpu"][0] - stats["cpu"][0]) <= 0.005
    assert abs(stats["gpu"][1] - stats["cpu"][1]) <= 0.005
    assert found >= 0.95 * len(confident)


# A confident detection moves little when the pixels change by a grey level or two:
# the other loader finds it in the same place. Low scores come and go with such changes.
CONFIDENT, MATCH_IOU, MATCH_SCORE = 0.3, 0.8, 0.05


def has_match(record: dict, others: list[dict]) -> bool:
    x, y, w, h = record["bbox"]
    for o in others:
        if o["image_id"] != record["image_id"] or o["category_id"] != record["category_id"]:
            continue
        if abs(o["score"] - record["score"]) > MATCH_SCORE:
            continue
        ox, oy, ow, oh = o["bbox"]
        iw = max(0.0, min(x + w, ox + ow) - max(x, ox))
        ih = max(0.0, min(y + h, oy + oh) - max(y, oy))
        if iw * ih / (w * h + ow * oh - iw * ih) >= MATCH_IOU:
            return True
    return False
