"""Tools that walk a model work on a converted model exactly as on the original: torch.fx,
torch.ao fusion, TorchScript (script and trace), every kind of hook, lazy modules."""

from __future__ import annotations

import warnings

import pytest
import torch

import batchnorm.nn as bnn


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 5),
        torch.nn.BatchNorm1d(5),
    )
    with torch.no_grad():
        for bn in (model[1], model[5]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return model


def _pair(training: bool):
    original = _model().train(training)
    converted = bnn.convert(_model()).train(training)
    assert isinstance(converted[1], bnn.BatchNorm2d)
    return original, converted


X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fx_symbolic_trace_gives_the_original_graph(training: bool) -> None:
    original, converted = _pair(training)
    g_orig = torch.fx.symbolic_trace(original)
    g_conv = torch.fx.symbolic_trace(converted)
    nodes = lambda g: [(n.op, str(n.target)) for n in g.graph.nodes]  # noqa: E731
    assert nodes(g_conv) == nodes(g_orig)
    assert [n.op for n in g_conv.graph.nodes].count("call_module") == 6
    torch.testing.assert_close(g_conv(X), g_orig(X), rtol=0, atol=0)
    # the traced module holds our layers, still ours
    assert isinstance(g_conv.get_submodule("1"), bnn.BatchNorm2d)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fx_traces_a_layer_that_is_the_root(training: bool) -> None:
    """symbolic_trace of a bare layer (the root, which fx traces into rather than keeping as a
    leaf): the graph holds torch's functional op and computes what the layer computes. torch's
    GroupNorm and LayerNorm trace so; its BatchNorm fails on the input-dimension check, ours
    records the op."""
    import copy

    x = torch.randn(4, 8, 3, 3, generator=torch.Generator().manual_seed(2))
    for layer in (bnn.BatchNorm2d(8), bnn.GroupNorm(2, 8), bnn.LayerNorm([3, 3])):
        layer.train(training)
        eager = copy.deepcopy(layer)
        traced = torch.fx.symbolic_trace(layer)
        assert any(n.op == "call_function" for n in traced.graph.nodes), type(layer).__name__
        for _ in range(2):
            torch.testing.assert_close(traced(x), eager(x), rtol=0, atol=0)
        # (num_batches_tracked counts the trace itself, as with torch.nn's forward under fx)
        for name, value in eager.named_buffers():
            if name != "num_batches_tracked":
                torch.testing.assert_close(layer.get_buffer(name), value, rtol=0, atol=0)


def _with_statistics(layer: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(layer.num_features, generator=g))
        layer.running_var.copy_(torch.rand(layer.num_features, generator=g) + 0.5)
        layer.weight.copy_(torch.rand(layer.num_features, generator=g) + 0.5)
        layer.bias.copy_(torch.randn(layer.num_features, generator=g))
    return layer


def test_fx_traces_a_variant_that_is_the_root_in_eval() -> None:
    """The variants, bare, traced in eval (FrozenBatchNorm always): torch's batch_norm op with the
    running statistics, the layer's own output (to rounding: a different formula's order)."""
    x = torch.randn(4, 8, 3, 3, generator=torch.Generator().manual_seed(2))
    layers = [
        bnn.FrozenBatchNorm(8), bnn.BatchRenorm(8).eval(), bnn.GhostBatchNorm(8, 2).eval(),
        bnn.SyncBatchNorm(8).eval(), bnn.FrozenBatchNorm(8).train(),
    ]  # fmt: skip
    for layer in map(_with_statistics, layers):
        traced = torch.fx.symbolic_trace(layer)
        targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
        assert targets == [torch.nn.functional.batch_norm], type(layer).__name__
        torch.testing.assert_close(traced(x), layer(x), rtol=1e-6, atol=1e-6)


def test_fx_refuses_a_variant_root_in_training_with_the_remedy() -> None:
    """A variant whose training forward cannot be one graph of torch ops raises torch.fx's own
    TraceError saying why and what works, instead of a NotATensorError from its input check."""
    layers = [
        bnn.BatchRenorm(8), bnn.GhostBatchNorm(8, 2), bnn.SyncBatchNorm(8),
        bnn.GhostBatchNorm(8, 2, track_running_stats=False).eval(),
    ]  # fmt: skip
    for layer in layers:
        mode = "in training" if layer.training else "in eval without running statistics"
        expected = f"{type(layer).__name__} {mode} as the root module.*eval"
        with pytest.raises(torch.fx.proxy.TraceError, match=expected):
            torch.fx.symbolic_trace(layer)
        # and inside a model it is still one node, in either mode
        torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Identity(), layer))


