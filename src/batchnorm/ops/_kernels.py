"""Triton kernels for batch normalization over an (A, C, B) strided view (see ``_layout``).

Notation (SPEC.md, the paper's Algorithm 1), per channel over its m = A * B values::

    mu_B = (1/m) sum_i x_i,   var_B = (1/m) sum_i (x_i - mu_B)^2,   invstd = 1 / sqrt(var_B + eps)
    y_i  = gamma * (x_i - mu_B) * invstd + beta            (then + z_i, then ReLU, when fused)

Statistics are exact two-pass per tile and merged across tiles with Chan's formula, all shifted
by a pivot K (the channel's first value) so that a large mean costs no accuracy::

    tile:  n_t, d_t = mean(x - K), M2_t = sum((x - K - d_t)^2)
    merge: n = n_a + n_b, delta = d_b - d_a, d = d_a + delta * n_b / n,
           M2 = M2_a + M2_b + delta^2 * n_a * n_b / n
    end:   mu_B = K + d, var_B = M2 / m

never E[x^2] - E[x]^2. mu_B is kept as a float32 pair (mean, mean_lo) with mean + mean_lo = K + d
exactly (TwoSum), and x is centred as (x - mean) - mean_lo: with a large mean, one float32 mean
would shift every xhat by up to half an ulp of the mean over the std.

Backward (SPEC.md section 2, closed form), with g = dl/dy after the ReLU gate and
xhat = (x - mu_B) * invstd::

    dbeta = sum_i g_i,  dgamma = sum_i g_i xhat_i
    training: dx_i = gamma * invstd * (g_i - dbeta / m - xhat_i * dgamma / m)
    eval:     dx_i = gamma * invstd * g_i;   fused add: dz_i = g_i

Every pointer to per-element data (x, y, z, dy, dx, dz) addresses element (a, c, b) at
``a * stride_a + c * stride_c + b * stride_b``; per-channel pointers (gamma, beta, running and
saved statistics: mean, mean_lo, invstd) are (C,) and contiguous; partial buffers are (splits, C)
and contiguous. Tiles are [BLOCK_A, BLOCK_C, BLOCK_B]; tile t of a channel block covers
a0 = (t // tiles_b) * BLOCK_A, b0 = (t % tiles_b) * BLOCK_B. With INDEX_64 every offset is
computed in int64.

Kernels:
    fwd_stats_kernel    (channel blocks, splits): partial (n, d, M2) of a range of tiles
    fwd_combine_kernel  (channel blocks,): merge partials, saved mean/invstd, running update
    fwd_apply_kernel    (channel blocks, programs): normalize (+ residual, ReLU, mask);
                        MODE 0 eval, 1 train with combined statistics, 2 train fused (all in one)
    bwd_reduce_kernel   (channel blocks, splits): partial sums of g and g * xhat
    bwd_combine_kernel  (channel blocks,): total sums, dgamma and dbeta
    bwd_apply_kernel    (channel blocks, programs): dx (and dz); MODE 0 eval (optionally with
                        partial sums for dgamma/dbeta), 1 train with combined sums, 2 train fused
"""

from __future__ import annotations

from batchnorm.ops._plan import interpreting

try:
    import triton
    import triton.language as tl
except ImportError as _missing:  # the package imports without Triton; launching needs it
    _MISSING = _missing

    class _Unavailable:
        def __init__(self, fn):
            self.__name__ = fn.__name__

        def __getitem__(self, grid):
            raise ImportError(
                f"the Triton kernel {self.__name__} needs Triton ({_MISSING}); "
                "pip install 'batchnorm[triton]'"
            )

    class triton:  # noqa: N801 - stands in for the module
        jit = _Unavailable

    AVAILABLE = False
else:
    AVAILABLE = True


def _language_interpreted() -> bool:
    # triton.language's own @jit helpers (tl.zeros, tl.cdiv, ...) are built when Triton is first
    # imported; the interpreter can only call them if TRITON_INTERPRET was set then.
    if not AVAILABLE:
        return False
    from triton.runtime.jit import JITFunction

    return not any(isinstance(v, JITFunction) for v in vars(tl.standard).values())


# The @triton.jit decorator builds interpreter or GPU kernels according to TRITON_INTERPRET at
# import time; remember which.
INTERPRETED = interpreting()
LANGUAGE_INTERPRETED = _language_interpreted()

# Where the ReLU gate of the backward pass comes from.
GATE_NONE = 0  # no ReLU
GATE_OUTPUT = 1  # the saved output y: keep where y > 0
GATE_MASK = 2  # the saved 1-bit mask
GATE_RECOMPUTE = 3  # recompute the pre-activation from x (and the residual)

