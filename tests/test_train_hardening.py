"""Training never hangs, never unpickles code, stops cleanly on signals, and never
saves weights from a non-finite step."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY_TRAIN, assert_user_error, demo_subset, run_cli, save_model, tiny_config, tiny_model

from retinanet import checkpoint
from retinanet.config import TrainConfig


@pytest.fixture(scope="module")
def six(tmp_path_factory, demo_root):
    """A COCO folder of 6 demo training images: images/ and ann.json."""
    root = tmp_path_factory.mktemp("six")
    demo_subset(demo_root, root, 6)
    return root


SMALL = [*TINY_TRAIN, "--val-iters", "1000"]


@pytest.mark.parametrize(
    "images, extra, words",
    [
        ("nowhere", [], ["nowhere", "image folder not found", "--images"]),
        (None, [], ["6 of the 6 images", "not there", "the first", "image id", "--images"]),  # default: .
        ("images", ["--batch", "8"], ["6 images cannot fill one batch of 8"]),
    ],
)
def test_no_batch_can_be_formed_is_one_line_before_any_work(six, tmp_path, images, extra, words):
    args = ["train", "m.pth", "--annotations", str(six / "ann.json"), *SMALL, *extra]
    if images is not None:
        args += ["--images", str(six / images)]
    start = time.perf_counter()
    proc = run_cli(*args, cwd=tmp_path, check=False, timeout=60)  # used to loop forever
    assert_user_error(proc, *words)
    assert not (tmp_path / "m.pth").exists()
    assert time.perf_counter() - start < 60


def test_empty_image_list_and_one_missing_file(six, tmp_path):
    doc = json.loads((six / "ann.json").read_text())
    images = ["--images", str(six / "images")]
    (tmp_path / "empty.json").write_text(json.dumps({**doc, "images": [], "annotations": []}))
    proc = run_cli("train", "m.pth", "--annotations", "empty.json", *images, *SMALL, cwd=tmp_path, check=False)
    assert_user_error(proc, "empty.json", "no images")
    doc["images"][3]["file_name"] = "lost.jpg"
    (tmp_path / "one.json").write_text(json.dumps(doc))
    proc = run_cli("train", "m.pth", "--annotations", "one.json", *images, *SMALL, cwd=tmp_path, check=False)
    assert_user_error(proc, "1 of the 6 images", "lost.jpg", f"image id {doc['images'][3]['id']}")


def test_an_epoch_without_a_step_is_an_error_not_a_loop(six, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(six / "images", images)
    for f in images.iterdir():
        f.write_bytes(f.read_bytes()[:100])  # every image truncated: every batch is empty
    proc = run_cli(
        "train",
        "m.pth",
        "--annotations",
        str(six / "ann.json"),
        "--images",
        str(images),
        *SMALL,
        "--batch",
        "2",
        cwd=tmp_path,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("retinanet: error:")]
    assert len(error) == 1 and "completed no training step" in error[0] and "(6 images)" in error[0], proc.stderr


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EXPLOIT_MARK']}",))


def test_checkpoints_are_never_unpickled_with_code(tmp_path, monkeypatch):
    mark = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARK", str(mark))
    torch.save({"format_version": 1, "payload": Exploit()}, tmp_path / "evil.pth")
    for args in (
        ["infer", "evil.pth"],
        ["train", "evil.pth"],
        ["export", "evil.pth", "out.onnx"],
        ["train", "new.pth", "--fine-tune", "evil.pth"],
    ):
        proc = run_cli(*args, cwd=tmp_path, check=False)
        assert_user_error(proc, "evil.pth", "refusing to load", "could run code")
    assert not mark.exists()
    with pytest.raises(Exception, match="refusing"):
        checkpoint.load(str(tmp_path / "evil.pth"))
    assert not mark.exists()


def test_everything_we_save_loads_with_weights_only(six, tmp_path):
    run_cli(
        "train",
        "m.pth",
        "--annotations",
        str(six / "ann.json"),
        "--images",
        str(six / "images"),
        *SMALL,
        "--iters",
        "1",
        "--batch",
        "2",
        cwd=tmp_path,
    )
    state = torch.load(tmp_path / "m.pth", weights_only=True)
    assert {"optimizer", "scheduler", "scaler", "rng_python", "rng_torch", "train_config"} <= state.keys()


def test_resuming_weights_without_training_state_is_one_line(six, tmp_path):
    doc = json.loads((six / "ann.json").read_text())
    ids = sorted(c["id"] for c in doc["categories"])
    save_model(tiny_model(classes=len(ids), resize=96, max_size=96), tmp_path / "w.pth", ids)
    proc = run_cli(
        "train",
        "w.pth",
        "--annotations",
        str(six / "ann.json"),
        "--images",
        str(six / "images"),
        *SMALL,
        cwd=tmp_path,
        check=False,
    )
    assert_user_error(proc, "w.pth", "no training state", "optimizer", "--override", "--fine-tune")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_at_the_current_iteration_and_resumes(six, tmp_path, sig):
    args = [
        sys.executable,
        "-m",
        "retinanet",
        "train",
        "m.pth",
        "--annotations",
        str(six / "ann.json"),
        "--images",
        str(six / "images"),
        *SMALL,
        "--iters",
        "100000",
        "--batch",
        "2",
    ]
    proc = subprocess.Popen(
        args,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    line = proc.stdout.readline()  # the first progress line comes after iteration 1
    assert line.startswith("[     1/100000]"), line + proc.stderr.read()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, (proc.returncode, out, err)
    assert "Traceback" not in err
    state = checkpoint.load(str(tmp_path / "m.pth"))
    stopped = state["iteration"]
    assert stopped >= 1
    assert err.strip() == (
        f"retinanet: stopped by {signal.Signals(sig).name} at iteration {stopped}: saved m.pth; "
        "run the same command to resume"
    )
    again = run_cli(
        "train",
        "m.pth",
        "--annotations",
        str(six / "ann.json"),
        "--images",
        str(six / "images"),
        *SMALL,
        "--iters",
        str(stopped + 1),
        "--batch",
        "2",
        cwd=tmp_path,
    )
    assert f"resuming m.pth at iteration {stopped}" in again.stdout
    assert checkpoint.load(str(tmp_path / "m.pth"))["iteration"] == stopped + 1


def make_trainer(six, tmp_path, **train):
    """A Trainer of the tiny model on the six images at 96 px, in this process, on the CPU."""
    from retinanet import train as tr
    from retinanet.data.coco import CocoAnnotations

    coco_path = str(six / "ann.json")
    coco = CocoAnnotations(coco_path)
    cfg = tiny_config(classes=coco.classes, resize=96, max_size=96)
    tcfg = TrainConfig(**{"batch": 2, "iters": 50, "workers": 0, "jitter": [96, 96], "warmup": 0, **train})
    setup = tr.Setup(str(tmp_path / "m.pth"), cfg, tcfg, tr.DataPaths(str(six / "images"), coco_path), coco, None)
    return tr.Trainer(setup, torch.device("cpu"), 0, 1, False, None, None)


def first_batch(t):
    return next(iter(t.loader()))


def test_gradients_are_clipped_to_the_norm_and_the_raw_norm_is_reported(six, tmp_path, one_thread):
    t = make_trainer(six, tmp_path, clip_grad=0.01)
    out = t.step(first_batch(t), 0)
    assert out["finite"] and out["norm"] > 0.01  # the norm before clipping
    after = torch.nn.utils.get_total_norm([p.grad for p in t.net.parameters() if p.grad is not None])
    assert after == pytest.approx(0.01, rel=1e-4)


def test_a_non_finite_step_leaves_weights_and_optimizer_untouched(six, tmp_path, monkeypatch, one_thread):
    # One image a step: what is under test is which state a skipped step may touch, not the data.
    t = make_trainer(six, tmp_path, batch=1)
    batch = first_batch(t)
    t.step(batch, 0)  # momentum buffers exist from here on
    weights = {k: v.clone() for k, v in t.net.state_dict().items()}
    momentum = [t.optimizer.state[p]["momentum_buffer"].clone() for p in t.net.parameters()]
    real = t.net.loss_from_heads
    monkeypatch.setattr(t.net, "loss_from_heads", lambda *a: {k: v * float("nan") for k, v in real(*a).items()})
    from retinanet.train import MAX_NONFINITE_STEPS, check_finite

    for _ in range(MAX_NONFINITE_STEPS - 1):
        out = t.step(batch, 0)
        assert not out["finite"]
        check_finite(t, out)  # not yet divergence
    for k, v in t.net.state_dict().items():
        if v.is_floating_point() and "running" not in k:  # BatchNorm statistics move in forward
            assert torch.equal(v, weights[k]), k
    for p, m in zip(t.net.parameters(), momentum):
        assert torch.equal(t.optimizer.state[p]["momentum_buffer"], m)
    out = t.step(batch, 0)
    with pytest.raises(Exception, match="training diverged: 20 steps in a row"):
        check_finite(t, out)


def test_divergence_is_one_line_and_the_checkpoint_keeps_finite_weights(six, tmp_path, monkeypatch, capsys, one_thread):
    from retinanet import cli as retinanet_cli
    from retinanet.model import RetinaNet

    common = ["--annotations", str(six / "ann.json"), "--images", str(six / "images"), *SMALL, "--batch", "2"]
    monkeypatch.chdir(tmp_path)
    # The tiny model's architecture, which --fine-tune takes from its checkpoint and the
    # resumed run from m.pth: the 22 steps take seconds (the CLI's default: 256 channels).
    start = save_model(tiny_model(), tmp_path / "tiny.pth")
    assert retinanet_cli.main(["train", "m.pth", *common, "--fine-tune", start, "--iters", "2"]) == 0
    before = checkpoint.load(str(tmp_path / "m.pth"))
    assert before["config"].channels == 32
    real = RetinaNet.loss_from_heads
    monkeypatch.setattr(
        RetinaNet,
        "loss_from_heads",  # from here on every loss is NaN
        lambda self, *a: {k: v * float("nan") for k, v in real(self, *a).items()},
    )
    capsys.readouterr()
    assert retinanet_cli.main(["train", "m.pth", *common, "--iters", "200"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        "retinanet: error: training diverged: 20 steps in a row with a non-finite loss or "
        "gradient (loss nan, gradient norm nan) at iteration 22;"
    ), err
    assert err.endswith("m.pth keeps its last finite weights; lower --lr or --clip-grad") and "\n" not in err
    after = checkpoint.load(str(tmp_path / "m.pth"))
    assert after["iteration"] == before["iteration"] == 2
    for k, v in after["state_dict"].items():
        assert torch.equal(v, before["state_dict"][k]), k


@pytest.mark.parametrize(
    "flags, head_norm",
    [
        ({"no_pretrained": True}, True),  # from scratch: GroupNorm towers (unnormalised ones diverge, TRAINING.md)
        ({}, False),  # ImageNet weights: plain towers, as in the paper
        ({"backbone_weights": "r50.pth"}, False),
        ({"no_pretrained": True, "head_norm": False}, False),  # --no-head-norm wins
        ({"head_norm": True}, True),
    ],
)
def test_head_towers_are_normalised_by_default_when_training_from_scratch(six, flags, head_norm):
    from retinanet.train import resolve_settings

    model_cfg, *_ = resolve_settings({"annotations": str(six / "ann.json"), **flags})
    assert model_cfg.head_norm is head_norm
    assert model_cfg.freeze_bn is not flags.get("no_pretrained", False)
