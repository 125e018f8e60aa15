"""How an (N, C, *) tensor is seen by the kernels: a strided 3-D view (A, C, B).

Every kernel addresses element ``(a, c, b)`` at ``a * stride_a + c * stride_c + b * stride_b`` and
reduces over ``a`` and ``b``. Two views cover the layouts that matter without a copy:

- channels-first (NCHW, NCDHW, or (N, C, L)): ``A = N``, ``B = H * W`` (the spatial axes merged),
  ``stride_b = 1``; a tile runs along the contiguous spatial axis ("planes").
- channels-last (NHWC, NDHWC) and (N, C): ``A = N * H * W`` (rows), ``B = 1``, ``stride_c = 1``;
  a tile runs along the contiguous channel axis ("rows").

Any other input (a slice that leaves holes, an expanded tensor, an odd permutation, a sequence
stored (N, L, C) and seen as ``x.transpose(1, 2)``) is copied to a contiguous tensor first: the
outputs share the (possibly copied) input's strides, so one set of strides serves x, y, dy, dx,
the residual and its gradient, and they must be the strides torch's kernels give (contiguous, or
channels-last for an input in that format).

The ReLU mask (1 bit per element) is a separate contiguous uint8 buffer, packed along ``B`` when
the view has contiguous planes of at least 8 values, else along ``A``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from batchnorm.layouts import in_suggested_format


@dataclass(frozen=True)
class View3:
    """An (N, C, *) tensor as (A, C, B) with strides; the kernels reduce over A and B.

    Attributes:
        a, c, b: sizes of the three axes; ``a * b`` is m, the values per channel.
        stride_a, stride_c, stride_b: element strides of the three axes.
    """

    a: int
    c: int
    b: int
    stride_a: int
    stride_c: int
    stride_b: int

    @property
    def planes(self) -> bool:
        """True when tiles should run along contiguous spatial planes (channels-first)."""
        return self.b > 1 and self.stride_b == 1

    @property
    def pack_b(self) -> bool:
        """True when the ReLU mask is packed along B (else along A)."""
        return self.planes and self.b >= 8

    @property
    def per_channel(self) -> int:
        """m, the number of values per channel."""
        return self.a * self.b

    def mask_shape(self) -> tuple[int, int, int]:
        """Shape of the packed uint8 mask buffer: one bit per element."""
        if self.pack_b:
            return (self.a, self.c, _cdiv(self.b, 8))
        return (_cdiv(self.a, 8), self.c, self.b)


def _cdiv(n: int, d: int) -> int:
    return -(-n // d)


def _merge(dims: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
    """Merge (size, stride) pairs, outermost first, into one axis; None if they do not merge."""
    dims = [(n, s) for n, s in dims if n != 1]
    if not dims:
        return 1, 1
    for (_, s_outer), (n_inner, s_inner) in zip(dims, dims[1:]):
        if s_outer != s_inner * n_inner:
            return None
    size = 1
    for n, _ in dims:
        size *= n
    return size, dims[-1][1]


def view3(shape: Sequence[int], strides: Sequence[int]) -> View3 | None:
    """The (A, C, B) view of a tensor of this shape and strides, or None if it needs a copy.

    Shape:
        shape: (N, C) or (N, C, *spatial).

    Example:
        >>> view3((2, 3, 4, 5), (60, 20, 5, 1))  # NCHW: planes of 20
        View3(a=2, c=3, b=20, stride_a=60, stride_c=20, stride_b=1)
        >>> view3((2, 3, 4, 5), (60, 1, 15, 3))  # NHWC: 40 rows of 3 channels
        View3(a=40, c=3, b=1, stride_a=3, stride_c=1, stride_b=1)
    """
    n, c = int(shape[0]), int(shape[1])
    spatial = [(int(s), int(st)) for s, st in zip(shape[2:], strides[2:])]
    stride_n, stride_c = int(strides[0]), int(strides[1])

    def planes() -> View3 | None:
        merged = _merge(spatial)
        if merged is None:
            return None
        return View3(n, c, merged[0], stride_n, stride_c, merged[1])

    def rows() -> View3 | None:
        merged = _merge([(n, stride_n), *spatial])
        if merged is None:
            return None
        return View3(merged[0], c, 1, merged[1], stride_c, 1)

    # Channels-contiguous tensors read best as rows; the rest as planes.
    order = (rows, planes) if stride_c == 1 or c == 1 and not spatial else (planes, rows)
    for make in order:
        view = make()
        if view is not None:
            return view
    return None


def kernel_layout(x: torch.Tensor) -> tuple[bool, View3]:
    """Whether ``x`` must be copied for the kernels, and the (A, C, B) view they will use.

    Outputs are made with ``torch.empty_like``, which keeps the strides of a dense,
    non-overlapping tensor, and must come out as torch's kernels give them (contiguous, or
    channels-last for an x in that format: :func:`batchnorm.layouts.suggested_format`). Any
    other x (a slice with holes, an expanded tensor, a sequence stored (N, L, C) and seen as
    ``x.transpose(1, 2)``, a transposed (N, C) matrix) is copied to a contiguous tensor first,
    as the CPU kernels do. Works on fake tensors (shapes and strides only).
    """
    probe = torch.empty_like(x)
    if tuple(probe.stride()) == tuple(x.stride()) and in_suggested_format(x):
        view = view3(x.shape, x.stride())
        if view is not None:
            return False, view
    view = view3(x.shape, _contiguous_strides(x.shape))
    assert view is not None  # a contiguous tensor always has a planes view
    return True, view


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(int(size), 1)
    return tuple(reversed(strides))


def canonical(x: torch.Tensor) -> tuple[torch.Tensor, View3]:
    """``x`` itself when the kernels can address it and outputs can share its strides, else a
    contiguous copy; with its (A, C, B) view."""
    copy, view = kernel_layout(x)
    return (x.contiguous() if copy else x), view


def empty_output(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialized tensor with the shape of ``x`` and the strides the kernels write."""
    copy, _ = kernel_layout(x)
    if copy:
        return torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device)
    return torch.empty_like(x, dtype=dtype)


def like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` with the strides of ``ref`` (a copy only when they differ)."""
    if t.stride() == ref.stride():
        return t
    out = torch.empty_like(ref, dtype=t.dtype)
    out.copy_(t)
    return out
