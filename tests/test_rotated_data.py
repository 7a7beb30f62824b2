"""Rotated-box data: 5-value bboxes (validation, check_box_form), [M, 6] targets
through the transforms, checked against the pixels, and the rotated demo.

The corner formula is docs/rotated.md's, written here again (`corners`) so that
the code under test is checked against the document, not against itself.
"""

import json
import math
import random
from io import BytesIO

import numpy as np
import pytest
import torch
from conftest import assert_user_error, run_cli
from PIL import Image

from retinanet.config import LABEL_CROWD, LABEL_PAD
from retinanet.data import demo
from retinanet.data import transforms as T
from retinanet.data.batch import Collate, stack_targets
from retinanet.data.coco import CocoAnnotations, DetectionDataset, check_box_form, check_decoded_size
from retinanet.errors import UserError

RECORD = "ann.json: annotations[0] (id 1)"


def corners(cx, cy, w, h, theta):
    """[4, 2] float64: (−,−), (+,−), (+,+), (−,+) of docs/rotated.md."""
    c, s = math.cos(theta), math.sin(theta)
    return np.array([(cx + dx * c + dy * s, cy - dx * s + dy * c) for dx, dy in DX_DY(w, h)])


def DX_DY(w, h):
    return ((-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2))


def inside(poly, height, width, margin=0.0):
    """bool [height, width]: pixel centres within `margin` pixels of the convex polygon
    [N, 2] or inside it (a negative margin: at least -margin inside)."""
    y, x = np.mgrid[0:height, 0:width] + 0.5
    nxt = np.roll(poly, -1, axis=0)
    orientation = np.sign(np.sum(poly[:, 0] * nxt[:, 1] - nxt[:, 0] * poly[:, 1]))
    ok = np.ones((height, width), dtype=bool)
    for (x0, y0), (x1, y1) in zip(poly, nxt):
        cross = (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0)
        ok &= orientation * cross / math.hypot(x1 - x0, y1 - y0) >= -margin
    return ok


def write(folder, doc, name="ann.json"):
    path = folder / name
    path.write_text(json.dumps(doc))
    return str(path)


def doc_with(*bboxes, width=100, height=80):
    """Image 5 (width x height) with one annotation per bbox, ids 1, 2, ..., category 9 (label 1)."""
    annotations = [{"id": i + 1, "image_id": 5, "category_id": 9, "bbox": b} for i, b in enumerate(bboxes)]
    image = {"id": 5, "file_name": "a.png", "width": width, "height": height}
    return {"images": [image], "annotations": annotations, "categories": [{"id": 9}, {"id": 2}]}


# --- annotations ------------------------------------------------------------


def test_five_value_bboxes_keep_their_angle_and_four_values_are_angle_zero(tmp_path):
    doc = doc_with([10, 10, 20, 30], [30, 20, 40, 10, 0.5], [40, 30, 10, 20, math.pi])
    doc["annotations"][1]["iscrowd"] = 1
    ann = CocoAnnotations(write(tmp_path, doc))
    rec = ann.images[0]
    assert ann.rotated and ann.first_rotated == "ann.json: annotations[1] (id 2)"
    assert rec.boxes == [[10, 10, 30, 40], [30, 20, 70, 30], [40, 30, 50, 50]]
    assert rec.angles == [0.0, 0.5, math.pi]
    assert rec.labels == [1, LABEL_CROWD, 1]
    targets = DetectionDataset.targets(rec, rotated=True)
    expected = [[20, 25, 20, 30, 0, 1], [50, 25, 40, 10, 0.5, LABEL_CROWD], [45, 40, 10, 20, math.pi, 1]]
    torch.testing.assert_close(targets, torch.tensor(expected, dtype=torch.float32))
    # The axis-aligned targets are those of the unrotated rectangles, as before.
    assert DetectionDataset.targets(rec).tolist() == [[*b, label] for b, label in zip(rec.boxes, rec.labels)]


