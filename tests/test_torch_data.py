"""PyTorch's own test data, run against the drop-ins: every ``module_db`` sample and error input
of the modules we mirror, and every OpInfo sample and error input of the functionals.

Where torch runs, ours must give the same numbers bit for bit (float64, the default backend);
where torch raises, ours must raise an instance of the same exception class. The one documented
superset: batch norm with ``eps=0`` in training runs (on the ``explicit`` backend) where torch
refuses it. The batch-norm samples also run on the C++ CPU kernels (``backend="cpu"``, float32
and bfloat16), which agree with torch to rounding rather than bit for bit.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("expecttest")  # torch's internal test helpers import it

from torch.testing._internal import common_methods_invocations as cmi  # noqa: E402
from torch.testing._internal import common_modules as cm  # noqa: E402

import batchnorm.functional as bf  # noqa: E402
import batchnorm.nn as bnn  # noqa: E402

MIRRORED = {
    name: getattr(bnn, name)
    for name in (
        "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm", "InstanceNorm1d",
        "InstanceNorm2d", "InstanceNorm3d", "LayerNorm",
    )
}  # fmt: skip
MODULES = [info for info in cm.module_db if info.module_cls.__name__ in MIRRORED]
FUNCTIONALS = {
    "nn.functional.batch_norm": bf.batch_norm,
    "nn.functional.layer_norm": bf.layer_norm,
    "nn.functional.group_norm": bf.group_norm,
    "nn.functional.instance_norm": bf.instance_norm,
}
OPS = [op for op in cmi.op_db if op.name in FUNCTIONALS and op.variant_test_name == ""]


def _run(fn):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(), None
    except Exception as error:  # noqa: BLE001 - the exception is the result compared
        return None, error


def _same(ours, theirs, backend: str = "auto") -> None:
    """Bit for bit where ours runs torch's kernel (auto on the CPU); to float64 rounding on the
    explicit backend, whose statistics and backward are its own."""
    if isinstance(theirs, torch.Tensor):
        tol = {"rtol": 0, "atol": 0} if backend == "auto" else {"rtol": 1e-9, "atol": 1e-12}
        torch.testing.assert_close(ours, theirs, equal_nan=True, **tol)


def _is_documented_superset(error: Exception | None, kwargs: dict) -> bool:
    return error is not None and "eps must be positive" in str(error) and kwargs.get("eps") == 0


def test_the_catalogues_cover_every_mirrored_module_and_functional() -> None:
    assert {info.module_cls.__name__ for info in MODULES} == set(MIRRORED)
    assert {op.name for op in OPS} == set(FUNCTIONALS)


@pytest.mark.parametrize("backend", ["auto", "explicit"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("info", MODULES, ids=lambda info: info.module_cls.__name__)
def test_module_db_samples(info, training: bool, backend: str) -> None:
    from batchnorm.backends import use_backend

    with use_backend(backend):
        _module_db_samples(info, training, backend)


def _module_db_samples(info, training: bool, backend: str) -> None:
    ours_cls = MIRRORED[info.module_cls.__name__]
    samples = info.module_inputs_func(
        info, device="cpu", dtype=torch.float64, requires_grad=True, training=training
    )
    ran = 0
    for sample in samples:
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        f_args, f_kwargs = sample.forward_input.args, sample.forward_input.kwargs
        results = []
        for cls in (info.module_cls, ours_cls):
            torch.manual_seed(0)
            module, error = _run(lambda cls=cls: cls(*args, **kwargs).double().train(training))
            assert error is None, f"{cls.__name__}{args}{kwargs}: {error!r}"
            inputs = [t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) else t
                      for t in f_args]  # fmt: skip
            out, error = _run(lambda m=module, i=inputs: m(*i, **f_kwargs))
            grads = None
            if out is not None and out.requires_grad and out.numel() > 0:
                torch.manual_seed(1)
                dy = torch.randn_like(out)
                leaves = [t for t in (*inputs, *module.parameters()) if t.requires_grad]
                grads = torch.autograd.grad(out, leaves, dy, allow_unused=True)
            results.append((module, out, error, grads))
        (theirs, y_t, err_t, g_t), (ours, y_o, err_o, g_o) = results
        where = f"{ours_cls.__name__}{args}{kwargs} on {[getattr(t, 'shape', t) for t in f_args]}"
        if err_t is not None:
            assert err_o is not None, f"{where}: torch raised {err_t!r}, ours ran"
            assert isinstance(err_o, type(err_t)), f"{where}: {err_o!r} is no {type(err_t)}"
            continue
        assert err_o is None, f"{where}: ours raised {err_o!r}"
        ran += 1
        _same(y_o, y_t, backend)
        for a, b in zip(g_o or (), g_t or ()):
            if b is not None:
                _same(a, b, backend)
        for key, value in theirs.state_dict().items():
            _same(ours.state_dict()[key], value, backend)
    assert ran > 0


@pytest.mark.parametrize("backend", ["auto", "explicit"])
@pytest.mark.parametrize(
    "info",
    [info for info in MODULES if info.module_error_inputs_func is not None],
    ids=lambda info: info.module_cls.__name__,
)
def test_module_db_error_inputs(info, backend: str) -> None:
    from batchnorm.backends import use_backend

    with use_backend(backend):
        _module_db_error_inputs(info)


def _module_db_error_inputs(info) -> None:
    ours_cls = MIRRORED[info.module_cls.__name__]
    for error_input in info.module_error_inputs_func(
        info, device="cpu", dtype=torch.float32, requires_grad=False, training=True
    ):
        sample = error_input.module_error_input
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        out, error = _run(
            lambda: ours_cls(*args, **kwargs)(
                *sample.forward_input.args, **sample.forward_input.kwargs
            )
        )
        if error is None and kwargs.get("eps") == 0:
            continue  # the documented superset: eps=0 in training (explicit backend)
        assert isinstance(error, error_input.error_type), (
            f"{ours_cls.__name__}{args}{kwargs}: torch raises {error_input.error_type.__name__} "
            f"({error_input.error_regex}); ours gave {error!r}"
        )


@pytest.mark.parametrize("backend", ["auto", "explicit"])
@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_opinfo_samples(op, backend: str) -> None:
    from batchnorm.backends import use_backend

    with use_backend(backend):
        _opinfo_samples(op, backend)


def _opinfo_samples(op, backend: str) -> None:
    ours = FUNCTIONALS[op.name]
    count = 0
    for sample in op.sample_inputs("cpu", torch.float64, requires_grad=False):
        count += 1
        theirs_out, theirs_err = _run(lambda: op.op(sample.input, *sample.args, **sample.kwargs))
        # Fresh running statistics for ours: torch's call updated the sample's in place.
        sample2 = sample.transform(lambda t: t.clone() if isinstance(t, torch.Tensor) else t)
        ours_out, ours_err = _run(lambda: ours(sample2.input, *sample2.args, **sample2.kwargs))
        if theirs_err is not None:
            assert isinstance(ours_err, type(theirs_err)), (op.name, sample, ours_err)
            continue
        assert ours_err is None, (op.name, sample, ours_err)
        _same(ours_out, theirs_out, backend)
    assert count > 0


@pytest.mark.parametrize("backend", ["auto", "explicit"])
@pytest.mark.parametrize(
    "op", [op for op in OPS if op.error_inputs_func is not None], ids=lambda op: op.name
)
def test_opinfo_error_inputs(op, backend: str) -> None:
    from batchnorm.backends import use_backend

    ours = FUNCTIONALS[op.name]
    with use_backend(backend):
        for error_input in op.error_inputs("cpu"):
            s = error_input.sample_input
            _, error = _run(lambda s=s: ours(s.input, *s.args, **s.kwargs))
            assert isinstance(error, error_input.error_type), (
                op.name, error_input.error_regex, error
            )  # fmt: skip


_CPU_TOLERANCE = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-5},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
}


def _forward_and_grads(module, f_args, f_kwargs):
    inputs = [t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) else t
              for t in f_args]  # fmt: skip
    out, error = _run(lambda: module(*inputs, **f_kwargs))
    grads = None
    if out is not None and out.requires_grad and out.numel() > 0:
        torch.manual_seed(1)
        dy = torch.randn_like(out)
        leaves = [t for t in (*inputs, *module.parameters()) if t.requires_grad]
        grads, error = _run(lambda: torch.autograd.grad(out, leaves, dy, allow_unused=True))
    return out, error, grads


@pytest.mark.usefixtures("cpu_kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "info",
    [info for info in MODULES if info.module_cls.__name__.startswith("BatchNorm")],
    ids=lambda info: info.module_cls.__name__,
)
def test_module_db_samples_on_the_cpu_kernels(info, training: bool, dtype) -> None:
    """Every module_db sample of torch's BatchNorm1d/2d/3d on our layer with backend="cpu": the
    kernels run it (no fallback), and output, gradients and state match torch's to rounding."""
    from batchnorm import backends

    ours_cls = MIRRORED[info.module_cls.__name__]
    tol = _CPU_TOLERANCE[dtype]
    ran = 0
    for sample in info.module_inputs_func(
        info, device="cpu", dtype=dtype, requires_grad=True, training=training
    ):
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        f_args, f_kwargs = sample.forward_input.args, sample.forward_input.kwargs
        torch.manual_seed(0)
        theirs = info.module_cls(*args, **kwargs).to(dtype).train(training)
        torch.manual_seed(0)
        ours = ours_cls(*args, **kwargs, backend="cpu").to(dtype).train(training)
        y_t, err_t, g_t = _forward_and_grads(theirs, f_args, f_kwargs)
        y_o, err_o, g_o = _forward_and_grads(ours, f_args, f_kwargs)
        where = f"{ours_cls.__name__}{args}{kwargs} on {[getattr(t, 'shape', t) for t in f_args]}"
        if err_t is not None:
            assert isinstance(err_o, type(err_t)), f"{where}: {err_o!r} is no {type(err_t)}"
            continue
        assert err_o is None, f"{where}: ours raised {err_o!r}"
        assert ours.last_backend == "cpu" == backends.last_backend(), where
        ran += 1
        torch.testing.assert_close(y_o, y_t, equal_nan=True, **tol)
        for a, b in zip(g_o or (), g_t or ()):
            if b is not None:
                torch.testing.assert_close(a, b, equal_nan=True, **tol)
        for key, value in theirs.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], value, **tol)
    assert ran > 0


