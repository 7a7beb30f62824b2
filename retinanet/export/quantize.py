"""INT8 explicit quantisation of the exported network: calibration, table, Q/DQ.

Every Conv gets QuantizeLinear -> DequantizeLinear on its input activation
(int8, per tensor, symmetric: zero point 0) and on its weight (int8, per
output channel, axis 0, symmetric). Weight scales are max|w| / 127 per channel,
computed from the weights. Activation scales come from calibration: the float32
network runs in ONNX Runtime over the calibration images and each Conv input's
|x| is histogrammed (2048 bins up to its maximum); amax is the 99.999th
percentile, scale = amax / 127. Decode and NMS come after the network and are
never quantised. Everything else (adds, resizes, norms) stays float32.

Calibration images are preprocessed as the runtime will for this export: resized
with the model's resize/max_size capped to the (largest) input, then a fixed-size
export pads each batch to its H x W (cropping what does not fit), a dynamic-size
export pads each batch to its own size rounded up to the pad multiple. The scales
are per tensor, so the ones of a dynamic export serve every size in its range
(an engine's whole optimisation profile).

Calibration table (``NAME.calibration.json`` beside the exported ``NAME.onnx``;
for an engine export that is the engine's ONNX), JSON written with sorted keys:

    {"format": "retinanet-calibration", "version": 2,
     "model_sha256": "<export.onnx.model_hash of the checkpoint>",
     "input_size": [H, W], "method": "percentile", "percentile": 99.999,
     "bins": 2048, "images": 16, "batch_size": 8, "batches": 2,
     "scales": {"<conv input tensor name>": <float32 scale>, ...}}

Scales are float32 values written as JSON numbers, which round-trip exactly,
so ``--calibration-table`` rebuilds the byte-identical Q/DQ model without images.
``input_size`` is the export's, as its metadata holds it (formats/input.to_json):
[H, W], or for a dynamic export its range {"dynamic": true, "multiple": m,
"min": [h, w], "max": [h, w]}. A table is reused only for an export of the same
input size: the same fixed size, or dynamic with the same range (which follows
from the model, so any dynamic export of it), because the scales come from
images padded for that input. Version 1 tables (fixed sizes only) are read too.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..data import transforms as T
from ..errors import UserError
from ..files import write_text
from ..formats.input import InputSize, batch_input_size, describe, fit_config, from_json, to_json
from ..formats.onnx import providers_for, session_options
from ..images import CorruptImage, list_images, mean_pixel, pad_images, padded_size, read_image

TABLE_FORMAT = "retinanet-calibration"
TABLE_VERSION = 2
READ_TABLE_VERSIONS = (1, 2)  # 1: input_size [H, W] only
METHOD = "percentile"
PERCENTILE = 99.999
BINS = 2048
BATCH_SIZE = 8  # calibration images per batch
SEED = 0  # which images are picked from the folder
QMAX = 127.0


def table_path(output: str) -> str:
    """The table beside an ONNX export `output` (export.onnx_path gives it for any OUTPUT)."""
    base = output[: -len(".onnx")] if output.lower().endswith(".onnx") else output
    return base + ".calibration.json"


def conv_inputs(proto) -> list[str]:
    """Activation inputs of the Conv nodes, in graph order, each once."""
    seen, out = set(), []
    for node in proto.graph.node:
        if node.op_type == "Conv" and node.input[0] not in seen:
            seen.add(node.input[0])
            out.append(node.input[0])
    return out


def _calibration_batches(config: ModelConfig, size: InputSize, folder: str, batches: int):
    names = list_images(folder, "calibration image folder")
    random.Random(SEED).shuffle(names)
    names = names[: batches * BATCH_SIZE]
    fitted = fit_config(config, size)
    fill = mean_pixel(config.mean)
    for start in range(0, len(names), BATCH_SIZE):
        images = []
        for name in names[start : start + BATCH_SIZE]:
            try:
                img = read_image(os.path.join(folder, name))
            except CorruptImage as e:
                raise UserError(f"{e} (calibration image)") from None
            img, _ = T.resize_image(img, fitted.resize, fitted.max_size)
            if isinstance(size, tuple):  # a fixed input: what does not fit is cut off
                img = img[:, : size[0], : size[1]]
            images.append(img)
        batch = pad_images(images, batch_input_size(size, *padded_size([i.shape[1:] for i in images], 1)), fill)
        sizes = np.array([img.shape[1:] for img in images], dtype=np.int32)
        yield batch.float().numpy(), sizes


def _feed(net, batch: np.ndarray, sizes: np.ndarray) -> dict:
    """The network's inputs: images, and image_sizes where the model takes them (export/onnx.py)."""
    names = [i.name for i in net.graph.input]
    return {names[0]: batch, **({names[1]: sizes} if len(names) > 1 else {})}


def _session_with_outputs(proto, names: list[str]):
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    have = {o.name for o in probe.graph.output}
    for name in names:
        if name not in have:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return ort.InferenceSession(probe.SerializeToString(), session_options(), providers=providers_for(None))