@pytest.mark.parametrize(
    "bbox, words",
    [
        ([10, 10, 20, 30, float("nan")], ["has θ nan", "(−π, π]"]),
        ([10, 10, 20, 30, float("inf")], ["has θ inf", "(−π, π]"]),
        ([10, 10, 20, 30, 4.0], ["has θ 4.0", "(−π, π]"]),
        ([10, 10, 20, 30, -math.pi], [f"has θ {-math.pi!r}", "(−π, π]"]),
        ([10, 10, 0, 30, 0.5], ["bbox [10, 10, 0, 30, 0.5] has width or height <= 0"]),
        ([10, 10, 20, -1, 0.5], ["has width or height <= 0"]),
        ([10, float("nan"), 20, 30, 0.5], ["5 [x, y, w, h, θ]"]),
        ([10, 10, 20, 30, "0.5"], ["has θ '0.5'"]),
        ([10, 10, 20, 30, 0.5, 1], ["4 finite numbers [x, y, w, h]"]),
    ],
    ids=["nan", "inf", "4", "minus-pi", "w0", "h-1", "nan-y", "string", "six"],
)
def test_a_bad_rotated_bbox_is_one_line_naming_file_and_record(tmp_path, bbox, words):
    with pytest.raises(UserError) as e:
        CocoAnnotations(write(tmp_path, doc_with(bbox)))
    message = str(e.value)
    assert "\n" not in message and message.startswith(RECORD + ": bbox "), message
    for w in words:
        assert w in message, message


def test_theta_pi_is_accepted_and_minus_pi_is_not(tmp_path):
    assert CocoAnnotations(write(tmp_path, doc_with([10, 10, 20, 30, math.pi]))).images[0].angles == [math.pi]
    with pytest.raises(UserError):
        CocoAnnotations(write(tmp_path, doc_with([10, 10, 20, 30, -math.pi])))


def test_the_cli_refuses_a_bad_angle_in_one_line(tmp_path):
    (tmp_path / "images").mkdir()
    bad = write(tmp_path, doc_with([10, 10, 20, 30], [10, 10, 20, 30, float("nan")]), "bad.json")
    proc = run_cli("train", "o.pth", "--images", "images", "--annotations", bad, cwd=tmp_path, check=False)
    assert_user_error(proc, "bad.json: annotations[1] (id 2): bbox [10, 10, 20, 30, nan] has θ nan", "(−π, π]")


def test_check_box_form_refuses_rotated_annotations_for_an_axis_aligned_model(tmp_path):
    mixed = CocoAnnotations(write(tmp_path, doc_with([1, 1, 5, 5], [1, 1, 5, 5, 0.0], [1, 1, 5, 5, 0.3])))
    with pytest.raises(UserError) as e:
        check_box_form(mixed, rotated=False)
    assert str(e.value) == (
        "ann.json: annotations[1] (id 2): bbox has 5 values [x, y, w, h, θ]: a rotated-box annotation; "
        "train with --rotated-bbox"
    )
    check_box_form(mixed, rotated=True)
    plain = CocoAnnotations(write(tmp_path, doc_with([1, 1, 5, 5])))
    assert not plain.rotated
    check_box_form(plain, rotated=False)
    check_box_form(plain, rotated=True)  # a rotated model takes 4-value boxes as θ = 0


def test_the_out_of_image_check_uses_the_rotated_corners(tmp_path):
    # Unrotated (x 10..100, y 45..55) it fits 100 x 80; turned a quarter, y spans 5..95.
    with pytest.raises(UserError) as e:
        CocoAnnotations(write(tmp_path, doc_with([10, 45, 90, 10, math.pi / 2])))
    assert str(e.value) == f"{RECORD}: bbox [10, 45, 90, 10, {math.pi / 2!r}] lies outside image 5 (100x80, a.png)"
    # Unrotated x -10..50 is outside; turned a quarter it is x 15..25, y 20..80.
    CocoAnnotations(write(tmp_path, doc_with([-10, 45, 60, 10, math.pi / 2], height=100)))
    # Without width and height in the file the decoded image is checked, as for 4 values.
    doc = doc_with([10, 45, 90, 10, math.pi / 2])
    del doc["images"][0]["width"], doc["images"][0]["height"]
    rec = CocoAnnotations(write(tmp_path, doc)).images[0]
    assert check_decoded_size(rec, 100, 100, "a.png") is None
    assert check_decoded_size(rec, 80, 100, "a.png") == (
        f"ann.json: annotations[0] (id 1): bbox [10.0, 45.0, 90.0, 10.0, {round(math.pi / 2, 4)}] lies outside "
        "image 5 (100x80 as decoded from a.png)"
    )


