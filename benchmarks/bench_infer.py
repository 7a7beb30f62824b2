"""End-to-end inference latency: ours vs torchvision's retinanet_resnet50_fpn, same run.

Image tensor in (uint8 480x640 on the GPU), detections out: resize to 800x1067
and pad to 800x1088 on the GPU, fp16 network, decode + NMS. Random weights for both (the same
init scheme: few scores pass 0.05, so NMS load is light for both; see
bench_postprocess.py for realistic score distributions). Medians of CUDA-synced
wall time.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from bench_train import time_steps  # benchmarks/ is on sys.path when run as a script


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_infer: no CUDA device, skipped")
        return
    from torchvision.models.detection import retinanet_resnet50_fpn

    from retinanet.config import ModelConfig
    from retinanet.model import RetinaNet
    from retinanet.runtime.pytorch import TorchBackend

    torch.backends.cudnn.benchmark = True
    cfg = ModelConfig()
    model = RetinaNet(cfg)
    backend = TorchBackend(model, list(range(80)), "cuda", cuda_graphs=False)
    graphed = TorchBackend(model, list(range(80)), "cuda", cuda_graphs=True)
    compiled = TorchBackend(model, list(range(80)), "cuda", cuda_graphs=True, compile=True)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=80).cuda().eval()
    rows = []
    for batch in (1, 16):
        images = torch.randint(0, 256, (batch, 3, 480, 640), dtype=torch.uint8, device="cuda")

        def run_ours(b=backend, images=images):
            x = F.interpolate(images.float(), size=(800, 1067), mode="bilinear", align_corners=False)
            x = F.pad(x, (0, 1088 - 1067), value=120.0)  # padded to a multiple of 32, as inference does
            return b(x)

        def run_tv(images=images):
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
                return tv([im.float() / 255 for im in images])

        t_ours = time_steps(run_ours, a.iters, a.warmup)
        t_graph = time_steps(lambda: run_ours(graphed), a.iters, a.warmup)
        t_comp = time_steps(lambda: run_ours(compiled), a.iters, a.warmup)
        t_tv = time_steps(run_tv, a.iters, a.warmup)
        rows.append((batch, t_ours, t_graph, t_comp, t_tv))
    print(f"\ninference end to end, ResNet50FPN, 480x640 -> 800, fp16, {torch.cuda.get_device_name()}")
    print(
        f"{'batch':>5}{'ours eager':>12}{'ours graph':>12}{'ours compiled+graph':>21}{'torchvision':>13}"
        f"{'best speedup':>14}   (ms/img)"
    )
    for batch, t_ours, t_graph, t_comp, t_tv in rows:
        print(
            f"{batch:>5}{t_ours * 1e3 / batch:>12.2f}{t_graph * 1e3 / batch:>12.2f}{t_comp * 1e3 / batch:>21.2f}"
            f"{t_tv * 1e3 / batch:>13.2f}{t_tv / min(t_graph, t_comp):>13.2f}x"
        )


if __name__ == "__main__":
    main()
