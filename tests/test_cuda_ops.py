"""The CUDA custom operators (csrc/) give the reference decode/NMS results, also in CUDA graphs and compiled.

GPU tests are marked `gpu` and skipped without a CUDA device or without the
built extension; test_extension_* run on the CPU too when the extension is built.
"""

import functools
import glob
import os
import sys

import cuda_cases
import pytest
import torch
from cuda_cases import (
    CLAMP,
    DECODE_MODES,
    DTYPES,
    STRIDES,
    assert_same_candidates,
    detect,
    gpu,
    make_deltas,
    make_nms_inputs,
    make_scores,
)

from retinanet.config import ModelConfig
from retinanet.ops import box as box_ops
from retinanet.ops import reference

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "plugins"))
import compare  # noqa: E402

EXTENSION_ERROR = cuda_cases.extension_error()
BUILT = glob.glob(os.path.join(os.path.dirname(__file__), "..", "retinanet", "_C*.so")) + glob.glob(
    os.path.join(os.path.dirname(__file__), "..", "retinanet", "_C*.pyd")
)
needs_extension = cuda_cases.needs_extension(EXTENSION_ERROR)


# --------------------------------------------------------------------------- import / tracing (any machine)


def test_extension_imports_when_built():
    if not BUILT:
        pytest.skip("retinanet._C is not built (pure-Python install)")
    assert EXTENSION_ERROR is None, f"retinanet._C is built but does not import: {EXTENSION_ERROR}"
    from retinanet import ops

    assert ops.HAVE_EXTENSION
    assert callable(torch.ops.retinanet.decode) and callable(torch.ops.retinanet.nms)


def test_extension_meta_shapes():
    """The Meta kernels give the output shapes, as FakeTensor tracing needs."""
    if EXTENSION_ERROR is not None:
        pytest.skip(f"retinanet._C not importable: {EXTENSION_ERROR}")
    for dtype in (torch.float32, torch.float16):
        cuda_cases.assert_meta_shapes(torch.ops.retinanet.decode, torch.ops.retinanet.nms, dtype, 9)
        cls = torch.empty(3, 9 * 5, 7, 11, device="meta", dtype=dtype)
        deltas = torch.empty(3, 9 * 4, 7, 11, device="meta", dtype=dtype)
        anchors = torch.empty(9, 4, device="meta")
        s, b, c = torch.ops.retinanet.decode(cls, deltas, anchors, 8, 0.05, 123, CLAMP, box_offset=1.0)
        assert (s.shape, b.shape, c.shape) == ((3, 123), (3, 123, 4), (3, 123))


def test_extension_schema_box_offset_last_with_default():
    """box_offset is the last argument of both ops, defaulting to 0: callers that predate it
    keep today's boxes, and a traced call records the value it was given."""
    if EXTENSION_ERROR is not None:
        pytest.skip(f"retinanet._C not importable: {EXTENSION_ERROR}")
    for op in (torch.ops.retinanet.decode, torch.ops.retinanet.nms):
        last = op.default._schema.arguments[-1]
        assert (last.name, str(last.type), last.default_value) == ("box_offset", "float", 0.0)

    class Detect(torch.nn.Module):
        def forward(self, cls, deltas, anchors):
            s, b, c = torch.ops.retinanet.decode(cls, deltas, anchors, 8, 0.05, 100, CLAMP, 1.0)
            return torch.ops.retinanet.nms(s, b, c, 0.5, 10, box_offset=1.0)

    args = (torch.rand(2, 9 * 3, 6, 7), torch.rand(2, 36, 6, 7), torch.rand(9, 4))
    ep = torch.export.export(Detect(), args)
    calls = [n for n in ep.graph.nodes if n.op == "call_function" and str(n.target).startswith("retinanet.")]
    assert [n.args[-1] for n in calls] == [1.0, 1.0]


