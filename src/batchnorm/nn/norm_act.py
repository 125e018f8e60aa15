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

import inspect
from typing import Any

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


# Activation names accepted by the constructors, as timm's ``create_act_layer`` spells them.
_ACTIVATIONS: dict[str, type[torch.nn.Module]] = {
    "relu": torch.nn.ReLU,
    "relu6": torch.nn.ReLU6,
    "leaky_relu": torch.nn.LeakyReLU,
    "elu": torch.nn.ELU,
    "celu": torch.nn.CELU,
    "selu": torch.nn.SELU,
    "gelu": torch.nn.GELU,
    "silu": torch.nn.SiLU,
    "swish": torch.nn.SiLU,
    "mish": torch.nn.Mish,
    "sigmoid": torch.nn.Sigmoid,
    "tanh": torch.nn.Tanh,
    "hard_sigmoid": torch.nn.Hardsigmoid,
    "hardsigmoid": torch.nn.Hardsigmoid,
    "hard_swish": torch.nn.Hardswish,
    "hardswish": torch.nn.Hardswish,
    "prelu": torch.nn.PReLU,
    "identity": torch.nn.Identity,
}


def make_activation(
    act_layer: Any, inplace: bool = True, act_kwargs: dict[str, Any] | None = None
) -> torch.nn.Module:
    """An activation module from what timm's ``BatchNormAct2d(act_layer=...)`` accepts: a module
    (used as is), a module class or a name from ``_ACTIVATIONS`` (built with ``act_kwargs``, and
    ``inplace`` where the class takes it), or None (identity)."""
    if act_layer is None:
        return torch.nn.Identity()
    if isinstance(act_layer, torch.nn.Module):
        return act_layer
    if isinstance(act_layer, str):
        key = act_layer.lower()
        if key not in _ACTIVATIONS:
            raise ValueError(
                f"unknown activation {act_layer!r}; use one of {', '.join(sorted(_ACTIVATIONS))}, "
                "or pass a torch.nn.Module class or instance as act_layer"
            )
        act_layer = _ACTIVATIONS[key]
    if not callable(act_layer):
        raise TypeError(
            "act_layer must be a torch.nn.Module class or instance, an activation name or None, "
            f"got {type(act_layer).__name__}"
        )
    kwargs = dict(act_kwargs or {})
    try:
        takes_inplace = "inplace" in inspect.signature(act_layer).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        takes_inplace = False
    if takes_inplace:
        kwargs.setdefault("inplace", inplace)
    module = act_layer(**kwargs)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"act_layer built a {type(module).__name__}, not a torch.nn.Module")
    return module


class NormActTail:
    """``act(drop(norm(x)))``: the batch norm of the next class in the MRO, then the tail.

    Built directly, the layer takes the batch norm's arguments and, as keywords, timm's
    ``BatchNormAct2d`` options: ``apply_act`` (False: no activation), ``act_layer`` (a module
    class or instance, or a name such as "relu", "silu", "gelu"; default ReLU), ``act_kwargs``,
    ``inplace`` (passed to activations that take it) and ``drop_layer`` (a module class, built
    without arguments, e.g. a dropout; default none). Conversions keep the original's modules.
    """

    def __init__(
        self,
        *args: Any,
        apply_act: bool = True,
        act_layer: Any = torch.nn.ReLU,
        act_kwargs: dict[str, Any] | None = None,
        inplace: bool = True,
        drop_layer: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        if drop_layer is None:
            drop: torch.nn.Module = torch.nn.Identity()
        elif isinstance(drop_layer, torch.nn.Module):
            drop = drop_layer
        else:
            drop = drop_layer()
        self.drop = drop
        self.act = (
            make_activation(act_layer, inplace, act_kwargs) if apply_act else (torch.nn.Identity())
        )

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
