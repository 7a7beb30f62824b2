"""What the CUDA-op tests share: the extension check and markers, inputs, checks, the detect step.

tests/test_cuda_ops.py (axis-aligned boxes, 4 values) and tests/test_cuda_rotated.py
(rotated boxes, 5 values) hold their kernels to the reference with the same kinds of
inputs and the same checks; `rotated` picks the box kind where the two differ.
"""

import math
import subprocess
import sys

import pytest
import torch

CLAMP = math.log(1000 / 16)
STRIDES = [8, 16, 32, 64, 128]
DECODE_MODES = ["uniform", "sparse", "ties", "empty", "equal", "mixed"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

gpu = pytest.mark.gpu


def extension_error(op=None, stale=""):
    """Why retinanet._C cannot serve these tests (`stale` when it lacks `op`), or None."""
    try:
        from retinanet import _C  # noqa: F401
    except ImportError as e:  # not built, or built for another torch
        return str(e)
    if op is not None and not hasattr(torch.ops.retinanet, op):
        return stale
    return None


def needs_extension(error, unusable="not importable"):
    """Skip without a CUDA device or without the extension (`error` from extension_error)."""
    return pytest.mark.skipif(
        error is not None or not torch.cuda.is_available(),
        reason="no CUDA device" if not torch.cuda.is_available() else f"retinanet._C {unusable}: {error}",
    )


def assert_meta_shapes(decode, nms, dtype, anchors, rotated=False):
    """The Meta kernels of a decode/NMS pair give the output shapes and dtypes, as FakeTensor
    tracing needs: boxes of 4 values (4 deltas an anchor), or rotated of 5 (6 deltas)."""
    values, per_anchor = (5, 6) if rotated else (4, 4)
    cls = torch.empty(3, anchors * 5, 7, 11, device="meta", dtype=dtype)
    deltas = torch.empty(3, anchors * per_anchor, 7, 11, device="meta", dtype=dtype)
    table = torch.empty(anchors, values, device="meta")
    s, b, c = decode(cls, deltas, table, 8, 0.05, 123, CLAMP)
    assert (s.shape, b.shape, c.shape) == ((3, 123), (3, 123, values), (3, 123))
    assert s.dtype == b.dtype == dtype and c.dtype == torch.int32
    s, b, c = nms(
        torch.empty(3, 500, device="meta", dtype=dtype),
        torch.empty(3, 500, values, device="meta", dtype=dtype),
        torch.empty(3, 500, device="meta", dtype=torch.int32),
        0.5,
        100,
    )
    assert (s.shape, b.shape, c.shape) == ((3, 100), (3, 100, values), (3, 100))
    assert s.dtype == b.dtype == dtype and c.dtype == torch.int32


# --------------------------------------------------------------------------- inputs


def make_scores(gen, shape, mode, threshold):
    """Sigmoid-like scores [B, A*C, H, W] (float32, CPU) of a given kind."""
    batch = shape[0]
    u = torch.rand(shape, generator=gen)
    if mode == "uniform":
        return u
    if mode == "sparse":  # a few % above the threshold, most just under it
        hot = torch.rand(shape, generator=gen) < 0.03
        return torch.where(hot, threshold + (1 - threshold) * u**3, u * threshold)
    if mode == "ties":  # few distinct values, the threshold itself among them
        return torch.where(u < 0.2, torch.full_like(u, threshold), (u * 8).floor() / 8)
    if mode == "empty":  # nothing strictly above the threshold
        return torch.where(u < 0.3, torch.full_like(u, threshold), u * threshold)
    if mode == "equal":  # one value everywhere: the order is the flat index alone
        return torch.full(shape, 0.5)
    if mode == "mixed":  # images with very different candidate counts
        out = torch.empty(shape)
        for i in range(batch):
            rate = [0.0, 1.0, 0.002, 0.2][i % 4]
            hot = torch.rand(shape[1:], generator=gen) < rate
            out[i] = torch.where(hot, threshold + (1 - threshold) * u[i], u[i] * threshold)
        return out
    raise ValueError(mode)


def make_deltas(gen, shape, rotated=False):
    """Box deltas, some beyond the size clamp; rotated ones also some zeros, so that angle
    deltas (0, 0) occur."""
    d = torch.randn(shape, generator=gen) * 0.5
    wild = torch.rand(shape, generator=gen) < 0.01
    d = torch.where(wild, d * 20, d)
    if not rotated:
        return d
    zero = torch.rand(shape, generator=gen) < 0.01
    return torch.where(zero, torch.zeros_like(d), d)


def _corner_boxes(gen, centres, wh, mode):
    boxes = torch.cat([centres - wh / 2, centres + wh / 2], dim=-1)
    if mode == "grid":  # integer boxes: exact-IoU values are common
        boxes = boxes.round()
    return boxes


def _rotated_boxes(gen, centres, wh, mode):
    batch, n = wh.shape[:2]
    theta = (torch.rand(batch, n, 1, generator=gen) - 0.5) * math.pi
    if mode == "grid":
        centres, wh = centres.round(), wh.round()
        theta = torch.randint(-1, 2, (batch, n, 1), generator=gen).float() * (math.pi / 2)
    boxes = torch.cat([centres, wh, theta], dim=-1)
    if mode == "copies":
        twin = torch.rand(batch, n, generator=gen) < 0.3
        prev = boxes.roll(1, dims=1)
        flipped = prev + torch.tensor([0, 0, 0, 0, math.pi]) * (torch.rand(batch, n, 1, generator=gen) < 0.5)
        boxes = torch.where(twin[..., None], flipped, boxes)
    return boxes


def make_nms_inputs(gen, batch, n, classes, mode, rotated=False):
    """Clustered boxes (many overlaps), scores with ties, padding and non-positive scores.
    'grid': integer boxes (at quarter-turn angles when rotated), where exact IoUs such as 0.5
    are common; 'copies' (rotated): clusters of identical and half-turned copies (IoU 1)."""
    clusters = max(1, n // 8)
    centre = torch.rand(batch, clusters, 2, generator=gen) * 400
    pick = torch.randint(0, clusters, (batch, n), generator=gen)
    c = torch.gather(centre, 1, pick[..., None].expand(-1, -1, 2)) + torch.randn(batch, n, 2, generator=gen) * 6
    wh = torch.rand(batch, n, 2, generator=gen) * 60 + 4
    boxes = (_rotated_boxes if rotated else _corner_boxes)(gen, c, wh, mode)
    scores = torch.rand(batch, n, generator=gen)
    if mode in ("ties", "grid", "copies"):
        scores = (scores * 6).floor() / 6
    cls = torch.randint(0, classes, (batch, n), generator=gen, dtype=torch.int32)
    for i in range(batch):  # images with very different counts: trailing padding
        keep = int(torch.randint(0, n + 1, (1,), generator=gen)) if i % 2 else n
        scores[i, keep:] = 0
        boxes[i, keep:] = 0
        cls[i, keep:] = -1
    neg = torch.rand(batch, n, generator=gen) < 0.05
    scores[neg] = -scores[neg]
    return scores, boxes, cls


def detect_inputs(gen, batch, dtype, levels, classes, rotated=False):
    """(scores, deltas) on the GPU for each level (h, w): sparse scores, 9 anchors of 4 deltas,
    or 27 rotated anchors of 6."""
    anchors, values = (27, 6) if rotated else (9, 4)
    out = []
    for h, w in levels:
        scores = make_scores(gen, (batch, anchors * classes, h, w), "sparse", 0.05)
        deltas = make_deltas(gen, (batch, anchors * values, h, w), rotated)
        out.append((scores.to("cuda", dtype), deltas.to("cuda", dtype)))
    return out


# --------------------------------------------------------------------------- checks


def assert_same_candidates(ours, ref):
    """Decode outputs of the reference's dtypes and shapes, with its classes and scores exactly
    (selection and order); the boxes are left to the caller's tolerance."""
    s, b, c = ours
    rs, rb, rc = ref
    assert s.dtype == rs.dtype and b.dtype == rb.dtype and c.dtype == torch.int32
    assert s.shape == rs.shape and b.shape == rb.shape and c.shape == rc.shape
    assert torch.equal(c, rc), "classes (selection or order) differ"
    assert torch.equal(s, rs), "scores (selection or order) differ"


def assert_nms_equal(ours, ref, inputs, threshold, violation):
    """Equal to the reference, image by image; an image that differs must still be a greedy
    NMS of its own candidates: violation(scores, boxes, classes, out, threshold) is None."""
    s, b, c = ours
    rs, rb, rc = ref
    assert s.dtype == rs.dtype and b.dtype == rb.dtype and c.dtype == torch.int32
    assert s.shape == rs.shape and b.shape == rb.shape and c.shape == rc.shape
    scores, boxes, cls = inputs
    for i in range(s.shape[0]):
        if torch.equal(s[i], rs[i]) and torch.equal(b[i], rb[i]) and torch.equal(c[i], rc[i]):
            continue
        why = violation(scores[i], boxes[i], cls[i], (s[i], b[i], c[i]), threshold)
        assert why is None, f"image {i} differs from the reference: {why}"


def child_lines(script, *args):
    """The lines `script` prints in a child process: an error thrown inside the extension has
    been seen to crash the process (SIGSEGV) instead of raising, and a crash must fail only
    the test that ran it."""
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"the ops crashed (exit {proc.returncode}) instead of raising: {proc.stderr[-500:]}"
    return proc.stdout.strip().splitlines()


# The end of a child script (child_lines): a line for each of its `calls`, the first line of
# the error it raised or "accepted".
CALL_EACH = """
for call in calls:
    try:
        call()
        print("accepted")
    except RuntimeError as e:
        print(str(e).splitlines()[0])
"""


# --------------------------------------------------------------------------- detect step


def candidates(levels, anchors, decode, *box_offset, strides=STRIDES):
    """The decoded candidates of all levels, concatenated ([B, sum top_n] ...)."""
    decoded = [
        decode(s, d, a, stride, 0.05, 1000, CLAMP, *box_offset) for (s, d), a, stride in zip(levels, anchors, strides)
    ]
    return tuple(torch.cat([o[k] for o in decoded], dim=1) for k in range(3))


def detect(levels, anchors, decode, nms, *box_offset, strides=STRIDES):
    """Decode of every level, concat, NMS: a detection step (box_offset, when given, to both)."""
    return nms(*candidates(levels, anchors, decode, *box_offset, strides=strides), 0.5, 100, *box_offset)


def assert_dispatch_to_extension(ops_pair, direct_pair, scores, deltas, anchors, stride):
    """retinanet.ops' decode/NMS (anchors on the CPU: they move them) give what the
    extension's ops give called directly; returns the direct decode."""
    decode, nms = ops_pair
    direct_decode, direct_nms = direct_pair
    ours = decode(scores, deltas, anchors, stride, 0.05, 1000, CLAMP)
    direct = direct_decode(scores, deltas, anchors.cuda(), stride, 0.05, 1000, CLAMP)
    assert all(torch.equal(x, y) for x, y in zip(ours, direct))
    kept = nms(*ours, 0.5, 100)
    assert all(torch.equal(x, y) for x, y in zip(kept, direct_nms(*direct, 0.5, 100)))
    return direct


def capture(fn, *args):
    """fn(*args) captured in a CUDA graph, after warm-up runs on a side stream (as capture
    needs: lazy initialisation must not happen inside it); (graph, its static outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn(*args)
    return graph, captured


def assert_graph_replays_equal_eager(static, anchors, ops, fresh_inputs):
    """The detect step captured on `static` inputs; replays with fresh_inputs() copied into
    them (the last with an image with nothing above the threshold) equal eager runs."""
    graph, captured = capture(detect, static, anchors, *ops)
    for trial in range(3):
        fresh = fresh_inputs()
        if trial == 2:  # an image with nothing above the threshold
            for scores, _ in fresh:
                scores[1].mul_(0.01)
        for (s, d), (fs, fd) in zip(static, fresh):
            s.copy_(fs)
            d.copy_(fd)
        graph.replay()
        eager = detect(fresh, anchors, *ops)
        torch.cuda.synchronize()
        for x, y in zip(captured, eager):
            assert torch.equal(x, y), f"graph replay {trial} differs from eager"
