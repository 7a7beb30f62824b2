"""ODTK checkpoints built in the layout NVIDIA's retinanet-examples (ODTK) writes, and an
independent implementation of what ODTK detects with them.

Everything here follows ODTK's published checkpoint layout and box conventions (key
names, shapes, anchor order, the "+1" pixel formulas) and nothing in retinanet.ops or
retinanet.model: it is the other side of the comparison that tests the converter, so
a convention wrongly understood in the package cannot hide by being shared.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision import models

# ODTK's defaults as its checkpoints store them: ratios h/w in this order, the scales
# 4 * 2^(k/3) rounded to four decimals.
RATIOS = [1.0, 2.0, 0.5]
SCALES = [4.0, 5.0397, 6.3496]
STRIDES = [8, 16, 32, 64, 128]
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
# ODTK's fixed post-processing (not stored in its checkpoints).
THRESHOLD = 0.05
TOP_N = 1000
NMS_IOU = 0.5
DETECTIONS = 100

# torchvision network and lateral input channels (C3, C4, C5) per ODTK backbone name.
BACKBONES = {
    "ResNet18FPN": (models.resnet18, (128, 256, 512)),
    "ResNet50FPN": (models.resnet50, (512, 1024, 2048)),
    "MobileNetV2FPN": (models.mobilenet_v2, (32, 96, 320)),
}
# MobileNetV2's C3, C4, C5 are the outputs of these entries of its `features`.
MOBILENET_LEVELS = (6, 13, 17)
# The spread of the class logits and the prior the last classification conv adds to them:
# about 2 % of the anchor/class scores of these random weights pass 0.05, hundreds of
# candidates per image (more than 1000 on P3 with 80 classes), so that thresholding,
# top-n and NMS all have work to do, and none saturates near 1 (no float32 ties).
CLS_SPREAD = 1.0
CLS_BIAS = -5.0
# Box deltas: dx, dy of spread 0.1 and dw, dh of spread 0.2 around 0.5 (boxes ~1.6x their
# anchors): boxes of varied places and sizes, many clipped at the input's border, none
# near the dw/dh clamp our decode keeps (ODTK has none), and none lying wholly outside
# the input (a shift of > 4 spreads), where ODTK's decode leaves an inverted box.
BOX_SPREAD = (0.1, 0.1, 0.2, 0.2)
BOX_GROWTH = 0.5
# Random backbones are far more sensitive to their input than trained ones: with
# full-size residual branches a relative 1e-9 change of the input moved a ResNet50's head
# outputs by 1e-6 (its float32 outputs were off by ~3e-4). The last BN of each residual
# branch scaled by this brings that to 1e-7, nearer a trained network's behaviour.
RESIDUAL_GAIN = 0.3


def sample_images(batch: int, height: int, width: int, seed: int) -> Tensor:
    """Random RGB pixels 0..255, [batch, 3, height, width] float32."""
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 255


def _normalise(images: Tensor) -> Tensor:
    """ODTK's input normalisation: pixels to [0, 1], then per channel (v - mean) / std."""
    mean = torch.tensor(MEAN, dtype=images.dtype).view(1, 3, 1, 1)
    return (images / 255 - mean) / torch.tensor(STD, dtype=images.dtype).view(1, 3, 1, 1)


def _residual_ends(net: torch.nn.Module) -> list[torch.nn.BatchNorm2d]:
    """The BatchNorms that end a residual branch (before the shortcut's add)."""
    ends = []
    for m in net.modules():
        if isinstance(m, models.resnet.Bottleneck):
            ends.append(m.bn3)
        elif isinstance(m, models.resnet.BasicBlock):
            ends.append(m.bn2)
        elif isinstance(m, models.mobilenetv2.InvertedResidual) and m.use_res_connect:
            ends.append(m.conv[-1])
    return ends


def _backbone_state(name: str, sample: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
    """torchvision's network for `name` with every BatchNorm a non-trivial affine map.

    A fresh network's BN (weight 1, bias 0, mean 0, var 1) is nearly the identity and
    would hide a converter that dropped or misplaced its buffers; statistics drawn at
    random instead let activations grow through fifty layers until every score
    saturates. So BN gets random weights and biases, then the statistics of its inputs
    on the sample image (as trained BN's describe their features), then small
    perturbations of those."""
    factory, _ = BACKBONES[name]
    net = factory(weights=None)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 1.0  # running statistics := those of the one batch below
                m.weight.copy_(0.6 + 0.8 * torch.rand(m.num_features, generator=generator))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=generator))
        for m in _residual_ends(net):
            m.weight.mul_(RESIDUAL_GAIN)
        net.train()(sample)
    state = net.state_dict()
    for key in [k for k in state if k.endswith(".running_mean")]:
        bn = key[: -len("running_mean")]
        n = state[key].numel()
        state[bn + "running_mean"] += 0.1 * state[bn + "running_var"].sqrt() * torch.randn(n, generator=generator)
        state[bn + "running_var"] *= 0.9 + 0.2 * torch.rand(n, generator=generator)
    return state


