"""Layer, instance and group normalization on the batch-norm primitives.

The same transform as batch norm, ``y = gamma * (x - mu) / sqrt(var + eps) + beta``, with the
statistics taken per sample over other axes, so nothing depends on the batch (SPEC.md Sec. 4.5):

- :class:`LayerNorm`: per sample, over the trailing ``normalized_shape`` axes (Ba et al. 2016);
  ``gamma``, ``beta`` per element of ``normalized_shape``.
- :class:`InstanceNorm1d` / ``2d`` / ``3d``: per sample and channel, over the spatial axes
  (Ulyanov et al. 2016); optional running statistics as torch keeps them.
- :class:`GroupNorm`: per sample, over groups of ``C / G`` channels and the spatial axes (Wu & He
  2018); ``gamma``, ``beta`` per channel. One group is layer norm over (C, *); C groups is
  instance norm.

Each subclasses its torch counterpart (same signature plus a keyword-only ``backend``; same
parameters, ``state_dict`` keys, ``repr``; checkpoints load both ways). ``backend`` chooses the
implementation as for batch norm (argument, :func:`batchnorm.backends.use_backend`,
``BATCHNORM_BACKEND``):

- ``"auto"`` (default) or ``"torch"``: PyTorch's native kernel (``F.layer_norm``,
  ``F.group_norm``, ``F.instance_norm``), after this module's input checks;
- ``"explicit"``: :func:`batchnorm.primitives.normalize_over` on the right view of the input, the
  batch-norm primitives with the paper's backward (tested against the native kernels);
- ``"triton"``: the project's Triton kernels do not cover these norms yet; it warns once and
  runs ``"torch"``.

``layer.last_backend`` tells which ran. Both are twice differentiable (gradient penalties).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from batchnorm.nn.batchnorm import BackendChoice
from batchnorm.primitives import (
    accumulation_dtype,
    invstd,
    normalize,
    normalize_over,
    update_running_statistics,
    variance,
)

__all__ = ["GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LayerNorm"]


class LayerNorm(BackendChoice, torch.nn.LayerNorm):
    """Drop-in ``torch.nn.LayerNorm``: per sample over the last ``len(normalized_shape)`` axes.

    ``y = gamma * (x - mu) / sqrt(var + eps) + beta`` with ``mu``, ``var`` (biased) over the
    trailing axes; ``gamma``, ``beta`` of shape ``normalized_shape``.

    Args: as ``torch.nn.LayerNorm``. Runs on torch operations (``kernel = "torch"``).

    Shape:
        - Input: (*, *normalized_shape). Output: same.

    Example:
        >>> import torch
        >>> ln = LayerNorm(4)
        >>> y = ln(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
        >>> torch.allclose(y, torch.nn.functional.layer_norm(y, (4,)), atol=1e-6)
        True
    """

    def __init__(
        self,
        normalized_shape: Any,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self._set_backend(backend)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        k = len(self.normalized_shape)
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"LayerNorm expects a tensor, got {type(input).__name__}")
        if input.dim() < k or tuple(input.shape[input.dim() - k :]) != tuple(self.normalized_shape):
            raise ValueError(
                f"LayerNorm{tuple(self.normalized_shape)} normalizes the last {k} axis(es), which "
                f"must have shape {tuple(self.normalized_shape)}, but the input has shape "
                f"{tuple(input.shape)}; build it with normalized_shape={tuple(input.shape[-k:])} "
                "or move the normalized axes to the end"
            )
        if self._native():
            return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        dims = tuple(range(input.dim() - k, input.dim()))
        y, _ = normalize_over(input, dims, self.eps, self.weight, self.bias)
        return y


class GroupNorm(BackendChoice, torch.nn.GroupNorm):
    """Drop-in ``torch.nn.GroupNorm``: per sample over groups of channels and the spatial axes.

    The (N, C, *) input is viewed as (N, G, C/G, S) with S the spatial size; each (n, g) is
    normalized over its ``C/G * S`` values; then ``gamma``, ``beta`` per channel.

    Args: as ``torch.nn.GroupNorm``. Runs on torch operations (``kernel = "torch"``).

    Shape:
        - Input: (N, C, *). Output: same.

    Example:
        >>> import torch
        >>> gn = GroupNorm(2, 4)
        >>> x = torch.randn(3, 4, 5)
        >>> torch.allclose(gn(x), torch.nn.functional.group_norm(x, 2), atol=1e-6)
        True
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__(num_groups, num_channels, eps, affine, device, dtype)
        self._set_backend(backend)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"GroupNorm expects a tensor, got {type(input).__name__}")
        if input.dim() < 2 or input.shape[1] != self.num_channels:
            raise ValueError(
                f"GroupNorm({self.num_groups}, {self.num_channels}) expects an (N, "
                f"{self.num_channels}, *) input, got shape {tuple(input.shape)}; the channel axis "
                "must be axis 1 and hold num_channels values"
            )
        if self._native():
            return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)
        n, c, groups = input.shape[0], input.shape[1], self.num_groups
        spatial = math.prod(input.shape[2:])
        grouped = input.reshape(n, groups, c // groups, spatial)  # (N, G, C/G, S)
        shape = (1, groups, c // groups, 1)  # gamma, beta per channel on that view
        weight = None if self.weight is None else self.weight.reshape(shape)
        bias = None if self.bias is None else self.bias.reshape(shape)
        y, _ = normalize_over(grouped, (2, 3), self.eps, weight, bias)
        return y.reshape(input.shape)


class _InstanceNormMixin(BackendChoice):
    """The instance-norm computation on the primitives; torch's class does the input checks."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device: Any = None,
        dtype: Any = None,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__(  # type: ignore[call-arg]
            num_features, eps, momentum, affine, track_running_stats, device, dtype
        )
        self._set_backend(backend)

    def _apply_instance_norm(self, input: torch.Tensor) -> torch.Tensor:
        module: torch.nn.modules.instancenorm._InstanceNorm = self  # type: ignore[assignment]
        ndim, channels = input.dim(), input.shape[1]
        use_input_stats = module.training or not module.track_running_stats
        if use_input_stats and math.prod(input.shape[2:]) <= 1:
            raise ValueError(
                f"{type(self).__name__} normalizes each sample and channel over its spatial axes, "
                f"so it needs more than one spatial element; got input shape "
                f"{tuple(input.shape)}. For (N, C) features use LayerNorm or BatchNorm1d."
            )
        if self._native():
            return super()._apply_instance_norm(input)  # type: ignore[misc]
        shape = (1, channels) + (1,) * (ndim - 2)
        weight = None if module.weight is None else module.weight.reshape(shape)
        bias = None if module.bias is None else module.bias.reshape(shape)
        if not use_input_stats:
            assert module.running_mean is not None and module.running_var is not None
            acc = accumulation_dtype(input.dtype)
            mean = module.running_mean.to(acc).reshape(shape)
            inv_std = invstd(module.running_var.to(acc).reshape(shape), module.eps)
            return normalize(input, mean, inv_std, weight, bias)
        y, stats = normalize_over(input, tuple(range(2, ndim)), module.eps, weight, bias)
        if module.training and module.track_running_stats and module.running_mean is not None:
            assert module.running_var is not None
            # As torch: the batch average of the per-instance means and unbiased variances.
            momentum = module.momentum if module.momentum is not None else 0.0
            update_running_statistics(
                module.running_mean,
                module.running_var,
                stats.mean.mean(0),
                variance(stats, unbiased=True).mean(0),
                momentum,
            )
        return y


class InstanceNorm1d(_InstanceNormMixin, torch.nn.InstanceNorm1d):
    """Drop-in ``torch.nn.InstanceNorm1d``: input (N, C, L) or (C, L).

    Per sample and channel over L. Args: as torch. Runs on torch operations.
    """


class InstanceNorm2d(_InstanceNormMixin, torch.nn.InstanceNorm2d):
    """Drop-in ``torch.nn.InstanceNorm2d``: input (N, C, H, W) or (C, H, W).

    Per sample and channel over (H, W). Args: as torch. Runs on torch operations.

    Example:
        >>> import torch
        >>> x = torch.randn(2, 3, 4, 4)
        >>> torch.allclose(InstanceNorm2d(3)(x), torch.nn.InstanceNorm2d(3)(x), atol=1e-6)
        True
    """


class InstanceNorm3d(_InstanceNormMixin, torch.nn.InstanceNorm3d):
    """Drop-in ``torch.nn.InstanceNorm3d``: input (N, C, D, H, W) or (C, D, H, W).

    Per sample and channel over (D, H, W). Args: as torch. Runs on torch operations.
    """
