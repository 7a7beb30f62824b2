"""ODTK (NVIDIA retinanet-examples) checkpoints to our layout.

ODTK's checkpoint is a dict: backbone names, the class count, ratios, scales and the
state dict under `backbones.<Name>.`, `cls_head.*` and `box_head.*`. Its boxes follow
the "+1 pixel" convention (config.box_offset = 1), it pads to 128, and its anchors
run scale-major (a = 3 * scale + ratio) where ours run ratio-major: the output convs'
channels are permuted here, which is exact.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from ..config import ModelConfig
from .layout import ConversionError, backbone_name, strip_batchnorm_counters

MARKER = "cls_head.8.weight"
REQUIRED = ("backbone", "classes", "state_dict", "ratios", "scales")
_FPN = {"lateral3", "lateral4", "lateral5", "smooth3", "smooth4", "smooth5", "pyramid6", "pyramid7"}
_MOBILENET_C5 = 17  # ODTK's MobileNetV2 C5 is features[17]; 18 and the classifier are unused


def is_odtk(source: object) -> bool:
    return isinstance(source, dict) and isinstance(source.get("state_dict"), dict) and MARKER in source["state_dict"]


def convert(source: dict) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Our config and state dict for an ODTK checkpoint; ConversionError naming what is off."""
    missing = [k for k in REQUIRED if k not in source]
    if missing:
        raise ConversionError(f"not an ODTK checkpoint (missing {', '.join(missing)})")
    if "angles" in source:
        raise ConversionError("is a rotated-box ODTK model (it has angles); rotated conversion is not supported")
    names = source["backbone"]
    if not isinstance(names, (list, tuple)) or len(names) != 1:
        raise ConversionError(f"combines backbones {names}; only single-backbone ODTK models convert")
    prefix = f"backbones.{names[0]}."
    state = strip_batchnorm_counters(source["state_dict"])
    out = {}
    for key, value in state.items():
        new = _rename(key, prefix, mobilenet=names[0] == "MobileNetV2FPN")
        if new is None:
            raise ConversionError(f"unexpected key {key}")
        if new:
            out[new] = value
    ratios, scales = [float(r) for r in source["ratios"]], [float(s) for s in source["scales"]]
    _reorder_anchors(out, "cls_head.out", int(source["classes"]), ratios, scales)
    _reorder_anchors(out, "box_head.out", 4, ratios, scales)
    backbone = "MobileNetV2FPN320" if names[0] == "MobileNetV2FPN" else backbone_name(out, "backbone.")
    config = ModelConfig(
        backbone=backbone,
        classes=int(source["classes"]),
        anchor_ratios=ratios,
        anchor_scales=scales,
        box_offset=1.0,
        pad_multiple=128,
        channels=out["fpn.p7.weight"].shape[0],
    )
    return config, out


def _rename(key: str, prefix: str, mobilenet: bool) -> str | None:
    """Our key for ODTK's `key`; "" for the parts ODTK saves but never runs; None if unknown."""
    m = re.fullmatch(r"(cls_head|box_head)\.(\d+)\.(weight|bias)", key)
    if m:
        layer = int(m[2])
        return f"{m[1]}.out.{m[3]}" if layer == 8 else f"{m[1]}.tower.{layer}.{m[3]}"
    if not key.startswith(prefix):
        return None
    rest = key[len(prefix) :]
    module = rest.split(".", 1)[0]
    if module in _FPN:
        return "fpn." + rest.replace("pyramid", "p", 1)
    if mobilenet:
        return _rename_mobilenet(rest)
    if rest.startswith("features.fc."):
        return ""
    rest = re.sub(r"^features\.conv1\.", "stem.0.", rest)
    rest = re.sub(r"^features\.bn1\.", "stem.1.", rest)
    return "backbone." + rest.removeprefix("features.") if re.match(r"(stem|features\.layer)", rest) else None


def _rename_mobilenet(rest: str) -> str | None:
    """features.features.i -> our stage holding block i (MobileNetV2FPN320 keeps torchvision's indices)."""
    if rest.startswith("features.classifier."):
        return ""
    m = re.fullmatch(r"features\.features\.(\d+)\.(.+)", rest)
    if not m:
        return None
    block = int(m[1])
    if block > _MOBILENET_C5:
        return ""
    stage = 3 if block < 7 else 4 if block < 14 else 5
    return f"backbone.stage{stage}.{block}.{m[2]}"


def _reorder_anchors(state: dict[str, Tensor], name: str, width: int, ratios: list[float], scales: list[float]):
    """Output channels a * width + k from ODTK's anchor order to ours, in place."""
    order = [s * len(ratios) + r for r in range(len(ratios)) for s in range(len(scales))]
    channels = torch.tensor([a * width + k for a in order for k in range(width)])
    for suffix in ("weight", "bias"):
        key = f"{name}.{suffix}"
        if key in state:
            if state[key].shape[0] != len(channels):
                raise ConversionError(f"{key} has {state[key].shape[0]} outputs, not {len(order)} anchors x {width}")
            state[key] = state[key][channels].clone()
