"""Writing a file so that an interrupted write leaves nothing half-written: the one mechanism
of every file the package writes (the lab's records and caches through :mod:`batchnorm.lab.io`,
the benchmarks' CSVs and plots), and the one CSV writer of both. No torch import: the lowest
layer may use it.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_writer(d / "a.txt", "w") as f:
    ...     _ = f.write("hello")
    >>> (d / "a.txt").read_text(), sorted(p.name for p in d.iterdir())
    ('hello', ['a.txt'])
    >>> import shutil; shutil.rmtree(d)
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_write_csv",
    "atomic_writer",
    "process_alive",
    "remove_stale_temporaries",
    "writer_pid",
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
    # The process id in the name lets remove_stale_temporaries() tell a dead writer's leftovers
    # from a live writer's file. The name is chosen before the file exists and the file is
    # created inside the try, so an exception raised by a signal handler at any point (SIGTERM
    # turned into an interruption) still removes it.
    tmp_name = ""
    fd = -1
    f: IO[Any] | None = None
    try:
        while True:
            # Named before it is created: an interruption right after the open still knows
            # what to remove.
            tmp_name = os.path.join(
                path.parent, f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            )
            try:
                fd = os.open(tmp_name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                tmp_name = ""
                continue
            break
        f = os.fdopen(fd, mode, **({"encoding": "utf-8", "newline": ""} if mode == "w" else {}))
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # The file is created 0600; give it the mode an ordinary open() would have.
        os.chmod(tmp_name, 0o666 & ~_umask())
        os.replace(tmp_name, path)
        # path is whole now: temporaries of it left by killed writers are debris
        with contextlib.suppress(OSError):
            remove_stale_temporaries(path.parent, of=path.name)
    except BaseException:
        # KeyboardInterrupt included: the destination must never see a partial file.
        with contextlib.suppress(OSError):
            if f is not None:
                f.close()
            elif fd >= 0:
                os.close(fd)
        if tmp_name:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_csv(
    path: str | os.PathLike[str],
    rows: Iterable[Mapping[str, Any]],
    fieldnames: Sequence[str],
    preamble: Iterable[str] = (),
) -> None:
    """Dict rows as CSV under a header of ``fieldnames``, after a ``# line`` comment for each of
    ``preamble``, written atomically. A missing key leaves its cell empty, a key not in
    ``fieldnames`` raises ValueError (before anything is written); non-finite floats are written
    ``nan``, ``inf``, ``-inf``, and NumPy or torch scalars as their Python values.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> rows = [{"x": 1.5, "y": float("inf")}]
        >>> atomic_write_csv(d / "a.csv", rows, ["x", "y"], ["cpu: test"])
        >>> print((d / "a.csv").read_text(), end="")
        # cpu: test
        x,y
        1.5,inf
        >>> import shutil; shutil.rmtree(d)
    """
    rows = [{key: _csv_cell(value) for key, value in row.items()} for row in rows]
    fieldnames = list(fieldnames)
    extra = sorted({key for row in rows for key in row} - set(fieldnames))
    if extra:
        raise ValueError(f"CSV rows have keys not among the columns {fieldnames}: {extra}")
    with atomic_writer(path, "w") as f:
        for line in preamble:
            f.write(f"# {line}\n")
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)


def _csv_cell(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if hasattr(value, "item"):
        return value.item()
    return value


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (one of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:  # pragma: no cover - e.g. a platform without signals
        return True
    return True


def writer_pid(name: str) -> int | None:
    """The process id in a temporary name ``.<file>.<pid>.<random>.tmp`` or ``<prefix>-<pid>-*``.

    >>> writer_pid(".fig1.ckpt.4242.abc123.tmp"), writer_pid("batchnorm-npm-4242-xyz")
    (4242, 4242)
    >>> writer_pid("report.md") is None
    True
    """
    if name.startswith(".") and name.endswith(".tmp"):
        parts = name[1:-4].split(".")
        candidates = parts[-2:-1]
    elif name.startswith("batchnorm-"):
        candidates = name.split("-")[2:3]
    else:
        return None
    return int(candidates[0]) if candidates and candidates[0].isdigit() else None


def remove_stale_temporaries(
    folder: str | os.PathLike[str],
    *,
    prefixes: Sequence[str] = (),
    own: bool = False,
    of: str | None = None,
) -> list[Path]:
    """Delete the temporary files (and, for ``prefixes``, folders) in ``folder`` whose writer
    process is gone; returns what was removed.

    Args:
        folder: where to look (not recursive).
        prefixes: names of temporary folders to consider too, e.g. ``("batchnorm-npm-",)``.
        own: also delete this process's own temporaries: for a caller that knows none of its
            writes is still under way (a run unwinding after an interruption).
        of: only the temporary files of this file name (``.<of>.<pid>.<random>.tmp``), as the
            atomic writer clears after replacing it.
    """
    import shutil

    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        name = entry.name
        is_file = name.startswith(".") and name.endswith(".tmp")
        if of is not None:  # the file's own: exactly ".<of>.<pid>.<random>.tmp"
            is_file = is_file and name[: -len(".tmp")].rsplit(".", 2)[0] == f".{of}"
        is_dir = of is None and any(name.startswith(p) for p in prefixes)
        if not (is_file or is_dir):
            continue
        pid = writer_pid(name)
        if pid is None or (pid == os.getpid() and not own):
            continue
        if pid != os.getpid() and process_alive(pid):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed
