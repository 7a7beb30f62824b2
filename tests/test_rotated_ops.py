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
