"""ONNX export (both forms, FP32/FP16/INT8), calibration tables, ONNX Runtime backend.

Structure tests use a tiny random-weight model; accuracy tests (marked slow)
use the session's trained demo model (conftest.trained) through the CLI.
"""

import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import onnxruntime as ort
import onnxscript  # noqa: F401  (torch.onnx's exporter: a missing one fails here, not deep in an export)
import pytest
import torch
from conftest import TINY_SIZE, assert_user_error, export_model, run_cli, save_model

from retinanet import checkpoint
from retinanet.config import ModelConfig
from retinanet.errors import UserError
from retinanet.export import ExportOptions, export, export_onnx, quantize
from retinanet.export import onnx as export_onnx_module
from retinanet.formats import onnx as onnx_format

SIZE = TINY_SIZE


def run_ort(path, images, sizes=None):
    """The portable export in ONNX Runtime; sizes [B, 2] int32: the image_sizes input of
    GroupNorm-head models."""
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = {"images": images.numpy()}
    if sizes is not None:
        feed["image_sizes"] = sizes.numpy()
    return session.run(["scores", "boxes", "classes"], feed)


def assert_same_detections(got, want, rtol=1e-3, score_tol=1e-4, min_matched=1.0):
    """Same kept set per image (class, score, box), matched irrespective of order among near-ties.

    min_matched < 1: reduced precision may flip a few NMS decisions; at least that
    fraction of each image's detections must still be matched within the tolerances."""
    g_scores, g_boxes, g_classes = (np.asarray(t) for t in got)
    w_scores, w_boxes, w_classes = (np.asarray(t) for t in want)
    assert g_scores.shape == w_scores.shape and g_boxes.shape == w_boxes.shape
    assert g_classes.dtype == np.int32 and g_scores.dtype == np.float32
    for b in range(w_scores.shape[0]):
        keep = w_scores[b] > 0
        assert (g_scores[b] > 0).sum() == keep.sum(), f"image {b}: kept counts differ"
        # Padding exactly as the reference: score 0, box 0, class -1.
        pad = ~(g_scores[b] > 0)
        assert (g_boxes[b][pad] == 0).all() and (g_classes[b][pad] == -1).all()
        free = list(np.nonzero(~pad)[0])
        missed = []
        for i in np.nonzero(keep)[0]:
            scale = np.maximum(np.abs(w_boxes[b, i]), 1.0)
            hits = [
                j
                for j in free
                if g_classes[b, j] == w_classes[b, i]
                and abs(g_scores[b, j] - w_scores[b, i]) <= score_tol
                and (np.abs(g_boxes[b, j] - w_boxes[b, i]) <= rtol * scale).all()
            ]
            if hits:
                free.remove(hits[0])
            else:
                missed.append(f"{i} {w_classes[b, i]} {w_scores[b, i]} {w_boxes[b, i]}")
        assert len(missed) <= (1.0 - min_matched) * keep.sum() + 1e-9, (
            f"image {b}: {len(missed)} of {keep.sum()} unmatched, first: {missed[0]}"
        )
        # Order: scores descending, as the reference writes them.
        s = g_scores[b][~pad]
        assert (np.diff(s) <= 1e-6).all()


def test_portable_fp32_matches_reference_on_busy_model(tiny):
    torch.manual_seed(1)
    images = torch.rand(3, 3, *SIZE) * 255
    with torch.no_grad():
        want = [t.numpy() for t in tiny["model"].detect(images)]
    assert (want[0] > 0).sum(axis=1).min() == 100  # NMS really had to cut to `detections`
    assert_same_detections(run_ort(tiny["fp32"], images), want)
    # The batch axis is dynamic: one image alone gives the same as in the batch.
    one = run_ort(tiny["fp32"], images[1:2])
    assert_same_detections(one, [w[1:2] for w in want])


