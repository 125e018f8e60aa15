"""Batch renormalization (Ioffe 2017, arXiv 1702.03275).

Training normalizes with the batch statistics, then corrects towards the moving averages by a
per-channel affine map that is treated as a constant by backpropagation::

    xhat = (x - mu_B) / sigma_B * r + d
    r    = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))
    d    = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))
    y    = gamma * xhat + beta

with ``sigma_B = sqrt(var_B + eps)`` and ``mu``, ``sigma = sqrt(running_var + eps)`` the moving
averages before this batch's update. With ``r = 1, d = 0`` this is batch norm; with the clips open
the training output equals the inference output ``gamma * (x - mu) / sigma + beta``, so models
trained on small or non-i.i.d. batches behave the same at inference. The paper keeps
``r_max = 1, d_max = 0`` for 5000 steps, then relaxes them to ``r_max = 3`` (reached at 40k steps)
and ``d_max = 5`` (at 25k steps); those are the defaults here, ramped linearly.
"""

from __future__ import annotations

from typing import Any

import torch

from batchnorm.functional import check_defined_at_zero_eps
from batchnorm.layouts import as_torch_output, suggested_format
from batchnorm.nn.batch_variant import BatchStatisticsVariant, read_buffer
from batchnorm.nn.surgery import root_trace_error, trace_with_running_statistics
from batchnorm.primitives import normalize_over, variance

__all__ = ["BatchRenorm"]


