"""The C++ CPU kernels (backend "cpu", batchnorm.ops.cpu) against the float64 NumPy reference
and against torch: the shared shape catalogue in train and eval, forward, every gradient and the
running statistics, float32 and bfloat16, contiguous, channels-last and strided inputs, thread
count independence, and the backend's fallback and second-derivative behaviour.

The extension is compiled once (about half a minute to a minute) the first time this module runs
and cached; without a C++ compiler or ninja the module is skipped with the reason.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from batchnorm import backends, reference
from batchnorm import nn as bnn
from batchnorm.functional import batch_norm
from batchnorm.ops import cpu
from batchnorm.ops.cpu import _build
from tests.helpers import SHAPES, assert_close, make_input, tolerance

pytestmark = pytest.mark.usefixtures("cpu_kernels")


def _params(c: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    return (
        rng.uniform(0.5, 1.5, c),
        rng.standard_normal(c),
        rng.standard_normal(c) * 0.1,
        rng.uniform(0.5, 2.0, c),
    )


def _t(a, dtype=torch.float32, grad=False):
    return torch.tensor(a, dtype=dtype, requires_grad=grad)


def _step(x, gamma, beta, rm, rv, training, dy, backend="cpu"):
    x = x.detach().clone().requires_grad_(True)
    g = gamma.detach().clone().requires_grad_(True)
    b = beta.detach().clone().requires_grad_(True)
    y = batch_norm(x, rm, rv, g, b, training, 0.2, 1e-5, backend=backend)
    assert backends.last_backend() == backend
    dx, dg, db = torch.autograd.grad(y, (x, g, b), dy)
    return y, dx, dg, db


def _check(x, dy, gamma, beta, rm0, rv0, pdtype=torch.float32):
    """One training step then one eval step with backend="cpu", against the reference computed
    on exactly the values the kernels see (inputs and parameters after rounding)."""
    dtype_name = str(x.dtype).replace("torch.", "")
    c = x.shape[1]
    gamma = _t(gamma, pdtype).double().numpy()
    beta = _t(beta, pdtype).double().numpy()
    rm0, rv0 = _t(rm0, pdtype).double().numpy(), _t(rv0, pdtype).double().numpy()
    x64, dy64 = x.double().numpy(), dy.double().numpy()
    gamma_t, beta_t = _t(gamma, pdtype), _t(beta, pdtype)
    rm, rv = _t(rm0, pdtype), _t(rv0, pdtype)
    fwd, grad = tolerance(dtype_name), tolerance(dtype_name, "gradient")
    stat_tol = 1e-5 if pdtype == torch.float32 else tolerance("bfloat16")[0]
    m = x64.size // c
    half = x.dtype == torch.bfloat16

    if m > 1:
        y, dx, dg, db = _step(x, gamma_t, beta_t, rm, rv, True, dy)
        y_ref, cache = reference.bn_forward(x64, gamma, beta, 1e-5)
        dx_ref, dg_ref, db_ref = reference.bn_backward(dy64, cache)
        rm_ref, rv_ref = reference.running_update(rm0, rv0, cache.mu, cache.var, m, 0.2)
        assert y.dtype == x.dtype and y.shape == x.shape and dg.dtype == pdtype
        assert_close(y, y_ref, rtol=fwd[0], atol=fwd[1], name="y")
        dx_scale = max(1.0, float(np.abs(dx_ref).max()))
        assert_close(dx, dx_ref, rtol=grad[0], atol=grad[1] * dx_scale * (4 if half else 1),
                     name="dx")  # fmt: skip
        sums = np.sqrt(m) if half else m
        assert_close(dg, dg_ref, rtol=grad[0], atol=grad[1] * sums, name="dgamma")
        assert_close(db, db_ref, rtol=grad[0], atol=grad[1] * sums, name="dbeta")
        assert_close(rm, rm_ref, rtol=stat_tol, atol=stat_tol, name="running_mean")
        assert_close(rv, rv_ref, rtol=stat_tol, atol=stat_tol, name="running_var")
        # The running statistics as stored (rounded to their dtype) feed the eval step.
        rm_ref, rv_ref = rm.double().numpy(), rv.double().numpy()
    else:
        rm_ref, rv_ref = rm0, rv0

    before = (rm.clone(), rv.clone())
    y, dx, dg, db = _step(x, gamma_t, beta_t, rm, rv, False, dy)
    y_ref = reference.bn_inference(x64, gamma, beta, rm_ref, rv_ref, 1e-5)
    grads_ref = reference.bn_inference_backward(dy64, x64, gamma, rm_ref, rv_ref, 1e-5)
    assert_close(y, y_ref, rtol=fwd[0], atol=fwd[1] * (4 if half else 1), name="eval y")
    for name, a, e in zip(("dx", "dgamma", "dbeta"), (dx, dg, db), grads_ref):
        atol = grad[1] * max(1.0, float(np.abs(e).max())) * (m if name != "dx" else 1)
        assert_close(a, e, rtol=grad[0], atol=atol, name=f"eval {name}")
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1]), "eval moved the statistics"


@pytest.mark.parametrize("case", SHAPES, ids=[c.id for c in SHAPES])
def test_catalogue_float32(case):
    """Every catalogue shape (large mean and tiny std included), train then eval, float32."""
    x = torch.tensor(make_input(case, seed=3), dtype=torch.float32)
    dy = torch.randn(case.shape, generator=torch.Generator().manual_seed(4))
    _check(x, dy, *_params(case.shape[1]))


@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16], ids=["f32-params", "bf16"])
@pytest.mark.parametrize(
    "case", [c for c in SHAPES if c.mean == 0.0], ids=[c.id for c in SHAPES if c.mean == 0.0]
)
def test_catalogue_bfloat16(case, pdtype):
    """bfloat16 inputs with float32 (mixed precision) or bfloat16 parameters and statistics.

    The large-mean cases are left out: bfloat16 holds 1e4 to within 64, so those inputs carry
    no spread to normalize."""
    x = torch.tensor(make_input(case, seed=5)).to(torch.bfloat16)
    dy = torch.randn(case.shape, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    _check(x, dy, *_params(case.shape[1]), pdtype=pdtype)


def _layout(name: str, gen: torch.Generator) -> torch.Tensor:
    if name == "channels_last":
        return torch.randn(3, 6, 4, 5, generator=gen).to(memory_format=torch.channels_last)
    if name == "channels_last_3d":
        return torch.randn(2, 5, 2, 3, 4, generator=gen).to(memory_format=torch.channels_last_3d)
    if name == "channels_last_wide":  # C = 37: full vector chunks, one vector and a scalar tail
        return torch.randn(4, 37, 3, 5, generator=gen).to(memory_format=torch.channels_last)
    if name == "channels_last_1d":  # (N, C, L) stored as (N, L, C), as a transposed sequence
        return torch.randn(4, 5, 6, generator=gen).transpose(1, 2)
    if name == "transposed_2d":
        return torch.randn(6, 9, generator=gen).t()  # (9, 6) with strides (1, 9)
    if name == "strided_slice":
        return torch.randn(4, 3, 6, 7, generator=gen)[:, :, ::2]
    if name == "channel_slice":
        return torch.randn(4, 7, 3, 3, generator=gen)[:, 1:6]
    if name == "expanded":
        return torch.randn(1, 4, 3, 3, generator=gen).expand(3, 4, 3, 3)
    return torch.randn(3, 5, 4, 6, generator=gen).permute(0, 3, 2, 1)  # N, W, H, C storage


LAYOUTS = ["channels_last", "channels_last_3d", "channels_last_wide", "channels_last_1d",
           "transposed_2d",
           "strided_slice", "channel_slice", "expanded", "permuted"]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(layout, dtype):
    """Channels-last runs without a copy (the output is laid out as torch's is: channels-last in
    4-D and 5-D, contiguous for a 1-D sequence stored (N, L, C); a gradient laid out differently
    from x is handled); other strides give the same numbers."""
    gen = torch.Generator().manual_seed(7)
    x = _layout(layout, gen).to(dtype)
    dy = torch.randn(x.shape, generator=gen).to(dtype)
    _check(x, dy, *_params(x.shape[1]))
    if layout.startswith("channels_last"):
        y = batch_norm(x, None, None, training=True, backend="cpu")
        expected = torch.nn.functional.batch_norm(x, None, None, training=True)
        assert y.stride() == expected.stride()
        assert y.stride() == (x.stride() if x.dim() > 3 else y.contiguous().stride())
        # dy contiguous while x is channels-last: same gradient as a channels-last dy
        xg = x.detach().clone().requires_grad_(True)
        y = batch_norm(xg, None, None, training=True, backend="cpu")
        (a,) = torch.autograd.grad(y, xg, dy.contiguous(), retain_graph=True)
        (b,) = torch.autograd.grad(y, xg, dy)  # fmt: skip
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nc"])
def test_large_mean_keeps_float32_accuracy(layout):
    """x = 1e4 + randn: the output, dgamma and the variance keep float32 accuracy (no
    E[x^2] - E[x]^2, whose cancellation would lose every digit here), on shapes with many
    statistics groups per channel."""
    gen = torch.Generator().manual_seed(8)
    shape = (2048, 24) if layout == "nc" else (16, 8, 24, 24)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).add(1e4).float()
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    dy = torch.randn(shape, generator=gen)
    _check(x, dy, *_params(shape[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "shape",
    # Short rows and many of them: channels go in blocks (forward and backward; the last block
    # partial), in the backward only (N = 32), or as blocks of one channel, up to 16 of them
    # per call with their horizontal sums interleaved (N = 16; N = 63 of 11x11: two statistics
    # groups per channel; 37 channels: a partial last call). Planes of at most a vector are
    # summed by columns whatever N (3x3, 2x1, 4x4; blocks whose run ends off the vector width;
    # 1000 samples of 3x3: three statistics groups per channel).
    [(64, 300, 3, 3), (32, 130, 7, 7), (16, 70, 5, 5), (96, 33, 2, 1), (5, 130, 4, 4)]
    + [(1000, 20, 3, 3), (63, 37, 11, 11)],
)
def test_planar_channel_blocks(shape, dtype):
    """Short NCHW rows are walked a block of channels at a time (a contiguous run per sample);
    every block size gives the reference's numbers, also with a large mean."""
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 300).to(dtype)
    dy = torch.randn(shape, generator=gen).to(dtype)
    _check(x, dy, *_params(shape[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", [(6, 2100), (3, 2083, 2, 2)], ids=["nc", "channels-last"])
def test_many_channels_walk_rows_in_chunks(shape, dtype):
    """Rows of 2048 channels or more go a chunk of channels at a time down each block (the
    output pass, the gradient sums and dx; the last chunk partial and, with 2083 channels, off
    the vector width): the reference's numbers, and in eval the planar output's bits (with
    vector FMA, where both layouts round each value once)."""
    gen = torch.Generator().manual_seed(23)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3 - 1).to(dtype)
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape, generator=gen).to(dtype)
    if x.dim() == 4:
        dy = dy.contiguous(memory_format=torch.channels_last)
    _check(x, dy, *_params(shape[1]))
    if x.dim() == 4 and cpu.stream_min_bytes() >= 0:  # < 0: a build without AVX2 or AVX512
        c = shape[1]
        w, b = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
        rm, rv = torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5
        planar = cpu.batch_norm(x.contiguous(), rm, rv, w, b, False, 0.1, 1e-5)
        assert torch.equal(cpu.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5), planar)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("length", range(1, 34))
