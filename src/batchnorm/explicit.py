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

from batchnorm.modes import functorch_active
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
        return _in_torch_layout(y, x)
    if running_mean is None or running_var is None:
        raise ValueError("eval-mode batch norm needs running_mean and running_var")
    acc = accumulation_dtype(x.dtype)
    mean = running_mean.to(acc).reshape(per_channel)
    inv_std = invstd(running_var.to(acc).reshape(per_channel), eps)
    return _in_torch_layout(normalize(x, mean, inv_std, w, b), x)


def _suggested_format(x: torch.Tensor) -> torch.memory_format:
    """``x.suggest_memory_format()``: channels-last for 4-D/5-D tensors strided like it, else
    contiguous (the format torch's kernels give their outputs)."""
    if x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        try:
            from torch._prims_common import suggest_memory_format
        except ImportError:  # pragma: no cover - older torch: the dense check
            dense = x.is_contiguous(memory_format=fmt) and not x.is_contiguous()
            return fmt if dense else torch.contiguous_format
        return suggest_memory_format(x)
    return torch.contiguous_format


def _in_torch_layout(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y laid out as torch's kernel lays out its output for x: element-wise ops follow x's
    strides, so a sequence stored (N, L, C) (``x.transpose(1, 2)``) or an odd permutation gave a
    y with x's strides, on which ``y.view(...)`` fails where torch's contiguous y works. A copy
    only for such layouts; none under tracing or torch.func (their layouts are their own)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or functorch_active():
        return y
    fmt = _suggested_format(x)
    return y if y.is_contiguous(memory_format=fmt) else y.contiguous(memory_format=fmt)
