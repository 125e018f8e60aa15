"""The Santurkar et al. (2018) experiments (noisy-bn, ics, landscape), shortened, on scikit-learn's
digits: the run directory is complete, the report agrees with metrics.json, the verdicts follow
from the numbers by the rules, and the measured quantities are sane."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from batchnorm.lab import experiments
from batchnorm.lab.config import ConfigError
from batchnorm.lab.experiment import MARKER_FILE, make_config, run_experiment
from batchnorm.lab.experiments.cnn import VGGStyle, batch_order, drift_numbers
from tests.lab_helpers import check_run_dir, csv_rows

pytestmark = pytest.mark.usefixtures("lab_quiet")

COMMON = ["dataset=digits", "channels=4,8", "threads=1", "train_subset=none", "test_subset=none"]
SHORT = {
    "noisy-bn": ["steps=40", "eval_every=20", "eval_examples=300"],
    "ics": ["steps=40", "probe_every=20", "dln_depth=6", "dln_steps=60", "dln_probe_every=30"],
    "landscape": ["early_steps=20", "steps=40", "probe_every=10", "eta_num=3"],
}


def run_quick(name: str, tmp_path: Path, extra: tuple[str, ...] = ()) -> tuple[Path, dict]:
    experiment = experiments.get(name)
    config = make_config(experiment, quick=True, overrides=COMMON + SHORT[name] + list(extra))
    result = run_experiment(experiment, config, quick=True, out=tmp_path)
    metrics = check_run_dir(result.run_dir, name)
    assert metrics["verdict"] == result.verdict
    return result.run_dir, metrics


def test_noisy_bn(tmp_path: Path) -> None:
    from batchnorm.lab.experiments import noisy_bn
    from batchnorm.lab.numbers import numbers_from_json

    run_dir, metrics = run_quick("noisy-bn", tmp_path, ("lrs=0.1,0.5",))
    m = metrics["metrics"]
    assert set(m["final_test_acc"]) == {"standard", "BN", "noisy BN"}
    assert m["baseline"].startswith("BN at lr 0.1")
    assert m["baseline_train_accuracy"] == pytest.approx(m["final_train_acc"]["BN"]["0.1"][0])
    # The verdicts are the judge's on the saved numbers, which are the metrics' numbers.
    numbers = numbers_from_json(
        noisy_bn.Numbers, json.loads((run_dir / "numbers.json").read_text())["numbers"]
    )
    assert numbers.train["noisy BN"][1] == m["final_train_acc"]["noisy BN"]["0.5"]
    assert numbers.instability["standard"][0] == m["instability"]["standard"]["0.1"]
    assert [c["held"] for c in metrics["claims"]] == [c.held for c in noisy_bn.judge(numbers)]
    for key, job in m["jobs"].items():
        # Pairs of consecutive steps every 10 steps: (0, 1), (10, 11), (20, 21), (30, 31).
        assert job["pair_steps"] == [0, 10, 20, 30], key
        assert job["instability"] >= 0.0
        assert 0.0 <= job["final_train_acc"] <= 1.0
        if key.startswith("standard"):  # nothing to recalibrate: the same network
            assert job["final_train_acc"] == job["ema_train_acc"]
    rows = csv_rows(run_dir / "percentiles.csv")
    assert len(rows) == 2 * 3 * 3  # lrs x variants x evaluations (steps 0, 20, 40)
    assert all(float(r["p15"]) <= float(r["p50"]) <= float(r["p85"]) for r in rows)
    assert {r["step"] for r in rows} == {"0", "20", "40"}


def test_recalibration_switches_the_noise_off() -> None:
    """Population statistics of a noisy network are those of its noise-free activations."""
    from batchnorm.inference import recalibrate
    from batchnorm.lab.data import load_dataset
    from batchnorm.lab.experiments import noisy_bn
    from batchnorm.lab.experiments.cnn import ImageData

    d = load_dataset("digits")

    def images(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x, dtype=np.float32)).reshape(-1, 1, 8, 8)

    data = ImageData(
        "digits", images(d.train_x), torch.as_tensor(d.train_y), images(d.test_x),
        torch.as_tensor(d.test_y), (8, 8), 10, "digits",
    )  # fmt: skip
    noisy = VGGStyle((8, 8), (4, 8), 10, "noisy BN", seed=1)
    clean = VGGStyle((8, 8), (4, 8), 10, "BN", seed=1)  # the same weights, no noise
    batches = [torch.arange(k * 64, (k + 1) * 64) for k in range(4)]
    recalibrate(noisy, batches, forward=noisy_bn._noise_off_forward(data), progress=False)
    recalibrate(clean, batches, forward=lambda m, idx: m(data.train_x[idx]), progress=False)
    for a, b in zip(noisy.norms, clean.norms):
        torch.testing.assert_close(a[0].running_mean, b.running_mean)
        torch.testing.assert_close(a[0].running_var, b.running_var)
    assert noisy.training and noisy.norms[0][1].training  # the flags are put back


def test_ics(tmp_path: Path) -> None:
    from batchnorm.lab.experiments import ics
    from batchnorm.lab.numbers import numbers_from_json

    run_dir, metrics = run_quick("ics", tmp_path)
    m = metrics["metrics"]
    settings = ("CNN", "deep linear, lr 1e-06", "deep linear, lr 1e-07")
    for setting in settings:
        for variant in ("standard", "BN"):
            (job,) = m["jobs"][f"{setting}|{variant}"]
            layers = 3 if setting == "CNN" else 6  # 2 convs + classifier; dln_depth
            assert job["steps"] == ([0, 20] if setting == "CNN" else [0, 30])
            for probe in job["probes"]:
                assert len(probe["l2"]) == layers
                assert probe["l2"][0] == 0.0 and probe["cos"][0] == pytest.approx(1.0)
                assert all(v > 0 for v in probe["l2"][1:])
                assert all(-1.0 <= c <= 1.0 + 1e-12 for c in probe["cos"])
            assert len(m["per_layer_relative"][f"{setting}|{variant}"]) == layers - 1
    numbers = numbers_from_json(
        ics.Numbers, json.loads((run_dir / "numbers.json").read_text())["numbers"]
    )
    assert numbers.settings == list(settings)
    assert [c["held"] for c in metrics["claims"]] == [c.held for c in ics.judge(numbers)]
    assert [c["name"] for c in metrics["claims"]] == [
        "cnn-relative", "cnn-cosine", "dln-relative", "dln-cosine", "dln-increases",
    ]  # fmt: skip
    assert m["baseline"] == "the CNN with BN" and 0 < m["baseline_train_accuracy"] <= 1
    assert len(csv_rows(run_dir / "shift.csv")) == 2 * (2 * 3 + 2 * 2 * 6)


def test_landscape(tmp_path: Path) -> None:
    from batchnorm.lab.experiments import landscape
    from batchnorm.lab.numbers import numbers_from_json

    run_dir, metrics = run_quick("landscape", tmp_path)
    m = metrics["metrics"]
    assert m["step_sizes"] == pytest.approx([0.05, 0.225, 0.4])  # [0.5, 4] x lr 0.1
    for variant in ("standard", "BN"):
        (job,) = m["jobs"][variant]
        assert job["steps"] == [0, 10, 20, 30]
        for p in job["probes"]:
            assert p["loss_range"] == pytest.approx(max(p["losses"]) - min(p["losses"]))
            assert p["grad_change"] == max(p["grad_differences"]) > 0
            assert p["beta"] > 0 and p["grad_norm"] > 0
    numbers = numbers_from_json(
        landscape.Numbers, json.loads((run_dir / "numbers.json").read_text())["numbers"]
    )
    assert numbers.steps == [0, 10, 20, 30] and numbers.early_steps == 20
    assert numbers.values["beta"]["BN"] == [[p["beta"] for p in m["jobs"]["BN"][0]["probes"]]]
    assert [c["held"] for c in metrics["claims"]] == [c.held for c in landscape.judge(numbers)]
    assert m["baseline"] == "BN" and 0 < m["baseline_train_accuracy"] <= 1


def test_resumed_run_reuses_finished_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run interrupted after its first job continues from the saved job: same numbers."""
    from batchnorm.lab.experiments import landscape

    experiment = experiments.get("landscape")
    config = make_config(experiment, quick=True, overrides=COMMON + SHORT["landscape"])
    reference = run_experiment(experiment, config, quick=True, out=tmp_path / "reference")
    real_job = landscape._job
    calls = {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_job(*args, **kwargs)

    monkeypatch.setattr(landscape, "_job", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(experiment, config, quick=True, out=tmp_path / "runs")
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / MARKER_FILE).is_file() and len(list((run_dir / "jobs").glob("*.json"))) == 1
    monkeypatch.setattr(landscape, "_job", real_job)
    run_experiment(experiment, None, resume=run_dir)
    a = json.loads((run_dir / "metrics.json").read_text())
    b = json.loads((reference.run_dir / "metrics.json").read_text())
    assert a["resumed"] and a["metrics"]["final_train_acc"] == b["metrics"]["final_train_acc"]
    assert a["claims"] == b["claims"]


def test_building_blocks() -> None:
    order = batch_order(10, 3, 7, seed=0)
    assert order.shape == (7, 3)
    for epoch in (order[:3], order[3:6]):  # each epoch: distinct examples
        assert len(set(epoch.ravel().tolist())) == 9
    # Paired runs: every variant of a seed starts from the same conv and classifier weights.
    nets = [VGGStyle((8, 8), (4, 8), 10, v, seed=3) for v in ("standard", "BN", "noisy BN")]
    for other in nets[1:]:
        assert torch.equal(nets[0].convs[0].weight, other.convs[0].weight)
        assert torch.equal(nets[0].classifier.weight, other.classifier.weight)
    assert len(nets[1].layer_groups()[0]) == 4  # conv weight, bias, gamma, beta
    # He's initialization: the same weights for every variant, variance 2 / fan_in, zero bias.
    he = [VGGStyle((28, 28), (64, 64), 10, v, seed=3, init="kaiming") for v in ("standard", "BN")]
    assert torch.equal(he[0].convs[1].weight, he[1].convs[1].weight)
    assert float(he[0].convs[1].weight.detach().var()) == pytest.approx(2 / (64 * 9), rel=0.05)
    assert not he[0].convs[1].bias.any()
    with pytest.raises(ValueError, match="init must be one of"):
        VGGStyle((8, 8), (4,), 10, "BN", seed=0, init="orthogonal")
    assert drift_numbers(np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])) == (0.0, 1.0)
    with pytest.raises(ValueError, match="too many"):
        VGGStyle((8, 8), (4, 8, 8, 8), 10, "BN", seed=0)


