"""CLI behaviour without training: bad input gives one line, exit 2, no traceback."""

import json
import shutil

import pytest
import torch
from conftest import assert_user_error, run_cli


@pytest.mark.parametrize(
    "args, words",
    [
        (["train", "m.pth", "--batch", "0"], ["--batch", "must be >= 1"]),
        (["train", "m.pth", "--lr", "-1"], ["--lr", "must be > 0"]),
        (["train", "m.pth", "--backbone", "Nope"], ["--backbone", "invalid choice"]),
        (["train", "m.pth", "--anchor-ious", "0.6", "0.5", "--annotations", "x.json"], ["--anchor-ious"]),
        (["train", "m.pth", "--annotations", "missing.json"], ["missing.json", "not found"]),
        (["train", "m.pth", "--val-annotations", "v.json"], ["--val-annotations"]),
        (["infer", "nothing.pth"], ["nothing.pth", "checkpoint not found"]),
        (["infer", "model.onnx2"], ["model.onnx2"]),
    ],
)
def test_bad_flags_and_files(tmp_path, args, words):
    assert_user_error(run_cli(*args, cwd=tmp_path, check=False), *words)


def test_corrupt_checkpoint(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    assert_user_error(run_cli("infer", "bad.pth", cwd=tmp_path, check=False), "bad.pth", "not a readable checkpoint")


def test_checkpoint_of_other_class_count_is_refused_on_resume(tmp_path, tiny_pth, demo_root):
    shutil.copy(tiny_pth, tmp_path / "tiny.pth")  # the model to resume: a copy, should it be written
    doc = json.loads((demo_root / "train.json").read_text())
    doc["categories"] = doc["categories"][:2]
    doc["annotations"] = [a for a in doc["annotations"] if a["category_id"] in (1, 3)]
    (tmp_path / "two.json").write_text(json.dumps(doc))
    proc = run_cli(
        "train",
        "tiny.pth",
        "--annotations",
        "two.json",
        "--images",
        str(demo_root / "train"),
        "--backbone",
        "ResNet18FPN",
        "--no-pretrained",
        cwd=tmp_path,
        check=False,
    )
    assert_user_error(proc, "tiny.pth")


def test_missing_image_in_inference_names_file_and_record(tmp_path, tiny_pth):
    doc = {
        "images": [{"id": 4, "file_name": "gone.jpg"}],
        "annotations": [],
        "categories": [{"id": 1}, {"id": 3}, {"id": 7}],
    }
    (tmp_path / "a.json").write_text(json.dumps(doc))
    # Default --workers 2: the error is raised in a loader worker process.
    proc = run_cli("infer", tiny_pth, "--images", str(tmp_path), "--annotations", "a.json", cwd=tmp_path, check=False)
    assert_user_error(proc, "gone.jpg", "not found", "image id 4")
    (tmp_path / "gone.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    proc = run_cli(
        "infer",
        tiny_pth,
        "--images",
        str(tmp_path),
        "--annotations",
        "a.json",
        "--output",
        "b.json",
        cwd=tmp_path,
        check=False,
    )
    assert_user_error(proc, "gone.jpg", "cannot decode", "image id 4")


def test_evaluation_accepts_annotations_without_area_or_iscrowd(tmp_path):
    from retinanet.evaluate import coco_stats

    doc = {
        "images": [{"id": 1, "file_name": "a.jpg"}],
        "categories": [{"id": 2}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [10, 10, 20, 20]}],
    }
    (tmp_path / "a.json").write_text(json.dumps(doc))
    stats = coco_stats(
        str(tmp_path / "a.json"), [{"image_id": 1, "category_id": 2, "bbox": [10, 10, 20, 20], "score": 0.9}]
    )
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


def test_python_api_on_paths_arrays_and_tensors(tiny_pth, demo_root):
    import numpy as np
    from PIL import Image

    import retinanet

    det = retinanet.load(tiny_pth, device="cpu")
    path = demo_root / "val" / "val_00000.jpg"
    array = np.array(Image.open(path).convert("RGB"))
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    results = det([str(path), array, tensor, tensor.float() / 255])
    assert len(results[0].scores) >= 10
    for d in results[1:]:
        assert torch.equal(d.boxes, results[0].boxes) and torch.equal(d.scores, results[0].scores)
        assert torch.equal(d.category_ids, results[0].category_ids)
    single = det(array)  # batch 1: the CPU's convolutions may round otherwise than for 4 images
    assert isinstance(single, retinanet.Detections)
    assert torch.equal(single.boxes, det([array])[0].boxes) and len(single.scores) >= 10


def test_python_api_resizes_pads_and_maps_back_as_worked_by_hand(tiny_pth, demo_root):
    """A 100 x 128 image with resize 96, max size 160: scale min(96/100, 160/128) = 0.96,
    so 96 x 123 (122.88 rounded); padded to 96 x 128 (multiples of 32) with the mean colour; boxes
    back by 123/128 in x and 96/100 in y, clipped to 128 x 100."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    import retinanet

    det = retinanet.load(tiny_pth, device="cpu")
    array = np.array(Image.open(demo_root / "val" / "val_00003.jpg").convert("RGB"))[:100]
    got = det(array, resize=96, max_size=160)
    batch = torch.tensor([124, 116, 104], dtype=torch.uint8).view(1, 3, 1, 1).repeat(1, 1, 96, 128)
    batch[0, :, :96, :123] = F.resize(torch.from_numpy(array).permute(2, 0, 1), [96, 123], antialias=True)
    scores, boxes, classes = (t[0] for t in det.run(batch))
    keep = scores > 0
    want = boxes[keep] / torch.tensor([123 / 128, 96 / 100] * 2)
    want = torch.minimum(want.clamp(min=0), torch.tensor([128.0, 100.0] * 2))
    assert keep.sum() >= 10 and (boxes[keep][:, 2] > 123).any()  # some boxes reach into the padding
    torch.testing.assert_close(got.boxes, want)
    assert torch.equal(got.scores, scores[keep])
    assert got.category_ids.tolist() == [[1, 3, 7][c] for c in classes[keep].tolist()]
