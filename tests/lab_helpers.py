"""Checks the lab's experiment tests share: a finished quick run's directory is complete, its
report agrees with metrics.json, and its saved numbers judge to the same claims."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from batchnorm.lab.experiment import MARKER_FILE, NUMBERS_FILE, Claim, judge_run, overall_verdict

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def table(report: str, heading: str) -> list[list[str]]:
    """The rows (cells, unescaped) of the first Markdown table under ``## heading``."""
    section = report.split(f"## {heading}\n", 1)[1]
    lines = [line for line in section.split("\n## ", 1)[0].splitlines() if line.startswith("|")]
    rows = []
    for line in lines[2:]:  # skip the header and the |---| line
        cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
        rows.append([c.strip().replace("\\|", "|") for c in cells])
    return rows


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_run_dir(run_dir: Path, name: str, csv_files: Sequence[str] = ("curves.csv",)) -> dict:
    """Check the directory of a complete quick run of experiment ``name``, which writes
    ``csv_files``; return its metrics.json."""
    assert run_dir.name.endswith(f"-{name}-quick")
    for required in (
        "config.json",
        "environment.json",
        "status.json",
        "metrics.json",
        "report.md",
        NUMBERS_FILE,
        *csv_files,
    ):
        assert (run_dir / required).is_file(), f"{required} missing in {run_dir}"
    assert not (run_dir / MARKER_FILE).exists()
    assert not list(run_dir.glob("**/*.tmp")) and not list(run_dir.glob("jobs/*.ckpt"))
    status = json.loads((run_dir / "status.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    environment = json.loads((run_dir / "environment.json").read_text())
    assert status["status"] == "complete" and status["verdict"] == metrics["verdict"]
    assert config["experiment"] == name and config["quick"] is True
    assert "git" in environment and environment["versions"]["torch"] == torch.__version__
    assert metrics["wall_seconds"] > 0 and metrics["timings_seconds"]["total"] > 0

    # The verdict follows from the claims by the rule in code.
    claims = metrics["claims"]
    fields = ("name", "statement", "rule", "held", "evidence", "tested")
    assert claims and metrics["verdict"] == overall_verdict(
        [Claim(**{k: c[k] for k in fields}) for c in claims]
    )
    # Judged again from the saved numbers alone, the claims are the run's.
    judged = judge_run(run_dir, write=False)
    assert [dataclasses.asdict(c) | {"verdict": c.verdict} for c in judged.claims] == claims
    assert judged.verdict == metrics["verdict"] and not judged.changed
    report = (run_dir / "report.md").read_text()
    assert "**Quick mode**" in report
    if metrics["baseline_train_accuracy"] is not None:  # the report says whether they trained
        assert metrics["baseline_train_accuracy"] == metrics["metrics"]["baseline_train_accuracy"]
        assert f"final train accuracy {metrics['baseline_train_accuracy']:.4f}" in report
    assert f"**Overall verdict: {metrics['verdict']}.**" in report
    assert [(r[0], r[3]) for r in table(report, "Verdicts")] == [
        (c["statement"], f"**{c['verdict']}**") for c in claims
    ]
    assert table(report, "Numbers beside the paper's") == [
        [c["quantity"], c["paper"], c["measured"]] for c in metrics["comparisons"]
    ]
    assert [r[0] for r in table(report, "Protocol")] == list(config["config"])
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert images
    for image in images:
        assert (run_dir / image).read_bytes()[:8] == PNG_MAGIC
    assert "Wall time of the run" in report and "git revision" in report

    for csv_file in csv_files:
        rows = csv_rows(run_dir / csv_file)
        assert rows, f"{csv_file} is empty"
        if csv_file == "curves.csv":
            assert {"step", "variant", "seed", "test_acc"} <= set(rows[0])
            assert all(0.0 <= float(r["test_acc"]) <= 1.0 for r in rows)
    return metrics
