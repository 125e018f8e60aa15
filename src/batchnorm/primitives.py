"""The batch-norm primitives every normalization layer of the project is built from.

Batch, sync, ghost, renorm, frozen, layer, instance and group normalization differ in two choices
only: the **axes** the statistics are taken over, and **where the statistics come from** (this
batch, all processes, the moving averages, fixed values). Everything else is shared, in the paper's
notation (Ioffe & Szegedy 2015, Algorithm 1 and Sec. 2 of SPEC.md):

- :func:`collect_statistics`: per statistics group, ``(m, mu_B, M2)`` with
  ``M2 = sum_i (x_i - mu_B)^2``, so that ``var_B = M2 / m``. Kept as counts and sums of squared
  deviations (never ``E[x^2] - E[x]^2``) so that partial statistics merge exactly and stably.
- :func:`merge_statistics` / :func:`combine_statistics`: Chan et al.'s parallel formulas, which
  combine partial statistics of uneven sizes (processes, ghost batches) into those of the union::

      m     = m_a + m_b
      mu    = mu_a + (mu_b - mu_a) * m_b / m
      M2    = M2_a + M2_b + (mu_b - mu_a)^2 * m_a * m_b / m

- :func:`normalize`: ``y = gamma * (x - mu) * invstd + beta`` with ``invstd = 1/sqrt(var + eps)``
  given (fixed statistics: eval mode, frozen layers); plain torch ops, differentiated by autograd.
- :func:`backward_reduce`: per group, ``sum_i dl/dy_i`` and ``sum_i dl/dy_i * xhat_i``
  (``dl/dbeta`` and ``dl/dgamma`` of batch norm).
- :func:`backward_elementwise`: ``dl/dx`` from those two sums, the closed form of SPEC.md Sec. 2::

      dl/dx_i = gamma * invstd * (dl/dy_i - sum(dl/dy) / m - xhat_i * sum(dl/dy * xhat) / m)

- :func:`normalize_over`: the four composed into one autograd function that normalizes with the
  input's own statistics over chosen axes, with an optional :class:`StatisticsReducer` that turns
  local statistics and gradient sums into global ones (one collective each way: sync batch norm).
- :func:`update_running_statistics`: PyTorch's moving averages, in place, optionally masked.

Statistics are accumulated in float32 for float16/bfloat16 inputs and in the input's dtype
otherwise (see :func:`accumulation_dtype`); with batch statistics and ``eps`` under
:data:`TINY_EPS` (``eps = 0``), in float64 (:func:`statistics_dtype`).

These are torch operations, not the project's Triton kernels: the variants built on them run
wherever torch runs. :func:`normalize_over` is twice differentiable (gradient penalties, Hessians):
its backward rebuilds the forward as a graph when it is itself recorded
(:func:`differentiate_rebuilt`, shared with the ``explicit`` and Triton backends).

Example:
    Statistics of two uneven parts merge into those of the whole batch:

    >>> import torch
    >>> x = torch.tensor([[1.0], [2.0], [4.0], [7.0], [10.0]], dtype=torch.float64)
    >>> a, b = collect_statistics(x[:2], (0,)), collect_statistics(x[2:], (0,))
    >>> whole = merge_statistics(a, b)
    >>> whole.count.item(), whole.mean.item(), round(variance(whole).item(), 12)
    (5.0, 4.8, 10.96)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import torch

from batchnorm.modes import dual_level_active, functorch_active

__all__ = [
    "TINY_EPS",
    "Moments",
    "StatisticsReducer",
    "accumulation_dtype",
    "backward_elementwise",
    "backward_reduce",
    "collect_statistics",
    "combine_statistics",
    "differentiate_rebuilt",
    "invstd",
    "merge_statistics",
    "normalize",
    "normalize_over",
    "statistics_dtype",
    "track_running_statistics",
    "update_running_statistics",
    "variance",
]


class Moments(NamedTuple):
    """Statistics of groups of values: count ``m``, mean ``mu`` and ``M2 = sum (x - mu)^2``.

    The three tensors have the same shape: the input's shape with the reduced axes kept as size 1
    (so they broadcast against the input), or a stack of such along a leading axis.

    Attributes:
        count: ``m``, the number of values in each group (floating point, same dtype as ``mean``).
        mean: ``mu = (1/m) sum_i x_i``; 0 for an empty group.
        m2: ``M2 = sum_i (x_i - mu)^2``; the biased variance is ``M2 / m``, the unbiased one
            ``M2 / (m - 1)``.
    """

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor


class StatisticsReducer(Protocol):
    """Where statistics come from beyond the local tensor (for example all processes of a group).

    :func:`normalize_over` calls :meth:`reduce_statistics` once in the forward pass and
    :meth:`reduce_gradient_sums` once in the backward pass.
    """

    def reduce_statistics(self, local: Moments) -> Moments:
        """The statistics of the union, from this part's :class:`Moments` (same shape)."""
        ...

    def reduce_gradient_sums(
        self, sum_dy: torch.Tensor, sum_dy_xhat: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The sums over the union, from this part's sums (same shapes)."""
        ...


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in: float32 for float16/bfloat16, else ``dtype``.

    Example:
        >>> accumulation_dtype(torch.float16), accumulation_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


# At eps below this, a variance of the size of float32's smallest normal values (1.2e-38) is no
# longer negligible against eps, and float32 statistics round it to a few digits or to 0: with
# eps = 0 a channel whose values spread by 1e-20 would come out as +-inf. Such calls take their
# statistics in float64 (:func:`statistics_dtype`), as the C++ CPU kernels redo such channels.
TINY_EPS = 1e-30


def statistics_dtype(dtype: torch.dtype, eps: float) -> torch.dtype:
    """The dtype normalization with batch statistics computes in: :func:`accumulation_dtype`,
    or float64 where ``eps < TINY_EPS`` (``eps = 0``), so that a tiny but nonzero variance is
    measured instead of underflowing to 0 (which would give inf or NaN outputs).

    Example:
        >>> statistics_dtype(torch.bfloat16, 1e-5), statistics_dtype(torch.float32, 0.0)
        (torch.float32, torch.float64)
    """
    acc = accumulation_dtype(dtype)
    if eps < TINY_EPS and acc in (torch.float32, torch.float16, torch.bfloat16):
        return torch.float64
    return acc


def _normalize_dims(dims: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    if isinstance(dims, int):
        dims = (dims,)
    out = []
    for d in dims:
        if not -ndim <= d < ndim:
            raise ValueError(f"axis {d} is out of range for a {ndim}-D input")
        out.append(d % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axes {tuple(dims)} repeat an axis")
    if not out:
        raise ValueError("give at least one axis to take statistics over")
    return tuple(sorted(out))


def collect_statistics(x: torch.Tensor, dims: int | Sequence[int]) -> Moments:
    """Count, mean and ``M2`` of ``x`` over the axes ``dims``, per remaining index.

    ``mu_B = (1/m) sum_i x_i`` and ``M2 = sum_i (x_i - mu_B)^2 = m * var_B``, with ``m`` the
    number of values reduced (Algorithm 1, lines 1-2). Computed with ``torch.var_mean`` (a stable
    single-pass Welford / two-pass reduction: no ``E[x^2] - E[x]^2`` cancellation) in
    :func:`accumulation_dtype`, on the values shifted by one value of each group, so that a large
    mean (``1e4 + randn``) does not cost digits. An empty reduction (``m = 0``, a process with an
    empty batch) gives ``count = mean = M2 = 0``, which merges as "no data".

    Args:
        x: Floating-point tensor.
        dims: The axes to reduce (batch norm on ``(N, C, *)``: every axis but 1).

    Returns:
        :class:`Moments` of shape ``x.shape`` with ``dims`` set to 1.

    Shape:
        - x: any, e.g. (N, C, H, W) with dims (0, 2, 3).
        - count, mean, m2: (1, C, 1, 1) in that example.

    Example:
        >>> x = torch.tensor([[1.0, 10.0], [3.0, 30.0]])
        >>> stats = collect_statistics(x, (0,))
        >>> stats.count, stats.mean, stats.m2
        (tensor([[2., 2.]]), tensor([[ 2., 20.]]), tensor([[  2., 200.]]))
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        what = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"collect_statistics expects a floating-point tensor, got {what}")
    dims = _normalize_dims(dims, x.dim())
    acc = accumulation_dtype(x.dtype)
    m = 1
    for d in dims:  # not math.prod over a generator: torch.compile cannot trace that
        m *= x.shape[d]
    kept = [1 if i in dims else s for i, s in enumerate(x.shape)]
    if m == 0 or x.numel() == 0:  # nothing to reduce, or no group at all (an empty batch of a
        # layer or group norm): var_mean would warn of degrees of freedom <= 0
        zeros = torch.zeros(kept, dtype=acc, device=x.device)
        return Moments(zeros, zeros.clone(), zeros.clone())
    xa = x.to(acc)
    # Shifted by one value of each group (exact in floating point): the reduction then runs over
    # deviations of the size of the spread, not of the mean, so 1e4 + randn keeps its digits.
    shift = xa
    for d in dims:
        shift = shift.narrow(d, 0, 1)
    var, shifted_mean = torch.var_mean(xa - shift, dim=dims, correction=0, keepdim=True)
    count = torch.ones_like(shifted_mean) * m  # not float(m): keeps a traced batch size symbolic
    return Moments(count, shifted_mean + shift, var * m)


def merge_statistics(a: Moments, b: Moments) -> Moments:
    """Chan et al.'s pairwise merge: the statistics of the union of two parts.

    With ``delta = mu_b - mu_a`` and ``m = m_a + m_b``::

        mu = mu_a + delta * m_b / m
        M2 = M2_a + M2_b + delta^2 * m_a * m_b / m

    exact for any counts (an empty part, ``m = 0``, leaves the other unchanged).

    Args:
        a, b: :class:`Moments` of the same (or broadcastable) shapes.

    Returns:
        The merged :class:`Moments`.

    Example:
        >>> one = Moments(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([2.0]))
        >>> empty = Moments(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]))
        >>> merged = merge_statistics(one, empty)
        >>> merged.count.item(), merged.mean.item(), merged.m2.item()
        (2.0, 1.0, 2.0)
    """
    count = a.count + b.count
    delta = b.mean - a.mean
    share_b = torch.where(count > 0, b.count / count.clamp_min(1), torch.zeros_like(count))
    mean = a.mean + delta * share_b
    m2 = a.m2 + b.m2 + delta * delta * a.count * share_b
    return Moments(count, mean, m2)


def combine_statistics(parts: Moments, dim: int = 0) -> Moments:
    """Merge many partial statistics stacked along ``dim`` (the axis is removed).

    The many-part form of :func:`merge_statistics`, with ``m = sum_k m_k``::

        mu = sum_k m_k mu_k / m
        M2 = sum_k M2_k + sum_k m_k (mu_k - mu)^2

    Parts may have different counts, including 0 (a process with an empty batch).

    Args:
        parts: :class:`Moments` whose tensors stack the parts along ``dim``.
        dim: The stacking axis.

    Returns:
        :class:`Moments` with ``dim`` reduced away.

    Example:
        >>> parts = Moments(torch.tensor([2.0, 0.0, 3.0]), torch.tensor([1.0, 0.0, 6.0]),
        ...                 torch.tensor([2.0, 0.0, 8.0]))
        >>> whole = combine_statistics(parts)
        >>> whole.count.item(), whole.mean.item(), whole.m2.item()  # 2 + 8 + 2*9 + 3*4
        (5.0, 4.0, 40.0)
    """
    count = parts.count.sum(dim)
    mean = (parts.count * parts.mean).sum(dim) / count.clamp_min(1)
    deviation = parts.mean - mean.unsqueeze(dim)
    m2 = parts.m2.sum(dim) + (parts.count * deviation * deviation).sum(dim)
    return Moments(count, mean, m2)


def variance(stats: Moments, *, unbiased: bool = False) -> torch.Tensor:
    """``var_B = M2 / m`` (biased, what training normalizes with) or ``M2 / (m - 1)``.

    NaN or Inf where the count is too small (0 values, or 1 for the unbiased variance); callers
    that must not propagate that mask it (see :func:`update_running_statistics`).

    Example:
        >>> stats = Moments(torch.tensor([4.0]), torch.tensor([0.0]), torch.tensor([6.0]))
        >>> variance(stats), variance(stats, unbiased=True)
        (tensor([1.5000]), tensor([2.]))
    """
    return stats.m2 / (stats.count - 1 if unbiased else stats.count)


def invstd(var: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / sqrt(var + eps)``, the reciprocal of the paper's ``sqrt(var_B + eps)``."""
    return torch.rsqrt(var + eps)


def normalize(
    x: torch.Tensor,
    mean: torch.Tensor,
    inv_std: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = gamma * (x - mu) * invstd + beta`` with given statistics (autograd-differentiable).

    For fixed statistics (eval mode, frozen layers) this is the affine map of SPEC.md Sec. 3 and
    its gradient is ``dl/dx = dl/dy * gamma * invstd``. The arithmetic is done in the statistics'
    dtype (float32 for a float16 input with float32 statistics) and the result cast to ``x``'s.
    The running buffers passed here are only read, and never saved for the backward pass, so
    updating them in place later cannot break a pending backward.

    Args:
        x: The input.
        mean, inv_std: Statistics broadcastable against ``x`` (e.g. (1, C, 1, 1)).
        weight, bias: ``gamma`` and ``beta`` broadcastable against ``x``, or None.

    Returns:
        ``y`` with ``x``'s shape and dtype.

    Example:
        >>> x = torch.tensor([[1.0], [3.0]])
        >>> normalize(x, torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([2.0]),
        ...           torch.tensor([5.0]))
        tensor([[3.],
                [7.]])
    """
    y = (x.to(mean.dtype) - mean) * inv_std
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


def backward_reduce(
    dy: torch.Tensor, xhat: torch.Tensor, dims: int | Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, ``sum_i dl/dy_i`` and ``sum_i dl/dy_i * xhat_i`` over the axes ``dims``.

    For batch norm these are ``dl/dbeta`` and ``dl/dgamma`` (SPEC.md Sec. 2), and, times
    ``gamma``, the two sums ``dl/dx`` needs (:func:`backward_elementwise`).

    Args:
        dy: Gradient of the loss with respect to the output.
        xhat: The normalized input, same shape.
        dims: Axes to sum over.

    Returns:
        ``(sum_dy, sum_dy_xhat)``, shaped like :func:`collect_statistics`'s result.

    Example:
        >>> dy, xhat = torch.tensor([[1.0], [2.0]]), torch.tensor([[-1.0], [1.0]])
        >>> backward_reduce(dy, xhat, (0,))
        (tensor([[3.]]), tensor([[1.]]))
    """
    dims = _normalize_dims(dims, dy.dim())
    return dy.sum(dims, keepdim=True), (dy * xhat).sum(dims, keepdim=True)


def backward_elementwise(
    dy: torch.Tensor,
    xhat: torch.Tensor,
    inv_std: torch.Tensor,
    sum_dy: torch.Tensor,
    sum_dy_xhat: torch.Tensor,
    count: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dl/dx`` of normalization with batch statistics, from the sums of :func:`backward_reduce`.

    ::

        dl/dx_i = gamma * invstd * (dl/dy_i - sum(dl/dy) / m - xhat_i * sum(dl/dy * xhat) / m)

    the closed form of the paper's chain rule (SPEC.md Sec. 2): the last two terms are the paths
    through ``mu_B`` and ``var_B``. ``gamma`` must be constant over each group (batch norm);
    otherwise pass ``dy = dl/dy * gamma`` with its sums and ``weight=None``.

    Args:
        dy: ``dl/dy`` (or ``dl/dxhat`` when ``weight`` is None).
        xhat: The normalized input.
        inv_std: ``1 / sqrt(var_B + eps)`` per group.
        sum_dy, sum_dy_xhat: The two sums per group, over all ``m`` values of the group (global
            sums for sync batch norm).
        count: ``m`` per group.
        weight: ``gamma`` per group, or None.

    Returns:
        ``dl/dx``, shaped like ``dy``.

    Example:
        >>> xhat = torch.tensor([[-1.0], [1.0]])
        >>> dy = torch.tensor([[1.0], [1.0]])  # a constant shift of y: no gradient reaches x
        >>> s, sx = backward_reduce(dy, xhat, (0,))
        >>> backward_elementwise(dy, xhat, torch.tensor([[1.0]]), s, sx, torch.tensor([[2.0]]))
        tensor([[0.],
                [0.]])
    """
    scale = inv_std if weight is None else inv_std * weight
    return scale * (dy - sum_dy / count - xhat * (sum_dy_xhat / count))


def _affine_matches(
    param: torch.Tensor | None, stats_shape: torch.Size, dims: tuple[int, ...]
) -> bool:
    """Whether ``param`` has exactly one value per statistics group (batch-norm layout).

    Only where the batch axis 0 is reduced: per-sample statistics (layer, group, instance norm)
    never share a parameter layout, and comparing with the batch size would tie an exported or
    compiled graph to one batch size.
    """
    if param is None:
        return True
    return 0 in dims and tuple(param.shape) == tuple(stats_shape)


def _normalize_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    dims: tuple[int, ...],
    eps: float,
    reducer: StatisticsReducer | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward of the normalize-over Functions: y, then count, mean, M2 and invstd (the
    statistics are outputs so that :func:`_save_context` can keep them without computing)."""
    stats = collect_statistics(x.to(statistics_dtype(x.dtype, eps)), dims)
    if reducer is not None:
        stats = reducer.reduce_statistics(stats)
    inv_std = invstd(variance(stats), eps)
    xhat = (x.to(stats.mean.dtype) - stats.mean) * inv_std
    y = xhat
    if weight is not None:
        y = y * weight.to(xhat.dtype)
    if bias is not None:
        y = y + bias.to(xhat.dtype)
    return y.to(x.dtype), stats.count, stats.mean, stats.m2, inv_std


def _save_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...], tangents: bool):
    """``setup_context`` of the normalize-over Functions; ``tangents``: also save for a ``jvp``."""
    x, weight, bias, dims, eps, reducer = inputs
    _, count, mean, m2, inv_std = output
    ctx.dims = dims
    ctx.eps = eps
    ctx.reducer = reducer
    ctx.x_dtype = x.dtype
    ctx.bias_shape = None if bias is None else bias.shape
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.matched = _affine_matches(weight, mean.shape, dims) and _affine_matches(
        bias, mean.shape, dims
    )
    # x rather than xhat: the same bytes (fewer for 16-bit inputs), xhat is recomputed
    # exactly, and a differentiable backward can rebuild the forward from x.
    ctx.save_for_backward(x, mean, inv_std, count, weight, bias)
    if tangents:
        ctx.save_for_forward(x, mean, inv_std, count, weight)
    ctx.mark_non_differentiable(count, mean, m2, inv_std)


class _NormalizeOverFunction(torch.autograd.Function):
    """Normalization with the input's own statistics; backward by the two primitives.

    Written with ``setup_context`` and a generated vmap rule, so that torch.func transforms
    (grad, jacrev, vmap, functional_call) run it as they run PyTorch's own ops."""

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        dims: tuple[int, ...],
        eps: float,
        reducer: StatisticsReducer | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _normalize_forward(x, weight, bias, dims, eps, reducer)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
        _save_context(ctx, inputs, output, tangents=False)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor, *unused: Any) -> tuple[Any, ...]:
        x, mean, inv_std, count, weight, bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # backward(create_graph=True): gradients of gradients
            return _differentiable_backward(ctx, dy, x, weight, bias)
        dims, reducer = ctx.dims, ctx.reducer
        xhat = (x.to(mean.dtype) - mean) * inv_std
        dy = dy.to(xhat.dtype)
        need_x = ctx.needs_input_grad[0] or reducer is not None  # every process joins
        dx = dweight = dbias = None
        w = None if weight is None else weight.to(xhat.dtype)
        if ctx.matched:
            # Batch-norm layout: gamma is constant over each group, so one reduction gives the
            # parameter gradients (local sums: DDP adds them up) and, times gamma, dl/dx's sums.
            sum_dy, sum_dy_xhat = backward_reduce(dy, xhat, dims)
            if weight is not None:
                dweight = sum_dy_xhat.to(weight.dtype)
            if ctx.bias_shape is not None:
                dbias = sum_dy.to(ctx.bias_dtype)
            if need_x:
                if reducer is not None:
                    sum_dy, sum_dy_xhat = reducer.reduce_gradient_sums(sum_dy, sum_dy_xhat)
                dx = backward_elementwise(dy, xhat, inv_std, sum_dy, sum_dy_xhat, count, w)
        else:
            # gamma varies within a group (layer/group/instance norm, ghost batches): reduce
            # dl/dxhat = dl/dy * gamma for dl/dx, and dl/dy, dl/dy * xhat for the parameters.
            if weight is not None:
                dweight = (dy * xhat).sum_to_size(weight.shape).to(weight.dtype)
            if ctx.bias_shape is not None:
                dbias = dy.sum_to_size(ctx.bias_shape).to(ctx.bias_dtype)
            if need_x:
                g = dy if w is None else dy * w
                sum_g, sum_g_xhat = backward_reduce(g, xhat, dims)
                if reducer is not None:
                    sum_g, sum_g_xhat = reducer.reduce_gradient_sums(sum_g, sum_g_xhat)
                dx = backward_elementwise(g, xhat, inv_std, sum_g, sum_g_xhat, count)
        if dx is not None:
            dx = dx.to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return dx, dweight, dbias, None, None, None


