"""The training loop: SGD + warmup + milestones, AMP, checkpoints, resume, validation.

Rank-aware throughout (sampler, logging, writes) so distributed training only
has to supply `rank`/`world` and wrap the model.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Sampler

from . import checkpoint, distributed, evaluate
from .config import LABEL_PAD, ModelConfig, TrainConfig
from .data import transforms as T
from .data.coco import CocoAnnotations, Collate, DetectionDataset, mean_pixel
from .errors import UserError
from .infer import sharded_records
from .model import RetinaNet
from .runtime import Detector
from .runtime.pytorch import TorchBackend


@dataclass
class DataPaths:
    images: str
    annotations: str
    val_images: str | None = None
    val_annotations: str | None = None


class EpochSampler(Sampler[int]):
    """Shuffles every epoch with seed + epoch; rank r takes every world-th index.

    With several ranks the shuffled order is cut to a multiple of `world`, so
    every rank has the same number of samples (and of batches). `start` skips
    the first samples of this rank's share of the current epoch, so a resumed
    run continues the interrupted epoch in the same order.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1):
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.epoch, self.start = 0, 0

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=g)[:self.size - self.size % self.world]
        return iter(order[self.rank::self.world].tolist()[self.start:])

    def __len__(self) -> int:
        return self.size // self.world - self.start


MODEL_FLAGS = ("backbone", "classes", "resize", "max_size", "anchor_ious", "anchor_ratios", "anchor_scales")
TRAIN_FLAGS = ("batch", "iters", "milestones", "schedule", "lr", "warmup", "gamma", "weight_decay", "val_iters",
               "jitter", "augment_rotate", "augment_brightness", "augment_contrast", "augment_hue",
               "augment_saturation", "augment_crop", "seed", "workers", "with_dali", "amp_dtype", "full_precision")


def resolve_settings(given: dict) -> tuple[ModelConfig, TrainConfig, DataPaths, bool]:
    """Settings from the flags the user gave; demo presets fill the rest when
    no --annotations are given; the dataclass defaults fill what remains."""
    from .config import DEMO_MODEL, DEMO_TRAIN
    from .data import demo

    model_kw = {k: given[k] for k in MODEL_FLAGS if k in given}
    train_kw = {k: given[k] for k in TRAIN_FLAGS if k in given}
    if "max_size" in model_kw and "resize" in model_kw and model_kw["max_size"] < model_kw["resize"]:
        raise UserError(f"--max-size {model_kw['max_size']} is smaller than --resize {model_kw['resize']}")
    if "jitter" in train_kw and train_kw["jitter"][0] > train_kw["jitter"][1]:
        raise UserError(f"--jitter {train_kw['jitter'][0]} {train_kw['jitter'][1]}: MIN is larger than MAX")
    if "anchor_ious" in model_kw and model_kw["anchor_ious"][0] > model_kw["anchor_ious"][1]:
        raise UserError("--anchor-ious BG FG: BG must not exceed FG")
    demo_mode = "annotations" not in given
    if demo_mode:
        if "val_annotations" in given or "val_images" in given:
            raise UserError("--val-annotations/--val-images need --annotations (without it the demo data is used)")
        model_kw = {**DEMO_MODEL, **model_kw}
        train_kw = {**DEMO_TRAIN, **train_kw}
        paths = DataPaths(**demo.paths())
        pretrained = False
        if "backbone_weights" in given:
            model_kw["freeze_bn"] = True
    else:
        if ("val_annotations" in given) != ("val_images" in given):
            raise UserError("--val-images and --val-annotations go together")
        paths = DataPaths(given.get("images", "."), given["annotations"], given.get("val_images"),
                          given.get("val_annotations"))
        pretrained = not given.get("no_pretrained", False)
        model_kw.setdefault("freeze_bn", pretrained or "backbone_weights" in given)
    if "fine_tune" in given:
        # The architecture comes from the checkpoint being fine-tuned; only the
        # class count (from the annotations) and explicit flags change.
        source = checkpoint.load(given["fine_tune"])["config"].to_dict()
        source.pop("classes")
        if "backbone" in model_kw and model_kw["backbone"] != source["backbone"]:
            raise UserError(f"{given['fine_tune']}: --fine-tune checkpoint is a {source['backbone']}, "
                            f"not a {model_kw['backbone']}")
        model_kw = {**source, **{k: model_kw[k] for k in MODEL_FLAGS if k in given}}
        pretrained = False
    if "batch" not in train_kw:
        from .runtime.pytorch import default_batch

        train_kw["batch"] = default_batch()
    if "classes" not in model_kw:
        model_kw["classes"] = CocoAnnotations(paths.annotations).classes
    return ModelConfig(**model_kw), TrainConfig(**train_kw), paths, pretrained


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only, not on norm parameters or biases."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def amp_settings(cfg: TrainConfig, device: torch.device) -> tuple[bool, torch.dtype]:
    if cfg.full_precision or device.type != "cuda":
        return False, torch.float32  # CPU autocast is slower than float32 on most CPUs
    if cfg.amp_dtype == "fp16":
        return True, torch.float16
    if cfg.amp_dtype == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError("--amp-dtype bf16: this GPU does not support bfloat16; use fp16")
    if cfg.amp_dtype == "auto":
        return True, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return True, torch.bfloat16


