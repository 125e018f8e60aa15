"""Progress bars (tqdm) and log lines for the lab, in one place.

Bars go to stderr. ``BATCHNORM_PROGRESS=0`` in the environment turns them off (log lines stay);
so does a missing tqdm, in which case a silent stand-in is used.
"""

from __future__ import annotations

import os
import sys
from typing import Any

__all__ = ["bar", "log", "progress_enabled"]


def progress_enabled() -> bool:
    """False when ``BATCHNORM_PROGRESS`` is 0/false/no/off."""
    return os.environ.get("BATCHNORM_PROGRESS", "1").strip().lower() not in (
        "0",
        "false",
        "no",
        "off",
    )


class _NoBar:
    """Stands in for tqdm when bars are off: accepts the calls the lab makes, shows nothing."""

    def __init__(self, iterable: Any = None, **kwargs: Any) -> None:
        self.iterable = iterable
        self.n = 0

    def __iter__(self) -> Any:
        return iter(self.iterable)

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        pass

    def set_description_str(self, text: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def bar(iterable: Any = None, **kwargs: Any) -> Any:
    """A tqdm bar on stderr (or a silent stand-in). Arguments as ``tqdm.tqdm``."""
    if not progress_enabled():
        return _NoBar(iterable, **kwargs)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a lab dependency
        return _NoBar(iterable, **kwargs)
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)


def log(message: str) -> None:
    """One line on stderr that does not break a running bar."""
    if progress_enabled():
        try:
            from tqdm.auto import tqdm

            tqdm.write(message, file=sys.stderr)
            return
        except ImportError:  # pragma: no cover
            pass
    print(message, file=sys.stderr, flush=True)
