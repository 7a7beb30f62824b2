"""Loader throughput: the DALI pipelines (--with-dali) vs the PyTorch DataLoader
with 8 and 16 workers, same run, on generated 480x640 JPEGs; then ResNet50FPN
training img/s fed by each.

Loader rows: images per second delivered as GPU batches (uint8, padded), the
median of --epochs timed epochs after one warm-up epoch. Training rows: the
whole step (forward, loss, backward, SGD) with the loader in the loop, bf16,
batch 8, jitter 640-1024 (the training defaults), cudnn.benchmark off since
the jittered shapes vary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch
from bench_train import ours_training  # benchmarks/ is on sys.path when run as a script

FILL = (124, 116, 104)


def make_dataset(folder: str, count: int) -> str:
    """`count` JPEGs of 480x640 with 2 to 6 boxes each; returns the annotation path."""
    from PIL import Image

    path = os.path.join(folder, "ann.json")
    if os.path.exists(path):
        return path
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(count):
        small = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(small).resize((640, 480), Image.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
        images.append({"id": i + 1, "file_name": f"{i:05d}.jpg", "width": 640, "height": 480})
        for _ in range(rng.integers(2, 7)):
            w, h = rng.uniform(24, 300), rng.uniform(24, 220)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": int(rng.integers(1, 4)),
                    "bbox": [x, y, w, h],
                    "iscrowd": 0,
                }
            )
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": [{"id": c} for c in (1, 2, 3)]}, f)
    return path


def torch_loader(root, coco, training, batch, workers):
    from torch.utils.data import DataLoader

    from retinanet.data import transforms as T
    from retinanet.data.batch import Collate
    from retinanet.data.coco import DetectionDataset

    ds = DetectionDataset(
        root, coco, 800, 1333, training=training, jitter=(640, 1024) if training else None, augment=T.Augment()
    )
    return DataLoader(
        ds,
        batch_size=batch,
        shuffle=training,
        num_workers=workers,
        collate_fn=Collate(128, FILL),
        pin_memory=True,
        drop_last=training,
        persistent_workers=True,
        prefetch_factor=4,
    )


def dali_loader(root, coco, training, batch, threads):
    from retinanet.data import dali
    from retinanet.data import transforms as T

    cuda = torch.device("cuda")
    if training:
        return dali.training_loader(root, coco, batch, 1333, 128, FILL, (640, 1024), T.Augment(), cuda, threads, 0)
    return dali.inference_loader(root, coco.images, batch, 800, 1333, 128, FILL, cuda, threads)


def epoch_rates(loader, epochs):
    """img/s of each timed epoch (after one warm-up epoch), batches moved to the GPU."""
    rates = []
    for e in range(epochs + 1):
        torch.cuda.synchronize()
        t0, n = time.perf_counter(), 0
        for b in loader:
            b.images.cuda(non_blocking=True)
            b.targets.cuda(non_blocking=True)
            n += len(b.image_ids)
        torch.cuda.synchronize()
        if e:
            rates.append(n / (time.perf_counter() - t0))
    return rates


def train_rate(loader, epochs):
    """img/s of ResNet50FPN training steps fed by `loader` (median over timed epochs)."""
    torch.manual_seed(0)
    _, step = ours_training(classes=3)
    rates = []
    for e in range(epochs + 1):
        torch.cuda.synchronize()
        t0, n = time.perf_counter(), 0
        for b in loader:
            images = b.images.cuda(non_blocking=True).float().contiguous(memory_format=torch.channels_last)
            step(images, b.targets.cuda(non_blocking=True))
            n += len(b.image_ids)
        torch.cuda.synchronize()
        if e:
            rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--folder", default="/tmp/retinanet-loader-bench")
    p.add_argument("--batch", type=int, default=16, help="loader batch [16]; training uses 8")
    p.add_argument("--threads", type=int, default=8, help="DALI CPU threads [8]")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-epochs", type=int, default=1)
    p.add_argument("--skip-train", action="store_true")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_loader: no CUDA device, skipped")
        return
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        print("bench_loader: NVIDIA DALI not installed (pip install 'retinanet[dali]'), skipped")
        return
    from retinanet.data.coco import CocoAnnotations

    t0 = time.perf_counter()
    coco = CocoAnnotations(make_dataset(a.folder, a.images))
    print(f"dataset: {a.images} JPEGs 480x640 in {a.folder} ({time.perf_counter() - t0:.1f} s)", flush=True)
    torch.backends.cudnn.benchmark = False

    rows = []
    for training, pipeline in (
        (False, "inference (resize 800, pad 128)"),
        (True, "training (jitter 640-1024, flip, pad)"),
    ):
        results = {}
        for name, make in (
            (
                f"DALI GPU, {a.threads} threads",
                lambda training=training: dali_loader(a.folder, coco, training, a.batch, a.threads),
            ),
            ("PyTorch, 8 workers", lambda training=training: torch_loader(a.folder, coco, training, a.batch, 8)),
            ("PyTorch, 16 workers", lambda training=training: torch_loader(a.folder, coco, training, a.batch, 16)),
        ):
            loader = make()
            results[name] = statistics.median(epoch_rates(loader, a.epochs))
            print(f"{pipeline:<40}{name:<24}{results[name]:>9.0f} img/s", flush=True)
            del loader
        rows.append((pipeline, results))

    train_rows = []
    if not a.skip_train:
        for name, make in (
            ("DALI GPU", lambda: dali_loader(a.folder, coco, True, 8, a.threads)),
            ("PyTorch, 8 workers", lambda: torch_loader(a.folder, coco, True, 8, 8)),
        ):
            rate = train_rate(make(), a.train_epochs)
            train_rows.append((name, rate))
            print(f"training ResNet50FPN fed by {name}: {rate:.1f} img/s", flush=True)
            torch.cuda.empty_cache()

    print("\n## results")
    print(
        f"loader throughput, {a.images} JPEGs 480x640, batch {a.batch}, {torch.cuda.get_device_name()}, "
        f"{os.cpu_count()} CPU cores (median of {a.epochs} epochs)"
    )
    print(f"{'pipeline':<40}{'loader':<24}{'img/s':>9}{'vs PyTorch 8w':>15}{'vs 16w':>9}")
    for pipeline, results in rows:
        base8, base16 = results["PyTorch, 8 workers"], results["PyTorch, 16 workers"]
        for name, rate in results.items():
            print(f"{pipeline:<40}{name:<24}{rate:>9.0f}{rate / base8:>14.2f}x{rate / base16:>8.2f}x")
    if train_rows:
        base = train_rows[-1][1]
        print("\ntraining ResNet50FPN, batch 8, bf16, jitter 640-1024, loader in the loop")
        print(f"{'fed by':<24}{'img/s':>9}{'vs PyTorch 8w':>15}")
        for name, rate in train_rows:
            print(f"{name:<24}{rate:>9.1f}{rate / base:>14.2f}x")


if __name__ == "__main__":
    main()