def test_every_row_tail_length(length, dtype):
    """Planar rows of every length up to two AVX512 vectors and one more: the partial vector at
    each row's end (a masked load and store, zero lanes) in every position, float32 and
    bfloat16, forward, gradients and running statistics against the reference."""
    gen = torch.Generator().manual_seed(100 + length)
    x = (torch.randn(5, 3, length, generator=gen, dtype=torch.float64) * 2 + 7).to(dtype)
    dy = torch.randn(x.shape, generator=gen).to(dtype)
    _check(x, dy, *_params(3))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_mean_that_drifts_along_the_batch(layout):
    """The second half of the batch sits 1e4 higher, with a spread of 0.01 within samples: every
    statistics group is centred on its own first value, so its float32 sums stay small, and a
    channels-last block far from the common centre takes two passes (where the one-pass
    sum d^2 - n mean^2 would cancel). Mean and variance keep float32 accuracy."""
    gen = torch.Generator().manual_seed(12)
    shape = (64, 24, 16, 16)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.01
    x[32:] += 1e4
    x[:, :, 8:] += torch.linspace(0, 50, 24, dtype=torch.float64)[None, :, None, None]
    x, dy = x.float(), torch.randn(shape, generator=gen)
    if layout == "nhwc":
        x, dy = (t.to(memory_format=torch.channels_last) for t in (x, dy))
    _check(x, dy, *_params(shape[1]))


@pytest.mark.parametrize(
    "shape,layout",
    [((16, 8, 24, 24), "nchw"), ((64, 300, 3, 3), "nchw"), ((16, 40, 12, 12), "nhwc")]
    + [((12, 40, 7, 7), "nchw")],
    ids=["planar-one-channel", "planar-blocks", "channels-last", "planar-16-channels"],
)
def test_statistics_far_from_their_centre_take_two_passes(shape, layout):
    """The first sample sits 60 standard deviations above the others (x = 1e4 + randn): the
    first statistics groups are centred on it (planar: the mean of its first row; channels-last:
    the first block's mean), far from their own means, where the one-pass sum d^2 - n mean^2
    would cancel several bits; the guard sends those groups to two passes and the variance
    keeps float32 accuracy."""
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).add(1e4)
    x[0] += 60.0
    x, dy = x.float(), torch.randn(shape, generator=gen)
    if layout == "nhwc":
        x, dy = (t.to(memory_format=torch.channels_last) for t in (x, dy))
    _check(x, dy, *_params(shape[1]))


def _run_all(x, dy, gamma, beta):
    rm, rv = torch.zeros(x.shape[1]), torch.ones(x.shape[1])
    xg = x.clone().requires_grad_(True)
    g, b = gamma.clone().requires_grad_(True), beta.clone().requires_grad_(True)
    y = batch_norm(xg, rm, rv, g, b, True, 0.1, 1e-5, backend="cpu")
    grads = torch.autograd.grad(y, (xg, g, b), dy)
    y_eval = batch_norm(x, rm, rv, gamma, beta, False, 0.1, 1e-5, backend="cpu")
    return (y, *grads, rm, rv, y_eval)


def _same_on_one_and_two_threads(x, dy, gamma, beta):
    """_run_all on 1 and on 2 threads, bit for bit the same; returns the 1-thread results."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run_all(x, dy, gamma, beta)
        torch.set_num_threads(2)
        two = _run_all(x, dy, gamma, beta)
    finally:
        torch.set_num_threads(before)
    for name, a, b in zip(("y", "dx", "dgamma", "dbeta", "rm", "rv", "eval y"), one, two):
        assert torch.equal(a, b), f"{name} differs between 1 and 2 threads"
    return one


@pytest.mark.parametrize(
    "shape,layout",
    [((8, 6, 20, 20), "nchw"), ((8, 40, 10, 10), "nhwc"), ((5000, 12), "nc"),
     ((4, 3, 70, 70), "nchw"), ((64, 300, 3, 3), "nchw"), ((32, 130, 7, 7), "nchw"),
     ((16, 96, 20, 20), "nhwc"),  # 2.4 MB: the block walks prefetch the next block
     ((20, 37, 9, 9), "nchw")],  # blocks of one channel, 16 per call (a partial last call)
)  # fmt: skip
def test_results_independent_of_thread_count(shape, layout):
    """1 and 2 threads give bitwise equal outputs, gradients and running statistics (the work is
    split per channel or in fixed blocks, merged in a fixed order)."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(shape, generator=gen) * 3 + 1
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    dy = torch.randn(shape, generator=gen)
    gamma, beta = torch.rand(shape[1], generator=gen) + 0.5, torch.randn(shape[1], generator=gen)
    _same_on_one_and_two_threads(x, dy, gamma, beta)


