"""TensorRT engine export and runtime up to the TensorRT calls (TensorRT is not installable here)."""

import importlib.util
import json
import os
import types

import pytest
from conftest import TINY_SIZE

from retinanet.config import ModelConfig
from retinanet.errors import UserError
from retinanet.export import tensorrt as trt_export
from retinanet.formats import onnx as onnx_format
from retinanet.formats import tensorrt as trt_files
from retinanet.formats.input import DynamicSize, dynamic_size, to_json
from retinanet.runtime import tensorrt as trt_runtime

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
needs_trt = pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not installed (not installable on this machine)")


def test_batch_opts_validation():
    assert trt_export.check_batch_opts([2, 2, 4]) == (2, 2, 4)
    for bad in ([0, 1, 2], [4, 2, 8], [1, 8, 4], [1, 2]):
        with pytest.raises(UserError, match="dynamic-batch-opts"):
            trt_export.check_batch_opts(bad)


def test_profile_covers_every_input_at_the_batch_range():
    assert trt_export.profile_shapes((640, 768), (1, 8, 16)) == {
        "images": {"min": (1, 3, 640, 768), "opt": (8, 3, 640, 768), "max": (16, 3, 640, 768)}
    }
    shapes = trt_export.profile_shapes((640, 768), (2, 4, 8), ["images", "image_sizes"])
    assert shapes["image_sizes"] == {"min": (2, 2), "opt": (4, 2), "max": (8, 2)}
    with pytest.raises(UserError, match="model input 'x' is not one of"):
        trt_export.profile_shapes((640, 768), (1, 8, 16), ["images", "x"])
    # The model's resize does not change a fixed size.
    assert trt_export.profile_shapes((640, 768), (1, 8, 16), resize=800) == trt_export.profile_shapes(
        (640, 768), (1, 8, 16)
    )


def test_dynamic_profile_spans_the_range_tuned_for_a_resized_landscape_image():
    """The default model: 800 / 1333 resizes landscape images to 800 x up to 1333, padded to
    800 x 1344 (opt); any multiple of 32 from 32 x 32 to 1344 x 1344 runs (min, max)."""
    size = dynamic_size(ModelConfig())
    assert size == DynamicSize(32, (32, 32), (1344, 1344))
    shapes = trt_export.profile_shapes(size, (1, 8, 16), ["images", "image_sizes"], resize=800)
    assert shapes == {
        "images": {"min": (1, 3, 32, 32), "opt": (8, 3, 800, 1344), "max": (16, 3, 1344, 1344)},
        "image_sizes": {"min": (1, 2), "opt": (8, 2), "max": (16, 2)},
    }
    # resize rounds up to the multiple, within the range; without it, opt is the largest input.
    assert trt_export.profile_shapes(size, (1, 2, 4), resize=1000)["images"]["opt"] == (2, 3, 1024, 1344)
    assert trt_export.profile_shapes(size, (1, 2, 4), resize=5000)["images"]["opt"] == (2, 3, 1344, 1344)
    assert trt_export.profile_shapes(size, (1, 2, 4))["images"]["opt"] == (2, 3, 1344, 1344)
    # A checkpoint saved with 128 keeps its multiple: max_size 300 rounds up to 384.
    old = dynamic_size(ModelConfig(pad_multiple=128, resize=100, max_size=300))
    assert trt_export.profile_shapes(old, (1, 1, 1), resize=100)["images"] == {
        "min": (1, 3, 128, 128),
        "opt": (1, 3, 128, 384),
        "max": (1, 3, 384, 384),
    }


def _engine_meta(**changes):
    meta = {
        "config": {"classes": 3},
        "category_ids": [1, 3, 7],
        "input_size": [128, 256],
        "tensorrt_version": "10.16.0",
        "gpu": "NVIDIA H100",
        "batch_opts": [1, 8, 16],
    }
    meta.update(changes)
    return meta


def test_engine_metadata_errors_are_one_line_naming_the_file(tmp_path):
    from retinanet import load

    plan = tmp_path / "m.plan"
    json_path = trt_files.metadata_path(str(plan))
    with pytest.raises(UserError, match=f"^{plan}: metadata {json_path} missing"):
        load(str(plan))
    trt_export.write_engine(str(plan), b"plan bytes", _engine_meta())
    good = json.loads(open(json_path).read())
    cases = [
        ('{"config": ', "unreadable engine metadata"),
        ("[1, 2]", "not a JSON object"),
        (json.dumps({k: v for k, v in good.items() if k != "plan_sha256"}), "lacks plan_sha256"),
        (json.dumps({**good, "input_size": [128]}), "bad engine metadata"),
        (json.dumps({**good, "config": {"no_such_key": 1}}), "bad engine metadata"),
        (json.dumps({**good, "batch_opts": "1 8 16"}), "bad engine metadata"),
    ]
    for text, words in cases:
        with open(json_path, "w") as f:
            f.write(text)
        with pytest.raises(UserError) as e:
            load(str(plan))
        assert str(e.value).startswith(f"{json_path}: ") and words in str(e.value), (text, str(e.value))
        assert len(str(e.value).splitlines()) == 1


def test_metadata_names_its_plan():
    meta = {**_engine_meta(), "plan_sha256": trt_files.plan_digest(b"plan A")}
    trt_runtime.check_plan("m.plan", meta, b"plan A")
    with pytest.raises(UserError, match=r"m.plan.json: engine metadata is for another plan"):
        trt_runtime.check_plan("m.plan", meta, b"plan B")


def test_build_mismatch_and_batch_errors():
    meta = {"tensorrt_version": "10.16.0", "gpu": "NVIDIA H100"}
    trt_runtime.check_build_match("m.plan", meta, "10.16.0", "NVIDIA H100")
    with pytest.raises(UserError, match="TensorRT 10.16.0, this is 11.1.0"):
        trt_runtime.check_build_match("m.plan", meta, "11.1.0", "NVIDIA H100")
    with pytest.raises(UserError, match="this GPU is"):
        trt_runtime.check_build_match("m.plan", meta, "10.16.0", "NVIDIA A100")
    trt_runtime.check_batch("m.plan", 8, (1, 8, 16))
    with pytest.raises(UserError, match="outside the engine's profile 1..16"):
        trt_runtime.check_batch("m.plan", 17, (1, 8, 16))


def test_plugin_library_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("RETINANET_PLUGINS", str(tmp_path / "nope.so"))
    with pytest.raises(UserError, match="plugin library not found"):
        trt_files.plugin_library_path()


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed")
def test_tensorrt_missing_message(tmp_path):
    with pytest.raises(UserError, match="pip install tensorrt"):
        trt_files.import_tensorrt()
    from retinanet.runtime import load

    plan = str(tmp_path / "m.plan")
    trt_export.write_engine(plan, b"plan", _engine_meta())
    with pytest.raises(UserError, match="TensorRT is not installed"):
        load(plan)


def test_cli_passes_only_given_flags_and_the_options_fill_in(monkeypatch):
    import retinanet.export
    from retinanet.cli import main
    from retinanet.export import ExportOptions

    seen = []

    def fake_export(model, output, options, override=False):
        seen.append(options)
        return {"export_s": 0.0, "table": None, "input": "128x256"}

    monkeypatch.setattr(retinanet.export, "export", fake_export)
    assert main(["export", "m.pth", "e.plan", "--dynamic-batch-opts", "2", "4", "8", "--workspace", "512"]) == 0
    assert main(["export", "m.pth", "e.plan", "--size", "640", "768", "--int8", "--calibration-table", "t"]) == 0
    assert main(["export", "m.pth", "e.onnx"]) == 0
    assert seen == [
        ExportOptions(batch_opts=(2, 4, 8), workspace_mib=512),
        ExportOptions(size=(640, 768), precision="int8", calibration_table="t"),
        ExportOptions(),
    ]


def test_network_flags_are_strongly_typed_on_10_and_default_on_11():
    flags = types.SimpleNamespace(STRONGLY_TYPED=5)  # the enum's int value is the bit index
    assert (
        trt_export.network_flags(types.SimpleNamespace(__version__="10.16.0", NetworkDefinitionCreationFlag=flags))
        == 1 << 5
    )
    assert (
        trt_export.network_flags(types.SimpleNamespace(__version__="11.1.0", NetworkDefinitionCreationFlag=flags)) == 0
    )


@needs_trt
def test_network_flags():
    import tensorrt as trt

    flags = trt_export.network_flags(trt)
    assert flags == 0 if int(trt.__version__.split(".")[0]) >= 11 else flags != 0


# --- engine export around the TensorRT build (which needs a GPU and TensorRT) ---------------------


@pytest.fixture
def fake_build(monkeypatch):
    """TensorRT's part replaced by a stub build; returns the list of its calls."""
    calls = []
    trt = types.SimpleNamespace(__version__="10.16.0")
    monkeypatch.setattr(trt_export, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_export, "load_plugins", lambda trt, path=None: "libretinanet_plugins.so")

    def build_plan(trt, onnx_path, shapes, workspace_mib, cache_blob, verbose=False):
        calls.append({"onnx": onnx_path, "shapes": shapes, "cache": cache_blob})
        return b"PLAN %d" % len(calls), b"CACHE %d" % len(calls)

    monkeypatch.setattr(trt_export, "build_plan", build_plan)
    return calls


