"""One process at a time in a run directory: a lock file holding the owner's process id.

:func:`lock_run_dir` takes an exclusive ``fcntl.flock`` on ``<run dir>/LOCK`` and writes the
process id and start time into it; the lock goes with the process (the kernel drops it when the
process ends, however it ends), so a lock file left by a killed process is taken over, with a
note naming that process. A live owner makes :func:`lock_run_dir` raise :class:`RunLockedError`.
Where ``fcntl`` is missing (Windows), the file is created with ``O_EXCL`` and a left-over one
is taken over when its process is gone.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with lock_run_dir(d):
    ...     (d / LOCK_FILE).is_file()
    True
    >>> (d / LOCK_FILE).exists()  # released
    False
    >>> import shutil
    >>> shutil.rmtree(d)  # the example's folder
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
from collections.abc import Iterator
from pathlib import Path

from batchnorm.lab.io import process_alive
from batchnorm.lab.progress import log

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_FILE", "RunLockedError", "lock_run_dir", "read_lock"]

LOCK_FILE = "LOCK"


class RunLockedError(RuntimeError):
    """Another live process works in the run directory."""


def read_lock(run_dir: str | os.PathLike[str]) -> dict:
    """What the lock file of ``run_dir`` says ({} if there is none or it is unreadable)."""
    try:
        value = json.loads((Path(run_dir) / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _refusal(run_dir: Path, owner: dict) -> RunLockedError:
    pid = owner.get("pid", "?")
    since = f" since {owner['started']}" if owner.get("started") else ""
    return RunLockedError(
        f"{run_dir} is in use by process {pid}{since}; wait for it to finish, or stop it "
        f"(kill {pid}) and resume then"
    )


def _note_takeover(run_dir: Path, previous: dict) -> None:
    if previous.get("pid") not in (None, os.getpid()):
        log(
            f"[lab] {run_dir}: taking over the lock of process {previous['pid']}, which is no "
            "longer running"
        )


def _record() -> bytes:
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return (json.dumps({"pid": os.getpid(), "started": started}) + "\n").encode()


@contextlib.contextmanager
def lock_run_dir(run_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Hold ``run_dir`` for this process for the duration of the block.

    Raises:
        RunLockedError: a live process holds it.
    """
    run_dir = Path(run_dir)
    path = run_dir / LOCK_FILE
    if fcntl is None:  # pragma: no cover - Windows
        with _exclusive_file_lock(run_dir, path):
            yield
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _refusal(run_dir, read_lock(run_dir)) from None
        # The holder before us may have removed the file between our open and our lock: then
        # we hold a lock on a file nobody else can see, and must start over.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        _note_takeover(run_dir, read_lock(run_dir))
        os.ftruncate(fd, 0)
        os.write(fd, _record())
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


@contextlib.contextmanager
def _exclusive_file_lock(run_dir: Path, path: Path) -> Iterator[None]:  # pragma: no cover
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            owner = read_lock(run_dir)
            if process_alive(int(owner.get("pid", 0) or 0)):
                raise _refusal(run_dir, owner) from None
            _note_takeover(run_dir, owner)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    else:
        raise _refusal(run_dir, read_lock(run_dir))
    try:
        os.write(fd, _record())
        os.close(fd)
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
