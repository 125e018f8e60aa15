"""Adaptive Gradient Clipping (Brock, De, Smith, Simonyan 2021, NFNets, arXiv 2102.06171).

Normalizer-free networks train without batch norm; what lets them use large batches and learning
rates is clipping each output unit's gradient relative to the size of its weights. Per unit ``i``
(a row of a Linear weight, an output channel of a convolution)::

    if ||G_i|| / max(||W_i||, eps) > lambda:
        G_i <- lambda * max(||W_i||, eps) / ||G_i|| * G_i

with Frobenius norms over the unit's weights, ``lambda`` the clipping threshold (0.01 at batch
4096 in the paper, smaller for larger batches) and ``eps = 1e-3`` so that zero-initialized weights
can still move. The paper does not clip the final classifier; pass its parameters in ``exclude``.

Units: for a tensor of two or more dimensions, dimension 0 indexes the units (torch's
``(out, in)`` Linear and ``(out, in / groups, *k)`` convolution layouts); a vector (bias, gain) or
a scalar is one unit, as in the NFNets reference code. (For ConvTranspose weights, laid out
``(in, out / groups, *k)``, dimension 0 is the input channel.)

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))  # unit norms 5 and 0
    >>> w.grad = torch.tensor([[0.3, 0.4], [1.0, 0.0]])  # ratios 0.5/5 = 0.1 and 1/1e-3
    >>> adaptive_clip_grad_([w], clipping=0.01)
    >>> w.grad  # row 0 scaled to 0.01 * 5 = 0.05; row 1 to 0.01 * 1e-3
    tensor([[3.0000e-02, 4.0000e-02],
            [1.0000e-05, 0.0000e+00]])
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["AGC", "adaptive_clip_grad_", "unitwise_norm"]


def unitwise_norm(t: torch.Tensor) -> torch.Tensor:
    """The Frobenius norm of each output unit of ``t``, broadcastable against ``t``.

    Shape:
        - t: (out, *) with at least 2 dimensions -> (out, 1, ..., 1); a vector or scalar -> ().

    Example:
        >>> unitwise_norm(torch.tensor([[3.0, 4.0], [6.0, 8.0]])).flatten()
        tensor([ 5., 10.])
    """
    if t.dim() <= 1:
        return torch.linalg.vector_norm(t)
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.dim())), keepdim=True)


def _check(clipping: float, eps: float) -> None:
    if isinstance(clipping, bool) or not isinstance(clipping, (int, float)) or not clipping > 0:
        raise ValueError(
            f"clipping (lambda) must be a number > 0, got {clipping!r}; NFNets use 0.01 at "
            "batch size 4096 and smaller values for larger batches"
        )
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a number > 0 (1e-3 in NFNets), got {eps!r}")


@torch.no_grad()
def adaptive_clip_grad_(
    parameters: torch.Tensor | Iterable[torch.Tensor], clipping: float = 0.01, eps: float = 1e-3
) -> None:
    """Clip the gradients of ``parameters`` in place, unit-wise (see the module docstring).

    Parameters without a gradient are skipped. No host synchronization.

    Args:
        parameters: A tensor or an iterable of tensors with ``.grad``.
        clipping: ``lambda``, the largest allowed ``||G_i|| / max(||W_i||, eps)``.
        eps: Lower bound on the weight norm.

    Raises:
        ValueError: ``clipping`` or ``eps`` not > 0.
        TypeError: a sparse gradient.
    """
    _check(clipping, eps)
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    for p in parameters:
        grad = p.grad
        if grad is None:
            continue
        if grad.is_sparse:
            raise TypeError("adaptive_clip_grad_ does not support sparse gradients")
        max_norm = unitwise_norm(p.detach()).clamp_min(eps) * clipping
        grad_norm = unitwise_norm(grad)
        scale = max_norm / grad_norm.clamp_min(torch.finfo(grad_norm.dtype).tiny)
        grad.copy_(torch.where(grad_norm > max_norm, grad * scale, grad))


class AGC:
    """Adaptive gradient clipping attached to an optimizer: every ``step()`` clips first.

    The clipping runs in a step pre-hook of ``optimizer``, so the optimizer stays the same object
    (learning-rate schedulers, ``GradScaler.step`` and checkpoints keep working; under AMP the
    scaler unscales the gradients before ``step`` calls the hook). Calling ``agc.step()`` or
    ``optimizer.step()`` is the same. Optimizers that re-evaluate the gradients in a closure
    (L-BFGS) are refused, since the closure runs after the hook.

    Args:
        optimizer: Any ``torch.optim.Optimizer``.
        clipping: ``lambda`` (0.01 in NFNets at batch 4096).
        eps: Lower bound on the weight norm (1e-3).
        exclude: Parameters or modules whose parameters are not clipped (the final classifier).

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> agc = AGC(opt, clipping=0.01, exclude=[model[1]])
        >>> model(torch.randn(3, 4)).sum().backward()
        >>> agc.step()  # clips model[0]'s gradients, then SGD
        >>> agc.remove()  # back to plain SGD
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        clipping: float = 0.01,
        eps: float = 1e-3,
        exclude: Iterable[torch.Tensor | torch.nn.Module] = (),
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"AGC wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        _check(clipping, eps)
        self.optimizer = optimizer
        self.clipping = float(clipping)
        self.eps = float(eps)
        excluded: set[int] = set()
        for item in exclude:
            if isinstance(item, torch.nn.Module):
                excluded.update(id(p) for p in item.parameters())
            elif isinstance(item, torch.Tensor):
                excluded.add(id(item))
            else:
                raise TypeError(
                    f"exclude takes parameters or modules, got {type(item).__name__}; pass e.g. "
                    "exclude=[model.fc] for the final classifier"
                )
        self._excluded = excluded
        self._handle = optimizer.register_step_pre_hook(self._clip_before_step)

    def _clip_before_step(
        self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        # args holds the optimizer itself, then step()'s positional arguments.
        if any(a is not None for a in args[1:]) or kwargs.get("closure") is not None:
            raise RuntimeError(
                "AGC clips the gradients before step(), but a closure recomputes them inside "
                "step(); use adaptive_clip_grad_ inside the closure instead"
            )
        adaptive_clip_grad_(self.clipped_parameters(), self.clipping, self.eps)

    def clipped_parameters(self) -> list[torch.Tensor]:
        """The optimizer's parameters that are clipped (all but the excluded ones)."""
        return [
            p
            for group in self.optimizer.param_groups
            for p in group["params"]
            if id(p) not in self._excluded
        ]

    def step(self, closure: Any = None) -> Any:
        """``optimizer.step()``, the gradients clipped first."""
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``optimizer.zero_grad``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def remove(self) -> None:
        """Detach from the optimizer: later steps are not clipped."""
        self._handle.remove()
