"""Fused BN + ReLU and BN + add + ReLU: kernels against the float64 reference and torch, what they
save for the backward pass, and the functional API on every backend.

Runs the kernels under the Triton interpreter without a GPU (see test_ops_kernels.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchnorm import backends, ops, reference
from batchnorm.functional import batch_norm_add_relu, batch_norm_relu
from batchnorm.ops import _plan
from batchnorm.ops.bench.memory import saved_tensor_bytes
from tests.helpers import assert_close, tolerance

# The `device` fixture (CUDA, else the CPU under the Triton interpreter) is in conftest.py.


def _fused_reference(x64, z64, gamma, beta, rm0, rv0, training, dy64, momentum, eps):
    """relu(bn(x) (+ z)) and its gradients in float64: the ReLU gate g = dy * [pre > 0] feeds
    the paper's batch-norm backward; dz = g."""
    c = x64.shape[1]
    if training:
        y_bn, cache = reference.bn_forward(x64, gamma, beta, eps)
    else:
        y_bn = reference.bn_inference(x64, gamma, beta, rm0, rv0, eps)
    pre = y_bn + (z64 if z64 is not None else 0.0)
    g = dy64 * (pre > 0)
    if training:
        dx, dgamma, dbeta = reference.bn_backward(g, cache)
        rm, rv = reference.running_update(rm0, rv0, cache.mu, cache.var, x64.size // c, momentum)
    else:
        dx, dgamma, dbeta = reference.bn_inference_backward(g, x64, gamma, rm0, rv0, eps)
        rm, rv = rm0, rv0
    return np.maximum(pre, 0.0), dx, dgamma, dbeta, g, rm, rv


def _input(layout: str, seed: int, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if layout == "nchw":
        x = torch.randn(3, 4, 3, 5, generator=gen)
    elif layout == "nhwc":
        x = torch.randn(3, 4, 3, 5, generator=gen).to(memory_format=torch.channels_last)
    else:
        x = torch.randn(10, 6, generator=gen)
    return (x * 1.5 + 0.3).to(device)


def _fused_step(fn, x, z, gamma, beta, rm, rv, training, dy, **kwargs):
    x = x.clone().requires_grad_(True)
    g = gamma.clone().requires_grad_(True)
    b = beta.clone().requires_grad_(True)
    inputs = [x, g, b]
    if z is not None:
        z = z.clone().requires_grad_(True)
        inputs.append(z)
        y = fn(x, z, rm, rv, g, b, training, 0.2, 1e-5, **kwargs)
    else:
        y = fn(x, rm, rv, g, b, training, 0.2, 1e-5, **kwargs)
    grads = torch.autograd.grad(y, inputs, dy)
    return y, grads


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "2d"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("save", ["output", "mask", "recompute"])
@pytest.mark.parametrize("residual", [False, True], ids=["relu", "add-relu"])
def test_fused_matches_reference(residual, save, training, layout, device):
    """Forward, all gradients (dz too) and running statistics, through the functional API."""
    x = _input(layout, 1, device)
    z = _input(layout, 2, device) if residual else None
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(device)
    c = x.shape[1]
    rng = np.random.default_rng(4)
    gamma, beta = rng.uniform(0.5, 1.5, c), rng.standard_normal(c) * 0.5
    rm0, rv0 = rng.standard_normal(c) * 0.1, rng.uniform(0.5, 2.0, c)
    rm, rv = (torch.tensor(v, dtype=torch.float32, device=device) for v in (rm0, rv0))
    params = [torch.tensor(v, dtype=torch.float32, device=device) for v in (gamma, beta)]
    fn = batch_norm_add_relu if residual else batch_norm_relu
    y, grads = _fused_step(fn, x, z, *params, rm, rv, training, dy, backend="triton", save=save)
    assert backends.last_backend() == "triton"
    expected = _fused_reference(
        x.double().cpu().numpy(),
        z.double().cpu().numpy() if residual else None,
        gamma, beta, rm0, rv0, training, dy.double().cpu().numpy(), 0.2, 1e-5,
    )  # fmt: skip
    y_ref, dx_ref, dg_ref, db_ref, dz_ref, rm_ref, rv_ref = expected
    fwd, grad = tolerance("float32"), tolerance("float32", "gradient")
    m = x.numel() // c
    assert y.stride() == x.stride()
    assert_close(y, y_ref, rtol=fwd[0], atol=fwd[1], name="y")
    assert_close(grads[0], dx_ref, rtol=grad[0], atol=grad[1], name="dx")
    assert_close(grads[1], dg_ref, rtol=grad[0], atol=grad[1] * m, name="dgamma")
    assert_close(grads[2], db_ref, rtol=grad[0], atol=grad[1] * m, name="dbeta")
    if residual:
        assert_close(grads[3], dz_ref, rtol=0, atol=0, name="dz")
    assert_close(rm, rm_ref, rtol=fwd[0], atol=fwd[1], name="running_mean")
    assert_close(rv, rv_ref, rtol=fwd[0], atol=fwd[1], name="running_var")


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("save", ["mask", "recompute"])
def test_fused_split_path_matches_torch_composition(save, layout, device):
    """Split (three-launch) path with several tiles and channel blocks, against torch ops."""
    x = _input(layout, 5, device)
    z = _input(layout, 6, device)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(device)
    gamma = torch.linspace(0.5, 1.5, 4, device=device)
    beta = torch.linspace(-0.5, 0.5, 4, device=device)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    rm_t, rv_t = rm.clone(), rv.clone()
    with _plan.override(fused=False, splits=2, block_a=2, block_c=2, block_b=8):
        y, grads = _fused_step(
            ops.batch_norm_add_relu, x, z, gamma, beta, rm, rv, True, dy, save=save
        )

    def composed(x, z, rm, rv, g, b, training, momentum, eps):
        bn = torch.nn.functional.batch_norm(x, rm, rv, g, b, training, momentum, eps)
        return torch.relu(bn + z)

    y_t, grads_t = _fused_step(composed, x, z, gamma, beta, rm_t, rv_t, True, dy)
    assert_close(y, y_t, rtol=1e-5, atol=1e-5, name="y")
    for name, a, e in zip(("dx", "dgamma", "dbeta", "dz"), grads, grads_t):
        assert_close(a, e, rtol=1e-4, atol=1e-4, name=name)
    assert_close(rm, rm_t, rtol=1e-6, atol=1e-6, name="running_mean")
    assert_close(rv, rv_t, rtol=1e-6, atol=1e-6, name="running_var")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_fused_half_precision(dtype, device):
    """Half-precision input and residual with float32 parameters; the gate and sums in float32."""
    x = _input("nhwc", 8, device).to(dtype)
    z = _input("nhwc", 9, device).to(dtype)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(10)).to(dtype).to(device)
    gamma, beta = torch.ones(4, device=device), torch.zeros(4, device=device)
    y, grads = _fused_step(
        ops.batch_norm_add_relu, x, z, gamma, beta, None, None, True, dy, save="mask"
    )
    expected = _fused_reference(
        x.double().cpu().numpy(), z.double().cpu().numpy(), np.ones(4), np.zeros(4),
        np.zeros(4), np.ones(4), True, dy.double().cpu().numpy(), 0.1, 1e-5,
    )  # fmt: skip
    name = str(dtype).replace("torch.", "")
    fwd, grad = tolerance(name), tolerance(name, "gradient")
    assert y.dtype == dtype and grads[3].dtype == dtype and grads[1].dtype == torch.float32
    assert_close(y, expected[0], rtol=fwd[0], atol=fwd[1] * 4, name="y")
    assert_close(grads[0], expected[1], rtol=grad[0], atol=grad[1] * 4, name="dx")
    assert_close(grads[3], expected[4], rtol=fwd[0], atol=fwd[1], name="dz")


def _saved_bytes(fn, x, z, save=None, backend=None):
    rm, rv = torch.zeros(x.shape[1], device=x.device), torch.ones(x.shape[1], device=x.device)
    w = torch.ones(x.shape[1], device=x.device, requires_grad=True)
    b = torch.zeros(x.shape[1], device=x.device, requires_grad=True)
    x = x.clone().requires_grad_(True)
    kwargs = {"backend": backend} if save is None else {"backend": backend, "save": save}
    if z is None:
        return saved_tensor_bytes(lambda: fn(x, rm, rv, w, b, True, 0.1, 1e-5, **kwargs))[0]
    z = z.clone().requires_grad_(True)
    return saved_tensor_bytes(lambda: fn(x, z, rm, rv, w, b, True, 0.1, 1e-5, **kwargs))[0]


def test_fused_variants_save_less_memory(device):
    """Bytes autograd keeps: torch's composition keeps x and y; the fused kernels keep x and
    either y ("output"), 1 bit per element ("mask") or nothing ("recompute", plus z for the add).
    Per-channel tensors (parameters, statistics) add a few hundred bytes."""
    x = torch.randn(8, 16, 8, 8, device=device)  # 8192 float32 values: 32 KiB
    z = torch.randn_like(x)
    e_bytes = x.numel() * x.element_size()
    small = 2048  # parameters, running and saved statistics of 16 channels, generously
    torch_relu = _saved_bytes(batch_norm_relu, x, None, backend="torch")
    assert torch_relu >= 2 * e_bytes
    relu = {s: _saved_bytes(batch_norm_relu, x, None, s, "triton") for s in ops.SAVE_MODES}
    assert 2 * e_bytes <= relu["output"] <= 2 * e_bytes + small
    assert e_bytes + x.numel() // 8 <= relu["mask"] <= e_bytes + x.numel() // 8 + small
    assert e_bytes <= relu["recompute"] <= e_bytes + small
    add = {s: _saved_bytes(batch_norm_add_relu, x, z, s, "triton") for s in ops.SAVE_MODES}
    torch_add = _saved_bytes(batch_norm_add_relu, x, z, backend="torch")
    assert torch_add >= 2 * e_bytes
    assert e_bytes + x.numel() // 8 <= add["mask"] <= e_bytes + x.numel() // 8 + small
    assert 2 * e_bytes <= add["recompute"] <= 2 * e_bytes + small
    assert 2 * e_bytes <= add["output"] <= 2 * e_bytes + small
    assert relu["recompute"] < relu["mask"] < relu["output"] <= torch_relu


@pytest.mark.parametrize("residual", [False, True], ids=["relu", "add-relu"])
def test_fused_functional_agrees_on_every_backend(residual, device):
    """batch_norm_relu / batch_norm_add_relu give the same results on torch, explicit and
    triton (the first two compose torch ops)."""
    x = _input("nchw", 11, device)
    z = _input("nchw", 12, device) if residual else None
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(13)).to(device)
    gamma, beta = torch.linspace(0.5, 1.5, 4, device=device), torch.zeros(4, device=device)
    fn = batch_norm_add_relu if residual else batch_norm_relu
    results = {}
    for backend in ("torch", "explicit", "triton"):
        rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
        out = _fused_step(fn, x, z, gamma, beta, rm, rv, True, dy, backend=backend)
        assert backends.last_backend() == backend
        results[backend] = (out, rm, rv)
    (y0, g0), rm0, rv0 = results["torch"]
    for backend in ("explicit", "triton"):
        (y, g), rm, rv = results[backend]
        assert_close(y, y0, rtol=1e-5, atol=1e-5, name=f"{backend} y")
        for a, e in zip(g, g0):
            assert_close(a, e, rtol=1e-4, atol=1e-4, name=f"{backend} grad")
        assert_close(rm, rm0, rtol=1e-6, atol=1e-6, name=f"{backend} running_mean")


