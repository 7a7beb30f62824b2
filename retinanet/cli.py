"""Command line: flags, their checks and help, and the call of train / infer / export.

Flags default to None and only the flags given are passed on, so the defaults
live in one place each (config.ModelConfig, config.TrainConfig, the demo
presets, infer.InferOptions, export.ExportOptions); the help text shows them
from there.
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import Interrupted, UserError

OUTPUT = "detections.json"  # infer --output
# Never passed on to the commands' settings.
_NOT_SETTINGS = ("command", "debug", "model", "output", "override", "dist_timeout")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + line
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(kind, low=None, high=None, low_open=False):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a{'n integer' if kind is int else ' number'}, got {text!r}"
            ) from None
        if low is not None and (v <= low if low_open else v < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low}, got {text}")
        if high is not None and v > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text}")
        return v

    return parse


positive = _number(int, 1)
non_negative = _number(int, 0)
positive_float = _number(float, 0, low_open=True)
unit = _number(float, 0, 1)


def shown(value) -> str:
    """A default as a user types it: lists space-separated, floats short."""
    if isinstance(value, (list, tuple)):
        return " ".join(shown(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def default(settings, name: str, demo: dict | None = None, unit: str = "") -> str:
    """'[value]' or '[value; demo: value]' from the dataclass instance `settings`."""
    text = shown(getattr(settings, name)) + unit
    if demo is not None and name in demo:
        text += f"; demo: {shown(demo[name])}"
    return f"[{text}]"


def dm(name: str) -> str:
    """The default of a ModelConfig field, with the demo's where it differs."""
    from .config import DEMO_MODEL, ModelConfig

    return default(ModelConfig(), name, DEMO_MODEL)


def dt(name: str) -> str:
    """The default of a TrainConfig field, with the demo's where it differs."""
    from .config import DEMO_TRAIN, TrainConfig

    return default(TrainConfig(), name, DEMO_TRAIN)


