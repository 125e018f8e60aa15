"""Forward-mode AD (``torch.autograd.forward_ad``, ``torch.func.jvp``) on every backend: the
tangent of the output equals PyTorch's (its kernels carry forward-mode formulas), never a
missing tangent or an error.

The ``explicit`` primitives carry their own formula (``_NormalizeOverFunction.jvp``); the
``cpu`` and ``triton`` kernels hand calls with a tangent to PyTorch's kernel
(tests/test_cpu_autograd.py covers that dispatch).
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import batchnorm.functional as BF
from batchnorm.nn import BatchRenorm

C = 6


def _tensors(*shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in shapes]


def _jvp(fn, primals, tangents):
    """fn's output and its tangent, the inputs made dual where a tangent is given."""
    with fwAD.dual_level():
        duals = [p if t is None else fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        out = fn(*duals)
        primal, tangent = fwAD.unpack_dual(out)
    assert tangent is not None, "the output lost its tangent"
    return primal, tangent


# Which inputs carry a tangent: x, gamma, beta (each alone, and all three).
WHICH = [(True, False, False), (False, True, False), (False, False, True), (True, True, True)]


@pytest.mark.parametrize("which", WHICH, ids=["x", "gamma", "beta", "all"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_explicit_batch_norm_tangent_matches_torch(training, which):
    x, tx, w, tw, b, tb = _tensors((8, C, 4, 3), (8, C, 4, 3), (C,), (C,), (C,), (C,))
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    tangents = [t if on else None for t, on in zip((tx, tw, tb), which)]

    def ours(x, w, b):
        return BF.batch_norm(x, rm.clone(), rv.clone(), w, b, training, backend="explicit")

    def theirs(x, w, b):
        return F.batch_norm(x, rm.clone(), rv.clone(), w, b, training)

    got = _jvp(ours, (x, w, b), tangents)
    expected = _jvp(theirs, (x, w, b), tangents)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])


def test_explicit_batch_norm_tangent_against_finite_differences_with_eps_zero():
    # eps=0 in training: a case PyTorch's kernel refuses, so the formula stands alone here.
    (x, tx) = _tensors((16, C), (16, C))

    def f(x):
        return BF.batch_norm(x, None, None, None, None, True, eps=0.0, backend="explicit")

    _, tangent = _jvp(f, (x,), (tx,))
    h = 1e-6
    finite = (f(x + h * tx) - f(x - h * tx)) / (2 * h)
    torch.testing.assert_close(tangent, finite, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "ours, theirs, param_shape",
    [
        (
            lambda x, w, b: BF.layer_norm(x, (C, 4, 3), w, b, backend="explicit"),
            lambda x, w, b: F.layer_norm(x, (C, 4, 3), w, b),
            (C, 4, 3),
        ),
        (
            lambda x, w, b: BF.group_norm(x, 3, w, b, backend="explicit"),
            lambda x, w, b: F.group_norm(x, 3, w, b),
            (C,),
        ),
        (
            lambda x, w, b: BF.instance_norm(x, None, None, w, b, backend="explicit"),
            lambda x, w, b: F.instance_norm(x, None, None, w, b),
            (C,),
        ),
    ],
    ids=["layer_norm", "group_norm", "instance_norm"],
)
def test_explicit_per_sample_norms_tangent_matches_torch(ours, theirs, param_shape):
    x, tx = _tensors((5, C, 4, 3), (5, C, 4, 3))
    w, tw, b, tb = _tensors(param_shape, param_shape, param_shape, param_shape, seed=1)
    got = _jvp(ours, (x, w, b), (tx, tw, tb))
    expected = _jvp(theirs, (x, w, b), (tx, tw, tb))
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])


def test_batch_renorm_tangent_against_finite_differences():
    (x, tx) = _tensors((12, C, 3), (12, C, 3))
    layer = BatchRenorm(C).double()
    state = {k: v.clone() for k, v in layer.state_dict().items()}

    def f(x):
        layer.load_state_dict(state)  # each call from the same running statistics
        return layer(x)

    _, tangent = _jvp(f, (x,), (tx,))
    h = 1e-6
    finite = (f(x + h * tx) - f(x - h * tx)) / (2 * h)
    torch.testing.assert_close(tangent, finite, rtol=1e-6, atol=1e-7)


def test_func_jvp_of_explicit_batch_norm():
    x, tx = _tensors((8, C), (8, C))

    def f(x):
        return BF.batch_norm(x, None, None, None, None, True, backend="explicit")

    def g(x):
        return F.batch_norm(x, None, None, None, None, True)

    got = _jvp(f, (x,), (tx,))[1]
    torch.testing.assert_close(got, torch.func.jvp(g, (x,), (tx,))[1])
