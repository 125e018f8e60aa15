"""What an experiment is, and how one runs: run directories, provenance, verdicts, reports.

An experiment (one module under :mod:`batchnorm.lab.experiments`) provides an :class:`Experiment`:
a name, the claim it tests, the paper figure it reproduces, a frozen config dataclass (fields
declared with :func:`batchnorm.lab.config.param`, with a ``quick()`` method giving the smoke-test
variant), and two functions that keep measuring apart from judging:

- ``measure(config, context)`` trains and evaluates and returns a :class:`Measurement`: the
  *numbers* (a dataclass of everything the verdicts need), the measured numbers beside the
  paper's, extra tables and figures;
- ``judge(numbers)`` decides every claim from the numbers alone (no training, no file access, no
  randomness) and returns the :class:`Claim` list. Each rule's margin is a keyword parameter of
  the judge, with its default the margin the rule uses.

The run saves the numbers in ``numbers.json`` (see :mod:`batchnorm.lab.numbers`) and judges the
saved numbers, so that :func:`judge_run` (``batchnorm lab judge RUN_DIR``) decides a run's claims
again exactly as the run did, without training.

:func:`run_experiment` gives every run its own directory (``<runs>/<UTC time>-<name>[-quick]``;
``<runs>`` is ``--out``, else ``$BATCHNORM_RUNS_DIR``, else ``./runs``), never reusing one, and
writes into it:

==================  ==========================================================================
``config.json``     the experiment, the full config, the overrides and the command line
``environment.json`` git revision, library versions, Python, platform, threads, load average
                    (of the first invocation; each resumption is listed under ``resumed``)
``status.json``     running / complete / interrupted / failed, with times
``INCOMPLETE``      present until the run completes: says what happened and how to resume
``jobs/``           each finished training job's results (JSON), the running job's checkpoint,
                    each with its SHA-256 in ``<file>.sha256``
``LOCK``            while a process works in the directory: its process id
``numbers.json``    the numbers the verdicts are decided on (with ``numbers.json.sha256``)
``metrics.json``    claims, verdicts, numbers, timings and the experiment's own metrics
``*.csv``, ``*.png`` curves and figures
``report.md``       the Markdown report: verdicts, numbers beside the paper's, protocol, timing
==================  ==========================================================================

An interrupted run (Ctrl-C, SIGTERM, a crash, a killed process) keeps its directory with
``INCOMPLETE`` and ``status.json`` saying so; ``batchnorm lab run --resume DIR`` continues it:
finished jobs are not repeated and the running job continues from its last checkpoint, with the
torch thread count of the first invocation (so the numbers are those of an uninterrupted run).

Runs you can trust: a process holds its run directory (``LOCK``, see
:mod:`batchnorm.lab.runlock`), so a second ``--resume`` of a live run is refused; job results and
checkpoints carry their SHA-256 (:func:`batchnorm.lab.io.read_checked`) and a damaged one stops
the run with a message naming ``--restart-job``, which trains just that job again; a resumed run's
saved config is checked again as a fresh one is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import traceback
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from batchnorm.lab.config import (
    ConfigError,
    apply_overrides,
    available_cores,
    check_config,
    config_to_dict,
    field_docs,
)
from batchnorm.lab.io import (
    CHECKSUM_SUFFIX,
    CorruptFileError,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
    read_checked_json,
    remove_checked,
    remove_stale_temporaries,
    to_jsonable,
    write_checked_json,
)
from batchnorm.lab.numbers import (
    NUMBERS_FORMAT,
    NumbersError,
    numbers_from_json,
    numbers_to_json,
)
from batchnorm.lab.progress import log
from batchnorm.lab.runlock import RunLockedError, lock_run_dir

__all__ = [
    "RUNS_DIR_ENV",
    "Claim",
    "Comparison",
    "Outcome",
    "Experiment",
    "Context",
    "RunResult",
    "runs_root",
    "run_experiment",
    "make_config",
    "list_runs",
    "fmt_mean_std",
    "mean_std",
    "overall_verdict",
    "RunInterrupted",
    "DamagedRunError",
    "scan_runs",
    "Measurement",
    "JudgedRun",
    "judge_run",
    "NUMBERS_FILE",
]

RUNS_DIR_ENV = "BATCHNORM_RUNS_DIR"
STATUS_FILE = "status.json"
MARKER_FILE = "INCOMPLETE"
NUMBERS_FILE = "numbers.json"
BASELINE_KEYS = ("baseline", "baseline_train_accuracy", "baseline_test_accuracy")


# --------------------------------------------------------------------------------------------
# What an experiment returns


@dataclass
class Claim:
    """One claim and whether it held, decided by ``rule`` on the numbers in ``evidence``.

    ``tested`` is False when the run could not test the claim (the networks it is about did not
    train, a quantity could not be measured): the verdict is then "not tested", never "did not
    hold", and ``held`` is False. :mod:`batchnorm.lab.rules` makes such claims.
    """

    name: str
    statement: str
    rule: str
    held: bool
    evidence: str
    tested: bool = True

    @property
    def verdict(self) -> str:
        if not self.tested:
            return "not tested"
        return "held" if self.held else "did not hold"


@dataclass
class Comparison:
    """A number the paper gives (or a qualitative statement) beside the one measured here."""

    quantity: str
    paper: str
    measured: str
    value: float | None = None  # the measured mean, for machines
    spread: float | None = None  # its standard deviation over seeds


@dataclass
class Measurement:
    """What an experiment's ``measure`` returns: the numbers its ``judge`` decides on, and the
    rest of the report (which the claims do not depend on)."""

    numbers: Any  # the experiment's numbers dataclass
    comparisons: list[Comparison]
    metrics: dict[str, Any] = field(default_factory=dict)
    tables: list[tuple[str, str]] = field(default_factory=list)  # (title, Markdown)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (file name, caption)
    choices: list[str] = field(default_factory=list)  # protocol choices the paper left open
    notes: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    """A finished run's results: the judge's claims and the measurement's report parts."""

    claims: list[Claim]
    comparisons: list[Comparison]
    metrics: dict[str, Any] = field(default_factory=dict)
    tables: list[tuple[str, str]] = field(default_factory=list)  # (title, Markdown)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (file name, caption)
    choices: list[str] = field(default_factory=list)  # protocol choices the paper left open
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Experiment:
    """An experiment of the lab (see the module docstring)."""

    name: str
    title: str
    claim: str
    paper: str
    config_cls: type
    numbers_cls: type
    measure: Callable[[Any, Context], Measurement]
    judge: Callable[[Any], list[Claim]]
    aliases: tuple[str, ...] = ()
    summary: str = ""

    def outcome(self, config: Any, context: Context) -> Outcome:
        """Measure, save the numbers in the run directory, and judge the saved numbers."""
        measurement = self.measure(config, context)
        if not isinstance(measurement.numbers, self.numbers_cls):
            raise TypeError(
                f"{self.name}: measure returned {type(measurement.numbers).__name__}, "
                f"not {self.numbers_cls.__name__}"
            )
        path = context.run_dir / NUMBERS_FILE
        write_checked_json(
            path,
            {
                "experiment": self.name,
                "format": NUMBERS_FORMAT,
                "numbers": numbers_to_json(measurement.numbers),
            },
        )
        # Judged from what was saved, so that `batchnorm lab judge` decides exactly as this run.
        numbers = numbers_from_json(self.numbers_cls, read_checked_json(path)["numbers"])
        return Outcome(
            claims=self.judge(numbers),
            comparisons=measurement.comparisons,
            metrics=measurement.metrics,
            tables=measurement.tables,
            figures=measurement.figures,
            choices=measurement.choices,
            notes=measurement.notes,
        )

    def default_config(self, quick: bool = False) -> Any:
        config = self.config_cls()
        return config.quick() if quick else config

    def fields(self) -> list[tuple[str, str, Any, str]]:
        return field_docs(self.config_cls)