def build_parser() -> Parser:
    p = Parser(prog="retinanet", description="Fast single-stage object detection (RetinaNet)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    _train_flags(sub.add_parser("train", help="train or resume a model"))
    _infer_flags(sub.add_parser("infer", help="detect objects in images, optionally measure COCO mAP"))
    _export_flags(sub.add_parser("export", help="export a checkpoint to ONNX (portable or TensorRT form)"))
    _convert_flags(sub.add_parser("convert", help="turn torchvision or ODTK RetinaNet weights into a checkpoint"))
    return p


def _train_flags(t: Parser) -> None:
    from .config import BATCH_PER_GPU, DEMO_TRAIN
    from .model.backbones import names
    from .train import DataPaths

    t.add_argument("model", help="checkpoint to write (resumed if it exists, unless --override)")
    t.add_argument("--backbone", choices=names(), help=f"backbone {dm('backbone')}")
    t.add_argument("--images", help=f"training image folder {default(DataPaths(), 'images')}")
    t.add_argument("--annotations", help="COCO JSON of the training set; none: the embedded demo data")
    t.add_argument("--val-images", help="validation image folder")
    t.add_argument("--val-annotations", help="COCO JSON of the validation set")
    t.add_argument("--classes", type=positive, help="class count [the annotations' category count]")
    t.add_argument(
        "--batch", type=positive, help=f"global batch [{BATCH_PER_GPU} per GPU; demo: {DEMO_TRAIN['batch']}]"
    )
    t.add_argument("--resize", type=positive, help=f"shorter side at validation {dm('resize')}")
    t.add_argument("--max-size", type=positive, help=f"longer side cap {dm('max_size')}")
    t.add_argument(
        "--jitter",
        type=positive,
        nargs=2,
        metavar=("MIN", "MAX"),
        help=f"random shorter side in training {dt('jitter')}",
    )
    t.add_argument("--iters", type=positive, help=f"iterations {dt('iters')}")
    t.add_argument("--milestones", type=positive, nargs="+", help=f"lr x gamma at these {dt('milestones')}")
    t.add_argument("--schedule", type=positive_float, help=f"scale iters and milestones {dt('schedule')}")
    t.add_argument("--lr", type=positive_float, help=f"learning rate {dt('lr')}")
    t.add_argument("--warmup", type=non_negative, help=f"linear warmup iterations {dt('warmup')}")
    t.add_argument("--gamma", type=positive_float, help=f"lr factor at each milestone {dt('gamma')}")
    t.add_argument(
        "--regularization-l2",
        type=_number(float, 0),
        dest="weight_decay",
        help=f"weight decay on conv weights {dt('weight_decay')}",
    )
    t.add_argument("--val-iters", type=positive, help=f"validate and checkpoint every N iterations {dt('val_iters')}")
    t.add_argument(
        "--clip-grad",
        type=_number(float, 0),
        metavar="NORM",
        help=f"clip the gradients' total L2 norm to NORM, 0 = off {dt('clip_grad')}",
    )
    _train_run_flags(t)


def _train_run_flags(t: Parser) -> None:
    """Checkpoints, precision, starting weights, augmentation, anchors, loader."""
    t.add_argument("--logdir", help="TensorBoard log folder")
    t.add_argument("--override", action="store_true", help="start fresh even if MODEL exists")
    t.add_argument("--full-precision", action="store_true", default=None, help="disable mixed precision")
    t.add_argument("--amp-dtype", choices=["fp16", "bf16"], help="mixed precision type [bf16 where supported]")
    t.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile the network (GPU; each new input size compiles once: best with few sizes, --jitter N N)",
    )
    t.add_argument(
        "--fine-tune",
        metavar="MODEL.pth",
        help="start from this checkpoint's weights, except the last classification conv",
    )
    t.add_argument("--backbone-weights", metavar="FILE", help="ImageNet state dict for the backbone")
    t.add_argument(
        "--no-pretrained",
        action="store_true",
        default=None,
        help="train the backbone from scratch (default for the demo)",
    )
    t.add_argument(
        "--head-norm",
        action=argparse.BooleanOptionalAction,
        help="GroupNorm in the head towers [on when training from scratch, off on ImageNet weights]",
    )
    for name in ("rotate", "brightness", "contrast", "hue", "saturation", "crop"):
        t.add_argument(f"--augment-{name}", action="store_true", default=None, help=f"random {name} augmentation")
    t.add_argument("--anchor-ious", type=unit, nargs=2, metavar=("BG", "FG"), help=f"matching IoUs {dm('anchor_ious')}")
    t.add_argument("--anchor-ratios", type=positive_float, nargs="+", help=f"anchor h/w ratios {dm('anchor_ratios')}")
    t.add_argument(
        "--anchor-scales",
        type=positive_float,
        nargs="+",
        help=f"anchor sizes in strides {dm('anchor_scales')}",
    )
    t.add_argument(
        "--rotated-bbox",
        dest="rotated",
        action="store_true",
        default=None,
        help="boxes with an angle: COCO bbox [x, y, w, h, θ] (radians, anti-clockwise); rotated mAP",
    )
    t.add_argument(
        "--anchor-angles",
        type=float,
        nargs="+",
        metavar="DEG",
        help=f"rotated anchors' angles in degrees {dm('anchor_angles')}",
    )
    t.add_argument("--seed", type=non_negative, help=f"random seed {dt('seed')}")
    t.add_argument(
        "--workers", type=non_negative, help=f"data loader processes; with --with-dali its CPU threads {dt('workers')}"
    )
    t.add_argument(
        "--with-dali",
        action="store_true",
        default=None,
        help="decode and augment with NVIDIA DALI (on the GPU; on the CPU without one)",
    )
    _timeout_flag(t)


