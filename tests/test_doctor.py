"""batchnorm.doctor: each finding kind planted in a trained model (and absent on its healthy twin),
on torch.nn layers, batchnorm.nn layers and the variants; the user's model is never changed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import batchnorm.nn as bnn
from batchnorm.doctor import KINDS, Diagnosis, diagnose, fix

NORMS = ("torch", "ours", "ghost", "renorm", "sync")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "torch":
        return nn.BatchNorm1d(channels)  # accepts (N, C) and (N, C, L); 2-D via _Any below
    if kind == "ours":
        return bnn.BatchNorm1d(channels)
    if kind == "ghost":
        return bnn.GhostBatchNorm(channels, virtual_batch_size=32)
    if kind == "renorm":
        return bnn.BatchRenorm(
            channels, warmup_steps=50, r_max_reached_at=200, d_max_reached_at=150
        )
    if kind == "sync":
        return bnn.SyncBatchNorm(channels)  # one process: plain batch norm
    raise AssertionError(kind)


def _norm2d(kind: str, channels: int) -> nn.Module:
    return {"torch": nn.BatchNorm2d, "ours": bnn.BatchNorm2d}.get(kind, lambda c: _norm(kind, c))(
        channels
    )


def _net(kind: str) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        _norm2d(kind, 8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        _norm2d(kind, 8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 16),
        _norm(kind, 16),
        nn.ReLU(),
        nn.Linear(16, 4),
    )


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 6, 6, generator=g)
    w = torch.tensor([1.0, -2.0, 0.5])
    y = ((x.mean((2, 3)) @ w) > 0).long() + 2 * (x[:, 0, :3].mean((1, 2)) > 0).long()
    return x * 2 + 1, y


def _train(net: nn.Module, epochs_lr: tuple[float, ...]) -> nn.Module:
    torch.manual_seed(0)
    x, y = _data(2048, 0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net.train()
    for lr in epochs_lr:
        for group in opt.param_groups:
            group["lr"] = lr
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small models: one thread is fastest, and the machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {kind: _train(_net(kind), (0.1, 0.1, 0.01, 0.001)) for kind in NORMS}


def _batches(batch_size: int = 64, n: int = 512, labels: bool = True) -> list:
    x, y = _data(n, 7)
    if labels:
        return list(zip(x.split(batch_size), y.split(batch_size)))
    return list(x.split(batch_size))


def _kinds_above_info(d: Diagnosis) -> list[tuple[str, str | None]]:
    return [(f.kind, f.layer) for f in d.findings if f.severity != "info"]


def _state(model: nn.Module) -> dict:
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "grad": [p.requires_grad for p in model.parameters()],
    }


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert after.keys() == before["tensors"].keys()
    for key, value in before["tensors"].items():
        assert torch.equal(after[key], value) or (
            value.is_floating_point()
            and torch.equal(after[key].isnan(), value.isnan())
            and torch.equal(after[key].nan_to_num(), value.nan_to_num())
        ), key
    assert [m.training for m in model.modules()] == before["training"]
    assert [p.requires_grad for p in model.parameters()] == before["grad"]


@pytest.mark.parametrize("kind", NORMS)
def test_a_healthy_trained_model_gets_nothing_above_info(trained, kind):
    net = trained[kind]
    before = _state(net)
    d = diagnose(net, _batches())
    assert d.healthy, str(d)
    assert d.metrics["accuracy_eval"] > 0.7, d.metrics  # the model did learn
    assert len(d.layers) == 3
    _assert_unchanged(net, before)


def _plant(net: nn.Module, kind: str) -> tuple[nn.Module, str]:
    """A copy of ``net`` with the finding ``kind`` planted; returns it and the layer name."""
    sick = copy.deepcopy(net)
    bn = sick[4]
    with torch.no_grad():
        if kind == "stale-statistics":
            bn.running_mean += 2.0 * bn.running_var.sqrt()
            bn.running_var *= 4.0
        elif kind == "nonfinite-statistics":
            bn.running_var[3] = float("nan")
        elif kind == "dead-channel":
            bn.weight[:4] = 0.0
        elif kind == "keras-momentum":
            bn.momentum = 0.99
        elif kind == "frozen-but-updating":
            bn.weight.requires_grad_(False)
            bn.bias.requires_grad_(False)
        else:
            raise AssertionError(kind)
    return sick, "4"


PLANTED = (
    ("stale-statistics", "warning"),
    ("nonfinite-statistics", "error"),
    ("dead-channel", "warning"),
    ("keras-momentum", "warning"),
    ("frozen-but-updating", "warning"),
)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("kind,severity", PLANTED)
def test_each_planted_fault_is_found_at_its_layer(trained, norm, kind, severity):
    if kind == "frozen-but-updating" and norm == "renorm":
        pass  # renorm updates in train mode like batch norm: it must be found too
    sick, layer = _plant(trained[norm], kind)
    before = _state(sick)
    d = diagnose(sick, _batches())
    found = [f for f in d.of_kind(kind) if f.layer == layer]
    assert found, str(d)
    assert found[0].severity == severity, str(found[0])
    assert found[0].remedy and found[0].numbers
    # Nothing at the healthy twin's layer of that kind above info.
    twin = diagnose(trained[norm], _batches())
    assert not [f for f in twin.of_kind(kind) if f.severity != "info"], str(twin)
    _assert_unchanged(sick, before)


def test_stale_statistics_numbers_and_model_level_effect(trained):
    sick, _ = _plant(trained["torch"], "stale-statistics")
    d = diagnose(sick, _batches())
    layer = d.layers["4"]
    # The planted shift is 2 moving-average standard deviations and the variance 4x: the
    # population statistics of the data are near the trained ones, so about that.
    assert 1.5 < layer.mean_shift < 2.6, layer.mean_shift
    assert 3.0 < layer.var_ratio < 5.0, layer.var_ratio
    model_level = [f for f in d.of_kind("stale-statistics") if f.layer is None]
    assert model_level and model_level[0].severity in ("warning", "error")
    assert d.metrics["accuracy_recalibrated"] > d.metrics["accuracy_eval"] + 0.05
    gap = d.of_kind("train-eval-gap")
    assert gap and gap[0].severity in ("warning", "error")
    assert "moving averages are a cause" in gap[0].message


def test_lagging_moving_averages_without_learning_rate_decay_are_stale():
    """The real pytorch#5406 case: no planted numbers, training stopped at a high rate."""
    torch.manual_seed(0)
    net = _train(_net("torch"), (0.1, 0.1, 0.1))
    d = diagnose(net, _batches())
    healthy = diagnose(_train(_net("torch"), (0.1, 0.1, 0.01, 0.001)), _batches())
    assert d.metrics["output_change"] > 3 * healthy.metrics["output_change"], (
        d.metrics,
        healthy.metrics,
    )


