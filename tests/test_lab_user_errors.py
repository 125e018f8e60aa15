"""Every user error is one line: no traceback, a non-zero exit, a message that says what to do.

Each case goes through the command's entry point, ``batchnorm.cli.main`` (a few also through a
real ``python -m batchnorm`` process). We run as root, which ignores file permissions, so a
read-only folder is simulated two ways: a folder whose INDEX.md is a directory (a real OS error on
the write), and a monkeypatched ``os.open`` that raises PermissionError for the temporary file
as a read-only folder does.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from batchnorm.cli import main
from batchnorm.lab import experiments
from batchnorm.lab.config import COMMON_FIELD_RULES, ConfigError, available_cores, check_config
from batchnorm.lab.experiment import make_config, run_experiment
from tests.test_lab_experiments import COMMON, SMALL

pytestmark = pytest.mark.usefixtures("lab_quiet")

# A subprocess imports this checkout's package, as the tests do.
SRC = os.pathsep.join(
    [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")]
)

FIG1 = [*COMMON, *SMALL["fig1"]]


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ")
    return lines[0]


# --------------------------------------------------------------------------------------------
# Config fields, checked once for every experiment


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seed=-1", "seed must be at least 0 (a seed), got -1"),
        ("seed=3000000000", "seed must be at most 2**31 - 1"),
        ("seeds=0", "seeds must be at least 1"),
        ("threads=-2", "threads must be at least 0"),
        ("eval_examples=0", "eval_examples must be at least 1"),
        ("eval_examples=-5", "eval_examples must be at least 1 (a number of examples), got -5"),
        ("final_popstat_batches=0", "final_popstat_batches must be at least 1"),
        ("final_popstat_batches=-3", "final_popstat_batches must be at least 1"),
        ("test_subset=0", "test_subset must be at least 1"),
    ],
)
def test_bad_common_fields_are_one_line(
    override: str, message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["lab", "run", "fig1", "--set", override, "--out", str(tmp_path)]) == 2
    assert message in _one_error_line(capsys)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("experiment", experiments.all_experiments(), ids=lambda e: e.name)
def test_every_experiment_gets_the_common_checks(experiment, tmp_path: Path, capsys) -> None:
    """A negative seed, and each other common field at 0, is refused for every experiment's
    config, whichever root it has."""
    names = {f.name for f in dataclasses.fields(experiment.config_cls)}
    checked = sorted(n for n in names if n in COMMON_FIELD_RULES or n.endswith(("_seed", "_seeds")))
    assert "seed" in checked and "threads" in checked
    for name in checked:
        bad = (
            -1
            if name == "seed" or name.endswith("_seed")
            else COMMON_FIELD_RULES.get(name, COMMON_FIELD_RULES["seeds"])[0] - 1
        )
        argv = ["lab", "run", experiment.name, "--set", f"{name}={bad}", "--out", str(tmp_path)]
        assert main(argv) == 2, name
        assert f"{name} must be at least" in _one_error_line(capsys)


def test_too_many_threads_are_capped_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fig1 = experiments.get("fig1")
    config = make_config(fig1, quick=True, overrides=["threads=100000"])
    assert config.threads == available_cores()
    assert "threads=100000 is more than the" in capsys.readouterr().err
    # Through the command: the run goes on with as many threads as cores (100000 segfaulted).
    argv = ["lab", "run", "fig1", "--quick", *_sets([*FIG1, "threads=100000"])]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert f"note: threads=100000 is more than the {available_cores()} CPU core(s)" in err
    assert "Traceback" not in err
    (run_dir,) = tmp_path.iterdir()
    environment = json.loads((run_dir / "environment.json").read_text())
    assert environment["torch_threads"] == available_cores()
    assert json.loads((run_dir / "config.json").read_text())["config"]["threads"] == (
        available_cores()
    )


def test_check_config_notes_go_where_asked() -> None:
    notes: list[str] = []
    config = make_config(experiments.get("theorems"))
    capped = check_config(dataclasses.replace(config, threads=10**6), note=notes.append)
    assert capped.threads == available_cores() and len(notes) == 1
    with pytest.raises(ConfigError, match="seed must be an integer"):
        check_config(dataclasses.replace(config, seed=1.5))


# --------------------------------------------------------------------------------------------
# --resume re-validates the saved config


def _interrupted_run(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from batchnorm.lab import train as train_module

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    fig1 = experiments.get("fig1")
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "_evaluate", interrupt)
        with pytest.raises(KeyboardInterrupt):
            run_experiment(fig1, make_config(fig1, quick=True, overrides=FIG1), out=root)
    (run_dir,) = root.iterdir()
    return run_dir


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("seed", -4, "seed must be at least 0"),
        ("eval_examples", 0, "eval_examples must be at least 1"),
        ("steps", "many", "steps: 'many' is not of type int"),
        ("stpes", 10, "unknown config keys for Config: stpes"),
        ("batch_size", 1, "batch_size must be at least 2"),
    ],
)
def test_resume_revalidates_the_saved_config(
    key: str,
    value: object,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir = _interrupted_run(tmp_path / "runs", monkeypatch)
    saved = json.loads((run_dir / "config.json").read_text())
    saved["config"][key] = value
    (run_dir / "config.json").write_text(json.dumps(saved))
    capsys.readouterr()
    assert main(["lab", "run", "fig1", "--resume", str(run_dir)]) == 2
    line = _one_error_line(capsys)
    assert f"the saved config {run_dir / 'config.json'} is not valid" in line
    assert message in line


def test_resume_of_a_missing_directory(tmp_path: Path, capsys) -> None:
    assert main(["lab", "run", "fig1", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "cannot read" in _one_error_line(capsys)


# --------------------------------------------------------------------------------------------
# --out


def test_out_that_is_a_file_or_under_a_file_or_empty(tmp_path: Path, capsys) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    cases = {
        str(a_file): "is a file, not a folder",
        str(a_file / "runs"): "cannot create a run directory under",
        "": "--out is empty",
    }
    for out, message in cases.items():
        assert main(["lab", "run", "fig1", "--quick", *_sets(FIG1), "--out", out]) == 2
        assert message in _one_error_line(capsys)


def test_unwritable_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """As root nothing is read-only, so mkdir is made to fail as it does in a read-only
    folder."""
    real_mkdir = Path.mkdir

    def read_only(self: Path, *args, **kwargs):
        if tmp_path in self.parents:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert main(["lab", "run", "fig1", "--quick", "--out", str(tmp_path / "runs")]) == 2
    line = _one_error_line(capsys)
    assert "Permission denied" in line and "pass --out a folder you can write to" in line


# --------------------------------------------------------------------------------------------
# batchnorm lab report


def _fake_run(root: Path, name: str, status: str | None, config: str | None) -> Path:
    path = root / name
    path.mkdir(parents=True)
    if status is not None:
        (path / "status.json").write_text(status)
    if config is not None:
        (path / "config.json").write_text(config)
    return path


GOOD_STATUS = json.dumps({"status": "complete", "verdict": "held", "wall_seconds": 3.0})
GOOD_CONFIG = json.dumps({"experiment": "fig1", "quick": True})


def test_report_names_the_runs_it_skips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fake_run(tmp_path, "20260101-000000-fig1", GOOD_STATUS, GOOD_CONFIG)
    bad_status = _fake_run(tmp_path, "20260101-000001-fig1", '{"status": "compl', GOOD_CONFIG)
    bad_config = _fake_run(tmp_path, "20260101-000002-fig1", GOOD_STATUS, "[1, 2")
    not_object = _fake_run(tmp_path, "20260101-000003-fig1", "[]", GOOD_CONFIG)
    _fake_run(tmp_path, "not-a-run", None, None)
    assert main(["lab", "report", "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    (note,) = captured.err.strip().splitlines()
    assert note.startswith("note: skipped 3 run directories that could not be read: ")
    for path in (bad_status, bad_config, not_object):
        assert str(path) in note
    assert "status.json: " in note and "config.json: " in note
    assert "20260101-000000-fig1 | fig1 | quick | complete | held" in captured.out
    assert (tmp_path / "INDEX.md").is_file() and "not-a-run" not in captured.out
    assert main(["lab", "report", "--json", "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)) == 1 and captured.err.startswith("note: skipped 3")


def test_report_in_a_folder_it_cannot_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_run(tmp_path, "20260101-000000-fig1", GOOD_STATUS, GOOD_CONFIG)
    # A real failure of the write: INDEX.md is a folder.
    (tmp_path / "INDEX.md").mkdir()
    assert main(["lab", "report", "--out", str(tmp_path)]) == 1
    line = _one_error_line(capsys)
    assert f"cannot write {tmp_path / 'INDEX.md'}" in line
    (tmp_path / "INDEX.md").rmdir()

    # A read-only folder, as creating the temporary file there reports it to anyone but root.
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path)) and str(path).endswith(".tmp"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    assert main(["lab", "report", "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "| fig1 | quick | complete | held" in captured.out  # the index is still printed
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("error: cannot write") and "Permission denied" in line
    assert not (tmp_path / "INDEX.md").exists()


# --------------------------------------------------------------------------------------------
# batchnorm env and check


def test_env_with_a_bad_backend_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BATCHNORM_BACKEND", "bogus")
    assert main(["env"]) == 2
    line = _one_error_line(capsys)
    assert "unknown batch-norm backend 'bogus'" in line and "unset BATCHNORM_BACKEND" in line


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("cuda", "no CUDA device"),
        ("cuda:3", "not available here"),
        ("meta", "holds no values"),
        ("nonsense", "unknown device 'nonsense'"),
        ("mps", "device 'mps' is not available here"),
    ],
)
def test_check_on_a_device_this_machine_lacks(
    device: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        if device == "cuda" or torch.cuda.device_count() > 3:
            pytest.skip("this machine has that CUDA device")
        message = "CUDA device(s)"
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has an MPS device")
    assert main(["check", "--device", device]) == 2
    line = _one_error_line(capsys)
    assert message in line and len(line) < 200


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["env"], {"BATCHNORM_BACKEND": "bogus"}),
        (["check", "--device", "meta"], {}),
        (["lab", "run", "fig1", "--set", "seed=-1"], {}),
    ],
)
def test_the_installed_command_exits_with_one_line(argv: list[str], env: dict) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "batchnorm", *argv],
        env={**os.environ, **env, "PYTHONPATH": SRC},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: ")
