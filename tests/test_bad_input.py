"""Bad input: each case gets an error that names the problem and the remedy, and nothing is lost.

"Nothing is lost" is checked after every error: running statistics, ``num_batches_tracked`` and
parameters are bit-for-bit what they were before the failing call.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from batchnorm import reference
from batchnorm.functional import batch_norm
from batchnorm.nn import BatchNorm1d, BatchNorm2d, BatchNorm3d
from tests.helpers import assert_close

CPU_BACKENDS = ("torch", "explicit")


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_unchanged(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed after a rejected batch"


def _warmed_up(cls=BatchNorm2d, channels=3, backend="torch", **kwargs):
    bn = cls(channels, backend=backend, **kwargs)
    shape = {BatchNorm1d: (8, channels), BatchNorm2d: (4, channels, 3, 3)}.get(
        cls, (2, channels, 2, 2, 2)
    )
    bn(torch.randn(*shape) * 2 + 1)  # running stats no longer at their initial values
    return bn


# --- one value per channel -------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "cls, shape",
    [(BatchNorm1d, (1, 5)), (BatchNorm2d, (1, 5, 1, 1)), (BatchNorm3d, (1, 5, 1, 1, 1))],
)
def test_one_value_per_channel_in_training_names_the_remedies(cls, shape, backend):
    bn = _warmed_up(cls, 5, backend)
    before = _snapshot(bn)
    with pytest.raises(ValueError) as info:
        bn(torch.randn(*shape))
    message = str(info.value)
    assert "more than one value per channel" in message
    assert "model.eval()" in message and "GroupNorm" in message and "larger" in message
    # torch itself increments num_batches_tracked before rejecting the batch; we do not.
    _assert_unchanged(bn, before)


def test_one_value_per_channel_is_fine_in_eval():
    bn = _warmed_up(BatchNorm2d, 5).eval()
    x = torch.randn(1, 5, 1, 1)
    y = bn(x)
    expected = torch.nn.functional.batch_norm(
        x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.1, bn.eps
    )
    assert torch.equal(y, expected)


def test_one_value_per_channel_without_running_stats_in_eval_still_errors_clearly():
    # track_running_stats=False normalizes with batch statistics even in eval: same error.
    bn = BatchNorm1d(4, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="more than one value per channel"):
        bn(torch.randn(1, 4))


@pytest.mark.parametrize("backend", [None, "torch", "cpu", "explicit"])
def test_one_value_per_channel_is_named_before_a_dtype_mismatch(backend):
    # torch checks the batch size before its kernel sees the dtypes: a batch of one float64
    # sample into a float32 layer raises ValueError there, and so it does here.
    bn = BatchNorm1d(3, backend=backend)
    with pytest.raises(ValueError, match="more than one value per channel"):
        bn(torch.randn(1, 3, dtype=torch.float64))
    with pytest.raises(ValueError):
        torch.nn.BatchNorm1d(3)(torch.randn(1, 3, dtype=torch.float64))


# --- wrong number of dimensions or channels --------------------------------------------------


@pytest.mark.parametrize(
    "cls, shape, hint",
    [
        (BatchNorm1d, (2, 3, 4, 5), "BatchNorm2d"),
        (BatchNorm2d, (2, 3, 4), "BatchNorm1d"),
        (BatchNorm2d, (2, 3, 4, 4, 4), "BatchNorm3d"),
        (BatchNorm3d, (2, 3, 4, 4), "BatchNorm2d"),
        (BatchNorm1d, (3,), "unsqueeze"),
    ],
)
def test_wrong_number_of_dimensions_suggests_the_right_layer(cls, shape, hint):
    bn = _warmed_up(cls, 3)
    before = _snapshot(bn)
    with pytest.raises(ValueError) as info:
        bn(torch.randn(*shape))
    assert f"{len(shape)}D" in str(info.value) or f"{len(shape)}-D" in str(info.value)
    assert hint in str(info.value)
    _assert_unchanged(bn, before)


@pytest.mark.parametrize("cls, shape", [(BatchNorm1d, (4, 7)), (BatchNorm2d, (4, 7, 3, 3))])
def test_wrong_number_of_channels_says_which_axis(cls, shape):
    bn = _warmed_up(cls, 3)
    before = _snapshot(bn)
    with pytest.raises(ValueError) as info:
        bn(torch.randn(*shape))
    message = str(info.value)
    assert "3" in message and "7" in message and "axis 1" in message
    _assert_unchanged(bn, before)


def test_channels_last_tensor_with_channels_on_the_wrong_axis():
    # A NHWC array passed as if it were NCHW: 3 channels expected, the last axis has them.
    bn = _warmed_up(BatchNorm2d, 3)
    with pytest.raises(ValueError, match="permute"):
        bn(torch.randn(4, 8, 8, 3))


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("running_mean", {"running_mean": torch.zeros(4), "running_var": torch.ones(3)}),
        ("running_var", {"running_mean": torch.zeros(3), "running_var": torch.ones(3, 1)}),
        ("weight", {"weight": torch.ones(2)}),
        ("bias", {"bias": torch.zeros(5)}),
    ],
)
def test_functional_parameter_shapes_are_named(name, kwargs):
    args = {"running_mean": None, "running_var": None, "weight": None, "bias": None}
    args.update(kwargs)
    with pytest.raises(ValueError) as info:
        batch_norm(torch.randn(4, 3), training=True, **args)
    assert str(info.value).startswith(name)
    assert "(3,)" in str(info.value)


@pytest.mark.parametrize("x", [torch.randn(5), torch.tensor(2.0)], ids=["1d", "0d"])
def test_functional_input_without_a_channel_axis_raises_what_torch_raises(x):
    """torch's functional batch norm raises IndexError for 0-D and 1-D input in training
    (looking for axis 1): ours is an IndexError there too (and in eval), and a ValueError as
    before, with the remedy."""
    with pytest.raises(IndexError):
        torch.nn.functional.batch_norm(x, None, None, training=True)
    for stats in ((None, None), (torch.zeros(5), torch.ones(5))):
        with pytest.raises(IndexError, match="x.unsqueeze\\(0\\)") as info:
            batch_norm(x, *stats, training=stats[0] is None)
        assert isinstance(info.value, ValueError)


def test_functional_needs_both_running_stats_or_neither():
    with pytest.raises(ValueError, match="both running_mean and running_var"):
        batch_norm(torch.randn(4, 3), torch.zeros(3), None, training=True)


def test_functional_eval_without_running_stats():
    with pytest.raises(ValueError, match="needs running_mean and running_var"):
        batch_norm(torch.randn(4, 3), None, None, training=False)


def test_non_tensor_input():
    with pytest.raises(TypeError, match="torch.Tensor"):
        batch_norm(np.zeros((4, 3)), None, None, training=True)


# --- dtypes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_integer_input_is_refused_with_a_conversion_hint(dtype):
    bn = _warmed_up(BatchNorm2d, 3)
    before = _snapshot(bn)
    with pytest.raises(TypeError) as info:
        bn(torch.ones(4, 3, 2, 2, dtype=dtype))
    assert "floating-point" in str(info.value) and ".float()" in str(info.value)
    _assert_unchanged(bn, before)


def test_float64_input_with_float32_layer_is_refused_with_both_remedies():
    bn = _warmed_up(BatchNorm2d, 3)
    before = _snapshot(bn)
    with pytest.raises(TypeError) as info:
        bn(torch.randn(4, 3, 2, 2, dtype=torch.float64))
    message = str(info.value)
    assert "mixed dtypes" in message and "torch.float64" in message and "torch.float32" in message
    assert "module.to(" in message
    _assert_unchanged(bn, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_with_float32_layer_is_allowed_mixed_precision(dtype):
    bn = BatchNorm2d(3, backend="explicit")
    x = torch.randn(4, 3, 2, 2).to(dtype)
    y = bn(x)
    assert y.dtype == dtype
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("backend", [None, "torch", "cpu", "explicit"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("params_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_half_input_with_parameters_and_statistics_of_two_dtypes(backend, training, params_dtype):
    # PyTorch's CPU kernel refuses a bfloat16 input with bfloat16 parameters and float32
    # statistics (or the other way round) with "expected scalar type BFloat16 but found Float",
    # in eval with an internal assert: where it runs, one error with the remedies, before
    # anything changes; the cpu and explicit backends take the mix.
    stats_dtype = torch.float32 if params_dtype == torch.bfloat16 else torch.bfloat16
    bn = BatchNorm2d(3, backend=backend).to(params_dtype).train(training)
    bn.running_mean = bn.running_mean.to(stats_dtype)
    bn.running_var = bn.running_var.to(stats_dtype)
    before = copy.deepcopy(bn.state_dict())
    x = torch.randn(4, 3, 2, 2).bfloat16()
    if backend in ("cpu", "explicit"):
        y = bn(x)
        assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
        return
    with pytest.raises(RuntimeError, match="all of one dtype") as info:
        bn(x)
    assert isinstance(info.value, TypeError)
    assert "module.float()" in str(info.value) and "running_mean" in str(info.value)
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key])
    with pytest.raises(RuntimeError):  # torch's own kernel refuses the same call
        torch.nn.functional.batch_norm(
            x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training
        )


def test_float32_input_with_half_parameters_is_refused():
    with pytest.raises(TypeError, match="mixed dtypes"):
        batch_norm(torch.randn(4, 3), None, None, torch.ones(3, dtype=torch.float16), None, True)


def test_integer_parameters_are_refused():
    with pytest.raises(TypeError, match="weight must be floating point"):
        batch_norm(torch.randn(4, 3), None, None, torch.ones(3, dtype=torch.int64), None, True)


def test_device_mismatch_is_named():
    x = torch.empty(4, 3, device="meta")
    with pytest.raises(ValueError, match="move the module"):
        batch_norm(x, None, None, torch.ones(3), None, True)


# --- hyper-parameters ------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [-0.1, 1.5])
def test_momentum_out_of_range_is_accepted_as_torch_does_with_a_warning(momentum):
    with pytest.warns(UserWarning, match=r"outside \[0, 1\]") as record:
        ours = BatchNorm1d(3, momentum=momentum)
    assert record[0].filename == __file__
    native = torch.nn.BatchNorm1d(3, momentum=momentum)
    x = torch.randn(6, 3)
    torch.testing.assert_close(ours(x), native(x), rtol=0, atol=0)
    torch.testing.assert_close(ours.running_var, native.running_var, rtol=0, atol=0)


def test_nan_momentum_is_refused_before_it_poisons_the_statistics():
    with pytest.raises(ValueError, match="NaN"):
        BatchNorm1d(3, momentum=float("nan"))


@pytest.mark.parametrize("name", ["BatchNorm1d", "SyncBatchNorm", "GhostBatchNorm", "BatchRenorm"])
def test_keras_style_momentum_warns_with_the_converted_value_at_the_callers_line(name):
    import batchnorm.nn

    with pytest.warns(UserWarning, match=r"momentum=0.01") as record:
        getattr(batchnorm.nn, name)(3, momentum=0.99)
    assert record[0].filename == __file__  # the user's line, not a constructor inside the package


def test_default_momentum_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BatchNorm1d(3)
        BatchNorm1d(3, momentum=None)


@pytest.mark.parametrize("eps", [-1e-5, float("nan"), "1e-5"])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        batch_norm(torch.randn(4, 3), None, None, training=True, eps=eps)


def test_unknown_nonfinite_policy():
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        batch_norm(torch.randn(4, 3), None, None, training=True, nonfinite="ignore")


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ValueError, match="explicit"):
        batch_norm(torch.randn(4, 3), None, None, training=True, backend="cudnn")


# --- empty tensors ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4, 4), (2, 3, 0, 4)])
def test_empty_batch_gives_empty_output_and_leaves_the_stats_alone(shape, backend):
    cls = BatchNorm1d if len(shape) == 2 else BatchNorm2d
    bn = _warmed_up(cls, 3, backend)
    native = getattr(torch.nn, cls.__name__)(3)
    native.load_state_dict(bn.state_dict())
    before = _snapshot(bn)
    x = torch.randn(*shape, requires_grad=True)
    y = bn(x)
    native(x)
    assert y.shape == x.shape
    # As torch.nn: the statistics stay, the batch is counted (so momentum=None averages agree).
    assert bn.num_batches_tracked == native.num_batches_tracked == before["num_batches_tracked"] + 1
    bn.num_batches_tracked.sub_(1)
    _assert_unchanged(bn, before)
    y.sum().backward()  # connected to the parameters, zero gradients
    assert torch.equal(bn.weight.grad, torch.zeros(3))
    assert torch.equal(bn.bias.grad, torch.zeros(3))
    assert x.grad.shape == x.shape


def test_cumulative_average_after_an_empty_batch_equals_torch():
    ours, native = BatchNorm1d(3, momentum=None), torch.nn.BatchNorm1d(3, momentum=None)
    for x in (torch.randn(0, 3), torch.randn(5, 3) + 4, torch.randn(7, 3)):
        ours(x), native(x)
    torch.testing.assert_close(ours.state_dict(), native.state_dict(), rtol=0, atol=0)


def test_empty_batch_of_another_dtype_and_1d_empty_input_pass_as_in_torch():
    bn = BatchNorm1d(3)
    with pytest.warns(UserWarning, match="empty torch.float64 batch"):
        y = bn(torch.empty(0, 3, dtype=torch.float64))
    assert y.shape == (0, 3) and y.dtype == torch.float64
    with pytest.warns(UserWarning, match="empty 1-D input"):
        y = batch_norm(torch.empty(0), None, None, training=True)
    assert y.shape == (0,)


def test_empty_batch_in_eval():
    bn = _warmed_up(BatchNorm2d, 3).eval()
    assert bn(torch.randn(0, 3, 2, 2)).shape == (0, 3, 2, 2)


# --- NaN and Inf -----------------------------------------------------------------------------


def _poisoned(shape=(8, 3, 2, 2), value=float("nan")):
    x = torch.randn(*shape)
    x[3, 1, 0, 1] = value
    return x


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_raise_refuses_before_touching_anything(value, backend):
    bn = _warmed_up(BatchNorm2d, 3, backend, nonfinite="raise")
    before = _snapshot(bn)
    with pytest.raises(FloatingPointError) as info:
        bn(_poisoned(value=value))
    assert "1 NaN/Inf" in str(info.value) and "nonfinite='skip'" in str(info.value)
    _assert_unchanged(bn, before)
    bn(torch.randn(8, 3, 2, 2))  # a clean batch afterwards trains normally
    assert bn.num_batches_tracked.item() == before["num_batches_tracked"].item() + 1


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nonfinite_skip_keeps_running_stats_and_counts_only_clean_batches(backend):
    bn = _warmed_up(BatchNorm2d, 3, backend, nonfinite="skip")
    before = _snapshot(bn)
    y = bn(_poisoned())
    assert torch.isnan(y).any()  # the NaN is visible in the output, not hidden
    _assert_unchanged(bn, before)
    clean = torch.randn(8, 3, 2, 2)
    twin = copy.deepcopy(bn)
    twin.nonfinite = "propagate"
    bn(clean)
    twin(clean)
    for key, value in twin.state_dict().items():
        assert torch.equal(bn.state_dict()[key], value), key


def test_nonfinite_propagate_is_torchs_behaviour():
    ours = _warmed_up(BatchNorm2d, 3)
    theirs = torch.nn.BatchNorm2d(3)
    theirs.load_state_dict(ours.state_dict())
    x = _poisoned()
    ours(x)
    theirs(x)
    assert torch.isnan(ours.running_mean[1]) and torch.isnan(theirs.running_mean[1])
    assert torch.isfinite(ours.running_mean[[0, 2]]).all()


def test_nonfinite_does_not_matter_in_eval():
    bn = _warmed_up(BatchNorm2d, 3, nonfinite="raise").eval()
    before = _snapshot(bn)
    y = bn(_poisoned())  # eval updates nothing, so there is nothing to protect
    assert torch.isnan(y[3, 1, 0, 1])
    _assert_unchanged(bn, before)


def test_nonfinite_skip_in_functional_api():
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    batch_norm(_poisoned(), running_mean, running_var, training=True, nonfinite="skip")
    assert torch.equal(running_mean, torch.zeros(3)) and torch.equal(running_var, torch.ones(3))


# --- zero variance and large means -----------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_variance_channel_gives_finite_output_and_gradients(backend):
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64)
    x[:, 1] = 7.0  # a dead channel: every value identical
    x.requires_grad_(True)
    bn = BatchNorm2d(3, backend=backend, dtype=torch.float64)
    y = bn(x)
    assert torch.isfinite(y).all()
    assert_close(y[:, 1], bn.bias[1].expand_as(y[:, 1]), rtol=0, atol=0, name="dead channel")
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(bn.weight.grad).all()
    assert torch.equal(bn.running_var[1], torch.tensor(0.9, dtype=torch.float64))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_mean_float32_keeps_full_accuracy_in_the_statistics(backend):
    # x = 1e4 + randn: E[x^2] - E[x]^2 in float32 would lose every significant digit of the
    # variance (1e8 vs 1 with 24-bit mantissas); the statistics must stay at float32 precision.
    gen = torch.Generator().manual_seed(0)
    x = 1e4 + torch.randn(64, 4, 8, 8, generator=gen)
    bn = BatchNorm2d(4, momentum=1.0, backend=backend)
    y = bn(x)
    x64 = x.double().numpy()
    mean = x64.mean(axis=(0, 2, 3))
    var = x64.var(axis=(0, 2, 3), ddof=1)
    assert_close(bn.running_mean.double(), torch.from_numpy(mean), rtol=1e-6, atol=0, name="mean")
    assert_close(bn.running_var.double(), torch.from_numpy(var), rtol=1e-4, atol=0, name="var")
    out, _ = reference.bn_forward(x64, np.ones(4), np.zeros(4), bn.eps)
    assert_close(y.double(), torch.from_numpy(out), rtol=0, atol=2e-3, name="output")


def test_eps_zero_in_training_runs_on_the_explicit_backend():
    # PyTorch's native kernel refuses eps=0 with batch statistics; the theory of gradient
    # explosion (Yang et al. 2019) needs it. "auto" moves to the explicit backend silently, an
    # explicit request for "torch" warns.
    x = torch.randn(6, 3, dtype=torch.float64)
    bn = BatchNorm1d(3, eps=0.0, dtype=torch.float64)
    y = bn(x)
    assert bn.last_backend == "explicit"
    expected, _ = reference.bn_forward(x.numpy(), np.ones(3), np.zeros(3), 0.0)
    assert_close(y, torch.from_numpy(expected), rtol=1e-12, atol=1e-12, name="eps=0 output")
    from batchnorm import backends

    backends._warned.clear()
    with pytest.warns(RuntimeWarning, match="eps=0"):
        batch_norm(x, None, None, training=True, eps=0.0, backend="torch")
    bn.eval()
    bn(x)  # eval with eps=0 and positive running_var is fine on the native kernel
    assert bn.last_backend == "torch"


def _tiny_spread(shape, dtype=torch.float32):
    """Values around 3e-22 spread by 1e-22: their variance (~1e-44) is subnormal in float32."""
    gen = torch.Generator().manual_seed(5)
    return ((torch.randn(shape, generator=gen) + 3) * 1e-22).to(dtype)


def _normalized64(x: torch.Tensor, dims) -> torch.Tensor:
    x64 = x.double()
    mean = x64.mean(dims, keepdim=True)
    return (x64 - mean) / x64.var(dims, unbiased=False, keepdim=True).sqrt()


@pytest.mark.parametrize("backend", ["auto", "torch", "explicit", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_eps_zero_measures_a_tiny_variance_instead_of_dividing_by_zero(backend, dtype):
    # At eps = 0, float32 statistics round a variance under ~1e-38 to a few digits or to 0, and
    # the output became +-inf (torch, explicit and Triton alike; the C++ kernels redo such
    # channels in float64, tests/test_cpu_kernels.py). The explicit backend now takes float64
    # statistics at such eps, and the others route there.
    from batchnorm import backends

    x = _tiny_spread((16, 3, 2, 2), dtype).requires_grad_()
    dy = torch.randn(16, 3, 2, 2, generator=torch.Generator().manual_seed(6))
    rm, rv = torch.zeros(3), torch.ones(3)
    backends._warned.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the routing warns once, by design
        y = batch_norm(x, rm, rv, training=True, momentum=1.0, eps=0.0, backend=backend)
    assert backends.last_backend() == "explicit"
    (dx,) = torch.autograd.grad(y, x, dy.to(dtype))
    dims = (0, 2, 3)
    expected = _normalized64(x.detach(), dims)
    tol = 2e-6 if dtype == torch.float32 else 1e-2
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    assert (y.double() - expected).abs().max() < tol * 4
    x64 = x.detach().double().requires_grad_()
    (dx64,) = torch.autograd.grad(_normalized64(x64, dims), x64, dy.to(dtype).double())
    assert ((dx.double() - dx64).abs().max() / dx64.abs().max()) < tol * 10
    # The running variance is the float64 value, rounded to float32 (a subnormal here).
    torch.testing.assert_close(
        rv, x.detach().double().var(dims, unbiased=True).float(), rtol=1e-5, atol=3e-45
    )


def test_eps_zero_where_cpu_cannot_run_falls_back_to_explicit_not_torch():
    # float64 is not a dtype of the C++ kernels; torch's kernel would refuse eps = 0.
    from batchnorm import backends

    x = torch.randn(6, 3, dtype=torch.float64)
    backends._warned.clear()
    with pytest.warns(RuntimeWarning, match="backend 'cpu' unavailable .*using 'explicit'"):
        y = batch_norm(x, None, None, training=True, eps=0.0, backend="cpu")
    assert backends.last_backend() == "explicit"
    expected, _ = reference.bn_forward(x.numpy(), np.ones(3), np.zeros(3), 0.0)
    assert_close(y, torch.from_numpy(expected), rtol=1e-12, atol=1e-12, name="eps=0 output")


def test_eps_zero_norms_over_other_axes_and_second_derivatives_stay_finite():
    # The same primitive runs layer and group norm and the differentiable (double) backward.
    from batchnorm.functional import group_norm, layer_norm

    x = _tiny_spread((4, 6, 5))
    y = layer_norm(x, (6, 5), eps=0.0, backend="explicit")
    assert torch.isfinite(y).all()
    assert (y.double() - _normalized64(x, (1, 2))).abs().max() < 1e-5
    y = group_norm(x, 2, eps=0.0, backend="explicit")
    expected = _normalized64(x.reshape(4, 2, 15), (2,)).reshape(4, 6, 5)
    assert (y.double() - expected).abs().max() < 1e-5
    # A gradient penalty's second derivative (the values are ~1e22: 1 / std), against float64.
    v = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(7)) * 1e-22
    w = torch.arange(4.0).reshape(4, 1, 1)
    grads = []
    for xg in (x.clone().requires_grad_(), x.double().requires_grad_()):
        if xg.dtype == torch.float32:
            y = batch_norm(xg, None, None, training=True, eps=0.0, backend="explicit")
        else:
            y = _normalized64(xg, (0, 2))
        (dx,) = torch.autograd.grad((y * w).sum(), xg, create_graph=True)
        (ddx,) = torch.autograd.grad((dx * v).sum(), xg)
        grads.append((dx.double(), ddx.double()))
    (dx, ddx), (dx64, ddx64) = grads
    assert torch.isfinite(dx).all() and torch.isfinite(ddx).all()
    assert (dx - dx64).abs().max() / dx64.abs().max() < 1e-5
    assert (ddx - ddx64).abs().max() / ddx64.abs().max() < 1e-4


@pytest.mark.parametrize("norm", ["LayerNorm", "GroupNorm", "InstanceNorm1d", "GhostBatchNorm"])
def test_other_norms_at_eps_zero_run_float64_statistics_under_auto(norm):
    # torch's layer, group and instance norm accept eps = 0 with float32 statistics (10-25 %
    # off at this spread); the batch-norm kernel under GhostBatchNorm refuses it.
    import batchnorm.nn as bnn

    x = _tiny_spread((8, 6, 5))
    layer, dims, view = {
        "LayerNorm": (bnn.LayerNorm((6, 5), eps=0.0), (1, 2), (8, 6, 5)),
        "GroupNorm": (bnn.GroupNorm(2, 6, eps=0.0), (2,), (8, 2, 15)),
        "InstanceNorm1d": (bnn.InstanceNorm1d(6, eps=0.0), (2,), (8, 6, 5)),
        "GhostBatchNorm": (bnn.GhostBatchNorm(6, eps=0.0, virtual_batch_size=4), (1, 3),
                           (2, 4, 6, 5)),
    }[norm]  # fmt: skip
    y = layer(x)
    assert layer.last_backend == "explicit"
    expected = _normalized64(x.reshape(view), dims).reshape(8, 6, 5)
    assert (y.double() - expected).abs().max() < 1e-5
    if norm == "GhostBatchNorm":
        from batchnorm import backends

        class MyGhost(bnn.GhostBatchNorm):  # a user subclass runs the same kernel
            pass

        for ghost in (layer, MyGhost(6, eps=0.0, virtual_batch_size=4)):
            backends._warned.clear()
            ghost.backend = "torch"  # the batch-norm kernel refuses eps = 0: warned, explicit
            with pytest.warns(RuntimeWarning, match="eps=0"):
                ghost(x)
            assert ghost.last_backend == "explicit"
    else:
        layer.backend = "torch"  # asked for: PyTorch's kernel, as torch.nn runs it
        layer(x)
        assert layer.last_backend == "torch"


@pytest.mark.parametrize("backend", ["auto", "cpu", "explicit"])
def test_eps_zero_with_a_constant_channel_says_so_instead_of_a_silent_nan(backend):
    # Variance 0 at eps = 0 (a dead ReLU channel) normalizes to 0/0: warned, naming the channel;
    # under nonfinite="raise" refused before anything is updated.
    x = torch.randn(8, 3, 4, generator=torch.Generator().manual_seed(2))
    x[:, 1] = 0.0
    with pytest.warns(RuntimeWarning, match=r"1 of 3 channel\(s\) .*first: 1\)"):
        y = batch_norm(x, None, None, training=True, eps=0.0, backend=backend)
    assert torch.isnan(y[:, 1]).all() and torch.isfinite(y[:, [0, 2]]).all()
    bn = BatchNorm1d(3, eps=0.0, nonfinite="raise", backend=backend)
    before = _snapshot(bn)
    with pytest.raises(FloatingPointError, match="variance 0"):
        bn(x)
    _assert_unchanged(bn, before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning where every channel varies, or eps > 0
        batch_norm(torch.randn(8, 3, 4), None, None, training=True, eps=0.0, backend=backend)
        batch_norm(x, None, None, training=True, eps=1e-5, backend=backend)


def test_eps_zero_check_leaves_meta_and_fake_tensors_alone():
    # A model built on the meta device, or shape propagation under fake tensors, has no values
    # to check: the forward gives shapes as with eps > 0 instead of failing on .item().
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = BatchNorm1d(3, eps=0.0, device="meta")
    assert layer(torch.randn(8, 3, device="meta")).shape == (8, 3)
    with FakeTensorMode():
        assert BatchNorm1d(3, eps=0.0)(torch.randn(8, 3)).shape == (8, 3)


def test_eps_zero_constant_groups_of_the_other_norms_are_named():
    import batchnorm.nn as bnn

    x = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(3))
    x[2] = 1.0  # sample 2 constant: its layer, groups and instances
    cases = [
        (bnn.LayerNorm((6, 5), eps=0.0), r"1 of 4 sample\(s\).*first: 2\)"),
        (bnn.GroupNorm(2, 6, eps=0.0), r"2 of 8 \(sample, group\).*first: \(2, 0\), \(2, 1\)"),
        (bnn.InstanceNorm1d(6, eps=0.0), r"6 of 24 \(sample, channel\)"),
    ]
    for layer, pattern in cases:
        with pytest.warns(RuntimeWarning, match=pattern):
            layer(x)
    x = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(4))
    x[:2, 3] = 7.0  # channel 3 constant within the first ghost batch only
    with pytest.warns(RuntimeWarning, match=r"1 of 12 \(ghost batch, channel\).*\(0, 3\)"):
        bnn.GhostBatchNorm(6, eps=0.0, virtual_batch_size=2)(x)
    x[:, 3] = 7.0
    with pytest.warns(RuntimeWarning, match=r"BatchRenorm .*1 of 6 channel\(s\)"):
        bnn.BatchRenorm(6, eps=0.0)(x)


def test_nonfinite_raise_catches_statistics_that_overflow_from_finite_inputs():
    bn = BatchNorm1d(3, nonfinite="raise")
    before = _snapshot(bn)
    x = torch.randn(8, 3) * 1e19  # finite, but x^2 overflows float32
    assert torch.isfinite(x).all()
    with pytest.raises(FloatingPointError, match="overflow"):
        bn(x)
    _assert_unchanged(bn, before)


@pytest.mark.parametrize("name", ["GhostBatchNorm", "BatchRenorm"])
def test_momentum_one_keeps_exactly_the_last_batch_statistics(name):
    import batchnorm.nn

    kwargs = {"virtual_batch_size": 8} if name == "GhostBatchNorm" else {}
    layer = getattr(batchnorm.nn, name)(3, momentum=1.0, **kwargs)
    native = torch.nn.BatchNorm1d(3, momentum=1.0)
    with torch.no_grad():
        layer.running_mean.fill_(1e8)  # large against the batch: r + (new - r) cancels to 0
        native.running_mean.fill_(1e8)
    # Seeded, and an absolute floor of float32 rounding: a channel mean near 0 makes a purely
    # relative comparison of two float32 reductions fail by chance.
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    layer(x), native(x)
    torch.testing.assert_close(layer.running_mean, native.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(layer.running_var, native.running_var, rtol=1e-5, atol=0)
    assert layer.running_mean.abs().min() > 0


@pytest.mark.parametrize("name", ["GhostBatchNorm", "BatchRenorm"])
def test_ghost_and_renorm_honour_nonfinite(name):
    import batchnorm.nn

    kwargs = {"virtual_batch_size": 4} if name == "GhostBatchNorm" else {}
    poisoned = torch.randn(8, 3)
    poisoned[0, 1] = float("nan")
    skip = getattr(batchnorm.nn, name)(3, nonfinite="skip", **kwargs)
    skip(torch.randn(8, 3))
    before = _snapshot(skip)
    skip(poisoned)
    _assert_unchanged(skip, before)  # statistics and count kept
    strict = getattr(batchnorm.nn, name)(3, nonfinite="raise", **kwargs)
    before = _snapshot(strict)
    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        strict(poisoned)
    _assert_unchanged(strict, before)
    assert "nonfinite='raise'" in repr(strict)


@pytest.mark.parametrize("name", ["GhostBatchNorm", "BatchRenorm"])
def test_ghost_and_renorm_check_momentum_and_eps_when_changed(name):
    import batchnorm.nn

    layer = getattr(batchnorm.nn, name)(3)
    layer.momentum = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layer(torch.randn(8, 3))
    layer.momentum, layer.eps = 0.1, float("nan")
    with pytest.raises(ValueError, match="eps"):
        layer(torch.randn(8, 3))
    assert torch.isfinite(layer.running_mean).all()


@pytest.mark.parametrize("backend", ["torch", "explicit"])
def test_group_norm_of_one_value_per_group_raises_where_torch_does_and_warns_elsewhere(backend):
    import batchnorm.nn
    from batchnorm.functional import group_norm

    # torch raises for a batch of one (its check counts N * C/G * spatial values); the explicit
    # backend returned the bias there, silently
    with pytest.raises(ValueError, match="one value in each"):
        group_norm(torch.randn(1, 6, 1), 6, backend=backend)
    with pytest.raises(ValueError):
        torch.nn.functional.group_norm(torch.randn(1, 6, 1), 6)
    with pytest.raises(ValueError, match="one value in each"):
        batchnorm.nn.GroupNorm(4, 4, backend=backend)(torch.randn(1, 4, 1, 1))
    # larger batches: torch's answer (every output the bias), with a warning
    with pytest.warns(UserWarning, match=r"every output is the bias.*fewer groups"):
        y = group_norm(torch.randn(3, 4, 1, 1), 4, bias=torch.arange(4.0), backend=backend)
    bias = torch.arange(4.0).reshape(1, 4, 1, 1).expand(3, 4, 1, 1)
    torch.testing.assert_close(y, bias, atol=1e-4, rtol=0)  # torch's kernel: rounding / sqrt(eps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        group_norm(torch.randn(1, 6, 1), 2, backend=backend)  # 3 values per group: fine
        group_norm(torch.randn(0, 6), 6, backend=backend)  # empty: nothing to say


@pytest.mark.parametrize("norm", ["layer", "group", "instance"])
def test_empty_batches_of_the_other_norms_run_without_warnings(norm):
    # torch's kernels return an empty output quietly; the explicit primitives warned of
    # "degrees of freedom <= 0" from var_mean over no group at all
    from batchnorm import functional as bf

    x = torch.randn(0, 6, 3, requires_grad=True)
    w, b = torch.ones(6, requires_grad=True), torch.zeros(6, requires_grad=True)
    calls = {
        "layer": lambda: bf.layer_norm(x, (3,), backend="explicit"),
        "group": lambda: bf.group_norm(x, 2, w, b, backend="explicit"),
        "instance": lambda: bf.instance_norm(x, weight=w, bias=b, backend="explicit"),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = calls[norm]()
        y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape


@pytest.mark.parametrize("backend", ["torch", "explicit"])
def test_layer_norm_over_one_value_warns_that_the_output_is_the_bias(backend):
    import batchnorm.nn
    from batchnorm.functional import layer_norm

    x = torch.randn(4, 5, 1)
    with pytest.warns(UserWarning, match=r"every output is the bias.*perhaps \(1,\)"):
        y = layer_norm(x, (1,), bias=torch.full((1,), 0.5), backend=backend)
    torch.testing.assert_close(y, torch.full_like(y, 0.5), atol=1e-3, rtol=0)
    with pytest.warns(UserWarning, match="every output is the bias"):
        batchnorm.nn.LayerNorm(1, backend=backend)(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer_norm(torch.randn(4, 5), (5,), backend=backend)
        batchnorm.nn.LayerNorm(5, backend=backend)(torch.randn(4, 5))
        layer_norm(torch.randn(0, 1), (1,), backend=backend)  # empty: nothing to say
