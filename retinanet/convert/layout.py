"""What both source formats share: the error type, and reading a ResNet's depth from its keys."""

from __future__ import annotations

import re

from torch import Tensor


class ConversionError(ValueError):
    """The source does not hold what its format needs; the message completes "SOURCE: ..."."""


def strip_batchnorm_counters(state: dict) -> dict:
    """Without BatchNorm2d's num_batches_tracked: frozen BN has none, and inference never uses it."""
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


# Blocks per stage (layer1..layer4) of torchvision's ResNets, with or without bottlenecks.
_RESNETS = {
    ((2, 2, 2, 2), False): "ResNet18FPN",
    ((3, 4, 6, 3), False): "ResNet34FPN",
    ((3, 4, 6, 3), True): "ResNet50FPN",
    ((3, 4, 23, 3), True): "ResNet101FPN",
    ((3, 8, 36, 3), True): "ResNet152FPN",
}
_RESNEXTS = {"ResNet50FPN": "ResNeXt50_32x4dFPN", "ResNet101FPN": "ResNeXt101_32x8dFPN"}


def backbone_name(state: dict[str, Tensor], prefix: str) -> str:
    """Our name of the ResNet whose keys (torchvision's layer1..layer4 names) start with `prefix`."""
    blocks = []
    for stage in range(1, 5):
        found = {int(m[1]) for k in state if (m := re.match(re.escape(f"{prefix}layer{stage}.") + r"(\d+)\.", k))}
        blocks.append(max(found) + 1 if found else 0)
    bottleneck = f"{prefix}layer1.0.conv3.weight" in state
    name = _RESNETS.get((tuple(blocks), bottleneck))
    if name is None:
        raise ConversionError(f"backbone with {blocks} blocks per stage is not a ResNet18/34/50/101/152")
    conv2 = state[f"{prefix}layer1.0.conv2.weight"]
    if conv2.shape[1] != conv2.shape[0]:  # grouped 3x3 convs: ResNeXt
        if name not in _RESNEXTS:
            raise ConversionError(f"grouped convolutions in a {name[:-3]} backbone: not a ResNeXt we build")
        name = _RESNEXTS[name]
    return name
