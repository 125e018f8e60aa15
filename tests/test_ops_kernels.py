"""The Triton kernels (batchnorm.ops) against the float64 NumPy reference and against torch.

Without a GPU the kernels run under Triton's interpreter: TRITON_INTERPRET=1 is set for this
module only (before the kernels are first built) and restored afterwards, so the other test
modules keep seeing a CPU-only machine. With a GPU the same tests run the compiled kernels on
CUDA tensors. Shapes are tiny because the interpreter is slow; plan overrides force every path
(fused one-launch, split three-launch, several tiles per channel, several channel blocks).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchnorm import ops, reference
from batchnorm.ops import _plan
from batchnorm.ops._layout import View3
from tests.helpers import SHAPES, assert_close, make_input, tolerance

# The `device` fixture (CUDA, else the CPU under the Triton interpreter) is in conftest.py.


# Plan overrides that force each code path on tiny shapes.
PATHS = {
    "auto": {},
    "split": {"fused": False, "splits": 2, "block_a": 2, "block_c": 2},
    "fused-tiles": {"fused": True, "block_a": 2, "block_b": 4},
}
# The split path with fewer, larger tiles, for the larger shapes (the interpreter pays per tile).
SPLIT_WIDE = {"fused": False, "splits": 3, "block_a": 8, "block_c": 4, "block_b": 8}


def _params(c: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    return (
        rng.uniform(0.5, 1.5, c),
        rng.standard_normal(c),
        rng.standard_normal(c) * 0.1,
        (rng.uniform(0.5, 2.0, c)),
    )


def _t(a, dtype=torch.float32, device="cpu", grad=False):
    return torch.tensor(a, dtype=dtype, device=device, requires_grad=grad)


def _run_step(x, gamma, beta, rm, rv, training, dy, fn=ops.batch_norm, **kwargs):
    x = x.detach().clone().requires_grad_(True)
    g = gamma.detach().clone().requires_grad_(True)
    b = beta.detach().clone().requires_grad_(True)
    y = fn(x, rm, rv, g, b, training, 0.2, 1e-5, **kwargs)
    dx, dg, db = torch.autograd.grad(y, (x, g, b), dy)
    return y, dx, dg, db


def _check_against_reference(x, dy, gamma, beta, rm0, rv0, device, dtype_name, rounding=0.0):
    """One training step then one eval step through ops.batch_norm, against the reference.

    ``rounding`` widens the absolute tolerance (unused by the catalogue: the kernels centre x on
    the exact mean, so even x = 1e4 + randn needs no allowance for the float32 mean).
    """
    c = x.shape[1]
    x64 = x.double().cpu().numpy()
    dy64 = dy.double().cpu().numpy()
    pdtype = torch.float32
    gamma_t, beta_t = _t(gamma, pdtype, device), _t(beta, pdtype, device)
    rm, rv = _t(rm0, pdtype, device), _t(rv0, pdtype, device)
    fwd, grad = tolerance(dtype_name), tolerance(dtype_name, "gradient")
    m = x64.size // c

    if m > 1:
        y, dx, dg, db = _run_step(x, gamma_t, beta_t, rm, rv, True, dy)
        y_ref, cache = reference.bn_forward(x64, gamma, beta, 1e-5)
        dx_ref, dg_ref, db_ref = reference.bn_backward(dy64, cache)
        rm_ref, rv_ref = reference.running_update(rm0, rv0, cache.mu, cache.var, m, 0.2)
        assert y.dtype == x.dtype and y.shape == x.shape
        assert_close(y, y_ref, rtol=fwd[0], atol=fwd[1] + rounding, name="y")
        assert_close(
            dx, dx_ref, rtol=grad[0], atol=grad[1] * max(1, np.abs(dx_ref).max()), name="dx"
        )
        assert_close(dg, dg_ref, rtol=grad[0], atol=(grad[1] + rounding) * m, name="dgamma")
        assert_close(db, db_ref, rtol=grad[0], atol=grad[1] * m, name="dbeta")
        assert_close(rm, rm_ref, rtol=fwd[0], atol=fwd[1], name="running_mean")
        assert_close(rv, rv_ref, rtol=fwd[0], atol=fwd[1], name="running_var")
    else:
        rm_ref, rv_ref = rm0, rv0

    before = (rm.clone(), rv.clone())
    y, dx, dg, db = _run_step(x, gamma_t, beta_t, rm, rv, False, dy)
    y_ref = reference.bn_inference(x64, gamma, beta, rm_ref, rv_ref, 1e-5)
    grads_ref = reference.bn_inference_backward(dy64, x64, gamma, rm_ref, rv_ref, 1e-5)
    assert_close(y, y_ref, rtol=fwd[0], atol=fwd[1], name="eval y")
    for name, a, e in zip(("dx", "dgamma", "dbeta"), (dx, dg, db), grads_ref):
        atol = grad[1] * max(1.0, float(np.abs(e).max())) * (m if name != "dx" else 1)
        assert_close(a, e, rtol=grad[0], atol=atol, name=f"eval {name}")
    # eval leaves the running statistics alone
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", SHAPES, ids=[c.id for c in SHAPES])
def test_catalogue_matches_reference(case, path, device):
    """Every catalogue shape, train (forward, backward, running update) then eval, each path."""
    x = torch.tensor(make_input(case, seed=3), dtype=torch.float32, device=device)
    dy = torch.randn(case.shape, generator=torch.Generator().manual_seed(4)).to(device)
    gamma, beta, rm0, rv0 = _params(case.shape[1])
    with _plan.override(**PATHS[path]):
        _check_against_reference(x, dy, gamma, beta, rm0, rv0, device, "float32")


@pytest.mark.parametrize(
    "layout",
    ["channels_last", "channels_last_3d", "transposed_2d", "strided_slice", "channel_slice",
     "expanded", "permuted"],
)  # fmt: skip
@pytest.mark.parametrize("path", ["auto", "split"])
def test_layouts(layout, path, device):
    """Channels-last runs in place (output keeps the input's strides); other strides are handled
    (as a strided view or through a copy) and give the same numbers."""
    gen = torch.Generator().manual_seed(7)
    if layout == "channels_last":
        x = torch.randn(3, 6, 4, 5, generator=gen).to(memory_format=torch.channels_last)
    elif layout == "channels_last_3d":
        x = torch.randn(2, 5, 2, 3, 4, generator=gen).to(memory_format=torch.channels_last_3d)
    elif layout == "transposed_2d":
        x = torch.randn(6, 9, generator=gen).t()  # (9, 6) with strides (1, 9)
    elif layout == "strided_slice":
        x = torch.randn(4, 3, 6, 7, generator=gen)[:, :, ::2]
    elif layout == "channel_slice":
        x = torch.randn(4, 7, 3, 3, generator=gen)[:, 1:6]
    elif layout == "expanded":
        x = torch.randn(1, 4, 3, 3, generator=gen).expand(3, 4, 3, 3)
    else:  # dense but neither NCHW nor NHWC: (N, C, H, W) stored as N, W, H, C
        x = torch.randn(3, 5, 4, 6, generator=gen).permute(0, 3, 2, 1)
    x = x.to(device)
    dy = torch.randn(x.shape, generator=gen).to(device)
    gamma, beta, rm0, rv0 = _params(x.shape[1])
    with _plan.override(**(SPLIT_WIDE if path == "split" else {})):
        _check_against_reference(x, dy, gamma, beta, rm0, rv0, device, "float32")
        if layout.startswith("channels_last"):
            y = ops.batch_norm(x, None, None, training=True)
            assert y.stride() == x.stride()


@pytest.mark.parametrize("param_dtype", ["float32", "same"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_precision(dtype, param_dtype, device):
    """float16/bfloat16 inputs (the interpreter runs both) with float32 or same-dtype parameters
    and running statistics; statistics in float32; gradients of the parameters in their dtype."""
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(4, 5, 3, 3, generator=gen) * 2 + 3).to(dtype).to(device)
    dy = torch.randn(x.shape, generator=gen).to(dtype).to(device)
    c = x.shape[1]
    gamma, beta, rm0, rv0 = _params(c)
    pdtype = torch.float32 if param_dtype == "float32" else dtype
    # the reference sees the values the kernels see (after rounding to pdtype)
    gamma = _t(gamma, pdtype).double().numpy()
    beta = _t(beta, pdtype).double().numpy()
    rm0, rv0 = _t(rm0, pdtype).double().numpy(), _t(rv0, pdtype).double().numpy()
    x64, dy64 = x.double().cpu().numpy(), dy.double().cpu().numpy()
    name = str(dtype).replace("torch.", "")
    fwd, grad = tolerance(name), tolerance(name, "gradient")
    m = x64.size // c
    for training in (True, False):
        rm, rv = _t(rm0, pdtype, device), _t(rv0, pdtype, device)
        g, b = _t(gamma, pdtype, device), _t(beta, pdtype, device)
        y, dx, dg, db = _run_step(x, g, b, rm, rv, training, dy)
        assert y.dtype == dtype and dx.dtype == dtype and dg.dtype == pdtype
        if training:
            y_ref, cache = reference.bn_forward(x64, gamma, beta, 1e-5)
            dx_ref, dg_ref, db_ref = reference.bn_backward(dy64, cache)
            rm_ref, rv_ref = reference.running_update(rm0, rv0, cache.mu, cache.var, m, 0.2)
        else:
            y_ref = reference.bn_inference(x64, gamma, beta, rm0, rv0, 1e-5)
            dx_ref, dg_ref, db_ref = reference.bn_inference_backward(
                dy64, x64, gamma, rm0, rv0, 1e-5
            )
            rm_ref, rv_ref = rm0, rv0
        assert_close(y, y_ref, rtol=fwd[0], atol=fwd[1] * 4, name="y")
        assert_close(dx, dx_ref, rtol=grad[0], atol=grad[1] * 4, name="dx")
        # dgamma, dbeta: sums of m float32 products of rounded inputs, stored in pdtype
        assert_close(dg, dg_ref, rtol=grad[0], atol=grad[1] * np.sqrt(m), name="dgamma")
        assert_close(db, db_ref, rtol=grad[0], atol=grad[1] * np.sqrt(m), name="dbeta")
        rtol = 1e-6 if pdtype == torch.float32 else fwd[0]
        assert_close(rm, rm_ref, rtol=rtol, atol=rtol, name="running_mean")
        assert_close(rv, rv_ref, rtol=rtol, atol=rtol, name="running_var")
        # and torch agrees (its CPU kernels take these dtypes too)
        rm_t, rv_t = _t(rm0, pdtype), _t(rv0, pdtype)
        y_t = torch.nn.functional.batch_norm(
            x.cpu(), rm_t, rv_t, _t(gamma, pdtype), _t(beta, pdtype), training, 0.2, 1e-5
        )
        assert_close(y, y_t, rtol=fwd[0], atol=fwd[1] * 4, name="y vs torch")


@pytest.mark.parametrize(
    "shape,dtype",
    [((256, 3), torch.bfloat16), ((8, 3, 4, 4), torch.bfloat16), ((64, 2), torch.float32)],
    ids=["bf16-2d", "bf16-nchw", "f32-2d"],
)
@pytest.mark.parametrize("path", ["auto", "split"])
def test_large_mean_statistics_are_exact(shape, dtype, path, device):
    """x = 1000 + randn (and 1e4 + randn in float32): the batch statistics match float64 on the
    same values. E[x^2] - E[x]^2 in float32 would be off by ~1e-1 here."""
    gen = torch.Generator().manual_seed(5)
    offset = 1e4 if dtype == torch.float32 else 1000.0
    x = (offset + torch.randn(shape, generator=gen)).to(dtype).to(device)
    x64 = x.double().cpu().numpy()
    mu, var = reference.batch_statistics(x64)
    c = shape[1]
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    from batchnorm.ops import _custom

    with _plan.override(**(SPLIT_WIDE if path == "split" else {})):
        _, stats, _ = _custom.forward_op(x, None, None, rm, rv, None, True, 1.0, 0.0, 0)
    mean, mean_lo, invstd = stats
    assert_close(mean, mu, rtol=6e-8, atol=0, name="mean")  # float32 rounding of mu
    # mean + mean_lo carries mu to about float32 precision of the std, not of the mean
    assert_close(mean.double() + mean_lo.double(), mu, rtol=0, atol=1e-6 * np.sqrt(var).max(),
                 name="mean + mean_lo")  # fmt: skip
    assert_close(1.0 / invstd.double() ** 2, var, rtol=2e-5, atol=0, name="var")
    m = x64.size // c
    assert_close(rv, var * m / (m - 1), rtol=2e-5, atol=0, name="running_var (unbiased)")
    assert bool(torch.isfinite(invstd).all())


@pytest.mark.parametrize("shape", [(1, 5), (1, 6, 1, 1), (1, 3, 1, 1, 1)])
def test_eval_with_one_value_per_channel(shape, device):
    """N*H*W = 1 is fine in eval (population statistics), forward and backward."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=gen).to(device)
    dy = torch.randn(shape, generator=gen).to(device)
    gamma, beta, rm0, rv0 = _params(shape[1])
    _check_against_reference(x, dy, gamma, beta, rm0, rv0, device, "float32")


def test_training_with_one_value_per_channel_is_an_error(device):
    x = torch.randn(1, 4, 1, 1, device=device)
    with pytest.raises(ValueError, match="more than one value per channel"):
        ops.batch_norm(x, None, None, training=True)


@pytest.mark.parametrize("affine", ["none", "weight-only", "bias-only"])
def test_optional_parameters_and_no_running_stats(affine, device):
    """weight/bias None mean gamma = 1 / beta = 0; training without running statistics."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 4, generator=gen).to(device).requires_grad_(True)
    w = torch.rand(3, generator=gen).add(0.5).to(device).requires_grad_(True)
    b = torch.randn(3, generator=gen).to(device).requires_grad_(True)
    weight = w if affine == "weight-only" else None
    bias = b if affine == "bias-only" else None
    y = ops.batch_norm(x, None, None, weight, bias, True, 0.1, 1e-5)
    y_t = torch.nn.functional.batch_norm(x, None, None, weight, bias, True, 0.1, 1e-5)
    dy = torch.randn(x.shape, generator=gen).to(device)
    params = [t for t in (x, weight, bias) if t is not None]
    g = torch.autograd.grad(y, params, dy)
    g_t = torch.autograd.grad(y_t, params, dy)
    assert_close(y, y_t, rtol=1e-5, atol=1e-5, name="y")
    for a, e in zip(g, g_t):
        assert_close(a, e, rtol=1e-4, atol=1e-4, name="grad")


def test_running_stats_in_half_precision_buffers(device):
    """model.half(): fp16 input, weights and running buffers; updated in place like torch."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(6, 4, 3, 3, generator=gen).half().to(device)
    rm, rv = torch.zeros(4, dtype=torch.half, device=device), torch.ones(4, dtype=torch.half)
    rv = rv.to(device)
    rm_t, rv_t = rm.float().cpu(), rv.float().cpu()
    w = torch.ones(4, dtype=torch.half, device=device)
    for _ in range(3):
        ops.batch_norm(x, rm, rv, w, None, True, 0.3, 1e-5)
        torch.nn.functional.batch_norm(x.cpu().float(), rm_t, rv_t, None, None, True, 0.3, 1e-5)
    assert rm.dtype == torch.half
    assert_close(rm, rm_t, rtol=2e-3, atol=2e-3, name="running_mean")
    assert_close(rv, rv_t, rtol=2e-3, atol=2e-3, name="running_var")


def test_64_bit_indexing_path_gives_identical_results(device):
    """The int64 offset path (taken for tensors of 2**31+ elements) computes exactly what the
    int32 path does; forced here on a small shape, with the ReLU mask's offsets too."""
    gen = torch.Generator().manual_seed(9)
    for x in (
        torch.randn(4, 3, 5, 6, generator=gen),
        torch.randn(4, 3, 5, 6, generator=gen).to(memory_format=torch.channels_last),
    ):
        x = x.to(device)
        z = torch.randn(x.shape, generator=gen).to(device)
        dy = torch.randn(x.shape, generator=gen).to(device)
        outs = []
        for index_64 in (False, True):
            with _plan.override(index_64=index_64, fused=False, splits=2):
                rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
                xr = x.clone().requires_grad_(True)
                y = ops.batch_norm_add_relu(xr, z, rm, rv, None, None, True, 0.1, 1e-5)
                (dx,) = torch.autograd.grad(y, (xr,), dy)
                outs.append((y, dx, rm, rv))
        for a, b in zip(*outs):
            assert torch.equal(a, b)


def test_plan_switches_to_64_bit_offsets_for_huge_tensors():
    """The plan picks int64 offsets exactly when an offset can pass 2**31 - 1."""
    small = View3(a=64, c=64, b=56 * 56, stride_a=64 * 56 * 56, stride_c=56 * 56, stride_b=1)
    assert not _plan.make_plan(small, 2, False, None).index_64
    huge_planes = View3(a=256, c=64, b=512 * 512, stride_a=64 * 512 * 512, stride_c=512 * 512,
                        stride_b=1)  # fmt: skip
    assert _plan.make_plan(huge_planes, 2, False, None).index_64
    huge_rows = View3(a=2**26, c=64, b=1, stride_a=64, stride_c=1, stride_b=1)
    assert _plan.make_plan(huge_rows, 4, False, None).index_64
    # 2**31 elements: the last offset is 2**31 - 1, still an int32; one more row is not
    edge = View3(a=2**25, c=64, b=1, stride_a=64, stride_c=1, stride_b=1)
    assert not _plan.make_plan(edge, 4, False, None).index_64
    beyond = View3(a=2**25 + 1, c=64, b=1, stride_a=64, stride_c=1, stride_b=1)
    assert _plan.make_plan(beyond, 4, False, None).index_64


def test_plan_grids_stay_within_cuda_limits():
    """The second grid dimension is at most 65535 (CUDA's limit): huge tensors loop over tiles
    inside each program, and every split covers at least one tile."""
    huge = View3(a=2**27, c=16, b=1, stride_a=16, stride_c=1, stride_b=1)
    for forced in ({}, {"splits": 10**6}):
        with _plan.override(**forced):
            plan = _plan.make_plan(huge, 2, True, None)
        assert plan.tiles > 65535
        for programs, per in ((plan.splits, plan.tiles_per_split),
                              (plan.apply_programs, plan.tiles_per_apply)):  # fmt: skip
            assert programs <= 65535
            assert programs * per >= plan.tiles > (programs - 1) * per


@pytest.mark.parametrize("layout", ["planes", "rows", "planes-small"])
def test_relu_mask_holds_one_bit_per_element(layout, device):
    """The packed mask has bit k of byte j set iff value 8j + k of its axis is > 0."""
    from batchnorm.ops import _custom
    from batchnorm.ops._layout import canonical

    gen = torch.Generator().manual_seed(6)
    if layout == "planes":
        x = torch.randn(3, 4, 5, 7, generator=gen)  # B = 35: packed along B
    elif layout == "rows":
        x = torch.randn(19, 3, 2, 2, generator=gen).to(memory_format=torch.channels_last)
    else:
        x = torch.randn(11, 2, 2, 2, generator=gen)  # B = 4 < 8: packed along A
    x = x.to(device)
    _, view = canonical(x)
    y, _, mask = _custom.forward_op(x, None, None, None, None, None, True, 0.1, 1e-5, 2)
    assert tuple(mask.shape) == view.mask_shape() and mask.dtype == torch.uint8
    if view.planes:
        positive = (y.reshape(view.a, view.c, view.b) > 0).cpu()
    else:
        positive = (y.permute(0, *range(2, y.dim()), 1).reshape(view.a, view.c, 1) > 0).cpu()
    bits = (mask.cpu().to(torch.int32)[..., None] >> torch.arange(8)) & 1
    if view.pack_b:
        unpacked = bits.reshape(view.a, view.c, -1)[:, :, : view.b]
    else:
        unpacked = bits.permute(0, 3, 1, 2).reshape(-1, view.c, view.b)[: view.a]
    assert torch.equal(unpacked.bool(), positive)
    assert mask.numel() <= (x.numel() + 7 * view.c * max(view.a, view.b)) // 8 + 1


def test_results_are_deterministic(device):
    """Fixed-order reductions: two runs give bitwise-identical outputs and gradients."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(6, 3, 5, 5, generator=gen).to(device)
    dy = torch.randn(x.shape, generator=gen).to(device)
    w, b = torch.ones(3, device=device), torch.zeros(3, device=device)
    with _plan.override(fused=False, splits=3):
        first = _run_step(x, w, b, None, None, True, dy)
        second = _run_step(x, w, b, None, None, True, dy)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_bad_inputs_get_clear_errors(device):
    x = torch.randn(4, 3, 2, 2, device=device)
    with pytest.raises(TypeError, match="float64"):
        ops.batch_norm(x.double(), None, None, training=True)
    with pytest.raises(ValueError, match=r"must be \(3,\)"):
        ops.batch_norm(x, None, None, torch.ones(4, device=device), training=True)
    with pytest.raises(TypeError, match="float32"):
        ops.batch_norm(x.half(), None, None, torch.ones(3, device=device).double(), training=True)
    with pytest.raises(ValueError, match="needs running_mean"):
        ops.batch_norm(x, None, None, training=False)
    with pytest.raises(ValueError, match="residual must have"):
        ops.batch_norm_add_relu(x, x[:2], None, None, training=True)
    with pytest.raises(ValueError, match="save must be one of"):
        ops.batch_norm_relu(x, None, None, training=True, save="bits")
    with pytest.raises(ValueError, match="non-empty"):
        ops.batch_norm(x[:0], None, None, training=True)
    with pytest.raises(ValueError, match="power of two"):
        with _plan.override(block_a=3):
            pass


def test_plan_heuristics_for_an_h100(monkeypatch):
    """Plans for a device with 132 SMs and 50 MiB of L2 (no GPU needed: only the numbers)."""
    monkeypatch.setattr(_plan, "device_info", lambda index: (132, 50 << 20))
    _plan._make_plan.cache_clear()
    try:

        def plan(shape, elem_bytes=2, channels_last=False, mask=False):
            x = torch.empty(shape, device="meta")
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            from batchnorm.ops._layout import kernel_layout

            return _plan.make_plan(kernel_layout(x)[1], elem_bytes, mask, 0)

        # many channels, small planes: one program per channel, one launch
        small = plan((64, 2048, 7, 7))
        assert small.fused and small.channel_blocks >= 132 and small.tiles == 1
        # few channels, large planes: the reduction is split to fill the GPU
        large = plan((64, 64, 112, 112))
        assert not large.fused and large.channel_blocks * large.splits >= 4 * 132
        assert large.block_b * large.block_a * 2 == _plan.TILE_BYTES
        # channels-last: 256-byte channel segments, whole rows per tile
        nhwc = plan((64, 256, 56, 56), channels_last=True)
        assert nhwc.block_b == 1 and nhwc.block_c == 128
        # one tile per elementwise program, within CUDA's grid limit
        huge = plan((2**27, 16), mask=True)
        assert huge.apply_programs == 65535 and huge.block_a >= 8
    finally:
        _plan._make_plan.cache_clear()


def test_strided_parameters_and_running_statistics(device):
    """Per-channel tensors that are strided views are read right, and strided running
    statistics are updated in place like torch's."""
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(5, 3, 2, 2, generator=gen).to(device).requires_grad_(True)
    w_base = torch.rand(6, generator=gen).add(0.5).to(device).requires_grad_(True)
    b_base = torch.randn(6, generator=gen).to(device).requires_grad_(True)
    buffers = torch.stack([torch.zeros(6), torch.ones(6)]).to(device)  # (2, 6)
    rm, rv = buffers[0, ::2], buffers[1, ::2]  # strided views
    rm_t, rv_t = rm.clone(), rv.clone()
    w, b = w_base[::2], b_base[::2]
    y = ops.batch_norm(x, rm, rv, w, b, True, 0.5, 1e-5)
    y_t = torch.nn.functional.batch_norm(x, rm_t, rv_t, w, b, True, 0.5, 1e-5)
    dy = torch.randn(x.shape, generator=gen).to(device)
    grads = torch.autograd.grad(y, (x, w_base, b_base), dy)
    grads_t = torch.autograd.grad(y_t, (x, w_base, b_base), dy)
    assert_close(y, y_t, rtol=1e-5, atol=1e-5, name="y")
    for name, a, e in zip(("dx", "dweight", "dbias"), grads, grads_t):
        assert_close(a, e, rtol=1e-4, atol=1e-4, name=name)
    assert_close(buffers[0, ::2], rm_t, rtol=1e-6, atol=1e-6, name="running_mean")
    assert_close(buffers[1, ::2], rv_t, rtol=1e-6, atol=1e-6, name="running_var")
    assert torch.equal(buffers[0, 1::2], torch.zeros(3, device=device))
