"""The reference decode/NMS, the oracle for every other implementation, against torchvision and worked examples."""

import math

import pytest
import torch
import torchvision

from retinanet.ops import box as box_ops
from retinanet.ops import reference

CLAMP = math.log(1000 / 16)


def random_candidates(gen, batch, n, classes, ties=False, size=200.0):
    xy = torch.rand(batch, n, 2, generator=gen) * size
    wh = torch.rand(batch, n, 2, generator=gen) * size / 3 + 0.5
    boxes = torch.cat([xy, xy + wh], dim=-1)
    scores = torch.rand(batch, n, generator=gen)
    if ties:  # few distinct values: many exact ties
        scores = (scores * 4).floor() / 4 + 0.25
    cls = torch.randint(0, classes, (batch, n), generator=gen, dtype=torch.int32)
    return scores, boxes, cls


def torchvision_nms(scores, boxes, cls, iou, detections):
    keep_mask = scores > 0
    s, b, c = scores[keep_mask], boxes[keep_mask], cls[keep_mask]
    keep = torchvision.ops.batched_nms(b, s, c.long(), iou)[:detections]
    return s[keep], b[keep], c[keep]


@pytest.mark.parametrize("case", range(60))
def test_nms_equals_torchvision_batched_nms(case):
    g = torch.Generator().manual_seed(case)
    kind = case % 6
    batch, n = 3, [0, 5, 50, 300, 1000, 400][kind]
    detections = [100, 100, 10, 100, 100, 7][kind]
    scores, boxes, cls = random_candidates(g, batch, n, classes=[1, 3, 5, 2, 80, 1][kind], ties=case % 2 == 0)
    if kind == 1:
        scores.zero_()  # nothing above zero: all padding
    if case % 3 == 0 and n:
        scores[1] = 0  # an empty image next to full ones
    out_s, out_b, out_c = reference.nms(scores, boxes, cls, 0.5, detections)
    assert out_s.shape == (batch, detections) and out_b.shape == (batch, detections, 4)
    assert out_c.dtype == torch.int32
    for i in range(batch):
        s, b, c = torchvision_nms(scores[i], boxes[i], cls[i], 0.5, detections)
        k = s.numel()
        torch.testing.assert_close(out_s[i, :k], s)
        torch.testing.assert_close(out_b[i, :k], b)
        assert torch.equal(out_c[i, :k], c)
        assert (out_s[i, k:] == 0).all() and (out_b[i, k:] == 0).all() and (out_c[i, k:] == -1).all()


def test_nms_suppresses_only_same_class_above_threshold():
    boxes = torch.tensor([[[0.0, 0, 10, 10], [0, 0, 10, 10.5], [0, 0, 10, 10], [0, 0, 10, 20.1]]])
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
    cls = torch.tensor([[0, 0, 1, 0]], dtype=torch.int32)
    s, _, c = reference.nms(scores, boxes, cls, 0.5, 10)
    # box 1 overlaps box 0 (same class) -> gone; box 2 is another class; box 3 has IoU < 0.5
    assert s[0, :3].tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert c[0, :4].tolist() == [0, 1, 0, -1]


def naive_decode(cls_scores, box_deltas, anchors, stride, threshold, top_n):
    """Loop over every candidate: independent of the reference's vectorisation."""
    batch, ac, h, w = cls_scores.shape
    a_count = anchors.shape[0]
    c_count = ac // a_count
    results = []
    for b in range(batch):
        cands = []
        for a in range(a_count):
            for c in range(c_count):
                for y in range(h):
                    for x in range(w):
                        s = float(cls_scores[b, a * c_count + c, y, x])
                        if s > threshold:
                            flat = ((a * c_count + c) * h + y) * w + x
                            cands.append((-s, flat, a, c, y, x))
        cands.sort()
        rows = []
        for neg_s, _, a, c, y, x in cands[:top_n]:
            rows.append(
                (
                    -neg_s,
                    naive_box(
                        anchors[a].tolist(),
                        box_deltas[b, a * 4 : (a + 1) * 4, y, x].tolist(),
                        x,
                        y,
                        stride,
                        w * stride,
                        h * stride,
                    ),
                    c,
                )
            )
        results.append(rows)
    return results


def naive_box(anchor, deltas, x, y, stride, width, height):
    """One box in float64 scalars, written from the formulas rather than through box_ops."""
    ax1, ay1, ax2, ay2 = anchor
    aw, ah = ax2 - ax1, ay2 - ay1
    acx, acy = (x + 0.5) * stride + (ax1 + ax2) / 2, (y + 0.5) * stride + (ay1 + ay2) / 2
    dx, dy, dw, dh = deltas
    cx, cy = acx + dx * aw, acy + dy * ah
    bw, bh = aw * math.exp(min(dw, CLAMP)), ah * math.exp(min(dh, CLAMP))
    box = [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]
    return torch.tensor([min(max(v, 0.0), limit) for v, limit in zip(box, [width, height] * 2)])


