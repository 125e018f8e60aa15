"""The layers' fast path: a call whose signature passed every check before skips the checks and
the backend dispatch. It must give exactly what the full path gives, and any change that could
change a check's answer must send the call through the full path again."""

from __future__ import annotations

import pytest
import torch

import batchnorm.backends as backends
from batchnorm.nn import BatchNorm1d, BatchNorm2d


@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "no-track"])
def test_repeated_calls_equal_torch_nn_bit_for_bit(momentum, track) -> None:
    ours = BatchNorm2d(3, momentum=momentum, track_running_stats=track)
    native = torch.nn.BatchNorm2d(3, momentum=momentum, track_running_stats=track)
    gen = torch.Generator().manual_seed(0)
    for step in range(5):
        mode = step != 3  # one eval call in between
        ours.train(mode), native.train(mode)
        x = torch.randn(4, 3, 5, 5, generator=gen) * 2 + 1
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ours(x1), native(x2)
        torch.testing.assert_close(y1, y2, rtol=0, atol=0)
        y1.square().sum().backward()
        y2.square().sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)
        torch.testing.assert_close(ours.state_dict(), native.state_dict(), rtol=0, atol=0)
    assert "_validated" in ours.__dict__ and ours.last_backend == "torch"


def test_a_buffer_edit_between_forward_and_backward_still_works() -> None:
    bn = BatchNorm1d(3)
    bn(torch.randn(8, 3))  # the signature is now validated
    x = torch.randn(8, 3, requires_grad=True)
    y = bn(x) + bn(x)  # the second forward updates the buffers the first one used (pytorch#22095)
    y.sum().backward()
    assert x.grad is not None


def test_every_change_that_could_alter_a_check_goes_through_the_checks_again(monkeypatch) -> None:
    bn = BatchNorm1d(3)
    bn(torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="channels on axis 1"):
        bn(torch.randn(4, 5))  # another shape: checked
    with pytest.raises(ValueError, match="one value per channel"):
        bn(torch.randn(1, 3))
    with pytest.raises(TypeError, match="mixed dtypes"):
        bn(torch.randn(4, 3, dtype=torch.float64))
    bn.eps = 0.0  # now the explicit backend (torch's kernel refuses eps=0 in training)
    bn(torch.randn(4, 3))
    assert bn.last_backend == "explicit"
    bn.eps = 1e-5
    monkeypatch.setenv(backends.ENV_VAR, "explicit")
    bn(torch.randn(4, 3))
    assert bn.last_backend == "explicit"
    monkeypatch.delenv(backends.ENV_VAR)
    with backends.use_backend("explicit"):
        bn(torch.randn(4, 3))
    assert bn.last_backend == "explicit"
    bn(torch.randn(4, 3))
    assert bn.last_backend == "torch"
    bn.double()  # parameters change dtype in place (module.to keeps the Parameter objects)
    with pytest.raises(TypeError, match="mixed dtypes"):
        bn(torch.randn(4, 3))
    assert bn(torch.randn(4, 3, dtype=torch.float64)).dtype == torch.float64


def test_nonfinite_policies_never_take_the_fast_path() -> None:
    bn = BatchNorm1d(3, nonfinite="raise")
    bn(torch.randn(4, 3))
    bad = torch.randn(4, 3)
    bad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        bn(bad)
    assert "_validated" not in bn.__dict__
