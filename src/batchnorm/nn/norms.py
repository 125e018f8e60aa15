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
  ``F.group_norm``, ``F.instance_norm``), after this module's input checks; with ``eps=0`` and
  the input's own statistics, ``"auto"`` runs ``"explicit"`` (float64 statistics: torch's
  float32 ones are off by 10-25 % at a spread of 1e-22 and give inf at 1e-24);
- ``"explicit"``: :func:`batchnorm.primitives.normalize_over` on the right view of the input, the
  batch-norm primitives with the paper's backward (tested against the native kernels);
- ``"triton"``: the project's Triton kernels do not cover these norms yet; it warns once and
  runs ``"torch"``.

``layer.last_backend`` tells which ran. Both are twice differentiable (gradient penalties).
Each module checks its arguments when built (``eps`` and ``momentum`` NaN, ``num_groups <= 0``
are refused before they can poison the state) and is bookkeeping around one call of
:func:`batchnorm.functional.layer_norm`, ``group_norm`` or ``instance_norm``.
``LazyInstanceNorm1d/2d/3d`` infer ``num_features`` from the first input, as torch's do.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from batchnorm import backends
from batchnorm.errors import NormInputError, NotATensorError
from batchnorm.functional import (
    check_eps,
    check_momentum,
    check_num_groups,
    group_norm,
    instance_norm,
    layer_norm,
)
from batchnorm.nn.batchnorm import BackendChoice, LazyNormMixin

__all__ = [
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "LazyInstanceNorm1d",
    "LazyInstanceNorm2d",
    "LazyInstanceNorm3d",
]


def _bias_kwarg(cls: type, bias: bool) -> dict[str, bool]:
    """``{"bias": bias}`` where torch's constructor takes the keyword-only ``bias=`` (2.12+)."""
    if "bias" in inspect.signature(cls.__init__).parameters:
        return {"bias": bias}
    if not bias:
        raise TypeError(
            f"this PyTorch ({torch.__version__}) has no bias= argument for {cls.__name__}; "
            "upgrade PyTorch, or set layer.bias = None after building it"
        )
    return {}


class LayerNorm(BackendChoice, torch.nn.LayerNorm):
    """Drop-in ``torch.nn.LayerNorm``: per sample over the last ``len(normalized_shape)`` axes.

    ``y = gamma * (x - mu) / sqrt(var + eps) + beta`` with ``mu``, ``var`` (biased) over the
    trailing axes; ``gamma``, ``beta`` of shape ``normalized_shape``.

    Args: as ``torch.nn.LayerNorm``, plus keyword-only ``backend``. Runs on torch operations
    (``kernel = "torch"``): PyTorch's kernel or the primitives, no Triton kernel yet.

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
        check_eps(eps, allow_negative=True)
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self._set_backend(backend)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles only this branch: torch's forward
            return torch.nn.functional.layer_norm(
                input, self.normalized_shape, self.weight, self.bias, self.eps
            )
        if isinstance(input, torch.fx.Proxy):  # torch.fx tracing this layer as the root
            return torch.nn.functional.layer_norm(
                input, self.normalized_shape, self.weight, self.bias, self.eps
            )
        k = len(self.normalized_shape)
        if not isinstance(input, torch.Tensor):
            raise NotATensorError(f"LayerNorm expects a tensor, got {type(input).__name__}")
        if input.dim() < k or tuple(input.shape[input.dim() - k :]) != tuple(self.normalized_shape):
            raise NormInputError(
                f"LayerNorm{tuple(self.normalized_shape)} normalizes the last {k} axis(es), which "
                f"must have shape {tuple(self.normalized_shape)}, but the input has shape "
                f"{tuple(input.shape)}; build it with normalized_shape={tuple(input.shape[-k:])} "
                "or move the normalized axes to the end"
            )
        y = layer_norm(
            input, self.normalized_shape, self.weight, self.bias, self.eps, backend=self.backend
        )
        self.last_backend = backends.last_backend()
        return y


class GroupNorm(BackendChoice, torch.nn.GroupNorm):
    """Drop-in ``torch.nn.GroupNorm``: per sample over groups of channels and the spatial axes.

    The (N, C, *) input is viewed as (N, G, C/G, S) with S the spatial size; each (n, g) is
    normalized over its ``C/G * S`` values; then ``gamma``, ``beta`` per channel.

    Args: as ``torch.nn.GroupNorm`` (including the keyword-only ``bias``), plus keyword-only
    ``backend``. Runs on torch operations (``kernel = "torch"``).

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
        bias: bool = True,
        backend: str | None = None,
    ) -> None:
        check_num_groups(num_groups, num_channels if isinstance(num_channels, int) else None)
        check_eps(eps, allow_negative=True)
        super().__init__(
            num_groups, num_channels, eps, affine, device, dtype,
            **_bias_kwarg(torch.nn.GroupNorm, bias),
        )  # fmt: skip
        self._set_backend(backend)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles only this branch: torch's forward
            return torch.nn.functional.group_norm(
                input, self.num_groups, self.weight, self.bias, self.eps
            )
        if isinstance(input, torch.fx.Proxy):  # torch.fx tracing this layer as the root
            return torch.nn.functional.group_norm(
                input, self.num_groups, self.weight, self.bias, self.eps
            )
        if not isinstance(input, torch.Tensor):
            raise NotATensorError(f"GroupNorm expects a tensor, got {type(input).__name__}")
        if input.dim() < 2 or input.shape[1] != self.num_channels:
            raise NormInputError(
                f"GroupNorm({self.num_groups}, {self.num_channels}) expects an (N, "
                f"{self.num_channels}, *) input, got shape {tuple(input.shape)}; the channel axis "
                "must be axis 1 and hold num_channels values"
            )
        y = group_norm(
            input, self.num_groups, self.weight, self.bias, self.eps, backend=self.backend
        )
        self.last_backend = backends.last_backend()
        return y


