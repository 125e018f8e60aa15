"""The batch-norm primitives against the NumPy reference (float64), on the shape catalogue."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batchnorm import reference
from batchnorm.primitives import (
    Moments,
    backward_elementwise,
    backward_reduce,
    collect_statistics,
    combine_statistics,
    invstd,
    merge_statistics,
    normalize,
    normalize_over,
    update_running_statistics,
    variance,
)
from tests.helpers import SHAPES, assert_close, make_input, tolerance

TRAINABLE = [c for c in SHAPES if int(np.prod(c.shape)) // c.shape[1] > 1]
EPS = 1e-5


def _bn_dims(ndim: int) -> tuple[int, ...]:
    return (0, *range(2, ndim))


def _per_channel(v: np.ndarray | torch.Tensor, ndim: int) -> torch.Tensor:
    return torch.as_tensor(v).reshape((1, -1) + (1,) * (ndim - 2))


def _affine(c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(0.5, 1.5, c), rng.uniform(-0.5, 0.5, c)


@pytest.mark.parametrize("case", SHAPES, ids=lambda c: c.id)
def test_collect_statistics_matches_reference(case):
    x = make_input(case, seed=1)
    mu_ref, var_ref = reference.batch_statistics(x)
    stats = collect_statistics(torch.from_numpy(x), _bn_dims(x.ndim))
    m = x.size // x.shape[1]
    rtol, atol = tolerance("float64", "forward")
    assert stats.mean.shape == (1, x.shape[1]) + (1,) * (x.ndim - 2)
    assert_close(stats.count.flatten(), np.full(x.shape[1], m), rtol=0, atol=0, name="count")
    assert_close(stats.mean.flatten(), mu_ref, rtol=rtol, atol=atol, name="mean")
    assert_close(variance(stats).flatten(), var_ref, rtol=rtol, atol=atol, name="var_B")
    if m > 1:
        unbiased = reference.biased_to_unbiased(var_ref, m)
        assert_close(variance(stats, unbiased=True).flatten(), unbiased, rtol=rtol, atol=atol)


@pytest.mark.parametrize("case", [c for c in SHAPES if "large-mean" in c.note], ids=lambda c: c.id)
def test_collect_statistics_float32_large_mean_is_stable(case):
    # E[x^2] - E[x]^2 would lose every digit here (mean 1e4, std 1: float32 has 7 digits).
    x = make_input(case, seed=2)
    _, var_ref = reference.batch_statistics(x)
    stats = collect_statistics(torch.from_numpy(x).float(), _bn_dims(x.ndim))
    assert stats.mean.dtype == torch.float32
    assert_close(variance(stats).flatten(), var_ref, rtol=1e-3, atol=0, name="var_B float32")


def test_collect_statistics_half_accumulates_in_float32():
    x = torch.randn(64, 3, dtype=torch.float16)
    stats = collect_statistics(x, (0,))
    assert stats.mean.dtype == torch.float32
    _, var_ref = reference.batch_statistics(x.double().numpy())
    assert_close(variance(stats).flatten(), var_ref, rtol=1e-5, atol=1e-6, name="var_B fp16")


def test_collect_statistics_of_empty_input_is_no_data():
    stats = collect_statistics(torch.zeros(0, 3, 4), (0, 2))
    assert stats.count.shape == (1, 3, 1)
    assert torch.equal(stats.count, torch.zeros(1, 3, 1))
    assert torch.equal(stats.mean, torch.zeros(1, 3, 1))
    assert torch.equal(stats.m2, torch.zeros(1, 3, 1))


@pytest.mark.parametrize("case", TRAINABLE, ids=lambda c: c.id)
def test_merging_uneven_parts_equals_the_whole_batch(case):
    x = make_input(case, seed=3)
    n = x.shape[0]
    # Uneven parts along N, one of them empty: [0, 1), [1, 1), [1, n).
    cuts = [0, min(1, n), min(1, n), n]
    parts = [
        collect_statistics(torch.from_numpy(x[a:b]), _bn_dims(x.ndim))
        for a, b in zip(cuts, cuts[1:])
    ]
    mu_ref, var_ref = reference.batch_statistics(x)
    rtol, atol = tolerance("float64", "forward")
    pairwise = parts[0]
    for p in parts[1:]:
        pairwise = merge_statistics(pairwise, p)
    stacked = combine_statistics(Moments(*(torch.stack(t) for t in zip(*parts))), dim=0)
    for name, merged in (("pairwise", pairwise), ("stacked", stacked)):
        assert_close(
            merged.count.flatten(),
            np.full(x.shape[1], x.size // x.shape[1]),
            rtol=0,
            atol=0,
            name=f"{name} count",
        )
        assert_close(merged.mean.flatten(), mu_ref, rtol=rtol, atol=atol, name=f"{name} mean")
        assert_close(
            variance(merged).flatten(), var_ref, rtol=1e-9, atol=atol, name=f"{name} var_B"
        )


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 7), min_size=1, max_size=5).filter(lambda s: sum(s) >= 2),
    offset=st.sampled_from([0.0, 1e3, 1e6]),
    seed=st.integers(0, 2**16),
)
def test_chan_merge_property(sizes, offset, seed):
    """Any split (empty parts included), large means: merged statistics equal the whole's."""
    rng = np.random.default_rng(seed)
    x = offset + rng.standard_normal((sum(sizes), 2)) * rng.uniform(0.1, 10.0)
    edges = np.cumsum([0, *sizes])
    parts = [collect_statistics(torch.from_numpy(x[a:b]), (0,)) for a, b in zip(edges, edges[1:])]
    merged = combine_statistics(Moments(*(torch.stack(t) for t in zip(*parts))), dim=0)
    pairwise = parts[0]
    for p in parts[1:]:
        pairwise = merge_statistics(pairwise, p)
    mu_ref, var_ref = reference.batch_statistics(x)
    for got in (merged, pairwise):
        assert_close(got.mean.flatten(), mu_ref, rtol=1e-12, atol=1e-12, name="mean")
        # Relative to the spread, not the mean: a cancelling formula would fail by far.
        assert_close(variance(got).flatten(), var_ref, rtol=1e-8, atol=1e-12, name="var_B")