MODE_EVAL = 0
MODE_TRAIN = 1
MODE_TRAIN_FUSED = 2


# ------------------------------------------------------------------------------------------------
# Indexing helpers
# ------------------------------------------------------------------------------------------------


@triton.jit
def _channel_origin(pid_c, BLOCK_C: tl.constexpr, INDEX_64: tl.constexpr):
    if INDEX_64:
        pid_c = tl.cast(pid_c, tl.int64)
    return pid_c * BLOCK_C


@triton.jit
def _tile_origin(t, tiles_b, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, INDEX_64: tl.constexpr):
    if BLOCK_B == 1:
        # B == 1 (the plan guarantees it): a constant b0 = 0 keeps the alignment of the offsets
        # known to the compiler, which then vectorizes along the contiguous channels.
        if INDEX_64:
            t = tl.cast(t, tl.int64)
        return t * BLOCK_A, 0
    else:
        ta = t // tiles_b
        tb = t - ta * tiles_b
        if INDEX_64:
            ta = tl.cast(ta, tl.int64)
            tb = tl.cast(tb, tl.int64)
        return ta * BLOCK_A, tb * BLOCK_B


@triton.jit
def _tile(
    a0,
    c0,
    b0,
    A,
    C,
    B,
    stride_a,
    stride_c,
    stride_b,
    BLOCK_A: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """Offsets and in-bounds mask of the [BLOCK_A, BLOCK_C, BLOCK_B] tile at (a0, c0, b0)."""
    a = a0 + tl.arange(0, BLOCK_A)
    c = c0 + tl.arange(0, BLOCK_C)
    b = b0 + tl.arange(0, BLOCK_B)
    inside = (a < A)[:, None, None] & (c < C)[None, :, None] & (b < B)[None, None, :]
    offs = a[:, None, None] * stride_a + c[None, :, None] * stride_c + b[None, None, :] * stride_b
    return offs, inside


@triton.jit
def _bit_offsets(
    a0,
    c0,
    b0,
    A,
    C,
    B,
    mask_stride_a,
    mask_stride_c,
    mask_stride_b,
    BLOCK_A: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_B: tl.constexpr,
    PACK_B: tl.constexpr,
):
    """Byte offsets and mask of a tile's packed ReLU bits (8 values of the packed axis a byte)."""
    c = c0 + tl.arange(0, BLOCK_C)
    if PACK_B:
        a = a0 + tl.arange(0, BLOCK_A)
        q = b0 // 8 + tl.arange(0, BLOCK_B // 8)
        ok = (a < A)[:, None, None] & (c < C)[None, :, None] & (q < (B + 7) // 8)[None, None, :]
        offs = (
            a[:, None, None] * mask_stride_a
            + c[None, :, None] * mask_stride_c
            + q[None, None, :] * mask_stride_b
        )
    else:
        q = a0 // 8 + tl.arange(0, BLOCK_A // 8)
        b = b0 + tl.arange(0, BLOCK_B)
        ok = (q < (A + 7) // 8)[:, None, None] & (c < C)[None, :, None] & (b < B)[None, None, :]
        offs = (
            q[:, None, None] * mask_stride_a
            + c[None, :, None] * mask_stride_c
            + b[None, None, :] * mask_stride_b
        )
    return offs, ok


@triton.jit
def _store_bits(
    mask_ptr,
    bits,
    a0,
    c0,
    b0,
    A,
    C,
    B,
    mask_stride_a,
    mask_stride_c,
    mask_stride_b,
    BLOCK_A: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_B: tl.constexpr,
    PACK_B: tl.constexpr,
):
    """Pack a boolean tile into bytes (bit k of a byte = value 8j + k of the packed axis)."""
    if PACK_B:
        w = tl.reshape(bits.to(tl.int32), (BLOCK_A, BLOCK_C, BLOCK_B // 8, 8))
        packed = tl.sum(w << tl.arange(0, 8)[None, None, None, :], axis=3)
    else:
        w = tl.reshape(bits.to(tl.int32), (BLOCK_A // 8, 8, BLOCK_C, BLOCK_B))
        packed = tl.sum(w << tl.arange(0, 8)[None, :, None, None], axis=1)
    offs, ok = _bit_offsets(
        a0, c0, b0, A, C, B, mask_stride_a, mask_stride_c, mask_stride_b,
        BLOCK_A, BLOCK_C, BLOCK_B, PACK_B,
    )  # fmt: skip
    tl.store(mask_ptr + offs, packed.to(tl.uint8), mask=ok)


@triton.jit
def _load_bits(
    mask_ptr,
    a0,
    c0,
    b0,
    A,
    C,
    B,
    mask_stride_a,
    mask_stride_c,
    mask_stride_b,
    BLOCK_A: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_B: tl.constexpr,
    PACK_B: tl.constexpr,
):
    """The boolean tile stored by :func:`_store_bits`."""
    offs, ok = _bit_offsets(
        a0, c0, b0, A, C, B, mask_stride_a, mask_stride_c, mask_stride_b,
        BLOCK_A, BLOCK_C, BLOCK_B, PACK_B,
    )  # fmt: skip
    byte = tl.load(mask_ptr + offs, mask=ok, other=0).to(tl.int32)
    if PACK_B:
        bits = (byte[:, :, :, None] >> tl.arange(0, 8)[None, None, None, :]) & 1
    else:
        bits = (byte[:, None, :, :] >> tl.arange(0, 8)[None, :, None, None]) & 1
    return tl.reshape(bits, (BLOCK_A, BLOCK_C, BLOCK_B)) != 0


# ------------------------------------------------------------------------------------------------
# Per-channel helpers
# ------------------------------------------------------------------------------------------------


@triton.jit
def _pivot(x_ptr, c, c_inside, stride_c):
    """K, the first value of each channel: statistics are accumulated relative to it."""
    return tl.load(x_ptr + c * stride_c, mask=c_inside, other=0.0).to(tl.float32)


@triton.jit
def _gamma_beta(
    c,
    c_inside,
    weight_ptr,
    bias_ptr,
    BLOCK_C: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    if HAS_WEIGHT:
        gamma = tl.load(weight_ptr + c, mask=c_inside, other=1.0).to(tl.float32)
    else:
        gamma = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_BIAS:
        beta = tl.load(bias_ptr + c, mask=c_inside, other=0.0).to(tl.float32)
    else:
        beta = tl.zeros([BLOCK_C], tl.float32)
    return gamma, beta


@triton.jit
def _center(x, mean, mean_lo):
    """x - mu_B for a tile, with mu_B = mean + mean_lo per channel."""
    return (x - mean[None, :, None]) - mean_lo[None, :, None]


@triton.jit
def _pre_activation(x, mean, mean_lo, scale, beta):
    """gamma * (x - mu) * invstd + beta for a tile, with scale = gamma * invstd per channel."""
    return _center(x, mean, mean_lo) * scale[None, :, None] + beta[None, :, None]


@triton.jit
def _stats_over_tiles(
    x_ptr,
    pivot,
    c0,
    t_begin,
    t_end,
    A,
    C,
    B,
    stride_a,
    stride_c,
    stride_b,
    tiles_b,
    BLOCK_A: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_B: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """(n, d, M2) per channel of tiles [t_begin, t_end): count, mean of x - K, sum of squares."""
    count = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for t in range(t_begin, t_end):
        a0, b0 = _tile_origin(t, tiles_b, BLOCK_A, BLOCK_B, INDEX_64)
        offs, inside = _tile(
            a0, c0, b0, A, C, B, stride_a, stride_c, stride_b, BLOCK_A, BLOCK_C, BLOCK_B
        )
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        x = tl.where(inside, x - pivot[None, :, None], 0.0)
        n_tile = (tl.minimum(A - a0, BLOCK_A) * tl.minimum(B - b0, BLOCK_B)).to(tl.float32)
        tile_mean = tl.sum(tl.sum(x, axis=2), axis=0) / n_tile
        dev = tl.where(inside, x - tile_mean[None, :, None], 0.0)
        tile_m2 = tl.sum(tl.sum(dev * dev, axis=2), axis=0)
        # Chan's merge of (count, mean, m2) with the tile's (n_tile, tile_mean, tile_m2)
        total = count + n_tile
        delta = tile_mean - mean
        frac = n_tile / total
        mean = mean + delta * frac
        m2 = m2 + tile_m2 + delta * delta * count * frac
        count = total
    return count, mean, m2


@triton.jit
def _finalize_stats(
    c,
    c_inside,
    pivot,
    shifted_mean,
    m2,
    count,
    eps,
    momentum,
    unbias,
    mean_ptr,
    mean_lo_ptr,
    invstd_ptr,
    running_mean_ptr,
    running_var_ptr,
    HAS_RUNNING: tl.constexpr,
):
    """mu_B (as mean + mean_lo) and invstd from the merged statistics; store them and update the
    running ones."""
    mean = pivot + shifted_mean
    back = mean - pivot  # TwoSum: mean_lo is what float32 rounded off pivot + shifted_mean
    mean_lo = (pivot - (mean - back)) + (shifted_mean - back)
    var = tl.where(c_inside, tl.maximum(m2 / count, 0.0), 1.0)  # no 1/0 in padding lanes
    invstd = 1.0 / tl.sqrt_rn(var + eps)
    tl.store(mean_ptr + c, mean, mask=c_inside)
    tl.store(mean_lo_ptr + c, mean_lo, mask=c_inside)
    tl.store(invstd_ptr + c, invstd, mask=c_inside)
    if HAS_RUNNING:
        # PyTorch's convention: running = (1 - momentum) * running + momentum * batch, with the
        # unbiased variance var_B * m / (m - 1) for the running one.
        rm = tl.load(running_mean_ptr + c, mask=c_inside, other=0.0).to(tl.float32)
        rv = tl.load(running_var_ptr + c, mask=c_inside, other=0.0).to(tl.float32)
        rm = (1.0 - momentum) * rm + momentum * mean
        rv = (1.0 - momentum) * rv + momentum * (var * unbias)
        tl.store(running_mean_ptr + c, rm.to(running_mean_ptr.dtype.element_ty), mask=c_inside)
        tl.store(running_var_ptr + c, rv.to(running_var_ptr.dtype.element_ty), mask=c_inside)
    return mean, mean_lo, invstd


@triton.jit
def _gate(
    dy,
    x,
    mean,
    mean_lo,
    scale,
    beta,
    offs,
    inside,
    gate_ptr,
    z_ptr,
    a0,
    c0,
    b0,
    A,
    C,
    B,
    mask_stride_a,
    mask_stride_c,
    mask_stride_b,
    BLOCK_A: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_B: tl.constexpr,
    GATE: tl.constexpr,
    GATE_RESIDUAL: tl.constexpr,
    PACK_B: tl.constexpr,
):
    """g = dl/dy through the ReLU: dy where the pre-activation was > 0, else 0."""
    g = dy
    if GATE == 1:
        y = tl.load(gate_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        g = tl.where(y > 0.0, dy, 0.0)
    if GATE == 2:
        keep = _load_bits(
            gate_ptr, a0, c0, b0, A, C, B, mask_stride_a, mask_stride_c, mask_stride_b,
            BLOCK_A, BLOCK_C, BLOCK_B, PACK_B,
        )  # fmt: skip
        g = tl.where(keep, dy, 0.0)
    if GATE == 3:
        pre = _pre_activation(x, mean, mean_lo, scale, beta)
        if GATE_RESIDUAL:
            pre = pre + tl.load(z_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        g = tl.where(pre > 0.0, dy, 0.0)
    return g


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------


@triton.jit
def fwd_stats_kernel(
    x_ptr,
    count_part_ptr,
    mean_part_ptr,
    m2_part_ptr,
    A,
    C,
    B,
    stride_a,
    stride_c,
    stride_b,
    tiles_b,
    tiles,
    tiles_per_split,
    BLOCK_A: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_B: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """Partial statistics of one range of tiles: (count, d, M2) into (splits, C) buffers."""
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    c0 = _channel_origin(pid_c, BLOCK_C, INDEX_64)
    c = c0 + tl.arange(0, BLOCK_C)
    c_inside = c < C
    pivot = _pivot(x_ptr, c, c_inside, stride_c)
    t_begin = split * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, tiles)
    count, mean, m2 = _stats_over_tiles(
        x_ptr, pivot, c0, t_begin, t_end, A, C, B, stride_a, stride_c, stride_b, tiles_b,
        BLOCK_A, BLOCK_C, BLOCK_B, INDEX_64,
    )  # fmt: skip
    part = split * C + c
    tl.store(count_part_ptr + part, count, mask=c_inside)
    tl.store(mean_part_ptr + part, mean, mask=c_inside)
    tl.store(m2_part_ptr + part, m2, mask=c_inside)


@triton.jit
def fwd_combine_kernel(
    x_ptr,
    count_part_ptr,
    mean_part_ptr,
    m2_part_ptr,
    mean_ptr,
    mean_lo_ptr,
    invstd_ptr,
    running_mean_ptr,
    running_var_ptr,
    C,
    stride_c,
    splits,
    eps,
    momentum,
    unbias,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_RUNNING: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """Merge the partials of a channel block, then store mu_B, invstd and the running stats.

    Two passes over the (small) partial buffer: the mean first, then
    M2 = sum_s M2_s + sum_s n_s (d_s - d)^2, exact and without cancellation.
    """
    pid_c = tl.program_id(0)
    c0 = _channel_origin(pid_c, BLOCK_C, INDEX_64)
    c = c0 + tl.arange(0, BLOCK_C)
    c_inside = c < C
    count = tl.zeros([BLOCK_C], tl.float32)
    weighted = tl.zeros([BLOCK_C], tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        ok = (s < splits)[:, None] & c_inside[None, :]
        part = s[:, None] * C + c[None, :]
        n = tl.load(count_part_ptr + part, mask=ok, other=0.0)
        d = tl.load(mean_part_ptr + part, mask=ok, other=0.0)
        count += tl.sum(n, axis=0)
        weighted += tl.sum(n * d, axis=0)
    count = tl.maximum(count, 1.0)
    mean = weighted / count
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        ok = (s < splits)[:, None] & c_inside[None, :]
        part = s[:, None] * C + c[None, :]
        n = tl.load(count_part_ptr + part, mask=ok, other=0.0)
        d = tl.load(mean_part_ptr + part, mask=ok, other=0.0)
        q = tl.load(m2_part_ptr + part, mask=ok, other=0.0)
        dev = d - mean[None, :]
        m2 += tl.sum(q + n * dev * dev, axis=0)
    pivot = _pivot(x_ptr, c, c_inside, stride_c)
    _finalize_stats(
        c, c_inside, pivot, mean, m2, count, eps, momentum, unbias, mean_ptr, mean_lo_ptr,
        invstd_ptr, running_mean_ptr, running_var_ptr, HAS_RUNNING,
    )  # fmt: skip


@triton.jit
def fwd_apply_kernel(
    x_ptr,
    y_ptr,
    z_ptr,
    mask_ptr,
    weight_ptr,
    bias_ptr,
    mean_ptr,
    mean_lo_ptr,
    invstd_ptr,
    running_mean_ptr,
    running_var_ptr,
    A,
    C,
    B,
    stride_a,
    stride_c,
    stride_b,
    mask_stride_a,
    mask_stride_c,
    mask_stride_b,
    tiles_b,
    tiles,
    tiles_per_program,
    eps,
    momentum,
    unbias,
    BLOCK_A: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_B: tl.constexpr,
    INDEX_64: tl.constexpr,
    MODE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RUNNING: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    RELU: tl.constexpr,
    SAVE_MASK: tl.constexpr,
    PACK_B: tl.constexpr,
):
    """y = gamma * (x - mu) * invstd + beta (+ z) (ReLU) over a range of tiles.

    MODE 0 (eval): mu and invstd from the running statistics (the first program of each channel
    block saves them for the backward pass). MODE 1: from the combine kernel. MODE 2: this
    program first computes the statistics of its whole channel block (grid (blocks, 1)).
    """
    pid_c = tl.program_id(0)
    pid_t = tl.program_id(1)
    c0 = _channel_origin(pid_c, BLOCK_C, INDEX_64)
    c = c0 + tl.arange(0, BLOCK_C)
    c_inside = c < C
    if MODE == 0:
        mean = tl.load(running_mean_ptr + c, mask=c_inside, other=0.0).to(tl.float32)
        var = tl.load(running_var_ptr + c, mask=c_inside, other=1.0).to(tl.float32)
        invstd = 1.0 / tl.sqrt_rn(var + eps)
        mean_lo = tl.zeros([BLOCK_C], tl.float32)
        if pid_t == 0:
            tl.store(mean_ptr + c, mean, mask=c_inside)
            tl.store(mean_lo_ptr + c, mean_lo, mask=c_inside)
            tl.store(invstd_ptr + c, invstd, mask=c_inside)
    if MODE == 1:
        mean = tl.load(mean_ptr + c, mask=c_inside, other=0.0)
        mean_lo = tl.load(mean_lo_ptr + c, mask=c_inside, other=0.0)
        invstd = tl.load(invstd_ptr + c, mask=c_inside, other=0.0)
    if MODE == 2:
        pivot = _pivot(x_ptr, c, c_inside, stride_c)
        count, shifted, m2 = _stats_over_tiles(
            x_ptr, pivot, c0, 0, tiles, A, C, B, stride_a, stride_c, stride_b, tiles_b,
            BLOCK_A, BLOCK_C, BLOCK_B, INDEX_64,
        )  # fmt: skip
        mean, mean_lo, invstd = _finalize_stats(
            c, c_inside, pivot, shifted, m2, count, eps, momentum, unbias, mean_ptr, mean_lo_ptr,
            invstd_ptr, running_mean_ptr, running_var_ptr, HAS_RUNNING,
        )  # fmt: skip
    gamma, beta = _gamma_beta(c, c_inside, weight_ptr, bias_ptr, BLOCK_C, HAS_WEIGHT, HAS_BIAS)
    scale = gamma * invstd
    t_begin = pid_t * tiles_per_program
    t_end = tl.minimum(t_begin + tiles_per_program, tiles)
    for t in range(t_begin, t_end):
        a0, b0 = _tile_origin(t, tiles_b, BLOCK_A, BLOCK_B, INDEX_64)
        offs, inside = _tile(
            a0, c0, b0, A, C, B, stride_a, stride_c, stride_b, BLOCK_A, BLOCK_C, BLOCK_B
        )
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        y = _pre_activation(x, mean, mean_lo, scale, beta)
        if HAS_RESIDUAL:
            y = y + tl.load(z_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        if SAVE_MASK:
            _store_bits(
                mask_ptr, (y > 0.0) & inside, a0, c0, b0, A, C, B,
                mask_stride_a, mask_stride_c, mask_stride_b, BLOCK_A, BLOCK_C, BLOCK_B, PACK_B,
            )  # fmt: skip
        if RELU:
            y = tl.where(y < 0.0, 0.0, y)  # NaN stays NaN, as in torch.relu
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=inside)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _grad_sums_over_tiles(
    dy_ptr,
    x_ptr,
    gate_ptr,
    z_ptr,
    mean,
    mean_lo,
    invstd,
    scale,
    beta,
    c0,
    t_begin,
    t_end,
    A,
    C,
    B,
    stride_a,
    stride_c,
    stride_b,
    mask_stride_a,
    mask_stride_c,
    mask_stride_b,
    tiles_b,
    BLOCK_A: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_B: tl.constexpr,
    INDEX_64: tl.constexpr,
    GATE: tl.constexpr,
    GATE_RESIDUAL: tl.constexpr,
    PACK_B: tl.constexpr,
):
    """sum g and sum g * xhat per channel over tiles [t_begin, t_end)."""
    sum_g = tl.zeros([BLOCK_C], tl.float32)
    sum_gx = tl.zeros([BLOCK_C], tl.float32)
    for t in range(t_begin, t_end):
        a0, b0 = _tile_origin(t, tiles_b, BLOCK_A, BLOCK_B, INDEX_64)
        offs, inside = _tile(
            a0, c0, b0, A, C, B, stride_a, stride_c, stride_b, BLOCK_A, BLOCK_C, BLOCK_B
        )
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        g = _gate(
            dy, x, mean, mean_lo, scale, beta, offs, inside, gate_ptr, z_ptr, a0, c0, b0,
            A, C, B, mask_stride_a, mask_stride_c, mask_stride_b, BLOCK_A, BLOCK_C, BLOCK_B,
            GATE, GATE_RESIDUAL, PACK_B,
        )  # fmt: skip
        xhat = _center(x, mean, mean_lo) * invstd[None, :, None]
        sum_g += tl.sum(tl.sum(g, axis=2), axis=0)
        sum_gx += tl.sum(tl.sum(g * xhat, axis=2), axis=0)
    return sum_g, sum_gx


@triton.jit
def bwd_reduce_kernel(
    dy_ptr,
    x_ptr,
    gate_ptr,
    z_ptr,
    weight_ptr,
    bias_ptr,
    mean_ptr,
    mean_lo_ptr,
    invstd_ptr,
    sum_g_part_ptr,
    sum_gx_part_ptr,
    A,
    C,
    B,
    stride_a,
    stride_c,
    stride_b,
    mask_stride_a,
    mask_stride_c,
    mask_stride_b,
    tiles_b,
    tiles,
    tiles_per_split,
    BLOCK_A: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_B: tl.constexpr,
    INDEX_64: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GATE: tl.constexpr,
    GATE_RESIDUAL: tl.constexpr,
    PACK_B: tl.constexpr,
):
    """Partial sums of g and g * xhat of one range of tiles into (splits, C) buffers."""
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    c0 = _channel_origin(pid_c, BLOCK_C, INDEX_64)
    c = c0 + tl.arange(0, BLOCK_C)
    c_inside = c < C
    mean = tl.load(mean_ptr + c, mask=c_inside, other=0.0)
    mean_lo = tl.load(mean_lo_ptr + c, mask=c_inside, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=c_inside, other=0.0)
    gamma, beta = _gamma_beta(c, c_inside, weight_ptr, bias_ptr, BLOCK_C, HAS_WEIGHT, HAS_BIAS)
    t_begin = split * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, tiles)
    sum_g, sum_gx = _grad_sums_over_tiles(
        dy_ptr, x_ptr, gate_ptr, z_ptr, mean, mean_lo, invstd, gamma * invstd, beta, c0,
        t_begin, t_end,
        A, C, B, stride_a, stride_c, stride_b, mask_stride_a, mask_stride_c, mask_stride_b,
        tiles_b, BLOCK_A, BLOCK_C, BLOCK_B, INDEX_64, GATE, GATE_RESIDUAL, PACK_B,
    )  # fmt: skip
    part = split * C + c
    tl.store(sum_g_part_ptr + part, sum_g, mask=c_inside)
    tl.store(sum_gx_part_ptr + part, sum_gx, mask=c_inside)


@triton.jit
def bwd_combine_kernel(
    sum_g_part_ptr,
    sum_gx_part_ptr,
    sum_g_ptr,
    sum_gx_ptr,
    dweight_ptr,
    dbias_ptr,
    C,
    splits,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    WRITE_DWEIGHT: tl.constexpr,
    WRITE_DBIAS: tl.constexpr,
):
    """Total sum g (= dbeta) and sum g * xhat (= dgamma) per channel."""
    pid_c = tl.program_id(0)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_inside = c < C
    sum_g = tl.zeros([BLOCK_C], tl.float32)
    sum_gx = tl.zeros([BLOCK_C], tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        ok = (s < splits)[:, None] & c_inside[None, :]
        part = s[:, None] * C + c[None, :]
        sum_g += tl.sum(tl.load(sum_g_part_ptr + part, mask=ok, other=0.0), axis=0)
        sum_gx += tl.sum(tl.load(sum_gx_part_ptr + part, mask=ok, other=0.0), axis=0)
    tl.store(sum_g_ptr + c, sum_g, mask=c_inside)
    tl.store(sum_gx_ptr + c, sum_gx, mask=c_inside)
    if WRITE_DWEIGHT:
        tl.store(dweight_ptr + c, sum_gx.to(dweight_ptr.dtype.element_ty), mask=c_inside)
    if WRITE_DBIAS:
        tl.store(dbias_ptr + c, sum_g.to(dbias_ptr.dtype.element_ty), mask=c_inside)


@triton.jit
def bwd_apply_kernel(
    dy_ptr,
    x_ptr,
    gate_ptr,
    z_ptr,
    weight_ptr,
    bias_ptr,
    mean_ptr,
    mean_lo_ptr,
    invstd_ptr,
    sum_g_ptr,
    sum_gx_ptr,
    dx_ptr,
    dz_ptr,
    dweight_ptr,
    dbias_ptr,
    A,
    C,
    B,
    stride_a,
    stride_c,
    stride_b,
    mask_stride_a,
    mask_stride_c,
    mask_stride_b,
    tiles_b,
    tiles,
    tiles_per_program,
    inv_m,
    BLOCK_A: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_B: tl.constexpr,
    INDEX_64: tl.constexpr,
    MODE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GATE: tl.constexpr,
    GATE_RESIDUAL: tl.constexpr,
    WRITE_DZ: tl.constexpr,
    WRITE_DWEIGHT: tl.constexpr,
    WRITE_DBIAS: tl.constexpr,
    EVAL_PARTIALS: tl.constexpr,
    PACK_B: tl.constexpr,
):
    """dx (and dz = g) over a range of tiles.

    MODE 0 (eval): dx = gamma * invstd * g; with EVAL_PARTIALS the same pass also writes partial
    sums of g and g * xhat (sum_g_ptr, sum_gx_ptr are then (programs, C) buffers) for dgamma and
    dbeta. MODE 1: training, with the sums from the combine kernel. MODE 2: training, this
    program first reduces its whole channel block (grid (blocks, 1)) and writes dgamma, dbeta.
    """
    pid_c = tl.program_id(0)
    pid_t = tl.program_id(1)
    c0 = _channel_origin(pid_c, BLOCK_C, INDEX_64)
    c = c0 + tl.arange(0, BLOCK_C)
    c_inside = c < C
    mean = tl.load(mean_ptr + c, mask=c_inside, other=0.0)
    mean_lo = tl.load(mean_lo_ptr + c, mask=c_inside, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=c_inside, other=0.0)
    gamma, beta = _gamma_beta(c, c_inside, weight_ptr, bias_ptr, BLOCK_C, HAS_WEIGHT, HAS_BIAS)
    scale = gamma * invstd
    mean_g = tl.zeros([BLOCK_C], tl.float32)
    mean_gx = tl.zeros([BLOCK_C], tl.float32)
    if MODE == 1:
        mean_g = tl.load(sum_g_ptr + c, mask=c_inside, other=0.0) * inv_m
        mean_gx = tl.load(sum_gx_ptr + c, mask=c_inside, other=0.0) * inv_m
    if MODE == 2:
        sum_g, sum_gx = _grad_sums_over_tiles(
            dy_ptr, x_ptr, gate_ptr, z_ptr, mean, mean_lo, invstd, scale, beta, c0, 0, tiles,
            A, C, B, stride_a, stride_c, stride_b, mask_stride_a, mask_stride_c, mask_stride_b,
            tiles_b, BLOCK_A, BLOCK_C, BLOCK_B, INDEX_64, GATE, GATE_RESIDUAL, PACK_B,
        )  # fmt: skip
        if WRITE_DWEIGHT:
            tl.store(dweight_ptr + c, sum_gx.to(dweight_ptr.dtype.element_ty), mask=c_inside)
        if WRITE_DBIAS:
            tl.store(dbias_ptr + c, sum_g.to(dbias_ptr.dtype.element_ty), mask=c_inside)
        mean_g = sum_g * inv_m
        mean_gx = sum_gx * inv_m
    acc_g = tl.zeros([BLOCK_C], tl.float32)
    acc_gx = tl.zeros([BLOCK_C], tl.float32)
    t_begin = pid_t * tiles_per_program
    t_end = tl.minimum(t_begin + tiles_per_program, tiles)
    for t in range(t_begin, t_end):
        a0, b0 = _tile_origin(t, tiles_b, BLOCK_A, BLOCK_B, INDEX_64)
        offs, inside = _tile(
            a0, c0, b0, A, C, B, stride_a, stride_c, stride_b, BLOCK_A, BLOCK_C, BLOCK_B
        )
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        g = _gate(
            dy, x, mean, mean_lo, scale, beta, offs, inside, gate_ptr, z_ptr, a0, c0, b0,
            A, C, B, mask_stride_a, mask_stride_c, mask_stride_b, BLOCK_A, BLOCK_C, BLOCK_B,
            GATE, GATE_RESIDUAL, PACK_B,
        )  # fmt: skip
        xhat = _center(x, mean, mean_lo) * invstd[None, :, None]
        if MODE == 0:
            dx = g * scale[None, :, None]
            if EVAL_PARTIALS:
                acc_g += tl.sum(tl.sum(g, axis=2), axis=0)
                acc_gx += tl.sum(tl.sum(g * xhat, axis=2), axis=0)
        else:
            dx = (g - mean_g[None, :, None] - xhat * mean_gx[None, :, None]) * scale[None, :, None]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=inside)
        if WRITE_DZ:
            tl.store(dz_ptr + offs, g.to(dz_ptr.dtype.element_ty), mask=inside)
    if EVAL_PARTIALS:
        part = pid_t * C + c
        tl.store(sum_g_ptr + part, acc_g, mask=c_inside)
        tl.store(sum_gx_ptr + part, acc_gx, mask=c_inside)


# ------------------------------------------------------------------------------------------------
# Interpreter probe
# ------------------------------------------------------------------------------------------------


@triton.jit
def _probe_kernel(out_ptr, n):
    acc = tl.zeros([2], tl.float32)
    for _ in range(0, n):
        acc += 1.0
    tl.store(out_ptr + tl.arange(0, 2), acc)


def interpreter_works() -> tuple[bool, str]:
    """Run a loop with a runtime bound under the interpreter (Triton 3.6's interpreter fails
    there with NumPy >= 2.4)."""
    import numpy
    import torch

    out = torch.zeros(2)
    try:
        _probe_kernel[(1,)](out, 3)
    except Exception as exc:  # any failure means the interpreter cannot run the kernels
        return False, (
            f"Triton {triton.__version__}'s interpreter fails with NumPy {numpy.__version__} "
            f"({type(exc).__name__}: {exc}); Triton 3.6's interpreter needs numpy<2.4"
        )
    if out.tolist() != [3.0, 3.0]:
        return False, f"Triton {triton.__version__}'s interpreter computed {out.tolist()}"
    return True, ""
