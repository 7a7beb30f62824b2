"""The ONNX export's metadata (what export/onnx.py writes and runtime/ reads) and ONNX Runtime sessions.

An export carries its settings in metadata_props as JSON values under
retinanet.* keys: the ModelConfig, the category ids, the input size (fixed, or
a dynamic range: formats/input.py), the form (portable or TensorRT) and the
layout's format version.

Format versions: 1 wrote input_size as [H, W] only (every export had a fixed
size); 2 also writes a dynamic range there, {"dynamic": true, "multiple": m,
"min": [h, w], "max": [h, w]}. Both are read.
"""

from __future__ import annotations

import json

import torch

from ..config import ModelConfig
from ..errors import UserError
from .input import InputSize, from_json

METADATA_CONFIG = "retinanet.config"
METADATA_CATEGORY_IDS = "retinanet.category_ids"
METADATA_CATEGORY_NAMES = "retinanet.category_names"  # optional: files of earlier versions lack it
METADATA_INPUT_SIZE = "retinanet.input_size"  # [H, W], or a dynamic range (format version 2)
METADATA_PRECISION = "retinanet.precision"  # "fp32" | "fp16" | "int8"
METADATA_FORM = "retinanet.form"  # "portable" | "tensorrt"
METADATA_MODEL_SHA256 = "retinanet.model_sha256"
METADATA_FORMAT_VERSION = "retinanet.format_version"
METADATA_INPUTS = "retinanet.inputs"  # ["images"] or ["images", "image_sizes"]
IMAGES, IMAGE_SIZES = "images", "image_sizes"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)


def read_metadata(proto_or_map) -> dict:
    """metadata_props (or ORT's custom_metadata_map) -> python values for the retinanet.* keys."""
    if isinstance(proto_or_map, dict):
        items = list(proto_or_map.items())
    else:
        items = [(p.key, p.value) for p in proto_or_map.metadata_props]
    return {k: json.loads(v) for k, v in items if k.startswith("retinanet.")}


def providers_for(device) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    want = torch.device(device).type if device is not None else None
    if want == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise UserError(
                "device cuda asked for, but this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if want is None and "CUDAExecutionProvider" in available and torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session_options(threads: int | None = None):
    """Quiet ONNX Runtime session options (warnings only), `threads` intra-op threads if given."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return options


def read_model_metadata(path: str, props: dict) -> tuple[ModelConfig, InputSize, list[int]]:
    """config, input size and category ids from an export's metadata_props, checked: a model
    whose metadata is broken, incomplete or of another format version is one line naming it."""
    if not any(k.startswith("retinanet.") for k in props):
        raise UserError(f"{path}: not a retinanet ONNX export (no retinanet.* metadata)")
    values = {}
    for key, text in props.items():
        if key.startswith("retinanet."):
            try:
                values[key] = json.loads(text)
            except ValueError as e:
                raise UserError(f"{path}: metadata {key} is not valid JSON ({e}); re-export the model") from None
    version = values.get(METADATA_FORMAT_VERSION)
    if version not in READ_VERSIONS or isinstance(version, bool):
        got = "missing" if version is None else f"{version!r}"
        raise UserError(
            f"{path}: metadata format version {got}, this retinanet reads versions "
            f"{', '.join(map(str, READ_VERSIONS))}: re-export the model with this retinanet"
        )
    missing = [k for k in (METADATA_CONFIG, METADATA_CATEGORY_IDS, METADATA_INPUT_SIZE) if k not in values]
    if missing:
        raise UserError(f"{path}: not a complete retinanet ONNX export (metadata {', '.join(missing)} missing)")
    if values.get(METADATA_FORM, "portable") != "portable":
        raise UserError(f"{path}: this is the TensorRT (plugin) form; ONNX Runtime runs the portable form")
    key = METADATA_CONFIG
    try:
        config = ModelConfig.from_dict(values[METADATA_CONFIG])
        key = METADATA_INPUT_SIZE
        size = from_json(values[METADATA_INPUT_SIZE])
        if version == 1 and not isinstance(size, tuple):
            raise ValueError("format version 1 has fixed sizes only")
        key = METADATA_CATEGORY_IDS
        category_ids = [_count(v, 0) for v in values[METADATA_CATEGORY_IDS]]
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: bad metadata {key} ({str(e).splitlines()[0][:120]})") from None
    if len(category_ids) != config.classes:
        raise UserError(
            f"{path}: metadata {METADATA_CATEGORY_IDS} lists {len(category_ids)} ids "
            f"for a model of {config.classes} classes"
        )
    return config, size, category_ids


def category_names(props: dict, count: int) -> list[str] | None:
    """The class names an export's metadata_props carry, or None: drawings then show
    category ids. Names that are unreadable or do not fit the class count are ignored, not
    fatal: they only label drawings."""
    try:
        names = json.loads(props.get(METADATA_CATEGORY_NAMES, "null"))
    except ValueError:
        return None
    if not isinstance(names, list) or len(names) != count:
        return None
    return [str(n) for n in names]


def _count(value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{value!r} is not an integer >= {low}")
    return value