@pytest.mark.parametrize("case", TRAINABLE, ids=lambda c: c.id)
def test_normalize_and_backward_primitives_match_reference(case):
    """normalize + backward_reduce + backward_elementwise reproduce Algorithm 1 and its backward."""
    x = make_input(case, seed=4)
    c, ndim = x.shape[1], x.ndim
    gamma, beta = _affine(c, seed=5)
    dy = np.random.default_rng(6).standard_normal(x.shape)
    y_ref, cache = reference.bn_forward(x, gamma, beta, eps=EPS)
    dx_ref, dgamma_ref, dbeta_ref = reference.bn_backward(dy, cache)

    xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)
    dims = _bn_dims(ndim)
    stats = collect_statistics(xt, dims)
    inv_std = invstd(variance(stats), EPS)
    g, b = _per_channel(gamma, ndim), _per_channel(beta, ndim)
    y = normalize(xt, stats.mean, inv_std, g, b)
    xhat = normalize(xt, stats.mean, inv_std)
    sum_dy, sum_dy_xhat = backward_reduce(dyt, xhat, dims)
    dx = backward_elementwise(dyt, xhat, inv_std, sum_dy, sum_dy_xhat, stats.count, g)

    fwd, grad = tolerance("float64", "forward"), tolerance("float64", "gradient")
    assert_close(y, y_ref, rtol=fwd[0], atol=fwd[1], name="y")
    assert_close(sum_dy_xhat.flatten(), dgamma_ref, rtol=grad[0], atol=grad[1], name="dgamma")
    assert_close(sum_dy.flatten(), dbeta_ref, rtol=grad[0], atol=grad[1], name="dbeta")
    assert_close(dx, dx_ref, rtol=grad[0], atol=grad[1], name="dx")