def test_portable_export_of_quiet_model_outputs_padding_only(tiny, tmp_path):
    """A model without candidates (prior 0.01 < threshold 0.05) outputs padding only. Its export
    is the busy tiny export's graph with the quiet model's output convs swapped in: the two
    models (same seed) differ in those tensors alone, and the traced graph does not depend on
    the weights' values (an export of its own took 16 s)."""
    quiet, busy = export_model(busy=None).state_dict(), tiny["model"].state_dict()
    differ = {name for name, t in quiet.items() if not torch.equal(t, busy[name])}
    assert differ == {"cls_head.out.weight", "cls_head.out.bias", "box_head.out.weight"}
    proto, swapped = onnx.load(tiny["fp32"]), set()
    for tensor in proto.graph.initializer:
        name = tensor.name.removeprefix("model.")  # NetworkForExport holds the model as .model
        if name in differ:
            tensor.CopyFrom(onnx.numpy_helper.from_array(quiet[name].numpy(), tensor.name))
            swapped.add(name)
    assert swapped == differ
    onnx.save(proto, str(tmp_path / "q.onnx"))
    scores, boxes, classes = run_ort(str(tmp_path / "q.onnx"), torch.rand(2, 3, *SIZE) * 255)
    assert scores.shape == (2, 100) and (scores == 0).all() and (boxes == 0).all() and (classes == -1).all()


def test_both_forms_pass_full_checker_and_carry_metadata(tiny):
    for key in ("fp32", "plugin", "int8"):
        proto = onnx.load(tiny[key])
        onnx.checker.check_model(proto, full_check=True)
        meta = onnx_format.read_metadata(proto)
        assert meta["retinanet.input_size"] == list(SIZE)
        assert meta["retinanet.category_ids"] == [1, 3, 7]
        assert ModelConfig.from_dict(meta["retinanet.config"]) == tiny["model"].config
        assert [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim][:1] != [""]
        outputs = {o.name: o.type.tensor_type.elem_type for o in proto.graph.output}
        assert outputs == {
            "scores": onnx.TensorProto.FLOAT,
            "boxes": onnx.TensorProto.FLOAT,
            "classes": onnx.TensorProto.INT32,
        }
    assert onnx_format.read_metadata(onnx.load(tiny["plugin"]))["retinanet.precision"] == "fp16"


def test_plugin_form_has_exactly_the_plugin_nodes_and_fields(tiny):
    proto = onnx.load(tiny["plugin"])
    cfg = tiny["model"].config
    custom = [n for n in proto.graph.node if n.domain == export_onnx_module.PLUGIN_DOMAIN]
    assert Counter(n.op_type for n in custom) == {"RetinaNetDecode": len(cfg.strides), "RetinaNetNMS": 1}
    assert not any(n.op_type in ("NonMaxSuppression", "TopK") for n in proto.graph.node)
    decodes = [n for n in custom if n.op_type == "RetinaNetDecode"]
    for i, (node, stride, base) in enumerate(zip(decodes, cfg.strides, tiny["model"].base_anchors())):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert set(attrs) == {
            "plugin_version",
            "plugin_namespace",
            "score_threshold",
            "top_n",
            "box_clamp",
            "stride",
            "anchors",
            "box_offset",
        }
        assert attrs["plugin_version"] == b"1" and attrs["plugin_namespace"] == b""
        assert attrs["stride"] == stride and attrs["top_n"] == cfg.top_n
        assert attrs["score_threshold"] == pytest.approx(cfg.score_threshold)
        assert attrs["box_clamp"] == pytest.approx(cfg.box_clamp)
        assert attrs["box_offset"] == cfg.box_offset == 0.0
        np.testing.assert_allclose(attrs["anchors"], base.flatten().numpy(), rtol=1e-6)
        assert list(node.input) == [f"scores_{i}", f"deltas_{i}"]
    nms = next(n for n in custom if n.op_type == "RetinaNetNMS")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nms.attribute}
    assert attrs == {
        "plugin_version": b"1",
        "plugin_namespace": b"",
        "nms_iou": pytest.approx(cfg.nms_iou),
        "detections": cfg.detections,
        "box_offset": 0.0,
    }
    assert list(nms.output) == ["scores", "boxes", "classes"]
    # The network runs in FP16; the plugins get float32 inputs.
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    weights = {i.name: i.data_type for i in proto.graph.initializer}
    assert {weights[c.input[1]] for c in convs} == {onnx.TensorProto.FLOAT16}


