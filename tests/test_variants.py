"""Ghost batch norm, batch renorm, frozen batch norm, layer/instance/group norm and the registry.

Each variant is checked against torch (where torch has it) or against the NumPy reference, forward
and backward, with running statistics, and against the others through the equivalences that must
hold: ghost with one ghost batch is BN; renorm with r_max = 1, d_max = 0 is BN; frozen is BN in
eval, gradients included; GroupNorm with one group is LayerNorm over (C, *), with C groups it is
InstanceNorm.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import batchnorm.nn as bnn
from batchnorm import inference, reference
from tests.helpers import SHAPES, assert_close, make_input, tolerance

TORCH_BN = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
            5: torch.nn.BatchNorm3d}  # fmt: skip
TRAINABLE = [c for c in SHAPES if int(np.prod(c.shape)) // c.shape[1] > 1]
F64 = torch.float64


def _rounding(case, dtype=F64) -> float:
    """The error the input's dtype forces on xhat: a few ulps of a large mean over the std."""
    name = str(dtype).replace("torch.", "")
    return 8 * float(np.spacing(np.array(abs(case.mean), dtype=name))) / case.std


def _randomize(*modules: torch.nn.Module, seed: int = 0) -> None:
    """The same random affine parameters in every module (gamma in [0.5, 1.5])."""
    gen = torch.Generator().manual_seed(seed)
    first = modules[0]
    with torch.no_grad():
        w = torch.rand(first.weight.shape, generator=gen, dtype=F64) + 0.5
        b = torch.rand(first.bias.shape, generator=gen, dtype=F64) - 0.5
        for m in modules:
            m.weight.copy_(w.reshape(m.weight.shape))
            m.bias.copy_(b.reshape(m.bias.shape))


def _run(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor):
    """Output and the gradients of x and of every parameter, for ``sum(y * dy)``."""
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(y, [x, *params], dy)
    return y.detach(), grads


def _compare(name, ours, theirs, x, dy, dtype=F64, rounding=0.0, m=1):
    y1, g1 = _run(ours, x, dy)
    y2, g2 = _run(theirs, x, dy)
    rtol, atol = tolerance(dtype)
    assert_close(y1, y2, rtol=rtol, atol=atol + rounding, name=f"{name} y")
    rtol, atol = tolerance(dtype, "gradient")
    assert len(g1) == len(g2)
    for i, (a, b) in enumerate(zip(g1, g2)):
        what = "dx" if i == 0 else f"d(param {i})"
        scale = m if i == 1 else 1  # dgamma sums m terms, each carrying the xhat rounding
        assert_close(
            a, b.reshape(a.shape), rtol=rtol, atol=atol + rounding * scale, name=f"{name} {what}"
        )


def _compare_running(ours, theirs, dtype=F64):
    rtol, atol = tolerance(dtype)
    assert_close(ours.running_mean, theirs.running_mean, rtol=rtol, atol=atol, name="running_mean")
    assert_close(ours.running_var, theirs.running_var, rtol=rtol, atol=atol, name="running_var")
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


def _bn_equivalence(ours, case, steps=3):
    """``ours`` behaves as torch's batch norm on ``case``: train steps, running stats, eval."""
    theirs = TORCH_BN[len(case.shape)](case.shape[1], momentum=ours.momentum, dtype=F64)
    _randomize(ours, theirs)
    m = int(np.prod(case.shape)) // case.shape[1]
    for step in range(steps):
        x = torch.from_numpy(make_input(case, seed=step))
        dy = torch.randn(case.shape, dtype=F64, generator=torch.Generator().manual_seed(step))
        _compare(f"train step {step}", ours, theirs, x, dy, rounding=_rounding(case), m=m)
        _compare_running(ours, theirs)
    ours.eval()
    theirs.eval()
    x = torch.from_numpy(make_input(case, seed=9))
    _compare("eval", ours, theirs, x, torch.ones_like(x), rounding=_rounding(case), m=m)


# --------------------------------------------------------------------------------------------
# Ghost batch norm
# --------------------------------------------------------------------------------------------


GHOST_BACKENDS = pytest.mark.parametrize(
    "backend", [None, "explicit"], ids=["native", "primitives"]
)


