"""The fast inference path on a GPU: CUDA-graph replay equals eager, GPU preprocessing
matches the CPU's. The detection-set comparison they use is checked on the CPU here too."""

import pytest
import torch

from retinanet import ops
from retinanet.config import ModelConfig
from retinanet.model import RetinaNet
from retinanet.ops import box as box_ops
from retinanet.runtime.pytorch import TorchBackend

gpu = pytest.mark.gpu


def detection_rows(scores, boxes, classes):
    """One image's detections (score > 0) as CPU float64 scores [N], boxes [N, 4] and int64 classes [N]."""
    keep = scores > 0
    return scores[keep].double().cpu(), boxes[keep].double().cpu(), classes[keep].long().cpu()


NMS_IOU = 0.5  # the models' config.nms_iou
IOU_TOL = 0.02  # IoUs move this much with rounding and still decide NMS alike


def unexplained_differences(
    got, want, detections, score_threshold, score_tol, box_tol, nms_iou=NMS_IOU, iou_tol=IOU_TOL, separation=1.0
):
    """Detections of one image (detection_rows) in `got` or `want` without a
    counterpart in the other that no change of NMS decisions explains.

    A counterpart has the same class, a score within score_tol and every box
    coordinate within box_tol. Rounding may still change which detections are
    kept, in two ways that explain a missing counterpart:
    * a cut: a score within score_tol of the threshold, or of the other
      side's lowest where that side holds `detections` (the rest fell off);
    * NMS: two boxes of a class that overlap (IoU > nms_iou - iou_tol) and
      whose scores swap order, or whose IoU lies within iou_tol of nms_iou,
      keep one or the other, and each then suppresses different later boxes.
      Such a box is explained by a box of its class on the other side that
      scores at least as high (within score_tol): one with IoU in that band,
      or, beyond it, one itself without counterpart (a box kept on both sides
      would have suppressed it on both). It must be another candidate, more
      than `separation` pixels away: a box that moved less than that is the
      same candidate decoded differently.
    Returns (matched count, [(side, score, class, box), ...]).
    """
    (gs, gb, gc), (ws, wb, wc) = got, want
    free = {"got": set(range(len(gs))), "want": set()}
    for i in range(len(ws)):  # best first: outputs are sorted by score
        hits = [
            j
            for j in free["got"]
            if gc[j] == wc[i] and abs(gs[j] - ws[i]) <= score_tol and (gb[j] - wb[i]).abs().max() <= box_tol
        ]
        if hits:
            free["got"].remove(min(hits, key=lambda j: float((gb[j] - wb[i]).abs().max())))
        else:
            free["want"].add(i)
    sides = {"got": got, "want": want}
    unexplained = []
    for name, other in (("got", "want"), ("want", "got")):
        s, b, c = sides[name]
        os_, ob, oc = sides[other]
        floor = float(os_.min()) if len(os_) >= detections else score_threshold
        unmatched = torch.tensor([j in free[other] for j in range(len(os_))], dtype=torch.bool)
        for i in sorted(free[name]):
            if s[i] <= floor + score_tol:
                continue
            iou = box_ops.box_iou(b[i][None], ob)[0]
            rival = (oc == c[i]) & (os_ >= s[i] - score_tol) & ((ob - b[i]).abs().amax(dim=1) > separation)
            band = (iou - nms_iou).abs() <= iou_tol
            if bool((rival & (band | ((iou > nms_iou) & unmatched))).any()):
                continue
            unexplained.append((name, round(float(s[i]), 6), int(c[i]), [round(v, 2) for v in b[i].tolist()]))
    return len(gs) - len(free["got"]), unexplained


