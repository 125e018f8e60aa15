"""The C++ kernels' output block cache: large outputs reuse freed blocks of the same size, live
outputs never share memory, the limit bounds what is held, and the tensors behave as any
torch CPU tensor (resize, shared memory, NumPy views, fused outputs)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from batchnorm.ops import cpu
from batchnorm.ops.cpu import _build

pytestmark = pytest.mark.usefixtures("cpu_kernels")

LARGE = (8, 64, 16, 16)  # 512 KiB of float32: served by the cache (from 256 KiB on)


@pytest.fixture
def limit():
    """Restores the cache's limit (and empties it) after a test that changes it."""
    before = cpu.cache_info().limit_bytes
    yield
    cpu.set_cache_limit(before / (1 << 20))
    cpu.empty_cache()


def _forward(x: torch.Tensor) -> torch.Tensor:
    return cpu.batch_norm(x, None, None, None, None, True, 0.1, 1e-5)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_freed_output_is_reused_and_results_stay_correct(limit, fmt):
    cpu.set_cache_limit(64)
    x = torch.randn(LARGE).contiguous(memory_format=fmt)
    expected = torch.nn.functional.batch_norm(x, None, None, training=True)
    first = _forward(x)
    address = first.data_ptr()
    del first
    before = cpu.cache_info()
    assert before.cached_bytes >= x.numel() * 4
    second = _forward(x)
    after = cpu.cache_info()
    assert second.data_ptr() == address and after.hits == before.hits + 1
    assert second.is_contiguous(memory_format=fmt) and second.stride() == x.stride()
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-5)


def test_live_outputs_never_share_a_block(limit):
    cpu.set_cache_limit(64)
    x = torch.randn(LARGE)
    outputs = [_forward(x) for _ in range(4)]
    assert len({y.data_ptr() for y in outputs}) == 4
    for y in outputs[1:]:
        assert torch.equal(y, outputs[0])


def test_limit_bounds_the_held_bytes(limit):
    block = torch.randn(LARGE).numel() * 4
    cpu.set_cache_limit(block * 2.5 / (1 << 20))  # room for two blocks
    x = torch.randn(LARGE)
    outputs = [_forward(x) for _ in range(5)]
    del outputs
    assert cpu.cache_info().cached_bytes == 2 * block
    cpu.set_cache_limit(block / (1 << 20))  # lowering the limit frees the excess now
    assert cpu.cache_info().cached_bytes == block
    cpu.empty_cache()
    assert cpu.cache_info().cached_bytes == 0
    cpu.set_cache_limit(0)
    _forward(x)  # freed at once
    assert cpu.cache_info().cached_bytes == 0


def test_a_new_size_evicts_the_blocks_freed_longest_ago(limit):
    """When shapes change (another batch size, eval), the blocks of the new size are kept and
    the old sizes go back to the system, oldest first."""
    small = torch.randn(LARGE)  # 512 KiB outputs
    big = torch.randn(8, 64, 16, 32)  # 1 MiB outputs
    cpu.set_cache_limit(1.25)
    cpu.empty_cache()
    outputs = [_forward(small) for _ in range(2)]
    del outputs
    assert cpu.cache_info().cached_bytes == 2 * small.numel() * 4
    _forward(big)  # freed at once: both 512 KiB blocks make room for it
    assert cpu.cache_info().cached_bytes == big.numel() * 4
    before = cpu.cache_info()
    _forward(big)
    assert cpu.cache_info().hits == before.hits + 1
    cpu.set_cache_limit(0.5)  # smaller than the cached block: nothing stays
    assert cpu.cache_info().cached_bytes == 0


def test_small_outputs_bypass_the_cache(limit):
    cpu.set_cache_limit(64)
    before = cpu.cache_info()
    _forward(torch.randn(4, 8, 5, 5))  # freed at once
    after = cpu.cache_info()
    assert (after.hits, after.misses, after.cached_bytes) == (
        before.hits,
        before.misses,
        before.cached_bytes,
    )


def test_backward_and_fused_outputs_come_from_the_cache(limit):
    cpu.set_cache_limit(64)
    cpu.empty_cache()
    x = torch.randn(LARGE, requires_grad=True)
    z = torch.randn(LARGE)
    y = cpu.batch_norm_relu(x, z, None, None, None, None, True, 0.1, 1e-5, save="mask")
    y.sum().backward()
    info = cpu.cache_info()
    assert info.hits + info.misses >= 4  # y, mask, gated gradient, dx
    expected_x = x.detach().clone().requires_grad_(True)
    ref = torch.relu(torch.nn.functional.batch_norm(expected_x, None, None, training=True) + z)
    ref.sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, expected_x.grad, rtol=1e-4, atol=1e-5)