def test_extension_traces_with_torch_export():
    """torch.export traces decode + NMS through the Meta kernels, batch dynamic."""
    if EXTENSION_ERROR is not None:
        pytest.skip(f"retinanet._C not importable: {EXTENSION_ERROR}")

    class Detect(torch.nn.Module):
        def forward(self, cls, deltas, anchors):
            s, b, c = torch.ops.retinanet.decode(cls, deltas, anchors, 8, 0.05, 100, CLAMP)
            return torch.ops.retinanet.nms(s, b, c, 0.5, 10)

    batch = torch.export.Dim("batch")
    args = (torch.rand(2, 9 * 3, 6, 7), torch.rand(2, 36, 6, 7), torch.rand(9, 4))
    ep = torch.export.export(Detect(), args, dynamic_shapes=({0: batch}, {0: batch}, None))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"retinanet.decode.default", "retinanet.nms.default"} <= targets
    out = [n for n in ep.graph.nodes if n.op == "output"][0].args[0]
    assert [tuple(o.meta["val"].shape[1:]) for o in out] == [(10,), (10, 4), (10,)]


# --------------------------------------------------------------------------- inputs


def level_anchors(stride, device):
    cfg = ModelConfig()
    return box_ops.base_anchors(stride, cfg.anchor_ratios, cfg.anchor_scales).to(device)


