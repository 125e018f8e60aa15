"""PyTorch's kernels behind our layers, on tensors whose layout a dimension of one value makes
ambiguous.

A stride on a dimension of one value addresses nothing, so an (N, C, L, 1) tensor can be dense
in both the contiguous and the channels-last format with strides standard in neither (e.g.
``seq.transpose(1, 2).unsqueeze(3)`` of (N, L, C) features). PyTorch's CPU batch-norm backward
returns wrong dx and dgamma, silently, when x and dy then disagree in format, and its instance
norm does with a channels-last dy on a batch of one. Our "torch"/"auto" backends hand these
kernels x and dy in one standard layout; every backend must give float64's gradients here.
"""

from __future__ import annotations

import pytest
import torch

from batchnorm.functional import batch_norm, instance_norm
from batchnorm.nn import BatchNorm2d, BatchNorm3d, GhostBatchNorm, InstanceNorm2d

N, L, C = 4, 7, 16


def _features(dtype=torch.float32) -> torch.Tensor:
    return torch.randn(N, L, C, generator=torch.Generator().manual_seed(0)).to(dtype)


def _cl_odd(t: torch.Tensor) -> torch.Tensor:
    """(N, L, C) features as an (N, C, L, 1) image: channels-last strides, the last dimension's
    stride 1 (standard would be C)."""
    return t.transpose(1, 2).unsqueeze(3)


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2).contiguous().unsqueeze(3)


LAYOUTS = {"channels-last odd": _cl_odd, "contiguous": _contiguous}


def _grad_out(like: torch.Tensor, layout: str) -> torch.Tensor:
    """A fixed dy shaped like ``like``, in the layout named."""
    g = torch.linspace(-1, 1, like.numel(), dtype=torch.float64).reshape(N, L, C).sin()
    return LAYOUTS[layout](g).to(like.dtype)


def _grads(make_layer, x: torch.Tensor, dy: torch.Tensor, calls: int = 2):
    """dx, dgamma, dbeta of ``calls`` consecutive calls of one layer (the second one takes the
    layer's fast path)."""
    layer = make_layer().to(x.dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, C))
        layer.bias.copy_(torch.linspace(-1, 1, C))
    out = []
    for _ in range(calls):
        xx = x.detach().requires_grad_(True)
        y = layer(xx)
        out.append(torch.autograd.grad(y, (xx, layer.weight, layer.bias), dy))
    return out


