"""SyncBatchNorm for real: 3 processes (and a 2-process subgroup) on one machine, gloo.

One spawn runs every multi-process scenario (spawning is the slow part); each process saves what it
saw, and the tests compare it with plain batch norm on the concatenated batch: outputs and input
gradients per process, parameter gradients summed over processes (or averaged by a real
DistributedDataParallel), running statistics, eval outputs, and the number of collectives per
pass. Uneven batch sizes, a process
with an empty batch and one with a single sample are among the scenarios. A hang fails the test
(collective timeout and a deadline on the processes) instead of blocking CI.
"""

from __future__ import annotations

import copy
import datetime
import os
import pickle
import socket
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import batchnorm.nn as bnn
from batchnorm.nn.sync import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm
from tests.helpers import NormActStandIn, assert_close, tolerance

WORLD = 3
DEADLINE_S = 180.0
COLLECTIVE_TIMEOUT_S = 60.0
STEPS = 2

# name -> batch sizes per rank (ranks beyond the tuple do not take part), the per-sample shape,
# the layer's keyword arguments, and whether it runs on the subgroup of ranks 0 and 1.
SCENARIOS: dict[str, dict] = {
    "uneven-2d-empty": {"sizes": (2, 0, 5), "tail": (3, 4, 5), "layer": {"momentum": 0.1}},
    "features-one-sample": {
        "sizes": (1, 0, 3),
        "tail": (4,),
        "layer": {"momentum": None, "affine": False},
    },
    "subgroup-fused-activation": {
        "sizes": (3, 5),
        "tail": (3, 6),
        "layer": {"momentum": 0.3},
        "subgroup": True,
        "subclass": True,
    },
    # A batch norm whose own forward calls F.batch_norm, then drop and act (timm's BatchNormAct2d
    # pattern): swapping its class cannot reach the statistics; conversion must rebuild it.
    "norm-act-direct-forward": {
        "sizes": (3, 0, 2),
        "tail": (3, 4, 4),
        "layer": {"momentum": 0.2},
        "norm_act": True,
    },
    # A subclass whose forward computes F.batch_norm itself, without drop/act: conversion cannot
    # synchronize it, so its first training forward under the process group must raise.
    "refused-direct-forward": {"sizes": (2, 2, 2), "tail": (3,), "layer": {}, "refused": True},
    "ddp-empty": {"sizes": (3, 0, 4), "tail": (2, 3), "layer": {"momentum": 0.1}, "ddp": True},
    # eps = 0 with channel 1 constant on every process (0/0: warned on each) and channel 2
    # constant on rank 0 alone (the global variance is not 0: no warning).
    "zero-eps-constant": {
        "sizes": (2, 3, 2),
        "tail": (3,),
        "layer": {"eps": 0.0},
        "zero_eps": True,
    },
    # A NaN on one process at step 1: with nonfinite="skip" no process updates its statistics.
    "nonfinite-skip": {
        "sizes": (2, 3, 2),
        "tail": (3,),
        "layer": {"nonfinite": "skip"},
        "nan_at": (1, 2),  # (step, global sample index): on rank 1
    },
}


class BatchNormReLU1d(torch.nn.BatchNorm1d):
    """A user subclass with a fused activation: conversion must keep the ReLU."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(input))


def _data(name: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch and dl/dy of a scenario at a step (float64; large-ish offsets)."""
    spec = SCENARIOS[name]
    gen = torch.Generator().manual_seed(1000 * step + len(name))
    shape = (sum(spec["sizes"]), *spec["tail"])
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2.0 + 3.0
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    if spec.get("nan_at", (None,))[0] == step:
        x[spec["nan_at"][1], 0] = float("nan")
    return x, dy


def _eval_input(name: str) -> torch.Tensor:
    spec = SCENARIOS[name]
    gen = torch.Generator().manual_seed(99)
    return torch.randn((4, *spec["tail"]), generator=gen, dtype=torch.float64)


