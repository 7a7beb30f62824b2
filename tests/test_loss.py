"""Focal loss, the classification prior, foreground normalisation and BatchNorm folding."""

import math

import pytest
import torch

from retinanet.config import ModelConfig
from retinanet.model import RetinaNet
from retinanet.model.loss import focal_loss


def test_focal_loss_matches_closed_form():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1000, 7, generator=g, dtype=torch.float64) * 4
    targets = (torch.rand(1000, 7, generator=g) < 0.2).double()
    got = focal_loss(logits, targets, alpha=0.25, gamma=2.0)
    p = 1 / (1 + torch.exp(-logits))
    expect = torch.where(targets == 1, -0.25 * (1 - p) ** 2 * torch.log(p), -0.75 * p**2 * torch.log(1 - p))
    torch.testing.assert_close(got, expect, rtol=1e-9, atol=1e-12)


def test_focal_loss_gamma_zero_is_weighted_bce():
    logits = torch.tensor([2.0, -1.0])
    targets = torch.tensor([1.0, 0.0])
    got = focal_loss(logits, targets, alpha=0.5, gamma=0.0)
    expect = 0.5 * torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    torch.testing.assert_close(got, expect)


def test_prior_bias_gives_initial_scores_of_one_percent():
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="ResNet18FPN", classes=5, channels=64, freeze_bn=False)
    model = RetinaNet(cfg).eval()
    with torch.no_grad():
        cls_heads, _ = model(torch.rand(1, 3, 128, 128) * 255)
    scores = torch.cat([torch.sigmoid(c).flatten() for c in cls_heads])
    assert abs(scores.mean().item() - 0.01) < 0.002
    assert scores.max().item() < 0.05  # nothing passes the score threshold at init
    assert model.cls_head.out.bias[0].item() == pytest.approx(-math.log(0.99 / 0.01), rel=1e-6)


def test_loss_is_normalised_by_foreground_count():
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="ResNet18FPN", classes=2, channels=32, freeze_bn=False)
    model = RetinaNet(cfg)
    images = torch.rand(1, 3, 128, 128) * 255
    one = torch.tensor([[[10.0, 10.0, 60.0, 60.0, 0.0]]])
    two = torch.tensor([[[10.0, 10.0, 60.0, 60.0, 0.0], [64.0, 64.0, 120.0, 120.0, 1.0]]])
    with torch.no_grad():
        l1 = model.loss(images, one)
        l2 = model.loss(images, two)
    for v in (*l1.values(), *l2.values()):
        assert torch.isfinite(v) and v > 0
    # Background mass is shared: doubling foreground roughly halves the focal term.
    assert l2["cls_loss"] < l1["cls_loss"]


def test_batchnorm_folding_keeps_outputs():
    from retinanet.model.batchnorm import fold_batchnorm

    torch.manual_seed(0)
    for backbone, freeze in (("ResNet18FPN", True), ("MobileNetV2FPN", False), ("ResNeXt50_32x4dFPN", True)):
        cfg = ModelConfig(backbone=backbone, classes=3, channels=32, freeze_bn=freeze)
        model = RetinaNet(cfg)
        for m in model.modules():  # non-trivial statistics
            if hasattr(m, "running_var"):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        model.eval()
        x = torch.rand(1, 3, 128, 128) * 255
        with torch.no_grad():
            want = model(x)
            assert fold_batchnorm(model) > 10
            got = model(x)
        assert not any(type(m).__name__.endswith("BatchNorm2d") for m in model.modules())
        for a, b in zip(want[0] + want[1], got[0] + got[1]):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
