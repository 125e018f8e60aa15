"""Tests of the NumPy reference (batchnorm.reference) against first principles and torch.

The reference is what every other implementation is checked against, so it is checked here
against things that do not share its code: central finite differences, direct formulas written
out in the test, and torch in float64.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.lib.stride_tricks import sliding_window_view

from batchnorm import reference as ref
from tests.helpers import SHAPES, Case, assert_close, make_input, tolerance

CASE_IDS = [case.id for case in SHAPES]


def close(actual: object, expected: object, kind: str = "forward", name: str = "value") -> None:
    """assert_close with the float64 tolerance of the shared table."""
    rtol, atol = tolerance("float64", kind)
    assert_close(actual, expected, rtol=rtol, atol=atol, name=name)


def make_params(case: Case, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random gamma, beta and an upstream gradient dy for a catalogue case."""
    rng = np.random.default_rng(seed)
    channels = case.shape[1]
    gamma = rng.uniform(0.5, 2.0, channels) * rng.choice([-1.0, 1.0], channels)
    beta = rng.normal(size=channels)
    dy = rng.normal(size=case.shape)
    return gamma, beta, dy


def per_channel_values(x: np.ndarray) -> np.ndarray:
    """(N, C, *) -> (C, m): each channel's m values in one row, written independently of the
    reference's reduction_axes."""
    return np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)


def central_difference(loss, array: np.ndarray, h: float) -> np.ndarray:
    """d loss / d array by central differences, perturbing ``array`` in place one element at a
    time (and restoring it)."""
    grad = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        original = array[index]
        array[index] = original + h
        loss_plus = loss()
        array[index] = original - h
        loss_minus = loss()
        array[index] = original
        grad[index] = (loss_plus - loss_minus) / (2.0 * h)
    return grad


# --------------------------------------------------------------------------------------------
# Axes and batch statistics
# --------------------------------------------------------------------------------------------


def test_reduction_axes() -> None:
    assert ref.reduction_axes(2) == (0,)
    assert ref.reduction_axes(3) == (0, 2)
    assert ref.reduction_axes(5) == (0, 2, 3, 4)
    with pytest.raises(ValueError, match=r"\(N, C\) or \(N, C, \*\), got 1 dimension"):
        ref.reduction_axes(1)


@pytest.mark.parametrize("case", SHAPES, ids=CASE_IDS)
def test_batch_statistics_per_channel(case: Case) -> None:
    x = make_input(case)
    mu_B, var_B = ref.batch_statistics(x)
    values = per_channel_values(x)
    m = values.shape[1]
    expected_mu = values.sum(axis=1) / m
    expected_var = ((values - expected_mu[:, None]) ** 2).sum(axis=1) / m  # biased: 1/m
    close(mu_B, expected_mu, name="mu_B")
    close(var_B, expected_var, name="var_B")


def test_batch_statistics_is_two_pass() -> None:
    # With a mean of 1e8 and unit spread, E[x^2] - E[x]^2 cancels to garbage (x^2 ~ 1e16 has
    # an ulp of 2); the two-pass variance matches that of the exactly shifted data.
    rng = np.random.default_rng(0)
    offset = 1e8
    x = offset + rng.standard_normal((64, 3))
    _, var_B = ref.batch_statistics(x)
    _, var_shifted = ref.batch_statistics(x - offset)  # exact subtraction (Sterbenz)
    assert_close(var_B, var_shifted, rtol=1e-6, atol=0.0, name="var_B")
    one_pass = (x**2).mean(axis=0) - x.mean(axis=0) ** 2
    assert np.max(np.abs(one_pass - var_shifted)) > 1e-3  # the bug this guards against


# --------------------------------------------------------------------------------------------
# Algorithm 1: forward and backward
# --------------------------------------------------------------------------------------------


def test_worked_example() -> None:
    x = np.array([[0.23, 1.26, -2.41], [0.56, 0.75, 1.00]])
    y, _ = ref.bn_forward(x, np.ones(3), np.ones(3), eps=0.0)
    close(y, [[0.0, 2.0, 0.0], [2.0, 0.0, 2.0]], name="y")
    # eps > 0 pulls each output towards beta by sqrt(var_B / (var_B + eps)).
    y_eps, cache = ref.bn_forward(x, np.ones(3), np.ones(3), eps=1e-2)
    shrink = np.sqrt(cache.var / (cache.var + 1e-2))
    close(y_eps, 1.0 + (y - 1.0) * shrink, name="y with eps")


