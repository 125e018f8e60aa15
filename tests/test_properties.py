"""Property tests: every layer against the NumPy float64 reference on random shapes and values.

Each norm is the paper's transform (``batchnorm.reference.bn_forward``) over other axes: batch
norm per channel over (N, *); layer norm per sample over the trailing axes; instance norm per
(sample, channel) over space; group norm per (sample, group); ghost batch norm per ghost batch;
sync batch norm in one process is batch norm; frozen batch norm and eval mode are
``reference.bn_inference``; batch renorm during its warm-up (r = 1, d = 0) is batch norm.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import batchnorm.nn as bnn
from batchnorm import reference
from batchnorm.testing import assert_close, tolerance

FWD = tolerance("float64")
SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)


@st.composite
def inputs(draw, min_rank: int = 2, max_rank: int = 5, min_batch: int = 2):
    rank = draw(st.integers(min_rank, max_rank))
    shape = [draw(st.integers(min_batch, 5)), draw(st.integers(1, 4))]
    shape += [draw(st.integers(1, 4)) for _ in range(rank - 2)]
    seed = draw(st.integers(0, 2**31 - 1))
    mean = draw(st.sampled_from([0.0, 3.0, -1e3]))
    scale = draw(st.sampled_from([1.0, 1e-2, 10.0]))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * scale + mean
    if x.size // shape[1] < 2:  # batch statistics need two values per channel
        x = np.concatenate([x, x + scale], axis=0)
    return x


def _atol(x: np.ndarray) -> float:
    """Absolute tolerance for a normalized output: float64 rounding of x, amplified by 1/std
    (x = -1e3 + 1e-2 * randn is ill-conditioned: its digits below 1e-13 * 1e5 are noise)."""
    return 1e-14 * float(np.abs(x).max()) / max(float(x.std()), 1e-300) + 1e-11


def _affine(rng: np.random.Generator, c: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.uniform(0.5, 1.5, c), rng.standard_normal(c)


def _set_affine(layer: torch.nn.Module, gamma: np.ndarray, beta: np.ndarray) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(gamma))
        layer.bias.copy_(torch.from_numpy(beta))


@SETTINGS
@given(x=inputs())
def test_batch_norm_sync_and_renorm_warmup_equal_the_reference(x: np.ndarray) -> None:
    c = x.shape[1]
    gamma, beta = _affine(np.random.default_rng(0), c)
    y_ref, cache = reference.bn_forward(x, gamma, beta, 1e-5)
    rm_ref, rv_ref = reference.running_update(
        np.zeros(c), np.ones(c), cache.mu, cache.var, x.size // c, 0.1
    )
    layers = [
        bnn.SyncBatchNorm(c),
        bnn.BatchRenorm(c),
        bnn.GhostBatchNorm(c, virtual_batch_size=x.shape[0]),
    ]
    if x.ndim in (2, 3):
        layers.append(bnn.BatchNorm1d(c))
    for layer in layers:
        layer = layer.double()
        _set_affine(layer, gamma, beta)
        y = layer(torch.from_numpy(x))
        name = type(layer).__name__
        assert_close(y, y_ref, rtol=FWD[0], atol=_atol(x), name=name)
        assert_close(layer.running_mean, rm_ref, rtol=FWD[0], atol=FWD[1], name=f"{name} mean")
        assert_close(layer.running_var, rv_ref, rtol=FWD[0], atol=FWD[1], name=f"{name} var")


@SETTINGS
@given(x=inputs())
def test_eval_mode_and_frozen_equal_the_reference_inference(x: np.ndarray) -> None:
    c = x.shape[1]
    rng = np.random.default_rng(1)
    gamma, beta = _affine(rng, c)
    mean, var = rng.standard_normal(c) + x.mean(), rng.uniform(0.5, 2.0, c) * x.var()
    y_ref = reference.bn_inference(x, gamma, beta, mean, var, 1e-5)
    ours = bnn.BatchNorm1d(c) if x.ndim in (2, 3) else bnn.SyncBatchNorm(c)
    frozen = bnn.FrozenBatchNorm(c)
    for layer in (ours.double().eval(), frozen.double()):
        with torch.no_grad():
            layer.running_mean.copy_(torch.from_numpy(mean))
            layer.running_var.copy_(torch.from_numpy(var))
            layer.weight.copy_(torch.from_numpy(gamma))
            layer.bias.copy_(torch.from_numpy(beta))
        y = layer(torch.from_numpy(x))
        assert_close(y, y_ref, rtol=FWD[0], atol=_atol(x), name=type(layer).__name__)


@SETTINGS
@given(x=inputs(min_rank=3), k=st.integers(1, 2))
def test_layer_norm_equals_the_reference_over_trailing_axes(x: np.ndarray, k: int) -> None:
    k = min(k, x.ndim - 1)
    trailing = x.shape[x.ndim - k :]
    rows = x.reshape(-1, int(np.prod(trailing)))  # (M, F): one sample per row
    if rows.shape[1] < 2:
        return
    y_ref, _ = reference.bn_forward(rows.T, np.ones(rows.shape[0]), np.zeros(rows.shape[0]), 1e-5)
    for backend in ("torch", "explicit"):
        layer = bnn.LayerNorm(list(trailing), elementwise_affine=False, backend=backend).double()
        y = layer(torch.from_numpy(x)).reshape(rows.shape)
        assert_close(y, y_ref.T, rtol=1e-9, atol=_atol(x), name=f"layer norm {backend}")


@SETTINGS
@given(x=inputs(min_rank=3), data=st.data())
def test_group_and_instance_norm_equal_the_reference(x: np.ndarray, data) -> None:
    n, c = x.shape[:2]
    groups = data.draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0]))
    per_group = x.reshape(n * groups, -1)  # each row: one (sample, group)
    if per_group.shape[1] < 2:
        return
    ones = np.ones(per_group.shape[0])
    y_ref, _ = reference.bn_forward(per_group.T, ones, np.zeros_like(ones), 1e-5)
    per_instance = x.reshape(n * c, -1)
    for backend in ("torch", "explicit"):
        gn = bnn.GroupNorm(groups, c, affine=False, backend=backend).double()
        y = gn(torch.from_numpy(x)).reshape(per_group.shape)
        assert_close(y, y_ref.T, rtol=1e-9, atol=_atol(x), name=f"group norm {backend}")
        if per_instance.shape[1] >= 2 and x.ndim >= 3:
            ones_i = np.ones(per_instance.shape[0])
            yi_ref, _ = reference.bn_forward(per_instance.T, ones_i, np.zeros_like(ones_i), 1e-5)
            cls = {3: bnn.InstanceNorm1d, 4: bnn.InstanceNorm2d, 5: bnn.InstanceNorm3d}[x.ndim]
            inorm = cls(c, backend=backend).double()
            yi = inorm(torch.from_numpy(x)).reshape(per_instance.shape)
            assert_close(yi, yi_ref.T, rtol=1e-9, atol=_atol(x), name=f"instance norm {backend}")


@SETTINGS
@given(x=inputs(min_batch=4), ghost=st.integers(2, 3))
def test_ghost_batch_norm_normalizes_each_ghost_batch_as_the_reference(x: np.ndarray, ghost):
    n, c = x.shape[:2]
    if n % ghost or (ghost * x[0, 0].size) < 2:
        return
    gamma, beta = _affine(np.random.default_rng(2), c)
    layer = bnn.GhostBatchNorm(c, virtual_batch_size=ghost).double()
    _set_affine(layer, gamma, beta)
    y = layer(torch.from_numpy(x)).detach().numpy()
    for start in range(0, n, ghost):
        y_ref, _ = reference.bn_forward(x[start : start + ghost], gamma, beta, 1e-5)
        assert_close(y[start : start + ghost], y_ref, rtol=FWD[0], atol=_atol(x), name="ghost")
