"""The training loop: SGD + warmup + milestones, AMP, checkpoints, resume, validation.

Rank-aware throughout (sampler, logging, writes) so distributed training only
has to supply `rank`/`world` and wrap the model.
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Sampler

from . import checkpoint, distributed, evaluate
from .config import LABEL_PAD, ModelConfig, TrainConfig
from .data import transforms as T
from .data.batch import Collate
from .data.coco import CocoAnnotations, DetectionDataset, check_box_form
from .errors import Interrupted, UserError
from .images import mean_pixel
from .infer import sharded_records
from .model import RetinaNet
from .runtime import Detector
from .runtime.pytorch import TorchBackend


@dataclass
class DataPaths:
    images: str = "."
    annotations: str | None = None  # None: the embedded demo data (its paths fill this in)
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
        order = torch.randperm(self.size, generator=g)[: self.size - self.size % self.world]
        return iter(order[self.rank :: self.world].tolist()[self.start :])

    def __len__(self) -> int:
        return self.size // self.world - self.start


MODEL_FLAGS = (
    "head_norm",
    "backbone",
    "classes",
    "resize",
    "max_size",
    "anchor_ious",
    "anchor_ratios",
    "anchor_scales",
    "rotated",
    "anchor_angles",
)
TRAIN_FLAGS = (
    "clip_grad",
    "batch",
    "iters",
    "milestones",
    "schedule",
    "lr",
    "warmup",
    "gamma",
    "weight_decay",
    "val_iters",
    "jitter",
    "augment_rotate",
    "augment_brightness",
    "augment_contrast",
    "augment_hue",
    "augment_saturation",
    "augment_crop",
    "seed",
    "workers",
    "with_dali",
    "amp_dtype",
    "full_precision",
)


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
    check_rotated_flags(given)
    demo_mode = "annotations" not in given
    if demo_mode:
        if "val_annotations" in given or "val_images" in given:
            raise UserError("--val-annotations/--val-images need --annotations (without it the demo data is used)")
        model_kw = {**DEMO_MODEL, **model_kw}
        train_kw = {**DEMO_TRAIN, **train_kw}
        paths = DataPaths(**demo.paths(rotated=model_kw.get("rotated", False)))
        pretrained = False
        if "backbone_weights" in given:
            model_kw["freeze_bn"] = True
    else:
        if ("val_annotations" in given) != ("val_images" in given):
            raise UserError("--val-images and --val-annotations go together")
        paths = DataPaths(
            **{k: given[k] for k in ("images", "annotations", "val_images", "val_annotations") if k in given}
        )
        pretrained = not given.get("no_pretrained", False)
        model_kw.setdefault("freeze_bn", pretrained or "backbone_weights" in given)
        # From scratch, unnormalised head towers on a backbone whose features
        # are still moving let activations (and gradients) grow layer by layer
        # until the loss is NaN; GroupNorm in the towers keeps them bounded.
        model_kw.setdefault("head_norm", not model_kw["freeze_bn"])
    if "fine_tune" in given:
        # The architecture comes from the checkpoint being fine-tuned; only the
        # class count (from the annotations) and explicit flags change.
        source = checkpoint.load(given["fine_tune"])["config"].to_dict()
        source.pop("classes")
        check_fine_tune_form(given["fine_tune"], source, model_kw)
        if "backbone" in model_kw and model_kw["backbone"] != source["backbone"]:
            raise UserError(
                f"{given['fine_tune']}: --fine-tune checkpoint is a {source['backbone']}, not a {model_kw['backbone']}"
            )
        model_kw = {**source, **{k: model_kw[k] for k in MODEL_FLAGS if k in given}}
        pretrained = False
    if "batch" not in train_kw:
        train_kw["batch"] = distributed.default_batch()
    if "classes" not in model_kw:
        model_kw["classes"] = CocoAnnotations(paths.annotations).classes
    return ModelConfig(**model_kw), TrainConfig(**train_kw), paths, pretrained


def check_rotated_flags(given: dict) -> None:
    """Flags that rotated boxes cannot honour, refused before any work."""
    if "anchor_angles" in given and not given.get("rotated") and "fine_tune" not in given:
        raise UserError("--anchor-angles needs --rotated-bbox")
    if not given.get("rotated"):
        return
    if given.get("augment_crop"):
        raise UserError("--augment-crop cannot keep rotated boxes exact (a cut box is no rectangle); drop it")
    if given.get("with_dali"):
        raise UserError("--with-dali has no rotated-box augmentations; train rotated models without it")
    angles = given.get("anchor_angles")
    if angles is not None and (len(set(angles)) != len(angles) or not all(-180 < a <= 180 for a in angles)):
        raise UserError(f"--anchor-angles {' '.join(map(str, angles))}: give distinct degrees in (-180, 180]")


def check_fine_tune_form(path: str, source: dict, model_kw: dict) -> None:
    """--rotated-bbox and --anchor-angles must agree with the checkpoint being fine-tuned:
    its box head has one set of outputs per anchor and angle."""
    if model_kw.get("rotated") and not source.get("rotated"):
        raise UserError(
            f"{path}: --fine-tune checkpoint detects axis-aligned boxes; --rotated-bbox needs a rotated "
            "checkpoint (or train without --fine-tune)"
        )
    angles = model_kw.get("anchor_angles")
    if angles is not None and source.get("rotated") and list(angles) != list(source["anchor_angles"]):
        raise UserError(
            f"{path}: --fine-tune checkpoint has anchor angles {source['anchor_angles']}, not {list(angles)}"
        )
    if angles is not None and not source.get("rotated") and not model_kw.get("rotated"):
        raise UserError("--anchor-angles needs --rotated-bbox")


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


def compile_network(model: torch.nn.Module) -> torch.nn.Module:
    """The training forward (backbone, FPN, heads) through torch.compile, for --compile.

    dynamic=False, as inference compiles: one graph per input size. Symbolic
    sizes (dynamic=None) would not spare the per-size compiles under scale
    jitter: inductor lowers the convolutions' backward with concrete strides
    (measured with PyTorch 2.14), so a graph compiled for symbolic height and
    width still holds for one size only, and its extra compiles and slower
    kernels are pure cost. Past dynamo's recompile limit (8 per function) new
    sizes run eagerly, the compiled ones keep their graphs. The returned module
    shares the parameters of `model`; it is only ever called, never saved."""
    return torch.compile(model, dynamic=False)


def fine_tune_weights(model: RetinaNet, path: str) -> None:
    """Load every weight of another checkpoint except the last classification conv."""
    state = checkpoint.load(path)
    if state["config"].backbone != model.config.backbone:
        raise UserError(
            f"{path}: --fine-tune checkpoint is a {state['config'].backbone}, "
            f"not a {model.config.backbone}; pass --backbone {state['config'].backbone}"
        )
    weights = {k: v for k, v in state["state_dict"].items() if not k.startswith("cls_head.out.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.startswith("cls_head.out.")]
    if missing or unexpected:
        raise UserError(
            f"{path}: --fine-tune weights do not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


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
        self.nonfinite = 0

    def rate(self) -> float:
        """Images per second since the start (all ranks together)."""
        return self.images / max(time.perf_counter() - self.t0, 1e-9)

    def update(
        self, iteration: int, losses: dict[str, float], images: int, lr: float, skipped: int, nonfinite: bool = False
    ) -> None:
        self.images += images
        self.skipped += skipped
        self.nonfinite += nonfinite
        if not nonfinite:  # a skipped step's loss would poison the average
            self.count += 1
        for k, v in ({} if nonfinite else losses).items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        now = time.perf_counter()
        if not self.enabled or (now - self.last < self.every_s and iteration not in (self.start + 1, self.total)):
            return
        rate = self.images / (now - self.t0)
        its = (iteration - self.start) / (now - self.t0)
        eta = (self.total - iteration) / max(its, 1e-9)
        count = max(self.count, 1)
        terms = " ".join(f"{k.replace('_loss', '')} {v / count:.4f}" for k, v in self.sums.items())
        total = sum(self.sums.values()) / count
        extra = f" skipped {self.skipped}" if self.skipped else ""
        extra += f" non-finite steps skipped {self.nonfinite}" if self.nonfinite else ""
        print(
            f"[{iteration:>{len(str(self.total))}}/{self.total}] loss {total:.4f} ({terms}) lr {lr:.5f} "
            f"{rate:.1f} img/s ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}{extra}",
            flush=True,
        )
        self.last = now
        self.sums, self.count = {}, 0


def check_world(batch: int, world: int) -> None:
    if batch % world:
        raise UserError(
            f"--batch {batch} is the global batch and must divide evenly over {world} processes "
            f"(GPUs); use a multiple of {world}"
        )


def launch(
    model_path: str, model_cfg: ModelConfig, cfg: TrainConfig, paths: DataPaths, timeout_s: float | None = None, **kw
) -> list[float] | None:
    """train() in this process, in the process group torchrun set up, or in one
    process per visible GPU started here when there are several."""
    if cfg.with_dali:
        from .data.dali import require_dali

        require_dali()  # before any process starts
    place = distributed.from_env()
    if place is not None and place.world > 1:
        check_world(cfg.batch, place.world)
        device = distributed.device_for(place)
        distributed.init(place, device, timeout_s=timeout_s)
        try:
            return train(model_path, model_cfg, cfg, paths, rank=place.rank, world=place.world, device=device, **kw)
        finally:
            distributed.shutdown()
    gpus = torch.cuda.device_count()
    if place is None and gpus > 1:
        check_world(cfg.batch, gpus)
        spawn(gpus, (model_path, model_cfg, cfg, paths), {**kw, "timeout_s": timeout_s})
        return None
    return train(model_path, model_cfg, cfg, paths, **kw)


def spawn(gpus: int, args: tuple, kw: dict) -> None:
    """One process per GPU; exits with the first failing process's code (it printed why)."""
    import torch.multiprocessing as mp

    port = distributed.free_port()
    context = mp.start_processes(_spawned, args=(gpus, port, args, kw), nprocs=gpus, join=False, start_method="spawn")

    def forward(signum, frame):  # `kill` reaches this process only: pass it on so each rank saves and stops
        for p in context.processes:
            if p.is_alive():
                os.kill(p.pid, signum)

    # A Ctrl-C on the terminal reaches every process of the group, the ranks included.
    saved = signal.signal(signal.SIGINT, signal.SIG_IGN), signal.signal(signal.SIGTERM, forward)
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as e:
        raise SystemExit(e.exit_code or 1) from None
    finally:
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])