def overall_verdict(claims: Sequence[Claim]) -> str:
    """The overall verdict over the claims the run tested: "held" if every one held, "did not
    hold" if none, else "partly held"; claims that were not tested are counted after it, and a
    run that tested none is "not tested".

    >>> overall_verdict([Claim("a", "", "", True, ""), Claim("b", "", "", False, "")])
    'partly held'
    >>> overall_verdict([Claim("a", "", "", True, ""), Claim("b", "", "", False, "", False)])
    'held (1 of 2 claims not tested)'
    """
    if not claims:
        return "no claim tested"
    tested = [c for c in claims if c.tested]
    if not tested:
        return "not tested"
    held = sum(c.held for c in tested)
    if held == len(tested):
        verdict = "held"
    else:
        verdict = "did not hold" if held == 0 else "partly held"
    untested = len(claims) - len(tested)
    if untested:
        verdict += f" ({untested} of {len(claims)} claims not tested)"
    return verdict


# --------------------------------------------------------------------------------------------
# Small statistics helpers shared by the experiments


def mean_std(values: Sequence[float] | np.ndarray) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof=1; 0 for one value) and count of finite values.

    >>> mean_std([1.0, 3.0, float("nan")])
    (2.0, 1.4142135623730951, 2)
    """
    finite = [float(v) for v in np.asarray(values, dtype=np.float64).ravel() if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan, 0
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0
    return float(np.mean(finite)), std, len(finite)


def fmt_mean_std(values: Sequence[float] | np.ndarray, digits: int = 4) -> str:
    """The finite values as "mean ± std (n=k)".

    >>> fmt_mean_std([0.9, 0.92, 0.94])
    '0.9200 ± 0.0200 (n=3)'
    """
    mean, std, n = mean_std(values)
    if n == 0:
        return "n/a"
    if n == 1:
        return f"{mean:.{digits}f} (n=1)"
    return f"{mean:.{digits}f} ± {std:.{digits}f} (n={n})"


# --------------------------------------------------------------------------------------------
# Configs


def _from_json_value(value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if value is None:
        return None
    if origin is tuple or (origin is None and tp is tuple):
        args = typing.get_args(tp)
        item = args[0] if args else Any
        return tuple(_from_json_value(v, item) for v in value)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _from_json_value(value, inner[0]) if inner else value
    if tp is float and isinstance(value, int):
        return float(value)
    return value


def config_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Rebuild a config dataclass from :func:`config_to_dict` output (lists back to tuples),
    checked as a fresh one is (:func:`batchnorm.lab.config.check_config`).

    Raises:
        ConfigError: an unknown key, a value of the wrong type or one a check refuses.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"unknown config keys for {cls.__name__}: {', '.join(sorted(unknown))}")
    kwargs = {k: _from_json_value(v, hints[k]) for k, v in values.items()}
    for name, value in kwargs.items():
        expected = hints[name]
        if expected in (int, float, str, bool) and not _is_a(value, expected):
            raise ConfigError(f"{name}: {value!r} is not of type {expected.__name__}")
    return check_config(cls(**kwargs))


def _is_a(value: Any, expected: type) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def make_config(
    experiment: Experiment,
    *,
    quick: bool = False,
    seeds: int | None = None,
    overrides: Sequence[str] = (),
) -> Any:
    """The config a run uses: defaults, then quick mode, then ``--seeds``, then ``--set``.

    Raises:
        ConfigError: a bad override or an invalid combination.
    """
    config = experiment.default_config(quick)
    if seeds is not None:
        if seeds < 1:
            raise ConfigError(f"--seeds must be at least 1, got {seeds}")
        config = apply_overrides(config, {"seeds": str(seeds)})
    return apply_overrides(config, list(overrides))


# --------------------------------------------------------------------------------------------
# Provenance


def _git_revision() -> dict[str, Any]:
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return {"revision": None, "note": "not a git checkout"}
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return {"revision": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError) as exc:
        return {"revision": None, "note": f"git unavailable: {exc}"}


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment_info(threads: int) -> dict[str, Any]:
    """Git revision, library versions, interpreter, platform, CPU threads and load."""
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cores = os.cpu_count() or 1
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "git": _git_revision(),
        "versions": {
            name: _version(name)
            for name in ("batchnorm", "numpy", "torch", "matplotlib", "tqdm", "scikit-learn")
        },
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_cores_available": cores,
        "torch_threads": threads,
        "torch_config": torch.__config__.parallel_info().splitlines()[:3],
        "load_average_at_start": list(load) if load else None,
    }


def resolve_threads(requested: int) -> int:
    """Torch threads: ``requested`` if positive (at most the cores), else the cores not already
    busy (at least 1).

    Other processes on a shared machine make OpenMP threads wait on each other; asking only for
    the idle cores avoids that.
    """
    cores = available_cores()
    if requested > 0:
        return min(requested, cores)  # more would only wait on each other (or crash OpenMP)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, int(round(cores - busy))))


# --------------------------------------------------------------------------------------------
# Runs


def runs_root(out: str | os.PathLike[str] | None = None) -> Path:
    """Where run directories go: ``out``, else ``$BATCHNORM_RUNS_DIR``, else ``./runs``."""
    if out is not None:
        if not str(out).strip():
            raise ConfigError("--out is empty; name a folder for the run directories")
        return Path(out).expanduser()
    env = os.environ.get(RUNS_DIR_ENV)
    return Path(env).expanduser() if env else Path("runs")


def _new_run_dir(root: Path, name: str, quick: bool) -> Path:
    """A fresh directory; an existing one is never reused (a suffix is added instead)."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = f"{stamp}-{name}{'-quick' if quick else ''}"
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root} is a file, not a folder; pass --out a folder for the runs")
    try:
        root.mkdir(parents=True, exist_ok=True)
        for i in range(1, 1000):
            path = root / (base if i == 1 else f"{base}-{i}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as exc:
        raise ConfigError(
            f"cannot create a run directory under {root}: {exc.strerror or exc}; "
            "pass --out a folder you can write to"
        ) from None
    raise ConfigError(f"could not create a new run directory under {root}")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Context:
    """What an experiment's ``run`` gets besides its config: the run directory and helpers."""

    run_dir: Path
    experiment: Experiment
    config: Any
    quick: bool
    data_dir: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def timer(self, name: str) -> Iterator[None]:
        """Add the wall time of the block to ``timings[name]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    def load_data(self, name: str, train_subset: int | None = None, test_subset: int | None = None):
        """Load a data set (see :func:`batchnorm.lab.data.load_dataset`), optionally a subset."""
        from batchnorm.lab.data import load_dataset

        with self.timer("data"):
            data = load_dataset(name, self.data_dir)
            if train_subset is not None or test_subset is not None:
                data = data.subset(train_subset, test_subset, seed=0)
        log(f"[lab] {data.describe()}")
        return data

    def cached(self, key: str, compute: Callable[[], Any], *, as_json: bool = False) -> Any:
        """The run's one job cache: ``compute()``, saved as ``jobs/<key>.json`` (with its
        SHA-256); or, when a resumed run has that file, the saved result (as JSON keeps it:
        lists for tuples, None for NaN and infinities). A damaged file is refused
        (:class:`~batchnorm.lab.io.CorruptFileError`), never loaded. Once the result is saved,
        the job's training checkpoint (:meth:`checkpoint`) is deleted.

        Args:
            key: a file-name-safe name, unique within the run.
            compute: returns the job's result (JSON-serializable).
            as_json: return a fresh result in that JSON form too, so that a fresh and a resumed
                run go on with the same values.
        """
        path = self.run_dir / "jobs" / f"{key}.json"
        if path.is_file():
            log(f"[lab] {key}: already finished, loaded from {path}")
            result = read_checked_json(path)
        else:
            path.parent.mkdir(exist_ok=True)
            result = compute()
            if as_json:
                result = to_jsonable(result)
            write_checked_json(path, result)
        remove_checked(self.run_dir / "jobs" / f"{key}.ckpt")
        return result

    def checkpoint(self, key: str) -> Path:
        """Where job ``key`` keeps its training checkpoint, ``jobs/<key>.ckpt``: the lab's loop
        (:func:`batchnorm.lab.loop.run_loop`) continues from it and writes to it; it is deleted
        when the job's result is saved (:meth:`cached`)."""
        path = self.run_dir / "jobs" / f"{key}.ckpt"
        path.parent.mkdir(exist_ok=True)
        if path.is_file():
            log(f"[lab] {key}: resuming from {path}")
        return path

    def job(self, key: str, build: Callable[[], Any], settings: Any, data: Any, desc: str):
        """Train one wide model (resumable) through :meth:`cached`: a finished job is loaded
        from ``jobs/<key>.json``; a running one continues from ``jobs/<key>.ckpt``.

        Args:
            key: a file-name-safe name, unique within the run.
            build: returns a fresh :class:`~batchnorm.lab.wide.WideMLP`.
            settings: :class:`~batchnorm.lab.train.TrainSettings`.
            data: the data set.
            desc: progress bar label.
        """
        from batchnorm.lab.train import train

        def run() -> dict[str, Any]:
            trained = train(build(), data, settings, desc=desc, checkpoint=self.checkpoint(key))
            self.timings[f"{key}: train"] = trained.train_seconds
            self.timings[f"{key}: evaluate"] = trained.eval_seconds
            return _job_to_json(trained)

        return _job_from_json(self.cached(key, run, as_json=True))

    def write_csv(self, name: str, rows: list[dict[str, Any]], fields: Sequence[str]) -> None:
        atomic_write_csv(self.run_dir / name, rows, fields)

    def save_figure(self, figure: Any, name: str) -> None:
        """Save a matplotlib Figure as PNG, atomically."""
        import io as _io

        from batchnorm.lab.io import atomic_write_bytes

        buffer = _io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        atomic_write_bytes(self.run_dir / name, buffer.getvalue())


