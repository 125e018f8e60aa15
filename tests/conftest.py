"""Shared fixtures. The kernel tests need Triton's interpreter set up before anything imports
Triton (torch.compile does), and a `device`: CUDA if present, else the CPU under the interpreter."""

from __future__ import annotations

import pytest
import torch

from batchnorm import ops

# Triton builds its own helpers for the interpreter only if TRITON_INTERPRET is set when it is
# first imported: do that now, at collection, before any test can import it (torch.compile does).
if not torch.cuda.is_available():
    ops.load_interpreter()


@pytest.fixture(scope="module")
def device():
    """The device: CUDA with a GPU, else the CPU under the Triton interpreter (TRITON_INTERPRET=1
    for this module's tests only)."""
    if torch.cuda.is_available():
        yield "cuda"
        return
    ok, reason = ops.load_interpreter()
    if not ok:
        if "not installed" in reason:
            pytest.skip(reason)
        pytest.fail(reason)  # a test-setup problem: never let it pass as a skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield "cpu"


@pytest.fixture
def lab_quiet(monkeypatch: pytest.MonkeyPatch):
    """For the lab's tests (``pytestmark = pytest.mark.usefixtures("lab_quiet")``): no progress
    bars, and torch's thread count, which a run sets, restored afterwards."""
    monkeypatch.setenv("BATCHNORM_PROGRESS", "0")
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cpu_kernels():
    """For the C++ kernels' tests (``pytestmark = pytest.mark.usefixtures("cpu_kernels")``):
    build (or load) them once; skip only when this machine cannot build them (no compiler or
    ninja), fail when a compiler is present and the build fails."""
    from batchnorm.ops import cpu

    ok, reason = cpu.status()
    if not ok:
        pytest.skip(f"the C++ CPU kernels cannot be built here: {reason}")
    if cpu.load() is None:
        pytest.fail(f"the C++ CPU kernels failed to build: {cpu.status()[1]}")