def test_fx_traces_a_norm_act_layer_that_is_the_root() -> None:
    x = torch.randn(4, 8, 3, 3, generator=torch.Generator().manual_seed(2))
    layer = _with_statistics(bnn.BatchNormAct2d(8, act_layer="silu")).eval()
    traced = torch.fx.symbolic_trace(layer)
    calls = [n.op for n in traced.graph.nodes if n.op.startswith("call_")]
    assert calls == ["call_function", "call_module", "call_module"]  # batch_norm, drop, act
    torch.testing.assert_close(traced(x), layer(x), rtol=0, atol=0)


def test_fx_trace_of_every_variant_keeps_it_one_node() -> None:
    layers = [
        bnn.GhostBatchNorm(4, 2), bnn.BatchRenorm(4), bnn.FrozenBatchNorm(4), bnn.GroupNorm(2, 4),
        bnn.InstanceNorm2d(4), bnn.LayerNorm([4, 6, 6]), bnn.SyncBatchNorm(4),
    ]  # fmt: skip
    for layer in layers:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), layer)
        traced = torch.fx.symbolic_trace(model)
        assert [n.op for n in traced.graph.nodes] == [
            "placeholder", "call_module", "call_module", "output",
        ], type(layer).__name__  # fmt: skip
        torch.testing.assert_close(traced.eval()(X), model.eval()(X))


@pytest.mark.parametrize("qat", [False, True], ids=["eval", "qat"])
def test_torch_ao_fuse_modules(qat: bool) -> None:
    fuse = torch.ao.quantization.fuse_modules_qat if qat else torch.ao.quantization.fuse_modules
    original, converted = _pair(training=qat)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        fused_orig = fuse(original, [["0", "1", "2"], ["4", "5"]])
        fused_conv = fuse(converted, [["0", "1", "2"], ["4", "5"]])
    assert [type(m) for m in fused_conv] == [type(m) for m in fused_orig]
    torch.testing.assert_close(fused_conv(X), fused_orig(X), rtol=0, atol=0)


def _module_kinds(model: torch.nn.Module) -> list[str]:
    return [type(m).__module__ + "." + type(m).__name__ for m in model.modules()]


def _three_training_steps(prepared: torch.nn.Module) -> None:
    """Quantization-aware training, briefly: three SGD steps on X, then eval mode."""
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.05)
    for _ in range(3):
        loss = prepared(X).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    prepared.eval()


@pytest.mark.parametrize("qat", [False, True], ids=["ptq", "qat"])
def test_quantize_fx_fuses_and_quantizes_ours_as_torchs(qat: bool) -> None:
    # FX graph-mode quantization matches patterns by exact class: our layers matched nothing,
    # so conv + batch norm was neither fused nor folded and float batch norms stayed in the
    # quantized model, silently (outputs 0.01-0.04 off).
    from torch.ao.quantization import (
        get_default_qat_qconfig_mapping,
        get_default_qconfig_mapping,
        quantize_fx,
    )

    results = []
    for model in _pair(training=qat):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if qat:
                prepared = quantize_fx.prepare_qat_fx(
                    model, get_default_qat_qconfig_mapping("x86"), (X,)
                )
                _three_training_steps(prepared)
            else:
                prepared = quantize_fx.prepare_fx(model, get_default_qconfig_mapping("x86"), (X,))
                prepared(X)
            kinds = _module_kinds(prepared)
            quantized = quantize_fx.convert_fx(prepared)
        results.append((kinds, _module_kinds(quantized), quantized(X)))
    (kinds, q_kinds, y), (kinds_ref, q_kinds_ref, y_ref) = results
    assert kinds == kinds_ref and q_kinds == q_kinds_ref
    assert not any("BatchNorm" in k for k in q_kinds)  # folded into the quantized layers
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)


