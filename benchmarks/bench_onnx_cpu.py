"""ONNX export and ONNX Runtime on the CPU: export and calibration time, latency, mAP.

Usage: python benchmarks/bench_onnx_cpu.py MODEL.pth VAL_IMAGES VAL_JSON CALIB_IMAGES [--size 128]
Exports FP32, FP16 and INT8 (portable form), then times ONNX Runtime per image at
batch 1 and 8 on padded demo-size inputs and measures val mAP of each through
the same evaluation code as `retinanet infer`. Prints a table of medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("val_images")
    p.add_argument("val_json")
    p.add_argument("calibration_images")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=30)
    a = p.parse_args()

    import retinanet
    from retinanet.data.coco import CocoAnnotations
    from retinanet.evaluate import coco_stats
    from retinanet.export import ExportOptions, export
    from retinanet.infer import detection_records, make_loader

    work = tempfile.mkdtemp()
    rows = []
    for precision in ("fp32", "fp16", "int8"):
        out = os.path.join(work, f"m_{precision}.onnx")
        options = ExportOptions(
            size=(a.size, a.size),
            precision=precision,
            calibration_images=a.calibration_images if precision == "int8" else None,
        )
        t0 = time.perf_counter()
        info = export(a.model, out, options, log=lambda *_: None)
        export_s = time.perf_counter() - t0
        det = retinanet.load(out)
        times = {}
        for batch in (1, 8):
            x = torch.randint(0, 256, (batch, 3, a.size, a.size), dtype=torch.uint8)
            for _ in range(3):
                det.run(x)
            samples = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                det.run(x)
                samples.append(time.perf_counter() - t0)
            times[batch] = statistics.median(samples) * 1e3 / batch
        coco = CocoAnnotations(a.val_json)
        loader = make_loader(det, a.val_images, coco, 8, det.config.resize, det.config.max_size, 0)
        stats = coco_stats(a.val_json, detection_records(det, loader), [r.id for r in coco.images])
        calib = info.get("calibration_s") if isinstance(info, dict) else None
        rows.append((precision, export_s, calib, times[1], times[8], stats[0]))
    print(f"\nONNX Runtime on the CPU ({os.cpu_count()} cores), input {a.size}x{a.size}")
    print(f"{'model':<6}{'export s':>10}{'calib s':>9}{'ms/img bs1':>12}{'ms/img bs8':>12}{'val mAP':>9}")
    for precision, export_s, calib, t1, t8, m in rows:
        c = f"{calib:.1f}" if calib is not None else "-"
        print(f"{precision:<6}{export_s:>10.1f}{c:>9}{t1:>12.2f}{t8:>12.2f}{m:>9.4f}")


if __name__ == "__main__":
    main()
