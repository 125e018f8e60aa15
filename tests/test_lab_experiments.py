"""Every experiment, shortened, on scikit-learn's digits: the run directory is complete, the
report parses and agrees with metrics.json, interrupted runs are marked and resume exactly."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from batchnorm.lab import experiments
from batchnorm.lab import train as train_module
from batchnorm.lab.experiment import (
    MARKER_FILE,
    _new_run_dir,
    list_runs,
    make_config,
    run_experiment,
)
from tests.lab_helpers import check_run_dir, csv_rows

pytestmark = pytest.mark.usefixtures("lab_quiet")

# Each experiment's quick mode, shortened further: the point is the machinery, not the numbers.
COMMON = [
    "dataset=digits",
    "steps=90",
    "eval_every=30",
    "popstat_batches=3",
    "final_popstat_batches=5",
    "threads=1",
    "seeds=2",
]
SMALL = {
    "fig1": ["hidden=32,32,32"],
    "lr": ["lrs=0.1,10", "hidden=16,16"],
    "init": ["init_scales=0.3,3", "hidden=16,16"],
    "nonlinearity": ["activations=sigmoid,relu", "hidden=16,16,16,16"],
    "regularization": ["hidden=32,32", "train_subset=600"],
    "rnn": ["hidden=8", "train_subset=600", "test_subset=300"],
}


# Experiments without an entry in SMALL (their configs differ from CommonConfig) are run in
# quick mode by their own test files, e.g. tests/test_lab_theory_experiments.py.
@pytest.mark.parametrize("name", [n for n in experiments.NAMES if n in SMALL])
def test_experiment_quick_run_is_complete(name: str, tmp_path: Path) -> None:
    experiment = experiments.get(name)
    config = make_config(experiment, quick=True, overrides=COMMON + SMALL[name])
    result = run_experiment(experiment, config, quick=True, out=tmp_path)
    assert result.run_dir.parent == tmp_path
    metrics = check_run_dir(result.run_dir, name)
    assert metrics["verdict"] == result.verdict


def test_fig1_metrics(tmp_path: Path) -> None:
    fig1 = experiments.get("fig1")
    config = make_config(fig1, quick=True, overrides=COMMON + SMALL["fig1"])
    result = run_experiment(fig1, config, quick=True, out=tmp_path)
    m = json.loads((result.run_dir / "metrics.json").read_text())["metrics"]
    assert m["steps"] == [0, 30, 60, 90] and m["first_plotted_step"] == 30
    assert np.asarray(m["test_acc"]["with BN"]).shape == (4, 2)
    rows = csv_rows(result.run_dir / "percentiles.csv")
    assert len(rows) == 4 * 2 * 2  # steps x variants x seeds
    assert all(float(r["p15"]) <= float(r["p50"]) <= float(r["p85"]) for r in rows)
    # Cross-check: torch.nn.BatchNorm1d instead of the project's layer gives the same run.
    torch_config = make_config(
        fig1, quick=True, overrides=COMMON + SMALL["fig1"] + ["bn_impl=torch"]
    )
    other = run_experiment(fig1, torch_config, quick=True, out=tmp_path)
    m2 = json.loads((other.run_dir / "metrics.json").read_text())["metrics"]
    np.testing.assert_allclose(m["test_acc"]["with BN"], m2["test_acc"]["with BN"], atol=1e-6)
    assert other.run_dir != result.run_dir


def test_interrupted_run_is_marked_and_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fig1 = experiments.get("fig1")
    config = make_config(
        fig1, quick=True, overrides=COMMON + SMALL["fig1"] + ["checkpoint_seconds=0"]
    )
    reference = run_experiment(fig1, config, quick=True, out=tmp_path / "reference")

    real_evaluate = train_module._evaluate
    calls = {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the evaluation at step 60 (one call per evaluation here)
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "_evaluate", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(fig1, config, quick=True, out=tmp_path / "runs")
    (run_dir,) = (tmp_path / "runs").iterdir()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "interrupted"
    marker = (run_dir / MARKER_FILE).read_text()
    assert "interrupted" in marker and f"--resume {run_dir}" in marker
    assert not (run_dir / "report.md").exists() and not (run_dir / "metrics.json").exists()
    assert (run_dir / "jobs" / "fig1.ckpt").is_file()
    (summary,) = list_runs(tmp_path / "runs")
    assert summary.status == "interrupted" and "incomplete" in summary.verdict

    monkeypatch.setattr(train_module, "_evaluate", real_evaluate)
    first_environment = json.loads((run_dir / "environment.json").read_text())
    resumed = run_experiment(fig1, None, resume=run_dir)
    assert resumed.run_dir == run_dir
    # The run's environment stays the first invocation's; the resumption is listed after it.
    environment = json.loads((run_dir / "environment.json").read_text())
    later = environment.pop("resumed")
    assert environment == first_environment and len(later) == 1
    assert later[0]["versions"] == first_environment["versions"]
    assert "- resumption 1: " in (run_dir / "report.md").read_text()
    check_run_dir(run_dir, "fig1")
    a = json.loads((run_dir / "metrics.json").read_text())
    b = json.loads((reference.run_dir / "metrics.json").read_text())
    assert a["resumed"] is True
    # status.json says how the run ended, and keeps how the interrupted attempt ended apart.
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "complete" and "signal" not in status and "error" not in status
    assert [e["status"] for e in status["earlier_attempts"]] == ["interrupted"]
    assert status["earlier_attempts"][0]["signal"] == "SIGINT"
    assert a["metrics"]["test_acc"] == b["metrics"]["test_acc"]
    assert a["comparisons"] == b["comparisons"]
    with pytest.raises(Exception, match="already complete"):
        run_experiment(fig1, None, resume=run_dir)


def test_run_directories_are_never_reused(tmp_path: Path) -> None:
    first = _new_run_dir(tmp_path, "fig1", False)
    second = _new_run_dir(tmp_path, "fig1", False)
    assert first != second and first.is_dir() and second.is_dir()


LAB_SOURCES = Path(__file__).resolve().parents[1] / "src" / "batchnorm" / "lab"


def test_lab_never_imports_the_kernels(tmp_path: Path) -> None:
    pattern = re.compile(
        r"(from\s+batchnorm\.ops|import\s+batchnorm\.ops|from\s+batchnorm\s+"
        r"import\s+[^\n]*\bops\b)"
    )
    offenders = [str(p) for p in LAB_SOURCES.rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
    # And at run time: a whole (tiny) run leaves batchnorm.ops unimported.
    code = (
        "import sys; from batchnorm.lab.cli import main; "
        f"rc = main(['run', 'fig1', '--quick', '--out', {str(tmp_path)!r}] + "
        f"sum([['--set', s] for s in {COMMON + SMALL['fig1'] + ['steps=30']!r}], [])); "
        "print('OPS' if 'batchnorm.ops' in sys.modules else 'NO-OPS', rc)"
    )
    env = {**os.environ, "BATCHNORM_PROGRESS": "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "NO-OPS 0", out.stdout
