"""Exports of the conventions that converted checkpoints bring (ModelConfig's box_offset,
anchor_placement, p6_input, head_conv_bias, clip_to_image): both forms give the checkpoint's
detections.

Each convention gets its own tiny random-weight model (convention_model: conftest.export_model,
classification bias raised, so that every image fills its 100 detections, with one-layer head
towers) and FP32 exports of both forms at TINY_SIZE, which share one trace of the network (a
dynamic-size network export takes four times as long; the dynamic form is checked once, for
the setting that enters the clipping limits). The portable form runs in
ONNX Runtime; the plugin form runs its plugin nodes by the reference from their attributes
(test_plugin_form.run_plugin_form), which must carry the config's box_offset and the model's
anchor tables. Either must give `model.detect`'s detections.
"""

import contextlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from conftest import TINY_SIZE, export_model, save_model
from test_export import assert_same_detections, run_ort
from test_plugin_form import attributes, run_plugin_form

from retinanet.export import ExportOptions, export_onnx
from retinanet.export import onnx as export_onnx_module
from retinanet.export.postprocess import NMS_TRANSLATION, class_aware_nms
from retinanet.ops import reference

CONVENTIONS = {
    "box_offset": dict(box_offset=1.0),  # ODTK's +1 pixel widths
    "torchvision_anchors": dict(anchor_placement="torchvision"),
    "p6_from_p5": dict(p6_input="P5"),  # torchvision's first RetinaNet
    "groupnorm_towers_without_bias": dict(head_norm=True, head_conv_bias=False),  # torchvision v2
    # torchvision clips the candidates to each image before NMS: a BatchNorm-head model that
    # takes image_sizes, its network unchanged.
    "clip_to_image": dict(clip_to_image=True),
    # No converted checkpoint has both, but GroupNorm heads are where both tails also clip
    # the boxes to each image's size (model.detector.clip_boxes): with the offset, that clip
    # must stay the model's in the plugin form's hand-built nodes as in the traced portable tail.
    "groupnorm_with_box_offset": dict(head_norm=True, box_offset=1.0),
}
# The conventions that change data only (the anchor tables, the box formulas), not the
# network: the same weights under the default conventions give other detections.
DATA_ONLY = ("box_offset", "torchvision_anchors", "clip_to_image")

# Head towers of one layer: every op of a tower (conv with or without bias, GroupNorm over the
# valid cells, ReLU, the zeroing outside them) is still in the graph, and the GroupNorm network
# traces in 12 s instead of 29 (four layers). What the conventions change (anchor tables, box
# formulas, P6's input, clipping) lies outside the towers.
HEAD_DEPTH = 1
# Towers of std-0.01 convs shrink the features layer by layer: at four layers the box deltas
# were below 0.01, every box its anchor. At one layer export_model's box output conv gives
# deltas up to the clamp (4.1: boxes 60 times their anchor, clipped to lines at the border);
# scaled by a quarter they stay within about +-1.4, as a trained model's, so the decode is
# exercised away from the anchors.
BOX_SCALE = 0.25

# FP32 network in ONNX Runtime against PyTorch: the convolutions sum in another order, so
# the outputs differ in the last bits. Measured, every convention and both forms: scores within
# 2e-7; boxes within 4e-5 relative (2.4e-4 px; relative to a coordinate, at least 1 px, so a
# small coordinate's rounding counts most). The bars leave 5x and more, and stay far below
# what the conventions move: a box_offset of 1 moves the clipped edges by a pixel (4e-3
# relative at 256 px, 5e-3 at an image edge of 200), the torchvision anchors by up to half a
# stride.
SCORE_TOL = 1e-6
BOX_RTOL = 2e-4


def convention_model(**changes):
    """The tiny export model (conftest.export_model) with head towers of one layer (HEAD_DEPTH),
    its box output conv scaled by BOX_SCALE."""
    model = export_model(head_depth=HEAD_DEPTH, **changes)
    with torch.no_grad():
        model.box_head.out.weight.mul_(BOX_SCALE)
    return model


@contextlib.contextmanager
def network_traced_once():
    """export_onnx traces the network anew for every export, the same graph for every form of one
    checkpoint at one size and network precision (the exports are deterministic to the byte:
    test_export.test_calibration_table_round_trip_is_byte_identical). Within this context a
    second export gets a copy of the first's trace and appends its own tail (and Q/DQ): half the
    network tracing for two forms."""
    real, traced = export_onnx_module.export_network, {}

    def once(model, size, dtype, opset, verbose=False):
        weights = export_onnx_module.model_hash({"config": model.config, "state_dict": model.state_dict()})
        key = (weights, size, dtype, opset)
        if key not in traced:
            traced[key] = real(model, size, dtype, opset, verbose)
        copy = onnx.ModelProto()
        copy.CopyFrom(traced[key])  # the tails are appended to the graph in place
        return copy

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export_onnx_module, "export_network", once)
        yield


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> the convention's model and its portable and plugin-form FP32 exports at
    TINY_SIZE, built on first use."""
    cache = {}

    def get(name):
        if name not in cache:
            work = tmp_path_factory.mktemp(name)
            model = convention_model(**CONVENTIONS[name])
            path = save_model(model, work / "model.pth")
            cache[name] = {"model": model}
            with network_traced_once():
                for form, plugin in (("portable", False), ("plugin", True)):
                    options = ExportOptions(TINY_SIZE, "fp32", plugin_form=plugin)
                    cache[name][form] = export_onnx(path, str(work / f"{form}.onnx"), options)["output"]
        return cache[name]

    return get


def inputs(size=TINY_SIZE, seed=1):
    """Three images of `size` and their valid (h, w): the whole input, and two smaller images
    placed top-left, whose GroupNorm heads normalise over less and whose boxes are clipped
    to less."""
    torch.manual_seed(seed)
    h, w = size
    images = torch.rand(3, 3, h, w) * 255
    sizes = torch.tensor([[h, w], [h - 28, w - 56], [h, w - 106]], dtype=torch.int32)
    return images, sizes


def taken(model, sizes):
    """`sizes` where the model takes each image's size (GroupNorm heads, clip_to_image), else None."""
    return sizes if model.config.takes_image_sizes else None


