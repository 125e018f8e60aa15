"""The ``"explicit"`` backend: batch norm on the shared primitives (:mod:`batchnorm.primitives`).

One implementation for every norm: the same :func:`batchnorm.primitives.normalize_over` that
layer, group, instance, ghost and sync batch norm run, in plain torch ops with the backward
written out (the closed form of the paper's chain rule, SPEC.md Sec. 2), so every step can be
read and checked against :mod:`batchnorm.reference`. It is not fast; it is there to check the
fast paths (``batchnorm check``), as a fallback (``eps=0`` in training, which PyTorch's kernel
refuses and where float32 statistics would round a tiny variance to 0: the statistics are then
float64, :func:`batchnorm.primitives.statistics_dtype`), and for second derivatives that any
backend must match.

Training forward (Algorithm 1), per channel over the m = N * prod(spatial) values::

    mu_B = mean(x);  var_B = mean((x - mu_B)^2)        # stable: no E[x^2] - E[x]^2
    xhat = (x - mu_B) / sqrt(var_B + eps);  y = gamma * xhat + beta

and the running statistics move by PyTorch's momentum with the unbiased ``var_B * m / (m - 1)``.
Eval: the running statistics replace the batch ones (:func:`batchnorm.primitives.normalize`).
Half-precision inputs are computed in float32 and the output cast back.
"""

from __future__ import annotations

import torch

from batchnorm.layouts import as_torch_output, suggested_format
from batchnorm.primitives import (
    accumulation_dtype,
    invstd,
    normalize,
    normalize_over,
    update_running_statistics,
    variance,
)

__all__ = ["batch_norm"]


def batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """Same contract as ``torch.nn.functional.batch_norm`` with a float momentum.

    In training the running statistics (if given) are updated in place with the unbiased batch
    variance, PyTorch's convention: running = (1 - momentum) * running + momentum * batch.

    Shape:
        x: (N, C) or (N, C, *); running statistics, weight, bias: (C,).
    """
    per_channel = (1, x.shape[1]) + (1,) * (x.dim() - 2)  # broadcasts on (N, C, *)
    w = None if weight is None else weight.reshape(per_channel)
    b = None if bias is None else bias.reshape(per_channel)
    if training:
        y, stats = normalize_over(x, (0, *range(2, x.dim())), eps, w, b)
        if running_mean is not None and running_var is not None:
            update_running_statistics(
                running_mean, running_var, stats.mean, variance(stats, unbiased=True), momentum
            )
        return as_torch_output(y, suggested_format(x))
    if running_mean is None or running_var is None:
        raise ValueError("eval-mode batch norm needs running_mean and running_var")
    acc = accumulation_dtype(x.dtype)
    mean = running_mean.to(acc).reshape(per_channel)
    inv_std = invstd(running_var.to(acc).reshape(per_channel), eps)
    return as_torch_output(normalize(x, mean, inv_std, w, b), suggested_format(x))
