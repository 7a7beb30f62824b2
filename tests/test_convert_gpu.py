"""Converted models on the GPU: the CUDA ops (decode and NMS with each convention: torchvision
anchor tables, clipping to the image, the +1 box convention) give the detections of the CPU
reference path, through the runtime a user gets (TorchBackend: CUDA graph, fused convs)."""

from __future__ import annotations

import odtk_layout as odtk
import pytest
import torch
from test_convert_torchvision import torchvision_model
from test_gpu_backend import assert_same_detections, rows_of

from retinanet.checkpoint import load_model
from retinanet.convert import convert
from retinanet.runtime.pytorch import TorchBackend

pytestmark = pytest.mark.gpu


def converted(tmp_path, name: str):
    """The converted model of a torchvision (v1, v2) or ODTK (ResNet18FPN, 80 classes) source."""
    if name == "odtk":
        torch.save(odtk.checkpoint("ResNet18FPN", 80, seed=3), tmp_path / "src.pth")
    else:
        torch.save(torchvision_model(name).state_dict(), tmp_path / "src.pth")
    convert(str(tmp_path / "src.pth"), str(tmp_path / "out.pth"))
    return load_model(str(tmp_path / "out.pth"))


@pytest.mark.parametrize("name", ["torchvision-v1", "torchvision-v2", "odtk"])
def test_cuda_ops_give_the_reference_detections(tmp_path, name):
    """The same head outputs through the model's postprocess: on the GPU the CUDA decode and
    NMS, on the CPU the reference. The network itself is left out: on the GPU its convs
    round differently (TF32, cuDNN), and these random models' dense, near-saturated scores
    would turn that into other NMS decisions."""
    model, _ = converted(tmp_path, name)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 384, 512), generator=gen).float()
    sizes = torch.tensor([[384, 500], [350, 512]])  # padding on the right and bottom: clipping matters
    with torch.no_grad():
        cls, box = model(images, sizes)
        want = model.postprocess(cls, box, sizes)
        got = model.postprocess([c.cuda() for c in cls], [b.cuda() for b in box], sizes.cuda())
    assert got[0].is_cuda
    assert_same_detections(
        rows_of(got), rows_of(want), model.config.detections, score_tol=1e-6, box_tol=1e-3, min_matched=0.99
    )


def test_converted_v2_through_the_runtime(tmp_path):
    """The converted v2 model (GroupNorm towers without bias, torchvision anchors, clipping to
    the image) through TorchBackend on CUDA (graph, fused convs): the CPU's detections."""
    model, state = converted(tmp_path, "torchvision-v2")
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 384, 512), generator=gen).float()
    sizes = torch.tensor([[384, 500], [350, 512]])
    with torch.no_grad():
        want = model.detect(images, sizes)
    gpu = TorchBackend(model, state["category_ids"], "cuda", full_precision=True)
    got = gpu(images.cuda(), sizes.cuda())
    assert_same_detections(
        rows_of(got), rows_of(want), model.config.detections, score_tol=1e-4, box_tol=0.05, min_matched=0.9
    )
