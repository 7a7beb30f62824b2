"""Where the GPU time goes: torch.profiler over inference (bs1, bs16) and a training step.

Prints the top CUDA kernels by total time for each, ResNet50FPN at 480x640 -> 800
(padded 896x1152), fp16 inference / bf16 training. Random weights.
"""

from __future__ import annotations

import torch
from bench_train import ours_training  # benchmarks/ is on sys.path when run as a script
from torch.profiler import ProfilerActivity, profile


def top(prof, title, rows=14):
    print(f"\n--- {title}")
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.self_device_time_total for e in events)
    events.sort(key=lambda e: -e.self_device_time_total)
    print(f"total self CUDA time {total / 1e3:.2f} ms")
    for e in events[:rows]:
        print(
            f"{e.self_device_time_total / 1e3:9.3f} ms {100 * e.self_device_time_total / total:5.1f}%  "
            f"x{e.count:<5} {e.key[:90]}"
        )


def main():
    if not torch.cuda.is_available():
        print("profile_step: no CUDA device, skipped")
        return
    from retinanet.config import ModelConfig
    from retinanet.model import RetinaNet
    from retinanet.runtime.pytorch import TorchBackend

    torch.backends.cudnn.benchmark = True
    model = RetinaNet(ModelConfig())
    backend = TorchBackend(model, list(range(80)), "cuda", cuda_graphs=False)
    for batch in (1, 16):
        x = torch.rand(batch, 3, 896, 1152, device="cuda") * 255
        for _ in range(5):
            backend(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                backend(x)
            torch.cuda.synchronize()
        top(prof, f"inference bs{batch} (5 calls)")

    _, train_step = ours_training()
    images = (torch.rand(8, 3, 896, 1152, device="cuda") * 255).contiguous(memory_format=torch.channels_last)
    targets = torch.tensor(
        [[100.0, 100.0, 300.0, 400.0, 3.0], [500.0, 200.0, 700.0, 300.0, 7.0]], device="cuda"
    ).repeat(8, 3, 1)

    def step():
        train_step(images, targets)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    top(prof, "training step batch 8 (3 steps)", rows=20)


if __name__ == "__main__":
    main()
