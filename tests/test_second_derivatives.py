"""Second derivatives through every batch-norm backend are exact, or raise: never silently zero.

Hessians, Hessian-vector products and gradient penalties differentiate a backward pass. A
hand-written backward that autograd cannot see through gives zeros there; these tests compare
each backend with PyTorch's native kernel (twice differentiable by autograd) in float64, and the
Triton kernels (under the interpreter on the CPU) in float32.
"""

from __future__ import annotations

import pytest
import torch

import batchnorm.functional as bf
from batchnorm.nn import BatchNorm1d, BatchNorm2d


def _cubic_loss(layer):
    return lambda x: (layer(x) ** 3).sum()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_hessian_of_the_explicit_backend_equals_torch(training: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64)
    ours = BatchNorm1d(3, backend="explicit").double().train(training)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
        ours.running_var.fill_(2.0)
        ours.running_mean.fill_(0.3)
    native = torch.nn.BatchNorm1d(3).double().train(training)
    native.load_state_dict(ours.state_dict())
    h_ours = torch.autograd.functional.hessian(_cubic_loss(ours), x)
    h_native = torch.autograd.functional.hessian(_cubic_loss(native), x)
    assert h_native.abs().max() > 0.1  # the comparison is not between two zeros
    torch.testing.assert_close(h_ours, h_native, rtol=1e-9, atol=1e-9)


def test_hvp_and_gradgradcheck_of_the_explicit_backend() -> None:
    torch.manual_seed(1)
    x = torch.randn(5, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return bf.batch_norm(x, None, None, w, b, training=True, backend="explicit")

    assert torch.autograd.gradgradcheck(f, (x, w, b))
    v = torch.randn_like(x)
    loss = lambda x: (f(x, w, b) ** 3).sum()  # noqa: E731
    loss_native = lambda x: (  # noqa: E731
        torch.nn.functional.batch_norm(x, None, None, w, b, True) ** 3
    ).sum()
    _, hvp = torch.autograd.functional.hvp(loss, x.detach(), v)
    _, hvp_native = torch.autograd.functional.hvp(loss_native, x.detach(), v)
    assert hvp_native.abs().max() > 1e-3
    torch.testing.assert_close(hvp, hvp_native, rtol=1e-9, atol=1e-9)


def test_gradient_penalty_through_a_layer_matches_torch() -> None:
    """WGAN-GP style: the gradient of ||dD/dx|| with respect to the parameters."""
    torch.manual_seed(2)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    grads = []
    for layer in (BatchNorm2d(3, backend="explicit"), torch.nn.BatchNorm2d(3)):
        torch.manual_seed(3)
        conv = torch.nn.Conv2d(3, 3, 3).double()
        layer = layer.double()
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
        out = (torch.tanh(conv(layer(x)))).sum()
        (gx,) = torch.autograd.grad(out, x, create_graph=True)
        penalty = (gx.flatten(1).norm(dim=1) - 1).square().mean()
        grads.append(torch.autograd.grad(penalty, [layer.weight, layer.bias, *conv.parameters()]))
    for ours, native in zip(*grads):
        torch.testing.assert_close(ours, native, rtol=1e-8, atol=1e-10)
    assert grads[1][0].abs().max() > 0


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_second_derivatives_of_the_triton_kernels(device: str, training: bool) -> None:
    torch.manual_seed(4)
    x = torch.randn(6, 3, device=device, requires_grad=True)
    w = torch.rand(3, device=device, requires_grad=True)
    b = torch.randn(3, device=device, requires_grad=True)
    rm, rv = torch.zeros(3, device=device), torch.full((3,), 2.0, device=device)
    results = []
    for backend in ("triton", "torch"):
        y = bf.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training, backend=backend)
        gx, gw = torch.autograd.grad((y**3).sum(), (x, w), create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum() + gw.sum(), (x, w, b)))
    for ours, native in zip(*results):
        assert native.abs().max() > 1e-2
        torch.testing.assert_close(ours, native, rtol=1e-4, atol=1e-4)


def test_fused_triton_kernels_raise_on_a_second_derivative(device: str) -> None:
    x = torch.randn(6, 3, device=device, requires_grad=True)
    y = bf.batch_norm_relu(x, None, None, training=True, backend="triton")
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad((y * y).sum(), x, create_graph=True)