def _infer_flags(i: Parser) -> None:
    from .config import BATCH_PER_GPU
    from .infer import InferOptions

    o = InferOptions()
    i.add_argument("model", help="checkpoint (.pth), ONNX model (.onnx) or TensorRT engine (.plan/.engine)")
    i.add_argument("--images", help=f"image folder {default(o, 'images')}")
    i.add_argument("--annotations", help="COCO JSON; when given, only its images are inferred and mAP is printed")
    i.add_argument("--output", default=OUTPUT, help=f"COCO results JSON [{OUTPUT}]")
    i.add_argument("--batch", type=positive, help=f"images per batch, per process [{BATCH_PER_GPU} per GPU]")
    i.add_argument("--resize", type=positive, help="shorter side [the model's]")
    i.add_argument("--max-size", type=positive, help="longer side cap [the model's]")
    i.add_argument("--full-precision", action="store_true", default=None, help="float32 on the GPU (default: fp16)")
    i.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile the network (GPU: fastest; each new input size compiles once, ~30 s)",
    )
    i.add_argument(
        "--workers",
        type=non_negative,
        help=f"file-reading threads on the GPU, loader processes on the CPU; DALI's CPU threads with --with-dali "
        f"{default(o, 'workers')}",
    )
    i.add_argument(
        "--with-dali",
        action="store_true",
        default=None,
        help="decode and resize with NVIDIA DALI (on the GPU; on the CPU without one)",
    )
    i.add_argument(
        "--draw",
        metavar="OUT",
        help="also write each image with its detections drawn into folder OUT (with --video: OUT.mp4, H.264)",
    )
    i.add_argument(
        "--draw-threshold", type=unit, metavar="S", help=f"lowest score drawn {default(o, 'draw_threshold')}"
    )
    i.add_argument(
        "--video",
        metavar="SOURCE",
        help="detect in a video instead of images: a file, an rtsp:// or http:// URL, or a camera /dev/videoN",
    )
    i.add_argument(
        "--video-timeout",
        type=positive_float,
        metavar="S",
        help=f"seconds a video URL or camera may stay silent {default(o, 'video_timeout', unit=' s')}",
    )
    i.add_argument("--override", action="store_true", help="replace an existing --output file (and --draw output)")
    _timeout_flag(i)


def _export_flags(e: Parser) -> None:
    from .export.options import ExportOptions

    o = ExportOptions()
    e.add_argument("model", help="checkpoint (.pth)")
    e.add_argument("output", help="OUTPUT.onnx: an ONNX model; any other name (e.g. engine.plan): a TensorRT engine")
    e.add_argument(
        "--size",
        type=positive,
        nargs="+",
        metavar="N",
        help="fixed input size: N (square) or H W, multiples of the model's pad multiple (32) "
        "[none: dynamic H and W, multiples of it up to the model's max size rounded up]",
    )
    e.add_argument("--full-precision", action="store_true", help="float32 model (default: float16)")
    e.add_argument(
        "--int8", action="store_true", help="INT8 Q/DQ model, scales from --calibration-images or --calibration-table"
    )
    e.add_argument("--calibration-images", metavar="DIR", help="images to calibrate INT8 activation ranges on")
    e.add_argument(
        "--calibration-batches",
        type=positive,
        help=f"calibration batches of 8 images {default(o, 'calibration_batches')}",
    )
    e.add_argument(
        "--calibration-table",
        metavar="FILE",
        help="reuse OUTPUT.calibration.json of an earlier --int8 export instead of calibrating",
    )
    e.add_argument(
        "--plugin-form",
        action="store_true",
        default=None,
        help="TensorRT form: decode and NMS as RetinaNetDecode/RetinaNetNMS plugin nodes "
        "(default: portable form with standard ONNX ops, runs in ONNX Runtime)",
    )
    e.add_argument("--opset", type=positive, help=f"ONNX opset, 18 to 21 {default(o, 'opset')}")
    e.add_argument(
        "--dynamic-batch-opts",
        type=positive,
        nargs=3,
        metavar=("MIN", "OPT", "MAX"),
        dest="batch_opts",
        help=f"TensorRT engines: batch sizes of the optimisation profile {default(o, 'batch_opts')}",
    )
    e.add_argument(
        "--workspace",
        type=positive,
        metavar="MiB",
        dest="workspace_mib",
        help=f"TensorRT engines: builder workspace limit in MiB {default(o, 'workspace_mib')}",
    )
    e.add_argument("--override", action="store_true", help="replace an existing OUTPUT (and calibration table)")
    e.add_argument("--verbose", action="store_true", default=None, help="show the exporter's progress and warnings")


