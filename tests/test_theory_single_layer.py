"""Santurkar et al. Theorems 4.1 and 4.2 on a single BN layer, on random instances.

Independent computations: the left-hand sides are recomputed with the project's BatchNorm1d
(its "explicit" backend for eps = 0, torch's kernel for eps > 0) and, for the Hessian, by central
finite differences of that layer's gradient; the eps > 0 slack of Theorem 4.1 is compared with
its closed form (1 - r) <g, yhat>^2 / m derived from the SPEC closed-form backward pass.
"""

from __future__ import annotations

import math

import pytest
import torch

from batchnorm.lab.theory.single_layer import gradient_norm_bound, hessian_bound
from batchnorm.nn import BatchNorm1d

DT = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _instance(gen: torch.Generator):
    """A random batch size, activations, gamma, beta and a non-separable, non-convex loss."""
    m = int(torch.randint(3, 24, (1,), generator=gen))
    scale = float(torch.rand(1, generator=gen, dtype=DT)) * 3 + 0.1
    y = torch.randn(m, generator=gen, dtype=DT) * scale + float(torch.randn(1, generator=gen))
    gamma = float(torch.rand(1, generator=gen, dtype=DT)) * 3 + 0.1
    beta = float(torch.randn(1, generator=gen, dtype=DT))
    a = torch.randn(m, m, generator=gen, dtype=DT)
    q = (a + a.T) / 2  # indefinite
    c = torch.randn(m, generator=gen, dtype=DT)
    t = torch.randn(m, generator=gen, dtype=DT)

    def loss(z: torch.Tensor) -> torch.Tensor:
        return 0.5 * (z - t) @ q @ (z - t) + (c * torch.sin(z)).sum() + torch.logsumexp(z, 0)

    return y, loss, gamma, beta


def _layer_gradient(y, loss, gamma, beta, eps) -> torch.Tensor:
    """grad_y L_hat through batchnorm.nn.BatchNorm1d(1)."""
    bn = BatchNorm1d(1, eps=eps, dtype=DT, backend="explicit" if eps == 0 else "torch")
    with torch.no_grad():
        bn.weight.fill_(gamma)
        bn.bias.fill_(beta)
    x = y.detach().clone().reshape(-1, 1).requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(bn(x)[:, 0]), x)
    return grad[:, 0]


@pytest.mark.parametrize("eps", [0.0, 1e-3, 0.1])
def test_theorem_4_1_lhs_matches_the_project_layer(eps):
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        y, loss, gamma, beta = _instance(gen)
        bound = gradient_norm_bound(y, loss, gamma, beta, eps)
        expected = float(_layer_gradient(y, loss, gamma, beta, eps).square().sum())
        assert bound.lhs == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("eps", [0.0, 1e-3, 0.1, 1.0])
def test_theorem_4_1_holds_and_is_tight_exactly_at_eps_zero(eps):
    gen = torch.Generator().manual_seed(2)
    for _ in range(150):
        y, loss, gamma, beta = _instance(gen)
        b = gradient_norm_bound(y, loss, gamma, beta, eps)
        assert b.lhs <= b.rhs * (1 + 1e-10), f"bound violated: {b}"
        m = y.numel()
        yc = y - y.mean()
        r = float(yc.square().mean() / (yc.square().mean() + eps))  # ||yhat||^2 / m
        slack = gamma**2 / b.sigma**2 * (1 - r) * b.g_dot_yhat**2 / m
        assert b.rhs - b.lhs == pytest.approx(slack, rel=1e-6, abs=1e-10 * b.rhs)
        if eps == 0.0:
            assert b.ratio == pytest.approx(1.0, abs=1e-10)


def test_theorem_4_1_with_one_over_sqrt_m_fails():
    # The 1/sqrt(m) transcription subtracts more than the exact identity allows.
    gen = torch.Generator().manual_seed(3)
    for _ in range(50):
        y, loss, gamma, beta = _instance(gen)
        b = gradient_norm_bound(y, loss, gamma, beta, 0.0)
        assert abs(b.g_dot_yhat) > 1e-8
        assert b.lhs > b.rhs_sqrt_m


def test_theorem_4_2_lhs_matches_finite_differences_of_the_layer_gradient():
    gen = torch.Generator().manual_seed(4)
    for _ in range(20):
        y, loss, gamma, beta = _instance(gen)
        h = hessian_bound(y, loss, gamma, beta, 0.0)
        v = _layer_gradient(y, loss, gamma, beta, 0.0)
        step = 1e-4 * float(y.std()) / float(v.norm())
        plus = _layer_gradient(y + step * v, loss, gamma, beta, 0.0)
        minus = _layer_gradient(y - step * v, loss, gamma, beta, 0.0)
        fd = float(v @ (plus - minus)) / (2 * step)
        scale = max(abs(fd), float(v.square().sum()) * gamma**2 / float(y.var(unbiased=False)))
        assert h.lhs == pytest.approx(fd, abs=1e-6 * scale)


def test_theorem_4_2_is_an_identity_at_eps_zero_and_second_form_follows():
    gen = torch.Generator().manual_seed(5)
    applied = 0
    for _ in range(150):
        y, loss, gamma, beta = _instance(gen)
        h = hessian_bound(y, loss, gamma, beta, 0.0)
        scale = max(abs(h.lhs), abs(h.rhs), 1e-300)
        assert abs(h.gap) <= 1e-9 * scale, f"gap {h.gap:.3g} for scale {scale:.3g}"
        if h.second_form_applies:
            applied += 1
            assert h.lhs <= h.rhs_second_form + 1e-9 * scale
    assert 0 < applied < 150, "random instances should cover both sides of the assumption"


def test_theorem_4_2_first_form_is_not_a_bound_when_eps_is_positive():
    gen = torch.Generator().manual_seed(6)
    gaps = []
    for _ in range(60):
        y, loss, gamma, beta = _instance(gen)
        h = hessian_bound(y, loss, gamma, beta, 0.1)
        gaps.append(h.gap / max(abs(h.lhs), abs(h.rhs)))
    assert min(gaps) < -1e-3 and max(gaps) > 1e-3, "eps > 0 terms take either sign"


def test_bad_input():
    loss = lambda z: z.square().sum()  # noqa: E731
    with pytest.raises(ValueError, match="constant over the batch"):
        gradient_norm_bound(torch.ones(5, dtype=DT), loss)
    with pytest.raises(ValueError, match="1-D tensor"):
        hessian_bound(torch.randn(4, 2, dtype=DT), loss)
    with pytest.raises(ValueError, match="gamma"):
        gradient_norm_bound(torch.randn(4, dtype=DT), loss, gamma=0.0)
    # A constant batch is fine with eps > 0 (sigma_j = sqrt(eps)).
    b = gradient_norm_bound(torch.ones(5, dtype=DT), loss, eps=0.5)
    assert math.isfinite(b.lhs)
