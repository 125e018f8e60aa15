"""Measuring apart from judging: a run saves the numbers its verdicts are decided on, and
``batchnorm lab judge RUN_DIR`` decides them again from that file alone."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from batchnorm.cli import main
from batchnorm.lab import experiments
from batchnorm.lab.experiment import NUMBERS_FILE, judge_run, make_config, run_experiment
from batchnorm.lab.io import checksum_path, read_checked_json, write_checked_json
from batchnorm.lab.numbers import NumbersError, numbers_from_json, numbers_to_json
from tests.test_lab_experiments import COMMON, SMALL

pytestmark = pytest.mark.usefixtures("lab_quiet")


@dataclasses.dataclass
class Inner:
    value: float
    label: str


@dataclasses.dataclass
class Sample:
    count: int
    accs: list[float]
    pair: tuple[float, ...]
    by_lr: dict[float, list[float]]
    best: float | None
    ok: bool
    inner: Inner
    extra: list[int] = dataclasses.field(default_factory=list)


def sample() -> Sample:
    return Sample(
        count=3,
        accs=[0.5, math.nan, math.inf, -math.inf, 0.1 + 0.2],
        pair=(1.0, 2.5),
        by_lr={0.1: [1.0], 1e-3: [math.inf]},
        best=None,
        ok=True,
        inner=Inner(-0.0, "x"),
    )


def test_numbers_keep_every_float_exactly() -> None:
    data = json.loads(json.dumps(numbers_to_json(sample()), allow_nan=False))
    back = numbers_from_json(Sample, data)
    assert back.accs[0] == 0.5 and math.isnan(back.accs[1]) and back.accs[4] == 0.1 + 0.2
    assert back.accs[2:4] == [math.inf, -math.inf]
    assert back.by_lr == {0.1: [1.0], 1e-3: [math.inf]} and back.pair == (1.0, 2.5)
    assert back.best is None and back.ok is True and back.inner == Inner(-0.0, "x")
    assert back.extra == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("count"), "numbers: missing field(s) count"),
        (lambda d: d.update(surprise=1), "numbers: unknown field(s) surprise"),
        (lambda d: d.update(count=1.5), "numbers.count: expected an integer, got 1.5"),
        (lambda d: d.update(count=True), "numbers.count: expected an integer, got True"),
        (lambda d: d["accs"].append("high"), "numbers.accs[5]: expected a number, got 'high'"),
        (lambda d: d.update(accs=0.5), "numbers.accs: expected a list, got 0.5"),
        (lambda d: d["inner"].update(value=None), "numbers.inner.value: expected a number"),
        (lambda d: d.update(by_lr={"fast": [1.0]}), "key 'fast' is not a float"),
    ],
)
def test_numbers_that_do_not_fit_are_refused(change, message: str) -> None:
    data = numbers_to_json(sample())
    change(data)
    with pytest.raises(NumbersError, match=re.escape(message)):
        numbers_from_json(Sample, data)


def test_only_numbers_can_be_saved() -> None:
    with pytest.raises(NumbersError, match="numbers must be a dataclass"):
        numbers_to_json({"a": 1})
    with pytest.raises(NumbersError, match="cannot save a object"):
        numbers_to_json(Inner(object(), "x"))  # type: ignore[arg-type]


def test_every_experiment_splits_measuring_from_judging() -> None:
    for experiment in experiments.all_experiments():
        assert dataclasses.is_dataclass(experiment.numbers_cls), experiment.name
        assert callable(experiment.measure) and callable(experiment.judge), experiment.name


# --------------------------------------------------------------------------------------------
# A real (tiny) run, judged again


@pytest.fixture(scope="module")
def fig1_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # Module-scoped, so set up before lab_quiet: restore what a run changes here.
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BATCHNORM_PROGRESS", "0")
        fig1 = experiments.get("fig1")
        config = make_config(fig1, quick=True, overrides=COMMON + SMALL["fig1"])
        try:
            out = tmp_path_factory.mktemp("runs")
            yield run_experiment(fig1, config, quick=True, out=out).run_dir
        finally:
            torch.set_num_threads(threads)


@pytest.fixture
def run_dir(fig1_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / fig1_run.name
    shutil.copytree(fig1_run, copy)
    return copy


def _files(run_dir: Path) -> dict[str, str]:
    return {name: (run_dir / name).read_text() for name in ("report.md", "metrics.json")}


def test_a_run_saves_its_numbers_and_judges_them_again_identically(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = read_checked_json(run_dir / NUMBERS_FILE)
    assert record["experiment"] == "fig1" and checksum_path(run_dir / NUMBERS_FILE).is_file()
    assert record["numbers"]["first_step"] == 30 and len(record["numbers"]["early_bn"]) == 2
    before = _files(run_dir)
    metrics = json.loads(before["metrics.json"])
    assert main(["lab", "judge", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"fig1: {metrics['verdict']} (judged again from its saved numbers)")
    assert "every verdict is the one the run gave" in out
    assert _files(run_dir) == before  # the same verdicts, written the same way
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "complete" and status["rejudged"]


def test_changed_numbers_change_only_the_verdicts(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = read_checked_json(run_dir / NUMBERS_FILE)
    before = _files(run_dir)
    old = json.loads(before["metrics.json"])
    # BN far behind at the first plotted point and at the end: "faster" and "higher" fail.
    record["numbers"]["early_bn"] = [0.1, 0.1]
    record["numbers"]["early_plain"] = [0.9, 0.9]
    record["numbers"]["final_bn"] = [0.2, 0.2]
    record["numbers"]["final_plain"] = [0.9, 0.9]
    # "faster" compares each model at its best rate of the learning-rate grid.
    rates = len(record["numbers"]["grid_lrs"])
    record["numbers"]["early_grid_bn"] = [[0.1, 0.1]] * rates
    record["numbers"]["early_grid_plain"] = [[0.9, 0.9]] * rates
    # The short run did not train (its claims are "not tested"); say it did.
    record["numbers"]["train_grid_bn"] = [[1.0, 1.0]] * rates
    record["numbers"]["train_grid_plain"] = [[1.0, 1.0]] * rates
    write_checked_json(run_dir / NUMBERS_FILE, record)
    assert main(["lab", "judge", str(run_dir), "--dry-run"]) == 0
    assert "(dry run: no file rewritten)" in capsys.readouterr().out
    assert _files(run_dir) == before

    assert main(["lab", "judge", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "faster: " in out.split("changed since the run: ")[1]
    new = json.loads((run_dir / "metrics.json").read_text())
    held = {c["name"]: c["held"] for c in new["claims"]}
    assert held["faster"] is False and held["higher"] is False
    assert held["stable"] == {c["name"]: c["held"] for c in old["claims"]}["stable"]
    assert new["verdict"] in ("did not hold", "partly held")
    assert {k: v for k, v in new.items() if k not in ("claims", "verdict")} == {
        k: v for k, v in old.items() if k not in ("claims", "verdict")
    }
    assert json.loads((run_dir / "status.json").read_text())["verdict"] == new["verdict"]
    report = (run_dir / "report.md").read_text()
    assert f"**Overall verdict: {new['verdict']}.**" in report
    assert "0.1000 vs 0.9000 (lead -0.8000" in report
    # Everything but the verdicts is as it was.
    old_report = before["report.md"]
    strip = lambda text: [  # noqa: E731
        line for line in text.splitlines() if not line.startswith(("**Overall", "| With BN"))
    ]
    assert strip(report) == strip(old_report)
    from tests.lab_helpers import check_run_dir

    check_run_dir(run_dir, "fig1")  # the report still agrees with metrics.json


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ")
    return lines[0]


def _judge_error(capsys: pytest.CaptureFixture[str], path: Path) -> str:
    assert main(["lab", "judge", str(path)]) == 2
    return _one_error_line(capsys)


def test_judge_errors_are_one_line(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "is not a folder" in _judge_error(capsys, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert "is not a run directory" in _judge_error(capsys, tmp_path / "empty")

    numbers = run_dir / NUMBERS_FILE
    data = bytearray(numbers.read_bytes())
    data[40] ^= 1
    numbers.write_bytes(bytes(data))
    before = _files(run_dir)
    line = _judge_error(capsys, run_dir)
    assert "does not match its checksum" in line and "run the experiment again" in line
    assert _files(run_dir) == before

    record = {"experiment": "fig1", "format": 1, "numbers": {"first_step": 30}}
    write_checked_json(numbers, record)
    assert "does not hold fig1's numbers (numbers: missing field(s)" in _judge_error(
        capsys, run_dir
    )
    write_checked_json(numbers, {**record, "experiment": "lr"})
    assert "holds numbers of 'lr'" in _judge_error(capsys, run_dir)

    numbers.unlink()
    assert f"has no {NUMBERS_FILE}" in _judge_error(capsys, run_dir)

    status = json.loads((run_dir / "status.json").read_text())
    (run_dir / "status.json").write_text(json.dumps({**status, "status": "interrupted"}))
    line = _judge_error(capsys, run_dir)
    assert "is not complete (status: interrupted)" in line and "--resume" in line

    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "experiment": "nonesuch"}))
    assert "unknown experiment 'nonesuch'" in _judge_error(capsys, run_dir)
    (run_dir / "config.json").write_text("{not json")
    assert "cannot read" in _judge_error(capsys, run_dir)


def test_judge_refuses_a_report_it_cannot_rewrite(run_dir: Path) -> None:
    (run_dir / "report.md").write_text("# a report without verdicts\n")
    with pytest.raises(Exception, match="has no '## Verdicts' section"):
        judge_run(run_dir)


def test_judge_in_a_read_only_run_is_one_line(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # We run as root, which ignores permissions: a failing write stands in for a read-only folder.
    import batchnorm.lab.experiment as experiment_module

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(experiment_module, "atomic_write_json", refuse)
    line = _judge_error(capsys, run_dir)
    assert "cannot rewrite the verdicts" in line and "Permission denied" in line
    assert main(["lab", "judge", str(run_dir), "--dry-run"]) == 0  # judging still works


def test_judge_refuses_metrics_that_are_not_a_runs(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (run_dir / "metrics.json").write_text("[1, 2]")
    assert "is not a run's metrics" in _judge_error(capsys, run_dir)
