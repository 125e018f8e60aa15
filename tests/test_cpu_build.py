"""The C++ kernels' build cache under faults: a build killed midway, two processes at once, a
cache that cannot be written, a damaged library. None of them may hang a process or end in a
traceback; the kernels load where a finished build exists and fall back visibly where not."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

from batchnorm import backends
from batchnorm.functional import batch_norm
from batchnorm.ops import cpu
from batchnorm.ops.cpu import _build

pytestmark = pytest.mark.skipif(cpu.load() is None, reason="the C++ kernels cannot build here")

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A process state in which nothing was loaded, with the cache under tmp_path."""
    monkeypatch.setattr(_build, "_module", None)
    monkeypatch.setattr(_build, "_error", None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    return tmp_path / _build.module_name()


def _copy_finished_build(cache: Path) -> Path:
    """The finished build of this process copied into ``cache`` (library and ninja's log)."""
    source = _build.cache_root() / _build.module_name()
    folder = cache / _build.module_name()
    folder.mkdir(parents=True)
    for name in (f"{_build.module_name()}.so", ".ninja_log"):
        shutil.copy2(source / name, folder / name)
    return folder


def _load_in_a_new_process(cache: Path, timeout: float = 120) -> str:
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(cache), "PYTHONPATH": str(SRC)}
    code = (
        "from batchnorm.ops.cpu import _build\n"
        "module = _build.load()\n"
        "print(module.__file__ if module is not None else _build.status()[1])\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.strip() + run.stderr


def _fake_builder(monkeypatch, calls: list[str]) -> None:
    """torch's builder replaced by one that records the folder and compiles nothing."""

    def build(*, build_directory, **_):
        calls.append(build_directory)
        assert not (Path(build_directory) / "lock").exists(), "a stale lock file was kept"
        return types.SimpleNamespace(set_cache_limit=lambda limit: None)

    monkeypatch.setattr(torch.utils.cpp_extension, "load", build)


@pytest.mark.skipif(sys.platform != "linux", reason="the cached library is a Linux .so here")
def test_finished_build_loads_despite_a_stale_lock_file(tmp_path):
    """A finished build whose folder holds the lock file of a process killed mid-build (torch's
    builder would wait on it forever) is imported as it is, without a build step: the lock
    file is neither waited on nor needed, so a read-only cache built ahead of time works too."""
    folder = _copy_finished_build(tmp_path)
    (folder / "lock").touch()
    start = time.perf_counter()
    out = _load_in_a_new_process(tmp_path, timeout=60)
    assert out.startswith(str(folder)), out
    assert "compiling" not in out
    assert time.perf_counter() - start < 60
    assert not (folder / "build.lock").exists()  # no build was started


def test_unfinished_build_with_a_stale_lock_file_is_built_again(fresh, monkeypatch, capsys):
    """A folder whose library never made it into ninja's log (the build was killed) is built
    again, and the lock file that the killed build left is removed, with a message."""
    fresh.mkdir(parents=True)
    (fresh / f"{_build.module_name()}.so").write_bytes(b"\x7fELF cut short")
    (fresh / "lock").touch()
    calls: list[str] = []
    _fake_builder(monkeypatch, calls)
    assert _build.load() is not None
    assert calls == [str(fresh)]
    err = capsys.readouterr().err
    assert "left by a build of the C++ CPU kernels that was interrupted" in err
    assert "compiling the C++ CPU kernels" in err


@pytest.mark.skipif(
    not Path("/proc/self/cwd").exists() or shutil.which("sleep") is None, reason="needs /proc"
)
def test_compiler_of_a_killed_build_is_waited_for(fresh, monkeypatch, capsys):
    """The compiler and ninja of a killed build run on (they work in the build folder): the
    next build starts only once they have ended, so that two compilers never write the same
    object file at once."""
    fresh.mkdir(parents=True)
    (fresh / "lock").touch()
    ninja = fresh.parent / "bin" / "ninja"  # `sleep` under ninja's name: the left-over build
    ninja.parent.mkdir()
    ninja.symlink_to(shutil.which("sleep"))
    orphan = subprocess.Popen([str(ninja), "1.5"], cwd=fresh)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=fresh)
    seen: list[object] = []

    def build(*, build_directory, **_):
        seen.append(orphan.poll())
        return types.SimpleNamespace(set_cache_limit=lambda limit: None)

    monkeypatch.setattr(torch.utils.cpp_extension, "load", build)
    try:
        assert _build.load() is not None
    finally:
        for process in (orphan, bystander):
            process.kill()
            process.wait()
    assert seen == [0], "the build started while the interrupted one's ninja still ran"
    err = capsys.readouterr().err
    assert f"processes {orphan.pid})" in err  # the shell-like bystander is not waited for


