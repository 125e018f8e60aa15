"""Batch normalization on the CPU: C++ kernels with ATen's vector types and torch's thread pool.

:func:`batch_norm` has ``torch.nn.functional.batch_norm``'s 8 positional arguments and semantics
(running statistics updated in place with PyTorch's momentum convention and the unbiased batch
variance). It takes (N, C) and (N, C, *) CPU tensors in float32 or bfloat16, contiguous or
channels-last (NHWC, NDHWC) without copies (other strides are copied first), with parameters and
running statistics in float32 or the input's dtype; statistics are float32 arithmetic merged in
float64 (:file:`batch_norm.cpp` says how), and are bitwise independent of the thread count.

The kernels are compiled once, on first use, and cached (:mod:`._build`); :func:`status` says
whether they can run here without building them. Their large outputs (y, dx) come from a
cache of freed blocks of the same size, so that a training loop does not fault fresh pages in
at every call: :func:`cache_info`, :func:`set_cache_limit` and :func:`empty_cache` inspect and
bound it (``BATCHNORM_CPU_CACHE_MB``, default 256; 0 turns it off). Most code should call
:mod:`batchnorm.functional` with ``backend="cpu"``, which validates the inputs and falls back
visibly to PyTorch's kernel where these cannot run.

Example:
    >>> import torch
    >>> from batchnorm.ops import cpu
    >>> x = torch.tensor([[0.0, 10.0], [2.0, 30.0]])
    >>> cpu.batch_norm(x, None, None, None, None, True, 0.1, 0.0) if cpu.load() else torch.tensor(
    ...     [[-1.0, -1.0], [1.0, 1.0]])
    tensor([[-1., -1.],
            [ 1.,  1.]])
"""

from __future__ import annotations

import operator
from types import ModuleType
from typing import NamedTuple

import torch

from batchnorm.modes import FusedSave, dual_level_active, forward_ad_active
from batchnorm.ops.cpu._build import load, ready, status

__all__ = [
    "SUPPORTED_DTYPES",
    "CacheInfo",
    "batch_norm",
    "batch_norm_relu",
    "cache_info",
    "channels_last_walk",
    "empty_cache",
    "load",
    "ready",
    "set_cache_limit",
    "set_channels_last_walk",
    "set_stream_min_bytes",
    "status",
    "stream_min_bytes",
]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


def _ext() -> ModuleType:
    ext = load()
    if ext is None:
        raise RuntimeError(f"the CPU batch-norm kernels cannot run here: {status()[1]}")
    return ext


class CacheInfo(NamedTuple):
    """The output block cache: bytes held for reuse, the limit, and the large allocations served
    from it (hits) or from the system (misses) since the process started."""

    cached_bytes: int
    limit_bytes: int
    hits: int
    misses: int


def cache_info() -> CacheInfo:
    """The state of the kernels' output block cache (all zeros if the kernels cannot run)."""
    ext = load()
    return CacheInfo(*ext.cache_info()) if ext is not None else CacheInfo(0, 0, 0, 0)


def set_cache_limit(megabytes: float) -> None:
    """Keeps at most ``megabytes`` of freed output blocks for reuse (0: none; the blocks above
    the new limit are freed now). Outputs under 256 KiB never go through the cache.

    Raises:
        ValueError: ``megabytes`` is negative or not finite.
    """
    if not (isinstance(megabytes, (int, float)) and 0 <= megabytes < float("inf")):
        raise ValueError(
            f"set_cache_limit takes a number of megabytes >= 0, got {megabytes!r} "
            "(0 turns the output cache off)"
        )
    ext = load()
    if ext is not None:
        ext.set_cache_limit(int(megabytes * (1 << 20)))


def empty_cache() -> None:
    """Frees the output blocks held for reuse (tensors in use are not affected)."""
    ext = load()
    if ext is not None:
        ext.empty_cache()


def channels_last_walk() -> str:
    """How the channels-last (and (N, C)) backward walks a block of rows: "rows" (row after row,
    the default on AMD CPUs) or "chunks" (a chunk of channels down the rows, elsewhere). Which
    is faster depends on the CPU (BENCHMARKS.md); the gradients are the same bit for bit.

    Raises:
        RuntimeError: the kernels cannot be built here.
    """
    return _ext().channels_last_walk()


def stream_min_bytes() -> int:
    """The traffic (bytes read plus bytes written) from which a pass of the kernels writes its
    output with streaming stores, which skip the read of each output line before it is written
    (-1: never, in a build without AVX2 or AVX512). Planar passes also need rows of at least
    512 bytes, channels-last ones rows that start on a vector boundary. The values are the same
    either way; the default is measured in BENCHMARKS.md.

    Raises:
        RuntimeError: the kernels cannot be built here.
    """
    return int(_ext().stream_min_bytes())