def test_nonfinite_weights_say_to_reload_a_checkpoint(trained):
    sick = copy.deepcopy(trained["ours"])
    with torch.no_grad():
        sick[1].weight[0] = float("inf")
    (finding,) = diagnose(sick, _batches()).of_kind("nonfinite-statistics")
    assert finding.layer == "1" and "checkpoint" in finding.remedy
    assert finding.numbers == {"nonfinite_weight": 1}


def test_running_var_below_eps_is_a_dead_channel(trained):
    sick = copy.deepcopy(trained["torch"])
    with torch.no_grad():
        sick[1].running_var[2] = 1e-7
    (finding,) = diagnose(sick, _batches()).of_kind("dead-channel")
    assert finding.layer == "1" and finding.numbers["running_var_below_eps"] == 1
    assert finding.severity == "info"  # one channel of 8


def test_a_frozen_class_that_updates_is_found_and_frozen_batch_norm_is_not(trained):
    class FrozenBN(nn.BatchNorm2d):  # named frozen, but an ordinary batch norm
        pass

    leaky = copy.deepcopy(trained["torch"])
    old = leaky[1]
    leaky[1] = FrozenBN(8)
    leaky[1].load_state_dict(old.state_dict())
    assert [f.layer for f in diagnose(leaky, _batches()).of_kind("frozen-but-updating")] == ["1"]

    frozen = copy.deepcopy(trained["torch"])
    frozen[1] = bnn.FrozenBatchNorm.from_batchnorm(frozen[1])
    d = diagnose(frozen, _batches())
    assert not d.of_kind("frozen-but-updating")
    assert d.layers["1"].mode == "frozen"
    assert not [f for f in d.findings if f.layer == "1" and f.kind == "small-batch"]


@pytest.mark.parametrize("norm", ("torch", "ours", "renorm"))
def test_small_batches_are_found_with_their_expected_noise(trained, norm):
    d = diagnose(trained[norm], _batches(batch_size=2))
    (finding,) = [f for f in d.of_kind("small-batch") if f.layer == "9"]
    assert finding.severity == "warning"
    assert finding.numbers["values_per_channel"] == 2
    assert finding.numbers["noise_mean_std_units"] == pytest.approx(2**-0.5)
    assert finding.numbers["noise_var_relative"] == pytest.approx(2**0.5)
    # Conv layers: 2 samples x 36 positions = 72 values, but two samples only: a warning too.
    conv = [f for f in d.of_kind("small-batch") if f.layer == "1"]
    assert conv and conv[0].numbers["values_per_channel"] == 72
    assert conv[0].severity == "warning"
    healthy = diagnose(trained[norm], _batches(batch_size=64))
    assert {f.layer for f in healthy.of_kind("small-batch")} == {"9"}  # 64 values: info
    assert all(f.severity == "info" for f in healthy.of_kind("small-batch"))


def test_ghost_batch_norm_counts_values_per_ghost_batch(trained):
    d = diagnose(trained["ghost"], _batches(batch_size=64))
    assert d.layers["9"].values_per_channel == 32  # virtual_batch_size=32 of a batch of 64
    assert d.layers["1"].values_per_channel == 32 * 36