class _Layers:
    """Random convs scaled on the sample image to a chosen output spread (the spread of
    a conv's output is linear in its weight), so that every backbone, ResNet50 with its
    ~10x wider C5 values included, gives logits and deltas of the intended spread."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator
        self.tensors: OrderedDict[str, Tensor] = OrderedDict()

    def conv(self, key: str, xs: list[Tensor], outputs: int, spread: float, kernel=3, stride=1, bias=None):
        """Make conv `key` for inputs xs (one per level, for the shared heads); its outputs."""
        weight = torch.randn(outputs, xs[0].shape[1], kernel, kernel, generator=self.generator)
        raw = torch.cat([F.conv2d(x, weight, None, stride, kernel // 2).flatten() for x in xs])
        weight *= spread / float(raw.std())
        b = torch.full((outputs,), bias) if bias is not None else 0.1 * torch.randn(outputs, generator=self.generator)
        self.tensors[key + ".weight"], self.tensors[key + ".bias"] = weight, b
        return [F.conv2d(x, weight, b, stride, kernel // 2) for x in xs]


def _fpn_and_heads(levels: list[Tensor], classes: int, generator: torch.Generator) -> tuple[OrderedDict, OrderedDict]:
    """ODTK's FPN tensors (keys without the backbones.<Name>. prefix) and head tensors,
    in its order; levels: the backbone's C3, C4, C5 on the sample image."""
    c3, c4, c5 = levels
    fpn = _Layers(generator)
    (l3,) = fpn.conv("lateral3", [c3], 256, 1.0, kernel=1)
    (l4,) = fpn.conv("lateral4", [c4], 256, 1.0, kernel=1)
    (p5,) = fpn.conv("lateral5", [c5], 256, 1.0, kernel=1)
    (p6,) = fpn.conv("pyramid6", [c5], 256, 1.0, stride=2)
    (p7,) = fpn.conv("pyramid7", [F.relu(p6)], 256, 3.0, stride=2)
    p4 = l4 + F.interpolate(p5, scale_factor=2.0, mode="nearest")
    p3 = l3 + F.interpolate(p4, scale_factor=2.0, mode="nearest")
    features = [fpn.conv(f"smooth{i}", [p], 256, 1.0)[0] for i, p in ((3, p3), (4, p4), (5, p5))] + [p6, p7]
    heads = _Layers(generator)
    anchors = len(RATIOS) * len(SCALES)
    for head, outputs, spread, bias in (
        ("cls_head", anchors * classes, CLS_SPREAD, CLS_BIAS),
        ("box_head", anchors * 4, 1.0, 0.0),
    ):
        xs = features
        for i in (0, 2, 4, 6):
            xs = [F.relu(x) for x in heads.conv(f"{head}.{i}", xs, 256, 1.0)]
        heads.conv(f"{head}.8", xs, outputs, spread, bias=bias)
    # Box channel 4a + j is anchor a's delta j (dx, dy, dw, dh).
    heads.tensors["box_head.8.weight"] *= torch.tensor(BOX_SPREAD).repeat(anchors).view(-1, 1, 1, 1)
    heads.tensors["box_head.8.bias"] = torch.tensor([0.0, 0.0, BOX_GROWTH, BOX_GROWTH]).repeat(anchors)
    return fpn.tensors, heads.tensors


