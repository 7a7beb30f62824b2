"""Box coding (encode/decode and the size clamp), anchor generation and anchor matching."""

import math

import pytest
import torch

from retinanet.config import LABEL_CROWD, LABEL_PAD, ModelConfig
from retinanet.model.anchors import all_anchors, level_base_anchors
from retinanet.model.loss import BACKGROUND, IGNORE, match
from retinanet.ops import box as box_ops


def random_boxes(n, gen, size=1000.0):
    xy = torch.rand(n, 2, generator=gen) * size
    wh = torch.rand(n, 2, generator=gen) * size / 2 + 1
    return torch.cat([xy, xy + wh], dim=1)


def test_encode_decode_is_identity():
    g = torch.Generator().manual_seed(0)
    anchors = random_boxes(5000, g)
    # Boxes within e^3 (< 1000/16) of their anchor's size, so the clamp stays out.
    deltas_in = torch.cat([torch.randn(5000, 2, generator=g), torch.rand(5000, 2, generator=g) * 6 - 3], dim=1)
    boxes = box_ops.decode(deltas_in, anchors, clamp=100.0)
    deltas = box_ops.encode(boxes, anchors)
    back = box_ops.decode(deltas, anchors, clamp=math.log(1000 / 16))
    torch.testing.assert_close(back, boxes, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(deltas, deltas_in, rtol=1e-4, atol=1e-4)


def test_decode_clamps_size_before_exp():
    anchor = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    out = box_ops.decode(torch.tensor([[0.0, 0.0, 50.0, 50.0]]), anchor, clamp=math.log(1000 / 16))
    assert torch.isfinite(out).all()
    assert out[0, 2] - out[0, 0] == pytest.approx(10 * 1000 / 16, rel=1e-5)


# Worked by hand from cx = acx + dx*aw, cy = acy + dy*ah, w = aw*exp(min(dw, clamp)),
# h = ah*exp(min(dh, clamp)), box = (cx - w/2, cy - h/2, cx + w/2, cy + h/2).
HAND_ANCHORS = [
    [0.0, 0.0, 32.0, 32.0],  # centre (16, 16), 32 x 32
    [10.0, 20.0, 50.0, 40.0],  # centre (30, 30), 40 x 20
    [0.0, 0.0, 64.0, 16.0],  # centre (32, 8), 64 x 16
    [-8.0, -8.0, 8.0, 8.0],
]  # centre (0, 0), 16 x 16
HAND_DELTAS = [
    [0.5, -0.25, math.log(2), 0.0],  # cx 32, cy 8, w 64, h 32
    [-0.25, 1.0, math.log(0.5), math.log(3)],  # cx 20, cy 50, w 20, h 60
    [0.125, 0.5, 0.0, math.log(0.25)],  # cx 40, cy 16, w 64, h 4
    [0.0, 0.0, 10.0, -math.log(4)],
]  # dw clamped to log(1000/16): w 16 * 62.5 = 1000, h 4
HAND_BOXES = [[0.0, -8.0, 64.0, 24.0], [10.0, 20.0, 30.0, 80.0], [8.0, 14.0, 72.0, 18.0], [-500.0, -2.0, 500.0, 2.0]]


def test_decode_and_encode_of_hand_worked_boxes():
    anchors, deltas = torch.tensor(HAND_ANCHORS), torch.tensor(HAND_DELTAS)
    out = box_ops.decode(deltas, anchors, clamp=math.log(1000 / 16))
    torch.testing.assert_close(out, torch.tensor(HAND_BOXES), rtol=1e-6, atol=1e-4)
    # Without the clamp the last box would be 16 * e^10 (~352000) wide.
    unclamped = box_ops.decode(deltas[3:], anchors[3:], clamp=100.0)
    assert unclamped[0, 2] - unclamped[0, 0] == pytest.approx(16 * math.exp(10), rel=1e-5)
    # encode inverts decode where the clamp did not act.
    torch.testing.assert_close(
        box_ops.encode(torch.tensor(HAND_BOXES[:3]), anchors[:3]), deltas[:3], rtol=1e-6, atol=1e-6
    )


def test_base_anchors_sizes_ratios_and_count():
    cfg = ModelConfig()
    bases = level_base_anchors(cfg)
    assert len(bases) == 5
    for base, stride in zip(bases, [8, 16, 32, 64, 128]):
        assert base.shape == (9, 4)
        w = base[:, 2] - base[:, 0]
        h = base[:, 3] - base[:, 1]
        # area = (4 * stride * 2^(k/3))^2 and ratio h/w = 0.5, 1, 2
        expect_sizes = torch.tensor([4 * stride * 2 ** (k / 3) for k in range(3)] * 3)
        torch.testing.assert_close(torch.sqrt(w * h), expect_sizes)
        torch.testing.assert_close(h / w, torch.tensor([0.5] * 3 + [1.0] * 3 + [2.0] * 3))
        torch.testing.assert_close(base[:, :2] + base[:, 2:], torch.zeros(9, 2))  # centred
    assert 4 * 8 == pytest.approx(float(bases[0][3, 2] - bases[0][3, 0]))  # 32 px on P3


def test_anchor_count_and_centres_per_level():
    cfg = ModelConfig()
    h, w = 256, 384
    shapes = [(h // s, w // s) for s in cfg.strides]
    anchors = all_anchors(cfg, shapes)
    assert anchors.shape[0] == sum(9 * a * b for a, b in shapes)
    start = 0
    for (fh, fw), stride in zip(shapes, cfg.strides):
        level = anchors[start : start + 9 * fh * fw].reshape(9, fh, fw, 4)
        centres = (level[..., :2] + level[..., 2:]) / 2
        ys, xs = torch.meshgrid(torch.arange(fh), torch.arange(fw), indexing="ij")
        torch.testing.assert_close(centres[0, ..., 0], (xs + 0.5) * stride, check_dtype=False)
        torch.testing.assert_close(centres[4, ..., 1], (ys + 0.5) * stride, check_dtype=False)
        start += 9 * fh * fw


def test_matching_thresholds_and_ignored_band():
    gt = torch.tensor([[[0.0, 0.0, 100.0, 100.0, 3.0], [0, 0, 0, 0, LABEL_PAD]]])

    def anchor_with_iou(iou):  # same top-left, width chosen so IoU = 100*w / (100*100)
        return [0.0, 0.0, 100.0 * iou, 100.0]

    ious = [0.0, 0.39, 0.4, 0.45, 0.4999, 0.5, 0.7, 1.0]
    anchors = torch.tensor([anchor_with_iou(i) if i > 0 else [200.0, 200, 300, 300] for i in ious])
    labels, matched = match(anchors, gt, (0.4, 0.5))
    expect = [BACKGROUND, BACKGROUND, IGNORE, IGNORE, IGNORE, 3, 3, 3]
    assert labels[0].tolist() == expect
    torch.testing.assert_close(matched[0, -1], gt[0, 0, :4])


def test_matching_picks_best_gt_and_crowd_is_ignored_not_matched():
    gt = torch.tensor(
        [[[0.0, 0.0, 100.0, 100.0, 0.0], [90.0, 0.0, 200.0, 100.0, 1.0], [300.0, 300.0, 400.0, 400.0, LABEL_CROWD]]]
    )
    anchors = torch.tensor(
        [
            [95.0, 0.0, 200.0, 100.0],  # best: gt 1
            [310.0, 310.0, 390.0, 390.0],  # inside the crowd box
            [500.0, 500.0, 600.0, 600.0],
        ]
    )  # far away
    labels, _ = match(anchors, gt, (0.4, 0.5))
    assert labels[0].tolist() == [1, IGNORE, BACKGROUND]


def test_matching_without_targets_is_all_background():
    labels, _ = match(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.zeros(2, 0, 5), (0.4, 0.5))
    assert (labels == BACKGROUND).all()
