"""The ``batchnorm lab`` command: list, show, run (and its errors), report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchnorm.cli import main
from batchnorm.lab import experiments

pytestmark = pytest.mark.usefixtures("lab_quiet")

TINY_RUN = [
    "--set",
    "dataset=digits",
    "--set",
    "steps=40",
    "--set",
    "eval_every=20",
    "--set",
    "popstat_batches=2",
    "--set",
    "final_popstat_batches=3",
    "--set",
    "hidden=16,16",
    "--set",
    "threads=1",
]


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "list"]) == 0
    out = capsys.readouterr().out
    for experiment in experiments.all_experiments():
        assert f"{experiment.name}" in out and experiment.claim in out
    assert "fig1 (also: mnist)" in out
    assert main(["lab", "list", "--verbose"]) == 0
    assert "tracked_unit" in capsys.readouterr().out


def test_show_lists_every_field_with_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "show", "fig1"]) == 0
    out = capsys.readouterr().out
    for name, _, _, help_text in experiments.get("fig1").fields():
        line = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
        assert help_text in line
    assert "50000" in out  # full defaults
    assert main(["lab", "show", "mnist", "--quick"]) == 0
    assert "1500" in capsys.readouterr().out
    assert main(["lab", "show", "fig9"]) == 2
    assert "unknown experiment 'fig9'" in capsys.readouterr().err


def test_run_help_lists_the_fields(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "run", "lr", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--set KEY=VALUE" in out and "--resume" in out and "--data-dir" in out
    assert "lrs" in out and "learning rates to sweep" in out
    assert main(["lab", "run"]) == 2
    assert "name an experiment" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "fig1", "--set", "stpes=10"], "did you mean steps"),
        (["run", "fig1", "--set", "lr=big"], "lr: 'big' is not a number"),
        (["run", "fig1", "--seeds", "0"], "--seeds must be at least 1"),
        (["run", "nope"], "unknown experiment 'nope'"),
        (["run", "fig1", "--resume", "somewhere", "--quick"], "drop --quick"),
    ],
)
def test_run_errors_say_what_to_fix(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["lab", *args, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing created for a refused run


def test_run_then_report(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCHNORM_RUNS_DIR", str(tmp_path))
    assert main(["lab", "report"]) == 0
    assert "no runs under" in capsys.readouterr().out
    argv = [
        "lab",
        "run",
        "fig1",
        "--quick",
        "--seeds",
        "2",
        *TINY_RUN,
        "--data-dir",
        str(tmp_path / "data"),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert f"report: {run_dir / 'report.md'}" in out
    assert out.startswith("fig1: ")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["config"]["seeds"] == 2 and config["config"]["steps"] == 40
    assert "dataset=digits" in config["overrides"]
    assert config["data_dir"] == str(tmp_path / "data")
    verdict = json.loads((run_dir / "metrics.json").read_text())["verdict"]

    assert main(["lab", "report"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if run_dir.name in line)
    assert "| fig1 | quick | complete | " + verdict in row
    assert (tmp_path / "INDEX.md").read_text().strip() in out
    assert main(["lab", "report", "--json", "--out", str(tmp_path)]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["verdict"] == verdict and entry["status"] == "complete"


def test_lab_without_subcommand_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab"]) == 0
    assert "list" in capsys.readouterr().out
