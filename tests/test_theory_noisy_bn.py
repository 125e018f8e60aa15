"""The noisy-BN noise injection (Santurkar et al. Sec. 2.1): its statistics, measured.

Each check compares the empirical distribution of the recorded draws with the paper's recipe
(uniform means and scales per unit, uniform / Gaussian jitter per sample), and the backward pass
with the elementwise product by s.
"""

from __future__ import annotations

import math

import pytest
import torch

from batchnorm.lab.theory.noisy_bn import BatchNormNoise, noisy_batch_norm
from batchnorm.nn import BatchNorm1d, BatchNorm2d
from tests.helpers import assert_close

DT = torch.float64


def _noise(channels: int, seed: int = 0, **kw) -> BatchNormNoise:
    return BatchNormNoise(
        channels, generator=torch.Generator().manual_seed(seed), record=True, **kw
    )


def test_noise_statistics_fully_connected():
    units, samples = 2000, 400
    noise = _noise(units)
    a = torch.randn(samples, units, dtype=DT)
    out = noise(a)
    s, m = noise.last_scale, noise.last_shift
    assert_close(out, a * s + m, rtol=0, atol=0, name="s * a + m")

    # Per unit: mu_j = mean over samples of m (+- 0.1/sqrt(3 * 400) noise); U(-0.5, 0.5) across j.
    mu_hat = m.mean(0)
    assert mu_hat.min() > -0.52 and mu_hat.max() < 0.52
    assert abs(float(mu_hat.mean())) < 0.03
    assert float(mu_hat.var()) == pytest.approx(1 / 12, rel=0.1)
    # Within a unit: m_ij - mu_j ~ U(-0.1, 0.1): bounded, variance 0.01/3.
    jitter = m - mu_hat
    assert float(jitter.abs().max()) < 0.1 + 0.02
    assert float(jitter.var()) == pytest.approx(0.01 / 3, rel=0.05)

    # Scales: sigma_j ~ U(1, 1.25) across units; s_ij ~ N(sigma_j, 0.1^2) within a unit.
    sigma_hat = s.mean(0)
    assert sigma_hat.min() > 1 - 0.02 and sigma_hat.max() < 1.25 + 0.02
    assert float(sigma_hat.mean()) == pytest.approx(1.125, abs=0.01)
    assert float(sigma_hat.var()) == pytest.approx(0.25**2 / 12, rel=0.15)
    z = (s - sigma_hat) / 0.1
    assert float(z.std()) == pytest.approx(1.0, abs=0.02)
    within_one = float((z.abs() < 1).double().mean())
    assert within_one == pytest.approx(math.erf(1 / math.sqrt(2)), abs=0.01)  # 0.6827: Gaussian
    assert float((z**4).mean()) == pytest.approx(3.0, abs=0.1)  # kurtosis of a Gaussian


def test_conv_treats_spatial_positions_as_samples():
    noise = _noise(40, seed=1)
    a = torch.zeros(16, 40, 5, 5, dtype=DT)
    out = noise(a)
    assert out.shape == a.shape
    per_channel = out.transpose(0, 1).reshape(40, -1)  # (C, N*H*W): m over all positions
    spread = per_channel.max(1).values - per_channel.min(1).values
    # One mu_j per channel, shared by every (n, h, w), and jitter of +-0.1 around it.
    assert float(spread.max()) <= 0.2 and float(spread.min()) > 0.15
    assert float(per_channel.std(1).mean()) == pytest.approx(0.1 / math.sqrt(3), rel=0.1)
    # Positions within one sample get different draws.
    assert float(out[0, 0].std()) > 0.02
    assert float(noise.last_scale[0, 0].std()) > 0.02


def test_backward_multiplies_by_s_and_noise_is_constant():
    noise = _noise(7, seed=2)
    a = torch.randn(9, 7, 3, dtype=DT, requires_grad=True)
    out = noise(a)
    upstream = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, a, upstream)
    assert_close(grad, upstream * noise.last_scale, rtol=0, atol=0, name="backward")
    assert not noise.last_scale.requires_grad and not noise.last_shift.requires_grad


def test_fresh_draw_each_step_reproducible_by_seed_identity_in_eval():
    a = torch.randn(5, 3, dtype=DT)
    first, second = _noise(3, seed=4), _noise(3, seed=4)
    out1, out2 = first(a), first(a)
    assert not torch.equal(out1, out2), "a new draw per call (per step)"
    assert torch.equal(second(a), out1), "same seed, same draws"
    first.eval()
    assert first(a) is a
    assert BatchNormNoise(3)(a).shape == a.shape  # no generator: the global RNG


def test_noisy_batch_norm_layer():
    layer = noisy_batch_norm(6, conv=True, generator=torch.Generator().manual_seed(0), dtype=DT)
    assert isinstance(layer[0], BatchNorm2d)
    assert isinstance(noisy_batch_norm(6)[0], BatchNorm1d)
    x = torch.randn(4, 6, 3, 3, dtype=DT)
    y = layer(x)
    assert y.shape == x.shape
    layer.eval()
    assert_close(layer(x), layer[0](x), rtol=0, atol=0, name="eval: BN only")


def test_bad_input():
    with pytest.raises(ValueError, match="units on axis 1"):
        BatchNormNoise(4)(torch.randn(3, 5))
    with pytest.raises(ValueError, match="positive int"):
        BatchNormNoise(0)
    with pytest.raises(ValueError, match="low <= high"):
        BatchNormNoise(2, scale_range=(2.0, 1.0))
