"""Compiling the C++ kernels once, on first use, into a cache shared by later processes.

The extension is built by ``torch.utils.cpp_extension.load`` (ninja and a C++ compiler) into
``$TORCH_EXTENSIONS_DIR`` if set, else ``~/.cache/batchnorm/ext``, under a name keyed by the
torch version, the source's hash and the vector instruction set. The instruction set follows
torch's own runtime CPU check (``torch.backends.cpu.get_cpu_capability()``, which also honours
``ATEN_CPU_CAPABILITY``): ATen's vector types are compiled for AVX512 or AVX2 (``-mavx512f ...``,
``-mavx2 -mfma``, with ATen's ``CPU_CAPABILITY`` macros) only where torch itself selected that
instruction set at run time, else with the default flags; never ``-march=native``. The
instruction set is part of the name, so a cached binary never runs on a machine that lacks its
instructions (two machines sharing a cache build one binary each).

A finished build (one that ninja logged) is imported directly. A build holds ``build.lock`` in
its folder, which the system releases when the process ends however it ends: processes that
start together build once, and a lock file left by torch's builder in a process that was
killed is removed rather than waited on forever (once that build's compiler, which outlives
it, has ended). A cache that cannot be written is a status with its remedy
(``TORCH_EXTENSIONS_DIR``) and a visible fallback to torch's kernel.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("batch_norm.cpp")

# ATen's vector code for AVX2 is selected by these macros (as in torch's own per-ISA builds).
_ISA_FLAGS = {
    "AVX512": [
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mfma",
        "-mf16c",
        "-DCPU_CAPABILITY=AVX512",
        "-DCPU_CAPABILITY_AVX512",
    ],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "DEFAULT": [],
}

_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None


def isa() -> str:
    """The instruction set to compile for: "AVX2" where torch's runtime check allows it."""
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        capability = "DEFAULT"
    return capability if capability in _ISA_FLAGS else "DEFAULT"


def cache_root() -> Path:
    """Where built extensions live: $TORCH_EXTENSIONS_DIR, else ~/.cache/batchnorm/ext."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(env) if env else Path.home() / ".cache" / "batchnorm" / "ext"


def _torch_uses_openmp() -> bool:
    """Whether torch's intra-op thread pool is OpenMP (the Linux wheels): ATen's parallel_for is
    then a header-only ``#pragma omp parallel``, which runs on one thread unless the extension
    itself is compiled with OpenMP."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


# Every build: -fno-math-errno lets the compiler vectorize the per-channel square roots (the
# kernels never read errno; the results are the same, sqrt being correctly rounded either way).
_BASE_FLAGS = ["-O3", "-std=c++17", "-fno-math-errno"]

POISON_ENV = "BATCHNORM_CPU_POISON"


def _debug_flags() -> list[str]:
    """``$BATCHNORM_CPU_POISON=1``: a build (of its own name) whose outputs and per-channel
    scratch start as NaN rather than uninitialized, so that a test sees any value read before it
    is written, or never written (slower; for the tests)."""
    return ["-DBN_POISON_SCRATCH"] if os.environ.get(POISON_ENV) == "1" else []