def _training_state() -> dict:
    """SGD and LambdaLR state dicts of the kind ODTK saves beside the weights (momentum
    buffers included), so that the converter reads past them as it must."""
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([param], lr=0.01, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    param.grad = torch.ones(3)
    optimizer.step()
    scheduler.step()
    return {"iteration": 1, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}


def checkpoint(name: str, classes: int, seed: int, batches_tracked: bool = False) -> dict:
    """An ODTK checkpoint of backbone `name` (a BACKBONES key) with random, seeded weights.

    batches_tracked: keep BatchNorm's num_batches_tracked counters. Checkpoints that
    `odtk train` writes have none (its frozen BN has four buffers); older or hand-made
    ones may, and the converter takes both."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # torchvision's own initialisation of the backbone
    # Random pixels like the tests' images: the activations' spreads are set on this one.
    sample = _normalise(sample_images(1, 128, 128, seed))
    backbone = _backbone_state(name, sample, generator)
    with torch.no_grad():
        fpn, heads = _fpn_and_heads(_backbone_levels(name, backbone, sample), classes, generator)
    state: OrderedDict[str, Tensor] = OrderedDict()
    prefix = f"backbones.{name}."
    for key, value in backbone.items():
        if batches_tracked or not key.endswith("num_batches_tracked"):
            state[prefix + "features." + key] = value
    for key, value in fpn.items():
        state[prefix + key] = value
    state.update(heads)
    return {
        "backbone": [name],
        "classes": classes,
        "state_dict": state,
        "ratios": list(RATIOS),
        "scales": list(SCALES),
        **_training_state(),
    }


def _backbone_levels(name: str, backbone: dict[str, Tensor], x: Tensor) -> list[Tensor]:
    """C3, C4, C5 of torchvision's network given ODTK's backbone tensors (eval-mode BN)."""
    factory, _ = BACKBONES[name]
    with torch.device("meta"):
        net = factory(weights=None)
    missing, unexpected = net.load_state_dict(backbone, strict=False, assign=True)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    net.eval()
    if name.startswith("MobileNet"):
        levels = []
        for i, layer in enumerate(net.features[: MOBILENET_LEVELS[-1] + 1]):
            x = layer(x)
            if i in MOBILENET_LEVELS:
                levels.append(x)
        return levels
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    c2 = net.layer1(x)
    c3 = net.layer2(c2)
    c4 = net.layer3(c3)
    return [c3, c4, net.layer4(c4)]


@torch.no_grad()
def forward(ckpt: dict, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """ODTK's network on images [B, 3, H, W] of 0..255 RGB pixels (H, W multiples of 128):
    per level P3..P7, class logits [B, A*C, h, w] and box deltas [B, A*4, h, w] in ODTK's
    channel order (anchor-major, a = 3 * k_scale + k_ratio)."""
    name = ckpt["backbone"][0]
    # In the images' precision: float64 takes rounding out of the comparison.
    sd = {k: v.to(images.dtype) if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    prefix = f"backbones.{name}."
    x = _normalise(images)
    features = {k[len(prefix + "features.") :]: v for k, v in sd.items() if k.startswith(prefix + "features.")}
    c3, c4, c5 = _backbone_levels(name, features, x)

    def conv(key: str, t: Tensor, stride: int = 1) -> Tensor:
        weight = sd[key + ".weight"]
        return F.conv2d(t, weight, sd[key + ".bias"], stride, weight.shape[-1] // 2)

    p5 = conv(prefix + "lateral5", c5)
    p4 = conv(prefix + "lateral4", c4) + F.interpolate(p5, scale_factor=2.0, mode="nearest")
    p3 = conv(prefix + "lateral3", c3) + F.interpolate(p4, scale_factor=2.0, mode="nearest")
    p6 = conv(prefix + "pyramid6", c5, stride=2)
    p7 = conv(prefix + "pyramid7", F.relu(p6), stride=2)
    levels = [conv(prefix + "smooth3", p3), conv(prefix + "smooth4", p4), conv(prefix + "smooth5", p5), p6, p7]

    def head(name: str, t: Tensor) -> Tensor:
        for i in (0, 2, 4, 6):
            t = F.relu(conv(f"{name}.{i}", t))
        return conv(f"{name}.8", t)

    return [head("cls_head", f) for f in levels], [head("box_head", f) for f in levels]


def anchors(stride: int, ratios: list[float], scales: list[float]) -> Tensor:
    """[A, 4] anchors of ODTK's cell (0, 0), float64, a = len(ratios) * k_scale + k_ratio:
    w = scale * stride / sqrt(r), h = scale * stride * sqrt(r), centred on the cell at
    ((s - w) / 2, (s - h) / 2, (s + w) / 2, (s + h) / 2), with no rounding."""
    rows = []
    for scale in scales:
        for ratio in ratios:
            w = scale * stride / math.sqrt(ratio)
            h = scale * stride * math.sqrt(ratio)
            rows.append([(stride - w) / 2, (stride - h) / 2, (stride + w) / 2, (stride + h) / 2])
    return torch.tensor(rows, dtype=torch.float64)


def decode_level(logits: Tensor, deltas: Tensor, base: Tensor, stride: int) -> tuple[Tensor, Tensor, Tensor]:
    """One image's candidates on one level: scores, boxes (x1, y1, x2, y2), classes.

    logits [A*C, h, w], deltas [A*4, h, w]. ODTK: scores > 0.05, the best 1000 of them,
    then the +1 decode (widths x2 - x1 + 1, the far corner at centre + w/2 - 1, x1 kept
    >= 0 and x2 <= the level's extent - 1; no dw/dh clamp). Float64 from the heads on."""
    num_anchors = base.shape[0]
    _, height, width = logits.shape
    classes = logits.shape[0] // num_anchors
    scores = torch.sigmoid(logits.double()).reshape(-1)
    index = torch.nonzero(scores > THRESHOLD)[:, 0]
    if index.numel() > TOP_N:
        index = index[torch.topk(scores[index], TOP_N).indices]
    channel, cell = index // (height * width), index % (height * width)
    a, c = channel // classes, channel % classes
    y, x = cell // width, cell % width
    d = deltas.double().reshape(num_anchors, 4, height * width)[a, :, cell]  # [n, 4]
    shift = torch.stack([x, y, x, y], dim=1).double() * stride
    anchor = base[a] + shift
    aw = anchor[:, 2] - anchor[:, 0] + 1
    ah = anchor[:, 3] - anchor[:, 1] + 1
    acx = anchor[:, 0] + aw / 2
    acy = anchor[:, 1] + ah / 2
    cx, cy = d[:, 0] * aw + acx, d[:, 1] * ah + acy
    w, h = aw * torch.exp(d[:, 2]), ah * torch.exp(d[:, 3])
    x1 = torch.clamp(cx - w / 2, min=0)
    y1 = torch.clamp(cy - h / 2, min=0)
    x2 = torch.clamp(cx + w / 2 - 1, max=width * stride - 1)
    y2 = torch.clamp(cy + h / 2 - 1, max=height * stride - 1)
    return scores[index], torch.stack([x1, y1, x2, y2], dim=1), c


def iou(box: Tensor, boxes: Tensor, offset: float = 1.0) -> Tensor:
    """ODTK's NMS IoU of one box [4] with boxes [N, 4]: intersections and areas count both
    end pixels (offset 1); offset 0 is the continuous IoU, for showing the data tell
    the two apart."""
    iw = (torch.minimum(box[2], boxes[:, 2]) - torch.maximum(box[0], boxes[:, 0]) + offset).clamp(min=0)
    ih = (torch.minimum(box[3], boxes[:, 3]) - torch.maximum(box[1], boxes[:, 1]) + offset).clamp(min=0)
    inter = iw * ih

    def area(b: Tensor) -> Tensor:
        return (b[..., 2] - b[..., 0] + offset) * (b[..., 3] - b[..., 1] + offset)

    return inter / (area(box) + area(boxes) - inter)


def nms(scores: Tensor, boxes: Tensor, classes: Tensor, offset: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """ODTK's class-wise greedy NMS: best score first, a box suppresses the later boxes of
    its class with IoU > 0.5; the first 100 survivors, best first."""
    order = torch.sort(scores, descending=True, stable=True).indices
    scores, boxes, classes = scores[order], boxes[order], classes[order]
    alive = torch.ones(len(scores), dtype=torch.bool)
    keep = []
    for i in range(len(scores)):
        if not alive[i]:
            continue
        keep.append(i)
        if len(keep) == DETECTIONS:
            break
        later = torch.arange(len(scores)) > i
        alive &= ~(later & (classes == classes[i]) & (iou(boxes[i], boxes, offset) > NMS_IOU))
    k = torch.tensor(keep, dtype=torch.long)
    return scores[k], boxes[k], classes[k]


def postprocess(
    ckpt: dict, cls_heads: list[Tensor], box_heads: list[Tensor], nms_offset: float = 1.0
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """ODTK's detections per image from forward's head outputs: (scores [n], boxes [n, 4],
    classes [n]), best first, n <= 100, in input pixels. nms_offset 0 swaps in the
    continuous IoU (see iou)."""
    return [nms(*c, nms_offset) for c in candidates(ckpt, cls_heads, box_heads)]


def candidates(ckpt: dict, cls_heads: list[Tensor], box_heads: list[Tensor]) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per image, the candidates of every level before NMS: (scores, boxes, classes)."""
    bases = [anchors(s, ckpt["ratios"], ckpt["scales"]) for s in STRIDES]
    out = []
    for b in range(cls_heads[0].shape[0]):
        parts = [decode_level(c[b], d[b], base, s) for c, d, base, s in zip(cls_heads, box_heads, bases, STRIDES)]
        out.append(tuple(torch.cat(p) for p in zip(*parts)))
    return out


def without_counters(ckpt: dict) -> dict:
    """The checkpoint without BatchNorm's num_batches_tracked entries, as `odtk train`
    writes them (its frozen BN has four buffers)."""
    state = OrderedDict((k, v) for k, v in ckpt["state_dict"].items() if not k.endswith("num_batches_tracked"))
    return {**ckpt, "state_dict": state}


def rotated(ckpt: dict) -> dict:
    """The checkpoint as a rotated-box model: three anchor angles (27 anchors), six box
    values per anchor, and the `angles` entry that marks it."""
    state = OrderedDict(ckpt["state_dict"])
    classes = ckpt["classes"]
    for key, outputs in (("cls_head.8", 27 * classes), ("box_head.8", 27 * 6)):
        state[key + ".weight"] = torch.zeros(outputs, 256, 3, 3)
        state[key + ".bias"] = torch.zeros(outputs)
    return {**ckpt, "state_dict": state, "angles": [-math.pi / 6, 0.0, math.pi / 6]}
