"""COCO mAP of detections: pycocotools, or faster-coco-eval when installed."""

from __future__ import annotations

import contextlib
import io
import json

STAT_NAMES = [
    ("AP", "0.50:0.95", "all", 100),
    ("AP", "0.50", "all", 100),
    ("AP", "0.75", "all", 100),
    ("AP", "0.50:0.95", "small", 100),
    ("AP", "0.50:0.95", "medium", 100),
    ("AP", "0.50:0.95", "large", 100),
    ("AR", "0.50:0.95", "all", 1),
    ("AR", "0.50:0.95", "all", 10),
    ("AR", "0.50:0.95", "all", 100),
    ("AR", "0.50:0.95", "small", 100),
    ("AR", "0.50:0.95", "medium", 100),
    ("AR", "0.50:0.95", "large", 100),
]


def _coco_classes():
    try:  # same API, several times faster
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as COCOeval

        return COCO, COCOeval
    except ImportError:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval


def coco_stats(
    annotations_file: str, detections: list[dict], image_ids: list[int] | None = None, rotated: bool = False
) -> list[float]:
    """The 12 COCO bbox stats of `detections` (COCO result records) against the file.

    rotated: the records carry their boxes' corners as `segmentation` (runtime.Detections.records);
    COCO's segm evaluation scores those polygons against the ground truth's, made from the
    annotations' [x, y, w, h, θ] boxes the same way (docs/rotated.md), whatever
    segmentation the file holds. With no detections at all every stat is 0 (pycocotools
    cannot load an empty list).
    """
    if not detections:
        return [0.0] * 12
    COCO, COCOeval = _coco_classes()
    with open(annotations_file) as f:
        doc = json.load(f)
    # COCOeval reads `area` and `iscrowd`, which the COCO format lets files omit.
    for a in doc["annotations"]:
        a.setdefault("iscrowd", 0)
        a.setdefault("area", a["bbox"][2] * a["bbox"][3])
    if rotated:
        _rotated_ground_truth(doc["annotations"])
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = doc
        gt.createIndex()
        dt = gt.loadRes(detections)
        ev = COCOeval(gt, dt, "segm" if rotated else "bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(s) for s in ev.stats[:12]]


def _rotated_ground_truth(annotations: list[dict]) -> None:
    import torch

    from .ops import rotated

    for a in annotations:
        x, y, w, h, *theta = (float(v) for v in a["bbox"])
        box = torch.tensor([[x + w / 2, y + h / 2, w, h, theta[0] if theta else 0.0]], dtype=torch.float64)
        a["segmentation"] = [rotated.polygons(box)[0].tolist()]
        a["area"] = w * h
        a["bbox"] = [x, y, w, h]  # COCO's loader reads 4 values; the polygon carries the turn


def format_stats(stats: list[float], rotated: bool = False) -> str:
    lines = ["metric  IoU        area    maxDets  value", "-" * 40]
    if rotated:
        lines.insert(0, "rotated boxes: COCO segm AP of the boxes' polygons")
    for (kind, iou, area, dets), v in zip(STAT_NAMES, stats):
        lines.append(f"{kind:<7} {iou:<10} {area:<7} {dets:>7}  {v:6.3f}")
    return "\n".join(lines)
