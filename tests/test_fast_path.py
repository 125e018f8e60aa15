"""The layers' fast path: a call whose signature passed every check before skips the checks and
the backend dispatch. It must give exactly what the full path gives, and any change that could
change a check's answer must send the call through the full path again."""

from __future__ import annotations

import pytest
import torch

import batchnorm.backends as backends
from batchnorm.nn import BatchNorm1d, BatchNorm2d


@pytest.mark.parametrize("backend", [None, "torch"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "no-track"])
def test_repeated_calls_equal_torch_nn_bit_for_bit(momentum, track, backend) -> None:
    ours = BatchNorm2d(3, momentum=momentum, track_running_stats=track, backend=backend)
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
    assert ours.__dict__.get("_plan") is not None and ours.last_backend == "torch"


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
    assert bn.__dict__.get("_plan") is None


# --- The running statistics: no private copies in training, and nothing observable changes ---

LAYOUTS = {
    "nc": (BatchNorm1d, torch.nn.BatchNorm1d, (8, 3), None),
    "ncl": (BatchNorm1d, torch.nn.BatchNorm1d, (4, 3, 5), None),
    "nchw": (BatchNorm2d, torch.nn.BatchNorm2d, (4, 3, 5, 5), None),
    "nhwc": (BatchNorm2d, torch.nn.BatchNorm2d, (4, 3, 5, 5), torch.channels_last),
    "strided": (BatchNorm2d, torch.nn.BatchNorm2d, (4, 3, 5, 10), "strided"),
}


def _pair(layout: str, seed: int = 0, **kwargs):
    """Ours and torch.nn's layer with the same (non-trivial) state, and an input maker."""
    ours_cls, torch_cls, shape, memory = LAYOUTS[layout]
    backend = kwargs.pop("backend", None)
    ours, native = ours_cls(3, backend=backend, **kwargs), torch_cls(3, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5, generator=gen)
        ours.bias.normal_(generator=gen)
        ours.running_mean.normal_(generator=gen)
        ours.running_var.uniform_(0.5, 2.0, generator=gen)
    native.load_state_dict(ours.state_dict())

    def make(seed: int) -> torch.Tensor:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2 + 1
        if memory == "strided":
            return x[..., ::2]
        if memory is not None:
            return x.contiguous(memory_format=memory)
        return x

    return ours, native, make


def _grads(layer, x, y, seed: int):
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(y, [x, layer.weight, layer.bias], dy)