def test_env_never_builds_a_cut_short_library(fresh, monkeypatch, capsys):
    """`batchnorm env` loads a finished build but never starts one: a library that a killed
    build left unlogged is reported as to be compiled, and nothing is compiled."""
    from batchnorm.cli import main

    fresh.mkdir(parents=True)
    (fresh / f"{_build.module_name()}.so").write_bytes(b"\x7fELF cut short")
    calls: list[str] = []
    _fake_builder(monkeypatch, calls)
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert calls == [] and "compile on first use" in out and "cpu walk" not in out


def test_damaged_library_is_built_again(fresh, monkeypatch):
    """A library that ninja logged but that cannot be imported (damaged, truncated later) is
    handed to the builder again rather than raising ImportError at the first batch norm."""
    folder = fresh
    folder.mkdir(parents=True)
    name = f"{_build.module_name()}.so"
    (folder / name).write_bytes(b"not a shared library")
    (folder / ".ninja_log").write_text(f"# ninja log v5\n0\t1\t2\t{name}\tabc\n")
    assert _build._finished_binary() == folder / name
    calls: list[str] = []
    _fake_builder(monkeypatch, calls)
    assert _build.load() is not None
    assert calls == [str(folder)]


def test_a_build_in_progress_is_waited_for(fresh, monkeypatch, capsys):
    """While another process holds the folder's build lock, load() waits (and says so), then
    builds only after the lock is released; the wait ends when the holder ends."""
    fresh.mkdir(parents=True)
    calls: list[str] = []
    _fake_builder(monkeypatch, calls)
    with open(fresh / "build.lock", "a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        waiter = threading.Thread(target=_build.load, daemon=True)
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive() and calls == []
        fcntl.flock(holder, fcntl.LOCK_UN)
    waiter.join(timeout=30)
    assert not waiter.is_alive() and calls == [str(fresh)]
    assert "waiting for another process that is compiling" in capsys.readouterr().err


def test_unwritable_cache_falls_back_visibly(fresh, monkeypatch, tmp_path):
    """A cache folder that cannot be created (here: under a file) is a clear status and a
    visible fallback to torch's kernel with the remedy, never a traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(blocker / "ext"))
    ok, reason = cpu.status()
    assert not ok and "not a folder" in reason and "TORCH_EXTENSIONS_DIR" in reason
    backends._warned.clear()
    x = torch.randn(6, 3)
    with pytest.warns(RuntimeWarning, match="set TORCH_EXTENSIONS_DIR to a writable folder"):
        y = batch_norm(x, None, None, training=True, backend="cpu")
    assert backends.last_backend() == "torch"
    assert torch.equal(y, torch.nn.functional.batch_norm(x, None, None, training=True))


def test_cache_that_fails_when_written_falls_back_visibly(fresh, monkeypatch):
    """An error from the file system while the build starts (a full disk, a read-only mount)
    becomes the status' reason and load() returns None."""

    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert _build.load() is None
    ok, reason = _build.status()
    assert not ok and "Read-only file system" in reason and "TORCH_EXTENSIONS_DIR" in reason
