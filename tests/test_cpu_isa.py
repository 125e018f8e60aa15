"""The C++ CPU kernels built as other variants than the one this machine runs.

The extension is compiled for the vector instruction set torch itself selected (AVX512 here,
AVX2 or none elsewhere), so a machine runs one variant only; the others differ in vector width,
in masked loads and in whether ``at::vec::fmadd`` is a fused multiply-add. Each variant below the
machine's own is built in a subprocess (``ATEN_CPU_CAPABILITY``, about half a minute each, then
cached) and runs the reference catalogue, the short-row tails, the fused kernels' bitwise
equality with the composition and the streaming stores' bitwise equality with plain ones.

The kernels leave their outputs and per-channel scratch uninitialized where every value is
written before it is read; a build with ``BATCHNORM_CPU_POISON=1`` fills them with NaN instead,
and runs the kernels' whole tests: a value read before it is written, or never written, fails
them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from batchnorm.ops import cpu

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["default", "avx2", "avx512"]
SELECTION = (
    "catalogue_float32 or planar_channel_blocks or far_from_their_centre or large_mean "
    "or layouts or eval_backward or fused_equals_the_composition or gradients_reach "
    "or every_row_tail_length or streaming_stores or planar_rows_under or flat_output_pass "
    "or many_channels"
)


def _lower_capabilities() -> list[str]:
    own = torch.backends.cpu.get_cpu_capability().lower()
    return ORDER[: ORDER.index(own)] if own in ORDER else []


TESTS = ["tests/test_cpu_kernels.py", "tests/test_cpu_fused.py", "tests/test_cpu_autograd.py"]


def _tests_in_variant(env: dict[str, str], selection: list[str], probe: str) -> str:
    """Runs the kernels' tests (``selection``: pytest's -k, or none) in a subprocess with
    ``env`` (whose build is compiled there, then cached) and returns what ``probe``, a line of
    Python run the same way, prints."""
    ok, reason = cpu.status()
    if not ok:
        pytest.skip(f"the C++ CPU kernels cannot be built here: {reason}")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS, *selection],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    tail = (run.stdout + run.stderr)[-3000:]
    assert run.returncode == 0, tail
    assert " passed" in tail and " failed" not in tail, tail
    answer = subprocess.run(
        [sys.executable, "-c", f"from batchnorm.ops import cpu; print({probe})"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert answer.returncode == 0, answer.stderr
    return answer.stdout.strip()


@pytest.mark.parametrize("capability", _lower_capabilities())
def test_kernels_built_for_another_instruction_set(capability):
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    built = _tests_in_variant(env, ["-k", SELECTION], "cpu.load().capability()")
    assert built == capability.upper()


def test_kernels_with_poisoned_outputs_and_scratch():
    env = dict(os.environ, BATCHNORM_CPU_POISON="1")
    assert _tests_in_variant(env, [], "cpu.load().scratch_poisoned()") == "True"
