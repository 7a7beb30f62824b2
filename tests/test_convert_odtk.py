"""`retinanet convert` on ODTK checkpoints: the converted model detects what ODTK does.

The checkpoints are built in ODTK's published checkpoint layout (tests/odtk_layout.py:
key names, shapes, ratios and scales as ODTK stores them, its training entries) with
random seeded weights, and the detections of the converted model are compared with an
independent implementation of ODTK's network, anchors, "+1" decode and NMS written
from that layout and those conventions (also in tests/odtk_layout.py, which imports
nothing from retinanet).
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path

import odtk_layout as odtk
import pytest
import torch
from conftest import assert_user_error, run_cli

from retinanet import checkpoint
from retinanet.convert import convert
from retinanet.errors import UserError

# One thread: float64 depthwise convs (MobileNetV2) run as thousands of small parallel
# regions, which stall whenever another process holds a core (measured: its forward 0.7 s
# on one thread, 7 to 33 s on two beside other jobs); the larger convs lose little.
pytestmark = pytest.mark.usefixtures("one_thread")

# COCO's 80 detection categories as its public category table lists them: ids 1..90
# without the ten that were never used.
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
COCO_NAMES = [
    *("person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light"),
    *("fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow"),
    *("elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee"),
    *("skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard"),
    *("tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple"),
    *("sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch"),
    *("potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard"),
    *("cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase"),
    *("scissors", "teddy bear", "hair drier", "toothbrush"),
]
# A --categories file listing its ids out of order, with names that sort otherwise than
# the ids: the converted checkpoint must take them in id order.
CATEGORIES = [{"id": 7, "name": "alpha"}, {"id": 3, "name": "zebra"}, {"id": 12, "name": "moose"}]
# Two images of 256 x 384 (multiples of ODTK's 128): five levels down to 2 x 3 cells.
# Float64 on both sides (random networks amplify float32 rounding to ~1e-5 of their
# outputs, which would leave near-equal scores in either order and NMS to choose
# between them), so that the differences left are the float32 arithmetic of our
# decode and NMS.
IMAGES = odtk.sample_images(2, 256, 384, seed=11).double()
# Our decode casts scores to float32: a score < 1 moves by <= 3e-8.
SCORE_TOL = 1e-7
# And computes boxes in float32: coordinates < 1024 px carry <= 6e-5 px per rounding,
# a few roundings deep (anchor centre and width, delta product, exp).
BOX_TOL = 1e-3


# Seeds of the random weights, chosen (among the first few) so that NMS with the +1 IoU
# keeps other detections than with the continuous one on every compared image, which
# assert_data_exercises_odtks_rules checks.
SEEDS = {("ResNet18FPN", 3): 2, ("ResNet50FPN", 3): 1, ("MobileNetV2FPN", 3): 2, ("ResNet18FPN", 80): 1}


@functools.cache
def odtk_checkpoint(name: str, classes: int) -> dict:
    """Built once per session (a ResNet50's takes seconds), with BN counters; tests take
    odtk.without_counters of it for the layout `odtk train` writes."""
    return odtk.checkpoint(name, classes, SEEDS[name, classes], batches_tracked=True)


@functools.cache
def odtk_heads(name: str, classes: int, images: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """ODTK's head outputs on the first `images` of IMAGES."""
    return odtk.forward(odtk_checkpoint(name, classes), IMAGES[:images])


@pytest.fixture
def categories_file(tmp_path):
    path = tmp_path / "categories.json"
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": CATEGORIES}))
    return str(path)


def convert_saved(tmp_path, ckpt: dict, stem: str, **kwargs):
    """torch.save `ckpt` as ODTK does, convert it; the converted (model, state)."""
    source = tmp_path / f"{stem}.pth"
    torch.save(ckpt, source)
    output = tmp_path / f"{stem}-converted.pth"
    convert(str(source), str(output), **kwargs)
    return checkpoint.load_model(str(output))


def in_float64(model):
    """The converted model in float64, its normalisation constants computed in float64
    from its config too (they are derived buffers, made in float32)."""
    model.double()
    model.pixel_mean = torch.tensor(model.config.mean, dtype=torch.float64).view(1, 3, 1, 1) * 255
    model.pixel_std = torch.tensor(model.config.std, dtype=torch.float64).view(1, 3, 1, 1) * 255
    return model


def assert_data_exercises_odtks_rules(ckpt: dict, heads, box_clamp: float) -> None:
    """What makes equality with ODTK meaningful rather than luck of the data. Our decode
    clamps dw, dh at box_clamp (ODTK does not): no delta comes near it. Every stage
    has work: hundreds of candidates per image, scores well below 1. No candidate box
    lies wholly outside the input, where ODTK's one-sided clipping leaves x1 > x2 (see
    test_boxes_wholly_outside_the_input). And scores are unambiguous: the reference's
    detections are further apart than SCORE_TOL, so float32 keeps their order. NMS
    with the continuous IoU instead of the +1 one keeps other detections: the
    comparison would catch a converted model that lost the +1 there."""
    cls_heads, box_heads = heads
    for box in box_heads:
        b, _, h, w = box.shape
        assert float(box.reshape(b, -1, 4, h, w)[:, :, 2:].max()) < box_clamp - 1
    assert max(float(torch.sigmoid(c).max()) for c in cls_heads) < 0.99
    for scores, boxes, _ in odtk.candidates(ckpt, cls_heads, box_heads):
        assert len(scores) >= 200
        assert bool((boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all())
    plus_one = odtk.postprocess(ckpt, cls_heads, box_heads)
    for scores, _, _ in plus_one:
        assert bool((scores[:-1] - scores[1:] > SCORE_TOL).all())
    continuous = odtk.postprocess(ckpt, cls_heads, box_heads, nms_offset=0.0)
    for a, b in zip(plus_one, continuous):
        assert len(a[1]) != len(b[1]) or not torch.equal(a[1], b[1])


def assert_same_detections(ours: tuple[torch.Tensor, ...], reference: list) -> None:
    """The converted model's detect() output against ODTK's per-image detections: the same
    detections in the same order (scores, boxes, classes), then padding rows."""
    scores, boxes, classes = ours
    assert classes.dtype == torch.int32 and len(scores) == len(reference)
    for b, (ref_scores, ref_boxes, ref_classes) in enumerate(reference):
        n = len(ref_scores)
        assert n == odtk.DETECTIONS or bool((scores[b, n:] == 0).all() and (classes[b, n:] == -1).all())
        torch.testing.assert_close(scores[b, :n], ref_scores, atol=SCORE_TOL, rtol=0)
        assert classes[b, :n].tolist() == ref_classes.tolist()
        torch.testing.assert_close(boxes[b, :n], ref_boxes, atol=BOX_TOL, rtol=0)


def test_built_checkpoints_have_odtks_layout():
    """The builder against ODTK's published checkpoint layout: a ResNet50FPN has 303
    entries (267 backbone: 53 convs, 53 BNs of four buffers, fc; 16 FPN; 20 heads),
    backbone and FPN first, then cls_head, then box_head; 9 anchors x C class channels."""
    ckpt = odtk.without_counters(odtk_checkpoint("ResNet50FPN", 3))
    assert {"backbone", "classes", "state_dict", "ratios", "scales", "iteration", "optimizer", "scheduler"} <= set(ckpt)
    assert (ckpt["backbone"], ckpt["classes"], ckpt["ratios"], ckpt["scales"]) == (
        ["ResNet50FPN"],
        3,
        [1.0, 2.0, 0.5],
        [4.0, 5.0397, 6.3496],
    )
    sd = ckpt["state_dict"]
    keys = list(sd)
    b = "backbones.ResNet50FPN."
    assert len(keys) == 303 and sum(k.startswith(b + "features.") for k in keys) == 267
    assert [k.split(".")[0] for k in keys] == ["backbones"] * 283 + ["cls_head"] * 10 + ["box_head"] * 10
    shapes = {
        b + "features.conv1.weight": (64, 3, 7, 7),
        b + "features.layer1.0.downsample.0.weight": (256, 64, 1, 1),
        b + "features.layer4.0.conv3.weight": (2048, 512, 1, 1),
        b + "features.fc.weight": (1000, 2048),
        b + "lateral3.weight": (256, 512, 1, 1),
        b + "lateral5.weight": (256, 2048, 1, 1),
        b + "pyramid6.weight": (256, 2048, 3, 3),
        b + "pyramid7.weight": (256, 256, 3, 3),
        b + "smooth3.bias": (256,),
        "cls_head.6.weight": (256, 256, 3, 3),
        "cls_head.8.weight": (27, 256, 3, 3),
        "box_head.8.bias": (36,),
    }
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    mobile = odtk.without_counters(odtk_checkpoint("MobileNetV2FPN", 3))["state_dict"]
    m = "backbones.MobileNetV2FPN."
    # Saved though unused: the 1280-channel conv after C5 and the classifier.
    assert tuple(mobile[m + "features.features.18.0.weight"].shape) == (1280, 320, 1, 1)
    assert tuple(mobile[m + "features.classifier.1.weight"].shape) == (1000, 1280)
    assert [tuple(mobile[m + f"lateral{i}.weight"].shape)[1] for i in (3, 4, 5)] == [32, 96, 320]


def test_the_reference_is_independent():
    """The ODTK side shares no code with what it checks: a convention misread in the
    package must not hide by being shared."""
    source = (Path(__file__).parent / "odtk_layout.py").read_text()
    assert not re.search(r"^\s*(from|import)\s+retinanet", source, re.MULTILINE)


@pytest.mark.parametrize(
    "name, counters, format, images",
    [("ResNet18FPN", False, "odtk", 2), ("ResNet50FPN", True, None, 1), ("MobileNetV2FPN", False, None, 1)],
)
def test_detections_equal_odtks(tmp_path, categories_file, name, counters, format, images):
    ckpt = odtk_checkpoint(name, 3)
    if not counters:
        ckpt = odtk.without_counters(ckpt)
    model, state = convert_saved(tmp_path, ckpt, name, format=format, categories=categories_file)
    config = model.config
    assert config.backbone == {"MobileNetV2FPN": "MobileNetV2FPN320"}.get(name, name)
    assert config.box_offset == 1.0 and config.pad_multiple == 128
    assert (config.mean, config.std) == (odtk.MEAN, odtk.STD)
    # ODTK's own anchor settings, its four-decimal scales included (5.0397, not 4 * 2^(1/3)).
    assert sorted(config.anchor_ratios) == sorted(odtk.RATIOS) and config.anchor_scales == odtk.SCALES
    assert config.box_clamp == pytest.approx(math.log(1000 / 16))
    assert state["category_ids"] == [3, 7, 12]
    assert list(state["category_names"]) == ["zebra", "alpha", "moose"]
    heads = odtk_heads(name, 3, images)
    assert_data_exercises_odtks_rules(ckpt, heads, config.box_clamp)
    ours = in_float64(model).detect(IMAGES[:images])
    assert_same_detections(ours, odtk.postprocess(ckpt, *heads))


def test_80_classes_get_cocos_ids_and_detect_as_odtk(tmp_path):
    ckpt = odtk.without_counters(odtk_checkpoint("ResNet18FPN", 80))
    model, state = convert_saved(tmp_path, ckpt, "coco")
    assert state["category_ids"] == COCO_IDS
    assert list(state["category_names"]) == COCO_NAMES
    assert (state["category_names"][0], state["category_names"][-1]) == ("person", "toothbrush")
    heads = odtk_heads("ResNet18FPN", 80, 1)
    # With 80 classes P3 has more candidates than ODTK's per-level top 1000 keeps.
    assert int((torch.sigmoid(heads[0][0][0]) > odtk.THRESHOLD).sum()) > odtk.TOP_N
    assert_data_exercises_odtks_rules(ckpt, heads, model.config.box_clamp)
    assert_same_detections(in_float64(model).detect(IMAGES[:1]), odtk.postprocess(ckpt, *heads))


def test_boxes_wholly_outside_the_input_are_clamped_onto_its_border(tmp_path, categories_file):
    """A deliberate difference from ODTK. ODTK clips a decoded box one-sidedly (x1 >= 0,
    x2 <= W*s - 1), so a box lying wholly outside the input stays inverted (x1 > x2: a
    negative width in its output) and overlaps nothing in NMS. Ours clamps all four
    coordinates into the input, as for every model here: such a box becomes a thin box on
    the border. Deltas shifting boxes 1.5 anchor widths right make some at the right-hand
    cells; one 128 x 256 image keeps it quick."""
    ckpt = odtk.without_counters(odtk_checkpoint("ResNet18FPN", 3))
    state = dict(ckpt["state_dict"])
    state["box_head.8.bias"] = state["box_head.8.bias"] + torch.tensor([1.5, 0.0, 0.0, 0.0]).repeat(9)
    ckpt = {**ckpt, "state_dict": state}
    images = IMAGES[:1, :, :128, :256]
    heads = odtk.forward(ckpt, images)
    inverted = [int((boxes[:, 0] > boxes[:, 2]).sum()) for _, boxes, _ in odtk.candidates(ckpt, *heads)]
    assert inverted[0] > 0, "no candidate box lies wholly outside the input: the case shows nothing"
    model, _ = convert_saved(tmp_path, ckpt, "shifted", categories=categories_file)
    scores, boxes, _ = model.detect(images)
    kept = boxes[0][scores[0] > 0]
    assert len(kept) > 0
    assert bool((kept[:, 0] <= kept[:, 2]).all() and (kept[:, 1] <= kept[:, 3]).all())
    assert float(kept.min()) >= 0 and float(kept[:, 2].max()) <= 255 and float(kept[:, 3].max()) <= 127


def test_counters_make_no_difference(tmp_path, categories_file):
    """With or without BN's num_batches_tracked, the same converted weights."""
    for name in odtk.BACKBONES:
        ckpt = odtk_checkpoint(name, 3)
        states = []
        for stem, source in (("counted", ckpt), ("plain", odtk.without_counters(ckpt))):
            torch.save(source, tmp_path / f"{name}-{stem}.pth")
            output = str(tmp_path / f"{name}-{stem}-converted.pth")
            states.append(convert(str(tmp_path / f"{name}-{stem}.pth"), output, categories=categories_file))
        counted, plain = (s["state_dict"] for s in states)
        assert counted.keys() == plain.keys()
        assert all(torch.equal(value, plain[key]) for key, value in counted.items())


def test_three_classes_without_categories_are_refused(tmp_path):
    """Only an 80-class model's ids can be known (COCO's); others need the dataset's."""
    torch.save(odtk.without_counters(odtk_checkpoint("ResNet18FPN", 3)), tmp_path / "three.pth")
    with pytest.raises(UserError) as error:
        convert(str(tmp_path / "three.pth"), str(tmp_path / "out.pth"))
    message = str(error.value)
    assert "\n" not in message and "three.pth" in message and "--categories" in message, message
    assert not (tmp_path / "out.pth").exists()
    proc = run_cli("convert", "three.pth", "out.pth", cwd=tmp_path, check=False)
    assert_user_error(proc, "three.pth", "--categories")
    assert not (tmp_path / "out.pth").exists()


def test_rotated_checkpoints_are_refused(tmp_path):
    torch.save(odtk.rotated(odtk.without_counters(odtk_checkpoint("ResNet18FPN", 3))), tmp_path / "model.pth")
    with pytest.raises(UserError) as error:
        convert(str(tmp_path / "model.pth"), str(tmp_path / "out.pth"))
    message = str(error.value)
    assert "\n" not in message and "model.pth" in message, message
    assert "rotated" in message.lower() and "not supported" in message.lower(), message
    assert not (tmp_path / "out.pth").exists()
