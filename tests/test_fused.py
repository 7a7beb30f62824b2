"""Conv + bias + ReLU (+ residual add) fusion of the GPU inference copy (model/fused.py).

On the CPU the fused modules run the ops of the modules they replace, so the
fused model's outputs equal the folded model's bit for bit; the cuDNN branch
is checked here against the ops' ATen schemas with stand-ins that compute on
the CPU. The cuDNN ops themselves run in the GPU tests.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import BUSY, tiny_model
from test_gpu_backend import assert_same_detections, busy_model, rows_of

from retinanet import ops
from retinanet.config import ModelConfig
from retinanet.model import RetinaNet
from retinanet.model import fused as fused_module
from retinanet.model.batchnorm import FrozenBatchNorm2d, fold_batchnorm
from retinanet.model.fused import ConvAddReLU, ConvReLU, FusedBlock, FusedReLU, fuse_for_inference, matched
from retinanet.model.heads import valid_mask
from retinanet.runtime import pytorch as pytorch_runtime
from retinanet.runtime.pytorch import TorchBackend

gpu = pytest.mark.gpu

# Residual blocks of each backbone and convs per block (BasicBlock 2, Bottleneck 3).
BLOCKS = {"ResNet18FPN": (8, 2), "ResNet50FPN": (16, 3)}
KINDS = (ConvReLU, ConvAddReLU, FusedBlock, FusedReLU)


def expected_kinds(backbone, head_norm, depth=4):
    """What fusion makes of a folded model: the stem's conv and every block conv
    but the last with their ReLU, each block's last conv with its add, and the
    head towers' convs unless a GroupNorm sits between conv and ReLU."""
    blocks, convs = BLOCKS[backbone]
    towers = 0 if head_norm else 2 * depth
    return {
        "ConvReLU": 1 + blocks * (convs - 1) + towers,
        "ConvAddReLU": blocks,
        "FusedBlock": blocks,
        "FusedReLU": 1 + towers,  # the Sequentials' ReLUs (stem, towers); blocks drop theirs
    }


def kinds(model):
    return {k.__name__: sum(type(m) is k for m in model.modules()) for k in KINDS}