def test_int8_has_qdq_on_every_conv_input_and_weight(tiny):
    proto = onnx.load(tiny["int8"])
    producers = {o: n for n in proto.graph.node for o in n.output}
    inits = {i.name: i for i in proto.graph.initializer}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert len(convs) > 20
    for conv in convs:
        for slot in (0, 1):
            dq = producers[conv.input[slot]]
            assert dq.op_type == "DequantizeLinear", (conv.name, slot)
            q = producers[dq.input[0]]
            assert q.op_type == "QuantizeLinear"
            zero = onnx.numpy_helper.to_array(inits[q.input[2]])
            assert zero.dtype == np.int8 and (zero == 0).all()  # symmetric, as TensorRT requires
            scale = onnx.numpy_helper.to_array(inits[q.input[1]])
            if slot == 0:
                assert scale.shape == ()  # per tensor
            else:
                weight = inits[q.input[0]]
                assert scale.shape == (weight.dims[0],)  # per output channel
                assert {a.name: a.i for a in q.attribute}.get("axis") == 0
    # Decode/NMS are left out: nothing after the heads is quantised.
    q_inputs = {
        producers[n.input[0]].op_type
        for n in proto.graph.node
        if n.op_type == "QuantizeLinear" and n.input[0] in producers
    }
    assert "RetinaNetDecode" not in q_inputs and "Sigmoid" not in q_inputs


def test_calibration_table_round_trip_is_byte_identical(tiny):
    table = json.loads(open(tiny["table"]).read())
    assert tiny["table"].endswith("int8.calibration.json")
    assert table["format"] == "retinanet-calibration" and table["input_size"] == list(SIZE)
    assert table["method"] == "percentile" and table["images"] == 16
    state = checkpoint.load(tiny["pth"])
    assert table["model_sha256"] == export_onnx_module.model_hash(state)
    assert set(table["scales"]) == set(quantize.conv_inputs(onnx.load(tiny["fp32"])))
    from_table = export_onnx(
        tiny["pth"],
        str(tiny["work"] / "int8_table.onnx"),
        ExportOptions(SIZE, "int8", plugin_form=True, calibration_table=tiny["table"]),
    )["output"]
    # Images, then table: the same scales, the same bytes (so the export is deterministic too).
    assert open(from_table, "rb").read() == open(tiny["int8"], "rb").read()


def test_table_for_other_model_or_size_is_refused(tiny, tmp_path):
    with pytest.raises(UserError, match="input size 128x256"):
        export_onnx(
            tiny["pth"], str(tmp_path / "x.onnx"), ExportOptions((256, 256), "int8", calibration_table=tiny["table"])
        )
    save_model(export_model(classes=2), tmp_path / "other.pth")
    with pytest.raises(UserError, match="another model"):
        export_onnx(
            str(tmp_path / "other.pth"),
            str(tmp_path / "x.onnx"),
            ExportOptions(SIZE, "int8", calibration_table=tiny["table"]),
        )


def test_onnx_runtime_backend_through_load(tiny):
    import retinanet

    detector = retinanet.load(tiny["fp32"])
    assert detector.category_ids.tolist() == [1, 3, 7] and detector.device.type == "cpu"
    img = (np.random.default_rng(0).random((100, 200, 3)) * 255).astype(np.uint8)
    dets = detector([img, img[:60]])  # padded up to the model's 128x256 input
    assert len(dets) == 2 and len(dets[0].scores) == 100
    assert set(dets[0].category_ids.tolist()) <= {1, 3, 7}
    assert (dets[0].boxes[:, 2] <= 200).all() and (dets[1].boxes[:, 3] <= 60).all()
    torch_det = retinanet.load(tiny["pth"], device="cpu")([img])[0]
    np.testing.assert_allclose(np.sort(dets[0].scores.numpy()), np.sort(torch_det.scores.numpy()), atol=1e-5)