@GHOST_BACKENDS
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("case", TRAINABLE, ids=lambda c: c.id)
def test_ghost_with_one_ghost_batch_equals_batch_norm(case, momentum, backend):
    ghost = bnn.GhostBatchNorm(case.shape[1], momentum=momentum, dtype=F64,
                               virtual_batch_size=case.shape[0] + 3, backend=backend)  # fmt: skip
    _bn_equivalence(ghost, case)
    assert ghost.last_backend == (backend or "torch")


@GHOST_BACKENDS
def test_ghost_batches_are_normalized_separately_and_pooled_for_running_stats(backend):
    # 10 samples in ghost batches of 4: [0, 4), [4, 8) and the remainder [8, 10).
    x = torch.randn(10, 3, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(0)) * 3 + 1
    dy = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    ghost = bnn.GhostBatchNorm(3, momentum=0.1, dtype=F64, virtual_batch_size=4, backend=backend)
    _randomize(ghost)

    def per_chunk(t):
        chunks = [F.batch_norm(c, None, None, ghost.weight, ghost.bias, True, 0.0, ghost.eps)
                  for c in t.split(4)]  # fmt: skip
        return torch.cat(chunks)

    class Chunked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.bias = ghost.weight, ghost.bias

        def forward(self, t):
            return per_chunk(t)

    _compare("ghost vs per-chunk batch norm", ghost, Chunked(), x, dy)
    # Algorithm 2 over the ghost batches: count-weighted mean, pooled unbiased variance.
    pop = reference.population_statistics([c.numpy() for c in x.split(4)])
    assert_close(ghost.running_mean, 0.1 * pop.mean, rtol=1e-12, atol=1e-14, name="running_mean")
    assert_close(ghost.running_var, 0.9 + 0.1 * pop.var, rtol=1e-12, atol=1e-14, name="running_var")
    assert int(ghost.num_batches_tracked) == 1  # one moving-average step per forward


def test_ghost_rejects_a_ghost_batch_with_one_value_per_channel():
    ghost = bnn.GhostBatchNorm(3, virtual_batch_size=4)
    with pytest.raises(ValueError, match="ghost batch of 1 sample.*divides the batch size"):
        ghost(torch.randn(9, 3))
    ghost(torch.randn(9, 3, 2))  # 2 values per channel in the remainder: fine
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive int"):
        bnn.GhostBatchNorm(3, virtual_batch_size=0)


# --------------------------------------------------------------------------------------------
# Batch renormalization
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", TRAINABLE, ids=lambda c: c.id)
def test_renorm_with_closed_clips_equals_batch_norm(case):
    renorm = bnn.BatchRenorm(case.shape[1], dtype=F64, r_max=1.0, d_max=0.0, warmup_steps=0,
                             r_max_reached_at=0, d_max_reached_at=0)  # fmt: skip
    _bn_equivalence(renorm, case)


