"""retinanet.draw and `infer --draw DIR`: where boxes and labels go, and that nothing else changes."""

import io
import json
import math

import numpy as np
import pytest
import torch
from conftest import BUSY, TINY_NAMES, demo_subset, run_cli, save_model, tiny_model
from PIL import Image, ImageDraw

import retinanet
from retinanet.draw import PALETTE, draw, layout
from retinanet.ops.rotated import corners
from retinanet.runtime import Detections

H, W = 120, 200
NAMES = {1: "square", 3: "disc", 7: "triangle"}


def noise(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def detections(rows, names=NAMES):
    """rows: (x1, y1, x2, y2, score, category id)."""
    t = torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)
    return Detections(t[:, :4], t[:, 4], t[:, 5].long(), names)


def marked(marks, shape):
    """Pixels a drawing may touch: each outline (width pixels inside its corners) and each label."""
    mask = np.zeros(shape[:2], bool)
    for m in marks:
        x1, y1, x2, y2 = m.box
        box = np.zeros_like(mask)
        box[y1 : y2 + 1, x1 : x2 + 1] = True
        box[y1 + m.width : y2 + 1 - m.width, x1 + m.width : x2 + 1 - m.width] = False
        lx1, ly1, lx2, ly2 = m.label
        mask |= box
        mask[ly1 : ly2 + 1, lx1 : lx2 + 1] = True
    return mask


ROWS = [
    (100.4, 60.6, 150.2, 110.0, 0.9, 1),  # room above: the label sits on the top edge, outside
    (10.0, 0.0, 60.0, 40.0, 0.8, 3),  # at the top edge: the label goes inside
    (170.0, 70.0, 260.0, 130.0, 0.5, 7),  # runs off the image: clipped; the label kept inside
    (20.0, 60.0, 80.0, 100.0, 0.29, 1),  # below the threshold: not drawn
    (300.0, 10.0, 340.0, 50.0, 0.95, 3),  # wholly outside: nothing to draw
]


def test_layout_places_boxes_and_labels():
    marks = layout(detections(ROWS), H, W, threshold=0.3)
    assert [m.box for m in marks] == [(100, 61, 150, 110), (10, 0, 60, 40), (170, 70, 199, 119)]
    assert [m.text for m in marks] == ["square 0.90", "disc 0.80", "triangle 0.50"]
    assert [m.colour for m in marks] == [PALETTE[1], PALETTE[3], PALETTE[7]]
    above, inside, clipped = (m.label for m in marks)
    assert above[3] == 60 and above[0] == 100  # ends on the row above the box
    assert inside[1] == 0 and inside[0] == 10  # no room above: from the box's top row down
    assert clipped[2] == W - 1 and clipped[0] < 170  # shifted left to stay in the image
    for lx1, ly1, lx2, ly2 in (above, inside, clipped):
        assert 0 <= lx1 < lx2 < W and 0 <= ly1 < ly2 < H


def test_draw_changes_only_outlines_and_labels():
    image = noise()
    dets = detections(ROWS)
    out = draw(image, dets)
    marks = layout(dets, H, W)
    mask = marked(marks, image.shape)
    np.testing.assert_array_equal(out[~mask], image[~mask])
    assert (out[mask] != image[mask]).any(axis=-1).mean() > 0.9
    labels = np.zeros_like(mask)
    for m in marks:
        labels[m.label[1] : m.label[3] + 1, m.label[0] : m.label[2] + 1] = True
    for m in marks:  # outline pixels that no label covers have the class colour
        own = marked([m], image.shape) & ~labels & ~np.any([marked([o], image.shape) for o in marks if o != m], 0)
        assert (out[own] == m.colour).all()
        lx1, ly1 = m.label[:2]
        assert tuple(out[ly1, lx1]) == m.colour  # the label's corner is its fill
    np.testing.assert_array_equal(image, noise())  # the input is not changed


def test_nothing_to_draw_leaves_the_image():
    image = noise(1)
    np.testing.assert_array_equal(draw(image, detections([])), image)
    np.testing.assert_array_equal(draw(image, detections(ROWS), threshold=0.99), image)


