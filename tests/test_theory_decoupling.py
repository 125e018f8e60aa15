"""Length-direction decoupling and GDNP (Kohler et al. 2019) against independent computations.

- the OLS optimum against numpy.linalg.lstsq on the samples;
- reparametrized gradients against central finite differences of f(g w / ||w||_S);
- the halfspace objective (quadrature) against Monte Carlo samples of z;
- GDNP's linear rate against the contraction factor (1 - mu/L)^2 of its direction step, and its
  length error against the bisection bound (b - a) 2^-(T_s + 1).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from batchnorm.lab.theory._stats import least_squares_slope
from batchnorm.lab.theory.decoupling import (
    HalfspaceProblem,
    OLSProblem,
    bisection,
    fit_linear_rate,
    gaussian_halfspace_problem,
    gaussian_ols_problem,
    gd,
    gd_length_direction,
    gdnp,
    mlp_unit_gradients,
    normalized_weights,
    reparametrized_gradients,
    s_norm,
    train_mlp_unitwise,
)
from tests.helpers import assert_close


def _samples(seed=0, n=200, d=4):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)) @ np.diag([1.0, 1.5, 0.7, 2.0])[:d, :d]
    y = X @ rng.standard_normal(d) + 0.3 * rng.standard_normal(n)
    return X, y


def _central_difference(f, x, h=1e-6):
    grad = np.zeros_like(x)
    for i in range(x.size):
        e = np.zeros_like(x)
        e[i] = h
        grad[i] = (f(x + e) - f(x - e)) / (2 * h)
    return grad


def test_ols_optimum_matches_least_squares():
    X, y = _samples()
    problem = OLSProblem.from_samples(X, y)
    w_star, f_star = problem.optimum()
    w_lstsq, *_ = np.linalg.lstsq(X, y, rcond=None)
    assert_close(w_star, w_lstsq, rtol=1e-10, atol=1e-12, name="normal equations vs lstsq")
    assert f_star == pytest.approx(np.mean((y - X @ w_lstsq) ** 2), rel=1e-10)
    w = np.array([0.3, -1.0, 2.0, 0.1])
    assert problem.loss(w) == pytest.approx(np.mean((y - X @ w) ** 2), rel=1e-12)
    # GDNP reaches the same solution.
    run = gdnp(problem, np.ones(4), iterations=300, bisection_steps=50)
    assert_close(run.weights, w_lstsq, rtol=1e-7, atol=1e-9, name="GDNP vs lstsq")


def test_ols_loss_splits_into_rayleigh_quotient_and_length_error():
    problem, _ = gaussian_ols_problem(6, 20.0, seed=1)
    _, f_star = problem.optimum()
    rho_star = -float(problem.u @ np.linalg.solve(problem.S, problem.u))
    rng = np.random.default_rng(2)
    for _ in range(5):
        w, g = rng.standard_normal(6), float(rng.standard_normal())
        g_star = -float(problem.u @ w) / s_norm(w, problem.S)
        lhs = problem.loss(normalized_weights(w, g, problem.S)) - f_star
        rhs = problem.rayleigh_quotient(w) - rho_star + (g - g_star) ** 2
        assert lhs == pytest.approx(rhs, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("kind", ["ols", "halfspace"])
def test_reparametrized_gradient_matches_finite_differences(kind):
    problem = (
        gaussian_ols_problem(5, 10.0, seed=3)[0]
        if kind == "ols"
        else gaussian_halfspace_problem(5, 10.0, seed=3)
    )
    rng = np.random.default_rng(4)
    for _ in range(3):
        w, g = rng.standard_normal(5), 1.5 * float(rng.standard_normal())
        grad_w, grad_g = reparametrized_gradients(problem, w, g)
        f = lambda w_, g_=g: problem.loss(normalized_weights(w_, g_, problem.S))  # noqa: E731
        assert_close(grad_w, _central_difference(f, w), rtol=1e-6, atol=1e-8, name="grad_w")
        fd_g = (f(w, g + 1e-6) - f(w, g - 1e-6)) / 2e-6
        assert grad_g == pytest.approx(fd_g, rel=1e-6, abs=1e-8)
        # The direction gradient is orthogonal to w: BN's scale invariance.
        assert abs(float(grad_w @ w)) < 1e-10 * np.linalg.norm(grad_w) * np.linalg.norm(w)


def test_halfspace_objective_gradient_and_critical_line():
    problem = gaussian_halfspace_problem(4, 5.0, mean_scale=1.5, seed=5)
    rng = np.random.default_rng(6)
    w = rng.standard_normal(4)
    # Quadrature against brute-force Monte Carlo over z ~ N(u, Sigma).
    z = rng.multivariate_normal(problem.u, problem.covariance, size=400_000)
    values = np.logaddexp(0.0, z @ w)
    assert problem.loss(w) == pytest.approx(
        values.mean(), abs=4 * values.std() / math.sqrt(z.shape[0])
    )
    assert_close(
        problem.gradient(w),
        _central_difference(problem.loss, w),
        rtol=1e-7,
        atol=1e-9,
        name="halfspace gradient",
    )
    w_star, f_star = problem.optimum()
    assert np.linalg.norm(problem.gradient(w_star)) < 1e-10
    line = np.linalg.solve(problem.S, problem.u)
    cos = float(w_star @ line) / (np.linalg.norm(w_star) * np.linalg.norm(line))
    assert abs(cos) == pytest.approx(1.0, abs=1e-12)
    assert all(problem.loss(w_star + 1e-3 * rng.standard_normal(4)) > f_star for _ in range(5))


@pytest.mark.parametrize("kind", ["ols", "halfspace"])
def test_gdnp_converges_linearly_at_the_predicted_rate(kind):
    kappa = 10.0
    if kind == "ols":
        problem = gaussian_ols_problem(5, kappa, seed=7)[0]
    else:
        problem = gaussian_halfspace_problem(5, kappa, seed=7)
    run = gdnp(problem, np.ones(5), iterations=60, bisection_steps=45)
    eigenvalues = np.linalg.eigvalsh(problem.S)
    predicted = (1 - eigenvalues[0] / eigenvalues[-1]) ** 2
    rate = fit_linear_rate(run.suboptimality[5:50], floor=1e-13)
    assert rate < 1.0 and rate <= predicted + 0.02, f"fitted {rate:.4f}, bound {predicted:.4f}"
    assert run.suboptimality[50] < 1e-4 * run.suboptimality[0]
    assert np.all(run.suboptimality >= -1e-12)


def test_gdnp_length_error_halves_with_each_bisection_step():
    problem = gaussian_ols_problem(5, 10.0, seed=8)[0]
    a, b = -10.0, 10.0
    steps = np.arange(3, 29)
    errors = []
    for t_s in steps:
        run = gdnp(problem, np.ones(5), iterations=60, bisection_steps=int(t_s), interval=(a, b))
        g_star = -float(problem.u @ run.direction) / s_norm(run.direction, problem.S)
        error = abs(run.length - g_star)
        assert error <= (b - a) * 2.0 ** -(t_s + 1) * (1 + 1e-9) + 1e-14
        assert run.length_derivative == pytest.approx(2 * error, rel=1e-6, abs=1e-13)
        errors.append(error)
    slope, _ = least_squares_slope(steps.astype(float), np.log2(errors))
    assert -1.25 < float(slope) < -0.75, f"log2 error falls by {-float(slope):.2f} per T_s step"


def test_gdnp_beats_plain_gd_on_halfspaces():
    problem = gaussian_halfspace_problem(5, 10.0, seed=9)
    gdnp_run = gdnp(problem, np.ones(5), iterations=60, bisection_steps=45)
    gd_run = gd(problem, np.zeros(5), iterations=60)
    joint = gd_length_direction(problem, np.ones(5), 1.0, iterations=60, step_size=0.5)
    assert gd_run.suboptimality[-1] < gd_run.suboptimality[0]
    assert joint.suboptimality[-1] < joint.suboptimality[0]
    assert gdnp_run.suboptimality[-1] < min(gd_run.suboptimality[-1], joint.suboptimality[-1])


def test_mlp_unit_gradients_and_unitwise_training():
    rng = np.random.default_rng(10)
    n, d, m = 300, 4, 3
    X = rng.standard_normal((n, d))
    X -= X.mean(0)
    v = np.array([1.0, -1.0, 0.5])
    teacher = rng.standard_normal((m, d))
    y = (v[:, None] * np.tanh(teacher @ X.T)).sum(0)
    S = X.T @ X / n
    w, g, rest = rng.standard_normal(d), 1.3, rng.standard_normal(n)
    loss, grad_w, grad_g = mlp_unit_gradients(X, y, v[0], w, g, rest, S)
    f = lambda w_, g_=g: mlp_unit_gradients(X, y, v[0], w_, g_, rest, S)[0]  # noqa: E731
    assert_close(grad_w, _central_difference(f, w), rtol=1e-6, atol=1e-9, name="unit grad_w")
    assert grad_g == pytest.approx((f(w, g + 1e-6) - f(w, g - 1e-6)) / 2e-6, rel=1e-6)
    assert loss == pytest.approx(
        np.mean((rest + v[0] * np.tanh(g * X @ w / s_norm(w, S)) - y) ** 2)
    )

    run = train_mlp_unitwise(
        X, y, v, rng.standard_normal((m, d)), np.ones(m), sweeps=8, direction_steps=10
    )
    # Each unit's update (direction steps, then the best length) never raises the loss here,
    # and the lengths sit at a stationary point after their bisection.
    assert np.all(np.diff(run.losses) <= 1e-12), run.losses
    assert run.losses[-1] < 0.2 * run.losses[0], run.losses
    assert np.all(run.length_derivatives < 1e-7)


def test_helpers_and_bad_input():
    assert fit_linear_rate([1.0, 0.5, 0.25, 0.125, 0.0], floor=0.0) == pytest.approx(0.5)
    assert bisection(lambda g: g - 0.3, -1.0, 1.0, 40) == pytest.approx(0.3, abs=1e-11)
    with pytest.raises(ValueError, match="does not contain a minimum"):
        bisection(lambda g: g - 3.0, -1.0, 1.0, 5)
    problem = OLSProblem(S=np.eye(3), u=np.array([1.0, 0.0, 0.0]), y_second_moment=2.0)
    with pytest.raises(ValueError, match="u\\^T w0 = 0"):
        gdnp(problem, np.array([0.0, 1.0, 0.0]), 3, 3)
    with pytest.raises(ValueError, match="positive definite"):
        OLSProblem(S=-np.eye(2), u=np.ones(2), y_second_moment=1.0)
    with pytest.raises(ValueError, match="shape"):
        HalfspaceProblem(u=np.ones(3), covariance=np.eye(2))
    with pytest.raises(ValueError, match="zero S-norm"):
        normalized_weights(np.zeros(2), 1.0, np.eye(2))
