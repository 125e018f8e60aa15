"""Norm-act layers (timm's BatchNormAct2d pattern) keep their activation through every
conversion: to ours and back, frozen and unfrozen (synchronized: tests/test_sync.py)."""

from __future__ import annotations

import pytest
import torch

import batchnorm.nn as bnn
from batchnorm.nn.frozen import FrozenBatchNorm
from tests.helpers import NormActStandIn


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), NormActStandIn(4))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-1, 1)
    return model


X = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def test_convert_keeps_the_activation_and_converts_back() -> None:
    original, converted = _model(), bnn.convert(_model())
    layer = converted[1]
    assert isinstance(layer, bnn.BatchNormAct2d) and isinstance(layer.act, torch.nn.ReLU)
    assert isinstance(layer, torch.nn.BatchNorm2d)
    for mode in (True, False):
        original.train(mode), converted.train(mode)
        y_orig, y_conv = original(X), converted(X)
        assert (y_conv >= 0).all() and (y_conv == 0).any()  # the ReLU runs
        torch.testing.assert_close(y_conv, y_orig, rtol=0, atol=0)
    torch.testing.assert_close(converted.state_dict(), original.state_dict(), rtol=0, atol=0)
    back = bnn.convert(converted, to="torch")
    assert type(back[1]) is NormActStandIn and back[1].act is layer.act


def test_sync_conversion_of_a_norm_act_layer_outside_distributed_training() -> None:
    original, synced = _model(), bnn.convert_sync_batchnorm(_model())
    assert type(synced[1]).__name__ == "SyncBatchNormAct"
    torch.testing.assert_close(synced(X), original(X), rtol=0, atol=0)
    assert type(bnn.revert_sync_batchnorm(synced)[1]) is NormActStandIn


def test_frozen_conversion_keeps_the_activation_and_unfreezes() -> None:
    original = _model().eval()
    frozen = FrozenBatchNorm.convert_frozen_batchnorm(_model())
    assert isinstance(frozen[1], bnn.FrozenBatchNormAct)
    frozen.train()  # stays frozen
    expected = original(X)
    assert (expected == 0).any()
    torch.testing.assert_close(frozen(X), expected, rtol=1e-6, atol=1e-6)
    thawed = bnn.unfreeze_batchnorm(frozen)
    assert type(thawed[1]) is NormActStandIn and thawed[1].momentum == 0.1
    assert thawed[1].weight.requires_grad
    torch.testing.assert_close(thawed.eval()(X), expected, rtol=0, atol=0)


def test_unfreeze_of_a_directly_built_frozen_layer_gives_trainable_batch_norm() -> None:
    frozen = FrozenBatchNorm(3)
    with torch.no_grad():
        frozen.running_mean.fill_(0.5)
    thawed = bnn.unfreeze_batchnorm(torch.nn.Sequential(frozen))[0]
    assert isinstance(thawed, torch.nn.modules.batchnorm._BatchNorm)
    assert thawed.weight.requires_grad and torch.equal(thawed.running_mean, torch.full((3,), 0.5))
    x = torch.randn(4, 3, 2)
    torch.testing.assert_close(thawed.eval()(x), frozen(x), rtol=1e-6, atol=1e-6)


def test_frozen_conversion_leaves_a_subclass_with_its_own_forward_with_a_warning() -> None:
    import pytest

    class Doubling(torch.nn.BatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x)

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), Doubling(4), torch.nn.BatchNorm2d(4))
    with pytest.warns(UserWarning, match="left these batch-norm subclasses unfrozen"):
        frozen = FrozenBatchNorm.convert_frozen_batchnorm(model)
    assert type(frozen[1]) is Doubling and isinstance(frozen[2], FrozenBatchNorm)


def test_norm_act_layers_build_directly_with_timms_options() -> None:
    """Built directly (not by conversion), a norm-act layer takes timm's BatchNormAct2d options:
    ReLU by default (in place), a name, a class with act_kwargs, an instance, no activation, a
    drop layer; the forward is act(drop(bn(x)))."""
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    layer = bnn.BatchNormAct2d(3)
    assert isinstance(layer.act, torch.nn.ReLU) and layer.act.inplace
    assert isinstance(layer.drop, torch.nn.Identity)
    plain = bnn.BatchNorm2d(3)
    torch.testing.assert_close(layer(x), torch.relu(plain(x)), rtol=0, atol=0)
    assert isinstance(bnn.BatchNormAct2d(3, act_layer="silu").act, torch.nn.SiLU)
    leaky = bnn.BatchNormAct1d(3, act_layer=torch.nn.LeakyReLU, act_kwargs={"negative_slope": 0.2})
    assert leaky.act.negative_slope == 0.2 and leaky.act.inplace
    assert not bnn.BatchNormAct2d(3, inplace=False).act.inplace
    gelu = torch.nn.GELU()
    assert bnn.BatchNormAct3d(3, act_layer=gelu).act is gelu
    assert isinstance(bnn.BatchNormAct2d(3, apply_act=False).act, torch.nn.Identity)
    assert isinstance(bnn.BatchNormAct2d(3, act_layer=None).act, torch.nn.Identity)
    dropped = bnn.BatchNormAct2d(3, drop_layer=torch.nn.Dropout).train()
    assert isinstance(dropped.drop, torch.nn.Dropout)
    layer = bnn.BatchNormAct2d(3, eps=1e-3, momentum=0.2, backend="torch")
    assert (layer.eps, layer.momentum, layer.backend) == (1e-3, 0.2, "torch")
    assert sorted(layer.state_dict()) == sorted(bnn.BatchNorm2d(3).state_dict())
    frozen = bnn.FrozenBatchNormAct(3, act_layer="relu6")
    assert isinstance(frozen.act, torch.nn.ReLU6)
    torch.testing.assert_close(frozen(x), torch.nn.functional.relu6(bnn.FrozenBatchNorm(3)(x)))
    synced = bnn.SyncBatchNormAct(3, act_layer="tanh")
    torch.testing.assert_close(synced(x), torch.tanh(bnn.SyncBatchNorm(3)(x)), rtol=0, atol=0)


def test_norm_act_layers_reject_an_unknown_activation_clearly() -> None:
    with pytest.raises(ValueError, match="unknown activation 'swishy'.*relu"):
        bnn.BatchNormAct2d(3, act_layer="swishy")
    with pytest.raises(TypeError, match="act_layer must be"):
        bnn.BatchNormAct2d(3, act_layer=3)
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        bnn.BatchNormAct2d(3, act_layer=lambda: torch.relu)


def test_unfreezing_a_norm_act_layer_built_frozen_keeps_its_activation() -> None:
    """A FrozenBatchNormAct built directly (no original to go back to) unfreezes into a batch
    norm for any rank that still runs its act and drop, with the frozen values."""
    frozen = bnn.FrozenBatchNormAct(3, act_layer="relu6")
    with torch.no_grad():
        frozen.running_mean.uniform_(-1, 1)
        frozen.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(3))
    expected = frozen(x)
    back = bnn.unfreeze_batchnorm(frozen)
    assert isinstance(back, torch.nn.modules.batchnorm._BatchNorm) and back.act is frozen.act
    torch.testing.assert_close(back.eval()(x), expected, rtol=1e-6, atol=1e-6)
    assert back.train()(x).min() >= 0  # ReLU6 runs in training too
