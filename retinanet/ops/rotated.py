"""Rotated-box math on tensors: corners, exact IoU, encode/decode (docs/rotated.md).

Boxes are (cx, cy, w, h, θ): the w x h rectangle centred on (cx, cy), turned by θ
radians, anti-clockwise on screen (y points down). These plain functions are the
executable form of that page, shared by the reference ops, training and the output
records, so each formula exists once.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# The corner offsets (dx, dy) in units of (w/2, h/2), in the documented order:
# unrotated top-left, top-right, bottom-right, bottom-left.
_SIGNS = ((-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0))

# Pairs per chunk in rotated_iou_reference: a pair holds 24 candidate points and
# their temporaries (a few KiB in float64), so this bounds memory near 256 MiB.
_PAIRS_PER_CHUNK = 1 << 16

# Relative slack of the "inside or on" tests: a corner lying exactly on the other
# box's edge must count although rounding puts it a hair outside, or collinear and
# touching boxes lose vertices. A point admitted by the slack is within ~1e-9 of
# the boundary, so it moves the area by that much at most.
_SLACK = 1e-9


def wrap_half_turn(theta: Tensor) -> Tensor:
    """θ wrapped into (−π/2, π/2]: a rectangle turned by θ + π is the same rectangle."""
    return theta - math.pi * torch.ceil((theta - math.pi / 2) / math.pi)


def corners(boxes: Tensor) -> Tensor:
    """The four corners of boxes [..., 5] -> [..., 4, 2], in the documented order."""
    cx, cy, w, h, theta = boxes.unbind(-1)
    cos, sin = torch.cos(theta), torch.sin(theta)
    signs = torch.tensor(_SIGNS, dtype=boxes.dtype, device=boxes.device)  # [4, 2]
    dx = signs[:, 0] * (w / 2)[..., None]
    dy = signs[:, 1] * (h / 2)[..., None]
    x = cx[..., None] + dx * cos[..., None] + dy * sin[..., None]
    y = cy[..., None] - dx * sin[..., None] + dy * cos[..., None]
    return torch.stack([x, y], dim=-1)


def polygons(boxes: Tensor) -> Tensor:
    """The corners as a flat list [..., 8] (x1, y1, ..., x4, y4): the `segmentation` of a result."""
    return corners(boxes).flatten(-2)


def to_xywha(boxes: Tensor) -> Tensor:
    """(cx, cy, w, h, θ) -> the result record's bbox (cx − w/2, cy − h/2, w, h, θ)."""
    cx, cy, w, h, theta = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, w, h, theta], dim=-1)


def _cross(u: Tensor, v: Tensor) -> Tensor:
    return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]


def _inside(points: Tensor, box: Tensor) -> Tensor:
    """points [..., P, 2] inside or on box [..., 5] (same frame) -> [..., P] bool."""
    cx, cy, w, h, theta = box[..., None].unbind(-2)  # each [..., 1]
    cos, sin = torch.cos(theta), torch.sin(theta)
    px, py = points[..., 0] - cx, points[..., 1] - cy
    # The inverse of the corner formula: the offsets (dx, dy) in the box's own axes.
    dx = cos * px - sin * py
    dy = sin * px + cos * py
    slack = _SLACK * (w.abs() + h.abs() + cx.abs() + cy.abs())
    return (dx.abs() <= w.abs() / 2 + slack) & (dy.abs() <= h.abs() / 2 + slack)


def _edge_crossings(pa: Tensor, pb: Tensor) -> tuple[Tensor, Tensor]:
    """Where the edges of polygons pa, pb [..., 4, 2] cross: points [..., 16, 2] and a mask [..., 16]."""
    p1 = pa[..., :, None, :]  # edge i of a runs p1 -> p1 + d1
    d1 = (pa.roll(-1, dims=-2) - pa)[..., :, None, :]
    q1 = pb[..., None, :, :]
    d2 = (pb.roll(-1, dims=-2) - pb)[..., None, :, :]
    denom = _cross(d1, d2)
    # Parallel edges have no single crossing; where they overlap, the ends of the
    # overlap are corners, which the inside tests already supply.
    parallel = denom == 0
    safe = torch.where(parallel, torch.ones_like(denom), denom)
    t = _cross(q1 - p1, d2) / safe
    s = _cross(q1 - p1, d1) / safe
    ok = ~parallel & (t >= -_SLACK) & (t <= 1 + _SLACK) & (s >= -_SLACK) & (s <= 1 + _SLACK)
    points = p1 + t.clamp(0, 1)[..., None] * d1
    return points.flatten(-3, -2), ok.flatten(-2)


def _polygon_area(points: Tensor, valid: Tensor) -> Tensor:
    """Area of the convex hull of the valid points [..., P, 2] (all vertices of a convex polygon)."""
    count = valid.sum(-1, keepdim=True)
    mean = (points * valid[..., None]).sum(-2) / count.clamp(min=1)
    rel = points - mean[..., None, :]
    # The mean of the vertices lies inside a convex polygon, so the angle about it
    # orders them around the boundary. Invalid points sort last (angles <= π < 4).
    angle = torch.where(valid, torch.atan2(rel[..., 1], rel[..., 0]), torch.full_like(rel[..., 0], 4.0))
    order = angle.argsort(dim=-1)
    rel = rel.gather(-2, order[..., None].expand_as(rel))
    ordered_valid = valid.gather(-1, order)
    # Invalid slots repeat the first vertex: each adds a zero-length edge, so the
    # shoelace sum over all P slots is the polygon's.
    rel = torch.where(ordered_valid[..., None], rel, rel[..., :1, :])
    area = _cross(rel, rel.roll(-1, dims=-2)).sum(-1) / 2
    return torch.where(count[..., 0] >= 3, area.abs(), torch.zeros_like(area))