def test_fused_functional_edge_cases(device):
    """Empty batches, non-finite batches with nonfinite="skip", and bad arguments."""
    empty = torch.randn(0, 3, 4, 4, device=device)
    assert batch_norm_relu(empty, None, None, training=True, backend="triton").shape == empty.shape
    z_empty = torch.randn_like(empty)
    y = batch_norm_add_relu(empty, z_empty, None, None, training=True, backend="triton")
    assert y.shape == empty.shape
    x = torch.randn(4, 3, 2, 2, device=device)
    x[0, 1, 0, 0] = float("nan")
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    batch_norm_relu(x, rm, rv, training=True, backend="triton", nonfinite="skip")
    assert torch.equal(rm, torch.zeros(3, device=device))
    assert torch.equal(rv, torch.ones(3, device=device))
    good = torch.randn(4, 3, 2, 2, device=device)
    with pytest.raises(ValueError, match="needs z shaped like x"):
        batch_norm_add_relu(good, good[:, :2], None, None, training=True, backend="triton")
    with pytest.raises(TypeError, match="convert one of them"):
        batch_norm_add_relu(good, good.half(), None, None, training=True, backend="triton")
    with pytest.raises(TypeError, match="residual tensor"):
        batch_norm_add_relu(good, None, None, None, training=True)
    with pytest.raises(ValueError, match="save must be one of"):
        batch_norm_relu(good, None, None, training=True, save="bits")
