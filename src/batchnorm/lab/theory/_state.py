"""Save and restore parameters and buffers exactly, around probes that move the weights.

The covariate-shift and landscape probes evaluate the loss at moved parameters. Each evaluation
in training mode also updates batch-norm running statistics. :class:`SavedState` keeps clones of
the given tensors (and of every buffer of an optional module) and puts them back bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = ["SavedState", "flatten_groups"]


def flatten_groups(
    groups: Sequence[torch.Tensor | Sequence[torch.Tensor]],
) -> list[list[torch.Tensor]]:
    """Normalize "a tensor or a sequence of tensors" per group into lists of tensors.

    Raises:
        ValueError: if there is no group, a group is empty, an entry is not a tensor that requires
            grad, or a tensor appears twice.
    """
    if isinstance(groups, torch.Tensor) or len(groups) == 0:
        raise ValueError("need a non-empty sequence of parameter groups (one per layer)")
    out: list[list[torch.Tensor]] = []
    seen: set[int] = set()
    for i, group in enumerate(groups):
        tensors = [group] if isinstance(group, torch.Tensor) else list(group)
        if not tensors:
            raise ValueError(f"parameter group {i} is empty")
        for t in tensors:
            if not isinstance(t, torch.Tensor) or not t.requires_grad:
                raise ValueError(
                    f"parameter group {i} holds {type(t).__name__}: every entry must be a tensor "
                    "with requires_grad=True (a model parameter)"
                )
            if id(t) in seen:
                raise ValueError(f"a tensor appears twice (again in group {i})")
            seen.add(id(t))
        out.append(tensors)
    return out


class SavedState:
    """Clones of some tensors and of a module's buffers, restorable in place.

    Args:
        tensors: tensors to save (parameters).
        module: optional module whose buffers (running statistics, counters) are saved too.
    """

    def __init__(self, tensors: Iterable[torch.Tensor], module: torch.nn.Module | None = None):
        self._tensors = [(t, t.detach().clone()) for t in tensors]
        self._buffers = (
            [(b, b.detach().clone()) for b in module.buffers()] if module is not None else []
        )

    @torch.no_grad()
    def restore(self, *, buffers_only: bool = False) -> None:
        """Copy the saved values back into the original tensors."""
        if not buffers_only:
            for t, saved in self._tensors:
                t.copy_(saved)
        for b, saved in self._buffers:
            b.copy_(saved)