class _NormalizeOverTangents(_NormalizeOverFunction):
    """:class:`_NormalizeOverFunction` with a forward-mode formula, for calls under
    ``torch.autograd.forward_ad`` (:func:`normalize_over` picks it there). A class of its own:
    Dynamo does not trace an autograd Function that defines ``jvp``, and ``torch.compile`` of
    the primitives must stay one graph."""

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
        """The base class's context, saving for the jvp too."""
        _save_context(ctx, inputs, output, tangents=True)

    @staticmethod
    def jvp(ctx: Any, x_t: Any, weight_t: Any, bias_t: Any, *unused: Any) -> tuple[Any, ...]:
        """Forward-mode AD (``torch.autograd.forward_ad``, ``torch.func.jvp``): the tangent of
        y for tangents of x, gamma and beta.

        ::

            t_xhat = invstd * (t_x - mean(t_x) - xhat * mean(xhat * t_x))

        over each group (the paths through mu and var, as in :func:`backward_elementwise`,
        whose form it shares; the sums are global under a reducer, as the backward's), then
        ``t_y = gamma * t_xhat + xhat * t_gamma + t_beta``. The statistics outputs are not
        differentiable (no tangent).
        """
        x, mean, inv_std, count, weight = ctx.saved_tensors
        xhat = (x.to(mean.dtype) - mean) * inv_std
        t_y = torch.zeros_like(xhat)
        if x_t is not None:
            t = x_t.to(xhat.dtype)
            sum_t, sum_t_xhat = backward_reduce(t, xhat, ctx.dims)
            if ctx.reducer is not None:
                sum_t, sum_t_xhat = ctx.reducer.reduce_gradient_sums(sum_t, sum_t_xhat)
            t_xhat = backward_elementwise(t, xhat, inv_std, sum_t, sum_t_xhat, count)
            t_y = t_xhat if weight is None else t_xhat * weight.to(xhat.dtype)
        if weight_t is not None:
            t_y = t_y + xhat * weight_t.to(xhat.dtype)
        if bias_t is not None:
            t_y = t_y + bias_t.to(xhat.dtype)
        return t_y.to(ctx.x_dtype), None, None, None, None