def assert_same_detections(got, want, detections, score_tol, box_tol, min_matched, score_threshold=0.05):
    """Per image (lists of detection_rows): every detection has its counterpart or an
    NMS explanation, and at least `min_matched` of them have counterparts."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert len(w[0]) > 0, f"image {i}: no detections to compare"
        matched, unexplained = unexplained_differences(g, w, detections, score_threshold, score_tol, box_tol)
        assert not unexplained, f"image {i}: {len(unexplained)} differences, e.g. {unexplained[:4]}"
        for name, (_, b, c) in (("got", g), ("want", w)):
            iou = box_ops.box_iou(b, b).triu(1) * (c[:, None] == c[None, :])
            assert not (iou > NMS_IOU + IOU_TOL).any(), f"image {i}: {name} keeps boxes that suppress each other"
        assert matched >= min_matched * max(len(g[0]), len(w[0])), (
            f"image {i}: only {matched} of {len(g[0])} / {len(w[0])} detections have counterparts"
        )


def busy_model(cfg, weight_std):
    """Random weights with scores around the 0.05 threshold: many candidates, a busy NMS.
    weight_std spreads the scores; the noise of a rounding change spreads with them."""
    torch.manual_seed(0)
    model = RetinaNet(cfg)
    with torch.no_grad():
        model.cls_head.out.bias.fill_(-2.95)
        model.cls_head.out.weight.normal_(std=weight_std)
    return model


# --------------------------------------------------------------------------- the comparison (any machine)


def random_heads(gen, cfg, batch, height, width):
    cls, box = [], []
    for stride in cfg.strides:
        shape = (batch, -1, -(-height // stride), -(-width // stride))
        cls.append(
            -2.95
            + 0.5 * torch.randn(batch * cfg.num_anchors * cfg.classes * shape[2] * shape[3], generator=gen).view(shape)
        )
        box.append(0.1 * torch.randn(batch * cfg.num_anchors * 4 * shape[2] * shape[3], generator=gen).view(shape))
    return cls, box


def rows_of(out):
    return [detection_rows(*(t[i] for t in out)) for i in range(out[0].shape[0])]


def test_detection_comparison_takes_rounding_and_catches_wrong_detections():
    cfg = ModelConfig(backbone="ResNet18FPN", classes=5, channels=32)
    model = RetinaNet(cfg)
    gen = torch.Generator().manual_seed(0)
    cls, box = random_heads(gen, cfg, 2, 256, 384)
    want = rows_of(model.postprocess(cls, box))
    # A 1e-3 relative change of every head output (far more than fused kernels
    # round differently) reorders near-equal scores and flips NMS decisions.
    noisy = [[t * (1 + 1e-3 * torch.randn(t.shape, generator=gen)) for t in heads] for heads in (cls, box)]
    got = rows_of(model.postprocess(*noisy))
    assert any(not torch.equal(g[0], w[0]) for g, w in zip(got, want))
    tol = dict(detections=cfg.detections, score_tol=1e-3, box_tol=0.1, min_matched=0.9)
    assert_same_detections(got, want, **tol)

    def altered(change):
        rows = [tuple(t.clone() for t in r) for r in got]
        change(*rows[1])
        return rows

    wrong = {
        "box moved 0.3 px": altered(lambda s, b, c: b[7].add_(torch.tensor([0.0, 0.3, 0.0, 0.3], dtype=b.dtype))),
        "class": altered(lambda s, b, c: c[5].fill_((int(c[5]) + 1) % cfg.classes)),
        "score": altered(lambda s, b, c: s[2].mul_(0.95)),
        "every box 3 px off": altered(lambda s, b, c: b.add_(3.0)),
    }
    dropped = [tuple(t.clone() for t in r) for r in got]
    keep = torch.arange(len(dropped[1][0])) != 3
    dropped[1] = tuple(t[keep] for t in dropped[1])
    wrong["dropped"] = dropped
    for name, rows in wrong.items():
        with pytest.raises(AssertionError, match="image 1"):
            assert_same_detections(rows, want, **tol)
            pytest.fail(name)


def hand_rows(rows):
    """(score, class, box) rows of one image, best first, as detection_rows gives them."""
    rows = sorted(rows, key=lambda r: -r[0])
    return (
        torch.tensor([r[0] for r in rows], dtype=torch.float64),
        torch.tensor([r[2] for r in rows], dtype=torch.float64),
        torch.tensor([r[1] for r in rows]),
    )


def test_detection_comparison_explains_nms_reorderings_only():
    a, b = (0.9, 0, [0, 0, 10, 10]), (0.8999, 0, [3, 0, 13, 10])  # IoU 0.54: one suppresses the other
    c = (0.5, 0, [-2, 0, 8, 10])  # IoU 0.67 with a, 0.33 with b: suppressed by a only
    d = (0.7, 1, [50, 50, 60, 60])
    e, f = (0.6, 2, [100, 0, 110, 10]), (0.55, 2, [100, 0, 110, 19.8])  # IoU 0.505: at the threshold
    want = hand_rows([a, d, e])
    # b outscores a this time, so c survives; the e-f overlap rounds below the threshold.
    got = hand_rows([b, d, e, f, c])
    tol = dict(detections=100, score_tol=1e-3, box_tol=0.1, min_matched=0.4)
    assert_same_detections([got], [want], **tol)
    for extra, error in [
        ((0.65, 1, [52, 50, 62, 60]), "1 differences"),  # IoU 0.67 with d, kept on both sides
        ((0.3, 0, [30, 0, 40, 10]), "1 differences"),  # overlaps nothing
        ((0.5, 0, [-2.5, 0, 7.5, 10]), "suppress each other"),
    ]:  # c again, half a pixel away
        with pytest.raises(AssertionError, match=error):
            assert_same_detections([hand_rows([b, d, e, f, c, extra])], [want], **tol)
    with pytest.raises(AssertionError, match="2 differences"):  # e moved by less than a candidate's spacing
        assert_same_detections([hand_rows([b, d, (0.6, 2, [100, 0.5, 110, 10.5]), f, c])], [want], **tol)


# --------------------------------------------------------------------------- GPU


@gpu
@pytest.mark.parametrize("full_precision, compile", [(True, False), (False, False), (True, True)])
def test_graph_replay_with_new_inputs_equals_eager(full_precision, compile):
    if not ops.HAVE_EXTENSION:
        pytest.skip("retinanet._C not built: no CUDA ops to capture")
    cfg = ModelConfig(backbone="ResNet18FPN", classes=5, channels=64)
    model = busy_model(cfg, weight_std=5.0)
    eager = TorchBackend(model, list(range(5)), "cuda", full_precision=full_precision, cuda_graphs=False)
    graphed = TorchBackend(
        model, list(range(5)), "cuda", full_precision=full_precision, cuda_graphs=True, compile=compile
    )
    for seed in range(3):  # the first call captures, later calls replay with new data
        g = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (2, 3, 256, 384), generator=g, dtype=torch.uint8)
        want = eager(images)
        got = graphed(images)
        assert (want[0] > 0).sum() > 50
        if compile:
            # The replay runs exactly what the compiled network computes outside a graph...
            graphed.cuda_graphs = False
            direct = graphed(images)
            graphed.cuda_graphs = True
            assert all(torch.equal(x, y) for x, y in zip(got, direct))
            # ...which rounds differently from eager: near-equal scores swap
            # and NMS keeps other boxes. Tolerances: 1e-3 in score is ~4 sigma
            # of what a 1e-3 relative change of every head output gives
            # (measured on the CPU), far above fused-kernel rounding; boxes
            # hardly move (their deltas are ~0.01 here).
            assert_same_detections(
                rows_of(got), rows_of(want), cfg.detections, score_tol=1e-3, box_tol=0.1, min_matched=0.9
            )
            continue
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
        assert torch.equal(got[2], want[2])
    assert len(graphed._graphs) == 1


class Recording:
    """A backend that keeps the batches it is given and the detections it returns."""

    def __init__(self, backend):
        self.backend, self.batches, self.outputs = backend, [], []
        self.device = backend.device
        self.preprocess_device = getattr(backend, "preprocess_device", torch.device("cpu"))  # as Detector reads it

    def __call__(self, images, *rest):
        self.batches.append(images.cpu())
        out = self.backend(images, *rest)
        self.outputs.append(tuple(t.cpu() for t in out))
        return out


# nvJPEG upsamples chroma its own way. Emulated on 100 demo images (pixel
# replication instead of libjpeg-turbo's triangle filter), then resized to
# 96 px: at most 44 grey levels apart (at sharp red/blue edges), 1.1 in mean
# per image. The bounds leave room for IDCT and resize rounding; a mirrored
# image is >= 5 apart in mean, a one-pixel shift >= 2.35.
GPU_DECODE_MAX_DIFF = 64
GPU_DECODE_MEAN_DIFF = 2.0


@gpu
def test_gpu_preprocessing_matches_cpu(demo_root):
    """Paths decode (nvJPEG), resize and pad on the GPU; batches and detections match the CPU path."""
    import retinanet

    # 96 px images padded to 128: the batches have padding to compare.
    cfg = ModelConfig(backbone="ResNet18FPN", classes=3, channels=32, resize=96, max_size=96, pad_multiple=128)
    model = busy_model(cfg, weight_std=100.0)  # scores ~0.1-0.45: comparisons mean something
    on_gpu = Recording(TorchBackend(model, [1, 3, 7], "cuda", full_precision=True))
    on_cpu = Recording(TorchBackend(model, [1, 3, 7], "cpu"))
    assert on_gpu.preprocess_device.type == "cuda"
    paths = [str(demo_root / "val" / f"val_{i:05d}.jpg") for i in range(8)]
    got = retinanet.Detector(on_gpu, cfg, [1, 3, 7])(paths)
    want = retinanet.Detector(on_cpu, cfg, [1, 3, 7])(paths)
    (a,), (b,) = on_gpu.batches, on_cpu.batches
    assert a.shape == b.shape == (8, 3, 128, 128) and a.dtype == b.dtype == torch.uint8
    diff = (a.int() - b.int()).abs()
    assert (diff[:, :, 96:] == 0).all() and (diff[:, :, :, 96:] == 0).all()  # the padding
    assert diff.max() <= GPU_DECODE_MAX_DIFF, diff.amax(dim=(1, 2, 3))
    means = diff[:, :, :96, :96].float().mean(dim=(1, 2, 3))
    assert (means <= GPU_DECODE_MEAN_DIFF).all(), means
    # In the network's pixels, where NMS ran (clipping to the image afterwards
    # changes IoUs). Emulated decoding differences move scores by up to 0.017
    # and boxes by 0.001 px (CPU, float32); the GPU's TF32 convolutions add
    # their own. A wrong scale or offset moves the boxes by a pixel or more.
    (raw_got,), (raw_want,) = on_gpu.outputs, on_cpu.outputs
    assert_same_detections(
        rows_of(raw_got), rows_of(raw_want), cfg.detections, score_tol=0.05, box_tol=0.5, min_matched=0.7
    )
    # What the caller gets is those detections in the image's pixels, on the CPU.
    for side, raw in ((got, raw_got), (want, raw_want)):
        for d, scores, boxes in zip(side, raw[0], raw[1]):
            assert d.boxes.device.type == "cpu" and torch.equal(d.scores, scores[scores > 0].float())
            torch.testing.assert_close(d.boxes, (boxes[scores > 0].float() / 0.75).clamp(0, 128))
