"""MobileNetV2 backbone on torchvision's definition."""

from __future__ import annotations

from torchvision import models

from . import Backbone, register
from ._weights import freeze_batchnorm, load_imagenet


class MobileNetV2Backbone(Backbone):
    """stage_ends: indices into mobilenet_v2().features ending the stride-8, -16 and -32
    stages. 19 takes C5 after the final 1x1 conv (1280 channels); 18 stops before it
    (320 channels), the layout of converted ODTK MobileNetV2FPN checkpoints."""

    def __init__(self, net: models.MobileNetV2, stage_ends: tuple[int, int, int] = (7, 14, 19)):
        super().__init__()
        f = net.features
        a, b, c = stage_ends
        self.stage3, self.stage4, self.stage5 = f[:a], f[a:b], f[b:c]
        self.out_channels = (f[a - 1].out_channels, f[b - 1].out_channels, f[c - 1].out_channels)

    def forward(self, x):
        c3 = self.stage3(x)
        c4 = self.stage4(c3)
        c5 = self.stage5(c4)
        return [c3, c4, c5]


def _make(name: str, stage_ends: tuple[int, int, int]):
    @register(name)
    def build(pretrained: bool = False, weights_file: str | None = None, freeze_bn: bool = True):
        net = models.mobilenet_v2(weights=None)
        if pretrained or weights_file:
            load_imagenet(net, models.MobileNet_V2_Weights.IMAGENET1K_V1, name, weights_file)
        backbone = MobileNetV2Backbone(net, stage_ends)
        if freeze_bn:
            freeze_batchnorm(backbone)
        return backbone


_make("MobileNetV2FPN", (7, 14, 19))
_make("MobileNetV2FPN320", (7, 14, 18))