@pytest.mark.parametrize(
    "tracked,r_limit,d_limit",
    [(0, 1.0, 0.0), (15, 2.0, 2.5), (10**6, 3.0, 5.0)],
    ids=["warm-up", "mid-ramp", "ramped"],
)
def test_renorm_matches_the_paper_formulas(tracked, r_limit, d_limit):
    """r and d clipped at the scheduled limits, stop-gradient; against NumPy in float64."""
    renorm = bnn.BatchRenorm(3, dtype=F64, momentum=0.1, warmup_steps=10, r_max_reached_at=20,
                             d_max_reached_at=20)  # fmt: skip
    assert renorm.clip_limits(tracked) == (r_limit, d_limit)
    _randomize(renorm)
    with torch.no_grad():  # moving averages far from the batch: the clips bind somewhere
        renorm.running_mean.copy_(torch.tensor([0.0, 30.0, -0.2], dtype=F64))
        renorm.running_var.copy_(torch.tensor([100.0, 1.0, 0.05], dtype=F64))
        renorm.num_batches_tracked.fill_(tracked)
    mu, sigma = renorm.running_mean.numpy().copy(), np.sqrt(renorm.running_var.numpy() + 1e-5)
    x = np.random.default_rng(0).standard_normal((8, 3, 3)) * 2.0
    dy = np.random.default_rng(1).standard_normal(x.shape)

    mu_b, var_b = reference.batch_statistics(x)
    sigma_b = np.sqrt(var_b + 1e-5)
    r = np.clip(sigma_b / sigma, 1 / r_limit, r_limit)
    d = np.clip((mu_b - mu) / sigma, -d_limit, d_limit)
    gamma, beta = renorm.weight.detach().numpy().copy(), renorm.bias.detach().numpy().copy()
    # gamma * (xhat * r + d) + beta is Algorithm 1 with gamma' = gamma * r, beta' = gamma*d + beta;
    # r, d constant, so dl/dx is batch norm's backward with gamma'.
    y_ref, cache = reference.bn_forward(x, gamma * r, gamma * d + beta)
    dx_ref, _, dbeta_ref = reference.bn_backward(dy, cache)
    dgamma_ref = (dy * (cache.xhat * r[None, :, None] + d[None, :, None])).sum(axis=(0, 2))
    if tracked == 0:
        assert np.all(r == 1) and np.all(d == 0)
    else:
        assert np.any(r == r_limit) or np.any(r == 1 / r_limit), "r should be clipped somewhere"
        assert np.any(np.abs(d) == d_limit), "d should be clipped somewhere"

    (y, (dx, dgamma, dbeta)) = _run(renorm, torch.from_numpy(x), torch.from_numpy(dy))
    fwd, grad = tolerance("float64"), tolerance("float64", "gradient")
    assert_close(y, y_ref, rtol=fwd[0], atol=fwd[1], name="y")
    assert_close(dx, dx_ref, rtol=grad[0], atol=grad[1], name="dx")
    assert_close(dgamma, dgamma_ref, rtol=grad[0], atol=grad[1], name="dgamma")
    assert_close(dbeta, dbeta_ref, rtol=grad[0], atol=grad[1], name="dbeta")
    # Moving averages: batch norm's update, after r and d were taken from the old values.
    new_mean, new_var = reference.running_update(mu, sigma**2 - 1e-5, mu_b, var_b, 24, 0.1)
    assert_close(renorm.running_mean, new_mean, rtol=1e-12, atol=1e-12, name="running_mean")
    assert_close(renorm.running_var, new_var, rtol=1e-12, atol=1e-12, name="running_var")
    assert int(renorm.num_batches_tracked) == tracked + 1


def test_renorm_needs_running_statistics_and_valid_schedule():
    with pytest.raises(ValueError, match="track_running_stats=True"):
        bnn.BatchRenorm(3, track_running_stats=False)
    with pytest.raises(ValueError, match="r_max must be a number >= 1"):
        bnn.BatchRenorm(3, r_max=0.5)
    with pytest.raises(ValueError, match="before the end of the warm-up"):
        bnn.BatchRenorm(3, warmup_steps=100, d_max_reached_at=50)


# --------------------------------------------------------------------------------------------
# Frozen batch norm
# --------------------------------------------------------------------------------------------


def _trained_bn(c: int = 4) -> torch.nn.BatchNorm2d:
    bn = torch.nn.BatchNorm2d(c, dtype=F64)
    _randomize(bn)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        bn(torch.randn(6, c, 3, 3, dtype=F64, generator=gen) * 2 + 1)
    return bn.eval()


def test_frozen_equals_batch_norm_in_eval_including_gradients():
    bn = _trained_bn()
    frozen = bnn.FrozenBatchNorm.from_batchnorm(bn)
    x = torch.randn(5, 4, 3, 3, dtype=F64) * 2 + 1
    dy = torch.randn_like(x)
    (y1, (dx1,)), (y2, (dx2, _, _)) = _run(frozen, x, dy), _run(bn, x, dy)
    assert_close(y1, y2, rtol=1e-12, atol=1e-12, name="y")
    assert_close(dx1, dx2, rtol=1e-12, atol=1e-12, name="dx")
    # A BN checkpoint loads as it is (same keys, weight/bias as buffers).
    loaded = bnn.FrozenBatchNorm(4, dtype=F64)
    loaded.load_state_dict(bn.state_dict())
    assert list(loaded.state_dict()) == list(bn.state_dict())
    assert_close(loaded(x), y2, rtol=1e-12, atol=1e-12, name="y from state_dict")


