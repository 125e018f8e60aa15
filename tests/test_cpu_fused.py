"""The C++ CPU kernels' fused batch norm + ReLU and batch norm + residual + ReLU
(``batchnorm.functional.batch_norm_relu`` / ``batch_norm_add_relu`` with backend "cpu"):
the same output, running statistics and gradients (dx, dz, dgamma, dbeta) as the unfused
composition on the same kernels, for every ``save=`` mode, training and eval, float32 and
bfloat16, (N, C), NCHW, channels-last and strided inputs; NaN handled as torch's ReLU handles it;
second derivatives raise.
"""

from __future__ import annotations

import pytest
import torch

from batchnorm import backends
from batchnorm.functional import batch_norm, batch_norm_add_relu, batch_norm_relu

SAVES = ("output", "mask", "recompute")


pytestmark = pytest.mark.usefixtures("cpu_kernels")


def _input(shape, layout, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2 + 0.3
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(shape[0], shape[1] * 2, *shape[2:], generator=g)[:, ::2]
    return x.to(dtype)


def _run(fused: bool, x, z, dy, training, save, dtype):
    c = x.shape[1]
    g = torch.Generator().manual_seed(5)
    gamma = (torch.rand(c, generator=g) + 0.5).requires_grad_(True)
    beta = torch.randn(c, generator=g).requires_grad_(True)
    rm, rv = torch.randn(c, generator=g) * 0.1, torch.rand(c, generator=g) + 0.5
    x = x.detach().clone().requires_grad_(True)
    z = None if z is None else z.detach().clone().requires_grad_(True)
    args = (rm, rv, gamma, beta, training, 0.2, 1e-5)
    if fused:
        if z is None:
            y = batch_norm_relu(x, *args, backend="cpu", save=save)
        else:
            y = batch_norm_add_relu(x, z, *args, backend="cpu", save=save)
        assert backends.last_backend() == "cpu"
        assert "CpuBatchNormReluBackward" in y.grad_fn.name()  # one fused node
    else:
        y = batch_norm(x, *args, backend="cpu")
        y = torch.relu(y if z is None else y + z)
    inputs = [x, gamma, beta] + ([] if z is None else [z])
    grads = torch.autograd.grad(y, inputs, dy)
    return [y, rm, rv, *grads]


CASES = [
    ((6, 12), "contiguous"),
    ((4, 5, 7, 3), "contiguous"),
    ((5, 7, 7, 7), "contiguous"),  # 7x7 planes: one flat run, vectors across rows
    ((6, 20, 3, 3), "contiguous"),  # 3x3 planes: columns; the output as rows of C * S values
    ((9, 5, 2, 3), "contiguous"),  # rows of 30 values: 4 samples per step, then one
    ((5, 700, 3, 3), "contiguous"),  # rows of 6300 values: 4 samples per step, in chunks
    ((5, 17, 4, 4), "contiguous"),  # 4x4 planes: one vector per row
    ((4, 19, 5, 5), "channels_last"),
    ((3, 2083, 2, 2), "channels_last"),  # 2048 channels or more: rows walked in chunks
    ((5, 2100), "contiguous"),
    ((3, 6, 4, 9), "strided"),
    ((2, 3, 4, 5, 6), "contiguous"),
]


@pytest.mark.parametrize("residual", [False, True], ids=["relu", "add-relu"])
@pytest.mark.parametrize("save", SAVES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("shape", "layout"), CASES)
def test_fused_equals_the_composition(shape, layout, dtype, training, save, residual):
    x = _input(shape, layout, dtype)
    z = _input(shape, layout, dtype, seed=1) if residual else None
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    fused = _run(True, x, z, dy, training, save, dtype)
    plain = _run(False, x, z, dy, training, save, dtype)
    names = ["y", "running_mean", "running_var", "dx", "dgamma", "dbeta", "dz"]
    for name, a, e in zip(names, fused, plain):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        # The same kernels, the same rounding: equal bit for bit.
        assert torch.equal(a, e), f"{name}: max |diff| {(a.float() - e.float()).abs().max()}"
    y = fused[0]
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    assert (y >= 0).all()


@pytest.mark.parametrize("save", SAVES)
def test_nan_passes_its_gradient_as_torch_relu_does(save):
    x = torch.randn(4, 3, 5)
    x[1, 2, 3] = float("nan")
    dy = torch.ones_like(x)
    fused = _run(True, x, None, dy, False, save, torch.float32)
    plain = _run(False, x, None, dy, False, save, torch.float32)
    assert torch.isnan(fused[0][1, 2, 3])
    for a, e in zip(fused, plain):
        assert torch.equal(a.nan_to_num(7.0), e.nan_to_num(7.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("save", SAVES)
def test_a_cut_gradient_is_zero_even_where_dy_is_not_finite(save, dtype):
    """Where the ReLU cuts the gradient, dz and the gradients through it are +0 whatever dy holds
    there (NaN, inf, -0), as torch's threshold_backward gives; elsewhere dy passes unchanged."""
    x = torch.randn(6, 5, 7, generator=torch.Generator().manual_seed(3)).to(dtype)
    z = torch.randn(6, 5, 7, generator=torch.Generator().manual_seed(4)).to(dtype)
    dy = torch.randn(6, 5, 7, generator=torch.Generator().manual_seed(5)).to(dtype)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0]).to(dtype)
    dy.view(-1)[::3] = specials.repeat(dy.numel())[: dy.view(-1)[::3].numel()]
    fused = _run(True, x, z, dy, True, save, dtype)
    plain = _run(False, x, z, dy, True, save, dtype)
    for name, a, e in zip(["y", "mean", "var", "dx", "dgamma", "dbeta", "dz"], fused, plain):
        assert torch.equal(a.nan_to_num(7.0), e.nan_to_num(7.0)), name
    dz, y = fused[6], fused[0]
    assert (dz[y == 0] == 0).all() and not torch.signbit(dz[y == 0]).any()


def test_second_derivative_raises():
    x = torch.randn(4, 3, requires_grad=True)
    y = batch_norm_relu(x, None, None, None, None, True, 0.1, 1e-5, backend="cpu")
    (g,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivatives"):
        g.sum().backward()


def test_no_grad_forward_keeps_nothing_and_matches():
    x = torch.randn(8, 4, 3, 3)
    z = torch.randn(8, 4, 3, 3)
    with torch.no_grad():
        fused = batch_norm_add_relu(x, z, None, None, None, None, True, 0.1, 1e-5, backend="cpu")
        plain = torch.relu(
            batch_norm(x, None, None, None, None, True, 0.1, 1e-5, backend="cpu") + z
        )
    assert fused.grad_fn is None and torch.equal(fused, plain)


@pytest.mark.parametrize("residual", [False, True], ids=["relu", "add-relu"])
@pytest.mark.parametrize("save", SAVES)
@pytest.mark.parametrize("shape", [(4, 5, 17, 37), (5, 7, 7, 7), (6, 20, 3, 3)])
def test_fused_on_tensors_taken_as_large(shape, save, residual):
    """With the streaming threshold at 0 every input counts as large: the output passes stream,
    and planar statistics walk each thread's channels as one block, then write the output in a
    pass of its own. The fused kernels still equal the composition, and both equal what they
    give with nothing taken as large, bit for bit."""
    from batchnorm.ops import cpu

    initial = cpu.stream_min_bytes()
    if initial < 0:
        pytest.skip("this build has no AVX2 or AVX512: nothing is taken as large")
    x = _input(shape, "contiguous", torch.float32)
    z = _input(shape, "contiguous", torch.float32, seed=1) if residual else None
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    results = []
    try:
        for threshold in (1 << 62, 0):
            cpu.set_stream_min_bytes(threshold)
            for fused in (True, False):
                results.append(_run(fused, x, z, dy, True, save, torch.float32))
    finally:
        cpu.set_stream_min_bytes(initial)
    for other in results[1:]:
        for a, e in zip(other, results[0]):
            assert torch.equal(a, e)
