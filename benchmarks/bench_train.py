"""Training throughput: ours eager, ours compiled, and torchvision's retinanet_resnet50_fpn, same run.

ResNet50FPN, batch 16, bf16 autocast, 480x640 images resized to 800x1067 and
padded to a multiple of 32 (800x1088), SGD step included, data already on the
GPU (model step only: the loaders are measured separately). The compiled row
uses train.compile_network, the call behind `retinanet train --compile`; its
warm-up steps include the compilation. Prints a table of medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SIZE = (800, 1067)  # 480x640 resized to a shorter side of 800


def random_targets(batch, height, width, gen, count=6):
    xy = torch.rand(batch, count, 2, generator=gen) * torch.tensor([width * 0.7, height * 0.7])
    wh = torch.rand(batch, count, 2, generator=gen) * 200 + 32
    boxes = torch.cat([xy, (xy + wh).minimum(torch.tensor([width, height]))], dim=-1)
    labels = torch.randint(0, 80, (batch, count), generator=gen)
    return boxes, labels


def time_steps(step, iters, warmup):
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ours_training(classes=80, compile=False):
    """Our ResNet50FPN on the GPU in training mode, its SGD optimiser, and a
    step(images, targets) running one bf16 forward, loss, backward and update;
    compile: the forward through train.compile_network, as `--compile` trains."""
    from retinanet.config import ModelConfig
    from retinanet.model import RetinaNet
    from retinanet.train import compile_network

    model = RetinaNet(ModelConfig(classes=classes)).cuda().to(memory_format=torch.channels_last).train()
    network = compile_network(model) if compile else model
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def step(images, targets):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            cls, box = network(images)
        loss = sum(model.loss_from_heads(cls, box, targets).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return model, step


def padded(size):
    """Up to the model's pad multiple, as the training loader pads."""
    from retinanet.config import ModelConfig

    multiple = ModelConfig().pad_multiple
    return -(-size // multiple) * multiple


def ours(batch, iters, warmup, gen, compile=False):
    _, train_step = ours_training(compile=compile)
    h, w = SIZE
    images = (torch.rand(batch, 3, 480, 640, generator=gen) * 255).cuda()
    images = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False)
    images = F.pad(images, (0, padded(w) - w, 0, padded(h) - h), value=120.0)
    images = images.contiguous(memory_format=torch.channels_last)
    boxes, labels = random_targets(batch, h, w, gen)
    targets = torch.cat([boxes, labels[..., None].float()], dim=-1).cuda()

    return time_steps(lambda: train_step(images, targets), iters, warmup)


def torchvision_model(batch, iters, warmup, gen):
    from torchvision.models.detection import retinanet_resnet50_fpn

    model = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=80).cuda().train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    images = [(torch.rand(3, 480, 640, generator=gen)).cuda() for _ in range(batch)]
    boxes, labels = random_targets(batch, 480, 640, gen)
    boxes = boxes * 0.6  # torchvision resizes internally: keep boxes in the 480x640 frame
    targets = [{"boxes": boxes[i].cuda(), "labels": labels[i].cuda()} for i in range(batch)]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses = model(images, targets)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return time_steps(step, iters, warmup)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=8, help="untimed steps first; the compiled row compiles in them")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_train: no CUDA device, skipped")
        return
    torch.backends.cudnn.benchmark = True
    rows = []
    for name, run in (
        ("retinanet eager", lambda gen: ours(a.batch, a.iters, a.warmup, gen)),
        ("retinanet compiled", lambda gen: ours(a.batch, a.iters, a.warmup, gen, compile=True)),
        ("torchvision", lambda gen: torchvision_model(a.batch, a.iters, a.warmup, gen)),
    ):
        rows.append((name, run(torch.Generator().manual_seed(0))))
        torch.cuda.empty_cache()
    t_tv = rows[-1][1]
    h, w = SIZE
    print(
        f"\ntraining step, ResNet50FPN, batch {a.batch}, bf16, 480x640 -> {h}x{w} "
        f"(padded {padded(h)}x{padded(w)}), {torch.cuda.get_device_name()}"
    )
    print(f"{'impl':<24}{'median ms/iter':>16}{'img/s':>10}{'vs torchvision':>16}")
    for name, t in rows:
        print(f"{name:<24}{t * 1e3:>16.1f}{a.batch / t:>10.1f}{t_tv / t:>15.2f}x")


if __name__ == "__main__":
    main()
