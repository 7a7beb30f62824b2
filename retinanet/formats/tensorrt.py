"""TensorRT engines as files: the plan's metadata (<plan>.json), the plugin library, importing TensorRT.

export/tensorrt.py writes engines and runtime/tensorrt.py runs them; both use these.
"""

from __future__ import annotations

import hashlib
import json
import os

from ..errors import UserError

PLUGIN_LIBRARY = "libretinanet_plugins.so"
METADATA_SUFFIX = ".json"
TIMING_CACHE_SUFFIX = ".timing_cache"
METADATA_KEYS = ("config", "category_ids", "input_size", "tensorrt_version", "gpu", "batch_opts", "plan_sha256")


def metadata_path(plan_path: str) -> str:
    return plan_path + METADATA_SUFFIX


def timing_cache_path(plan_path: str) -> str:
    return plan_path + TIMING_CACHE_SUFFIX


def plan_digest(plan: bytes) -> str:
    return hashlib.sha256(plan).hexdigest()


def read_metadata(plan_path: str) -> dict:
    path = metadata_path(plan_path)
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise UserError(
            f"{plan_path}: metadata {path} missing (it is written beside the engine by "
            f"`retinanet export`; copy it with the plan)"
        ) from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable engine metadata ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: engine metadata is not a JSON object")
    missing = [k for k in METADATA_KEYS if k not in meta]
    if missing:
        raise UserError(
            f"{path}: engine metadata lacks {', '.join(missing)} (written by another retinanet "
            f"version?); rebuild the engine with `retinanet export`"
        )
    return meta


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError(
            "TensorRT is not installed: pip install tensorrt (or use an NGC container with TensorRT), "
            "or export to .onnx"
        ) from None
    return trt


def plugin_library_path() -> str:
    """The plugin library: $RETINANET_PLUGINS, else the one installed inside the package."""
    env = os.environ.get("RETINANET_PLUGINS")
    path = env or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PLUGIN_LIBRARY)
    if not os.path.isfile(path):
        raise UserError(
            f"{path}: TensorRT plugin library not found; reinstall retinanet with TensorRT headers "
            f"available (TENSORRT_INCLUDE=...) or set RETINANET_PLUGINS to libretinanet_plugins.so"
        )
    return path


def load_plugins(trt, path: str | None = None) -> str:
    path = path or plugin_library_path()
    try:
        trt.get_plugin_registry().load_library(path)
    except Exception as e:  # TensorRT raises plain RuntimeError/TypeError
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: TensorRT cannot load the plugin library ({reason})") from None
    return path
