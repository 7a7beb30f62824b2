"""MobileNetV2 backbone on torchvision's definition."""

from __future__ import annotations

from torchvision import models

from . import Backbone, register
from ._weights import freeze_batchnorm, load_imagenet


class MobileNetV2Backbone(Backbone):
    # Indices into mobilenet_v2().features ending the stride-8, -16 and -32 stages.
    STAGE_ENDS = (7, 14, 19)

    def __init__(self, net: models.MobileNetV2):
        super().__init__()
        f = net.features
        a, b, c = self.STAGE_ENDS
        self.stage3, self.stage4, self.stage5 = f[:a], f[a:b], f[b:c]
        self.out_channels = (f[a - 1].out_channels, f[b - 1].out_channels, f[c - 1].out_channels)

    def forward(self, x):
        c3 = self.stage3(x)
        c4 = self.stage4(c3)
        c5 = self.stage5(c4)
        return [c3, c4, c5]


@register("MobileNetV2FPN")
def build(pretrained: bool = False, weights_file: str | None = None, freeze_bn: bool = True):
    net = models.mobilenet_v2(weights=None)
    if pretrained or weights_file:
        load_imagenet(net, models.MobileNet_V2_Weights.IMAGENET1K_V1, "MobileNetV2FPN", weights_file)
    backbone = MobileNetV2Backbone(net)
    if freeze_bn:
        freeze_batchnorm(backbone)
    return backbone
