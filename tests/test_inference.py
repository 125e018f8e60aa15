"""batchnorm.inference: recalibrate (Algorithm 2) against the NumPy reference, and fold."""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

import batchnorm.nn as bnn
from batchnorm import reference
from batchnorm.inference import FoldMismatchError, fold, fold_into, recalibrate
from tests.helpers import assert_close, tolerance

# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------

BATCH_SIZES = (5, 3, 8, 2)  # uneven on purpose: equal weights per batch would be wrong


def small_cnn(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Sequential:
    """Conv-BN-ReLU x2, then Linear-BN1d, with random affine parameters.

    Input (N, 3, 8, 8); BN inputs (N, 4, 8, 8), (N, 5, 3, 3) and (N, 6).
    """
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, stride=2, bias=False),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(45, 6),
        nn.BatchNorm1d(6),
    ).to(dtype)
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model


BN_NAMES = ("1", "4", "8")


def make_batches(sizes=BATCH_SIZES, dtype=torch.float64, seed=1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # A mean away from 0 and a spread away from 1, so default running statistics are far off.
    return [torch.randn(n, 3, 8, 8, generator=generator, dtype=dtype) * 2.0 + 1.5 for n in sizes]


def reference_bn_inputs(model: nn.Sequential, batches) -> dict[str, list[np.ndarray]]:
    """The input of each BN layer, batch by batch, with BN in training mode done by the NumPy
    reference (the convolutions and the Linear by torch in float64): independent of the code
    under test, which hooks the model's own forward."""
    conv1, bn1, _, conv2, bn2, _, _, linear, bn3 = copy.deepcopy(model).double()
    params = {
        name: (bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy(), bn.eps)
        for name, bn in zip(BN_NAMES, (bn1, bn2, bn3))
    }

    def train_bn(name: str, a: np.ndarray) -> torch.Tensor:
        gamma, beta, eps = params[name]
        return torch.from_numpy(reference.bn_forward(a, gamma, beta, eps)[0])

    inputs: dict[str, list[np.ndarray]] = {name: [] for name in BN_NAMES}
    with torch.no_grad():
        for x in batches:
            a1 = conv1(x.double()).numpy()
            a2 = conv2(torch.relu(train_bn("1", a1))).numpy()
            a3 = linear(torch.relu(train_bn("4", a2)).flatten(1)).numpy()
            for name, a in zip(BN_NAMES, (a1, a2, a3)):
                inputs[name].append(a)
    return inputs


def stats_of(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    return {
        name: (m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked))
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    }


def assert_same_stats(before, after) -> None:
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name][0], after[name][0]), f"{name}: running_mean changed"
        assert torch.equal(before[name][1], after[name][1]), f"{name}: running_var changed"
        assert before[name][2] == after[name][2], f"{name}: num_batches_tracked changed"


def flavoured(model: nn.Module, flavour: str) -> nn.Module:
    """The model with torch's batch-norm classes, or with batchnorm.nn's."""
    return bnn.convert(model) if flavour == "batchnorm" else model


# --------------------------------------------------------------------------------------------
# recalibrate
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["torch", "batchnorm"])
def test_recalibrate_is_algorithm_2_of_the_reference(flavour):
    """Uneven batches, float64: running statistics == reference.population_statistics."""
    model = flavoured(small_cnn(), flavour)
    batches = make_batches()
    expected = {
        name: reference.population_statistics(inputs)
        for name, inputs in reference_bn_inputs(model, batches).items()
    }
    report = recalibrate(model, batches, progress=False)

    rtol, atol = tolerance("float64")
    layers = dict(model.named_modules())
    for name in BN_NAMES:
        assert_close(
            layers[name].running_mean, expected[name].mean, rtol=rtol, atol=atol, name=name
        )
        assert_close(layers[name].running_var, expected[name].var, rtol=rtol, atol=atol, name=name)
        assert report.layers[name].count == expected[name].count
        assert report.layers[name].num_batches == len(BATCH_SIZES)
    assert report.num_batches == len(BATCH_SIZES)
    assert report.num_samples == sum(BATCH_SIZES)
    if flavour == "batchnorm":
        assert all(isinstance(layers[name], bnn.BatchNorm1d | bnn.BatchNorm2d) for name in BN_NAMES)

    # The comparison above can tell Algorithm 2 from the alternatives: an equal-weight average of
    # the batch means and torch's moving average (momentum 0.1) both miss by far more than atol.
    inputs = reference_bn_inputs(model, batches)["8"]
    equal_weights = np.mean([reference.batch_statistics(a)[0] for a in inputs], axis=0)
    assert np.abs(equal_weights - expected["8"].mean).max() > 1e-3
    moving = flavoured(small_cnn(), flavour).train()
    with torch.no_grad():
        for x in batches:
            moving(x)
    assert np.abs(moving[8].running_mean.numpy() - expected["8"].mean).max() > 1e-2


