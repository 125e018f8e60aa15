"""The decoded data cache is verified and rebuilt when corrupt; a killed fetch's leftovers go.

Uses the tiny IDX data set of tests/test_lab_data.py in a private cache; nothing is downloaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from batchnorm.lab import data as data_module
from batchnorm.lab.data import load_dataset
from batchnorm.lab.io import checksum_path
from tests.test_lab_data import ARRAYS, TINY, write_files


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("BATCHNORM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("BATCHNORM_DATA_DIR", raising=False)
    monkeypatch.setenv("BATCHNORM_PROGRESS", "0")
    monkeypatch.setitem(data_module.SPECS, "tiny", TINY)
    return tmp_path


def _cached(tmp_path: Path) -> Path:
    """The IDX files in the cache folder and a decoded cache built from them."""
    write_files(tmp_path / "cache" / "tiny")
    assert load_dataset("tiny", download=False).source.startswith("cache (")  # the IDX files
    npz = tmp_path / "cache" / "tiny" / "tiny-decoded.npz"
    assert npz.is_file() and checksum_path(npz).is_file()
    assert load_dataset("tiny", download=False).source == f"cache ({npz})"  # the decoded cache
    return npz


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "flip-header", "truncate", "empty", "no-checksum"])
def test_a_damaged_decoded_cache_is_rebuilt_from_the_idx_files(
    damage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    npz = _cached(tmp_path)
    if damage == "flip":
        _flip(npz, len(npz.read_bytes()) // 2)  # inside the arrays' bytes
    elif damage == "flip-header":
        _flip(npz, 10)
    elif damage == "truncate":
        npz.write_bytes(npz.read_bytes()[:-100])
    elif damage == "empty":
        npz.write_bytes(b"")
    else:
        checksum_path(npz).unlink()
    capsys.readouterr()
    rebuilt = load_dataset("tiny", download=False)
    # Decoded anew from the IDX files (which verify against their known checksums).
    assert rebuilt.source.startswith("cache (") and str(npz) not in rebuilt.source
    assert "rebuilding it from the IDX files" in capsys.readouterr().err
    np.testing.assert_allclose(rebuilt.train_x * 255, ARRAYS["train_images"].reshape(12, 16))
    assert rebuilt.test_y.tolist() == ARRAYS["test_labels"].tolist()
    # ... and the cache is good again.
    assert load_dataset("tiny", download=False).source == f"cache ({npz})"


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(proc.stdout)


def test_a_killed_fetch_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_root))
    dead, alive = _dead_pid(), os.getppid()
    cache = tmp_path / "cache" / "tiny"
    cache.mkdir(parents=True)
    stale_file = cache / f".train-images-idx3-ubyte.{dead}.k2j3h4.tmp"
    live_file = cache / f".train-labels-idx1-ubyte.{alive}.a1b2c3.tmp"
    stale_dir = temp_root / f"batchnorm-npm-{dead}-x1y2z3"
    live_dir = temp_root / f"batchnorm-apt-{alive}-q9w8e7"
    other = temp_root / "someone-elses-folder"
    for folder in (stale_dir, live_dir, other):
        (folder / "package").mkdir(parents=True)
        (folder / "package" / "part.tgz").write_bytes(b"half")
    stale_file.write_bytes(b"half a file")
    live_file.write_bytes(b"being written")

    data = load_dataset("tiny", write_files(tmp_path / "mine"), download=False)
    assert data.train_x.shape == (12, 16)
    assert not stale_file.exists() and not stale_dir.exists()
    # A live process's temporaries and other folders are left alone.
    assert live_file.exists() and live_dir.exists() and other.exists()


def test_an_interrupted_npm_fetch_removes_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (or SIGTERM during a run, which the lab turns into the same exception) while a
    package manager downloads: its temporary folder goes at once."""
    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_root))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "npm").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "npm").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    seen: list[str] = []

    def interrupted(cmd, cwd, timeout):
        seen.extend(p.name for p in temp_root.iterdir())
        raise KeyboardInterrupt

    monkeypatch.setattr(data_module, "_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data_module.NpmSource("npm", remote=True).read(TINY)
    assert len(seen) == 1 and seen[0].startswith(f"batchnorm-npm-{os.getpid()}-")
    assert not list(temp_root.iterdir())