def iou_pairs(a: Tensor, b: Tensor) -> Tensor:
    """IoU of boxes a [..., 5] and b [..., 5], paired element by element (broadcast): [...].

    Float64 throughout; coordinates are taken relative to a's centre.
    """
    a, b = torch.broadcast_tensors(a.double(), b.double())
    shift = torch.cat([a[..., :2], torch.zeros_like(a[..., 2:])], dim=-1)
    a, b = a - shift, b - shift
    pa, pb = corners(a), corners(b)
    crossing, crossing_ok = _edge_crossings(pa, pb)
    points = torch.cat([pa, pb, crossing], dim=-2)  # [..., 24, 2]
    valid = torch.cat([_inside(pa, b), _inside(pb, a), crossing_ok], dim=-1)
    inter = _polygon_area(points, valid)
    area_a = a[..., 2] * a[..., 3]
    area_b = b[..., 2] * b[..., 3]
    # A box of zero area has IoU 0 with everything, itself included (never 0 / 0).
    proper = (area_a > 0) & (area_b > 0)
    union = torch.where(proper, area_a + area_b - inter, torch.ones_like(inter))
    return torch.where(proper, (inter / union).clamp(0, 1), torch.zeros_like(inter))


def may_overlap(a: Tensor, b: Tensor) -> Tensor:
    """Whether boxes a [..., 5] and b [..., 5] (broadcast) can intersect: their circumscribed
    circles meet. Pairs outside it have IoU 0, so the polygon work is spent on the others."""
    reach = (torch.hypot(a[..., 2], a[..., 3]) + torch.hypot(b[..., 2], b[..., 3])) / 2
    return torch.hypot(a[..., 0] - b[..., 0], a[..., 1] - b[..., 1]) <= reach * (1 + 1e-6)


def masked_iou_pairs(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """iou_pairs(a, b) (float32) where `mask` and may_overlap hold, 0 elsewhere."""
    a, b = torch.broadcast_tensors(a, b)
    out = torch.zeros(a.shape[:-1], dtype=torch.float32, device=a.device)
    where = (mask & may_overlap(a, b)).nonzero(as_tuple=True)
    if where[0].numel():
        out[where] = iou_pairs(a[where], b[where]).float()
    return out


def rotated_iou_reference(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU of rotated boxes a [N, 5] x b [M, 5] -> [N, M] float32 (docs/rotated.md).

    Exact convex-polygon intersection in float64, in chunks of rows so that N x M
    may be large (all anchors against all ground truth); only pairs that may_overlap
    are computed.
    """
    n, m = a.shape[0], b.shape[0]
    out = torch.zeros(n, m, dtype=torch.float32, device=a.device)
    if n == 0 or m == 0:
        return out
    rows = max(1, _PAIRS_PER_CHUNK // m)
    b = b.to(a.device)
    for start in range(0, n, rows):
        chunk = a[start : start + rows, None, :]
        out[start : start + rows] = masked_iou_pairs(chunk, b[None], torch.ones((), dtype=torch.bool))
    return out


def encode(gt: Tensor, anchors: Tensor) -> Tensor:
    """Regression targets (tx, ty, tw, th, ts, tc) [K, 6] of boxes gt [K, 5] against anchors [K, 5].

    The target is first written long side first: of its forms (w, h, θ) / (h, w, θ + π/2), the
    one with w >= h. One rectangle then gets one target, and the target moves continuously as
    the rectangle turns (sin, cos of twice the angle to the anchor); it jumps only where w and
    h are about equal, where the turn of a rectangle is ambiguous anyway. (Choosing the form
    nearest the anchor's angle instead jumps at ±π/4 from every anchor, which square anchors
    match at any angle.)
    """
    acx, acy, aw, ah, alpha = anchors.unbind(-1)
    cx, cy, w, h, theta = gt.unbind(-1)
    swap = h > w
    theta = theta + math.pi / 2 * swap.to(theta.dtype)
    w, h = torch.where(swap, h, w), torch.where(swap, w, h)
    d = 2 * (theta - alpha)
    return torch.stack(
        [(cx - acx) / aw, (cy - acy) / ah, torch.log(w / aw), torch.log(h / ah), torch.sin(d), torch.cos(d)],
        dim=-1,
    )


def decode(deltas: Tensor, anchors: Tensor, box_clamp: float) -> Tensor:
    """Boxes [K, 5] from deltas (tx, ty, tw, th, ts, tc) [K, 6] and anchors [K, 5].

    tw, th are clamped at box_clamp before exp; only the direction of (ts, tc) matters.
    No clipping: clipping a rotated box's extents would move its centre and change its size.
    """
    acx, acy, aw, ah, alpha = anchors.unbind(-1)
    tx, ty, tw, th, ts, tc = deltas.unbind(-1)
    theta = wrap_half_turn(alpha + torch.atan2(ts, tc) / 2)
    w = aw * torch.exp(tw.clamp(max=box_clamp))
    h = ah * torch.exp(th.clamp(max=box_clamp))
    return torch.stack([acx + tx * aw, acy + ty * ah, w, h, theta], dim=-1)
