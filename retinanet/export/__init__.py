"""Export a checkpoint: ONNX here (onnx.py, quantize.py); TensorRT engines build on the ONNX."""
from __future__ import annotations

from ..errors import UserError
from .onnx import DEFAULT_OPSET, ExportOptions, export_onnx  # noqa: F401


def export(model_path: str, output: str, options: ExportOptions, override: bool = False, log=print) -> dict:
    import os

    if os.path.exists(output) and not override:
        raise UserError(f"{output}: file exists; pass --override to replace it or choose another name")
    if options.precision == "int8" and options.calibration_images and not override:
        from .quantize import table_path

        if os.path.exists(table_path(output)):
            raise UserError(f"{table_path(output)}: calibration table exists; pass --override to replace it, "
                            f"or reuse it with --calibration-table")
    if output.lower().endswith(".onnx"):
        return export_onnx(model_path, output, options, log=log)
    raise UserError(f"{output}: TensorRT engine export is not available in this version; "
                    f"write an .onnx file (add --plugin-form for the TensorRT form)")
