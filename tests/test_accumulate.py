"""batchnorm.accumulate: k micro-batches per optimizer step give ONE running-statistics update,
equal to the update of one forward of the concatenated batch (BN, ours, ghost, renorm, sync on
one process and across 2 gloo processes), with uneven micro-batches."""

from __future__ import annotations

import copy
import datetime
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import batchnorm
import batchnorm.nn as bnn
from batchnorm.inference import accumulate
from tests.helpers import assert_close

SIZES = (3, 5, 8)  # uneven micro-batches of one step


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small models: one thread is fastest, and the machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _layer(kind: str, momentum: float | None) -> nn.Module:
    if kind == "torch":
        return nn.BatchNorm2d(4, momentum=momentum)
    if kind == "ours":
        return bnn.BatchNorm2d(4, momentum=momentum)
    if kind == "ghost":
        return bnn.GhostBatchNorm(4, momentum=momentum, virtual_batch_size=4)
    if kind == "renorm":
        return bnn.BatchRenorm(
            4, momentum=momentum, warmup_steps=0, r_max_reached_at=1, d_max_reached_at=1
        )
    if kind == "sync":
        return bnn.SyncBatchNorm(4, momentum=momentum)
    raise AssertionError(kind)


def _model(kind: str, momentum: float | None) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), _layer(kind, momentum), nn.ReLU())


