"""The rotated-box CUDA operators (csrc/kernels/rotated.h) give the reference results.

torch.ops.retinanet.rotated_iou / decode_rotated / nms_rotated against
retinanet.ops.rotated.rotated_iou_reference and retinanet.ops.reference's
decode_rotated / nms_rotated, full outputs compared: decode's scores and classes
exactly, its boxes within rounding (angles modulo a half turn); NMS equal to the
reference or, where the float32 IoU of the kernels and the float64 IoU of the
reference fall on either side of the threshold, a greedy NMS that decided only such
ties otherwise. GPU tests are marked `gpu` and skipped without a CUDA device or
without the built extension.
"""

import functools
import math
import os
import re
import sys

import cuda_cases
import numpy as np
import pytest
import torch
from cuda_cases import CLAMP, DECODE_MODES, STRIDES, assert_same_candidates, candidates, detect, gpu, make_scores

from retinanet.ops import reference, rotated

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "plugins"))
import compare  # noqa: E402

EXTENSION_ERROR = cuda_cases.extension_error(
    "decode_rotated", stale="retinanet._C predates the rotated operators: rebuild it"
)
needs_extension = cuda_cases.needs_extension(EXTENSION_ERROR, unusable="not usable")
# The rotated kind of cuda_cases' inputs: 6 deltas an anchor, rotated boxes.
make_deltas = functools.partial(cuda_cases.make_deltas, rotated=True)
make_nms_inputs = functools.partial(cuda_cases.make_nms_inputs, rotated=True)


# --------------------------------------------------------------------------- schema / tracing (any machine)


def test_rotated_ops_meta_shapes_and_schemas():
    if EXTENSION_ERROR is not None:
        pytest.skip(f"retinanet._C not usable: {EXTENSION_ERROR}")
    for dtype in (torch.float32, torch.float16):
        rotated_ops = (torch.ops.retinanet.decode_rotated, torch.ops.retinanet.nms_rotated)
        cuda_cases.assert_meta_shapes(*rotated_ops, dtype, 18, rotated=True)
        iou = torch.ops.retinanet.rotated_iou(torch.empty(4, 5, device="meta", dtype=dtype), torch.empty(7, 5))
        assert iou.shape == (4, 7) and iou.dtype == torch.float32
    names = {
        "rotated_iou": ["a", "b"],
        "decode_rotated": ["cls_scores", "box_deltas", "anchors", "stride", "score_threshold", "top_n", "box_clamp"],
        "nms_rotated": ["scores", "boxes", "classes", "iou_threshold", "detections"],
    }
    for op, args in names.items():
        assert [a.name for a in getattr(torch.ops.retinanet, op).default._schema.arguments] == args


# --------------------------------------------------------------------------- inputs


def rotated_anchors(stride, angles=(-60.0, 0.0, 60.0)):
    """A level's [27, 5] table: 3 angles x 3 ratios x 3 scales, the angle varying slowest."""
    rows = []
    for angle in angles:
        for ratio in (0.5, 1.0, 2.0):
            for scale in (4.0, 4.0 * 2 ** (1 / 3), 4.0 * 2 ** (2 / 3)):
                size = stride * scale
                rows.append([0.0, 0.0, size / math.sqrt(ratio), size * math.sqrt(ratio), math.radians(angle)])
    return torch.tensor(rows)