def _check_number(name: str, value: Any, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
        raise ValueError(f"{name} must be a number >= {minimum}, got {value!r}")
    return float(value)


class BatchRenorm(BatchStatisticsVariant):
    """Batch renormalization: batch norm corrected towards the moving averages by ``r`` and ``d``.

    Training (see the module docstring for the formulas): batch statistics normalize, ``r`` and
    ``d`` (clipped, stop-gradient) correct, then the moving averages are updated as batch norm's
    (``running_var`` holds the unbiased variance, PyTorch's convention, where the paper averages
    ``sigma``). Eval mode uses the moving averages, as batch norm does.

    The clipping limits follow a schedule over training steps (``num_batches_tracked``, the
    training batches seen): ``r_max = 1`` and ``d_max = 0`` (plain batch norm) for
    ``warmup_steps``, then linear ramps reaching ``r_max`` at step ``r_max_reached_at`` and
    ``d_max`` at step ``d_max_reached_at``. :meth:`clip_limits` gives them for any step. The
    schedule is evaluated with tensor operations, without host synchronization.

    Runs on torch operations (:mod:`batchnorm.primitives`), not the project's Triton kernels
    (``kernel = "torch"``).

    Args:
        num_features, eps, momentum, affine, device, dtype, bias: as ``torch.nn.BatchNorm2d``.
        track_running_stats: must be True: renormalization needs the moving averages.
        r_max: Final limit of ``r`` (>= 1; 3 in the paper).
        d_max: Final limit of ``d`` (>= 0; 5 in the paper).
        warmup_steps: Steps of plain batch norm before the ramps start (5000 in the paper).
        r_max_reached_at, d_max_reached_at: Steps at which the ramps end (40k and 25k).

    Shape:
        - Input: (N, C, *). Output: same.

    Example:
        >>> layer = BatchRenorm(3, warmup_steps=100, r_max_reached_at=200, d_max_reached_at=150)
        >>> layer.clip_limits(0), layer.clip_limits(150), layer.clip_limits(10**6)
        ((1.0, 0.0), (2.0, 5.0), (3.0, 5.0))
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        r_max_reached_at: int = 40000,
        d_max_reached_at: int = 25000,
        nonfinite: str = "propagate",
    ) -> None:
        if not track_running_stats:
            raise ValueError(
                "BatchRenorm needs track_running_stats=True: r and d correct the batch statistics "
                "towards the moving averages. For batch statistics only, use BatchNorm2d(..., "
                "track_running_stats=False)."
            )
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
            nonfinite=nonfinite,
        )  # fmt: skip
        self.r_max = _check_number("r_max", r_max, 1.0)
        self.d_max = _check_number("d_max", d_max, 0.0)
        for name, steps in (
            ("warmup_steps", warmup_steps),
            ("r_max_reached_at", r_max_reached_at),
            ("d_max_reached_at", d_max_reached_at),
        ):
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
                raise ValueError(f"{name} must be an int >= 0, got {steps!r}")
        for name, steps in (
            ("r_max_reached_at", r_max_reached_at),
            ("d_max_reached_at", d_max_reached_at),
        ):
            if steps < warmup_steps:
                raise ValueError(
                    f"{name}={steps} comes before the end of the warm-up (warmup_steps="
                    f"{warmup_steps}); the ramp must end after it starts"
                )
        self.warmup_steps = warmup_steps
        self.r_max_reached_at = r_max_reached_at
        self.d_max_reached_at = d_max_reached_at

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, "
            f"warmup_steps={self.warmup_steps}, r_max_reached_at={self.r_max_reached_at}, "
            f"d_max_reached_at={self.d_max_reached_at}"
        )

    def _progress(self, step: torch.Tensor | float, reached_at: int) -> torch.Tensor | float:
        """Fraction of the ramp done at ``step``: 0 during warm-up, 1 from ``reached_at`` on."""
        span = reached_at - self.warmup_steps
        if span == 0:
            return (step >= self.warmup_steps) * 1.0
        ramp = (step - self.warmup_steps) / span
        if isinstance(ramp, torch.Tensor):
            return ramp.clamp(0.0, 1.0)
        return min(max(ramp, 0.0), 1.0)

    def clip_limits(self, step: int) -> tuple[float, float]:
        """``(r_max, d_max)`` in force at training step ``step`` (0-based)."""
        r = 1.0 + (self.r_max - 1.0) * float(self._progress(float(step), self.r_max_reached_at))
        d = self.d_max * float(self._progress(float(step), self.d_max_reached_at))
        return r, d

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if isinstance(input, torch.fx.Proxy):  # torch.fx tracing this layer as the root
            if not self.training:
                return trace_with_running_statistics(self, input)
            raise root_trace_error(self, "r and d clip the batch statistics by the step count")
        self._check_input_dim(input)
        self._check_hyperparameters()
        if not self.training:
            return self._normalize_with_running_statistics(input)
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        ndim, channels = input.dim(), input.shape[1]
        shape = (1, channels) + (1,) * (ndim - 2)
        weight = self._per_channel(self.weight, shape)
        bias = self._per_channel(self.bias, shape)
        if input.numel() == 0:
            return self._empty_output(input, weight, bias)
        if input.numel() // channels <= 1:
            raise ValueError(
                f"BatchRenorm in training needs more than one value per channel, got input shape "
                f"{tuple(input.shape)}: the batch variance of one value is 0. Use a larger batch, "
                "or model.eval() for inference."
            )
        dims = (0, *range(2, ndim))
        if self.eps == 0:
            check_defined_at_zero_eps(input, dims, type(self).__name__, "channel(s)")
        xhat, stats = normalize_over(input, dims, self.eps)
        acc = stats.mean.dtype
        with torch.no_grad():  # r and d are constants for backpropagation
            step = read_buffer(self.num_batches_tracked).to(acc)
            r_limit = 1.0 + (self.r_max - 1.0) * self._progress(step, self.r_max_reached_at)
            d_limit = self.d_max * self._progress(step, self.d_max_reached_at)
            sigma_batch = torch.sqrt(variance(stats) + self.eps)
            mu = read_buffer(self.running_mean).to(acc).reshape(shape)
            sigma = torch.sqrt(read_buffer(self.running_var).to(acc).reshape(shape) + self.eps)
            r = torch.minimum(torch.maximum(sigma_batch / sigma, 1.0 / r_limit), r_limit)
            d = torch.minimum(torch.maximum((stats.mean - mu) / sigma, -d_limit), d_limit)
        y = xhat.to(acc) * r + d
        if weight is not None:
            y = y * weight
        if bias is not None:
            y = y + bias
        self._track(stats.mean, variance(stats, unbiased=True))
        return as_torch_output(y.to(input.dtype), suggested_format(input))