class _Quantizable(torch.nn.Module):
    """Eager-mode quantization's form: stubs, a conv + batch norm + ReLU to fuse, and a batch
    norm of its own (which torch.ao swaps for a quantized batch norm)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.quant, self.dequant = (
            torch.ao.quantization.QuantStub(),
            torch.ao.quantization.DeQuantStub(),
        )
        self.conv, self.bn, self.relu = (
            torch.nn.Conv2d(3, 4, 3),
            torch.nn.BatchNorm2d(4),
            torch.nn.ReLU(),
        )
        self.bn2 = torch.nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.bn2(self.relu(self.bn(self.conv(self.quant(x))))))


@pytest.mark.parametrize("qat", [False, True], ids=["ptq", "qat"])
def test_eager_quantization_quantizes_ours_as_torchs(qat: bool) -> None:
    import torch.ao.quantization as tq

    results = []
    for model in (_Quantizable(), bnn.convert(_Quantizable())):
        model.train(qat)
        model.qconfig = tq.get_default_qat_qconfig("x86") if qat else tq.get_default_qconfig("x86")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused = (tq.fuse_modules_qat if qat else tq.fuse_modules)(
                model, [["conv", "bn", "relu"]]
            )
            prepared = (tq.prepare_qat if qat else tq.prepare)(fused)
            if qat:
                _three_training_steps(prepared)
            else:
                prepared(X)
            quantized = tq.convert(prepared)
        results.append((_module_kinds(quantized), quantized(X)))
    (kinds, y), (kinds_ref, y_ref) = results
    assert kinds == kinds_ref
    assert "torch.ao.nn.quantized.modules.batchnorm.BatchNorm2d" in kinds  # bn2, quantized
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)


def test_fx_experimental_optimization_folds_ours_as_torchs() -> None:
    # torch.fx.experimental.optimization.fuse matches `type(module) is nn.BatchNorm2d`.
    from torch.fx.experimental import optimization

    original, converted = _pair(training=False)
    fused = [optimization.fuse(m) for m in (original, converted)]
    assert _module_kinds(fused[1]) == _module_kinds(fused[0])
    assert not any("BatchNorm" in k for k in _module_kinds(fused[1]))
    torch.testing.assert_close(fused[1](X), fused[0](X), rtol=0, atol=0)
    # optimize_for_inference: a batch norm that follows no conv becomes MKLDNN's, as torch's
    for norm in (torch.nn.BatchNorm2d, bnn.BatchNorm2d):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3), torch.nn.ReLU(), norm(3)).eval()
        optimized = optimization.optimize_for_inference(model)
        assert "MkldnnBatchNorm" in [type(m).__name__ for m in optimized.modules()]
        torch.testing.assert_close(optimized(X), model(X))


def test_quantization_sees_ours_whichever_is_imported_first() -> None:
    # torch.ao's modules copy type_before_parametrizations when imported: those imported
    # before batchnorm.nn are set too.
    import subprocess
    import sys

    code = (
        "import torch.ao.quantization.quantize_fx, torch.ao.quantization.fx.fuse_handler\n"
        "from torch.ao.quantization.fx import match_utils\n"
        "import batchnorm.nn as bnn, torch\n"
        "assert match_utils.type_before_parametrizations(bnn.BatchNorm2d(2)) is "
        "torch.nn.BatchNorm2d\n"
        "assert match_utils.type_before_parametrizations(bnn.GhostBatchNorm(2)) is "
        "bnn.GhostBatchNorm\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript(how: str, training: bool) -> None:
    original, converted = _pair(training)
    if how == "script":
        compiled, reference = torch.jit.script(converted), torch.jit.script(original)
    else:  # tracing runs the model (several times, to check the trace): trace both alike
        compiled, reference = torch.jit.trace(converted, X), torch.jit.trace(original, X)
    torch.testing.assert_close(compiled(X), reference(X), rtol=0, atol=0)
    torch.testing.assert_close(
        compiled.state_dict(), reference.state_dict(), rtol=0, atol=0
    )  # the running statistics moved alike


def test_convert_keeps_every_kind_of_hook_and_their_handles() -> None:
    model = _model()
    calls: list[str] = []
    bn = model[1]
    handles = [
        bn.register_forward_pre_hook(lambda m, a, kw: calls.append("pre-kw"), with_kwargs=True),
        bn.register_forward_hook(lambda m, a, kw, out: calls.append("fwd-kw"), with_kwargs=True),
        bn.register_forward_hook(lambda m, a, out: calls.append("always"), always_call=True),
        bn.register_full_backward_hook(lambda m, gi, go: calls.append("bwd")),
        bn.register_state_dict_post_hook(lambda m, sd, prefix, local: calls.append("sd")),
        bn.register_load_state_dict_post_hook(lambda m, keys: calls.append("load")),
    ]
    converted = bnn.convert(model)
    assert isinstance(converted[1], bnn.BatchNorm2d)
    converted(X.requires_grad_()).sum().backward()
    converted.load_state_dict(converted.state_dict())
    assert calls == ["pre-kw", "fwd-kw", "always", "bwd", "sd", "load"]
    for handle in handles:  # the handles a user holds still remove the hooks
        handle.remove()
    calls.clear()
    converted(X).sum().backward()
    converted.load_state_dict(converted.state_dict())
    assert calls == []
    back = bnn.convert(converted, to="torch")
    assert type(back[1]) is torch.nn.BatchNorm2d and "backend" not in back[1].__dict__


def test_convert_carries_instance_attributes_and_flags() -> None:
    model = _model().eval()
    model[1].custom_tag = "kept"
    model[1].weight.requires_grad_(False)
    converted = bnn.convert(model)
    assert converted[1].custom_tag == "kept" and not converted[1].training
    assert converted[1].weight is model[1].weight and not converted[1].weight.requires_grad


@pytest.mark.parametrize("name", ["LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d",
                                  "LazyInstanceNorm1d", "LazyInstanceNorm2d",
                                  "LazyInstanceNorm3d"])  # fmt: skip
def test_lazy_modules_become_ours_and_match_torch(name: str) -> None:
    dims = 3 if name.endswith("1d") else int(name[-2]) + 2
    x = torch.randn(*([4, 3] + [5] * (dims - 2)))
    ours, theirs = getattr(bnn, name)(), getattr(torch.nn, name)()
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    assert type(ours).__module__.startswith("batchnorm.nn") and ours.num_features == 3
    assert ours.last_backend == "torch"
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict(), rtol=0, atol=0)


def test_group_and_instance_norm_take_torchs_bias_argument() -> None:
    gn, tgn = bnn.GroupNorm(2, 4, bias=False), torch.nn.GroupNorm(2, 4, bias=False)
    inorm = bnn.InstanceNorm2d(4, affine=True, bias=False)
    assert gn.bias is None and inorm.bias is None and repr(gn) == repr(tgn)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(gn(x), tgn(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "build,error",
    [
        (lambda: bnn.GroupNorm(0, 4), ZeroDivisionError),
        (lambda: bnn.GroupNorm(-1, 4), RuntimeError),
        (lambda: bnn.GroupNorm(3, 4), ValueError),
        (lambda: bnn.LayerNorm(4, eps=float("nan")), ValueError),
        (lambda: bnn.InstanceNorm2d(4, momentum=float("nan")), ValueError),
        (lambda: bnn.InstanceNorm2d(4, eps=float("nan")), ValueError),
    ],
)
def test_norm_arguments_that_would_poison_the_state_are_refused(build, error) -> None:
    with pytest.raises(error):
        build()


def test_errors_are_instances_of_torchs_classes() -> None:
    cases = [
        (lambda m: m(torch.randn(4, 5)), bnn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)),
        (lambda m: m(torch.ones(4, 3, dtype=torch.int64)), bnn.BatchNorm1d(3),
         torch.nn.BatchNorm1d(3)),
        (lambda m: m([1.0, 2.0]), bnn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)),
        (lambda m: m(torch.randn(4, 3)), bnn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)),
        (lambda m: m(torch.randn(1, 3)), bnn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)),
        (lambda m: m(torch.randn(2, 5)), bnn.LayerNorm(4), torch.nn.LayerNorm(4)),
        (lambda m: m(torch.randn(2, 6)), bnn.GroupNorm(2, 4), torch.nn.GroupNorm(2, 4)),
    ]  # fmt: skip
    for call, ours, theirs in cases:
        with pytest.raises(Exception) as torch_error:
            call(theirs)
        with pytest.raises(Exception) as our_error:
            call(ours)
        assert isinstance(our_error.value, type(torch_error.value)), (our_error, torch_error)


def test_torch_compile_compiles_a_converted_model_as_often_as_the_original() -> None:
    """No guard on per-thread or cache state: the same number of graphs, also in a new thread."""
    import threading

    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    counts = []
    for model in _pair(training=True):
        torch._dynamo.reset()
        counter = CompileCounter()
        compiled = torch.compile(model, backend=counter)
        compiled(X)
        compiled(X)
        thread = threading.Thread(target=compiled, args=(X,))
        thread.start()
        thread.join()
        counts.append(counter.frame_count)
    torch._dynamo.reset()
    assert counts[1] == counts[0] == 1


@pytest.mark.parametrize(
    "ours,theirs",
    [
        (lambda: bnn.LayerNorm([4, 5, 5]), lambda: torch.nn.LayerNorm([4, 5, 5])),
        (lambda: bnn.GroupNorm(2, 4), lambda: torch.nn.GroupNorm(2, 4)),
        (
            lambda: bnn.InstanceNorm2d(4, affine=True, track_running_stats=True),
            lambda: torch.nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
        ),
    ],  # fmt: skip
    ids=["layer", "group", "instance"],
)
def test_torchscript_of_layer_group_and_instance_norm(ours, theirs) -> None:
    x = torch.randn(4, 4, 5, 5)
    scripted, reference = torch.jit.script(ours()), torch.jit.script(theirs())
    for _ in range(2):
        torch.testing.assert_close(scripted(x), reference(x), rtol=0, atol=0)
    torch.testing.assert_close(scripted.state_dict(), reference.state_dict(), rtol=0, atol=0)


@pytest.mark.parametrize(
    "surgery",
    [
        bnn.convert,
        bnn.convert_sync_batchnorm,
        bnn.FrozenBatchNorm.convert_frozen_batchnorm,
        bnn.unfreeze_batchnorm,
    ],
    ids=["convert", "sync", "frozen", "unfreeze"],
)
def test_surgery_refuses_torchscript_with_batch_norm_instead_of_a_silent_no_op(surgery) -> None:
    scripted = torch.jit.script(_model().eval())
    with pytest.raises(TypeError, match=r"TorchScript .* batch norm at \['1', '5'\]"):
        surgery(scripted)
    plain = torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)))
    assert surgery(plain) is plain  # nothing to convert: as it was