def _job_to_json(result: Any) -> dict[str, Any]:
    return {
        "specs": [dataclasses.asdict(s) for s in result.specs],
        "steps": result.steps,
        "test_acc": result.test_acc,
        "test_loss": result.test_loss,
        "train_loss": result.train_loss,
        "train_acc": result.train_acc,
        "percentiles": result.percentiles,
        "saturation": result.saturation,
        "diverged_at": result.diverged_at,
        "final_test_acc_moving_average": result.final_test_acc_moving_average,
        "train_seconds": result.train_seconds,
        "eval_seconds": result.eval_seconds,
        **({"extra": result.extra} if result.extra else {}),
    }


def _array(value: Any, dtype: Any = np.float64) -> np.ndarray | None:
    if value is None:
        return None
    # JSON has no NaN: to_jsonable wrote None for it.
    return np.array(value if dtype is np.int64 else _none_to_nan(value), dtype=dtype)


def _none_to_nan(value: Any) -> Any:
    if isinstance(value, list):
        return [_none_to_nan(v) for v in value]
    return math.nan if value is None else value


def _job_from_json(d: dict[str, Any]) -> Any:
    from batchnorm.lab.train import JobResult
    from batchnorm.lab.wide import NetSpec

    return JobResult(
        specs=tuple(NetSpec(**s) for s in d["specs"]),
        steps=_array(d["steps"], np.int64),
        test_acc=_array(d["test_acc"]),
        test_loss=_array(d["test_loss"]),
        train_loss=_array(d["train_loss"]),
        train_acc=_array(d["train_acc"]),
        percentiles=_array(d["percentiles"]),
        saturation=_array(d.get("saturation")),
        diverged_at=_array(d["diverged_at"], np.int64),
        final_test_acc_moving_average=_array(d["final_test_acc_moving_average"]),
        train_seconds=float(d["train_seconds"]),
        eval_seconds=float(d["eval_seconds"]),
        extra={k: _array(v) for k, v in (d.get("extra") or {}).items()},
    )


