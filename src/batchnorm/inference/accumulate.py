"""Running statistics under gradient accumulation: one update per optimizer step.

With ``k`` micro-batches per optimizer step, every batch-norm layer takes ``k`` moving-average
updates per step at momentum ``m`` (pytorch#46516, Lightning#17446, keras#16633): the running
statistics follow the micro-batches, with an effective momentum ``1 - (1 - m)^k`` and the
statistics of batches ``k`` times smaller than the step's. Inside :func:`accumulate` each layer
instead keeps its running statistics fixed during the ``k`` micro-batches (the forward pass itself
is unchanged: each micro-batch is normalized with its own statistics, as before), collects the
statistics of each micro-batch, and after the ``k``-th takes ONE update with the statistics of
the concatenated batch, count-weighted (micro-batches may differ in size)::

    mean = sum_b m_b mu_b / M                                      M = sum_b m_b
    var  = (sum_b m_b var_b + sum_b m_b (mu_b - mean)^2) / (M - 1)   (unbiased, torch's)
    running <- (1 - momentum) running + momentum (mean, var);  num_batches_tracked += 1

with ``mu_b``, ``var_b`` (biased) and ``m_b`` the mean, variance and values per channel of
micro-batch ``b``. That is exactly the update one forward of the concatenated batch would make.

Variants:

- Ghost batch norm (a layer with an int ``virtual_batch_size``) pools the variance within ghost
  batches, as its own update does: ``var = sum_g m_g var_g / sum_g (m_g - 1)`` over the ghost
  batches of all micro-batches. It equals the concatenated batch's update when every micro-batch
  size is a multiple of ``virtual_batch_size`` (the ghost batches are then the same).
- Batch renorm: its ``r``, ``d`` use the running statistics, which stay those of the start of the
  step for every micro-batch, as for the concatenated batch; the schedule counts steps.
- Synchronized batch norm (``process_group`` attribute, a process group of several processes):
  the statistics are combined across processes too (two all-reduces per step and layer), so the
  update equals one from the concatenation of every process's micro-batches.
- Layers in eval mode (frozen) or without running statistics are left alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.inference.intake import check_model
from batchnorm.primitives import update_running_statistics

__all__ = ["StatisticsAccumulator", "accumulate"]

_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class _Pending:
    """Per-layer statistics of the micro-batches of the current step (float64, shape (C,))."""

    count: list[int] = field(default_factory=list)
    mean: list[torch.Tensor] = field(default_factory=list)
    m2: list[torch.Tensor] = field(default_factory=list)  # m_b * biased var_b
    saved: list[torch.Tensor | None] = field(default_factory=list)


def _chunk_statistics(x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(m, mean, m * biased var)`` per channel of an (N, C, *) chunk, in float64."""
    if x.device.type == "mps":  # no float64 there
        x = x.cpu()
    x64 = x.detach().to(torch.float64)
    m = x64.numel() // x64.shape[1]
    if m == 0:
        zeros = torch.zeros(x64.shape[1], dtype=torch.float64, device=x64.device)
        return 0, zeros, zeros.clone()
    var, mean = torch.var_mean(x64, dim=[0, *range(2, x64.dim())], correction=0)
    return m, mean, var * m


def _synchronized(module: nn.Module) -> tuple[bool, Any]:
    """``(True, group)`` for a sync layer running with several processes (``group`` None is the
    default group), ``(False, None)`` when it runs alone."""
    if not hasattr(module, "process_group"):
        return False, None
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False, None
    group = module.process_group
    return torch.distributed.get_world_size(group) > 1, group


class StatisticsAccumulator:
    """What :func:`accumulate` returns: a context manager holding the per-layer statistics.

    Attributes:
        micro_batches: micro-batches per step (None: update only on :meth:`step`).
        pending: forward passes of the model since the last update.
        steps: updates made so far.
    """

    def __init__(self, model: nn.Module, micro_batches: int | None) -> None:
        if micro_batches is not None and (
            isinstance(micro_batches, bool)
            or not isinstance(micro_batches, int)
            or micro_batches < 1
        ):
            raise ValueError(
                f"accumulate: micro_batches must be a positive int (micro-batches per optimizer "
                f"step) or None (update on step()), got {micro_batches!r}"
            )
        self.model = model = check_model(model, "accumulate")
        self.micro_batches = micro_batches
        self.pending = 0
        self.steps = 0
        self._layers = [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
        self._state: dict[str, _Pending] = {}
        self._handles: list[Any] = []

    def _tracks(self, module: nn.Module) -> bool:
        return bool(
            module.training
            and module.track_running_stats
            and module.running_mean is not None
            and module.running_var is not None
        )

    def _pre_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not self._tracks(module) or not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0]
            state = self._state.setdefault(name, _Pending())
            # The forward updates copies; the buffers themselves are put back afterwards. Not
            # copied back in place: autograd may have saved the tensors the forward used.
            state.saved = [module._buffers.get(key) for key in _BUFFERS]
            for key, buffer in zip(_BUFFERS, state.saved):
                if buffer is not None:
                    module._buffers[key] = buffer.detach().clone()
            ghost = getattr(module, "virtual_batch_size", None)
            chunks = x.split(ghost) if isinstance(ghost, int) and 0 < ghost < x.shape[0] else [x]
            for chunk in chunks:
                m, mean, m2 = _chunk_statistics(chunk)
                state.count.append(m)
                state.mean.append(mean)
                state.m2.append(m2)

        return hook

    def _post_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            state = self._state.get(name)
            if state is None or not state.saved:
                return
            # Undo this micro-batch's moving-average update: one update per step, at step end.
            for key, buffer in zip(_BUFFERS, state.saved):
                if buffer is not None:
                    module._buffers[key] = buffer
            state.saved = []

        return hook

    def _model_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.pending += 1
        if self.micro_batches is not None and self.pending >= self.micro_batches:
            self.step()

    def step(self) -> None:
        """Update every layer's running statistics once, from the micro-batches since the last
        update (called automatically after every ``micro_batches`` forward passes)."""
        by_name = dict(self._layers)
        for name, state in self._state.items():
            if state.count:
                self._update(by_name[name], state)
        self._state = {}
        if self.pending:
            self.steps += 1
        self.pending = 0

    def _update(self, module: nn.Module, state: _Pending) -> None:
        device = state.mean[0].device
        count = torch.tensor(state.count, dtype=torch.float64, device=device)[:, None]  # (B, 1)
        means, m2 = torch.stack(state.mean), torch.stack(state.m2)  # (B, C)
        synchronized, group = _synchronized(module)
        ghost = isinstance(getattr(module, "virtual_batch_size", None), int)
        total = count.sum().reshape(1)
        weighted = (count * means).sum(0)
        if synchronized:  # count and sum over every process first: the global mean
            head = torch.cat([total, weighted])
            torch.distributed.all_reduce(head, group=group)
            total, weighted = head[:1], head[1:]
        mean = weighted / total.clamp_min(1)
        if ghost:  # pooled within the ghost batches
            spread = m2.sum(0)
            dof = (count - 1).clamp_min(0).sum().reshape(1)
        else:  # Chan et al.: within-batch spread plus the spread of the batch means
            spread = m2.sum(0) + (count * (means - mean) ** 2).sum(0)
            dof = total - 1
        if synchronized:
            tail = torch.cat([spread, dof]) if ghost else spread
            torch.distributed.all_reduce(tail, group=group)
            spread = tail[:-1] if ghost else tail
            dof = tail[-1:] if ghost else dof
        if float(dof) <= 0:
            return  # one value per channel in the whole step: no variance (torch skips it too)
        unbiased = spread / dof
        tracked = module.num_batches_tracked
        momentum = (
            float(module.momentum)
            if module.momentum is not None
            else 1.0 / (float(tracked) + 1 if tracked is not None else 1.0)
        )
        with torch.no_grad():
            update_running_statistics(
                module.running_mean, module.running_var, mean, unbiased, momentum
            )
            if tracked is not None:
                tracked.add_(1)

    def __enter__(self) -> StatisticsAccumulator:
        for name, module in self._layers:
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            self._handles.append(module.register_forward_hook(self._post_hook(name)))
        self._handles.append(self.model.register_forward_hook(self._model_hook))
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if exc_type is None:
            self.step()  # the micro-batches of an incomplete last step
        else:
            self._state = {}
            self.pending = 0


def accumulate(model: nn.Module, micro_batches: int | None = None) -> StatisticsAccumulator:
    """Within the ``with`` block, one running-statistics update per ``micro_batches`` forwards.

    See the module docstring for the formulas: after every ``micro_batches`` forward passes of
    ``model`` (the micro-batches of one optimizer step), each batch-norm layer in training mode
    takes one moving-average update, equal to the update a forward of the concatenated batch
    would make (count-weighted; uneven micro-batches welcome). Outputs and gradients are those
    of ordinary training. Leaving the block updates once more with the micro-batches of an
    incomplete step, if any (not after an exception: those are discarded).

    Args:
        model: the network; hooks are added on entry and removed on exit.
        micro_batches: ``k``, the forwards per optimizer step; None to update only when
            :meth:`StatisticsAccumulator.step` is called (call it beside ``optimizer.step()``).

    Returns:
        A :class:`StatisticsAccumulator`, the context manager.

    Example:
        >>> import torch
        >>> bn, whole = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
        >>> x = torch.randn(10, 2)
        >>> with accumulate(bn, micro_batches=2):
        ...     _ = bn(x[:3]); _ = bn(x[3:])   # two micro-batches, one optimizer step
        >>> _ = whole(x)                     # one forward of the concatenated batch
        >>> torch.allclose(bn.running_var, whole.running_var), int(bn.num_batches_tracked)
        (True, 1)
    """
    return StatisticsAccumulator(model, micro_batches)
