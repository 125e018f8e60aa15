"""What the batch-statistics variants (ghost batch norm, batch renorm) share.

A common base class for layers that keep batch norm's state (``weight``, ``bias``,
``running_mean``, ``running_var``, ``num_batches_tracked``: a BN checkpoint loads into them and
``batchnorm.inference.fold`` / ``recalibrate`` treat them as batch norm), accept any (N, C, *)
input, and differ from batch norm only in training: which statistics normalize, and how the
running statistics follow. Eval mode is batch norm's: the running statistics, through
:func:`batchnorm.primitives.normalize`.

They run on torch operations (:mod:`batchnorm.primitives`), not on the project's Triton kernels:
``kernel = "torch"``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.errors import NormDtypeError
from batchnorm.functional import NONFINITE_POLICIES, check_eps, check_momentum
from batchnorm.layouts import as_torch_output, suggested_format
from batchnorm.nn.batchnorm import check_channels, init_batch_norm_state
from batchnorm.nn.surgery import mark_fx_leaf
from batchnorm.primitives import accumulation_dtype, invstd, normalize, track_running_statistics

__all__ = ["BatchStatisticsVariant", "read_buffer"]


def _snapshot_impl(t: torch.Tensor) -> torch.Tensor:
    return t.clone()


_snapshot: Any = None
if hasattr(torch.library, "custom_op"):
    _snapshot = torch.library.custom_op("batchnorm::snapshot", mutates_args=())(_snapshot_impl)
    _snapshot.register_fake(lambda t: torch.empty_like(t))


def read_buffer(buffer: torch.Tensor) -> torch.Tensor:
    """The value of a buffer that this forward updates in place afterwards, safe to backprop with.

    Under ``torch.compile`` the AOTAutograd partitioner may recompute, in the backward pass,
    values derived from a module buffer, reading the buffer again after the forward's in-place
    update: silently wrong gradients (pytorch/pytorch#197039). Batch renorm's r and d are such
    values. An opaque copy (a custom op, which the partitioner does not recompute) pins the
    value read in the forward. Eager mode and ``torch.export`` read the buffer directly.
    """
    from batchnorm.backends import _exporting

    if _snapshot is not None and torch.compiler.is_compiling() and not _exporting():
        return _snapshot(buffer)
    return buffer


class BatchStatisticsVariant(_BatchNorm):
    """Base of the batch-norm variants: batch norm's state and eval mode, any (N, C, *) input.

    Subclasses implement the training forward. Args as ``torch.nn.BatchNorm2d``.
    """

    kernel = "torch"
    # Why convert_sync_batchnorm leaves the layer alone (and whether it warns about it).
    _no_sync_reason: str | None = "its statistics are per process by design"
    _warn_no_sync = True

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
        nonfinite: str = "propagate",
    ) -> None:
        init_batch_norm_state(
            self, BatchStatisticsVariant, num_features, eps, momentum, affine,
            track_running_stats, device, dtype, bias,
        )  # fmt: skip
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        mark_fx_leaf(self)

    def _check_hyperparameters(self) -> None:
        """``momentum`` and ``eps`` as the constructor checks them, also after a change
        (``layer.momentum = ...``): NaN or a non-number raises before it can poison the state."""
        check_momentum(self.momentum, stacklevel=4)
        check_eps(self.eps)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        check_channels(self, input, any_rank=True)
        if not input.is_floating_point():
            name = type(self).__name__
            raise NormDtypeError(f"{name} expects a floating-point input, got {input.dtype}")

    @staticmethod
    def _per_channel(t: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
        return None if t is None else t.reshape(shape)

    def _normalize_with_running_statistics(self, input: torch.Tensor) -> torch.Tensor:
        """Eval mode: ``y = gamma * (x - E[x]) / sqrt(Var[x] + eps) + beta`` (SPEC.md Sec. 3)."""
        assert self.running_mean is not None and self.running_var is not None
        shape = (1, input.shape[1]) + (1,) * (input.dim() - 2)
        acc = accumulation_dtype(input.dtype)
        mean = self.running_mean.to(acc).reshape(shape)
        inv_std = invstd(self.running_var.to(acc).reshape(shape), self.eps)
        y = normalize(
            input,
            mean,
            inv_std,
            self._per_channel(self.weight, shape),
            self._per_channel(self.bias, shape),
        )
        return as_torch_output(y, suggested_format(input))

    def _track(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        """One moving-average step with the given statistics, and count the batch
        (:func:`batchnorm.primitives.track_running_statistics`, honouring ``nonfinite``)."""
        assert self.running_mean is not None and self.running_var is not None
        track_running_statistics(
            self.running_mean,
            self.running_var,
            self.num_batches_tracked,
            mean,
            unbiased_var,
            self.momentum,
            nonfinite=getattr(self, "nonfinite", "propagate"),
            who=type(self).__name__,
        )

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if getattr(self, "nonfinite", "propagate") != "propagate":
            text += f", nonfinite={self.nonfinite!r}"
        return text

    def _tracking(self) -> bool:
        return self.training and self.track_running_stats and self.running_mean is not None

    @staticmethod
    def _empty_output(
        input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """The output for an empty batch: empty, connected to the parameters (zero gradients)."""
        y = input * 0
        if weight is not None:
            y = y * weight.to(y.dtype)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y
