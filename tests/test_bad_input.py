"""Through the CLI: every bad input ends in one line naming the file, record or
flag, exit status 2, no traceback (`--debug` shows it) and no file written."""

import json

import numpy as np
import pytest
from conftest import assert_user_error, run_cli, save_model, tiny_model
from PIL import Image


def good_doc():
    return {
        "images": [{"id": 5, "file_name": "a.jpg", "width": 100, "height": 80}],
        "annotations": [{"id": 1, "image_id": 5, "category_id": 9, "bbox": [10, 10, 20, 30]}],
        "categories": [{"id": 9}, {"id": 2}],
    }


def annotations(mutate):
    def write(tmp_path):
        doc = good_doc()
        mutate(doc)
        (tmp_path / "ann.json").write_text(json.dumps(doc))

    return write


def write_text(name, text):
    def write(tmp_path):
        (tmp_path / name).write_text(text)

    return write


def tiny_checkpoint(tmp_path):
    save_model(tiny_model(classes=2), tmp_path / "tiny.pth", ids=[2, 9])  # good_doc's categories
    (tmp_path / "ann.json").write_text(json.dumps({**good_doc(), "images": [{"id": 5, "file_name": "gone.jpg"}]}))
    (tmp_path / "exists.json").write_text("[]")


def nothing(tmp_path):
    pass


def box_beyond_the_decoded_image(tmp_path):
    """a.png is 60x40; its annotation gives no size and a box reaching x = 65."""
    tiny_checkpoint(tmp_path)
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "a.png")
    doc = {**good_doc(), "images": [{"id": 5, "file_name": "a.png"}]}
    doc["annotations"][0]["bbox"] = [45, 5, 20, 10]
    (tmp_path / "ann.json").write_text(json.dumps(doc))


def text_as_backbone_weights(tmp_path):
    annotations(lambda d: None)(tmp_path)
    Image.fromarray(np.zeros((80, 100, 3), np.uint8)).save(tmp_path / "a.jpg")
    (tmp_path / "w.pth").write_text("conv1.weight: 0.1\n")


TRAIN = ["train", "m.pth", "--annotations", "ann.json", "--no-pretrained", "--backbone", "ResNet18FPN"]