def test_frozen_stays_frozen_through_train():
    frozen = bnn.FrozenBatchNorm.from_batchnorm(_trained_bn())
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1).double(), frozen)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    model.train()
    assert model.training and not frozen.training
    model(torch.randn(2, 3, 5, 5, dtype=F64)).sum().backward()
    assert all(torch.equal(before[k], v) for k, v in frozen.state_dict().items())
    assert list(frozen.parameters()) == []  # no optimizer or weight decay can reach gamma, beta
    with pytest.raises(ValueError, match="eps > 0"):
        bnn.FrozenBatchNorm(4, eps=0.0)


def test_frozen_half_input_with_zero_variance_stays_finite():
    frozen = bnn.FrozenBatchNorm(2)
    frozen.running_var.zero_()
    y = frozen.half()(torch.ones(3, 2, dtype=torch.float16))
    assert y.dtype == torch.float16 and torch.isfinite(y).all()


def test_frozen_is_folded_and_left_alone_by_recalibrate():
    frozen = bnn.FrozenBatchNorm.from_batchnorm(_trained_bn())
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3).double(), frozen, torch.nn.ReLU())
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    folded, report = inference.fold(model, check_input=x, return_report=True)
    assert [type(m).__name__ for m in folded] == ["Conv2d", "Identity", "ReLU"]
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-10
    bn = torch.nn.BatchNorm2d(4, dtype=F64)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3).double(), bn, frozen)
    before = frozen.running_mean.clone()
    inference.recalibrate(model, [x, x + 1], progress=False)
    assert torch.equal(frozen.running_mean, before)


def test_convert_frozen_batchnorm_replaces_layers_with_running_stats():
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3, affine=False),
                                torch.nn.BatchNorm1d(3, track_running_stats=False))  # fmt: skip
    model = bnn.FrozenBatchNorm.convert_frozen_batchnorm(model)
    assert [type(m).__name__ for m in model] == ["FrozenBatchNorm", "FrozenBatchNorm",
                                                 "BatchNorm1d"]  # fmt: skip
    assert torch.equal(model[1].weight, torch.ones(3)) and torch.equal(
        model[1].bias, torch.zeros(3)
    )


# --------------------------------------------------------------------------------------------
# Layer, instance and group norm against torch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    "shape,normalized,kwargs",
    [
        ((4, 6), (6,), {}),
        ((2, 3, 5), (5,), {"bias": False}),
        ((2, 3, 4, 5), (4, 5), {}),
        ((3, 7), (7,), {"elementwise_affine": False}),
    ],
)
@pytest.mark.parametrize("backend", ["auto", "explicit"])
def test_layer_norm_matches_torch(shape, normalized, kwargs, dtype, backend):
    ours = bnn.LayerNorm(normalized, dtype=dtype, backend=backend, **kwargs)
    theirs = torch.nn.LayerNorm(normalized, dtype=dtype, **kwargs)
    if ours.weight is not None:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            if ours.bias is not None:
                ours.bias.uniform_(-0.5, 0.5)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(shape, dtype=dtype) * 3 + 2
    _compare("layer norm", ours, theirs, x, torch.randn(shape, dtype=dtype), dtype=dtype)
    assert ours.last_backend == ("explicit" if backend == "explicit" else "torch")
    assert repr(ours) == repr(theirs)[:-1] + f", backend={backend!r})" and ours.kernel == "torch"


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    "shape,groups",
    [
        ((4, 6, 5, 5), 1),
        ((4, 6, 5, 5), 3),
        ((4, 6, 5, 5), 6),
        ((3, 4), 2),
        ((2, 4, 7), 2),
    ],  # fmt: skip
)
@pytest.mark.parametrize("backend", [None, "explicit"], ids=["default", "explicit"])
def test_group_norm_matches_torch(shape, groups, dtype, backend):
    # Seeded: with 2 values per group a random float32 draw can put them arbitrarily close,
    # where the gradient is ill-conditioned and any two float32 implementations differ.
    torch.manual_seed(sum(shape) * 10 + groups)
    ours = bnn.GroupNorm(groups, shape[1], dtype=dtype, backend=backend)
    theirs = torch.nn.GroupNorm(groups, shape[1], dtype=dtype)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-0.5, 0.5)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(shape, dtype=dtype) * 3 + 2
    _compare("group norm", ours, theirs, x, torch.randn(shape, dtype=dtype), dtype=dtype)
    assert ours.last_backend == (backend or "torch")
    if backend is None:
        assert repr(ours) == repr(theirs)