def fine_tune_weights(model: RetinaNet, path: str) -> None:
    """Load every weight of another checkpoint except the last classification conv."""
    state = checkpoint.load(path)
    if state["config"].backbone != model.config.backbone:
        raise UserError(f"{path}: --fine-tune checkpoint is a {state['config'].backbone}, "
                        f"not a {model.config.backbone}; pass --backbone {state['config'].backbone}")
    weights = {k: v for k, v in state["state_dict"].items() if not k.startswith("cls_head.out.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.startswith("cls_head.out.")]
    if missing or unexpected:
        raise UserError(f"{path}: --fine-tune weights do not fit this model "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


class Progress:
    """One line per report: loss terms, lr, img/s and ETA; only rank 0 prints."""

    def __init__(self, total: int, start: int, enabled: bool, every_s: float = 5.0):
        self.total, self.enabled, self.every_s = total, enabled, every_s
        self.t0 = self.last = time.perf_counter()
        self.start = start
        self.images = 0
        self.sums: dict[str, float] = {}
        self.count = 0
        self.skipped = 0

    def rate(self) -> float:
        """Images per second since the start (all ranks together)."""
        return self.images / max(time.perf_counter() - self.t0, 1e-9)

    def update(self, iteration: int, losses: dict[str, float], images: int, lr: float, skipped: int) -> None:
        self.images += images
        self.skipped += skipped
        self.count += 1
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        now = time.perf_counter()
        if not self.enabled or (now - self.last < self.every_s and iteration not in (self.start + 1, self.total)):
            return
        rate = self.images / (now - self.t0)
        its = (iteration - self.start) / (now - self.t0)
        eta = (self.total - iteration) / max(its, 1e-9)
        terms = " ".join(f"{k.replace('_loss', '')} {v / self.count:.4f}" for k, v in self.sums.items())
        total = sum(self.sums.values()) / self.count
        extra = f" skipped {self.skipped}" if self.skipped else ""
        print(f"[{iteration:>{len(str(self.total))}}/{self.total}] loss {total:.4f} ({terms}) lr {lr:.5f} "
              f"{rate:.1f} img/s ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}{extra}", flush=True)
        self.last = now
        self.sums, self.count = {}, 0


def validate(model: RetinaNet, category_ids: list[int], paths: DataPaths, cfg: ModelConfig,
             batch: int, workers: int, device: torch.device, with_dali: bool = False) -> list[float] | None:
    """The 12 COCO stats on rank 0 (None on the others); the images are sharded over the ranks."""
    backend = TorchBackend(model, category_ids, device)
    detector = Detector(backend, cfg, category_ids)
    coco = CocoAnnotations(paths.val_annotations, category_ids=category_ids)
    records = sharded_records(detector, paths.val_images, coco, batch, cfg.resize, cfg.max_size, workers,
                              with_dali=with_dali)
    model.train()
    if distributed.rank() != 0:
        return None
    return evaluate.coco_stats(paths.val_annotations, records, [r.id for r in coco.images])


def check_world(batch: int, world: int) -> None:
    if batch % world:
        raise UserError(f"--batch {batch} is the global batch and must divide evenly over {world} processes "
                        f"(GPUs); use a multiple of {world}")


def launch(model_path: str, model_cfg: ModelConfig, cfg: TrainConfig, paths: DataPaths, **kw) -> list[float] | None:
    """train() in this process, in the process group torchrun set up, or in one
    process per visible GPU started here when there are several."""
    if cfg.with_dali:
        from .data.dali import require_dali
        require_dali()  # before any process starts
    place = distributed.from_env()
    if place is not None and place.world > 1:
        check_world(cfg.batch, place.world)
        device = distributed.device_for(place)
        distributed.init(place, device)
        try:
            return train(model_path, model_cfg, cfg, paths, rank=place.rank, world=place.world, device=device, **kw)
        finally:
            distributed.shutdown()
    gpus = torch.cuda.device_count()
    if place is None and gpus > 1:
        import torch.multiprocessing as mp

        check_world(cfg.batch, gpus)
        port = distributed.free_port()
        try:
            mp.spawn(_spawned, args=(gpus, port, (model_path, model_cfg, cfg, paths), kw), nprocs=gpus)
        except mp.ProcessExitedException as e:  # the worker printed its error
            raise SystemExit(e.exit_code or 1) from None
        return None
    return train(model_path, model_cfg, cfg, paths, **kw)


def _spawned(local_rank: int, world: int, port: int, args: tuple, kw: dict) -> None:
    """One GPU's process of a run that `retinanet train` started itself."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    place = distributed.Place(local_rank, world, local_rank)
    device = distributed.device_for(place)
    distributed.init(place, device)
    try:
        train(*args, rank=local_rank, world=world, device=device, **kw)
    except UserError as e:
        if local_rank == 0:
            print(f"retinanet: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        distributed.shutdown()


def train(model_path: str, model_cfg: ModelConfig, cfg: TrainConfig, paths: DataPaths, *,
          override: bool = False, fine_tune: str | None = None, pretrained: bool = True,
          backbone_weights: str | None = None, logdir: str | None = None, device=None,
          rank: int = 0, world: int = 1, explicit: frozenset = frozenset()) -> list[float] | None:
    """Train (or resume) and return the final validation stats, if validated.

    explicit: names of the settings the user gave; on resume those override
    the checkpoint's, the rest come from the checkpoint.
    """
    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    main = rank == 0
    resume = None
    if os.path.exists(model_path) and not override:
        resume = checkpoint.load(model_path)

    train_coco = CocoAnnotations(paths.annotations)
    if resume and train_coco.category_ids != list(resume["category_ids"]):
        raise UserError(f"{model_path}: checkpoint has {len(resume['category_ids'])} classes (category ids "
                        f"{resume['category_ids']}), {paths.annotations} has {train_coco.classes} "
                        f"({train_coco.category_ids}); pass --override to start fresh or --fine-tune")
    if paths.val_annotations:
        CocoAnnotations(paths.val_annotations, category_ids=train_coco.category_ids)  # fail early
    if resume:
        saved = resume["config"]
        for name in ("backbone", "classes"):
            if name in explicit and getattr(model_cfg, name) != getattr(saved, name):
                raise UserError(f"{model_path}: checkpoint is {name} {getattr(saved, name)}, "
                                f"not {getattr(model_cfg, name)}; pass --override to start fresh")
        model_cfg = saved
        cfg = TrainConfig.from_dict({**resume.get("train_config", {}),
                                     **{k: getattr(cfg, k) for k in TRAIN_FLAGS if k in explicit}})
    elif model_cfg.classes != train_coco.classes:
        raise UserError(f"{paths.annotations}: has {train_coco.classes} categories but --classes is "
                        f"{model_cfg.classes}")

    check_world(cfg.batch, world)
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    model = RetinaNet(model_cfg, pretrained=pretrained and not resume and not fine_tune,
                      weights_file=None if resume else backbone_weights)
    if fine_tune and not resume:
        fine_tune_weights(model, fine_tune)
    model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if world > 1 and device.type == "cuda" and not model_cfg.freeze_bn:
        # Trainable BatchNorm: statistics over the global batch, as in one process.
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.train()

    optimizer = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cfg.lr_factor)
    use_amp, amp_dtype = amp_settings(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)

    augment = T.Augment(rotate=cfg.augment_rotate, brightness=cfg.augment_brightness,
                        contrast=cfg.augment_contrast, hue=cfg.augment_hue, saturation=cfg.augment_saturation,
                        crop=cfg.augment_crop)
    dataset = DetectionDataset(paths.images, train_coco, model_cfg.resize, model_cfg.max_size, training=True,
                               jitter=tuple(cfg.jitter),
                               augment=augment, seed=cfg.seed)
    per_rank = cfg.batch // world
    sampler = EpochSampler(len(dataset), cfg.seed, rank, world)
    iteration = 0
    if resume:
        model.load_state_dict(resume["state_dict"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        iteration = resume["iteration"]
        data_state = resume["data_state"]
        sampler.epoch = data_state["epoch"]
        # Same world size: exactly where it stopped; another: about the same
        # number of samples into the epoch (the order per rank differs).
        sampler.start = data_state.get("samples", data_state["position"]) // world
        for key, fn in (("rng_torch", torch.set_rng_state), ("rng_python", random.setstate)):
            if key in resume:
                fn(resume[key])
        if main:
            print(f"resuming {model_path} at iteration {iteration}", flush=True)

    total = cfg.total_iters
    if iteration >= total:
        if main:
            print(f"{model_path} is already trained to {iteration} iterations (--iters {total}); "
                  "raise --iters or pass --override to start fresh")
        return None

    writer = None
    if logdir and main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--logdir needs TensorBoard: pip install 'retinanet[tensorboard]'") from None
        writer = SummaryWriter(logdir)

    net = model  # the module itself: checkpoints, loss, validation
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
    count_foreground = distributed.sum_ if world > 1 else None

    def save_state(position: int) -> None:
        if not main:
            return
        state = checkpoint.model_state(model_cfg, net, train_coco.category_ids)
        state.update(iteration=iteration, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                     scaler=scaler.state_dict(), train_config=cfg.to_dict(),
                     data_state={"epoch": sampler.epoch, "position": position, "samples": position * world,
                                 "world": world},
                     rng_torch=torch.get_rng_state(), rng_python=random.getstate())
        checkpoint.save(model_path, state)

    collate = Collate(model_cfg.pad_multiple, mean_pixel(model_cfg.mean))
    dali_loader = None
    if cfg.with_dali:
        # Built once (its threads and buffers live across epochs). It cannot
        # seek: a resumed run continues the schedule with a fresh shuffle
        # (seeded by the iteration) rather than the interrupted order.
        from .data import dali
        dali_loader = dali.training_loader(paths.images, train_coco, per_rank, model_cfg.max_size,
                                           model_cfg.pad_multiple, mean_pixel(model_cfg.mean), tuple(cfg.jitter),
                                           augment, device, max(cfg.workers, 1), cfg.seed + iteration, rank, world)
    progress = Progress(total, iteration, main)
    stats = None
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if use_amp else contextlib.nullcontext
    with warnings.catch_warnings():
        warnings.filterwarnings("always", message="skipping")
        while iteration < total:
            dataset.epoch = sampler.epoch
            if dali_loader is not None:
                loader = dali_loader
            else:
                loader = DataLoader(dataset, batch_size=per_rank, sampler=sampler, num_workers=cfg.workers,
                                    collate_fn=collate, pin_memory=device.type == "cuda", drop_last=True,
                                    persistent_workers=False)
            position = sampler.start
            for batch in loader:
                position += per_rank
                empty = not batch.image_ids
                if empty and world == 1:
                    continue
                if empty:
                    # Every corrupt image of this rank's batch was skipped; the
                    # other ranks step, so this one joins with a zero-weight
                    # stand-in image (the gradient all-reduce needs every rank).
                    batch.images = torch.zeros(1, 3, collate.multiple, collate.multiple, dtype=torch.uint8)
                    batch.targets = torch.zeros(1, 1, 5)
                    batch.targets[..., 4] = LABEL_PAD
                images = batch.images.to(device, non_blocking=True).float()
                if device.type == "cuda":
                    images = images.contiguous(memory_format=torch.channels_last)
                targets = batch.targets.to(device, non_blocking=True)
                with autocast():
                    cls_heads, box_heads = model(images)  # through DDP: its backward syncs the gradients
                losses = net.loss_from_heads(cls_heads, box_heads, targets, count_foreground)
                if empty:
                    losses = {k: v * 0 for k, v in losses.items()}
                loss = sum(losses.values())
                # Each rank's loss is its share of the global batch's loss (the
                # foreground count is summed over ranks): the sum is the loss of
                # one process on the global batch.
                logged = torch.stack([v.detach().float() for v in losses.values()] + [
                    torch.tensor(float(len(batch.image_ids)), device=loss.device),
                    torch.tensor(float(batch.skipped), device=loss.device)])
                logged = distributed.sum_(logged).tolist()
                if not all(map(math.isfinite, logged)):
                    raise UserError(f"loss is {sum(logged[:len(losses)])} at iteration {iteration + 1}; "
                                    "lower --lr or use --full-precision")
                optimizer.zero_grad(set_to_none=True)
                # DDP averages gradients over the ranks; scale back to their sum.
                scaler.scale(loss * world if world > 1 else loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                iteration += 1
                values = dict(zip(losses, logged))
                lr = optimizer.param_groups[0]["lr"]
                progress.update(iteration, values, int(logged[-2]), lr, int(logged[-1]))
                if writer is not None:
                    for k, v in values.items():
                        writer.add_scalar(f"train/{k}", v, iteration)
                    writer.add_scalar("train/loss", sum(values.values()), iteration)
                    writer.add_scalar("train/lr", lr, iteration)
                    writer.add_scalar("train/img_per_s", progress.rate(), iteration)
                last = iteration == total
                if iteration % cfg.checkpoint_iters == 0 or iteration % cfg.val_iters == 0 or last:
                    save_state(position)
                if paths.val_annotations and (iteration % cfg.val_iters == 0 or last):
                    stats = validate(net, train_coco.category_ids, paths, model_cfg, per_rank, cfg.workers,
                                     device, cfg.with_dali)
                    if main:
                        print(f"validation at iteration {iteration}:\n{evaluate.format_stats(stats)}",
                              flush=True)
                    if writer is not None:
                        for (kind, iou, area, dets), v in zip(evaluate.STAT_NAMES, stats):
                            writer.add_scalar(f"val/{kind}@{iou}/{area}/{dets}", v, iteration)
                if last:
                    break
            else:
                sampler.epoch += 1
                sampler.start = 0
                continue
            break
    if writer is not None:
        writer.close()
    if main:
        print(f"saved {model_path} at iteration {iteration}", flush=True)
    return stats