def _name(flags: list[str]) -> str:
    digest = hashlib.sha256()
    digest.update(SOURCE.read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(" ".join([*_BASE_FLAGS, *_debug_flags(), *_ISA_FLAGS[isa()], *flags]).encode())
    return f"batchnorm_cpu_{isa().lower()}_{digest.hexdigest()[:12]}"


def _compiles_openmp() -> bool:
    """Whether the C++ compiler builds and links an OpenMP program (gcc and clang do, given
    their OpenMP runtime's development files)."""
    compiler = _compiler()
    if compiler is None:
        return False
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "probe.cpp"
        source.write_text(
            "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
        )
        try:
            run = subprocess.run(
                [compiler, "-fopenmp", str(source), "-o", str(Path(folder) / "probe")],
                capture_output=True,
                timeout=120,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return run.returncode == 0


@functools.cache
def openmp_flags() -> tuple[str, ...]:
    """``("-fopenmp",)`` when the kernels are built with OpenMP, so that ATen's parallel_for in
    them uses torch's own OpenMP thread pool (the runtime torch loaded: same library name);
    empty when torch does not use OpenMP, or when the compiler cannot build OpenMP code and no
    OpenMP build is cached (the kernels then run on one thread, and :func:`status` says so)."""
    if not _torch_uses_openmp():
        return ()
    flags = ["-fopenmp"]
    folder = cache_root() / _name(flags)
    if any(folder.glob(f"{_name(flags)}*.so")) or _compiles_openmp():
        return tuple(flags)
    return ()


def thread_use() -> str:
    """How the kernels use threads, for :func:`status` and ``batchnorm env``."""
    if openmp_flags() or not _torch_uses_openmp():
        return "torch's thread pool"
    return "one thread: the compiler cannot build OpenMP code"


@functools.cache
def module_name() -> str:
    """The extension's name: torch version, source hash, instruction set and OpenMP."""
    return _name(list(openmp_flags()))


def build_dir() -> Path:
    """The folder holding this build of the extension."""
    return cache_root() / module_name()


def _compiler() -> str | None:
    # torch.utils.cpp_extension compiles with $CXX, else c++: look for exactly that one.
    return shutil.which(os.environ.get("CXX") or "c++")


def _cached_binary() -> Path | None:
    folder = build_dir()
    if not folder.is_dir():
        return None
    found = sorted(folder.glob(f"{module_name()}*.so")) + sorted(folder.glob("*.pyd"))
    return found[0] if found else None


def _finished_binary() -> Path | None:
    """The cached binary if its build ran to the end: ninja logs an output only once the command
    that wrote it has finished, so a library cut short (a build killed while linking) is not
    taken for a finished one."""
    binary = _cached_binary()
    if binary is None or binary.stat().st_size == 0:
        return None
    try:
        log = (binary.parent / ".ninja_log").read_text(errors="replace")
    except OSError:
        return None
    logged = {fields[3] for fields in (line.split("\t") for line in log.splitlines())
              if len(fields) >= 4}  # fmt: skip
    return binary if binary.name in logged else None


def _import_binary(binary: Path) -> ModuleType | None:
    """The finished build imported as it is: no ninja run and no lock file, so a cache that is
    read-only (built ahead of time) or holds a lock left by a killed process still loads."""
    spec = importlib.util.spec_from_file_location(module_name(), binary)
    if spec is None or spec.loader is None:
        return None
    try:
        module = importlib.util.module_from_spec(spec)  # dlopen: a damaged file fails here
        spec.loader.exec_module(module)
    except (ImportError, OSError):
        return None  # damaged, or built against another torch: built again
    return module


def _unwritable(folder: Path) -> str | None:
    """Why ``folder`` cannot be created or written to (None when it can)."""
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def status() -> tuple[bool, str]:
    """Whether the kernels can run here, and how (loaded, cached, or to be compiled); never builds.

    Returns:
        (ok, reason): ok is False when no compiler or ninja is found (and nothing is cached),
        or when an earlier build in this process failed.
    """
    if _module is not None:
        return True, f"C++ kernels ({isa()}, {thread_use()}) loaded from {build_dir()}"
    if _error is not None:
        return False, _error
    if _finished_binary() is not None:
        return True, f"C++ kernels ({isa()}, {thread_use()}) compiled and cached in {build_dir()}"
    problem = _unwritable(build_dir())
    if problem is not None:
        return False, _unwritable_message(problem)
    from torch.utils.cpp_extension import is_ninja_available

    compiler = _compiler()
    if compiler is None:
        return False, "no C++ compiler found (install g++ or set CXX) to build the C++ kernels"
    if not is_ninja_available():
        return False, "ninja is missing (pip install ninja) to build the C++ kernels"
    return True, (
        f"C++ kernels ({isa()}, {thread_use()}) compile on first use with {compiler} (about a "
        "minute, once), "
        f"cached in {build_dir()}"
    )


def ready() -> bool:
    """Whether the kernels are loaded, building or loading them now if not tried yet (fast)."""
    return _module is not None or (_error is None and load() is not None)


def _unwritable_message(problem: str) -> str:
    return (
        f"cannot build the C++ kernels into {build_dir()} ({problem}); set TORCH_EXTENSIONS_DIR "
        "to a writable folder"
    )


def load() -> ModuleType | None:
    """The compiled extension (building it if needed), or None if it cannot be built here.

    A finished build in the cache is imported as it is. A build holds a lock on its folder
    (``build.lock``, released by the system when the process ends, however it ends): another
    process waits for it and then imports what it built, and a lock file that torch's builder
    left behind when a process was killed mid-build is removed instead of waited on forever.

    After a failure, :func:`status` gives the reason and no further build is attempted in this
    process.
    """
    global _module, _error
    if _module is not None or _error is not None:
        return _module
    with _lock:
        if _module is not None or _error is not None:
            return _module
        module = _load_locked()
        if module is not None:
            module.set_cache_limit(cache_limit_from_env())
            _module = module
    return _module


def load_if_built() -> ModuleType | None:
    """The extension if it is loaded or a finished build is cached (imported then); never builds
    (for ``batchnorm env``, which must not start a minute-long compile)."""
    global _module
    with _lock:
        if _module is None and _error is None:
            binary = _finished_binary()
            module = _import_binary(binary) if binary is not None else None
            if module is not None:
                module.set_cache_limit(cache_limit_from_env())
                _module = module
    return _module


def _load_locked() -> ModuleType | None:
    global _error
    binary = _finished_binary()
    module = _import_binary(binary) if binary is not None else None
    if module is not None:
        return module
    ok, reason = status()
    if not ok:
        _error = reason
        return None
    folder = build_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _build_lock(folder):
            binary = _finished_binary()  # built by the process this one waited for
            module = _import_binary(binary) if binary is not None else None
            return module if module is not None else _build(folder)
    except OSError as exc:
        _error = _unwritable_message(exc.strerror or str(exc))
        return None


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """Holds an exclusive lock on ``folder/build.lock`` (where the system offers ``flock``).
    Every build of this folder holds it, so a torch lock file found under it was left by a
    build that was killed: it is removed, with a message, rather than waited on forever."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: torch's own lock file alone
        yield
        return
    with open(folder / "build.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                f"batchnorm: waiting for another process that is compiling the C++ CPU kernels "
                f"into {folder} ...",
                file=sys.stderr,
                flush=True,
            )
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = folder / "lock"
            if stale.exists():
                _wait_for_builders(folder)
                print(
                    f"batchnorm: removing {stale}, left by a build of the C++ CPU kernels that "
                    "was interrupted",
                    file=sys.stderr,
                    flush=True,
                )
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_build_tool(command: str) -> bool:
    """Whether a process name is ninja's, a compiler's, the assembler's or the linker's."""
    return command in ("ninja", "cc1plus", "cc1", "as", "ld", "collect2") or command.startswith(
        ("c++", "g++", "gcc", "clang", "x86_64-linux-gnu-", "aarch64-linux-gnu-")
    )


def _builders_in(folder: Path) -> list[int]:
    """Build tools working in ``folder``: ninja and the compiler run there, and outlive a
    process that was killed while they ran (Linux, from /proc; elsewhere none are seen). Other
    processes there (a shell someone left in the folder) are not waited for."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    target = os.path.realpath(folder)
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if os.readlink(entry / "cwd") == target and _is_build_tool(
                (entry / "comm").read_text().strip()
            ):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or another user's
            continue
    return found


BUILDERS_WAIT_S = 900.0


def _wait_for_builders(folder: Path) -> None:
    """Waits (at most BUILDERS_WAIT_S) until the compiler and ninja of an interrupted build
    have ended, so that two compilers never write the same object file."""
    deadline = time.monotonic() + BUILDERS_WAIT_S
    builders = _builders_in(folder)
    if builders:
        print(
            f"batchnorm: waiting for the compiler of an interrupted build in {folder} to end "
            f"(processes {', '.join(map(str, builders))}) ...",
            file=sys.stderr,
            flush=True,
        )
    while builders and time.monotonic() < deadline:
        time.sleep(0.2)
        builders = _builders_in(folder)


def _build(folder: Path) -> ModuleType | None:
    global _error
    from torch.utils.cpp_extension import load as load_extension

    print(
        f"batchnorm: compiling the C++ CPU kernels ({isa()}) once into {folder} ...",
        file=sys.stderr,
        flush=True,
    )
    try:
        return load_extension(
            name=module_name(),
            sources=[str(SOURCE)],
            extra_cflags=[*_BASE_FLAGS, *_debug_flags(), *_ISA_FLAGS[isa()], *openmp_flags()],
            extra_ldflags=list(openmp_flags()),
            build_directory=str(folder),
            verbose=False,
        )
    except Exception as exc:  # a failed build falls back to torch's kernel, visibly
        lines = [line for line in str(exc).splitlines() if line.strip()]
        _error = f"the C++ kernels failed to build ({lines[-1] if lines else exc})"
        return None


CACHE_ENV = "BATCHNORM_CPU_CACHE_MB"
DEFAULT_CACHE_MB = 256


def cache_limit_from_env() -> int:
    """The output block cache's limit in bytes: ``$BATCHNORM_CPU_CACHE_MB`` megabytes (0 turns
    the cache off), else 256 MB; a value that is not a number >= 0 warns and keeps the default."""
    text = os.environ.get(CACHE_ENV, "").strip()
    if not text:
        return DEFAULT_CACHE_MB << 20
    try:
        megabytes = float(text)
        if not megabytes >= 0 or megabytes == float("inf"):
            raise ValueError
    except ValueError:
        warnings.warn(
            f"{CACHE_ENV}={text!r} is not a number of megabytes >= 0; using the default "
            f"{DEFAULT_CACHE_MB} (set it to e.g. 512, or 0 to turn the output cache off)",
            RuntimeWarning,
            stacklevel=3,
        )
        return DEFAULT_CACHE_MB << 20
    return int(megabytes * (1 << 20))
