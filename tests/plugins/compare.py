"""Write plugin-harness cases and check the harness outputs against retinanet.ops.reference.

python tests/plugins/compare.py write CASE_DIR [--rotated]      # inputs + cases.txt (+ reference outputs)
build/check_plugins/plugin_harness CASE_DIR OUT_DIR              # on a GPU (scripts/check_plugins.sh builds it)
python tests/plugins/compare.py check CASE_DIR OUT_DIR [--rotated]

--rotated: the cases of RetinaNetDecodeRotated and RetinaNetNMSRotated instead of the
axis-aligned plugins' (a case set of its own, so that the axis-aligned cases.txt keeps
its form).
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


def rotated_anchors(sizes=(32.0, 48.0), ratios=(0.5, 1.0, 2.0), angles_deg=(-60.0, 0.0, 60.0)):
    """[A, 5] (0, 0, w, h, α), the angle varying slowest as in docs/rotated.md."""
    rows = []
    for angle in angles_deg:
        for ratio in ratios:
            for size in sizes:
                rows.append([0.0, 0.0, size / math.sqrt(ratio), size * math.sqrt(ratio), math.radians(angle)])
    return torch.tensor(rows, dtype=torch.float32)


def random_rotated_boxes(g, batch, n, extent, size_lo, size_hi):
    """[batch, n, 5] boxes with centres in [0, extent)^2, sides in [size_lo, size_hi), any angle."""
    centres = torch.rand(batch, n, 2, generator=g) * extent
    sizes = torch.rand(batch, n, 2, generator=g) * (size_hi - size_lo) + size_lo
    angles = (torch.rand(batch, n, 1, generator=g) - 0.5) * math.pi
    return torch.cat([centres, sizes, angles], 2)


def rotated_cases():
    """RetinaNetDecodeRotated and RetinaNetNMSRotated cases, f32 and f16: more and fewer
    candidates than top_n, none at all, score ties; crowded NMS with ties and padding."""
    g = torch.Generator().manual_seed(4)
    out = []
    anchors = rotated_anchors()
    a = anchors.shape[0]
    for dtype in ("f32", "f16"):
        td = torch.float32 if dtype == "f32" else torch.float16
        for name, (b, c, h, w, stride, thr, top_n) in {
            "many": (3, 5, 12, 16, 8, 0.05, 100),
            "few": (2, 4, 4, 4, 32, 0.5, 1000),
            "none": (2, 2, 3, 3, 64, 0.99, 50),
        }.items():
            scores = torch.rand(b, a * c, h, w, generator=g)
            if name == "many":  # ties
                scores[:, :, :2] = 0.5
            if name == "none":
                scores *= 0.9
            deltas = torch.randn(b, a * 6, h, w, generator=g) * 0.5
            params = dict(stride=stride, score_threshold=thr, top_n=top_n, box_clamp=CLAMP)
            inputs = dict(scores=scores.to(td), deltas=deltas.to(td), anchors=anchors)
            out.append((f"rdecode_{name}_{dtype}", "decode_rotated", dtype, td, inputs, (b, a, c, h, w), params))
        for name, (b, n, d, iou) in {"crowded": (3, 400, 100, 0.5), "sparse": (2, 30, 100, 0.3)}.items():
            boxes = random_rotated_boxes(g, b, n, 100, 5, 45)
            scores = torch.rand(b, n, generator=g)
            scores[:, -5:] = 0  # padding never survives
            scores[:, :10] = 0.75  # ties
            classes = torch.randint(0, 4, (b, n), generator=g, dtype=torch.int32)
            inputs = dict(scores=scores.to(td), boxes=boxes.to(td), classes=classes)
            out.append((f"rnms_{name}_{dtype}", "nms_rotated", dtype, td, inputs, (b, n), dict(iou=iou, detections=d)))
    return out


# Rotated IoUs this close to the threshold may be decided either way: the kernels compute
# the IoU in float32, the reference in float64.
ROTATED_TIE_EPS = 1e-4


def angle_difference(a, b):
    """|a - b| for angles of rotated boxes, modulo a half turn (θ and θ ± π: one rectangle)."""
    d = (np.asarray(a, np.float64) - np.asarray(b, np.float64)) % math.pi
    return np.minimum(d, math.pi - d)


def rotated_boxes_close(got, ref, rtol, atol, angle_atol):
    """Rotated boxes [..., 5] equal within tolerance, angles modulo a half turn."""
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    return np.allclose(got[..., :4], ref[..., :4], rtol=rtol, atol=atol) and bool(
        (angle_difference(got[..., 4], ref[..., 4]) <= angle_atol).all()
    )


def greedy_nms_violation(scores, boxes, classes, out, threshold, iou, eps):
    """Why `out` (scores [D], boxes [D, V], classes [D] of one image) is not a greedy
    class-aware NMS of the candidates, or None when it is one; iou(box [1, V], boxes [N, V])
    gives the N overlaps (float32).

    A same-class IoU within `eps` of the threshold may be decided either way; every other
    decision must be the reference's. Each tie decided the other way changes which boxes
    later candidates meet (and, with full outputs, which fall off the end), so the check
    replays greedy NMS on the kept boxes of `out` rather than comparing slot by slot.
    """
    out_s, out_b, out_c = (t.detach().float().cpu() if t.is_floating_point() else t.cpu() for t in out)
    detections = out_s.shape[0]
    kept = int((out_s > 0).sum())
    if not (out_s[:kept] > 0).all():
        return "padding before detections"
    if (out_s[kept:] != 0).any() or (out_b[kept:] != 0).any() or (out_c[kept:] != -1).any():
        return f"padding slots {kept}.. are not (score 0, box 0, class -1)"
    s, b, c = scores.detach().float().cpu(), boxes.detach().float().cpu(), classes.cpu().long()
    order = torch.sort(s, descending=True, stable=True).indices
    suppressed = torch.zeros(s.shape[0], dtype=torch.bool)  # IoU > threshold + eps with a kept box
    tie = torch.zeros(s.shape[0], dtype=torch.bool)  # IoU within eps of the threshold with a kept box
    slot = 0
    for i in order[: int((s > 0).sum())].tolist():
        if slot == detections:
            break
        same = (
            slot < kept
            and float(out_s[slot]) == float(s[i])
            and int(out_c[slot]) == int(c[i])
            and bool((out_b[slot] == b[i]).all())
        )
        if not same:
            if not (suppressed[i] or tie[i]):
                return (
                    f"slot {slot}: candidate {i} (score {float(s[i])}, class {int(c[i])}) is missing "
                    f"and no kept box suppresses it"
                )
            continue
        if suppressed[i]:
            return f"slot {slot}: keeps candidate {i}, which a kept box of its class suppresses"
        overlaps = iou(b[i][None], b)
        near = (overlaps - threshold).abs() <= eps
        suppressed |= (c == c[i]) & (overlaps > threshold) & ~near
        tie |= (c == c[i]) & near
        slot += 1
    if slot < kept:
        return (
            f"slot {slot}: {out_s[slot].item()} {out_c[slot].item()} {out_b[slot].tolist()} is not the next "
            f"candidate in score order"
        )
    return None


def rotated_nms_violation(scores, boxes, classes, out, threshold, eps=ROTATED_TIE_EPS):
    """greedy_nms_violation for rotated boxes [., 5]: their IoU in float64, compared in float32."""
    from retinanet.ops import rotated

    def iou(box, boxes):
        return rotated.iou_pairs(box, boxes).float()

    return greedy_nms_violation(scores, boxes, classes, out, threshold, iou, eps)


def _save(t, path):
    t.contiguous().numpy().tofile(path)


def write(case_dir, rotated=False):
    os.makedirs(case_dir, exist_ok=True)
    lines = []
    for name, kind, dtype, _, inputs, shape, p in rotated_cases() if rotated else cases():
        for k, t in inputs.items():
            _save(t, os.path.join(case_dir, f"{name}.{k}.bin"))
        if kind in ("decode", "decode_rotated"):
            b, a, c, h, w = shape
            line = (
                f"{name} {kind} {dtype} {b} {a} {c} {h} {w} {p['stride']} {p['score_threshold']!r} "
                f"{p['top_n']} {p['box_clamp']!r}"
            )
        else:
            b, n = shape
            line = f"{name} {kind} {dtype} {b} {n} {p['iou']!r} {p['detections']}"
        # box_offset is an optional plugin field: cases without it run the plugins as files
        # written before it existed do (the harness then leaves the field out).
        lines.append(line + (f" {p['box_offset']!r}" if "box_offset" in p else ""))
    with open(os.path.join(case_dir, "cases.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def check_rotated(out_dir):
    """The rotated cases' outputs: decode's scores and classes equal to the reference and
    its boxes close (angles modulo a half turn); NMS a greedy NMS of its input that only
    decides IoU ties (within ROTATED_TIE_EPS) otherwise than the reference."""
    bad = 0
    for name, kind, dtype, _, inputs, shape, p in rotated_cases():
        np_dtype = np.float32 if dtype == "f32" else np.float16
        if kind == "decode_rotated":
            ref = reference.decode_rotated(
                inputs["scores"],
                inputs["deltas"],
                inputs["anchors"],
                p["stride"],
                float(np.float32(p["score_threshold"])),
                p["top_n"],
                float(np.float32(p["box_clamp"])),
            )
            b, k = shape[0], p["top_n"]
        else:
            ref = reference.nms_rotated(
                inputs["scores"], inputs["boxes"], inputs["classes"], float(np.float32(p["iou"])), p["detections"]
            )
            b, k = shape[0], p["detections"]
        got = (
            torch.from_numpy(np.fromfile(os.path.join(out_dir, f"{name}.scores.bin"), np_dtype).reshape(b, k)),
            torch.from_numpy(np.fromfile(os.path.join(out_dir, f"{name}.boxes.bin"), np_dtype).reshape(b, k, 5)),
            torch.from_numpy(np.fromfile(os.path.join(out_dir, f"{name}.classes.bin"), np.int32).reshape(b, k)),
        )
        why = None
        if kind == "decode_rotated":
            if not (torch.equal(got[2], ref[2]) and torch.equal(got[0], ref[0])):
                why = "scores or classes (selection, order) differ"
            elif not rotated_boxes_close(
                got[1].float().numpy(),
                ref[1].float().numpy(),
                rtol=1e-5 if dtype == "f32" else 2e-3,
                atol=1e-3 if dtype == "f32" else 0.05,
                angle_atol=1e-5 if dtype == "f32" else 2e-3,
            ):
                why = "boxes differ"
        else:
            threshold = float(np.float32(p["iou"]))
            for i in range(b):
                if all(torch.equal(x[i], y[i]) for x, y in zip(got, ref)):
                    continue
                why = rotated_nms_violation(
                    inputs["scores"][i], inputs["boxes"][i], inputs["classes"][i], tuple(t[i] for t in got), threshold
                )
                if why is not None:
                    why = f"image {i}: {why}"
                    break
        kept = int((ref[0] > 0).sum())
        print(f"{name}: {'equal to reference' if why is None else 'DIFFERS from reference'} ({kept} detections)")
        if why is not None:
            bad += 1
            print(f"  {why}")
    return bad


def check(case_dir, out_dir, rotated=False):
    if rotated:
        return check_rotated(out_dir)
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
    args = [a for a in sys.argv[1:] if a != "--rotated"]
    rotated_only = "--rotated" in sys.argv[1:]
    if args[0] == "write":
        write(args[1], rotated=rotated_only)
    else:
        sys.exit(1 if check(args[1], args[2], rotated=rotated_only) else 0)
