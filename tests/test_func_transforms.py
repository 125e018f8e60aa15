"""torch.func transforms (grad, jacrev, hessian, jvp, vmap, functional_call) on the layers built
on the shared primitives (the ``explicit`` backend, batch renorm, ghost batch norm, and layer,
group and instance norm on ``explicit``): the same numbers as PyTorch's autograd on the same
layer, as for torch.nn's own layers, never an error where torch's layers run.

The reference of every transform is the plain autograd of the same layer (whose first and second
derivatives tests/test_second_derivatives.py checks against finite differences), and for batch
norm PyTorch's kernel as well.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, hessian, jacrev, jvp, vmap

from batchnorm.nn import (
    BatchNorm2d,
    BatchNormAct2d,
    BatchRenorm,
    GhostBatchNorm,
    GroupNorm,
    InstanceNorm2d,
    LayerNorm,
)

C = 3

LAYERS = {
    "bn_explicit": lambda: BatchNorm2d(C, backend="explicit"),
    "bn_explicit_eps0": lambda: BatchNorm2d(C, eps=0.0, backend="explicit"),
    "renorm": lambda: BatchRenorm(C),
    "ghost": lambda: GhostBatchNorm(C, virtual_batch_size=3),
    "ghost_explicit": lambda: GhostBatchNorm(C, virtual_batch_size=4, backend="explicit"),
    "layer_explicit": lambda: LayerNorm((C, 2, 2), backend="explicit"),
    "group_explicit": lambda: GroupNorm(1, C, backend="explicit"),
    "instance_explicit": lambda: InstanceNorm2d(C, affine=True, backend="explicit"),
}


def _setup(name: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    layer = LAYERS[name]().double()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=torch.float64) + 0.5)
    x = torch.randn(6, C, 2, 2, generator=gen, dtype=torch.float64)
    params = {k: v.detach().clone() for k, v in layer.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in layer.named_buffers()}
    return layer, x, params, buffers


def _loss_fn(layer, buffers):
    """A loss of (params, x) that is not quadratic (so the Hessian has structure), each call
    from the same running statistics."""

    def loss(params, x):
        state = {k: v.clone() for k, v in buffers.items()}
        return (functional_call(layer, (params, state), (x,)) ** 3).sum()

    return loss


def _autograd_grads(loss, params, x):
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    xg = x.clone().requires_grad_(True)
    value = loss(leaves, xg)
    grads = torch.autograd.grad(value, [*leaves.values(), xg])
    return dict(zip(leaves, grads[:-1])), grads[-1]


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_grad_matches_autograd(name):
    layer, x, params, buffers = _setup(name)
    loss = _loss_fn(layer, buffers)
    expected_params, expected_x = _autograd_grads(loss, params, x)
    got_params, got_x = grad(loss, argnums=(0, 1))(params, x)
    torch.testing.assert_close(got_x, expected_x)
    for k in expected_params:
        torch.testing.assert_close(got_params[k], expected_params[k])


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_jacrev_matches_autograd_jacobian(name):
    layer, x, params, buffers = _setup(name)
    state = dict(buffers)

    def f(x):
        return functional_call(layer, (params, {k: v.clone() for k, v in state.items()}), (x,))

    expected = torch.autograd.functional.jacobian(f, x)
    torch.testing.assert_close(jacrev(f)(x), expected)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_hessian_matches_autograd_hessian(name):
    """Second derivatives through torch.func (the backward is rebuilt and differentiated with
    torch.func's own vjp there) equal autograd's create_graph ones."""
    layer, x, params, buffers = _setup(name)
    loss = _loss_fn(layer, buffers)
    x = x[:5].contiguous()  # (5, C, 2, 2): a 60 x 60 Hessian (ghost: one batch of 4, one of 1)

    def of_x(x):
        return loss(params, x)

    expected = torch.autograd.functional.hessian(of_x, x)
    torch.testing.assert_close(hessian(of_x)(x), expected)


def test_hessian_of_explicit_batch_norm_matches_torch_kernel():
    layer, x, params, buffers = _setup("bn_explicit")
    torch_layer = torch.nn.BatchNorm2d(C).double()
    x = x[:3].contiguous()

    def loss_of(module):
        def of_x(x):
            state = {k: v.clone() for k, v in buffers.items()}
            return (functional_call(module, (params, state), (x,)) ** 3).sum()

        return of_x

    torch.testing.assert_close(hessian(loss_of(layer))(x), hessian(loss_of(torch_layer))(x))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_jvp_matches_forward_ad(name):
    layer, x, params, buffers = _setup(name)
    tangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)

    def f(x):
        return functional_call(layer, (params, {k: v.clone() for k, v in buffers.items()}), (x,))

    _, got = jvp(f, (x,), (tangent,))
    # The reference: the Jacobian (plain autograd) applied to the tangent.
    jac = torch.autograd.functional.jacobian(f, x)
    expected = (jac.reshape(x.numel(), x.numel()) @ tangent.reshape(-1)).reshape(x.shape)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_vmap_over_batches_equals_a_loop(training):
    """Per-model batches under vmap (track_running_stats=False in training, as torch.func's
    documentation asks of torch.nn's layers): each slice equals a call of its own."""
    gen = torch.Generator().manual_seed(2)
    layer = BatchNorm2d(C, backend="explicit", track_running_stats=not training).double()
    layer.train(training)
    if not training:
        with torch.no_grad():
            layer.running_mean.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
            layer.running_var.copy_(torch.rand(C, generator=gen, dtype=torch.float64) + 0.5)
    xs = torch.randn(4, 5, C, 2, 2, generator=gen, dtype=torch.float64)
    got = vmap(layer)(xs)
    torch.testing.assert_close(got, torch.stack([layer(x) for x in xs]))


def test_per_sample_gradients_with_vmap_of_grad():
    """The per-sample-gradient recipe (vmap of grad over samples) on a per-sample norm."""
    layer, x, params, _ = _setup("group_explicit")

    def loss(params, sample):
        return (functional_call(layer, params, (sample.unsqueeze(0),)) ** 3).sum()

    got = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        expected, _ = _autograd_grads(loss, params, x[i])
        for k in expected:
            torch.testing.assert_close(got[k][i], expected[k])


@pytest.mark.parametrize("name", ["bn_explicit", "renorm", "ghost_explicit"])
def test_vmap_of_a_training_step_with_unbatched_running_statistics_raises_clearly(name):
    """As torch's batch norm raises there: the running statistics cannot take batched values in
    place. The error names the remedies, and the buffers keep their values."""
    layer, _, _, _ = _setup(name)
    before = {k: v.clone() for k, v in layer.named_buffers()}
    xs = torch.randn(2, 6, C, 2, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="track_running_stats=False"):
        vmap(layer)(xs)
    for k, v in layer.named_buffers():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


STACKABLE = {
    "bn_default": lambda: BatchNorm2d(C),
    "bn_cpu": lambda: BatchNorm2d(C, backend="cpu"),
    "bn_explicit": lambda: BatchNorm2d(C, backend="explicit"),
    "renorm": lambda: BatchRenorm(C),
    "ghost": lambda: GhostBatchNorm(C, virtual_batch_size=2),
    "ghost_uneven": lambda: GhostBatchNorm(C, virtual_batch_size=4),
    "norm_act": lambda: BatchNormAct2d(C),
}


@pytest.mark.parametrize("name", sorted(STACKABLE))
def test_vmap_with_stacked_buffers_updates_each_model(name):
    """Ensembles: stacked parameters and buffers (stack_module_state), one batch per model; each
    model's output and running statistics are those of a call of its own."""
    gen = torch.Generator().manual_seed(3)
    make = STACKABLE[name]
    models = [make().double() for _ in range(3)]
    params, buffers = torch.func.stack_module_state(models)
    xs = torch.randn(3, 6, C, 2, 2, generator=gen, dtype=torch.float64)
    base = make().double().to("meta")

    def call(p, b, x):
        return functional_call(base, (p, b), (x,))

    got = vmap(call)(params, buffers, xs)
    for i, model in enumerate(models):
        torch.testing.assert_close(got[i], model(xs[i]))
        torch.testing.assert_close(buffers["running_mean"][i], model.running_mean)
        torch.testing.assert_close(buffers["running_var"][i], model.running_var)
        assert int(buffers["num_batches_tracked"][i]) == int(model.num_batches_tracked) == 1