def _convert_flags(c: Parser) -> None:
    c.add_argument(
        "source",
        help="a torchvision RetinaNet state dict (.pth), an ODTK checkpoint (.pth), or "
        "torchvision:retinanet_resnet50_fpn / torchvision:retinanet_resnet50_fpn_v2 (COCO weights "
        "from torchvision's cache, else downloaded)",
    )
    c.add_argument("output", help="the checkpoint to write (.pth)")
    c.add_argument(
        "--format",
        metavar="F",
        help="torchvision-v1, torchvision-v2 or odtk [detected from the keys]",
    )
    c.add_argument(
        "--categories",
        metavar="JSON",
        help="ODTK: a COCO JSON whose sorted category ids are the model's classes [the 80 COCO ids]",
    )
    c.add_argument("--override", action="store_true", help="replace an existing OUTPUT")


def _timeout_flag(parser: Parser) -> None:
    from .distributed import DEFAULT_TIMEOUT_S

    parser.add_argument(
        "--dist-timeout",
        type=positive_float,
        metavar="S",
        help=f"multi-process runs: seconds a rank waits for the others before the job fails [{DEFAULT_TIMEOUT_S:g}]",
    )


def given(ns: argparse.Namespace) -> dict:
    """The settings the user gave: flags left at None are not passed on."""
    return {k: v for k, v in vars(ns).items() if v is not None and k not in _NOT_SETTINGS}


def run_train(ns: argparse.Namespace) -> None:
    from . import train

    flags = given(ns)
    model_cfg, train_cfg, paths, pretrained = train.resolve_settings(flags)
    train.launch(
        ns.model,
        model_cfg,
        train_cfg,
        paths,
        override=ns.override,
        fine_tune=ns.fine_tune,
        pretrained=pretrained,
        backbone_weights=ns.backbone_weights,
        logdir=ns.logdir,
        explicit=frozenset(flags),
        timeout_s=ns.dist_timeout,
        compile=bool(ns.compile),
    )


def run_infer(ns: argparse.Namespace) -> None:
    from . import infer

    if ns.video is not None and (ns.images is not None or ns.annotations is not None):
        raise UserError("--video reads a video: it takes neither --images nor --annotations")
    options = infer.InferOptions(**given(ns))
    infer.launch(ns.model, ns.output, options, override=ns.override, timeout_s=ns.dist_timeout)


def run_export(ns: argparse.Namespace) -> None:
    from . import export

    flags = given(ns)
    int8, full = flags.pop("int8"), flags.pop("full_precision")
    if int8 or full:
        flags["precision"] = "int8" if int8 else "fp32"
    if "size" in flags:
        if len(flags["size"]) > 2:
            raise UserError(f"--size takes N or H W, got {len(flags['size'])} values")
        flags["size"] = tuple(flags["size"])
    if "batch_opts" in flags:
        flags["batch_opts"] = tuple(flags["batch_opts"])
    options = export.ExportOptions(**flags)
    result = export.export(ns.model, ns.output, options, override=ns.override)
    form = "TensorRT (plugin) form" if options.plugin_form else "portable form"
    print(
        f"wrote {ns.output}: {form}, {options.precision}, input {result['input']}, dynamic batch, "
        f"{result['export_s']:.1f} s"
    )
    if result["table"]:
        print(f"wrote calibration table {result['table']} (calibration {result['calibration_s']:.1f} s)")


def run_convert(ns: argparse.Namespace) -> None:
    import time

    from .convert import convert

    start = time.perf_counter()
    state = convert(ns.source, ns.output, ns.format, ns.categories, ns.override)
    config = state["config"]
    print(
        f"wrote {ns.output}: {state['converted_from']['format']} {config['backbone']}, "
        f"{config['classes']} classes, {time.perf_counter() - start:.1f} s"
    )


def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    main_rank = os.environ.get("RANK", "0") == "0"  # one line per run, not per process
    try:
        commands = {"train": run_train, "infer": run_infer, "export": run_export, "convert": run_convert}
        commands[ns.command](ns)
    except UserError as e:
        if ns.debug:
            raise
        if main_rank:
            print(f"retinanet: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        if main_rank:
            print(f"retinanet: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("retinanet: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
