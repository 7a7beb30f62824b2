"""Wrong data fails in one line naming it, and images load as they are displayed.

Annotation ids must be integers and categories non-empty; an image's decoded
size must agree with its annotation (width/height, boxes); EXIF orientation,
16-bit greyscale, transparency and the pixel limit are handled the same way
by every loader; a bad --backbone-weights file is one line.
"""

import io
import json
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from retinanet import images as C
from retinanet.data import transforms as T
from retinanet.data.batch import Collate, Sample
from retinanet.data.coco import CocoAnnotations, DetectionDataset
from retinanet.errors import UserError
from retinanet.images import CorruptImage, read_image

FILL = (124, 116, 104)  # the mean pixel of the default normalisation


def write_json(folder, doc, name="ann.json"):
    path = folder / name
    path.write_text(json.dumps(doc))
    return str(path)


def one_image_doc(**image):
    """Image 5 (fields from `image`) with one box of category 9 (label 1)."""
    return {
        "images": [{"id": 5, "file_name": "a.png", **image}],
        "annotations": [{"id": 1, "image_id": 5, "category_id": 9, "bbox": [10, 10, 20, 30]}],
        "categories": [{"id": 9}, {"id": 2}],
    }


# --- ids and categories ---------------------------------------------------


@pytest.mark.parametrize("value", [1.5, "abc", True, None, "5", 5.0])
@pytest.mark.parametrize(
    "record, key, set_value",
    [
        ("images[0]", "id", lambda d, v: d["images"][0].update(id=v)),
        ("categories[0]", "id", lambda d, v: d["categories"][0].update(id=v)),
        ("annotations[0] (id 1)", "image_id", lambda d, v: d["annotations"][0].update(image_id=v)),
        ("annotations[0] (id 1)", "category_id", lambda d, v: d["annotations"][0].update(category_id=v)),
    ],
    ids=["image", "category", "annotation-image", "annotation-category"],
)
def test_a_non_integer_id_is_refused_naming_the_record(tmp_path, value, record, key, set_value):
    doc = one_image_doc()
    set_value(doc, value)
    with pytest.raises(UserError) as e:
        CocoAnnotations(write_json(tmp_path, doc))
    assert str(e.value) == f"ann.json: {record}: {key} must be an integer, got {json.dumps(value)}"


def test_string_id_next_to_the_same_integer_is_not_a_second_image(tmp_path):
    doc = one_image_doc()
    doc["images"].append({"id": "5", "file_name": "b.png"})
    with pytest.raises(UserError) as e:
        CocoAnnotations(write_json(tmp_path, doc))
    assert str(e.value) == 'ann.json: images[1]: id must be an integer, got "5"'


def test_no_categories_is_an_error_at_load(tmp_path):
    doc = one_image_doc()
    doc["categories"], doc["annotations"] = [], []
    with pytest.raises(UserError) as e:
        CocoAnnotations(write_json(tmp_path, doc))
    assert str(e.value) == "ann.json: categories is empty; a detector needs at least one category"


@pytest.mark.parametrize("value", ["100", -3, 0, 12.5, True])
def test_image_width_must_be_a_positive_integer(tmp_path, value):
    with pytest.raises(UserError) as e:
        CocoAnnotations(write_json(tmp_path, one_image_doc(width=value, height=80)))
    assert str(e.value) == f"ann.json: images[0]: width must be a positive integer, got {json.dumps(value)}"


# --- decoded size against the annotations -------------------------------------


def save_png(folder, name, height, width, value=40):
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(folder / name)
    return str(folder / name)


def datasets(folder, ann):
    """The same records through a training and an inference dataset (native size)."""
    return (
        DetectionDataset(str(folder), ann, 40, 1000, training=True, jitter=(40, 40)),
        DetectionDataset(str(folder), ann, 40, 1000),
    )