def set_stream_min_bytes(nbytes: int) -> None:
    """Sets :func:`stream_min_bytes` for this process (0: every pass that can stream does).

    Raises:
        ValueError: ``nbytes`` is negative or not an integer.
        RuntimeError: the kernels cannot be built here.
    """
    try:
        value = operator.index(nbytes)  # ints and numpy integers; floats and strings raise
    except TypeError:
        value = -1
    if isinstance(nbytes, bool) or value < 0:
        raise ValueError(f"the streaming threshold is a number of bytes >= 0, got {nbytes!r}")
    _ext().set_stream_min_bytes(value)


def set_channels_last_walk(walk: str) -> None:
    """Sets the walk of :func:`channels_last_walk` for this process ("rows" or "chunks").

    Raises:
        ValueError: ``walk`` is neither.
        RuntimeError: the kernels cannot be built here.
    """
    if walk not in ("rows", "chunks"):
        raise ValueError(f"the channels-last walk is 'rows' or 'chunks', got {walk!r}")
    _ext().set_channels_last_walk(walk)


def _refuse_forward_ad(*tensors: torch.Tensor | None) -> None:
    """Raise where a tensor carries a forward-mode tangent: the C++ autograd node has no
    forward-mode formula and would return the output without one."""
    if forward_ad_active(*tensors):
        raise NotImplementedError(
            "the C++ CPU kernels have no forward-mode AD formula (torch.autograd.forward_ad, "
            "torch.func.jvp); call batchnorm.functional.batch_norm, which runs PyTorch's kernel "
            "for such inputs, or torch.nn.functional.batch_norm"
        )


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """``y = gamma * (x - mu) / sqrt(var + eps) + beta`` with the C++ kernels.

    Training normalizes with the batch statistics and updates ``running_mean`` /
    ``running_var`` in place (``running = (1 - momentum) * running + momentum * batch``, the
    unbiased batch variance); eval normalizes with the running statistics.

    Args:
        input: (N, C) or (N, C, *) CPU tensor, float32 or bfloat16.
        running_mean, running_var: (C,) buffers or None (training only).
        weight, bias: (C,) gamma and beta, or None.
        training, momentum, eps: as ``torch.nn.functional.batch_norm``.

    Returns:
        y, shaped and laid out like the input (channels-last stays channels-last).

    The backward is a C++ autograd node (``CpuBatchNormBackward``), so a training step runs no
    Python after this call. Second derivatives (``create_graph=True``) are exact: the backward
    is then written with PyTorch's differentiable ops (training: through PyTorch's native batch
    norm on the saved x; eval: the affine map with the running statistics, written out).

    Raises:
        RuntimeError: the kernels cannot be built here.
        NotImplementedError: an input carries a forward-mode AD tangent (no formula for it).
    """
    if dual_level_active():
        _refuse_forward_ad(input, running_mean, running_var, weight, bias)
    # One C++ call (``batch_norm_call``): where autograd records a graph, an autograd node
    # (``CpuBatchNormBackward``) with the running statistics as detached aliases; else the
    # output alone. Either way the buffers' version counters count the in-place update, so a
    # graph that saved one before fails at backward, as with torch's kernel, instead of reading
    # the new values silently.
    return _ext().batch_norm_call(
        input, running_mean, running_var, weight, bias, training, momentum, eps
    )


def batch_norm_relu(
    input: torch.Tensor,
    residual: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    *,
    save: str = "recompute",
) -> torch.Tensor:
    """``relu(batch_norm(x) [+ residual])`` in one output pass, with the C++ kernels.

    The same numbers as the composition ``torch.relu(batch_norm(x) + residual)`` on these
    kernels (the residual is added to the batch-norm value rounded to the input's dtype), and the
    same gradients: the ReLU passes the gradient where its output is not <= 0, as torch's does.
    ``save`` chooses what the backward keeps besides x and the statistics: ``"output"`` y,
    ``"mask"`` one byte per element, ``"recompute"`` nothing (the residual, if any), the gate
    being recomputed from x with the forward's own per-channel scale and offset.

    Raises:
        RuntimeError: the kernels cannot be built here; or a second derivative is requested.
        NotImplementedError: an input carries a forward-mode AD tangent (no formula for it).
    """
    code = FusedSave(save).code
    if dual_level_active():
        _refuse_forward_ad(input, residual, running_mean, running_var, weight, bias)
    return _ext().batch_norm_relu_call(
        input, residual, running_mean, running_var, weight, bias, training, momentum, eps, code
    )
