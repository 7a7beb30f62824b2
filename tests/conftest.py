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


@pytest.fixture
def one_thread():
    """PyTorch on one thread in this process while the test runs: for tests that train
    the tiny model here. It gains little from a second thread, and two OpenMP threads
    stall whenever another process holds a core (measured: a step 0.5 s on one thread,
    1.7 to 2.8 s on two, with a compiler running beside)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def demo_subset(demo_root, folder, count, split="train", images="images", annotations="ann.json"):
    """The first `count` demo images of `split` and their annotations, copied into
    `folder`: (image folder, annotation file)."""
    import json
    import shutil

    doc = json.loads((demo_root / f"{split}.json").read_text())
    doc["images"] = doc["images"][:count]
    keep = {im["id"] for im in doc["images"]}
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] in keep]
    (folder / images).mkdir()
    for im in doc["images"]:
        shutil.copy(demo_root / split / im["file_name"], folder / images / im["file_name"])
    (folder / annotations).write_text(json.dumps(doc))
    return folder / images, folder / annotations


@pytest.fixture(scope="session")
def tiny_demo_env(tmp_path_factory, demo_root):
    """The environment of CLI runs whose embedded demo is the first 8 train and 4 val
    images: the demo presets unchanged, seconds a run. One thread, as in one_thread."""
    from retinanet.data import demo

    cache = tmp_path_factory.mktemp("tinycache")
    root = cache / f"demo-v{demo.VERSION}"
    root.mkdir()
    demo_subset(demo_root, root, 8, "train", images="train", annotations="train.json")
    demo_subset(demo_root, root, 4, "val", images="val", annotations="val.json")
    return {"RETINANET_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


def assert_user_error(proc, *words):
    """A user error: exit 2, no traceback, one line holding every word."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def in_process(capsys, *args):
    """`retinanet ARGS` in this process (a subprocess costs seconds of imports): exit code, stderr lines."""
    from retinanet.cli import main

    code = main(list(args))
    return code, capsys.readouterr().err.strip().splitlines()


def assert_one_line_error(result, *words):
    """in_process's result for a user error: exit 2 and one line holding every word."""
    code, lines = result
    assert code == 2 and len(lines) == 1, (code, lines)
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


@pytest.fixture(scope="session")
def demo_val(trained, demo_root):
    """`retinanet infer demo.pth` on the demo val set with its annotations, once per
    session (the PyTorch loader, as the user runs it): (stdout, detections file val.json
    in the trained work folder). The inference, ONNX export and DALI tests compare to it."""
    work, _, env = trained
    val = ["--images", str(demo_root / "val"), "--annotations", str(demo_root / "val.json")]
    proc = run_cli("infer", "demo.pth", *val, "--output", "val.json", cwd=work, env=env)
    return proc.stdout, work / "val.json"


# The tiny model of the tests: ResNet18FPN 32 channels wide, 128 px, BatchNorm heads,
# BatchNorm statistics trained (as from scratch). Random weights: built in a fraction
# of a second, a training step on 96 px images about 0.5 s on one core.
# `retinanet train` flags of a small run from scratch: ResNet18FPN at 96 px, loading in the main process.
TINY_TRAIN = ["--backbone", "ResNet18FPN", "--no-pretrained", "--resize", "96", "--max-size", "96"]
TINY_TRAIN += ["--jitter", "96", "96", "--workers", "0"]
TINY = dict(backbone="ResNet18FPN", classes=3, channels=32, resize=128, max_size=128, freeze_bn=False)
TINY_IDS = [1, 3, 7]  # non-contiguous category ids, as the demo's
TINY_NAMES = ["square", "disc", "triangle"]
# Classification output convs (weight std, bias) that make a random model detect
# plenty: many candidates above the score threshold, so NMS, `detections` and
# the mapping back to the image have work to do. BUSY spreads the scores widely.
BUSY = (3.0, -2.0)


def tiny_config(**changes):
    """The tiny model's ModelConfig with `changes`."""
    from retinanet.config import ModelConfig

    return ModelConfig(**{**TINY, **changes})


def tiny_model(busy=None, **changes):
    """A random-weight tiny model (seed 0) in eval mode; busy: (weight std, bias) of
    the classification output conv, the box output conv set to std 0.1 (boxes away
    from their anchors)."""
    from retinanet.model import RetinaNet

    torch.manual_seed(0)
    model = RetinaNet(tiny_config(**changes)).eval()
    if busy:
        torch.nn.init.normal_(model.cls_head.out.weight, std=busy[0])
        torch.nn.init.constant_(model.cls_head.out.bias, busy[1])
        torch.nn.init.normal_(model.box_head.out.weight, std=0.1)
    return model


def save_model(model, path, ids=None, names=None):
    """`model` as a checkpoint (category ids TINY_IDS, or the first ones of it, named TINY_NAMES
    when the ids are those); returns the path."""
    from retinanet import checkpoint

    ids = ids or TINY_IDS[: model.config.classes]
    if names is None and ids == TINY_IDS[: len(ids)]:
        names = TINY_NAMES[: len(ids)]
    checkpoint.save(str(path), checkpoint.model_state(model.config, model, ids, names))
    return str(path)


@pytest.fixture(scope="session")
def tiny_pth(tmp_path_factory):
    """A BUSY tiny checkpoint, tiny.pth: read it, never write to it (copy it first)."""
    return save_model(tiny_model(BUSY), tmp_path_factory.mktemp("tiny_pth") / "tiny.pth")


# The tiny model of the export, TensorRT and plugin-form tests, and its ONNX exports
# (built once per session: the exports take about a minute on 2 cores).
TINY_SIZE = (128, 256)  # H, W of the exports: not square, so a swapped axis shows
EXPORT = dict(max_size=256, top_n=300)
EXPORT_BUSY = (0.3, -1.5)


def export_model(busy=EXPORT_BUSY, **changes):
    """The exports' tiny model: 128 x 256 images, 300 candidates per level; busy as tiny_model's."""
    return tiny_model(busy, **EXPORT, **changes)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, demo_root):
    """A busy tiny checkpoint and its exports: portable FP32, plugin FP16, plugin INT8 (and its calibration table)."""
    from retinanet.export import ExportOptions, export_onnx

    work = tmp_path_factory.mktemp("tiny")
    images = demo_root / "val"
    model = export_model()
    path = save_model(model, work / "tiny.pth")
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
    return out