def decode_case(case):
    g = torch.Generator().manual_seed(1000 + case)
    mode = DECODE_MODES[case % len(DECODE_MODES)]
    dtype = DTYPES[(case // len(DECODE_MODES)) % 3] if case % 5 else torch.float16
    batch = [1, 2, 3, 4][case % 4]
    anchors_n = [9, 1, 3][case % 3]
    classes = [1, 4, 7, 80][(case // 3) % 4]
    h = int(torch.randint(1, 30, (1,), generator=g))
    w = int(torch.randint(1, 30, (1,), generator=g))
    top_n = [1, 10, 100, 1000, 57][case % 5]
    threshold = [0.05, 0.0, 0.3, 0.05][case % 4]
    stride = [8, 16, 32, 64, 128][case % 5]
    shape = (batch, anchors_n * classes, h, w)
    scores = make_scores(g, shape, mode, threshold)
    deltas = make_deltas(g, (batch, anchors_n * 4, h, w))
    return scores, deltas, anchors_n, stride, threshold, top_n, dtype


def assert_decode_equal(ours, ref, limit):
    assert_same_candidates(ours, ref)
    b, rb = ours[1], ref[1]
    rtol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(b.dtype, 1e-4)
    torch.testing.assert_close(b.float(), rb.float(), rtol=rtol, atol=rtol * limit)


def run_decode(scores, deltas, anchors, stride, threshold, top_n):
    return torch.ops.retinanet.decode(scores, deltas, anchors, stride, threshold, top_n, CLAMP)


# --------------------------------------------------------------------------- decode


@gpu
@needs_extension
@pytest.mark.parametrize("case", range(120))
def test_decode_equals_reference(case):
    scores, deltas, a, stride, threshold, top_n, dtype = decode_case(case)
    if a == 9:
        anchors = level_anchors(stride, "cuda")
    else:  # any anchor table works
        wh = torch.rand(a, 2, generator=torch.Generator().manual_seed(case)) * 60 + 4
        anchors = torch.cat([-wh / 2, wh / 2], dim=1).cuda()
    scores, deltas = scores.to("cuda", dtype), deltas.to("cuda", dtype)
    ours = run_decode(scores, deltas, anchors, stride, threshold, top_n)
    ref = reference.decode(scores, deltas, anchors, stride, threshold, top_n, CLAMP)
    limit = max(scores.shape[2], scores.shape[3]) * stride
    assert_decode_equal(ours, ref, limit)


@gpu
@needs_extension
@pytest.mark.parametrize("mode", ["sparse", "equal", "ties", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_full_size_level(mode, dtype):
    """P3 of an 800x1088 input: many more candidates than top_n; 'equal' and 'ties'
    overflow the boundary bucket and use every refinement pass."""
    g = torch.Generator().manual_seed(7)
    shape = (4 if mode == "mixed" else 2, 9 * 80, 100, 136)
    scores = make_scores(g, shape, mode, 0.05).to("cuda", dtype)
    deltas = make_deltas(g, (shape[0], 36, 100, 136)).to("cuda", dtype)
    anchors = level_anchors(8, "cuda")
    ours = run_decode(scores, deltas, anchors, 8, 0.05, 1000)
    ref = reference.decode(scores, deltas, anchors, 8, 0.05, 1000, CLAMP)
    assert_decode_equal(ours, ref, 1088)


@gpu
@needs_extension
def test_decode_unaligned_and_mixed_dtypes():
    """A view at an odd offset takes the scalar path; float64 and mixed dtypes
    compute in float32 and come back in the scores' dtype, as the reference does."""
    g = torch.Generator().manual_seed(3)
    shape = (2, 9 * 3, 13, 17)
    base = make_scores(g, (2 * 9 * 3 * 13 * 17 + 1,), "uniform", 0.05).cuda()
    scores = base[1:].view(shape)
    deltas = make_deltas(g, (2, 36, 13, 17)).cuda()
    anchors = level_anchors(16, "cuda")
    for s, d in [(scores, deltas), (scores.double(), deltas.double()), (scores.half(), deltas)]:
        ours = run_decode(s, d, anchors, 16, 0.05, 100)
        ref = reference.decode(s, d, anchors, 16, 0.05, 100, CLAMP)
        assert_decode_equal(ours, ref, 17 * 16)


@gpu
@needs_extension
def test_decode_degenerate_sizes():
    anchors = level_anchors(8, "cuda")
    scores = torch.rand(2, 36, 0, 5, device="cuda")  # an empty feature map: all padding
    deltas = torch.zeros(2, 36, 0, 5, device="cuda")
    assert_decode_equal(
        run_decode(scores, deltas, anchors, 8, 0.05, 10),
        reference.decode(scores, deltas, anchors, 8, 0.05, 10, CLAMP),
        40,
    )
    s, b, c = run_decode(
        torch.rand(0, 36, 5, 5, device="cuda"), torch.zeros(0, 36, 5, 5, device="cuda"), anchors, 8, 0.05, 10
    )  # no images
    assert s.shape == (0, 10) and b.shape == (0, 10, 4) and c.shape == (0, 10)
    scores = torch.rand(2, 36, 5, 5, device="cuda")
    s, b, c = run_decode(scores, torch.zeros(2, 36, 5, 5, device="cuda"), anchors, 8, 0.05, 0)
    assert s.shape == (2, 0) and b.shape == (2, 0, 4) and c.shape == (2, 0)


# --------------------------------------------------------------------------- NMS


# IoUs this close to the threshold may round either way in another implementation.
TIE_EPS = 1e-6


def greedy_nms_violation(scores, boxes, cls, out, threshold, box_offset=0.0):
    """compare.greedy_nms_violation for boxes [., 4], their IoU with `box_offset`."""

    def iou(box, boxes):
        return box_ops.box_iou(box, boxes, box_offset)[0]

    return compare.greedy_nms_violation(scores, boxes, cls, out, threshold, iou, TIE_EPS)


def assert_nms_equal(ours, ref, inputs, threshold, box_offset=0.0):
    """cuda_cases.assert_nms_equal, an image that differs held to greedy_nms_violation."""
    violation = functools.partial(greedy_nms_violation, box_offset=box_offset)
    cuda_cases.assert_nms_equal(ours, ref, inputs, threshold, violation)


def tie_case():
    """A and B (class 0) overlap with IoU exactly 0.5; C overlaps B (IoU 0.905) but not A (0.43).
    The reference keeps A and B (suppression needs IoU > 0.5); deciding the tie
    the other way drops B, and then C survives."""
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 20], [0, 1, 10, 21], [50, 50, 60, 60]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    cls = torch.tensor([0, 0, 0, 1], dtype=torch.int32)
    return scores, boxes, cls


def fabricated(rows, detections=4):
    """NMS output of one image from (index into tie_case, ...) rows."""
    scores, boxes, cls = tie_case()
    idx = torch.tensor(rows, dtype=torch.long)
    s, b, c = torch.zeros(detections), torch.zeros(detections, 4), torch.full((detections,), -1, dtype=torch.int32)
    s[: len(rows)], b[: len(rows)], c[: len(rows)] = scores[idx], boxes[idx], cls[idx]
    return s, b, c


def batched(*images):
    return tuple(torch.stack(parts) for parts in zip(*images))


def test_nms_check_excuses_ties_only_in_the_image_that_has_them():
    scores, boxes, cls = tie_case()
    inputs = batched(tie_case(), tie_case())
    ref = reference.nms(*inputs, 0.5, 4)
    assert ref[2][0].tolist() == [0, 0, 1, -1]  # A, B, D
    assert_nms_equal(ref, ref, inputs, 0.5)
    other_way = fabricated([0, 2, 3])  # A, C, D: the tie decided the other way, and its consequence
    assert_nms_equal(batched(other_way, fabricated([0, 1, 3])), ref, inputs, 0.5)
    # A real difference in image 1 is not excused by the tie of image 0 (nor its own).
    for wrong in ([0, 3], [0, 1, 2, 3], [1, 0, 3], [0, 3, 1], [0, 1]):
        with pytest.raises(AssertionError, match="image 1"):
            assert_nms_equal(batched(other_way, fabricated(wrong)), ref, inputs, 0.5)
    # Full outputs: the tie pushes another detection off the end; still a valid greedy result.
    assert greedy_nms_violation(scores, boxes, cls, fabricated([0, 2], detections=2), 0.5) is None
    assert greedy_nms_violation(scores, boxes, cls, fabricated([0, 3], detections=2), 0.5) is not None


def test_nms_check_catches_altered_outputs():
    g = torch.Generator().manual_seed(0)
    for mode in ("plain", "ties", "grid"):
        inputs = make_nms_inputs(g, 3, 200, 3, mode)
        ref = reference.nms(*inputs, 0.5, 200)
        for i in range(3):  # the reference passes its own check
            assert greedy_nms_violation(*(t[i] for t in inputs), tuple(t[i] for t in ref), 0.5) is None
        k = int((ref[0][0] > 0).sum())
        assert 10 < k < 200
        s, b, c = (t.clone() for t in ref)
        s[0, 5 : k - 1], b[0, 5 : k - 1], c[0, 5 : k - 1] = s[0, 6:k].clone(), b[0, 6:k].clone(), c[0, 6:k].clone()
        s[0, k - 1], b[0, k - 1], c[0, k - 1] = 0, 0, -1
        alterations = {"dropped": (s, b, c)}
        s, b, c = (t.clone() for t in ref)
        b[0, 3, 2] += 0.5
        alterations["moved box"] = (s, b, c)
        s, b, c = (t.clone() for t in ref)
        c[0, 3] = (c[0, 3] + 1) % 3
        alterations["class"] = (s, b, c)
        s, b, c = (t.clone() for t in ref)
        s[0, 3] = s[0, 3] * 0.999
        alterations["score"] = (s, b, c)
        s, b, c = (t.clone() for t in ref)
        s[0, [2, 3]], b[0, [2, 3]], c[0, [2, 3]] = s[0, [3, 2]], b[0, [3, 2]], c[0, [3, 2]]
        alterations["order"] = (s, b, c)
        s, b, c = (t.clone() for t in ref)
        c[0, k:] = 0
        alterations["padding"] = (s, b, c)
        for name, out in alterations.items():
            if name == "order" and torch.equal(ref[0][0, 2], ref[0][0, 3]) and torch.equal(ref[2][0, 2], ref[2][0, 3]):
                continue  # equal rows: swapping them changes nothing
            with pytest.raises(AssertionError, match="image 0"):
                assert_nms_equal(out, ref, inputs, 0.5)


NMS_SIZES = [1, 7, 63, 64, 65, 200, 1000, 5000]


@gpu
@needs_extension
@pytest.mark.parametrize("case", range(100))
def test_nms_equals_reference(case):
    g = torch.Generator().manual_seed(2000 + case)
    mode = ["plain", "ties", "grid", "plain"][case % 4]
    batch = [1, 2, 3, 4, 16][case % 5]
    n = NMS_SIZES[case % len(NMS_SIZES)]
    if n == 5000:
        batch = min(batch, 4)
    classes = [1, 3, 80, 2][(case // 3) % 4]
    detections = [100, 1, 10, 300, 100][(case // 2) % 5]
    threshold = [0.5, 0.3, 0.7, 0.5][(case // 4) % 4]
    dtype = DTYPES[case % 3] if case % 7 else torch.float16
    scores, boxes, cls = make_nms_inputs(g, batch, n, classes, mode)
    scores, boxes, cls = scores.to("cuda", dtype), boxes.to("cuda", dtype), cls.cuda()
    ours = torch.ops.retinanet.nms(scores, boxes, cls, threshold, detections)
    ref = reference.nms(scores, boxes, cls, threshold, detections)
    assert_nms_equal(ours, ref, (scores, boxes, cls), threshold)


@gpu
@needs_extension
@pytest.mark.parametrize("n", [4096, 8192, 8193, 20000])
def test_nms_large_candidate_sets(n):
    """Up to 8192 candidates are sorted by counting ranks; more take the CUB segmented sort."""
    g = torch.Generator().manual_seed(n)
    scores, boxes, cls = make_nms_inputs(g, 3, n, 5, "ties")
    scores, boxes, cls = scores.cuda(), boxes.cuda(), cls.cuda()
    ours = torch.ops.retinanet.nms(scores, boxes, cls, 0.5, 300)
    ref = reference.nms(scores, boxes, cls, 0.5, 300)
    assert_nms_equal(ours, ref, (scores, boxes, cls), 0.5)


@gpu
@needs_extension
def test_nms_edge_cases():
    dev = "cuda"
    # no candidates at all, detections > N, all scores <= 0, int64 classes
    for n, det, fill in [(0, 5, 0.5), (3, 10, 0.5), (20, 5, 0.0), (20, 5, -1.0)]:
        scores = torch.full((2, n), fill, device=dev)
        boxes = torch.rand(2, n, 4, device=dev).sort(-1).values[..., [0, 1, 2, 3]] * 100
        cls = torch.zeros(2, n, dtype=torch.int64, device=dev)
        ours = torch.ops.retinanet.nms(scores, boxes, cls, 0.5, det)
        ref = reference.nms(scores, boxes, cls, 0.5, det)
        assert_nms_equal(ours, ref, (scores, boxes, cls), 0.5)
    # the reference's own hand-made example
    boxes = torch.tensor([[[0.0, 0, 10, 10], [0, 0, 10, 10.5], [0, 0, 10, 10], [0, 0, 10, 20.1]]], device=dev)
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6]], device=dev)
    cls = torch.tensor([[0, 0, 1, 0]], dtype=torch.int32, device=dev)
    s, _, c = torch.ops.retinanet.nms(scores, boxes, cls, 0.5, 10)
    assert s[0, :3].tolist() == pytest.approx([0.9, 0.7, 0.6]) and c[0, :4].tolist() == [0, 1, 0, -1]


# --------------------------------------------------------------------------- detect step

LEVELS = [(100, 136), (50, 68), (25, 34), (13, 17), (7, 9)]
detect_inputs = functools.partial(cuda_cases.detect_inputs, levels=LEVELS, classes=80)


def assert_detections_equal(ours, ref, rtol):
    """Detection-step outputs: scores and classes exactly, boxes within `rtol` (atol 0.1 px);
    the sparse scores do give detections."""
    s, b, c = ours
    rs, rb, rc = ref
    assert torch.equal(s, rs) and torch.equal(c, rc)
    torch.testing.assert_close(b.float(), rb.float(), rtol=rtol, atol=0.1)
    assert (s[:, :10] > 0).all()


@gpu
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_detect_step_equals_reference(dtype):
    g = torch.Generator().manual_seed(11)
    anchors = [level_anchors(s, "cuda") for s in STRIDES]
    levels = detect_inputs(g, 3, dtype)
    ours = detect(levels, anchors, torch.ops.retinanet.decode, torch.ops.retinanet.nms)
    ref = detect(levels, anchors, reference.decode, reference.nms)
    assert_detections_equal(ours, ref, 1e-4 if dtype == torch.float32 else 2e-3)


@gpu
@needs_extension
def test_retinanet_ops_dispatch_to_extension():
    from retinanet import ops

    g = torch.Generator().manual_seed(5)
    ((scores, deltas),) = detect_inputs(g, 2, torch.float32, levels=[(25, 34)])
    anchors = level_anchors(32, "cpu")  # ops.decode moves it to the device
    direct_ops = (torch.ops.retinanet.decode, torch.ops.retinanet.nms)
    cuda_cases.assert_dispatch_to_extension((ops.decode, ops.nms), direct_ops, scores, deltas, anchors, 32)


@gpu
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_detect_step_cuda_graph(dtype):
    """Decode of 5 levels + concat + NMS captured in one CUDA graph; replays with
    new inputs copied into the static buffers equal eager runs."""
    g = torch.Generator().manual_seed(13)
    anchors = [level_anchors(s, "cuda") for s in STRIDES]
    static = detect_inputs(g, 2, dtype)
    ops = (torch.ops.retinanet.decode, torch.ops.retinanet.nms)
    cuda_cases.assert_graph_replays_equal_eager(static, anchors, ops, lambda: detect_inputs(g, 2, dtype))


def detect_step(decode, nms, anchors, strides):
    """The detection step on flat (scores, deltas, scores, ...) arguments, as torch.compile takes them."""

    def step(*flat):
        return detect(list(zip(flat[0::2], flat[1::2])), anchors, decode, nms, strides=strides)

    return step


@gpu
@needs_extension
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_ops_under_torch_compile_equal_reference(backend):
    """FakeTensor tracing through the Meta kernels (torch.compile, fullgraph); the
    compiled step is held to the reference decode/NMS, not to the kernels it runs."""
    g = torch.Generator().manual_seed(17)
    anchors = [level_anchors(s, "cuda") for s in STRIDES[2:]]
    levels = detect_inputs(g, 2, torch.float16, levels=LEVELS[2:])
    flat = [t for pair in levels for t in pair]
    ops = (torch.ops.retinanet.decode, torch.ops.retinanet.nms)
    compiled = torch.compile(detect_step(*ops, anchors, STRIDES[2:]), fullgraph=True, backend=backend)
    ours = compiled(*flat)
    ref = detect_step(reference.decode, reference.nms, anchors, STRIDES[2:])(*flat)
    assert_detections_equal(ours, ref, 2e-3)


# --------------------------------------------------------------------------- box_offset (the +1 box convention)


def torchvision_like_anchors(stride, device):
    """The default anchors with integer corners, centred on the cell's top-left corner as in
    torchvision (decode adds the cell centre, hence -stride/2): the tables converted +1-convention
    checkpoints bring. Any [A, 4] table is legal data."""
    return level_anchors(stride, device).round() - stride / 2


@gpu
@needs_extension
@pytest.mark.parametrize("box_offset", [0.0, 1.0])
@pytest.mark.parametrize("table", ["default", "torchvision"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_box_offset_equals_reference(box_offset, table, dtype):
    """Every level of an 800 x 1088 input (P7 reaches past it: boxes clipped to W*stride - offset),
    images with very different candidate counts."""
    g = torch.Generator().manual_seed(int(box_offset) + 2 * (table == "torchvision"))
    for (h, w), stride in zip(LEVELS, STRIDES):
        anchors = (torchvision_like_anchors if table == "torchvision" else level_anchors)(stride, "cuda")
        scores = make_scores(g, (3, 9 * 5, h, w), "mixed", 0.05).to("cuda", dtype)
        deltas = make_deltas(g, (3, 36, h, w)).to("cuda", dtype)
        ours = torch.ops.retinanet.decode(scores, deltas, anchors, stride, 0.05, 1000, CLAMP, box_offset)
        ref = reference.decode(scores, deltas, anchors, stride, 0.05, 1000, CLAMP, box_offset=box_offset)
        assert_decode_equal(ours, ref, max(h, w) * stride)
        limit = w * stride - box_offset
        assert float(ours[1][..., 2].max()) <= limit and float(ref[1][..., 2].max()) <= limit


@gpu
@needs_extension
@pytest.mark.parametrize("box_offset", [0.0, 1.0])
@pytest.mark.parametrize("mode", ["plain", "grid"])
@pytest.mark.parametrize("n", [63, 1000, 8193])
def test_nms_box_offset_equals_reference(box_offset, mode, n):
    """Integer boxes ('grid') are those of the +1 convention, where the +1 decides overlaps;
    8193 candidates take the CUB sort."""
    g = torch.Generator().manual_seed(3000 + n + int(box_offset))
    for dtype in (torch.float32, torch.float16):
        scores, boxes, cls = make_nms_inputs(g, 3, n, 3, mode)
        scores, boxes, cls = scores.to("cuda", dtype), boxes.to("cuda", dtype), cls.cuda()
        ours = torch.ops.retinanet.nms(scores, boxes, cls, 0.5, 300, box_offset)
        ref = reference.nms(scores, boxes, cls, 0.5, 300, box_offset=box_offset)
        assert_nms_equal(ours, ref, (scores, boxes, cls), 0.5, box_offset)


@gpu
@needs_extension
def test_box_offset_zero_is_the_default_bit_for_bit():
    g = torch.Generator().manual_seed(23)
    ((scores, deltas),) = detect_inputs(g, 2, torch.float32, levels=[(25, 34)])
    anchors = torchvision_like_anchors(32, "cuda")
    plain = torch.ops.retinanet.decode(scores, deltas, anchors, 32, 0.05, 1000, CLAMP)
    zero = torch.ops.retinanet.decode(scores, deltas, anchors, 32, 0.05, 1000, CLAMP, 0.0)
    assert all(torch.equal(x, y) for x, y in zip(plain, zero))
    kept = torch.ops.retinanet.nms(*plain, 0.5, 100)
    assert all(torch.equal(x, y) for x, y in zip(kept, torch.ops.retinanet.nms(*plain, 0.5, 100, 0.0)))
    one = torch.ops.retinanet.decode(scores, deltas, anchors, 32, 0.05, 1000, CLAMP, 1.0)
    assert torch.equal(one[0], plain[0]) and not torch.equal(one[1], plain[1])  # same candidates, other boxes


REFUSAL = (
    """
import sys, torch
import retinanet._C
from retinanet.config import ModelConfig
from retinanet.ops import box as box_ops
bad = float(sys.argv[1])
cfg = ModelConfig()
anchors = box_ops.base_anchors(8, cfg.anchor_ratios, cfg.anchor_scales).cuda()
scores, deltas = torch.rand(1, 9, 4, 4, device="cuda"), torch.zeros(1, 36, 4, 4, device="cuda")
boxes, cls = torch.rand(1, 9, 4, device="cuda"), torch.zeros(1, 9, dtype=torch.int32, device="cuda")
calls = (
    lambda: torch.ops.retinanet.decode(scores, deltas, anchors, 8, 0.05, 10, 4.0, bad),
    lambda: torch.ops.retinanet.nms(scores[:, :, 0, 0], boxes, cls, 0.5, 5, bad),
)
"""
    + cuda_cases.CALL_EACH
)


@gpu
@needs_extension
@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_box_offset_refused_unless_finite_and_non_negative(bad):
    """In a child process: an error thrown inside the extension has been seen to crash the
    process (SIGSEGV) instead of raising, where g++ linked a static libstdc++ copy into _C (setup.py
    now links the shared one; test_build.py checks);
    a crash must fail this test, not end the whole run."""
    lines = cuda_cases.child_lines(REFUSAL, str(bad))
    assert len(lines) == 2 and all("box_offset must be finite and >= 0" in line for line in lines), lines


@gpu
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_detect_step_box_offset_equals_reference(dtype):
    """retinanet.ops with box_offset 1 and torchvision-like tables (a converted model's
    detection step) runs the extension and equals the reference."""
    from retinanet import ops

    g = torch.Generator().manual_seed(29)
    anchors = [torchvision_like_anchors(s, "cuda") for s in STRIDES]
    levels = detect_inputs(g, 3, dtype)

    def step(decode, nms):
        return detect(levels, anchors, decode, nms, 1.0)

    ours = step(ops.decode, ops.nms)
    direct = step(torch.ops.retinanet.decode, torch.ops.retinanet.nms)
    assert all(torch.equal(x, y) for x, y in zip(ours, direct))
    assert_detections_equal(ours, step(reference.decode, reference.nms), 1e-4 if dtype == torch.float32 else 2e-3)


def test_nms_check_measures_iou_with_the_box_offset():
    """The tie-excusing check replays greedy NMS with the offset it is given: the reference
    with box_offset 1 passes it with 1; on integer boxes, where the +1 changes overlaps,
    the output of one offset is refused as that of the other."""
    g = torch.Generator().manual_seed(31)
    inputs = make_nms_inputs(g, 3, 300, 2, "grid")
    one = reference.nms(*inputs, 0.5, 300, box_offset=1.0)
    zero = reference.nms(*inputs, 0.5, 300)
    assert_nms_equal(one, one, inputs, 0.5, box_offset=1.0)
    with pytest.raises(AssertionError, match="differs from the reference"):
        assert_nms_equal(one, zero, inputs, 0.5)
    with pytest.raises(AssertionError, match="differs from the reference"):
        assert_nms_equal(zero, one, inputs, 0.5, box_offset=1.0)
