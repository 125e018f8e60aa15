"""Swap the batch-norm layers of a whole model between torch's classes and the project's.

``convert(model)`` replaces every ``torch.nn.BatchNorm1d/2d/3d`` with the matching
:mod:`batchnorm.nn` class, carrying parameters, buffers (the very same tensors), hyper-parameters,
train/eval mode, ``requires_grad`` flags, every kind of hook and any instance attribute
(:func:`batchnorm.nn.surgery.rebuild_as`); ``convert(model, to="torch")`` is the inverse. Outputs
and gradients are unchanged, because the math and the state are.

A batch norm with its own ``drop`` and ``act`` submodules (timm's ``BatchNormAct2d`` family)
becomes :class:`batchnorm.nn.norm_act.BatchNormAct2d`, which keeps them
(:mod:`batchnorm.nn.norm_act`); ``to="torch"`` gives the original class back. Other subclasses of
torch's batch norm written by users are left as they are, with a warning naming them: swapping
their class would silently drop their behaviour.
"""

from __future__ import annotations

import warnings

import torch

from batchnorm import backends
from batchnorm.functional import NONFINITE_POLICIES
from batchnorm.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormMixin
from batchnorm.nn.norm_act import NormActTail, is_norm_act, norm_act_class_for
from batchnorm.nn.surgery import rebuild_layer, replace_modules
from batchnorm.nn.sync import SyncBatchNorm

_TORCH_TO_OURS: dict[type, type] = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}
_OURS_TO_TORCH: dict[type, type] = {v: k for k, v in _TORCH_TO_OURS.items()}

__all__ = ["convert"]


def convert(
    model: torch.nn.Module,
    to: str = "batchnorm",
    *,
    backend: str | None = None,
    nonfinite: str = "propagate",
) -> torch.nn.Module:
    """Replace the batch-norm layers of ``model`` (in place) and return the model.

    Args:
        model: any module; if it is itself a batch-norm layer, the replacement is returned.
        to: "batchnorm" (torch's classes -> the project's) or "torch" (the inverse).
        backend, nonfinite: set on each converted layer (``to="batchnorm"`` only).

    Returns:
        The model with its layers swapped (the same object unless the root itself was swapped).
    """
    if to not in ("batchnorm", "torch"):
        raise ValueError(f"to must be 'batchnorm' or 'torch', got {to!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    mapping = _TORCH_TO_OURS if to == "batchnorm" else _OURS_TO_TORCH
    skipped: list[str] = []

    def swap(name: str, module: torch.nn.Module) -> torch.nn.Module:
        target = mapping.get(type(module))
        if target is None and to == "batchnorm" and is_norm_act(module):
            if isinstance(module, NormActTail):  # already ours
                return module
            new = _rebuild(module, norm_act_class_for(module), backend, nonfinite)
            new.__dict__["_converted_from"] = type(module)
            return new
        if target is None and to == "torch" and isinstance(module, NormActTail):
            original = module.__dict__.get("_converted_from")
            if original is not None and not isinstance(module, SyncBatchNorm):
                new = _rebuild(module, original, None, "propagate")
                new.__dict__.pop("_converted_from", None)
                return new
        if target is None:
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(
                module, tuple(mapping.values())
            ):
                skipped.append(f"{name or '<root>'} ({type(module).__name__})")
            return module
        return _rebuild(module, target, backend, nonfinite)

    root = replace_modules(model, swap)
    if skipped:
        warnings.warn(
            "convert left these batch-norm subclasses unchanged, since swapping their class would "
            f"drop their own behaviour: {', '.join(skipped)}",
            UserWarning,
            stacklevel=2,
        )
    return root


def _rebuild(
    module: torch.nn.Module, target: type, backend: str | None, nonfinite: str
) -> torch.nn.Module:
    if issubclass(target, BatchNormMixin):  # torch's class -> ours
        if backend is not None:
            backends.requested_backend(backend)
        return rebuild_layer(module, target, ours=True, backend=backend, nonfinite=nonfinite)
    return rebuild_layer(module, target, ours=False)