@pytest.mark.parametrize(
    "image, bbox, message",
    [
        (
            {},
            [45, 5, 20, 10],
            "ann.json: annotations[0] (id 1): bbox [45.0, 5.0, 20.0, 10.0] lies outside image 5 "
            "(60x40 as decoded from {path})",
        ),
        (
            {},
            [5, -3, 20, 10],
            "ann.json: annotations[0] (id 1): bbox [5.0, -3.0, 20.0, 10.0] lies outside image 5 "
            "(60x40 as decoded from {path})",
        ),
        (
            {"width": 100, "height": 80},
            [10, 10, 20, 30],
            "ann.json: image 5 ({path}) has width 100, height 80 in the annotations but decodes to 60x40 "
            "(width x height, after its EXIF orientation)",
        ),
        (
            {"height": 60},
            [10, 10, 20, 30],
            "ann.json: image 5 ({path}) has height 60 in the annotations but decodes to 60x40 "
            "(width x height, after its EXIF orientation)",
        ),
    ],
    ids=["box-right", "box-above", "size", "height-only"],
)
def test_image_disagreeing_with_its_annotation_is_a_data_error_in_training_and_inference(
    tmp_path, image, bbox, message
):
    path = save_png(tmp_path, "a.png", 40, 60)
    doc = one_image_doc(**image)
    doc["annotations"][0]["bbox"] = bbox
    ann = CocoAnnotations(write_json(tmp_path, doc))
    expected = message.format(path=path)
    for ds in datasets(tmp_path, ann):
        assert ds[0] == expected
    # Out of a loader worker it arrives as a message in the batch, not a traceback.
    train = datasets(tmp_path, ann)[0]
    (batch,) = DataLoader(train, batch_size=1, num_workers=1, collate_fn=Collate(64, FILL))
    assert batch.errors == [expected] and batch.image_ids == [] and batch.skipped == 0


def test_boxes_within_the_decoded_image_and_its_edge_tolerance_load(tmp_path):
    save_png(tmp_path, "a.png", 40, 60)
    doc = one_image_doc()
    doc["annotations"] = [
        {"id": 1, "image_id": 5, "category_id": 9, "bbox": [10, 10, 20, 30]},
        {"id": 2, "image_id": 5, "category_id": 2, "bbox": [-1, 30, 61, 11]},
    ]
    ann = CocoAnnotations(write_json(tmp_path, doc))
    sample = datasets(tmp_path, ann)[1][0]
    assert sample.size == (40, 60) and tuple(sample.image.shape) == (3, 40, 60)
    assert sample.targets.tolist() == [[10, 10, 30, 40, 1], [-1, 30, 60, 41, 0]]


# --- images: EXIF orientation ------------------------------------------------

STORED_H, STORED_W = 40, 60


def exif_jpeg(path, orientation: int) -> None:
    """A STORED_H x STORED_W JPEG, dark with a white block in the stored top-left
    corner (rows 0-9, columns 0-19), tagged with `orientation`."""
    rng = np.random.default_rng(orientation)
    small = rng.integers(0, 60, (4, 6, 3), dtype=np.uint8)
    pixels = np.array(Image.fromarray(small).resize((STORED_W, STORED_H), Image.BILINEAR))
    pixels[:10, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation  # the Orientation tag
    Image.fromarray(pixels).save(path, quality=95, exif=exif)


# Displayed (oriented) size and where the white block shows, as a COCO bbox:
# 3 turns the image by 180 degrees; 6 by 90 clockwise (the stored top-left
# corner goes to the top-right).
ORIENTED = {3: ((40, 60), [40, 30, 20, 10]), 6: ((60, 40), [30, 0, 10, 20])}


@pytest.fixture(scope="module")
def rotated(tmp_path_factory):
    """JPEGs with EXIF orientation 3 and 6, annotated in displayed coordinates."""
    root = tmp_path_factory.mktemp("exif")
    images, annotations = [], []
    for i, (orientation, ((h, w), bbox)) in enumerate(ORIENTED.items()):
        exif_jpeg(root / f"o{orientation}.jpg", orientation)
        images.append({"id": i + 1, "file_name": f"o{orientation}.jpg", "width": w, "height": h})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": bbox})
    path = write_json(root, {"images": images, "annotations": annotations, "categories": [{"id": 1}]})
    return root, CocoAnnotations(path)


def test_pytorch_loader_applies_the_exif_orientation(rotated):
    root, ann = rotated
    ds = DetectionDataset(str(root), ann, 40, 1000)
    for i, (orientation, ((h, w), (x, y, bw, bh))) in enumerate(ORIENTED.items()):
        sample = ds[i]
        assert isinstance(sample, Sample), sample
        assert sample.size == (h, w) and tuple(sample.image.shape) == (3, h, w)
        assert sample.targets.tolist() == [[x, y, x + bw, y + bh, 0]]
        block = torch.zeros(h, w, dtype=torch.bool)
        block[y : y + bh, x : x + bw] = True
        grey = sample.image.float().mean(0)
        assert grey[block].min() > 200 and grey[~block].max() < 150, orientation


def test_python_api_takes_read_only_arrays_without_a_warning(rotated):
    import warnings

    from retinanet.runtime import _as_chw_uint8

    root, _ = rotated
    array = np.asarray(Image.open(root / "o3.jpg").convert("RGB"))  # read-only, as PIL hands it out
    assert not array.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = _as_chw_uint8(array, torch.device("cpu"))
    assert torch.equal(image, torch.from_numpy(array.copy()).permute(2, 0, 1))


@pytest.mark.gpu
def test_python_api_on_the_gpu_orients_like_the_loader(rotated):
    # nvJPEG ignores EXIF: an oriented JPEG must take the PIL path on the GPU too.
    from retinanet.runtime import _as_chw_uint8

    root, _ = rotated
    for orientation in ORIENTED:
        path = str(root / f"o{orientation}.jpg")
        on_gpu = _as_chw_uint8(path, torch.device("cuda"))
        assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), read_image(path))


