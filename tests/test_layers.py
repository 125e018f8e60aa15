"""The drop-in layers and the functional API against torch.nn and the NumPy reference."""

from __future__ import annotations

import copy
import inspect
import io

import numpy as np
import pytest
import torch

import batchnorm.nn as bnn
from batchnorm import backends, reference
from batchnorm.functional import batch_norm
from tests.helpers import SHAPES, assert_close, make_input, tolerance

CPU_BACKENDS = ["torch", "explicit"]
TORCH_CLASSES = {
    2: torch.nn.BatchNorm1d,
    3: torch.nn.BatchNorm1d,
    4: torch.nn.BatchNorm2d,
    5: torch.nn.BatchNorm3d,
}
OUR_CLASSES = {2: bnn.BatchNorm1d, 3: bnn.BatchNorm1d, 4: bnn.BatchNorm2d, 5: bnn.BatchNorm3d}


def _trainable(case) -> bool:
    return int(np.prod(case.shape)) // case.shape[1] > 1


def _pair(ndim: int, c: int, dtype: torch.dtype, **kwargs):
    torch.manual_seed(0)
    ours = OUR_CLASSES[ndim](c, dtype=dtype, **kwargs)
    theirs = TORCH_CLASSES[ndim](
        c, dtype=dtype, **{k: v for k, v in kwargs.items() if k not in ("backend", "nonfinite")}
    )
    if ours.affine:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            if ours.bias is not None:
                ours.bias.uniform_(-0.5, 0.5)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _step(module, x, dy):
    x = x.clone().requires_grad_(True)
    y = module(x)
    params = [p for p in (module.weight, module.bias) if p is not None]
    grads = torch.autograd.grad(y, [x, *params], dy)
    return y.detach(), grads


def _compare_modules(ours, theirs, x, dy, dtype_name, rounding=0.0):
    """``rounding``: the error the input's dtype forces on xhat (a few ulps of a large mean over
    the std); two correct implementations may each be off by that much."""
    y1, g1 = _step(ours, x, dy)
    y2, g2 = _step(theirs, x, dy)
    rtol, atol = tolerance(dtype_name)
    assert_close(y1, y2, rtol=rtol, atol=atol + rounding, name="y")
    rtol, atol = tolerance(dtype_name, "gradient")
    for name, a, b in zip(("dx", "dweight", "dbias"), g1, g2):
        # dweight sums m terms each carrying the xhat rounding
        scale = x.numel() // x.shape[1] if name == "dweight" else 1
        assert_close(a, b, rtol=rtol, atol=atol + rounding * scale, name=name)
    rtol, atol = tolerance(dtype_name)
    if theirs.running_mean is not None:
        assert_close(
            ours.running_mean, theirs.running_mean, rtol=rtol, atol=atol, name="running_mean"
        )
        assert_close(ours.running_var, theirs.running_var, rtol=rtol, atol=atol, name="running_var")
        assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", SHAPES, ids=[c.id for c in SHAPES])