def _rounding(case, dtype: torch.dtype) -> float:
    """The error the input's dtype forces on xhat: a few ulps of a large mean over the std."""
    name = str(dtype).replace("torch.", "")
    return 8 * float(np.spacing(np.array(abs(case.mean), dtype=name))) / case.std


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", TRAINABLE, ids=lambda c: c.id)
def test_normalize_over_autograd_matches_reference(case, dtype):
    c, ndim = case.shape[1], len(case.shape)
    xt = torch.tensor(make_input(case, seed=7), dtype=dtype, requires_grad=True)
    x = xt.detach().double().numpy()  # the reference sees the input as rounded to dtype
    gamma, beta = _affine(c, seed=8)
    dy = np.random.default_rng(9).standard_normal(x.shape)
    y_ref, cache = reference.bn_forward(x, gamma, beta, eps=EPS)
    dx_ref, dgamma_ref, dbeta_ref = reference.bn_backward(dy, cache)

    weight = torch.tensor(gamma, dtype=dtype, requires_grad=True)
    bias = torch.tensor(beta, dtype=dtype, requires_grad=True)
    shape = (1, c) + (1,) * (ndim - 2)
    y, stats = normalize_over(xt, _bn_dims(ndim), EPS, weight.reshape(shape), bias.reshape(shape))
    y.backward(torch.tensor(dy, dtype=dtype))

    rounding, m = _rounding(case, dtype), x.size // c
    fwd, grad = tolerance(dtype, "forward"), tolerance(dtype, "gradient")
    assert y.dtype == dtype and not stats.mean.requires_grad
    assert_close(y, y_ref, rtol=fwd[0], atol=fwd[1] + rounding, name="y")
    assert_close(xt.grad, dx_ref, rtol=grad[0], atol=grad[1] + rounding, name="dx")
    assert_close(weight.grad, dgamma_ref, rtol=grad[0], atol=grad[1] + rounding * m, name="dgamma")
    assert_close(bias.grad, dbeta_ref, rtol=grad[0], atol=grad[1], name="dbeta")


