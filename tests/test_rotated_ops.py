"""Rotated-box ops (docs/rotated.md) against shapely and brute-force loops, and the
behaviours ODTK's rotated detector got wrong."""

import math

import numpy as np
import pytest
import shapely
import torch

from retinanet import ops
from retinanet.ops import rotated

PI = math.pi


def shapely_iou(a, b):
    """IoU [N, M] of boxes a [N, 5] x b [M, 5] by shapely, on the polygons of the documented corner formula."""
    pa = shapely.polygons(rotated.corners(torch.as_tensor(a, dtype=torch.float64)).numpy())
    pb = shapely.polygons(rotated.corners(torch.as_tensor(b, dtype=torch.float64)).numpy())
    area_a, area_b = shapely.area(pa)[:, None], shapely.area(pb)[None, :]
    inter = shapely.area(shapely.intersection(pa[:, None], pb[None, :]))
    proper = (area_a > 0) & (area_b > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(proper, inter / np.where(proper, area_a + area_b - inter, 1.0), 0.0)


def random_boxes(gen, n, spread=20.0, size=20.0):
    centre = torch.rand(n, 2, generator=gen, dtype=torch.float64) * spread
    wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * size + 0.05
    theta = (1 - 2 * torch.rand(n, 1, generator=gen, dtype=torch.float64)) * PI
    return torch.cat([centre, wh, theta], dim=1)


def assert_iou_matches_shapely(a, b):
    got = ops.rotated_iou(a, b)
    assert got.dtype == torch.float32 and got.shape == (a.shape[0], b.shape[0])
    assert not got.isnan().any()
    np.testing.assert_allclose(got.numpy(), shapely_iou(a, b), rtol=0, atol=1e-5)
    return got


def test_rotated_iou_equals_shapely_on_random_pairs():
    gen = torch.Generator().manual_seed(0)
    a, b = random_boxes(gen, 200), random_boxes(gen, 120)  # 24,000 pairs, most overlapping
    got = assert_iou_matches_shapely(a, b)
    assert (got > 0).float().mean() > 0.3 and (got == 0).any()
    # float32 inputs, as the model gives them: the oracle sees the same rounded boxes.
    assert_iou_matches_shapely(a[:50].float(), b[:50].float())


def test_rotated_iou_of_far_from_origin_boxes_is_precise():
    gen = torch.Generator().manual_seed(1)
    a, b = random_boxes(gen, 40), random_boxes(gen, 40)
    shift = torch.tensor([1e5, -3e4, 0, 0, 0], dtype=torch.float64)
    assert_iou_matches_shapely(a + shift, b + shift)


def degenerate_boxes():
    """Boxes whose pairs touch, share edges, nest, coincide or have no area."""
    r = [
        [0, 0, 2, 2, 0],
        [2, 0, 2, 2, 0],  # shares an edge with the first
        [2, 2, 2, 2, 0],  # shares a corner
        [1, 0, 2, 2, 0],  # collinear overlapping edges
        [1, 0.5, 2, 1, 0],  # inside the first, one edge on its edge
        [0, 0, 1, 1, 0.3],  # nested, rotated
        [0, 0, 2, 2, PI / 2],  # the first, turned by a quarter: the same square
        [0, 0, 2, 2, -PI / 2],
        [0, 0, 2, 2, PI],
        [0, 0, 2, 2, -PI],
        [0, 0, 2, 2, PI / 4],  # a diamond whose corners poke out of the square
        [0, 0, 2 * math.sqrt(2), 2 * math.sqrt(2), PI / 4],  # a diamond the square's corners touch
        [0, 0, 4, 1, 0.7],
        [0, 0, 4, 1, 0.7],  # identical rotated
        [0, 0, 1, 4, 0.7 + PI / 2],  # the same rectangle in its other form
        [0, 0, 4, 1, 0.7 - PI],
        [1.5, 0, 1, 1, PI / 4],  # a diamond poking out through the first square's edge
        [0, 0, 0, 2, 0],  # zero width
        [0, 0, 2, 0, 0.4],  # zero height
        [0, 0, 0, 0, 0],  # a point
        [1, 1, 0, 0, 0],  # a point on a corner
        [0, 0, 1e5, 1e5, 0.1],  # huge
        [0.1, 0.2, 1e-3, 2e-3, 0.5],  # tiny
        [0.1, 0.2, 1e-3, 2e-3, 0.5 + PI / 2],
        [5e4, 5e4, 1, 1, 0],  # far away
        [-5e4, 0, 3, 2, 1],
    ]
    return torch.tensor(r, dtype=torch.float64)


def test_rotated_iou_equals_shapely_on_degenerate_boxes():
    boxes = degenerate_boxes()
    got = assert_iou_matches_shapely(boxes, boxes)
    zero_area = boxes[:, 2] * boxes[:, 3] == 0
    assert (got[zero_area] == 0).all() and (got[:, zero_area] == 0).all()  # also with itself
    proper = ~zero_area
    assert torch.allclose(got.diagonal()[proper], torch.ones(int(proper.sum())), atol=1e-6)
    assert got[0, 1] == 0 and got[0, 2] == 0  # touching by an edge, by a corner
    assert got[0, 6:10].tolist() == pytest.approx([1.0] * 4, abs=1e-6)  # ±π/2, ±π: the same square
    assert got[12, 14:16].tolist() == pytest.approx([1.0, 1.0], abs=1e-6)


def test_rotated_iou_degenerate_families_under_random_turns_and_shifts():
    """Each family turned and moved as a whole: exact contacts become inexact in floating point."""
    base = degenerate_boxes()[:17]
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        angle = float((torch.rand(1, generator=gen) * 2 - 1) * PI)
        shift = torch.rand(2, generator=gen, dtype=torch.float64) * 100
        cos, sin = math.cos(angle), math.sin(angle)
        centres = base[:, :2] @ torch.tensor([[cos, -sin], [sin, cos]], dtype=torch.float64) + shift
        boxes = torch.cat([centres, base[:, 2:4], base[:, 4:] + angle], dim=1)
        assert_iou_matches_shapely(boxes, boxes)


def test_rotated_iou_handles_empty_inputs_and_many_pairs():
    boxes = degenerate_boxes()
    assert ops.rotated_iou(boxes[:0], boxes).shape == (0, len(boxes))
    assert ops.rotated_iou(boxes, boxes[:0]).shape == (len(boxes), 0)
    # More pairs than one chunk: rows are split, the result is the same.
    gen = torch.Generator().manual_seed(3)
    a, b = random_boxes(gen, 3000), random_boxes(gen, 40)
    whole = ops.rotated_iou(a, b)
    rows = torch.cat([ops.rotated_iou(a[i : i + 7], b) for i in range(0, 21, 7)])
    assert torch.equal(whole[:21], rows)
    np.testing.assert_allclose(whole[::50].numpy(), shapely_iou(a[::50], b), rtol=0, atol=1e-5)


# Decode and NMS against brute force ---------------------------------------------------------

CLAMP = math.log(1000 / 16)


def wrap(theta):
    """(−π/2, π/2], by hand."""
    while theta > PI / 2:
        theta -= PI
    while theta <= -PI / 2:
        theta += PI
    return theta


def brute_decode(scores, deltas, anchors, stride, threshold, top_n):
    """Every (image, anchor, class, cell) in plain loops: the candidates above threshold,
    best first (ties: smaller flat index), decoded one by one in float64."""
    batch, channels, height, width = scores.shape
    num_anchors = anchors.shape[0]
    num_classes = channels // num_anchors
    out = []
    for i in range(batch):
        found = []
        for a in range(num_anchors):
            acx, acy, aw, ah, alpha = anchors[a].double().tolist()
            for c in range(num_classes):
                for y in range(height):
                    for x in range(width):
                        s = float(scores[i, a * num_classes + c, y, x])
                        if s <= threshold:
                            continue
                        tx, ty, tw, th, ts, tc = (float(deltas[i, a * 6 + j, y, x]) for j in range(6))
                        box = [
                            (x + 0.5) * stride + acx + tx * aw,
                            (y + 0.5) * stride + acy + ty * ah,
                            aw * math.exp(min(tw, CLAMP)),
                            ah * math.exp(min(th, CLAMP)),
                            wrap(alpha + math.atan2(ts, tc) / 2),
                        ]
                        flat = ((a * num_classes + c) * height + y) * width + x
                        found.append((-s, flat, s, box, c))
        found.sort(key=lambda f: (f[0], f[1]))
        out.append([(s, box, c) for _, _, s, box, c in found[:top_n]])
    return out


def brute_nms(scores, boxes, classes, threshold, detections):
    """Greedy NMS in plain loops, IoU by shapely on each box's own polygon."""
    out = []
    for i in range(scores.shape[0]):
        iou = shapely_iou(boxes[i].double(), boxes[i].double())
        order = sorted((j for j in range(scores.shape[1]) if scores[i, j] > 0), key=lambda j: (-float(scores[i, j]), j))
        kept = []
        for j in order:
            if all(classes[i, k] != classes[i, j] or iou[k, j] <= threshold for k in kept):
                kept.append(j)
        out.append([(float(scores[i, j]), boxes[i, j].tolist(), int(classes[i, j])) for j in kept[:detections]])
    return out


def assert_equal_to_brute(got, want, size, atol=1e-4):
    """Full outputs: the brute force's rows in order, then padding (score 0, box 0, class -1)."""
    scores, boxes, classes = got
    assert scores.shape == (len(want), size) and boxes.shape == (len(want), size, 5)
    assert classes.shape == (len(want), size) and classes.dtype == torch.int32
    for i, rows in enumerate(want):
        k = len(rows)
        assert scores[i, :k].tolist() == [s for s, _, _ in rows]
        assert classes[i, :k].tolist() == [c for _, _, c in rows]
        expected = torch.tensor([b for _, b, _ in rows], dtype=torch.float64).reshape(k, 5)
        torch.testing.assert_close(boxes[i, :k].double(), expected, rtol=1e-6, atol=atol)
        assert (scores[i, k:] == 0).all() and (boxes[i, k:] == 0).all() and (classes[i, k:] == -1).all()


def rotated_anchors():
    sizes = [(32.0, 32.0), (45.0, 22.6), (22.6, 45.0)]
    angles = [-PI / 3, 0.0, PI / 3]
    return torch.tensor([[0, 0, w, h, t] for t in angles for w, h in sizes], dtype=torch.float32)


@pytest.mark.parametrize("case", range(8))
def test_decode_rotated_equals_brute_force(case):
    gen = torch.Generator().manual_seed(100 + case)
    anchors = rotated_anchors()
    batch, classes, height, width, stride = [(2, 3, 5, 4, 8), (1, 1, 3, 3, 16), (3, 2, 4, 6, 32), (2, 5, 2, 2, 8)][
        case % 4
    ]
    threshold, top_n = [(0.05, 1000), (0.5, 7), (0.3, 40), (1.0, 10)][case // 2 % 4]
    scores = torch.rand(batch, len(anchors) * classes, height, width, generator=gen)
    if case % 2:  # few distinct values: ties, broken by the flat index
        scores = (scores * 4).floor() / 4
    deltas = torch.randn(batch, len(anchors) * 6, height, width, generator=gen)
    deltas[:, 2::6] *= 5  # some widths beyond the clamp
    got = ops.decode_rotated(scores, deltas, anchors, stride, threshold, top_n, CLAMP)
    want = brute_decode(scores, deltas, anchors, stride, threshold, top_n)
    assert_equal_to_brute(got, want, top_n, atol=1e-3)
    if threshold >= 1.0:
        assert all(not rows for rows in want)  # all below threshold: only padding


def test_decode_rotated_with_an_empty_level_and_more_candidates_than_top_n():
    anchors = rotated_anchors()
    empty = ops.decode_rotated(torch.rand(2, 9, 0, 0), torch.rand(2, 54, 0, 0), anchors, 8, 0.05, 5, CLAMP)
    assert_equal_to_brute(empty, [[], []], 5)
    scores = torch.full((1, 9, 2, 2), 0.5)  # 36 candidates, all tied: the first 4 by flat index
    deltas = torch.zeros(1, 54, 2, 2)
    got = ops.decode_rotated(scores, deltas, anchors, 8, 0.05, 4, CLAMP)
    assert_equal_to_brute(got, brute_decode(scores, deltas, anchors, 8, 0.05, 4), 4)


def random_rotated_candidates(gen, batch, n, classes, ties=False):
    boxes = random_boxes(gen, batch * n, spread=60.0, size=25.0).float().reshape(batch, n, 5)
    scores = torch.rand(batch, n, generator=gen)
    if ties:
        scores = (scores * 4).floor() / 4 + 0.25
    cls = torch.randint(0, classes, (batch, n), generator=gen, dtype=torch.int32)
    return scores, boxes, cls


@pytest.mark.parametrize("case", range(12))
def test_nms_rotated_equals_brute_force(case):
    gen = torch.Generator().manual_seed(200 + case)
    kind = case % 6
    batch, n = [(2, 0), (2, 5), (3, 60), (2, 200), (1, 150), (3, 40)][kind]
    detections = [10, 10, 5, 100, 100, 7][kind]
    threshold = [0.5, 0.5, 0.3, 0.5, 0.1, 0.7][kind]
    scores, boxes, cls = random_rotated_candidates(gen, batch, n, [1, 2, 3, 2, 1, 4][kind], ties=case % 2 == 0)
    if kind == 1:
        scores.zero_()  # nothing above zero: all padding
    if kind == 5:
        scores[1] = 0  # an empty image beside full ones
    got = ops.nms_rotated(scores, boxes, cls, threshold, detections)
    want = brute_nms(scores, boxes, cls, threshold, detections)
    assert_equal_to_brute(got, want, detections, atol=0)
    if kind == 3:
        assert len(want[0]) == detections  # more survivors than room: the best ones


# The behaviours ODTK's rotated detector got wrong -------------------------------------------


def one_image(*boxes):
    b = torch.tensor([boxes], dtype=torch.float32)
    n = b.shape[1]
    return torch.linspace(0.9, 0.5, n)[None], b, torch.zeros(1, n, dtype=torch.int32)


def test_nms_measures_each_box_with_its_own_angle():
    """ODTK's NMS turned both boxes by one angle. A cross of two bars overlaps little with
    its own angles (both survive) but completely with one angle for both."""
    scores, boxes, cls = one_image([0, 0, 10, 2, 0], [0, 0, 10, 2, PI / 2])
    assert float(ops.rotated_iou(boxes[0, :1], boxes[0, 1:])) == pytest.approx(4 / 36, abs=1e-6)
    s, b, c = ops.nms_rotated(scores, boxes, cls, 0.5, 3)
    assert s[0].tolist() == pytest.approx([0.9, 0.5, 0]) and c[0].tolist() == [0, 0, -1]
    torch.testing.assert_close(b[0], torch.cat([boxes[0], torch.zeros(1, 5)]), rtol=0, atol=0)
    # The same rectangle in its two forms: IoU 1 with the own angles (suppressed), a cross
    # with the second's angle for both.
    scores, boxes, cls = one_image([0, 0, 10, 2, 0], [0, 0, 2, 10, PI / 2])
    s, b, c = ops.nms_rotated(scores, boxes, cls, 0.5, 3)
    assert s[0].tolist() == pytest.approx([0.9, 0, 0]) and c[0].tolist() == [0, -1, -1]
    torch.testing.assert_close(b[0], torch.cat([boxes[0, :1], torch.zeros(2, 5)]), rtol=0, atol=0)


def test_positive_angles_turn_anti_clockwise_on_screen_everywhere():
    """ODTK drew its output polygons turned the other way from the boxes it trained and
    suppressed. Here one formula: with y down, θ > 0 lifts a wide box's top-right corner."""
    box = torch.tensor([[10.0, 20.0, 4.0, 2.0, 0.3]])
    top_right = rotated.corners(box)[0, 1]
    assert top_right[1] < 20 - 1 and top_right[0] < 10 + 2  # up (smaller y) and in
    # A quarter turn by hand: the unrotated top-left goes to the bottom-left, and so on.
    quarter = rotated.polygons(torch.tensor([[10.0, 20.0, 4.0, 2.0, PI / 2]]))[0]
    torch.testing.assert_close(quarter, torch.tensor([9.0, 22, 9, 18, 11, 18, 11, 22]), rtol=0, atol=1e-5)
    bbox = rotated.to_xywha(torch.tensor([[10.0, 20.0, 4.0, 2.0, 0.3]]))
    assert bbox[0].tolist() == pytest.approx([8.0, 19.0, 4.0, 2.0, 0.3])
    # The IoU (and so NMS) is that of the output polygons, not of their mirror images.
    fixed = torch.tensor([[13.5, 18.5, 2.0, 2.0, 0.0]])
    tilted = torch.tensor([[10.0, 20.0, 8.0, 1.0, 0.4], [10.0, 20.0, 8.0, 1.0, -0.4]])
    iou = ops.rotated_iou(tilted, fixed)[:, 0]
    polys = [shapely.Polygon(p.reshape(4, 2).tolist()) for p in rotated.polygons(torch.cat([tilted, fixed]))]
    want = [polys[i].intersection(polys[2]).area / polys[i].union(polys[2]).area for i in range(2)]
    assert iou.tolist() == pytest.approx(want, abs=1e-6)
    assert want[0] > 0.05 and want[1] == 0  # only the box turned anti-clockwise reaches up-right


def test_decode_ignores_the_scale_of_the_angle_pair():
    """ODTK decoded (ts, tc) as they came out; only their direction may matter."""
    gen = torch.Generator().manual_seed(7)
    anchors = rotated_anchors()
    scores = torch.rand(2, 18, 4, 4, generator=gen)
    deltas = torch.randn(2, 54, 4, 4, generator=gen)
    scaled = deltas.clone()
    scaled[:, 4::6] *= 5
    scaled[:, 5::6] *= 5
    plain = ops.decode_rotated(scores, deltas, anchors, 8, 0.05, 100, CLAMP)
    big = ops.decode_rotated(scores, scaled, anchors, 8, 0.05, 100, CLAMP)
    torch.testing.assert_close(big, plain, rtol=0, atol=1e-5)
    after = [ops.nms_rotated(*out, 0.3, 50) for out in (plain, big)]
    torch.testing.assert_close(after[1], after[0], rtol=0, atol=1e-5)
    assert (after[0][2] >= 0).sum() < (plain[2] >= 0).sum()  # NMS did suppress


def test_decode_does_not_clip_rotated_boxes():
    """ODTK clipped rotated boxes' unrotated extents to the image, moving their centres,
    shrinking them, and inverting boxes wholly outside."""
    anchors = torch.tensor([[0.0, 0.0, 64.0, 16.0, PI / 4]])
    scores = torch.zeros(1, 1, 2, 2)
    scores[0, 0, 0, 0] = 0.9  # the top-left cell, centre (4, 4)
    scores[0, 0, 1, 1] = 0.8  # the bottom-right cell, centre (12, 12): past the 16 x 16 input
    deltas = torch.zeros(1, 6, 2, 2)
    deltas[0, :, 0, 0] = torch.tensor([-1.0, -2.0, math.log(2), 0.0, 0.0, 1.0])
    deltas[0, :, 1, 1] = torch.tensor([1.0, 3.0, 0.0, math.log(3), 1.0, 0.0])
    _, boxes, _ = ops.decode_rotated(scores, deltas, anchors, 8, 0.05, 2, CLAMP)
    want = torch.tensor([[4 - 64, 4 - 32, 128, 16, PI / 4], [12 + 64, 12 + 48, 64, 48, wrap(PI / 4 + PI / 4)]])
    torch.testing.assert_close(boxes[0], want, rtol=0, atol=1e-4)


# Encode -------------------------------------------------------------------------------------


def random_targets(gen, n):
    gt = random_boxes(gen, n, spread=100.0, size=80.0)
    anchors = random_boxes(gen, n, spread=100.0, size=80.0)
    gt[:, 4] = (1 - 2 * torch.rand(n, generator=gen, dtype=torch.float64)) * PI  # (−π, π]
    gt[0, 4], gt[1, 4], gt[2, 4] = PI, -PI / 2, PI / 2
    anchors[:, 4] = torch.tensor([-PI / 3, 0.0, PI / 3, PI / 2], dtype=torch.float64)[torch.arange(n) % 4]
    return gt, anchors


def test_encode_then_decode_gives_back_the_rectangle():
    gen = torch.Generator().manual_seed(8)
    gt, anchors = random_targets(gen, 2000)
    targets = rotated.encode(gt, anchors)
    assert (targets[:, 2] >= targets[:, 3] + torch.log(anchors[:, 3] / anchors[:, 2]) - 1e-9).all()  # long side first
    back = rotated.decode(targets, anchors, box_clamp=1e9)
    # The same rectangle, maybe in its other form: the same four corners, IoU 1.
    want, got = rotated.corners(gt), rotated.corners(back)
    nearest = (want[:, :, None, :] - got[:, None, :, :]).norm(dim=-1).min(dim=2).values
    assert nearest.max() < 1e-6
    np.testing.assert_allclose(rotated.iou_pairs(gt, back).numpy(), 1.0, atol=1e-6)
    assert ((back[:, 4] > -PI / 2) & (back[:, 4] <= PI / 2)).all()


def test_encode_gives_one_target_per_rectangle():
    """ODTK regressed the absolute (sin θ, cos θ): θ and θ + π, one rectangle, got opposite targets."""
    gen = torch.Generator().manual_seed(9)
    gt, anchors = random_targets(gen, 2000)
    targets = rotated.encode(gt, anchors)
    half_turn = gt + torch.tensor([0, 0, 0, 0, PI], dtype=torch.float64)
    other_form = gt[:, [0, 1, 3, 2, 4]] + torch.tensor([0, 0, 0, 0, PI / 2], dtype=torch.float64)
    for same in (half_turn, other_form, other_form - torch.tensor([0, 0, 0, 0, PI], dtype=torch.float64)):
        torch.testing.assert_close(rotated.encode(same, anchors), targets, rtol=0, atol=1e-9)


def test_encode_by_hand():
    anchor = torch.tensor([[10.0, 20.0, 8.0, 4.0, 0.2]], dtype=torch.float64)
    targets = rotated.encode(torch.tensor([[12.0, 19.0, 16.0, 4.0, 0.2 + 0.3]], dtype=torch.float64), anchor)
    want = [0.25, -0.25, math.log(2), 0.0, math.sin(0.6), math.cos(0.6)]
    assert targets[0].tolist() == pytest.approx(want)
    # 1.2 from the anchor's angle, long side first already: twice 1.2 from it.
    targets = rotated.encode(torch.tensor([[10.0, 20.0, 16.0, 4.0, 0.2 + 1.2]], dtype=torch.float64), anchor)
    want = [0.0, 0.0, math.log(16 / 8), math.log(4 / 4), math.sin(2.4), math.cos(2.4)]
    assert targets[0].tolist() == pytest.approx(want)
    # Written short side first: as (16, 4, θ + π/2), 0.5 + π/2 from the anchor.
    targets = rotated.encode(torch.tensor([[10.0, 20.0, 4.0, 16.0, 0.2 + 0.5]], dtype=torch.float64), anchor)
    want = [0.0, 0.0, math.log(16 / 8), math.log(4 / 4), math.sin(1.0 + PI), math.cos(1.0 + PI)]
    assert targets[0].tolist() == pytest.approx(want)
    assert rotated.encode(anchor, anchor)[0].tolist() == pytest.approx([0, 0, 0, 0, 0, 1])


def test_encode_moves_continuously_as_a_rectangle_turns():
    """A 16 x 4 rectangle turning through every angle against a square anchor (which matches it at
    any angle): no jump in any target (writing it in the form nearest the anchor's angle jumps at
    ±π/4, sin from +1 to -1 and w, h swapped)."""
    angles = torch.linspace(-PI, PI, 3601, dtype=torch.float64)
    gt = torch.stack(
        [
            torch.full_like(angles, 10),
            torch.full_like(angles, 20),
            torch.full_like(angles, 16),
            torch.full_like(angles, 4),
            angles,
        ],
        dim=1,
    )
    anchor = torch.tensor([[10.0, 20.0, 8.0, 8.0, 0.3]], dtype=torch.float64).expand(len(angles), -1)
    for form in (gt, gt[:, [0, 1, 3, 2, 4]] + torch.tensor([0, 0, 0, 0, PI / 2], dtype=torch.float64)):
        targets = rotated.encode(form, anchor)
        assert (targets[1:] - targets[:-1]).abs().max() < 0.01
