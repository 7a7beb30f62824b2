"""Rotated boxes: decode + NMS time (CUDA ops vs the PyTorch reference), and training img/s
of a rotated ResNet50FPN against the axis-aligned one.

Decode + NMS: the 5 levels of an 800x1333 input (P3..P7: 100x167 .. 7x11), 27 anchors
(3 angles x 3 ratios x 3 scales), 80 classes, a few % of the anchor-class scores above
0.05; top 1000 per level, 100 detections. Eager and in one CUDA graph, fp32 and fp16,
batch 1 and 16; median of CUDA-event timings, inputs alternating between two sets.
Training: model.loss + backward + SGD step, bf16 autocast, random 800x1333 images with
random rotated / axis-aligned targets, same batch for both. Prints tables last; never
asserts on time.

    python benchmarks/bench_rotated.py [--batches 1 16] [--train-batch 8] [--skip-train]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21), (7, 11)]
STRIDES = [8, 16, 32, 64, 128]
INPUT = (800, 1333)
C = 80
ANGLES = (-60.0, 0.0, 60.0)
RATIOS = (0.5, 1.0, 2.0)
SCALES = (4.0, 4.0 * 2 ** (1 / 3), 4.0 * 2 ** (2 / 3))
A = len(ANGLES) * len(RATIOS) * len(SCALES)
THRESHOLD, TOP_N, IOU, DETECTIONS = 0.05, 1000, 0.5, 100
CLAMP = math.log(1000 / 16)


def anchors(stride, device):
    """[A, 5] (0, 0, w, h, α), the angle varying slowest (docs/rotated.md)."""
    rows = []
    for angle in ANGLES:
        for ratio in RATIOS:
            for scale in SCALES:
                size = stride * scale
                rows.append([0.0, 0.0, size / math.sqrt(ratio), size * math.sqrt(ratio), math.radians(angle)])
    return torch.tensor(rows, device=device)


def make_inputs(batch, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    levels = []
    for h, w in LEVELS:
        shape = (batch, A * C, h, w)
        u = torch.rand(shape, generator=g, device="cuda")
        hot = torch.rand(shape, generator=g, device="cuda") < 0.03
        scores = torch.where(hot, THRESHOLD + (1 - THRESHOLD) * u**4, u * THRESHOLD)
        deltas = torch.randn(batch, A * 6, h, w, generator=g, device="cuda") * 0.5
        levels.append((scores.to(dtype), deltas.to(dtype)))
    return levels


def detect(levels, tables, decode, nms):
    decoded = [decode(s, d, a, stride, THRESHOLD, TOP_N, CLAMP) for (s, d), a, stride in zip(levels, tables, STRIDES)]
    scores, boxes, classes = (torch.cat([o[k] for o in decoded], dim=1) for k in range(3))
    return nms(scores, boxes, classes, IOU, DETECTIONS)


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


def images_differing(a, b):
    """How many images' outputs (scores, boxes, classes) differ at all."""
    same = torch.ones(a[0].shape[0], dtype=torch.bool, device=a[0].device)
    for x, y in zip(a, b):
        same &= (x == y).reshape(x.shape[0], -1).all(1)
    return int((~same).sum())


def postprocess(batches, iters):
    from retinanet.ops import reference

    tables = [anchors(s, "cuda") for s in STRIDES]
    ops = (torch.ops.retinanet.decode_rotated, torch.ops.retinanet.nms_rotated)
    ref = (reference.decode_rotated, reference.nms_rotated)
    rows, checks = [], []
    for batch in batches:
        sets32 = [make_inputs(batch, torch.float32, seed) for seed in (1, 2)]
        sets16 = [[(s.half(), d.half()) for s, d in lv] for lv in sets32]
        above = sum(int((s > THRESHOLD).sum()) for s, _ in sets32[0]) / batch
        total = sum(s[0].numel() for s, _ in sets32[0])
        print(f"batch {batch}: {above:.0f} of {total} scores per image above {THRESHOLD}", flush=True)
        for name, sets in (("fp32", sets32), ("fp16", sets16)):
            ours = detect(sets[0], tables, *ops)
            theirs = detect(sets[0], tables, *ref)
            differ = images_differing(ours, theirs)
            # The kernels' IoU is float32, the reference's float64: an IoU within rounding of
            # the threshold may be decided either way (tests/test_cuda_rotated.py checks that).
            checks.append(f"bs{batch} {name}: ops == reference in {batch - differ} of {batch} images")
        t = {}
        for name, sets in (("fp32", sets32), ("fp16", sets16)):
            t[f"ours {name}"] = median_ms(lambda lv: detect(lv, tables, *ops), sets, 5, iters)
            static = [(s.clone(), d.clone()) for s, d in sets[0]]
            replay, _ = graphed(lambda lv: detect(lv, tables, *ops), static)
            t[f"ours {name} graph"] = median_ms(lambda _, replay=replay: replay(), [None], 5, iters)
            del static, replay
        t["reference fp32"] = median_ms(lambda lv: detect(lv, tables, *ref), sets32, 1, 3)
        for name, ms in t.items():
            rows.append((batch, name, ms, ms / batch, t["reference fp32"] / ms))
        del sets32, sets16
        torch.cuda.empty_cache()
    return rows, checks


