"""The C++ CPU kernels built for the other instruction sets this machine can run.

The extension is compiled for the vector instruction set torch itself selected (AVX512 here,
AVX2 or none elsewhere), so a machine runs one variant only; the others differ in vector width,
in masked loads and in whether ``at::vec::fmadd`` is a fused multiply-add. Each variant below the
machine's own is built in a subprocess (``ATEN_CPU_CAPABILITY``, about half a minute each, then
cached) and runs the reference catalogue, the short-row tails, the fused kernels' bitwise
equality with the composition and the streaming stores' bitwise equality with plain ones.
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


@pytest.mark.parametrize("capability", _lower_capabilities())
def test_kernels_built_for_another_instruction_set(capability):
    ok, reason = cpu.status()
    if not ok:
        pytest.skip(f"the C++ CPU kernels cannot be built here: {reason}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    tests = ["tests/test_cpu_kernels.py", "tests/test_cpu_fused.py", "tests/test_cpu_autograd.py"]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests, "-k", SELECTION],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    tail = (run.stdout + run.stderr)[-3000:]
    assert run.returncode == 0, tail
    assert " passed" in tail and " failed" not in tail, tail
    probe = subprocess.run(
        [sys.executable, "-c", "from batchnorm.ops import cpu; print(cpu.load().capability())"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert probe.stdout.strip() == capability.upper(), probe.stderr
