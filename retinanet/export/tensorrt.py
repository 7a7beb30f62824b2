"""TensorRT-form ONNX -> serialised engine (.plan) plus its metadata (<plan>.json).

Precision is already in the graph (FP16 weights or INT8 Q/DQ), so the network is
strongly typed: `create_network(0)` on TensorRT 11 (the only mode there), the
STRONGLY_TYPED flag on 10.x. No precision builder flags, no calibrator.

One optimisation profile (profile_shapes): the batch range of --dynamic-batch-opts,
and for a dynamic-size export also its H x W range, tuned for a typical image.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

from .. import files
from ..config import ModelConfig
from ..errors import UserError
from ..formats.input import DynamicSize, InputSize, from_json, to_json
from ..formats.tensorrt import (
    import_tensorrt,
    load_plugins,
    metadata_path,
    plan_digest,
)


def check_batch_opts(opts: tuple[int, ...]) -> tuple[int, int, int]:
    """--dynamic-batch-opts MIN OPT MAX: 1 <= MIN <= OPT <= MAX."""
    if len(opts) != 3:
        raise UserError(f"--dynamic-batch-opts needs three numbers MIN OPT MAX, got {len(opts)}")
    lo, opt, hi = (int(v) for v in opts)
    if not 1 <= lo <= opt <= hi:
        raise UserError(f"--dynamic-batch-opts {lo} {opt} {hi}: need 1 <= MIN <= OPT <= MAX")
    return lo, opt, hi


def profile_shapes(
    input_size: InputSize, batch_opts, names=("images",), resize: int | None = None
) -> dict[str, dict[str, tuple]]:
    """The optimisation profile: min/opt/max shape of each input, `images` [B, 3, H, W] and, for
    models that take each image's size (GroupNorm heads, clip_to_image), `image_sizes` [B, 2]
    (export/onnx.py). The batch takes batch_opts. A fixed-size export has its one H x W. A
    dynamic one spans its range, min to max, and is tuned (opt) for a landscape image resized
    to `resize` (the model's; None: the largest input): H = resize rounded up to the multiple,
    W = the largest (max_size rounded up)."""
    spatial: dict[str, tuple[int, ...]]
    if isinstance(input_size, DynamicSize):
        m, (lo_h, lo_w), (hi_h, hi_w) = input_size.multiple, input_size.min, input_size.max
        opt_h = hi_h if resize is None else min(max(-(-resize // m) * m, lo_h), hi_h)
        spatial = {"min": (lo_h, lo_w), "opt": (opt_h, hi_w), "max": (hi_h, hi_w)}
    else:
        spatial = dict.fromkeys(("min", "opt", "max"), tuple(input_size))
    per_image = {"images": lambda k: (3, *spatial[k]), "image_sizes": lambda k: (2,)}
    unknown = [n for n in names if n not in per_image]
    if unknown:
        raise UserError(f"model input {unknown[0]!r} is not one of {', '.join(per_image)}: not a retinanet export")
    return {n: {k: (b, *per_image[n](k)) for k, b in zip(("min", "opt", "max"), batch_opts)} for n in names}


def write_metadata(plan_path: str, values: dict) -> str:
    path = metadata_path(plan_path)
    files.write_text(path, json.dumps(values, indent=1, sort_keys=True) + "\n")
    return path


def write_engine(plan_path: str, plan: bytes, values: dict) -> str:
    """The plan, then its metadata, each whole (atomic_write). The metadata names the plan's
    sha256, so a run killed between the two renames leaves a plan the old metadata does not
    describe, which the runtime refuses. If the metadata cannot be written the new plan is
    removed, and the old metadata with it (its plan is gone): nothing half-done remains."""
    files.write_bytes(plan_path, plan)
    try:
        return write_metadata(plan_path, {**values, "plan_sha256": plan_digest(plan)})
    except BaseException:
        for path in (plan_path, metadata_path(plan_path)):
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise


def network_flags(trt) -> int:
    """0 on TensorRT 11 (always strongly typed); the STRONGLY_TYPED bit on 10.x."""
    major = int(trt.__version__.split(".")[0])
    if major < 11 and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "unknown"


def build_plan(
    trt, onnx_path: str, shapes: dict, workspace_mib: int, cache_blob: bytes, verbose: bool = False
) -> tuple[bytes, bytes]:
    """The TensorRT calls: parse, one optimisation profile of `shapes` (profile_shapes), build.
    Returns (plan, timing cache)."""
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        lines = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            lines.append(f"node {e.node()} ({e.node_name()}, {e.node_operator()}): {e.desc()}")
        raise UserError(f"{onnx_path}: TensorRT cannot parse the model: " + "; ".join(lines))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    profile = builder.create_optimization_profile()
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(names) != sorted(shapes):
        raise UserError(f"{onnx_path}: model inputs {names} are not the export's {sorted(shapes)}")
    for name in names:
        profile.set_shape(name, shapes[name]["min"], shapes[name]["opt"], shapes[name]["max"])
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_blob)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        # Timings from another GPU or TensorRT version would mislead the tactic choice.
        print("timing cache is from another GPU or TensorRT version; starting a new one", file=sys.stderr)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"{onnx_path}: TensorRT engine build failed (run with --verbose for the builder log)")
    return bytes(plan), bytes(config.get_timing_cache().serialize())


def _read_timing_cache(path: str | None) -> bytes:
    if not path or not os.path.isfile(path):
        return b""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read the timing cache ({e.strerror})") from None


def build_engine(
    onnx_path: str,
    plan_path: str,
    onnx_metadata: dict,
    batch_opts: tuple[int, ...],
    workspace_mib: int,
    timing_cache: str | None = None,
    verbose: bool = False,
) -> dict:
    """Build and write the engine, its metadata and the timing cache. onnx_metadata: the ONNX
    export's retinanet.* values."""
    batch_opts = check_batch_opts(batch_opts)
    if workspace_mib <= 0:
        raise UserError(f"--workspace {workspace_mib}: must be positive (MiB)")
    if onnx_metadata.get("retinanet.form") != "tensorrt":
        raise UserError(f"{onnx_path}: not the TensorRT (plugin) form of the ONNX export")
    try:
        input_size = from_json(onnx_metadata["retinanet.input_size"])
        config = ModelConfig.from_dict(onnx_metadata["retinanet.config"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{onnx_path}: bad retinanet metadata ({str(e).splitlines()[0][:120]})") from None
    names = onnx_metadata.get("retinanet.inputs", ["images"])
    shapes = profile_shapes(input_size, batch_opts, names, config.resize)
    trt = import_tensorrt()
    load_plugins(trt)
    plan, cache = build_plan(trt, onnx_path, shapes, workspace_mib, _read_timing_cache(timing_cache), verbose)
    write_engine(
        plan_path,
        plan,
        {
            "config": onnx_metadata["retinanet.config"],
            "category_ids": onnx_metadata["retinanet.category_ids"],
            "category_names": onnx_metadata.get("retinanet.category_names"),
            "input_size": to_json(input_size),
            "precision": onnx_metadata.get("retinanet.precision"),
            "model_sha256": onnx_metadata.get("retinanet.model_sha256"),
            "tensorrt_version": trt.__version__,
            "gpu": gpu_name(),
            "batch_opts": list(batch_opts),
        },
    )
    if timing_cache:
        files.write_bytes(timing_cache, cache)
    result = {"output": plan_path, "metadata": metadata_path(plan_path)}
    if timing_cache:
        result["timing_cache"] = timing_cache
    return result