def test_recalibrate_float32_model_matches_reference():
    """A float32 model: statistics accumulated in float64, stored to float32 rounding."""
    model = small_cnn(torch.float32)
    batches = make_batches(dtype=torch.float32)
    inputs = reference_bn_inputs(model, batches)
    recalibrate(model, batches, progress=False)
    rtol, atol = tolerance("float32")
    for name, bn in ((n, dict(model.named_modules())[n]) for n in BN_NAMES):
        stats = reference.population_statistics(inputs[name])
        assert bn.running_mean.dtype == torch.float32
        assert_close(bn.running_mean, stats.mean, rtol=rtol, atol=atol, name=f"{name} mean")
        assert_close(bn.running_var, stats.var, rtol=rtol, atol=atol, name=f"{name} var")


def test_recalibrate_batch_formats_give_identical_statistics():
    """Tensors, (x, y) tuples, [x, y] lists, dicts, a generator, a user forward, device=."""
    batches = make_batches()
    labels = [torch.zeros(len(x), dtype=torch.long) for x in batches]
    formats = {
        "tuple": [(x, y) for x, y in zip(batches, labels)],
        "list": [[x, y] for x, y in zip(batches, labels)],
        "dict": [{"label": y, "input": x} for x, y in zip(batches, labels)],
        "generator": (x for x in batches),
    }
    expected = small_cnn()
    recalibrate(expected, batches, progress=False)
    for data in formats.values():
        model = small_cnn()
        recalibrate(model, data, progress=False, device="cpu")
        assert_same_stats(stats_of(expected), stats_of(model))
    model = small_cnn()
    seen = []
    report = recalibrate(
        model,
        [{"pixels": x} for x in batches],
        forward=lambda m, batch: seen.append(m(batch["pixels"])),
        progress=False,
    )
    assert len(seen) == len(batches) and report.num_samples is None
    assert_same_stats(stats_of(expected), stats_of(model))


def test_recalibrate_restores_modes_buffers_and_hooks():
    """Mode flags of every module, other buffers, num_batches_tracked, parameters: unchanged."""

    class Counter(nn.Module):  # a buffer that a training-mode forward changes
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:
                self.calls += 1
            return x

    model = nn.Sequential(small_cnn(), Counter(), nn.Dropout(0.5))
    model[0][8].momentum = None  # cumulative average: uses num_batches_tracked
    with torch.no_grad():
        model(make_batches()[0])  # one training step, so num_batches_tracked = 1
    model.eval()
    model[0][1].train()  # a mix of modes
    modes = {name: m.training for name, m in model.named_modules()}
    params = {name: p.clone() for name, p in model.named_parameters()}
    tracked = {name: int(bn[2]) for name, bn in stats_of(model).items()}

    recalibrate(model, make_batches(), progress=False)

    assert {name: m.training for name, m in model.named_modules()} == modes
    assert int(model[1].calls) == 1  # the warm-up step's, not the recalibration's
    assert all(torch.equal(p, params[name]) for name, p in model.named_parameters())
    for name, m in model.named_modules():
        if name in tracked:
            assert int(m.num_batches_tracked) == tracked[name] == 1
        assert not m._forward_pre_hooks and not m._forward_hooks
    # The new statistics do not depend on the momentum (not a moving average).
    reference_model = nn.Sequential(small_cnn(), Counter(), nn.Dropout(0.0))
    recalibrate(reference_model, make_batches(), progress=False)
    assert torch.equal(model[0][8].running_mean, reference_model[0][8].running_mean)