def _close(found, expected) -> None:
    for f, e in zip(found, expected):
        torch.testing.assert_close(f.double(), e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [None, "torch", "cpu", "explicit"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("x_layout", list(LAYOUTS))
@pytest.mark.parametrize("dy_layout", list(LAYOUTS))
def test_batch_norm_gradients_on_ambiguous_layouts(backend, training, x_layout, dy_layout):
    if x_layout == dy_layout == "contiguous":
        pytest.skip("no ambiguity: covered by the shape catalogue")

    def make(dtype_backend=backend):
        layer = BatchNorm2d(C, backend=dtype_backend)
        return layer.train(training)

    x = LAYOUTS[x_layout](_features())
    dy = _grad_out(x, dy_layout)
    expected = _grads(lambda: make("torch"), _contiguous(_features(torch.float64)), dy.double(), 1)
    for found in _grads(make, x, dy):
        _close(found, expected[0])


def test_batch_norm_3d_gradients_on_an_ambiguous_layout():
    # (N, C, D, H, 1) stored channels-last with the last dimension's stride 1.
    x64 = torch.randn(
        3, 8, 2, 5, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    odd = x64.float().permute(0, 2, 3, 4, 1).contiguous().squeeze(3).permute(0, 3, 1, 2)
    odd = odd.unsqueeze(4)
    assert odd.is_contiguous(memory_format=torch.channels_last_3d) and odd.stride(4) == 1
    dy = torch.linspace(-1, 1, x64.numel(), dtype=torch.float64).reshape(x64.shape).cos()
    results = []
    for x, g in ((odd, dy.float()), (x64, dy)):
        layer = BatchNorm3d(8).to(x.dtype)
        xx = x.detach().requires_grad_(True)
        results.append(torch.autograd.grad(layer(xx), (xx, layer.weight), g))
    _close(*results)


def test_functional_batch_norm_on_an_ambiguous_layout_keeps_the_output_layout():
    x = _cl_odd(_features()).requires_grad_(True)
    dy = _grad_out(x, "contiguous")
    y = batch_norm(x, torch.zeros(C), torch.ones(C), training=True)
    (dx,) = torch.autograd.grad(y, x, dy)
    x64 = _contiguous(_features(torch.float64)).requires_grad_(True)
    (expected,) = torch.autograd.grad(
        torch.nn.functional.batch_norm(x64, None, None, training=True), x64, dy.double()
    )
    torch.testing.assert_close(dx.double(), expected, rtol=1e-5, atol=1e-5)
    # A standard layout with a dimension of one value is passed on as it is: torch's y strides.
    x = torch.randn(1, C, 5, 7).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    ours = batch_norm(x, None, None, training=True)
    theirs = torch.nn.functional.batch_norm(x, None, None, training=True)
    assert ours.stride() == theirs.stride()


def test_second_derivatives_on_an_ambiguous_layout():
    # A gradient penalty through the guarded call: the hook's copy is differentiable.
    def penalty(x, dtype):
        layer = BatchNorm2d(C).to(dtype)
        xx = x.detach().requires_grad_(True)
        y = layer(xx)
        (dx,) = torch.autograd.grad((y * _grad_out(y, "contiguous")).sum(), xx, create_graph=True)
        return torch.autograd.grad(dx.square().sum(), (xx, layer.weight))

    found = penalty(_cl_odd(_features()), torch.float32)
    expected = penalty(_contiguous(_features(torch.float64)), torch.float64)
    for f, e in zip(found, expected):
        torch.testing.assert_close(f.double(), e, rtol=1e-4, atol=1e-4)


def test_ghost_batch_norm_on_an_ambiguous_layout():
    found, expected = (
        _grads(lambda: GhostBatchNorm(C, virtual_batch_size=2), x, _grad_out(x, "contiguous"), 1)[0]
        for x in (_cl_odd(_features()), _contiguous(_features(torch.float64)))
    )
    _close(found, expected)


@pytest.mark.parametrize("backend", [None, "explicit"])
@pytest.mark.parametrize("shape", [(1, C, 5, 7), (1, 4, 3, 4, 5)])
def test_instance_norm_of_one_sample_with_a_channels_last_gradient(backend, shape):
    x64 = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    dy = torch.linspace(-1, 1, x64.numel(), dtype=torch.float64).reshape(shape).sin()
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    weight = torch.linspace(0.5, 1.5, shape[1])
    results = []
    for x, g in ((x64.float(), dy.float().contiguous(memory_format=fmt)), (x64, dy)):
        xx, w = x.detach().requires_grad_(True), weight.to(x.dtype).requires_grad_(True)
        y = instance_norm(xx, weight=w, backend=backend if x.dtype == torch.float32 else "torch")
        results.append(torch.autograd.grad(y, (xx, w), g))
    _close(*results)


def test_instance_norm_layer_of_one_sample_with_a_channels_last_gradient():
    x64 = torch.randn(1, C, 5, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    dy = torch.linspace(-1, 1, x64.numel(), dtype=torch.float64).reshape(x64.shape).cos()
    results = []
    for x, g in (
        (x64.float(), dy.float().contiguous(memory_format=torch.channels_last)),
        (x64, dy),
    ):
        layer = InstanceNorm2d(C, affine=True).to(x.dtype)
        xx = x.detach().requires_grad_(True)
        results.append(torch.autograd.grad(layer(xx), (xx, layer.weight), g))
    _close(*results)


def test_torch_func_grad_and_jvp_on_an_ambiguous_layout():
    # Under torch.func transforms the gradient's layout is set by an autograd Function (a
    # tensor hook cannot run there); eval mode: a transform may not update captured buffers.
    from torch.func import functional_call, grad, jvp

    def layer(dtype):
        bn = BatchNorm2d(C).to(dtype).eval()
        with torch.no_grad():
            bn.running_mean.copy_(torch.linspace(-1, 1, C))
            bn.running_var.copy_(torch.linspace(0.5, 2.0, C))
        return bn, {k: v.detach() for k, v in bn.named_parameters()}

    results = []
    for x in (_cl_odd(_features()), _contiguous(_features(torch.float64))):
        bn, params = layer(x.dtype)
        weights = _grad_out(x, "contiguous")

        def loss(x, params, bn=bn, weights=weights):
            return (functional_call(bn, params, (x,)) * weights).sum()

        dx, dparams = grad(loss, argnums=(0, 1))(x, params)
        _, tangent = jvp(lambda x, bn=bn, params=params: functional_call(bn, params, (x,)), (x,),
                         (weights,))  # fmt: skip
        results.append((dx, dparams["weight"], tangent))
    _close(*results)


def test_in_place_activation_after_an_ambiguous_layout():
    # The gradient's layout is set without making y a view: ReLU(inplace=True) may follow.
    results = []
    for x in (_cl_odd(_features()), _contiguous(_features(torch.float64))):
        net = torch.nn.Sequential(BatchNorm2d(C), torch.nn.ReLU(inplace=True)).to(x.dtype)
        xx = x.detach().requires_grad_(True)
        y = net(xx)
        results.append(torch.autograd.grad(y, (xx, net[0].weight), _grad_out(y, "contiguous")))
    _close(*results)


ODD_LAYOUTS = {
    "sequence (N, L, C)": lambda: torch.randn(4, 6, 3).transpose(1, 2),
    "permuted 4-D": lambda: torch.randn(2, 3, 4, 5).permute(0, 1, 3, 2),
    "channels-last": lambda: torch.randn(2, 4, 5, 3).permute(0, 3, 1, 2),
    "channels-last 3-D": lambda: torch.randn(2, 3, 4, 5, 6).permute(0, 4, 1, 2, 3),
    "(N, C) transposed": lambda: torch.randn(3, 8).T,
}


@pytest.mark.parametrize("backend", ["torch", "cpu", "explicit"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", list(ODD_LAYOUTS))
def test_output_and_gradient_strides_are_torchs_on_any_layout(layout, training, backend):
    # Element-wise ops follow x's strides; torch's kernel writes y in x's suggested memory
    # format (contiguous for a sequence stored (N, L, C)), so `bn(x).view(n, -1)` works there.
    x = ODD_LAYOUTS[layout]().requires_grad_()
    c = x.shape[1]
    y_ref = torch.nn.functional.batch_norm(x, torch.zeros(c), torch.ones(c), training=training)
    dy = torch.randn_like(y_ref)
    (dx_ref,) = torch.autograd.grad(y_ref, x, dy)
    y = batch_norm(x, torch.zeros(c), torch.ones(c), training=training, backend=backend)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert y.stride() == y_ref.stride() and dx.stride() == dx_ref.stride()
    torch.testing.assert_close(y, y_ref)
    if y_ref.is_contiguous():
        y.view(x.shape[0], -1)
