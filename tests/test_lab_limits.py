"""The limits-and-alternatives experiments (small-batch, non-iid, ghost, precise-bn, agc),
shortened, on scikit-learn's digits: complete run directories, reports that agree with
metrics.json, the samplers and checks they rely on, and exact resumption."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from batchnorm.lab import experiments
from batchnorm.lab.config import ConfigError
from batchnorm.lab.experiment import MARKER_FILE, make_config, run_experiment
from batchnorm.lab.experiments import cnn
from tests.lab_helpers import check_run_dir, table

pytestmark = pytest.mark.usefixtures("lab_quiet")

NEW = ("small-batch", "non-iid", "ghost", "precise-bn", "agc")
COMMON = ["dataset=digits", "threads=1", "seeds=2", "evals=2"]
SMALL = {
    "small-batch": ["train_subset=320", "epochs=0.4", "stat_sizes=32,4"],
    "non-iid": ["train_subset=400"],
    "ghost": ["train_subset=512", "large_batch=128", "epochs=2"],
    "precise-bn": ["train_subset=400", "popstat_batches=5", "test_subset=200"],
    "agc": ["train_subset=400", "epochs=1", "batch_sizes=16,64", "test_subset=200"],
}


def quick_run(name: str, tmp_path: Path, extra: list[str] | None = None):
    experiment = experiments.get(name)
    config = make_config(experiment, quick=True, overrides=COMMON + SMALL[name] + (extra or []))
    return run_experiment(experiment, config, quick=True, out=tmp_path)


@pytest.mark.parametrize("name", NEW)
def test_quick_run_is_complete(name: str, tmp_path: Path) -> None:
    result = quick_run(name, tmp_path)
    metrics = check_run_dir(result.run_dir, name)
    report = (result.run_dir / "report.md").read_text()
    assert len(metrics["claims"]) >= 2
    # Every claim states its evidence, and each job left its JSON.
    assert all(c["evidence"] and c["rule"] for c in metrics["claims"])
    assert list((result.run_dir / "jobs").glob("*.json"))
    assert "## Protocol" in report and "Choices the paper leaves open" in report
    m = metrics["metrics"]
    if name == "small-batch":
        rows = table(report, "Final accuracy by network (mean ± std over seeds)")
        assert [r[0] for r in rows] == ["BN over 32", "BN over 4", "GN"]
        # Only the statistics' group varies: one step count and learning rate for all.
        assert isinstance(m["steps"], int) and m["batch_size"] == 32
        assert m["baseline"] == "BN with statistics over the whole batch of 32"
        paper = next(c for c in metrics["comparisons"] if c["quantity"].startswith("BN"))
        assert paper["paper"].startswith("23.6 / 27.3")
    if name in ("small-batch", "ghost", "non-iid"):
        assert 0 <= m["baseline_train_accuracy"] <= 1 and 0 <= m["baseline_test_accuracy"] <= 1
    if name == "ghost":
        steps = list(m["steps"].values())  # small, large, ghost, adapted
        assert steps[0] == steps[3] and steps[1] == steps[2] < steps[0]
    if name == "precise-bn":
        # Every arm evaluated with the moving averages and precise BN at each point.
        assert set(m["gap_mean"]) == {
            "base, constant",
            "base, cosine",
            "high, constant",
            "high, cosine",
        }
        assert len(m["eval_steps"]) == 2 and m["lrs"]["high"] == 4 * m["lrs"]["base"]
    if name == "agc":
        assert set(m["diverged"]["no norm"]) == {"16", "64"}
        assert len(m["final_test_acc"]["no norm + AGC"]["64"]) == 2
        # The threshold shrinks as the batch grows (NFNets Sec. 4.1).
        assert m["clipping"]["64"] < m["clipping"]["16"]


def test_diverged_network_is_stopped_and_scored_at_chance() -> None:
    x, y = torch.rand(64, 1, 8, 8), torch.arange(64) % 10
    data = cnn.ImageData("random", x, y, x, y, (8, 8), 10, "64 random images")
    model = cnn.conv_net("none", (4,), 10, seed=0)
    result = cnn.train_net(
        model,
        data,
        cnn.iid_batches(64, 16, 0),
        steps=20,
        lr=1e30,
        momentum=0.9,
        evals=2,
        desc="diverge",
    )
    assert 0 < result["diverged_at"] <= 20
    assert result["steps"] == [10, 20] and result["test_acc"] == [0.1, 0.1]


def test_few_class_batches_hold_few_classes() -> None:
    labels = np.repeat(np.arange(10), 30)
    batches = cnn.few_class_batches(labels, 32, 2, seed=0)
    seen = set()
    for _ in range(50):
        idx = next(batches)
        assert len(idx) == 32 and len(set(idx.tolist())) == 32
        classes = set(labels[idx].tolist())
        assert len(classes) == 2
        seen |= classes
    assert seen == set(range(10))
    with pytest.raises(ValueError, match="classes_per_batch must lie in 1..10"):
        next(cnn.few_class_batches(labels, 32, 11, seed=0))


def test_iid_batches_cover_each_epoch() -> None:
    batches = cnn.iid_batches(100, 10, seed=1)
    epoch = np.concatenate([next(batches) for _ in range(10)])
    assert sorted(epoch.tolist()) == list(range(100))


def test_conv_net_norms() -> None:
    x = torch.randn(4, 1, 8, 8)
    for norm in cnn.NORMS:
        kwargs = {"virtual_batch_size": 2} if norm == "ghost" else {}
        kwargs |= {"num_groups": 4} if norm == "gn" else {}
        out = cnn.conv_net(norm, (8, 16), 10, seed=0, **kwargs)(x)
        assert out.shape == (4, 10)
    with pytest.raises(ValueError, match="unknown norm 'bnn'"):
        cnn.conv_net("bnn", (8,), 10, seed=0)


@pytest.mark.parametrize(
    ("name", "override", "message"),
    [
        ("small-batch", "stat_sizes=32,12", "must divide batch_size"),
        ("small-batch", "gn_groups=3", "must divide every width"),
        ("ghost", "ghost_size=48", "divide it"),
        ("precise-bn", "high_factor=1", "high_factor must be a number > 1"),
        ("non-iid", "classes_per_batch=20", "at least two examples"),
        ("agc", "batch_sizes=1,8", "batch_sizes must list sizes >= 2"),
    ],
)
def test_bad_configs_are_refused(name: str, override: str, message: str) -> None:
    with pytest.raises((ConfigError, ValueError), match=message):
        make_config(experiments.get(name), quick=True, overrides=[override])


@pytest.mark.parametrize("grouped", [False, True], ids=["one by one", "grouped"])
def test_interrupted_run_resumes_exactly(
    grouped: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchnorm.lab import grouped as grouped_module

    setting = [f"grouped={str(grouped).lower()}"]
    reference = quick_run("non-iid", tmp_path / "reference", setting)
    # Each network (or group) trains in one call of the loop, its rate drop included. One by
    # one, the third network is interrupted (two jobs saved); grouped, the whole group (none).
    module, name = (grouped_module, "train_grouped") if grouped else (cnn, "train_net")
    real = getattr(module, name)
    calls = {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == (1 if grouped else 3):
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupting)
    with pytest.raises(KeyboardInterrupt):
        quick_run("non-iid", tmp_path / "runs", setting)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / MARKER_FILE).is_file()
    assert len(list((run_dir / "jobs").glob("*.json"))) == (0 if grouped else 2)
    resumed_calls = {"n": 0}

    def counting(*args, **kwargs):
        resumed_calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    resumed = run_experiment(experiments.get("non-iid"), None, resume=run_dir)
    networks = len(list((run_dir / "jobs").glob("*.json")))
    # Grouped: the group again; one by one: the networks not saved.
    assert resumed_calls["n"] == (1 if grouped else networks - 2)
    check_run_dir(resumed.run_dir, "non-iid")
    a = json.loads((run_dir / "metrics.json").read_text())
    b = json.loads((reference.run_dir / "metrics.json").read_text())
    assert a["metrics"]["final_test_acc"] == b["metrics"]["final_test_acc"]
    assert a["comparisons"] == b["comparisons"]
