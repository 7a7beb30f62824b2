"""Decode + NMS time: the CUDA ops vs the PyTorch reference vs torchvision's RetinaNet postprocess.

800x1088 input (P3..P7: 100x136 .. 7x9), A=9, C=80, a realistic score
distribution (a few % of the anchor-class scores above 0.05). Median of CUDA
event timings; inputs rotate between two sets so repeated runs do not just
measure the L2 cache. Prints a table, last; never asserts on time.

    python benchmarks/bench_postprocess.py [--batches 1 16] [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from retinanet.config import ModelConfig
from retinanet.ops import box as box_ops
from retinanet.ops import reference

LEVELS = [(100, 136), (50, 68), (25, 34), (13, 17), (7, 9)]
STRIDES = [8, 16, 32, 64, 128]
A, C = 9, 80


def make_inputs(batch, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    levels = []
    for h, w in LEVELS:
        shape = (batch, A * C, h, w)
        u = torch.rand(shape, generator=g, device="cuda")
        hot = torch.rand(shape, generator=g, device="cuda") < 0.03
        # most scores far under the threshold, 3% above it with a long tail towards 1
        scores = torch.where(hot, 0.05 + 0.95 * u**4, u * 0.05)
        deltas = torch.randn(batch, A * 4, h, w, generator=g, device="cuda") * 0.5
        levels.append((scores.to(dtype), deltas.to(dtype)))
    return levels


def anchors_per_level(device):
    cfg = ModelConfig()
    return [box_ops.base_anchors(s, cfg.anchor_ratios, cfg.anchor_scales).to(device) for s in STRIDES]


def detect(levels, anchors, decode, nms, cfg):
    decoded = [
        decode(s, d, a, stride, cfg.score_threshold, cfg.top_n, cfg.box_clamp)
        for (s, d), a, stride in zip(levels, anchors, STRIDES)
    ]
    scores, boxes, classes = (torch.cat([o[k] for o in decoded], dim=1) for k in range(3))
    return nms(scores, boxes, classes, cfg.nms_iou, cfg.detections)


def to_torchvision(levels, anchors):
    """The same head outputs in torchvision's layout: logits [B, H*W*A, C] per level."""
    cls, reg, anc = [], [], []
    for (s, d), a, stride, (h, w) in zip(levels, anchors, STRIDES, LEVELS):
        b = s.shape[0]
        logits = torch.logit(s.float().clamp(1e-6, 1 - 1e-6))
        cls.append(logits.view(b, A, C, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, C))
        reg.append(d.float().view(b, A, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, 4))
        anc.append(box_ops.grid_anchors(a, stride, h, w).permute(1, 2, 0, 3).reshape(-1, 4))
    batch = levels[0][0].shape[0]
    return {"cls_logits": cls, "bbox_regression": reg}, [anc] * batch


def torchvision_postprocess(cfg):
    from torchvision.models.detection import retinanet_resnet50_fpn

    model = retinanet_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=C,
        score_thresh=cfg.score_threshold,
        nms_thresh=cfg.nms_iou,
        detections_per_img=cfg.detections,
        topk_candidates=cfg.top_n,
    )
    model.eval()
    image_shape = (LEVELS[0][0] * STRIDES[0], LEVELS[0][1] * STRIDES[0])

    def run(head_outputs, anchors):
        return model.postprocess_detections(head_outputs, anchors, [image_shape] * len(anchors))

    return run


def median_ms(fn, input_sets, warmup, iters):
    for i in range(warmup):
        fn(input_sets[i % len(input_sets)])
    torch.cuda.synchronize()
    times = []
    for i in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        inp = input_sets[i % len(input_sets)]
        start.record()
        fn(inp)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graphed(fn, static_inputs):
    """fn captured in a CUDA graph over static_inputs; returns (replay, outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(static_inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(static_inputs)
    return graph.replay, out


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--profile", action="store_true", help="per-kernel CUDA time of the ops at batch 1")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_postprocess: no CUDA device; nothing to measure")
        return 0
    from retinanet import ops

    if not ops.HAVE_EXTENSION:
        print("bench_postprocess: retinanet._C is not built; only the reference would run")
        return 1
    cfg = ModelConfig()
    anchors = anchors_per_level("cuda")
    ext = (torch.ops.retinanet.decode, torch.ops.retinanet.nms)
    ref = (reference.decode, reference.nms)
    tv = torchvision_postprocess(cfg)
    device = torch.cuda.get_device_name()
    rows = []
    checks = []
    for batch in args.batches:
        sets32 = [make_inputs(batch, torch.float32, seed) for seed in (1, 2)]
        sets16 = [[(s.half(), d.half()) for s, d in lv] for lv in sets32]
        above = sum(int((s > cfg.score_threshold).sum()) for s, _ in sets32[0]) / batch
        total = sum(s[0].numel() for s, _ in sets32[0])
        print(
            f"batch {batch}: {above:.0f} of {total} scores per image above {cfg.score_threshold} "
            f"({100 * above / total:.1f}%)",
            flush=True,
        )

        # correctness on the benchmark inputs
        for name, sets in (("fp32", sets32), ("fp16", sets16)):
            ok = same(detect(sets[0], anchors, *ext, cfg), detect(sets[0], anchors, *ref, cfg))
            checks.append(f"bs{batch} {name}: ops == reference: {'yes' if ok else 'NO'}")

        t = {}
        for name, sets in (("fp32", sets32), ("fp16", sets16)):
            t[f"ours {name}"] = median_ms(lambda lv: detect(lv, anchors, *ext, cfg), sets, 5, args.iters)
            static = [(s.clone(), d.clone()) for s, d in sets[0]]
            replay, _ = graphed(lambda lv: detect(lv, anchors, *ext, cfg), static)
            t[f"ours {name} graph"] = median_ms(lambda _, replay=replay: replay(), [None], 5, args.iters)
        t["reference fp32"] = median_ms(lambda lv: detect(lv, anchors, *ref, cfg), sets32, 2, max(5, args.iters // 5))
        tv_sets = [to_torchvision(lv, anchors) for lv in sets32]
        t["torchvision fp32"] = median_ms(lambda x: tv(*x), tv_sets, 2, max(5, args.iters // 5))
        base = t["ours fp32"]
        for name, ms in t.items():
            rows.append((batch, name, ms, ms / batch, t["reference fp32"] / ms, t["torchvision fp32"] / ms, base / ms))
        del sets32, sets16, tv_sets
        torch.cuda.empty_cache()

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        lv = make_inputs(1, torch.float32, 3)
        detect(lv, anchors, *ext, cfg)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                detect(lv, anchors, *ext, cfg)
            torch.cuda.synchronize()
        print("\nper-kernel CUDA time, bs1 fp32, 10 runs of decode x5 + cat + nms:")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))

    print("\n## results: decode+NMS (800x1088, A=9, C=80), median of CUDA-event timings")
    print(f"device: {device}; torch {torch.__version__}")
    for line in checks:
        print(line)
    print(
        f"{'batch':>5}  {'implementation':<18} {'ms':>9} {'ms/img':>9} {'ref/this':>9} {'tv/this':>9} "
        f"{'ours32/this':>11}"
    )
    for batch, name, ms, per_img, vs_ref, vs_tv, vs_ours in rows:
        print(f"{batch:>5}  {name:<18} {ms:>9.3f} {per_img:>9.3f} {vs_ref:>9.1f} {vs_tv:>9.1f} {vs_ours:>11.2f}")
    print(
        "(ref/this, tv/this: how many times faster this row is than the reference / torchvision; target <= 0.3 ms bs1)"
    )
    return 0 if all(c.endswith("yes") for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