@pytest.mark.parametrize("shape", [(48, 1100), (100, 1300), (16, 9216)])
def test_few_rows_split_by_channels_independent_of_thread_count(shape):
    """(N, C) inputs of fewer blocks of rows than threads go to the threads in ranges of
    channels (whole chunks of 64): 1 and 2 threads give the same bits, also where a chunk of
    channels drifts far from its first block's mean (the one-pass block is redone in two)."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(shape, generator=gen) * 3 + 1
    x[64:, 630:650] += 1e4  # the second block of rows (where there is one) drifts, by the split
    dy = torch.randn(shape, generator=gen)
    gamma, beta = torch.rand(shape[1], generator=gen) + 0.5, torch.randn(shape[1], generator=gen)
    one = _same_on_one_and_two_threads(x, dy, gamma, beta)
    reference = torch.nn.functional.batch_norm(x.double(), None, None, training=True)
    assert torch.allclose(one[0].double(), reference * gamma.double() + beta.double(), atol=1e-4)


@pytest.mark.parametrize("shape", [(1024, 64), (600, 40), (16, 48, 8, 8)])
def test_channel_pieces_same_bits_as_whole_blocks(shape):
    """Small channel-inner tensors go a piece of channels down all the rows (statistics, then
    output; sums, then dx) where they have at least as many chunks of 64 channels as threads,
    else block by block over all channels: with one chunk, 1 thread takes the pieces and 2
    threads the blocks, and the two give the same bits, also with a drifting block (redone in
    two passes), a scalar tail of channels (40, 48) and channels-last rows."""
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(shape, generator=gen) * 3 + 1
    x[shape[0] // 2 :, 5:9] += 1e4  # a later block of rows drifts far from the first one's mean
    if len(shape) == 4:
        x = x.to(memory_format=torch.channels_last)
    dy = torch.randn(shape, generator=gen)
    gamma, beta = torch.rand(shape[1], generator=gen) + 0.5, torch.randn(shape[1], generator=gen)
    one = _same_on_one_and_two_threads(x, dy, gamma, beta)
    dims = [0, *range(2, len(shape))]
    view = [1, -1] + [1] * (len(shape) - 2)
    x64 = x.double()
    reference = (x64 - x64.mean(dims).view(view)) / (
        x64.var(dims, unbiased=False) + 1e-5
    ).sqrt().view(view)
    assert torch.allclose(
        one[0].double(), reference * gamma.double().view(view) + beta.double().view(view), atol=1e-4
    )


@pytest.mark.parametrize("batch", [4, 16])  # 0.2 MB, and 3.2 MB (prefetching the next block)
def test_matches_torch_on_a_resnet_shape(batch):
    """A ResNet-like layer in both layouts agrees with torch's own kernel (float32)."""
    gen = torch.Generator().manual_seed(10)
    for fmt in (torch.contiguous_format, torch.channels_last):
        height = 28 if batch == 16 else 14
        x = torch.randn(batch, 64, height, 14, generator=gen).to(memory_format=fmt)
        dy = torch.randn(x.shape, generator=gen)
        w, b = torch.rand(64, generator=gen) + 0.5, torch.randn(64, generator=gen)
        out = []
        for backend in ("cpu", "torch"):
            rm, rv = torch.zeros(64), torch.ones(64)
            y, dx, dg, db = _step(x, w, b, rm, rv, True, dy, backend=backend)
            out.append((y, dx, dg, db, rm, rv))
        for name, a, e in zip(("y", "dx", "dgamma", "dbeta", "rm", "rv"), *out):
            assert_close(a, e, rtol=1e-4, atol=1e-4, name=name)


def test_only_requested_gradients():
    """x without grad (dgamma/dbeta only) and parameters without grad (dx only) both work."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(6, 5, 4, 4, generator=gen)
    w = torch.rand(5, generator=gen).add(0.5).requires_grad_(True)
    b = torch.randn(5, generator=gen).requires_grad_(True)
    dy = torch.randn(x.shape, generator=gen)
    y = batch_norm(x, None, None, w, b, True, backend="cpu")
    dg, db = torch.autograd.grad(y, (w, b), dy)
    y_t = torch.nn.functional.batch_norm(x, None, None, w, b, True)
    ref = torch.autograd.grad(y_t, (w, b), dy)
    assert_close(dg, ref[0], rtol=1e-4, atol=1e-4, name="dgamma")
    assert_close(db, ref[1], rtol=1e-4, atol=1e-4, name="dbeta")
    xg = x.clone().requires_grad_(True)
    y = batch_norm(xg, None, None, w.detach(), b.detach(), True, backend="cpu")
    (dx,) = torch.autograd.grad(y, xg, dy)
    xt = x.clone().requires_grad_(True)
    (dx_t,) = torch.autograd.grad(
        torch.nn.functional.batch_norm(xt, None, None, w.detach(), b.detach(), True), xt, dy
    )
    assert_close(dx, dx_t, rtol=1e-4, atol=1e-4, name="dx")


@pytest.mark.parametrize("layout", ["nc", "planar", "channels_last"])
@pytest.mark.parametrize("need_params", [False, True], ids=["dx", "dx-dgamma"])
def test_eval_backward_reads_only_dy(layout, need_params):
    """Eval: dx = gamma * invstd * dy, as torch's; a NaN or inf in x reaches dgamma (which
    depends on x) but never dx."""
    gen = torch.Generator().manual_seed(5)
    shape = (6, 4) if layout == "nc" else (3, 4, 5, 5)
    x = torch.randn(shape, generator=gen)
    x.view(-1)[[0, 7, 11]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    rm, rv = torch.randn(4, generator=gen), torch.rand(4, generator=gen) + 0.5
    w = (torch.rand(4, generator=gen) + 0.5).requires_grad_(need_params)
    dy = torch.randn(shape, generator=gen)
    grads = []
    for backend in ("cpu", "torch"):
        xg = x.clone().requires_grad_(True)
        y = batch_norm(xg, rm, rv, w, None, False, backend=backend)
        grads.append(torch.autograd.grad(y, [xg, w] if need_params else [xg], dy))
    (dx, *rest), (dx_t, *rest_t) = grads
    assert torch.isfinite(dx).all()
    assert_close(dx, dx_t, rtol=1e-6, atol=1e-6, name="dx")
    if need_params:
        assert torch.isnan(rest[0]).any() and torch.isnan(rest_t[0]).any()


def test_buffers_edited_between_forward_and_backward():
    """The running statistics are not saved for backward: editing them in place between forward
    and backward (a second forward, DDP's broadcast) neither breaks nor changes the gradient."""
    x = torch.randn(8, 3, 5, 5).requires_grad_(True)
    rm, rv = torch.zeros(3), torch.ones(3)
    y = batch_norm(x, rm, rv, training=True, backend="cpu")
    (expected,) = torch.autograd.grad(y, x, torch.ones_like(y) * torch.arange(3.0).view(3, 1, 1),
                                      retain_graph=True)  # fmt: skip
    rm.add_(5.0)
    rv.mul_(3.0)
    (again,) = torch.autograd.grad(y, x, torch.ones_like(y) * torch.arange(3.0).view(3, 1, 1))
    assert torch.equal(expected, again)


def test_strided_running_statistics():
    """Running statistics that are strided views (every other element of a buffer) are updated
    in place like torch updates them."""
    x = torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(13))
    ours, theirs = torch.zeros(2, 6), torch.zeros(2, 6)
    ours[1].fill_(1.0)
    theirs[1].fill_(1.0)
    batch_norm(x, ours[0, ::2], ours[1, ::2], training=True, backend="cpu")
    torch.nn.functional.batch_norm(x, theirs[0, ::2], theirs[1, ::2], training=True)
    assert_close(ours, theirs, rtol=1e-6, atol=1e-6, name="running statistics")
    assert torch.equal(ours[:, 1::2], torch.tensor([[0.0] * 3, [1.0] * 3]))


def test_one_value_per_channel_rejected_in_training():
    """As torch: a training batch with one value per channel is an error (eval is fine)."""
    x = torch.randn(1, 4)
    with pytest.raises(ValueError, match="more than one value per channel"):
        batch_norm(x, torch.zeros(4), torch.ones(4), training=True, backend="cpu")
    with pytest.raises(ValueError, match="more than one value per channel") as raised:
        cpu.batch_norm(x, None, None, None, None, True, 0.1, 1e-5)
    assert "Remedies: eval mode" in str(raised.value)  # as the layers say it
    y = batch_norm(x, torch.zeros(4), torch.ones(4), training=False, backend="cpu")
    assert_close(y, x / np.sqrt(1 + 1e-5), rtol=1e-6, atol=1e-6, name="eval y")


