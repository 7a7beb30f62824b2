"""The export settings: the one place their defaults are defined.

The CLI's export flags default to None and only the flags given are passed, so
`retinanet export --help`, the Python API and INFERENCE.md's table all show
these values (tests/test_docs.py holds the table to them).
"""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_OPSETS = (18, 19, 20, 21)  # the dynamo exporter starts at 18
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass
class ExportOptions:
    # None: dynamic H and W, multiples of the model's pad multiple up to its max_size
    # rounded up (formats/input.dynamic_size). Else a fixed input, H W or N for N x N,
    # multiples of the pad multiple (ModelConfig.pad_multiple: 32, or 128 for
    # checkpoints saved with it).
    size: tuple[int, ...] | None = None
    precision: str = "fp16"  # one of PRECISIONS
    plugin_form: bool = False  # TensorRT form: decode/NMS as plugin nodes
    opset: int = 19
    calibration_images: str | None = None  # INT8: calibrate on these images
    calibration_batches: int = 2  # INT8: batches of 8 calibration images
    calibration_table: str | None = None  # INT8: reuse an earlier export's table instead
    verbose: bool = False
    batch_opts: tuple[int, int, int] = (1, 8, 16)  # TensorRT engines: optimisation profile MIN OPT MAX
    workspace_mib: int = 4096  # TensorRT engines: builder workspace limit
