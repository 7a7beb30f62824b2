"""`retinanet train --compile`: the flag reaches the training step, a compiled run
trains like an eager one, and its checkpoint holds the plain model's keys."""

import math
import re

import pytest
import torch
from conftest import demo_subset, run_cli, save_model, tiny_model

from retinanet import checkpoint
from retinanet.model import RetinaNet


@pytest.fixture(scope="module")
def four(tmp_path_factory, demo_root):
    """4 demo training images (images/, ann.json) and tiny.pth, the tiny model whose
    architecture --fine-tune takes: a step in a fraction of a second."""
    root = tmp_path_factory.mktemp("four")
    demo_subset(demo_root, root, 4)
    save_model(tiny_model(), root / "tiny.pth")
    return root


def small(root) -> list[str]:
    return [
        *("--annotations", str(root / "ann.json"), "--images", str(root / "images")),
        *("--fine-tune", str(root / "tiny.pth"), "--backbone", "ResNet18FPN", "--batch", "2"),
        *("--resize", "96", "--max-size", "96", "--jitter", "96", "96", "--workers", "0", "--val-iters", "1000"),
    ]


def progress_losses(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(r"^\[\s*\d+/\d+\] loss (\S+)", stdout, re.M)]


def assert_plain_keys(path) -> None:
    """The checkpoint loads, strictly, into a freshly built model of its config."""
    state = checkpoint.load(str(path))
    plain = RetinaNet(state["config"])
    assert list(state["state_dict"]) == list(plain.state_dict())
    plain.load_state_dict(state["state_dict"])


class Counting(torch.nn.Module):
    """Stands in for the compiled module: holds the network as torch.compile's wrapper
    does (its state_dict keys would carry the `_orig_mod.` prefix) and counts calls."""

    def __init__(self, module):
        super().__init__()
        self._orig_mod = module
        self.calls = 0

    def forward(self, *args):
        self.calls += 1
        return self._orig_mod(*args)


@pytest.mark.parametrize("flag", [True, False])
def test_compile_flag_reaches_the_step_and_the_checkpoint_stays_plain(four, tmp_path, monkeypatch, one_thread, flag):
    from retinanet import cli
    from retinanet import train as train_module

    wrapped = []

    def fake_compile(module):
        wrapped.append(Counting(module))
        return wrapped[-1]

    monkeypatch.setattr(train_module, "compile_network", fake_compile)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "m.pth", *small(four), "--iters", "2", *(["--compile"] if flag else [])]) == 0
    if flag:
        assert len(wrapped) == 1 and isinstance(wrapped[0]._orig_mod, RetinaNet)
        assert wrapped[0].calls == 2  # every step's forward went through it
    else:
        assert wrapped == []
    assert_plain_keys(tmp_path / "m.pth")


@pytest.mark.slow
def test_compiled_training_on_the_cpu_matches_eager_and_saves_plain_keys(four, tmp_path):
    """Inductor's CPU backend: 1.5 min on 2 cores with a cold inductor cache, 15 s with a warm one."""
    env = {"OMP_NUM_THREADS": "1"}
    eager = run_cli("train", "eager.pth", *small(four), "--iters", "2", cwd=tmp_path, env=env)
    compiled = run_cli("train", "compiled.pth", *small(four), "--iters", "2", "--compile", cwd=tmp_path, env=env)
    want, got = progress_losses(eager.stdout), progress_losses(compiled.stdout)
    assert len(got) == 2 and all(map(math.isfinite, got)), compiled.stdout
    assert got == pytest.approx(want, rel=1e-3)
    assert_plain_keys(tmp_path / "compiled.pth")


@pytest.mark.gpu
def test_compiled_training_on_cuda_has_a_finite_loss_and_saves_plain_keys(four, tmp_path, capsys):
    from retinanet import train as train_module

    # One GPU in this process (the CLI would start one process per visible GPU).
    flags = {"annotations": str(four / "ann.json"), "images": str(four / "images"), "fine_tune": str(four / "tiny.pth")}
    flags.update(iters=3, batch=2, jitter=[96, 96], resize=96, max_size=96, workers=0)
    model_cfg, cfg, paths, pretrained = train_module.resolve_settings(flags)
    train_module.train(
        str(tmp_path / "m.pth"),
        model_cfg,
        cfg,
        paths,
        fine_tune=str(four / "tiny.pth"),
        pretrained=pretrained,
        device=torch.device("cuda"),
        compile=True,
    )
    out = capsys.readouterr().out
    losses = progress_losses(out)  # the first and the last step's, at least
    assert len(losses) >= 2 and all(map(math.isfinite, losses)), out
    assert checkpoint.load(str(tmp_path / "m.pth"))["iteration"] == 3
    assert_plain_keys(tmp_path / "m.pth")