@pytest.mark.parametrize("shape", [(0, 4), (0, 4, 3, 3), (5, 4, 0, 3)])
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "graph"])
def test_empty_training_batch_gives_an_empty_output(shape, grad):
    """As torch: an empty batch in training returns an empty output and leaves the running
    statistics untouched (the op itself, not only the functional layer); its gradients are
    empty for x and zero for gamma and beta."""
    x = torch.randn(shape, requires_grad=grad)
    w = torch.rand(4, requires_grad=grad)
    b = torch.randn(4, requires_grad=grad)
    rm, rv = torch.full((4,), 0.5), torch.full((4,), 2.0)
    y = cpu.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    expected = torch.nn.functional.batch_norm(
        x.detach(), torch.full((4,), 0.5), torch.full((4,), 2.0), w.detach(), b.detach(), True
    )
    assert y.shape == expected.shape and y.stride() == expected.stride()
    assert torch.equal(rm, torch.full((4,), 0.5)) and torch.equal(rv, torch.full((4,), 2.0))
    if grad:
        dx, dw, db = torch.autograd.grad(y.sum(), (x, w, b))
        assert dx.shape == x.shape
        assert torch.equal(dw, torch.zeros(4)) and torch.equal(db, torch.zeros(4))
    for save in ("recompute", "mask", "output"):  # the fused kernels, with a residual
        z = torch.randn(shape)
        y = cpu.batch_norm_relu(x, z, rm, rv, w, b, True, 0.1, 1e-5, save=save)
        assert y.shape == x.shape
        if grad:
            dx, dw = torch.autograd.grad(y.sum(), (x, w))
            assert dx.shape == x.shape and torch.equal(dw, torch.zeros(4))
    assert torch.equal(rm, torch.full((4,), 0.5)) and torch.equal(rv, torch.full((4,), 2.0))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"running_mean": torch.zeros(2), "running_var": torch.ones(2)}, "running_mean should"),
        ({"weight": torch.ones(7)}, "weight should contain 4 elements"),
        ({"bias": torch.ones(3)}, "bias should contain 4 elements"),
        ({"running_var": None}, "given together"),
        ({"running_mean": None}, "given together"),
        (
            {"running_mean": torch.zeros(4, dtype=torch.long)},
            "float32, bfloat16 or float64",
        ),
    ],
    ids=["short-stats", "long-weight", "short-bias", "mean-alone", "var-alone", "int-stats"],
)
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "graph"])
def test_malformed_channel_tensors_raise_before_any_write(change, message, grad):
    """The kernels index the (C,) tensors by raw pointers: a wrong length, a lone running
    statistic or an integer buffer raises RuntimeError (as torch's kernel does) before anything is
    read or written, so nothing past a buffer's end is touched and no statistic is half-updated."""
    x = torch.randn(8, 4).requires_grad_(grad)
    args = {
        "running_mean": torch.zeros(4),
        "running_var": torch.ones(4),
        "weight": torch.ones(4),
        "bias": torch.zeros(4),
    }
    args.update(change)
    before = {k: (v.clone(), v._version) for k, v in args.items() if v is not None}
    with pytest.raises(RuntimeError, match=message):
        cpu.batch_norm(
            x, args["running_mean"], args["running_var"], args["weight"], args["bias"], True,
            0.1, 1e-5,
        )  # fmt: skip
    for k, (value, version) in before.items():
        assert torch.equal(args[k], value) and args[k]._version == version, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_both_channels_last_walks_give_the_same_gradients(training, dtype):
    """The channels-last backward walks rows or chunks of channels (chosen per CPU): the same
    gradients bit for bit, with channel counts that leave vector tails (C = 37, 70) and blocks
    of rows that do not divide the batch. Rows of 8 KB and more go 4 rows at a time (2100 and
    2050 float32 channels, 4100 bfloat16 ones; blocks of 64 rows and a last one of 11, 27 or 2
    rows), and so do the rows of tensors up to 1 MB with at most 256 bytes per row (37 and 16
    channels, 300 and 120 rows) or, in the backward, 4-8 KB (1300 float32 channels, 50 rows),
    each channel's sums still adding the rows in order."""
    initial = cpu.channels_last_walk()
    assert initial in ("rows", "chunks")
    cases = [
        torch.randn(300, 37),
        torch.randn(5, 70, 3, 7).contiguous(memory_format=torch.channels_last),
        torch.randn(2, 16, 3, 4, 5).contiguous(memory_format=torch.channels_last_3d),
        torch.randn(203, 2100),
        torch.randn(66, 4100),
        torch.randn(50, 1300),
        torch.randn(3, 2050, 3, 3).contiguous(memory_format=torch.channels_last),
    ]
    try:
        for x in cases:
            x = x.to(dtype)
            C = x.shape[1]
            w, b = torch.rand(C) + 0.5, torch.randn(C)
            dy = torch.randn(x.shape).to(dtype).contiguous(memory_format=_format_of(x))
            grads = []
            for walk in ("rows", "chunks"):
                cpu.set_channels_last_walk(walk)
                xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
                rm, rv = torch.zeros(C), torch.ones(C) + 0.5
                y = cpu.batch_norm(xi, rm, rv, wi, bi, training, 0.1, 1e-5)
                grads.append(torch.autograd.grad(y, (xi, wi, bi), dy))
            for got, expected in zip(*grads):
                assert torch.equal(got, expected), tuple(x.shape)
    finally:
        cpu.set_channels_last_walk(initial)
    with pytest.raises(ValueError, match="'rows' or 'chunks'"):
        cpu.set_channels_last_walk("columns")


def _format_of(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


@pytest.mark.parametrize("layout", ["nc", "nchw", "nhwc"])
def test_with_and_without_a_graph_give_the_same_numbers(layout):
    """One C++ call serves both: the output alone where nothing records a graph, an autograd
    node where something does; the same y and running statistics bit for bit, and both count
    the in-place update of the buffers (their version counters go up by one)."""
    x = torch.randn(8, 6, 3, 3) if layout != "nc" else torch.randn(16, 6)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(6) + 0.5, torch.randn(6)
    results = []
    for grad in (False, True):
        rm, rv = torch.zeros(6), torch.ones(6)
        xi = x.detach().clone().requires_grad_(grad)
        y = cpu.batch_norm(xi, rm, rv, w, b, True, 0.1, 1e-5)
        assert (y.grad_fn is not None) == grad
        assert rm._version == 1 and rv._version == 1
        results.append((y.detach(), rm, rv))
    for a, b_ in zip(*results):
        assert torch.equal(a, b_)
    rm, rv = torch.zeros(6), torch.ones(6)
    cpu.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5)
    assert rm._version == 0 and rv._version == 0  # eval reads them only


@pytest.mark.parametrize("layout", ["nc", "nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_second_derivatives_equal_torch(training, layout):
    """create_graph=True (Hessians, gradient penalties): the second derivatives through the
    backend equal those through PyTorch's native kernel, never a silent zero or an error."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn((6, 3) if layout == "nc" else (4, 3, 5, 5), generator=gen) * 2 + 1
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w = torch.rand(3, generator=gen).add(0.5).requires_grad_(True)
    b = torch.randn(3, generator=gen).requires_grad_(True)
    rm, rv = torch.randn(3, generator=gen), torch.rand(3, generator=gen) + 0.5
    results = []
    for backend in ("cpu", "torch"):
        y = batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, backend=backend)
        first = torch.autograd.grad((y**3).sum(), (x, w, b), create_graph=True)
        penalty = sum(g.square().sum() for g in first)
        results.append((*first, *torch.autograd.grad(penalty, (x, w, b))))
    for name, ours, native in zip(["dx", "dw", "db", "ddx", "ddw", "ddb"], *results):
        assert native.abs().max() > 1e-3, name  # the comparison is not between two zeros
        scale = float(native.abs().max())
        assert_close(ours, native, rtol=1e-4, atol=1e-5 * scale, name=name)


def test_unsupported_dtype_falls_back_visibly():
    """float64 is not run by the C++ kernels: the call falls back to torch with a warning and
    last_backend() says so."""
    backends._warned.clear()
    x = torch.randn(5, 3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="backend 'cpu' unavailable.*float64"):
        y = batch_norm(x, None, None, training=True, backend="cpu")
    assert backends.last_backend() == "torch"
    assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True),
                 rtol=1e-12, atol=1e-12)  # fmt: skip


def test_no_compiler_falls_back_visibly(monkeypatch):
    """Where the extension cannot be built, backend="cpu" warns and runs torch's kernel, and
    available() (what `batchnorm env` prints) gives the reason."""
    backends._warned.clear()
    monkeypatch.setattr(_build, "_module", None)
    monkeypatch.setattr(_build, "_error", "no C++ compiler found (install g++ or set CXX)")
    x = torch.randn(5, 3)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        batch_norm(x, None, None, training=True, backend="cpu")
    assert backends.last_backend() == "torch"
    ok, reason = backends.available()["cpu"]
    assert not ok and "compiler" in reason


def test_status_names_the_build():
    """status() says where the cached build lives and which instruction set it uses."""
    ok, reason = cpu.status()
    assert ok and _build.isa() in reason and str(_build.build_dir()) in reason
    assert _build.module_name().startswith(f"batchnorm_cpu_{_build.isa().lower()}_")


def test_compiled_graphs_use_standard_ops(monkeypatch):
    """While torch.compile traces, backend="cpu" runs torch's kernel (the C++ call is opaque to
    Dynamo), so compiled models keep one graph."""
    backends._warned.clear()
    monkeypatch.setattr(backends, "_compiling", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        backends.resolve("cpu", device_type="cpu", dtype_name="float32")
    assert backends.last_backend() == "torch"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_layers_on_the_cpu_backend_compile_as_one_graph(training):
    """torch.compile(fullgraph=True) of a backend="cpu" layer: one graph of standard ops (the
    fallback's notice must not split it: warnings.warn is opaque to Dynamo), the same numbers as
    the eager layer on torch's kernel."""
    from batchnorm.nn import BatchNorm2d

    torch._dynamo.reset()
    backends._warned.clear()
    layer = BatchNorm2d(4, backend="cpu").train(training)
    reference = BatchNorm2d(4, backend="torch").train(training)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for step in range(2):
        x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(step))
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = compiled(xa), reference(xb)
        torch.testing.assert_close(ya, yb, rtol=1e-6, atol=1e-6)
        ya.square().sum().backward()
        yb.square().sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.running_mean, reference.running_mean, rtol=1e-6, atol=1e-7)