def _spawned(local_rank: int, world: int, port: int, args: tuple, kw: dict) -> None:
    """One GPU's process of a run that `retinanet train` started itself."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(local_rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(local_rank),
    )
    place = distributed.Place(local_rank, world, local_rank)
    device = distributed.device_for(place)
    distributed.init(place, device, timeout_s=kw.pop("timeout_s"))
    code = 0
    try:
        train(*args, rank=local_rank, world=world, device=device, **kw)
    except UserError as e:
        code, message = 2, f"retinanet: error: {e}"
    except Interrupted as e:
        code, message = 128 + e.signum, f"retinanet: {e}"
    finally:
        distributed.shutdown()
    if code:
        if local_rank == 0:  # every rank raised the same error: print it once
            print(message, file=sys.stderr, flush=True)
        sys.exit(code)


class StopRequest:
    """SIGINT/SIGTERM ask the loop to stop: it finishes the current step, saves a
    checkpoint at that iteration and exits. A second SIGINT interrupts at once."""

    def __init__(self):
        self.signum = 0
        self._saved: dict = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum


def _ignore_sigint(_worker_id: int) -> None:
    # Loader workers share the terminal's process group: without this a Ctrl-C
    # kills them and the main process, finishing its step, finds its loader dead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def check_images(images_dir: str, coco: CocoAnnotations, flag: str, batch: int = 1) -> None:
    """Before any work: the folder exists, every annotated image is in it, and there are
    enough images for one batch (a loader that drops the last partial batch would
    otherwise yield nothing, epoch after epoch)."""
    if not os.path.isdir(images_dir):
        raise UserError(f"{images_dir}: image folder not found ({flag})")
    if not coco.images:
        raise UserError(f"{coco.path}: no images to train on")
    missing = [r for r in coco.images if not os.path.isfile(os.path.join(images_dir, r.file_name))]
    if missing:
        first = missing[0]
        raise UserError(
            f"{images_dir}: {len(missing)} of the {len(coco.images)} images of {coco.path} are not "
            f"there, the first {first.file_name} (image id {first.id}); is {flag} the right folder?"
        )
    if len(coco.images) < batch:
        raise UserError(f"{coco.path}: {len(coco.images)} images cannot fill one batch of {batch}; lower --batch")


def resume_settings(
    model_path: str,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    coco: CocoAnnotations,
    override: bool,
    explicit: frozenset,
) -> tuple[dict | None, ModelConfig, TrainConfig]:
    """The checkpoint to resume (None: start fresh) and the settings to run with:
    the checkpoint's, except the training flags the user gave."""
    if not os.path.exists(model_path) or override:
        if model_cfg.classes != coco.classes:
            raise UserError(f"{coco.path}: has {coco.classes} categories but --classes is {model_cfg.classes}")
        return None, model_cfg, cfg
    resume = checkpoint.load(model_path)
    lacking = [k for k in RESUME_KEYS if k not in resume]
    if lacking:
        raise UserError(
            f"{model_path}: holds weights but no training state ({', '.join(lacking)}), so it cannot "
            f"be resumed; pass --override to start fresh or --fine-tune {model_path}"
        )
    if coco.category_ids != list(resume["category_ids"]):
        raise UserError(
            f"{model_path}: checkpoint has {len(resume['category_ids'])} classes (category ids "
            f"{resume['category_ids']}), {coco.path} has {coco.classes} "
            f"({coco.category_ids}); pass --override to start fresh or --fine-tune"
        )
    saved = resume["config"]
    if saved.rotated and not model_cfg.rotated:
        # Without the flag the demo would resume on the axis-aligned demo data.
        raise UserError(f"{model_path}: checkpoint detects rotated boxes; resume it with --rotated-bbox")
    for name in ("backbone", "classes", "rotated", "anchor_angles"):
        if name in explicit and getattr(model_cfg, name) != getattr(saved, name):
            raise UserError(
                f"{model_path}: checkpoint is {name} {getattr(saved, name)}, "
                f"not {getattr(model_cfg, name)}; pass --override to start fresh"
            )
    cfg = TrainConfig.from_dict(
        {**resume.get("train_config", {}), **{k: getattr(cfg, k) for k in TRAIN_FLAGS if k in explicit}}
    )
    return resume, saved, cfg


