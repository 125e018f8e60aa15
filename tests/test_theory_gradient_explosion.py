"""Yang et al. 2019: closed-form gradient growth lambda(B) against a Monte Carlo estimate.

The closed forms are checked against their own limits and special cases, and against the Monte
Carlo estimate built from batchnorm.nn.BatchNorm1d networks (an independent computation: no
formula is shared). Width 256, depth 30 and 10 repeats keep each estimate near a second; the
finite-width bias at this size is below the confidence interval for B >= 8 (the module docstring
gives the coverage measured over seeds).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from batchnorm.lab.theory.gradient_explosion import (
    RELU_LAMBDA_LIMIT,
    gradient_growth,
    linear_lambda,
    relu_lambda,
    trainable_depth,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matrices: a second thread only adds contention on a shared CPU.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _relu_kernel_by_quadrature(c: float) -> tuple[float, float]:
    """J(c) = 2 E[relu(u) relu(v)], J'(c) = 2 P(u > 0, v > 0) for unit Gaussians with corr c.

    J by conditioning on u: v | u ~ N(c u, 1 - c^2) and E[relu(N(m, s^2))] = m Phi(m/s) +
    s phi(m/s), then Simpson's rule over u in [0, 12] (the integrand is smooth there).
    """
    s = math.sqrt(1 - c * c)
    u = np.linspace(0.0, 12.0, 4001)
    m = c * u
    cdf = 0.5 * (1 + np.vectorize(math.erf)(m / (s * math.sqrt(2))))
    pdf = np.exp(-0.5 * (m / s) ** 2) / math.sqrt(2 * math.pi)
    integrand = u * (m * cdf + s * pdf) * np.exp(-0.5 * u**2) / math.sqrt(2 * math.pi)
    weights = np.ones_like(u)
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    j = 2 * float(weights @ integrand) * (u[1] - u[0]) / 3
    # P(u > 0, v > 0) for correlated Gaussians: the orthant formula 1/4 + arcsin(c) / (2 pi).
    j_prime = 2 * (0.25 + math.asin(c) / (2 * math.pi))
    return j, j_prime


def test_relu_lambda_matches_its_formula_with_kernel_by_quadrature():
    # J computed by 2-D Gauss-Hermite quadrature and J' by the orthant probability: an
    # independent route to the arc-cosine kernel terms used in relu_lambda.
    for b in (4, 5, 8, 16, 64):
        c0 = -1.0 / (b - 1)
        j, j_prime = _relu_kernel_by_quadrature(c0)
        expected = (j_prime + (b - 1)) / ((b - 3) * (1 - j)) - 1 / (b - 3)
        assert relu_lambda(b) == pytest.approx(expected, rel=1e-9), b


def test_closed_forms_limits_and_special_cases():
    assert RELU_LAMBDA_LIMIT == pytest.approx(1.4669, abs=1e-4)
    assert relu_lambda(10**8) == pytest.approx(RELU_LAMBDA_LIMIT, rel=1e-7)
    values = [relu_lambda(b) for b in range(4, 300)]
    assert all(a > b for a, b in zip(values, values[1:])), "lambda(B) must decrease with B"
    assert all(v > RELU_LAMBDA_LIMIT for v in values)
    # The linear formula is the ReLU one with J(c) = c, J'(c) = 1.
    for b in (4, 7, 20):
        c0 = -1.0 / (b - 1)
        assert linear_lambda(b) == pytest.approx((1 + (b - 1)) / ((b - 3) * (1 - c0)) - 1 / (b - 3))
    assert linear_lambda(4) == 2.0
    assert linear_lambda(10**9) == pytest.approx(1.0)


def test_trainable_depth():
    assert trainable_depth(math.e) == pytest.approx(16.0)
    assert trainable_depth(RELU_LAMBDA_LIMIT) == pytest.approx(
        16 / math.log(math.pi / (math.pi - 1))
    )
    assert trainable_depth(1.0) == math.inf
    depths = [trainable_depth(relu_lambda(b)) for b in (4, 8, 32, 128)]
    assert depths == sorted(depths), "larger batches allow deeper networks"
    assert depths[-1] < 50, "at any batch size the ReLU net stays below ~42 layers"
    with pytest.raises(ValueError, match="finite positive"):
        trainable_depth(-1.0)


@pytest.mark.parametrize(
    ("nonlinearity", "batch_size", "closed_form"),
    [("linear", 8, linear_lambda), ("relu", 8, relu_lambda), ("relu", 16, relu_lambda)],
)
def test_monte_carlo_agrees_with_closed_form(nonlinearity, batch_size, closed_form):
    est = gradient_growth(256, batch_size, 30, nonlinearity, repeats=10, seed=0)
    expected = closed_form(batch_size)
    assert est.contains(expected), (
        f"{nonlinearity} B={batch_size}: theory {expected:.4f} outside the 95% CI "
        f"[{est.ci_low:.4f}, {est.ci_high:.4f}] (estimate {est.growth:.4f})"
    )
    # The interval is informative, not a catch-all.
    assert est.ci_high - est.ci_low < 0.1 * expected
    assert est.log_sq_grad_norms.shape == (10, 30)


def test_tanh_explodes_and_residual_connections_tame_it():
    tanh = gradient_growth(128, 8, 24, "tanh", repeats=6, seed=1)
    assert tanh.ci_low > 1.1, f"tanh: lambda CI [{tanh.ci_low:.3f}, {tanh.ci_high:.3f}]"
    plain = gradient_growth(128, 8, 24, "relu", repeats=6, seed=2)
    residual = gradient_growth(128, 8, 24, "relu", residual=True, repeats=6, seed=2)
    assert residual.ci_high < plain.ci_low, (
        f"residual {residual.growth:.3f} vs plain {plain.growth:.3f}"
    )
    assert residual.growth < 1.2 < plain.growth


def test_positive_eps_runs_on_the_default_backend():
    est = gradient_growth(64, 8, 14, "relu", eps=1e-3, repeats=3, skip_first=3, skip_last=3)
    assert est.growth > 1.0 and math.isfinite(est.ci_high)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 3}, "B <= 3"),
        ({"nonlinearity": "sigmoid"}, "relu, tanh, linear"),
        ({"depth": 10}, "depth must be an int >= 12"),
        ({"repeats": 1}, "repeats must be an int >= 2"),
        ({"eps": -1.0}, "eps must be a number >= 0"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, match):
    args = {"width": 8, "batch_size": 8, "depth": 30, "nonlinearity": "relu", **kwargs}
    with pytest.raises(ValueError, match=match):
        gradient_growth(**args)
