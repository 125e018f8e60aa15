"""Writing files so that an interrupted write leaves nothing half-written.

Every file the lab produces (downloaded data, caches, run records) goes through
:func:`atomic_writer`: the bytes go to a temporary file in the destination's own directory (so the
final rename never crosses a file system), are flushed and fsync'ed, and only then
``os.replace`` puts the file in place, which is atomic on POSIX and Windows. If anything fails
before that, the temporary file is removed and the destination is untouched.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> atomic_write_text(d / "a.txt", "hello")
    >>> (d / "a.txt").read_text()
    'hello'
    >>> sorted(p.name for p in d.iterdir())  # no temporary file left behind
    ['a.txt']
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_writer",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_write_csv",
    "to_jsonable",
]


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on a clean exit it replaces ``path`` atomically.

    Args:
        path: the destination.
        mode: "wb" (bytes) or "w" (text, UTF-8).

    Yields:
        The open temporary file.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(
            fd, mode, **({"encoding": "utf-8", "newline": ""} if mode == "w" else {})
        ) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file 0600; give it the mode an ordinary open() would have.
        os.chmod(tmp_name, 0o666 & ~_umask())
        os.replace(tmp_name, path)
    except BaseException:
        # KeyboardInterrupt included: the destination must never see a partial file.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_writer(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_writer(path, "w") as f:
        f.write(text)


def to_jsonable(value: Any) -> Any:
    """Convert NumPy scalars/arrays, tuples, paths and non-finite floats to plain JSON values.

    NaN and infinities become None (JSON has no spelling for them), so a diverged run still
    writes valid JSON.

    >>> import numpy as np
    >>> to_jsonable({"a": np.float32(0.5), "b": (1, np.int64(2)), "c": float("nan")})
    {'a': 0.5, 'b': [1, 2], 'c': None}
    """
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if hasattr(value, "tolist"):  # NumPy scalars and arrays, torch tensors
        return to_jsonable(value.tolist())
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)


def atomic_write_json(path: str | os.PathLike[str], value: Any) -> None:
    """Write ``value`` as indented JSON, atomically (see :func:`to_jsonable`)."""
    atomic_write_text(path, json.dumps(to_jsonable(value), indent=2, allow_nan=False) + "\n")


def atomic_write_csv(
    path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]], fieldnames: Sequence[str]
) -> None:
    """Write dict rows as CSV with a header, atomically. Missing keys are left empty."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fieldnames), extrasaction="raise")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


def _csv_cell(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if hasattr(value, "item"):
        return value.item()
    return value
