"""Runs you can trust: checked job files and checkpoints (and --restart-job), the thread count of
the first invocation on --resume, the run directory's lock, and SIGTERM marking a run interrupted.

The runs are fig1's quick mode shortened to a few seconds on scikit-learn's digits.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchnorm.cli import main
from batchnorm.lab import config as config_module
from batchnorm.lab import experiment as experiment_module
from batchnorm.lab import experiments
from batchnorm.lab import train as train_module
from batchnorm.lab.config import ConfigError
from batchnorm.lab.experiment import MARKER_FILE, Context, make_config, run_experiment
from batchnorm.lab.experiments.cnn import cached_job
from batchnorm.lab.io import (
    CorruptFileError,
    atomic_write_checked,
    checksum_path,
    read_checked,
)
from batchnorm.lab.runlock import LOCK_FILE, lock_run_dir
from tests.test_lab_experiments import COMMON, SMALL

pytestmark = pytest.mark.usefixtures("lab_quiet")

# A subprocess imports this checkout's package, as the tests do.
SRC = os.pathsep.join(
    [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")]
)

FIG1 = [*COMMON, *SMALL["fig1"], "checkpoint_seconds=0"]


def _interrupted_fig1(root: Path, monkeypatch: pytest.MonkeyPatch, overrides=FIG1) -> Path:
    """A fig1 run stopped (Ctrl-C) at its third evaluation: its job's checkpoint is on disk."""
    fig1 = experiments.get("fig1")
    real_evaluate = train_module._evaluate
    calls = {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "_evaluate", interrupting)
        with pytest.raises(KeyboardInterrupt):
            run_experiment(fig1, make_config(fig1, quick=True, overrides=overrides), out=root)
    (run_dir,) = root.iterdir()
    assert (run_dir / "jobs" / "fig1.ckpt").is_file()
    return run_dir


def _error_line(err: str) -> str:
    """The one error line of a refused command (log lines may precede it); no traceback."""
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert err.rstrip().splitlines()[-1] == errors[0]
    return errors[0]