def test_export_errors(tiny, tmp_path):
    pth = tiny["pth"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "t.json").write_text("{}")
    out = str(tmp_path / "o.onnx")
    cases = [
        (dict(precision="int8", calibration_images=str(tmp_path / "none")), "none: calibration image folder not found"),
        (dict(precision="int8", calibration_images=str(tmp_path / "bad")), "x.jpg: cannot decode"),
        (dict(precision="int8"), "--calibration-images"),
        (dict(precision="int8", calibration_table=str(tmp_path / "t.json")), "not a retinanet calibration table"),
        (dict(precision="int8", calibration_table=str(tmp_path / "no.json")), "no.json: calibration table not found"),
        (dict(precision="fp16", calibration_images=str(tmp_path / "bad")), "--int8 only"),
        (dict(size=(100,)), "--size 100 100: height and width must be positive multiples of 32"),
    ]
    for kwargs, words in cases:
        with pytest.raises(UserError, match=words):
            export_onnx(pth, out, ExportOptions(**{"size": SIZE, **kwargs}))
    assert not os.path.exists(out)


def test_size_multiples_follow_the_checkpoints_pad_multiple(tmp_path):
    """New models pad to 32, so --size takes multiples of 32; a checkpoint saved with 128 keeps it."""
    import retinanet

    assert export_onnx_module.parse_size((160, 224), ModelConfig()) == (160, 224)
    old = save_model(export_model(pad_multiple=128), tmp_path / "old.pth")
    with pytest.raises(UserError, match="--size 160 224: height and width must be positive multiples of 128"):
        export_onnx(old, str(tmp_path / "o.onnx"), ExportOptions((160, 224), "fp32"))
    assert retinanet.load(old, device="cpu").config.pad_multiple == 128
    assert os.listdir(tmp_path) == ["old.pth"]


def assert_cli_error(capsys, args, *words):
    """`retinanet ARGS` in this process (a subprocess costs 5 s of imports) fails as a user error:
    exit 2, one line on stderr holding every word. A traceback would fail the test itself;
    test_missing_onnx_package_is_one_line runs whole processes."""
    from retinanet.cli import main

    code = main(list(args))
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (args, code, lines)
    for w in words:
        assert w in lines[0], lines[0]