@pytest.mark.parametrize("case", SHAPES, ids=CASE_IDS)
def test_forward_normalizes_each_channel(case: Case) -> None:
    x = make_input(case)
    gamma, beta, _ = make_params(case)
    eps = 1e-5
    y, cache = ref.bn_forward(x, gamma, beta, eps=eps)
    values = per_channel_values(x)
    mu = values.mean(axis=1)
    s = np.sqrt(((values - mu[:, None]) ** 2).mean(axis=1) + eps)
    expected = gamma[:, None] * (values - mu[:, None]) / s[:, None] + beta[:, None]
    close(per_channel_values(y), expected, name="y")
    close(cache.xhat, (y - ref._broadcast(beta, x.ndim)) / ref._broadcast(gamma, x.ndim))
    assert cache.eps == eps and cache.x.dtype == np.float64


@pytest.mark.parametrize("case", SHAPES, ids=CASE_IDS)
def test_backward_matches_finite_differences(case: Case) -> None:
    x = make_input(case)
    gamma, beta, dy = make_params(case)
    eps = 1e-5

    def loss() -> float:
        return float(np.sum(dy * ref.bn_forward(x, gamma, beta, eps=eps)[0]))

    _, cache = ref.bn_forward(x, gamma, beta, eps=eps)
    dx, dgamma, dbeta = ref.bn_backward(dy, cache)

    # The step follows the data's scale. With a large mean, x + h is rounded to the ulp of
    # |mean| (about |mean| * 1e-16), so the attainable accuracy drops by |mean| / std.
    h = 1e-5 * case.std
    rtol = 1e-6 * max(1.0, abs(case.mean) / case.std)
    for name, analytic, array in (("dx", dx, x), ("dgamma", dgamma, gamma), ("dbeta", dbeta, beta)):
        numeric = central_difference(loss, array, h if array is x else 1e-5)
        atol = rtol * np.max(np.abs(numeric))
        assert_close(analytic, numeric, rtol=rtol, atol=atol, name=name)


@pytest.mark.parametrize("case", SHAPES, ids=CASE_IDS)
def test_backward_chain_rule_equals_closed_form(case: Case) -> None:
    x = make_input(case)
    gamma, beta, dy = make_params(case)
    _, cache = ref.bn_forward(x, gamma, beta)
    for name, chain, closed in zip(
        ("dx", "dgamma", "dbeta"),
        ref.bn_backward(dy, cache),
        ref.bn_backward_closed_form(dy, cache),
        strict=True,
    ):
        # Scale atol by the gradient's size: dx ~ gamma / std.
        rtol, atol = tolerance("float64", "gradient")
        assert_close(chain, closed, rtol=rtol, atol=atol * np.max(np.abs(closed)), name=name)


def test_backward_single_value_per_channel_is_zero() -> None:
    # With m = 1, y = beta whatever x is: dl/dx = 0 and dl/dgamma = 0.
    x = np.array([[3.0, -1.0]])
    _, cache = ref.bn_forward(x, np.array([2.0, 3.0]), np.zeros(2), eps=1e-3)
    dx, dgamma, dbeta = ref.bn_backward(np.array([[1.5, -2.0]]), cache)
    close(dx, np.zeros((1, 2)), "gradient", "dx")
    close(dgamma, np.zeros(2), "gradient", "dgamma")
    close(dbeta, [1.5, -2.0], "gradient", "dbeta")


def test_statistics_as_constants_is_the_classic_bug() -> None:
    """Treating mu_B and var_B as constants gives dl/dx = dl/dy * gamma / s: wrong.

    The true gradient has zero sum over each channel (the output ignores a shift of x, so the
    loss must too); the constant-statistics gradient does not, and finite differences side with
    the true gradient.
    """
    case = Case((6, 3, 2), "classic-bug", mean=2.0)
    x = make_input(case)
    gamma, beta, dy = make_params(case)
    eps = 1e-5
    _, cache = ref.bn_forward(x, gamma, beta, eps=eps)
    dx, _, _ = ref.bn_backward(dy, cache)
    dx_constant_statistics, _, _ = ref.bn_inference_backward(
        dy, x, gamma, cache.mu, cache.var, eps=eps
    )

    def loss() -> float:
        return float(np.sum(dy * ref.bn_forward(x, gamma, beta, eps=eps)[0]))

    numeric = central_difference(loss, x, 1e-5)
    assert_close(dx, numeric, rtol=1e-6, atol=1e-7, name="dx")
    assert np.max(np.abs(dx_constant_statistics - numeric)) > 0.1
    close(per_channel_values(dx).sum(axis=1), np.zeros(3), "gradient", "sum of dx")
    assert np.all(np.abs(per_channel_values(dx_constant_statistics).sum(axis=1)) > 1e-3)


