"""Ghost batch norm (Hoffer, Hubara, Soudry 2017, arXiv 1705.08741).

A large batch is split into "ghost" (virtual) batches of ``virtual_batch_size`` samples, each
normalized with its own statistics, as if the network had been trained with small batches: the
generalization of small-batch training (the noise of per-batch statistics) with the throughput of
large batches. The paper uses ghost batches of 128.
"""

from __future__ import annotations

from typing import Any

import torch

from batchnorm.functional import _native_batch_norm, check_defined_at_zero_eps
from batchnorm.layouts import as_torch_output, suggested_format, vmapping
from batchnorm.nn.batch_variant import BatchStatisticsVariant
from batchnorm.nn.batchnorm import BackendChoice
from batchnorm.nn.surgery import root_trace_error, trace_with_running_statistics
from batchnorm.primitives import Moments, accumulation_dtype, normalize_over

__all__ = ["GhostBatchNorm"]


class GhostBatchNorm(BackendChoice, BatchStatisticsVariant):
    """Batch norm over ghost batches of ``virtual_batch_size`` samples of an (N, C, *) batch.

    In training, samples ``[g * B, (g + 1) * B)`` with ``B = virtual_batch_size`` form ghost batch
    ``g``, normalized by Algorithm 1 with its own ``mu_g``, ``var_g`` (per channel, over the
    ghost batch and the spatial axes); when ``B`` does not divide ``N`` the last ghost batch holds
    the ``N mod B`` remaining samples. With ``B >= N`` this is batch norm.

    Running statistics (one moving-average step per forward, like batch norm, so ``momentum``
    means the same): the count-weighted mean of the ghost-batch means, and the pooled unbiased
    within-ghost-batch variance, Algorithm 2 with the ghost batches as its mini-batches::

        mean = sum_g m_g mu_g / sum_g m_g
        var  = sum_g m_g var_g / sum_g (m_g - 1)

    Inference (eval mode) uses them exactly as batch norm does. Taking the variance within ghost
    batches (not over the whole batch) matches what training normalizes with; the two agree in
    expectation when the ghost batches are random samples. With one ghost batch, every number
    (output, gradients, running statistics) equals batch norm's.

    Not on the project's Triton kernels (``kernel = "torch"``): by default each ghost batch goes
    through PyTorch's native batch-norm kernel (its statistics land in private buffers, momentum
    1, and are pooled as above); ``backend="explicit"`` normalizes all ghost batches at once with
    :func:`batchnorm.primitives.normalize_over` instead (the same numbers to rounding).

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, bias: as
            ``torch.nn.BatchNorm2d``.
        virtual_batch_size: Samples per ghost batch (keyword-only), >= 1.
        backend: ``"auto"``/``"torch"`` (native kernel per ghost batch) or ``"explicit"``
            (keyword-only; see :class:`batchnorm.nn.batchnorm.BackendChoice`).

    Shape:
        - Input: (N, C, *). Output: same.

    Example:
        >>> import torch
        >>> ghost = GhostBatchNorm(2, virtual_batch_size=4)
        >>> x = torch.randn(8, 2)
        >>> y = ghost(x)
        >>> torch.allclose(y[:4].mean(0), torch.zeros(2), atol=1e-6)  # each ghost batch centred
        True
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
        virtual_batch_size: int = 128,
        backend: str | None = None,
        nonfinite: str = "propagate",
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
            nonfinite=nonfinite,
        )  # fmt: skip
        if (
            isinstance(virtual_batch_size, bool)
            or not isinstance(virtual_batch_size, int)
            or virtual_batch_size < 1
        ):
            raise ValueError(
                f"virtual_batch_size must be a positive int (samples per ghost batch), got "
                f"{virtual_batch_size!r}"
            )
        self.virtual_batch_size = virtual_batch_size
        self._set_backend(backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if isinstance(input, torch.fx.Proxy):  # torch.fx tracing this layer as the root
            if not self.training and self.running_mean is not None:
                return trace_with_running_statistics(self, input)
            raise root_trace_error(self, "its ghost batches depend on the batch size")
        self._check_input_dim(input)
        self._check_hyperparameters()
        if not self.training and self.running_mean is not None:
            return self._normalize_with_running_statistics(input)
        n, ndim = input.shape[0], input.dim()
        shape = (1, 1, input.shape[1]) + (1,) * (ndim - 2)  # broadcasts on (G, B, C, *)
        weight = self._per_channel(self.weight, shape)
        bias = self._per_channel(self.bias, shape)
        if input.numel() == 0:
            per_channel = (1, input.shape[1]) + (1,) * (ndim - 2)
            return self._empty_output(
                input,
                self._per_channel(self.weight, per_channel),
                self._per_channel(self.bias, per_channel),
            )
        size = min(self.virtual_batch_size, n)
        full = (n // size) * size
        per_sample = input[0, 0].numel()
        for samples in (size, n - full):
            if 0 < samples and samples * per_sample <= 1:
                raise ValueError(
                    f"{type(self).__name__}: a ghost batch of {samples} sample(s) of shape "
                    f"{tuple(input.shape[1:])} has one value per channel (batch of {n}, "
                    f"virtual_batch_size={self.virtual_batch_size}), so its variance is 0 and its "
                    "output constant. Use a virtual_batch_size that divides the batch size, a "
                    "larger one, or drop the last incomplete batch of the loader (drop_last=True)."
                )
        if self._native(input):
            if not (self._tracking() and vmapping()):
                return self._ghost_batches_native(input, size)
            # Under vmap the kernel cannot write a ghost batch's statistics into fresh unbatched
            # tensors; the primitives take them (the same numbers to rounding).
            self.last_backend = "explicit"
        dims = (1, *range(3, ndim + 1))  # the samples of a ghost batch and the spatial axes
        outputs: list[torch.Tensor] = []
        parts: list[Moments] = []
        # split, not slices: its backward is a cat, so dx keeps the layout of the parts' gradients
        for index, part in enumerate((input,) if full == n else input.split([full, n - full])):
            samples = part.shape[0]
            groups = samples // size if index == 0 else 1
            chunk = part.reshape(groups, samples // groups, *input.shape[1:])
            if self.eps == 0:
                check_defined_at_zero_eps(
                    chunk, dims, type(self).__name__, "(ghost batch, channel) pair(s)"
                )
            y, stats = normalize_over(chunk, dims, self.eps, weight, bias)  # stats (G,1,C,1..)
            outputs.append(y.reshape(samples, *input.shape[1:]))
            parts.append(stats)
        if self._tracking():
            count = torch.cat([p.count for p in parts])
            channel_sums = (0, 1, *range(3, ndim + 1))  # all but the channel axis 2
            total = count.sum(channel_sums)
            mean = (count * torch.cat([p.mean for p in parts])).sum(channel_sums) / total
            pooled_var = torch.cat([p.m2 for p in parts]).sum(channel_sums) / (
                (count - 1).sum(channel_sums)
            )
            self._track(mean, pooled_var)
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return as_torch_output(y, suggested_format(input))

    def _ghost_batches_native(self, input: torch.Tensor, size: int) -> torch.Tensor:
        """PyTorch's batch-norm kernel on each ghost batch, statistics pooled for tracking."""
        channels = input.shape[1]
        per_sample = input[0, 0].numel()
        tracking = self._tracking()
        stats_dtype = (
            self.running_mean.dtype
            if self.running_mean is not None
            else accumulation_dtype(input.dtype)
        )
        outputs, counts, means, variances = [], [], [], []
        for chunk in input.split(size):  # its backward a cat: dx in the chunks' layout
            mean = var = None
            if tracking:  # the kernel writes this ghost batch's mean and unbiased variance here
                mean = torch.zeros(channels, dtype=stats_dtype, device=input.device)
                var = torch.ones(channels, dtype=stats_dtype, device=input.device)
            outputs.append(
                _native_batch_norm(chunk, mean, var, self.weight, self.bias, True, 1.0, self.eps)
            )
            if tracking:
                counts.append(chunk.shape[0] * per_sample)
                means.append(mean)
                variances.append(var)
        if tracking:
            with torch.no_grad():
                m = torch.tensor(counts, dtype=torch.float64, device=input.device)[:, None]
                mean = (m * torch.stack(means).double()).sum(0) / m.sum()
                pooled = ((m - 1) * torch.stack(variances).double()).sum(0) / (m - 1).sum()
            self._track(mean, pooled)
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return as_torch_output(y, suggested_format(input))