def test_draw_takes_and_returns_each_kind(tmp_path):
    image = noise(2)
    dets = detections(ROWS)
    want = draw(image, dets)
    chw = torch.from_numpy(image).permute(2, 0, 1)
    got = draw(chw, dets)
    assert got.dtype == torch.uint8 and got.shape == (3, H, W)
    np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), want)
    floats = draw(chw.float() / 255, dets)
    assert floats.dtype == torch.float32
    np.testing.assert_array_equal((floats * 255).round().byte().permute(1, 2, 0).numpy(), want)
    pil = draw(Image.fromarray(image), dets)
    assert isinstance(pil, Image.Image)
    np.testing.assert_array_equal(np.asarray(pil), want)
    Image.fromarray(image).save(tmp_path / "a.png")
    np.testing.assert_array_equal(draw(str(tmp_path / "a.png"), dets), want)
    assert retinanet.draw is draw


def test_labels_show_ids_without_names():
    marks = layout(detections(ROWS, names=None), H, W)
    assert [m.text for m in marks] == ["1 0.90", "3 0.80", "7 0.50"]


def test_names_come_from_the_checkpoint(tmp_path):
    image = noise(3)
    named = retinanet.load(save_model(tiny_model(BUSY), tmp_path / "named.pth"))
    assert named.category_names == dict(zip([1, 3, 7], TINY_NAMES))
    assert named(image).names == named.category_names
    unnamed = retinanet.load(save_model(tiny_model(BUSY), tmp_path / "ids.pth", ids=[2, 4, 6]))
    assert unnamed.category_names == {2: "2", 4: "4", 6: "6"}


def test_exports_carry_the_names(tiny):
    from retinanet.runtime.onnxruntime import OnnxRuntimeBackend

    pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed")
    assert retinanet.load(tiny["fp32"]).category_names == dict(zip([1, 3, 7], TINY_NAMES))
    assert OnnxRuntimeBackend(tiny["fp32"]).category_names == TINY_NAMES


def drawn_folder(tmp_path, demo_root, count=4):
    images, ann = demo_subset(demo_root, tmp_path, count, split="val")
    model = save_model(tiny_model(BUSY), tmp_path / "tiny.pth")
    return str(images), str(ann), model


def test_infer_draws_each_image(tmp_path, demo_root):
    images, ann, model = drawn_folder(tmp_path, demo_root)
    run_cli(
        "infer",
        model,
        "--images",
        images,
        "--output",
        "d.json",
        "--draw",
        "drawn",
        "--draw-threshold",
        "0.1",
        cwd=tmp_path,
    )
    records = json.loads((tmp_path / "d.json").read_text())
    doc = json.loads(open(ann).read())
    names = sorted(p.name for p in (tmp_path / "drawn").iterdir())
    assert names == sorted(im["file_name"] for im in doc["images"])
    detector = retinanet.load(model)
    touched = 0
    for i, name in enumerate(sorted(names)):
        original = np.asarray(Image.open(f"{images}/{name}").convert("RGB"))
        got = np.asarray(Image.open(tmp_path / "drawn" / name).convert("RGB"))
        assert got.shape == original.shape
        rows = [
            (*r["bbox"][:2], r["bbox"][0] + r["bbox"][2], r["bbox"][1] + r["bbox"][3], r["score"], r["category_id"])
            for r in records
            if r["image_id"] == i + 1
        ]
        want = draw(original, detections(rows, detector.category_names), threshold=0.12)
        # JPEG in, JPEG out (quality 95, no chroma subsampling): the same encoding of ours
        buffer = io.BytesIO()
        Image.fromarray(want).save(buffer, format="JPEG", quality=95, subsampling=0)
        np.testing.assert_array_equal(got, np.asarray(Image.open(buffer).convert("RGB")))
        touched += int((want != original).any())
    assert touched == len(names)