CASES = {
    "batch zero": (nothing, ["train", "m.pth", "--batch", "0"], {}, ["--batch", "must be >= 1"]),
    "negative lr": (nothing, ["train", "m.pth", "--lr", "-1"], {}, ["--lr", "must be > 0"]),
    "iters not a number": (nothing, ["train", "m.pth", "--iters", "ten"], {}, ["--iters", "expected an integer"]),
    "negative workers": (nothing, ["train", "m.pth", "--workers", "-1"], {}, ["--workers", "must be >= 0"]),
    "unknown backbone": (nothing, ["train", "m.pth", "--backbone", "Nope"], {}, ["--backbone", "invalid choice"]),
    "max-size below resize": (
        nothing,
        ["train", "m.pth", "--resize", "800", "--max-size", "600"],
        {},
        ["--max-size 600", "--resize 800"],
    ),
    "jitter reversed": (nothing, ["train", "m.pth", "--jitter", "900", "600"], {}, ["--jitter", "MIN"]),
    "anchor ious reversed": (nothing, ["train", "m.pth", "--anchor-ious", "0.6", "0.5"], {}, ["--anchor-ious"]),
    "val without train annotations": (
        nothing,
        ["train", "m.pth", "--val-annotations", "v.json"],
        {},
        ["--val-annotations"],
    ),
    "annotations missing": (nothing, TRAIN, {}, ["ann.json", "not found"]),
    "annotations not JSON": (write_text("ann.json", "{oops"), TRAIN, {}, ["ann.json", "not valid JSON"]),
    "annotations missing key": (
        annotations(lambda d: d.pop("categories")),
        TRAIN,
        {},
        ["ann.json", "missing required key 'categories'"],
    ),
    "image id a string": (
        annotations(lambda d: d["images"][0].update(id="5")),
        TRAIN,
        {},
        ["ann.json", "images[0]", 'id must be an integer, got "5"'],
    ),
    "no categories": (
        annotations(lambda d: (d["categories"].clear(), d["annotations"].clear())),
        TRAIN,
        {},
        ["ann.json", "categories is empty"],
    ),
    "backbone weights not a torch file": (
        text_as_backbone_weights,
        TRAIN + ["--batch", "1", "--backbone-weights", "w.pth"],
        {},
        ["w.pth", "not a readable backbone weights file", "not a torch.save file"],
    ),
    "bbox width zero": (
        annotations(lambda d: d["annotations"][0].update(bbox=[1, 1, 0, 5])),
        TRAIN,
        {},
        ["ann.json", "annotations[0]", "(id 1)", "width or height <= 0"],
    ),
    "bbox outside image": (
        annotations(lambda d: d["annotations"][0].update(bbox=[90, 10, 20, 5])),
        TRAIN,
        {},
        ["ann.json", "annotations[0]", "outside image 5"],
    ),
    "unknown category": (
        annotations(lambda d: d["annotations"][0].update(category_id=77)),
        TRAIN,
        {},
        ["ann.json", "annotations[0]", "unknown category_id 77"],
    ),
    "unknown image id": (
        annotations(lambda d: d["annotations"][0].update(image_id=6)),
        TRAIN,
        {},
        ["ann.json", "annotations[0]", "unknown image_id 6"],
    ),
    "batch not divisible by world": (
        annotations(lambda d: None),
        TRAIN + ["--batch", "3"],
        {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"},
        ["--batch 3", "2 processes"],
    ),
    "checkpoint missing": (nothing, ["infer", "nothing.pth"], {}, ["nothing.pth", "checkpoint not found"]),
    "checkpoint corrupt": (
        write_text("bad.pth", "garbage"),
        ["infer", "bad.pth"],
        {},
        ["bad.pth", "not a readable checkpoint"],
    ),
    "unknown model format": (nothing, ["infer", "model.onnx2"], {}, ["model.onnx2", "unknown model format"]),
    "image missing in inference": (
        tiny_checkpoint,
        ["infer", "tiny.pth", "--annotations", "ann.json", "--workers", "0"],
        {},
        ["gone.jpg", "not found", "image id 5"],
    ),
    "box beyond the decoded image": (
        box_beyond_the_decoded_image,
        ["infer", "tiny.pth", "--annotations", "ann.json", "--workers", "1"],
        {},
        [
            "ann.json",
            "annotations[0] (id 1)",
            "bbox [45.0, 5.0, 20.0, 10.0]",
            "outside image 5",
            "60x40 as decoded from",
            "a.png",
        ],
    ),
    "box beyond the decoded image in training": (
        box_beyond_the_decoded_image,
        TRAIN + ["--batch", "1", "--workers", "1", "--iters", "2"],
        {},
        ["ann.json", "annotations[0] (id 1)", "outside image 5", "60x40 as decoded from", "a.png"],
    ),
    "output exists": (
        tiny_checkpoint,
        ["infer", "tiny.pth", "--annotations", "ann.json", "--output", "exists.json"],
        {},
        ["exists.json", "--override"],
    ),
    "export size count": (
        tiny_checkpoint,
        ["export", "tiny.pth", "o.onnx", "--size", "128", "128", "128"],
        {},
        ["--size"],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_naming_it(tmp_path, name):
    setup, args, env, words = CASES[name]
    setup(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run_cli(*args, cwd=tmp_path, env=env, check=False)
    assert_user_error(proc, *words)
    # Refused before any work: no model, detections or export, not even a temp file.
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_debug_flag_shows_the_traceback(tmp_path):
    proc = run_cli("--debug", "train", *TRAIN[1:], cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ann.json" in proc.stderr
