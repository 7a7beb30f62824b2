"""Rotated-box models: anchors, heads, matching and loss, the result records and their
evaluation, export, and the bad input of training and inference (CPU)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import shapely
import torch
from conftest import BUSY, TINY_TRAIN, assert_one_line_error, in_process, run_cli, save_model, tiny_model

from retinanet.config import LABEL_CROWD, ModelConfig
from retinanet.model import RetinaNet
from retinanet.model.anchors import all_anchors, level_base_anchors
from retinanet.model.loss import BACKGROUND, IGNORE, detection_loss, match_rotated
from retinanet.ops import reference
from retinanet.ops import rotated as rotated_ops
from retinanet.runtime import Detections

ROTATED = dict(rotated=True)


def shapely_iou(a, b) -> float:
    """IoU of two (cx, cy, w, h, θ) boxes as polygons, by shapely."""
    pa, pb = (
        shapely.Polygon(np.asarray(rotated_ops.polygons(torch.tensor([x], dtype=torch.float64))[0]).reshape(4, 2))
        for x in (a, b)
    )
    union = pa.union(pb).area
    return pa.intersection(pb).area / union if union > 0 else 0.0


# --- anchors and heads ----------------------------------------------------------------------------


def test_rotated_anchor_table_repeats_the_axis_anchors_per_angle_slowest():
    config = ModelConfig(rotated=True, anchor_angles=[-30.0, 0.0, 45.0])
    axis = ModelConfig()
    assert config.num_anchors == 27 and config.box_deltas == 6 and config.box_values == 5
    for table, axis_table in zip(level_base_anchors(config), level_base_anchors(axis)):
        assert table.shape == (27, 5)
        wh = axis_table[:, 2:] - axis_table[:, :2]
        for k, angle in enumerate([-30.0, 0.0, 45.0]):
            rows = table[9 * k : 9 * (k + 1)]
            assert torch.equal(rows[:, :2], torch.zeros(9, 2))
            assert torch.equal(rows[:, 2:4], wh)
            assert torch.allclose(rows[:, 4], torch.full((9,), math.radians(angle)))


def test_rotated_anchors_sit_on_cell_centres_in_head_order():
    config = ModelConfig(rotated=True, strides=[8, 16])
    anchors = all_anchors(config, [(2, 3), (1, 2)])
    tables = level_base_anchors(config)
    assert anchors.shape == (27 * 6 + 27 * 2, 5)
    # Level 0, anchor a, cell (y, x): index (a * 2 + y) * 3 + x, as the flattened head output.
    for a in (0, 13, 26):
        for y in range(2):
            for x in range(3):
                row = anchors[(a * 2 + y) * 3 + x]
                want = torch.tensor([(x + 0.5) * 8, (y + 0.5) * 8, *tables[0][a, 2:].tolist()])
                assert torch.allclose(row, want)
    assert torch.allclose(anchors[27 * 6 + 5 * 2 + 1], torch.tensor([24.0, 8.0, *tables[1][5, 2:].tolist()]))


def test_rotated_heads_have_six_values_per_anchor_and_start_at_their_anchors():
    model = RetinaNet(ModelConfig(backbone="ResNet18FPN", classes=3, channels=32, rotated=True)).eval()
    assert torch.equal(model.box_head.out.bias, torch.zeros(27 * 6))
    with torch.no_grad():
        cls_heads, box_heads = model(torch.rand(1, 3, 64, 96) * 255)
    assert [tuple(c.shape[1:]) for c in cls_heads][0] == (27 * 3, 8, 12)
    assert [tuple(b.shape[1:]) for b in box_heads][0] == (27 * 6, 8, 12)
    # Zero deltas decode to the anchor itself, at the anchor's angle (sin, cos = 0, 0).
    anchors = all_anchors(model.config, [(8, 12)])[:5]
    decoded = rotated_ops.decode(torch.zeros(5, 6), anchors, model.config.box_clamp)
    torch.testing.assert_close(decoded, anchors)


@pytest.mark.parametrize(
    "config",
    [
        dict(rotated=True, box_offset=1.0),
        dict(rotated=True, anchor_placement="torchvision"),
        dict(rotated=True, anchor_angles=[0.0, 0.0]),
    ],
)
def test_rotated_config_refuses_what_the_rotated_ops_do_not_know(config):
    with pytest.raises(ValueError):
        ModelConfig.from_dict({**ModelConfig().to_dict(), **config})


# --- matching and loss ----------------------------------------------------------------------------


def test_match_rotated_equals_a_brute_force_matcher():
    anchors = torch.tensor(
        [[20, 20, 30, 10, 0.0], [20, 20, 30, 10, math.pi / 6], [60, 60, 16, 16, -math.pi / 6], [90, 20, 8, 40, 0.3]]
    )
    targets = torch.tensor(
        [
            [[21, 20, 30, 10, 0.05, 2], [60, 60, 16, 16, 0.2, 0], [0, 0, 0, 0, 0, -1]],
            [
                [20, 20, 30, 10, math.pi / 6 + math.pi, 1],
                [90, 20, 40, 8, 0.3 - math.pi / 2, LABEL_CROWD],
                [0, 0, 0, 0, 0, -1],
            ],
        ]
    )
    labels, matched = match_rotated(anchors, targets, (0.4, 0.5))
    for b in range(2):
        for n, anchor in enumerate(anchors.tolist()):
            objects = [(shapely_iou(anchor, t[:5]), m, t) for m, t in enumerate(targets[b].tolist()) if t[5] >= 0]
            best, m, t = max(objects, key=lambda o: o[0])
            want = int(t[5]) if best >= 0.5 else IGNORE if best >= 0.4 else BACKGROUND
            crowds = [t for t in targets[b].tolist() if t[5] == LABEL_CROWD]
            if want == BACKGROUND and any(inside_fraction(anchor, c[:5]) > 0.5 for c in crowds):
                want = IGNORE
            assert int(labels[b, n]) == want, (b, n, best)
            if want >= 0:
                assert torch.equal(matched[b, n], targets[b, m, :5])
    # The crowd region covers anchor 3 (the same rectangle written the other way round).
    assert int(labels[1, 3]) == IGNORE and int(labels[0, 0]) == 2 and int(labels[1, 1]) == 1


def inside_fraction(anchor, region) -> float:
    pa, pr = (
        shapely.Polygon(np.asarray(rotated_ops.polygons(torch.tensor([x], dtype=torch.float64))[0]).reshape(4, 2))
        for x in (anchor, region)
    )
    return pa.intersection(pr).area / pa.area


def test_rotated_loss_is_zero_box_loss_at_the_exact_targets_and_positive_elsewhere():
    model = tiny_model(**ROTATED)
    images = torch.rand(2, 3, 64, 64) * 255
    targets = torch.tensor(
        [[[30, 30, 40, 20, 0.4, 1], [10, 50, 12, 30, -1.2, 0]], [[40, 20, 24, 24, 2.5, 2], [0, 0, 0, 0, 0, -1]]]
    )
    with torch.no_grad():
        cls_heads, box_heads = model(images)
    shapes = [tuple(c.shape[-2:]) for c in cls_heads]
    anchors = all_anchors(model.config, shapes)
    labels, matched = match_rotated(anchors, targets, tuple(model.config.anchor_ious))
    fg = labels >= 0
    assert int(fg.sum()) >= 3
    # Box heads holding exactly the encoded targets at the foreground anchors.
    exact = torch.zeros(2, anchors.shape[0], 6)
    exact[fg] = rotated_ops.encode(matched[fg], anchors[None].expand(2, -1, -1)[fg])
    start, heads = 0, []
    for b in box_heads:
        _, ak, h, w = b.shape
        count = (ak // 6) * h * w
        part = exact[:, start : start + count].reshape(2, ak // 6, h, w, 6).permute(0, 1, 4, 2, 3)
        heads.append(part.reshape(2, ak, h, w))
        start += count
    losses = detection_loss(cls_heads, heads, anchors, targets, model.config)
    assert float(losses["box_loss"]) < 1e-6
    assert float(detection_loss(cls_heads, box_heads, anchors, targets, model.config)["box_loss"]) > 0.01


# --- results and evaluation -----------------------------------------------------------------------


def _ground_truth(tmp_path):
    boxes = [[30.0, 40.0, 50.0, 16.0, 0.5], [90.0, 70.0, 40.0, 12.0, -1.0], [60.0, 100.0, 30.0, 10.0, 2.8]]
    doc = {
        "images": [{"id": 1, "file_name": "a.png", "width": 128, "height": 128}],
        "categories": [{"id": 4, "name": "thing"}],
        "annotations": [
            {"id": i + 1, "image_id": 1, "category_id": 4, "bbox": [cx - w / 2, cy - h / 2, w, h, t]}
            for i, (cx, cy, w, h, t) in enumerate(boxes)
        ],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(doc))
    return path, torch.tensor(boxes)


def test_result_records_carry_the_input_convention_and_score_map_one_on_the_truth(tmp_path):
    from retinanet import evaluate

    path, boxes = _ground_truth(tmp_path)
    dets = Detections(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([4, 4, 4]))
    records = dets.records(1)
    doc = json.loads(path.read_text())
    for r, a, box in zip(records, doc["annotations"], boxes.tolist()):
        assert r["bbox"] == pytest.approx(a["bbox"], abs=0.006)
        cx, cy, w, h, t = box
        # The corner at (+w/2, -h/2): the top-right of the unrotated box, turned anti-clockwise on screen.
        c, s = math.cos(t), math.sin(t)
        assert r["segmentation"][0][2:4] == pytest.approx(
            [cx + w / 2 * c - h / 2 * s, cy - w / 2 * s - h / 2 * c], abs=0.006
        )
    assert evaluate.coco_stats(str(path), records, rotated=True)[0] == pytest.approx(1.0)
    # Polygons turned the other way (clockwise for positive θ) are other boxes.
    mirrored = Detections(boxes * torch.tensor([1, 1, 1, 1, -1.0]), dets.scores, dets.category_ids).records(1)
    assert evaluate.coco_stats(str(path), mirrored, rotated=True)[0] < 0.5


def test_detector_returns_rotated_boxes_in_original_pixels(tmp_path):
    import retinanet
    from retinanet.data import transforms

    model = tiny_model(busy=BUSY, **ROTATED)
    detector = retinanet.load(save_model(model, tmp_path / "rot.pth"))
    image = (np.random.default_rng(0).random((100, 100, 3)) * 255).astype(np.uint8)
    dets = detector(image)
    # The model's own detections on the image resized to 128 x 128, scaled back by 100 / 128;
    # rotated boxes are not clipped to the image.
    resized, _ = transforms.resize_image(torch.from_numpy(image).permute(2, 0, 1), 128, 128)
    scores, boxes, classes = model.detect(resized[None].float())
    keep = scores[0] > 0
    assert len(dets.scores) == int(keep.sum()) > 10
    scale = torch.tensor([100 / 128] * 4 + [1.0])
    torch.testing.assert_close(dets.boxes, boxes[0][keep] * scale, atol=1e-3, rtol=0)
    torch.testing.assert_close(dets.scores, scores[0][keep], atol=1e-5, rtol=0)
    assert torch.equal(dets.category_ids, torch.tensor([1, 3, 7])[classes[0][keep].long()])
    assert bool(
        (dets.boxes[:, 0] - dets.boxes[:, 2] / 2 < 0).any() or (dets.boxes[:, 0] + dets.boxes[:, 2] / 2 > 100).any()
    )


# --- bad input ------------------------------------------------------------------------------------


def _rotated_dataset(tmp_path, theta=0.3):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (96, 96), (i * 50, 80, 120)).save(images / f"{i}.png")
    doc = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 96, "height": 96} for i in range(2)],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [
            {"id": 10, "image_id": 0, "category_id": 1, "bbox": [20, 20, 30, 10]},
            {"id": 11, "image_id": 1, "category_id": 2, "bbox": [30, 30, 20, 12, theta]},
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(doc))
    return images, tmp_path / "ann.json"


def test_rotated_annotations_are_refused_for_an_axis_aligned_model(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    images, ann = _rotated_dataset(tmp_path)
    data = ["--images", str(images), "--annotations", str(ann)]
    assert_one_line_error(
        in_process(capsys, "train", "m.pth", *data, *TINY_TRAIN, "--iters", "1"), "ann.json", "id 11", "--rotated-bbox"
    )
    save_model(tiny_model(classes=2), tmp_path / "axis.pth", ids=[1, 2])
    assert_one_line_error(in_process(capsys, "infer", "axis.pth", *data), "ann.json", "id 11")
    assert not (tmp_path / "m.pth").exists() and not (tmp_path / "detections.json").exists()


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--rotated-bbox", "--augment-crop"], ["--augment-crop", "rotated"]),
        (["--rotated-bbox", "--with-dali"], ["--with-dali", "rotated"]),
        (["--rotated-bbox", "--anchor-angles", "0", "0"], ["--anchor-angles", "distinct"]),
        (["--anchor-angles", "0", "45"], ["--anchor-angles", "--rotated-bbox"]),
    ],
)
def test_rotated_training_refuses_what_it_cannot_honour(tmp_path, capsys, monkeypatch, flags, words):
    monkeypatch.chdir(tmp_path)
    images, ann = _rotated_dataset(tmp_path, theta=0.0)
    args = ["--images", str(images), "--annotations", str(ann), *TINY_TRAIN, "--iters", "1"]
    assert_one_line_error(in_process(capsys, "train", "m.pth", *args, *flags), *words)
    assert not (tmp_path / "m.pth").exists()


def test_rotated_fine_tune_refuses_an_incompatible_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    images, ann = _rotated_dataset(tmp_path)
    save_model(tiny_model(classes=2), tmp_path / "axis.pth", ids=[1, 2])
    save_model(tiny_model(classes=2, **ROTATED), tmp_path / "rot.pth", ids=[1, 2])
    args = ["--images", str(images), "--annotations", str(ann), *TINY_TRAIN, "--iters", "1"]
    result = in_process(capsys, "train", "m.pth", "--rotated-bbox", "--fine-tune", "axis.pth", *args)
    assert_one_line_error(result, "axis.pth", "axis-aligned", "--rotated-bbox")
    result = in_process(capsys, "train", "m.pth", "--fine-tune", "rot.pth", "--anchor-angles", "-45", "45", *args)
    assert_one_line_error(result, "rot.pth", "anchor angles")
    assert not (tmp_path / "m.pth").exists()


# --- export ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rotated_pth(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rotated")
    return save_model(tiny_model(busy=BUSY, **ROTATED), folder / "rot.pth")


def test_rotated_portable_export_is_refused_in_one_line(rotated_pth, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(
        in_process(capsys, "export", str(rotated_pth), "rot.onnx"), str(rotated_pth), "rotated", "--plugin-form"
    )
    assert not (tmp_path / "rot.onnx").exists()


def test_rotated_plugin_form_holds_the_rotated_plugins_and_its_network_matches_pytorch(rotated_pth, tmp_path):
    """ONNX Runtime runs the plugin form's network (the graph up to the plugin nodes); the reference
    ops, given the plugin nodes' attributes, turn its outputs into PyTorch's detections."""
    import onnx
    import onnxruntime as ort

    from retinanet import checkpoint
    from retinanet.export import ExportOptions, export_onnx

    out = tmp_path / "rot.onnx"
    export_onnx(str(rotated_pth), str(out), ExportOptions(plugin_form=True, precision="fp32", size=(128, 128)))
    proto = onnx.load(str(out))
    model, _ = checkpoint.load_model(str(rotated_pth))
    config = model.config
    decodes = [n for n in proto.graph.node if n.op_type == "RetinaNetDecodeRotated"]
    nms = [n for n in proto.graph.node if n.op_type == "RetinaNetNMSRotated"]
    assert len(decodes) == 5 and len(nms) == 1
    assert not [n for n in proto.graph.node if n.op_type in ("RetinaNetDecode", "RetinaNetNMS")]
    for node, stride, table in zip(decodes, config.strides, model.base_anchors()):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs.pop("anchors") == pytest.approx(table.flatten().tolist())
        assert attrs == pytest.approx(
            dict(
                plugin_version=b"1",
                plugin_namespace=b"",
                score_threshold=config.score_threshold,
                top_n=config.top_n,
                box_clamp=config.box_clamp,
                stride=stride,
            )
        )
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nms[0].attribute}
    assert attrs == dict(
        plugin_version=b"1", plugin_namespace=b"", nms_iou=pytest.approx(config.nms_iou), detections=config.detections
    )
    outputs = {o.name: [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}
    assert outputs["boxes"][1:] == [config.detections, 5]

    heads = [i for n in decodes for i in n.input]
    net = onnx.utils.Extractor(proto).extract_model([i.name for i in proto.graph.input], heads)
    session = ort.InferenceSession(net.SerializeToString(), providers=["CPUExecutionProvider"])
    images = torch.rand(2, 3, 128, 128) * 255
    got = dict(zip(heads, session.run(heads, {"images": images.numpy()})))
    decoded = []
    for node, stride, table in zip(decodes, config.strides, model.base_anchors()):
        scores, deltas = (torch.from_numpy(got[i]) for i in node.input)
        decoded.append(
            reference.decode_rotated(
                scores, deltas, table, stride, config.score_threshold, config.top_n, config.box_clamp
            )
        )
    cat = [torch.cat(parts, dim=1) for parts in zip(*decoded)]
    ort_scores, ort_boxes, ort_classes = reference.nms_rotated(*cat, config.nms_iou, config.detections)
    want_scores, want_boxes, want_classes = model.detect(images)
    assert int((want_scores > 0).sum()) > 50
    torch.testing.assert_close(ort_scores, want_scores, atol=1e-4, rtol=0)
    torch.testing.assert_close(ort_boxes, want_boxes, atol=2e-2, rtol=1e-4)
    assert torch.equal(ort_classes, want_classes)


def test_a_rotated_checkpoint_resumes_only_with_rotated_bbox(tmp_path, capsys, monkeypatch):
    """Without the flag the demo data would be the axis-aligned one: refused, the checkpoint kept."""
    images, ann = _rotated_dataset(tmp_path)
    args = ["--images", str(images), "--annotations", str(ann), *TINY_TRAIN, "--batch", "2", "--iters", "1"]
    run_cli("train", "m.pth", "--rotated-bbox", *args, cwd=tmp_path)
    before = (tmp_path / "m.pth").read_bytes()
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(in_process(capsys, "train", "m.pth", *args[:-1], "2"), "m.pth", "rotated", "--rotated-bbox")
    assert (tmp_path / "m.pth").read_bytes() == before


def test_rotated_int8_plugin_form_quantises_the_network_as_for_axis_aligned_models(rotated_pth, tmp_path):
    """INT8: Q/DQ on every conv's input and weight, the rotated plugins after the network."""
    import onnx
    from PIL import Image

    from retinanet.export import ExportOptions, export_onnx

    images = tmp_path / "calibration"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((128, 128, 3)) * 255).astype(np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "rot_int8.onnx"
    options = ExportOptions((128, 128), "int8", plugin_form=True, calibration_images=str(images), calibration_batches=1)
    export_onnx(str(rotated_pth), str(out), options)
    proto = onnx.load(str(out))
    produced_by = {o: n for n in proto.graph.node for o in n.output}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert len(convs) > 20
    for conv in convs:
        assert all(produced_by[i].op_type == "DequantizeLinear" for i in conv.input[:2]), conv.name
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("RetinaNetDecodeRotated") == 5 and ops.count("RetinaNetNMSRotated") == 1
    assert json.loads((tmp_path / "rot_int8.calibration.json").read_text())["format"] == "retinanet-calibration"
