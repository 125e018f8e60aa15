"""The theory experiments (explosion, decoupling, theorems), shortened: the run directory is
complete, the report agrees with metrics.json, and the measured numbers are those of the theory
modules."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from batchnorm.lab import experiments
from batchnorm.lab.config import ConfigError
from batchnorm.lab.experiment import make_config, run_experiment
from batchnorm.lab.theory.gradient_explosion import linear_lambda, relu_lambda
from tests.lab_helpers import check_run_dir, csv_rows

pytestmark = pytest.mark.usefixtures("lab_quiet")

# Each experiment's quick mode, shortened further (a few seconds each).
SMALL = {
    "explosion": [
        "dataset=digits",
        "mc_batch_sizes=4,8",
        "mc_width=32",
        "mc_depth=12",
        "mc_repeats=3",
        "mc_skip=2",
        "depth_factors=0.2,2",
        "batch_sizes=4,16",
        "width=16",
        "train_subset=160",
        "popstat_examples=64",
        "test_subset=200",
    ],
    "decoupling": [
        "dim=5",
        "condition_numbers=3,10",
        "iterations=60",
        "ts_values=0,3,6,9",
        "mlp_samples=80",
        "mlp_sweeps=1",
    ],
    "theorems": ["instances=12", "batch_sizes=4,8", "eps_values=0,0.01"],
}
CSV_FILES = {
    "explosion": ("lambda.csv", "grid.csv"),
    "decoupling": ("convergence.csv",),
    "theorems": ("instances.csv",),
}


def quick_run(name: str, tmp_path: Path, extra: tuple[str, ...] = ()) -> tuple[Path, dict]:
    experiment = experiments.get(name)
    config = make_config(experiment, quick=True, overrides=[*SMALL[name], "threads=1", *extra])
    result = run_experiment(experiment, config, quick=True, out=tmp_path)
    assert result.run_dir.parent == tmp_path
    metrics = check_run_dir(result.run_dir, name, CSV_FILES[name])
    assert metrics["verdict"] == result.verdict
    return result.run_dir, metrics


def test_registry_lists_the_theory_experiments() -> None:
    for name in ("explosion", "decoupling", "theorems"):
        assert name in experiments.NAMES and experiments.get(name).name == name


def test_explosion_quick_run(tmp_path: Path) -> None:
    run_dir, metrics = quick_run("explosion", tmp_path)
    lam = csv_rows(run_dir / "lambda.csv")
    assert {(r["nonlinearity"], int(r["batch_size"])) for r in lam} == {
        (nl, b) for nl in ("relu", "tanh", "linear") for b in (4, 8)
    }
    for r in lam:  # the closed forms beside the estimate are the theory module's
        theory = float(r["lambda_theory"])
        b = int(r["batch_size"])
        if r["nonlinearity"] == "relu":
            assert theory == pytest.approx(relu_lambda(b))
        elif r["nonlinearity"] == "linear":
            assert theory == pytest.approx(linear_lambda(b))
        else:
            assert math.isnan(theory)
        assert float(r["ci_low"]) <= float(r["lambda_mc"]) <= float(r["ci_high"])
    grid = csv_rows(run_dir / "grid.csv")
    plain = {(int(r["depth"]), int(r["batch_size"])) for r in grid if r["variant"] == "plain"}
    # Depths around each batch size's own predicted limit (0.2 and 2 times 16 / ln lambda).
    assert plain == {(3, 4), (28, 4), (7, 16), (69, 16)}
    assert {int(r["steps"]) for r in grid if r["batch_size"] == "4"} == {40}
    assert {r["variant"] for r in grid} == {"plain", "residual", "eps"}
    assert all(0.0 <= float(r["test_acc"]) <= 1.0 for r in grid if r["test_acc"] != "")
    m = metrics["metrics"]
    assert m["predicted_depth"]["4"] == pytest.approx(16 / math.log(relu_lambda(4)))
    assert [c["name"] for c in metrics["claims"]] == [
        "closed form",
        "explosion",
        "trainable depth",
        "remedies reduce lambda",
        "remedies train",
    ]


def test_decoupling_quick_run(tmp_path: Path) -> None:
    run_dir, metrics = quick_run("decoupling", tmp_path)
    m = metrics["metrics"]
    assert m["ts"] == [0, 3, 6, 9] and len(m["ts_final_length_derivative"]) == 4
    # The bisection-rate number is the slope of log |df/dg| against T_s.
    dg = np.array(m["ts_final_length_derivative"])
    slope = np.polyfit([0, 3, 6, 9], np.log(dg), 1)[0]
    assert m["ts_rate"] == pytest.approx(math.exp(slope))
    assert set(m["rates"]) == {f"{p} kappa={k}" for p in ("OLS", "halfspace") for k in (3, 10)}
    for key, rates in m["rates"].items():
        assert set(rates) == {"GD on w~", "GD on (w, g)", "GDNP"}
        assert all(0 < r < 1 for r in rates["GDNP"]), key  # linear even in the short run
    rows = csv_rows(run_dir / "convergence.csv")
    assert len(rows) == 4 * 2 * 3 * 61  # problems x seeds x methods x (iterations + 1)
    assert m["mlp_losses"][-1] < m["mlp_losses"][0]
    assert "reconstructed" in (run_dir / "report.md").read_text()


def test_theorems_quick_run(tmp_path: Path) -> None:
    run_dir, metrics = quick_run("theorems", tmp_path)
    rows = csv_rows(run_dir / "instances.csv")
    assert len(rows) == 2 * 12
    zero = [r for r in rows if float(r["eps"]) == 0.0]
    # At eps = 0 Theorem 4.1 is an identity, and the 1/sqrt(m) variant fails.
    assert all(abs(float(r["grad_ratio"]) - 1) < 1e-8 for r in zero)
    assert all(r["sqrt_m_holds"] == "False" for r in zero)
    held = {c["name"]: c["held"] for c in metrics["claims"]}
    assert held["thm 4.1 holds"] and held["thm 4.1 tight"] and held["thm 4.2 holds"]
    assert "1/sqrt(m)" in (run_dir / "report.md").read_text()


@pytest.mark.parametrize(
    ("name", "override", "message"),
    [
        ("explosion", "batch_sizes=2,8", "batch_sizes must list batch sizes >= 4"),
        ("explosion", "mc_depth=5", "mc_depth must be at least"),
        ("decoupling", "condition_numbers=0.5", "condition_numbers must be >= 1"),
        ("theorems", "eps_values=0.1", "must include 0"),
    ],
)
def test_bad_config_is_refused(name: str, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_config(experiments.get(name), quick=True, overrides=[override])
