"""Checkpoint -> ONNX, in two forms from one network export.

The network (normalisation, backbone, FPN, heads, sigmoid) is exported once by
torch.onnx (the dynamo exporter) in the requested precision; INT8 adds Q/DQ to
it (quantize.py). Then one of two tails is appended:

* portable (default): decode and class-aware NMS in standard ONNX ops and
  NonMaxSuppression (postprocess.py, exported by torch.onnx as well), runnable
  by ONNX Runtime;
* TensorRT (``plugin_form``): one ``RetinaNetDecode`` node per FPN level, three
  Concats, one ``RetinaNetNMS`` node, in domain ``trt.plugins``. The TensorRT
  ONNX parser imports an unknown op as the plugin whose name is the op_type
  (version from ``plugin_version``, namespace from ``plugin_namespace``); every
  other attribute becomes a PluginField of the same name.

One decode node per level because the decode kernel (csrc/kernels/decode.h)
works on one level: its anchors, stride and H x W are per level, and per-level
nodes keep each plugin's inputs plain tensors of one level (H x W from the
input shapes, so that the plugins serve dynamic sizes too).

Both forms: input ``images`` float32 [batch, 3, H, W], pixels 0..255 RGB,
padded right/bottom with the mean colour. H and W are dynamic by default:
any multiples of the pad multiple up to the model's max_size rounded up
(formats/input.dynamic_size), exported as ``m * Dim`` so that the graph holds
for every such size; the head shapes, the candidates' cell positions (and so
the anchors, centred on their cells) and the clipping limits come from the
runtime shapes inside the graph. ``--size`` exports one fixed H x W instead.
Models whose detections depend on each image's size within the padded batch
(config.takes_image_sizes: GroupNorm heads, or config.clip_to_image as in converted
torchvision models) take a second input ``image_sizes`` int32 [batch, 2]: each
image's (h, w) before padding, in input pixels. Candidate boxes are clipped to it
before NMS, and GroupNorm heads normalise over that region only and give the cells
outside it score 0 (model.RetinaNet), so that detections do not depend on H x W
beyond the backbone's border effects. The inputs are listed in METADATA_INPUTS;
the other models keep the one input. Outputs ``scores`` float32 [batch, D],
``boxes`` float32 [batch, D, 4] (x1, y1, x2, y2 in input pixels), ``classes``
int32 [batch, D]; padding has score 0, box 0, class -1. The batch axis is
dynamic. metadata_props carry what a runtime needs (METADATA_* keys), the input
size as formats/input.to_json writes it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import time
import warnings

import torch
import torch.nn as nn

from .. import checkpoint
from ..config import ModelConfig
from ..errors import UserError
from ..files import check_output, write_bytes
from ..formats.input import DynamicSize, InputSize, describe, dynamic_size, largest, to_json
from ..formats.onnx import (
    FORMAT_VERSION,
    IMAGE_SIZES,
    IMAGES,
    METADATA_CATEGORY_IDS,
    METADATA_CATEGORY_NAMES,
    METADATA_CONFIG,
    METADATA_FORM,
    METADATA_FORMAT_VERSION,
    METADATA_INPUT_SIZE,
    METADATA_INPUTS,
    METADATA_MODEL_SHA256,
    METADATA_PRECISION,
)
from ..images import list_images
from ..model import RetinaNet
from ..model.batchnorm import fold_batchnorm
from .options import PRECISIONS, SUPPORTED_OPSETS, ExportOptions

PLUGIN_DOMAIN = "trt.plugins"
PLUGIN_VERSION = "1"
EXAMPLE_BATCH = 2  # traced batch; the exported axis is dynamic
ROTATED_PORTABLE = (
    "{model}: a rotated-box model exports in the TensorRT form only (--plugin-form, or an engine): "
    "standard ONNX has no rotated-box NMS for the portable form"
)
MAX_BATCH = 4096


def model_hash(state: dict) -> str:
    """sha256 of what defines the exported network: the config and every weight (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    config = state["config"].to_dict() if isinstance(state["config"], ModelConfig) else state["config"]
    h.update(json.dumps(config, sort_keys=True).encode())
    for name in sorted(state["state_dict"]):
        t = state["state_dict"][name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


class NetworkForExport(nn.Module):
    """images float32 [B, 3, H, W] 0..255 (and, where config.takes_image_sizes, image_sizes
    int32 [B, 2]) -> sigmoid scores then box deltas per level, float32.

    Normalisation stays float32; the backbone/FPN/heads run in `dtype`; the
    outputs are cast back so decode and NMS always see float32. Backbone
    BatchNorm is folded into the convs first: one Conv per layer, so INT8
    quantises the effective weights and TensorRT sees a plain conv graph.
    """

    def __init__(self, model: RetinaNet, dtype: torch.dtype):
        super().__init__()
        self.model = copy.deepcopy(model).eval().float()
        fold_batchnorm(self.model.backbone)
        self.dtype = dtype
        for part in (self.model.backbone, self.model.fpn, self.model.cls_head, self.model.box_head):
            part.to(dtype)

    def forward(self, images, image_sizes=None):
        m = self.model
        x = ((images - m.pixel_mean) / m.pixel_std).to(self.dtype)
        features = m.fpn(m.backbone(x))
        masks = m.valid_masks(image_sizes, [tuple(f.shape[-2:]) for f in features], self.dtype)
        cls_heads = [m.cls_head(f, k).float() for f, k in zip(features, masks)]
        scores = m.scores(cls_heads, image_sizes)
        deltas = [m.box_head(f, k).float() for f, k in zip(features, masks)]
        return (*scores, *deltas)


def input_names(config: ModelConfig) -> list[str]:
    """The exported model's inputs: image_sizes only where the detections depend on the padding
    (the heads' statistics, or the clipping to each image)."""
    return [IMAGES, IMAGE_SIZES] if config.takes_image_sizes else [IMAGES]


def head_names(levels: int) -> list[str]:
    return [f"scores_{i}" for i in range(levels)] + [f"deltas_{i}" for i in range(levels)]


@contextlib.contextmanager
def _quiet(verbose: bool):
    """The exporter prints progress and warns a lot; show it only with --verbose."""
    if verbose:
        yield
        return
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _torch_export(
    module: nn.Module,
    args: tuple,
    input_names: list[str],
    output_names: list[str],
    opset: int,
    verbose: bool,
    translations: dict | None = None,
    varargs: bool = False,
    axes: list[dict] | None = None,
):
    """torch.onnx (dynamo) of `module` on example `args`: axis 0 of every input is the dynamic
    batch; axes[i] adds dynamic axes of input i ({axis: torch.export.Dim or m * Dim})."""
    import onnx  # noqa: F401  (fail early with the install hint)

    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    shapes: tuple = tuple({0: batch, **(axes[i] if axes else {})} for i in range(len(args)))
    if varargs:  # forward(*tensors): one positional entry holding them all
        shapes = (shapes,)
    with _quiet(verbose), torch.no_grad():
        program = torch.onnx.export(
            module,
            args,
            None,
            dynamo=True,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=shapes,
            custom_translation_table=translations,
            verbose=verbose,
            optimize=True,
        )
    assert program is not None  # None comes only from the TorchScript exporter (dynamo=False)
    return program.model_proto


def example_size(size: InputSize) -> tuple[int, int]:
    """The traced H x W: the fixed size, or the dynamic range's largest height and one multiple
    less than its largest width. The two differ, so that the trace cannot take them for one
    size, and neither is a single multiple, which the trace would fix (dynamic_size's range
    spans at least three multiples)."""
    if not isinstance(size, DynamicSize):
        return size
    (h, w), m = size.max, size.multiple
    return h, w - m


def _spatial_axes(size: InputSize) -> dict:
    """The dynamic H and W of `images`: multiples of the pad multiple within the range."""
    if not isinstance(size, DynamicSize):
        return {}
    m = size.multiple
    height = torch.export.Dim("height", min=size.min[0] // m, max=size.max[0] // m)
    width = torch.export.Dim("width", min=size.min[1] // m, max=size.max[1] // m)
    return {2: m * height, 3: m * width}


def export_network(model: RetinaNet, size: InputSize, dtype: torch.dtype, opset: int, verbose: bool = False):
    """The network part alone as an ONNX ModelProto: images (, image_sizes) -> scores_i, deltas_i."""
    inputs = input_names(model.config)
    h, w = example_size(size)
    args: tuple[torch.Tensor, ...] = (torch.full((EXAMPLE_BATCH, 3, h, w), 114.0),)
    if IMAGE_SIZES in inputs:
        args += (torch.tensor([[h, w]] * EXAMPLE_BATCH, dtype=torch.int32),)
    names = head_names(len(model.config.strides))
    axes = [_spatial_axes(size)] + [{}] * (len(args) - 1)
    return _torch_export(NetworkForExport(model, dtype), args, inputs, names, opset, verbose, axes=axes)


def _tail_example(config: ModelConfig, net, size: InputSize) -> tuple[tuple, list[dict]]:
    """Example head tensors for the tail's export, shaped as the network's outputs, and their
    dynamic axes: where the network left a level's H or W symbolic, a Dim of that level
    (shared by its scores and deltas) up to the level's cells at the largest input, which
    the example takes (a traced axis of size 1 would be fixed at 1)."""
    shapes = _output_shapes(net)
    top = largest(size)
    level_axes, level_cells = [], []
    for i, stride in enumerate(config.strides):
        axes, cells = {}, []
        for axis, name, pixels in ((2, "height", top[0]), (3, "width", top[1])):
            dim, most = shapes[f"scores_{i}"][axis], -(-pixels // stride)
            if isinstance(dim, str) and most > 1:
                axes[axis] = torch.export.Dim(f"{name}_{i}", min=1, max=most)
            cells.append(most if isinstance(dim, str) else dim)
        level_axes.append(axes)
        level_cells.append(cells)
    example = tuple(
        torch.rand(EXAMPLE_BATCH, shapes[name][1], *cells)
        for name, cells in zip(head_names(len(config.strides)), level_cells + level_cells)
    )
    return example, level_axes + level_axes


def _portable_tail(model: RetinaNet, net, size: InputSize, opset: int, verbose: bool):
    from .postprocess import NMS_TRANSLATION, ClippingPostprocess, PortablePostprocess

    names = head_names(len(model.config.strides))
    example, axes = _tail_example(model.config, net, size)
    tail: PortablePostprocess
    if IMAGE_SIZES in input_names(model.config):
        tail = ClippingPostprocess(model.config, model.base_anchors())
        h, w = example_size(size)
        example += (torch.tensor([[h, w]] * EXAMPLE_BATCH, dtype=torch.int32),)
        names = names + [IMAGE_SIZES]
        axes = axes + [{}]
    else:
        tail = PortablePostprocess(model.config, model.base_anchors())
    return _torch_export(
        tail, example, names, ["scores", "boxes", "classes"], opset, verbose, NMS_TRANSLATION, varargs=True, axes=axes
    )


def _output_shapes(proto) -> dict[str, list]:
    return {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}


def _plugin_tail(config: ModelConfig, base_anchors, net):
    """RetinaNetDecode per level -> Concat -> RetinaNetNMS, as a bare graph (nodes, outputs, value_info).
    Rotated models: RetinaNetDecodeRotated and RetinaNetNMSRotated, boxes of 5 values, no clipping."""
    from onnx import helper

    batch = net.graph.input[0].type.tensor_type.shape.dim[0].dim_param or "batch"
    suffix, values = ("Rotated", 5) if config.rotated else ("", 4)
    # The +1 convention's field: always written for axis-aligned models, though the plugins read an
    # absent one as 0, so that the graph says which box convention it was exported for.
    offset = {} if config.rotated else {"box_offset": float(config.box_offset)}
    nodes, infos = [], []
    parts: dict[str, list[str]] = {"scores": [], "boxes": [], "classes": []}
    for i, (stride, anchors) in enumerate(zip(config.strides, base_anchors)):
        outs = [f"decode_{k}_{i}" for k in ("scores", "boxes", "classes")]
        nodes.append(
            helper.make_node(
                f"RetinaNetDecode{suffix}",
                [f"scores_{i}", f"deltas_{i}"],
                outs,
                name=f"RetinaNetDecode{suffix}_{i}",
                domain=PLUGIN_DOMAIN,
                plugin_version=PLUGIN_VERSION,
                plugin_namespace="",
                score_threshold=float(config.score_threshold),
                top_n=int(config.top_n),
                box_clamp=float(config.box_clamp),
                stride=int(stride),
                anchors=[float(v) for v in anchors.flatten().tolist()],
                **offset,
            )
        )
        infos += _candidate_infos(outs, batch, config.top_n, values)
        for k, name in zip(parts, outs):
            parts[k].append(name)
    clip = len(net.graph.input) > 1 and not config.rotated  # image_sizes: config.takes_image_sizes
    for k, names in parts.items():
        out = "candidate_boxes_unclipped" if clip and k == "boxes" else f"candidate_{k}"
        nodes.append(helper.make_node("Concat", names, [out], name=f"Concat_{k}", axis=1))
    if clip:
        nodes += _clip_nodes(net.graph.input[1].name, "candidate_boxes_unclipped", "candidate_boxes")
    nodes.append(
        helper.make_node(
            f"RetinaNetNMS{suffix}",
            [f"candidate_{k}" for k in parts],
            ["scores", "boxes", "classes"],
            name=f"RetinaNetNMS{suffix}",
            domain=PLUGIN_DOMAIN,
            plugin_version=PLUGIN_VERSION,
            plugin_namespace="",
            nms_iou=float(config.nms_iou),
            detections=int(config.detections),
            **offset,
        )
    )
    outputs = _candidate_infos(["scores", "boxes", "classes"], batch, config.detections, values)
    return nodes, outputs, infos


def _candidate_infos(names: list[str], batch, count: int, values: int) -> list:
    """Value infos of scores [B, count], boxes [B, count, values], classes [B, count] (int32)."""
    from onnx import TensorProto, helper

    return [
        helper.make_tensor_value_info(names[0], TensorProto.FLOAT, [batch, count]),
        helper.make_tensor_value_info(names[1], TensorProto.FLOAT, [batch, count, values]),
        helper.make_tensor_value_info(names[2], TensorProto.INT32, [batch, count]),
    ]


def _clip_nodes(sizes: str, boxes: str, out: str) -> list:
    """Boxes [B, N, 4] clipped to the valid (h, w) of sizes [B, 2]: model.detector.clip_boxes as ONNX nodes."""
    from onnx import TensorProto, helper

    def const(name, values):
        tensor = helper.make_tensor(name, TensorProto.INT64, [len(values)], values)
        return helper.make_node("Constant", [], [name], name=f"Constant_{name}", value=tensor)

    return [
        helper.make_node("Cast", [sizes], ["clip_sizes"], name="Cast_clip_sizes", to=TensorProto.FLOAT),
        const("clip_order", [1, 0, 1, 0]),
        const("clip_axis", [1]),
        helper.make_node("Gather", ["clip_sizes", "clip_order"], ["clip_limits"], name="Gather_clip_limits", axis=1),
        helper.make_node("Unsqueeze", ["clip_limits", "clip_axis"], ["clip_limits_3d"], name="Unsqueeze_clip_limits"),
        helper.make_node("Min", [boxes, "clip_limits_3d"], [out], name="Min_clip_boxes"),
    ]


def _append_tail(net, nodes, outputs, initializers=(), value_info=(), functions=(), opsets=()):
    """Replace the network's outputs (the head tensors) by a tail consuming them."""
    graph = net.graph
    graph.node.extend(nodes)
    graph.initializer.extend(initializers)
    heads = [o for o in graph.output]
    graph.value_info.extend(heads)  # keep the head shapes known
    graph.value_info.extend(value_info)
    del graph.output[:]
    graph.output.extend(outputs)
    net.functions.extend(functions)
    have = {o.domain for o in net.opset_import}
    for o in opsets:
        if o.domain not in have:
            net.opset_import.append(o)
            have.add(o.domain)
    return net


def _merge_portable(net, tail):
    """Append the exported postprocess graph, renaming its internal names apart."""
    inputs = {i.name for i in tail.graph.input}
    outputs = {o.name for o in tail.graph.output}

    def rename(name):
        return name if (not name or name in inputs or name in outputs) else f"postprocess/{name}"

    for node in tail.graph.node:
        node.name = f"postprocess/{node.name}" if node.name else node.name
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
        for attr in node.attribute:  # subgraphs (If/Loop) are not used by the tail
            assert not attr.g.node and not attr.graphs, "unexpected subgraph in the postprocess export"
    for init in tail.graph.initializer:
        init.name = rename(init.name)
    for vi in tail.graph.value_info:
        vi.name = rename(vi.name)
    return _append_tail(
        net,
        tail.graph.node,
        tail.graph.output,
        tail.graph.initializer,
        tail.graph.value_info,
        tail.functions,
        tail.opset_import,
    )


def _set_metadata(proto, values: dict) -> None:
    del proto.metadata_props[:]
    for key in sorted(values):
        entry = proto.metadata_props.add()
        entry.key = key
        entry.value = json.dumps(values[key], sort_keys=True)


def parse_size(size, config: ModelConfig) -> InputSize:
    """--size N or H W: that fixed size, checked; None: the dynamic range of the model."""
    if size is None:
        return dynamic_size(config)
    h, w = (size[0], size[0]) if len(size) == 1 else (size[0], size[1])
    m = config.pad_multiple
    if h % m or w % m or h <= 0 or w <= 0:
        raise UserError(
            f"--size {h} {w}: height and width must be positive multiples of {m} (the model's pad multiple)"
        )
    return h, w


def check_options(options: ExportOptions) -> None:
    """The option combinations an export refuses, before any work."""
    if options.opset not in SUPPORTED_OPSETS:
        raise UserError(f"--opset {options.opset}: unsupported; choose one of {', '.join(map(str, SUPPORTED_OPSETS))}")
    if options.precision not in PRECISIONS:
        raise UserError(f"unknown precision {options.precision!r}")
    if options.precision != "int8":
        if options.calibration_table or options.calibration_images:
            raise UserError("--calibration-images/--calibration-table apply to --int8 only")
        return
    if options.calibration_table and options.calibration_images:
        raise UserError(
            "--calibration-table and --calibration-images exclude each other: the table replaces calibration"
        )
    if not options.calibration_table and not options.calibration_images:
        raise UserError("--int8 needs --calibration-images DIR (or --calibration-table FILE from an earlier export)")
    if options.calibration_images:
        list_images(options.calibration_images, "calibration image folder")


def _graph_with_tail(model: RetinaNet, net, size: InputSize, options: ExportOptions):
    """The network's graph with decode + NMS appended: plugin nodes, or standard ops (portable)."""
    import onnx

    if options.plugin_form:
        nodes, outputs, infos = _plugin_tail(model.config, model.base_anchors(), net)
        opset = onnx.helper.make_opsetid(PLUGIN_DOMAIN, 1)
        proto = _append_tail(net, nodes, outputs, value_info=infos, opsets=[opset])
    else:
        proto = _merge_portable(net, _portable_tail(model, net, size, options.opset, options.verbose))
    proto.graph.name = "retinanet"
    proto.doc_string = ""
    return proto


def _metadata(config: ModelConfig, state: dict, size, options: ExportOptions, digest: str) -> dict:
    meta = {
        METADATA_CONFIG: config.to_dict(),
        METADATA_CATEGORY_IDS: list(state["category_ids"]),
        METADATA_INPUT_SIZE: to_json(size),
        METADATA_PRECISION: options.precision,
        METADATA_FORM: "tensorrt" if options.plugin_form else "portable",
        METADATA_MODEL_SHA256: digest,
        METADATA_FORMAT_VERSION: FORMAT_VERSION,
        METADATA_INPUTS: input_names(config),
    }
    names = checkpoint.category_names(state)
    if names is not None:
        meta[METADATA_CATEGORY_NAMES] = names
    return meta


def export_onnx(model_path: str, output: str, options: ExportOptions, log=print) -> dict:
    """Write the ONNX model (and, for INT8 from images, its calibration table). Returns timings and paths."""
    from . import calibrating, quantize, require_onnx_packages

    require_onnx_packages(calibrating(options))
    import onnx

    check_options(options)
    check_output(output, True, "ONNX model")  # API callers replace; `export` asks for --override
    if calibrating(options):
        check_output(quantize.table_path(output), True, "calibration table")
    model, state = checkpoint.load_model(model_path)
    if model.config.rotated and not options.plugin_form:
        raise UserError(ROTATED_PORTABLE.format(model=model_path))
    size = parse_size(options.size, model.config)
    digest = model_hash(state)
    result: dict = {"output": output, "table": None, "calibration_s": None, "input": describe(size)}
    table = quantize.read_table(options.calibration_table, digest, size) if options.calibration_table else None

    start = time.perf_counter()
    dtype = torch.float16 if options.precision == "fp16" else torch.float32
    net = export_network(model, size, dtype, options.opset, options.verbose)
    if options.precision == "int8":
        if table is None:
            assert options.calibration_images  # check_options: INT8 without a table has images
            t0 = time.perf_counter()
            table = quantize.calibrate(
                net,
                model.config,
                size,
                options.calibration_images,
                options.calibration_batches,
                digest,
                log=log if options.verbose else None,
            )
            result["calibration_s"] = time.perf_counter() - t0
            result["table"] = quantize.table_path(output)
        net = quantize.insert_qdq(net, table)
    proto = _graph_with_tail(model, net, size, options)
    _set_metadata(proto, _metadata(model.config, state, size, options, digest))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:  # a bug here, not a user error: keep the details
        raise RuntimeError(f"exported graph fails onnx.checker: {e}") from None
    if result["table"] and table is not None:  # written only for a model that passed the checker
        quantize.write_table(result["table"], table)
    write_bytes(output, proto.SerializeToString())
    result["export_s"] = time.perf_counter() - start
    return result