# --- transforms -------------------------------------------------------------

H, W = 41, 60  # not square, so a swapped axis shows; 41 makes the resize's sx and sy differ
BOX = (22.3, 17.6, 26.0, 11.0, 0.55)  # cx cy w h θ: generic, no pixel centre on an edge


def drawn(box):
    """A dark H x W image with the rotated box's pixels (centres inside) bright."""
    image = torch.full((3, H, W), 20, dtype=torch.uint8)
    image[:, torch.from_numpy(inside(corners(*box), H, W))] = 250
    return image


def point_map(g: T.Geometry, height, width):
    """The pixel transform of `g` (no crop) on points, and the final size: resize, flip,
    quarter turns anti-clockwise, as torch.flip and torch.rot90 move pixels."""
    nh, nw = T.resized_shape(height, width, g.short, 1000)
    sx, sy = nw / width, nh / height

    def move(p):
        x, y, w = p[:, 0] * sx, p[:, 1] * sy, nw
        if g.flip:
            x = w - x
        h = nh
        for _ in range(g.quarter_turns % 4):
            x, y, w, h = y, w - x, h, w
        return np.stack([x, y], axis=1)

    return move


def same_corners(a, b, tol):
    """Two corner sets equal in some cyclic order or its reverse (a flip reverses it)."""
    for poly in (b, b[::-1]):
        for k in range(4):
            if np.abs(np.roll(poly, k, axis=0) - a).max() <= tol:
                return True
    return False


@pytest.mark.parametrize("turns", range(4))
@pytest.mark.parametrize("flip", [False, True], ids=["noflip", "flip"])
def test_flips_and_turns_move_rotated_boxes_with_the_pixels(flip, turns):
    g = T.Geometry(H, flip=flip, quarter_turns=turns)  # shorter side kept: pixels move exactly
    image = drawn(BOX)
    targets = torch.tensor([[*BOX, 2.0]])
    out = T.transform_image(image, g, 1000)
    ot, size, scale = T.transform_targets(targets, g, H, W, 1000)
    assert tuple(out.shape[-2:]) == size and scale == (1.0, 1.0) and ot.shape == (1, 6) and ot[0, 5] == 2
    cx, cy, w, h, theta = ot[0, :5].tolist()
    assert -math.pi < theta <= math.pi and (w, h) == pytest.approx(BOX[2:4])
    poly = corners(cx, cy, w, h, theta)
    assert same_corners(poly, point_map(g, H, W)(corners(*BOX)), 1e-4)
    # The box's polygon holds exactly the bright pixels (none within 0.01 px of an edge).
    bright = out[0].numpy() > 128
    assert bright.sum() > 200
    assert (bright <= inside(poly, *size, margin=0.01)).all()
    assert (inside(poly, *size, margin=-0.01) <= bright).all()


@pytest.mark.parametrize("flip, turns", [(False, 0), (True, 1), (False, 3)])
def test_a_resize_scales_centres_per_axis_and_sizes_by_the_mean_scale(flip, turns):
    g = T.Geometry(30, flip=flip, quarter_turns=turns)
    out = T.transform_image(drawn(BOX), g, 1000).float().mean(0).numpy()
    ot, size, (sx, sy) = T.transform_targets(torch.tensor([[*BOX, 0.0]]), g, H, W, 1000)
    assert sx != sy  # 60 -> 44, 41 -> 30
    cx, cy, w, h, theta = ot[0, :5].tolist()
    assert (w, h) == pytest.approx((BOX[2] * (sx + sy) / 2, BOX[3] * (sx + sy) / 2))
    poly = corners(cx, cy, w, h, theta)
    assert same_corners(poly, point_map(g, H, W)(corners(*BOX)), 0.05)
    # Antialiasing blurs the edges by about a pixel: bright inside, dark outside.
    assert (out[inside(poly, *size, margin=-1.0)] > 200).all()
    assert (out[~inside(poly, *size, margin=1.0)] < 40).all()