def _equal(a, b, what: str) -> None:
    for i, (p, q) in enumerate(zip(a, b)):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=lambda m, i=i: f"{what}[{i}]: {m}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_training_forwards_then_both_backwards(layout) -> None:
    """Ours gives what torch.nn gives with each backward run right after its own forward, bit
    for bit (the second forward updates buffers the first one's graph holds)."""
    ours, native, make = _pair(layout)
    ours(make(99))  # validated: the next calls take the fast path
    native(make(99))
    x1, x2 = make(1).requires_grad_(), make(2).requires_grad_()
    y1, y2 = ours(x1), ours(x2)
    g1, g2 = _grads(ours, x1, y1, 11), _grads(ours, x2, y2, 12)
    x1n, x2n = make(1).requires_grad_(), make(2).requires_grad_()
    y1n = native(x1n)
    g1n = _grads(native, x1n, y1n, 11)
    y2n = native(x2n)
    g2n = _grads(native, x2n, y2n, 12)
    _equal((y1, y2, *g1, *g2), (y1n, y2n, *g1n, *g2n), "outputs and gradients")
    torch.testing.assert_close(ours.state_dict(), native.state_dict(), rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_buffer_edit_between_forward_and_backward_changes_no_gradient(layout, training) -> None:
    """An in-place edit of the buffers (here to NaN) between forward and backward: the gradients
    are those of torch.nn without the edit, bit for bit, in training (the backward reads only
    the batch statistics) and in eval (it reads the running statistics as they were)."""
    ours, native, make = _pair(layout)
    ours.train(training), native.train(training)
    ours(make(99)), native(make(99))
    x, xn = make(1).requires_grad_(), make(1).requires_grad_()
    y, yn = ours(x), native(xn)
    with torch.no_grad():
        ours.running_mean.fill_(float("nan"))
        ours.running_var.fill_(float("nan"))
    _equal((y, *_grads(ours, x, y, 5)), (yn, *_grads(native, xn, yn, 5)), "after the edit")


@pytest.mark.parametrize("layout", ["nc", "nchw"])
def test_buffer_broadcast_between_forwards_as_ddp_does(layout) -> None:
    """DDP's broadcast_buffers copies rank 0's buffers in place before each forward: two
    forwards, a broadcast in between and after, one backward. Same numbers as torch.nn doing
    each step's backward before the next broadcast."""
    ours, native, make = _pair(layout)
    rank0 = {"running_mean": torch.full((3,), 0.25), "running_var": torch.full((3,), 1.5)}

    def broadcast(layer) -> None:
        with torch.no_grad():
            for name, value in rank0.items():
                getattr(layer, name).copy_(value)

    xs = [make(i).requires_grad_() for i in (1, 2)]
    ys = []
    for x in xs:
        broadcast(ours)
        ys.append(ours(x))
    broadcast(ours)
    grads = torch.autograd.grad(sum((y * y).sum() for y in ys), [*xs, ours.weight, ours.bias])
    expected_x, expected_w, expected_b = [], 0, 0
    for i in (1, 2):
        broadcast(native)
        xn = make(i).requires_grad_()
        yn = native(xn)
        gx, gw, gb = torch.autograd.grad((yn * yn).sum(), [xn, native.weight, native.bias])
        expected_x.append(gx)
        expected_w, expected_b = expected_w + gw, expected_b + gb
    broadcast(native)
    _equal(grads, (*expected_x, expected_w, expected_b), "gradients")
    torch.testing.assert_close(ours.state_dict(), native.state_dict(), rtol=0, atol=0)
    xn = make(1).requires_grad_()
    yn = native(xn)
    broadcast(native)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        yn.sum().backward()  # what the layers spare their users (pytorch#22095)


@pytest.mark.parametrize("backend", [None, "torch", "cpu"])
def test_a_graph_that_saved_a_buffer_sees_the_update(backend) -> None:
    """The update of the running statistics counts as the in-place change it is, whichever way
    the kernel writes it: a graph that saved a buffer before fails at backward, as with torch.nn,
    instead of silently differentiating the new values."""
    if backend == "cpu":
        from batchnorm.ops import cpu

        if not cpu.ready():
            pytest.skip("the C++ kernels cannot be built here")
    bn = BatchNorm1d(3, backend=backend)
    bn(torch.randn(8, 3))
    scale = torch.ones(3, requires_grad=True)
    saved = (scale * bn.running_mean).sum()  # mul saves running_mean for d/d scale
    version = bn.running_mean._version
    bn(torch.randn(8, 3, requires_grad=True))  # training forward with a graph
    assert bn.running_mean._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_second_derivatives_on_the_fast_path_equal_torch(training) -> None:
    ours, native, make = _pair("nchw")
    ours.train(training), native.train(training)
    ours(make(99)), native(make(99))
    results = []
    for layer in (ours, native):
        x = make(1).requires_grad_()
        (gx,) = torch.autograd.grad((layer(x) ** 3).sum(), x, create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum(), [x, layer.weight, layer.bias]))
    assert results[1][0].abs().max() > 0
    _equal(results[0], results[1], "second derivatives")


def _func_outcomes(cls, training: bool, with_buffers: bool) -> list:
    """What torch.func transforms give through a layer: values, or the error's class."""
    from torch.func import functional_call, grad, jacrev, vmap

    torch.manual_seed(0)
    layer = cls(3).train(training)
    x = torch.randn(8, 3)
    layer(x)
    state = {k: v.detach() for k, v in layer.named_parameters()}
    if with_buffers:
        state.update({k: v.clone() for k, v in layer.named_buffers()})

    def loss(p, x):
        return (functional_call(layer, p, (x,)) ** 3).sum()

    outcomes = []
    for run in (
        lambda: grad(loss, argnums=1)(state, x),
        lambda: jacrev(lambda x: functional_call(layer, state, (x,)))(x),
        lambda: vmap(lambda x: functional_call(layer, state, (x,)))(x.reshape(2, 4, 3)),
        lambda: grad(lambda x: grad(loss, argnums=1)(state, x).sum())(x),
    ):
        try:
            outcomes.append(run())
        except RuntimeError:
            outcomes.append(RuntimeError)
    outcomes += [layer.running_mean, layer.running_var, state.get("running_mean")]
    return outcomes


