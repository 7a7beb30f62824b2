"""Export a checkpoint: ONNX here (onnx.py, quantize.py); TensorRT engines build on the ONNX."""
from __future__ import annotations

import os

from ..errors import UserError
from .onnx import DEFAULT_OPSET, ExportOptions, export_onnx  # noqa: F401


def export(model_path: str, output: str, options: ExportOptions, override: bool = False, log=print) -> dict:
    if os.path.exists(output) and not override:
        raise UserError(f"{output}: file exists; pass --override to replace it or choose another name")
    if options.precision == "int8" and options.calibration_images and not override:
        from .quantize import table_path

        if os.path.exists(table_path(output)):
            raise UserError(f"{table_path(output)}: calibration table exists; pass --override to replace it, "
                            f"or reuse it with --calibration-table")
    if output.lower().endswith(".onnx"):
        return export_onnx(model_path, output, options, log=log)
    onnx_path = os.path.splitext(output)[0] + ".onnx"
    if os.path.exists(onnx_path) and not override:
        raise UserError(f"{onnx_path}: file exists (the engine's ONNX is written there); pass --override "
                        f"or choose another engine name")
    return _export_engine(model_path, output, options, log)


def _export_engine(model_path: str, output: str, options: ExportOptions, log) -> dict:
    """Any other OUTPUT: the TensorRT-form ONNX (kept beside the plan), then the engine."""
    import dataclasses
    import time

    import onnx

    from . import tensorrt
    from .onnx import read_metadata

    tensorrt.check_batch_opts(options.batch_opts)
    tensorrt.import_tensorrt()  # fail before the ONNX export when TensorRT is missing
    onnx_path = os.path.splitext(output)[0] + ".onnx"
    start = time.perf_counter()
    result = export_onnx(model_path, onnx_path, dataclasses.replace(options, plugin_form=True), log=log)
    meta = read_metadata(onnx.load(onnx_path, load_external_data=False))
    result.update(tensorrt.build_engine(onnx_path, output, meta, options.batch_opts, options.workspace_mib,
                                        timing_cache=output + ".timing_cache", verbose=options.verbose, log=log))
    result["onnx"] = onnx_path
    result["export_s"] = time.perf_counter() - start
    return result
