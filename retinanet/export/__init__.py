"""Export a checkpoint: ONNX here (onnx.py, quantize.py); TensorRT engines build on the ONNX."""

from __future__ import annotations

import importlib
import os

from ..errors import UserError
from ..files import check_output
from ..formats.tensorrt import metadata_path, timing_cache_path
from .onnx import export_onnx
from .options import ExportOptions

__all__ = ["ExportOptions", "export", "export_onnx"]

INSTALL_HINT = "pip install 'retinanet[onnx]'"


def require_onnx_packages(calibrating: bool) -> None:
    """ONNX export needs onnx and onnxscript (torch.onnx's exporter); calibration also runs
    the network in onnxruntime. Checked before any work, so a missing one is one line."""
    for name in ("onnx", "onnxscript") + (("onnxruntime",) if calibrating else ()):
        try:
            importlib.import_module(name)
        except ImportError as e:
            reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
            raise UserError(
                f"ONNX export needs the {name} package, which cannot be imported ({reason}): {INSTALL_HINT}"
            ) from None


def onnx_path(output: str) -> str:
    """The ONNX file an export writes: OUTPUT itself, or for an engine the TensorRT form beside it."""
    return output if output.lower().endswith(".onnx") else os.path.splitext(output)[0] + ".onnx"


def calibrating(options: ExportOptions) -> bool:
    return options.precision == "int8" and bool(options.calibration_images)


def check_outputs(output: str, options: ExportOptions, override: bool) -> None:
    """Every file the export will write may be written, before any work."""
    from . import quantize

    model = onnx_path(output)
    if model == output:
        check_output(output, override, "ONNX model")
    else:
        check_output(output, override, "engine")
        check_output(model, override, "engine's ONNX (written beside the engine)")
        check_output(metadata_path(output), override, "engine metadata")
        # A timing cache left by an earlier build is reused and updated, never refused.
        check_output(timing_cache_path(output), True, "timing cache")
    if calibrating(options):
        table = quantize.table_path(model)
        if os.path.exists(table) and not override:
            raise UserError(
                f"{table}: calibration table exists; pass --override to replace it, "
                f"or reuse it with --calibration-table"
            )
        check_output(table, True, "calibration table")


def export(model_path: str, output: str, options: ExportOptions, override: bool = False, log=print) -> dict:
    require_onnx_packages(calibrating(options))
    check_outputs(output, options, override)
    if onnx_path(output) == output:
        return export_onnx(model_path, output, options, log=log)
    return _export_engine(model_path, output, options, log)


def _export_engine(model_path: str, output: str, options: ExportOptions, log) -> dict:
    """Any other OUTPUT: the TensorRT-form ONNX (kept beside the plan), then the engine."""
    import dataclasses
    import time

    import onnx

    from ..formats.onnx import read_metadata
    from . import tensorrt

    tensorrt.check_batch_opts(options.batch_opts)
    tensorrt.import_tensorrt()  # fail before the ONNX export when TensorRT is missing
    model = onnx_path(output)
    start = time.perf_counter()
    result = export_onnx(model_path, model, dataclasses.replace(options, plugin_form=True), log=log)
    meta = read_metadata(onnx.load(model, load_external_data=False))
    result.update(
        tensorrt.build_engine(
            model,
            output,
            meta,
            options.batch_opts,
            options.workspace_mib,
            timing_cache=timing_cache_path(output),
            verbose=options.verbose,
        )
    )
    result["onnx"] = model
    result["export_s"] = time.perf_counter() - start
    return result
