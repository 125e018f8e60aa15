"""Swap the batch-norm layers of a whole model between torch's classes and the project's.

``convert(model)`` replaces every ``torch.nn.BatchNorm1d/2d/3d`` with the matching
:mod:`batchnorm.nn` class, carrying parameters, buffers (the very same tensors), hyper-parameters,
train/eval mode, ``requires_grad`` flags and forward hooks; ``convert(model, to="torch")`` is the
inverse. Outputs and gradients are unchanged, because the math and the state are.

Subclasses of torch's batch norm written by users (a layer with a fused activation, say) are left
as they are, with a warning naming them: swapping their class would silently drop their behaviour.
"""

from __future__ import annotations

import warnings

import torch

from batchnorm.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

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
    mapping = _TORCH_TO_OURS if to == "batchnorm" else _OURS_TO_TORCH
    skipped: list[str] = []

    def swap(name: str, module: torch.nn.Module) -> torch.nn.Module:
        target = mapping.get(type(module))
        if target is None:
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(
                module, tuple(mapping.values())
            ):
                skipped.append(f"{name or '<root>'} ({type(module).__name__})")
            return module
        return _rebuild(module, target, backend, nonfinite)

    root = swap("", model)
    for parent_name, parent in list(root.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            new = swap(full, child)
            if new is not child:
                setattr(parent, child_name, new)
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
    kwargs = {"backend": backend, "nonfinite": nonfinite} if target in _OURS_TO_TORCH else {}
    ref = module.running_mean if module.running_mean is not None else module.weight
    new = target(
        module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        device=ref.device if ref is not None else None,
        dtype=ref.dtype if ref is not None else None,
        **kwargs,
    )
    # Share the very same parameter and buffer objects: optimizers holding them keep working.
    if module.affine:
        new.weight = module.weight
        new.bias = module.bias  # may be None: torch's affine=True, bias=False
    for buffer in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(new, buffer, getattr(module, buffer))
    new.train(module.training)
    new._forward_hooks.update(module._forward_hooks)
    new._forward_pre_hooks.update(module._forward_pre_hooks)
    new._backward_hooks.update(module._backward_hooks)
    return new
