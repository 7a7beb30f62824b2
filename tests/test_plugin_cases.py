"""The plugin harness's cases (tests/plugins/compare.py) on the CPU.

The harness itself runs on a GPU; here the cases it reads are checked for what
they claim: the pyramid cases have the feature-map sizes of an input padded to
a multiple of 32 (not of 128), and `compare.py check` accepts outputs equal to
the reference and refuses others. The harness is emulated by the reference ops
reading the written files, so the files (shapes in cases.txt, tensor bytes)
are what is checked.
"""

import os
import sys

import numpy as np
import torch
from conftest import tiny_model

from retinanet.ops import reference

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "plugins"))
import compare  # noqa: E402


def test_pyramid_cases_have_the_levels_of_an_input_padded_to_32():
    h, w = compare.PYRAMID_INPUT
    assert h % 32 == w % 32 == 0 and (h % 128, w % 128) != (0, 0)
    model = tiny_model()
    with torch.no_grad():
        features = model.fpn(model.backbone(torch.zeros(1, 3, h, w)))
    want = [(s, *f.shape[-2:]) for s, f in zip(model.config.strides, features)]
    assert compare.pyramid_shapes(h, w) == want
    assert want[-2:] == [(64, 3, 4), (128, 2, 2)]  # partial cells: 2.5 x 3.5 and 1.25 x 1.75
    pyramid = [c for c in compare.cases() if c[0].startswith("decode_pad32_")]
    assert [(c[6]["stride"], *c[5][3:]) for c in pyramid] == want * 2  # f32 and f16


def emulated_harness(case_dir, out_dir, read_box_offset=True):
    """What plugin_harness writes, computed by the reference from the files compare.py wrote.
    read_box_offset=False stands for plugins that ignore the field."""
    os.makedirs(out_dir)
    for line in open(os.path.join(case_dir, "cases.txt")).read().splitlines():
        name, kind, dtype, *fields = line.split()
        # The optional last value; the plugins take an absent box_offset as 0.
        given = len(fields) == (10 if kind == "decode" else 5)
        offset = float(np.float32(fields[-1])) if given and read_box_offset else 0.0
        np_dtype = np.float32 if dtype == "f32" else np.float16

        def read(tensor, shape, dt=np_dtype, name=name):
            return torch.from_numpy(np.fromfile(os.path.join(case_dir, f"{name}.{tensor}.bin"), dt).reshape(shape))

        if kind == "decode":
            b, a, c, h, w, stride = (int(v) for v in fields[:6])
            threshold, top_n, clamp = float(np.float32(fields[6])), int(fields[7]), float(np.float32(fields[8]))
            anchors = read("anchors", (a, 4), np.float32)
            out = reference.decode(
                read("scores", (b, a * c, h, w)),
                read("deltas", (b, a * 4, h, w)),
                anchors,
                stride,
                threshold,
                top_n,
                clamp,
                box_offset=offset,
            )
        else:
            b, n = int(fields[0]), int(fields[1])
            iou, detections = float(np.float32(fields[2])), int(fields[3])
            out = reference.nms(
                read("scores", (b, n)),
                read("boxes", (b, n, 4)),
                read("classes", (b, n), np.int32),
                iou,
                detections,
                box_offset=offset,
            )
        for tensor, value in zip(("scores", "boxes", "classes"), out):
            value.numpy().tofile(os.path.join(out_dir, f"{name}.{tensor}.bin"))


def test_cases_check_against_the_reference(tmp_path):
    cases, out = str(tmp_path / "cases"), str(tmp_path / "out")
    compare.write(cases)
    emulated_harness(cases, out)
    assert compare.check(cases, out) == 0
    # P7's boxes reach past the 224 px input, to its 2 x 128 px extent.
    p7 = np.fromfile(os.path.join(out, "decode_pad32_p7_f32.boxes.bin"), np.float32).reshape(2, -1, 4)
    assert p7[..., 2].max() == 256 and p7[..., 3].max() == 256 > compare.PYRAMID_INPUT[1]
    # A box clipped to the input instead, as a wrong size would, is a difference.
    p7[..., 2:] = np.minimum(p7[..., 2:], [compare.PYRAMID_INPUT[1], compare.PYRAMID_INPUT[0]])
    p7.tofile(os.path.join(out, "decode_pad32_p7_f32.boxes.bin"))
    assert compare.check(cases, out) == 1


def test_box_offset_cases(tmp_path):
    """Decode and NMS cases with box_offset 1 (P3 and P7 of the pyramid, integer NMS boxes),
    one NMS case with an explicit 0, and the rest without the field (files written before
    it); plugins that ignored the field would differ from the reference in each offset-1
    case, so the cases do test it."""
    lines = [line.split() for line in compare_lines(tmp_path / "cases")]
    offsets = {f[0]: f[-1] for f in lines if len(f) == (13 if f[1] == "decode" else 8)}
    for dtype in ("f32", "f16"):
        assert offsets[f"decode_offset1_p3_{dtype}"] == offsets[f"decode_offset1_p7_{dtype}"] == "1.0"
        assert offsets[f"nms_offset1_{dtype}"] == "1.0" and offsets[f"nms_offset0_{dtype}"] == "0.0"
    assert len(offsets) == 8 and len(lines) > 8
    p7 = next(c for c in compare.cases() if c[0] == "decode_offset1_p7_f32")
    assert torch.equal(p7[4]["anchors"], p7[4]["anchors"].round()) and p7[6]["stride"] == 128  # integer corners

    out = str(tmp_path / "out")
    emulated_harness(str(tmp_path / "cases"), out)
    assert compare.check(str(tmp_path / "cases"), out) == 0
    # P7's boxes end at the last pixel of its 2 x 128 px extent.
    boxes = np.fromfile(os.path.join(out, "decode_offset1_p7_f32.boxes.bin"), np.float32).reshape(2, -1, 4)
    assert boxes[..., 2].max() == boxes[..., 3].max() == 255
    ignored = str(tmp_path / "ignored")
    emulated_harness(str(tmp_path / "cases"), ignored, read_box_offset=False)
    assert compare.check(str(tmp_path / "cases"), ignored) == 6  # the offset-1 cases, f32 and f16


def compare_lines(case_dir):
    compare.write(str(case_dir))
    return open(os.path.join(case_dir, "cases.txt")).read().splitlines()