def test_draw_folder_errors(tmp_path, demo_root, capsys, monkeypatch):
    from test_video import in_process

    images, _, model = drawn_folder(tmp_path, demo_root, count=1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.jpg").write_bytes(b"mine")
    (tmp_path / "file").write_text("x")
    cases = {
        "full": "not empty",
        images: "must not be the image folder",
        "file": "needs a folder",
        "file/sub": "cannot create",
        "out.mp4": "for --video",
    }
    for out, words in cases.items():
        code, lines = in_process(capsys, "infer", model, "--images", images, "--output", "d.json", "--draw", out)
        assert code == 2 and len(lines) == 1, (out, lines)
        assert out in lines[0] and words in lines[0], lines[0]
        assert not (tmp_path / "d.json").exists()
    assert (tmp_path / "full" / "keep.jpg").read_bytes() == b"mine"


def rotated(rows, names=NAMES):
    """rows: (cx, cy, w, h, θ, score, category id)."""
    t = torch.tensor(rows, dtype=torch.float32).reshape(-1, 7)
    return Detections(t[:, :5], t[:, 5], t[:, 6].long(), names)


def polygon_mask(marks, shape, grow=1):
    """Pixels within `grow` of each mark's polygon (filled), and each label."""
    image = Image.new("1", (shape[1], shape[0]))
    pen = ImageDraw.Draw(image)
    for m in marks:
        pen.polygon(m.polygon, fill=1)
    mask = np.asarray(image).copy()
    for _ in range(grow):  # grown by one pixel each way per step
        mask[1:] |= mask[:-1].copy()
        mask[:-1] |= mask[1:].copy()
        mask[:, 1:] |= mask[:, :-1].copy()
        mask[:, :-1] |= mask[:, 1:].copy()
    return mask | label_mask(marks, shape)


def label_mask(marks, shape):
    mask = np.zeros(shape[:2], bool)
    for m in marks:
        mask[m.label[1] : m.label[3] + 1, m.label[0] : m.label[2] + 1] = True
    return mask


# Sizes where the outline is 1 pixel wide (H x W) and 3 pixels wide (the larger one).
LARGE = (900, 1300)
TURNED = [
    (120.0, 70.0, 60.0, 30.0, 0.5, 0.9, 1),
    (50.0, 60.0, 40.0, 70.0, -1.1, 0.8, 3),
    (160.0, 30.0, 20.0, 20.0, math.pi / 4, 0.7, 7),
    (-40.0, -40.0, 30.0, 30.0, 0.3, 0.9, 1),  # wholly outside: nothing to draw
]


@pytest.mark.parametrize("scale", [1, 6.5])
def test_rotated_draws_only_on_its_polygon_and_label(scale):
    height, width = (H, W) if scale == 1 else LARGE
    image = np.random.default_rng(4).integers(0, 256, (height, width, 3), dtype=np.uint8)
    rows = [(cx * scale, cy * scale, w * scale, h * scale, *rest) for cx, cy, w, h, *rest in TURNED]
    dets = rotated(rows)
    marks = layout(dets, height, width)
    assert len(marks) == 3 and marks[0].width == (1 if scale == 1 else 3)
    out = draw(image, dets)
    # A 1-pixel outline is PIL's line, whose rounded pixels may fall a pixel outside the
    # filled polygon; a wider one is cut by the fill, so it stays inside.
    mask = polygon_mask(marks, image.shape, grow=1 if scale == 1 else 0)
    np.testing.assert_array_equal(out[~mask], image[~mask])
    labels = label_mask(marks, image.shape)
    for m, row in zip(marks, rows):
        want = corners(torch.tensor(row[:5]))
        assert m.polygon == tuple((round(x), round(y)) for x, y in want.tolist())
        xs, ys = [x for x, _ in m.polygon], [y for _, y in m.polygon]
        assert m.box == (max(0, min(xs)), max(0, min(ys)), min(width - 1, max(xs)), min(height - 1, max(ys)))
        # Points along each drawn edge, moved half the outline's width inwards, have the class
        # colour within a pixel (a sloped line's pixels are rounded either way).
        drawn = torch.tensor(m.polygon, dtype=torch.float32)
        centre = drawn.mean(0)
        for a, b in zip(drawn, drawn.roll(-1, 0)):
            for t in np.linspace(0.1, 0.9, 9):
                p = a + (b - a) * float(t)
                p = p + (centre - p) / (centre - p).norm() * (m.width - 1) / 2
                x, y = round(float(p[0])), round(float(p[1]))
                near = out[y - 1 : y + 2, x - 1 : x + 2][~labels[y - 1 : y + 2, x - 1 : x + 2]]
                assert (near == m.colour).all(-1).any() or labels[y, x], (m.polygon, x, y)
        top = min(m.polygon, key=lambda p: (p[1], p[0]))
        # Above the top-most corner, from its x, shifted left where the image ends.
        assert m.label[3] == top[1] - 1 and m.label[0] == min(top[0], width - (m.label[2] - m.label[0] + 1))


def test_unturned_rotated_boxes_draw_as_axis_aligned():
    """θ = 0, a quarter turn of the swapped sides and a half turn are the same rectangle, drawn alike."""
    for height, width in ((H, W), LARGE):
        image = np.random.default_rng(5).integers(0, 256, (height, width, 3), dtype=np.uint8)
        rows = ROWS[:2] + [(30.0, 50.0, 90.0, 110.0, 0.6, 7)]  # inside the image: no edge clipped
        want = draw(image, detections(rows))
        for swap, theta in ((False, 0.0), (True, math.pi / 2), (False, math.pi), (True, -math.pi / 2)):
            turned = []
            for x1, y1, x2, y2, score, cat in rows:
                w, h = (y2 - y1, x2 - x1) if swap else (x2 - x1, y2 - y1)
                turned.append(((x1 + x2) / 2, (y1 + y2) / 2, w, h, theta, score, cat))
            np.testing.assert_array_equal(draw(image, rotated(turned)), want)


def test_positive_angles_turn_anticlockwise_on_screen():
    blank = np.zeros((H, W, 3), np.uint8)

    def outline(theta):
        dets = rotated([(100.0, 70.0, 80.0, 30.0, theta, 0.9, 1)])
        return draw(blank, dets).any(-1) & ~label_mask(layout(dets, H, W), blank.shape)

    flat, turned = outline(0.0), outline(0.3)
    assert np.nonzero(flat[:, 130:])[0].min() == 55  # the top edge, y = 70 − 15
    # Anti-clockwise on screen: the right end rises, the left end drops.
    assert np.nonzero(turned[:, 130:])[0].min() < 55 - 5
    assert np.nonzero(turned[:, :70])[0].min() > 55 + 5
    right_top = corners(torch.tensor([100.0, 70.0, 80.0, 30.0, 0.3]))[1]  # unrotated top-right
    x, y = round(float(right_top[0])), round(float(right_top[1]))
    assert turned[y - 1 : y + 2, x - 1 : x + 2].any()


def test_rotated_box_partly_outside_the_image():
    image = noise(6)
    rows = [(190.0, 5.0, 80.0, 40.0, 0.4, 0.9, 3), (-10.0, 110.0, 60.0, 60.0, -0.7, 0.8, 7)]
    dets = rotated(rows)
    marks = layout(dets, H, W)
    out = draw(image, dets)
    assert len(marks) == 2
    for m in marks:
        assert (
            min(min(p) for p in m.polygon) < 0 or max(x for x, _ in m.polygon) >= W or max(y for _, y in m.polygon) >= H
        )
        x1, y1, x2, y2 = m.box
        assert 0 <= x1 <= x2 < W and 0 <= y1 <= y2 < H
        lx1, ly1, lx2, ly2 = m.label
        assert 0 <= lx1 < lx2 < W and 0 <= ly1 < ly2 < H
        assert tuple(out[ly1, lx1]) == m.colour
    mask = polygon_mask(marks, image.shape)
    np.testing.assert_array_equal(out[~mask], image[~mask])
    assert (out[mask] != image[mask]).any()
    np.testing.assert_array_equal(draw(image, rotated(rows), threshold=0.95), image)