# --------------------------------------------------------------------------------------------
# Comparison with torch in float64
# --------------------------------------------------------------------------------------------


def _grad_close(actual: np.ndarray, expected: object, name: str) -> None:
    expected = np.asarray(expected.detach().numpy() if hasattr(expected, "detach") else expected)
    rtol, atol = tolerance("float64", "gradient")
    assert_close(
        actual, expected, rtol=rtol, atol=atol * max(1.0, np.max(np.abs(expected))), name=name
    )


@pytest.mark.parametrize("case", SHAPES, ids=CASE_IDS)
def test_training_matches_torch(case: Case) -> None:
    torch = pytest.importorskip("torch")
    x = make_input(case)
    gamma, beta, dy = make_params(case)
    eps = 1e-3
    x_t, gamma_t, beta_t = (torch.tensor(a, requires_grad=True) for a in (x, gamma, beta))
    y_t = torch.nn.functional.batch_norm(x_t, None, None, gamma_t, beta_t, training=True, eps=eps)
    y_t.backward(torch.tensor(dy))

    y, cache = ref.bn_forward(x, gamma, beta, eps=eps)
    dx, dgamma, dbeta = ref.bn_backward(dy, cache)
    rtol, atol = tolerance("float64", "forward")
    assert_close(y, y_t, rtol=rtol, atol=atol * max(1.0, np.max(np.abs(y))), name="y")
    _grad_close(dx, x_t.grad, "dx")
    _grad_close(dgamma, gamma_t.grad, "dgamma")
    _grad_close(dbeta, beta_t.grad, "dbeta")


@pytest.mark.parametrize("case", SHAPES, ids=CASE_IDS)
def test_eval_matches_torch(case: Case) -> None:
    torch = pytest.importorskip("torch")
    x = make_input(case)
    gamma, beta, dy = make_params(case)
    rng = np.random.default_rng(2)
    channels = case.shape[1]
    mean = case.mean + case.std * rng.normal(size=channels)
    var = case.std**2 * rng.uniform(0.5, 2.0, channels)
    eps = 1e-5
    x_t, gamma_t, beta_t = (torch.tensor(a, requires_grad=True) for a in (x, gamma, beta))
    y_t = torch.nn.functional.batch_norm(
        x_t, torch.tensor(mean), torch.tensor(var), gamma_t, beta_t, training=False, eps=eps
    )
    y_t.backward(torch.tensor(dy))

    y = ref.bn_inference(x, gamma, beta, mean, var, eps=eps)
    dx, dgamma, dbeta = ref.bn_inference_backward(dy, x, gamma, mean, var, eps=eps)
    close(y, y_t, name="y")
    _grad_close(dx, x_t.grad, "dx")
    _grad_close(dgamma, gamma_t.grad, "dgamma")
    _grad_close(dbeta, beta_t.grad, "dbeta")


@pytest.mark.parametrize("momentum", [0.1, 0.01, 0.5, 1.0, 0.0])
@pytest.mark.parametrize("case", SHAPES[:8], ids=CASE_IDS[:8])
def test_running_update_matches_torch(case: Case, momentum: float) -> None:
    torch = pytest.importorskip("torch")
    channels = case.shape[1]
    rng = np.random.default_rng(3)
    running_mean = rng.normal(size=channels)
    running_var = rng.uniform(0.5, 2.0, channels)
    running_mean_t, running_var_t = torch.tensor(running_mean), torch.tensor(running_var)
    x = make_input(case)
    torch.nn.functional.batch_norm(
        torch.tensor(x), running_mean_t, running_var_t, training=True, momentum=momentum
    )  # updates the running buffers in place

    mu_B, var_B = ref.batch_statistics(x)
    m = per_channel_values(x).shape[1]
    new_mean, new_var = ref.running_update(running_mean, running_var, mu_B, var_B, m, momentum)
    close(new_mean, running_mean_t, name="running_mean")
    close(new_var, running_var_t, name="running_var")


