"""Opening a checkpoint builds the model without initialising weights first: same model, less start-up."""

import torch

from retinanet import checkpoint
from retinanet.model import RetinaNet
from retinanet.model.batchnorm import fold_batchnorm


def tensors(model):
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def test_load_model_equals_a_normally_built_model(tiny_pth):
    from conftest import tiny_config

    for changes in ({}, {"head_norm": True, "freeze_bn": True}):
        torch.manual_seed(3)
        want = RetinaNet(tiny_config(**changes)).eval()
        state = checkpoint.model_state(want.config, want, [1, 3, 7])
        got = RetinaNet.from_state_dict(want.config, state["state_dict"])
        a, b = tensors(want), tensors(got)
        assert a.keys() == b.keys() and "pixel_mean" in b and "base_anchors_0" in b
        for name in a:
            assert b[name].device.type == "cpu" and torch.equal(a[name], b[name]), name
            assert a[name].requires_grad == b[name].requires_grad, name
    model, _ = checkpoint.load_model(tiny_pth)
    assert not any(t.is_meta for t in tensors(model).values())


def test_folding_keeps_outputs_and_devices():
    from conftest import tiny_model

    model = tiny_model((3.0, -2.0))
    x = torch.rand(2, 3, 96, 128) * 255
    want = model(x)
    folded = RetinaNet.from_state_dict(model.config, model.state_dict()).eval()
    assert fold_batchnorm(folded) > 10
    got = folded(x)
    assert not any(t.is_meta for t in tensors(folded).values())
    for w, g in zip(want[0] + want[1], got[0] + got[1]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