def test_recalibrate_failure_midway_changes_nothing():
    """A wrong-shaped batch, a failing loader, a KeyboardInterrupt: the model is as before."""
    model = small_cnn()
    model.eval()
    good = make_batches()

    def loader(last):
        yield good[0]
        yield good[1]
        if isinstance(last, BaseException):
            raise last
        yield last

    failures = [
        (torch.randn(4, 5, 8, 8, dtype=torch.float64), RuntimeError, "channels"),
        (OSError("disk gone"), OSError, "disk gone"),
        (KeyboardInterrupt(), KeyboardInterrupt, None),
        ({"image": good[0]}, KeyError, "'input'"),
        ("not a batch", TypeError, "cannot find the model input"),
    ]
    before = stats_of(model)
    for last, error, message in failures:
        with pytest.raises(error, match=message) as info:
            recalibrate(model, loader(last), progress=False)
        assert_same_stats(before, stats_of(model))
        assert not model.training and not any(m.training for m in model.modules())
        assert not any(m._forward_pre_hooks for m in model.modules())
        if error is RuntimeError and sys.version_info >= (3, 11):
            assert "batch #2 (input shape (4, 5, 8, 8))" in " ".join(info.value.__notes__)

    # A batch-norm layer that receives the wrong number of channels says which and what it got.
    bn = nn.BatchNorm1d(3)
    with pytest.raises(ValueError, match=r"'' expects an \(N, 3, \*\) input, got \(4, 5\)"):
        recalibrate(bn, [torch.randn(4, 3), torch.randn(4, 5)], progress=False)
    assert torch.equal(bn.running_mean, torch.zeros(3)) and int(bn.num_batches_tracked) == 0


def test_recalibrate_bad_arguments_are_refused_clearly():
    model = small_cnn()
    with pytest.raises(ValueError, match="yielded no batch"):
        recalibrate(model, [], progress=False)
    with pytest.raises(ValueError, match="yielded no batch"):
        recalibrate(model, iter(()), progress=False)
    with pytest.raises(TypeError, match=r"single tensor .* x.split\(batch_size\)"):
        recalibrate(model, make_batches()[0], progress=False)
    with pytest.raises(ValueError, match="num_batches must be a positive int"):
        recalibrate(model, make_batches(), num_batches=0, progress=False)
    with pytest.raises(ValueError, match="no batch-norm layer"):
        recalibrate(nn.Linear(2, 2), [torch.randn(3, 2)], progress=False)
    no_stats = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        recalibrate(no_stats, [torch.randn(3, 2)], progress=False)


def test_recalibrate_skips_batches_with_one_value_per_channel():
    """A last batch of size 1 reaches BatchNorm1d with m = 1: skipped with a warning."""
    model = small_cnn()
    batches = make_batches(sizes=(5, 1, 3))
    kept = [batches[0], batches[2]]
    expected = {
        n: reference.population_statistics(a) for n, a in reference_bn_inputs(model, kept).items()
    }
    with pytest.warns(UserWarning, match="skipped 1 batch"):
        report = recalibrate(model, batches, progress=False)
    assert report.skipped_batches == [(1, "8", (1, 6))]
    assert report.num_batches == 2
    layers = dict(model.named_modules())
    for name in BN_NAMES:  # the conv layers saw m = 64 and m = 9 in batch 1, but it is left out
        assert_close(layers[name].running_mean, expected[name].mean, rtol=1e-10, atol=1e-12)
        assert_close(layers[name].running_var, expected[name].var, rtol=1e-10, atol=1e-12)

    before = stats_of(model)
    with pytest.raises(ValueError, match="every batch .* one value per channel"):
        recalibrate(model, make_batches(sizes=(1, 1)), progress=False)
    assert_same_stats(before, stats_of(model))