def test_cumulative_average_matches_torch_momentum_none() -> None:
    # torch's momentum=None is running_update with momentum = 1 / num_batches_tracked, and for
    # equal batch sizes it recovers Algorithm 2 exactly.
    torch = pytest.importorskip("torch")
    layer = torch.nn.BatchNorm1d(3, momentum=None).double().train()
    batches = [make_input(Case((5, 3, 4), "batch", mean=float(k)), seed=k) for k in range(6)]
    running_mean, running_var = np.zeros(3), np.ones(3)
    with torch.no_grad():
        for k, x in enumerate(batches, start=1):
            layer(torch.tensor(x))
            mu_B, var_B = ref.batch_statistics(x)
            running_mean, running_var = ref.running_update(
                running_mean, running_var, mu_B, var_B, m=20, momentum=1.0 / k
            )
    close(running_mean, layer.running_mean, name="running_mean")
    close(running_var, layer.running_var, name="running_var")
    stats = ref.population_statistics(batches)
    close(stats.mean, layer.running_mean, name="population mean")
    close(stats.var, layer.running_var, name="population var")


# --------------------------------------------------------------------------------------------
# Conventions
# --------------------------------------------------------------------------------------------


def test_running_update_formula_and_keras_convention() -> None:
    rng = np.random.default_rng(4)
    running_mean, running_var, mu_B = rng.normal(size=(3, 4))
    running_var = np.abs(running_var)
    var_B = rng.uniform(0.5, 2.0, 4)
    m = 10
    new_mean, new_var = ref.running_update(running_mean, running_var, mu_B, var_B, m, 0.1)
    close(new_mean, 0.9 * running_mean + 0.1 * mu_B)
    close(new_var, 0.9 * running_var + 0.1 * var_B * 10 / 9)
    # Keras: running = momentum * running + (1 - momentum) * batch, biased variance stored.
    keras_momentum = 0.99
    torch_momentum = ref.keras_to_torch_momentum(keras_momentum)
    keras_mean = keras_momentum * running_mean + (1 - keras_momentum) * mu_B
    close(
        ref.running_update(running_mean, running_var, mu_B, var_B, m, torch_momentum)[0], keras_mean
    )
    keras_var = keras_momentum * running_var + (1 - keras_momentum) * var_B
    torch_var = ref.running_update(
        running_mean, ref.biased_to_unbiased(running_var, m), mu_B, var_B, m, torch_momentum
    )[1]
    close(ref.unbiased_to_biased(torch_var, m), keras_var)


def test_momentum_and_variance_conversions() -> None:
    assert ref.torch_to_keras_momentum(0.1) == pytest.approx(0.9)
    assert ref.keras_to_torch_momentum(0.99) == pytest.approx(0.01)
    for momentum in (0.0, 0.1, 0.37, 1.0):
        assert ref.keras_to_torch_momentum(ref.torch_to_keras_momentum(momentum)) == (
            pytest.approx(momentum)
        )
    var = np.array([0.0, 1.0, 2.5])
    close(ref.biased_to_unbiased(var, 5), var * 5 / 4)
    close(ref.unbiased_to_biased(var, 5), var * 4 / 5)
    close(ref.unbiased_to_biased(ref.biased_to_unbiased(var, 7), 7), var)
    close(ref.unbiased_to_biased(var, 1), np.zeros(3))


# --------------------------------------------------------------------------------------------
# Algorithm 2: population statistics
# --------------------------------------------------------------------------------------------


def _random_batches(sizes: list[int], channels: int = 3, seed: int = 5) -> list[np.ndarray]:
    """Batches of shape (N_b, C, 2) with batch-dependent means, so within-batch and total
    variance differ."""
    rng = np.random.default_rng(seed)
    return [
        rng.normal(loc=rng.normal(scale=3.0, size=(1, channels, 1)), size=(n, channels, 2))
        for n in sizes
    ]