def test_head_options_keep_the_weights_and_change_only_the_classifier() -> None:
    """Without the last pool the classifier reads the whole last map (8 x 14 x 14 on 28 x 28
    images after one pool, not 8 x 7 x 7); channels-last computes the same function; a hidden
    layer adds one ReLU layer."""
    x = torch.rand(5, 1, 28, 28)
    pooled = VGGStyle((28, 28), (4, 8), 10, "BN", seed=2, init="kaiming")
    flat = VGGStyle((28, 28), (4, 8), 10, "BN", seed=2, init="kaiming", pool_last=False)
    assert pooled.classifier.in_features == 8 * 7 * 7 and flat.classifier.in_features == 8 * 14 * 14
    standard = VGGStyle((28, 28), (4, 8), 10, "standard", seed=2, init="kaiming", pool_last=False)
    assert torch.equal(standard.convs[1].weight, flat.convs[1].weight)  # paired variants
    assert torch.equal(standard.classifier.weight, flat.classifier.weight)
    assert flat(x).shape == (5, 10)
    fast = VGGStyle(
        (28, 28), (4, 8), 10, "BN", seed=2, init="kaiming", pool_last=False, channels_last=True
    )
    assert fast.convs[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(fast(x), flat(x), atol=1e-5)
    hidden = VGGStyle((28, 28), (4, 8), 10, "standard", seed=2, pool_last=False, hidden=16)
    assert [m.out_features for m in hidden.classifier if isinstance(m, torch.nn.Linear)] == [16, 10]
    assert hidden(x).shape == (5, 10) and len(hidden.layer_groups()[-1]) == 4
    with pytest.raises(ValueError, match="hidden must be >= 0"):
        VGGStyle((28, 28), (4,), 10, "BN", seed=0, hidden=-1)


def test_curve_data_keeps_the_first_test_images() -> None:
    from dataclasses import replace

    from batchnorm.lab.experiments.cnn import CNNConfig, ImageData, curve_data

    data = ImageData(
        "toy", torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.int64),
        torch.rand(10, 1, 8, 8), torch.arange(10), (8, 8), 10, "toy",
    )  # fmt: skip
    curve = curve_data(data, replace(CNNConfig(), curve_test_examples=3))
    assert torch.equal(curve.test_y, torch.arange(3)) and curve.train_x is data.train_x
    assert curve_data(data, replace(CNNConfig(), curve_test_examples=None)) is data