@pytest.mark.parametrize(
    "ours_cls,theirs_cls,shape",
    [
        (bnn.InstanceNorm1d, torch.nn.InstanceNorm1d, (3, 4, 7)),
        (bnn.InstanceNorm2d, torch.nn.InstanceNorm2d, (3, 4, 5, 5)),
        (bnn.InstanceNorm3d, torch.nn.InstanceNorm3d, (2, 4, 3, 3, 3)),
    ],
)
@pytest.mark.parametrize("affine,track", [(False, False), (True, True)])
@pytest.mark.parametrize("backend", [None, "explicit"], ids=["default", "explicit"])
def test_instance_norm_matches_torch(ours_cls, theirs_cls, shape, affine, track, backend):
    ours = ours_cls(shape[1], affine=affine, track_running_stats=track, dtype=F64, backend=backend)
    theirs = theirs_cls(shape[1], affine=affine, track_running_stats=track, dtype=F64)
    if affine:
        _randomize(ours, theirs)
    gen = torch.Generator().manual_seed(0)
    for step in range(2):
        x = torch.randn(shape, dtype=F64, generator=gen) * 2 + step
        _compare(f"instance norm step {step}", ours, theirs, x, torch.randn_like(x))
        if track:
            rtol, atol = tolerance("float64")
            assert_close(ours.running_mean, theirs.running_mean, rtol=rtol, atol=atol)
            assert_close(ours.running_var, theirs.running_var, rtol=rtol, atol=atol)
    ours.eval()
    theirs.eval()
    x = torch.randn(shape, dtype=F64, generator=gen)
    _compare("instance norm eval", ours, theirs, x, torch.randn_like(x))
    _compare("instance norm, no batch axis", ours, theirs, x[0], torch.randn_like(x[0]))
    assert list(ours.state_dict()) == list(theirs.state_dict())


def test_group_norm_with_one_group_equals_layer_norm_over_channels_and_space():
    x = torch.randn(3, 4, 5, 5, dtype=F64) * 2 + 1
    dy = torch.randn_like(x)
    gn = bnn.GroupNorm(1, 4, dtype=F64, backend="explicit")
    ln = bnn.LayerNorm((4, 5, 5), dtype=F64, backend="explicit")
    _randomize(gn)
    with torch.no_grad():  # the per-channel affine of GN, spread over (H, W) for LN
        ln.weight.copy_(gn.weight[:, None, None].expand(4, 5, 5))
        ln.bias.copy_(gn.bias[:, None, None].expand(4, 5, 5))
    (y1, (dx1, dw1, db1)), (y2, (dx2, dw2, db2)) = _run(gn, x, dy), _run(ln, x, dy)
    assert_close(y1, y2, rtol=1e-12, atol=1e-12, name="y")
    assert_close(dx1, dx2, rtol=1e-10, atol=1e-12, name="dx")
    assert_close(dw1, dw2.sum((1, 2)), rtol=1e-10, atol=1e-12, name="dgamma")
    assert_close(db1, db2.sum((1, 2)), rtol=1e-10, atol=1e-12, name="dbeta")


def test_group_norm_with_one_channel_per_group_equals_instance_norm():
    x = torch.randn(3, 4, 5, 5, dtype=F64) * 2 + 1
    gn = bnn.GroupNorm(4, 4, dtype=F64, backend="explicit")
    inorm = bnn.InstanceNorm2d(4, affine=True, dtype=F64, backend="explicit")
    _randomize(gn, inorm)
    _compare("GN(C) vs IN", gn, inorm, x, torch.randn_like(x))