def test_angles_stay_in_the_half_open_turn():
    rng = torch.Generator().manual_seed(0)
    theta = torch.cat(
        [torch.tensor([math.pi, -math.pi / 2, 0.0, math.pi / 2]), (torch.rand(60, generator=rng) * 2 - 1) * math.pi]
    )
    n = len(theta)
    targets = torch.cat(
        [torch.full((n, 2), 20.0), torch.full((n, 1), 6.0), torch.full((n, 1), 3.0), theta[:, None], torch.zeros(n, 1)],
        dim=1,
    )
    for flip in (False, True):
        for turns in range(4):
            ot, _, _ = T.transform_targets(targets, T.Geometry(40, flip=flip, quarter_turns=turns), 40, 40, 1000)
            out = ot[:, 4]
            assert ((out > -math.pi) & (out <= math.pi)).all(), (flip, turns, out)
            expected = (-theta if flip else theta) + turns * math.pi / 2
            # The same angle up to whole turns.
            torch.testing.assert_close(torch.cos(out), torch.cos(expected), atol=1e-5, rtol=0)
            torch.testing.assert_close(torch.sin(out), torch.sin(expected), atol=1e-5, rtol=0)


def test_a_crop_of_rotated_targets_is_refused():
    targets = torch.tensor([[20.0, 20.0, 6.0, 3.0, 0.3, 1.0]])
    with pytest.raises(ValueError, match="rotated"):
        T.transform_targets(targets, T.Geometry(20, crop=(0, 0, 30, 30)), 40, 40, 1000)
    with pytest.raises(ValueError, match="rotated"):
        DetectionDataset("x", None, 40, 40, training=True, augment=T.Augment(crop=True), rotated=True)


def test_six_column_targets_are_padded_in_the_last_column():
    a = torch.tensor([[1.0, 2, 3, 4, 0.5, 2], [5, 6, 7, 8, -0.5, 0]])
    out = stack_targets([a, torch.zeros(0, 6)])
    assert out.shape == (2, 2, 6)
    assert torch.equal(out[0], a) and (out[1, :, 5] == LABEL_PAD).all() and (out[1, :, :5] == 0).all()
    assert stack_targets([]).shape == (0, 0, 5) and stack_targets([], columns=6).shape == (0, 0, 6)
    assert Collate(32, (0, 0, 0), columns=6)([None]).targets.shape == (0, 0, 6)


# --- the rotated demo -------------------------------------------------------


@pytest.fixture(scope="module")
def rotated_demo(tmp_path_factory):
    return demo.ensure(tmp_path_factory.mktemp("rotated-demo"), rotated=True)


def test_the_rotated_demo_has_its_own_cache_and_is_deterministic(rotated_demo, tmp_path, monkeypatch):
    monkeypatch.setenv("RETINANET_CACHE", str(tmp_path))
    assert demo.cache_dir() == tmp_path / f"demo-v{demo.VERSION}"
    assert demo.cache_dir(rotated=True) not in (demo.cache_dir(), tmp_path)
    assert demo.paths(rotated_demo, rotated=True)["val_annotations"] == str(rotated_demo / "val.json")
    demo._write_split(tmp_path, "val", demo.SPLITS["val"][0], demo.SPLITS["val"][1], rotated=True)
    assert (tmp_path / "val.json").read_bytes() == (rotated_demo / "val.json").read_bytes()
    for f in sorted((rotated_demo / "val").iterdir()):
        assert (tmp_path / "val" / f.name).read_bytes() == f.read_bytes(), f.name