def test_cpu_bench_pipeline(tmp_path):
    """`batchnorm bench --device cpu` on a tiny shape: every mode and provider gives a row with
    a time, a ratio to the copy measured in the same rounds, and a small error against float64;
    the CSV, table, summary and plot come out. (Timings are not asserted.)"""
    from batchnorm.ops.bench import cpu as bench

    shape = bench.CpuShape((4, 8, 6, 6), "tiny")
    rows = bench.measure(shape, "nhwc", "float32", [1], bench.MODES, ["ours", "native"],
                         rounds=3, min_seconds=0.0)  # fmt: skip
    assert len(rows) == len(bench.MODES) * 3 + 1  # ours, native, copy; the floor in train_fwd
    floor = [row for row in rows if row.provider == "floor"]
    assert [row.mode for row in floor] == ["train_fwd"]
    for row in rows:
        assert row.time_us > 0 and row.x_copy > 0 and row.rounds >= 3, row
        if row.provider not in bench.YARDSTICKS:
            assert row.max_rel_err < 1e-5, row
            assert row.speedup_vs_native > 0
    path = tmp_path / "cpu.csv"
    bench.write_csv(str(path), rows, {"cpu": "test"})
    text = path.read_text()
    assert text.startswith("# cpu: test") and text.count("\n") == len(rows) + 2
    assert "4x8x6x6" in bench.format_table(rows)
    assert "train_fwd: ours/copy median" in bench.summary(rows)
    assert "train_fwd floor (x.sum() + the copy): x copy median" in bench.summary(rows)
    assert "train fwd floor (x copy)" in bench.markdown(rows)
    assert [r.provider for r in bench.read_csv(str(path))].count("floor") == 1
    assert "add_relu_fwd_bwd: vs native geomean" in bench.summary(rows)
    assert "relu(bn(x) + z) fwd" in bench.markdown(rows)
    pytest.importorskip("matplotlib")
    assert bench.plot_csv(str(path), str(tmp_path / "cpu.png")).endswith("cpu.png")
    assert (tmp_path / "cpu.png").stat().st_size > 0
    # `batchnorm bench --plot` knows the CPU benchmark's CSV without --device cpu
    from batchnorm.cli import main

    (tmp_path / "cpu.png").unlink()
    assert main(["bench", "--plot", str(path)]) == 0
    assert (tmp_path / "cpu.png").stat().st_size > 0


def test_kernel_ab_script_times_the_two_walks(capsys):
    """benchmarks/cpu_kernel_ab.py with one build given twice times its two channels-last
    walks against each other (x and dy evicted, dy then rewritten in cache), leaves the walk it
    found, and refuses --dy-warm without --cold and --backward. (Timings are not asserted.)"""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_kernel_ab.py"
    spec = importlib.util.spec_from_file_location("cpu_kernel_ab", script)
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    folder = str(_build.build_dir())
    initial = cpu.channels_last_walk()
    args = ["--walk-old", "rows", "--walk-new", "chunks", "--backward", "--rounds", "2"]
    try:
        ab.main([folder, folder, *args, "--cold", "--dy-warm", "--evict-mb", "1", "96x40"])
    finally:
        cpu.set_channels_last_walk(initial)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("96x40 |")]
    assert len(rows) == 1, rows
    cells = rows[0].split(" | ")
    assert cells[1] == "nc" and all(float(v) > 0 for v in cells[2:]), cells
    with pytest.raises(SystemExit) as refused:
        ab.main([folder, folder, "--dy-warm", "96x40"])
    assert refused.value.code == 2
    assert "--dy-warm needs --cold and --backward" in capsys.readouterr().err


def test_auto_picks_cpu_only_for_listed_dtypes(monkeypatch):
    """ "auto" takes the C++ kernels for the CPU dtypes in CPU_AUTO_DTYPES (empty by default:
    BENCHMARKS.md explains why), never for other dtypes or devices, nor under torch.compile."""
    assert backends.resolve("auto", device_type="cpu", dtype_name="float32") == "torch"
    monkeypatch.setattr(backends, "CPU_AUTO_DTYPES", ("float32",))
    assert backends.resolve("auto", device_type="cpu", dtype_name="float32") == "cpu"
    assert "cpu: cpu (float32), torch (bfloat16, float16, float64)" in backends.auto_summary()
    assert backends.resolve("auto", device_type="cpu", dtype_name="float64") == "torch"
    assert backends.resolve("auto", device_type="cpu", dtype_name="bfloat16") == "torch"
    monkeypatch.setattr(backends, "_compiling", lambda: True)
    assert backends.resolve("auto", device_type="cpu", dtype_name="float32") == "torch"


def test_torch_func_transforms_run_torch(monkeypatch):
    """Inside torch.func transforms the C++ kernels' autograd Function cannot run: "auto" takes
    torch silently, an explicit "cpu" falls back to torch with a warning, and the layers' fast
    path does the same; the numbers are then torch.nn's."""
    from torch.func import functional_call, grad

    backends._warned.clear()
    monkeypatch.setattr(backends, "CPU_AUTO_DTYPES", ("float32",))
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(5))
    native = torch.nn.BatchNorm1d(3, track_running_stats=False)
    expected = grad(lambda x: (functional_call(native, {}, (x,)) ** 3).sum())(x)
    for backend in (None, "cpu"):
        layer = bnn.BatchNorm1d(3, track_running_stats=False, backend=backend)
        layer(x)  # a plan with the C++ kernels
        assert layer.last_backend == "cpu"
        loss = lambda x, layer=layer: (functional_call(layer, {}, (x,)) ** 3).sum()  # noqa: E731
        if backend == "cpu":
            with pytest.warns(RuntimeWarning, match="torch.func"):
                got = grad(loss)(x)
        else:
            got = grad(loss)(x)
        assert torch.equal(got, expected), backend
        assert layer.last_backend == "torch"


