"""The kernels compile for an H100 (sm_90) and load memory in 16-byte vectors, checked without a
GPU: Triton's compiler runs on the CPU (``python -m batchnorm.ops._aot``). The interpreter
accepts programs the compiler rejects, so this is the test that catches them.

It runs in a subprocess because kernels built for the interpreter (as the other test modules
build them) cannot be compiled.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

# Only look for Triton here: importing it would build it for the GPU in this process, and the
# other test modules need it built for the interpreter.
if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed", allow_module_level=True)


def test_kernels_compile_for_sm90_with_vector_loads():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset
    proc = subprocess.run(
        [sys.executable, "-m", "batchnorm.ops._aot", "--quick", "--json", "--arch", "90"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if proc.returncode == 3:
        pytest.skip(proc.stderr.strip())  # Triton without its NVIDIA backend
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    errors = [(r["label"], r["kernel"], r["error"]) for r in results if r["error"]]
    assert not errors, errors
    assert proc.returncode == 0, proc.stderr[-2000:]
    kernels = {r["kernel"] for r in results}
    assert kernels == {
        "fwd_stats_kernel",
        "fwd_combine_kernel",
        "fwd_apply_kernel",
        "bwd_reduce_kernel",
        "bwd_combine_kernel",
        "bwd_apply_kernel",
    }
    # Both layouts of an aligned shape: every pass over the data uses 16-byte loads and stores.
    for r in results:
        if r["kernel"].endswith("combine_kernel"):
            continue  # per-channel vectors only
        ops = r["memory_ops"]
        assert ops.get("ld.global.v4.b32", 0) > 0, (r["label"], r["kernel"], ops)
        # at most one scalar 2-byte load: the channel's pivot K (statistics kernels)
        assert ops.get("ld.global.b16", 0) <= 1, (r["label"], r["kernel"], ops)
        if r["kernel"].endswith("apply_kernel"):
            assert ops.get("st.global.v4.b32", 0) > 0, (r["label"], r["kernel"], ops)