def random_targets(batch, count, gen, rotated):
    """[B, count, 6] (cx, cy, w, h, θ, label) or [B, count, 5] (x1, y1, x2, y2, label) in input pixels."""
    h, w = INPUT
    centre = torch.rand(batch, count, 2, generator=gen) * torch.tensor([w * 0.8, h * 0.8]) + torch.tensor([w, h]) * 0.1
    size = torch.rand(batch, count, 2, generator=gen) * 200 + 32
    labels = torch.randint(0, C, (batch, count, 1), generator=gen).float()
    if rotated:
        theta = (torch.rand(batch, count, 1, generator=gen) - 0.5) * 2 * math.pi * 0.999
        return torch.cat([centre, size, theta, labels], -1)
    return torch.cat([centre - size / 2, centre + size / 2, labels], -1)


def training(batch, iters, warmup):
    """img/s of model.loss + backward + SGD step for the axis-aligned and rotated ResNet50FPN."""
    import torch.nn.functional as F

    from retinanet.config import ModelConfig
    from retinanet.model import RetinaNet

    try:
        ModelConfig(classes=C, rotated=True)
    except (TypeError, ValueError) as e:  # the rotated model is not there (yet)
        return None, f"skipped: ModelConfig(rotated=True) fails: {e}"
    h, w = INPUT
    multiple = ModelConfig().pad_multiple
    ph, pw = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    rows = []
    for name, rotated in (("axis-aligned", False), ("rotated", True)):
        gen = torch.Generator().manual_seed(0)
        config = ModelConfig(classes=C, rotated=True) if rotated else ModelConfig(classes=C)
        model = RetinaNet(config).cuda().to(memory_format=torch.channels_last).train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
        images = torch.rand(batch, 3, h, w, generator=gen).cuda() * 255
        images = F.pad(images, (0, pw - w, 0, ph - h), value=120.0).contiguous(memory_format=torch.channels_last)
        targets = random_targets(batch, 6, gen, rotated).cuda()

        def step(model=model, opt=opt, images=images, targets=targets):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                losses = model.loss(images, targets)
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        rows.append((name, statistics.median(times)))
        del model, opt, images, targets
        torch.cuda.empty_cache()
    return rows, f"padded input {ph}x{pw}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-iters", type=int, default=15)
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_rotated: no CUDA device; nothing to measure")
        return 0
    from retinanet import ops

    if not ops.HAVE_EXTENSION or not hasattr(torch.ops.retinanet, "decode_rotated"):
        print("bench_rotated: retinanet._C with the rotated ops is not built; only the reference would run")
        return 1
    torch.backends.cudnn.benchmark = True
    rows, checks = postprocess(args.batches, args.iters)
    train_rows, train_note = (None, "skipped (--skip-train)")
    if not args.skip_train:
        train_rows, train_note = training(args.train_batch, args.train_iters, 5)

    device = torch.cuda.get_device_name()
    print(f"\n## results: rotated decode+NMS ({INPUT[0]}x{INPUT[1]}, A={A}, C={C}), median of CUDA-event timings")
    print(f"device: {device}; torch {torch.__version__}")
    for line in checks:
        print(line)
    print(f"{'batch':>5}  {'implementation':<18} {'ms':>9} {'ms/img':>9} {'ref/this':>9}")
    for batch, name, ms, per_img, vs_ref in rows:
        print(f"{batch:>5}  {name:<18} {ms:>9.3f} {per_img:>9.3f} {vs_ref:>9.1f}")
    print("(ref/this: how many times faster this row is than the PyTorch reference)")
    print(f"\ntraining step, ResNet50FPN, batch {args.train_batch}, bf16 autocast, {INPUT[0]}x{INPUT[1]}: {train_note}")
    if train_rows:
        base = train_rows[0][1]
        print(f"{'boxes':<14}{'median ms/iter':>16}{'img/s':>10}{'vs axis':>10}")
        for name, t in train_rows:
            print(f"{name:<14}{t * 1e3:>16.1f}{args.train_batch / t:>10.1f}{base / t:>9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
