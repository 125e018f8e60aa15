"""Batch norm fused with an activation (timm's ``BatchNormAct2d`` family), kept through every
conversion.

timm (and models built on it: EfficientNet, RexNet, ...) subclasses ``torch.nn.BatchNorm2d`` as
``BatchNormAct2d``: batch norm, then ``self.drop``, then ``self.act``, written as one layer so
that checkpoints of a separate BN + activation still load. Its ``forward`` calls
``torch.nn.functional.batch_norm`` itself, so swapping its class for another batch norm (ours, a
synchronized one, a frozen one) cannot reach the batch-norm part: the activation is lost, or the
statistics are silently not synchronized.

A *norm-act layer* here is any batch-norm layer with ``drop`` and ``act`` submodules
(:func:`is_norm_act`). Every conversion rebuilds it as the matching class below, which runs the
converted batch norm and then the very same ``drop`` and ``act`` modules, with the same
parameters, buffers and ``state_dict`` keys; converting back gives the original class.
"""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = [
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "NormActTail",
    "is_norm_act",
]


def is_norm_act(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a batch norm followed by its own ``drop`` and ``act`` submodules."""
    children = module._modules
    return (
        isinstance(module, _BatchNorm)
        and isinstance(children.get("act"), torch.nn.Module)
        and isinstance(children.get("drop"), torch.nn.Module)
    )


class NormActTail:
    """``act(drop(norm(x)))``: the batch norm of the next class in the MRO, then the tail."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(input)))  # type: ignore[misc, attr-defined]


class BatchNormAct1d(NormActTail, BatchNorm1d):
    """:class:`batchnorm.nn.BatchNorm1d`, then ``drop`` and ``act`` (made by conversion)."""


class BatchNormAct2d(NormActTail, BatchNorm2d):
    """:class:`batchnorm.nn.BatchNorm2d`, then ``drop`` and ``act`` (made by conversion from
    timm's ``BatchNormAct2d``; ``convert(model, to="torch")`` gives timm's class back)."""


class BatchNormAct3d(NormActTail, BatchNorm3d):
    """:class:`batchnorm.nn.BatchNorm3d`, then ``drop`` and ``act`` (made by conversion)."""


def norm_act_class_for(module: torch.nn.Module) -> type:
    """Our norm-act class for a norm-act layer, by the input rank its class accepts."""
    if isinstance(module, torch.nn.BatchNorm1d):
        return BatchNormAct1d
    if isinstance(module, torch.nn.BatchNorm3d):
        return BatchNormAct3d
    return BatchNormAct2d
