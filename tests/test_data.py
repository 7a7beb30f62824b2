"""COCO loading, validation errors, transforms and collate."""

import json

import pytest
import torch

from retinanet.config import LABEL_CROWD, LABEL_PAD
from retinanet.data import transforms as T
from retinanet.data.batch import Collate
from retinanet.data.coco import CocoAnnotations, DetectionDataset
from retinanet.errors import UserError


def write(tmp_path, doc, name="ann.json"):
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return str(p)


def base_doc():
    return {
        "images": [{"id": 5, "file_name": "a.jpg", "width": 100, "height": 80}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 9, "bbox": [10, 10, 20, 30]},
            {"id": 2, "image_id": 5, "category_id": 2, "bbox": [0, 0, 50, 50], "iscrowd": 1},
        ],
        "categories": [{"id": 9}, {"id": 2}],
    }


def test_category_ids_map_to_sorted_contiguous_labels_and_crowd(tmp_path):
    ann = CocoAnnotations(write(tmp_path, base_doc()))
    assert ann.category_ids == [2, 9]
    rec = ann.images[0]
    assert rec.labels == [1, LABEL_CROWD]
    assert rec.boxes[0] == [10, 10, 30, 40]


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda d: d.pop("categories"), ["missing required key 'categories'"]),
        (lambda d: d["annotations"][0].pop("bbox"), ["annotations[0]", "(id 1)", "'bbox'"]),
        (lambda d: d["annotations"][0].update(bbox=[1, 1, 0, 5]), ["annotations[0]", "width or height <= 0"]),
        (lambda d: d["annotations"][0].update(bbox=[90, 10, 20, 5]), ["annotations[0]", "outside image 5"]),
        (lambda d: d["annotations"][0].update(category_id=77), ["annotations[0]", "unknown category_id 77"]),
        (lambda d: d["annotations"][0].update(image_id=6), ["annotations[0]", "unknown image_id 6"]),
        (lambda d: d["images"].append({"id": 5, "file_name": "b.jpg"}), ["images[1]", "duplicate image id 5"]),
        (lambda d: d["annotations"][1].update(bbox="x"), ["annotations[1]", "4 finite numbers"]),
    ],
)
def test_bad_annotations_name_file_and_record(tmp_path, mutate, words):
    doc = base_doc()
    mutate(doc)
    with pytest.raises(UserError) as e:
        CocoAnnotations(write(tmp_path, doc))
    assert "ann.json" in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_unreadable_json(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text("{not json")
    with pytest.raises(UserError, match="broken.json: not valid JSON"):
        CocoAnnotations(str(p))


def test_resize_keeps_aspect_and_caps_longer_side():
    assert T.resized_shape(480, 640, 800, 1333) == (800, 1067)
    assert T.resized_shape(400, 2000, 800, 1333) == (267, 1333)


def test_flip_and_rotate_move_boxes_with_pixels():
    img = torch.zeros(3, 20, 30, dtype=torch.uint8)
    img[:, 2:6, 4:10] = 255  # rows 2..5, cols 4..9
    targets = torch.tensor([[4.0, 2.0, 10.0, 6.0, 1.0]])
    # Shorter side 20 = no resize: only the flip / rotation moves pixels and boxes.
    for g in (T.Geometry(20, flip=True), *(T.Geometry(20, quarter_turns=k) for k in range(4))):
        out = T.transform_image(img, g, 1000)
        ot, size, _ = T.transform_targets(targets, g, 20, 30, 1000)
        assert tuple(out.shape[-2:]) == size
        x1, y1, x2, y2 = ot[0, :4].int().tolist()
        assert out[0, y1:y2, x1:x2].min() == 255 and out[0].sum() == 255 * 24


def test_collate_pads_to_multiple_with_mean_and_pads_targets(tmp_path, demo_root):
    ann = CocoAnnotations(str(demo_root / "train.json"))
    ds = DetectionDataset(str(demo_root / "train"), ann, resize=100, max_size=100)
    batch = Collate(128, (124, 116, 104))([ds[0], ds[1], ds[2]])
    assert batch.images.shape == (3, 3, 128, 128) and batch.images.dtype == torch.uint8
    assert batch.images[0, :, 120, 120].tolist() == [124, 116, 104]
    counts = [len(ann.images[i].boxes) for i in range(3)]
    assert batch.targets.shape[1] == max(counts)
    for i, c in enumerate(counts):
        assert (batch.targets[i, c:, 4] == LABEL_PAD).all()
        torch.testing.assert_close(
            batch.targets[i, :c, :4], torch.tensor(ann.images[i].boxes).reshape(-1, 4) * 100 / 128
        )


def test_corrupt_image_skipped_in_training_error_in_inference(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"not a jpeg")
    ann = CocoAnnotations(write(tmp_path, base_doc()))
    train = DetectionDataset(str(tmp_path), ann, 64, 64, training=True, jitter=(64, 64))
    with pytest.warns(UserWarning, match="a.jpg"):
        assert train[0] is None
    assert Collate(128, (0, 0, 0))([None]).skipped == 1
    # Inference: the error travels back from the loader worker as a message.
    message = DetectionDataset(str(tmp_path), ann, 64, 64)[0]
    assert "a.jpg: cannot decode image" in message and "image id 5" in message
    assert Collate(128, (0, 0, 0))([message]).errors == [message]