class _InstanceNormMixin(BackendChoice):
    """Instance norm through :func:`batchnorm.functional.instance_norm`; torch's class does the
    input checks."""

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
        bias: bool = True,
        backend: str | None = None,
    ) -> None:
        check_eps(eps, allow_negative=True)
        check_momentum(momentum, stacklevel=4)
        torch_class = next(c for c in type(self).__mro__ if c.__module__.startswith("torch.nn"))
        super().__init__(  # type: ignore[call-arg]
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            **_bias_kwarg(torch_class, bias),
        )  # fmt: skip
        self._set_backend(backend)

    def _apply_instance_norm(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles only this branch: torch's code
            return torch.nn.functional.instance_norm(
                input,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                self.training or not self.track_running_stats,
                self.momentum if self.momentum is not None else 0.0,
                self.eps,
            )
        module: torch.nn.modules.instancenorm._InstanceNorm = self  # type: ignore[assignment]
        use_input_stats = module.training or not module.track_running_stats
        momentum = module.momentum if module.momentum is not None else 0.1  # as torch
        y = instance_norm(
            input,
            module.running_mean,
            module.running_var,
            module.weight,
            module.bias,
            use_input_stats,
            momentum,
            module.eps,
            backend=self.backend,
        )
        self.last_backend = backends.last_backend()
        return y


class InstanceNorm1d(_InstanceNormMixin, torch.nn.InstanceNorm1d):
    """Drop-in ``torch.nn.InstanceNorm1d``: input (N, C, L) or (C, L).

    Per sample and channel over L. Args: as torch (including the keyword-only ``bias``), plus
    keyword-only ``backend``.
    """


class InstanceNorm2d(_InstanceNormMixin, torch.nn.InstanceNorm2d):
    """Drop-in ``torch.nn.InstanceNorm2d``: input (N, C, H, W) or (C, H, W).

    Per sample and channel over (H, W). Args: as torch, plus keyword-only ``backend``. Runs on
    torch operations.

    Example:
        >>> import torch
        >>> x = torch.randn(2, 3, 4, 4)
        >>> torch.allclose(InstanceNorm2d(3)(x), torch.nn.InstanceNorm2d(3)(x), atol=1e-6)
        True
    """


class InstanceNorm3d(_InstanceNormMixin, torch.nn.InstanceNorm3d):
    """Drop-in ``torch.nn.InstanceNorm3d``: input (N, C, D, H, W) or (C, D, H, W).

    Per sample and channel over (D, H, W). Args: as torch, plus keyword-only ``backend``.
    """


class _LazyInstanceNormMixin(LazyNormMixin):
    """Torch's lazy instance norm, becoming this package's class at the first input."""

    _own_options: dict[str, Any] = {}
    _negative_eps_allowed = True


class LazyInstanceNorm1d(_LazyInstanceNormMixin, torch.nn.LazyInstanceNorm1d):
    """Drop-in ``torch.nn.LazyInstanceNorm1d``: becomes :class:`InstanceNorm1d`."""

    cls_to_become = InstanceNorm1d  # type: ignore[assignment]


class LazyInstanceNorm2d(_LazyInstanceNormMixin, torch.nn.LazyInstanceNorm2d):
    """Drop-in ``torch.nn.LazyInstanceNorm2d``: becomes :class:`InstanceNorm2d`."""

    cls_to_become = InstanceNorm2d  # type: ignore[assignment]


class LazyInstanceNorm3d(_LazyInstanceNormMixin, torch.nn.LazyInstanceNorm3d):
    """Drop-in ``torch.nn.LazyInstanceNorm3d``: becomes :class:`InstanceNorm3d`."""

    cls_to_become = InstanceNorm3d  # type: ignore[assignment]
