"""The landscape along the gradient (Santurkar et al. Sec. 3.1) on a quadratic, in closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchnorm.lab.theory.landscape import probe_landscape, step_grid
from batchnorm.nn import BatchNorm1d
from tests.helpers import assert_close

DT = torch.float64


def _quadratic(seed: int = 0, dim: int = 6):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    eigenvalues = np.linspace(0.5, 7.0, dim)
    A = (q * eigenvalues) @ q.T
    return 0.5 * (A + A.T), q, eigenvalues


def test_quadratic_closed_form():
    A, _, eigenvalues = _quadratic()
    theta0 = np.random.default_rng(1).standard_normal(6)
    theta = torch.nn.Parameter(torch.tensor(theta0))
    At = torch.tensor(A)
    etas = step_grid(0.1)
    probe = probe_landscape([theta], lambda: 0.5 * theta @ At @ theta, etas)

    g = A @ theta0
    for eta, loss, diff in zip(etas, probe.losses, probe.grad_differences):
        moved = theta0 - eta * g
        assert loss == pytest.approx(0.5 * moved @ A @ moved, rel=1e-12)
        assert diff == pytest.approx(eta * np.linalg.norm(A @ g), rel=1e-12)
    beta = np.linalg.norm(A @ g) / np.linalg.norm(g)
    assert probe.beta_smoothness == pytest.approx(beta, rel=1e-12)
    assert probe.beta_smoothness <= eigenvalues.max()
    assert probe.grad_norm == pytest.approx(np.linalg.norm(g), rel=1e-12)
    assert probe.loss_at_start == pytest.approx(0.5 * theta0 @ A @ theta0, rel=1e-12)
    assert torch.equal(theta.detach(), torch.tensor(theta0))


def test_beta_is_the_eigenvalue_along_an_eigenvector():
    A, q, eigenvalues = _quadratic(seed=2)
    At = torch.tensor(A)
    for k in (0, 5):
        theta = torch.nn.Parameter(torch.tensor(3.0 * q[:, k]))

        def loss(theta=theta):
            return 0.5 * theta @ At @ theta

        probe = probe_landscape([theta], loss, (0.01, 0.05))
        assert probe.beta_smoothness == pytest.approx(eigenvalues[k], rel=1e-10)


def test_restores_parameters_buffers_and_grads_exactly():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 8, dtype=DT),
        BatchNorm1d(8, dtype=DT),
        torch.nn.ReLU(),
        torch.nn.Linear(8, 1, dtype=DT),
    )
    x, y = torch.randn(32, 4, dtype=DT), torch.randn(32, 1, dtype=DT)
    net(x)  # non-trivial running statistics
    for p in net.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    probe = probe_landscape(
        list(net.parameters()), lambda: ((net(x) - y) ** 2).mean(), step_grid(0.1), module=net
    )
    assert probe.grad_norm > 0 and len(probe.losses) == 8
    lo, hi = probe.loss_range
    assert lo <= hi and probe.grad_difference_range[0] >= 0
    after = net.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in net.parameters())


def test_step_grid():
    grid = step_grid(0.1)
    assert_close(np.array(grid), np.linspace(0.05, 0.4, 8), rtol=1e-15, atol=0, name="grid")
    assert step_grid(0.2, num=4, cap=0.4) == pytest.approx(
        (0.1, 0.1 + 0.7 / 3, 0.4)
    )  # 0.567 and 0.8 capped
    with pytest.raises(ValueError, match="lr must be"):
        step_grid(-1.0)
    with pytest.raises(ValueError, match="positive"):
        probe_landscape([torch.nn.Parameter(torch.ones(1))], lambda: torch.ones(()), [0.0])