def test_one_value_per_channel_is_an_error():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    d = diagnose(net, [torch.randn(1, 4) for _ in range(3)], fold_check=False)
    (finding,) = d.of_kind("small-batch")
    assert finding.severity == "error"
    assert any("train mode" in note or "population" in note for note in d.notes), d.notes


def test_foldable_counts_the_layers_fold_removes(trained):
    d = diagnose(trained["ours"], _batches())
    (finding,) = d.of_kind("foldable")
    assert finding.numbers["foldable"] == 3 and finding.severity == "info"
    after_relu = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.BatchNorm1d(4))
    assert not diagnose(after_relu, [torch.randn(8, 4) for _ in range(2)]).of_kind("foldable")


def test_a_model_without_batch_norm_says_so():
    net = nn.Sequential(nn.Linear(4, 4), nn.GroupNorm(2, 4))
    d = diagnose(net, [torch.randn(8, 4)])
    assert [f.kind for f in d.findings] == ["no-batch-norm"]
    assert d.healthy and not d.layers and "no batch-norm layer" in str(d)


def test_labels_give_loss_and_accuracy_and_without_them_none(trained):
    x, y = _data(256, 3)
    with_labels = diagnose(trained["torch"], list(x.split(64)), labels=y)
    assert 0.5 < with_labels.metrics["accuracy_eval"] <= 1.0
    assert with_labels.metrics["loss_eval"] > 0
    tuples = diagnose(trained["torch"], list(zip(x.split(64), y.split(64))))
    assert tuples.metrics["accuracy_eval"] == with_labels.metrics["accuracy_eval"]
    without = diagnose(trained["torch"], list(x.split(64)))
    assert "accuracy_eval" not in without.metrics
    custom = diagnose(
        trained["torch"], list(x.split(64)), labels=y, loss_fn=lambda out, lab: out.sum() * 0 + 7
    )
    assert custom.metrics["loss_eval"] == pytest.approx(7.0)


def test_bad_input_gives_clear_errors(trained):
    with pytest.raises(TypeError, match="single tensor"):
        diagnose(trained["torch"], torch.randn(8, 3, 6, 6))
    with pytest.raises(ValueError, match="no batch"):
        diagnose(trained["torch"], [])
    with pytest.raises(ValueError, match="labels has 3 rows"):
        diagnose(trained["torch"], [torch.randn(8, 3, 6, 6)], labels=torch.zeros(3))


def test_fix_recalibrates_a_copy_and_the_diagnosis_clears(trained):
    sick, _ = _plant(trained["torch"], "stale-statistics")
    before = _state(sick)
    fixed, report = fix(sick, _batches())
    _assert_unchanged(sick, before)
    assert report.ok and report.finite and report.gap_after < 0.5 * report.gap_before, report
    assert diagnose(fixed, _batches()).healthy
    folded, fold_report = fix(sick, _batches(), fold_layers=True)
    assert not any(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in folded.modules())
    assert len(fold_report.fold.folded) == 3
    x = _data(64, 11)[0]
    torch.testing.assert_close(folded(x), fixed(x), atol=1e-4, rtol=1e-4)


def test_fix_repairs_nonfinite_running_statistics(trained):
    sick, _ = _plant(trained["ours"], "nonfinite-statistics")
    assert not torch.isfinite(sick.eval()(_data(8, 1)[0])).all()
    fixed, report = fix(sick, _batches())
    assert report.ok and report.finite
    assert diagnose(fixed, _batches()).healthy


def test_every_kind_is_documented_and_the_diagnosis_serializes(trained):
    import json

    sick, _ = _plant(trained["torch"], "dead-channel")
    d = diagnose(sick, _batches())
    json.dumps(d.to_dict())
    assert set(f.kind for f in d.findings) <= set(KINDS)
    with pytest.raises(ValueError, match="unknown finding kind"):
        d.of_kind("stale")
    from pathlib import Path

    page = (Path(__file__).parents[1] / "docs" / "doctor.md").read_text()
    for kind in KINDS:
        assert f"`{kind}`" in page, kind


class FrozenBatchNorm2d(nn.Module):
    """torchvision's frozen batch norm: buffers only, not a _BatchNorm."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0)):
            self.register_buffer(name, torch.full((channels,), value))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


def test_a_torchvision_style_frozen_layer_is_checked_but_never_trained():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4), nn.ReLU())
    d = diagnose(net, [torch.randn(8, 3, 6, 6) for _ in range(2)])
    assert d.layers["1"].mode == "frozen"
    assert not d.of_kind("small-batch") and not d.of_kind("frozen-but-updating")
    with torch.no_grad():
        net[1].running_var[0] = float("inf")
    (finding,) = diagnose(net, [torch.randn(8, 3, 6, 6)]).of_kind("nonfinite-statistics")
    assert finding.layer == "1"
