"""Synchronized batch norm: statistics over the global batch of a ``torch.distributed`` group.

:class:`SyncBatchNorm` is a drop-in ``torch.nn.SyncBatchNorm``: a subclass of it (so the
``isinstance`` checks of Lightning, timm and torch.ao find it), with the same constructor,
parameters, buffers, ``state_dict`` keys and ``repr``. It runs over gloo on CPU as well as NCCL on
GPU. DistributedDataParallel refuses ``torch.nn.SyncBatchNorm`` layers in CPU modules ("only work
with GPU modules", a limit of torch's CUDA-only implementation); importing this module teaches
DDP that this class is not so limited (:func:`_allow_in_cpu_ddp`), and torch's own layers are
still refused there.

In training, under an initialized process group with more than one process, it normalizes every
process's part of the batch with the statistics of the whole (global) batch::

    m     = sum_p m_p                                       (count weighting: uneven parts exact)
    mu_B  = sum_p m_p mu_p / m
    M2    = sum_p M2_p + sum_p m_p (mu_p - mu_B)^2          (Chan merge; var_B = M2 / m)

so the outputs, input gradients and running statistics are those of plain batch norm on the
concatenation of all processes' batches (parameter gradients too, once summed over processes, as
DistributedDataParallel does). Communication is one collective per pass:

- forward: one ``all_gather`` of ``[m_p, mu_p, M2_p]`` packed in a single tensor (3 x C values);
- backward: one ``all_reduce`` of ``[sum dl/dxhat, sum dl/dxhat * xhat]`` packed (2 x C values).

No host synchronization is needed (except with ``nonfinite="raise"``, which must look at the
values). A process with an empty batch still joins both collectives, contributing ``m_p = 0``, so
no process waits forever. The running statistics are updated with the global unbiased variance
``M2 / (m - 1)``; if the whole global batch has one value per channel they are left unchanged
(raising would need a host synchronization, and all processes must agree).

Outside distributed training (no initialized process group, a group of one process, or a process
that is not a member of the group) and in eval mode, the layer is plain batch norm
(:class:`batchnorm.nn.BatchNorm2d` semantics, including ``backend=``). Which one ran is visible:
``layer.last_sync`` is True after a synchronized forward and False after a local one.

The synchronized path runs on torch operations through :mod:`batchnorm.primitives` (``kernel =
"torch"``; ``last_backend == "explicit"``: the primitives), not the project's Triton kernels.

:func:`convert_sync_batchnorm` / :func:`revert_sync_batchnorm` swap the batch-norm layers of a
whole model, keeping the behaviour of user subclasses (a layer with a fused activation keeps it).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.functional import report_zero_variance
from batchnorm.nn.batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormMixin,
    check_channels,
)
from batchnorm.nn.norm_act import NormActTail, is_norm_act
from batchnorm.nn.surgery import rebuild_layer, replace_modules, root_trace_error
from batchnorm.primitives import (
    Moments,
    combine_statistics,
    normalize_over,
    track_running_statistics,
    variance,
)

__all__ = [
    "ProcessGroupReducer",
    "SyncBatchNorm",
    "SyncBatchNormAct",
    "convert_sync_batchnorm",
    "revert_sync_batchnorm",
]


def _all_gather_single(output: torch.Tensor, input: torch.Tensor, group: Any) -> None:
    gather = getattr(dist, "all_gather_single", None)  # torch >= 2.13 name
    if gather is None:
        gather = dist.all_gather_into_tensor
    gather(output, input, group=group)


class ProcessGroupReducer:
    """Global statistics of a process group: one collective in each direction.

    A :class:`batchnorm.primitives.StatisticsReducer` for
    :func:`batchnorm.primitives.normalize_over`.

    Args:
        group: A ``torch.distributed`` process group (None: the default group).
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)

    def reduce_statistics(self, local: Moments) -> Moments:
        """All-gather ``[m_p, mu_p, M2_p]`` (one tensor) and Chan-merge them, count-weighted."""
        packed = torch.stack([local.count, local.mean, local.m2]).contiguous()  # (3, *S)
        gathered = packed.new_empty(self.world_size * packed.numel())
        _all_gather_single(gathered, packed.reshape(-1), self.group)
        parts = gathered.view(self.world_size, *packed.shape)  # (P, 3, *S)
        return combine_statistics(Moments(parts[:, 0], parts[:, 1], parts[:, 2]), dim=0)

    def reduce_gradient_sums(
        self, sum_dy: torch.Tensor, sum_dy_xhat: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All-reduce (sum) the two per-channel gradient sums, packed in one tensor."""
        packed = torch.stack([sum_dy, sum_dy_xhat]).contiguous()  # (2, *S)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.group)
        return packed[0], packed[1]


def _group_world_size(group: Any) -> int:
    """Processes in ``group``; 1 when not distributed, 0 when this process is not a member."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    size = dist.get_world_size(group)
    return max(size, 0)


class SyncBatchNorm(BatchNormMixin, torch.nn.SyncBatchNorm):
    """Drop-in ``torch.nn.SyncBatchNorm``: batch statistics over all processes of a group.

    Per channel, over the ``m = sum_p m_p`` values of the global batch (all processes)::

        y = gamma * (x - mu_B) / sqrt(var_B + eps) + beta

    with ``mu_B``, ``var_B`` merged from per-process statistics (see the module docstring), one
    all-gather in the forward and one all-reduce in the backward. Falls back to plain batch norm
    when not distributed, with one process, or in eval mode; ``last_sync`` tells which ran.
    A ``torch.nn.SyncBatchNorm`` subclass with torch's constructor and state; unlike torch's, it
    also works in CPU modules under DistributedDataParallel (gloo).

    Args:
        num_features: C, the channels (axis 1).
        eps, momentum, affine, track_running_stats, device, dtype, bias: as torch.
        process_group: The group to synchronize over (None: the default, all processes).
        backend, nonfinite: keyword-only, as :class:`batchnorm.nn.BatchNorm2d`; ``backend``
            applies to the local (fallback) path. ``nonfinite="skip"`` leaves the running
            statistics unchanged on every process when the global statistics are not finite;
            ``"raise"`` raises on every process alike.

    Attributes:
        kernel: "torch": the synchronized path runs on torch operations
            (:mod:`batchnorm.primitives`), not on the project's Triton kernels.
        last_sync: True after a synchronized forward, False after a local one, None before any.

    Shape:
        - Input: (N, C, *), N may differ between processes and may be 0 on some.
        - Output: same as input.

    Example:
        >>> import torch
        >>> layer = SyncBatchNorm(3)
        >>> y = layer(torch.randn(4, 3, 5))  # no process group: plain batch norm
        >>> layer.last_sync
        False
    """

    kernel = "torch"
    _init_after = torch.nn.SyncBatchNorm  # run _BatchNorm.__init__, not torch's SyncBatchNorm's

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        backend: str | None = None,
        nonfinite: str = "propagate",
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            backend=backend,
            nonfinite=nonfinite,
        )
        self.process_group = process_group
        self.last_sync: bool | None = None

    def _check_input_dim(self, input: torch.Tensor) -> None:
        check_channels(self, input, any_rank=True)

    @classmethod
    def convert_sync_batchnorm(
        cls, module: torch.nn.Module, process_group: Any | None = None
    ) -> torch.nn.Module:
        """torch's classmethod spelling of :func:`convert_sync_batchnorm`."""
        return convert_sync_batchnorm(module, process_group)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if isinstance(input, torch.fx.Proxy) and self.training:  # fx, this layer as the root
            # Even with one process now: the graph would run unsynchronized under DDP later.
            raise root_trace_error(self, "its statistics are reduced across processes")
        if isinstance(input, torch.fx.Proxy):  # eval: torch's standard op, as BatchNorm2d's
            return super().forward(input)
        self._check_input_dim(input)
        if not self.training or _group_world_size(self.process_group) <= 1:
            self.last_sync = False
            return super().forward(input)
        if not input.is_floating_point():
            raise TypeError(
                f"{type(self).__name__} expects a floating-point input, got {input.dtype}; "
                "convert it first, e.g. x.float()"
            )
        per_channel = (1, input.shape[1]) + (1,) * (input.dim() - 2)  # broadcasts on (N, C, *)
        weight = None if self.weight is None else self.weight.reshape(per_channel)
        bias = None if self.bias is None else self.bias.reshape(per_channel)
        dims = (0, *range(2, input.dim()))
        reducer = ProcessGroupReducer(self.process_group)
        y, stats = normalize_over(input, dims, self.eps, weight, bias, reducer=reducer)
        if self.eps == 0:  # the global statistics: the same message on every process
            constant = ((stats.m2 == 0) & (stats.count > 0)).reshape(-1)
            report_zero_variance(constant, type(self).__name__, "channel(s)")
        self.last_sync = True
        self.last_backend = "explicit"  # the primitives: a real backend name
        if self.track_running_stats and self.running_mean is not None:
            self._update_running_statistics(stats)
        return y

    def _update_running_statistics(self, stats: Moments) -> None:
        assert self.running_mean is not None and self.running_var is not None
        # A global batch with one value per channel leaves them unchanged: the same on every
        # process, with no host synchronization (all processes must agree, raising cannot).
        track_running_statistics(
            self.running_mean,
            self.running_var,
            self.num_batches_tracked,
            stats.mean,
            variance(stats, unbiased=True),
            self.momentum,
            valid=stats.count.reshape(-1)[0] > 1,
            nonfinite=self.nonfinite,
            who=f"{type(self).__name__} (global statistics of every process)",
        )


