"""The deep linear network problem: autograd against the closed-form gradient of a product."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from batchnorm.lab.theory.deep_linear import (
    build_deep_linear,
    closed_form_gradients,
    deep_linear_loss,
    make_problem,
    train_deep_linear,
)
from batchnorm.nn import BatchNorm1d
from tests.helpers import assert_close


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_autograd_matches_closed_form(reduction):
    problem = make_problem(dim=3, samples=7, seed=1)
    net = build_deep_linear(3, 5, seed=2)
    loss = deep_linear_loss(net, problem, reduction)
    grads = torch.autograd.grad(loss, [m.weight for m in net])
    weights = [m.weight.detach().numpy() for m in net]
    expected = closed_form_gradients(weights, problem.inputs, problem.target, reduction)
    for i, (g, e) in enumerate(zip(grads, expected)):
        assert_close(g, e, rtol=1e-10, atol=1e-12, name=f"dL/dW_{i + 1}")
    product = np.linalg.multi_dot(weights[::-1])
    sq = np.square(product @ problem.inputs - problem.target @ problem.inputs).sum()
    assert float(loss.detach()) == pytest.approx(sq / (7 if reduction == "mean" else 1), rel=1e-12)


def test_closed_form_gradient_matches_finite_differences():
    problem = make_problem(dim=2, samples=5, seed=3)
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((2, 2)) for _ in range(3)]

    def loss(ws):
        p = np.linalg.multi_dot(ws[::-1])
        return np.square(p @ problem.inputs - problem.target @ problem.inputs).sum()

    grads = closed_form_gradients(weights, problem.inputs, problem.target)
    h = 1e-6
    for i in range(3):
        for idx in np.ndindex(2, 2):
            plus = [w.copy() for w in weights]
            minus = [w.copy() for w in weights]
            plus[i][idx] += h
            minus[i][idx] -= h
            fd = (loss(plus) - loss(minus)) / (2 * h)
            assert grads[i][idx] == pytest.approx(fd, rel=1e-6, abs=1e-6)


def test_problem_and_initialization_follow_the_protocol():
    problem = make_problem()
    assert problem.target.shape == (10, 10) and problem.inputs.shape == (10, 1000)
    net = build_deep_linear(batch_norm=True, seed=0)
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    norms = [m for m in net if isinstance(m, BatchNorm1d)]
    assert len(linears) == 25 and len(norms) == 24
    assert all(m.bias is None for m in linears)
    w = torch.cat([m.weight.detach().reshape(-1) for m in linears])
    assert float(w.std()) == pytest.approx(math.sqrt(2 / 20), rel=0.05)  # Glorot normal
    plain = build_deep_linear(seed=0)
    assert torch.equal(plain[0].weight, linears[0].weight), "same seed, same W with or without BN"


@pytest.mark.parametrize("batch_norm", [False, True])
def test_training_reduces_loss_and_measures_covariate_shift(batch_norm):
    problem = make_problem(dim=4, samples=64, seed=0)
    run = train_deep_linear(
        problem,
        depth=6,
        batch_norm=batch_norm,
        lr=1e-3,
        steps=20,
        seed=0,
        reduction="mean",
        shift_every=10,
    )
    assert run.losses.shape == (21,) and run.losses[-1] < run.losses[0]
    assert run.shift_steps == (0, 10)
    for shifts in run.shifts:
        assert [s.layer for s in shifts] == list(range(1, 7))
        assert shifts[0].l2_difference == 0.0
        assert all(math.isfinite(s.l2_difference) and s.l2_difference >= 0 for s in shifts)
        assert any(s.l2_difference > 0 for s in shifts[1:])


def test_bad_arguments():
    problem = make_problem(dim=2, samples=3)
    with pytest.raises(ValueError, match="lr must be"):
        train_deep_linear(problem, lr=0.0, steps=1)
    with pytest.raises(ValueError, match="reduction"):
        closed_form_gradients([np.eye(2)], problem.inputs, problem.target, "max")
    with pytest.raises(ValueError, match="dim must be"):
        make_problem(dim=0)
