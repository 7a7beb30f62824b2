"""Exact resume, crash-safe checkpoints, DDP (gloo, torchrun) equivalence,
sharded inference and TensorBoard scalars, on a tiny copy of the demo data
(conftest.tiny_demo_env: 8 train and 4 val images)."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN, run_cli, save_model, tiny_model

from retinanet import checkpoint


def weights(path):
    return checkpoint.load(str(path))["state_dict"]


COMMON = ["--batch", "2", "--seed", "3", "--val-iters", "1000", "--augment-rotate", "--augment-brightness"]


def test_resume_gives_the_same_weights_as_a_straight_run(tmp_path, tiny_demo_env):
    run_cli("train", "straight.pth", "--iters", "6", "--workers", "0", *COMMON, cwd=tmp_path, env=tiny_demo_env)
    run_cli("train", "resumed.pth", "--iters", "3", "--workers", "2", *COMMON, cwd=tmp_path, env=tiny_demo_env)
    # The second half runs with other loader workers; augmentation draws depend on (seed, epoch, index) only.
    proc = run_cli("train", "resumed.pth", "--iters", "6", "--workers", "0", *COMMON, cwd=tmp_path, env=tiny_demo_env)
    assert "resuming resumed.pth at iteration 3" in proc.stdout
    state = checkpoint.load(str(tmp_path / "resumed.pth"))
    assert state["iteration"] == 6 and state["data_state"]["epoch"] == 1  # 8 images / batch 2: epoch 0 is 4 iters
    a, b = weights(tmp_path / "straight.pth"), weights(tmp_path / "resumed.pth")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-exact on the CPU


WRITER = """
import sys, torch
from retinanet import checkpoint
state = checkpoint.load(sys.argv[1])
state["config"] = state["config"].to_dict()
state["padding"] = torch.zeros(8_000_000)  # ~32 MB: a write takes a while
i = state["iteration"]
print("ready", flush=True)
while True:
    i += 1
    state["iteration"] = i
    checkpoint.save(sys.argv[1], state)
