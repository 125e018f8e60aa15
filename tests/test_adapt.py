"""batchnorm.adapt: AdaBN and TENT against hand computations on a tiny model; reset()."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import batchnorm.nn as bnn
from batchnorm.adapt import AdaBN, Tent, adabn, softmax_entropy, tent
from tests.helpers import assert_close


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small models: one thread is fastest, and the machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(norm: type = nn.BatchNorm1d) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), norm(3)).double()
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([1.5, 0.7, -1.1]))
        net[1].bias.copy_(torch.tensor([0.2, -0.3, 0.1]))
        net[1].running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        net[1].running_var.copy_(torch.tensor([2.0, 0.5, 3.0]))
    return net.eval()


def _target(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64) * 1.5 + 0.7


def _snapshot(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_state(model: nn.Module, state: dict) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_adabn_is_the_population_statistics_of_the_target_data():
    net = _tiny()
    before = _snapshot(net)
    batches = [_target(6, 1), _target(3, 2)]
    adapter = adabn(net, batches, progress=False)
    # By hand: the Linear's outputs over all 9 target samples, count-weighted (Algorithm 2).
    with torch.no_grad():
        h = [net[0](x) for x in batches]
    pooled = torch.cat(h)
    mean = pooled.mean(0)
    var = sum(len(b) * b.var(0, correction=0) for b in h) / sum(len(b) - 1 for b in h)
    assert_close(net[1].running_mean, mean, rtol=1e-12, atol=1e-12, name="mean")
    assert_close(net[1].running_var, var, rtol=1e-12, atol=1e-12, name="var")
    assert adapter.report is not None and adapter.report.num_batches == 2
    assert not net.training
    adapter.reset()
    _assert_state(net, before)


def _tent_by_hand(net: nn.Sequential, xs: list[torch.Tensor], lr: float) -> tuple:
    """TENT with the batch-norm transform and Adam written out (float64)."""
    gamma = net[1].weight.detach().clone().requires_grad_()
    beta = net[1].bias.detach().clone().requires_grad_()
    eps = net[1].eps
    m = [torch.zeros(3, dtype=torch.float64) for _ in range(2)]
    v = [torch.zeros(3, dtype=torch.float64) for _ in range(2)]
    outputs = []
    for t, x in enumerate(xs, start=1):
        h = net[0](x).detach()
        mu = h.mean(0)
        var = ((h - mu) ** 2).mean(0)  # biased: the batch statistics of training mode
        z = gamma * (h - mu) / torch.sqrt(var + eps) + beta
        p = torch.exp(z) / torch.exp(z).sum(1, keepdim=True)
        loss = -(p * torch.log(p)).sum(1).mean()
        grads = torch.autograd.grad(loss, (gamma, beta))
        outputs.append(z.detach())
        with torch.no_grad():
            for i, (param, g) in enumerate(zip((gamma, beta), grads)):
                m[i] = 0.9 * m[i] + 0.1 * g
                v[i] = 0.999 * v[i] + 0.001 * g * g
                m_hat, v_hat = m[i] / (1 - 0.9**t), v[i] / (1 - 0.999**t)
                param -= lr * m_hat / (torch.sqrt(v_hat) + 1e-8)
    return gamma.detach(), beta.detach(), outputs


@pytest.mark.parametrize("norm", (nn.BatchNorm1d, bnn.BatchNorm1d))
def test_tent_equals_entropy_minimisation_by_hand(norm):
    net = _tiny(norm)
    before = _snapshot(net)
    xs = [_target(8, 3), _target(8, 4), _target(5, 5)]
    gamma, beta, expected_outputs = _tent_by_hand(copy.deepcopy(net), xs, lr=1e-2)
    adapter = Tent(net, lr=1e-2)
    outputs = adapter.adapt(xs)
    for got, want in zip(outputs, expected_outputs):
        assert_close(got, want, rtol=1e-10, atol=1e-10, name="outputs (before each update)")
    assert_close(net[1].weight, gamma, rtol=1e-10, atol=1e-12, name="gamma")
    assert_close(net[1].bias, beta, rtol=1e-10, atol=1e-12, name="beta")
    # Only gamma and beta move; the moving averages and the Linear stay; modes are restored.
    assert torch.equal(net[0].weight, before["0.weight"])
    assert torch.equal(net[1].running_mean, before["1.running_mean"])
    assert torch.equal(net[1].running_var, before["1.running_var"])
    assert int(net[1].num_batches_tracked) == 0
    assert not net.training and all(p.requires_grad for p in net.parameters())
    adapter.reset()
    _assert_state(net, before)
    # After reset the same stream gives the same result (the optimizer state is fresh too).
    again = adapter.adapt(xs)
    assert_close(again[-1], expected_outputs[-1], rtol=1e-10, atol=1e-10, name="after reset")


def test_tent_with_sgd_and_several_steps():
    net = _tiny()
    x = _target(8, 6)
    gamma = net[1].weight.detach().clone().requires_grad_()
    h = net[0](x).detach()
    z = gamma * (h - h.mean(0)) / torch.sqrt(h.var(0, correction=0) + 1e-5) + net[1].bias
    (g,) = torch.autograd.grad(softmax_entropy(z).mean(), gamma)
    Tent(net, optimizer="sgd", lr=0.1)(x)
    assert_close(net[1].weight, gamma.detach() - 0.1 * g, rtol=1e-10, atol=1e-12, name="sgd")
    losses = Tent(_tiny(), lr=1e-2, steps=5)
    losses(x)
    assert len(losses.losses) == 5 and losses.losses[-1] < losses.losses[0]


def test_one_call_forms_and_bad_arguments():
    net = _tiny()
    adapter = tent(net, [(_target(8, 1), None), _target(8, 2)])
    assert len(adapter.outputs) == 2 and adapter.outputs[0].shape == (8, 3)
    with pytest.raises(ValueError, match="optimizer"):
        Tent(net, optimizer="rmsprop")
    with pytest.raises(ValueError, match="steps"):
        Tent(net, steps=0)
    with pytest.raises(ValueError, match="no batch-norm layer with affine"):
        Tent(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, affine=False)))
    frozen = nn.Sequential(nn.Linear(2, 2), bnn.FrozenBatchNorm(2))
    with pytest.raises(ValueError, match="no batch-norm layer"):
        Tent(frozen)
    assert isinstance(AdaBN(net), AdaBN)