def decode_case(case):
    g = torch.Generator().manual_seed(5000 + case)
    mode = DECODE_MODES[case % len(DECODE_MODES)]
    dtype = [torch.float32, torch.float16, torch.float32, torch.float16, torch.bfloat16][case % 5]
    batch = [1, 2, 3, 4][case % 4]
    stride = [8, 16, 32, 64, 128][(case // 2) % 5]
    if case % 3 == 0:
        anchors = rotated_anchors(stride)
    else:  # any table: random sizes and angles
        a = [1, 6][case % 2]
        wh = torch.rand(a, 2, generator=g) * 60 + 4
        angles = (torch.rand(a, 1, generator=g) - 0.5) * 2 * math.pi
        anchors = torch.cat([torch.zeros(a, 2), wh, angles], 1)
    classes = [1, 4, 7, 80][(case // 3) % 4]
    h = int(torch.randint(1, 30, (1,), generator=g))
    w = int(torch.randint(1, 30, (1,), generator=g))
    top_n = [1, 10, 100, 1000, 57][case % 5]
    threshold = [0.05, 0.0, 0.3, 0.05][case % 4]
    a = anchors.shape[0]
    scores = make_scores(g, (batch, a * classes, h, w), mode, threshold)
    deltas = make_deltas(g, (batch, a * 6, h, w))
    return scores, deltas, anchors, stride, threshold, top_n, dtype


def assert_decode_equal(ours, ref):
    assert_same_candidates(ours, ref)
    b, rb = ours[1], ref[1]
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(b.dtype, 1e-5)
    got, want = b.float().cpu(), rb.float().cpu()
    torch.testing.assert_close(got[..., :4], want[..., :4], rtol=tol, atol=tol * 10)
    # θ and θ ± π are one rectangle: a wrap decided on the other side of ±π/2 is no difference.
    assert float(np.max(compare.angle_difference(got[..., 4].numpy(), want[..., 4].numpy()), initial=0)) <= tol * 4


# --------------------------------------------------------------------------- decode


@gpu
@needs_extension
@pytest.mark.parametrize("case", range(120))
def test_decode_rotated_equals_reference(case):
    scores, deltas, anchors, stride, threshold, top_n, dtype = decode_case(case)
    scores, deltas, anchors = scores.to("cuda", dtype), deltas.to("cuda", dtype), anchors.cuda()
    ours = torch.ops.retinanet.decode_rotated(scores, deltas, anchors, stride, threshold, top_n, CLAMP)
    ref = reference.decode_rotated(scores, deltas, anchors, stride, threshold, top_n, CLAMP)
    assert_decode_equal(ours, ref)


@gpu
@needs_extension
@pytest.mark.parametrize("mode", ["sparse", "equal", "ties", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_rotated_full_size_level(mode, dtype):
    """P3 of an 800x1333 input with 27 anchors and 80 classes: millions of scores, far more
    candidates than top_n; 'equal' and 'ties' overflow the boundary bucket."""
    g = torch.Generator().manual_seed(8)
    shape = (4 if mode == "mixed" else 2, 27 * 80, 100, 167)
    scores = make_scores(g, shape, mode, 0.05).to("cuda", dtype)
    deltas = make_deltas(g, (shape[0], 27 * 6, 100, 167)).to("cuda", dtype)
    anchors = rotated_anchors(8).cuda()
    ours = torch.ops.retinanet.decode_rotated(scores, deltas, anchors, 8, 0.05, 1000, CLAMP)
    ref = reference.decode_rotated(scores, deltas, anchors, 8, 0.05, 1000, CLAMP)
    assert_decode_equal(ours, ref)


@gpu
@needs_extension
def test_decode_rotated_degenerate_sizes_and_angles():
    anchors = rotated_anchors(8).cuda()
    scores = torch.rand(2, 27, 0, 5, device="cuda")  # an empty feature map: all padding
    deltas = torch.zeros(2, 162, 0, 5, device="cuda")
    out = torch.ops.retinanet.decode_rotated(scores, deltas, anchors, 8, 0.05, 10, 4)
    assert_decode_equal(out, reference.decode_rotated(scores, deltas, anchors, 8, 0.05, 10, 4))
    s, b, c = torch.ops.retinanet.decode_rotated(
        torch.rand(0, 27, 5, 5, device="cuda"), torch.zeros(0, 162, 5, 5, device="cuda"), anchors, 8, 0.05, 10, 4
    )
    assert s.shape == (0, 10) and b.shape == (0, 10, 5) and c.shape == (0, 10)
    # Angle deltas on the wrap's edges, per column x: (ts, tc) = (0, -1) turns by π/2 exactly
    # (α = 0 lands on π/2 itself), (-0, 1) by -0, (0, 0) by atan2(0, 0) = 0, (1, -1e-30) by ~π/4.
    scores = torch.full((1, 27, 4, 4), 0.5, device="cuda")
    deltas = torch.zeros(1, 27, 6, 4, 4)
    deltas[:, :, 4] = torch.tensor([0.0, -0.0, 0.0, 1.0])
    deltas[:, :, 5] = torch.tensor([-1.0, 1.0, 0.0, -1e-30])
    deltas = deltas.reshape(1, 162, 4, 4).cuda()
    ours = torch.ops.retinanet.decode_rotated(scores, deltas, anchors, 8, 0.05, 432, 4)
    assert_decode_equal(ours, reference.decode_rotated(scores, deltas, anchors, 8, 0.05, 432, 4))
    theta = ours[1][..., 4]
    assert bool(((theta > -math.pi / 2 - 1e-6) & (theta <= math.pi / 2 + 1e-6)).all())


ROTATED_REFUSAL = (
    """
import torch
import retinanet._C
scores, anchors = torch.rand(1, 27, 4, 4, device="cuda"), torch.zeros(27, 5, device="cuda")
four, six = torch.zeros(1, 108, 4, 4, device="cuda"), torch.zeros(1, 162, 4, 4, device="cuda")
calls = (
    lambda: torch.ops.retinanet.decode_rotated(scores, four, anchors, 8, 0.05, 5, 4),
    lambda: torch.ops.retinanet.decode_rotated(scores, six, anchors[:, :4], 8, 0, 5, 4),
    lambda: torch.ops.retinanet.rotated_iou(anchors[:, :4], anchors),
)
"""
    + cuda_cases.CALL_EACH
)


@gpu
@needs_extension
def test_rotated_ops_refuse_axis_aligned_shapes():
    """Axis-aligned shapes (4 deltas or 4 anchor values per anchor) are refused with a message.
    In a child process, as in test_cuda_ops.py: an error thrown inside the extension has been
    seen to crash the process instead of raising; a crash must fail this test only."""
    lines = cuda_cases.child_lines(ROTATED_REFUSAL)
    assert len(lines) == 3, lines
    assert re.search(r"box_deltas must be \[B, A\*6, H, W\]", lines[0]), lines
    assert re.search(r"anchors must be \[A, 5\]", lines[1]), lines
    assert "rotated_iou" in lines[2] and "accepted" not in lines[2], lines


# --------------------------------------------------------------------------- NMS


def assert_nms_equal(ours, ref, inputs, threshold):
    """Equal to the reference image by image; an image that differs must be a greedy NMS of
    its own candidates that decided only IoU ties (compare.ROTATED_TIE_EPS) otherwise."""
    cuda_cases.assert_nms_equal(ours, ref, inputs, threshold, compare.rotated_nms_violation)


def test_nms_check_catches_altered_outputs():
    g = torch.Generator().manual_seed(0)
    inputs = make_nms_inputs(g, 2, 200, 3, "plain")
    ref = reference.nms_rotated(*inputs, 0.3, 200)
    assert_nms_equal(ref, ref, inputs, 0.3)
    k = int((ref[0][0] > 0).sum())
    assert 10 < k < 200
    for alter in ("drop", "move", "class", "order"):
        s, b, c = (t.clone() for t in ref)
        if alter == "drop":
            s[0, 5 : k - 1], b[0, 5 : k - 1], c[0, 5 : k - 1] = s[0, 6:k].clone(), b[0, 6:k].clone(), c[0, 6:k].clone()
            s[0, k - 1], b[0, k - 1], c[0, k - 1] = 0, 0, -1
        elif alter == "move":
            b[0, 3, 4] += 0.1
        elif alter == "class":
            c[0, 3] = (c[0, 3] + 1) % 3
        elif s[0, 2] != s[0, 3]:
            s[0, [2, 3]], b[0, [2, 3]], c[0, [2, 3]] = s[0, [3, 2]], b[0, [3, 2]], c[0, [3, 2]]
        else:
            continue
        with pytest.raises(AssertionError, match="image 0"):
            assert_nms_equal((s, b, c), ref, inputs, 0.3)


NMS_SIZES = [1, 7, 63, 64, 65, 200, 1000, 3000]


@gpu
@needs_extension
@pytest.mark.parametrize("case", range(100))
def test_nms_rotated_equals_reference(case):
    g = torch.Generator().manual_seed(6000 + case)
    mode = ["plain", "ties", "grid", "copies"][case % 4]
    batch = [1, 2, 3, 4, 8][case % 5]
    n = NMS_SIZES[case % len(NMS_SIZES)]
    if n >= 1000:
        batch = min(batch, 2)
    classes = [1, 3, 80, 2][(case // 3) % 4]
    detections = [100, 1, 10, 300, 100][(case // 2) % 5]
    threshold = [0.5, 0.3, 0.7, 0.5][(case // 4) % 4]
    dtype = [torch.float32, torch.float16, torch.float32, torch.bfloat16][case % 4] if case % 7 else torch.float16
    scores, boxes, cls = make_nms_inputs(g, batch, n, classes, mode)
    scores, boxes, cls = scores.to("cuda", dtype), boxes.to("cuda", dtype), cls.cuda()
    ours = torch.ops.retinanet.nms_rotated(scores, boxes, cls, threshold, detections)
    ref = reference.nms_rotated(scores, boxes, cls, threshold, detections)
    assert_nms_equal(ours, ref, (scores, boxes, cls), threshold)


@gpu
@needs_extension
@pytest.mark.parametrize("n", [8192, 8193, 12000])
def test_nms_rotated_large_candidate_sets(n):
    """Up to 8192 candidates are sorted by counting ranks; more take the CUB segmented sort."""
    g = torch.Generator().manual_seed(n)
    scores, boxes, cls = make_nms_inputs(g, 2, n, 5, "ties")
    scores, boxes, cls = scores.cuda(), boxes.cuda(), cls.cuda()
    ours = torch.ops.retinanet.nms_rotated(scores, boxes, cls, 0.5, 100)
    ref = reference.nms_rotated(scores, boxes, cls, 0.5, 100)
    assert_nms_equal(ours, ref, (scores, boxes, cls), 0.5)


@gpu
@needs_extension
def test_nms_rotated_edge_cases():
    for n, det, fill in [(0, 5, 0.5), (3, 10, 0.5), (20, 5, 0.0), (20, 5, -1.0)]:
        scores = torch.full((2, n), fill, device="cuda")
        boxes = torch.rand(2, n, 5, device="cuda") * 50 + 1
        cls = torch.zeros(2, n, dtype=torch.int64, device="cuda")
        ours = torch.ops.retinanet.nms_rotated(scores, boxes, cls, 0.5, det)
        assert_nms_equal(ours, reference.nms_rotated(scores, boxes, cls, 0.5, det), (scores, boxes, cls), 0.5)
    # A half-turned copy is the same rectangle (IoU 1); a quarter-turned square too; a
    # zero-area box suppresses nothing and is kept.
    boxes = torch.tensor(
        [[[50.0, 50, 20, 10, 0.3], [50, 50, 20, 10, 0.3 - math.pi], [80, 80, 10, 10, 0], [80, 80, 10, 10, math.pi / 2]]]
        + [[[10, 10, 0, 5, 0], [10, 10, 0, 5, 0], [30, 30, 8, 8, 1], [200, 200, 1, 1, 0]]],
        device="cuda",
    ).reshape(2, 4, 5)
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.9, 0.8, 0.7, 0.6]], device="cuda")
    cls = torch.zeros(2, 4, dtype=torch.int32, device="cuda")
    s, _, c = torch.ops.retinanet.nms_rotated(scores, boxes, cls, 0.5, 4)
    assert s[0].tolist() == pytest.approx([0.9, 0.7, 0, 0]) and c[0].tolist() == [0, 0, -1, -1]
    assert s[1].tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6])


# --------------------------------------------------------------------------- rotated IoU


def degenerate_pairs():
    """(a, b) rows that stress the geometry: equal, half- and quarter-turned copies, nested,
    touching, crossing thin boxes, zero and negative extents, far from the origin, NaN."""
    pi = math.pi
    rows = [
        ([10, 10, 4, 2, 0.0], [10, 10, 4, 2, 0.0]),  # equal: 1
        ([10, 10, 4, 2, 0.3], [10, 10, 4, 2, 0.3 + pi]),  # half-turned: 1
        ([10, 10, 4, 4, 0.0], [10, 10, 4, 4, pi / 2]),  # quarter-turned square: 1
        ([0, 0, 10, 10, 0.0], [0, 0, 4, 4, 0.7]),  # nested
        ([0, 0, 2, 2, 0.0], [2, 0, 2, 2, 0.0]),  # touching edges: 0
        ([0, 0, 2, 2, 0.0], [2, 2, 2, 2, 0.0]),  # touching corners: 0
        ([0, 0, 2, 2, 0.0], [1, 0, 2, 2, 0.0]),  # collinear edges: 1/3
        ([0, 0, 100, 0.1, 0.0], [0, 0, 100, 0.1, pi / 2]),  # a thin cross
        ([0, 0, 100, 0.1, 0.0], [0, 0, 100, 0.1, 1e-4]),  # thin, nearly parallel
        ([0, 0, 0, 5, 0.0], [0, 0, 0, 5, 0.0]),  # zero width: 0, itself included
        ([0, 0, 5, 5, 0.0], [0, 0, 5, 0, 0.0]),
        ([0, 0, -5, 5, 0.0], [0, 0, 5, 5, 0.0]),  # negative width: no area
        ([1e5, 1e5, 30, 20, 0.2], [1e5 + 3, 1e5 - 2, 25, 20, -0.4]),  # far from the origin
        ([1e5, 1e5, 30, 20, 0.2], [1e5, 1e5, 30, 20, 0.2]),
        ([0, 0, 1e-3, 1e-3, 0.0], [0, 0, 1e-3, 1e-3, 0.5]),  # tiny
        ([0, 0, 1e4, 1e4, 0.0], [5, 5, 1, 1, 0.1]),  # tiny inside huge
        ([0, 0, 10, 10, 0.0], [0, 0, 10, 10, 100.0]),  # large angle
        ([0, 0, 10, 10, 0.0], [1000, 0, 10, 10, 0.0]),  # far apart: 0
    ]
    a = torch.tensor([r[0] for r in rows], dtype=torch.float32)
    b = torch.tensor([r[1] for r in rows], dtype=torch.float32)
    return a, b


@gpu
@needs_extension
def test_rotated_iou_equals_reference_on_random_boxes():
    g = torch.Generator().manual_seed(9)
    for n, m, extent in [(300, 200, 100.0), (64, 1000, 30.0), (1, 1, 10.0), (0, 5, 1.0), (5, 0, 1.0)]:
        a = compare.random_rotated_boxes(g, 1, n, extent, 2, 40)[0]
        b = compare.random_rotated_boxes(g, 1, m, extent, 2, 40)[0]
        b[:, 4] *= 4  # angles beyond a half turn too
        ours = torch.ops.retinanet.rotated_iou(a.cuda(), b.cuda())
        ref = rotated.rotated_iou_reference(a, b)
        assert ours.shape == (n, m) and ours.dtype == torch.float32
        torch.testing.assert_close(ours.cpu(), ref, rtol=0, atol=2e-5)
        if n * m > 1000:
            assert float(ref.max()) > 0.5 and float((ref == 0).float().mean()) > 0.1  # overlaps and misses


@gpu
@needs_extension
def test_rotated_iou_degenerate_pairs():
    a, b = degenerate_pairs()
    full = torch.ops.retinanet.rotated_iou(a.cuda(), b.cuda()).cpu()
    ours = full.diagonal()
    ref = rotated.rotated_iou_reference(a, b).diagonal()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
    assert ours[:3].tolist() == pytest.approx([1, 1, 1], abs=1e-5)
    assert ours[[4, 5, 9, 10, 11, 17]].tolist() == [0, 0, 0, 0, 0, 0]
    assert ours[6].item() == pytest.approx(1 / 3, abs=1e-6)
    # Never NaN, never outside [0, 1], also for non-finite inputs; a box without area has IoU 0.
    odd = torch.tensor(
        [[float("nan"), 0, 5, 5, 0], [0, 0, float("inf"), 5, 0], [0, 0, 5, 5, float("nan")], [0, 0, 5, 5, float("inf")]]
    )
    every = torch.cat([a, b, odd]).cuda()
    iou = torch.ops.retinanet.rotated_iou(every, every)
    assert not iou.isnan().any() and bool(((iou >= 0) & (iou <= 1)).all())
    assert bool((iou[-4:] == 0).all()) and bool((iou[:, -4:] == 0).all())
    # float16 boxes are computed in float32; the result is float32.
    half = torch.ops.retinanet.rotated_iou(a.cuda().half(), b.cuda())
    assert half.dtype == torch.float32


@gpu
@needs_extension
def test_ops_dispatch_to_the_extension():
    from retinanet import ops

    g = torch.Generator().manual_seed(12)
    scores = make_scores(g, (2, 27 * 3, 20, 25), "sparse", 0.05).cuda()
    deltas = make_deltas(g, (2, 27 * 6, 20, 25)).cuda()
    anchors = rotated_anchors(16)  # ops.decode_rotated moves it to the device
    direct_ops = (torch.ops.retinanet.decode_rotated, torch.ops.retinanet.nms_rotated)
    ours_ops = (ops.decode_rotated, ops.nms_rotated)
    direct = cuda_cases.assert_dispatch_to_extension(ours_ops, direct_ops, scores, deltas, anchors, 16)
    a = direct[1][0, :50].float()
    assert torch.equal(ops.rotated_iou(a, a), torch.ops.retinanet.rotated_iou(a, a))


# --------------------------------------------------------------------------- detect step, CUDA graph

LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21), (7, 11)]
detect_inputs = functools.partial(cuda_cases.detect_inputs, levels=LEVELS, classes=20, rotated=True)


@gpu
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_detect_step_equals_reference(dtype):
    g = torch.Generator().manual_seed(14)
    anchors = [rotated_anchors(s).cuda() for s in STRIDES]
    levels = detect_inputs(g, 2, dtype)
    ops = (torch.ops.retinanet.decode_rotated, torch.ops.retinanet.nms_rotated)
    ours = detect(levels, anchors, *ops)
    inputs = candidates(levels, anchors, reference.decode_rotated)
    ref = reference.nms_rotated(*inputs, 0.5, 100)
    assert_nms_equal(ours, ref, inputs, 0.5)
    assert (ours[0][:, :10] > 0).all()


@gpu
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_detect_step_cuda_graph(dtype):
    """Decode of 5 levels + concat + rotated NMS captured in one CUDA graph; replays with new
    inputs copied into the static buffers equal eager runs, bit for bit."""
    g = torch.Generator().manual_seed(15)
    anchors = [rotated_anchors(s).cuda() for s in STRIDES]
    static = detect_inputs(g, 2, dtype)
    ops = (torch.ops.retinanet.decode_rotated, torch.ops.retinanet.nms_rotated)
    cuda_cases.assert_graph_replays_equal_eager(static, anchors, ops, lambda: detect_inputs(g, 2, dtype))