def test_engine_export_writes_its_files_beside_the_plan(tiny, tmp_path, fake_build):
    import onnx

    from retinanet import checkpoint
    from retinanet.export import ExportOptions, export, quantize
    from retinanet.export import onnx as export_onnx

    plan = tmp_path / "e.plan"
    result = export(
        tiny["pth"],
        str(plan),
        ExportOptions(
            TINY_SIZE, "int8", calibration_images=tiny["images"], calibration_batches=1, batch_opts=(1, 2, 4)
        ),
    )
    assert sorted(os.listdir(tmp_path)) == [
        "e.calibration.json",
        "e.onnx",
        "e.plan",
        "e.plan.json",
        "e.plan.timing_cache",
    ]
    assert result["table"] == str(tmp_path / "e.calibration.json") and result["onnx"] == str(tmp_path / "e.onnx")
    shapes = {"images": {"min": (1, 3, *TINY_SIZE), "opt": (2, 3, *TINY_SIZE), "max": (4, 3, *TINY_SIZE)}}
    assert fake_build == [{"onnx": str(tmp_path / "e.onnx"), "shapes": shapes, "cache": b""}]
    onnx_meta = onnx_format.read_metadata(onnx.load(str(tmp_path / "e.onnx")))
    assert onnx_meta["retinanet.form"] == "tensorrt" and onnx_meta["retinanet.precision"] == "int8"
    digest = export_onnx.model_hash(checkpoint.load(tiny["pth"]))
    assert quantize.read_table(result["table"], digest, TINY_SIZE)["images"] == 8
    assert plan.read_bytes() == b"PLAN 1" and (tmp_path / "e.plan.timing_cache").read_bytes() == b"CACHE 1"
    meta = trt_files.read_metadata(str(plan))
    assert meta == {
        "config": tiny["model"].config.to_dict(),
        "category_ids": [1, 3, 7],
        "category_names": ["square", "disc", "triangle"],
        "input_size": list(TINY_SIZE),
        "precision": "int8",
        "model_sha256": digest,
        "tensorrt_version": "10.16.0",
        "gpu": "unknown",
        "batch_opts": [1, 2, 4],
        "plan_sha256": trt_files.plan_digest(b"PLAN 1"),
    }
    trt_runtime.check_plan(str(plan), meta, plan.read_bytes())
    assert trt_runtime.settings(str(plan), meta) == (tiny["model"].config, TINY_SIZE, [1, 3, 7], (1, 2, 4))

    # A rebuild starts from the timing cache and replaces plan and metadata together.
    trt_export.build_engine(
        str(tmp_path / "e.onnx"),
        str(plan),
        onnx_meta,
        (1, 2, 4),
        4096,
        timing_cache=trt_files.timing_cache_path(str(plan)),
    )
    assert fake_build[1]["cache"] == b"CACHE 1"
    assert plan.read_bytes() == b"PLAN 2" and (tmp_path / "e.plan.timing_cache").read_bytes() == b"CACHE 2"
    assert trt_files.read_metadata(str(plan))["plan_sha256"] == trt_files.plan_digest(b"PLAN 2")
    assert len(os.listdir(tmp_path)) == 5  # no temp files left


def test_engine_write_failures_never_leave_a_plan_without_its_metadata(tiny, tmp_path, fake_build, monkeypatch):
    import onnx

    onnx_meta = onnx_format.read_metadata(onnx.load(tiny["plugin"]))
    plan = str(tmp_path / "e.plan")
    trt_export.write_engine(plan, b"old plan", _engine_meta())
    old_meta = open(trt_files.metadata_path(plan)).read()

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:  # the plan cannot be written: the old pair stays, whole
        m.setattr("retinanet.files.os.fsync", full_disk)
        with pytest.raises(OSError, match="No space"):
            trt_export.build_engine(tiny["plugin"], plan, onnx_meta, (1, 8, 16), 4096)
    assert open(plan, "rb").read() == b"old plan" and open(trt_files.metadata_path(plan)).read() == old_meta
    assert sorted(os.listdir(tmp_path)) == ["e.plan", "e.plan.json"]

    def no_metadata(path, values):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:  # the plan is written, its metadata is not: neither stays
        m.setattr(trt_export, "write_metadata", no_metadata)
        with pytest.raises(OSError, match="No space"):
            trt_export.build_engine(tiny["plugin"], plan, onnx_meta, (1, 8, 16), 4096)
    assert os.listdir(tmp_path) == []


def test_dynamic_engine_metadata_carries_the_range(tmp_path, fake_build):
    """An engine of a dynamic-size export: the profile spans its range, the metadata records
    the range as the ONNX does, and the runtime reads it back."""
    config = ModelConfig(backbone="ResNet18FPN", classes=3, head_norm=True)
    size = dynamic_size(config)
    onnx_meta = {
        "retinanet.config": config.to_dict(),
        "retinanet.category_ids": [1, 3, 7],
        "retinanet.input_size": to_json(size),
        "retinanet.form": "tensorrt",
        "retinanet.inputs": ["images", "image_sizes"],
    }
    plan = str(tmp_path / "d.plan")
    trt_export.build_engine(str(tmp_path / "d.onnx"), plan, onnx_meta, (1, 4, 8), 4096)
    (call,) = fake_build
    assert call["shapes"] == trt_export.profile_shapes(size, (1, 4, 8), ["images", "image_sizes"], 800)
    assert call["shapes"]["images"]["opt"] == (4, 3, 800, 1344)
    meta = trt_files.read_metadata(plan)
    assert meta["input_size"] == {"dynamic": True, "multiple": 32, "min": [32, 32], "max": [1344, 1344]}
    assert trt_runtime.settings(plan, meta) == (config, size, [1, 3, 7], (1, 4, 8))
    for bad in ({**to_json(size), "multiple": 0}, {**to_json(size), "max": [1344, 1300]}, {"dynamic": False}):
        with pytest.raises(UserError, match="bad engine metadata"):
            trt_runtime.settings(plan, {**meta, "input_size": bad})


class FakeContext:
    """An execution context: keeps the input shapes set, gives the outputs' shapes from the batch."""

    def __init__(self):
        self.shapes = []

    def set_input_shape(self, name, shape):
        self.shapes.append((name, tuple(shape)))
        return True

    def set_tensor_address(self, name, address):
        pass

    def get_tensor_shape(self, name):
        batch = self.shapes[-1][1][0]
        return {"scores": (batch, 100), "boxes": (batch, 100, 4), "classes": (batch, 100)}[name]

    def execute_async_v3(self, stream):
        return True


@pytest.fixture
def fake_runtime(monkeypatch):
    """TensorRT's runtime and the CUDA calls around it replaced, so that TensorRTBackend runs
    on the CPU: returns a function (plan path, input names) -> backend."""
    import torch

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    def engine(inputs):
        io = inputs + ["scores", "boxes", "classes"]
        return types.SimpleNamespace(
            num_io_tensors=len(io),
            get_tensor_name=io.__getitem__,
            get_tensor_mode=lambda n: "INPUT" if n in inputs else "OUTPUT",
            get_tensor_dtype=lambda n: types.SimpleNamespace(
                name="INT32" if n in ("classes", "image_sizes") else "FLOAT"
            ),
            create_execution_context=FakeContext,
        )

    def backend(plan, inputs=("images",)):
        trt = types.SimpleNamespace(
            __version__="10.16.0",
            Logger=Logger,
            Runtime=lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda data: engine(list(inputs))),
            TensorIOMode=types.SimpleNamespace(INPUT="INPUT"),
        )
        monkeypatch.setattr(trt_runtime, "import_tensorrt", lambda: trt)
        return trt_runtime.TensorRTBackend(plan, device="cpu")

    monkeypatch.setattr(trt_runtime, "load_plugins", lambda trt: "libretinanet_plugins.so")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
    return backend


def test_runtime_sets_each_batchs_own_size_on_a_dynamic_engine(tmp_path, fake_runtime):
    import torch

    config = ModelConfig(backbone="ResNet18FPN", classes=3, max_size=256)
    dynamic, fixed = str(tmp_path / "d.plan"), str(tmp_path / "f.plan")
    trt_export.write_engine(
        dynamic, b"plan", _engine_meta(config=config.to_dict(), input_size=to_json(dynamic_size(config)))
    )
    trt_export.write_engine(fixed, b"plan", _engine_meta(config=config.to_dict(), input_size=[128, 256]))
    backend = fake_runtime(dynamic)
    assert backend.input_size == DynamicSize(32, (32, 32), (256, 256))
    assert (backend.config.resize, backend.config.max_size) == (256, 256)  # capped by the largest input
    for shape, want in [((2, 3, 100, 200), (2, 3, 128, 224)), ((1, 3, 224, 160), (1, 3, 224, 160))]:
        scores, boxes, classes = backend(torch.zeros(shape, dtype=torch.uint8))
        assert backend.context.shapes[-1] == ("images", want)
        assert scores.shape == (want[0], 100) and boxes.shape == (want[0], 100, 4) and classes.dtype == torch.int32
    with pytest.raises(UserError, match="300x64 pixels does not fit the model's largest input 256x256"):
        backend(torch.zeros((1, 3, 300, 64), dtype=torch.uint8))
    # A fixed-size engine pads every batch to its size, as before.
    backend = fake_runtime(fixed)
    backend(torch.zeros((2, 3, 96, 160), dtype=torch.uint8))
    assert backend.context.shapes == [("images", (2, 3, 128, 256))]
    assert (backend.config.resize, backend.config.max_size) == (128, 256)
    with pytest.raises(UserError, match="160x160 pixels does not fit the model input 128x256"):
        backend(torch.zeros((1, 3, 160, 160), dtype=torch.uint8))
