"""Internal covariate shift as an optimization quantity (Santurkar et al. 2018, Definition 2.1).

Santurkar, Tsipras, Ilyas, Madry, arXiv 1805.11604, Section 2.2 (SPEC.md section 4.2): for a
network with layer weights W_1 .. W_k, a batch (x_t, y_t), a loss L and the SGD step of step t,
the internal covariate shift of layer i is the difference between

    G_(t,i)  = grad_(W_i) L(W_1^t, ..., W_k^t; x_t, y_t)
    G'_(t,i) = grad_(W_i) L(W_1^(t+1), ..., W_(i-1)^(t+1), W_i^t, ..., W_k^t; x_t, y_t)

where ``W_j^(t+1) = W_j^t - lr * G_(t,j)`` is the step-t SGD update of layer j: G' is the gradient
layer i would see if the layers below it had already moved. Reported per layer:
``||G - G'||_2`` (the l2 norm of the flattened difference, i.e. the Frobenius norm for a matrix)
and ``cos(G, G') = <G, G'> / (||G|| ||G'||)``.

A "layer" here is a group of tensors (W_i alone, or W_i with its bias or BN gamma/beta): G_i is
the gradient with respect to all of them, concatenated, and the update of the layers below moves
all of their tensors. For layer 1, G' = G by definition.

The probe leaves no trace: parameters, the module's buffers (batch-norm running statistics,
``num_batches_tracked``) and the parameters' ``.grad`` are exactly as before. The loss function
must be deterministic (same batch; no dropout, or dropout with a fixed seed inside ``loss_fn``).

Example:
    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
    >>> loss_fn = lambda: ((net(x) - y) ** 2).mean()
    >>> shifts = internal_covariate_shift([net[0].weight, net[2].weight], loss_fn, lr=0.1)
    >>> shifts[0].l2_difference, round(shifts[0].cosine, 12)  # layer 1 has no layers below
    (0.0, 1.0)
    >>> shifts[1].l2_difference > 0
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from batchnorm.lab.theory._state import SavedState, flatten_groups

__all__ = ["LayerShift", "internal_covariate_shift"]


@dataclass(frozen=True)
class LayerShift:
    """The covariate shift of one layer at one step.

    Attributes:
        layer: 1-based index of the layer (1 = nearest the input).
        l2_difference: ``||G - G'||_2``.
        cosine: ``cos(G, G')`` (nan if either gradient is zero).
        grad_norm: ``||G||_2``.
        shifted_grad_norm: ``||G'||_2``.
    """

    layer: int
    l2_difference: float
    cosine: float
    grad_norm: float
    shifted_grad_norm: float


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])


def _compare(layer: int, g: torch.Tensor, g_shifted: torch.Tensor) -> LayerShift:
    norm = float(g.norm())
    norm_shifted = float(g_shifted.norm())
    cosine = (
        float(torch.dot(g, g_shifted)) / (norm * norm_shifted)
        if norm > 0 and norm_shifted > 0
        else math.nan
    )
    return LayerShift(
        layer=layer,
        l2_difference=float((g - g_shifted).norm()),
        cosine=cosine,
        grad_norm=norm,
        shifted_grad_norm=norm_shifted,
    )


def internal_covariate_shift(
    layers: Sequence[torch.Tensor | Sequence[torch.Tensor]],
    loss_fn: Callable[[], torch.Tensor],
    lr: float,
    *,
    module: torch.nn.Module | None = None,
) -> list[LayerShift]:
    """Measure ``||G_i - G'_i||_2`` and ``cos(G_i, G'_i)`` for every layer (Definition 2.1).

    Args:
        layers: parameter groups in forward order (layer 1 first); each a tensor (W_i) or a
            sequence of tensors updated together.
        loss_fn: computes the loss on the fixed batch with the model's current parameters.
        lr: the SGD step size of the step being measured (> 0).
        module: the model, if it has buffers (batch-norm running statistics) that ``loss_fn``
            changes: they are restored afterwards. Parameters are always restored.

    Returns:
        One :class:`LayerShift` per layer, in order.
    """
    groups = flatten_groups(layers)
    if (
        isinstance(lr, bool)
        or not isinstance(lr, (int, float))
        or not (lr > 0 and math.isfinite(lr))
    ):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    all_params = [t for group in groups for t in group]
    saved = SavedState(all_params, module)
    try:
        grads = torch.autograd.grad(loss_fn(), all_params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(all_params, grads)]
        per_group: list[list[torch.Tensor]] = []
        start = 0
        for group in groups:
            per_group.append(list(grads[start : start + len(group)]))
            start += len(group)
        g_first = _flat(per_group[0])
        results = [_compare(1, g_first, g_first)]
        for i in range(1, len(groups)):
            # Layers 1..i-1 have taken their step; layer i-1 is the one added this round.
            with torch.no_grad():
                for p, g in zip(groups[i - 1], per_group[i - 1]):
                    p.sub_(lr * g)
            saved.restore(buffers_only=True)
            shifted = torch.autograd.grad(loss_fn(), groups[i], allow_unused=True)
            shifted = [torch.zeros_like(p) if g is None else g for p, g in zip(groups[i], shifted)]
            results.append(_compare(i + 1, _flat(per_group[i]), _flat(shifted)))
    finally:
        saved.restore()
    return results
