"""Backbone registry: name -> builder returning a module with C3, C4, C5 outputs.

A backbone family lives in one file that calls :func:`register`; importing
this package imports every family.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

_REGISTRY: dict[str, Callable[..., Backbone]] = {}


class Backbone(nn.Module):
    """Feature extractor: forward(x) -> [C3, C4, C5] (strides 8, 16, 32)."""

    out_channels: tuple[int, int, int]

    def forward(self, x):  # pragma: no cover - interface
        raise NotImplementedError


def register(name: str):
    def wrap(fn):
        _REGISTRY[name] = fn
        return fn

    return wrap


def names() -> list[str]:
    return sorted(_REGISTRY)


def build(name: str, pretrained: bool = False, weights_file: str | None = None, freeze_bn: bool = True) -> Backbone:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(names())}")
    return _REGISTRY[name](pretrained=pretrained, weights_file=weights_file, freeze_bn=freeze_bn)


from . import mobilenet, resnet  # noqa: E402,F401  (families register themselves)
