"""Command line: parse flags and call train / infer / export. No logic lives here."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import Interrupted, UserError


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


def _timeout_flag(parser) -> None:
    from .distributed import DEFAULT_TIMEOUT_S

    parser.add_argument(
        "--dist-timeout",
        type=positive_float,
        metavar="S",
        help=f"multi-process runs: seconds a rank waits for the others before the job fails [{DEFAULT_TIMEOUT_S:g}]",
    )


def build_parser() -> Parser:
    from .model.backbones import names

    p = Parser(prog="retinanet", description="Fast single-stage object detection (RetinaNet)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    t = sub.add_parser("train", help="train or resume a model")
    t.add_argument("model", help="checkpoint to write (resumed if it exists, unless --override)")
    t.add_argument("--backbone", choices=names(), help="backbone [ResNet50FPN; demo: ResNet18FPN]")
    t.add_argument("--images", default=".", help="training image folder [.]")
    t.add_argument("--annotations", help="COCO JSON of the training set; none: the embedded demo data")
    t.add_argument("--val-images", help="validation image folder")
    t.add_argument("--val-annotations", help="COCO JSON of the validation set")
    t.add_argument("--classes", type=positive, help="class count [the annotations' category count]")
    t.add_argument("--batch", type=positive, help="global batch [2 per GPU; demo: 8]")
    t.add_argument("--resize", type=positive, help="shorter side at validation [800; demo: 128]")
    t.add_argument("--max-size", type=positive, help="longer side cap [1333; demo: 128]")
    t.add_argument(
        "--jitter",
        type=positive,
        nargs=2,
        metavar=("MIN", "MAX"),
        help="random shorter side in training [640 1024; demo: 96 128]",
    )
    t.add_argument("--iters", type=positive, help="iterations [90000; demo: 600]")
    t.add_argument("--milestones", type=positive, nargs="+", help="lr x gamma at these [60000 80000; demo: 450 550]")
    t.add_argument("--schedule", type=positive_float, help="scale iters and milestones [1]")
    t.add_argument("--lr", type=positive_float, help="learning rate [0.01; demo: 0.02]")
    t.add_argument("--warmup", type=non_negative, help="linear warmup iterations [1000; demo: 50]")
    t.add_argument("--gamma", type=positive_float, help="lr factor at each milestone [0.1]")
    t.add_argument(
        "--regularization-l2", type=_number(float, 0), dest="weight_decay", help="weight decay on conv weights [1e-4]"
    )
    t.add_argument("--val-iters", type=positive, help="validate and checkpoint every N iterations [8000; demo: 300]")
    t.add_argument(
        "--clip-grad",
        type=_number(float, 0),
        metavar="NORM",
        help="clip the gradients' total L2 norm to NORM, 0 = off [35]",
    )
    t.add_argument("--logdir", help="TensorBoard log folder")
    t.add_argument("--override", action="store_true", help="start fresh even if MODEL exists")
    t.add_argument("--full-precision", action="store_true", default=None, help="disable mixed precision")
    t.add_argument("--amp-dtype", choices=["fp16", "bf16"], help="mixed precision type [bf16 where supported]")
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
    t.add_argument("--anchor-ious", type=unit, nargs=2, metavar=("BG", "FG"), help="matching IoUs [0.4 0.5]")
    t.add_argument("--anchor-ratios", type=positive_float, nargs="+", help="anchor h/w ratios [0.5 1 2]")
    t.add_argument(
        "--anchor-scales",
        type=positive_float,
        nargs="+",
        help="anchor sizes in strides [4*2^(0/3) 4*2^(1/3) 4*2^(2/3)]",
    )
    t.add_argument("--seed", type=non_negative, help="random seed [0]")
    t.add_argument("--workers", type=non_negative, help="data loader processes; with --with-dali its CPU threads [2]")
    t.add_argument(
        "--with-dali",
        action="store_true",
        default=None,
        help="decode and augment with NVIDIA DALI (on the GPU; on the CPU without one)",
    )

    _timeout_flag(t)
    i = sub.add_parser("infer", help="detect objects in images, optionally measure COCO mAP")
    i.add_argument("model", help="checkpoint (.pth) or ONNX model (.onnx, run with ONNX Runtime)")
    i.add_argument("--images", default=".", help="image folder [.]")
    i.add_argument("--annotations", help="COCO JSON; when given, only its images are inferred and mAP is printed")
    i.add_argument("--output", default="detections.json", help="COCO results JSON [detections.json]")
    i.add_argument("--batch", type=positive, help="batch size [2 per GPU]")
    i.add_argument("--resize", type=positive, help="shorter side [the model's, 800]")
    i.add_argument("--max-size", type=positive, help="longer side cap [the model's, 1333]")
    i.add_argument("--full-precision", action="store_true", help="float32 on the GPU (default: fp16)")
    i.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the network (GPU: fastest; each new input size compiles once, ~30 s)",
    )
    i.add_argument(
        "--workers", type=non_negative, default=2, help="data loader processes; with --with-dali its CPU threads [2]"
    )
    i.add_argument(
        "--with-dali",
        action="store_true",
        help="decode and resize with NVIDIA DALI (on the GPU; on the CPU without one)",
    )
    i.add_argument("--override", action="store_true", help="replace an existing --output file")
    _timeout_flag(i)

    e = sub.add_parser("export", help="export a checkpoint to ONNX (portable or TensorRT form)")
    e.add_argument("model", help="checkpoint (.pth)")
    e.add_argument("output", help="OUTPUT.onnx: an ONNX model; any other name (e.g. engine.plan): a TensorRT engine")
    e.add_argument(
        "--size",
        type=positive,
        nargs="+",
        metavar="N",
        default=[1280],
        help="input size: N (square) or H W, multiples of 128 [1280]",
    )
    e.add_argument("--full-precision", action="store_true", help="float32 model (default: float16)")
    e.add_argument(
        "--int8", action="store_true", help="INT8 Q/DQ model, scales from --calibration-images or --calibration-table"
    )
    e.add_argument("--calibration-images", metavar="DIR", help="images to calibrate INT8 activation ranges on")
    e.add_argument("--calibration-batches", type=positive, default=2, help="calibration batches of 8 images [2]")
    e.add_argument(
        "--calibration-table",
        metavar="FILE",
        help="reuse OUTPUT.calibration.json of an earlier --int8 export instead of calibrating",
    )
    e.add_argument(
        "--plugin-form",
        action="store_true",
        help="TensorRT form: decode and NMS as RetinaNetDecode/RetinaNetNMS plugin nodes "
        "(default: portable form with standard ONNX ops, runs in ONNX Runtime)",
    )
    e.add_argument("--opset", type=positive, help="ONNX opset, 18 to 21 [19]")
    e.add_argument(
        "--dynamic-batch-opts",
        type=positive,
        nargs=3,
        metavar=("MIN", "OPT", "MAX"),
        default=[1, 8, 16],
        help="TensorRT engines: batch sizes of the optimisation profile [1 8 16]",
    )
    e.add_argument(
        "--workspace",
        type=positive,
        default=4096,
        metavar="MiB",
        help="TensorRT engines: builder workspace limit in MiB [4096]",
    )
    e.add_argument("--override", action="store_true", help="replace an existing OUTPUT (and calibration table)")
    e.add_argument("--verbose", action="store_true", help="show the exporter's progress and warnings")
    return p


def run_train(ns) -> None:
    from . import train

    given = {
        k: v for k, v in vars(ns).items() if v is not None and k not in ("command", "debug", "model", "dist_timeout")
    }
    model_cfg, train_cfg, paths, pretrained = train.resolve_settings(given)
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
        explicit=frozenset(given),
        timeout_s=ns.dist_timeout,
    )


def run_infer(ns) -> None:
    from . import distributed, files, infer, runtime
    from .runtime.pytorch import default_batch

    files.check_output(ns.output, ns.override, "--output file")  # before the model is even loaded
    place = distributed.from_env()  # under torchrun: images sharded over the processes
    device = None
    if place is not None and place.world > 1:
        device = distributed.device_for(place)
        distributed.init(place, device, timeout_s=ns.dist_timeout)
    try:
        detector = runtime.load(ns.model, device=device, full_precision=ns.full_precision, compile=ns.compile)
        infer.infer(
            detector,
            ns.images,
            ns.annotations,
            ns.output,
            ns.batch or default_batch(),
            ns.resize,
            ns.max_size,
            workers=ns.workers,
            override=ns.override,
            with_dali=ns.with_dali,
        )
    finally:
        distributed.shutdown()


def run_export(ns) -> None:
    from . import export

    if len(ns.size) > 2:
        raise UserError(f"--size takes N or H W, got {len(ns.size)} values")
    precision = "int8" if ns.int8 else "fp32" if ns.full_precision else "fp16"
    options = export.ExportOptions(
        size=tuple(ns.size),
        precision=precision,
        plugin_form=ns.plugin_form,
        opset=ns.opset or export.DEFAULT_OPSET,
        calibration_images=ns.calibration_images,
        calibration_batches=ns.calibration_batches,
        calibration_table=ns.calibration_table,
        verbose=ns.verbose,
        batch_opts=tuple(ns.dynamic_batch_opts),
        workspace_mib=ns.workspace,
    )
    result = export.export(ns.model, ns.output, options, override=ns.override)
    form = "TensorRT (plugin) form" if ns.plugin_form else "portable form"
    h, w = ns.size if len(ns.size) == 2 else ns.size * 2
    print(f"wrote {ns.output}: {form}, {precision}, input {h}x{w}, dynamic batch, {result['export_s']:.1f} s")
    if result["table"]:
        print(f"wrote calibration table {result['table']} (calibration {result['calibration_s']:.1f} s)")


def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    main_rank = os.environ.get("RANK", "0") == "0"  # one line per run, not per process
    try:
        {"train": run_train, "infer": run_infer, "export": run_export}[ns.command](ns)
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
