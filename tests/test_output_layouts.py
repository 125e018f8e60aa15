"""Every backend lays out y, dx and a residual's gradient as PyTorch's kernels do, whatever the
strides of x and of the incoming gradient.

torch's batch-norm and group-norm kernels write y and dx in ``x.suggest_memory_format()``
(channels-last for a channels-last 4-D/5-D x, else contiguous), its layer and instance norm
contiguous. Element-wise ops follow their operands instead, and kernels that share x's strides
follow x: a sequence stored (N, L, C) and normalized as ``bn(x.transpose(1, 2))`` then gave a y
on which ``y.view(n, -1)`` fails, and a dx laid out like dy rather than like torch's.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from batchnorm import functional as bf
from batchnorm import nn as bnn

ODD_LAYOUTS = {
    "contiguous (N, C, L)": lambda: torch.randn(4, 6, 3),
    "sequence (N, L, C)": lambda: torch.randn(4, 3, 6).transpose(1, 2),
    "(N, C) transposed": lambda: torch.randn(6, 4).T,
    "channels-last": lambda: torch.randn(4, 3, 2, 6).permute(0, 3, 1, 2),
    "permuted 4-D": lambda: torch.randn(4, 3, 6, 2).permute(0, 2, 1, 3),
    "channels-last 3-D": lambda: torch.randn(2, 3, 2, 2, 6).permute(0, 4, 1, 2, 3),
}
GRADIENTS = ("like y", "contiguous", "reversed")


def _gradient(y: torch.Tensor, layout: str) -> torch.Tensor:
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device)
    if layout == "like y":
        return torch.empty_like(y).copy_(g)
    if layout == "reversed":  # every stride reversed: dense, standard in no format
        order = tuple(reversed(range(y.dim())))
        return g.permute(order).contiguous().permute(order)
    return g


def _inputs(layout: str, device: str, seed: int = 0):
    torch.manual_seed(seed)
    x = ODD_LAYOUTS[layout]().to(device)
    c = x.shape[1]
    params = [torch.rand(c).add(0.5).to(device), torch.randn(c).to(device)]
    return x, c, params


def _check(outs, refs, names) -> None:
    for name, out, ref in zip(names, outs, refs):
        assert out.stride() == ref.stride(), f"{name}: strides {out.stride()}, torch {ref.stride()}"
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4, msg=name)


def _batch_norm_case(layout, training, gradient, device, call):
    x0, c, (w0, b0) = _inputs(layout, device)
    results = []
    for fn in (call, F.batch_norm):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        assert x.stride() == x0.stride()
        y = fn(x, torch.zeros(c, device=device), torch.ones(c, device=device), w, b, training)
        (dx,) = torch.autograd.grad(y, x, _gradient(y, gradient))
        results.append((y.detach(), dx))
    _check(*results, ("y", "dx"))
    if results[1][0].is_contiguous():
        results[0][0].view(x0.shape[0], -1)  # what code after torch's layer may do


@pytest.mark.parametrize("gradient", GRADIENTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", list(ODD_LAYOUTS))
@pytest.mark.parametrize("backend", ["torch", "cpu", "explicit"])
def test_batch_norm_layouts_are_torchs(backend, layout, training, gradient):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # backend="cpu" without a compiler warns and runs torch's
        _batch_norm_case(
            layout, training, gradient, "cpu",
            lambda *args: bf.batch_norm(*args, backend=backend),
        )  # fmt: skip


@pytest.mark.parametrize("gradient", ["like y", "reversed"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", list(ODD_LAYOUTS))
def test_triton_layouts_are_torchs(device, layout, training, gradient):
    # The kernels share one set of strides for x, y, dy and dx: an x whose strides are not
    # those of torch's output is copied to a contiguous tensor first.
    _batch_norm_case(
        layout, training, gradient, device,
        lambda *args: bf.batch_norm(*args, backend="triton"),
    )  # fmt: skip


def _fused_case(op, save, layout, device, backend):
    x0, c, (w0, b0) = _inputs(layout, device)
    z0 = torch.empty_like(x0).copy_(torch.randn(x0.shape)) if op == "add_relu" else None
    results = []
    for fused in (True, False):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        z = None if z0 is None else z0.clone().requires_grad_()
        stats = (torch.zeros(c, device=device), torch.ones(c, device=device))
        if not fused:  # the composition of torch's ops
            y = torch.relu(F.batch_norm(x, *stats, w, b, True) + (0 if z is None else z))
        elif z is None:
            y = bf.batch_norm_relu(x, *stats, w, b, True, backend=backend, save=save)
        else:
            y = bf.batch_norm_add_relu(x, z, *stats, w, b, True, backend=backend, save=save)
        wrt = (x,) if z is None else (x, z)
        grads = torch.autograd.grad(y, wrt, _gradient(y, "reversed"))
        results.append((y.detach(), *grads))
    _check(*results, ("y", "dx", "dz"))


@pytest.mark.parametrize("save", ["recompute", "mask", "output"])
@pytest.mark.parametrize("op", ["relu", "add_relu"])
@pytest.mark.parametrize("layout", ["sequence (N, L, C)", "(N, C) transposed", "channels-last"])
@pytest.mark.parametrize("backend", ["cpu", "explicit", "triton"])
def test_fused_layouts_are_the_compositions(backend, layout, op, save, request):
    device = request.getfixturevalue("device") if backend == "triton" else "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fused_case(op, save, layout, device, backend)


def _other_norm(norm: str, x, w, b, backend: str | None):
    if norm == "layer":
        shape = tuple(x.shape[1:])
        w, b = w.reshape(-1, *([1] * (len(shape) - 1))).expand(shape), None
        if backend is None:
            return F.layer_norm(x, shape, w, b)
        return bf.layer_norm(x, shape, w, b, backend=backend)
    if norm == "group":
        if backend is None:
            return F.group_norm(x, 3, w, b)
        return bf.group_norm(x, 3, w, b, backend=backend)
    if backend is None:
        return F.instance_norm(x, weight=w, bias=b)
    return bf.instance_norm(x, weight=w, bias=b, backend=backend)


@pytest.mark.parametrize("gradient", ["like y", "contiguous"])
@pytest.mark.parametrize("norm", ["layer", "group", "instance"])
@pytest.mark.parametrize(
    "layout", ["sequence (N, L, C)", "channels-last", "permuted 4-D", "contiguous (N, C, L)"]
)
@pytest.mark.parametrize("backend", ["torch", "explicit"])
def test_other_norms_layouts_are_torchs(backend, layout, norm, gradient):
    # torch: group norm in x's suggested format, layer and instance norm contiguous.
    x0, _, (w0, b0) = _inputs(layout, "cpu")
    results = []
    for be in (backend, None):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        y = _other_norm(norm, x, w, b, be)
        (dx,) = torch.autograd.grad(y, x, _gradient(y, gradient))
        results.append((y.detach(), dx))
    _check(*results, ("y", "dx"))


def test_double_backward_through_a_relaid_gradient():
    # The gradient's layout is set by a differentiable copy: a gradient penalty still works.
    x0 = torch.randn(4, 3, 2, 6, dtype=torch.float64).permute(0, 3, 1, 2)
    results = []
    for backend in ("explicit", None):
        x = x0.clone().requires_grad_()
        y = (
            F.batch_norm(x, None, None, training=True)
            if backend is None
            else bf.batch_norm(x, None, None, training=True, backend=backend)
        )
        (dx,) = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)
        (ddx,) = torch.autograd.grad(dx.square().sum(), x)
        results.append((dx.detach(), ddx))
    torch.testing.assert_close(results[0], results[1])


LAYER_INPUTS = {  # 8 samples: two ghost batches of 4, or 3 + 3 + 2
    "sequence (N, L, C)": lambda: torch.randn(8, 3, 6).transpose(1, 2),
    "(N, C) transposed": lambda: torch.randn(6, 8).T,
    "channels-last": lambda: torch.randn(8, 3, 2, 6).permute(0, 3, 1, 2),
    "permuted 4-D": lambda: torch.randn(8, 3, 6, 2).permute(0, 2, 1, 3),
}
LAYERS = {
    "BatchNorm": lambda c, d: {2: bnn.BatchNorm1d, 3: bnn.BatchNorm1d, 4: bnn.BatchNorm2d}[d](c),
    "GhostBatchNorm": lambda c, d: bnn.GhostBatchNorm(c, virtual_batch_size=4),
    "GhostBatchNorm explicit": lambda c, d: bnn.GhostBatchNorm(
        c, virtual_batch_size=4, backend="explicit"
    ),
    "GhostBatchNorm explicit, a remainder": lambda c, d: bnn.GhostBatchNorm(
        c, virtual_batch_size=3, backend="explicit"
    ),
    "BatchRenorm": lambda c, d: bnn.BatchRenorm(c),
    "FrozenBatchNorm": lambda c, d: bnn.FrozenBatchNorm(c),
    "SyncBatchNorm": lambda c, d: bnn.SyncBatchNorm(c),
    "BatchNormAct": lambda c, d: {
        2: bnn.BatchNormAct1d,
        3: bnn.BatchNormAct1d,
        4: bnn.BatchNormAct2d,
    }[d](c, act_layer=None),  # fmt: skip
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", list(LAYER_INPUTS))
@pytest.mark.parametrize("layer", list(LAYERS))
def test_layers_layouts_are_torch_nns(layer, layout, training):
    # Ghost, renorm and frozen batch norm write their outputs with element-wise ops (and ghost
    # batches are pieces of x): y and dx must still come out as torch.nn.BatchNorm's do.
    torch.manual_seed(0)
    x0 = LAYER_INPUTS[layout]()
    c, d = x0.shape[1], x0.dim()
    ref_cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}[d]
    results = []
    for module in (LAYERS[layer](c, d), ref_cls(c)):
        module.train(training)
        x = x0.clone().requires_grad_()
        y = module(x)
        (dx,) = torch.autograd.grad(y, x, _gradient(y, "reversed"))
        results.append((y.detach(), dx))
    (y, dx), (y_ref, dx_ref) = results
    assert y.stride() == y_ref.stride() and dx.stride() == dx_ref.stride()


def test_suggested_format_is_torchs_rule_on_every_kind_of_strides():
    # layouts.suggested_format reimplements ATen's rule on plain ints (torch's Python copy costs
    # microseconds per call); the two must agree on permuted, sliced, expanded, ambiguous
    # (size-1) and empty tensors.
    import random

    from torch._prims_common import suggest_memory_format

    from batchnorm.layouts import in_suggested_format, suggested_format

    rng = random.Random(0)
    for _ in range(3000):
        ndim = rng.choice([2, 3, 4, 5])
        shape = [rng.choice([0, 1, 2, 3]) for _ in range(ndim)]
        order = list(range(ndim))
        rng.shuffle(order)
        x = torch.empty([shape[d] for d in order]).permute([order.index(d) for d in range(ndim)])
        if rng.random() < 0.3 and x.shape[0] > 1:
            x = x[::2]
        if rng.random() < 0.2 and 1 in x.shape:
            x = x.expand([max(s, 2) if s == 1 else s for s in x.shape])
        assert suggested_format(x) == suggest_memory_format(x), (x.shape, x.stride())
        expected = x.is_contiguous(memory_format=suggest_memory_format(x)) or x.is_contiguous()
        assert in_suggested_format(x) == expected, (x.shape, x.stride())