@dataclass
class RunResult:
    """What :func:`run_experiment` returns."""

    run_dir: Path
    outcome: Outcome
    verdict: str
    wall_seconds: float


_ATTEMPT_KEYS = ("error", "traceback", "signal")  # what one attempt's end leaves in status.json


def _write_status(run_dir: Path, status: str, **extra: Any) -> None:
    """Update ``status.json``. A new attempt (status "running") moves how the previous one ended
    (its error, traceback or signal) into ``earlier_attempts``, so that a resumed run that
    completes does not still show the failure it recovered from."""
    path = run_dir / STATUS_FILE
    previous = json.loads(path.read_text()) if path.is_file() else {}
    if status == "running" and any(key in previous for key in _ATTEMPT_KEYS):
        ended = {key: previous.pop(key) for key in _ATTEMPT_KEYS if key in previous}
        earlier = previous.setdefault("earlier_attempts", [])
        earlier.append(
            {"status": previous.get("status"), "updated": previous.get("updated"), **ended}
        )
    record = {**previous, "status": status, "updated": _now(), **extra}
    record.setdefault("started", record["updated"])
    atomic_write_json(path, record)


def _write_marker(run_dir: Path, experiment: Experiment, text: str) -> None:
    atomic_write_text(
        run_dir / MARKER_FILE,
        f"This run of `{experiment.name}` is not complete: {text}\n"
        "Its numbers, if any, are partial. Continue it with\n"
        f"    batchnorm lab run {experiment.name} --resume {run_dir}\n"
        "(finished training jobs are kept; the running one continues from its checkpoint).\n",
    )


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C (SIGINT) or SIGTERM; its directory is marked interrupted.

    Attributes:
        run_dir: the run directory, to resume.
        signal_name: "SIGINT" or "SIGTERM".
        exit_code: 128 + the signal number, as a shell reports a process the signal ended.
    """

    def __init__(self, run_dir: Path, signal_name: str) -> None:
        super().__init__(f"{run_dir}: interrupted by {signal_name}")
        self.run_dir = run_dir
        self.signal_name = signal_name
        self.exit_code = 128 + int(getattr(signal, signal_name, signal.SIGINT))


class _Terminated(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM arrives during a run."""


class DamagedRunError(ConfigError):
    """A job file or checkpoint of the run directory failed its checksum (or cannot be read)."""


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Within the block SIGTERM stops the run as Ctrl-C does, so it is marked interrupted."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _job_name(path: Path) -> str:
    """The job a file of ``jobs/`` belongs to: ``fig1`` for ``fig1.ckpt`` or ``fig1.json``."""
    name = path.name.removesuffix(CHECKSUM_SUFFIX)
    for suffix in (".json", ".ckpt"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _damaged(exc: CorruptFileError, experiment: Experiment, run_dir: Path) -> str:
    if exc.path.parent.resolve() != (run_dir / "jobs").resolve():
        return f"{exc}; delete it (it is rebuilt) and resume with --resume {run_dir}"
    job = _job_name(exc.path)
    command = (
        f"batchnorm lab run {experiment.name} --resume {shlex.quote(str(run_dir))} "
        f"--restart-job {shlex.quote(job)}"
    )
    return f"{exc} and is not resumed from; train that job again from its start with `{command}`"


def _restart_jobs(run_dir: Path, names: Sequence[str]) -> None:
    """Delete the named jobs' results and checkpoints, so that they run again from the start."""
    jobs = run_dir / "jobs"
    for name in names:
        if not name or "/" in name or os.sep in name or name.startswith("."):
            raise ConfigError(f"--restart-job {name!r}: a job is named by its file in jobs/")
        files = [jobs / f"{name}.json", jobs / f"{name}.ckpt"]
        if not any(f.exists() or Path(str(f) + CHECKSUM_SUFFIX).exists() for f in files):
            known = (
                sorted({_job_name(f) for f in jobs.iterdir() if not f.name.startswith(".")})
                if jobs.is_dir()
                else []
            )
            raise ConfigError(
                f"--restart-job {name}: no such job in {jobs} "
                f"(jobs there: {', '.join(known) if known else 'none'})"
            )
        for f in files:
            remove_checked(f)
        log(f"[lab] {name}: removed its results and checkpoint; it runs again from the start")


def _saved_threads(run_dir: Path) -> int | None:
    """The torch thread count of the run's first invocation, if it recorded one."""
    try:
        threads = json.loads((run_dir / "environment.json").read_text()).get("torch_threads")
    except (OSError, ValueError, AttributeError):
        return None
    return threads if isinstance(threads, int) and threads > 0 else None


def run_experiment(
    experiment: Experiment,
    config: Any,
    *,
    quick: bool = False,
    out: str | os.PathLike[str] | None = None,
    data_dir: str | None = None,
    resume: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    argv: Sequence[str] | None = None,
    restart_jobs: Sequence[str] = (),
) -> RunResult:
    """Run an experiment in a new run directory (or continue one), and write its report.

    Args:
        experiment: what to run.
        config: its config (see :func:`make_config`); ignored with ``resume`` (the saved one is
            used, checked again).
        quick: whether this is the quick (smoke-test) mode, recorded in the directory name.
        out: the runs root (see :func:`runs_root`).
        data_dir: a folder to look in first for data files.
        resume: an existing run directory to continue.
        overrides: the ``--set`` overrides, recorded.
        argv: the command line, recorded.
        restart_jobs: with ``resume``, jobs whose results and checkpoints are deleted first, so
            that they train again from the start (e.g. one whose checkpoint is damaged).

    Returns:
        A :class:`RunResult`.

    Raises:
        ConfigError: a bad ``out``, a run directory that cannot be resumed (another experiment's,
            complete, in use by a live process, or with an invalid saved config).
        DamagedRunError: a job file or checkpoint failed its checksum.
        RunInterrupted: Ctrl-C or SIGTERM; the directory is marked interrupted.
    """
    if restart_jobs and resume is None:
        raise ConfigError("--restart-job needs --resume RUN_DIR (the run whose job to restart)")
    if resume is not None:
        run_dir = Path(resume)
        saved = _load_json(run_dir / "config.json")
        if saved.get("experiment") != experiment.name:
            raise ConfigError(
                f"{run_dir} holds a run of {saved.get('experiment')!r}, not {experiment.name!r}"
            )
    else:
        saved = None
        run_dir = _new_run_dir(runs_root(out), experiment.name, quick)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(lock_run_dir(run_dir))
        except RunLockedError as exc:
            raise ConfigError(str(exc)) from None
        except OSError as exc:
            raise ConfigError(f"cannot lock {run_dir}: {exc.strerror or exc}") from None
        return _run_locked(
            experiment, config, run_dir, saved, quick, data_dir, overrides, argv, restart_jobs
        )


def _run_locked(
    experiment: Experiment,
    config: Any,
    run_dir: Path,
    saved: dict[str, Any] | None,
    quick: bool,
    data_dir: str | None,
    overrides: Sequence[str],
    argv: Sequence[str] | None,
    restart_jobs: Sequence[str],
) -> RunResult:
    """:func:`run_experiment` once the run directory is held by this process."""
    import torch

    start = time.perf_counter()
    resumed = saved is not None
    saved_threads = None
    if saved is not None:
        status = _load_json(run_dir / STATUS_FILE).get("status")
        if status == "complete":
            raise ConfigError(f"{run_dir} is already complete; start a new run instead")
        try:
            config = config_from_dict(experiment.config_cls, saved.get("config") or {})
        except (ConfigError, TypeError) as exc:
            raise ConfigError(
                f"the saved config {run_dir / 'config.json'} is not valid: {exc}; "
                "fix it there or start a new run"
            ) from None
        quick = bool(saved.get("quick"))
        data_dir = data_dir if data_dir is not None else saved.get("data_dir")
        previous_seconds = float(_load_json(run_dir / STATUS_FILE).get("wall_seconds") or 0.0)
        _restart_jobs(run_dir, restart_jobs)
        for folder in (run_dir, run_dir / "jobs"):
            for path in remove_stale_temporaries(folder):
                log(f"[lab] removed {path}, left by an interrupted write")
        saved_threads = _saved_threads(run_dir)
        log(f"[lab] resuming {run_dir}")
    else:
        previous_seconds = 0.0
        atomic_write_json(
            run_dir / "config.json",
            {
                "experiment": experiment.name,
                "title": experiment.title,
                "quick": quick,
                "config": config_to_dict(config),
                "overrides": list(overrides),
                "data_dir": data_dir,
                "command": _command_line(argv),
            },
        )
    _write_marker(run_dir, experiment, "it is still running, or it was interrupted.")
    _write_status(run_dir, "running", pid=os.getpid())
    if saved_threads is not None:
        # The first invocation's count, whatever the load now: 1 and 2 threads sum in different
        # orders, and a resumed run must give the numbers of an uninterrupted one.
        threads = saved_threads
        if threads > available_cores():
            log(
                f"note: this run started with {threads} torch threads but only "
                f"{available_cores()} core(s) are available now; its numbers may differ in the "
                "last digits from an uninterrupted run"
            )
            threads = available_cores()
    else:
        threads = resolve_threads(int(getattr(config, "threads", 0)))
    torch.set_num_threads(threads)
    environment = environment_info(threads)
    if resumed and (run_dir / "environment.json").is_file():
        # The run's environment stays the first invocation's; each resumption is listed after it.
        first = _load_json(run_dir / "environment.json")
        first["resumed"] = [*first.get("resumed", []), environment]
        environment = first
    atomic_write_json(run_dir / "environment.json", environment)
    log(f"[lab] {experiment.name}: run directory {run_dir} ({threads} torch thread(s))")

    context = Context(run_dir, experiment, config, quick, data_dir)
    try:
        with _sigterm_interrupts(), context.timer("total"):
            outcome = experiment.outcome(config, context)
    except KeyboardInterrupt as exc:
        signal_name = "SIGTERM" if isinstance(exc, _Terminated) else "SIGINT"
        wall = previous_seconds + time.perf_counter() - start
        # Every write of this run has unwound; whatever a signal cut short is garbage now.
        for folder in (run_dir, run_dir / "jobs"):
            remove_stale_temporaries(folder, own=True)
        _write_status(run_dir, "interrupted", wall_seconds=wall, signal=signal_name)
        how = "SIGTERM" if signal_name == "SIGTERM" else "Ctrl-C"
        _write_marker(run_dir, experiment, f"it was interrupted ({how}) before it finished.")
        raise RunInterrupted(run_dir, signal_name) from None
    except CorruptFileError as exc:
        wall = previous_seconds + time.perf_counter() - start
        message = _damaged(exc, experiment, run_dir)
        _write_status(run_dir, "failed", wall_seconds=wall, error=message)
        _write_marker(run_dir, experiment, message)
        raise DamagedRunError(message) from None
    except BaseException as exc:
        wall = previous_seconds + time.perf_counter() - start
        _write_status(
            run_dir,
            "failed",
            wall_seconds=wall,
            error=f"{type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(),
        )
        _write_marker(run_dir, experiment, f"it failed with {type(exc).__name__}: {exc}")
        raise

    wall = previous_seconds + time.perf_counter() - start
    context.timings["wall (this invocation)"] = time.perf_counter() - start
    verdict = overall_verdict(outcome.claims)
    metrics = {
        "experiment": experiment.name,
        "title": experiment.title,
        "quick": quick,
        "verdict": verdict,
        # The baseline's final accuracies (means over seeds) at the top level as well, where a
        # reader of many runs looks for them first; None for experiments without a classifier.
        **{key: outcome.metrics.get(key) for key in BASELINE_KEYS},
        "claims": [dataclasses.asdict(c) | {"verdict": c.verdict} for c in outcome.claims],
        "comparisons": [dataclasses.asdict(c) for c in outcome.comparisons],
        "metrics": outcome.metrics,
        "timings_seconds": context.timings,
        "wall_seconds": wall,
        "resumed": resumed,
    }
    atomic_write_json(run_dir / "metrics.json", metrics)
    environment = _load_json(run_dir / "environment.json")
    report = render_report(experiment, config, quick, outcome, verdict, context, wall, environment)
    atomic_write_text(run_dir / "report.md", report)
    _write_status(run_dir, "complete", wall_seconds=wall, verdict=verdict)
    (run_dir / MARKER_FILE).unlink(missing_ok=True)
    log(f"[lab] {experiment.name}: {verdict} ({wall:.1f} s); report: {run_dir / 'report.md'}")
    return RunResult(run_dir, outcome, verdict, wall)


def _command_line(argv: Sequence[str] | None) -> str:
    args = list(argv) if argv is not None else sys.argv[1:]
    return "batchnorm " + " ".join(shlex.quote(a) for a in args)


def _load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


# --------------------------------------------------------------------------------------------
# The report


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table.

    >>> print(md_table(["a", "b"], [[1, "x|y"]]))
    | a | b |
    |---|---|
    | 1 | x\\|y |
    """
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def verdicts_table(claims: Sequence[Claim]) -> str:
    """The report's table of claims, rules, evidence and verdicts."""
    return md_table(
        ["claim", "rule (decided in code)", "evidence", "verdict"],
        [[c.statement, c.rule, c.evidence, f"**{c.verdict}**"] for c in claims],
    )


def render_report(
    experiment: Experiment,
    config: Any,
    quick: bool,
    outcome: Outcome,
    verdict: str,
    context: Context,
    wall: float,
    environment: dict[str, Any],
) -> str:
    """The Markdown report of a finished run."""
    lines = [f"# {experiment.title}", ""]
    if quick:
        lines += [
            "> **Quick mode**: a smoke test with a shortened protocol. The numbers below are NOT "
            "the paper's protocol and the verdicts say little; run without `--quick` for those.",
            "",
        ]
    lines += [
        f"**Claim tested.** {experiment.claim}",
        "",
        f"**Reproduces.** {experiment.paper}",
        "",
        f"**Overall verdict: {verdict}.**",
        "",
        *_baseline_lines(outcome.metrics),
        "## Verdicts",
        "",
        verdicts_table(outcome.claims),
        "",
        "## Numbers beside the paper's",
        "",
        md_table(
            ["quantity", "paper", "measured"],
            [[c.quantity, c.paper, c.measured] for c in outcome.comparisons],
        ),
        "",
    ]
    for title, table in outcome.tables:
        lines += [f"## {title}", "", table, ""]
    if outcome.figures:
        lines += ["## Figures", ""]
        for name, caption in outcome.figures:
            lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    if outcome.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in outcome.notes] + [""]
    lines += ["## Protocol", ""]
    if outcome.choices:
        lines += ["Choices the paper leaves open, as made here:", ""]
        lines += [f"- {c}" for c in outcome.choices] + [""]
    lines += [
        md_table(
            ["field", "value", "meaning"],
            [
                [name, json.dumps(to_jsonable(getattr(config, name))), help_text]
                for name, _, _, help_text in field_docs(config)
            ],
        ),
        "",
        "## Timing",
        "",
        f"Wall time of the run: **{wall:.1f} s** ({wall / 60:.1f} min) on "
        f"{environment.get('cpu_cores_available')} CPU core(s) with "
        f"{environment.get('torch_threads')} torch thread(s); load average at start "
        f"{_fmt_load(environment.get('load_average_at_start'))} (other processes on a shared "
        "machine inflate these times).",
        "",
        md_table(
            ["phase", "seconds"],
            [[name, f"{seconds:.1f}"] for name, seconds in context.timings.items()],
        ),
        "",
        "## Provenance",
        "",
        f"- run directory: `{context.run_dir}`",
        f"- git revision: {_fmt_git(environment.get('git', {}))}",
        "- versions: "
        + ", ".join(f"{k} {v}" for k, v in (environment.get("versions") or {}).items() if v),
        f"- python {environment.get('python')} on {environment.get('platform')}",
        f"- command: `{_load_json(context.run_dir / 'config.json').get('command', '')}`",
        *_fmt_resumptions(environment),
        "",
    ]
    return "\n".join(lines)