def test_recalibrate_layer_selection_and_num_batches():
    """Unused, frozen and statistics-free layers are left alone; num_batches is obeyed."""

    class FrozenBatchNorm1d(nn.BatchNorm1d):  # stays in eval mode whatever model.train() says
        def train(self, mode: bool = True) -> FrozenBatchNorm1d:
            return super().train(False)

    class WithAuxHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = small_cnn()
            self.aux = nn.BatchNorm1d(6)  # never called
            self.free = nn.BatchNorm1d(6, track_running_stats=False)
            self.frozen = FrozenBatchNorm1d(6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.frozen(self.free(self.body(x)))

    model = WithAuxHead().double()
    before = stats_of(model)
    with pytest.raises(ValueError, match=r"\['aux'\] saw no batch.*allow_unused=True"):
        recalibrate(model, make_batches(), progress=False)
    assert_same_stats(before, stats_of(model))

    report = recalibrate(model, make_batches(), allow_unused=True, num_batches=2, progress=False)
    assert {"aux", "free", "frozen"} <= set(report.skipped_layers)
    assert "frozen" in report.skipped_layers["frozen"]
    assert torch.equal(model.frozen.running_var, before["frozen"][1])
    assert set(report.layers) == {f"body.{n}" for n in BN_NAMES}
    assert torch.equal(model.aux.running_mean, before["aux"][0])
    first_two = reference_bn_inputs(model.body, make_batches()[:2])["8"]
    assert_close(
        model.body[8].running_mean,
        reference.population_statistics(first_two).mean,
        rtol=1e-10,
        atol=1e-12,
    )
    assert report.num_batches == 2 and report.num_samples == sum(BATCH_SIZES[:2])


def test_recalibrate_ghost_batches_are_algorithm_2_mini_batches():
    """A layer with virtual_batch_size: each chunk of that many samples is one mini-batch."""

    class Ghostly(nn.BatchNorm1d):  # only the attribute matters to recalibrate
        virtual_batch_size = 3

    model = nn.Sequential(nn.Linear(4, 5), Ghostly(5)).double()
    batches = [torch.randn(n, 4, dtype=torch.float64) * 3 + 1 for n in (7, 4)]
    recalibrate(model, batches, progress=False)
    with torch.no_grad():
        chunks = [c.numpy() for x in batches for c in model[0](x).split(3)]  # 3+3+1, 3+1
    stats = reference.population_statistics(chunks)
    assert_close(model[1].running_mean, stats.mean, rtol=1e-10, atol=1e-12, name="mean")
    assert_close(model[1].running_var, stats.var, rtol=1e-10, atol=1e-12, name="var")
    whole = reference.population_statistics([model[0](x).detach().numpy() for x in batches])
    assert np.abs(whole.var - stats.var).max() > 1e-2  # not the same as whole batches

    Ghostly.virtual_batch_size = 1
    before = stats_of(model)
    with pytest.raises(ValueError, match="ghost batches with one value per channel"):
        recalibrate(model, batches, progress=False)
    assert_same_stats(before, stats_of(model))


def test_recalibrate_report(capsys):
    model = small_cnn()
    old = stats_of(model)
    report = recalibrate(model, make_batches(), progress=True)
    assert "recalibrating batch norm" in capsys.readouterr().err  # the tqdm bar
    layer = report.layers["1"]
    assert torch.equal(layer.old_mean, old["1"][0].double())
    assert torch.equal(layer.new_mean.float(), model[1].running_mean.float())
    shift = ((layer.old_mean - layer.new_mean).abs() / (layer.new_var + layer.eps).sqrt()).max()
    assert layer.mean_shift == pytest.approx(float(shift)) and layer.mean_shift > 0.1
    assert report.max_mean_shift >= layer.mean_shift
    assert report.max_var_change > 0.5  # the default running_var of 1 was far off
    text = str(report)
    assert "Recalibrated 3 batch-norm layer(s) over 4 batch(es), 18 samples" in text
    assert all(f"\n{name} " in text for name in BN_NAMES)
    assert json.loads(json.dumps(report.to_dict()))["layers"]["8"]["count"] == sum(BATCH_SIZES)


def test_recalibrated_eval_output_is_the_reference_inference_map():
    """After recalibration, eval mode computes reference.bn_inference with the population stats."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double()
    batches = [torch.randn(n, 3, dtype=torch.float64) + 2 for n in (7, 2, 5)]
    recalibrate(model, batches, progress=False)
    with torch.no_grad():
        inputs = [model[0](x).numpy() for x in batches]
    stats = reference.population_statistics(inputs)
    bn = model[1]
    x = torch.randn(6, 3, dtype=torch.float64)
    with torch.no_grad():
        expected = reference.bn_inference(
            model[0](x).numpy(), bn.weight.numpy(), bn.bias.numpy(), stats.mean, stats.var, bn.eps
        )
        actual = model.eval()(x)
    assert_close(actual, expected, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# fold
# --------------------------------------------------------------------------------------------


def randomize_bn(bn: nn.Module, seed: int) -> nn.Module:
    """Running statistics and affine parameters far from their defaults."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(t, lo, hi):
        t.copy_(torch.rand(t.shape, generator=generator, dtype=torch.float64) * (hi - lo) + lo)

    with torch.no_grad():
        if bn.running_mean is not None:
            uniform(bn.running_mean, -1.0, 1.0)
            uniform(bn.running_var, 0.3, 2.0)
        if bn.weight is not None:
            uniform(bn.weight, 0.5, 1.5)
        if bn.bias is not None:
            uniform(bn.bias, -0.5, 0.5)
    return bn


# (name, layer factory(bias, groups), BN class, input shape)
LAYERS = {
    "linear": (lambda b, g: nn.Linear(6, 4, bias=b), nn.BatchNorm1d, (5, 6)),
    "conv1d": (lambda b, g: nn.Conv1d(4, 6, 3, groups=g, bias=b), nn.BatchNorm1d, (3, 4, 9)),
    "conv2d": (
        lambda b, g: nn.Conv2d(4, 6, 3, padding=1, groups=g, bias=b),
        nn.BatchNorm2d,
        (2, 4, 6, 7),
    ),
    "conv3d": (lambda b, g: nn.Conv3d(4, 6, 2, groups=g, bias=b), nn.BatchNorm3d, (2, 4, 4, 5, 3)),
    "convtranspose1d": (
        lambda b, g: nn.ConvTranspose1d(4, 6, 3, stride=2, groups=g, bias=b),
        nn.BatchNorm1d,
        (3, 4, 5),
    ),
    "convtranspose2d": (
        lambda b, g: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=g, bias=b),
        nn.BatchNorm2d,
        (2, 4, 4, 5),
    ),
    "convtranspose3d": (
        lambda b, g: nn.ConvTranspose3d(4, 6, 2, groups=g, bias=b),
        nn.BatchNorm3d,
        (2, 4, 3, 3, 2),
    ),
}
LAYER_CASES = [
    (kind, bias, groups, memory_format)
    for kind in LAYERS
    for bias in (True, False)
    for groups in ((1,) if kind == "linear" else (1, 2))
    for memory_format in (
        [None, torch.channels_last]
        if kind == "conv2d" and groups == 1
        else [None, torch.channels_last_3d]
        if kind == "conv3d" and groups == 1
        else [None]
    )
]