@pytest.mark.parametrize(
    "shape,dims,param_shape",
    [
        ((3, 4, 5), (2,), (1, 4, 1)),  # instance-norm axes, per-channel gamma
        ((3, 4, 5), (1, 2), (4, 5)),  # layer-norm axes, elementwise gamma
        ((2, 3, 2, 4), (0, 2, 3), (1, 3, 1, 1)),  # batch-norm axes
    ],
)
@pytest.mark.parametrize(
    "check", [torch.autograd.gradcheck, torch.autograd.gradgradcheck], ids=["first", "second"]
)
def test_normalize_over_gradcheck(shape, dims, param_shape, check):
    """Finite differences agree with the backward primitives, whatever the axes and gamma; and
    with the differentiable backward (double backward: gradient penalties, Hessian products)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.rand(param_shape, dtype=torch.float64, generator=gen).add(0.5).requires_grad_()
    b = torch.randn(param_shape, dtype=torch.float64, generator=gen, requires_grad=True)
    assert check(lambda x, w, b: normalize_over(x, dims, 1e-3, w, b)[0], (x, w, b))


class _CountingReducer:
    """Identity reducer that counts its calls (the local statistics are the global ones)."""

    def __init__(self) -> None:
        self.forward_calls = 0
        self.backward_calls = 0

    def reduce_statistics(self, local: Moments) -> Moments:
        self.forward_calls += 1
        return local

    def reduce_gradient_sums(self, sum_dy, sum_dy_xhat):
        self.backward_calls += 1
        return sum_dy, sum_dy_xhat


def test_reducer_called_once_each_way_even_without_input_gradient():
    x = torch.randn(6, 3, 2, dtype=torch.float64)
    w = torch.ones(1, 3, 1, dtype=torch.float64, requires_grad=True)
    reducer = _CountingReducer()
    y, _ = normalize_over(x, (0, 2), EPS, w, reducer=reducer)  # x needs no gradient
    y_plain, _ = normalize_over(x, (0, 2), EPS, w)
    (y * torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
    assert (reducer.forward_calls, reducer.backward_calls) == (1, 1)
    assert torch.equal(y, y_plain)


def test_eval_form_gradient_matches_reference():
    x = make_input(SHAPES[6], seed=10)
    c = x.shape[1]
    gamma, beta = _affine(c, seed=11)
    mean, var = np.linspace(-1, 1, c), np.linspace(0.5, 2, c)
    dy = np.random.default_rng(12).standard_normal(x.shape)
    xt = torch.tensor(x, requires_grad=True)
    y = normalize(
        xt,
        _per_channel(mean, 4),
        invstd(_per_channel(var, 4), EPS),
        _per_channel(gamma, 4),
        _per_channel(beta, 4),
    )
    y.backward(torch.from_numpy(dy))
    grad = tolerance("float64", "gradient")
    assert_close(
        y, reference.bn_inference(x, gamma, beta, mean, var, EPS), rtol=1e-10, atol=1e-12, name="y"
    )
    dx_ref, _, _ = reference.bn_inference_backward(dy, x, gamma, mean, var, EPS)
    assert_close(xt.grad, dx_ref, rtol=grad[0], atol=grad[1], name="dx")


def test_update_running_statistics_matches_reference_and_mask_keeps_old():
    rm, rv = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])
    mu, var_b, m = np.array([1.0, -1.0, 0.5]), np.array([2.0, 0.5, 4.0]), 5
    new_mean, new_var = reference.running_update(rm.numpy(), rv.numpy(), mu, var_b, m, 0.1)
    unbiased = torch.from_numpy(reference.biased_to_unbiased(var_b, m)).float()
    a, b = rm.clone(), rv.clone()
    update_running_statistics(a, b, torch.from_numpy(mu).float().reshape(1, 3), unbiased, 0.1)
    assert_close(a, new_mean, rtol=1e-6, atol=1e-7, name="running_mean")
    assert_close(b, new_var, rtol=1e-6, atol=1e-7, name="running_var")
    a, b = rm.clone(), rv.clone()
    update_running_statistics(
        a, b, torch.from_numpy(mu).float(), unbiased, 0.1, mask=torch.tensor(False)
    )
    assert torch.equal(a, rm) and torch.equal(b, rv)


def test_first_derivatives_are_the_same_with_create_graph():
    """backward(create_graph=True) rebuilds the forward; its gradients equal the fast path's."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.rand(1, 3, 1, dtype=torch.float64, generator=gen).add(0.5).requires_grad_()
    dy = torch.randn(5, 3, 4, dtype=torch.float64, generator=gen)
    y, _ = normalize_over(x, (0, 2), EPS, w)
    fast = torch.autograd.grad(y, (x, w), dy, retain_graph=True)
    graph = torch.autograd.grad(y, (x, w), dy, create_graph=True)
    assert all(g.requires_grad for g in graph)
    for a, b in zip(fast, graph):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-13)


def test_second_derivative_across_processes_says_it_is_unsupported():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y, _ = normalize_over(x, (0,), EPS, reducer=_CountingReducer())
    with pytest.raises(RuntimeError, match="revert_sync_batchnorm"):
        torch.autograd.grad((y**3).sum(), x, create_graph=True)


def test_bad_arguments_say_what_is_wrong():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="out of range"):
        collect_statistics(x, (2,))
    with pytest.raises(ValueError, match="repeat"):
        collect_statistics(x, (0, -2))
    with pytest.raises(TypeError, match="floating-point"):
        collect_statistics(torch.ones(4, 3, dtype=torch.int64), (0,))
    for eps in (float("nan"), float("inf"), "1e-5", True):
        with pytest.raises(ValueError, match="eps must be a finite number"):
            normalize_over(x, (0,), eps)
    # a negative eps is torch's to accept (layer, group, instance norm): NaN where var < -eps
    y, _ = normalize_over(torch.tensor([[0.0], [2.0], [0.0], [0.2]]).reshape(2, 2), (0,), -0.5)
    assert torch.isnan(y[:, 0]).all() and torch.isfinite(y[:, 1]).all()  # var 0 and 0.81