class _BatchNormXd(BatchNormMixin, _BatchNorm):
    """Batch norm for (N, C, *) inputs: what :func:`revert_sync_batchnorm` gives for a layer
    created as ``SyncBatchNorm`` (which does not know its input's dimensions)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        check_channels(self, input, any_rank=True)


class _BatchNormActXd(NormActTail, _BatchNormXd):
    """:class:`_BatchNormXd`, then ``drop`` and ``act``: what ``unfreeze_batchnorm`` gives for a
    ``FrozenBatchNormAct`` built directly (which does not know its input's dimensions)."""


# Exact classes rebuilt as SyncBatchNorm (their behaviour is plain batch norm).
_PLAIN_BATCH_NORM: tuple[type, ...] = (
    torch.nn.BatchNorm1d,
    torch.nn.BatchNorm2d,
    torch.nn.BatchNorm3d,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    torch.nn.SyncBatchNorm,
    _BatchNormXd,
)
_SYNC_CLASSES: dict[type, type] = {}


def _reduce_sync_instance(self: Any, protocol: int) -> tuple[Any, ...]:
    # Sync<cls> is made at run time, so pickle cannot find it by name: pickle the user's class
    # instead and make Sync<cls> again on loading (torch.save of a whole model, deepcopy).
    return (_new_sync_instance, (type(self)._sync_original_class,), self.__getstate__())


def _new_sync_instance(cls: type) -> Any:
    sync_cls = _sync_class_for(cls)
    assert sync_cls is not None  # it was made from this class before it was pickled
    return sync_cls.__new__(sync_cls)


def _checked_sync_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    """The user's forward, refusing loudly if it never reached the synchronized batch norm.

    A subclass whose forward computes batch norm itself (``F.batch_norm``) instead of calling
    ``super().forward`` would silently use per-process statistics. Every process raises alike at
    its first such training forward (none has joined a collective, so none waits).
    """
    cls = type(self)._sync_original_class
    self.last_sync = None
    output = cls.forward(self, *args, **kwargs)
    if self.training and self.last_sync is None and _group_world_size(self.process_group) > 1:
        raise RuntimeError(
            f"{cls.__name__}.forward computes batch norm without calling super().forward, so "
            "convert_sync_batchnorm cannot synchronize its statistics (they would silently stay "
            "per process). Call super().forward(x) in its forward, or give it 'drop' and 'act' "
            "submodules around a plain batch norm (the norm-act pattern, which is converted), "
            "or leave it out of the conversion."
        )
    return output


def _sync_class_for(cls: type) -> type | None:
    """``Sync<cls>``: the user's class with SyncBatchNorm's forward where it calls super()."""
    if cls not in _SYNC_CLASSES:
        try:
            _SYNC_CLASSES[cls] = type(
                f"Sync{cls.__name__}",
                (cls, SyncBatchNorm),
                {
                    "__module__": cls.__module__,
                    "_sync_original_class": cls,
                    "forward": _checked_sync_forward,
                    "__reduce_ex__": _reduce_sync_instance,
                    "__doc__": f"{cls.__name__} with batch statistics synchronized across "
                    "processes (made by batchnorm.nn.convert_sync_batchnorm).",
                },
            )
        except TypeError:  # no consistent method resolution order
            return None
    return _SYNC_CLASSES[cls]


def _rebuild(module: _BatchNorm, target: type, **extra: Any) -> _BatchNorm:
    """A ``target`` layer carrying ``module``'s whole state (:func:`rebuild_as`)."""
    if issubclass(target, SyncBatchNorm):
        extra.setdefault("last_sync", None)
    new = rebuild_layer(module, target, ours=issubclass(target, BatchNormMixin), **extra)
    if not issubclass(target, SyncBatchNorm):
        new.__dict__.pop("last_sync", None)
    if not issubclass(target, torch.nn.SyncBatchNorm):
        new.__dict__.pop("process_group", None)
    return new


def _swap_modules(model: torch.nn.Module, swap: Any) -> torch.nn.Module:
    return replace_modules(model, swap)


class SyncBatchNormAct(NormActTail, SyncBatchNorm):
    """:class:`SyncBatchNorm`, then ``drop`` and ``act``: what :func:`convert_sync_batchnorm`
    makes of a norm-act layer (timm's ``BatchNormAct2d`` family, :mod:`batchnorm.nn.norm_act`),
    whose own forward would bypass the synchronized statistics."""


def convert_sync_batchnorm(
    module: torch.nn.Module, process_group: Any | None = None
) -> torch.nn.Module:
    """Make every batch-norm layer of ``module`` synchronize its statistics across processes.

    - ``torch.nn.BatchNorm1d/2d/3d``, the project's ``BatchNorm1d/2d/3d`` and
      ``torch.nn.SyncBatchNorm`` become :class:`SyncBatchNorm`, sharing the very same parameter
      and buffer tensors (optimizers holding them keep working), mode and hooks.
    - A user subclass of batch norm (say ``BatchNormAct2d`` with a fused activation) keeps its
      class's behaviour: its class is swapped in place for ``Sync<Name>``, a subclass of both
      its class and :class:`SyncBatchNorm`, so where its ``forward`` calls ``super().forward``
      the synchronized forward runs. A subclass whose ``forward`` never calls ``super().forward``
      is not synchronized: check ``layer.last_sync`` after a training forward.
    - The project's ghost batch norm and batch renorm are left as they are, with a warning (their
      statistics are per process by design); frozen batch norm has no batch statistics to sync.

    :func:`revert_sync_batchnorm` is the inverse.

    Args:
        module: Any module (if it is itself a batch-norm layer, its replacement is returned).
        process_group: The group to synchronize over (None: all processes).

    Returns:
        The converted model (the same object unless the root itself was replaced).
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"convert_sync_batchnorm expects a torch.nn.Module, got {type(module)}")
    left: list[str] = []

    def swap(name: str, m: torch.nn.Module) -> torch.nn.Module:
        if not isinstance(m, _BatchNorm):
            return m
        if isinstance(m, SyncBatchNorm):
            m.process_group = process_group
            return m
        reason = getattr(type(m), "_no_sync_reason", None)
        if reason is not None:
            if getattr(type(m), "_warn_no_sync", False):
                left.append(f"{name or '<root>'} ({type(m).__name__}: {reason})")
            return m
        if type(m) in _PLAIN_BATCH_NORM:
            new = _rebuild(m, SyncBatchNorm, process_group=process_group)
            new._converted_from = type(m)  # type: ignore[assignment]
            return new
        if is_norm_act(m):
            original = m.__dict__.get("_converted_from", type(m))
            new = _rebuild(m, SyncBatchNormAct, process_group=process_group)
            new.__dict__["_converted_from"] = original
            return new
        sync_cls = _sync_class_for(type(m))
        if sync_cls is None:
            left.append(f"{name or '<root>'} ({type(m).__name__}: no consistent class order)")
            return m
        added = [a for a in ("backend", "nonfinite", "last_backend") if not hasattr(m, a)]
        m.__class__ = sync_cls
        m.backend = getattr(m, "backend", None)
        m.nonfinite = getattr(m, "nonfinite", "propagate")
        m.last_backend = getattr(m, "last_backend", None)
        m.process_group = process_group
        m.last_sync = None
        m._sync_added_attributes = added  # type: ignore[assignment]
        return m

    root = _swap_modules(module, swap)
    if left:
        warnings.warn(
            "convert_sync_batchnorm left these layers unsynchronized: " + "; ".join(left),
            UserWarning,
            stacklevel=2,
        )
    return root


def revert_sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """The inverse of :func:`convert_sync_batchnorm`.

    A converted layer gets its original class back (the one it had before conversion, with the
    same tensors); a :class:`SyncBatchNorm` or ``torch.nn.SyncBatchNorm`` created directly
    becomes a batch norm for (N, C, *) inputs (like torch's ``_BatchNormXd``).

    Args:
        module: Any module.

    Returns:
        The model with local batch norm (the same object unless the root was replaced).
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"revert_sync_batchnorm expects a torch.nn.Module, got {type(module)}")

    def swap(name: str, m: torch.nn.Module) -> torch.nn.Module:
        if not isinstance(m, (SyncBatchNorm, torch.nn.SyncBatchNorm)):
            return m
        original = type(m).__dict__.get("_sync_original_class")
        if original is not None:
            for attr in (*getattr(m, "_sync_added_attributes", ()), "process_group", "last_sync"):
                m.__dict__.pop(attr, None)
            m.__dict__.pop("_sync_added_attributes", None)
            m.__class__ = original
            return m
        target = m.__dict__.get("_converted_from") or _BatchNormXd
        if issubclass(target, torch.nn.SyncBatchNorm):
            new = _rebuild(m, target, process_group=None)
        else:
            new = _rebuild(m, target)
        new.__dict__.pop("_converted_from", None)
        return new

    return _swap_modules(module, swap)


def _allow_in_cpu_ddp() -> bool:
    """Let DistributedDataParallel wrap CPU modules holding this package's SyncBatchNorm.

    DDP refuses any ``torch.nn.SyncBatchNorm`` in a CPU module because torch's implementation is
    CUDA-only; this one is not. DDP's check is replaced by the same check that skips our class
    (torch's own layers are still refused on CPU, with torch's message). Returns whether the
    check was found (a torch without it needs nothing).
    """
    ddp = torch.nn.parallel.DistributedDataParallel
    original = getattr(ddp, "_passing_sync_batchnorm_handle", None)
    if original is None or getattr(original, "_batchnorm_aware", False):
        return original is not None

    def _passing_sync_batchnorm_handle(self: Any, module: torch.nn.Module) -> None:
        for layer in module.modules():
            if isinstance(layer, torch.nn.SyncBatchNorm) and not isinstance(layer, SyncBatchNorm):
                if self.device_type == "cpu":
                    self._log_and_throw(
                        ValueError, "SyncBatchNorm layers only work with GPU modules"
                    )

    _passing_sync_batchnorm_handle._batchnorm_aware = True  # type: ignore[attr-defined]
    ddp._passing_sync_batchnorm_handle = _passing_sync_batchnorm_handle
    return True


_allow_in_cpu_ddp()