def _flip_two_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for offset in (len(data) // 3, 2 * len(data) // 3):
        data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


DAMAGES = {
    "two flipped bytes": _flip_two_bytes,
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "empty": lambda p: p.write_bytes(b""),
    "checksum missing": lambda p: checksum_path(p).unlink(),
}


# --------------------------------------------------------------------------------------------
# Checked files


def test_checked_files_round_trip_and_refuse_damage(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    atomic_write_checked(path, b"first version")
    atomic_write_checked(path, b"second version")
    assert read_checked(path) == b"second version"
    # Only the current checksum remains once the file is in place.
    assert checksum_path(path).read_text().count("\n") == 1
    for damage in DAMAGES.values():
        atomic_write_checked(path, b"payload " * 10)
        damage(path)
        with pytest.raises(CorruptFileError):
            read_checked(path)
    # A killed writer between the checksum and the file: the old file still verifies.
    atomic_write_checked(path, b"old")
    checksum_path(path).write_text(
        f"{'0' * 64}  x.bin\n" + checksum_path(path).read_text()
    )  # what the first step of a new write leaves: the new sum, then the current one
    assert read_checked(path) == b"old"


def test_a_damaged_cnn_job_file_is_refused(tmp_path: Path) -> None:
    ctx = Context(tmp_path, experiments.get("ics"), None, quick=True)
    calls = []

    def compute() -> dict:
        calls.append(1)
        return {"test_acc": [0.5, 0.75]}

    assert cached_job(ctx, "standard-s0", compute) == {"test_acc": [0.5, 0.75]}
    assert cached_job(ctx, "standard-s0", compute) == {"test_acc": [0.5, 0.75]}
    assert len(calls) == 1  # loaded, not recomputed
    path = tmp_path / "jobs" / "standard-s0.json"
    _flip_two_bytes(path)
    with pytest.raises(CorruptFileError, match="does not match its checksum"):
        cached_job(ctx, "standard-s0", compute)


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_checkpoint_is_refused_and_the_job_can_be_restarted(
    damage: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir = _interrupted_fig1(tmp_path / "runs", monkeypatch)
    checkpoint = run_dir / "jobs" / "fig1.ckpt"
    DAMAGES[damage](checkpoint)
    capsys.readouterr()
    assert main(["lab", "run", "fig1", "--resume", str(run_dir)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert str(checkpoint) in line and "is not resumed from" in line
    assert f"batchnorm lab run fig1 --resume {run_dir} --restart-job fig1" in line
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "--restart-job fig1" in status["error"]
    assert "--restart-job fig1" in (run_dir / MARKER_FILE).read_text()
    assert not (run_dir / "metrics.json").exists()
    # A second attempt is refused the same way: never resumed silently.
    assert main(["lab", "run", "fig1", "--resume", str(run_dir)]) == 2
    capsys.readouterr()

    if damage == "two flipped bytes":
        assert main(["lab", "run", "fig1", "--resume", str(run_dir), "--restart-job", "nope"]) == 2
        assert "no such job" in _error_line(capsys.readouterr().err)
        for bad in ("../config", ".fig1"):
            argv = ["lab", "run", "fig1", "--resume", str(run_dir), "--restart-job", bad]
            assert main(argv) == 2
            assert "a job is named by its file in jobs/" in _error_line(capsys.readouterr().err)
        assert (run_dir / "config.json").is_file()
        assert main(["lab", "run", "fig1", "--resume", str(run_dir), "--restart-job", "fig1"]) == 0
        assert "fig1: removed its results and checkpoint" in capsys.readouterr().err
        # Trained again from the start: the numbers of an uninterrupted run.
        fig1 = experiments.get("fig1")
        reference = run_experiment(
            fig1, make_config(fig1, quick=True, overrides=FIG1), out=tmp_path / "reference"
        )
        a = json.loads((run_dir / "metrics.json").read_text())
        b = json.loads((reference.run_dir / "metrics.json").read_text())
        assert a["metrics"]["test_acc"] == b["metrics"]["test_acc"]
        assert not list((run_dir / "jobs").glob("*.ckpt*"))


def test_a_damaged_finished_job_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run killed after its job finished (say while plotting) keeps jobs/fig1.json; flipped
    bytes there are refused too."""
    fig1 = experiments.get("fig1")
    result = run_experiment(fig1, make_config(fig1, quick=True, overrides=FIG1), out=tmp_path)
    run_dir = result.run_dir
    status = json.loads((run_dir / "status.json").read_text())
    (run_dir / "status.json").write_text(json.dumps({**status, "status": "interrupted"}))
    job = run_dir / "jobs" / "fig1.json"
    assert json.loads(job.read_text())["specs"]  # the file stays plain JSON
    _flip_two_bytes(job)
    capsys.readouterr()
    assert main(["lab", "run", "fig1", "--resume", str(run_dir)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert str(job) in line and "--restart-job fig1" in line


def test_restart_job_needs_resume(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["lab", "run", "fig1", "--restart-job", "fig1", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "--restart-job needs --resume" in _error_line(capsys.readouterr().err)


# --------------------------------------------------------------------------------------------
# Threads


def test_resume_reuses_the_thread_count_of_the_first_invocation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """threads=0 resolves to the idle cores: 2 on an idle 2-core machine at the first
    invocation, 1 when the machine is busy at the resumption; the run keeps 2."""
    monkeypatch.setattr(experiment_module, "available_cores", lambda: 2)
    monkeypatch.setattr(config_module, "available_cores", lambda: 2)
    idle = [*FIG1, "threads=0"]  # the last value of a key wins
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    run_dir = _interrupted_fig1(tmp_path / "runs", monkeypatch, overrides=idle)
    first = json.loads((run_dir / "environment.json").read_text())
    assert first["torch_threads"] == 2

    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 1.5, 1.5))
    assert experiment_module.resolve_threads(0) == 1  # what a fresh resolution would give now
    used = []
    real_train = train_module.train

    def recording(*args, **kwargs):
        import torch

        used.append(torch.get_num_threads())
        return real_train(*args, **kwargs)

    monkeypatch.setattr(train_module, "train", recording)
    run_experiment(experiments.get("fig1"), None, resume=run_dir)
    environment = json.loads((run_dir / "environment.json").read_text())
    assert used == [2]
    assert [r["torch_threads"] for r in environment["resumed"]] == [2]

    # The numbers of an uninterrupted run with those 2 threads.
    monkeypatch.setattr(train_module, "train", real_train)
    fig1 = experiments.get("fig1")
    two = [*FIG1, "threads=2"]
    reference = run_experiment(
        fig1, make_config(fig1, quick=True, overrides=two), out=tmp_path / "ref"
    )
    a = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    b = json.loads((reference.run_dir / "metrics.json").read_text())["metrics"]
    assert a["test_acc"] == b["test_acc"]


# --------------------------------------------------------------------------------------------
# The lock


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(proc.stdout)


def test_a_live_lock_refuses_and_a_stale_one_is_taken_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _interrupted_fig1(tmp_path / "runs", monkeypatch)
    assert not (run_dir / LOCK_FILE).exists()  # released when the run stopped
    with lock_run_dir(run_dir):
        assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(ConfigError, match=f"in use by process {os.getpid()}"):
            run_experiment(experiments.get("fig1"), None, resume=run_dir)
    dead = _dead_pid()
    (run_dir / LOCK_FILE).write_text(json.dumps({"pid": dead, "started": "earlier"}))
    capsys.readouterr()
    result = run_experiment(experiments.get("fig1"), None, resume=run_dir)
    assert result.run_dir == run_dir
    err = capsys.readouterr().err
    assert f"taking over the lock of process {dead}, which is no longer running" in err
    assert not (run_dir / LOCK_FILE).exists()


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.2)


def _start_long_run(root: Path) -> subprocess.Popen:
    """``batchnorm lab run fig1`` with a million steps, in a process of its own."""
    argv = ["lab", "run", "fig1", "--quick", "--out", str(root)]
    for override in FIG1:
        argv += ["--set", override.replace("steps=90", "steps=1000000")]
    return subprocess.Popen(
        [sys.executable, "-m", "batchnorm", *argv],
        env={**os.environ, "BATCHNORM_PROGRESS": "0", "PYTHONPATH": SRC},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_the_lock_of_a_killed_run_is_taken_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "runs"
    proc = _start_long_run(root)
    try:
        _wait_for(lambda: any(root.glob("*/jobs/fig1.ckpt")), proc)
        proc.kill()  # SIGKILL: nothing runs, LOCK stays behind
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    (run_dir,) = root.iterdir()
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == proc.pid
    assert json.loads((run_dir / "status.json").read_text())["status"] == "running"
    capsys.readouterr()
    with lock_run_dir(run_dir):
        assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"taking over the lock of process {proc.pid}" in capsys.readouterr().err


def test_a_live_run_refuses_resume_and_sigterm_marks_it_interrupted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "runs"
    proc = _start_long_run(root)
    try:
        _wait_for(lambda: any(root.glob("*/jobs/fig1.ckpt")), proc)  # training
        (run_dir,) = root.iterdir()
        assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == proc.pid
        assert main(["lab", "run", "fig1", "--resume", str(run_dir)]) == 2
        line = _error_line(capsys.readouterr().err)
        assert f"in use by process {proc.pid}" in line and f"kill {proc.pid}" in line
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert err.rstrip().splitlines()[-1] == (
        f"interrupted (SIGTERM); continue with `batchnorm lab run fig1 --resume {run_dir}`"
    )
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "interrupted" and status["signal"] == "SIGTERM"
    assert "interrupted (SIGTERM)" in (run_dir / MARKER_FILE).read_text()
    assert not (run_dir / LOCK_FILE).exists()
    assert not list(run_dir.glob("**/*.tmp"))
    read_checked(run_dir / "jobs" / "fig1.ckpt")  # the checkpoint is whole


def test_stale_temporaries_of_a_killed_run_are_removed_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = _interrupted_fig1(tmp_path / "runs", monkeypatch)
    leftover = run_dir / "jobs" / f".fig1.ckpt.{_dead_pid()}.abc123.tmp"
    leftover.write_bytes(b"half a checkpoint")
    run_experiment(experiments.get("fig1"), None, resume=run_dir)
    assert not leftover.exists()
    shutil.rmtree(run_dir)
