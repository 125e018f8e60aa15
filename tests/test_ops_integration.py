"""The Triton backend inside the rest of the project: torch.compile without graph breaks,
autocast, the drop-in layers, backend selection, ``batchnorm check`` and ``batchnorm bench``.

Runs the kernels under the Triton interpreter without a GPU (see test_ops_kernels.py).
"""

from __future__ import annotations

import copy
import csv

import numpy as np
import pytest
import torch

import batchnorm.nn as bnn
from batchnorm import backends, ops
from batchnorm.functional import batch_norm, batch_norm_add_relu
from batchnorm.ops._layout import View3, view3
from tests.helpers import assert_close, tolerance

# The `device` fixture (CUDA, else the CPU under the Triton interpreter) is in conftest.py.


class _Block(torch.nn.Module):
    """conv -> BatchNorm2d (triton) -> conv -> relu(bn(.) + shortcut), a ResNet block tail."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = bnn.BatchNorm2d(4, backend="triton")
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = bnn.BatchNorm2d(4, backend="triton")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        bn = self.bn2
        return batch_norm_add_relu(
            self.conv2(h), h, bn.running_mean, bn.running_var, bn.weight, bn.bias,
            self.training, bn.momentum, bn.eps, backend="triton",
        )  # fmt: skip


def test_compiled_model_has_no_graph_breaks(device):
    """torch.compile(fullgraph=True) traces the layers, the functional API and the custom ops
    (their fake implementations give the shapes): one graph, same numbers as eager, running
    statistics updated."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    eager = _Block().to(device)
    compiled_module = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_module, fullgraph=True, backend=counter)
    x = torch.randn(2, 3, 5, 5, device=device)
    out_e = eager(x)
    out_c = compiled(x)
    out_e.square().sum().backward()
    out_c.square().sum().backward()
    assert counter.frame_count == 1
    assert_close(out_c, out_e, rtol=1e-5, atol=1e-5, name="output")
    for (name, p_c), p_e in zip(compiled_module.named_parameters(), eager.parameters()):
        assert_close(p_c.grad, p_e.grad, rtol=1e-4, atol=1e-4, name=f"{name}.grad")
    for name in ("bn1", "bn2"):
        bn_c, bn_e = getattr(compiled_module, name), getattr(eager, name)
        assert not torch.equal(bn_e.running_mean, torch.zeros(4, device=device))
        assert_close(bn_c.running_mean, bn_e.running_mean, rtol=1e-6, atol=1e-6, name=name)
        assert_close(bn_c.running_var, bn_e.running_var, rtol=1e-6, atol=1e-6, name=name)
    torch._dynamo.reset()


def test_autocast_bfloat16(device):
    """Under autocast the conv emits bfloat16; batch norm takes it with float32 parameters and
    running statistics and returns bfloat16, as PyTorch's does."""
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1).to(device)
    x = torch.randn(4, 3, 6, 6, device=device)
    w, b = torch.rand(5, device=device) + 0.5, torch.randn(5, device=device)
    results = {}
    for backend in ("triton", "torch"):
        rm, rv = torch.zeros(5, device=device), torch.ones(5, device=device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            h = conv(x)
            y = batch_norm(h, rm, rv, w, b, True, 0.1, 1e-5, backend=backend)
        assert backends.last_backend() == backend
        results[backend] = (h, y, rm, rv)
    h, y, rm, rv = results["triton"]
    assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16 and rm.dtype == torch.float32
    y_t = torch.nn.functional.batch_norm(h.float(), None, None, w, b, True, 0.1, 1e-5)
    rtol, atol = tolerance("bfloat16")
    assert_close(y, y_t, rtol=rtol, atol=atol, name="y")
    assert_close(rm, results["torch"][2], rtol=1e-3, atol=1e-3, name="running_mean")


@pytest.mark.parametrize(
    "cls,shape,channels_last",
    [(bnn.BatchNorm1d, (6, 5), False), (bnn.BatchNorm1d, (4, 5, 7), False),
     (bnn.BatchNorm2d, (3, 5, 4, 4), True), (bnn.BatchNorm3d, (2, 5, 2, 3, 3), False)],
    ids=["1d-nc", "1d-ncl", "2d-nhwc", "3d"],
)  # fmt: skip
def test_drop_in_layers_on_triton_match_torch(cls, shape, channels_last, device):
    """The nn drop-ins with backend="triton" against torch's layers over training steps and
    eval: outputs, gradients, running statistics, num_batches_tracked."""
    torch.manual_seed(2)
    ours = cls(5, backend="triton").to(device)
    theirs = getattr(torch.nn, cls.__name__)(5).to(device)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-0.5, 0.5)
    theirs.load_state_dict(ours.state_dict())
    for step in range(3):
        if step == 2:
            ours.eval()
            theirs.eval()
        x = torch.randn(shape, device=device) * 2 + step
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        ys = [ours(xs[0]), theirs(xs[1])]
        assert ours.last_backend == "triton"
        dy = torch.randn(shape, device=device)
        g_ours = torch.autograd.grad(ys[0], (xs[0], ours.weight, ours.bias), dy)
        g_theirs = torch.autograd.grad(ys[1], (xs[1], theirs.weight, theirs.bias), dy)
        assert_close(ys[0], ys[1], rtol=1e-5, atol=1e-5, name="y")
        for a, e in zip(g_ours, g_theirs):
            assert_close(a, e, rtol=1e-4, atol=1e-4, name="grad")
        assert_close(ours.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-6, name="rm")
        assert_close(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-6, name="rv")
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 2