def _baseline_lines(metrics: dict[str, Any]) -> list[str]:
    """The report's statement of the baseline's final accuracies, when the experiment records
    them (``baseline_train_accuracy``, ``baseline_test_accuracy``, means over seeds)."""
    train = metrics.get("baseline_train_accuracy")
    test = metrics.get("baseline_test_accuracy")
    if train is None and test is None:
        return []
    what = metrics.get("baseline", "the baseline network")

    def fmt(value: Any) -> str:
        return "n/a" if value is None else f"{float(value):.4f}"

    return [
        f"**Trained?** {what}: final train accuracy {fmt(train)}, test accuracy {fmt(test)} "
        "(means over seeds).",
        "",
    ]


def _fmt_resumptions(environment: dict[str, Any]) -> list[str]:
    """Report lines for the invocations that resumed the run, and what changed between them."""
    lines = []
    for i, later in enumerate(environment.get("resumed", []), start=1):
        first_versions = environment.get("versions") or {}
        changed = [
            f"{name} {version}"
            for name, version in (later.get("versions") or {}).items()
            if version != first_versions.get(name)
        ]
        if later.get("git") != environment.get("git"):
            changed.insert(0, f"git revision {_fmt_git(later.get('git', {}))}")
        note = "; changed: " + ", ".join(changed) if changed else " (same code and versions)"
        lines.append(f"- resumption {i}: {later.get('torch_threads')} torch thread(s){note}")
    return lines


