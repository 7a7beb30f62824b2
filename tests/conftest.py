import os
import subprocess
import sys

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: trains a model; minutes on a CPU")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """The embedded demo dataset, generated once per test session."""
    from retinanet.data import demo

    root = os.environ.get("RETINANET_CACHE")
    return demo.ensure(None if root else tmp_path_factory.mktemp("demo"))


# The demo model that the slow tests share: half the demo schedule (iterations
# and milestones), 300 iterations, a few minutes on 2 CPU cores. Measured: mAP
# @[.5:.95] 0.637 (AP50 0.981).
DEMO_ITERS = 300


def demo_subset(demo_root, folder, count, split="train"):
    """The first `count` demo images of `split` and their annotations, copied into
    `folder`: (image folder, annotation file)."""
    import json
    import shutil

    doc = json.loads((demo_root / f"{split}.json").read_text())
    doc["images"] = doc["images"][:count]
    keep = {im["id"] for im in doc["images"]}
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] in keep]
    (folder / "images").mkdir()
    for im in doc["images"]:
        shutil.copy(demo_root / split / im["file_name"], folder / "images" / im["file_name"])
    (folder / "ann.json").write_text(json.dumps(doc))
    return folder / "images", folder / "ann.json"


def assert_user_error(proc, *words):
    """A user error: exit 2, no traceback, one line holding every word."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def run_cli(*args, cwd, env=None, check=True, timeout=600):
    """`python -m retinanet ARGS` in `cwd`; AssertionError with its output when check fails."""
    run_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "retinanet", *args],
        cwd=cwd,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"retinanet {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def trained(tmp_path_factory, demo_root):
    """Train the demo preset from scratch via the CLI, once per session: (workdir, stdout, env)."""
    from retinanet.data import demo

    work = tmp_path_factory.mktemp("train")
    env = {"RETINANET_CACHE": str(demo_root.parent)} if demo_root.name == f"demo-v{demo.VERSION}" else {}
    if not env:  # demo_root is a plain folder: point the cache at a copy with the expected name
        cache = tmp_path_factory.mktemp("cache")
        os.symlink(demo_root, cache / f"demo-v{demo.VERSION}")
        env = {"RETINANET_CACHE": str(cache)}
    proc = run_cli(
        "train", "demo.pth", "--schedule", "0.5", "--val-iters", str(DEMO_ITERS), "--seed", "1", cwd=work, env=env
    )
    return work, proc.stdout, env


# A tiny random-weight model and its ONNX exports, shared by the export, TensorRT and
# plugin-form tests (built once per session: the exports take about a minute on 2 cores).
TINY_SIZE = (128, 256)  # H, W of the exports: not square, so a swapped axis shows


def tiny_model(classes=3, busy=True):
    from retinanet.config import ModelConfig
    from retinanet.model import RetinaNet

    cfg = ModelConfig(
        backbone="ResNet18FPN", classes=classes, channels=32, resize=128, max_size=256, freeze_bn=False, top_n=300
    )
    torch.manual_seed(0)
    model = RetinaNet(cfg).eval()
    if busy:  # many candidates above threshold, wide boxes: NMS has work to do
        torch.nn.init.normal_(model.cls_head.out.weight, std=0.3)
        torch.nn.init.constant_(model.cls_head.out.bias, -1.5)
        torch.nn.init.normal_(model.box_head.out.weight, std=0.1)
    return model


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, demo_root):
    """A busy tiny checkpoint and its exports: portable FP32, plugin FP16, plugin INT8 (images, then table)."""
    from retinanet import checkpoint
    from retinanet.export import ExportOptions, export_onnx

    work = tmp_path_factory.mktemp("tiny")
    images = demo_root / "val"
    model = tiny_model()
    path = str(work / "tiny.pth")
    checkpoint.save(path, checkpoint.model_state(model.config, model, [1, 3, 7]))
    out = {"work": work, "pth": path, "model": model, "images": str(images)}
    out["fp32"] = export_onnx(path, str(work / "fp32.onnx"), ExportOptions(TINY_SIZE, "fp32"))["output"]
    out["plugin"] = export_onnx(path, str(work / "plugin.onnx"), ExportOptions(TINY_SIZE, "fp16", plugin_form=True))[
        "output"
    ]
    r = export_onnx(
        path,
        str(work / "int8.onnx"),
        ExportOptions(TINY_SIZE, "int8", plugin_form=True, calibration_images=str(images)),
    )
    out["int8"], out["table"] = r["output"], r["table"]
    out["int8_from_table"] = export_onnx(
        path,
        str(work / "int8_table.onnx"),
        ExportOptions(TINY_SIZE, "int8", plugin_form=True, calibration_table=r["table"]),
    )["output"]
    return out