@pytest.mark.usefixtures("cpu_kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opinfo_batch_norm_samples_on_the_cpu_kernels(dtype) -> None:
    """Every OpInfo sample of F.batch_norm (both variants) through ours with backend="cpu":
    output, gradients and the updated running statistics match torch's to rounding."""
    from batchnorm import backends

    tol = _CPU_TOLERANCE[dtype]
    ops = [op for op in cmi.op_db if op.name == "nn.functional.batch_norm"]
    count = 0
    for op in ops:
        for sample in op.sample_inputs("cpu", dtype, requires_grad=True):
            mine = sample.transform(
                lambda t: (
                    t.detach().clone().requires_grad_(t.requires_grad)
                    if isinstance(t, torch.Tensor)
                    else t
                )
            )
            y_t, err_t = _run(lambda s=sample: op.op(s.input, *s.args, **s.kwargs))
            y_o, err_o = _run(
                lambda s=mine: bf.batch_norm(s.input, *s.args, **s.kwargs, backend="cpu")
            )
            if err_t is not None:
                assert isinstance(err_o, type(err_t)), (sample, err_o)
                continue
            assert err_o is None, (sample, err_o)
            assert backends.last_backend() == "cpu"
            count += 1
            torch.testing.assert_close(y_o, y_t, equal_nan=True, **tol)
            leaves_t = [t for t in (sample.input, *sample.args) if isinstance(t, torch.Tensor)]
            leaves_o = [t for t in (mine.input, *mine.args) if isinstance(t, torch.Tensor)]
            for a, b in zip(leaves_o, leaves_t):  # the running statistics, updated in place
                torch.testing.assert_close(a, b, **tol)
            if y_t.requires_grad:
                dy = torch.randn_like(y_t)
                pairs = [(a, b) for a, b in zip(leaves_o, leaves_t) if b.requires_grad]
                g_t = torch.autograd.grad(y_t, [b for _, b in pairs], dy, allow_unused=True)
                g_o = torch.autograd.grad(y_o, [a for a, _ in pairs], dy, allow_unused=True)
                for a, b in zip(g_o, g_t):
                    if b is not None:
                        torch.testing.assert_close(a, b, equal_nan=True, **tol)
    assert count > 0