def test_layer_matches_torch_over_steps(case, dtype, backend):
    """Outputs, all gradients and running statistics over several train steps, then eval."""
    ndim, c = len(case.shape), case.shape[1]
    ours, theirs = _pair(ndim, c, dtype, backend=backend)
    dtype_name = str(dtype).replace("torch.", "")
    rounding = 8 * float(np.spacing(np.array(abs(case.mean), dtype=dtype_name))) / case.std
    for step in range(3):
        x = torch.tensor(make_input(case, seed=step), dtype=dtype)
        dy = torch.randn(case.shape, dtype=dtype, generator=torch.Generator().manual_seed(step))
        if _trainable(case):
            _compare_modules(ours, theirs, x, dy, dtype_name, rounding)
    ours.eval()
    theirs.eval()
    x = torch.tensor(make_input(case, seed=9), dtype=dtype)
    _compare_modules(ours, theirs, x, torch.ones_like(x), dtype_name, rounding)
    assert ours.last_backend == backend


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "kwargs",
    [
        {"momentum": None},
        {"momentum": 0.3},
        {"affine": False},
        {"track_running_stats": False},
        {"bias": False},
        {"eps": 1e-3},
    ],
    ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()),
)
def test_layer_options_match_torch(kwargs, backend):
    ours, theirs = _pair(4, 3, torch.float64, backend=backend, **kwargs)
    for step in range(4):
        x = torch.randn(5, 3, 4, 4, dtype=torch.float64) * (step + 1) + step
        _compare_modules(ours, theirs, x, torch.randn_like(x), "float64")
    ours.eval()
    theirs.eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    _compare_modules(ours, theirs, x, torch.randn_like(x), "float64")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_channels_last_and_non_contiguous(backend):
    ours, theirs = _pair(4, 6, torch.float64, backend=backend)
    x = torch.randn(4, 6, 5, 7, dtype=torch.float64).to(memory_format=torch.channels_last)
    _compare_modules(ours, theirs, x, torch.randn_like(x), "float64")
    x = torch.randn(4, 5, 6, 7, dtype=torch.float64).transpose(1, 2)  # (4, 6, 5, 7), strided
    assert not x.is_contiguous()
    _compare_modules(ours, theirs, x, torch.randn_like(x), "float64")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "case", [c for c in SHAPES if int(np.prod(c.shape)) // c.shape[1] > 1], ids=lambda c: c.id
)
def test_functional_matches_reference(case, backend):
    """Train forward/backward and running update, then eval, against the float64 reference."""
    x64 = make_input(case)
    c = case.shape[1]
    rng = np.random.default_rng(1)
    gamma, beta = rng.uniform(0.5, 1.5, c), rng.standard_normal(c)
    dy64 = rng.standard_normal(case.shape)
    rm0, rv0 = rng.standard_normal(c), rng.uniform(0.5, 2, c)
    x = torch.tensor(x64, requires_grad=True)
    g = torch.tensor(gamma, requires_grad=True)
    b = torch.tensor(beta, requires_grad=True)
    rm, rv = torch.tensor(rm0), torch.tensor(rv0)
    y = batch_norm(x, rm, rv, g, b, True, 0.2, 1e-5, backend=backend)
    dx, dg, db = torch.autograd.grad(y, (x, g, b), torch.tensor(dy64))
    y_ref, cache = reference.bn_forward(x64, gamma, beta, 1e-5)
    grads_ref = reference.bn_backward(dy64, cache)
    rm_ref, rv_ref = reference.running_update(rm0, rv0, cache.mu, cache.var, x64.size // c, 0.2)
    fwd, grad = tolerance("float64"), tolerance("float64", "gradient")
    assert_close(y, y_ref, rtol=fwd[0], atol=fwd[1], name="y")
    for name, a, e in zip(("dx", "dgamma", "dbeta"), (dx, dg, db), grads_ref):
        assert_close(a, e, rtol=grad[0], atol=grad[1] * max(1.0, np.abs(e).max()), name=name)
    assert_close(rm, rm_ref, rtol=fwd[0], atol=fwd[1], name="running_mean")
    assert_close(rv, rv_ref, rtol=fwd[0], atol=fwd[1], name="running_var")

    x = torch.tensor(x64, requires_grad=True)
    y = batch_norm(x, rm, rv, g, b, False, 0.2, 1e-5, backend=backend)
    dx, dg, db = torch.autograd.grad(y, (x, g, b), torch.tensor(dy64))
    y_ref = reference.bn_inference(x64, gamma, beta, rm_ref, rv_ref, 1e-5)
    grads_ref = reference.bn_inference_backward(dy64, x64, gamma, rm_ref, rv_ref, 1e-5)
    assert_close(y, y_ref, rtol=fwd[0], atol=fwd[1], name="eval y")
    for name, a, e in zip(("dx", "dgamma", "dbeta"), (dx, dg, db), grads_ref):
        assert_close(
            a, e, rtol=grad[0], atol=grad[1] * max(1.0, np.abs(e).max()), name=f"eval {name}"
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_explicit_half_precision_with_float32_parameters(dtype):
    """Mixed precision: low-precision input, float32 parameters and statistics."""
    ours, theirs = _pair(4, 5, torch.float32, backend="explicit")
    x = (torch.randn(6, 5, 4, 4) * 2 + 3).to(dtype)
    dy = torch.randn(6, 5, 4, 4).to(dtype)
    y1, g1 = _step(ours, x, dy)
    y2, g2 = _step(theirs, x, dy)
    assert y1.dtype == dtype
    dtype_name = str(dtype).replace("torch.", "")
    rtol, atol = tolerance(dtype_name)
    assert_close(y1, y2, rtol=rtol, atol=atol, name="y")
    rtol, atol = tolerance(dtype_name, "gradient")
    for a, b in zip(g1, g2):
        assert_close(a, b, rtol=rtol, atol=atol * max(1.0, float(b.abs().max())), name="grad")
    assert_close(ours.running_var, theirs.running_var, rtol=1e-3, atol=1e-3, name="running_var")


@pytest.mark.parametrize("threads", [1, 2])
def test_large_mean_keeps_float32_accuracy(threads):
    """x = 1e4 + randn: statistics as accurate as float32 allows (no E[x^2] - E[x]^2).

    The explicit backend (the primitives) is held to a few ulps of 1e4; the default backend is
    PyTorch's kernel, bit-identical to torch.nn, whose float32 reduction order depends on the
    thread count (about 10 ulps with one thread).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        x = 1e4 + torch.randn(512, 4, dtype=torch.float32)
        x64 = x.double().numpy()
        ulp = np.spacing(np.float32(1e4))
        native = torch.nn.BatchNorm1d(4, momentum=None, affine=False)
        native(x)
        for backend, ulps in (("explicit", 8), ("torch", 16)):
            bn = bnn.BatchNorm1d(4, momentum=None, affine=False, backend=backend)
            y = bn(x)  # cumulative average: after one batch the running stats are the batch's
            rm, rv = bn.running_mean, bn.running_var
            if backend == "torch":
                assert torch.equal(rm, native.running_mean) and torch.equal(rv, native.running_var)
            mean = x64.mean(axis=0)
            var = x64.var(axis=0, ddof=1)
            assert np.abs(rm.double().numpy() - mean).max() < ulps * ulp, backend
            assert np.abs(rv.double().numpy() - var).max() / var.max() < 1e-4, backend
            # Standardized output: the error is set by the stored mean's rounding, about 1e-3.
            y_ref = (x64 - mean) / np.sqrt(x64.var(axis=0) + 1e-5)
            assert np.abs(y.detach().double().numpy() - y_ref).max() < 2e-2, backend
    finally:
        torch.set_num_threads(before)


def test_state_dict_round_trip_and_checkpoint_loading(tmp_path):
    theirs = torch.nn.BatchNorm2d(4)
    theirs.train()
    for _ in range(3):
        theirs(torch.randn(8, 4, 3, 3) * 2 + 1)
    path = tmp_path / "torch_bn.pt"
    torch.save(theirs.state_dict(), path)
    ours = bnn.BatchNorm2d(4)
    ours.load_state_dict(torch.load(path))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    back = torch.nn.BatchNorm2d(4)
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    back.load_state_dict(torch.load(buf))
    for key, value in back.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    # A pre-num_batches_tracked checkpoint (old torch) still loads.
    old = {k: v for k, v in theirs.state_dict().items() if k != "num_batches_tracked"}
    fresh = bnn.BatchNorm2d(4)
    fresh.load_state_dict(old)
    assert torch.equal(fresh.running_mean, theirs.running_mean)


def test_signature_parameters_buffers_and_repr_match_torch():
    for ours_cls, torch_cls in (
        (bnn.BatchNorm1d, torch.nn.BatchNorm1d),
        (bnn.BatchNorm2d, torch.nn.BatchNorm2d),
        (bnn.BatchNorm3d, torch.nn.BatchNorm3d),
    ):
        ours_params = list(inspect.signature(ours_cls.__init__).parameters.values())
        torch_params = list(inspect.signature(torch_cls.__init__).parameters.values())
        for p, q in zip(ours_params, torch_params):
            assert (p.name, p.default, p.kind) == (q.name, q.default, q.kind)
        assert issubclass(ours_cls, torch_cls)
        a, b = ours_cls(7), torch_cls(7)
        assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
        assert [n for n, _ in a.named_buffers()] == [n for n, _ in b.named_buffers()]
        assert repr(a) == repr(b)
        assert "backend='explicit'" in repr(ours_cls(7, backend="explicit"))


def test_positional_arguments_like_torch():
    ours = bnn.BatchNorm1d(3, 1e-3, 0.2, False, False)
    assert (ours.eps, ours.momentum, ours.affine, ours.track_running_stats) == (
        1e-3,
        0.2,
        False,
        False,
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_convert_gives_same_outputs_and_gradients(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 6 * 6, 10),
        torch.nn.BatchNorm1d(10),
    ).double()
    twin = copy.deepcopy(model)
    converted = bnn.convert(model, backend=backend)
    assert isinstance(converted[1], bnn.BatchNorm2d)
    assert isinstance(converted[5], bnn.BatchNorm1d)
    assert converted[1].backend == backend
    for _ in range(2):
        x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
        out_a, out_b = converted(x), twin(x)
        assert_close(out_a, out_b, rtol=1e-12, atol=1e-12, name="output")
        out_a.square().sum().backward()
        out_b.square().sum().backward()
        for (name, p), q in zip(converted.named_parameters(), twin.parameters()):
            assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-10, name=f"grad {name}")
    back = bnn.convert(converted, to="torch")
    assert type(back[1]) is torch.nn.BatchNorm2d
    assert back[1].running_mean is converted[1].running_mean  # the same tensors, not copies
    assert_close(
        back[1].running_mean, twin[1].running_mean, rtol=1e-12, atol=1e-14, name="running_mean"
    )


def test_convert_keeps_parameters_shared_and_skips_user_subclasses():
    class FusedBN(torch.nn.BatchNorm2d):
        def forward(self, x):
            return torch.relu(super().forward(x))

    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), FusedBN(3)).eval()
    weight = model[0].weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="FusedBN"):
        bnn.convert(model)
    assert model[0].weight is weight
    assert type(model[1]) is FusedBN
    assert not model[0].training
    model(torch.randn(2, 3, 2, 2)).sum().backward()
    optimizer.step()  # the optimizer still owns the converted layer's parameters
    assert not torch.equal(model[0].weight, torch.ones(3))
    root = bnn.convert(torch.nn.BatchNorm1d(4))
    assert isinstance(root, bnn.BatchNorm1d)


def test_backend_selection_argument_context_and_environment(monkeypatch):
    x = torch.randn(4, 3)
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    batch_norm(x, None, None, training=True)
    assert backends.last_backend() == "torch"
    monkeypatch.setenv(backends.ENV_VAR, "explicit")
    batch_norm(x, None, None, training=True)
    assert backends.last_backend() == "explicit"
    with backends.use_backend("torch"):
        batch_norm(x, None, None, training=True)
        assert backends.last_backend() == "torch"
        batch_norm(x, None, None, training=True, backend="explicit")
        assert backends.last_backend() == "explicit"
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="bogus"):
        batch_norm(x, None, None, training=True)
    with pytest.raises(ValueError, match="unknown batch-norm backend"):
        bnn.BatchNorm1d(3, backend="cudnn")


def test_triton_request_falls_back_visibly_on_float64(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    backends._warned.clear()
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="triton"):
        batch_norm(x, None, None, training=True, backend="triton")
    assert backends.last_backend() == "torch"


@pytest.mark.parametrize("backend", ["torch", "explicit"])
@pytest.mark.parametrize("training", [True, False])
def test_buffer_edits_between_forward_and_backward_do_not_break_the_graph(backend, training):
    """Two forwards before one backward, and an in-place edit of the running buffers in between
    (what DDP's buffer broadcast does, pytorch#22095): torch.nn fails with "modified by an inplace
    operation"; ours must give the same gradients as without the edit."""
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    grads = []
    for edit in (False, True):
        bn = bnn.BatchNorm1d(3, backend=backend, dtype=torch.float64).train(training)
        bn.running_var.fill_(2.0)
        x.grad = None
        y = bn(x) + bn(x)  # the second forward updates the buffers the first one used
        if edit:
            with torch.no_grad():
                bn.running_mean.add_(1.0)
                bn.running_var.mul_(3.0)
        (y * torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
        grads.append((x.grad.clone(), bn.weight.grad.clone(), bn.bias.grad.clone()))
    for before, after, name in zip(grads[0], grads[1], ("x", "weight", "bias")):
        assert_close(after, before, rtol=0, atol=0, name=f"grad {name}")