RESUME_KEYS = ("iteration", "optimizer", "scheduler", "scaler", "data_state")
# fp16 starts with a loss scale that overflows for a few steps by design; a long
# run of non-finite steps means the run has diverged.
MAX_NONFINITE_STEPS = 20


@dataclass
class Setup:
    """What a run needs, decided before the process group's first collective."""

    model_path: str
    model_cfg: ModelConfig
    cfg: TrainConfig
    paths: DataPaths
    coco: CocoAnnotations
    resume: dict | None


def prepare(
    model_path: str,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    paths: DataPaths,
    world: int,
    override: bool,
    explicit: frozenset,
) -> Setup:
    """Every check that can fail on the user's input, before any model is built."""
    coco = CocoAnnotations(paths.annotations)
    resume, model_cfg, cfg = resume_settings(model_path, model_cfg, cfg, coco, override, explicit)
    check_box_form(coco, model_cfg.rotated)
    check_world(cfg.batch, world)
    check_images(paths.images, coco, "--images", cfg.batch // world)
    if paths.val_annotations:
        val = CocoAnnotations(paths.val_annotations, category_ids=coco.category_ids)
        check_box_form(val, model_cfg.rotated)
        check_images(paths.val_images, val, "--val-images")
    return Setup(model_path, model_cfg, cfg, paths, coco, resume)


class Trainer:
    """One process's share of a training run: model, optimiser, data, the step."""

    def __init__(
        self,
        s: Setup,
        device: torch.device,
        rank: int,
        world: int,
        pretrained: bool,
        backbone_weights: str | None,
        fine_tune: str | None,
        compile: bool = False,
    ):
        self.s, self.cfg, self.device, self.rank, self.world = s, s.cfg, device, rank, world
        self.compile = compile
        torch.manual_seed(self.cfg.seed + rank)
        random.seed(self.cfg.seed + rank)
        fresh = s.resume is None
        self.net = RetinaNet(
            s.model_cfg,
            pretrained=pretrained and fresh and not fine_tune,
            weights_file=backbone_weights if fresh else None,
        )
        if fine_tune and fresh:
            fine_tune_weights(self.net, fine_tune)
        self.net.to(device)
        if device.type == "cuda":
            self.net.to(memory_format=torch.channels_last)
        if world > 1 and device.type == "cuda" and not s.model_cfg.freeze_bn:
            # Trainable BatchNorm: statistics over the global batch, as in one process.
            self.net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.net)
        self.net.train()
        # What the step calls: DDP-wrapped and compiled by wrap() once every rank is ready.
        # Everything else (loss, checkpoints, resume, validation, clipping) uses self.net,
        # so saved keys never carry the wrappers' "module." or "_orig_mod." prefixes.
        self.model: torch.nn.Module = self.net
        self.optimizer = torch.optim.SGD(
            param_groups(self.net, self.cfg.weight_decay), lr=self.cfg.lr, momentum=self.cfg.momentum
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.cfg.lr_factor)
        self.use_amp, self.amp_dtype = amp_settings(self.cfg, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.augment = T.Augment(
            rotate=self.cfg.augment_rotate,
            brightness=self.cfg.augment_brightness,
            contrast=self.cfg.augment_contrast,
            hue=self.cfg.augment_hue,
            saturation=self.cfg.augment_saturation,
            crop=self.cfg.augment_crop,
        )
        self.dataset = DetectionDataset(
            s.paths.images,
            s.coco,
            s.model_cfg.resize,
            s.model_cfg.max_size,
            training=True,
            jitter=tuple(self.cfg.jitter),
            augment=self.augment,
            seed=self.cfg.seed,
            fill=mean_pixel(s.model_cfg.mean),
            rotated=s.model_cfg.rotated,
        )
        self.per_rank = self.cfg.batch // world
        self.sampler = EpochSampler(len(self.dataset), self.cfg.seed, rank, world)
        self.collate = Collate(s.model_cfg.pad_multiple, mean_pixel(s.model_cfg.mean))
        self.iteration = 0
        self.nonfinite_run = 0
        if s.resume is not None:
            self.restore(s.resume)

    def restore(self, resume: dict) -> None:
        self.net.load_state_dict(resume["state_dict"])
        self.optimizer.load_state_dict(resume["optimizer"])
        self.scheduler.load_state_dict(resume["scheduler"])
        self.scaler.load_state_dict(resume["scaler"])
        self.iteration = resume["iteration"]
        data_state = resume["data_state"]
        self.sampler.epoch = data_state["epoch"]
        # Same world size: exactly where it stopped; another: about the same
        # number of samples into the epoch (the order per rank differs).
        self.sampler.start = data_state.get("samples", data_state["position"]) // self.world
        for key, fn in (("rng_torch", torch.set_rng_state), ("rng_python", random.setstate)):
            if key in resume:
                fn(resume[key])

    def wrap(self) -> None:
        """DistributedDataParallel (a collective, so every rank must have got here), then --compile."""
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.net, device_ids=ids)
        if self.compile:
            # Compiling the DDP module, not DDP around a compiled one: dynamo then
            # splits the graph at DDP's gradient-bucket boundaries, so each bucket's
            # all-reduce overlaps the rest of the backward. Around a compiled module
            # the whole backward is one graph and every gradient is ready only at its end.
            self.model = compile_network(self.model)

    def loader(self):
        """This epoch's batches: DALI's loader (built once, reused) or a fresh DataLoader."""
        self.dataset.epoch = self.sampler.epoch
        if self.cfg.with_dali:
            if not hasattr(self, "_dali"):
                # DALI cannot seek: a resumed run continues the schedule with a
                # fresh shuffle (seeded by the iteration), not the interrupted order.
                from .data import dali

                m = self.s.model_cfg
                self._dali = dali.training_loader(
                    self.s.paths.images,
                    self.s.coco,
                    self.per_rank,
                    m.max_size,
                    m.pad_multiple,
                    mean_pixel(m.mean),
                    tuple(self.cfg.jitter),
                    self.augment,
                    self.device,
                    max(self.cfg.workers, 1),
                    self.cfg.seed + self.iteration,
                    self.rank,
                    self.world,
                )
            return self._dali
        return DataLoader(
            self.dataset,
            batch_size=self.per_rank,
            sampler=self.sampler,
            num_workers=self.cfg.workers,
            collate_fn=self.collate,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            worker_init_fn=_ignore_sigint if self.cfg.workers else None,
        )

    def stand_in(self, batch) -> None:
        """Every image of this rank's batch was skipped while the other ranks step: join
        with a zero-weight stand-in image (the gradient all-reduce needs every rank)."""
        # 128 px at least: at the padding multiple alone (32) the backbone's last stage
        # would hold one value per channel, which BatchNorm cannot train on.
        m = -(-128 // self.collate.multiple) * self.collate.multiple
        batch.images = torch.zeros(1, 3, m, m, dtype=torch.uint8)
        batch.targets = torch.zeros(1, 1, self.s.model_cfg.box_values + 1)
        batch.targets[..., -1] = LABEL_PAD
        batch.valid = torch.tensor([[m, m]], dtype=torch.int32)

    def step(self, batch, stop: int) -> dict:
        """Forward, backward, and an optimiser step unless the gradients are not finite.

        Returns the loss terms and counters summed over the ranks, with the
        stop and error flags, all from one all-reduce."""
        empty = not batch.image_ids
        if empty:
            self.stand_in(batch)
        images = batch.images.to(self.device, non_blocking=True).float()
        if self.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        targets = batch.targets.to(self.device, non_blocking=True)
        # GroupNorm heads train with the statistics of each image's valid region, as they infer.
        sizes = batch.valid.to(self.device, non_blocking=True) if batch.valid is not None else None
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            cls_heads, box_heads = self.model(images, sizes)  # through DDP: its backward syncs the gradients
        count_foreground = distributed.sum_ if self.world > 1 else None
        losses = self.net.loss_from_heads(cls_heads, box_heads, targets, count_foreground)
        if empty or batch.errors:
            losses = {k: v * 0 for k, v in losses.items()}
        # Each rank's loss is its share of the global batch's loss (the foreground
        # count is summed over ranks); DDP averages gradients, so scale back to their sum.
        loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss * self.world if self.world > 1 else loss).backward()
        self.scaler.unscale_(self.optimizer)
        norm = self.clip_gradients()
        own = [float(len(batch.image_ids)), float(batch.skipped), float(stop), float(bool(batch.errors))]
        logged = distributed.sum_(
            torch.stack(
                [v.detach().float() for v in losses.values()]
                + [norm.float()]
                + [torch.tensor(x, device=loss.device) for x in own]
            )
        ).tolist()
        finite = all(map(math.isfinite, logged))  # the same on every rank: the sums are
        if finite:
            self.scaler.step(self.optimizer)
        self.scaler.update()  # fp16: a non-finite step lowers the loss scale
        self.scheduler.step()
        self.iteration += 1
        self.nonfinite_run = 0 if finite else self.nonfinite_run + 1
        terms = dict(zip(losses, logged))
        images_n, skipped, stops, errors = logged[-4:]
        return {
            "losses": terms,
            "norm": logged[len(losses)] / self.world,
            "images": int(images_n),
            "skipped": int(skipped),
            "stop": stops > 0,
            "error": errors > 0,
            "finite": finite,
        }

    def clip_gradients(self) -> torch.Tensor:
        """The gradients' total L2 norm (inf/nan when any is not finite), clipped to --clip-grad."""
        params = [p for p in self.net.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if self.cfg.clip_grad > 0:  # takes the parameters, and scales their .grad
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.clip_grad, norm)
        return norm

    def save(self, position: int) -> None:
        """Rank 0 writes the checkpoint; weights that are not finite are never written."""
        if self.rank != 0:
            return
        bad = [k for k, v in self.net.state_dict().items() if v.is_floating_point() and not v.isfinite().all()]
        if bad:
            raise UserError(
                f"{self.s.model_path}: weights became non-finite at iteration {self.iteration} "
                f"({bad[0]}); not saving them, the checkpoint keeps its last finite state"
            )
        coco = self.s.coco
        state = checkpoint.model_state(self.s.model_cfg, self.net, coco.category_ids, coco.category_names)
        state.update(
            iteration=self.iteration,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            train_config=self.cfg.to_dict(),
            data_state={
                "epoch": self.sampler.epoch,
                "position": position,
                "samples": position * self.world,
                "world": self.world,
            },
            rng_torch=torch.get_rng_state(),
            rng_python=random.getstate(),
        )
        checkpoint.save(self.s.model_path, state)

    def validate(self) -> list[float]:
        """The 12 COCO stats, on every rank: the images are sharded over the ranks and the
        detections gathered, and each rank scores them, so no rank waits on another."""
        m = self.s.model_cfg
        ids = self.s.coco.category_ids
        detector = Detector(TorchBackend(self.net, ids, self.device), m, ids)
        coco = CocoAnnotations(self.s.paths.val_annotations, category_ids=ids)
        records = sharded_records(
            detector,
            self.s.paths.val_images,
            coco,
            self.per_rank,
            m.resize,
            m.max_size,
            self.cfg.workers,
            with_dali=self.cfg.with_dali,
        )
        self.net.train()
        image_ids = [r.id for r in coco.images]
        return evaluate.coco_stats(self.s.paths.val_annotations, records, image_ids, m.rotated)