def test_status_without_the_compiler_named_by_cxx(monkeypatch, tmp_path):
    """With $CXX naming a compiler that does not exist and nothing cached, status() says the
    kernels cannot be built (and why) instead of promising a build that would fail."""
    monkeypatch.setattr(_build, "_module", None)
    monkeypatch.setattr(_build, "_error", None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    ok, reason = cpu.status()
    assert not ok and "no C++ compiler" in reason


def test_auto_by_layout_and_mode(monkeypatch):
    """CPU_AUTO_CASES lists (dtype, layout, training) cases for the C++ kernels: "auto" picks
    them exactly there, in the functional API and in a layer, whose remembered choice follows
    the layout and the mode of each call."""
    monkeypatch.setattr(backends, "CPU_AUTO_CASES", frozenset({("float32", "planar", True)}))
    x = torch.randn(4, 3, 5, 5)
    nhwc = x.contiguous(memory_format=torch.channels_last)
    assert backends.resolve(
        "auto", device_type="cpu", dtype_name="float32", layout="planar", training=True
    ) == "cpu"  # fmt: skip
    for layout, training in (("planar", False), ("channels_last", True), ("nc", True)):
        assert backends.resolve(
            "auto", device_type="cpu", dtype_name="float32", layout=layout, training=training
        ) == "torch", (layout, training)  # fmt: skip
    assert "cpu float32 planar training: cpu" in backends.auto_summary()
    batch_norm(x, None, None, training=True)
    assert backends.last_backend() == "cpu"
    batch_norm(nhwc, None, None, training=True)
    assert backends.last_backend() == "torch"
    layer = bnn.BatchNorm2d(3)
    seen = []
    for inp, mode in ((x, True), (x, True), (nhwc, True), (nhwc, True), (x, False), (x, True)):
        layer.train(mode)
        layer(inp)
        seen.append(layer.last_backend)
    assert seen == ["cpu", "cpu", "torch", "torch", "torch", "cpu"]


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores")
def test_kernels_run_on_torchs_threads():
    """ATen's parallel_for in the kernels runs on torch's OpenMP pool: one thread under
    torch.set_num_threads(1), two under 2 (an extension built without OpenMP ran serially)."""
    ext = cpu.load()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert ext.threads_used(64) == 1
        torch.set_num_threads(2)
        assert ext.threads_used(64) == 2
    finally:
        torch.set_num_threads(before)
    assert "torch's thread pool" in cpu.status()[1]


def test_compiler_without_openmp_builds_a_visible_one_thread_variant(monkeypatch, tmp_path):
    """Where the compiler cannot build OpenMP code (and no OpenMP build is cached), the kernels
    are built without it, under another name, and the status says they run on one thread."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(_build, "_compiles_openmp", lambda: False)
    _build.openmp_flags.cache_clear()
    _build.module_name.cache_clear()
    try:
        if not _build._torch_uses_openmp():
            pytest.skip("torch does not use OpenMP here")
        assert _build.openmp_flags() == ()
        assert "one thread" in _build.thread_use()
        assert _build.module_name() != _build._name(["-fopenmp"])
    finally:
        monkeypatch.undo()
        _build.openmp_flags.cache_clear()
        _build.module_name.cache_clear()
    assert _build.openmp_flags() == ("-fopenmp",)


def _stream_cases() -> list[torch.Tensor]:
    """Inputs whose passes can stream: planar rows of 512 bytes or more that start off a cache line
    (17 * 37 values, also in bfloat16) or on one (16 * 64), from a storage offset; channels-last
    rows of 32 and 64 channels (vector-aligned), (N, C) and channels-last 3-D; rows that cannot
    (C = 37); short planes (64 samples of 5 * 7, statistics in channel blocks), whose forward
    and backward write their rows after all the statistics as one flat run of whole vectors; and
    a sequence stored (N, L, C), whose y, dx and contiguous dy change storage by a blocked
    transpose (streamed in 16 x 16 blocks)."""
    return [
        torch.randn(64, 6, 5, 7),
        torch.randn(65, 6, 5, 7)[1:],
        torch.randn(4, 5, 17, 37),
        torch.randn(5, 5, 17, 37)[1:],  # starts 5 * 17 * 37 values into its storage
        torch.randn(3, 4, 16, 64),
        torch.randn(6, 32, 5, 7).contiguous(memory_format=torch.channels_last),
        torch.randn(300, 64),
        torch.randn(2, 32, 3, 4, 5).contiguous(memory_format=torch.channels_last_3d),
        torch.randn(5, 37, 3, 7).contiguous(memory_format=torch.channels_last),
        torch.randn(4, 48, 32).transpose(1, 2),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_streaming_stores_give_the_same_values(training, dtype):
    """Large outputs are written with streaming stores (from cpu.stream_min_bytes() of traffic
    per pass); with the threshold at 0 every pass that can stream does: outputs, running
    statistics and gradients are the same bit for bit as with plain stores, on 1 and 2 threads."""
    initial = cpu.stream_min_bytes()
    if initial < 0:
        pytest.skip("this build has no AVX2 or AVX512: its stores never stream")
    threads = torch.get_num_threads()
    try:
        for x in _stream_cases():
            x = x.to(dtype)
            C = x.shape[1]
            w, b = torch.rand(C) + 0.5, torch.randn(C)
            dy = torch.randn(x.shape).to(dtype).contiguous(memory_format=_format_of(x))
            cpu.set_stream_min_bytes(0)
            short_planes = x.dim() == 4 and x.is_contiguous() and x.shape[2] * x.shape[3] == 35
            rows_stream = x.shape[1] != 37 and not short_planes
            assert cpu._ext().streams(x, 1) == rows_stream, tuple(x.shape)
            results = []
            for threshold, n_threads in ((1 << 62, 1), (0, 1), (0, 2)):
                cpu.set_stream_min_bytes(threshold)
                torch.set_num_threads(n_threads)
                xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
                rm, rv = torch.zeros(C) + 0.25, torch.ones(C) + 0.5
                y = cpu.batch_norm(xi, rm, rv, wi, bi, training, 0.1, 1e-5)
                grads = torch.autograd.grad(y, (xi, wi, bi), dy)
                results.append((y.detach(), rm, rv, *grads))
            for streamed in results[1:]:
                for got, expected in zip(streamed, results[0]):
                    assert torch.equal(got, expected), (tuple(x.shape), x.dtype)
    finally:
        cpu.set_stream_min_bytes(initial)
        torch.set_num_threads(threads)
    # Below the threshold nothing streams: the default leaves these small inputs alone.
    assert not cpu._ext().streams(_stream_cases()[0], 2)
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ValueError, match="bytes >= 0"):
            cpu.set_stream_min_bytes(bad)
    try:
        cpu.set_stream_min_bytes(np.int64(1 << 24))  # numpy integers are sizes too
        assert cpu.stream_min_bytes() == 1 << 24
    finally:
        cpu.set_stream_min_bytes(initial)


def test_planar_rows_under_512_bytes_do_not_stream():
    """Short planar rows (7x7 planes) are not streamed row by row whatever the threshold: a row
    off a cache-line boundary shares lines with its neighbours (measured slower streamed). (The
    output passes walk them as one flat run: test_flat_output_pass_matches_channels_last.)"""
    initial = cpu.stream_min_bytes()
    if initial < 0:
        pytest.skip("this build has no AVX2 or AVX512: its stores never stream")
    try:
        cpu.set_stream_min_bytes(0)
        assert not cpu._ext().streams(torch.randn(2, 3, 7, 7), 2)
        assert not cpu._ext().streams(torch.randn(2, 3, 11, 11), 2)  # 484 bytes
        assert cpu._ext().streams(torch.randn(2, 3, 14, 14), 2)  # 784 bytes
        assert not cpu._ext().streams(torch.randn(2, 3, 14, 14).bfloat16(), 2)  # 392 bytes
    finally:
        cpu.set_stream_min_bytes(initial)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "shape",
    # Planes off the vector width: 7x7, 14x14, 5x5, 17 values (a vector meets one row end), a
    # single row, and N * C rows that do not fill the last vector; planes shorter than a vector
    # (3x3, 2x2, 3x1: a vector meets several row ends; with 40 and 21 channels the constants
    # are permuted from a vector of channels, and gathered near the last channel; with 5, at
    # every vector), and rows of exactly one vector (4x4); a storage offset moves the vector
    # boundaries.
    [
        *[(6, 10, 7, 7), (3, 7, 14, 14), (5, 9, 5, 5), (4, 3, 17, 1), (1, 1, 7, 7), (3, 5, 3, 11)],
        *[(6, 40, 3, 3), (9, 21, 2, 2), (3, 5, 3, 1), (5, 70, 4, 4)],
    ],
)
def test_flat_output_pass_matches_channels_last(shape, dtype):
    """The planar forward writes rows off the vector width as one flat run of vectors, a vector
    that crosses a row's end taking both channels' constants lane by lane. In eval mode every
    value is (x - mean) * scale + offset with the same constants in any layout, so the planar
    output equals the channels-last one bit for bit: on 1 and 2 threads, with plain and with
    streaming stores, from a storage offset."""
    initial = cpu.stream_min_bytes()
    if initial < 0:
        pytest.skip("this build has no AVX2 or AVX512: no flat output pass")
    gen = torch.Generator().manual_seed(29)
    C = shape[1]
    base = (torch.randn((shape[0] + 1, *shape[1:]), generator=gen) * 3 + 2).to(dtype)
    x = base[1:]  # a storage offset of one sample
    w, b = torch.rand(C, generator=gen) + 0.5, torch.randn(C, generator=gen)
    rm, rv = torch.randn(C, generator=gen), torch.rand(C, generator=gen) + 0.5
    expected = cpu.batch_norm(
        x.contiguous(memory_format=torch.channels_last), rm, rv, w, b, False, 0.1, 1e-5
    )
    threads = torch.get_num_threads()
    try:
        for threshold, n_threads in ((1 << 62, 1), (0, 1), (1 << 62, 2), (0, 2)):
            cpu.set_stream_min_bytes(threshold)
            torch.set_num_threads(n_threads)
            y = cpu.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5)
            assert y.is_contiguous()
            assert torch.equal(y, expected), (threshold, n_threads)
    finally:
        cpu.set_stream_min_bytes(initial)
        torch.set_num_threads(threads)


# Shapes of every statistics walk: planar (per channel, blocks, short planes), channel-inner
# (one block, many blocks, pieces), and a bfloat16 input.
# (shape, channel-inner storage): channels-last for images, (N, L, C) for sequences (_inner).
NONFINITE_CASES = [
    ((4, 3, 5, 5), False),
    ((4, 3, 5, 5), True),
    ((64, 40, 7, 7), False),
    ((64, 40, 7, 7), True),
    ((16, 8, 2, 2), False),
    ((16, 3), False),
    ((300, 3), False),
    ((64, 1280), False),
    ((4, 20, 32), True),
    ((3, 37, 17), True),
]


def _inner(t, inner):
    """t (contiguous) stored channel-inner where `inner`: channels-last, or (N, L, C) for 3-D."""
    if not inner:
        return t
    if t.dim() == 3:
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    return t.contiguous(memory_format=torch.channels_last)


def _nonfinite_input(shape, channels_last, pattern, dtype):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    ch = x[:, 0].contiguous()
    flat = ch.view(-1)
    if pattern == "one +inf":
        flat[flat.numel() // 2] = float("inf")
    elif pattern == "one -inf":
        flat[flat.numel() // 2] = -float("inf")
    elif pattern == "first +inf":  # the channel's first value is its shift
        flat[0] = float("inf")
    elif pattern == "all -inf":
        flat.fill_(-float("inf"))
    elif pattern == "both infs":
        flat[1], flat[-1] = float("inf"), -float("inf")
    elif pattern == "nan":
        flat[3] = float("nan")
    x[:, 0] = ch
    return _inner(x, channels_last).to(dtype)


@pytest.mark.parametrize("scale", [1e-21, 1e-26, 1e-34])
@pytest.mark.parametrize(("shape", "channels_last"), NONFINITE_CASES)
def test_tiny_spread_with_eps_zero_is_measured_in_float64(shape, channels_last, scale):
    """With eps = 0, data whose spread is under 1e-20 have squares that float32 cannot hold (they
    became subnormal, then 0: a variance off by percent, then NaN in y): such channels are
    measured again in float64, so y and dx keep float32 accuracy (and the running variance is
    the float64 value, as float32 can hold it)."""
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(shape, generator=gen)
    x = _inner(base * scale + 3 * scale, channels_last)
    dy = _inner(torch.randn(shape, generator=gen), channels_last)
    c = shape[1]
    dims = [0, *range(2, len(shape))]
    x64 = x.double().requires_grad_()
    mean, var = x64.mean(dims, keepdim=True), x64.var(dims, unbiased=False, keepdim=True)
    y64 = (x64 - mean) / var.sqrt()
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    xg = x.clone().requires_grad_()
    rm, rv = torch.zeros(c), torch.ones(c)
    y = cpu.batch_norm(xg, rm, rv, None, None, True, 1.0, 0.0)
    (dx,) = torch.autograd.grad(y, xg, dy)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    assert (y.double() - y64).abs().max() < 2e-6
    assert ((dx.double() - dx64).abs().max() / dx64.abs().max()) < 1e-5
    # float32 holds such a variance as a subnormal or 0: rv is the float64 value so stored
    unbiased = x.double().var(dims, unbiased=True).float()
    torch.testing.assert_close(rv, unbiased, rtol=1e-5, atol=3e-45)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "pattern", ["one +inf", "one -inf", "first +inf", "all -inf", "both infs", "nan"]
)
@pytest.mark.parametrize(("shape", "channels_last"), NONFINITE_CASES)
def test_nonfinite_channel_statistics_are_torchs(shape, channels_last, pattern, dtype):
    # A channel holding infinities of one sign has the mean +-inf, as torch's kernel gives (the
    # shifted sums gave NaN there); the other channels are untouched by it.
    x = _nonfinite_input(shape, channels_last, pattern, dtype)
    c = shape[1]
    got_rm, got_rv = torch.zeros(c), torch.ones(c)
    exp_rm, exp_rv = torch.zeros(c), torch.ones(c)
    y = cpu.batch_norm(x, got_rm, got_rv, None, None, True, 0.1, 1e-5)
    expected = torch.nn.functional.batch_norm(x, exp_rm, exp_rv, None, None, True, 0.1, 1e-5)
    torch.testing.assert_close(got_rm[:1], exp_rm[:1], equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(got_rv[:1], exp_rv[:1], equal_nan=True, rtol=0, atol=0)
    assert torch.isnan(y[:, 0]).all() and torch.isnan(expected[:, 0]).all()
    assert torch.isfinite(y[:, 1:]).all()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got_rm[1:], exp_rm[1:], rtol=tol, atol=tol)
    torch.testing.assert_close(got_rv[1:], exp_rv[1:], rtol=tol, atol=tol)


@pytest.mark.parametrize(("shape", "channels_last"), NONFINITE_CASES)
def test_finite_values_near_the_float32_limit_keep_finite_statistics(shape, channels_last):
    # |x| ~ 1e37: the float32 sums of the statistics overflow; the channels are measured again
    # in float64, so the mean stays finite and the output normalized (it was -inf and NaN).
    x = _inner(torch.randn(shape, generator=torch.Generator().manual_seed(6)) * 2e37, channels_last)
    c = shape[1]
    rm, rv = torch.zeros(c), torch.ones(c)
    y = cpu.batch_norm(x, rm, rv, None, None, True, 0.1, 1e-5)
    xd = x.double()
    dims = [0, *range(2, x.dim())]
    mean, var = xd.mean(dims), xd.var(dims, unbiased=False)
    view = (1, c) + (1,) * (x.dim() - 2)
    expected = (xd - mean.reshape(view)) / var.reshape(view).sqrt()
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(rm.double(), 0.1 * mean, rtol=1e-6, atol=0)
    assert torch.isinf(rv).all()  # 0.9 + 0.1 * (about 4e74) overflows float32, as in torch


GRAD_CASES = [*NONFINITE_CASES, ((2, 4, 32, 32), False), ((2, 4, 32, 32), True)]


def _grads(fn, x, dy, gamma, beta, training=True):
    x = x.clone().requires_grad_()
    gamma, beta = gamma.clone().requires_grad_(), beta.clone().requires_grad_()
    c = x.shape[1]
    y = fn(x, torch.zeros(c), torch.ones(c), gamma, beta, training, 0.1, 1e-5)
    y.backward(dy)
    return x.grad, gamma.grad, beta.grad


def _reference_grads(x, dy, gamma):
    # float64 gradients of the training batch norm, from the same float32 values
    xd, dyd = x.double(), dy.double()
    dims = [0, *range(2, x.dim())]
    mean = xd.mean(dims, keepdim=True)
    invstd = xd.var(dims, unbiased=False, keepdim=True).rsqrt()
    xhat = (xd - mean) * invstd
    m = x.numel() // x.shape[1]
    dgamma, dbeta = (dyd * xhat).sum(dims), dyd.sum(dims)
    view = mean.shape
    dx = (dyd - dbeta.reshape(view) / m - xhat * dgamma.reshape(view) / m) * invstd
    return dx * gamma.double().reshape(view), dgamma, dbeta


@pytest.mark.parametrize(("shape", "channels_last"), GRAD_CASES)
@pytest.mark.parametrize(
    ("spread", "dy_scale"), [(1e20, 1.0), (1e30, 1.0), (1e37, 1.0), (1e5, 1e-30)]
)
def test_backward_keeps_float32_accuracy_at_any_spread(shape, channels_last, spread, dy_scale):
    # dx's projection coefficient, about gamma * mean(dy * xhat) / var, falls below the normal
    # float32 numbers past a spread of about 1e19 (or sooner with a small dy): those channels are
    # measured again in float64 (dx was 1-15 % off at 1e25; torch's own kernel returns zeros).
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(shape, generator=gen) * spread + 0.3 * spread
    dy = torch.randn(shape, generator=gen) * dy_scale
    x, dy = _inner(x, channels_last), _inner(dy, channels_last)
    c = shape[1]
    gamma, beta = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    got = _grads(cpu.batch_norm, x, dy, gamma, beta)
    for name, g, r in zip(("dx", "dgamma", "dbeta"), got, _reference_grads(x, dy, gamma)):
        err = ((g.double() - r).abs().max() / r.abs().max()).item()
        assert err < 1e-5, f"{name}: {err:.2e} of its largest value off"


@pytest.mark.parametrize(("shape", "channels_last"), GRAD_CASES)
@pytest.mark.parametrize(
    "where", ["dy +inf", "dy -inf", "dy nan", "dy both infs", "x +inf", "x nan"]
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nonfinite_values_give_torchs_gradients(shape, channels_last, where, training):
    # inf and NaN in dy or x land in dx, dgamma and dbeta where torch's kernel puts them (the
    # shifted sums gave NaN for dgamma's +-inf, and NaN over the whole channel of dx); the other
    # channels keep finite gradients equal to torch's.
    gen = torch.Generator().manual_seed(9)
    x, dy = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    at = (1, 0, *(1,) * (len(shape) - 2))
    other = (0, 0, *(0,) * (len(shape) - 2))
    value = float("nan") if "nan" in where else float("-inf" if "-inf" in where else "inf")
    (dy if where.startswith("dy") else x)[at] = value
    if where == "dy both infs":
        dy[other] = -float("inf")
    x, dy = _inner(x, channels_last), _inner(dy, channels_last)
    c = shape[1]
    gamma, beta = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    got = _grads(cpu.batch_norm, x, dy, gamma, beta, training)
    expected = _grads(torch.nn.functional.batch_norm, x, dy, gamma, beta, training)
    for name, g, e in zip(("dx", "dgamma", "dbeta"), got, expected):
        for kind in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(kind(g), kind(e)), f"{name}: {kind.__name__} differs from torch's"
        finite = torch.isfinite(e)
        torch.testing.assert_close(g[finite], e[finite], rtol=1e-4, atol=1e-5)
    assert torch.isfinite(got[1][1:]).all() and torch.isfinite(got[0][:, 1:]).all()


def _torch_and_ours(x, training, fn_ours=cpu.batch_norm):
    c = x.shape[1]
    out = {}
    for name, fn in (("ours", fn_ours), ("torch", torch.nn.functional.batch_norm)):
        xx = x.detach().requires_grad_()
        y = fn(xx, torch.zeros(c), torch.ones(c), None, None, training, 0.1, 1e-5)
        # autograd.grad: the kernel's own dx (x.grad would be restrided like x by autograd)
        (dx,) = torch.autograd.grad(y, xx, torch.linspace(-1, 1, y.numel()).reshape(y.shape))
        out[name] = (y.detach(), dx)
    return out["ours"], out["torch"]


@pytest.mark.parametrize("shape", [(1, 16, 4, 8), (1, 3, 2, 4, 2), (1, 33, 5), (1, 7, 1, 9)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_one_sample_slice_of_a_batch(shape, training):
    # x[::2] of a batch, one sample left: contiguous, but with the batch's stride on its
    # dimension of one value. The backward refused it (dy "did not match the input's layout"),
    # and the output kept the odd stride where torch's is the standard one.
    big = torch.randn((2, *shape[1:]), generator=torch.Generator().manual_seed(3))
    x = big[::2]
    assert x.is_contiguous() and x.stride(0) != x[0].numel()
    (y, dx), (ty, tdx) = _torch_and_ours(x, training)
    assert y.stride() == ty.stride() and dx.stride() == tdx.stride()
    torch.testing.assert_close(y, ty, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, tdx, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fused", [False, True], ids=["bn", "bn_relu"])
def test_sequence_stored_nlc_gives_torchs_layouts(training, fused):
    # (N, C, L) stored as (N, L, C): the kernels walk it channel-inner without a copy, but the
    # output and dx are contiguous, as torch's are (code after a BatchNorm1d may view() them);
    # x.grad is laid out like x, as with torch.
    x = torch.randn(8, 12, 5, generator=torch.Generator().manual_seed(4))
    x = x.transpose(1, 2).contiguous().transpose(1, 2)
    ours = cpu.batch_norm
    if fused:

        def ours(*args):
            return cpu.batch_norm_relu(args[0], None, *args[1:], save="output")

    (y, dx), (ty, tdx) = _torch_and_ours(x, training, ours)
    assert y.is_contiguous() and y.stride() == ty.stride()
    assert dx.is_contiguous() and dx.stride() == tdx.stride()
    xx = x.detach().requires_grad_()
    ours(xx, torch.zeros(12), torch.ones(12), None, None, training, 0.1, 1e-5).sum().backward()
    assert xx.grad.stride() == x.stride()
    if fused:
        ty = ty.relu()
    torch.testing.assert_close(y, ty, rtol=1e-5, atol=1e-5)
    if not fused:
        torch.testing.assert_close(dx, tdx, rtol=1e-4, atol=1e-5)
    y.view(8, -1)  # as on torch's output


def _as_sequence(t, n, length):
    """(n * length, C) rows as the (n, C, length) sequence batch stored (n, length, C)."""
    return t.view(n, length, -1).transpose(1, 2)


def _sequence_step(x, z, dy, params, training, fused):
    """y and every gradient of batch_norm (fused None) or batch_norm_relu(x, z, save=fused)."""
    w, b, rm, rv = params
    x, z, w, b = (t.clone().requires_grad_() for t in (x, z, w, b))
    if fused is None:
        y = cpu.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)
        return (y, *torch.autograd.grad(y, (x, w, b), dy))
    y = cpu.batch_norm_relu(x, z, rm, rv, w, b, training, 0.1, 1e-5, save=fused)
    return (y, *torch.autograd.grad(y, (x, z, w, b), dy))


@pytest.mark.parametrize("fused", [None, "mask", "output", "recompute"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_sequence_output_is_the_rows_output_bit_for_bit(training, dtype, fused):
    """A sequence batch stored (N, L, C) has its y and dx written contiguous by the passes
    themselves (blocks of 16 positions x 16 channels turned in registers, partial blocks at the
    edges), also under relu(bn(x) + z) with each of its saves: the same bits as the channel-inner
    passes over the same values seen as (N * L, C) rows (y, dx, dz, dgamma, dbeta and the running
    statistics), with means near 0 (the folded output) and far from it, on 1 and 2 threads."""
    threads = torch.get_num_threads()
    try:
        for N, C, L in ((1, 5, 3), (3, 16, 16), (2, 37, 17), (4, 64, 33), (2, 300, 48)):
            for mean in (0.0, 100.0):
                gen = torch.Generator().manual_seed(C * 100 + L)
                rows = (torch.randn(N * L, C, generator=gen) * 3 + mean).to(dtype)
                z_rows = torch.randn(N * L, C, generator=gen).to(dtype)
                dy_rows = torch.randn(N * L, C, generator=gen).to(dtype)
                w, b = torch.rand(C, generator=gen) + 0.5, torch.randn(C, generator=gen)
                rm, rv = torch.randn(C, generator=gen), torch.rand(C, generator=gen) + 0.5

                for n_threads in (1, 2):
                    torch.set_num_threads(n_threads)
                    seq_stats, row_stats = (rm.clone(), rv.clone()), (rm.clone(), rv.clone())
                    seq = _sequence_step(
                        *(_as_sequence(t, N, L) for t in (rows, z_rows, dy_rows)),
                        (w, b, *seq_stats),
                        training,
                        fused,
                    )
                    ref = _sequence_step(rows, z_rows, dy_rows, (w, b, *row_stats), training, fused)
                    assert seq[0].is_contiguous() and seq[1].is_contiguous(), (N, C, L)
                    for got, expected in zip(seq, ref):
                        if got.dim() == 3:
                            expected = _as_sequence(expected, N, L)
                        assert torch.equal(got, expected), (N, C, L, mean)
                    for got, expected in zip(seq_stats, row_stats):
                        assert torch.equal(got, expected), (N, C, L, mean)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("shape", "channels_last"),
    [
        ((64, 1280), False),
        ((8, 64, 14, 14), False),
        ((8, 64, 14, 14), True),
        ((4, 3, 5, 5, 5), False),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_eval_output_is_torchs_bit_for_bit(shape, channels_last, dtype):
    # The eval constants are computed in float32 as torch's kernel computes them, and a running
    # mean within 8 standard deviations is folded into the offset as torch folds it: the same
    # bits (it was 80-88 % of the values, the rest 1-2 ulps off, with float64 constants).
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(shape, generator=gen)
    if channels_last:
        x = x.contiguous(
            memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last
        )
    x = x.to(dtype)
    c = shape[1]
    rm = torch.randn(c, generator=gen) * 0.5
    rv = torch.rand(c, generator=gen) * 3 + 0.5
    w, b = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
    y = cpu.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5)
    assert torch.equal(y, torch.nn.functional.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--threads", "0"], "--threads: must be at least 1, got 0"),
        (["--threads", "two"], "--threads: expected a whole number, got 'two'"),
        (["--reps", "-3"], "--reps: must be at least 1, got -3"),
    ],
)
def test_bench_refuses_bad_numbers_before_running(argv, message, capsys):
    from batchnorm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--device", "cpu", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_filters_that_match_nothing_list_what_there_is(capsys):
    from batchnorm.cli import main

    assert main(["bench", "--device", "cpu", "--shape", "64x256x14", "--group", "bn1d"]) == 2
    err = capsys.readouterr().err
    assert "no shape matches --shape 64x256x14 --group bn1d" in err
    assert "32x64x56x56" in err and "resnet50-b64" in err  # the suite's names and groups


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_bench_plot_of_a_missing_or_foreign_file_is_a_clear_error(device, tmp_path, capsys):
    """No traceback: the file is named, with what is wrong; no PNG is left behind."""
    from batchnorm.cli import main

    foreign = tmp_path / "notes.csv"
    foreign.write_text("a,b\n1,2\n")
    empty = tmp_path / "empty.csv"
    empty.write_text("# cpu: x\nshape,group,layout,dtype,threads,mode,provider,time_us,pct_copy\n")
    cases = [
        (tmp_path / "missing.csv", "No such file"),
        (foreign, "is not a CSV of batchnorm bench"),
        (empty, "has no rows"),
    ]
    for path, message in cases:
        assert main(["bench", "--device", device, "--plot", str(path)]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and message in err, err
    assert not list(tmp_path.glob("*.png"))


def test_bench_names_an_unwritable_csv_path_before_measuring(tmp_path, capsys):
    from batchnorm.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["bench", "--device", "cpu", "--csv", str(blocker / "out.csv")]) == 2
    assert "cannot create the folder" in capsys.readouterr().err
    assert main(["bench", "--device", "cpu", "--csv", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_bench_csv_is_written_atomically(tmp_path, monkeypatch):
    """A failure while writing leaves neither a partial CSV nor a temporary file."""
    from batchnorm.ops.bench import cpu as bench
    from batchnorm.ops.bench import files

    path = tmp_path / "sub" / "cpu.csv"
    numbers = (1.0, 0.9, 0.5, 2.0, 1.5, 1.2, 3, 1e-7)  # no NaN: it equals nothing
    row = bench.CpuRow("2x3", "tiny", "nc", "float32", 1, "train_fwd", "ours", *numbers, "")
    bench.write_csv(str(path), [row], {"cpu": "test"})
    assert bench.read_csv(str(path)) == [row]
    mask = os.umask(0o022)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # as open() would make it, not 0600

    def broken(rows):
        yield from rows
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.write_csv(str(path), ["a"], broken([{"a": 1}]))
    assert bench.read_csv(str(path)) == [row]  # the earlier file is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["cpu.csv"]
