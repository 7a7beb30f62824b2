"""From-scratch training stability: ResNet50FPN, --no-pretrained, bf16, through the CLI.

A generated dataset of shapes on textured 512x640 canvases (4x5 tiles of the
demo generator, boxes offset), then one `retinanet train` run per setting, as a
user runs it. Prints, per run: exit status, steps skipped as non-finite, the
gradient norm's median / 99th percentile / maximum (TensorBoard
train/grad_norm) and the last logged loss.

    python benchmarks/train_stability.py [--images 400] [--iters 400] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from retinanet.data import demo

TILES = (4, 5)  # rows, columns of 128-pixel demo images per canvas


def make_dataset(root: Path, count: int, seed: int = 0) -> tuple[str, str]:
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for i in range(count):
        canvas = Image.new("RGB", (TILES[1] * demo.SIZE, TILES[0] * demo.SIZE))
        for r in range(TILES[0]):
            for c in range(TILES[1]):
                tile, objects = demo._draw_image(rng)
                canvas.paste(tile, (c * demo.SIZE, r * demo.SIZE))
                for (x1, y1, x2, y2), cat in objects:
                    annotations.append(
                        {
                            "id": len(annotations) + 1,
                            "image_id": i + 1,
                            "category_id": demo.CATEGORIES[cat]["id"],
                            "bbox": [x1 + c * demo.SIZE, y1 + r * demo.SIZE, x2 - x1, y2 - y1],
                        }
                    )
        name = f"{i:05d}.jpg"
        canvas.save(root / "images" / name, quality=92)
        images.append({"id": i + 1, "file_name": name, "width": canvas.width, "height": canvas.height})
    (root / "train.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": demo.CATEGORIES})
    )
    return str(root / "images"), str(root / "train.json")


def grad_norms(logdir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars("train/grad_norm")] if "train/grad_norm" in acc.Tags()["scalars"] else []


def run(work: Path, images: str, annotations: str, name: str, a, extra: list[str]) -> dict:
    args = [
        sys.executable,
        "-m",
        "retinanet",
        "train",
        f"{name}.pth",
        "--backbone",
        "ResNet50FPN",
        "--no-pretrained",
        "--images",
        images,
        "--annotations",
        annotations,
        "--batch",
        str(a.batch),
        "--iters",
        str(a.iters),
        "--val-iters",
        str(a.iters),
        "--amp-dtype",
        "bf16",
        "--resize",
        "512",
        "--max-size",
        "640",
        "--jitter",
        "448",
        "576",
        "--workers",
        "8",
        "--logdir",
        f"tb_{name}",
        *extra,
    ]
    proc = subprocess.run(args, cwd=work, capture_output=True, text=True)
    losses = re.findall(r"\] loss (\S+)", proc.stdout)
    skipped = re.findall(r"non-finite steps skipped (\d+)", proc.stdout)
    norms = np.array(grad_norms(work / f"tb_{name}"))
    finite = norms[np.isfinite(norms)] if norms.size else norms
    return {
        "run": name,
        "rc": proc.returncode,
        "nonfinite": int(skipped[-1]) if skipped else 0,
        "steps": len(norms),
        "norm p50": np.median(finite) if finite.size else float("nan"),
        "norm p99": np.percentile(finite, 99) if finite.size else float("nan"),
        "norm max": finite.max() if finite.size else float("nan"),
        "last loss": losses[-1] if losses else "-",
        "error": proc.stderr.strip().splitlines()[-1:],
    }


# lr 0.02 is twice the default: the stress test, where unnormalised heads diverge.
SETTINGS = {
    "lr0.01-bnheads-noclip": ["--lr", "0.01", "--warmup", "200", "--no-head-norm", "--clip-grad", "0"],
    "lr0.01-bnheads-clip35": ["--lr", "0.01", "--warmup", "200", "--no-head-norm"],
    "lr0.02-bnheads-noclip": ["--lr", "0.02", "--warmup", "200", "--no-head-norm", "--clip-grad", "0"],
    "lr0.02-bnheads-clip35": ["--lr", "0.02", "--warmup", "200", "--no-head-norm"],
    "lr0.02-gnheads-noclip": ["--lr", "0.02", "--warmup", "200", "--clip-grad", "0"],
    "lr0.02-gnheads-clip35": ["--lr", "0.02", "--warmup", "200"],
    "lr0.01-gnheads-clip35": ["--lr", "0.01", "--warmup", "200"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--iters", type=int, default=400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--only", nargs="+", choices=sorted(SETTINGS), default=sorted(SETTINGS))
    a = p.parse_args()
    work = Path(tempfile.mkdtemp())
    images, annotations = make_dataset(work / "data", a.images)
    rows = [run(work, images, annotations, name, a, SETTINGS[name]) for name in a.only]
    print(f"\nResNet50FPN from scratch, bf16, batch {a.batch}, {a.images} images 512x640, {a.iters} iterations")
    print(
        f"{'run':<28} {'rc':>3} {'non-finite':>10} {'steps':>6} {'norm p50':>9} {'norm p99':>9} "
        f"{'norm max':>9} {'last loss':>10}  error"
    )
    for r in rows:
        print(
            f"{r['run']:<28} {r['rc']:>3} {r['nonfinite']:>10} {r['steps']:>6} {r['norm p50']:>9.3g} "
            f"{r['norm p99']:>9.3g} {r['norm max']:>9.3g} {r['last loss']:>10}  {' '.join(r['error'])}"
        )
    os.system(f"rm -rf {work}")


if __name__ == "__main__":
    main()