def detections(model, images, sizes):
    """model.detect, given the sizes where the model takes them."""
    want = [t.numpy() for t in model.detect(images, taken(model, sizes))]
    assert (want[0] > 0).sum(axis=1).min() == 100  # NMS really had to cut to `detections`
    return want


@pytest.mark.parametrize("name", CONVENTIONS)
def test_portable_export_gives_the_checkpoints_detections(exported, name):
    e = exported(name)
    images, sizes = inputs()
    want = detections(e["model"], images, sizes)
    got = run_ort(e["portable"], images, taken(e["model"], sizes))
    assert_same_detections(got, want, rtol=BOX_RTOL, score_tol=SCORE_TOL)


def test_dynamic_portable_export_with_box_offset_at_other_sizes(tmp_path):
    """box_offset moves the clipping limits to W * stride - 1, W the level's width at run time:
    the default dynamic export at sizes other than the traced 256 x 224, H and W swapped,
    where P7's cells reach past the input (160 rows: 2 cells of 128)."""
    model = convention_model(**CONVENTIONS["box_offset"])
    path = save_model(model, tmp_path / "model.pth")
    dynamic = export_onnx(path, str(tmp_path / "dynamic.onnx"), ExportOptions(precision="fp32"))["output"]
    for size in ((160, 224), (224, 160)):
        images, sizes = inputs(size, seed=2)
        assert_same_detections(run_ort(dynamic, images), detections(model, images, sizes), BOX_RTOL, SCORE_TOL)


@pytest.mark.parametrize("name", CONVENTIONS)
def test_plugin_form_carries_the_convention_and_gives_the_checkpoints_detections(exported, name):
    e = exported(name)
    model, proto = e["model"], onnx.load(e["plugin"])
    decodes = [n for n in proto.graph.node if n.op_type == "RetinaNetDecode"]
    nms = next(n for n in proto.graph.node if n.op_type == "RetinaNetNMS")
    assert len(decodes) == len(model.base_anchors())
    for node, table in zip(decodes, model.base_anchors()):
        fields = attributes(node)
        assert fields["box_offset"] == model.config.box_offset
        # Written as float32, the tables' own type: equal to the bit.
        np.testing.assert_array_equal(np.float32(fields["anchors"]), table.flatten().numpy())
    assert attributes(nms)["box_offset"] == model.config.box_offset
    images, sizes = inputs()
    got = run_plugin_form(e["plugin"], images, sizes=sizes)
    want = detections(model, images, sizes)
    assert_same_detections(got, want, rtol=BOX_RTOL, score_tol=SCORE_TOL)


@pytest.mark.parametrize("name", DATA_ONLY)
def test_the_comparisons_see_the_convention(exported, name):
    """Both forms exported with the convention do not give the detections of the same weights
    under the default conventions: an export that dropped the setting fails the tests above."""
    e = exported(name)
    default = convention_model()  # same seed, same network: the same weights
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), e["model"].state_dict().values()))
    images, sizes = inputs()
    want = detections(default, images, sizes)
    portable = run_ort(e["portable"], images, taken(e["model"], sizes))
    for got in (portable, run_plugin_form(e["plugin"], images, sizes=sizes)):
        with pytest.raises(AssertionError):
            assert_same_detections(got, want, rtol=BOX_RTOL, score_tol=SCORE_TOL)


class OneImageNms(nn.Module):
    """class_aware_nms of two classes at IoU 0.4, three detections, as the portable tail runs it."""

    def __init__(self, box_offset: float):
        super().__init__()
        self.box_offset = box_offset

    def forward(self, scores, boxes, classes):
        return class_aware_nms(scores, boxes, classes, 2, 0.4, 3, self.box_offset)


def test_portable_nms_measures_iou_with_the_box_offset():
    """Boxes 0 and 1 (class 0) overlap by IoU 1/3 in plain widths, 1/2 with +1 widths: at IoU 0.4
    box 1 survives without the offset and is suppressed with it, which lets box 3 into the three
    detections. NonMaxSuppression has no offset option; the graph must widen what it compares."""
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
    boxes = torch.tensor([[[0.0, 0.0, 2.0, 2.0], [1.0, 0.0, 3.0, 2.0], [10.0, 10.0, 14.0, 14.0], [11, 10, 15, 14]]])
    classes = torch.tensor([[0, 0, 1, 0]], dtype=torch.int32)
    for offset, kept in ((0.0, [0.9, 0.8, 0.7]), (1.0, [0.9, 0.7, 0.6])):
        want = reference.nms(scores, boxes, classes, 0.4, 3, offset)
        assert want[0].flatten().tolist() == pytest.approx(kept)
        module = OneImageNms(offset)
        names = ["scores", "boxes", "classes"]
        outputs = [f"kept_{n}" for n in names]
        proto = export_onnx_module._torch_export(
            module, (scores, boxes, classes), names, outputs, 19, False, NMS_TRANSLATION
        )
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        in_onnx = session.run(None, dict(zip(names, (scores.numpy(), boxes.numpy(), classes.numpy()))))
        for got in (in_onnx, module(scores, boxes, classes)):  # the graph, and the module in PyTorch
            for g, w in zip(got, want):
                np.testing.assert_array_equal(np.asarray(g), w.numpy())
