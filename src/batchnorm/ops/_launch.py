"""Launchers: torch tensors in, Triton kernels run, torch tensors out (no autograd here).

:func:`forward` and :func:`backward` take the (N, C, *) tensors, find their (A, C, B) view
(copying only inputs the kernels cannot address), pick a cached :class:`~batchnorm.ops._plan.Plan`
and launch the kernels of :mod:`batchnorm.ops._kernels`:

- training forward: fused path, one launch; split path, stats + combine + apply (three launches).
- eval forward: one launch.
- backward: training fused, one launch; training split, reduce + combine + apply; eval, one
  launch (dx, plus partial sums when dgamma/dbeta are wanted) and a combine.
"""

from __future__ import annotations

import torch

from batchnorm.ops import _kernels as K
from batchnorm.ops._layout import View3, canonical, like
from batchnorm.ops._plan import Plan, interpreting, make_plan

COMBINE_BLOCK_S = 32


def _device_index(x: torch.Tensor) -> int | None:
    if x.device.type == "cuda" and not interpreting():
        return x.device.index if x.device.index is not None else torch.cuda.current_device()
    return None


def _plan(view: View3, x: torch.Tensor, needs_mask: bool) -> Plan:
    return make_plan(view, x.element_size(), needs_mask, _device_index(x))


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.is_contiguous() else t.contiguous()


def _mask_strides(view: View3) -> tuple[int, int, int]:
    _, c, b = view.mask_shape()
    return (c * b, b, 1)


def forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    residual: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    relu: bool,
    save_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch norm forward, optionally fused with a residual add and a ReLU.

    Returns:
        ``(y, stats, mask)``: y like x; stats, (3, C) float32, the statistics used (batch ones in
        training, running ones in eval): rows mean, mean_lo (mu = mean + mean_lo, see
        ``_kernels``) and invstd; mask, the packed uint8 ReLU mask (``View3.mask_shape()``) when
        ``save_mask``, else an empty uint8 tensor. The running statistics are updated in place
        in training.
    """
    x, view = canonical(x)
    y = torch.empty_like(x)
    channels = view.c
    # Per-channel tensors are indexed as contiguous; strided ones (w[::2]) are copied, and the
    # running statistics copied back after their in-place update.
    weight, bias = _contiguous(weight), _contiguous(bias)
    given_stats = (running_mean, running_var)
    running_mean, running_var = _contiguous(running_mean), _contiguous(running_var)
    stats = torch.empty((3, channels), device=x.device, dtype=torch.float32)
    mean, mean_lo, invstd = stats[0], stats[1], stats[2]
    needs_mask = relu and save_mask
    if needs_mask:
        mask = torch.empty(view.mask_shape(), device=x.device, dtype=torch.uint8)
    else:
        mask = torch.empty(0, device=x.device, dtype=torch.uint8)
    z = like(residual, x) if residual is not None else None
    plan = _plan(view, x, needs_mask)
    has_running = training and running_mean is not None
    m = view.per_channel
    unbias = m / (m - 1) if m > 1 else 1.0
    dummy = mean
    tiles = plan.tiles
    blocks = dict(BLOCK_A=plan.block_a, BLOCK_C=plan.block_c, BLOCK_B=plan.block_b)
    geometry = (view.a, view.c, view.b, view.stride_a, view.stride_c, view.stride_b)
    mask_strides = _mask_strides(view)

    if not training:
        mode, programs = K.MODE_EVAL, plan.apply_programs
    elif plan.fused:
        mode, programs = K.MODE_TRAIN_FUSED, 1
    else:
        mode, programs = K.MODE_TRAIN, plan.apply_programs
        parts = torch.empty((3, plan.splits, channels), device=x.device, dtype=torch.float32)
        K.fwd_stats_kernel[(plan.channel_blocks, plan.splits)](
            x, parts[0], parts[1], parts[2], *geometry, plan.tiles_b, tiles,
            plan.tiles_per_split, **blocks, INDEX_64=plan.index_64, num_warps=plan.num_warps,
        )  # fmt: skip
        K.fwd_combine_kernel[(plan.channel_blocks,)](
            x, parts[0], parts[1], parts[2], mean, mean_lo, invstd,
            running_mean if has_running else dummy, running_var if has_running else dummy,
            channels, view.stride_c, plan.splits, float(eps), float(momentum), float(unbias),
            BLOCK_S=COMBINE_BLOCK_S, BLOCK_C=plan.block_c, HAS_RUNNING=has_running,
            INDEX_64=plan.index_64, num_warps=4,
        )  # fmt: skip
    tiles_per_program = -(-tiles // programs)
    programs = -(-tiles // tiles_per_program)
    K.fwd_apply_kernel[(plan.channel_blocks, programs)](
        x, y, z if z is not None else x, mask if needs_mask else x,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        mean, mean_lo, invstd,
        running_mean if running_mean is not None else dummy,
        running_var if running_var is not None else dummy,
        *geometry, *mask_strides, plan.tiles_b, tiles, tiles_per_program,
        float(eps), float(momentum), float(unbias),
        **blocks, INDEX_64=plan.index_64, MODE=mode,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        HAS_RUNNING=has_running, HAS_RESIDUAL=z is not None, RELU=relu, SAVE_MASK=needs_mask,
        PACK_B=view.pack_b, num_warps=plan.num_warps,
    )  # fmt: skip
    for given, used in zip(given_stats, (running_mean, running_var)):
        if given is not None and given is not used and training:
            given.copy_(used)
    return y, stats, mask


def backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    stats: torch.Tensor,
    gate: torch.Tensor | None,
    residual: torch.Tensor | None,
    training: bool,
    gate_mode: int,
    has_residual: bool,
    param_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`forward` given dl/dy (``grad_out``).

    Args:
        stats: the (3, C) statistics returned by :func:`forward`.
        gate: what the ReLU gate reads (``gate_mode``): the output y (GATE_OUTPUT), the packed
            mask (GATE_MASK), or None (GATE_NONE, GATE_RECOMPUTE).
        residual: the residual z when the gate is recomputed for a fused add, else None.
        has_residual: the forward added a residual: also return dz.
        param_grads: also return dgamma and dbeta.

    Returns:
        ``(dx, dweight, dbias, dresidual)``; the last three are empty tensors where not asked for
        (or where the parameter is None).
    """
    x, view = canonical(x)
    dy = like(grad_out, x)
    weight, bias = _contiguous(weight), _contiguous(bias)
    dx = torch.empty_like(x)
    dz = torch.empty_like(x) if has_residual else x.new_empty(0)
    write_dw = param_grads and weight is not None
    write_db = param_grads and bias is not None
    dweight = torch.empty_like(weight) if write_dw else x.new_empty(0)
    dbias = torch.empty_like(bias) if write_db else x.new_empty(0)
    needs_mask = gate_mode == K.GATE_MASK
    plan = _plan(view, x, needs_mask)
    channels = view.c
    if gate_mode == K.GATE_OUTPUT:
        assert gate is not None
        gate_t = like(gate, x)
    elif gate_mode == K.GATE_MASK:
        assert gate is not None and tuple(gate.shape) == view.mask_shape()
        gate_t = gate
    else:
        gate_t = x
    gate_residual = gate_mode == K.GATE_RECOMPUTE and residual is not None
    z = like(residual, x) if gate_residual else x
    dummy = stats[0]
    tiles = plan.tiles
    blocks = dict(BLOCK_A=plan.block_a, BLOCK_C=plan.block_c, BLOCK_B=plan.block_b)
    geometry = (view.a, view.c, view.b, view.stride_a, view.stride_c, view.stride_b)
    mask_strides = _mask_strides(view)
    flags = dict(
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        GATE=gate_mode,
        GATE_RESIDUAL=gate_residual,
        PACK_B=view.pack_b,
    )
    common = (gate_t, z, weight if weight is not None else dummy,
              bias if bias is not None else dummy, stats[0], stats[1], stats[2])  # fmt: skip
    eval_partials = not training and (write_dw or write_db)

    if training and plan.fused:
        mode, programs = K.MODE_TRAIN_FUSED, 1
        sums = (dummy, dummy)
    elif training:
        mode, programs = K.MODE_TRAIN, plan.apply_programs
        parts = torch.empty((2, plan.splits, channels), device=x.device, dtype=torch.float32)
        K.bwd_reduce_kernel[(plan.channel_blocks, plan.splits)](
            dy, x, *common, parts[0], parts[1], *geometry, *mask_strides, plan.tiles_b, tiles,
            plan.tiles_per_split, **blocks, INDEX_64=plan.index_64, **flags,
            num_warps=plan.num_warps,
        )  # fmt: skip
        sums_buf = torch.empty((2, channels), device=x.device, dtype=torch.float32)
        sums = (sums_buf[0], sums_buf[1])
        K.bwd_combine_kernel[(plan.channel_blocks,)](
            parts[0], parts[1], sums[0], sums[1],
            dweight if write_dw else dummy, dbias if write_db else dummy,
            channels, plan.splits, BLOCK_S=COMBINE_BLOCK_S, BLOCK_C=plan.block_c,
            WRITE_DWEIGHT=write_dw, WRITE_DBIAS=write_db, num_warps=4,
        )  # fmt: skip
    else:
        mode = K.MODE_EVAL
        # With parameter gradients the eval pass also reduces: one program per split.
        programs = plan.splits if eval_partials else plan.apply_programs
        if eval_partials:
            parts = torch.empty((2, programs, channels), device=x.device, dtype=torch.float32)
            sums = (parts[0], parts[1])
        else:
            sums = (dummy, dummy)
    tiles_per_program = -(-tiles // programs)
    programs = -(-tiles // tiles_per_program)
    K.bwd_apply_kernel[(plan.channel_blocks, programs)](
        dy, x, *common, sums[0], sums[1], dx, dz if has_residual else dx,
        dweight if write_dw else dummy, dbias if write_db else dummy,
        *geometry, *mask_strides, plan.tiles_b, tiles, tiles_per_program,
        1.0 / view.per_channel, **blocks, INDEX_64=plan.index_64, MODE=mode,
        WRITE_DZ=has_residual, WRITE_DWEIGHT=write_dw and mode == K.MODE_TRAIN_FUSED,
        WRITE_DBIAS=write_db and mode == K.MODE_TRAIN_FUSED, EVAL_PARTIALS=eval_partials,
        **flags, num_warps=plan.num_warps,
    )  # fmt: skip
    if eval_partials:
        totals = torch.empty((2, channels), device=x.device, dtype=torch.float32)
        K.bwd_combine_kernel[(plan.channel_blocks,)](
            sums[0], sums[1], totals[0], totals[1],
            dweight if write_dw else dummy, dbias if write_db else dummy,
            channels, programs, BLOCK_S=COMBINE_BLOCK_S, BLOCK_C=plan.block_c,
            WRITE_DWEIGHT=write_dw, WRITE_DBIAS=write_db, num_warps=4,
        )  # fmt: skip
    return dx, dweight, dbias, dz
