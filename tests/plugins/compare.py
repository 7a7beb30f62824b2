"""Write plugin-harness cases and check the harness outputs against retinanet.ops.reference.

python tests/plugins/compare.py write CASE_DIR      # inputs + cases.txt (+ reference outputs)
build/check_plugins/plugin_harness CASE_DIR OUT_DIR  # on a GPU (scripts/check_plugins.sh builds it)
python tests/plugins/compare.py check CASE_DIR OUT_DIR
"""

import math
import os
import sys

import numpy as np
import torch

from retinanet.ops import box, reference

CLAMP = math.log(1000 / 16)
# The levels of one input padded to a multiple of 32 but not of 128: C3-C5 halve
# it exactly, P6 and P7 round up, so their maps (3 x 4 and 2 x 2 cells) reach past
# the input (to 192 x 256 and 256 x 256 px), and decode clips boxes to that reach.
PYRAMID_INPUT = (160, 224)
STRIDES = (8, 16, 32, 64, 128)


def _anchors(a):
    sizes = torch.linspace(32, 64, a)
    return torch.stack([-sizes / 2, -sizes * 0.75 / 2, sizes / 2, sizes * 0.75 / 2], 1).float()


def pyramid_shapes(height, width):
    """(stride, h, w) of each level for an input of height x width: ceil(size / stride)."""
    return [(s, -(-height // s), -(-width // s)) for s in STRIDES]


def _pyramid_cases(g, dtype, td):
    """One decode case per level of PYRAMID_INPUT with the default anchors (9 per level,
    32 to 813 px: those of P6 and P7 reach past the input from every cell)."""
    out = []
    b, c = 2, 3
    for stride, h, w in pyramid_shapes(*PYRAMID_INPUT):
        anchors = box.base_anchors(stride, [0.5, 1.0, 2.0], [4.0 * 2 ** (k / 3) for k in range(3)])
        a = anchors.shape[0]
        scores = torch.rand(b, a * c, h, w, generator=g)
        deltas = torch.randn(b, a * 4, h, w, generator=g) * 0.5
        params = dict(stride=stride, score_threshold=0.05, top_n=1000, box_clamp=CLAMP)
        inputs = dict(scores=scores.to(td), deltas=deltas.to(td), anchors=anchors)
        out.append(
            (f"decode_pad32_p{int(math.log2(stride))}_{dtype}", "decode", dtype, td, inputs, (b, a, c, h, w), params)
        )
    return out


def torchvision_like_anchors(stride):
    """The default anchors as torchvision lays them out (corners rounded to integers, centred
    on the cell's top-left corner), shifted by -stride/2 because decode adds the cell centre:
    the kind of table a converted checkpoint brings, with integer-width +1 boxes in mind."""
    base = box.base_anchors(stride, [0.5, 1.0, 2.0], [4.0 * 2 ** (k / 3) for k in range(3)])
    return base.round() - stride / 2


def _box_offset_cases(g, dtype, td):
    """box_offset 1 (the +1 pixel convention of converted ODTK models): decode at P3 (more
    candidates than top_n) and P7 of PYRAMID_INPUT (boxes clipped to W*stride - 1), and NMS
    on integer boxes, where the +1 in widths and intersections decides overlaps. One NMS
    case passes box_offset 0 explicitly, which must equal leaving the field out."""
    out = []
    b, c = 2, 3
    for stride, h, w in [pyramid_shapes(*PYRAMID_INPUT)[i] for i in (0, 4)]:
        anchors = torchvision_like_anchors(stride)
        a = anchors.shape[0]
        scores = torch.rand(b, a * c, h, w, generator=g)
        deltas = torch.randn(b, a * 4, h, w, generator=g) * 0.5
        params = dict(stride=stride, score_threshold=0.05, top_n=300, box_clamp=CLAMP, box_offset=1.0)
        inputs = dict(scores=scores.to(td), deltas=deltas.to(td), anchors=anchors)
        name = f"decode_offset1_p{int(math.log2(stride))}_{dtype}"
        out.append((name, "decode", dtype, td, inputs, (b, a, c, h, w), params))
    for offset in (1.0, 0.0):
        n = 300
        centres = torch.rand(b, n, 2, generator=g) * 60
        sizes = torch.rand(b, n, 2, generator=g) * 20 + 2
        boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], 2).round()
        scores = torch.rand(b, n, generator=g)
        scores[:, :10] = 0.75  # ties
        classes = torch.randint(0, 3, (b, n), generator=g, dtype=torch.int32)
        out.append(
            (
                f"nms_offset{int(offset)}_{dtype}",
                "nms",
                dtype,
                td,
                dict(scores=scores.to(td), boxes=boxes.to(td), classes=classes),
                (b, n),
                dict(iou=0.5, detections=100, box_offset=offset),
            )
        )
    return out


def cases():
    g = torch.Generator().manual_seed(0)
    out = []
    for dtype in ("f32", "f16"):
        td = torch.float32 if dtype == "f32" else torch.float16
        for name, (b, a, c, h, w, stride, thr, top_n) in {
            "many": (3, 9, 5, 12, 16, 8, 0.05, 100),  # more candidates than top_n
            "few": (2, 3, 4, 4, 4, 32, 0.5, 1000),  # fewer candidates than top_n
            "none": (2, 3, 2, 3, 3, 64, 0.99, 50),  # everything below the threshold
        }.items():
            scores = torch.rand(b, a * c, h, w, generator=g)
            if name == "many":  # ties
                scores[:, :, :2] = 0.5
            if name == "none":
                scores *= 0.9
            deltas = torch.randn(b, a * 4, h, w, generator=g) * 0.5
            params = dict(stride=stride, score_threshold=thr, top_n=top_n, box_clamp=CLAMP)
            out.append(
                (
                    f"decode_{name}_{dtype}",
                    "decode",
                    dtype,
                    td,
                    dict(scores=scores.to(td), deltas=deltas.to(td), anchors=_anchors(a)),
                    (b, a, c, h, w),
                    params,
                )
            )
        for name, (b, n, d, iou) in {"crowded": (3, 400, 100, 0.5), "sparse": (2, 30, 100, 0.3)}.items():
            centres = torch.rand(b, n, 2, generator=g) * 100
            sizes = torch.rand(b, n, 2, generator=g) * 40 + 5
            boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], 2)
            scores = torch.rand(b, n, generator=g)
            scores[:, -5:] = 0  # padding never survives
            scores[:, :10] = 0.75  # ties
            classes = torch.randint(0, 4, (b, n), generator=g, dtype=torch.int32)
            out.append(
                (
                    f"nms_{name}_{dtype}",
                    "nms",
                    dtype,
                    td,
                    dict(scores=scores.to(td), boxes=boxes.to(td), classes=classes),
                    (b, n),
                    dict(iou=iou, detections=d),
                )
            )
        out += _pyramid_cases(torch.Generator().manual_seed(1), dtype, td)
        out += _box_offset_cases(torch.Generator().manual_seed(2), dtype, td)
    return out