def test_export_cli_errors_are_one_line(tiny, tmp_path, capsys, monkeypatch):
    pth = tiny["pth"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    assert_cli_error(
        capsys, ["export", pth, "o.onnx", "--int8", "--calibration-images", "empty"], "empty", "no image files"
    )
    assert_cli_error(capsys, ["export", pth, "o.onnx", "--opset", "11"], "--opset 11", "unsupported")
    assert_cli_error(capsys, ["export", pth, "o.plan"], "TensorRT is not installed", "export to .onnx")
    assert_cli_error(capsys, ["export", pth, tiny["fp32"]], "--override")
    assert_cli_error(capsys, ["infer", tiny["plugin"], "--images", tiny["images"]], "plugin", "portable")
    assert os.listdir(tmp_path) == ["empty"]


@pytest.mark.parametrize(
    "module, flags", [("onnx", []), ("onnxscript", []), ("onnxruntime", ["--int8", "--calibration-images", "IMAGES"])]
)
def test_missing_onnx_package_is_one_line(tiny, tmp_path, module, flags):
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    # Shadows the installed package: importing it fails as if it were not installed.
    (stubs / f"{module}.py").write_text(f"raise ModuleNotFoundError(\"No module named '{module}'\", name='{module}')\n")
    path = os.pathsep.join([str(stubs), os.environ.get("PYTHONPATH", "")])
    flags = [tiny["images"] if f == "IMAGES" else f for f in flags]
    proc = run_cli(
        "export",
        tiny["pth"],
        "o.onnx",
        "--size",
        "128",
        "256",
        *flags,
        cwd=tmp_path,
        env={"PYTHONPATH": path},
        check=False,
    )
    assert_user_error(proc, module, "pip install 'retinanet[onnx]'")
    assert sorted(os.listdir(tmp_path)) == ["stubs"]


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if an export gets as far as loading the checkpoint."""

    def refuse(*args, **kwargs):
        raise AssertionError("the export started working before checking its outputs")

    monkeypatch.setattr(export_onnx_module.checkpoint, "load_model", refuse)


def test_outputs_are_checked_before_any_work(tiny, tmp_path, no_work, monkeypatch):
    int8 = ExportOptions(SIZE, "int8", calibration_images=tiny["images"])
    (tmp_path / "taken.onnx").write_bytes(b"x")
    (tmp_path / "meta.plan.json").write_text("{}")
    (tmp_path / "taken.calibration.json").write_text("{}")
    (tmp_path / "e.plan.timing_cache").mkdir()
    cases = [
        ("no/o.onnx", ExportOptions(SIZE, "fp16"), "folder " + str(tmp_path / "no") + " does not exist"),
        ("no/e.plan", ExportOptions(SIZE, "fp16"), "does not exist"),
        ("taken.onnx", ExportOptions(SIZE, "fp16"), "taken.onnx: ONNX model exists; pass --override"),
        # an engine writes its ONNX, metadata and timing cache beside the plan
        ("taken.plan", ExportOptions(SIZE, "fp16"), "taken.onnx: engine's ONNX"),
        ("taken.engine", ExportOptions(SIZE, "fp16"), "taken.onnx: engine's ONNX"),
        ("meta.plan", ExportOptions(SIZE, "fp16"), "meta.plan.json: engine metadata exists"),
        ("e.plan", ExportOptions(SIZE, "fp16"), "e.plan.timing_cache: is a folder"),
    ]
    for name, options, words in cases:
        with pytest.raises(UserError) as e:
            export(tiny["pth"], str(tmp_path / name), options)
        assert words in str(e.value), (name, str(e.value))
    os.rename(tmp_path / "taken.onnx", tmp_path / "free.onnx")
    # The table goes beside the ONNX: taken.calibration.json for taken.onnx and for the engine
    # taken.engine (whose ONNX is taken.onnx) alike.
    for name in ("taken.onnx", "taken.engine"):
        with pytest.raises(UserError, match="taken.calibration.json: calibration table exists"):
            export(tiny["pth"], str(tmp_path / name), int8)
    # override replaces the files, but an unwritable folder is still found before any work
    monkeypatch.setattr("retinanet.files.tempfile.mkstemp", _no_space)
    with pytest.raises(UserError, match="is not writable"):
        export(tiny["pth"], str(tmp_path / "free.onnx"), ExportOptions(SIZE, "fp16"), override=True)
    assert sorted(os.listdir(tmp_path)) == [
        "e.plan.timing_cache",
        "free.onnx",
        "meta.plan.json",
        "taken.calibration.json",
    ]


def _no_space(*args, **kwargs):
    raise PermissionError(13, "Permission denied")


def test_cli_output_in_missing_folder_is_one_line_before_work(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_cli_error(
        capsys, ["export", tiny["pth"], "no/o.onnx", "--size", "128", "256"], "no/o.onnx", "does not exist"
    )
    assert os.listdir(tmp_path) == []


def test_calibration_table_is_written_only_for_a_checked_model(tiny, tmp_path, monkeypatch):
    def broken(proto, full_check=False):
        raise onnx.checker.ValidationError("simulated checker failure")

    monkeypatch.setattr(onnx.checker, "check_model", broken)
    # The plugin form here and below: checks and writes as the portable one, without
    # exporting the decode/NMS tail (half the time).
    calibrated = ExportOptions(SIZE, "int8", plugin_form=True, calibration_images=tiny["images"], calibration_batches=1)
    with pytest.raises(RuntimeError, match="onnx.checker"):
        export_onnx(tiny["pth"], str(tmp_path / "m.onnx"), calibrated)
    assert os.listdir(tmp_path) == []


def _fail_fsync(monkeypatch):
    """os.fsync, which atomic_write calls before its rename, fails like a full disk."""

    def fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("retinanet.files.os.fsync", fsync)


def test_failed_writes_leave_the_old_files(tiny, tmp_path, monkeypatch):
    model, table = tmp_path / "m.onnx", tmp_path / "m.calibration.json"
    model.write_bytes(b"old model")
    table.write_text("old table")
    _fail_fsync(monkeypatch)
    calibrated = ExportOptions(SIZE, "int8", plugin_form=True, calibration_images=tiny["images"], calibration_batches=1)
    with pytest.raises(OSError, match="No space"):  # the table is written first
        export_onnx(tiny["pth"], str(model), calibrated)
    assert model.read_bytes() == b"old model" and table.read_text() == "old table"
    with pytest.raises(OSError, match="No space"):
        export_onnx(tiny["pth"], str(model), ExportOptions(SIZE, "fp16", plugin_form=True))
    assert model.read_bytes() == b"old model"
    assert sorted(os.listdir(tmp_path)) == ["m.calibration.json", "m.onnx"]  # no temp files left


def _with_metadata(source, path, change):
    proto = onnx.load(source)
    props = {p.key: p.value for p in proto.metadata_props}
    change(props)
    del proto.metadata_props[:]
    for k, v in props.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.save(proto, path)
    return path


def test_corrupt_onnx_metadata_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    import retinanet

    cases = {
        "broken.onnx": (
            lambda p: p.update({"retinanet.config": p["retinanet.config"][:-5]}),
            "metadata retinanet.config is not valid JSON",
        ),
        "missing.onnx": (lambda p: p.pop("retinanet.input_size"), "metadata retinanet.input_size missing"),
        "version.onnx": (
            lambda p: p.update({"retinanet.format_version": "3"}),
            "metadata format version 3, this retinanet reads versions 1, 2",
        ),
        "v1dynamic.onnx": (
            lambda p: p.update({"retinanet.format_version": "1", "retinanet.input_size": json.dumps(DYNAMIC)}),
            "bad metadata retinanet.input_size (format version 1 has fixed sizes only)",
        ),
        "range.onnx": (
            lambda p: p.update({"retinanet.input_size": json.dumps({**DYNAMIC, "min": [48, 32]})}),
            "bad metadata retinanet.input_size",
        ),
        "unversioned.onnx": (lambda p: p.pop("retinanet.format_version"), "format version missing"),
        "size.onnx": (lambda p: p.update({"retinanet.input_size": "[128, -256]"}), "bad metadata retinanet.input_size"),
        "ids.onnx": (lambda p: p.update({"retinanet.category_ids": "[1, 3]"}), "lists 2 ids for a model of 3"),
    }
    (tmp_path / "images").mkdir()
    for name, (change, words) in cases.items():
        path = _with_metadata(tiny["fp32"], str(tmp_path / name), change)
        with pytest.raises(UserError) as e:
            retinanet.load(path)
        assert str(e.value).startswith(f"{path}: ") and words in str(e.value), str(e.value)
        if name in ("broken.onnx", "version.onnx"):
            monkeypatch.chdir(tmp_path)
            assert_cli_error(capsys, ["infer", name, "--images", "images"], name, words)


# --- dynamic input size (the default export) ------------------------------------------------------

# The tiny export model's range: multiples of 32 up to its max_size, 256.
DYNAMIC = {"dynamic": True, "multiple": 32, "min": [32, 32], "max": [256, 256]}


@pytest.fixture(scope="module")
def dynamic(tiny):
    """The tiny model's default export: portable FP32, dynamic H x W."""
    return export_onnx(tiny["pth"], str(tiny["work"] / "dynamic.onnx"), ExportOptions(precision="fp32"))["output"]


def test_dynamic_export_declares_symbolic_height_and_width_and_its_range(dynamic):
    proto = onnx.load(dynamic)
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "32*height", "32*width"]
    for o in proto.graph.output:  # the outputs keep their fixed size
        assert [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim][:2] == ["batch", 100]
    meta = onnx_format.read_metadata(proto)
    assert meta["retinanet.input_size"] == DYNAMIC and meta["retinanet.format_version"] == 2