def _micro_batches(step: int, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return [torch.randn(n, 3, 5, 5, generator=g) * (2 + step) + 3 * step for n in sizes]


def _assert_same_statistics(actual: nn.Module, expected: nn.Module, name: str) -> None:
    for buffer in ("running_mean", "running_var"):
        assert_close(
            getattr(actual, buffer), getattr(expected, buffer), rtol=2e-6, atol=2e-6,
            name=f"{name} {buffer}",
        )  # fmt: skip
    assert int(actual.num_batches_tracked) == int(expected.num_batches_tracked)


@pytest.mark.parametrize("momentum", (0.1, None))
@pytest.mark.parametrize("kind", ("torch", "ours", "ghost", "renorm", "sync"))
def test_one_update_per_step_equals_the_concatenated_batch(kind, momentum):
    sizes = (4, 8, 4) if kind == "ghost" else SIZES  # ghost batches of 4 line up
    model, whole = _model(kind, momentum), _model(kind, momentum)
    outputs = []
    with accumulate(model, micro_batches=len(sizes)) as acc:
        for step in range(3):
            for x in _micro_batches(step, sizes):
                outputs.append(model(x))
            whole(torch.cat(_micro_batches(step, sizes)))
            _assert_same_statistics(model[1], whole[1], f"{kind} step {step}")
    assert acc.steps == 3
    # Without it, torch takes one update per micro-batch: the test can tell the difference.
    plain = _model(kind, momentum)
    for step in range(3):
        for x in _micro_batches(step, sizes):
            plain(x)
    assert int(plain[1].num_batches_tracked) == 3 * len(sizes)
    assert not torch.allclose(plain[1].running_var, whole[1].running_var, rtol=1e-3)


def test_the_forward_and_gradients_are_those_of_ordinary_training():
    model = _model("torch", 0.1)
    reference = copy.deepcopy(model)
    x = _micro_batches(0, SIZES)[1].requires_grad_()
    with accumulate(model, micro_batches=3):
        y = model(x)
    y_ref = reference(x)
    assert torch.equal(y, y_ref)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    (g_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    assert torch.equal(g, g_ref)


def test_uneven_ghost_batches_pool_within_each_micro_batchs_ghost_batches():
    layer = bnn.GhostBatchNorm(2, virtual_batch_size=4, momentum=1.0)
    g = torch.Generator().manual_seed(3)
    micro = [torch.randn(n, 2, generator=g) * 3 + 1 for n in (3, 6)]
    with accumulate(layer, micro_batches=2):
        for x in micro:
            layer(x)
    chunks = [micro[0], micro[1][:4], micro[1][4:]]  # ghost batches: 3 | 4, 2
    counts = torch.tensor([len(c) for c in chunks], dtype=torch.float64)
    means = torch.stack([c.double().mean(0) for c in chunks])
    pooled = sum(c.double().var(0, correction=0) * len(c) for c in chunks) / (counts - 1).sum()
    assert_close(layer.running_mean, (counts[:, None] * means).sum(0) / counts.sum(), rtol=1e-6,
                 atol=1e-6, name="mean")  # fmt: skip
    assert_close(layer.running_var, pooled, rtol=1e-6, atol=1e-6, name="pooled var")


def test_step_by_hand_exit_flushes_and_an_exception_discards():
    model, whole = _model("ours", 0.1), _model("ours", 0.1)
    micro = _micro_batches(1, SIZES)
    with accumulate(model) as acc:  # no micro_batches: update on step()
        for x in micro:
            model(x)
        assert int(model[1].num_batches_tracked) == 0 and acc.pending == 3
        acc.step()
    whole(torch.cat(micro))
    _assert_same_statistics(model[1], whole[1], "step()")

    with accumulate(model, micro_batches=5):
        model(micro[0])  # an incomplete step: flushed on exit
    whole(micro[0])
    _assert_same_statistics(model[1], whole[1], "exit")

    before = model[1].running_mean.clone()
    with pytest.raises(KeyError), accumulate(model, micro_batches=2):
        model(micro[0])
        raise KeyError("boom")
    assert torch.equal(model[1].running_mean, before)
    assert not model[1]._forward_hooks and not model._forward_hooks


def test_eval_layers_are_left_alone_and_bad_arguments_say_why():
    model = _model("torch", 0.1).eval()
    before = copy.deepcopy(model.state_dict())
    with accumulate(model, micro_batches=2):
        model(_micro_batches(0, (4,))[0])
        model(_micro_batches(0, (4,))[0])
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="micro_batches must be a positive int"):
            accumulate(model, micro_batches=bad)


def test_top_level_name():
    assert batchnorm.accumulate is accumulate


# --------------------------------------------------------------------------------------------
# SyncBatchNorm across 2 gloo processes: uneven micro-batches, one of them empty.

WORLD = 2
RANK_SIZES = {0: (2, 5), 1: (4, 0)}


def _sync_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    try:
        results = {}
        for momentum in (0.1, None):
            model = _model("sync", momentum)
            with accumulate(model, micro_batches=2):
                for step in range(2):
                    for index in range(2):
                        micro = _global_micro(step, index)
                        start = sum(RANK_SIZES[r][index] for r in range(rank))
                        model(micro[start : start + RANK_SIZES[rank][index]])
            assert model[1].last_sync
            results[momentum] = {k: v.clone() for k, v in model[1].state_dict().items()}
        path = Path(out_dir) / f"rank{rank}.pt"
        torch.save(results, str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _global_micro(step: int, index: int) -> torch.Tensor:
    size = sum(RANK_SIZES[r][index] for r in range(WORLD))
    g = torch.Generator().manual_seed(100 * step + index)
    return torch.randn(size, 3, 5, 5, generator=g) * 2 + 1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sync_batch_norm_across_processes_equals_the_concatenated_global_batch(tmp_path):
    context = mp.start_processes(
        _sync_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False,
        start_method="spawn",
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while not context.join(timeout=2.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("accumulate sync processes did not finish in 180 s (hang)")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for momentum in (0.1, None):
        whole = _model("torch", momentum)
        for step in range(2):
            whole(torch.cat([_global_micro(step, index) for index in range(2)]))
        for rank in range(WORLD):
            state = results[rank][momentum]
            for key in ("running_mean", "running_var"):
                assert_close(state[key], getattr(whole[1], key), rtol=2e-6, atol=2e-6,
                             name=f"rank {rank} momentum {momentum} {key}")  # fmt: skip
            assert int(state["num_batches_tracked"]) == 2