"""


def test_sigkill_while_writing_leaves_a_loadable_resumable_checkpoint(tmp_path, tiny_demo_env):
    run_cli("train", "m.pth", "--iters", "1", "--workers", "0", *COMMON, cwd=tmp_path, env=tiny_demo_env)
    path = str(tmp_path / "m.pth")
    rng = random.Random(0)
    last = 1
    for _ in range(6):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, path], env={**os.environ, **tiny_demo_env}, stdout=subprocess.PIPE, text=True
        )
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 1.0))  # somewhere inside some write
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
        state = checkpoint.load(path)
        assert state["iteration"] >= last
        last = state["iteration"]
    assert last > 1  # some writes completed between the kills
    # Leftover temp files of killed writes never shadow the checkpoint; resume from it.
    proc = run_cli(
        "train", "m.pth", "--iters", str(last + 1), "--workers", "0", *COMMON, cwd=tmp_path, env=tiny_demo_env
    )
    assert f"resuming m.pth at iteration {last}" in proc.stdout
    assert checkpoint.load(path)["iteration"] == last + 1


def scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def random_backbone(tmp_path):
    """ImageNet-style weights file: in the demo it freezes BatchNorm, so the
    per-rank batches normalise exactly like the global one."""
    from torchvision.models import resnet18

    torch.manual_seed(5)
    torch.save(resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    return str(tmp_path / "r18.pth")


def test_two_process_gloo_matches_one_process_and_tensorboard_has_scalars(tmp_path, tiny_demo_env):
    flags = [
        "--iters",
        "3",
        "--batch",
        "4",
        "--seed",
        "1",
        "--val-iters",
        "1000",
        "--workers",
        "0",
        "--jitter",
        "128",
        "128",
        "--backbone-weights",
        random_backbone(tmp_path),
    ]
    run_cli("train", "one.pth", *flags, "--logdir", "tb1", cwd=tmp_path, env=tiny_demo_env)
    proc = torchrun("train", "two.pth", *flags, "--logdir", "tb2", cwd=tmp_path, env=tiny_demo_env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("saved two.pth") == 1  # only rank 0 logs
    # Two "nodes" on localhost: one launcher each, one rendezvous (the multi-node path).
    port = str(_port())
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(n),
                "--nproc-per-node",
                "1",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                port,
                "-m",
                "retinanet",
                "train",
                "nodes.pth",
                *flags,
            ],
            cwd=tmp_path,
            env={**os.environ, **tiny_demo_env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in (0, 1)
    ]
    outs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs
    assert "saved nodes.pth at iteration 3" in outs[0][0]
    one, two = scalars(tmp_path / "tb1"), scalars(tmp_path / "tb2")
    for tag in ("train/loss", "train/cls_loss", "train/box_loss"):
        assert len(one[tag]) == 3
        torch.testing.assert_close(torch.tensor(two[tag]), torch.tensor(one[tag]), rtol=2e-3, atol=1e-4)
    # TensorBoard: loss terms, lr, img/s and the 12 COCO stats of the final validation.
    assert {"train/lr", "train/img_per_s"} <= one.keys()
    assert len([t for t in one if t.startswith("val/")]) == 12
    assert len([t for t in two if t.startswith("val/")]) == 12  # sharded validation, gathered
    a, b, c = (weights(tmp_path / f"{name}.pth") for name in ("one", "two", "nodes"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(c[k], b[k], rtol=1e-5, atol=1e-6)  # the same two ranks, however launched


def torchrun(*args: str, cwd, env: dict, timeout: int) -> subprocess.CompletedProcess:
    """`retinanet ARGS` in two processes on this machine under torchrun; env is added to os.environ."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_port())]
    return subprocess.run(
        [*command, "-m", "retinanet", *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _port():
    from retinanet.distributed import free_port

    return free_port()


def test_sharded_inference_returns_every_image_once(tmp_path, tiny_demo_env):
    # Every candidate is kept and each image has exactly 5 detections: a lost or doubled image shows.
    save_model(tiny_model(score_threshold=0.0, top_n=5, detections=5), tmp_path / "t.pth")
    root = os.path.join(tiny_demo_env["RETINANET_CACHE"], "demo-v2")
    args = [
        "infer",
        "t.pth",
        "--images",
        os.path.join(root, "val"),
        "--annotations",
        os.path.join(root, "val.json"),
        "--batch",
        "1",
        "--workers",
        "0",
    ]
    run_cli(*args, "--output", "one.json", cwd=tmp_path, env=tiny_demo_env)
    proc = torchrun(*args, "--output", "two.json", cwd=tmp_path, env=tiny_demo_env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    ids = [im["id"] for im in json.loads(Path(root, "val.json").read_text())["images"]]
    for records in (one, two):
        per_image = {i: sum(r["image_id"] == i for r in records) for i in ids}
        assert per_image == {i: 5 for i in ids}, per_image  # every image, each exactly once

    def key(r):
        return (r["image_id"], r["category_id"], r["score"], r["bbox"])

    assert len(one) == len(two)
    for r1, r2 in zip(sorted(one, key=key), sorted(two, key=key)):
        assert r1["image_id"] == r2["image_id"] and r1["category_id"] == r2["category_id"]
        assert r1["score"] == pytest.approx(r2["score"], abs=1e-4)


def test_corrupt_jpeg_in_training_is_skipped_warned_and_counted(tmp_path, tiny_demo_env):
    from retinanet.data import demo

    cache = tmp_path / "cache"
    shutil.copytree(
        os.path.join(tiny_demo_env["RETINANET_CACHE"], f"demo-v{demo.VERSION}"), cache / f"demo-v{demo.VERSION}"
    )
    victim = cache / f"demo-v{demo.VERSION}" / "train" / "train_00002.jpg"
    victim.write_bytes(victim.read_bytes()[:200])  # truncated JPEG
    proc = run_cli(
        "train",
        "c.pth",
        "--iters",
        "4",
        "--workers",
        "0",
        "--batch",
        "2",
        "--val-iters",
        "1000",
        cwd=tmp_path,
        env={**tiny_demo_env, "RETINANET_CACHE": str(cache)},
    )
    assert "train_00002.jpg" in proc.stderr and "skipping" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "skipped 1" in proc.stdout


GROUP = """
import os, sys, time
import torch
from retinanet import distributed
from retinanet.errors import UserError

rank, mode = int(sys.argv[1]), sys.argv[2]
place = distributed.Place(rank, 2, rank)
distributed.init(place, torch.device("cpu"), init_method=f"tcp://127.0.0.1:{sys.argv[3]}", timeout_s=float(sys.argv[4]))
if mode == "error":
    try:
        distributed.raise_first_error(UserError("bad record in b.json") if rank == 1 else None)
    except UserError as e:
        print(f"rank {rank} raised: {e}", flush=True)
elif mode == "timeout":
    if rank == 1:
        time.sleep(60)  # a lost rank
    start = time.perf_counter()
    try:
        distributed.barrier()
    except Exception as e:
        print(f"rank {rank} gave up after {time.perf_counter() - start:.0f} s: {type(e).__name__}", flush=True)
        os._exit(3)
"""


def _pair(mode, timeout_s):
    port = _port()
    return [
        subprocess.Popen(
            [sys.executable, "-c", GROUP, str(r), mode, str(port), str(timeout_s)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]


def test_an_error_of_one_rank_is_raised_on_every_rank_with_its_rank():
    outs = [p.communicate(timeout=120)[0] for p in _pair("error", 60)]
    assert outs == ["rank 0 raised: [rank 1] bad record in b.json\n", "rank 1 raised: [rank 1] bad record in b.json\n"]


def test_the_process_group_timeout_is_the_one_given():
    rank0, rank1 = _pair("timeout", 4)
    out, err = rank0.communicate(timeout=50)  # the default (30 min) would hang here
    rank1.kill()
    rank1.communicate()
    assert rank0.returncode == 3, out + err
    waited = int(out.split("after ")[1].split(" s")[0])
    assert 2 <= waited <= 30, out


def test_a_data_error_on_one_rank_ends_the_job_with_one_line(tmp_path, tiny_demo_env):
    root = Path(tiny_demo_env["RETINANET_CACHE"]) / "demo-v2"
    doc = json.loads((root / "train.json").read_text())
    for im in doc["images"]:  # sizes unknown until decoded: the check runs in the loader of one rank
        im.pop("width", None)
        im.pop("height", None)
    victim = doc["images"][5]
    bad = next(a for a in doc["annotations"] if a["image_id"] == victim["id"])
    bad["bbox"] = [10, 10, 5000, 20]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    proc = torchrun(
        "train",
        "m.pth",
        "--annotations",
        "bad.json",
        "--images",
        str(root / "train"),
        "--batch",
        "2",
        "--iters",
        "8",
        *TINY_TRAIN,
        cwd=tmp_path,
        env=tiny_demo_env,
        timeout=300,
    )
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("retinanet: error:")]
    assert len(ours) == 1, proc.stderr
    assert ours[0].startswith("retinanet: error: [rank ") and victim["file_name"] in ours[0], ours[0]
    assert not (tmp_path / "m.pth").exists()
