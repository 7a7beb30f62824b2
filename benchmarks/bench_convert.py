"""Converted torchvision RetinaNets: how long `retinanet convert` takes (any machine), and
on a GPU the converted retinanet_resnet50_fpn_v2 end to end against torchvision's own
model, in the same run.

Conversion: a v2 state dict with random weights (the suite and this script never
download), converted in-process (median of 3) and as a whole `retinanet convert` process
as a user times it (imports included). End to end: image tensors in (uint8 480x640 on
the GPU), detections out. Ours: resize to 800x1067 and pad to 896x1152 (converted
torchvision models pad to 128), fp16 network with GroupNorm over each image's cells,
decode + NMS with 300 detections, CUDA graph, eager-fused or torch.compile'd.
torchvision: its own transform (resize to 800, pad to 32) and postprocessing, fp16
autocast. Medians of CUDA-synced wall time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F


def conversion_times(folder: str) -> tuple[float, float]:
    """(median in-process convert() seconds, one whole CLI process in seconds)."""
    from torchvision.models.detection import retinanet_resnet50_fpn_v2

    from retinanet.convert import convert

    source = os.path.join(folder, "tv_v2.pth")
    torch.save(retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None).state_dict(), source)
    times = []
    for i in range(3):
        t0 = time.perf_counter()
        convert(source, os.path.join(folder, f"v2_{i}.pth"))
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    cli = [sys.executable, "-m", "retinanet", "convert", source, os.path.join(folder, "v2.pth")]
    subprocess.run(cli, check=True, capture_output=True)
    return statistics.median(times), time.perf_counter() - t0


def end_to_end(folder: str, iters: int, warmup: int) -> list[tuple]:
    from bench_train import time_steps  # benchmarks/ is on sys.path when run as a script
    from torchvision.models.detection import retinanet_resnet50_fpn_v2

    from retinanet.runtime.pytorch import TorchBackend

    torch.backends.cudnn.benchmark = True
    path = os.path.join(folder, "v2.pth")
    graphed = TorchBackend.from_checkpoint(path, "cuda")
    compiled = TorchBackend.from_checkpoint(path, "cuda", compile=True)
    tv = retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None).cuda().eval()
    tv.load_state_dict(torch.load(os.path.join(folder, "tv_v2.pth"), weights_only=True))
    rows = []
    for batch in (1, 16):
        images = torch.randint(0, 256, (batch, 3, 480, 640), dtype=torch.uint8, device="cuda")
        sizes = torch.tensor([[800, 1067]] * batch, device="cuda")

        def run_ours(backend, images=images, sizes=sizes):
            x = F.interpolate(images.float(), size=(800, 1067), mode="bilinear", align_corners=False)
            x = F.pad(x, (0, 1152 - 1067, 0, 896 - 800), value=120.0)
            return backend(x, sizes)

        def run_tv(images=images):
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
                return tv([im.float() / 255 for im in images])

        t_graph = time_steps(lambda: run_ours(graphed), iters, warmup)
        t_comp = time_steps(lambda: run_ours(compiled), iters, warmup)
        t_tv = time_steps(run_tv, iters, warmup)
        rows.append((batch, t_graph, t_comp, t_tv))
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        in_process, cli = conversion_times(folder)
        rows = end_to_end(folder, a.iters, a.warmup) if torch.cuda.is_available() else []
    print("\n## results")
    print("retinanet convert, torchvision retinanet_resnet50_fpn_v2 state dict (random weights)")
    print(f"  convert() in-process, median of 3: {in_process:.2f} s")
    print(f"  whole `retinanet convert` process:  {cli:.2f} s")
    if not rows:
        print("end to end: no CUDA device, skipped")
        return
    print(f"\nconverted v2 end to end, 480x640 -> 800, fp16, {torch.cuda.get_device_name()}")
    print(f"{'batch':>5}{'ours graph':>12}{'ours compiled':>15}{'torchvision':>13}{'best speedup':>14}   (ms/img)")
    for batch, t_graph, t_comp, t_tv in rows:
        print(
            f"{batch:>5}{t_graph * 1e3 / batch:>12.2f}{t_comp * 1e3 / batch:>15.2f}{t_tv * 1e3 / batch:>13.2f}"
            f"{t_tv / min(t_graph, t_comp):>13.2f}x"
        )


if __name__ == "__main__":
    main()
