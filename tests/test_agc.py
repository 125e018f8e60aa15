"""Adaptive Gradient Clipping against the NFNets formula, computed independently in NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchnorm.optim import AGC, adaptive_clip_grad_
from tests.helpers import assert_close


def _expected(weight: np.ndarray, grad: np.ndarray, clipping: float, eps: float) -> np.ndarray:
    """Per unit i: if ||G_i|| / max(||W_i||, eps) > lambda, G_i *= lambda max(||W_i||, eps)/||G_i||.

    Units are rows along axis 0 for 2+ dimensional tensors; a vector or scalar is one unit.
    """
    out = grad.astype(np.float64).copy()
    units = [...] if weight.ndim <= 1 else [i for i in range(weight.shape[0])]
    for unit in units:
        w_norm = max(float(np.sqrt(np.sum(weight[unit].astype(np.float64) ** 2))), eps)
        g_norm = float(np.sqrt(np.sum(out[unit] ** 2)))
        if g_norm / w_norm > clipping:
            out[unit] = out[unit] * (clipping * w_norm / g_norm)
    return out


def _param(shape, seed, scale=1.0, grad_scale=1.0, zero_rows=()):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape) * scale
    for r in zero_rows:
        w[r] = 0.0
    p = torch.nn.Parameter(torch.tensor(w))
    # Unit gradient sizes spread over three orders of magnitude: some clip, some do not.
    g = rng.standard_normal(shape) * grad_scale
    if len(shape) >= 2:
        g *= np.logspace(-4, -1, shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))
    p.grad = torch.tensor(g)
    return p


@pytest.mark.parametrize(
    "shape,kwargs",
    [
        ((16, 8), {}),  # Linear (out, in)
        ((6, 3, 3, 3), {}),  # Conv2d (out, in, kh, kw)
        ((5, 4), {"zero_rows": (0, 3)}),  # zero-initialized units: the eps floor
        ((12,), {"grad_scale": 0.01}),  # a bias: one unit
        ((12,), {"grad_scale": 1e-5}),  # ... small enough not to clip
        ((), {}),  # a scalar gain
    ],
)
@pytest.mark.parametrize("clipping", [0.01, 0.16])
def test_matches_the_formula(shape, kwargs, clipping):
    p = _param(shape, seed=len(shape), **kwargs)
    w, g = p.detach().numpy().copy(), p.grad.numpy().copy()
    expected = _expected(w, g, clipping, eps=1e-3)
    adaptive_clip_grad_([p], clipping=clipping, eps=1e-3)
    # reshape(-1): the shared assert_close does not take 0-d arrays
    assert_close(p.grad.reshape(-1), expected.reshape(-1), rtol=1e-12, atol=1e-15, name="grad")
    if len(shape) >= 2 and clipping == 0.01:
        changed = ~np.isclose(expected, g).all(axis=tuple(range(1, len(shape))))
        assert changed.any() and not changed.all(), "the case should clip some units, not all"


def test_agc_wrapper_equals_clip_then_step_and_excludes_the_classifier():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    twin.load_state_dict(model.state_dict())
    x = torch.randn(32, 6) * 50  # large inputs: large gradients, so clipping happens
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.5, momentum=0.9)
    agc = AGC(opt, clipping=0.01, exclude=[model[2]])
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1)  # the optimizer stays one
    for _ in range(2):
        model(x).pow(2).mean().backward()
        twin(x).pow(2).mean().backward()
        classifier_grad = model[2].weight.grad.clone()
        first_grad = model[0].weight.grad.clone()
        agc.step()
        adaptive_clip_grad_(list(twin[0].parameters()), clipping=0.01)
        twin_opt.step()
        assert torch.equal(model[2].weight.grad, classifier_grad)  # excluded: untouched
        assert not torch.equal(model[0].weight.grad, first_grad)  # clipped
        agc.zero_grad()
        twin_opt.zero_grad()
        scheduler.step()
        for g in twin_opt.param_groups:
            g["lr"] = opt.param_groups[0]["lr"]
    for a, b in zip(model.parameters(), twin.parameters()):
        assert_close(a, b, rtol=1e-6, atol=1e-7, name="parameters after two steps")
    agc.remove()
    model(x).pow(2).mean().backward()
    grad = model[0].weight.grad.clone()
    opt.step()
    assert torch.equal(model[0].weight.grad, grad)  # detached: no clipping any more


def test_errors_say_what_to_do():
    p = torch.nn.Parameter(torch.ones(3, 3))
    p.grad = torch.ones(3, 3)
    with pytest.raises(ValueError, match="clipping"):
        adaptive_clip_grad_([p], clipping=0.0)
    with pytest.raises(ValueError, match="eps"):
        adaptive_clip_grad_([p], eps=-1.0)
    opt = torch.optim.SGD([p], lr=0.1)
    with pytest.raises(TypeError, match="parameters or modules"):
        AGC(opt, exclude=["fc"])
    AGC(opt)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step(lambda: torch.tensor(0.0))
