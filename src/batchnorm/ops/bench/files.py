"""The benchmark's files: CSVs and plots written atomically (a run of minutes never leaves half
a file, and a bad output path is named before the run, not after it), and CSVs read back for
plots with a clear error where the file is not one of ours."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence

from batchnorm._atomic import atomic_write_csv, atomic_writer


def output_problem(path: str) -> str | None:
    """Why a CSV cannot be written at ``path`` (its folder is made if missing), or None.

    Example:
        >>> output_problem("/proc/no/such.csv") is not None
        True
    """
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"{path} is a folder; give a file name, e.g. {os.path.join(path, 'bench.csv')}"
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        return f"cannot create the folder {directory}: {exc.strerror or exc}"
    if not os.access(directory, os.W_OK):
        return f"cannot write to the folder {directory} (permission denied)"
    return None


def write_csv(
    path: str, fieldnames: Sequence[str], rows: Iterable[dict], preamble: Iterable[str] = ()
) -> None:
    """``rows`` under a header of ``fieldnames``, after ``# line`` comments of ``preamble``;
    written atomically (:func:`batchnorm._atomic.atomic_write_csv`)."""
    atomic_write_csv(path, rows, fieldnames, preamble)


def save_figure(fig, path: str, dpi: int = 120) -> str:
    """A matplotlib figure as a PNG at ``path``, written atomically; returns ``path``."""
    with atomic_writer(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    return path


def has_columns(path: str, required: Sequence[str]) -> bool:
    """Whether the CSV at ``path`` (``#`` comment lines skipped) has every ``required`` column
    in its header; False where it cannot be read."""
    try:
        with open(path, newline="") as f:
            header = next(csv.reader(line for line in f if not line.startswith("#")), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return all(c in header for c in required)


def read_csv(path: str, required: Sequence[str], what: str) -> list[dict[str, str]]:
    """The rows of a benchmark CSV (``#`` comment lines skipped).

    Raises:
        ValueError: the file cannot be read, has no rows, or lacks a ``required`` column; the
            message says which and that ``what`` writes such files.
    """
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(line for line in f if not line.startswith("#"))
            rows = list(reader)
            columns = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(
            f"{path} is not a CSV of {what}: it has no column {', '.join(map(repr, missing))}"
        )
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows
