"""DALI pipelines (--with-dali) against the PyTorch loader.

The DALI pipelines draw their own random parameters and report them; the
PyTorch loader is replayed with the same parameters and must give the same
boxes exactly and the same pixels within IMAGE_TOLERANCE. CPU pipelines run
here and in CI; the GPU ones (marked gpu) on the lent H100.
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from conftest import assert_user_error, run_cli

from retinanet.config import LABEL_CROWD, LABEL_PAD
from retinanet.data import dali as D  # our module: an error in it is a failure, never a skip
from retinanet.data import transforms as T
from retinanet.data.batch import Collate
from retinanet.data.coco import CocoAnnotations, DetectionDataset
from retinanet.images import mean_pixel

try:
    import nvidia.dali  # noqa: F401

    MISSING = None
except ImportError as e:
    MISSING = f"NVIDIA DALI is not installed ({e}); pip install 'retinanet[dali]'"

# DALI is in the [test] extra, so CI has it: there its absence fails these tests.
needs_dali = pytest.mark.skipif(MISSING is not None and os.environ.get("CI") != "true", reason=str(MISSING))

MAX_SIZE, MULTIPLE = 333, 128
FILL = mean_pixel([0.485, 0.456, 0.406])
# Grey levels. Measured: DALI's antialiased linear resize and torchvision's
# antialiased bilinear resize of the same decoded JPEG differ by at most 1
# (libjpeg-turbo decodes identically). GPU decoding (nvJPEG) upsamples the
# 4:2:0 chroma its own way. Emulated here by replacing libjpeg-turbo's
# triangular chroma upsampling with pixel replication on these images: at most
# 20 levels apart, 2.5 in mean per image before resizing (crops are resized up
# as often as down). The bounds leave room for IDCT and resize rounding, and
# still fail a mirrored, rotated or misplaced crop (~220 max, ~55 mean) and a
# one-pixel shift (~5 in mean).
IMAGE_TOLERANCE = 1
GPU_MAX_TOLERANCE = 40
GPU_MEAN_TOLERANCE = 3.5


@pytest.fixture(scope="module")
def odd_dataset(tmp_path_factory):
    """JPEGs of assorted sizes and aspect ratios with boxes, a crowd region, an
    image without annotations and non-contiguous category ids."""
    from PIL import Image

    root = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(0)
    sizes = [
        (97, 143),
        (200, 120),
        (64, 300),
        (150, 150),
        (321, 180),
        (90, 91),
        (240, 320),
        (133, 77),
        (180, 260),
        (111, 222),
        (300, 64),
        (128, 129),
    ]
    images, annotations = [], []
    for i, (h, w) in enumerate(sizes):
        # Smooth colour blobs plus mild noise: JPEG-like content, not pure noise.
        small = rng.integers(0, 255, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR), dtype=np.int16)
        img = np.clip(img + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"{i:03d}.jpg", quality=92)
        images.append({"id": 10 + i, "file_name": f"{i:03d}.jpg", "width": w, "height": h})
        if i == 5:
            continue  # background only
        for k in range(1 + i % 4):
            bw, bh = rng.uniform(8, w / 2), rng.uniform(8, h / 2)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": 10 + i,
                    "category_id": [2, 5, 9][k % 3],
                    "bbox": [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)],
                    "iscrowd": int(i == 3 and k == 1),
                }
            )
    path = root / "ann.json"
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": [{"id": c} for c in (2, 5, 9)]})
    )
    return root, CocoAnnotations(str(path))


class Replay(T.Augment):
    """The PyTorch loader's augmentation, made to apply a given geometry."""

    def __init__(self, geometry: T.Geometry):
        super().__init__()
        self.fixed = geometry

    def geometry(self, rng, short, boxes, height, width):
        return self.fixed


def pytorch_batch(root, coco, params) -> object:
    """The PyTorch loader's batch for DALI-reported (image id, size, geometry)."""
    index = {rec.id: i for i, rec in enumerate(coco.images)}
    samples = []
    for image_id, _, g in params:
        ds = DetectionDataset(str(root), coco, 0, MAX_SIZE, training=True, jitter=(g.short, g.short), augment=Replay(g))
        samples.append(ds[index[image_id]])
    return Collate(MULTIPLE, FILL)(samples)


def assert_same_batch(dali_batch, torch_batch, tolerance=IMAGE_TOLERANCE):
    assert dali_batch.image_ids == torch_batch.image_ids
    assert dali_batch.sizes == torch_batch.sizes
    torch.testing.assert_close(dali_batch.scales, torch_batch.scales, rtol=0, atol=0)
    assert torch.equal(dali_batch.targets, torch_batch.targets)  # boxes exact
    assert dali_batch.images.shape == torch_batch.images.shape and dali_batch.images.dtype == torch.uint8
    diff = (dali_batch.images.cpu().int() - torch_batch.images.int()).abs()
    assert diff.max().item() <= tolerance, diff.max()


@needs_dali
@pytest.mark.parametrize("augment", [T.Augment(), T.Augment(crop=True, rotate=True)], ids=["flip", "crop+rotate"])
def test_training_pipeline_equals_pytorch_loader_for_the_same_geometry(odd_dataset, augment):
    root, coco = odd_dataset
    loader = D.training_loader(
        str(root), coco, 4, MAX_SIZE, MULTIPLE, FILL, (60, 200), augment, torch.device("cpu"), threads=2, seed=3
    )
    seen_flips, seen_turns, seen_crops, crowd = set(), set(), 0, False
    for _ in range(3 * len(loader)):  # three epochs of 3 batches
        outs = loader.run()
        params = D.training_params(outs)
        batch = loader._training_batch(outs)
        assert_same_batch(batch, pytorch_batch(root, coco, params))
        for _, _size, g in params:
            assert 60 <= g.short <= 200
            seen_flips.add(g.flip)
            seen_turns.add(g.quarter_turns)
            seen_crops += g.crop is not None
        crowd |= bool((batch.targets[..., 4] == LABEL_CROWD).any())
        assert set(batch.targets[..., 4].unique().tolist()) <= {LABEL_PAD, LABEL_CROWD, 0, 1, 2}
    assert seen_flips == {False, True}
    assert seen_turns == ({0, 1, 2, 3} if augment.rotate else {0})
    assert (seen_crops > 0) == augment.crop
    assert crowd or augment.crop  # crowd regions travel as LABEL_CROWD (a crop may cut them away)


@needs_dali
def test_colour_augmentations_run_and_keep_the_geometry(odd_dataset):
    root, coco = odd_dataset
    loader = D.training_loader(
        str(root),
        coco,
        4,
        MAX_SIZE,
        MULTIPLE,
        FILL,
        (60, 200),
        T.Augment(brightness=True),
        torch.device("cpu"),
        threads=2,
        seed=4,
    )
    ratios = []
    for _ in range(len(loader)):
        outs = loader.run()
        params = D.training_params(outs)
        batch, plain = loader._training_batch(outs), pytorch_batch(root, coco, params)
        assert torch.equal(batch.targets, plain.targets)
        for i, (_, _, g) in enumerate(params):
            h, w = T.transform_targets(torch.zeros(0, 5), g, *params[i][1], MAX_SIZE)[1]
            ratios.append(batch.images[i, :, :h, :w].float().mean() / plain.images[i, :, :h, :w].float().mean())
    ratios = torch.stack(ratios)
    # Brightness x U(0.75, 1.25) per image (clipping at 255 pulls bright images down a little).
    assert ratios.min() > 0.7 and ratios.max() < 1.3 and ratios.std() > 0.05, ratios
    both = T.Augment(brightness=True, contrast=True, saturation=True, hue=True)
    loader = D.training_loader(
        str(root), coco, 4, MAX_SIZE, MULTIPLE, FILL, (60, 200), both, torch.device("cpu"), threads=2, seed=4
    )
    outs = loader.run()
    assert torch.equal(loader._training_batch(outs).targets, pytorch_batch(root, coco, D.training_params(outs)).targets)


@needs_dali
def test_inference_pipeline_equals_pytorch_loader(odd_dataset):
    from retinanet.infer import make_loader

    root, coco = odd_dataset

    class FakeDetector:  # what make_loader reads of a detector
        device = torch.device("cpu")

        class config:
            pad_multiple, mean = MULTIPLE, [0.485, 0.456, 0.406]

    ours = list(make_loader(FakeDetector, str(root), coco, 5, 150, MAX_SIZE, 2, with_dali=True))
    theirs = list(make_loader(FakeDetector, str(root), coco, 5, 150, MAX_SIZE, 0))
    assert [len(b.image_ids) for b in ours] == [5, 5, 2]
    for a, b in zip(ours, theirs, strict=True):
        assert_same_batch(a, b)


@needs_dali
@pytest.mark.parametrize("world", [2, 3])
def test_sharding_is_disjoint_and_complete(odd_dataset, world):
    root, coco = odd_dataset
    every = sorted(rec.id for rec in coco.images)
    # Training: each epoch's global shuffle is cut into disjoint shards.
    for epoch_of in range(2):
        shards = []
        for rank in range(world):
            loader = D.training_loader(
                str(root),
                coco,
                1,
                MAX_SIZE,
                MULTIPLE,
                FILL,
                (64, 64),
                T.Augment(),
                torch.device("cpu"),
                threads=1,
                seed=5,
                rank=rank,
                world=world,
            )
            mine = D.shard_range(len(coco.images), rank, world)
            ids = []
            for _ in range(epoch_of + 1):  # the second epoch reshuffles
                ids = [D.training_params(loader.run())[0][0] for _ in mine]
            shards.append(ids)
        flat = [i for s in shards for i in s]
        assert sorted(flat) == every, shards
    # Inference: a contiguous shard per rank, the padded last batch dropped;
    # more ranks than images leave some shards empty.
    seen, few_seen = [], []
    for rank in range(world):
        few = D.inference_loader(
            str(root),
            coco.images[:2],
            4,
            100,
            MAX_SIZE,
            MULTIPLE,
            FILL,
            torch.device("cpu"),
            threads=1,
            rank=rank,
            world=world,
        )
        few_seen += [i for b in few for i in b.image_ids]

        loader = D.inference_loader(
            str(root),
            coco.images,
            4,
            100,
            MAX_SIZE,
            MULTIPLE,
            FILL,
            torch.device("cpu"),
            threads=1,
            rank=rank,
            world=world,
        )
        seen += [i for b in loader for i in b.image_ids]
    assert sorted(seen) == every
    assert few_seen == [rec.id for rec in coco.images[:2]]


def test_crop_window_meets_threshold_and_keeps_boxes_by_centre():
    rng = random.Random(0)
    boxes = torch.tensor([[10.0, 10.0, 60.0, 50.0], [70.0, 20.0, 110.0, 90.0]])
    crops = 0
    for _ in range(200):
        window = T.random_crop_window(rng, boxes, 128, 96)
        if window is None:
            continue
        crops += 1
        x0, y0, w, h = window
        assert 0 <= x0 and 0 <= y0 and x0 + w <= 128 and y0 + h <= 96
        assert 0.3 * 128 - 1 <= w and 0.3 * 96 - 1 <= h
        assert (T._iou_with_window(boxes, x0, y0, x0 + w, y0 + h) >= 0.1 - 1e-6).all()
    assert 0 < crops < 200  # "no crop" is one of six outcomes, and failed searches keep the image
    targets = torch.tensor([[10.0, 10.0, 60.0, 50.0, 0], [70.0, 20.0, 110.0, 90.0, 1]])
    kept = T.crop_targets(targets, 30, 0, 50, 96)  # centre of box 0 (35, 30) inside, box 1 (90, 55) outside
    assert kept.tolist() == [[0.0, 10.0, 30.0, 50.0, 0.0]]


def test_with_dali_without_dali_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "nvidia.dali", None)
    from retinanet.data.dali import INSTALL_HINT, require_dali
    from retinanet.errors import UserError

    with pytest.raises(UserError, match="retinanet\\[dali\\]"):
        require_dali()
    # Through the CLI, in a process where DALI cannot be imported.
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['nvidia.dali'] = None  # import fails\n")
    proc = run_cli(
        "train", "x.pth", "--with-dali", "--iters", "1", cwd=tmp_path, check=False, env={"PYTHONPATH": str(shim)}
    )
    assert_user_error(proc, INSTALL_HINT)
    assert not (tmp_path / "x.pth").exists()


def assert_same_records_per_image(got, want):
    """The same detection records per image, in any order among near-ties: category,
    score within 1e-5 and box within 0.01 px (the rounding of the written files)."""
    by_image = {}
    for r in got:
        by_image.setdefault(r["image_id"], []).append(r)
    assert len(got) == len(want)
    for w in want:
        free = by_image.get(w["image_id"], [])
        hits = [
            g
            for g in free
            if g["category_id"] == w["category_id"]
            and abs(g["score"] - w["score"]) <= 1.01e-5
            and max(abs(a - b) for a, b in zip(g["bbox"], w["bbox"])) <= 0.0101
        ]
        assert hits, f"no DALI detection for {w}"
        free.remove(hits[0])


@needs_dali
@pytest.mark.slow
def test_with_dali_infer_map_equals_pytorch_loader_and_train_runs(
    trained, demo_val, demo_root, tiny_demo_env, tmp_path
):
    from test_workflow import final_map

    from retinanet import checkpoint

    work, _, env = trained
    plain_stdout, plain_json = demo_val  # the session's `retinanet infer demo.pth`, PyTorch loader
    dali = run_cli(
        "infer",
        str(work / "demo.pth"),
        "--images",
        str(demo_root / "val"),
        "--annotations",
        str(demo_root / "val.json"),
        "--output",
        "dali.json",
        "--with-dali",
        cwd=tmp_path,
        env={**env, "OMP_NUM_THREADS": "1"},  # DALI's threads work beside the model's: as in one_thread
    )
    assert abs(final_map(plain_stdout) - final_map(dali.stdout)) < 0.005
    if not torch.cuda.is_available():
        # On the CPU both loaders decode with libjpeg-turbo and the 128 px demo images
        # are not resized: the same pixels, so the same detections (measured: the
        # 6468 records equal up to the last rounded digit). On a GPU nvJPEG decodes
        # otherwise (GPU_MAX_TOLERANCE above), and the mAP bound is the check.
        plain = json.loads(plain_json.read_text())
        assert len(plain) > 1000
        assert_same_records_per_image(json.loads((tmp_path / "dali.json").read_text()), plain)
    # Training through the DALI loaders, crops on, then validation through the DALI
    # inference pipeline: on the 8-image demo (tiny_demo_env), whose batch of 8 is one
    # epoch. The pipelines are under test here, not learning; two steps reach both.
    proc = run_cli(
        "train",
        "d.pth",
        "--with-dali",
        "--augment-crop",
        "--iters",
        "2",
        "--val-iters",
        "2",
        cwd=tmp_path,
        env=tiny_demo_env,
    )
    assert "validation at iteration 2" in proc.stdout and final_map(proc.stdout) >= 0
    assert checkpoint.load(str(tmp_path / "d.pth"))["iteration"] == 2


@pytest.mark.gpu
@needs_dali
def test_gpu_pipelines_match_the_cpu_ones(odd_dataset):
    root, coco = odd_dataset
    cuda = torch.device("cuda")
    for augment in (T.Augment(), T.Augment(crop=True, rotate=True)):
        loader = D.training_loader(
            str(root), coco, 4, MAX_SIZE, MULTIPLE, FILL, (60, 200), augment, cuda, threads=2, seed=3
        )
        for _ in range(len(loader)):
            outs = loader.run()
            params = D.training_params(outs)
            batch = loader._training_batch(outs)
            assert batch.images.is_cuda
            reference = pytorch_batch(root, coco, params)
            assert_same_batch(batch, reference, tolerance=GPU_MAX_TOLERANCE)  # geometry and boxes exact
            diff = (batch.images.cpu().float() - reference.images.float()).abs()
            for i, (image_id, (h, w), g) in enumerate(params):
                # Over the image itself: padding (equal on both sides) would dilute the mean.
                rows, cols = T.transform_targets(torch.zeros(0, 5), g, h, w, MAX_SIZE)[1]
                mean = diff[i, :, :rows, :cols].mean().item()
                assert mean <= GPU_MEAN_TOLERANCE, (image_id, g, mean, diff[i].max().item())


@needs_dali
def test_undecodable_image_is_a_user_error_naming_it(odd_dataset, tmp_path):
    import shutil

    from retinanet.errors import UserError

    root, coco = odd_dataset
    bad = tmp_path / "imgs"
    shutil.copytree(root, bad)
    (bad / coco.images[2].file_name).write_bytes(b"not a jpeg")
    loader = D.inference_loader(str(bad), coco.images, 4, 100, MAX_SIZE, MULTIPLE, FILL, torch.device("cpu"), threads=1)
    with pytest.raises(UserError, match=f"{coco.images[2].file_name}: cannot decode image .*image id 12"):
        list(loader)
