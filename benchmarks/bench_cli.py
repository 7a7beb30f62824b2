"""`retinanet infer` over a folder as a user times it: whole processes, same run as the peer.

Generates N JPEGs (default 5,000, COCO val2017's count) of 640x480 and a
ResNet50FPN checkpoint with random weights, then times whole processes:

* `retinanet infer MODEL --images DIR --batch 16` (nvJPEG decoding on the GPU),
  and with `--compile` twice: a cold inductor cache, then warm (the second run
  on a machine);
* a plain torchvision loop: torchvision's retinanet_resnet50_fpn, GPU decoding
  (batched nvJPEG), fp16 autocast, batch 16, detections to the CPU and a JSON
  file, as short as such a script gets;
* the network alone (compiled + CUDA graph, batch 16, the padded input size
  the CLI runs), the ceiling for the CLI;
* where start-up goes: each phase of the first batch, in a fresh process.

Prints a table of img/s and the ratios. Medians of --repeat runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIRST_BATCH = re.compile(r"first batch done ([0-9.]+) s after the process started")


def _write_jpeg(args):
    path, seed, h, w = args
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    noise = rng.normal(0, 8, (h, w, 3))  # texture, so the files are photo-sized (~60 KB)
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def make_images(folder: Path, count: int, h: int = 480, w: int = 640) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    todo = [(folder / f"{i:06d}.jpg", i, h, w) for i in range(count) if not (folder / f"{i:06d}.jpg").exists()]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_write_jpeg, todo, chunksize=64))


def make_model(path: Path) -> None:
    import torch

    from retinanet import checkpoint
    from retinanet.config import ModelConfig
    from retinanet.model import RetinaNet

    torch.manual_seed(0)
    config = ModelConfig(classes=80)
    checkpoint.save(str(path), checkpoint.model_state(config, RetinaNet(config), list(range(1, 81))))


def timed(cmd: list[str], env: dict) -> tuple[float, float | None, str]:
    """Wall seconds of a whole process, its first-batch time (from its closing line) and stderr."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"bench_cli: {' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    match = FIRST_BATCH.search(proc.stderr)
    return wall, float(match.group(1)) if match else None, proc.stderr


def import_times(env: dict, work: Path) -> dict[str, float]:
    """Seconds to import torch and torchvision in a fresh process: twice as the environment
    is, then twice with a writable bytecode cache (PYTHONPYCACHEPREFIX). Where site-packages is
    read-only, every process compiles their Python sources again; a user's install has its
    bytecode cached, so from then on every process here runs with the cache, as a user's would."""
    cmd = [sys.executable, "-c", "import torch, torchvision"]
    out = {}
    for name, extra in (("as installed", {}), ("bytecode cached", {"PYTHONPYCACHEPREFIX": str(work / "pycache")})):
        for attempt in ("first", "second"):
            t0 = time.perf_counter()
            subprocess.run(cmd, env={**env, **extra}, check=True)
            out[f"{name}, {attempt}"] = time.perf_counter() - t0
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    return out


def torchvision_loop(images: str, output: str, batch: int) -> None:
    """The peer: what a user writes with torchvision alone. Run as its own process."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    from torchvision.models.detection import retinanet_resnet50_fpn

    model = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=80).cuda().eval()
    names = sorted(os.listdir(images))
    records = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        for start in range(0, len(names), batch):
            chunk = names[start : start + batch]
            data = [read_file(os.path.join(images, n)) for n in chunk]
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda")
            outputs = model([im.float() / 255 for im in decoded])
            for n, out in zip(chunk, outputs):
                for box, score, label in zip(
                    out["boxes"].float().cpu().tolist(), out["scores"].float().cpu().tolist(), out["labels"].tolist()
                ):
                    records.append({"image": n, "bbox": box, "score": score, "category_id": label})
    with open(output, "w") as f:
        f.write(json.dumps(records))


def startup_phases(model: str, images: str, batch: int) -> None:
    """Seconds of each start-up phase up to the first batch's detections, as `infer` runs them."""
    t = [("start", time.perf_counter())]
    import torch

    t.append(("import torch", time.perf_counter()))
    import torchvision  # noqa: F401

    t.append(("import torchvision", time.perf_counter()))
    from retinanet import infer, runtime

    t.append(("import retinanet", time.perf_counter()))
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    t.append(("CUDA context", time.perf_counter()))
    detector = runtime.load(model)
    torch.cuda.synchronize()
    t.append(("load model (read, build, fold BN, to GPU)", time.perf_counter()))
    loader = infer.make_loader(detector, images, None, batch, 800, 1333, 8)
    first = next(iter(loader))
    torch.cuda.synchronize()
    t.append(("first batch read + decoded", time.perf_counter()))
    detector.run(first.images, first.valid)
    torch.cuda.synchronize()
    t.append(("first network run (cuDNN choice, graph capture)", time.perf_counter()))
    detector.run(first.images, first.valid)
    torch.cuda.synchronize()
    t.append(("second network run (graph replay)", time.perf_counter()))
    for (_, a), (name, b) in zip(t, t[1:]):
        print(f"phase\t{name}\t{b - a:.3f}")


def network_ceiling(batch: int, iters: int = 30) -> tuple[float, float]:
    """img/s of the network alone (graph; compiled + graph) on the CLI's padded input: 480x640 -> 800x1088."""
    import torch
    from bench_train import time_steps

    from retinanet.config import ModelConfig
    from retinanet.model import RetinaNet
    from retinanet.runtime.pytorch import TorchBackend

    model = RetinaNet(ModelConfig(classes=80))
    x = torch.randint(0, 256, (batch, 3, 800, 1088), dtype=torch.uint8, device="cuda")
    out = []
    for compile in (False, True):
        backend = TorchBackend(model, list(range(80)), "cuda", compile=compile)
        out.append(batch / time_steps(lambda b=backend: b(x), iters, 10))
    return out[0], out[1]


def run(a) -> None:
    work = Path(a.work or tempfile.mkdtemp(prefix="bench_cli_"))
    images, model = work / "images", work / "model.pth"
    t0 = time.perf_counter()
    make_images(images, a.images)
    make_model(model)
    print(f"bench_cli: {a.images} JPEGs 640x480 and a ResNet50FPN checkpoint in {time.perf_counter() - t0:.1f} s")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor")  # cold for the first compiled run
    imports = import_times(env, work)
    infer = [sys.executable, "-m", "retinanet", "infer", str(model), "--images", str(images), "--batch", str(a.batch)]
    infer += ["--workers", str(a.workers), "--override"]
    rows = {}
    for name, extra in (("retinanet infer", []), ("retinanet infer --compile (cold)", ["--compile"])):
        runs = [timed(infer + ["--output", str(work / "out.json"), *extra], env) for _ in range(a.repeat)]
        rows[name] = runs
        if extra:
            rows["retinanet infer --compile (warm cache)"] = [
                timed(infer + ["--output", str(work / "out.json"), *extra], env) for _ in range(a.repeat)
            ]
    peer = [sys.executable, str(Path(__file__).resolve()), "--torchvision-loop", str(images), str(work / "tv.json")]
    rows["torchvision loop"] = [timed(peer + ["--batch", str(a.batch)], env) for _ in range(a.repeat)]
    phases = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--startup", str(model), str(images)],
        env=env,
        capture_output=True,
        text=True,
    )
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = env["TORCHINDUCTOR_CACHE_DIR"]  # the CLI's compiled graph, cached
    eager_ceiling, compiled_ceiling = network_ceiling(a.batch)
    report(a, rows, phases.stdout, eager_ceiling, compiled_ceiling, rows["retinanet infer"][0][2])
    print("import torch, torchvision in a fresh process: " + ", ".join(f"{k} {v:.2f} s" for k, v in imports.items()))


