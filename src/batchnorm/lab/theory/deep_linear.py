"""The 25-layer deep linear network of Santurkar et al. (2018), with and without BN.

Santurkar, Tsipras, Ilyas, Madry, arXiv 1805.11604, the deep linear network experiments (SPEC.md
section 4.2): minimize, over 10 x 10 matrices W_1 .. W_25,

    L(W) = sum_(k=1..n) || W_25 ... W_2 W_1 x_k - A x_k ||^2

with A Gaussian (10 x 10), n = 1000 Gaussian samples x_k, full-batch gradient descent, learning
rate 1e-6 (and 1e-7), Glorot initialization, 10k steps. W_1 is applied first (layer 1 is nearest
the input). The BN variant puts :class:`batchnorm.nn.BatchNorm1d` (training mode, batch = all
1000 samples, learnable gamma and beta) after every linear layer but the last.

Conventions chosen here (the paper does not state them; all can be changed by argument):
    - the loss is summed over samples (``reduction="sum"``), which is what makes lr = 1e-6 a
      sensible step for this scale; ``"mean"`` divides by n;
    - Glorot (Xavier) normal initialization, ``W ~ N(0, 2 / (fan_in + fan_out))``;
    - A and x_k have i.i.d. N(0, 1) entries.

Without BN the gradient has a closed form (:func:`closed_form_gradients`), with ``R = P X - A X``
and ``P = W_k ... W_1``::

    dL/dW_i = 2 (W_k ... W_(i+1))^T R (W_(i-1) ... W_1 X)^T      (divided by n for "mean")

:func:`train_deep_linear` returns the loss curve and, at chosen steps, the per-layer internal
covariate shift of :func:`batchnorm.lab.theory.covariate_shift.internal_covariate_shift` (a
layer's group is its W_i plus the gamma, beta of the BN that follows it).

Example:
    >>> problem = make_problem(dim=4, samples=50, seed=0)
    >>> run = train_deep_linear(problem, depth=6, batch_norm=True, lr=1e-3, steps=5, seed=0)
    >>> len(run.losses), bool(run.losses[-1] < run.losses[0])
    (6, True)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from batchnorm.lab.theory.covariate_shift import LayerShift, internal_covariate_shift
from batchnorm.nn import BatchNorm1d

__all__ = [
    "DeepLinearProblem",
    "DeepLinearRun",
    "build_deep_linear",
    "closed_form_gradients",
    "deep_linear_loss",
    "make_problem",
    "train_deep_linear",
]

REDUCTIONS = ("sum", "mean")


@dataclass(frozen=True)
class DeepLinearProblem:
    """The regression target and data.

    Attributes:
        target: A, (dim, dim).
        inputs: X with one sample per column, (dim, samples).
    """

    target: np.ndarray
    inputs: np.ndarray


def make_problem(dim: int = 10, samples: int = 1000, seed: int = 0) -> DeepLinearProblem:
    """A ~ N(0, 1) (dim x dim) and ``samples`` inputs x ~ N(0, I) (columns of X)."""
    for name, value in (("dim", dim), ("samples", samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    rng = np.random.default_rng(seed)
    return DeepLinearProblem(
        target=rng.standard_normal((dim, dim)), inputs=rng.standard_normal((dim, samples))
    )


def build_deep_linear(
    dim: int = 10,
    depth: int = 25,
    *,
    batch_norm: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    **bn_kwargs,
) -> torch.nn.Sequential:
    """``depth`` bias-free ``Linear(dim, dim)`` layers, Glorot-normal initialized, with a
    :class:`batchnorm.nn.BatchNorm1d` after each but the last when ``batch_norm``.

    The same seed gives the same W_i with and without BN.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    generator = torch.Generator().manual_seed(seed)
    std = math.sqrt(2.0 / (dim + dim))
    layers: list[torch.nn.Module] = []
    for i in range(depth):
        linear = torch.nn.Linear(dim, dim, bias=False, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(dim, dim, generator=generator, dtype=dtype) * std)
        layers.append(linear)
        if batch_norm and i < depth - 1:
            layers.append(BatchNorm1d(dim, dtype=dtype, **bn_kwargs))
    return torch.nn.Sequential(*layers)


def _layer_groups(net: torch.nn.Sequential) -> list[list[torch.Tensor]]:
    """One parameter group per linear layer: its weight, then the following BN's gamma, beta."""
    groups: list[list[torch.Tensor]] = []
    for module in net:
        if isinstance(module, torch.nn.Linear):
            groups.append([module.weight])
        else:
            groups[-1].extend(p for p in module.parameters())
    return groups