def run(t: Trainer, stop: StopRequest, writer, log: bool) -> list[float] | None:
    """Steps until the schedule ends (or a signal asks to stop); returns the last validation stats."""
    total, stats = t.cfg.total_iters, None
    progress = Progress(total, t.iteration, log)
    while t.iteration < total:
        resumed_at, position, steps, skipped = t.sampler.start, t.sampler.start, 0, 0
        for batch in t.loader():
            position += t.per_rank
            skipped += batch.skipped
            if not batch.image_ids and not batch.errors and t.world == 1:
                continue
            out = t.step(batch, stop.signum)
            steps += 1
            if out["error"]:
                distributed.raise_first_error(UserError(batch.errors[0]) if batch.errors else None)
            check_finite(t, out)
            lr = t.optimizer.param_groups[0]["lr"]
            progress.update(t.iteration, out["losses"], out["images"], lr, out["skipped"], not out["finite"])
            log_scalars(writer, t.iteration, out, lr, progress.rate())
            last = t.iteration == total
            if out["stop"]:
                t.save(position)
                raise Interrupted(
                    f"stopped by {signal.Signals(stop.signum or signal.SIGTERM).name} at iteration "
                    f"{t.iteration}: saved {t.s.model_path}; run the same command to resume",
                    stop.signum or signal.SIGTERM,
                )
            if t.iteration % t.cfg.checkpoint_iters == 0 or t.iteration % t.cfg.val_iters == 0 or last:
                t.save(position)
            if t.s.paths.val_annotations and (t.iteration % t.cfg.val_iters == 0 or last):
                stats = t.validate()
                report_validation(writer, t.iteration, stats, log, t.s.model_cfg.rotated)
            if last:
                return stats
        if steps == 0 and (position > resumed_at or resumed_at == 0):  # else: resumed at the epoch's end
            raise UserError(
                f"{t.s.paths.images}: epoch {t.sampler.epoch} completed no training step: every "
                f"image of its batches was skipped as unreadable ({skipped} images)"
            )
        t.sampler.epoch += 1
        t.sampler.start = 0
    return stats