def _case_id(case) -> str:
    kind, bias, groups, memory_format = case
    tags = [kind, "bias" if bias else "nobias", f"g{groups}"]
    return "-".join(tags + (["channels-last"] if memory_format else []))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", LAYER_CASES, ids=[_case_id(c) for c in LAYER_CASES])
def test_fold_matches_eval_outputs(case, dtype):
    kind, bias, groups, memory_format = case
    factory, bn_class, shape = LAYERS[kind]
    torch.manual_seed(0)
    layer = factory(bias, groups)
    channels = layer.out_features if kind == "linear" else layer.out_channels
    model = nn.Sequential(layer, randomize_bn(bn_class(channels), 1), nn.ReLU()).to(dtype)
    x = torch.randn(shape, dtype=dtype) + 0.5
    if memory_format is not None:
        model = model.to(memory_format=memory_format)
        x = x.contiguous(memory_format=memory_format)
    model.train()  # fold uses eval semantics whatever the mode
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        expected = copy.deepcopy(model).eval()(x)

    folded, report = fold(model, check_input=x, return_report=True)

    assert [type(m) for m in folded] == [type(layer), nn.Identity, nn.ReLU]
    assert [(p.layer, p.bn) for p in report.folded] == [("0", "1")] and not report.not_folded
    assert folded[0].bias is not None and folded[0].weight.dtype == dtype
    if memory_format is not None:
        assert folded[0].weight.is_contiguous(memory_format=memory_format)
    with torch.no_grad():
        actual = folded(x)
    rtol, atol = tolerance(dtype)
    assert_close(actual, expected, rtol=rtol, atol=atol, name=f"{kind} folded output")
    assert report.max_abs_diff is not None and report.max_abs_diff <= report.allowed_diff
    # The original is untouched: same modules, same state, same mode.
    assert [type(m) for m in model] == [type(layer), bn_class, nn.ReLU] and model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert folded.training is False


