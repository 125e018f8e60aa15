"""Frozen batch norm: fixed statistics and affine parameters that training cannot change.

Used when fine-tuning with batches too small for useful batch statistics (detection,
segmentation): a pretrained network's batch-norm layers become the fixed affine map of inference
(SPEC.md Sec. 3)::

    y = gamma * (x - E[x]) / sqrt(Var[x] + eps) + beta

whatever the mode. Unlike setting ``bn.eval()`` by hand, ``model.train()`` does not undo it, and
``gamma``, ``beta`` are buffers, not parameters, so no optimizer or weight decay touches them.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.nn.batch_variant import BatchStatisticsVariant
from batchnorm.nn.norm_act import NormActTail, is_norm_act
from batchnorm.nn.surgery import replace_modules, trace_with_running_statistics

__all__ = ["FrozenBatchNorm", "FrozenBatchNormAct", "unfreeze_batchnorm"]


class FrozenBatchNorm(BatchStatisticsVariant):
    """Batch norm frozen in its inference form, for (N, C, *) inputs.

    State: the buffers ``weight``, ``bias``, ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` under the same ``state_dict`` keys as ``torch.nn.BatchNorm2d``, so a
    batch-norm checkpoint loads as it is (``load_state_dict``), and :meth:`from_batchnorm` copies
    a layer. It stays in eval mode under ``model.train()`` (``training`` is always False), so
    ``batchnorm.inference.recalibrate`` leaves it alone, and ``batchnorm.inference.fold`` folds it
    into a preceding Linear or convolution like any eval-mode batch norm.

    The output and the input gradient (``dl/dx = dl/dy * gamma / sqrt(Var[x] + eps)``) equal an
    eval-mode batch norm's with the same state. Computed in float32 at least (float16 inputs
    included), and ``eps`` must be > 0, so a channel with zero variance gives no Inf/NaN.

    Runs on torch operations (:mod:`batchnorm.primitives`), not the project's Triton kernels
    (``kernel = "torch"``).

    Args:
        num_features: C, the channels (axis 1).
        eps: Added to the variance, > 0.
        device, dtype: Of the buffers.

    Shape:
        - Input: (N, C, *). Output: same.

    Example:
        >>> import torch
        >>> bn = torch.nn.BatchNorm2d(3)
        >>> _ = bn(torch.randn(8, 3, 4, 4) * 2 + 1)  # running statistics move
        >>> frozen = FrozenBatchNorm.from_batchnorm(bn)
        >>> frozen.train().training, len(list(frozen.parameters()))
        (False, 0)
        >>> x = torch.randn(2, 3, 4, 4)
        >>> torch.allclose(frozen(x), bn.eval()(x), atol=1e-6)
        True
    """

    _no_sync_reason = "fixed statistics, nothing to synchronize"
    _warn_no_sync = False

    def __init__(
        self, num_features: int, eps: float = 1e-5, device: Any = None, dtype: Any = None
    ) -> None:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(
                f"FrozenBatchNorm needs eps > 0, got {eps!r}: with eps = 0 a channel whose "
                "running variance is 0 divides by zero (Inf/NaN, in float16 especially). "
                "Use eps=1e-5 (torch's default) or the eps the network was trained with."
            )
        super().__init__(num_features, eps, 0.0, True, True, device, dtype)
        # gamma and beta as buffers: frozen, invisible to optimizers; same state_dict keys, in
        # batch norm's order.
        state = {name: self._parameters.pop(name).detach() for name in ("weight", "bias")}
        state.update(self._buffers)
        self._buffers.clear()
        for name, value in state.items():
            self.register_buffer(name, value)
        self.training = False

    def train(self, mode: bool = True) -> FrozenBatchNorm:
        """Stays in eval mode whatever ``mode`` is: the layer is frozen."""
        return super().train(False)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if isinstance(input, torch.fx.Proxy):  # torch.fx tracing this layer as the root
            return trace_with_running_statistics(self, input)
        self._check_input_dim(input)
        return self._normalize_with_running_statistics(input)

    @classmethod
    def from_batchnorm(cls, bn: torch.nn.Module) -> FrozenBatchNorm:
        """A frozen copy of a batch-norm layer's running statistics and affine parameters.

        Args:
            bn: Any ``torch.nn.modules.batchnorm._BatchNorm`` with running statistics.

        Raises:
            ValueError: ``bn`` keeps no running statistics (``track_running_stats=False``).
        """
        if not isinstance(bn, _BatchNorm):
            raise TypeError(f"from_batchnorm expects a batch-norm layer, got {type(bn).__name__}")
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(
                f"cannot freeze {type(bn).__name__}: it keeps no running statistics "
                "(track_running_stats=False), so there is nothing to freeze"
            )
        eps = bn.eps
        if not eps > 0:
            warnings.warn(
                f"{type(bn).__name__} has eps={eps}; the frozen copy uses eps=1e-5 instead",
                UserWarning,
                stacklevel=2,
            )
            eps = 1e-5
        ref = bn.running_mean
        frozen = cls(bn.num_features, eps=eps, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
            if bn.weight is not None:
                frozen.weight.copy_(bn.weight)
            if bn.bias is not None:
                frozen.bias.copy_(bn.bias)
            if bn.num_batches_tracked is not None:
                frozen.num_batches_tracked.copy_(bn.num_batches_tracked)
        return frozen

    @classmethod
    def convert_frozen_batchnorm(cls, module: torch.nn.Module) -> torch.nn.Module:
        """Replace every batch-norm layer of ``module`` that has running statistics by a frozen
        copy (:meth:`from_batchnorm`); returns the model (the copy if ``module`` is one).

        A norm-act layer (timm's ``BatchNormAct2d`` family: batch norm with ``drop`` and
        ``act`` submodules) becomes :class:`FrozenBatchNormAct`, which keeps them.
        :func:`unfreeze_batchnorm` is the inverse.
        """

        left: list[str] = []

        def swap(name: str, m: torch.nn.Module) -> torch.nn.Module:
            if not isinstance(m, _BatchNorm) or isinstance(m, FrozenBatchNorm):
                return m
            if m.running_mean is None:
                return m
            if not is_norm_act(m) and not _plain_forward(m):
                # The same rule as convert: a subclass with its own forward would lose it.
                left.append(f"{name or '<root>'} ({type(m).__name__})")
                return m
            if is_norm_act(m):
                frozen: FrozenBatchNorm = FrozenBatchNormAct.from_batchnorm(m)
                frozen.drop = m.drop
                frozen.act = m.act
            else:
                frozen = cls.from_batchnorm(m)
            # What unfreeze_batchnorm needs to rebuild the original layer.
            frozen._unfrozen_state = (m, m.momentum)  # type: ignore[assignment]
            return frozen

        root = replace_modules(module, swap)
        if left:
            warnings.warn(
                "convert_frozen_batchnorm left these batch-norm subclasses unfrozen, since "
                "replacing them would drop their own forward: " + ", ".join(left),
                UserWarning,
                stacklevel=2,
            )
        return root


def _plain_forward(module: torch.nn.Module) -> bool:
    """Whether ``module``'s forward is batch norm's own (torch's, or one of this package's
    drop-ins, whose eval output is the affine map of the statistics)."""
    from batchnorm.nn.batchnorm import BatchNormMixin

    forward = type(module).forward
    return forward is _BatchNorm.forward or forward in (
        BatchNormMixin.forward,
        *(c.forward for c in _own_batch_norm_classes()),
    )


def _own_batch_norm_classes() -> tuple[type, ...]:
    from batchnorm.nn.sync import SyncBatchNorm, _BatchNormXd

    return (SyncBatchNorm, _BatchNormXd)


class FrozenBatchNormAct(NormActTail, FrozenBatchNorm):
    """:class:`FrozenBatchNorm`, then the ``drop`` and ``act`` of the norm-act layer it was made
    from (:meth:`FrozenBatchNorm.convert_frozen_batchnorm`)."""


def unfreeze_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """The inverse of :meth:`FrozenBatchNorm.convert_frozen_batchnorm`.

    Each frozen layer made by that conversion becomes the layer it was made from again (its
    class, momentum, activation), now holding the frozen values: ``weight`` and ``bias`` as
    trainable parameters, the running statistics as buffers. A frozen layer built directly
    becomes a batch norm for (N, C, *) inputs with momentum 0.1 (a ``FrozenBatchNormAct`` one
    that keeps its ``drop`` and ``act`` modules).

    Args:
        module: Any module.

    Returns:
        The model (the replacement if ``module`` itself is frozen).
    """
    from batchnorm.nn.sync import _BatchNormActXd, _BatchNormXd

    def swap(name: str, m: torch.nn.Module) -> torch.nn.Module:
        if not isinstance(m, FrozenBatchNorm):
            return m
        original, momentum = m.__dict__.get("_unfrozen_state", (None, 0.1))
        if original is None:
            tail = {"act_layer": m.act, "drop_layer": m.drop} if is_norm_act(m) else {}
            new: torch.nn.Module = (_BatchNormActXd if tail else _BatchNormXd)(
                m.num_features, eps=m.eps, momentum=momentum,
                device=m.running_mean.device, dtype=m.running_mean.dtype, **tail,
            )  # fmt: skip
        else:
            new = original
        with torch.no_grad():
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                target = getattr(new, key)
                if target is not None:
                    target.copy_(getattr(m, key))
            for key in ("weight", "bias"):
                target = getattr(new, key)
                if target is not None:
                    target.copy_(getattr(m, key))
        return new

    return replace_modules(module, swap)