def test_outputs_behave_as_torch_tensors(limit):
    cpu.set_cache_limit(64)
    x = torch.randn(LARGE)
    y = _forward(x)
    head = y[:1].clone()
    y.resize_(16, 64, 16, 16)  # a larger block, the old one back to the cache
    assert y.shape == (16, 64, 16, 16) and torch.equal(y[:1], head)
    y.fill_(1.0)
    assert float(y.sum()) == y.numel()
    shared = _forward(x).share_memory_()
    assert shared.is_shared()
    torch.testing.assert_close(shared, _forward(x))
    kept = _forward(x)
    array = kept.numpy()
    snapshot = array.copy()
    del kept
    for _ in range(3):
        _forward(x)  # reuse of freed blocks must not touch memory a NumPy view still holds
    assert (array == snapshot).all()


def test_limit_rejects_nonsense():
    for bad in (-1, float("nan"), float("inf"), "64"):
        with pytest.raises(ValueError, match="megabytes >= 0"):
            cpu.set_cache_limit(bad)


@pytest.mark.parametrize(
    "text,expected",
    [("", 256 << 20), ("0", 0), ("1.5", 3 << 19), (" 512 ", 512 << 20)],
)
def test_limit_from_environment(monkeypatch, text, expected):
    monkeypatch.setenv(_build.CACHE_ENV, text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _build.cache_limit_from_env() == expected


@pytest.mark.parametrize("text", ["lots", "-5", "nan", "inf"])
def test_bad_environment_value_warns_and_keeps_the_default(monkeypatch, text):
    monkeypatch.setenv(_build.CACHE_ENV, text)
    with pytest.warns(RuntimeWarning, match="BATCHNORM_CPU_CACHE_MB"):
        assert _build.cache_limit_from_env() == 256 << 20


def test_forked_child_allocates_outputs(limit):
    """A child forked after the cache was used (DataLoader workers, multiprocessing) allocates
    and frees outputs normally (the cache's lock is held across the fork, never inherited taken
    by a thread the child lacks)."""
    import multiprocessing as mp

    cpu.set_cache_limit(64)
    x = torch.randn(LARGE)
    _forward(x)  # a block in the cache before the fork
    context = mp.get_context("fork")
    with context.Pool(1) as pool:
        total = pool.apply(_child_sum, (x,))
    torch.testing.assert_close(
        torch.tensor(total), _forward(x).double().sum().float(), atol=1e-2, rtol=0
    )


def _child_sum(x: torch.Tensor) -> float:
    torch.set_num_threads(1)
    outputs = [_forward(x) for _ in range(3)]
    return float(outputs[-1].double().sum())


_OOM_CHILD = """
import resource, sys
import torch
from batchnorm.ops import cpu
torch.set_num_threads(1)
xa = torch.randn(50 << 18).view(-1, 64)  # 50 MB
xb = torch.randn(100 << 18).view(-1, 64)  # 100 MB
def fwd(x):
    return cpu.batch_norm(x, None, None, None, None, True, 0.1, 1e-5)
outputs = [fwd(xa) for _ in range(3)]
del outputs  # 150 MB of 50 MB blocks now held by the cache
assert cpu.cache_info().cached_bytes >= 150 << 20, cpu.cache_info()
status = open("/proc/self/status").read().splitlines()
vm = int(next(line for line in status if line.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (60 << 20), resource.RLIM_INFINITY))
try:
    torch.empty(100 << 18)
    sys.exit("the address-space limit leaves room for 100 MB: the test proves nothing")
except RuntimeError:
    pass
y = fwd(xb)  # fits only once the cached 50 MB blocks are given back
assert y.shape == xb.shape and cpu.cache_info().cached_bytes == 0
assert torch.isfinite(y[:1000]).all()
print("ok")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc: Linux")
def test_an_allocation_that_fails_empties_the_cache_and_retries():
    """Memory held for reuse never makes an output fail: under an address-space limit that
    leaves no room for a 100 MB output beside 150 MB of cached 50 MB blocks, the output is
    allocated after the cache gives its blocks back."""
    env = {**os.environ, "PYTHONPATH": str(Path(cpu.__file__).parents[3])}
    run = subprocess.run(
        [sys.executable, "-c", _OOM_CHILD], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