@pytest.mark.parametrize("with_buffers", [False, True], ids=["captured", "buffers-in"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_func_transforms_behave_as_with_torch_nn(training, with_buffers) -> None:
    """grad, jacrev, vmap and grad of grad through functional_call: the same values or the same
    failures as torch.nn's layer, and the same running statistics afterwards (no aliases under a
    transform: functorch must keep seeing the in-place update)."""
    ours = _func_outcomes(BatchNorm1d, training, with_buffers)
    theirs = _func_outcomes(torch.nn.BatchNorm1d, training, with_buffers)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if isinstance(b, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, i=i: f"[{i}] {m}")
        else:
            assert a is b, f"outcome {i}: {a} vs {b}"


def test_a_parametrized_weight_is_read_on_every_call() -> None:
    """A parametrization (torch.nn.utils.parametrize) computes the weight at each access: the
    layer must use it, not the tensor it saw when the signature was checked."""
    from torch.nn.utils import parametrize

    class Doubled(torch.nn.Module):
        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return 2 * weight

    x = torch.randn(8, 3)
    outputs = []
    for cls in (BatchNorm1d, torch.nn.BatchNorm1d):
        layer = cls(3)
        layer(x)  # a plan made before the parametrization
        parametrize.register_parametrization(layer, "weight", Doubled())
        outputs.append([layer(x).detach() for _ in range(3)])
    for ours, native in zip(*outputs):
        torch.testing.assert_close(ours, native, rtol=0, atol=0)
    assert outputs[0][0].abs().max() > 2.5  # doubled gamma: |y| reaches about 2 * 1.5


def test_swapped_parameters_and_moved_layers_are_checked_again() -> None:
    bn = BatchNorm1d(3)
    x = torch.randn(8, 3)
    bn(x)
    plan = bn.__dict__["_plan"]
    bn.weight = torch.nn.Parameter(torch.full((3,), 2.0))
    y = bn(x)
    assert bn.__dict__["_plan"] is not plan  # the full path ran and made a new plan
    torch.testing.assert_close(y.std(0, unbiased=False), torch.full((3,), 2.0), rtol=1e-3, atol=0)
    bn.to(torch.float64)
    assert "_plan" not in bn.__dict__
    with pytest.raises(TypeError, match="mixed dtypes"):
        bn(x)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nc", "nchw", "nhwc"])
def test_the_cpu_backend_on_the_fast_path_equals_its_full_path(layout, training) -> None:
    """backend="cpu": repeated calls (the fast path after the first) give what the full path
    gives (the functional call with the same buffers), bit for bit."""
    from batchnorm.functional import batch_norm
    from batchnorm.ops import cpu

    if not cpu.ready():
        pytest.skip("the C++ kernels cannot be built here")
    ours, _, make = _pair(layout, backend="cpu")
    ours.train(training)
    mean, var = ours.running_mean.clone(), ours.running_var.clone()
    weight = ours.weight.detach().clone().requires_grad_()
    bias = ours.bias.detach().clone().requires_grad_()
    for step in range(3):
        x, xf = make(step).requires_grad_(), make(step).requires_grad_()
        y = ours(x)
        yf = batch_norm(xf, mean, var, weight, bias, training, 0.1, 1e-5, backend="cpu")
        got = _grads(ours, x, y, step)
        expected = torch.autograd.grad(yf, [xf, weight, bias], _grads_seed(yf, step))
        _equal((y, *got), (yf, *expected), f"call {step}")
        assert ours.last_backend == "cpu" and ours.__dict__.get("_plan") is not None
    _equal((ours.running_mean, ours.running_var), (mean, var), "running statistics")
    assert int(ours.num_batches_tracked) == (3 if training else 0)


def _grads_seed(y: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", [None, "cpu"])
def test_a_used_layer_deep_copies_and_pickles(backend) -> None:
    """A layer that has run (and so holds a plan of its last call) survives copy.deepcopy,
    pickle and torch.save as an unused one does, and the copy computes what the original does."""
    import copy
    import io
    import pickle

    from batchnorm.ops import cpu

    if backend == "cpu" and not cpu.ready():
        pytest.skip("the C++ kernels cannot be built here")
    layer = BatchNorm2d(3, backend=backend)
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    layer(x)
    assert layer.__dict__.get("_plan") is not None
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    copies = [
        copy.deepcopy(layer),
        pickle.loads(pickle.dumps(layer)),
        torch.load(buffer, weights_only=False),
    ]
    layer.eval()
    for other in copies:
        other.eval()
        torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)
        torch.testing.assert_close(other.state_dict(), layer.state_dict(), rtol=0, atol=0)