@pytest.mark.parametrize("kind", ["linear", "conv2d-groups", "convtranspose2d"])
def test_fold_into_agrees_with_reference_fold_into_linear(kind):
    torch.manual_seed(3)
    if kind == "linear":
        layer, bn = nn.Linear(5, 3), nn.BatchNorm1d(3)
    elif kind == "conv2d-groups":
        layer, bn = nn.Conv2d(4, 6, 3, groups=2, bias=False), nn.BatchNorm2d(6)
    else:
        layer, bn = nn.ConvTranspose2d(4, 3, 3), nn.BatchNorm2d(3)
    layer, bn = layer.double(), randomize_bn(bn.double(), 4)
    # reference.fold_into_linear wants the output unit on axis 0; ConvTranspose keeps it on 1.
    weight = layer.weight.detach().numpy()
    weight = weight.transpose(1, 0, 2, 3) if kind == "convtranspose2d" else weight
    bias = None if layer.bias is None else layer.bias.detach().numpy()
    args = [t.detach().numpy() for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)]
    expected_weight, expected_bias = reference.fold_into_linear(weight, bias, *args, eps=bn.eps)
    if kind == "convtranspose2d":
        expected_weight = expected_weight.transpose(1, 0, 2, 3)

    original_weight = layer.weight.detach().clone()
    folded = fold_into(layer, bn)
    assert folded is not layer and torch.equal(layer.weight, original_weight)  # a copy
    assert_close(folded.weight, expected_weight, rtol=1e-12, atol=1e-14, name="weight")
    assert_close(folded.bias, expected_bias, rtol=1e-12, atol=1e-14, name="bias")
    assert fold_into(layer, bn, inplace=True) is layer
    assert_close(layer.weight, expected_weight, rtol=1e-12, atol=1e-14, name="weight")


def test_fold_bn_options():
    """affine=False, the batchnorm.nn drop-ins and circular padding fold; no running statistics
    is refused."""
    torch.manual_seed(0)
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    cases = [
        (nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, affine=False)),
        (nn.Conv2d(2, 4, 3), bnn.BatchNorm2d(4)),
        (nn.Conv2d(2, 4, 3), bnn.BatchNorm2d(4, bias=False)),
        (nn.Conv2d(2, 4, 3, padding=2, padding_mode="circular"), nn.BatchNorm2d(4)),
    ]
    for conv, bn in cases:
        model = nn.Sequential(conv, randomize_bn(bn, 2)).double().eval()
        folded, report = fold(model, check_input=x, return_report=True)
        assert isinstance(folded[1], nn.Identity), report
        with torch.no_grad():
            assert_close(folded(x), model(x), rtol=1e-10, atol=1e-12, name=type(bn).__name__)

    sync = nn.Sequential(nn.Linear(3, 4), randomize_bn(nn.SyncBatchNorm(4), 5)).double().eval()
    assert isinstance(fold(sync)[1], nn.Identity)  # eval mode on one process: a plain BN

    class BatchNormReLU(nn.BatchNorm2d):  # a fused activation: folding would drop the ReLU
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            return torch.relu(super().forward(input))

    fused = nn.Sequential(nn.Conv2d(2, 4, 3), randomize_bn(BatchNormReLU(4), 6))
    folded, report = fold(fused, return_report=True)
    assert isinstance(folded[1], BatchNormReLU) and "fused activation?" in report.not_folded["1"]
    with pytest.raises(ValueError, match="not the affine map of its running statistics"):
        fold_into(fused[0], fused[1])
    assert fused[1].training  # the probe left the mode alone

    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    folded, report = fold(model, return_report=True)
    assert isinstance(folded[1], nn.BatchNorm2d)
    assert "track_running_stats=False" in report.not_folded["1"]
    with pytest.raises(ValueError, match="track_running_stats=False"):
        fold_into(model[0], model[1])
    with pytest.raises(ValueError, match="track_running_stats=False"):
        fold(model, pairs=[("0", "1")])


