"""Feature pyramid P3-P7 on backbone levels C3-C5; P6 from C5 or from the P5 output."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F


class FPN(nn.Module):
    def __init__(self, in_channels: tuple[int, int, int], channels: int, p6_input: str = "C5"):
        super().__init__()
        self.p6_from_p5 = p6_input == "P5"
        c3, c4, c5 = in_channels
        self.lateral3 = nn.Conv2d(c3, channels, 1)
        self.lateral4 = nn.Conv2d(c4, channels, 1)
        self.lateral5 = nn.Conv2d(c5, channels, 1)
        self.smooth3 = nn.Conv2d(channels, channels, 3, padding=1)
        self.smooth4 = nn.Conv2d(channels, channels, 3, padding=1)
        self.smooth5 = nn.Conv2d(channels, channels, 3, padding=1)
        self.p6 = nn.Conv2d(channels if self.p6_from_p5 else c5, channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)  # type: ignore[arg-type]  # every conv here has a bias

    def forward(self, feats):
        c3, c4, c5 = feats
        p5 = self.lateral5(c5)
        p4 = self.lateral4(c4) + F.interpolate(p5, size=c4.shape[-2:], mode="nearest")
        p3 = self.lateral3(c3) + F.interpolate(p4, size=c3.shape[-2:], mode="nearest")
        out5 = self.smooth5(p5)
        p6 = self.p6(out5 if self.p6_from_p5 else c5)
        p7 = self.p7(F.relu(p6))
        return [self.smooth3(p3), self.smooth4(p4), out5, p6, p7]
