"""`retinanet convert`: torchvision and ODTK RetinaNet weights as retinanet checkpoints.

The conventions in which those models differ from ours (P6 input, head-tower bias,
anchor placement, the +1 box convention, anchor order) become config settings or
exact weight permutations, so that the converted checkpoint detects what the source
model does, in every runtime: PyTorch, ONNX, TensorRT.
"""

from __future__ import annotations

import contextlib
import io
import json

from .. import checkpoint
from ..config import ModelConfig
from ..errors import UserError
from ..files import check_output, load_tensors
from . import from_odtk, from_torchvision
from .coco import COCO_IDS, COCO_NAMES
from .layout import ConversionError

FORMATS = ("torchvision-v1", "torchvision-v2", "odtk")
# torchvision's COCO weights by the builder names its documentation uses.
TORCHVISION_NAMES = {
    "retinanet_resnet50_fpn": "RetinaNet_ResNet50_FPN_Weights",
    "retinanet_resnet50_fpn_v2": "RetinaNet_ResNet50_FPN_V2_Weights",
}


def convert(
    source: str, output: str, format: str | None = None, categories: str | None = None, override: bool = False
) -> dict:
    """Write `source`'s model as a retinanet checkpoint at `output`; return the checkpoint."""
    if format is not None and format not in FORMATS:
        raise UserError(f"--format {format}: unknown format; choose one of {', '.join(FORMATS)}")
    check_output(output, override)
    loaded = _load_source(source)
    other = _other_detector(loaded)
    if other:  # also when --format names one: their keys overlap RetinaNet's
        raise UserError(f"{source}: {other}; convert takes RetinaNets (torchvision's or ODTK's)")
    fmt = format or _detect(loaded, source)
    try:
        if fmt == "odtk":
            config, state_dict = from_odtk.convert(loaded if isinstance(loaded, dict) else {})
            ids, names = _odtk_categories(config.classes, categories, source)
        else:
            config, state_dict = from_torchvision.convert(loaded, fmt)
            if categories is not None:
                raise UserError(f"{categories}: --categories applies to ODTK checkpoints; torchvision labels are ids")
            ids, names = from_torchvision.categories(config.classes)
    except ConversionError as e:
        raise UserError(f"{source}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # a part missing or of the wrong kind
        raise UserError(f"{source}: an incomplete or damaged {fmt} checkpoint ({type(e).__name__}: {e})") from None
    state = _checkpoint(config, state_dict, ids, names, source)
    state["converted_from"] = {"source": source, "format": fmt}
    checkpoint.save(output, state)
    return state


def _load_source(source: str) -> object:
    if source.startswith("torchvision:"):
        return _torchvision_weights(source)
    return load_tensors(source, "source checkpoint")


def _torchvision_weights(source: str) -> dict:
    """torchvision's COCO weights through its weights API: its cache, else a download."""
    name = source.split(":", 1)[1]
    if name not in TORCHVISION_NAMES:
        raise UserError(f"{source}: unknown torchvision model; choose one of {', '.join(TORCHVISION_NAMES)}")
    from torchvision.models import detection

    weights = getattr(detection, TORCHVISION_NAMES[name]).COCO_V1
    try:
        # torch hub prints "Downloading: ..." to stdout, whether or not it succeeds.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return weights.get_state_dict(progress=False)
    except Exception as e:  # network errors come in many types
        raise UserError(
            f"{source}: COCO weights are not cached and cannot be downloaded ({type(e).__name__}); "
            f"put {weights.url.rsplit('/', 1)[-1]} in torch's hub cache (TORCH_HOME/hub/checkpoints) "
            f"or pass the downloaded file itself as SOURCE"
        ) from None


def _detect(loaded: object, source: str) -> str:
    if from_torchvision.is_torchvision(loaded):
        return from_torchvision.detect_version(loaded)
    if from_odtk.is_odtk(loaded):
        return "odtk"
    if isinstance(loaded, dict) and all(k in loaded for k in checkpoint.REQUIRED):
        raise UserError(f"{source}: is already a retinanet checkpoint; nothing to convert")
    keys = list(loaded)[:3] if isinstance(loaded, dict) else []
    seen = f" (its first keys: {', '.join(map(str, keys))})" if keys else ""
    raise UserError(
        f"{source}: neither a torchvision RetinaNet state dict (keys head.classification_head.*) "
        f"nor an ODTK checkpoint (state_dict with cls_head.*){seen}"
    )


def _other_detector(loaded: object) -> str | None:
    """What a torchvision state dict of another detector is, told by keys only it has."""
    if not isinstance(loaded, dict):
        return None
    if any(str(k).startswith("roi_heads.") for k in loaded):
        return "a torchvision two-stage detector's state dict (Faster/Mask/Keypoint R-CNN: roi_heads.* keys)"
    if any(str(k).startswith("head.regression_head.bbox_ctrness") for k in loaded):
        return "a torchvision FCOS state dict (head.regression_head.bbox_ctrness keys)"
    return None


def _odtk_categories(classes: int, categories: str | None, source: str) -> tuple[list[int], list[str]]:
    """ODTK's contiguous classes are the sorted category ids of the training JSON."""
    if categories is None:
        if classes != len(COCO_IDS):
            raise UserError(f"{source}: has {classes} classes, not COCO's 80; pass --categories with the training JSON")
        return list(COCO_IDS), [COCO_NAMES[i] for i in COCO_IDS]
    found = _read_categories(categories)
    if len(found) != classes:
        raise UserError(f"{categories}: lists {len(found)} categories; {source} has {classes} classes")
    ids = sorted(found)
    return ids, [found[i] for i in ids]


def _read_categories(path: str) -> dict[int, str]:
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read the categories ({e})") from None
    cats = doc.get("categories") if isinstance(doc, dict) else None
    if not isinstance(cats, list) or not cats:
        raise UserError(f"{path}: no categories list (a COCO JSON with categories: [{{id, name}}, ...])")
    out = {}
    for i, c in enumerate(cats):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise UserError(f"{path}: categories[{i}] needs an integer id and a name")
        out[c["id"]] = c["name"]
    return out


def _checkpoint(config: ModelConfig, state_dict: dict, ids: list[int], names: list[str], source: str) -> dict:
    """The checkpoint, once the weights are known to fit the model exactly (key for key, shape for shape)."""
    from ..model import RetinaNet

    try:
        model = RetinaNet.from_state_dict(config, state_dict)
    except RuntimeError as e:
        first = str(e).splitlines()[0][:200]
        raise UserError(f"{source}: weights do not fit a {config.backbone} RetinaNet ({first})") from None
    return checkpoint.model_state(config, model, ids, names)


__all__ = ["FORMATS", "convert", "ConversionError"]