def _gradient_penalty_grads(model: torch.nn.Module, x: torch.Tensor):
    """d/d(x, params) of ||d sum(model(x)^3) / dx||^2: a double backward (as in WGAN-GP)."""
    x = x.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad((model(x) ** 3).sum(), x, create_graph=True)
    params = [x, *model.parameters()]
    return torch.autograd.grad((g**2).sum(), params)


@pytest.mark.parametrize(
    "ours,theirs",
    [
        (
            lambda: bnn.LayerNorm([4, 3, 3], backend="explicit"),
            lambda: torch.nn.LayerNorm([4, 3, 3]),
        ),
        (lambda: bnn.GroupNorm(2, 4, backend="explicit"), lambda: torch.nn.GroupNorm(2, 4)),
        (
            lambda: bnn.InstanceNorm2d(4, affine=True, backend="explicit"),
            lambda: torch.nn.InstanceNorm2d(4, affine=True),
        ),
        (lambda: bnn.GhostBatchNorm(4, virtual_batch_size=5), lambda: torch.nn.BatchNorm2d(4)),
        (
            lambda: bnn.GhostBatchNorm(4, virtual_batch_size=5, backend="explicit"),
            lambda: torch.nn.BatchNorm2d(4),
        ),
    ],
    ids=["layer", "group", "instance", "ghost", "ghost-explicit"],
)
def test_gradient_penalty_double_backward_matches_torch(ours, theirs):
    torch.manual_seed(0)
    a, b = ours().double(), theirs().double()
    with torch.no_grad():
        for p, q in zip(a.parameters(), b.parameters()):
            p.normal_()
            q.copy_(p)
    x = torch.randn(5, 4, 3, 3, dtype=F64) * 2 + 1
    ours_grads, torch_grads = _gradient_penalty_grads(a, x), _gradient_penalty_grads(b, x)
    scale = max(float(t.abs().max()) for t in torch_grads)  # some gradients are ~0 by symmetry
    for got, expected in zip(ours_grads, torch_grads):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12 * scale)


def test_norms_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"normalized_shape=\(5,\)"):
        bnn.LayerNorm(4)(torch.randn(2, 5))
    with pytest.raises(ValueError, match="channel axis must be axis 1"):
        bnn.GroupNorm(2, 4)(torch.randn(2, 6, 3))
    with pytest.raises(ValueError, match="more than one spatial element"):
        bnn.InstanceNorm1d(3)(torch.randn(2, 3, 1))


# --------------------------------------------------------------------------------------------
# Shared behaviour: drop-in state, buffers never saved for backward, kernel attribute
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [bnn.GhostBatchNorm, bnn.BatchRenorm])
def test_batch_variants_load_batch_norm_checkpoints(cls):
    bn = _trained_bn()
    ours = cls(4, dtype=F64)
    assert list(ours.state_dict()) == list(bn.state_dict())
    ours.load_state_dict(bn.state_dict())
    ours.eval()
    x = torch.randn(2, 4, 3, 3, dtype=F64)
    assert_close(ours(x), bn(x), rtol=1e-12, atol=1e-12, name="eval output")


@pytest.mark.parametrize(
    "make",
    [
        lambda: bnn.GhostBatchNorm(3, virtual_batch_size=2),
        lambda: bnn.BatchRenorm(3, warmup_steps=0, r_max_reached_at=0, d_max_reached_at=0),
        lambda: bnn.InstanceNorm1d(3, track_running_stats=True),
        lambda: bnn.SyncBatchNorm(3),
    ],
    ids=["ghost", "renorm", "instance", "sync"],
)
def test_running_buffers_updated_in_place_do_not_break_pending_backward(make):
    """DDP's broadcast_buffers writes the buffers in place between forwards (pytorch#22095)."""
    layer = make()
    x = torch.randn(4, 3, 5, requires_grad=True)
    losses = [layer(x).pow(2).sum() for _ in range(2)]
    with torch.no_grad():
        layer.running_mean.add_(1.0)
        layer.running_var.mul_(2.0)
    sum(losses).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: bnn.GhostBatchNorm(4, virtual_batch_size=4),
        lambda: bnn.BatchRenorm(4, warmup_steps=0, r_max_reached_at=0, d_max_reached_at=0),
        lambda: bnn.FrozenBatchNorm(4),
        lambda: bnn.GroupNorm(2, 4),
        lambda: bnn.LayerNorm((4, 5, 5)),
        lambda: bnn.InstanceNorm2d(4, affine=True),
    ],
    ids=["ghost", "renorm", "frozen", "group", "layer", "instance"],
)
def test_low_precision_inputs_keep_their_dtype_and_float32_accuracy(make, dtype):
    """Statistics in float32: the output is the float32 result rounded to the input's dtype."""
    x = torch.randn(8, 4, 5, 5, generator=torch.Generator().manual_seed(0)) * 3 + 2
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    low = x.to(dtype)
    (y, (dx, *_)), (y32, (dx32, *_)) = (
        _run(make(), low, dy.to(dtype)),
        _run(make(), low.float(), dy),
    )
    assert y.dtype == dx.dtype == dtype
    rtol, atol = tolerance(dtype)
    assert_close(y, y32, rtol=rtol, atol=atol, name="y")
    rtol, atol = tolerance(dtype, "gradient")
    assert_close(dx, dx32, rtol=rtol, atol=atol, name="dx")