def test_population_statistics_equal_sizes_is_algorithm_2() -> None:
    batches = _random_batches([4] * 7)
    m = 8
    mu = np.array([per_channel_values(x).mean(axis=1) for x in batches])
    var = np.array([per_channel_values(x).var(axis=1) for x in batches])
    stats = ref.population_statistics(batches)
    close(stats.mean, mu.mean(axis=0), name="E[x]")
    close(stats.var, m / (m - 1) * var.mean(axis=0), name="Var[x]")
    assert (stats.count, stats.num_batches) == (56, 7)


def test_population_statistics_uneven_sizes() -> None:
    # Sizes 1, 3, 7, 2 with spatial 2: m_b = 2, 6, 14, 4; then a batch with m_b = 1.
    batches = _random_batches([1, 3, 7, 2])
    batches.append(np.array([[5.0, -3.0, 100.0]]))
    stats = ref.population_statistics(batches)

    values = [per_channel_values(x) for x in batches]  # each (C, m_b)
    # E[x]: the count-weighted mean of batch means is the mean of all values.
    close(stats.mean, np.concatenate(values, axis=1).mean(axis=1), name="E[x]")
    # Var[x]: pooled within-batch sum of squares over pooled degrees of freedom.
    sum_squares = sum(((v - v.mean(axis=1, keepdims=True)) ** 2).sum(axis=1) for v in values)
    degrees_of_freedom = sum(v.shape[1] - 1 for v in values)
    close(stats.var, sum_squares / degrees_of_freedom, name="Var[x]")
    assert (stats.count, stats.num_batches) == (27, 5)

    # Neither the equal-weight average of per-batch statistics...
    equal_weight_mean = np.mean([v.mean(axis=1) for v in values], axis=0)
    assert np.max(np.abs(equal_weight_mean - stats.mean)) > 1e-3
    # ...nor the variance of all data pooled together (which adds the between-batch spread).
    total_var = np.concatenate(values, axis=1).var(axis=1, ddof=1)
    assert np.all(total_var > stats.var * 1.1)


def test_population_accumulator_streams_like_batch_function() -> None:
    batches = _random_batches([2, 5, 1, 3, 8])
    accumulator = ref.PopulationAccumulator()
    for x in batches:
        accumulator.update(x)
    streamed = accumulator.result()
    from_generator = ref.population_statistics(x for x in batches)
    close(streamed.mean, from_generator.mean)
    close(streamed.var, from_generator.var)
    assert (streamed.count, streamed.num_batches) == (from_generator.count, 5)
    # result() does not consume the state: more batches can follow.
    accumulator.update(batches[0])
    assert accumulator.result().num_batches == 6


def test_update_from_batch_statistics_equals_update() -> None:
    batches = _random_batches([2, 5, 1, 3])
    from_data = ref.PopulationAccumulator()
    from_statistics = ref.PopulationAccumulator()
    for x in batches:
        from_data.update(x)
        mu_B, var_B = ref.batch_statistics(x)
        from_statistics.update_from_batch_statistics(mu_B, var_B, x.shape[0] * x.shape[2])
    a, b = from_data.result(), from_statistics.result()
    close(a.mean, b.mean)
    close(a.var, b.var)
    assert (a.count, a.num_batches) == (b.count, b.num_batches) == (22, 4)


def test_population_statistics_errors() -> None:
    with pytest.raises(ValueError, match="no mini-batch has been added"):
        ref.population_statistics([])
    with pytest.raises(ValueError, match=r"single value per channel \(m = 1\)"):
        ref.population_statistics([np.ones((1, 3)), np.zeros((1, 3, 1))])
    accumulator = ref.PopulationAccumulator()
    accumulator.update(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"mu_B has shape \(4,\) but the input has C = 3"):
        accumulator.update(np.ones((2, 4)))
    with pytest.raises(ValueError, match="var_B must be >= 0"):
        accumulator.update_from_batch_statistics(np.zeros(3), -np.ones(3), 4)
    with pytest.raises(ValueError, match="integer >= 1"):
        accumulator.update_from_batch_statistics(np.zeros(3), np.ones(3), 0)


# --------------------------------------------------------------------------------------------
# Inference as an affine map, and folding into the previous layer
# --------------------------------------------------------------------------------------------


