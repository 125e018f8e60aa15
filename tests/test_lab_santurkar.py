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
    "landscape": ["steps=40", "probe_every=20", "eta_num=3"],
}


def run_quick(name: str, tmp_path: Path, extra: tuple[str, ...] = ()) -> tuple[Path, dict]:
    experiment = experiments.get(name)
    config = make_config(experiment, quick=True, overrides=COMMON + SHORT[name] + list(extra))
    result = run_experiment(experiment, config, quick=True, out=tmp_path)
    metrics = check_run_dir(result.run_dir, name)
    assert metrics["verdict"] == result.verdict
    return result.run_dir, metrics


def test_noisy_bn(tmp_path: Path) -> None:
    run_dir, metrics = run_quick("noisy-bn", tmp_path, ("lrs=0.1,0.5",))
    m = metrics["metrics"]
    assert set(m["final_test_acc"]) == {"standard", "BN", "noisy BN"}
    # Three claims, each decided from the numbers in metrics as the rule says.
    acc = {
        v: {lr: float(np.mean(a)) for lr, a in d.items()} for v, d in m["final_test_acc"].items()
    }
    drift = {
        v: {lr: float(np.mean(a)) for lr, a in d.items()} for v, d in m["median_drift"].items()
    }
    held = {c["name"]: c["held"] for c in metrics["claims"]}
    assert held["as-bn"] == all(
        acc["noisy BN"][lr] >= acc["BN"][lr] - 0.02 for lr in ("0.1", "0.5")
    )
    assert held["beats-standard"] == all(
        acc["noisy BN"][lr] >= acc["standard"][lr] for lr in ("0.1", "0.5")
    )
    assert held["less-stable"] == all(
        drift["noisy BN"][lr] > drift["standard"][lr] for lr in ("0.1", "0.5")
    )
    rows = csv_rows(run_dir / "percentiles.csv")
    assert len(rows) == 2 * 3 * 3  # lrs x variants x evaluations (steps 0, 20, 40)
    assert all(float(r["p15"]) <= float(r["p50"]) <= float(r["p85"]) for r in rows)
    assert {r["step"] for r in rows} == {"0", "20", "40"}


def test_ics(tmp_path: Path) -> None:
    run_dir, metrics = run_quick("ics", tmp_path)
    m = metrics["metrics"]
    for setting in ("CNN", "deep linear"):
        for variant in ("standard", "BN"):
            (job,) = m["jobs"][f"{setting}|{variant}"]
            layers = 3 if setting == "CNN" else 6  # 2 convs + classifier; dln_depth
            assert job["steps"] == ([0, 20] if setting == "CNN" else [0, 30])
            for probe in job["probes"]:
                assert len(probe["l2"]) == layers
                assert probe["l2"][0] == 0.0 and probe["cos"][0] == pytest.approx(1.0)
                assert all(v > 0 for v in probe["l2"][1:])
                assert all(-1.0 <= c <= 1.0 + 1e-12 for c in probe["cos"])
    l2 = m["median_l2"]
    held = {c["name"]: c["held"] for c in metrics["claims"]}
    assert held["l2"] == all(
        l2[f"{s}|BN"] >= 0.9 * l2[f"{s}|standard"] for s in ("CNN", "deep linear")
    )
    assert len(csv_rows(run_dir / "shift.csv")) == 2 * (2 * 3 + 2 * 6)


def test_landscape(tmp_path: Path) -> None:
    _, metrics = run_quick("landscape", tmp_path)
    m = metrics["metrics"]
    assert m["step_sizes"] == pytest.approx([0.05, 0.225, 0.4])  # [0.5, 4] x lr 0.1
    for variant in ("standard", "BN"):
        (job,) = m["jobs"][variant]
        assert job["steps"] == [0, 20]
        for p in job["probes"]:
            assert p["loss_range"] == pytest.approx(max(p["losses"]) - min(p["losses"]))
            assert p["grad_change"] == max(p["grad_differences"]) > 0
            assert p["beta"] > 0 and p["grad_norm"] > 0
    for claim in metrics["claims"]:
        q = claim["name"]
        bn_max, st_max = m["max"][f"BN|{q}"], m["max"][f"standard|{q}"]
        bn_spread, st_spread = m["spread"][f"BN|{q}"], m["spread"][f"standard|{q}"]
        assert claim["held"] == (bn_max < st_max and bn_spread < st_spread)


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
    assert a["resumed"] and a["metrics"]["max"] == b["metrics"]["max"]


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
    assert drift_numbers(np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])) == (0.0, 1.0)
    with pytest.raises(ValueError, match="too many"):
        VGGStyle((8, 8), (4, 8, 8, 8), 10, "BN", seed=0)


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
