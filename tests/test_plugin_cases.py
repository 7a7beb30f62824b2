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


def emulated_harness(case_dir, out_dir):
    """What plugin_harness writes, computed by the reference from the files compare.py wrote."""
    os.makedirs(out_dir)
    for line in open(os.path.join(case_dir, "cases.txt")).read().splitlines():
        name, kind, dtype, *fields = line.split()
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
            )
        else:
            b, n = int(fields[0]), int(fields[1])
            iou, detections = float(np.float32(fields[2])), int(fields[3])
            out = reference.nms(
                read("scores", (b, n)), read("boxes", (b, n, 4)), read("classes", (b, n), np.int32), iou, detections
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