def test_backend_selection(device, monkeypatch):
    """ "auto" picks triton for CUDA tensors of supported dtypes when Triton can run, torch
    otherwise (CPU included, even under the interpreter); float64 falls back visibly."""
    resolve = backends.resolve
    assert resolve("auto", device_type="cpu", dtype_name="float32") == "torch"
    assert resolve("triton", device_type="cpu", dtype_name="float32") == "triton"
    with pytest.warns(RuntimeWarning, match="float64"):
        backends._warned.discard(
            "batch norm: backend 'triton' unavailable (the Triton kernels handle float32, "
            "float16 and bfloat16, not float64); using 'torch'"
        )
        assert resolve("triton", device_type="cpu", dtype_name="float64") == "torch"
    monkeypatch.setattr(backends, "_auto_cache", {})
    monkeypatch.setattr(backends, "triton_status", lambda: (True, "stub"))
    for dtype in ("float32", "float16", "bfloat16"):
        assert resolve("auto", device_type="cuda", dtype_name=dtype) == "triton"
    assert resolve("auto", device_type="cuda", dtype_name="float64") == "torch"
    monkeypatch.setattr(backends, "_auto_cache", {})
    monkeypatch.setattr(backends, "triton_status", lambda: (False, "stub: no Triton"))
    assert resolve("auto", device_type="cuda", dtype_name="float32") == "torch"


def test_without_the_interpreter_cpu_tensors_fall_back_or_fail_clearly(device, monkeypatch):
    if device == "cuda":
        pytest.skip("the CPU-only behaviour")
    monkeypatch.delenv("TRITON_INTERPRET")
    ok, reason = ops.triton_status()
    assert not ok and "TRITON_INTERPRET=1" in reason
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="need a CUDA tensor"):
        ops.batch_norm(x, None, None, training=True)
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(RuntimeWarning, match="'triton' unavailable .*no CUDA device"):
        batch_norm(x, None, None, training=True, backend="triton")
    assert backends.last_backend() == "torch"


def test_check_command_passes_on_triton(device):
    """`batchnorm check --backend triton`: every case against the NumPy reference."""
    from batchnorm.check import run_check

    results = run_check(["triton"], dtypes=("float32", "bfloat16"), device=device)
    assert results and all(r.ran == "triton" for r in results)
    failed = [(r.shape, r.mode, r.dtype, r.errors) for r in results if not r.passed]
    assert not failed


def test_bench_command_says_it_needs_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from batchnorm.cli import main

    assert main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "batchnorm bench --device cpu" in err


def test_bench_pipeline_on_cpu(device, tmp_path):
    """The harness end to end with a stand-in timer: inputs, every provider's pass checked
    against float64, rows, speedups, table and CSV (timings themselves need a GPU)."""
    from batchnorm.ops.bench import harness, report
    from batchnorm.ops.bench.suite import MODES, BenchShape, min_bytes

    config = harness.Config(
        shapes=[BenchShape((4, 3, 4, 4), "test"), BenchShape((16, 8), "test")],
        dtypes=("float32",),
        layouts=("nchw", "nhwc"),
        modes=MODES,
        providers=("ours", "eager"),
    )
    rows = []

    def timer(fn, flush):  # runs the call once; a fixed "time" in microseconds
        fn()
        return 10.0

    result = harness.run(config, timer, device, copy_gbps=100.0, on_row=rows.append)
    assert len(result) == len(rows) == 3 * len(MODES) * 2  # (nchw, nhwc, nc) x modes x providers
    for row in result:
        assert row.note == "", row.note
        assert row.max_rel_err < 1e-4, (row.mode, row.provider, row.max_rel_err)
        numel = int(np.prod([int(s) for s in row.shape.split("x")]))
        assert row.bytes == min_bytes(row.mode, numel, 4)
        assert row.gbps == pytest.approx(row.bytes / 10e-6 / 1e9)
        assert row.pct_copy == pytest.approx(row.gbps)  # copy bandwidth 100 GB/s
        assert row.speedup_vs_eager == pytest.approx(1.0)
        assert bool(row.plan) == (row.provider == "ours")
    env = report.environment(None, 100.0)
    table = report.format_table(result, env)
    assert "vs eager" in table and "1.00x" in table
    path = tmp_path / "bench.csv"
    report.write_csv(str(path), result, env)
    with open(path) as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == len(result)
    assert {"gpu", "driver", "torch", "triton", "time_us", "pct_copy"} <= set(lines[0])
    pytest.importorskip("matplotlib")
    from batchnorm.cli import main

    assert main(["bench", "--plot", str(path)]) == 0
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_layout_views():
    """The (A, C, B) views the kernels address, and when a copy is needed."""
    assert view3((8, 3), (3, 1)) == View3(8, 3, 1, 3, 1, 1)
    assert view3((8, 3), (1, 8)) == View3(8, 3, 1, 1, 8, 1)  # transposed: strided, no copy
    assert view3((2, 3, 5), (15, 5, 1)) == View3(2, 3, 5, 15, 5, 1)
    nhwc = torch.empty(2, 3, 4, 5).to(memory_format=torch.channels_last)
    assert view3(nhwc.shape, nhwc.stride()) == View3(40, 3, 1, 3, 1, 1)
    ndhwc = torch.empty(2, 3, 2, 4, 5).to(memory_format=torch.channels_last_3d)
    assert view3(ndhwc.shape, ndhwc.stride()) == View3(80, 3, 1, 3, 1, 1)
    sliced = torch.empty(4, 6, 3, 3)[:, 1:4]  # planes still addressable
    assert view3(sliced.shape, sliced.stride()) == View3(4, 3, 9, 54, 9, 1)
    odd = torch.empty(2, 3, 4, 5).permute(0, 1, 3, 2)  # W and H swapped: no merged view
    assert view3(odd.shape, odd.stride()) is None
    assert View3(4, 3, 9, 27, 9, 1).mask_shape() == (4, 3, 2)
    assert View3(40, 3, 1, 3, 1, 1).mask_shape() == (5, 3, 1)


