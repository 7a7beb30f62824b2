"""retinanet convert on bad input: one line naming the file and what was expected, exit 2,
and nothing written (an existing OUTPUT is left as it was)."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import detection

from retinanet.cli import main


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    files = {
        "faster_rcnn": detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None),
        "fcos": detection.fcos_resnet50_fpn(weights=None, weights_backbone=None),
        "retinanet": detection.retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None),
    }
    for name, model in files.items():
        torch.save(model.state_dict(), folder / f"{name}.pth")
    torch.save({"weights": torch.zeros(3)}, folder / "unrelated.pth")
    (folder / "notes.txt").write_text("not a checkpoint\n")
    data = (folder / "retinanet.pth").read_bytes()
    (folder / "truncated.pth").write_bytes(data[: len(data) // 3])
    return folder


def run(capsys, *args) -> str:
    """The one error line of `retinanet convert ARGS`, which must exit 2."""
    assert main(["convert", *map(str, args)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    "source, words",
    [
        ("faster_rcnn.pth", ["faster_rcnn.pth", "two-stage detector", "RetinaNets"]),
        ("fcos.pth", ["fcos.pth", "FCOS", "RetinaNets"]),
        ("unrelated.pth", ["unrelated.pth", "torchvision RetinaNet state dict", "ODTK checkpoint"]),
        ("notes.txt", ["notes.txt", "not a readable source checkpoint"]),
        ("truncated.pth", ["truncated.pth", "truncated"]),
        ("missing.pth", ["missing.pth", "not found"]),
    ],
)
def test_bad_sources_are_named_with_what_was_expected(sources, tmp_path, capsys, source, words):
    line = run(capsys, sources / source, tmp_path / "out.pth")
    for w in words:
        assert w in line, line
    assert not (tmp_path / "out.pth").exists()


def test_unknown_and_mismatched_formats(sources, tmp_path, capsys):
    line = run(capsys, sources / "retinanet.pth", tmp_path / "out.pth", "--format", "yolo")
    assert "--format yolo" in line and "torchvision-v1, torchvision-v2, odtk" in line
    line = run(capsys, sources / "retinanet.pth", tmp_path / "out.pth", "--format", "torchvision-v1")
    assert "retinanet.pth" in line and "torchvision-v2" in line
    line = run(capsys, sources / "retinanet.pth", tmp_path / "out.pth", "--format", "odtk")
    assert "retinanet.pth" in line and "not an ODTK checkpoint" in line
    assert not (tmp_path / "out.pth").exists()


def test_existing_output_needs_override(sources, tmp_path, capsys):
    out = tmp_path / "out.pth"
    out.write_bytes(b"the user's file")
    line = run(capsys, sources / "retinanet.pth", out)
    assert str(out) in line and "--override" in line
    assert out.read_bytes() == b"the user's file"
    assert main(["convert", str(sources / "retinanet.pth"), str(out), "--override"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert torch.load(out, weights_only=True)["converted_from"]["format"] == "torchvision-v2"


def test_a_retinanet_checkpoint_is_not_converted_again(sources, tmp_path, capsys):
    assert main(["convert", str(sources / "retinanet.pth"), str(tmp_path / "ours.pth")]) == 0
    line = run(capsys, tmp_path / "ours.pth", tmp_path / "again.pth")
    assert "ours.pth" in line and "already a retinanet checkpoint" in line


def test_torchvision_name_without_cache_or_network(tmp_path, capsys, monkeypatch):
    """No cached file and no network: one line naming both ways out."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    from torchvision.models._api import WeightsEnum

    def offline(self, *args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    line = run(capsys, "torchvision:retinanet_resnet50_fpn_v2", tmp_path / "out.pth")
    assert "retinanet_resnet50_fpn_v2_coco" in line and "hub cache" in line and "SOURCE" in line
    line = run(capsys, "torchvision:retinanet_resnet999", tmp_path / "out.pth")
    assert "unknown torchvision model" in line and "retinanet_resnet50_fpn_v2" in line


def test_forced_format_and_damaged_checkpoints(sources, tmp_path, capsys):
    """--format does not make another detector convertible; a checkpoint with its parts of the
    wrong kind gets a line, not a traceback."""
    line = run(capsys, sources / "fcos.pth", tmp_path / "out.pth", "--format", "torchvision-v1")
    assert "fcos.pth" in line and "FCOS" in line
    damaged = {"backbone": ["ResNet18FPN"], "classes": "many", "ratios": [1.0], "scales": [4.0]}
    torch.save({**damaged, "state_dict": {"cls_head.8.weight": torch.zeros(1)}}, tmp_path / "odtk.pth")
    line = run(capsys, tmp_path / "odtk.pth", tmp_path / "out.pth")
    assert "odtk.pth" in line and "incomplete or damaged odtk checkpoint" in line
    assert not (tmp_path / "out.pth").exists()
