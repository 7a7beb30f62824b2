"""Data-parallel training scaling: ResNet50FPN img/s on 1 GPU and on N GPUs.

Same per-GPU batch everywhere (so N GPUs train a global batch N times larger),
the training step of retinanet.train: bf16 autocast, forward through
DistributedDataParallel, loss with the foreground count summed over ranks,
backward (gradient all-reduce over NCCL), SGD step. Synthetic 800x1067 images
padded to 896x1152 already on the GPU: the model step only, no loader.
Prints a table: GPUs, img/s, speed-up over 1 GPU, scaling efficiency.

    python benchmarks/bench_ddp.py [--gpus 1 2] [--batch 8] [--iters 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.multiprocessing as mp


def worker(rank: int, world: int, port: int, batch: int, iters: int, warmup: int, queue) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from retinanet import distributed
    from retinanet.config import ModelConfig
    from retinanet.model import RetinaNet

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    torch.manual_seed(rank)
    net = RetinaNet(ModelConfig()).to(device).to(memory_format=torch.channels_last).train()
    model = DistributedDataParallel(net, device_ids=[device]) if world > 1 else net
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    images = (torch.rand(batch, 3, 896, 1152, device=device) * 255).contiguous(memory_format=torch.channels_last)
    xy = torch.rand(batch, 6, 2, device=device) * torch.tensor([700.0, 500.0], device=device)
    wh = torch.rand(batch, 6, 2, device=device) * 200 + 32
    labels = torch.randint(0, 80, (batch, 6, 1), device=device).float()
    targets = torch.cat([xy, xy + wh, labels], dim=-1)
    count = distributed.sum_ if world > 1 else None

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            cls, box = model(images)
        loss = sum(net.loss_from_heads(cls, box, targets, count).values())
        opt.zero_grad(set_to_none=True)
        (loss * world).backward()
        opt.step()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        queue.put(statistics.median(times))
    if world > 1:
        dist.destroy_process_group()


def measure(world: int, batch: int, iters: int, warmup: int) -> float:
    from retinanet.distributed import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(
        worker, args=(world, free_port(), batch, iters, warmup, queue), nprocs=world, start_method="spawn"
    )
    return world * batch / queue.get()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=8, help="per-GPU batch [8]")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    a = p.parse_args()
    available = torch.cuda.device_count()
    if available == 0:
        print("bench_ddp: no CUDA device, skipped")
        return
    gpus = [g for g in a.gpus if g <= available]
    print(
        f"bench_ddp: ResNet50FPN, {a.batch} images/GPU at 896x1152, bf16, DDP over NCCL, "
        f"{torch.cuda.get_device_name(0)} x{available}"
    )
    rates = {g: measure(g, a.batch, a.iters, a.warmup) for g in gpus}
    print(f"{'GPUs':>4} {'img/s':>8} {'speed-up':>9} {'efficiency':>10}")
    base = rates.get(1)
    for g, r in rates.items():
        speed = r / base if base else float("nan")
        print(f"{g:>4} {r:>8.1f} {speed:>8.2f}x {speed / g:>9.1%}")


if __name__ == "__main__":
    main()
