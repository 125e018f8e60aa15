"""Writing files so that an interrupted write leaves nothing half-written, and reading back only
files that are what was written.

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

Checked files (checkpoints, finished jobs, the decoded data cache) carry the SHA-256 of their
bytes beside them, in ``<name>.sha256`` (the format of ``sha256sum``, so ``sha256sum -c`` checks
one by hand). :func:`read_checked` returns the bytes only if they match; an empty, truncated or
corrupted file, or one without its checksum, raises :class:`CorruptFileError`. The checksum is
written before the file and lists the previous file's checksum too until the new file is in
place, so a process killed between the two renames leaves a pair that still verifies.

    >>> atomic_write_checked(d / "b.bin", b"payload")
    >>> read_checked(d / "b.bin")
    b'payload'
    >>> _ = (d / "b.bin").write_bytes(b"paylaod")
    >>> read_checked(d / "b.bin")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    batchnorm.lab.io.CorruptFileError: ...b.bin does not match its checksum (...)
    >>> import shutil
    >>> shutil.rmtree(d)  # the example's folder

A process killed outright (SIGKILL, power loss) can leave a temporary file behind; its name holds
the writer's process id, and :func:`remove_stale_temporaries` deletes those of processes that are
gone.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from batchnorm._atomic import (
    atomic_write_csv,
    atomic_writer,
    process_alive,
    remove_stale_temporaries,
)

__all__ = [
    "CorruptFileError",
    "atomic_writer",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_write_csv",
    "to_jsonable",
    "checksum_path",
    "atomic_write_checked",
    "read_checked",
    "write_checked_json",
    "read_checked_json",
    "remove_checked",
    "process_alive",
    "remove_stale_temporaries",
]

CHECKSUM_SUFFIX = ".sha256"


class CorruptFileError(ValueError):
    """A checked file is empty, truncated, corrupted or has no checksum beside it.

    Attributes:
        path: the file.
        reason: what is wrong, e.g. "is empty".
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path} {reason}")


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


# --------------------------------------------------------------------------------------------
# Checked files: the SHA-256 of the bytes beside them


def checksum_path(path: str | os.PathLike[str]) -> Path:
    """Where the checksum of ``path`` is kept: ``<path>.sha256``."""
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _recorded_sums(path: Path) -> list[str]:
    """The checksums listed for ``path`` (sha256sum lines "<hex>  <name>"); [] if none."""
    try:
        text = checksum_path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        return []
    sums = []
    for line in text.splitlines():
        digest = line.split(" ", 1)[0].strip().lower()
        if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
            sums.append(digest)
    return sums


def _write_sums(path: Path, sums: Sequence[str]) -> None:
    atomic_write_text(checksum_path(path), "".join(f"{s}  {path.name}\n" for s in sums))


def atomic_write_checked(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with its SHA-256 in ``<path>.sha256``.

    The order makes every moment verifiable: the checksum file first lists the new and the
    current file's checksum, then the file is replaced, then the checksum file keeps only the new
    one.
    """
    path = Path(path)
    digest = _sha256(data)
    previous = _recorded_sums(path)[:1] if path.is_file() else []
    _write_sums(path, [digest, *(s for s in previous if s != digest)])
    atomic_write_bytes(path, data)
    if previous and previous != [digest]:
        _write_sums(path, [digest])


def read_checked(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a file written by :func:`atomic_write_checked`, verified.

    Raises:
        FileNotFoundError: there is no file.
        CorruptFileError: it is empty, has no checksum beside it, or does not match it.
    """
    path = Path(path)
    data = path.read_bytes()
    if not data:
        raise CorruptFileError(path, "is empty")
    sums = _recorded_sums(path)
    if not sums:
        raise CorruptFileError(
            path, f"has no checksum beside it ({checksum_path(path).name} is missing or unreadable)"
        )
    if _sha256(data) not in sums:
        raise CorruptFileError(
            path,
            f"does not match its checksum ({len(data)} bytes; corrupted or truncated since it "
            "was written)",
        )
    return data


def write_checked_json(path: str | os.PathLike[str], value: Any) -> None:
    """:func:`atomic_write_json`, with the checksum of :func:`atomic_write_checked`."""
    text = json.dumps(to_jsonable(value), indent=2, allow_nan=False) + "\n"
    atomic_write_checked(path, text.encode("utf-8"))


def read_checked_json(path: str | os.PathLike[str]) -> Any:
    """The value of a file written by :func:`write_checked_json`, verified.

    Raises:
        CorruptFileError: see :func:`read_checked`, or the bytes are not JSON.
    """
    data = read_checked(path)
    try:
        return json.loads(data.decode("utf-8"))
    except ValueError as exc:
        raise CorruptFileError(path, f"is not valid JSON ({exc})") from None


def remove_checked(path: str | os.PathLike[str]) -> bool:
    """Delete a checked file and its checksum; whether the file existed."""
    path = Path(path)
    existed = path.exists()
    path.unlink(missing_ok=True)
    checksum_path(path).unlink(missing_ok=True)
    return existed
