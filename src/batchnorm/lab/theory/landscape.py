"""The loss landscape along the gradient (Santurkar et al. 2018, Section 3.1).

Santurkar, Tsipras, Ilyas, Madry, arXiv 1805.11604, Section 3.1 and Figure 4 (SPEC.md section
4.2): at the parameters theta of a training step, with gradient ``g = grad L(theta)`` on the
step's batch, move along the gradient for step lengths eta in a grid and record

- the loss ``L(theta - eta g)`` ("loss landscape": its range over eta),
- the gradient difference ``||grad L(theta - eta g) - grad L(theta)||`` ("gradient
  predictiveness": its range over eta),
- the effective beta-smoothness ``max_eta ||grad L(theta - eta g) - grad L(theta)|| / ||eta g||``,
  the largest ratio of gradient change to distance moved.

The paper's grid is eta in [0.5, 4] x lr (capped at 0.4 in VGG); :func:`step_grid` builds it.
All norms are l2 norms of the flattened parameter vector (every given tensor concatenated).

For a quadratic ``L(theta) = 1/2 theta^T A theta`` the three are known exactly:
``L(theta - eta g) = 1/2 (theta - eta g)^T A (theta - eta g)``, the gradient difference is
``eta ||A g||`` and the effective beta-smoothness is ``||A g|| / ||g||`` for every eta, which is
the eigenvalue of A when g is an eigenvector and at most the largest eigenvalue (tests).

The probe leaves no trace: parameters, the module's buffers (batch-norm running statistics,
``num_batches_tracked``) and ``.grad`` are exactly as before. The loss function must be
deterministic (same batch each call).

Example:
    >>> import torch
    >>> theta = torch.nn.Parameter(torch.tensor([1.0, 1.0], dtype=torch.float64))
    >>> A = torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64))
    >>> probe = probe_landscape([theta], lambda: 0.5 * theta @ A @ theta, step_grid(0.1, num=4))
    >>> g = A @ theta  # the gradient; the exact beta-smoothness is ||A g|| / ||g|| = sqrt(8.2)
    >>> round(probe.beta_smoothness, 9), round(((A @ g).norm() / g.norm()).item(), 9)
    (2.863564213, 2.863564213)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from batchnorm.lab.theory._state import SavedState, flatten_groups

__all__ = ["LandscapeProbe", "probe_landscape", "step_grid"]


def step_grid(
    lr: float, low: float = 0.5, high: float = 4.0, num: int = 8, cap: float | None = None
) -> tuple[float, ...]:
    """Step lengths ``eta`` evenly spaced in ``[low * lr, high * lr]``, optionally capped.

    Args:
        lr: the training learning rate (> 0).
        low: smallest multiple of lr (the paper: 0.5).
        high: largest multiple of lr (the paper: 4).
        num: number of step lengths (>= 1).
        cap: if given, step lengths above it are replaced by it and duplicates dropped (the
            paper caps at 0.4 for VGG).

    Example:
        >>> [round(eta, 6) for eta in step_grid(0.1, num=3)]
        [0.05, 0.225, 0.4]
        >>> step_grid(0.2, num=3, cap=0.4)
        (0.1, 0.4)
    """
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if not (0 < low <= high):
        raise ValueError(f"need 0 < low <= high, got low={low!r}, high={high!r}")
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be an int >= 1, got {num!r}")
    if cap is not None and not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap!r}")
    values = np.linspace(low * lr, high * lr, num) if num > 1 else np.array([low * lr])
    out: list[float] = []
    for v in values:
        v = float(v)
        if cap is not None:
            v = min(v, cap)
        if v not in out:
            out.append(v)
    return tuple(out)


@dataclass(frozen=True)
class LandscapeProbe:
    """The landscape along the gradient at one point.

    Attributes:
        step_sizes: the eta values.
        losses: ``L(theta - eta g)`` per eta.
        grad_differences: ``||grad L(theta - eta g) - grad L(theta)||`` per eta.
        loss_at_start: ``L(theta)``.
        grad_norm: ``||g||``.
        beta_smoothness: ``max_eta grad_difference / (eta ||g||)`` (nan if g = 0).
    """

    step_sizes: tuple[float, ...]
    losses: tuple[float, ...]
    grad_differences: tuple[float, ...]
    loss_at_start: float
    grad_norm: float
    beta_smoothness: float

    @property
    def loss_range(self) -> tuple[float, float]:
        """(min, max) of the loss over the step lengths."""
        return min(self.losses), max(self.losses)

    @property
    def grad_difference_range(self) -> tuple[float, float]:
        """(min, max) of the gradient difference over the step lengths."""
        return min(self.grad_differences), max(self.grad_differences)


def _flat_grad(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).detach().reshape(-1).to(torch.float64)
            for p, g in zip(params, grads)
        ]
    )


def probe_landscape(
    params: Sequence[torch.Tensor | Sequence[torch.Tensor]],
    loss_fn: Callable[[], torch.Tensor],
    step_sizes: Sequence[float],
    *,
    module: torch.nn.Module | None = None,
) -> LandscapeProbe:
    """Loss, gradient change and effective beta-smoothness along the gradient direction.

    Args:
        params: the parameters theta (tensors, or groups of tensors), all moved together.
        loss_fn: computes the loss on the fixed batch at the current parameters.
        step_sizes: the step lengths eta (each > 0).
        module: the model, if ``loss_fn`` changes its buffers; they are restored afterwards.

    Returns:
        A :class:`LandscapeProbe`.
    """
    tensors = [t for group in flatten_groups(params) for t in group]
    etas = tuple(float(e) for e in step_sizes)
    if not etas or not all(math.isfinite(e) and e > 0 for e in etas):
        raise ValueError(f"step_sizes must be a non-empty sequence of positive numbers, got {etas}")
    saved = SavedState(tensors, module)
    try:
        loss0 = loss_fn()
        g = _flat_grad(loss0, tensors)
        grad_norm = float(g.norm())
        # The gradient as per-tensor views, in each tensor's own dtype, for the moves.
        pieces = []
        start = 0
        for t in tensors:
            pieces.append(g[start : start + t.numel()].view(t.shape).to(t.dtype))
            start += t.numel()
        losses: list[float] = []
        diffs: list[float] = []
        for eta in etas:
            saved.restore()
            with torch.no_grad():
                for t, piece in zip(tensors, pieces):
                    t.sub_(eta * piece)
            loss = loss_fn()
            diffs.append(float((_flat_grad(loss, tensors) - g).norm()))
            losses.append(float(loss.detach()))
    finally:
        saved.restore()
    beta = max(d / (eta * grad_norm) for d, eta in zip(diffs, etas)) if grad_norm > 0 else math.nan
    return LandscapeProbe(
        step_sizes=etas,
        losses=tuple(losses),
        grad_differences=tuple(diffs),
        loss_at_start=float(loss0.detach()),
        grad_norm=grad_norm,
        beta_smoothness=beta,
    )