def _init(layer: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(7)
    if layer.weight is not None:
        with torch.no_grad():
            layer.weight.copy_(torch.rand(layer.weight.shape, generator=gen) + 0.5)
            layer.bias.copy_(torch.rand(layer.bias.shape, generator=gen) - 0.5)
    return layer


def _rank_slice(name: str, rank: int) -> slice:
    sizes = SCENARIOS[name]["sizes"]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


# --------------------------------------------------------------------------------------------
# What each process runs
# --------------------------------------------------------------------------------------------


def _count_collectives(counts: dict[str, int]) -> None:
    for fn_name in ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce"):
        original = getattr(dist, fn_name, None)
        if original is None:
            continue

        def counted(*args, _original=original, _name=fn_name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(*args, **kwargs)

        setattr(dist, fn_name, counted)


class DirectForwardBN(torch.nn.BatchNorm1d):
    """Batch norm written out with F.batch_norm in its own forward (no super().forward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
            0.1, self.eps,
        )  # fmt: skip


def _run_scenario(name: str, rank: int, group, counts: dict[str, int]) -> dict:
    spec = SCENARIOS[name]
    channels = spec["tail"][0]
    if spec.get("refused"):
        model = convert_sync_batchnorm(torch.nn.Sequential(DirectForwardBN(channels).double()))
        x = _data(name, 0)[0][_rank_slice(name, rank)]
        try:
            model(x)
        except RuntimeError as error:
            return {"error": str(error), "class": type(model[0]).__name__}
        return {"error": None, "class": type(model[0]).__name__}
    if spec.get("zero_eps"):
        layer = SyncBatchNorm(channels, process_group=group, **spec["layer"]).double()
        x = _data(name, 0)[0][_rank_slice(name, rank)].clone()
        x[:, 1] = 3.0
        if rank == 0:
            x[:, 2] = 5.0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = layer(x)
        return {"warnings": [str(w.message) for w in caught], "y": y.detach()}
    if spec.get("subclass") or spec.get("norm_act"):
        cls = NormActStandIn if spec.get("norm_act") else BatchNormReLU1d
        model = torch.nn.Sequential(_init(cls(channels, **spec["layer"]).double()))
        model = convert_sync_batchnorm(model, process_group=group)
        layer = model[0]
    else:
        layer = _init(SyncBatchNorm(channels, process_group=group, **spec["layer"]).double())
        model = layer
    if spec.get("ddp"):
        # A CPU module with gloo: torch.nn.SyncBatchNorm would be refused here by DDP.
        model = torch.nn.parallel.DistributedDataParallel(model)
    out: dict = {"steps": [], "class": type(layer).__name__}
    for step in range(STEPS):
        x_all, dy_all = _data(name, step)
        x = x_all[_rank_slice(name, rank)].clone().requires_grad_(True)
        before = dict(counts)
        y = model(x)
        after_forward = dict(counts)
        y.backward(dy_all[_rank_slice(name, rank)])
        after_backward = dict(counts)
        out["steps"].append(
            {
                "y": y.detach(),
                "dx": x.grad,
                "dweight": None if layer.weight is None else layer.weight.grad.clone(),
                "dbias": None if layer.bias is None else layer.bias.grad.clone(),
                "forward_calls": {k: after_forward.get(k, 0) - before.get(k, 0) for k in counts},
                "backward_calls": {
                    k: after_backward.get(k, 0) - after_forward.get(k, 0) for k in counts
                },
                "last_sync": layer.last_sync,
            }
        )
        model.zero_grad(set_to_none=True)
    out["running_mean"] = layer.running_mean.clone()
    out["running_var"] = layer.running_var.clone()
    out["num_batches_tracked"] = int(layer.num_batches_tracked)
    model.eval()
    before = dict(counts)
    out["eval_y"] = model(_eval_input(name)).detach()
    out["eval_calls"] = sum(counts.get(k, 0) - before.get(k, 0) for k in counts)
    out["eval_last_sync"] = layer.last_sync
    if spec.get("subclass") or spec.get("norm_act"):
        reverted = revert_sync_batchnorm(model)
        out["reverted_class"] = type(reverted[0]).__name__
        out["reverted_same_object"] = reverted[0] is layer
    return out


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    try:
        counts: dict[str, int] = {}
        _count_collectives(counts)
        subgroup = dist.new_group([0, 1])  # every process must call new_group
        results = {}
        for name, spec in SCENARIOS.items():
            group = subgroup if spec.get("subgroup") else None
            if rank < len(spec["sizes"]):
                results[name] = _run_scenario(name, rank, group, counts)
        path = Path(out_dir) / f"rank{rank}.pt"
        torch.save(results, str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)  # atomically: no half-written result
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def process_results(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("sync")
    context = mp.start_processes(
        _worker,
        args=(WORLD, _free_port(), str(out_dir)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=2.0):  # raises if a process failed, with its traceback
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"sync batch-norm processes did not finish in {DEADLINE_S:.0f} s (hang)")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


# --------------------------------------------------------------------------------------------
# The reference: plain batch norm on the concatenated batch, in one process
# --------------------------------------------------------------------------------------------


def _reference(name: str) -> dict:
    spec = SCENARIOS[name]
    channels, ndim = spec["tail"][0], 1 + len(spec["tail"])
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}[ndim]
    bn = _init(cls(channels, **spec["layer"]).double())
    act = torch.relu if spec.get("subclass") or spec.get("norm_act") else (lambda t: t)
    steps = []
    for step in range(STEPS):
        x, dy = _data(name, step)
        x.requires_grad_(True)
        y = act(bn(x))
        y.backward(dy)
        steps.append(
            {
                "y": y.detach(),
                "dx": x.grad,
                "dweight": None if bn.weight is None else bn.weight.grad.clone(),
                "dbias": None if bn.bias is None else bn.bias.grad.clone(),
            }
        )
        bn.zero_grad(set_to_none=True)
    ref = {"steps": steps, "running_mean": bn.running_mean, "running_var": bn.running_var}
    ref["num_batches_tracked"] = int(bn.num_batches_tracked)
    bn.eval()
    ref["eval_y"] = act(bn(_eval_input(name))).detach()
    return ref


@pytest.mark.parametrize(
    "name",
    [n for n, s in SCENARIOS.items() if not {"nan_at", "refused", "zero_eps"} & set(s)],
)
def test_equals_batch_norm_on_the_concatenated_batch(process_results, name):
    ranks = range(len(SCENARIOS[name]["sizes"]))
    ref = _reference(name)
    fwd, grad = tolerance("float64", "forward"), tolerance("float64", "gradient")
    for step, expected in enumerate(ref["steps"]):
        for r in ranks:
            got = process_results[r][name]["steps"][step]
            part = _rank_slice(name, r)
            where = f"{name} step {step} rank {r}"
            assert got["last_sync"] is True, where
            assert_close(got["y"], expected["y"][part], rtol=fwd[0], atol=fwd[1], name=f"y {where}")
            assert_close(
                got["dx"], expected["dx"][part], rtol=grad[0], atol=grad[1], name=f"dx {where}"
            )
        for key in ("dweight", "dbias"):
            if expected[key] is None:
                assert all(process_results[r][name]["steps"][step][key] is None for r in ranks)
                continue
            if SCENARIOS[name].get("ddp"):
                # DDP averaged the per-process gradients: the same on every process.
                for r in ranks:
                    got = process_results[r][name]["steps"][step][key] * len(ranks)
                    where = f"{key} x world size, {name} step {step} rank {r}"
                    assert_close(got, expected[key], rtol=grad[0], atol=grad[1], name=where)
                continue
            # The all-reduce (sum) of the per-process parameter gradients.
            summed = sum(process_results[r][name]["steps"][step][key] for r in ranks)
            assert_close(
                summed, expected[key], rtol=grad[0], atol=grad[1], name=f"{key} {name} step {step}"
            )
    for r in ranks:
        got = process_results[r][name]
        for key in ("running_mean", "running_var"):
            assert_close(got[key], ref[key], rtol=fwd[0], atol=fwd[1], name=f"{key} rank {r}")
        assert got["num_batches_tracked"] == ref["num_batches_tracked"] == STEPS
        assert_close(got["eval_y"], ref["eval_y"], rtol=fwd[0], atol=fwd[1], name=f"eval rank {r}")
        assert got["eval_last_sync"] is False and got["eval_calls"] == 0


@pytest.mark.parametrize(
    "name", [n for n, s in SCENARIOS.items() if not {"ddp", "refused", "zero_eps"} & set(s)]
)
def test_one_collective_per_forward_and_per_backward(process_results, name):
    for r in range(len(SCENARIOS[name]["sizes"])):
        for step in process_results[r][name]["steps"]:
            forward = {k: v for k, v in step["forward_calls"].items() if v}
            backward = {k: v for k, v in step["backward_calls"].items() if v}
            assert sum(forward.values()) == 1 and list(forward) != ["all_reduce"], forward
            assert backward == {"all_reduce": 1}, backward


def test_nonfinite_skip_leaves_every_process_statistics_unchanged(process_results):
    name = "nonfinite-skip"
    spec = SCENARIOS[name]
    bn = _init(torch.nn.BatchNorm1d(spec["tail"][0]).double())
    bn(_data(name, 0)[0])  # the only finite step
    for r in range(len(spec["sizes"])):
        got = process_results[r][name]
        assert torch.isnan(got["steps"][1]["y"]).any()  # the output still shows the NaN
        assert got["num_batches_tracked"] == 1
        for key in ("running_mean", "running_var"):
            expected = getattr(bn, key)
            assert_close(got[key], expected, rtol=1e-12, atol=1e-12, name=f"{key} rank {r}")


def test_eps_zero_names_the_globally_constant_channel_on_every_process(process_results):
    for r in range(3):
        got = process_results[r]["zero-eps-constant"]
        assert len(got["warnings"]) == 1, got["warnings"]
        assert "1 of 3 channel(s)" in got["warnings"][0] and "first: 1)" in got["warnings"][0]
        assert torch.isnan(got["y"][:, 1]).all() and torch.isfinite(got["y"][:, [0, 2]]).all()


def test_norm_act_layers_synchronize_and_keep_their_activation(process_results):
    for r in (0, 1, 2):
        got = process_results[r]["norm-act-direct-forward"]
        assert got["class"] == "SyncBatchNormAct"
        assert all(s["last_sync"] is True for s in got["steps"])
        assert got["reverted_class"] == "NormActStandIn"


def test_a_subclass_that_bypasses_super_forward_is_refused_loudly(process_results):
    for r in range(3):
        got = process_results[r]["refused-direct-forward"]
        assert got["class"] == "SyncDirectForwardBN"
        assert got["error"] is not None and "without calling super().forward" in got["error"]


def test_conversion_keeps_the_subclass_behaviour_across_processes(process_results):
    for r in (0, 1):
        got = process_results[r]["subgroup-fused-activation"]
        assert got["class"] == "SyncBatchNormReLU1d"
        assert all((s["y"] >= 0).all() for s in got["steps"])  # the fused ReLU still runs
        assert got["reverted_class"] == "BatchNormReLU1d" and got["reverted_same_object"]
    assert "subgroup-fused-activation" not in process_results[2]


# --------------------------------------------------------------------------------------------
# One process: fallback, drop-in compatibility, conversion
# --------------------------------------------------------------------------------------------


def test_falls_back_to_batch_norm_when_not_distributed():
    torch.manual_seed(0)
    ours = _init(SyncBatchNorm(3, dtype=torch.float64))
    theirs = _init(torch.nn.BatchNorm2d(3, dtype=torch.float64))
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12, name="y")
    assert ours.last_sync is False and ours.last_backend == "torch"
    assert_close(ours.running_var, theirs.running_var, rtol=1e-12, atol=1e-12, name="running_var")


def test_falls_back_with_a_group_of_one_process(tmp_path):
    assert not dist.is_initialized()
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        layer = SyncBatchNorm(3)
        layer(torch.randn(4, 3))
        assert layer.last_sync is False
    finally:
        dist.destroy_process_group()


def test_drop_in_for_torch_sync_batch_norm():
    ours, theirs = SyncBatchNorm(5, momentum=0.2), torch.nn.SyncBatchNorm(5, momentum=0.2)
    # A torch.nn.SyncBatchNorm (isinstance checks of Lightning, timm, torch.ao find it), which
    # DDP still accepts in CPU modules (the "ddp-empty" scenario runs it over gloo).
    assert isinstance(ours, torch.nn.SyncBatchNorm)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    theirs.running_mean.fill_(2.0)
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.running_mean, theirs.running_mean)
    ours = SyncBatchNorm(5, 1e-3, 0.1, True, True, None, "cpu", torch.float64)  # torch's order
    assert ours.weight.dtype == torch.float64 and ours.eps == 1e-3


def test_ddp_still_refuses_torchs_own_sync_batch_norm_on_cpu(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        with pytest.raises(ValueError, match="only work with GPU modules"):
            torch.nn.parallel.DistributedDataParallel(torch.nn.SyncBatchNorm(3))
        torch.nn.parallel.DistributedDataParallel(SyncBatchNorm(3))  # ours: accepted
    finally:
        dist.destroy_process_group()


def test_convert_and_revert_share_tensors_and_keep_classes():
    ours_bn = bnn.BatchNorm1d(3, backend="explicit")
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), BatchNormReLU1d(3), ours_bn
    )
    weight, running_mean = model[1].weight, model[1].running_mean
    model.eval()
    converted = convert_sync_batchnorm(model)
    assert type(converted[1]) is SyncBatchNorm
    assert converted[1].weight is weight and converted[1].running_mean is running_mean
    assert not converted[1].training
    assert type(converted[2]).__name__ == "SyncBatchNormReLU1d"
    assert isinstance(converted[2], BatchNormReLU1d) and isinstance(converted[2], SyncBatchNorm)
    assert type(convert_sync_batchnorm(torch.nn.SyncBatchNorm(3))) is SyncBatchNorm
    assert converted[3].backend == "explicit"
    y = converted[2](torch.randn(6, 3) - 5.0)
    assert (y >= 0).all() and (y == 0).any()  # the fused ReLU survives conversion
    reverted = revert_sync_batchnorm(converted)
    assert [type(m) for m in reverted] == [
        torch.nn.Linear,
        torch.nn.BatchNorm1d,
        BatchNormReLU1d,
        bnn.BatchNorm1d,
    ]
    assert reverted[1].weight is weight and reverted[3].backend == "explicit"
    assert not hasattr(reverted[2], "process_group")


def test_converted_subclass_survives_pickling_a_whole_model(tmp_path):
    """Sync<Name> is made at run time; torch.save / pickle / deepcopy of the model still work."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), BatchNormReLU1d(3))
    model(torch.randn(8, 4))  # non-trivial running statistics
    converted = convert_sync_batchnorm(model).eval()
    x = torch.randn(5, 4) - 1.0
    path = tmp_path / "model.pt"
    torch.save(converted, path)
    copies = [
        torch.load(path, weights_only=False),
        pickle.loads(pickle.dumps(converted)),
        copy.deepcopy(converted),
    ]
    for loaded in copies:
        layer = loaded[1]
        assert type(layer) is type(converted[1])  # the same Sync<Name> class, not a new one
        assert isinstance(layer, BatchNormReLU1d) and isinstance(layer, SyncBatchNorm)
        assert layer.running_mean is not converted[1].running_mean
        torch.testing.assert_close(layer.running_var, converted[1].running_var)
        torch.testing.assert_close(loaded(x), converted(x), rtol=0, atol=0)
        assert type(revert_sync_batchnorm(loaded)[1]) is BatchNormReLU1d


def test_convert_leaves_per_process_variants_with_a_warning():
    model = torch.nn.Sequential(bnn.GhostBatchNorm(3), bnn.FrozenBatchNorm(3))
    with pytest.warns(UserWarning, match="GhostBatchNorm"):
        converted = convert_sync_batchnorm(model)
    assert type(converted[0]) is bnn.GhostBatchNorm and type(converted[1]) is bnn.FrozenBatchNorm
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_sync_batchnorm(torch.nn.Sequential(bnn.FrozenBatchNorm(3)))  # nothing to say


def test_created_sync_layer_reverts_to_any_dimensional_batch_norm():
    back = revert_sync_batchnorm(SyncBatchNorm(2))
    assert isinstance(back, torch.nn.modules.batchnorm._BatchNorm)
    assert not isinstance(back, SyncBatchNorm)
    for shape in ((4, 2), (4, 2, 3), (2, 2, 3, 3)):
        back(torch.randn(shape))
    with pytest.raises(ValueError, match="channels on axis 1"):
        back(torch.randn(4, 3))
