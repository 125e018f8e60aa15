"""Internal covariate shift (Santurkar et al. Definition 2.1) against hand computations.

Independent computations: (1) G' by an explicit deep copy of the network, a manual SGD update of
the layers below and a fresh backward pass; (2) for a 2-layer linear network, G and G' in
closed form with NumPy.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from batchnorm.lab.theory.covariate_shift import internal_covariate_shift
from batchnorm.nn import BatchNorm1d

DT = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _net(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 5, dtype=DT),
        BatchNorm1d(5, dtype=DT),
        torch.nn.Tanh(),
        torch.nn.Linear(5, 4, dtype=DT),
        BatchNorm1d(4, dtype=DT),
        torch.nn.ReLU(),
        torch.nn.Linear(4, 2, dtype=DT),
    )


def _groups(net):
    return [
        [net[0].weight, net[0].bias, net[1].weight, net[1].bias],
        [net[3].weight, net[3].bias, net[4].weight, net[4].bias],
        [net[6].weight, net[6].bias],
    ]


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def test_matches_explicit_copy_and_manual_update():
    net = _net()
    x = torch.randn(16, 3, dtype=DT)
    y = torch.randn(16, 2, dtype=DT)
    lr = 0.3
    before = {k: v.clone() for k, v in net.state_dict().items()}

    shifts = internal_covariate_shift(
        _groups(net), lambda: ((net(x) - y) ** 2).mean(), lr, module=net
    )

    # By hand: G on a copy, then for each layer i a fresh copy whose layers < i took the step.
    ref = copy.deepcopy(net)
    ref.load_state_dict(before)
    groups = _groups(ref)
    params = [p for g in groups for p in g]
    grads = torch.autograd.grad(((ref(x) - y) ** 2).mean(), params)
    per_group, k = [], 0
    for g in groups:
        per_group.append(grads[k : k + len(g)])
        k += len(g)
    for i in range(3):
        moved = copy.deepcopy(ref)
        mgroups = _groups(moved)
        with torch.no_grad():
            for j in range(i):
                for p, g in zip(mgroups[j], per_group[j]):
                    p -= lr * g
        g_shift = _flat(torch.autograd.grad(((moved(x) - y) ** 2).mean(), mgroups[i]))
        g = _flat(per_group[i])
        diff = float((g - g_shift).norm())
        cos = float(g @ g_shift / (g.norm() * g_shift.norm()))
        assert shifts[i].layer == i + 1
        assert shifts[i].l2_difference == pytest.approx(diff, rel=1e-10, abs=1e-14)
        assert shifts[i].cosine == pytest.approx(cos, rel=1e-12)
        assert shifts[i].grad_norm == pytest.approx(float(g.norm()), rel=1e-12)
    assert shifts[0].l2_difference == 0.0
    assert shifts[1].l2_difference > 0 and shifts[2].l2_difference > 0

    # Nothing changed: parameters, running statistics, counters, and no .grad was written.
    after = net.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert all(p.grad is None for p in net.parameters())


def test_two_layer_linear_network_closed_form():
    rng = np.random.default_rng(0)
    d, h, o, n, lr = 4, 3, 2, 10, 0.05
    w1, w2 = rng.standard_normal((h, d)), rng.standard_normal((o, h))
    X, Y = rng.standard_normal((d, n)), rng.standard_normal((o, n))

    # L = 1/(2n) ||W2 W1 X - Y||_F^2
    R = w2 @ w1 @ X - Y
    g1, g2 = w2.T @ R @ X.T / n, R @ (w1 @ X).T / n
    w1_new = w1 - lr * g1
    g2_shift = (w2 @ w1_new @ X - Y) @ (w1_new @ X).T / n

    W1 = torch.nn.Parameter(torch.tensor(w1))
    W2 = torch.nn.Parameter(torch.tensor(w2))
    Xt, Yt = torch.tensor(X), torch.tensor(Y)
    shifts = internal_covariate_shift(
        [W1, W2], lambda: 0.5 / n * (W2 @ W1 @ Xt - Yt).square().sum(), lr
    )
    expected = np.linalg.norm(g2 - g2_shift)
    assert shifts[1].l2_difference == pytest.approx(expected, rel=1e-12)
    cos = float((g2 * g2_shift).sum() / (np.linalg.norm(g2) * np.linalg.norm(g2_shift)))
    assert shifts[1].cosine == pytest.approx(cos, rel=1e-12)
    assert shifts[0].l2_difference == 0.0 and shifts[0].grad_norm == pytest.approx(
        np.linalg.norm(g1)
    )
    assert torch.equal(W1.detach(), torch.tensor(w1))


def test_bad_arguments():
    w = torch.nn.Parameter(torch.ones(2))
    loss = lambda: (w**2).sum()  # noqa: E731
    with pytest.raises(ValueError, match="lr must be"):
        internal_covariate_shift([w], loss, 0.0)
    with pytest.raises(ValueError, match="non-empty"):
        internal_covariate_shift([], loss, 0.1)
    with pytest.raises(ValueError, match="requires_grad"):
        internal_covariate_shift([torch.ones(2)], loss, 0.1)