def check_finite(t: Trainer, out: dict) -> None:
    """Non-finite steps are skipped (the weights stay as they were); a long run of them is divergence."""
    if t.nonfinite_run >= MAX_NONFINITE_STEPS:
        loss = sum(out["losses"].values())
        raise UserError(
            f"training diverged: {t.nonfinite_run} steps in a row with a non-finite loss or gradient "
            f"(loss {loss}, gradient norm {out['norm']}) at iteration {t.iteration}; "
            f"{t.s.model_path} keeps its last finite weights; lower --lr or --clip-grad"
        )


def log_scalars(writer, iteration: int, out: dict, lr: float, rate: float) -> None:
    if writer is None:
        return
    for k, v in out["losses"].items():
        writer.add_scalar(f"train/{k}", v, iteration)
    writer.add_scalar("train/loss", sum(out["losses"].values()), iteration)
    writer.add_scalar("train/grad_norm", out["norm"], iteration)
    writer.add_scalar("train/lr", lr, iteration)
    writer.add_scalar("train/img_per_s", rate, iteration)


def report_validation(writer, iteration: int, stats: list[float], log: bool, rotated: bool = False) -> None:
    if log:
        print(f"validation at iteration {iteration}:\n{evaluate.format_stats(stats, rotated)}", flush=True)
    if writer is not None:
        for (kind, iou, area, dets), v in zip(evaluate.STAT_NAMES, stats):
            writer.add_scalar(f"val/{kind}@{iou}/{area}/{dets}", v, iteration)