def randomise_batchnorm(model, seed=1):
    """BatchNorm statistics and affine terms away from the identity, so that the
    folded convs get real biases (a fresh model's fold to zero biases)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                n = m.running_mean.numel()
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))


def folded_and_fused(backbone, head_norm):
    """A tiny busy model of `backbone` folded for inference, and a fused copy of it (and its count)."""
    model = tiny_model(BUSY, backbone=backbone, head_norm=head_norm)
    randomise_batchnorm(model)
    fold_batchnorm(model)
    fused = copy.deepcopy(model)
    return model, fused, fuse_for_inference(fused)


def pixels(seed=0, batch=2, height=96, width=128):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, height, width), generator=gen).float()


SIZES = torch.tensor([[96, 128], [70, 100]])  # the second image padded: GroupNorm heads mask it


def assert_equal_outputs(got, want):
    for g, w in zip(got[0] + got[1], want[0] + want[1]):
        assert torch.equal(g, w), (g - w).abs().max()


# --------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("head_norm", [False, True])
@pytest.mark.parametrize("backbone", ["ResNet18FPN", "ResNet50FPN"])
def test_fused_model_equals_the_folded_model_on_the_cpu(backbone, head_norm):
    model, fused, count = folded_and_fused(backbone, head_norm)
    want = expected_kinds(backbone, head_norm)
    assert kinds(fused) == want
    assert count == want["ConvReLU"] + want["ConvAddReLU"]
    # Every backbone ReLU went into a conv; GroupNorm towers keep theirs (4 per head).
    assert not any(type(m) is nn.ReLU for m in fused.backbone.modules())
    assert sum(type(m) is nn.ReLU for m in fused.modules()) == (8 if head_norm else 0)
    with torch.no_grad():
        assert_equal_outputs(fused(pixels(), SIZES), model(pixels(), SIZES))
        # A head given a mask zeroes the padding after each ReLU (GroupNorm heads get one
        # from the detector): a fused tower still does, after its fused ReLUs.
        feature = torch.randn(2, 32, 12, 16, generator=torch.Generator().manual_seed(2))
        mask = valid_mask(SIZES, 8, 12, 16, feature.dtype)
        for head in ("cls_head", "box_head"):
            assert torch.equal(getattr(fused, head)(feature, mask), getattr(model, head)(feature, mask))
    assert fuse_for_inference(fused) == 0  # nothing left to fuse


def test_unfolded_batchnorm_keeps_its_convs_unfused():
    """A BatchNorm between conv and ReLU (or before a block's add) is work the
    fused op would skip: only the head towers, which have none, are fused."""
    model = tiny_model(BUSY)
    fused = copy.deepcopy(model)
    assert fuse_for_inference(fused) == 8
    assert kinds(fused) == {"ConvReLU": 8, "ConvAddReLU": 0, "FusedBlock": 0, "FusedReLU": 8}
    with torch.no_grad():
        assert_equal_outputs(fused(pixels()), model(pixels()))


def test_fused_weights_follow_the_input_dtype_and_layout():
    weight = torch.randn(16, 8, 3, 3)
    x = torch.randn(2, 8, 10, 12).half().contiguous(memory_format=torch.channels_last)
    w = matched(weight, x)
    assert w.dtype == torch.float16 and w.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(w.float(), weight.half().float())
    same = weight.half().contiguous(memory_format=torch.channels_last)
    assert matched(same, x) is same  # TorchBackend's copy: nothing to convert, nothing copied
    back = matched(same, x.float().contiguous())
    assert back.dtype == torch.float32 and back.is_contiguous()


def schema_arguments(name, args):
    """args bound to the ATen schema of torch.<name> by position, each checked
    against its declared type; the names the schema gives them."""
    schema = getattr(torch.ops.aten, name).default._schema
    assert len(args) == len(schema.arguments), (name, len(args))
    checks = {
        "Tensor": lambda v: isinstance(v, torch.Tensor),
        "Optional[Tensor]": lambda v: v is None or isinstance(v, torch.Tensor),
        "Optional[number]": lambda v: v is None or isinstance(v, (int, float)),
        "List[int]": lambda v: len(v) == 2 and all(type(i) is int for i in v),
        "int": lambda v: type(v) is int,
    }
    for arg, value in zip(schema.arguments, args):
        assert checks[str(arg.type)](value), (name, arg.name, str(arg.type), value)
    return {arg.name: value for arg, value in zip(schema.arguments, args)}


def stand_ins(calls):
    """CPU stand-ins for the two cuDNN ops, computing what their schemas'
    arguments mean: relu(conv(self, weight) + bias [+ alpha * z])."""

    def conv(a):
        return F.conv2d(a["self"], a["weight"], a["bias"], a["stride"], a["padding"], a["dilation"], a["groups"])

    def cudnn_convolution_relu(*args):
        calls.append("relu")
        return F.relu(conv(schema_arguments("cudnn_convolution_relu", args)))

    def cudnn_convolution_add_relu(*args):
        calls.append("add_relu")
        a = schema_arguments("cudnn_convolution_add_relu", args)
        return F.relu(conv(a) + a["alpha"] * a["z"])

    return cudnn_convolution_relu, cudnn_convolution_add_relu


def test_the_cudnn_branch_passes_the_ops_their_arguments(monkeypatch):
    """The fused modules' cuDNN branch, taken on the CPU with stand-ins for the
    ops: arguments in the schemas' order and types, and what they mean (bias,
    shortcut, alpha 1) gives the folded model's outputs exactly."""
    model, fused, _ = folded_and_fused("ResNet50FPN", False)
    calls = []
    relu, add_relu = stand_ins(calls)
    monkeypatch.setattr(torch, "cudnn_convolution_relu", relu)
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu", add_relu)
    monkeypatch.setattr(fused_module._Fused, "use_cudnn", lambda self, x: self.fused)
    with torch.no_grad():
        assert_equal_outputs(fused(pixels(batch=1, height=64, width=64)), model(pixels(batch=1, height=64, width=64)))
    want = expected_kinds("ResNet50FPN", False)
    towers = want["FusedReLU"] - 1  # run once per pyramid level
    assert calls.count("relu") == want["ConvReLU"] - towers + 5 * towers
    assert calls.count("add_relu") == want["ConvAddReLU"]


def test_a_conv_without_a_fused_engine_runs_unfused(monkeypatch):
    """cuDNN finding no fused engine for a conv's shapes is a warning, and that
    conv runs unfused from then on; the outputs do not change."""
    model, fused, _ = folded_and_fused("ResNet18FPN", False)
    calls = []

    def no_engine(*args):
        calls.append(args)
        raise RuntimeError("GET was unable to find an engine to execute this computation")

    monkeypatch.setattr(torch, "cudnn_convolution_relu", no_engine)
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu", no_engine)
    monkeypatch.setattr(fused_module._Fused, "use_cudnn", lambda self, x: self.fused)
    x = pixels(batch=1)
    with torch.no_grad(), pytest.warns(UserWarning, match="running it unfused"):
        assert_equal_outputs(fused(x), model(x))
    modules = [m for m in fused.modules() if isinstance(m, (ConvReLU, ConvAddReLU))]
    assert len(calls) == len(modules) and not any(m.fused for m in modules)
    with torch.no_grad():
        assert_equal_outputs(fused(x), model(x))  # no further attempts
    assert len(calls) == len(modules)


def test_the_cpu_backend_is_not_fused():
    backend = TorchBackend(tiny_model(BUSY), [1, 3, 7], "cpu")
    assert kinds(backend.model) == dict.fromkeys(kinds(backend.model), 0)


# --------------------------------------------------------------------------- GPU


def gpu_copy(model, half):
    """model as TorchBackend places it on the GPU: channels_last, fp16 unless not `half`."""
    model = copy.deepcopy(model).cuda().to(memory_format=torch.channels_last)
    return model.half() if half else model