def _fmt_load(load: Any) -> str:
    return "unknown" if not load else "/".join(f"{x:.2f}" for x in load)


def _fmt_git(git: dict[str, Any]) -> str:
    if not git.get("revision"):
        return git.get("note", "unknown")
    return f"`{git['revision']}`" + (" (with uncommitted changes)" if git.get("dirty") else "")


# --------------------------------------------------------------------------------------------
# The index of runs


@dataclass
class RunSummary:
    """One run directory, as ``batchnorm lab report`` lists it."""

    path: Path
    experiment: str
    status: str
    quick: bool
    verdict: str
    started: str
    wall_seconds: float | None


def scan_runs(root: Path) -> tuple[list[RunSummary], list[tuple[Path, str]]]:
    """The run directories under ``root``, oldest first, and those that could not be read.

    A folder without ``status.json`` is not a run and is passed over; one whose ``status.json``
    or ``config.json`` is not readable JSON is listed in the second list with the reason.
    """
    runs: list[RunSummary] = []
    skipped: list[tuple[Path, str]] = []
    if not root.is_dir():
        return runs, skipped
    for path in sorted(p for p in root.iterdir() if p.is_dir()):
        status_path = path / STATUS_FILE
        if not status_path.is_file():
            continue
        records = {}
        for name in (STATUS_FILE, "config.json"):
            try:
                records[name] = json.loads((path / name).read_text())
                if not isinstance(records[name], dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                skipped.append((path, f"{name}: {reason}"))
                break
        else:
            status, config = records[STATUS_FILE], records["config.json"]
            verdict = status.get("verdict") or "-"
            if status.get("status") != "complete":
                verdict = "(no verdict: run incomplete)"
            runs.append(
                RunSummary(
                    path=path,
                    experiment=config.get("experiment", "?"),
                    status=status.get("status", "?"),
                    quick=bool(config.get("quick")),
                    verdict=verdict,
                    started=status.get("started", ""),
                    wall_seconds=status.get("wall_seconds"),
                )
            )
    return runs, skipped


def list_runs(root: Path) -> list[RunSummary]:
    """Every readable run directory under ``root``, oldest first (see :func:`scan_runs`)."""
    return scan_runs(root)[0]


def render_index(runs: Sequence[RunSummary]) -> str:
    """The Markdown index of runs."""
    rows = [
        [
            r.path.name,
            r.experiment,
            "quick" if r.quick else "full",
            r.status,
            r.verdict,
            "-" if r.wall_seconds is None else f"{r.wall_seconds:.0f}",
        ]
        for r in runs
    ]
    return "\n".join(
        [
            "# Lab runs",
            "",
            md_table(["run", "experiment", "mode", "status", "verdict", "wall s"], rows)
            if rows
            else "(no runs yet)",
            "",
        ]
    )


# --------------------------------------------------------------------------------------------
# Judging a saved run again


@dataclass
class JudgedRun:
    """What :func:`judge_run` returns.

    Attributes:
        run_dir: the run directory.
        experiment: its experiment.
        claims: the claims as decided now from the saved numbers.
        verdict: their overall verdict.
        changed: one line per claim whose verdict differs from the one saved before (empty when
            none does).
    """

    run_dir: Path
    experiment: Experiment
    claims: list[Claim]
    verdict: str
    changed: list[str]


def replace_verdicts(report: str, claims: Sequence[Claim], verdict: str) -> str:
    """``report`` (as :func:`render_report` wrote it) with the overall verdict and the table of
    verdicts replaced by those of ``claims``; everything else is kept.

    Raises:
        ValueError: the report has no overall verdict line or no verdicts table.
    """
    lines = report.split("\n")
    overall = [i for i, line in enumerate(lines) if line.startswith("**Overall verdict: ")]
    try:
        heading = lines.index("## Verdicts")
    except ValueError:
        raise ValueError("it has no '## Verdicts' section") from None
    if not overall:
        raise ValueError("it has no '**Overall verdict: ...**' line")
    start = heading + 1
    while start < len(lines) and not lines[start].startswith("|"):
        start += 1
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    if start == end:
        raise ValueError("its '## Verdicts' section has no table")
    lines[overall[0]] = f"**Overall verdict: {verdict}.**"
    lines[start:end] = verdicts_table(claims).split("\n")
    return "\n".join(lines)


def judge_run(run_dir: str | os.PathLike[str], write: bool = True) -> JudgedRun:
    """Decide a finished run's claims again from its saved ``numbers.json``, without training.

    With ``write``, the verdict parts of ``metrics.json`` (``claims``, ``verdict``),
    ``report.md`` (the overall verdict and the table of verdicts) and ``status.json``
    (``verdict``, and ``rejudged``: when) are rewritten; the rest of each file is kept.

    Raises:
        ConfigError: not a run directory, a run of an unknown experiment, a run that is not
            complete, a missing, damaged or unreadable ``numbers.json``, a directory another
            process holds, or files that cannot be rewritten; the message says what to do.
    """
    from batchnorm.lab import experiments

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(
            f"{run_dir} is not a folder; name a run directory (`batchnorm lab report` lists them)"
        )
    if not (run_dir / "config.json").is_file():
        raise ConfigError(
            f"{run_dir} is not a run directory (it has no config.json); name one that "
            "`batchnorm lab run` made (`batchnorm lab report` lists them)"
        )
    saved = _load_json(run_dir / "config.json")
    name = saved.get("experiment") if isinstance(saved, dict) else None
    try:
        experiment = experiments.get(str(name))
    except KeyError:
        raise ConfigError(
            f"{run_dir} holds a run of an unknown experiment {name!r}; "
            "this version of the lab cannot judge it"
        ) from None
    status = _load_json(run_dir / STATUS_FILE) if (run_dir / STATUS_FILE).is_file() else {}
    status = status if isinstance(status, dict) else {}
    if status.get("status") != "complete":
        raise ConfigError(
            f"{run_dir} is not complete (status: {status.get('status', 'unknown')}); finish it "
            f"with `batchnorm lab run {experiment.name} --resume {shlex.quote(str(run_dir))}`"
        )
    path = run_dir / NUMBERS_FILE
    if not path.is_file():
        raise ConfigError(
            f"{run_dir} has no {NUMBERS_FILE} (the run was made before runs saved their numbers); "
            f"run `batchnorm lab run {experiment.name}` again to judge it"
        )
    try:
        record = read_checked_json(path)
        if not isinstance(record, dict) or "numbers" not in record:
            raise NumbersError("it is not a numbers record")
        if record.get("experiment") != experiment.name:
            raise NumbersError(
                f"it holds numbers of {record.get('experiment')!r}, not {experiment.name!r}"
            )
        if record.get("format") != NUMBERS_FORMAT:
            raise NumbersError(f"unknown format {record.get('format')!r}")
        numbers = numbers_from_json(experiment.numbers_cls, record["numbers"])
    except CorruptFileError as exc:
        raise ConfigError(f"{exc}; it cannot be judged again (run the experiment again)") from None
    except NumbersError as exc:
        raise ConfigError(
            f"{path} does not hold {experiment.name}'s numbers ({exc}); run the experiment again"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        claims = experiment.judge(numbers)
    except (KeyError, IndexError, ValueError, TypeError, ZeroDivisionError) as exc:
        raise ConfigError(
            f"{path} does not hold {experiment.name}'s numbers (judging them failed: "
            f"{type(exc).__name__}: {exc}); run the experiment again"
        ) from None
    verdict = overall_verdict(claims)

    metrics = _load_json(run_dir / "metrics.json")
    if not isinstance(metrics, dict) or not isinstance(metrics.get("claims", []), list):
        raise ConfigError(f"{run_dir / 'metrics.json'} is not a run's metrics; run it again")
    before = {
        c.get("name"): c.get("verdict") for c in metrics.get("claims", []) if isinstance(c, dict)
    }
    changed = [
        f"{c.name}: {before.get(c.name, 'not judged')} -> {c.verdict}"
        for c in claims
        if before.get(c.name) != c.verdict
    ]
    changed += [
        f"{n}: {v} -> no longer a claim"
        for n, v in before.items()
        if n not in {c.name for c in claims}
    ]
    if write:
        _write_verdicts(run_dir, claims, verdict, metrics)
    return JudgedRun(run_dir, experiment, claims, verdict, changed)


def _write_verdicts(
    run_dir: Path, claims: Sequence[Claim], verdict: str, metrics: dict[str, Any]
) -> None:
    report_path = run_dir / "report.md"
    try:
        report = replace_verdicts(report_path.read_text(), claims, verdict)
    except OSError as exc:
        raise ConfigError(f"cannot read {report_path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"cannot rewrite {report_path}: {exc}") from None
    metrics["verdict"] = verdict
    metrics["claims"] = [dataclasses.asdict(c) | {"verdict": c.verdict} for c in claims]
    try:
        with lock_run_dir(run_dir):
            atomic_write_json(run_dir / "metrics.json", metrics)
            atomic_write_text(report_path, report)
            _write_status(run_dir, "complete", verdict=verdict, rejudged=_now())
    except RunLockedError as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot rewrite the verdicts in {run_dir}: {exc.strerror or exc}; make it writable "
            "(or judge without writing, --dry-run)"
        ) from None
