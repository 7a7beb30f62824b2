"""torchvision RetinaNet state dicts (retinanet_resnet50_fpn and _v2) to our layout.

What differs from our model is read from the tensors themselves, not from the format
name: GroupNorm towers (v2) from the norm keys, the towers' conv bias from the bias
keys, the P6 input from the stride-64 conv's input channels (256: P5, v1; the
backbone's C5 width: v2). Both torchvision key layouts are accepted: the one its
current modules write and the older one of the v1 COCO weights file (heads and FPN
without the Conv2dNormActivation level), which torchvision upgrades on load.
"""

from __future__ import annotations

import re

from torch import Tensor

from ..config import ModelConfig
from .coco import COCO_NAMES
from .layout import ConversionError, backbone_name, strip_batchnorm_counters

# A key that every torchvision RetinaNet state dict has and no other detector's.
MARKER = "head.classification_head.cls_logits.weight"
V2_MARKER = "head.classification_head.conv.0.1.weight"  # the first tower GroupNorm
COCO_SLOTS = 91  # torchvision's COCO label space: index = COCO id, 0 = background
_HEADS = {"classification_head": "cls_head", "regression_head": "box_head"}
_LEVELS = ("3", "4", "5")


def is_torchvision(state: object) -> bool:
    return isinstance(state, dict) and MARKER in state


def detect_version(state: dict) -> str:
    return "torchvision-v2" if V2_MARKER in state else "torchvision-v1"


def convert(state: object, version: str) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Our config and state dict for torchvision's `state`; ConversionError naming what is off."""
    if not isinstance(state, dict) or not is_torchvision(state):
        raise ConversionError(f"not a torchvision RetinaNet state dict (no {MARKER})")
    if detect_version(state) != version:
        found = detect_version(state)
        raise ConversionError(f"is a {found} state dict, not {version} (GroupNorm head keys tell them apart)")
    state = strip_batchnorm_counters(state)
    head_norm = version == "torchvision-v2"
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = _rename(key, head_norm)
        if new is None:
            raise ConversionError(f"unexpected key {key}")
        out[new] = value
    return _config(out, head_norm), out


def _rename(key: str, head_norm: bool) -> str | None:
    if key.startswith("backbone.body."):
        rest = key[len("backbone.body.") :]
        rest = re.sub(r"^conv1\.", "stem.0.", rest)
        return "backbone." + re.sub(r"^bn1\.", "stem.1.", rest)
    m = re.fullmatch(r"backbone\.fpn\.(inner|layer)_blocks\.(\d)\.(?:0\.)?(weight|bias)", key)
    if m:
        kind = "lateral" if m[1] == "inner" else "smooth"
        return f"fpn.{kind}{_LEVELS[int(m[2])]}.{m[3]}"
    m = re.fullmatch(r"backbone\.fpn\.extra_blocks\.(p6|p7)\.(weight|bias)", key)
    if m:
        return f"fpn.{m[1]}.{m[2]}"
    m = re.fullmatch(r"head\.(\w+_head)\.(cls_logits|bbox_reg)\.(weight|bias)", key)
    if m and m[1] in _HEADS:
        return f"{_HEADS[m[1]]}.out.{m[3]}"
    return _rename_tower(key, head_norm)


def _rename_tower(key: str, head_norm: bool) -> str | None:
    """Tower layer k: ours is [conv, (GroupNorm,) ReLU] per layer, so conv k sits at index
    k * 3 with norm and k * 2 without; torchvision's current keys are conv.k.0 (conv)
    and conv.k.1 (GroupNorm), its older ones conv.(2k) for a conv followed by a ReLU."""
    per_layer = 3 if head_norm else 2
    m = re.fullmatch(r"head\.(\w+_head)\.conv\.(\d+)\.(\d)\.(weight|bias)", key)
    if m and m[1] in _HEADS:
        return f"{_HEADS[m[1]]}.tower.{int(m[2]) * per_layer + int(m[3])}.{m[4]}"
    m = re.fullmatch(r"head\.(\w+_head)\.conv\.(\d+)\.(weight|bias)", key)
    if m and m[1] in _HEADS and not head_norm and int(m[2]) % 2 == 0:
        return f"{_HEADS[m[1]]}.tower.{m[2]}.{m[3]}"
    return None


def _config(state: dict[str, Tensor], head_norm: bool) -> ModelConfig:
    anchors = state["box_head.out.weight"].shape[0] // 4
    if anchors != 9:
        raise ConversionError(f"has {anchors} anchors per location; torchvision's RetinaNet has 9 (3 sizes x 3 ratios)")
    classes = state["cls_head.out.weight"].shape[0] // anchors
    channels = state["fpn.p7.weight"].shape[0]
    backbone = backbone_name(state, "backbone.")
    return ModelConfig(
        backbone=backbone,
        classes=classes,
        anchor_ratios=[0.5, 1.0, 2.0],
        anchor_placement="torchvision",
        channels=channels,
        head_depth=sum(1 for k, v in state.items() if k.startswith("cls_head.tower.") and v.dim() == 4),
        head_norm=head_norm,
        head_conv_bias="cls_head.tower.0.bias" in state,
        p6_input="P5" if state["fpn.p6.weight"].shape[1] == channels else "C5",
        # torchvision computes each level's anchor stride as the padded input size
        # floor-divided by the level's size; on inputs padded to 128 that is the
        # nominal stride on every level, as every implementation here assumes.
        pad_multiple=128,
        detections=300,  # torchvision's RetinaNet keeps 300 per image
        clip_to_image=True,  # torchvision clips candidates to the image before NMS
    )


def categories(classes: int) -> tuple[list[int], list[str]]:
    """torchvision's labels are COCO ids themselves (slot 0: background, gaps: "N/A")."""
    ids = list(range(classes))
    if classes == COCO_SLOTS:
        return ids, ["__background__" if i == 0 else COCO_NAMES.get(i, "N/A") for i in ids]
    return ids, [f"class {i}" for i in ids]
