"""ResNet and ResNeXt backbones on torchvision's definitions."""

from __future__ import annotations

import torch.nn as nn
from torchvision import models

from . import Backbone, register
from ._weights import freeze_batchnorm, load_imagenet


class ResNetBackbone(Backbone):
    def __init__(self, net: models.ResNet):
        super().__init__()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        widths = [
            layer[-1].conv2.out_channels
            if isinstance(layer[-1], models.resnet.BasicBlock)
            else layer[-1].conv3.out_channels
            for layer in (net.layer2, net.layer3, net.layer4)
        ]
        self.out_channels = tuple(widths)

    def forward(self, x):
        x = self.layer1(self.stem(x))
        c3 = self.layer2(x)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]


def _make(name: str, factory, weights_enum):
    @register(name)
    def build(pretrained: bool = False, weights_file: str | None = None, freeze_bn: bool = True):
        net = factory(weights=None)
        if pretrained or weights_file:
            load_imagenet(net, weights_enum, name, weights_file)
        backbone = ResNetBackbone(net)
        if freeze_bn:
            freeze_batchnorm(backbone)
        return backbone

    return build


for _name, _factory, _weights in [
    ("ResNet18FPN", models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
    ("ResNet34FPN", models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1),
    ("ResNet50FPN", models.resnet50, models.ResNet50_Weights.IMAGENET1K_V1),
    ("ResNet101FPN", models.resnet101, models.ResNet101_Weights.IMAGENET1K_V1),
    ("ResNet152FPN", models.resnet152, models.ResNet152_Weights.IMAGENET1K_V1),
    ("ResNeXt50_32x4dFPN", models.resnext50_32x4d, models.ResNeXt50_32X4D_Weights.IMAGENET1K_V1),
    ("ResNeXt101_32x8dFPN", models.resnext101_32x8d, models.ResNeXt101_32X8D_Weights.IMAGENET1K_V1),
]:
    _make(_name, _factory, _weights)