def test_dynamic_portable_export_gives_the_reference_detections_at_two_sizes(tiny, dynamic):
    """160 x 224 and 224 x 160: not the traced 256 x 224, multiples of 32 but not of 128
    (P6, P7 of 3 x 4, 2 x 2 cells), H and W swapped. Anchors, cell positions and the
    clipping come from the runtime shapes; a size baked in would misplace boxes."""
    torch.manual_seed(2)
    for size in ((160, 224), (224, 160)):
        images = torch.rand(3, 3, *size) * 255
        with torch.no_grad():
            want = [t.numpy() for t in tiny["model"].detect(images)]
        assert (want[0] > 0).sum(axis=1).min() == 100
        assert_same_detections(run_ort(dynamic, images), want)


class RecordingSession:
    """An ONNX Runtime session that keeps the shapes of the images it is fed."""

    def __init__(self, session):
        self.session, self.shapes = session, []

    def run(self, names, feed):
        self.shapes.append(feed["images"].shape)
        return self.session.run(names, feed)


def test_onnx_runtime_runs_each_batch_at_its_own_size(tiny, dynamic):
    import retinanet

    detector = retinanet.load(dynamic)
    assert (detector.config.resize, detector.config.max_size) == (128, 256)  # the model's: within the range
    detector.backend.session = session = RecordingSession(detector.backend.session)
    torch_det = retinanet.load(tiny["pth"], device="cpu")
    rng = np.random.default_rng(3)
    images = [(rng.random((100, 200, 3)) * 255).astype(np.uint8), (rng.random((180, 90, 3)) * 255).astype(np.uint8)]
    for batch, shape in (([images[0]], (1, 3, 128, 224)), ([images[1]], (1, 3, 224, 128)), (images, (2, 3, 224, 224))):
        got = detector(batch, resize=100, max_size=200)
        assert session.shapes[-1] == shape
        # The checkpoint runs the same padded batch: the same detections (measured: 4.5e-8 in score,
        # 1.5e-5 px in box, in the same order).
        for g, w in zip(got, torch_det(batch, resize=100, max_size=200)):
            assert len(w.scores) == 100 and torch.equal(g.category_ids, w.category_ids)
            torch.testing.assert_close(g.scores, w.scores, rtol=0, atol=1e-5)
            torch.testing.assert_close(g.boxes, w.boxes, rtol=0, atol=1e-3)
    with pytest.raises(UserError, match="288x64 pixels does not fit the model's largest input 256x256"):
        detector.run(torch.zeros(1, 3, 288, 64, dtype=torch.uint8))