def open_writer(logdir: str | None, main: bool):
    if not logdir or not main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--logdir needs TensorBoard: pip install 'retinanet[tensorboard]'") from None
    return SummaryWriter(logdir)


def train(
    model_path: str,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    paths: DataPaths,
    *,
    override: bool = False,
    fine_tune: str | None = None,
    pretrained: bool = True,
    backbone_weights: str | None = None,
    logdir: str | None = None,
    device=None,
    rank: int = 0,
    world: int = 1,
    explicit: frozenset = frozenset(),
    compile: bool = False,
) -> list[float] | None:
    """Train (or resume) and return the final validation stats, if validated.

    explicit: names of the settings the user gave; on resume those override
    the checkpoint's, the rest come from the checkpoint. With several ranks, an
    error in the checks or the set-up of any rank stops every rank with that
    rank's message (rank 0 prints it), before the first collective that could hang.
    compile: torch.compile the network's forward (compile_network); not saved in
    the checkpoint, so a resumed run compiles only when asked again.
    """
    device = (
        torch.device(device)
        if device is not None
        else (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    )
    main = rank == 0
    trainer, error = None, None
    try:
        setup = prepare(model_path, model_cfg, cfg, paths, world, override, explicit)
        if setup.resume and main:
            print(f"resuming {model_path} at iteration {setup.resume['iteration']}", flush=True)
        trainer = Trainer(setup, device, rank, world, pretrained, backbone_weights, fine_tune, compile)
        writer = open_writer(logdir, main)
    except UserError as e:
        error = e
    distributed.raise_first_error(error)
    assert trainer is not None
    if trainer.iteration >= trainer.cfg.total_iters:
        if main:
            print(
                f"{model_path} is already trained to {trainer.iteration} iterations (--iters "
                f"{trainer.cfg.total_iters}); raise --iters or pass --override to start fresh"
            )
        return None
    trainer.wrap()
    try:
        with warnings.catch_warnings(), StopRequest() as stop:
            warnings.filterwarnings("always", message="skipping")
            stats = run(trainer, stop, writer, main)
    finally:
        if writer is not None:
            writer.close()
    if main:
        print(f"saved {model_path} at iteration {trainer.iteration}", flush=True)
    return stats