class Residual(nn.Module):
    """conv1-bn1-relu-conv2-bn2, plus a skip: a forward written by hand, traced by torch.fx."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def _random_eval(model: nn.Module) -> nn.Module:
    for seed, m in enumerate(model.modules()):
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            randomize_bn(m, seed)
    return model.double().eval()


def test_fold_traced_model_and_what_is_left_alone():
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)

    class Network(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = Residual()
            self.after_relu = nn.BatchNorm2d(3)  # preceded by a ReLU: not foldable
            self.shared_conv = nn.Conv2d(3, 3, 1)  # its output also feeds the sum
            self.bn_shared = nn.BatchNorm2d(3)
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
            self.b.weight = self.a.weight  # tied weights
            self.bn_tied = nn.BatchNorm1d(3)
            self.unused = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
            self.used_half = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.after_relu(torch.relu(self.block(x)))
            z = self.shared_conv(y)
            y = self.bn_shared(z) + z
            y = y + self.used_half[0](y)  # the Sequential is not run as a whole
            v = y.mean(dim=(2, 3))
            return self.bn_tied(self.a(v)) + self.b(v)

    model = _random_eval(Network())
    with torch.no_grad():
        expected = model(x)
    folded, report = fold(model, check_input=x, return_report=True)
    assert {(p.layer, p.bn, p.found_by) for p in report.folded} == {
        ("block.conv1", "block.bn1", "fx"),
        ("block.conv2", "block.bn2", "fx"),
    }
    reasons = report.not_folded
    assert set(reasons) == {"after_relu", "bn_shared", "bn_tied", "unused.1", "used_half.1"}
    assert "not the output of a module" in reasons["after_relu"]
    assert "also used elsewhere" in reasons["bn_shared"]
    assert "shared with another module" in reasons["bn_tied"]
    assert "never calls it" in reasons["unused.1"] and "never calls it" in reasons["used_half.1"]
    with torch.no_grad():
        assert_close(folded(x), expected, rtol=1e-10, atol=1e-12, name="traced model")
    assert "block.bn1" in str(report) and "kept bn_shared" in str(report)
    assert json.loads(json.dumps(report.to_dict()))["folded"][0]["found_by"] == "fx"


def test_fold_untraceable_model_falls_back_to_sequential():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv1d(2, 3, 3), nn.Sequential(nn.BatchNorm1d(3), nn.ReLU()), nn.BatchNorm1d(3)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.features(x)
            return -self.features(x)

    model = _random_eval(Branchy())
    x = torch.randn(4, 2, 7, dtype=torch.float64)
    folded, report = fold(model, check_input=x, return_report=True)
    assert [(p.layer, p.bn, p.found_by) for p in report.folded] == [
        ("features.0", "features.1.0", "sequential")
    ]
    assert "ReLU" in report.not_folded["features.2"]
    assert any("torch.fx could not trace" in note for note in report.notes)
    with torch.no_grad():
        assert_close(folded(x), model(x), rtol=1e-10, atol=1e-12)
    assert fold(model, trace=False, return_report=True)[1].folded == report.folded


def test_fold_mismatch_is_caught_and_inplace_is_undone():
    """A wrong pair forced through pairs=, and a Linear on (N, L, C): the check catches both."""

    class SharedOutput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1, bias=False)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = self.conv(x)
            return self.bn(z) + z

    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    model = _random_eval(SharedOutput())
    model.train()
    state = copy.deepcopy(model.state_dict())
    original_bn = model.bn
    with pytest.raises(FoldMismatchError, match=r"differs from the original by up to .* allowed"):
        fold(model, pairs=[("conv", "bn")], check_input=x, inplace=True)
    assert model.bn is original_bn and model.training and model.bn.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.conv.bias is None and set(model.state_dict()) == set(state)
    # Without the check, a trusted wrong pair is folded as asked.
    assert isinstance(fold(model, pairs=[("conv", "bn")]).bn, nn.Identity)

    # Linear acts on the last axis, BatchNorm1d on axis 1: same size 5, not the same features.
    sequence = _random_eval(nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5)))
    with pytest.raises(FoldMismatchError):
        fold(sequence, check_input=torch.randn(2, 5, 5, dtype=torch.float64))
    assert isinstance(
        fold(sequence, check_input=torch.randn(2, 5, dtype=torch.float64))[1], nn.Identity
    )


def test_fold_inplace_and_pairs():
    model = _random_eval(Residual())
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    same, report = fold(
        model, pairs=[("conv1", "bn1")], inplace=True, trace=False, return_report=True
    )
    assert same is model and isinstance(model.bn1, nn.Identity)
    assert report.folded[0].found_by == "pairs"
    assert "no Linear/Conv directly before it" in report.not_folded["bn2"]
    with torch.no_grad():
        assert_close(model(x), expected, rtol=1e-10, atol=1e-12)

    fresh = _random_eval(Residual())
    state = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match="'conv1' already absorbs 'bn1'"):
        fold(fresh, pairs=[("conv1", "bn1"), ("conv1", "bn2")], inplace=True)
    assert isinstance(fresh.bn1, nn.BatchNorm2d)  # refused before anything changed
    assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())
    with pytest.raises(ValueError, match="'nope', which is not a module"):
        fold(fresh, pairs=[("nope", "bn1")])
    with pytest.raises(ValueError, match="twice"):
        fold(fresh, pairs=[("conv1", "bn1"), ("conv2", "bn1")])
    with pytest.raises(ValueError, match="not a batch-norm layer"):
        fold(fresh, pairs=[("conv1", "conv2")])
    bigger = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match="has 4 outputs but the batch-norm layer normalizes 3"):
        fold(bigger, pairs=[("0", "1")])
    with pytest.raises(ValueError, match="ReLU, not a Linear"):
        fold_into(nn.ReLU(), nn.BatchNorm1d(3))


# --- non-finite batches ----------------------------------------------------------------------


def _nan_batches():
    torch.manual_seed(0)
    batches = [torch.randn(8, 3, 4, 4) for _ in range(4)]
    batches[1][0, 0, 0, 0] = float("nan")
    return batches


@pytest.mark.parametrize("nonfinite", ["propagate", "skip"])
def test_recalibrate_never_writes_nan_and_leaves_the_bad_batch_out(nonfinite):
    from batchnorm.inference import recalibrate
    from batchnorm.nn import BatchNorm2d

    batches = _nan_batches()
    layer = torch.nn.Sequential(BatchNorm2d(3, nonfinite=nonfinite))
    with pytest.warns(UserWarning, match="NaN/Inf"):
        report = recalibrate(layer, batches, progress=False)
    assert (
        torch.isfinite(layer[0].running_mean).all() and torch.isfinite(layer[0].running_var).all()
    )
    clean = torch.nn.Sequential(BatchNorm2d(3))
    recalibrate(clean, [b for i, b in enumerate(batches) if i != 1], progress=False)
    torch.testing.assert_close(layer[0].running_mean, clean[0].running_mean, rtol=0, atol=0)
    torch.testing.assert_close(layer[0].running_var, clean[0].running_var, rtol=0, atol=0)
    assert [i for i, _, _ in report.nonfinite_batches] == [1] and report.num_batches == 3


def test_recalibrate_raises_for_a_layer_that_says_raise_and_changes_nothing():
    from batchnorm.inference import recalibrate
    from batchnorm.nn import BatchNorm2d

    layer = torch.nn.Sequential(BatchNorm2d(3, nonfinite="raise"))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(FloatingPointError, match="batch #1"):
        recalibrate(layer, _nan_batches(), progress=False)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key])


# --- fold's output check --------------------------------------------------------------------


def test_fold_check_accepts_a_folded_output_as_close_to_the_truth_as_the_original():
    from batchnorm.inference.folding import FoldMismatchError, FoldReport, _compare_outputs

    truth = [torch.tensor([1.0, 2.0], dtype=torch.float64)]
    original = [torch.tensor([1.001, 2.0])]  # the original's own rounding error: 1e-3
    close = [torch.tensor([0.9995, 2.0])]  # 1.5e-3 from the original, 5e-4 from the truth
    _compare_outputs(close, original, None, None, FoldReport(), truth)
    with pytest.raises(FoldMismatchError):  # without the float64 yardstick: a false alarm
        _compare_outputs(close, original, None, None, FoldReport())
    far = [torch.tensor([1.01, 2.0])]  # 1e-2 from the truth: ten times the original's error
    with pytest.raises(FoldMismatchError):
        _compare_outputs(far, original, None, None, FoldReport(), truth)


def test_fold_treats_our_layers_as_torchs_and_says_why_it_refuses():
    from batchnorm.inference import fold
    from batchnorm.nn import BatchNorm2d, convert

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ours = convert(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), BatchNorm2d(4)))
    for model in (net, ours):
        folded, report = fold(model, check_input=torch.randn(2, 3, 6, 6), return_report=True)
        assert [type(m).__name__ for m in folded] == ["Conv2d", "Identity"], report

    class Broken(torch.nn.BatchNorm2d):
        def forward(self, x):
            raise RuntimeError("this layer is broken in eval")

    _, report = fold(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), Broken(4)), return_report=True)
    assert "this layer is broken in eval" in report.not_folded["1"]
