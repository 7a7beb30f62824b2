"""TensorRT engine export and runtime up to the TensorRT calls (TensorRT is not installable here)."""
import importlib.util
import json

import pytest

from retinanet.errors import UserError
from retinanet.export import tensorrt as trt_export
from retinanet.runtime import tensorrt as trt_runtime

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
needs_trt = pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not installed (not installable on this machine)")


def test_batch_opts_validation():
    assert trt_export.check_batch_opts(None) == (1, 8, 16)
    assert trt_export.check_batch_opts([2, 2, 4]) == (2, 2, 4)
    for bad in ([0, 1, 2], [4, 2, 8], [1, 8, 4], [1, 2]):
        with pytest.raises(UserError, match="dynamic-batch-opts"):
            trt_export.check_batch_opts(bad)


def test_profile_shapes():
    assert trt_export.profile_shapes((640, 768), (1, 8, 16)) == {
        "min": (1, 3, 640, 768), "opt": (8, 3, 640, 768), "max": (16, 3, 640, 768)}


def test_metadata_round_trip(tmp_path):
    plan = str(tmp_path / "m.plan")
    meta = {"config": {"backbone": "resnet18"}, "category_ids": [1, 3], "input_size": [640, 640],
            "tensorrt_version": "10.16.0", "gpu": "NVIDIA H100", "batch_opts": [1, 8, 16]}
    trt_export.write_metadata(plan, meta)
    assert trt_export.read_metadata(plan) == meta
    with open(trt_export.metadata_path(plan), "w") as f:
        json.dump({"config": {}}, f)
    with pytest.raises(UserError, match="lacks"):
        trt_export.read_metadata(plan)
    with pytest.raises(UserError, match="metadata .* missing"):
        trt_export.read_metadata(str(tmp_path / "other.plan"))


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
        trt_export.plugin_library_path()


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed")
def test_tensorrt_missing_message(tmp_path):
    with pytest.raises(UserError, match="pip install tensorrt"):
        trt_export.import_tensorrt()
    from retinanet.runtime import load

    plan = str(tmp_path / "m.plan")
    trt_export.write_metadata(plan, {"config": {}, "category_ids": [], "input_size": [128, 128],
                                     "tensorrt_version": "x", "gpu": "y", "batch_opts": [1, 1, 1]})
    with pytest.raises(UserError, match="TensorRT is not installed"):
        load(plan)


def test_cli_engine_flags(tmp_path):
    from retinanet.cli import build_parser

    ns = build_parser().parse_args(["export", "m.pth", "e.plan", "--dynamic-batch-opts", "2", "4", "8",
                                    "--workspace", "512"])
    assert ns.dynamic_batch_opts == [2, 4, 8] and ns.workspace == 512


@needs_trt
def test_network_flags():
    import tensorrt as trt

    flags = trt_export.network_flags(trt)
    assert flags == 0 if int(trt.__version__.split(".")[0]) >= 11 else flags != 0
