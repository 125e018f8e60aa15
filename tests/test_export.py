"""Models built from the package's layers trace: ``torch.compile`` without graph breaks,
``torch.export``, and ONNX (run in onnxruntime).

Each layer is exported in eval and in training mode, and the exported program must give the
eager module's outputs and running statistics over several calls; batch sizes stay symbolic where
the layer's math allows it (ghost batch norm splits the batch by its size, so its training graph
needs a fixed batch). Exports hold standard ATen ops, never this package's custom ops, unless a
backend was requested explicitly.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.export import Dim

import batchnorm.nn as bnn
from batchnorm import backends

C = 6


LAYERS = {
    "bn": lambda: bnn.BatchNorm2d(C),
    "bn-explicit": lambda: bnn.BatchNorm2d(C, backend="explicit"),
    "bn-momentum-none": lambda: bnn.BatchNorm2d(C, momentum=None),
    "bn-nonfinite-skip": lambda: bnn.BatchNorm2d(C, nonfinite="skip"),
    "sync": lambda: bnn.SyncBatchNorm(C),
    "ghost": lambda: bnn.GhostBatchNorm(C, virtual_batch_size=2),
    "ghost-explicit": lambda: bnn.GhostBatchNorm(C, virtual_batch_size=2, backend="explicit"),
    "renorm": lambda: bnn.BatchRenorm(C, warmup_steps=1, r_max_reached_at=4, d_max_reached_at=3),
    "frozen": lambda: bnn.FrozenBatchNorm(C),
    "group": lambda: bnn.GroupNorm(3, C),
    "layer": lambda: bnn.LayerNorm([C, 6, 6]),
    "layer-explicit": lambda: bnn.LayerNorm([C, 6, 6], backend="explicit"),
    "group-explicit": lambda: bnn.GroupNorm(3, C, backend="explicit"),
    "instance-explicit": lambda: bnn.InstanceNorm2d(
        C, affine=True, track_running_stats=True, backend="explicit"
    ),
    "instance": lambda: bnn.InstanceNorm2d(C, affine=True, track_running_stats=True),
}


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, C, 3), LAYERS[name](), torch.nn.ReLU())
    model.train()
    with torch.no_grad():  # non-trivial running statistics and step counts
        for _ in range(3):
            model(torch.randn(4, 3, 8, 8) * 2 + 1)
    return model


def _inputs(*batch_sizes: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, 8, 8, generator=g) * 1.5 - 0.5 for n in batch_sizes]


def _assert_same_run(eager: torch.nn.Module, exported: torch.nn.Module, inputs) -> None:
    """Outputs and every buffer agree after each call (training calls update the buffers)."""
    for x in inputs:
        torch.testing.assert_close(exported(x), eager(x), rtol=1e-6, atol=1e-6)
        got = dict(exported.named_buffers())
        for key, value in eager.named_buffers():
            # 1/k of a cumulative average is a float64 tensor under export, a Python float eager
            torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_torch_export_matches_eager(name, mode):
    model = _model(name)
    getattr(model, mode)()
    eager, traced = copy.deepcopy(model), copy.deepcopy(model)
    dynamic = not (name.startswith("ghost") and mode == "train")
    shapes = ({0: Dim("batch", min=2, max=64)},) if dynamic else None
    program = torch.export.export(traced, (torch.randn(4, 3, 8, 8),), dynamic_shapes=shapes)
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any(op.startswith("batchnorm.") for op in ops), ops
    sizes = (4, 7, 2, 4) if dynamic else (4, 4, 4)
    _assert_same_run(eager, program.module(), _inputs(*sizes))


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_compiles_as_one_graph_and_matches_eager(name, mode):
    """fullgraph=True: a graph break fails; outputs, gradients and buffers as in eager mode."""
    torch._dynamo.reset()
    model = _model(name)
    getattr(model, mode)()
    eager, compiled_model = copy.deepcopy(model), copy.deepcopy(model)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    for x in _inputs(4, 4):
        x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.testing.assert_close(compiled(x_compiled), eager(x_eager), rtol=1e-6, atol=1e-6)
        eager(x_eager).square().sum().backward()
        compiled(x_compiled).square().sum().backward()
        torch.testing.assert_close(x_compiled.grad, x_eager.grad, rtol=1e-5, atol=1e-6)
    for (key, a), (_, b) in zip(eager.named_buffers(), compiled_model.named_buffers()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=key)
    for (key, a), (_, b) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=key)


def test_ghost_training_export_needs_a_fixed_batch():
    model = _model("ghost")
    with pytest.raises(Exception, match="batch"):
        torch.export.export(
            model, (torch.randn(4, 3, 8, 8),), dynamic_shapes=({0: Dim("batch", min=2)},)
        )


def test_cumulative_average_without_a_python_float_matches_eager():
    """momentum=None under export updates the buffers with tensor arithmetic (no host sync)."""
    model = _model("bn-momentum-none")
    eager, traced = copy.deepcopy(model), copy.deepcopy(model)
    program = torch.export.export(traced, (torch.randn(4, 3, 8, 8),))
    code = program.graph_module.print_readable(print_output=False)
    assert "aten.item" not in code and "_local_scalar_dense" not in code
    exported = program.module()
    _assert_same_run(eager, exported, _inputs(4, 4, 4, 4, 4))
    assert int(dict(exported.named_buffers())["1.num_batches_tracked"]) == 3 + 5


def test_compiled_cumulative_average_skips_a_nonfinite_batch_exactly():
    """momentum=None + nonfinite="skip" on the tensor path: a NaN batch leaves the buffers bitwise
    unchanged and uncounted; the next batch is averaged in as in eager mode."""
    torch._dynamo.reset()
    layer = bnn.BatchNorm2d(3, momentum=None, nonfinite="skip").train()
    layer(torch.randn(4, 3, 2, 2))
    eager = copy.deepcopy(layer)
    mean, var = layer.running_mean.clone(), layer.running_var.clone()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    bad = torch.randn(4, 3, 2, 2)
    bad[0, 0, 0, 0] = float("nan")
    compiled(bad)
    assert torch.equal(layer.running_mean, mean) and torch.equal(layer.running_var, var)
    assert int(layer.num_batches_tracked) == 1
    good = torch.randn(4, 3, 2, 2)
    compiled(good)
    eager(bad)
    eager(good)
    assert int(layer.num_batches_tracked) == int(eager.num_batches_tracked) == 2
    torch.testing.assert_close(layer.running_mean, eager.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(layer.running_var, eager.running_var, rtol=1e-6, atol=1e-7)


def test_auto_backend_exports_standard_ops_where_it_would_pick_triton(monkeypatch):
    """On a GPU "auto" picks the Triton kernels; an export must still hold ATen's batch_norm."""
    model = _model("bn").eval()
    asked: list[tuple] = []

    def gpu_choice(*args):
        asked.append(args)
        return "triton"

    monkeypatch.setattr(backends, "_auto_choice", gpu_choice)
    monkeypatch.setattr(backends, "_warned", set())  # the fallback warning below is not muted
    program = torch.export.export(model, (torch.randn(2, 3, 8, 8),))
    assert asked == [], "auto consulted the device while exporting"
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "aten.batch_norm.default" in ops, ops
    assert backends.last_backend() == "torch"
    with pytest.warns(RuntimeWarning, match="triton"):  # eager: the GPU choice is consulted
        model(torch.randn(2, 3, 8, 8))
    assert asked


def test_onnx_export_of_every_layer_runs_in_onnxruntime(tmp_path):
    pytest.importorskip("onnxscript", reason="ONNX export needs the 'export' extra")
    onnx = pytest.importorskip("onnx", reason="ONNX export needs the 'export' extra")
    ort = pytest.importorskip("onnxruntime", reason="ONNX checks need the 'export' extra")
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Conv2d(3, C, 3, padding=1)]
    for name in sorted(LAYERS):
        norm = LAYERS[name]()
        if isinstance(norm, torch.nn.LayerNorm):
            norm = bnn.LayerNorm([C, 8, 8], backend=norm.backend)
        layers += [norm, torch.nn.Conv2d(C, C, 3, padding=1), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 8, 8) * 2 + 1)
    model.eval()
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (torch.randn(4, 3, 8, 8),),
            dynamic_shapes=({0: Dim("batch", min=1, max=64)},),
            dynamo=True,
            verbose=False,
        )
    program.save(str(path))
    graph = onnx.load(str(path)).graph
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}, "custom ONNX domains"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    for x in _inputs(4, 1, 9):
        (got,) = session.run(None, {input_name: x.numpy()})
        with torch.no_grad():
            expected = model(x)
        torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-5)