def test_dali_pipelines_orient_like_the_pytorch_loader(rotated):
    """DALI is in the test extra: it must import here."""
    from test_dali import FILL as DALI_FILL
    from test_dali import MAX_SIZE, MULTIPLE, assert_same_batch, pytorch_batch

    from retinanet.data import dali as D

    root, ann = rotated
    D.require_dali()
    turns, crops = set(), 0
    loader = D.training_loader(
        str(root),
        ann,
        2,
        MAX_SIZE,
        MULTIPLE,
        DALI_FILL,
        (40, 90),
        T.Augment(crop=True, rotate=True),
        torch.device("cpu"),
        threads=1,
        seed=2,
    )
    for _ in range(8):
        outs = loader.run()
        params = D.training_params(outs)
        assert sorted((rec_id, hw) for rec_id, hw, _ in params) == [(1, (40, 60)), (2, (60, 40))]
        assert_same_batch(loader._training_batch(outs), pytorch_batch(root, ann, params))
        turns |= {g.quarter_turns for _, _, g in params}
        crops += sum(g.crop is not None for _, _, g in params)
    assert crops > 0 and len(turns) > 1  # crop windows and rotations on oriented images
    ours = list(
        D.inference_loader(str(root), ann.images, 2, 40, MAX_SIZE, MULTIPLE, DALI_FILL, torch.device("cpu"), threads=1)
    )
    theirs = list(
        DataLoader(
            DetectionDataset(str(root), ann, 40, MAX_SIZE), batch_size=2, collate_fn=Collate(MULTIPLE, DALI_FILL)
        )
    )
    assert len(ours) == len(theirs) == 1 and ours[0].sizes == [(40, 60), (60, 40)]
    assert_same_batch(ours[0], theirs[0])


def test_annotation_with_the_stored_not_the_displayed_size_is_an_error(rotated, tmp_path):
    from retinanet.data import dali as D

    root, _ = rotated
    doc = {
        "images": [{"id": 7, "file_name": "o6.jpg", "width": STORED_W, "height": STORED_H}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [0, 0, 20, 10]}],
        "categories": [{"id": 1}],
    }
    ann = CocoAnnotations(write_json(tmp_path, doc, "stored.json"))
    expected = (
        f"stored.json: image 7 ({root / 'o6.jpg'}) has width 60, height 40 in the annotations but "
        "decodes to 40x60 (width x height, after its EXIF orientation)"
    )
    assert DetectionDataset(str(root), ann, 40, 1000)[0] == expected
    loader = D.inference_loader(str(root), ann.images, 1, 40, 333, 128, FILL, torch.device("cpu"), threads=1)
    with pytest.raises(UserError) as e:
        list(loader)
    assert str(e.value) == expected


# --- images: 16 bits, transparency, pixel limit ---------------------------------