def report(a, rows, phases: str, eager_ceiling: float, compiled_ceiling: float, log: str) -> None:
    import torch

    tv = statistics.median(w for w, _, _ in rows["torchvision loop"])
    print(f"\n## results\nbench_cli: {a.images} images 640x480, batch {a.batch}, {torch.cuda.get_device_name()}")
    print(f"{'command':<40}{'wall s':>9}{'img/s':>9}{'first batch s':>15}{'vs torchvision':>16}{'vs network':>12}")
    for name, runs in rows.items():
        wall = statistics.median(w for w, _, _ in runs)
        firsts = [f for _, f, _ in runs if f is not None]
        first = f"{statistics.median(firsts):.2f}" if firsts else "-"
        ceiling = compiled_ceiling if "--compile" in name else eager_ceiling
        ratio = f"{a.images / wall / ceiling:.0%}" if name.startswith("retinanet") else "-"
        print(f"{name:<40}{wall:>9.2f}{a.images / wall:>9.1f}{first:>15}{tv / wall:>15.2f}x{ratio:>12}")
    print(f"network alone, batch {a.batch}, 800x1088: graph {eager_ceiling:.1f} img/s, compiled {compiled_ceiling:.1f}")
    print("start-up phases (a fresh process, seconds):")
    for line in phases.splitlines():
        if line.startswith("phase\t"):
            _, name, secs = line.split("\t")
            print(f"  {name:<50}{float(secs):>8.3f}")
    print("retinanet infer's own closing line:", log.strip().splitlines()[-1] if log.strip() else "-")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--work", help="folder for the images and model (kept); default a new temporary one")
    p.add_argument("--torchvision-loop", nargs=2, metavar=("IMAGES", "OUTPUT"), help=argparse.SUPPRESS)
    p.add_argument("--startup", nargs=2, metavar=("MODEL", "IMAGES"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.torchvision_loop:
        return torchvision_loop(*a.torchvision_loop, a.batch)
    if a.startup:
        return startup_phases(*a.startup, a.batch)
    import torch

    if not torch.cuda.is_available():
        print("bench_cli: no CUDA device, skipped")
        return
    run(a)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