def _differentiable_backward(
    ctx: Any,
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> tuple[Any, ...]:
    """The backward pass as a graph of its own (double backward: gradient penalties, Hessians).

    The forward is rebuilt from ``x`` with differentiable ops and differentiated by autograd with
    ``create_graph=True``; the first derivatives equal the hand-derived ones to rounding.
    """
    if ctx.reducer is not None:
        raise RuntimeError(
            "synchronized batch norm has no second derivative across processes "
            "(backward(create_graph=True) was called); compute gradient penalties with a "
            "per-process norm, e.g. convert the model back with revert_sync_batchnorm"
        )

    def rebuild(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None):
        acc = statistics_dtype(x.dtype, ctx.eps)
        var, mean = torch.var_mean(x.to(acc), dim=ctx.dims, correction=0, keepdim=True)
        y = (x.to(acc) - mean) * torch.rsqrt(var + ctx.eps)
        if weight is not None:
            y = y * weight.to(acc)
        if bias is not None:
            y = y + bias.to(acc)
        return y.to(ctx.x_dtype)

    grads = differentiate_rebuilt(rebuild, (x, weight, bias), ctx.needs_input_grad[:3], dy)
    return (*grads, None, None, None)


def differentiate_rebuilt(
    forward: Any,
    inputs: Sequence[torch.Tensor | None],
    needs_input_grad: Sequence[bool],
    grad_output: torch.Tensor,
) -> list[torch.Tensor | None]:
    """Gradients of ``forward(*inputs)`` as a differentiable graph (``create_graph=True``).

    The shared double-backward mechanism of the hand-written autograd functions (the primitives,
    the ``explicit`` backend, the Triton kernels): inside a backward pass that is itself being
    recorded (``torch.is_grad_enabled()``, i.e. ``backward(create_graph=True)``,
    ``torch.autograd.functional.hessian``), rebuild the forward from the saved inputs with
    differentiable torch ops and let autograd differentiate it, so that second derivatives are
    exact instead of silently zero.

    Args:
        forward: Callable of the inputs giving the output, in differentiable torch ops.
        inputs: The saved inputs (None for absent optional ones).
        needs_input_grad: Which inputs want a gradient (``ctx.needs_input_grad``).
        grad_output: ``dl/dy``.

    Returns:
        One gradient (or None) per input.
    """
    out: list[torch.Tensor | None] = [None] * len(inputs)
    if functorch_active():
        # Under torch.func (grad, jacrev, hessian) the backward always runs "with a graph", and
        # the outer transforms differentiate what it computes: the rebuilt forward's vjp, taken
        # with torch.func itself (autograd.grad does not see the transforms' wrapped tensors).
        wanted = [
            i for i, t in enumerate(inputs)
            if t is not None and i < len(needs_input_grad) and needs_input_grad[i]
        ]  # fmt: skip
        if not wanted:
            return out

        def forward_of_wanted(*wanted_inputs: torch.Tensor) -> torch.Tensor:
            full = list(inputs)
            for i, t in zip(wanted, wanted_inputs):
                full[i] = t
            return forward(*full)

        _, pullback = torch.func.vjp(forward_of_wanted, *[inputs[i] for i in wanted])
        for i, g in zip(wanted, pullback(grad_output)):
            out[i] = g
        return out
    wanted = [
        i for i, t in enumerate(inputs)
        if t is not None and t.requires_grad and i < len(needs_input_grad) and needs_input_grad[i]
    ]  # fmt: skip
    if not wanted:
        return out
    with torch.enable_grad():
        y = forward(*inputs)
        grads = torch.autograd.grad(
            y, [inputs[i] for i in wanted], grad_output, create_graph=True, allow_unused=True
        )
    for i, g in zip(wanted, grads):
        out[i] = g if g is not None else torch.zeros_like(inputs[i])
    return out


def normalize_over(
    x: torch.Tensor,
    dims: int | Sequence[int],
    eps: float,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    reducer: StatisticsReducer | None = None,
) -> tuple[torch.Tensor, Moments]:
    """Normalize ``x`` with its own statistics over ``dims``: Algorithm 1 on chosen axes.

    Per group (every index of the axes not in ``dims``)::

        mu_B, var_B = mean and biased variance over dims   (collect_statistics, then reducer)
        xhat        = (x - mu_B) / sqrt(var_B + eps)
        y           = gamma * xhat + beta

    The backward pass is :func:`backward_reduce` then :func:`backward_elementwise` (with the
    reducer's global sums in between), so the gradient flows through ``mu_B`` and ``var_B``.
    Batch norm is ``dims = (0, 2, ...)``; layer norm the trailing axes; instance norm the spatial
    axes; group norm the axes of a ``(N, G, C/G, *)`` view; ghost batch norm the axes of a
    ``(G, N/G, C, *)`` view; sync batch norm adds a reducer over processes.

    Args:
        x: Floating-point input.
        dims: Axes to take the statistics over.
        eps: Added to the variance: >= 0 for batch norm (its callers check); layer, group and
            instance norm accept a negative one, as torch does (NaN where var_B < -eps).
        weight, bias: ``gamma`` and ``beta``, broadcastable against ``x`` (batch norm: shaped
            (1, C, 1, ...)), or None.
        reducer: Turns local statistics and gradient sums into global ones; called exactly once
            in the forward and once in the backward (even if ``x`` needs no gradient).

    Returns:
        ``(y, stats)``: the output (``x``'s dtype) and the :class:`Moments` used (global if a
        reducer is given), detached, for running statistics.

    Example:
        >>> x = torch.tensor([[0.23, 1.26, -2.41], [0.56, 0.75, 1.00]], dtype=torch.float64)
        >>> y, stats = normalize_over(x, (0,), eps=0.0)
        >>> y.round(decimals=12)
        tensor([[-1.,  1., -1.],
                [ 1., -1.,  1.]], dtype=torch.float64)
        >>> stats.count.flatten().tolist(), [round(m, 12) for m in stats.mean.flatten().tolist()]
        ([2.0, 2.0, 2.0], [0.395, 1.005, -0.705])
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        what = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"normalize_over expects a floating-point tensor, got {what}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite number, got {eps!r}")
    dims = _normalize_dims(dims, x.dim())
    function = _NormalizeOverTangents if dual_level_active() else _NormalizeOverFunction
    y, count, mean, m2, _ = function.apply(x, weight, bias, dims, float(eps), reducer)
    return y, Moments(count, mean, m2)


@torch.no_grad()
def update_running_statistics(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    unbiased_var: torch.Tensor,
    momentum: float | torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
) -> None:
    """PyTorch's moving averages, in place: ``running = (1 - momentum) * running + momentum * new``.

    ``running_var`` receives the *unbiased* variance (PyTorch's convention, SPEC.md Sec. 3).
    ``momentum`` is the weight of the new batch (0.1 by default in torch; ``1 / k`` on the
    ``k``-th batch for a cumulative average). Where ``mask`` is False the old values are kept
    (a batch with one value per channel, or a non-finite one under ``nonfinite="skip"``); no
    host synchronization either way.

    Args:
        running_mean, running_var: Buffers of shape (C,), updated in place.
        mean, unbiased_var: New statistics with C elements (any shape), e.g. (1, C, 1, 1).
        momentum: A float in [0, 1] or a 0-d tensor.
        mask: Optional boolean tensor broadcastable to (C,).

    Example:
        >>> rm, rv = torch.zeros(1), torch.ones(1)
        >>> update_running_statistics(rm, rv, torch.tensor([1.0]), torch.tensor([3.0]), 0.5)
        >>> rm, rv
        (tensor([0.5000]), tensor([2.]))
    """
    new_mean = mean.reshape(running_mean.shape).to(running_mean.dtype)
    new_var = unbiased_var.reshape(running_var.shape).to(running_var.dtype)
    if isinstance(momentum, torch.Tensor):
        momentum = momentum.to(device=running_mean.device, dtype=running_mean.dtype)
    # PyTorch's form, (1 - m) * running + m * new: at m = 1 it gives exactly the new value (the
    # form running + m * (new - running) cancels to 0 when running is large against new).
    updated_mean = running_mean * (1 - momentum) + new_mean * momentum
    updated_var = running_var * (1 - momentum) + new_var * momentum
    if mask is not None:
        mask = mask.reshape(-1) if mask.numel() > 1 else mask.reshape(())
        updated_mean = torch.where(mask, updated_mean, running_mean)
        updated_var = torch.where(mask, updated_var, running_var)
    try:
        running_mean.copy_(updated_mean)
    except RuntimeError as error:
        if functorch_active() and "vmap" in str(error):
            # vmap of a training step with unbatched buffers: nothing was written yet.
            raise RuntimeError(
                "batch norm under torch.func.vmap: the batch statistics are batched but the "
                "running statistics they would update in place are not. Inside vmap use "
                "track_running_stats=False or eval mode, or batch the buffers too "
                "(torch.func.stack_module_state and functional_call)"
            ) from error
        raise
    running_var.copy_(updated_var)


@torch.no_grad()
def track_running_statistics(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    num_batches_tracked: torch.Tensor | None,
    mean: torch.Tensor,
    unbiased_var: torch.Tensor,
    momentum: float | None,
    *,
    valid: torch.Tensor | None = None,
    nonfinite: str = "propagate",
    who: str = "batch norm",
) -> torch.Tensor | None:
    """The one running-statistics step of the batch-norm layers: moving averages and count.

    Used by every layer that keeps batch norm's state outside PyTorch's kernel (sync, ghost,
    renorm): ``momentum`` is PyTorch's (the weight of the new batch; None: the cumulative
    average, weight ``1/k`` on the k-th counted batch, read from ``num_batches_tracked`` without
    a host synchronization); ``valid`` masks batches that must not count (e.g. one value per
    channel); ``nonfinite`` decides what a NaN/Inf in the new statistics does: "propagate"
    (torch's behaviour), "skip" (the buffers and the count keep their values), or "raise" (a
    ``FloatingPointError`` before anything changes; one host synchronization).

    Args:
        running_mean, running_var: (C,) buffers, updated in place.
        num_batches_tracked: the 0-d count buffer (incremented where the batch counted), or None.
        mean, unbiased_var: the batch's statistics with C elements.
        momentum: a float in [0, 1], or None for the cumulative average.
        valid: optional 0-d bool tensor.
        nonfinite: "propagate", "skip" or "raise".
        who: the layer's name, for the error message.

    Returns:
        The 0-d bool tensor of whether the batch counted, or None (always counted).

    Example:
        >>> rm, rv, k = torch.zeros(1), torch.ones(1), torch.tensor(0)
        >>> _ = track_running_statistics(rm, rv, k, torch.tensor([4.0]), torch.tensor([3.0]), None)
        >>> rm, rv, k  # cumulative average after one batch: that batch's statistics
        (tensor([4.]), tensor([3.]), tensor(1))
    """
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError(
                f"{who}: momentum=None (cumulative average) needs num_batches_tracked; "
                "build the layer with track_running_stats=True"
            )
        factor: float | torch.Tensor = 1.0 / (num_batches_tracked.to(torch.float64) + 1)
    else:
        factor = momentum
    counted = valid
    if nonfinite != "propagate":
        finite = torch.isfinite(mean).all() & torch.isfinite(unbiased_var).all()
        if nonfinite == "raise" and not bool(finite):
            raise FloatingPointError(
                f"{who}: the batch statistics hold NaN/Inf (the input does, or its values "
                "overflow); the running statistics were not updated. Find where they come from, "
                "or pass nonfinite='skip' to keep training while protecting them."
            )
        counted = finite if counted is None else counted & finite
    update_running_statistics(running_mean, running_var, mean, unbiased_var, factor, mask=counted)
    if num_batches_tracked is not None:
        if counted is None:
            num_batches_tracked.add_(1)
        else:
            num_batches_tracked.add_(counted.to(num_batches_tracked.dtype))
    return counted