def test_version_1_exports_read_as_before(tiny, tmp_path):
    """Exports written before dynamic sizes (format version 1, [H, W]) run unchanged."""
    import retinanet

    old = _with_metadata(tiny["fp32"], str(tmp_path / "v1.onnx"), lambda p: p.update({"retinanet.format_version": "1"}))
    images = torch.rand(2, 3, *SIZE) * 255
    detector = retinanet.load(old)
    assert detector.backend.input_size == SIZE
    for a, b in zip(
        detector.run(images[:, :, :100, :200].to(torch.uint8)),
        retinanet.load(tiny["fp32"]).run(images[:, :, :100, :200].to(torch.uint8)),
    ):
        assert torch.equal(a, b)


def test_dynamic_int8_table_serves_dynamic_exports_only(tiny, tmp_path):
    """Calibration feeds each batch at its own padded size and the table records the range;
    it rebuilds the same bytes for a dynamic export and is refused for a fixed one (and a
    fixed size's table for a dynamic export)."""
    calibrated = export_onnx(
        tiny["pth"],
        str(tmp_path / "d8.onnx"),
        ExportOptions(precision="int8", plugin_form=True, calibration_images=tiny["images"], calibration_batches=1),
    )
    table = json.loads(open(calibrated["table"]).read())
    assert table["input_size"] == DYNAMIC and table["version"] == 2 and table["images"] == 8
    again = export_onnx(
        tiny["pth"],
        str(tmp_path / "again.onnx"),
        ExportOptions(precision="int8", plugin_form=True, calibration_table=calibrated["table"]),
    )
    assert open(again["output"], "rb").read() == open(calibrated["output"], "rb").read()
    dynamic_words = "dynamic HxW, multiples of 32 from 32x32 to 256x256"
    cases = [
        (
            ExportOptions(SIZE, "int8", calibration_table=calibrated["table"]),
            f"for input size {dynamic_words}, not 128x256: export without --size",
        ),
        (
            ExportOptions(None, "int8", calibration_table=tiny["table"]),
            f"for input size 128x256, not {dynamic_words}: export with --size 128 256",
        ),
    ]
    for options, words in cases:
        with pytest.raises(UserError) as e:
            export_onnx(tiny["pth"], str(tmp_path / "x.onnx"), options)
        assert words in str(e.value), str(e.value)
    # Tables of version 1 (fixed sizes only) are read as before.
    old = json.loads(open(tiny["table"]).read())
    (tmp_path / "v1.json").write_text(json.dumps({**old, "version": 1}))
    digest = export_onnx_module.model_hash(checkpoint.load(tiny["pth"]))
    assert quantize.read_table(str(tmp_path / "v1.json"), digest, SIZE)["scales"] == old["scales"]
    (tmp_path / "v1d.json").write_text(json.dumps({**old, "version": 1, "input_size": DYNAMIC}))
    with pytest.raises(UserError, match="bad calibration table input_size"):
        quantize.read_table(str(tmp_path / "v1d.json"), digest, SIZE)