@pytest.mark.parametrize(
    ("name", "override", "message"),
    [
        ("noisy-bn", "tracked_layer=4", r"tracked_layer must be a conv layer, 1..3"),
        ("noisy-bn", "lrs=0.1,-1", r"lrs must list positive learning rates"),
        ("ics", "dln_depth=1", r"dln_depth must be at least 2"),
        ("landscape", "eta_low=5", r"need 0 < eta_low <= eta_high"),
        ("landscape", "channels=8,0", r"channels must list positive widths"),
    ],
)
def test_bad_config_says_what_is_wrong(name: str, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_config(experiments.get(name), overrides=[override])


def test_a_diverged_network_counts_as_chance_on_the_evaluation_schedule() -> None:
    from batchnorm.lab.data import load_dataset
    from batchnorm.lab.experiments import noisy_bn
    from batchnorm.lab.experiments.cnn import ImageData

    d = load_dataset("digits")
    train_x = np.array(d.train_x, dtype=np.float32)
    train_x[::2] = np.nan  # every other training image: the loss becomes non-finite at once

    def images(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x, dtype=np.float32)).reshape(-1, 1, 8, 8)

    data = ImageData(
        "digits",
        images(train_x),
        torch.as_tensor(d.train_y),
        images(d.test_x),
        torch.as_tensor(d.test_y),
        (8, 8),
        10,
        "digits",
    )
    config = make_config(
        experiments.get("noisy-bn"),
        quick=True,
        overrides=COMMON + ["steps=45", "eval_every=20", "eval_examples=100"],
    )
    job = noisy_bn._train(config, data, "standard", 0.1, 0, "diverging")
    assert job["diverged_at"] == 0
    assert job["steps"] == [0, 20, 40, 45]
    assert job["test_acc"][-1] == 0.1 and np.isnan(job["train_loss"][-1])
