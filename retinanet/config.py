"""The one definition of the model's and of training's settings, with their defaults.

A :class:`ModelConfig` is saved in every checkpoint and export (as a plain dict)
and read back by training, inference, the ONNX export and the TensorRT plugin
fields; a :class:`TrainConfig` is saved in checkpoints for resuming. The CLI's
flags default to None and show these values in their help; the demo presets
below replace some of them for the embedded demo data. Inference and export
settings live beside their commands (infer.InferOptions, export.ExportOptions).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

FORMAT_VERSION = 2
# Images per GPU in a batch when --batch is not given (training and inference).
BATCH_PER_GPU = 2


def _default_scales() -> list[float]:
    # size = stride * scale, so 4 * 2^(k/3) gives anchors of 32..512 px on P3..P7.
    return [4.0 * 2 ** (k / 3) for k in range(3)]


@dataclass
class ModelConfig:
    backbone: str = "ResNet50FPN"
    classes: int = 80
    # Anchors. Ratios are h/w.
    anchor_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    anchor_scales: list[float] = field(default_factory=_default_scales)
    strides: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])
    # Where anchors sit: "centre" puts them on cell centres, (i + 0.5) * stride, with
    # sizes stride * scale; "torchvision" reproduces torchvision's RetinaNet (sizes
    # truncated to integers, corners rounded, centres at i * stride) so that its
    # converted weights detect what they did there. Either way it only changes the
    # per-level anchor tables (model.anchors), which every implementation takes as data.
    anchor_placement: str = "centre"
    # Rotated boxes (docs/rotated.md): boxes (cx, cy, w, h, θ), each axis-aligned anchor
    # repeated at these angles (degrees, anti-clockwise on screen), six box values per anchor.
    rotated: bool = False
    anchor_angles: list[float] = field(default_factory=lambda: [-30.0, 0.0, 30.0])
    # 1 for the "+1 pixel" box convention of converted ODTK checkpoints: a box's
    # width is x2 - x1 + 1, in decoding, clipping, IoU and the output width.
    box_offset: float = 0.0
    # Width of the FPN and heads, and conv layers per head tower: the RetinaNet paper's;
    # the CPU demo uses a narrow model so that it trains in minutes.
    channels: int = 256
    head_depth: int = 4
    # The feature the stride-64 conv takes: C5 (the paper, ODTK, torchvision v2) or
    # the FPN's P5 output (torchvision's first RetinaNet).
    p6_input: str = "C5"
    # GroupNorm(32) after each head-tower conv. Off as in the paper; training
    # turns it on when the backbone trains from scratch (the demo too), where
    # plain towers diverge (TRAINING.md, "Stability").
    head_norm: bool = False
    # Bias on the head-tower convs; torchvision's GroupNorm towers have none (the
    # norm's shift takes its place).
    head_conv_bias: bool = True
    # Matching: IoU < bg is background, >= fg foreground, between ignored.
    anchor_ious: list[float] = field(default_factory=lambda: [0.4, 0.5])
    # Loss.
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    smooth_l1_beta: float = 0.11
    prior_probability: float = 0.01
    # Preprocessing.
    resize: int = 800
    max_size: int = 1333
    # Batches are padded right/bottom to a multiple of this. C3-C5 halve the input
    # exactly at multiples of 32; the stride-2 convs of P6/P7 take any size (ceil).
    # Measured on the demo and on stretched holdout images, 32 gives the mAP of 128
    # (within 0.0007) on less padding. Checkpoints keep the value they were saved
    # with: a model trained with 128 still pads to 128 (a saved artefact does not
    # change its behaviour silently).
    pad_multiple: int = 32
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    # Inference (decode + NMS).
    score_threshold: float = 0.05
    top_n: int = 1000
    nms_iou: float = 0.5
    detections: int = 100
    # Clip candidate boxes to each image (not the padded batch) before NMS, as
    # torchvision does; GroupNorm-head models always do (model.RetinaNet). Off for
    # the others: their exports then need no image-size input.
    clip_to_image: bool = False
    # dw/dh are clamped here before exp() so a wild regression cannot overflow.
    box_clamp: float = math.log(1000.0 / 16)
    # Backbone BatchNorm is frozen when the backbone starts from trained weights;
    # from scratch it has to learn its statistics.
    freeze_bn: bool = True

    @property
    def takes_image_sizes(self) -> bool:
        """Whether detections depend on each image's valid size within the padded batch."""
        return self.head_norm or self.clip_to_image

    @property
    def num_anchors(self) -> int:
        angles = len(self.anchor_angles) if self.rotated else 1
        return len(self.anchor_ratios) * len(self.anchor_scales) * angles

    @property
    def box_deltas(self) -> int:
        """Box-head outputs per anchor: dx dy dw dh, and for rotated boxes the angle's sin and cos."""
        return 6 if self.rotated else 4

    @property
    def box_values(self) -> int:
        """Values per detected box: x1 y1 x2 y2, or cx cy w h θ."""
        return 5 if self.rotated else 4

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        config = cls(**d)
        config.check()
        return config

    def check(self) -> None:
        """ValueError naming the first setting no implementation understands."""
        choices = {"anchor_placement": ("centre", "torchvision"), "p6_input": ("C5", "P5")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        if self.box_offset not in (0.0, 1.0):
            raise ValueError(f"box_offset must be 0 or 1, not {self.box_offset!r}")
        if self.rotated:
            self._check_rotated()

    def _check_rotated(self) -> None:
        # The rotated ops know one convention: continuous widths, anchors on cell centres,
        # and no clipping (clipping the unrotated extents would move a turned box).
        if self.anchor_placement != "centre" or self.box_offset or self.clip_to_image:
            raise ValueError("rotated models take anchor_placement centre, box_offset 0 and no clip_to_image")
        if not self.anchor_angles or not all(-180 < a <= 180 for a in self.anchor_angles):
            raise ValueError(f"anchor_angles must be degrees in (-180, 180], got {self.anchor_angles}")
        if len(set(self.anchor_angles)) != len(self.anchor_angles):
            raise ValueError(f"anchor_angles must differ, got {self.anchor_angles}")


# Target rows are (x1, y1, x2, y2, label); these labels mark the non-objects.
LABEL_PAD = -1  # padding row of a batch
LABEL_CROWD = -2  # crowd box: an ignored region, never a match


@dataclass
class TrainConfig:
    """Optimisation and data settings of a training run (saved in checkpoints)."""

    batch: int = BATCH_PER_GPU  # global batch; the CLI's default is BATCH_PER_GPU x the GPUs
    iters: int = 90000
    milestones: list[int] = field(default_factory=lambda: [60000, 80000])
    schedule: float = 1.0  # scales iters and milestones
    lr: float = 0.01
    warmup: int = 1000
    gamma: float = 0.1
    weight_decay: float = 1e-4
    momentum: float = 0.9
    # Cap on the gradients' total L2 norm (0: off). Healthy steps stay well below
    # it (the demo's first steps: 2 to 18); it bounds the rare exploding step of
    # a from-scratch backbone, the value MMDetection's RetinaNet recipe uses.
    clip_grad: float = 35.0
    val_iters: int = 8000
    checkpoint_iters: int = 1000
    jitter: list[int] = field(default_factory=lambda: [640, 1024])
    augment_rotate: bool = False
    augment_brightness: bool = False
    augment_contrast: bool = False
    augment_hue: bool = False
    augment_saturation: bool = False
    augment_crop: bool = False  # random bounding-box crop (SSD style) before the resize
    seed: int = 0
    workers: int = 2
    with_dali: bool = False  # DALI pipelines instead of the PyTorch DataLoader
    amp_dtype: str = "auto"  # fp16 | bf16 | auto (bf16 where supported)
    full_precision: bool = False

    @property
    def total_iters(self) -> int:
        return int(round(self.iters * self.schedule))

    @property
    def scaled_milestones(self) -> list[int]:
        return [int(round(m * self.schedule)) for m in self.milestones]

    def lr_factor(self, iteration: int) -> float:
        """Linear warmup from 0.1*lr, then x gamma at each milestone."""
        factor = self.gamma ** sum(iteration >= m for m in self.scaled_milestones)
        if iteration < self.warmup:
            factor *= 0.1 + 0.9 * iteration / self.warmup
        return factor

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# The embedded demo trains a narrow ResNet18FPN from scratch on
# 128 px images, so that a 2-core CPU gets a useful mAP in a few minutes. These
# values apply when no --annotations are given and the flag was not set.
DEMO_MODEL = dict(backbone="ResNet18FPN", channels=128, head_norm=True, resize=128, max_size=128, freeze_bn=False)
DEMO_TRAIN = dict(batch=8, iters=600, milestones=[450, 550], lr=0.02, warmup=50, val_iters=300, jitter=[96, 128])