def deep_linear_loss(
    net: torch.nn.Module, problem: DeepLinearProblem, reduction: str = "sum"
) -> torch.Tensor:
    """``sum_k ||net(x_k) - A x_k||^2`` (or the mean over k), full batch."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    param = next(net.parameters())
    x = torch.as_tensor(problem.inputs.T, dtype=param.dtype)  # (n, dim), samples as rows
    target = x @ torch.as_tensor(problem.target.T, dtype=param.dtype)  # rows (A x_k)^T
    sq = (net(x) - target).square().sum()
    return sq / x.shape[0] if reduction == "mean" else sq


def closed_form_gradients(
    weights: Sequence[np.ndarray],
    inputs: np.ndarray,
    target: np.ndarray,
    reduction: str = "sum",
) -> list[np.ndarray]:
    """``dL/dW_i = 2 (W_k..W_(i+1))^T (P X - A X) (W_(i-1)..W_1 X)^T`` for the BN-free network.

    Args:
        weights: W_1 .. W_k (W_1 applied first), each (dim, dim).
        inputs: X, (dim, n), one sample per column.
        target: A, (dim, dim).
        reduction: "sum" or "mean" over samples.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    W = [np.asarray(w, dtype=np.float64) for w in weights]
    X = np.asarray(inputs, dtype=np.float64)
    A = np.asarray(target, dtype=np.float64)
    # forward[i] = W_i .. W_1 X (forward[0] = X)
    forward = [X]
    for w in W:
        forward.append(w @ forward[-1])
    residual = forward[-1] - A @ X
    scale = 2.0 / X.shape[1] if reduction == "mean" else 2.0
    grads: list[np.ndarray] = [np.empty(0)] * len(W)
    back = residual  # (W_k .. W_(i+1))^T R, built from the top down
    for i in range(len(W) - 1, -1, -1):
        grads[i] = scale * back @ forward[i].T
        back = W[i].T @ back
    return grads


@dataclass(frozen=True)
class DeepLinearRun:
    """Result of :func:`train_deep_linear`.

    Attributes:
        losses: loss before each step and after the last (steps + 1 values).
        shift_steps: the steps at which covariate shift was measured.
        shifts: per measured step, one :class:`LayerShift` per layer.
        batch_norm: whether BN was used.
    """

    losses: np.ndarray
    shift_steps: tuple[int, ...] = ()
    shifts: tuple[tuple[LayerShift, ...], ...] = field(default=())
    batch_norm: bool = False


def train_deep_linear(
    problem: DeepLinearProblem,
    *,
    depth: int = 25,
    batch_norm: bool = False,
    lr: float = 1e-6,
    steps: int = 10_000,
    seed: int = 0,
    reduction: str = "sum",
    shift_every: int = 0,
    checkpoint: Path | None = None,
    desc: str = "deep linear network",
) -> DeepLinearRun:
    """Full-batch gradient descent on the deep linear problem; loss curve and covariate shift.

    Args:
        problem: from :func:`make_problem`.
        depth: number of linear layers (paper: 25).
        batch_norm: BN after every linear layer but the last.
        lr: the GD step (paper: 1e-6 and 1e-7).
        steps: GD steps (paper: 10k).
        seed: initialization seed.
        reduction: "sum" (default) or "mean" over samples.
        shift_every: measure the internal covariate shift every this many steps (0: never),
            before the step is taken, with the step's lr.
        checkpoint: a file to resume from if it exists and to write the state to, by the lab's
            training loop (:func:`batchnorm.lab.loop.run_loop`); a resumed run ends with the
            numbers of an uninterrupted one.
        desc: the progress bar's label.
    """
    from batchnorm.lab.loop import run_loop

    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    dim = problem.target.shape[0]
    net = build_deep_linear(dim, depth, batch_norm=batch_norm, seed=seed)
    net.train()
    task = _GDTask(net, problem, lr, reduction)
    run_loop(
        task,
        steps=steps,
        eval_steps=range(0, steps, shift_every) if shift_every else (),
        desc=desc,
        checkpoint=checkpoint,
        signature=("deep-linear", dim, depth, batch_norm, lr, reduction, seed),
    )
    with torch.no_grad():
        final = float(task.loss_fn())
    return DeepLinearRun(
        losses=np.array([*task.losses, final]),
        shift_steps=tuple(task.shift_steps),
        shifts=tuple(tuple(LayerShift(*row) for row in probe) for probe in task.shifts),
        batch_norm=batch_norm,
    )


class _GDTask:
    """:func:`train_deep_linear` as a task of the lab's loop: one full-batch GD step per
    update, the covariate shift measured at each evaluation (before that step). The probes are
    kept as plain tuples, which a checkpoint stores."""

    saved = ("losses", "shift_steps", "shifts")

    def __init__(
        self, net: torch.nn.Sequential, problem: DeepLinearProblem, lr: float, reduction: str
    ) -> None:
        self.net, self.problem, self.lr, self.reduction = net, problem, lr, reduction
        self.groups = _layer_groups(net)
        self.params = [p for g in self.groups for p in g]
        self.losses: list[float] = []
        self.shift_steps: list[int] = []
        self.shifts: list[list[tuple]] = []

    def loss_fn(self) -> torch.Tensor:
        return deep_linear_loss(self.net, self.problem, self.reduction)

    def evaluate(self, step: int) -> str:
        shift = internal_covariate_shift(self.groups, self.loss_fn, self.lr, module=self.net)
        self.shift_steps.append(step)
        self.shifts.append([dataclasses.astuple(layer) for layer in shift])
        return ""

    def train_step(self, step: int) -> bool:
        loss = self.loss_fn()
        grads = torch.autograd.grad(loss, self.params)
        self.losses.append(float(loss.detach()))
        with torch.no_grad():
            for p, g in zip(self.params, grads):
                p.sub_(self.lr * g)
        return True

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), **{k: getattr(self, k) for k in self.saved}}

    def load_state_dict(self, state: dict, step: int) -> None:
        self.net.load_state_dict(state["net"])
        for name in self.saved:
            setattr(self, name, state[name])