@pytest.mark.parametrize("case", range(12))
def test_decode_matches_naive_loop(case):
    g = torch.Generator().manual_seed(100 + case)
    batch, a_count, classes, h, w, stride = 2, 3, [1, 4, 2][case % 3], [3, 5, 1][case % 3], [4, 2, 7][case % 3], 16
    anchors = box_ops.base_anchors(stride, [0.5, 1.0, 2.0][:a_count], [4.0])
    scores = torch.rand(batch, a_count * classes, h, w, generator=g)
    if case % 4 == 0:
        scores = (scores * 5).floor() / 5  # ties
    if case % 4 == 1:
        scores[0] *= 0.04  # image 0 below threshold everywhere
    deltas = torch.randn(batch, a_count * 4, h, w, generator=g) * 2
    top_n = [5, 1000, 3, 17][case % 4]
    out_s, out_b, out_c = reference.decode(scores, deltas, anchors, stride, 0.05, top_n, CLAMP)
    assert out_s.shape == (batch, top_n) and out_b.shape == (batch, top_n, 4)
    for b, rows in enumerate(naive_decode(scores, deltas, anchors, stride, 0.05, top_n)):
        k = len(rows)
        if k:
            torch.testing.assert_close(out_s[b, :k], torch.tensor([r[0] for r in rows]))
            torch.testing.assert_close(out_b[b, :k], torch.stack([r[1] for r in rows]), rtol=1e-5, atol=1e-4)
            assert out_c[b, :k].tolist() == [r[2] for r in rows]
        assert (out_s[b, k:] == 0).all() and (out_c[b, k:] == -1).all()


def test_decode_of_a_hand_worked_level():
    """Stride 16, a 2 x 3 map (a 48 x 32 input), one 32 x 32 anchor, two classes;
    every expected value below is worked out by hand."""
    scores = torch.zeros(2, 2, 2, 3)  # image 1: nothing above the threshold
    scores[0, 0] = torch.tensor([[0.9, 0.0, 0.3], [0.0, 0.04, 0.0]])  # class 0
    scores[0, 1] = torch.tensor([[0.0, 0.7, 0.0], [0.3, 0.0, 0.06]])  # class 1
    scores[1] = 0.05  # at the threshold, not above it
    deltas = torch.zeros(2, 4, 2, 3)  # (dx, dy, dw, dh) per cell; anchor centres ((x + 0.5) * 16, (y + 0.5) * 16)
    deltas[0, :, 0, 0] = torch.tensor([0.25, 0.0, 0.0, 0.0])  # centre (16, 8): [0, -8, 32, 24] -> y1 clipped to 0
    deltas[0, :, 0, 1] = torch.tensor([0.0, 0.5, math.log(0.5), math.log(0.5)])  # centre (24, 24), 16 x 16
    deltas[0, :, 0, 2] = 0.0  # the anchor itself: [24, -8, 56, 24] -> clipped to [24, 0, 48, 24]
    deltas[0, :, 1, 0] = torch.tensor([0.0, 0.0, 10.0, 0.0])  # dw clamped: 2000 wide, clipped to [0, 48]
    deltas[0, :, 1, 1] = 1e4  # not a candidate (score 0.04): must not leak anywhere
    deltas[0, :, 1, 2] = torch.tensor([-0.5, -0.25, math.log(0.25), 0.0])  # centre (24, 16), 8 x 32
    anchors = torch.tensor([[-16.0, -16.0, 16.0, 16.0]])
    s, b, c = reference.decode(scores, deltas, anchors, 16, 0.05, 6, CLAMP)
    # Score order; the two 0.3s by flat index ((a*C + c)*H + y)*W + x: 2 (class 0) before 9 (class 1).
    torch.testing.assert_close(s[0], torch.tensor([0.9, 0.7, 0.3, 0.3, 0.06, 0.0]))
    assert c[0].tolist() == [0, 1, 0, 1, 1, -1]
    torch.testing.assert_close(
        b[0],
        torch.tensor(
            [
                [0.0, 0.0, 32.0, 24.0],
                [16.0, 16.0, 32.0, 32.0],
                [24.0, 0.0, 48.0, 24.0],
                [0.0, 8.0, 48.0, 32.0],
                [20.0, 0.0, 28.0, 32.0],
                [0.0, 0.0, 0.0, 0.0],
            ]
        ),
        rtol=1e-6,
        atol=1e-5,
    )
    assert (s[1] == 0).all() and (b[1] == 0).all() and (c[1] == -1).all()


def test_decode_fp16_inputs_give_fp16_outputs():
    g = torch.Generator().manual_seed(7)
    anchors = box_ops.base_anchors(8, [1.0], [4.0])
    scores = torch.rand(1, 2, 4, 4, generator=g).half()
    deltas = torch.randn(1, 4, 4, 4, generator=g).half()
    s, b, c = reference.decode(scores, deltas, anchors, 8, 0.05, 10, CLAMP)
    assert s.dtype == torch.float16 and b.dtype == torch.float16 and c.dtype == torch.int32
    s32, b32, _ = reference.decode(scores.float(), deltas.float(), anchors, 8, 0.05, 10, CLAMP)
    torch.testing.assert_close(s.float(), s32, rtol=1e-3, atol=1e-3)