def test_running_buffers_may_change_between_forward_and_backward(device):
    """The kernels do not save the running statistics for the backward pass, so two forwards
    before one backward, or an in-place change of the buffers in between (DDP's
    broadcast_buffers, pytorch#22095), leave the graph valid and the gradients right."""
    torch.manual_seed(4)
    bn = bnn.BatchNorm2d(3, backend="triton").to(device)
    x = torch.randn(4, 3, 4, 4, device=device, requires_grad=True)
    y1 = bn(x)
    y2 = bn(x * 2)
    with torch.no_grad():
        bn.running_mean.add_(1.0)
        bn.running_var.mul_(2.0)
    (y1.sum() + y2.square().sum()).backward()
    x_ref = x.detach().clone().requires_grad_(True)
    w, b = bn.weight.detach(), bn.bias.detach()
    fn = torch.nn.functional.batch_norm
    loss = (
        fn(x_ref, None, None, w, b, True).sum()
        + fn(x_ref * 2, None, None, w, b, True).square().sum()
    )
    loss.backward()
    assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4, name="dx")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_running_statistics_that_require_grad_are_refused_as_torch_does(device, training):
    # The Function gives them no gradient (wrong in eval, where y depends on them).
    x = torch.randn(4, 3, 4, 4, device=device)
    rm = torch.zeros(3, device=device, requires_grad=True)
    rv = torch.ones(3, device=device)
    with pytest.raises(RuntimeError, match="not differentiable with respect to running_mean"):
        batch_norm(x, rm, rv, None, None, training, backend="triton")
    with torch.no_grad():
        y = batch_norm(x, rm, rv, None, None, training, backend="triton")
    expected = torch.nn.functional.batch_norm(
        x, torch.zeros_like(rv), torch.ones_like(rv), None, None, training
    )
    assert_close(y, expected, rtol=1e-4, atol=1e-4, name="y")


def test_torch_func_transforms_fall_back_to_torch_visibly(device, monkeypatch):
    """torch.func.grad of a layer on the Triton backend (whose Function has no torch.func
    support) runs PyTorch's kernel, with a warning and last_backend saying so, and gives torch's
    gradients."""
    monkeypatch.setattr(backends, "_warned", set())
    torch.manual_seed(5)
    ours = bnn.BatchNorm2d(3, backend="triton").to(device)
    theirs = torch.nn.BatchNorm2d(3).to(device)
    x = torch.randn(4, 3, 4, 4, device=device)
    params = {k: v.detach() for k, v in ours.named_parameters()}
    buffers = {k: v.detach() for k, v in ours.named_buffers()}

    def loss(module):
        def of(params, x):
            state = {k: v.clone() for k, v in buffers.items()}  # torch.func mutates no capture
            return (torch.func.functional_call(module, (params, state), (x,)) ** 2).sum()

        return of

    with pytest.warns(RuntimeWarning, match="'triton' unavailable .*torch.func"):
        got = torch.func.grad(loss(ours), argnums=(0, 1))(params, x)
    assert ours.last_backend == "torch"
    expected = torch.func.grad(loss(theirs), argnums=(0, 1))(params, x)
    assert_close(got[1], expected[1], rtol=1e-4, atol=1e-4, name="dx")
    for k in params:
        assert_close(got[0][k], expected[0][k], rtol=1e-4, atol=1e-4, name=k)
