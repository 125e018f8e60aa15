"""Real model definitions from other projects, converted to our layers and walked by torch's tools.

EfficientNet-B0 (``efficientnet_pytorch``: its own same-padding convolutions and a custom
autograd Swish) and MONAI's DenseNet121, ResNet-18 and a batch-norm UNet: pure PyTorch model
code that installs from PyPI without replacing the pinned CPU torch (``pip install
'.[test]'``). torchvision and timm need a CUDA-free torchvision build, which PyPI does not serve
for Linux; their norm-act layer is covered by a faithful stand-in in tests/test_norm_act.py.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import batchnorm.nn as bnn
from batchnorm.inference import fold, recalibrate

efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch")
monai_nets = pytest.importorskip("monai.networks.nets")


def _efficientnet():
    return efficientnet_pytorch.EfficientNet.from_name("efficientnet-b0", num_classes=10)


def _densenet():
    return monai_nets.DenseNet121(spatial_dims=2, in_channels=3, out_channels=5)


def _resnet():
    return monai_nets.resnet18(spatial_dims=2, n_input_channels=3, num_classes=5)


def _unet():
    return monai_nets.UNet(
        spatial_dims=2, in_channels=3, out_channels=2, channels=(8, 16, 32), strides=(2, 2),
        norm="batch",
    )  # fmt: skip


MODELS = {"efficientnet-b0": _efficientnet, "densenet121": _densenet, "resnet18": _resnet,
          "unet": _unet}  # fmt: skip


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MODELS[name]()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # statistics away from 0/1, so eval mode is a real test
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model


def _input(name: str) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def _bn_count(model: torch.nn.Module, cls: type) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


@pytest.fixture(params=list(MODELS))
def name(request) -> str:
    return request.param


def test_converted_model_is_bit_identical_in_training_and_eval(name: str) -> None:
    original, converted = _build(name), bnn.convert(_build(name))
    assert _bn_count(converted, bnn.BatchNorm2d) == _bn_count(original, torch.nn.BatchNorm2d) > 0
    x = _input(name)
    for model in (original, converted):
        model.train()
    torch.manual_seed(3)  # the same dropout / drop-connect masks for both
    y_o = original(x)
    torch.manual_seed(3)
    y_c = converted(x)
    torch.testing.assert_close(y_c, y_o, rtol=0, atol=0)
    g_o = torch.autograd.grad(y_o.square().sum(), list(original.parameters()))
    g_c = torch.autograd.grad(y_c.square().sum(), list(converted.parameters()))
    for a, b in zip(g_c, g_o):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(converted.state_dict(), original.state_dict(), rtol=0, atol=0)
    original.eval(), converted.eval()
    torch.testing.assert_close(converted(x), original(x), rtol=0, atol=0)
    back = bnn.convert(converted, to="torch")
    assert _bn_count(back, bnn.BatchNorm2d) == 0


def test_fx_trace_works_on_the_converted_model_as_on_the_original(name: str) -> None:
    original, converted = _build(name).eval(), bnn.convert(_build(name)).eval()
    try:
        traced_original = torch.fx.symbolic_trace(original)
    except Exception as error:  # noqa: BLE001 - then the converted model may fail alike
        with pytest.raises(type(error)):
            torch.fx.symbolic_trace(converted)
        return
    traced = torch.fx.symbolic_trace(converted)
    ops = lambda g: [(n.op, str(n.target)) for n in g.graph.nodes]  # noqa: E731
    assert ops(traced) == ops(traced_original)
    torch.testing.assert_close(traced(_input(name)), original(_input(name)), rtol=0, atol=0)


def test_sync_and_frozen_conversions_outside_distributed_training(name: str) -> None:
    x = _input(name)
    reference = _build(name).eval()(x)
    synced = bnn.convert_sync_batchnorm(bnn.convert(_build(name))).eval()
    assert _bn_count(synced, bnn.SyncBatchNorm) > 0
    torch.testing.assert_close(synced(x), reference, rtol=0, atol=0)
    frozen = bnn.FrozenBatchNorm.convert_frozen_batchnorm(bnn.convert(_build(name))).train()
    layers = [m for m in frozen.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert layers and all(isinstance(m, bnn.FrozenBatchNorm) and not m.training for m in layers)
    # eval for the comparison: the models' dropout would draw masks in training mode
    torch.testing.assert_close(frozen.eval()(x), reference, rtol=1e-4, atol=1e-5)


def test_fold_has_no_false_alarm_and_matches(name: str) -> None:
    model = bnn.convert(_build(name))
    x = _input(name)
    folded, report = fold(model, check_input=x, return_report=True)
    # EfficientNet's same-padding convolutions override forward: refused, with that reason.
    assert report.folded or all("overrides forward" in r for r in report.not_folded.values())
    assert report.folded or name == "efficientnet-b0", report
    with torch.no_grad():
        reference = model.eval()(x)
        scale = float(reference.abs().max())
        assert float((folded(x) - reference).abs().max()) <= 1e-3 * scale + 1e-4


def test_recalibrate_gives_the_same_statistics_on_ours_and_torchs(name: str) -> None:
    batches = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(s))
               for s in range(3)]  # fmt: skip
    original, converted = _build(name), bnn.convert(_build(name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(3)  # the same dropout masks in training mode
        recalibrate(original, batches, progress=False)
        torch.manual_seed(3)
        recalibrate(converted, batches, progress=False)
    torch.testing.assert_close(converted.state_dict(), original.state_dict(), rtol=0, atol=0)


def test_deepcopy_and_pickle_a_converted_model(name: str, tmp_path) -> None:
    converted = bnn.convert(_build(name)).eval()
    x = _input(name)
    clone = copy.deepcopy(converted)
    torch.save(converted, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    for other in (clone, loaded):
        torch.testing.assert_close(other(x), converted(x), rtol=0, atol=0)
        assert _bn_count(other, bnn.BatchNorm2d) == _bn_count(converted, bnn.BatchNorm2d)