def count_cudnn_calls(monkeypatch, model):
    """(calls to the fused cuDNN ops, calls of the fused modules) while `model` runs."""
    counts = {"ops": 0, "modules": 0}
    for name in ("cudnn_convolution_relu", "cudnn_convolution_add_relu"):
        original = getattr(torch, name)

        def counted(*args, _op=original):
            counts["ops"] += 1
            return _op(*args)

        counted.__name__ = name
        monkeypatch.setattr(torch, name, counted)
    for m in model.modules():
        if isinstance(m, (ConvReLU, ConvAddReLU)):
            m.register_forward_hook(lambda *_: counts.__setitem__("modules", counts["modules"] + 1))
    return counts


def flat(outputs):
    return [t.float() for t in outputs[0] + outputs[1]]


@gpu
@pytest.mark.parametrize("head_norm", [False, True])
@pytest.mark.parametrize("backbone", ["ResNet18FPN", "ResNet50FPN"])
def test_fused_network_on_the_gpu_matches_unfused(backbone, head_norm, monkeypatch):
    torch.manual_seed(0)
    model = RetinaNet(ModelConfig(backbone=backbone, classes=5, channels=64, head_norm=head_norm)).eval()
    with torch.no_grad():  # outputs that vary (a fresh head's are nearly its bias)
        model.cls_head.out.bias.fill_(-2.95)
        model.cls_head.out.weight.normal_(std=5.0)
        model.box_head.out.weight.normal_(std=0.1)
    randomise_batchnorm(model)
    fold_batchnorm(model)
    fused = copy.deepcopy(model)
    assert fuse_for_inference(fused) > 0
    fused16, unfused16, reference = gpu_copy(fused, True), gpu_copy(model, True), gpu_copy(model, False)
    counts = count_cudnn_calls(monkeypatch, fused16)
    x = pixels(height=256, width=384).cuda().contiguous(memory_format=torch.channels_last)
    sizes = torch.tensor([[256, 384], [200, 300]], device="cuda")
    with torch.no_grad():
        got, base = flat(fused16(x.half(), sizes)), flat(unfused16(x.half(), sizes))
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            want = flat(reference(x, sizes))
    # Every fused module ran its cuDNN op: none fell back to plain ops.
    assert counts["ops"] == counts["modules"] > 0
    # The fused ops round once, from float32, where unfused fp16 rounds the conv's
    # output and again after the bias, the add and the ReLU; and cuDNN may pick
    # other kernels (other accumulation orders). With fp16 rounding emulated on
    # the CPU for these models the two differ by at most 0.9% of each output's
    # largest magnitude (rtol means nothing for outputs near 0): 2% leaves room
    # for the kernels' own rounding. A lost bias, add or ReLU moves outputs by
    # tens of percent.
    for g, b, w in zip(got, base, want):
        torch.testing.assert_close(g, b, rtol=0, atol=0.02 * float(w.abs().max()))
    # Fusing must not cost accuracy: measured against float32, the fused error
    # stays within twice the unfused one (emulated: 0.8 to 0.96 times it, as
    # rounding once loses less than rounding four times).
    error = [max(float((o - w).abs().max() / w.abs().max()) for o, w in zip(out, want)) for out in (got, base)]
    assert error[0] <= 2 * error[1], error


@gpu
@pytest.mark.parametrize("cuda_graphs", [False, True])
@pytest.mark.parametrize("full_precision", [False, True])
def test_backend_detects_with_fusion_as_without(full_precision, cuda_graphs, monkeypatch):
    if cuda_graphs and not ops.HAVE_EXTENSION:
        pytest.skip("retinanet._C not built: no CUDA ops to capture")
    cfg = ModelConfig(backbone="ResNet18FPN", classes=5, channels=64)
    model = busy_model(cfg, weight_std=5.0)
    options = dict(device="cuda", full_precision=full_precision, cuda_graphs=cuda_graphs)
    fused = TorchBackend(model, list(range(5)), **options)
    modules = [m for m in fused.model.modules() if isinstance(m, (ConvReLU, ConvAddReLU))]
    assert len(modules) == sum(expected_kinds("ResNet18FPN", False)[k] for k in ("ConvReLU", "ConvAddReLU"))
    monkeypatch.setattr(pytorch_runtime, "fuse_for_inference", lambda model: 0)
    plain = TorchBackend(model, list(range(5)), **options)
    assert not any(isinstance(m, (ConvReLU, ConvAddReLU)) for m in plain.model.modules())
    for seed in range(3):  # with graphs: the first call captures, later ones replay
        gen = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (2, 3, 256, 384), generator=gen, dtype=torch.uint8)
        got, want = fused(images), plain(images)
        assert (want[0] > 0).sum() > 50
        # Scores: 2e-3, four times the largest score difference of these models
        # with fp16 rounding emulated on the CPU (5e-4); float32 differs less.
        # Boxes hardly move (their deltas are ~0.01 here). NMS reorderings of
        # near-equal scores are explained by assert_same_detections.
        assert_same_detections(
            rows_of(got), rows_of(want), cfg.detections, score_tol=2e-3, box_tol=0.1, min_matched=0.9
        )
    assert all(m.fused for m in modules)  # no conv fell back to unfused ops
