"""The C++ autograd nodes of the CPU kernels (``CpuBatchNormBackward``,
``CpuBatchNormReluBackward``): every combination of given / absent / frozen weight, bias and
residual routes each gradient to its own input, and the nodes behave as autograd's own do
(saved-tensor hooks, in-place checks, retain_graph, parameter dtypes).
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from batchnorm import backends
from batchnorm.functional import batch_norm, batch_norm_add_relu, batch_norm_relu

C = 5


pytestmark = pytest.mark.usefixtures("cpu_kernels")


def _param(kind: str, seed: int, dtype=torch.float32):
    """None, a frozen tensor, or a leaf that requires grad."""
    if kind == "none":
        return None
    t = (torch.rand(C, generator=torch.Generator().manual_seed(seed)) + 0.5).to(dtype)
    return t.requires_grad_(kind == "grad")


def _grads(y, dy, inputs):
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(y, wanted, dy) if wanted else ()


KINDS = ("none", "frozen", "grad")
# (x requires grad, weight, bias): every combination in which something requires grad.
COMBINATIONS = [
    (x_grad, w, b)
    for x_grad, w, b in itertools.product([True, False], KINDS, KINDS)
    if x_grad or "grad" in (w, b)
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("x_grad", "w_kind", "b_kind"), COMBINATIONS)
def test_each_gradient_reaches_its_input(x_grad, w_kind, b_kind, training):
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(6, C, 3, 3, generator=gen) * 2 + 1
    dy = torch.randn(x0.shape, generator=gen)
    rm, rv = torch.randn(C, generator=gen) * 0.1, torch.rand(C, generator=gen) + 0.5

    def run(backend):
        x = x0.clone().requires_grad_(x_grad)
        w, b = _param(w_kind, 1), _param(b_kind, 2)
        y = batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, backend=backend)
        return _grads(y, dy, [x, w, b])

    got = run("cpu")
    assert backends.last_backend() == "cpu"
    expected = run("torch")
    assert len(got) == len(expected) > 0
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("z_kind", ["none", "frozen", "grad"])
@pytest.mark.parametrize(("w_kind", "b_kind"), [("grad", "grad"), ("none", "grad"),
                                                ("grad", "none"), ("frozen", "grad")])  # fmt: skip
@pytest.mark.parametrize("x_grad", [True, False], ids=["dx", "no-dx"])
def test_fused_gradients_reach_their_inputs(x_grad, w_kind, b_kind, z_kind):
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(6, C, 3, 3, generator=gen)
    z0 = torch.randn(x0.shape, generator=gen)
    dy = torch.randn(x0.shape, generator=gen)

    def run(fused):
        x = x0.clone().requires_grad_(x_grad)
        z = None if z_kind == "none" else z0.clone().requires_grad_(z_kind == "grad")
        w, b = _param(w_kind, 1), _param(b_kind, 2)
        if fused and z is None:
            y = batch_norm_relu(x, None, None, w, b, True, backend="cpu", save="mask")
        elif fused:
            y = batch_norm_add_relu(x, z, None, None, w, b, True, backend="cpu", save="mask")
        else:
            y = batch_norm(x, None, None, w, b, True, backend="cpu")
            y = torch.relu(y if z is None else y + z)
        return _grads(y, dy, [x, z, w, b])

    got, expected = run(True), run(False)
    assert len(got) == len(expected) > 0
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


def test_parameter_gradients_keep_the_parameters_dtype():
    """bfloat16 input: bfloat16 or float32 (mixed precision) parameters get their own dtype."""
    x = torch.randn(4, C, 2, 2).to(torch.bfloat16).requires_grad_(True)
    w = _param("grad", 1, torch.bfloat16)
    b = _param("grad", 2, torch.float32)
    y = batch_norm(x, None, None, w, b, True, backend="cpu")
    assert backends.last_backend() == "cpu"
    dx, dw, db = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
    assert (dx.dtype, dw.dtype, db.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)


def test_saved_tensor_hooks_see_what_the_node_keeps():
    """x, gamma and three (C,) float32 statistics: the hooks run as for autograd's own nodes."""
    packed = []

    def pack(t):
        packed.append(tuple(t.shape))
        return t

    x = torch.randn(4, C, 2, 2).requires_grad_(True)
    w = _param("grad", 1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = batch_norm(x, None, None, w, None, True, backend="cpu")
    assert sorted(packed) == sorted([(4, C, 2, 2), (C,), (C,), (C,), (C,)])
    y.sum().backward()
    assert x.grad is not None and w.grad is not None


def test_input_changed_in_place_after_forward_raises():
    x = torch.randn(4, C, 2, 2).requires_grad_(True)
    h = x * 1.0
    y = batch_norm(h, None, None, None, None, True, backend="cpu")
    h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_backward_twice_with_retain_graph():
    x = torch.randn(4, C, 2, 2).requires_grad_(True)
    y = batch_norm(x, None, None, _param("frozen", 1), None, True, backend="cpu")
    dy = torch.randn(y.shape)
    (first,) = torch.autograd.grad(y, x, dy, retain_graph=True)
    (second,) = torch.autograd.grad(y, x, dy)
    assert torch.equal(first, second)
    with pytest.raises(RuntimeError, match="second time|already been freed"):
        torch.autograd.grad(y, x, dy)


@pytest.mark.parametrize("fused", [False, True], ids=["bn", "bn_relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_running_statistics_that_require_grad_are_refused_as_torch_does(name, training, fused):
    # torch's kernel raises here; the kernels would give the statistics no gradient (wrong in
    # eval, where y depends on them) and update a leaf that requires grad in place.
    x = torch.randn(4, C, 3, 3, generator=torch.Generator().manual_seed(0))
    stats = {"running_mean": torch.zeros(C), "running_var": torch.ones(C)}
    stats[name].requires_grad_(True)
    fn = batch_norm_relu if fused else batch_norm
    with pytest.raises(RuntimeError, match=f"not differentiable with respect to {name}"):
        fn(x, stats["running_mean"], stats["running_var"], None, None, training, backend="cpu")
    assert torch.equal(stats["running_mean"].detach(), torch.zeros(C))
    assert torch.equal(stats["running_var"].detach(), torch.ones(C))
    with torch.no_grad():  # as torch: accepted where nothing records a graph
        y = fn(x, stats["running_mean"], stats["running_var"], None, None, training, backend="cpu")
        expected = torch.nn.functional.batch_norm(
            x, torch.zeros(C), torch.ones(C), None, None, training
        )
    torch.testing.assert_close(y, expected.relu() if fused else expected, rtol=1e-5, atol=1e-5)
    assert backends.last_backend() == "cpu"


def _dual_outputs(fn, x, tangent, **where):
    """fn(x as a dual tensor) -> (primal, tangent) under forward-mode AD."""
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        out = fn(fwAD.make_dual(x, tangent), **where)
        primal, out_tangent = fwAD.unpack_dual(out)
    return primal, out_tangent


@pytest.mark.parametrize("fused", [False, True], ids=["bn", "bn_relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_mode_ad_runs_torch_kernel_with_a_warning_never_drops_the_tangent(training, fused):
    # The C++ node has no forward-mode formula: run as it was, the output came back without a
    # tangent (a silent zero directional derivative). The dispatch now runs PyTorch's kernel.
    gen = torch.Generator().manual_seed(0)
    x, tangent = torch.randn(6, C, 3, 3, generator=gen), torch.randn(6, C, 3, 3, generator=gen)
    weight = _param("frozen", 1)

    def call(t, backend):
        fn = batch_norm_relu if fused else batch_norm
        return fn(t, torch.zeros(C), torch.ones(C), weight, None, training, backend=backend)

    expected = _dual_outputs(call, x, tangent, backend="torch")
    backends._warned.clear()  # the warning comes once per process
    with pytest.warns(RuntimeWarning, match="forward-mode AD"):
        got = _dual_outputs(call, x, tangent, backend="cpu")
    assert backends.last_backend() == "torch"
    assert got[1] is not None
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    y = call(x, "cpu")  # without tangents: the C++ kernels again
    assert backends.last_backend() == "cpu"
    torch.testing.assert_close(y, expected[0], rtol=1e-5, atol=1e-5)


def test_forward_mode_ad_through_a_layer_after_its_fast_path_is_planned():
    import torch.autograd.forward_ad as fwAD

    from batchnorm.nn import BatchNorm2d

    gen = torch.Generator().manual_seed(0)
    x, tangent = torch.randn(6, C, 3, 3, generator=gen), torch.randn(6, C, 3, 3, generator=gen)
    layer, reference = BatchNorm2d(C, backend="cpu"), torch.nn.BatchNorm2d(C)
    for _ in range(3):  # the calls that plan the fast path and then take it
        layer(x)
        reference(x)
    assert layer.last_backend == "cpu"
    with warnings.catch_warnings(), fwAD.dual_level():
        warnings.simplefilter("ignore")
        got = fwAD.unpack_dual(layer(fwAD.make_dual(x, tangent))).tangent
        expected = fwAD.unpack_dual(reference(fwAD.make_dual(x, tangent))).tangent
    assert layer.last_backend == "torch"
    assert got is not None
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(layer.running_mean, reference.running_mean)


def test_the_low_level_op_refuses_a_tangent_it_cannot_carry():
    import torch.autograd.forward_ad as fwAD

    from batchnorm.ops import cpu

    x = torch.randn(6, C, 3, 3, generator=torch.Generator().manual_seed(0))
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            cpu.batch_norm(dual, None, None, None, None, True, 0.1, 1e-5)
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            cpu.batch_norm_relu(dual, None, None, None, None, None, True, 0.1, 1e-5)
        # a plain tensor inside the dual level has nothing to carry
        y = cpu.batch_norm(x, None, None, None, None, True, 0.1, 1e-5)
        assert fwAD.unpack_dual(y).tangent is None