def _population(case: Case, seed: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    channels = case.shape[1]
    return case.mean + rng.normal(size=channels), case.std**2 * rng.uniform(0.5, 2.0, channels)


@pytest.mark.parametrize("case", SHAPES, ids=CASE_IDS)
def test_eval_map_equals_fold_affine(case: Case) -> None:
    x = make_input(case)
    gamma, beta, _ = make_params(case)
    mean, var = _population(case)
    scale, shift = ref.fold_affine(gamma, beta, mean, var)
    folded = ref._broadcast(scale, x.ndim) * x + ref._broadcast(shift, x.ndim)
    expected = ref.bn_inference(x, gamma, beta, mean, var)
    # The folded map cancels a shift of size |scale * mean|: allow for its rounding.
    rtol, atol = tolerance("float64", "forward")
    atol *= max(1.0, np.max(np.abs(scale * mean)))
    assert_close(folded, expected, rtol=rtol, atol=atol, name="folded y")


@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_into_linear(with_bias: bool) -> None:
    rng = np.random.default_rng(7)
    c_in, c_out = 5, 4
    weight = rng.normal(size=(c_out, c_in))
    bias = rng.normal(size=c_out) if with_bias else None
    gamma, beta = rng.normal(size=c_out), rng.normal(size=c_out)
    mean, var = rng.normal(size=c_out), rng.uniform(0.5, 2.0, c_out)
    u = rng.normal(size=(9, c_in))

    z = u @ weight.T + (0.0 if bias is None else bias)  # (N, C_out)
    expected = ref.bn_inference(z, gamma, beta, mean, var)
    new_weight, new_bias = ref.fold_into_linear(weight, bias, gamma, beta, mean, var)
    assert new_weight.shape == weight.shape and new_bias.shape == (c_out,)
    close(u @ new_weight.T + new_bias, expected, name="folded linear")


def _conv2d(u: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, groups: int) -> np.ndarray:
    """Valid 2-d cross-correlation with groups, as torch.nn.Conv2d computes it.

    u (N, C_in, H, W), weight (C_out, C_in / groups, kh, kw) -> (N, C_out, H - kh + 1, W - kw + 1)
    """
    windows = sliding_window_view(u, weight.shape[2:], axis=(2, 3))  # (N, C_in, H', W', kh, kw)
    in_per_group, out_per_group = weight.shape[1], weight.shape[0] // groups
    outputs = [
        np.einsum(
            "nchwij,ocij->nohw",
            windows[:, g * in_per_group : (g + 1) * in_per_group],
            weight[g * out_per_group : (g + 1) * out_per_group],
        )
        for g in range(groups)
    ]
    out = np.concatenate(outputs, axis=1)
    return out if bias is None else out + bias[None, :, None, None]


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_into_conv(with_bias: bool, groups: int) -> None:
    rng = np.random.default_rng(8)
    c_in, c_out = 4, 6
    weight = rng.normal(size=(c_out, c_in // groups, 3, 2))
    bias = rng.normal(size=c_out) if with_bias else None
    gamma, beta = rng.normal(size=c_out), rng.normal(size=c_out)
    mean, var = rng.normal(size=c_out), rng.uniform(0.5, 2.0, c_out)
    u = rng.normal(size=(2, c_in, 5, 4))

    expected = ref.bn_inference(_conv2d(u, weight, bias, groups), gamma, beta, mean, var)
    new_weight, new_bias = ref.fold_into_linear(weight, bias, gamma, beta, mean, var)
    close(_conv2d(u, new_weight, new_bias, groups), expected, name="folded conv")


def test_fold_into_conv3d_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    conv = torch.nn.Conv3d(4, 6, kernel_size=(2, 3, 1), groups=2, bias=False).double()
    bn = torch.nn.BatchNorm3d(6).double().eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(rng.normal(size=6)))
        bn.bias.copy_(torch.tensor(rng.normal(size=6)))
        bn.running_mean.copy_(torch.tensor(rng.normal(size=6)))
        bn.running_var.copy_(torch.tensor(rng.uniform(0.5, 2.0, 6)))
        u = torch.tensor(rng.normal(size=(2, 4, 3, 4, 2)))
        expected = bn(conv(u))
        new_weight, new_bias = ref.fold_into_linear(
            conv.weight.numpy(),
            None,
            bn.weight.numpy(),
            bn.bias.numpy(),
            bn.running_mean.numpy(),
            bn.running_var.numpy(),
            eps=bn.eps,
        )
        folded = torch.nn.functional.conv3d(
            u, torch.tensor(new_weight), torch.tensor(new_bias), groups=2
        )
    close(folded, expected, name="folded conv3d")


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: ref.bn_forward(np.ones(3), np.ones(3), np.zeros(3)), r"got 1 dimension"),
        (
            lambda: ref.bn_forward(np.ones((4, 3)), np.ones(4), np.zeros(3)),
            r"gamma has shape \(4,\) but the input has C = 3 channel\(s\).*shape \(3,\)",
        ),
        (
            lambda: ref.bn_forward(np.ones((4, 3)), np.ones(3), np.zeros((1, 3))),
            r"beta has shape \(1, 3\)",
        ),
        (lambda: ref.bn_forward(np.ones((4, 3)), np.ones(3), np.zeros(3), eps=-1e-5), "eps"),
        (lambda: ref.bn_forward(np.ones((0, 3)), np.ones(3), np.zeros(3)), "at least one value"),
        (
            lambda: ref.bn_inference(np.ones((4, 3, 2)), np.ones(3), np.zeros(3), np.zeros(2), 1),
            r"mean has shape \(2,\)",
        ),
        (
            lambda: ref.bn_backward(
                np.ones((4, 2)), ref.bn_forward(np.ones((4, 3)), np.ones(3), np.zeros(3))[1]
            ),
            r"dy has shape \(4, 2\)",
        ),
        (lambda: ref.running_update([0.0], [1.0], [0.0], [1.0], 1, 0.1), "integer >= 2"),
        (lambda: ref.running_update([0.0], [1.0], [0.0], [1.0], 4, 1.5), r"momentum .* \[0, 1\]"),
        (lambda: ref.fold_into_linear(np.ones(3), None, [1.0], [0.0], [0.0], [1.0]), "C_out"),
        (
            lambda: ref.fold_into_linear(np.ones((3, 2)), None, [1.0], [0.0], [0.0], [1.0]),
            r"gamma has shape \(1,\)",
        ),
        (lambda: ref.torch_to_keras_momentum(-0.1), "momentum"),
    ],
    ids=[
        "ndim",
        "gamma-channels",
        "beta-shape",
        "eps",
        "empty",
        "mean-channels",
        "dy-shape",
        "m-1",
        "momentum",
        "weight-ndim",
        "fold-channels",
        "keras-momentum",
    ],
)
def test_errors_say_what_is_wrong(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# --------------------------------------------------------------------------------------------
# Packaging: the reference needs only NumPy
# --------------------------------------------------------------------------------------------


def test_reference_imports_without_torch() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None  # any import of torch now raises ImportError
        import numpy as np
        from batchnorm import reference
        y, _ = reference.bn_forward(np.array([[0.23, 1.26], [0.56, 0.75]]), [1.0, 1.0],
                                    [1.0, 1.0], eps=0.0)
        assert np.allclose(y, [[0.0, 2.0], [2.0, 0.0]])
        assert not any(name.startswith("torch") and sys.modules[name] is not None
                       for name in sys.modules)
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# --------------------------------------------------------------------------------------------
# Property: the output is normalized, whatever the shape and offset
# --------------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(1, 5),
    channels=st.integers(1, 4),
    spatial=st.lists(st.integers(1, 4), max_size=2),
    mean=st.sampled_from([0.0, 3.0, -1e3, 1e6, -1e6]),
    std=st.sampled_from([1e-2, 1.0, 1e2]),
    eps=st.sampled_from([1e-5, 1e-3, 1.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_output_is_normalized(
    n: int, channels: int, spatial: list[int], mean: float, std: float, eps: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    shape = (n, channels, *spatial)
    x = mean + std * rng.standard_normal(shape)
    gamma = rng.uniform(0.5, 2.0, channels)
    beta = rng.normal(size=channels)
    y, _ = ref.bn_forward(x, gamma, beta, eps=eps)

    values = per_channel_values(x)
    var_B = values.var(axis=1)
    # With a large mean, x itself carries an absolute rounding error of about |mean| * 1e-16.
    slack = 1e-9 * max(1.0, abs(mean) / std)
    y_values = per_channel_values(y)
    assert_close(y_values.mean(axis=1), beta, rtol=0.0, atol=slack * gamma.max(), name="mean")
    expected_var = gamma**2 * var_B / (var_B + eps)
    assert_close(y_values.var(axis=1), expected_var, rtol=slack, atol=slack, name="var")