def test_the_rotated_demo_is_like_the_demo_with_turned_objects(rotated_demo):
    coco = CocoAnnotations(str(rotated_demo / "train.json"))
    assert coco.rotated and len(coco.images) == demo.SPLITS["train"][0] and coco.category_ids == [1, 3, 7]
    with pytest.raises(UserError, match="train with --rotated-bbox"):
        check_box_form(coco, rotated=False)
    counts = [len(r.labels) for r in coco.images]
    assert 0.04 < counts.count(0) / len(counts) < 0.15 and 1.7 < sum(counts) / len(counts) < 2.8
    labels = [label for r in coco.images for label in r.labels]
    assert all(labels.count(c) > 0.25 * len(labels) for c in range(3))
    angles = np.array([a for r in coco.images for a in r.angles])
    assert np.histogram(angles, bins=8, range=(-math.pi, math.pi))[0].min() > 0.08 * len(angles)
    overlapping = 0
    for r in coco.images:
        polys = [corners(*DetectionDataset.targets(r, rotated=True)[k, :5].tolist()) for k in range(len(r.labels))]
        masks = [inside(p, demo.SIZE, demo.SIZE) for p in polys]
        overlapping += any((a & b).any() for i, a in enumerate(masks) for b in masks[:i])
    assert overlapping > 30


def test_the_rotated_demo_annotations_are_the_tight_boxes_of_the_drawn_pixels(rotated_demo):
    doc = json.loads((rotated_demo / "val.json").read_text())
    by_image = {im["id"]: [] for im in doc["images"]}
    for a in doc["annotations"]:
        by_image[a["image_id"]].append(a)
    ids = [c["id"] for c in doc["categories"]]
    rng = random.Random(demo.SPLITS["val"][1])  # replay the drawing, masks included
    for im in doc["images"]:
        img, objects = demo._draw_rotated_image(rng)
        stored = (rotated_demo / "val" / im["file_name"]).read_bytes()
        buffer = BytesIO()
        img.save(buffer, format="JPEG", quality=92)
        assert buffer.getvalue() == stored  # the replay is the stored image
        pixels = np.asarray(Image.open(BytesIO(stored)).convert("RGB")).astype(int)
        anns = by_image[im["id"]]
        assert len(anns) == len(objects)
        for k, (a, (_, cat, mask)) in enumerate(zip(anns, objects)):
            check_object(a, ids[cat], mask, [m for _, _, m in objects[k + 1 :]], pixels, cat)


def check_object(a, category_id, mask, later_masks, pixels, cat):
    x, y, w, h, theta = a["bbox"]
    poly = corners(x + w / 2, y + h / 2, w, h, theta)
    assert a["category_id"] == category_id and a["iscrowd"] == 0 and a["area"] == pytest.approx(w * h)
    np.testing.assert_allclose(np.array(a["segmentation"][0]).reshape(4, 2), poly, atol=1e-6)
    # Every drawn pixel's centre lies in the polygon, and the pixels reach each side.
    assert (mask <= inside(poly, demo.SIZE, demo.SIZE, margin=1e-6)).all()
    ys, xs = np.nonzero(mask)
    for side, ((x0, y0), (x1, y1)) in enumerate(zip(poly, np.roll(poly, -1, axis=0))):
        distance = np.abs((x1 - x0) * (ys + 0.5 - y0) - (y1 - y0) * (xs + 0.5 - x0)) / math.hypot(x1 - x0, y1 - y0)
        # A triangle touches its sides other than its base (side 2) at a vertex alone: a
        # sharp vertex may cover no pixel centre within a pixel of the side.
        assert distance.min() < (2.5 if cat == 2 and side != 2 else 1.0), (a, side)
    # In the JPEG, the object's visible pixels away from its edge show its class's colour.
    visible = mask & ~np.any(later_masks, axis=0) if later_masks else mask
    core = visible.copy()
    for axis in (0, 1):
        for shift in (1, -1):
            core &= np.roll(visible, shift, axis=axis)
    if core.sum() >= 20:
        others = np.delete(pixels[core], cat, axis=1).max(axis=1)
        assert np.mean(pixels[core][:, cat] > others + 40) > 0.95