# --- accuracy on the demo model (the session's trained checkpoint) -----------------------------


def _records_map(demo_root, out_json):
    from retinanet.evaluate import coco_stats

    return coco_stats(str(demo_root / "val.json"), json.loads(out_json.read_text()))[0]


@pytest.fixture(scope="module")
def demo_exports(trained, demo_val, demo_root):
    """FP32, FP16 and INT8 portable exports of the demo model through the CLI and their val mAP
    (pth: the checkpoint's, conftest.demo_val); table.onnx: the INT8 export again, from the
    first one's calibration table.

    The CLI runs go in two chains side by side, one per core: an export of this model spends
    most of its 45 s tracing on one core, the other idle."""
    work, _, env = trained
    val = ["--images", str(demo_root / "val"), "--annotations", str(demo_root / "val.json")]

    def export(output, *flags):
        return ["export", "demo.pth", output, "--size", "128", *flags, "--override"]

    def infer(name):
        return ["infer", f"demo_{name}.onnx", *val, "--output", f"{name}.json", "--override"]

    chains = [  # the export from the table needs the table: in the INT8 export's chain
        [
            export("demo_int8.onnx", "--int8", "--calibration-images", str(demo_root / "train")),
            export("table.onnx", "--int8", "--calibration-table", "demo_int8.calibration.json"),
            infer("int8"),
        ],
        [export("demo_fp32.onnx", "--full-precision"), infer("fp32"), export("demo_fp16.onnx"), infer("fp16")],
    ]

    def run(chain):
        for args in chain:
            proc = run_cli(*args, cwd=work, env=env)
            assert args[0] != "export" or f"wrote {args[2]}" in proc.stdout, proc.stdout

    with ThreadPoolExecutor(len(chains)) as pool:
        for future in [pool.submit(run, chain) for chain in chains]:
            future.result()
    out = {name: _records_map(demo_root, work / f"{name}.json") for name in ("fp32", "fp16", "int8")}
    out["pth"] = _records_map(demo_root, demo_val[1])
    print(f"\nval mAP: pth {out['pth']:.4f} fp32 {out['fp32']:.4f} fp16 {out['fp16']:.4f} int8 {out['int8']:.4f}")
    return out


@pytest.mark.slow
def test_demo_portable_fp32_matches_pytorch_detections(trained, demo_root, demo_exports):
    import retinanet
    from retinanet.infer import make_loader

    work = trained[0]
    torch_det = retinanet.load(str(work / "demo.pth"), device="cpu")
    onnx_det = retinanet.load(str(work / "demo_fp32.onnx"))
    loader = make_loader(torch_det, str(demo_root / "val"), None, 8, 128, 128, 0)
    total = 0
    for batch in loader:
        want = [t.numpy() for t in torch_det.run(batch.images)]
        assert_same_detections(onnx_det.run(batch.images), want)
        total += int((want[0] > 0).sum())
    assert total > 100
    assert abs(demo_exports["fp32"] - demo_exports["pth"]) <= 0.001  # mAP points / 100


@pytest.mark.slow
def test_demo_fp16_and_int8_map_drop(demo_exports):
    assert demo_exports["fp32"] - demo_exports["fp16"] <= 0.002
    assert demo_exports["fp32"] - demo_exports["int8"] <= 0.01


@pytest.mark.slow
def test_demo_int8_from_table_cli_is_byte_identical(trained, demo_exports):
    """`--calibration-table` through the CLI (demo_exports' table.onnx) gives the bytes of the
    export calibrated on images in another process: the same scales, and an export that does not
    vary from run to run (the Python API's: test_calibration_table_round_trip_is_byte_identical)."""
    work = trained[0]
    assert (work / "table.onnx").read_bytes() == (work / "demo_int8.onnx").read_bytes()