def test_variants_say_they_run_on_torch_operations():
    for cls in (bnn.GhostBatchNorm, bnn.BatchRenorm, bnn.FrozenBatchNorm, bnn.LayerNorm,
                bnn.GroupNorm, bnn.InstanceNorm2d, bnn.SyncBatchNorm):  # fmt: skip
        assert cls.kernel == "torch", cls
        assert "Triton" in (cls.__doc__ or "") or "torch operations" in (cls.__doc__ or ""), cls


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,kwargs,cls",
    [
        ("bn", {}, bnn.BatchNorm2d),
        ("bn", {"spatial_dims": 1}, bnn.BatchNorm1d),
        ("BN", {"spatial_dims": 3}, bnn.BatchNorm3d),
        ("sync", {}, bnn.SyncBatchNorm),
        ("ghost", {"virtual_batch_size": 32}, bnn.GhostBatchNorm),
        ("renorm", {"r_max": 2.0}, bnn.BatchRenorm),
        ("frozen", {}, bnn.FrozenBatchNorm),
        ("gn", {"num_groups": 8}, bnn.GroupNorm),
        ("ln", {}, bnn.LayerNorm),
        ("in", {"affine": True}, bnn.InstanceNorm2d),
    ],
)
def test_create_norm_builds_each_name(name, kwargs, cls):
    layer = bnn.create_norm(name, 64, **kwargs)
    assert type(layer) is cls
    x = torch.randn(4, 64, 3, 3) if cls not in (bnn.BatchNorm1d, bnn.LayerNorm) else None
    if cls is bnn.BatchNorm3d:
        x = torch.randn(2, 64, 2, 2, 2)
    if x is not None:
        assert layer(x).shape == x.shape


def test_create_norm_errors_are_clear():
    with pytest.raises(ValueError, match=r"unknown norm 'grp'.*known: bn, frozen"):
        bnn.create_norm("grp", 8)
    with pytest.raises(ValueError, match="did you mean 'ghost'"):
        bnn.create_norm("gost", 8)
    with pytest.raises(TypeError, match="could not build GhostBatchNorm.*virtual_batch"):
        bnn.create_norm("ghost", 8, virtual_batch=4)
    with pytest.raises(ValueError, match="num_groups= one of the divisors of 48"):
        bnn.create_norm("gn", 48, num_groups=32)
    with pytest.raises(ValueError, match="spatial_dims must be one of"):
        bnn.create_norm("bn", 8, spatial_dims=4)
    with pytest.raises(ValueError, match="channels must be a positive int"):
        bnn.create_norm("bn", 0)


def test_register_norm_extends_the_registry():
    bnn.register_norm("test-identity", lambda channels, **kw: torch.nn.Identity())
    try:
        assert isinstance(bnn.create_norm("test-identity", 3), torch.nn.Identity)
        with pytest.raises(ValueError, match="already registered"):
            bnn.register_norm("test-identity", lambda channels: None)
    finally:
        from batchnorm.nn import registry

        registry._REGISTRY.pop("test-identity")