def calibrate(net, config: ModelConfig, size: InputSize, folder: str, batches: int, digest: str, log=None) -> dict:
    """Run the float32 network over the calibration images; return the table (a dict)."""
    names = conv_inputs(net)
    session = _session_with_outputs(net, names)
    amax = {n: 0.0 for n in names}
    # Pass 1: maxima (the histogram ranges). Pass 2: histograms of |x|.
    count = 0
    for batch, sizes in _calibration_batches(config, size, folder, batches):
        count += batch.shape[0]
        for name, value in zip(names, session.run(names, _feed(net, batch, sizes))):
            amax[name] = max(amax[name], float(np.abs(value).max()))
    hists = {n: np.zeros(BINS, dtype=np.int64) for n in names}
    for i, (batch, sizes) in enumerate(_calibration_batches(config, size, folder, batches)):
        for name, value in zip(names, session.run(names, _feed(net, batch, sizes))):
            top = amax[name] if amax[name] > 0 else 1.0
            hists[name] += np.histogram(np.abs(value), bins=BINS, range=(0.0, top))[0]
        if log is not None:
            log(f"calibration batch {i + 1}")
    scales = {}
    for name in names:
        cdf = np.cumsum(hists[name]) / max(1, hists[name].sum())
        edge = int(np.searchsorted(cdf, PERCENTILE / 100.0)) + 1  # upper edge of the percentile's bin
        value = (amax[name] if amax[name] > 0 else 1.0) * min(edge, BINS) / BINS
        scales[name] = float(np.float32(max(value, 1e-8) / QMAX))
    return {
        "format": TABLE_FORMAT,
        "version": TABLE_VERSION,
        "model_sha256": digest,
        "input_size": to_json(size),
        "method": METHOD,
        "percentile": PERCENTILE,
        "bins": BINS,
        "images": count,
        "batch_size": BATCH_SIZE,
        "batches": -(-count // BATCH_SIZE),
        "scales": scales,
    }


def write_table(path: str, table: dict) -> None:
    write_text(path, json.dumps(table, indent=1, sort_keys=True) + "\n")


def read_table(path: str, digest: str, size: InputSize) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"{path}: calibration table not found")
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable calibration table ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(table, dict) or table.get("format") != TABLE_FORMAT or not isinstance(table.get("scales"), dict):
        raise UserError(f"{path}: not a retinanet calibration table")
    if table.get("version") not in READ_TABLE_VERSIONS or isinstance(table.get("version"), bool):
        readable = " or ".join(map(str, READ_TABLE_VERSIONS))
        raise UserError(f"{path}: calibration table version {table.get('version')} is not {readable}")
    if table.get("model_sha256") != digest:
        other = str(table.get("model_sha256"))[:12]
        raise UserError(
            f"{path}: calibration table is for another model (sha256 {other}..., this checkpoint "
            f"is {digest[:12]}...): calibrate again with --calibration-images"
        )
    _check_table_size(path, table, size)
    bad = [k for k, v in table["scales"].items() if not isinstance(v, (int, float)) or not v > 0]
    if bad:
        raise UserError(f"{path}: calibration scale of {bad[0]} is not a positive number")
    table["path"] = path
    return table


def _check_table_size(path: str, table: dict, size: InputSize) -> None:
    """The table must be for this export's input size (module docstring)."""
    try:
        got = from_json(table.get("input_size"))
        if table.get("version") == 1 and not isinstance(got, tuple):
            raise ValueError("version 1 tables have fixed sizes only")
    except ValueError as e:
        raise UserError(f"{path}: bad calibration table input_size ({str(e).splitlines()[0][:120]})") from None
    if got == size:
        return
    how = "export without --size" if not isinstance(got, tuple) else f"export with --size {got[0]} {got[1]}"
    raise UserError(
        f"{path}: calibration table is for input size {describe(got)}, not {describe(size)}: {how} or calibrate again"
    )


def insert_qdq(net, table: dict):
    """Q/DQ on every Conv input and weight of the float32 network (in place; returned)."""
    from onnx import TensorProto, helper, numpy_helper

    scales = table["scales"]
    where = table.get("path", "calibration table")
    inits = {i.name: i for i in net.graph.initializer}
    new_nodes: list = []
    new_inits: list = []
    done: dict[str, str] = {}

    def qdq(tensor: str, scale: np.ndarray, axis: int | None) -> str:
        if tensor in done:
            return done[tensor]
        s = helper.make_tensor(
            f"{tensor}_qdq_scale", TensorProto.FLOAT, list(scale.shape), scale.astype(np.float32).flatten().tolist()
        )
        z = helper.make_tensor(f"{tensor}_qdq_zero_point", TensorProto.INT8, list(scale.shape), [0] * int(scale.size))
        new_inits.extend([s, z])
        attrs: dict[str, Any] = {} if axis is None else {"axis": axis}
        q, dq = f"{tensor}_quantized", f"{tensor}_dequantized"
        new_nodes.append(
            helper.make_node("QuantizeLinear", [tensor, s.name, z.name], [q], name=f"{tensor}_QuantizeLinear", **attrs)
        )
        new_nodes.append(
            helper.make_node("DequantizeLinear", [q, s.name, z.name], [dq], name=f"{tensor}_DequantizeLinear", **attrs)
        )
        done[tensor] = dq
        return dq

    for node in net.graph.node:
        if node.op_type == "Conv":
            x, w = node.input[0], node.input[1]
            if x not in scales:
                raise UserError(
                    f"{where}: no scale for Conv input {x!r}: the table does not match this "
                    f"model's graph (written by another retinanet version?); calibrate again"
                )
            if w not in inits:
                raise RuntimeError(f"Conv {node.name}: weight {w} is not an initializer")
            weight = numpy_helper.to_array(inits[w]).astype(np.float32)
            amax = np.abs(weight).reshape(weight.shape[0], -1).max(axis=1)
            w_scale = np.maximum(amax, 1e-8) / QMAX
            node.input[0] = qdq(x, np.array(scales[x], dtype=np.float32), None)
            node.input[1] = qdq(w, w_scale.astype(np.float32), 0)
        new_nodes.append(node)
    del net.graph.node[:]
    net.graph.node.extend(new_nodes)
    net.graph.initializer.extend(new_inits)
    return net