def test_sixteen_bit_png_is_scaled_not_saturated(tmp_path):
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    expected = torch.from_numpy(((values.astype(np.int64) + 128) // 257).astype(np.uint8)).expand(3, 256, 256)
    assert torch.equal(read_image(str(tmp_path / "g16.png")), expected)


def transparent_images():
    """Per alpha-carrying mode: (PIL image, expected RGB on FILL, on black).
    Worked by hand: colour * a/255 + background * (1 - a/255), rounded."""
    rgba = Image.fromarray(np.array([[[200, 0, 50, 255], [200, 0, 50, 0], [200, 0, 50, 128]]], np.uint8), "RGBA")
    la = Image.fromarray(np.array([[[10, 255], [10, 0], [255, 128]]], np.uint8), "LA")
    palette = Image.fromarray(np.array([[0, 1, 0]], np.uint8), "P")
    palette.putpalette([200, 0, 50, 0, 0, 255])
    palette.info["transparency"] = 1
    return {
        "RGBA": (rgba, [[200, 0, 50], list(FILL), [162, 58, 77]], [[200, 0, 50], [0, 0, 0], [100, 0, 25]]),
        "LA": (la, [[10, 10, 10], list(FILL), [190, 186, 180]], [[10, 10, 10], [0, 0, 0], [128, 128, 128]]),
        "P": (palette, [[200, 0, 50], list(FILL), [200, 0, 50]], [[200, 0, 50], [0, 0, 0], [200, 0, 50]]),
    }


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_show_the_mean_pixel(tmp_path, mode):
    image, on_fill, on_black = transparent_images()[mode]
    image.save(tmp_path / "t.png", transparency=image.info.get("transparency"))
    assert read_image(str(tmp_path / "t.png")).permute(1, 2, 0).tolist() == [on_fill]
    # The dataset composites onto the model's own mean pixel when given one.
    folder = DetectionDataset(str(tmp_path), None, 1, 1000, fill=(0, 0, 0))
    assert folder[0].image.permute(1, 2, 0).tolist() == [on_black]


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose header claims width x height (the decoder stops at
    the data's end; opening it only reads the header)."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@pytest.mark.parametrize("side", [20000, 30000], ids=["above-limit", "above-twice-limit"])
def test_image_above_the_pixel_limit_is_one_line(tmp_path, side):
    (tmp_path / "big.jpg").write_bytes(jpeg_claiming(side, side))
    with pytest.raises(CorruptImage) as e:
        read_image(str(tmp_path / "big.jpg"))
    assert str(e.value) == (
        f"{tmp_path / 'big.jpg'}: image has more than 268435456 pixels, the limit against "
        "decompression bombs; downscale or tile it"
    )


def test_a_hundred_megapixel_image_is_decoded(tmp_path, monkeypatch):
    (tmp_path / "aerial.jpg").write_bytes(jpeg_claiming(10000, 10000))
    sizes = []

    def record(im, background):  # stands in for decoding 300 MB
        sizes.append(im.size)
        return np.zeros((1, 1, 3), np.uint8)

    monkeypatch.setattr(C, "_to_rgb", record)
    read_image(str(tmp_path / "aerial.jpg"))
    assert sizes == [(10000, 10000)]


# --- --backbone-weights -------------------------------------------------------


class RunsCode:
    """Unpickling this would create a file: a weights file must never run code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def weights_file(kind: str, folder) -> str:
    from torchvision.models import mobilenet_v2, resnet18, resnet34

    path = folder / f"{kind}.pth"
    if kind == "truncated":
        buf = io.BytesIO()
        torch.save(resnet18().state_dict(), buf)
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif kind == "text":
        path.write_text("conv1.weight: 0.1 0.2\n")
    elif kind == "resnet34":
        torch.save(resnet34().state_dict(), path)
    elif kind == "mobilenet":
        torch.save(mobilenet_v2().state_dict(), path)
    elif kind == "wrong-shape":
        state = resnet18().state_dict()
        state["conv1.weight"] = torch.zeros(64, 1, 7, 7)
        torch.save(state, path)
    elif kind == "code":
        torch.save({"conv1.weight": RunsCode(folder / "ran")}, path)
    return str(path)


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("missing", "backbone weights file not found"),
        (
            "truncated",
            "not a readable backbone weights file (not a torch.save file, or a truncated one: PytorchStreamReader "
            "failed reading zip archive: failed finding central directory)",
        ),
        ("text", "not a readable backbone weights file (not a torch.save file, or a truncated one)"),
        ("resnet34", "not a ResNet18FPN state dict (96 unknown keys, e.g. layer1.2.conv1.weight)"),
        ("mobilenet", "not a ResNet18FPN state dict (missing 120 keys, e.g. conv1.weight)"),
        ("wrong-shape", "not a ResNet18FPN state dict (conv1.weight has shape (64, 1, 7, 7), not (64, 3, 7, 7))"),
        (
            "code",
            "refusing to load this backbone weights file: it holds Python objects beyond tensors and plain "
            "containers, and unpickling them could run code; re-save its tensors (state_dict) alone",
        ),
    ],
)
def test_unusable_backbone_weights_file_is_one_line(tmp_path, kind, reason):
    from retinanet.model import backbones

    path = weights_file(kind, tmp_path)
    with pytest.raises(UserError) as e:
        backbones.build("ResNet18FPN", weights_file=path)
    assert str(e.value) == f"{path}: {reason}"
    assert not (tmp_path / "ran").exists()