def _save(t, path):
    t.contiguous().numpy().tofile(path)


def write(case_dir):
    os.makedirs(case_dir, exist_ok=True)
    lines = []
    for name, kind, dtype, _, inputs, shape, p in cases():
        for k, t in inputs.items():
            _save(t, os.path.join(case_dir, f"{name}.{k}.bin"))
        if kind == "decode":
            b, a, c, h, w = shape
            line = (
                f"{name} decode {dtype} {b} {a} {c} {h} {w} {p['stride']} {p['score_threshold']!r} "
                f"{p['top_n']} {p['box_clamp']!r}"
            )
        else:
            b, n = shape
            line = f"{name} nms {dtype} {b} {n} {p['iou']!r} {p['detections']}"
        # box_offset is an optional plugin field: cases without it run the plugins as files
        # written before it existed do (the harness then leaves the field out).
        lines.append(line + (f" {p['box_offset']!r}" if "box_offset" in p else ""))
    with open(os.path.join(case_dir, "cases.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def check(case_dir, out_dir):
    bad = 0
    for name, kind, dtype, td, inputs, shape, p in cases():
        offset = float(np.float32(p.get("box_offset", 0.0)))  # absent: the plugins' default
        if kind == "decode":
            # Parameters as the plugin sees them: float32 fields.
            ref = reference.decode(
                inputs["scores"],
                inputs["deltas"],
                inputs["anchors"],
                p["stride"],
                float(np.float32(p["score_threshold"])),
                p["top_n"],
                float(np.float32(p["box_clamp"])),
                box_offset=offset,
            )
            b, k = shape[0], p["top_n"]
        else:
            ref = reference.nms(
                inputs["scores"],
                inputs["boxes"],
                inputs["classes"],
                float(np.float32(p["iou"])),
                p["detections"],
                box_offset=offset,
            )
            b, k = shape[0], p["detections"]
        np_dtype = np.float32 if dtype == "f32" else np.float16
        got_scores = np.fromfile(os.path.join(out_dir, f"{name}.scores.bin"), np_dtype).reshape(b, k)
        got_boxes = np.fromfile(os.path.join(out_dir, f"{name}.boxes.bin"), np_dtype).reshape(b, k, 4)
        got_classes = np.fromfile(os.path.join(out_dir, f"{name}.classes.bin"), np.int32).reshape(b, k)
        rs, rb, rc = (t.to(td).numpy() if t.is_floating_point() else t.numpy() for t in ref)
        tol = 0 if dtype == "f32" else 1e-3
        ok = (
            np.array_equal(got_classes, rc)
            and np.allclose(got_scores.astype(np.float32), rs.astype(np.float32), rtol=tol, atol=tol)
            and np.allclose(
                got_boxes.astype(np.float32),
                rb.astype(np.float32),
                rtol=1e-5 if tol == 0 else 2e-3,
                atol=1e-3 if tol == 0 else 0.05,
            )
        )
        kept = int((rs > 0).sum())
        print(f"{name}: {'equal to reference' if ok else 'DIFFERS from reference'} ({kept} detections)")
        if not ok:
            bad += 1
            diff = np.abs(got_boxes.astype(np.float32) - rb.astype(np.float32)).max()
            print(f"  classes equal: {np.array_equal(got_classes, rc)}, max box diff {diff}")
    return bad


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2])
    else:
        sys.exit(1 if check(sys.argv[2], sys.argv[3]) else 0)
