"""CLI behaviour without training: bad input gives one line, exit 2, no traceback."""
import json
import subprocess
import sys

import pytest
import torch
from conftest import assert_user_error

from retinanet import checkpoint
from retinanet.config import ModelConfig
from retinanet.model import RetinaNet


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "retinanet", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    cfg = ModelConfig(backbone="ResNet18FPN", classes=3, channels=32, resize=128, max_size=128, freeze_bn=False)
    torch.manual_seed(0)
    path = tmp_path / "tiny.pth"
    checkpoint.save(str(path), checkpoint.model_state(cfg, RetinaNet(cfg), [1, 3, 7]))
    return path


@pytest.mark.parametrize("args, words", [
    (["train", "m.pth", "--batch", "0"], ["--batch", "must be >= 1"]),
    (["train", "m.pth", "--lr", "-1"], ["--lr", "must be > 0"]),
    (["train", "m.pth", "--backbone", "Nope"], ["--backbone", "invalid choice"]),
    (["train", "m.pth", "--anchor-ious", "0.6", "0.5", "--annotations", "x.json"], ["--anchor-ious"]),
    (["train", "m.pth", "--annotations", "missing.json"], ["missing.json", "not found"]),
    (["train", "m.pth", "--val-annotations", "v.json"], ["--val-annotations"]),
    (["infer", "nothing.pth"], ["nothing.pth", "checkpoint not found"]),
    (["infer", "model.onnx2"], ["model.onnx2"]),
])
def test_bad_flags_and_files(tmp_path, args, words):
    assert_user_error(cli(*args, cwd=tmp_path), *words)


def test_corrupt_checkpoint(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    assert_user_error(cli("infer", "bad.pth", cwd=tmp_path), "bad.pth", "not a readable checkpoint")


def test_checkpoint_of_other_class_count_is_refused_on_resume(tmp_path, tiny_checkpoint, demo_root):
    doc = json.loads((demo_root / "train.json").read_text())
    doc["categories"] = doc["categories"][:2]
    doc["annotations"] = [a for a in doc["annotations"] if a["category_id"] in (1, 3)]
    (tmp_path / "two.json").write_text(json.dumps(doc))
    proc = cli("train", str(tiny_checkpoint), "--annotations", "two.json", "--images", str(demo_root / "train"),
               "--backbone", "ResNet18FPN", "--no-pretrained", cwd=tmp_path)
    assert_user_error(proc, "tiny.pth")


def test_missing_image_in_inference_names_file_and_record(tmp_path, tiny_checkpoint):
    doc = {"images": [{"id": 4, "file_name": "gone.jpg"}], "annotations": [],
           "categories": [{"id": 1}, {"id": 3}, {"id": 7}]}
    (tmp_path / "a.json").write_text(json.dumps(doc))
    # Default --workers 2: the error is raised in a loader worker process.
    proc = cli("infer", str(tiny_checkpoint), "--images", str(tmp_path), "--annotations", "a.json", cwd=tmp_path)
    assert_user_error(proc, "gone.jpg", "not found", "image id 4")
    (tmp_path / "gone.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    proc = cli("infer", str(tiny_checkpoint), "--images", str(tmp_path), "--annotations", "a.json",
               "--output", "b.json", cwd=tmp_path)
    assert_user_error(proc, "gone.jpg", "cannot decode", "image id 4")


def test_evaluation_accepts_annotations_without_area_or_iscrowd(tmp_path):
    from retinanet.evaluate import coco_stats

    doc = {"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 2}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [10, 10, 20, 20]}]}
    (tmp_path / "a.json").write_text(json.dumps(doc))
    stats = coco_stats(str(tmp_path / "a.json"), [{"image_id": 1, "category_id": 2, "bbox": [10, 10, 20, 20],
                                                   "score": 0.9}])
    assert stats[0] == pytest.approx(1.0)


def test_pretrained_weights_unavailable_names_both_ways_out(monkeypatch):
    from torchvision.models import ResNet18_Weights

    from retinanet.errors import UserError
    from retinanet.model import backbones

    def offline(self, *a, **k):
        raise OSError("no network")

    monkeypatch.setattr(ResNet18_Weights, "get_state_dict", offline)
    with pytest.raises(UserError) as e:
        backbones.build("ResNet18FPN", pretrained=True)
    assert "--backbone-weights" in str(e.value) and "--no-pretrained" in str(e.value)


def test_backbone_weights_file_is_loaded(tmp_path):
    from torchvision.models import resnet18

    from retinanet.model import backbones

    torch.manual_seed(3)
    net = resnet18(weights=None)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    bb = backbones.build("ResNet18FPN", weights_file=str(tmp_path / "r18.pth"))
    torch.testing.assert_close(bb.stem[0].weight, net.conv1.weight)
    # BatchNorm frozen on trained weights: no parameters, same output in train and eval.
    assert not any("bn" in n or "stem.1" in n for n, _ in bb.named_parameters())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out_train = bb.train()(x)
        out_eval = bb.eval()(x)
    for a, b in zip(out_train, out_eval):
        torch.testing.assert_close(a, b)


def test_python_api_on_paths_arrays_and_tensors(tiny_checkpoint, demo_root):
    import numpy as np
    from PIL import Image

    import retinanet

    det = retinanet.load(str(tiny_checkpoint), device="cpu")
    path = demo_root / "val" / "val_00000.jpg"
    array = np.asarray(Image.open(path).convert("RGB"))
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    a, b, c = det([str(path), array, tensor])
    for d in (a, b, c):
        assert d.boxes.shape[1] == 4 and d.scores.shape == d.category_ids.shape
    torch.testing.assert_close(a.boxes, b.boxes)
    torch.testing.assert_close(b.scores, c.scores)
    single = det(array)
    assert isinstance(single, retinanet.Detections)
