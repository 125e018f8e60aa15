"""Gradient explosion at initialization in deep batch-normalized networks (Yang et al. 2019).

Claim (Yang, Pennington, Rao, Sohl-Dickstein, Schoenholz, "A Mean Field Theory of Batch
Normalization", arXiv 1902.08129; SPEC.md 4.3): at initialization, in a deep fully-connected
network with BN before the nonlinearity, the squared gradient norm grows by a factor lambda > 1
per layer going backwards, for every batch size B; for ReLU
``lambda(B) -> pi/(pi - 1)`` and for the linear network ``lambda(B) = (B - 2)/(B - 3)``. The
maximal trainable depth is about ``16 / ln(lambda)``; residual connections and a larger eps
reduce the explosion. The paper's figures: lambda against B (theory and measurement), and a
depth x batch-size trainability heat map on MNIST (width 384, eps 1e-3).

Protocol. (a) lambda by Monte Carlo (:func:`~batchnorm.lab.theory.gradient_explosion.
gradient_growth`: width ``mc_width``, depth ``mc_depth``, ``mc_repeats`` networks, eps = 0,
float64) for ReLU, tanh and linear at each B in ``mc_batch_sizes``, beside the closed forms
(:func:`relu_lambda`, :func:`linear_lambda`). (b) The trainability grid, scaled down from the
paper: for each B in ``batch_sizes`` the depths are ``depth_factors`` times the predicted limit
``16 / ln(relu_lambda(B))`` (rounded), so that every batch size has networks well inside and
well beyond its own limit. ReLU networks of width ``width`` (the first layer maps the 784 pixels
to ``width``; every layer is linear -> BN -> ReLU), W ~ N(0, 1/fan_in), BN
(:class:`batchnorm.nn.BatchNorm1d`, eps ``eps``), plain SGD for ``epochs`` passes over
``train_subset`` images at every B (equal epochs, so a small batch is not short-changed), the
learning rate ``lr`` at batch 32 scaled linearly with B. Evaluation in inference mode with
population statistics recomputed after training (Algorithm 2, :func:`batchnorm.inference.
recalibrate`, over ``popstat_examples`` training images in batches of B), on the first
``test_subset`` test images; train accuracy the same on the first ``test_subset`` training
images. A cell "trains" if its mean final test accuracy over seeds is at least
``trainable_acc``. The prediction: it trains iff depth <= 16 / ln(relu_lambda(B)). (c) Remedies
at the deepest depth of the smallest B: residual connections (``x + ReLU(BN(Wx))``) and eps =
``remedy_eps``, by Monte Carlo lambda and by training.

Rules (in code): (1) for ReLU and linear, the Monte Carlo lambda is within ``rel_tol`` of the
closed form at every B >= 8 (the module's finite-width bias makes B = 4 unreliable); (2) lambda
> 1 for every nonlinearity and B; (3) the trainability grid agrees with the depth prediction on
at least 75% of the cells, "not tested" when the shallowest network of some batch size did not
reach ``train_floor`` train accuracy (the protocol, not depth, would then decide); (4) both
remedies give a smaller Monte Carlo lambda than the plain network at the smallest B; (5) each
remedy's test accuracy at the deepest depth and smallest B exceeds the plain network's, paired
by seed, by more than two standard errors of the per-seed differences (at least 0.005), "not
tested" when the plain network trains there (nothing to remedy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchnorm.lab.config import DataConfig, param
from batchnorm.lab.data import DATASETS
from batchnorm.lab.experiment import (
    Claim,
    Comparison,
    Context,
    Experiment,
    Measurement,
    md_table,
)
from batchnorm.lab.io import remove_checked
from batchnorm.lab.loop import ModelTask, run_loop
from batchnorm.lab.progress import bar
from batchnorm.lab.rules import (
    baseline_metrics,
    beyond_tolerance,
    gate,
    paired_tolerance,
    untrained,
)
from batchnorm.lab.samplers import TorchEpochs
from batchnorm.lab.theory.gradient_explosion import (
    gradient_growth,
    linear_lambda,
    relu_lambda,
    trainable_depth,
)
from batchnorm.nn import BatchNorm1d

__all__ = ["Config", "Numbers", "EXPERIMENT", "measure", "judge", "grid_depths"]

MC_NONLINEARITIES = ("relu", "tanh", "linear")
CLOSED = {"relu": relu_lambda, "linear": linear_lambda}


def grid_depths(batch_size: int, factors: tuple[float, ...]) -> list[int]:
    """The grid's depths at ``batch_size``: each factor times the predicted limit
    ``16 / ln(relu_lambda(B))``, rounded, at least 2, without repeats.

    >>> grid_depths(4, (0.5, 2.0))
    [7, 28]
    """
    limit = trainable_depth(relu_lambda(batch_size))
    return sorted({max(2, int(round(f * limit))) for f in factors})


@dataclass(frozen=True)
class Config(DataConfig):
    """lambda by Monte Carlo, the trainability grid and the remedies. Defaults: full protocol."""

    mc_batch_sizes: tuple[int, ...] = param((4, 8, 16, 32, 64), "batch sizes B for lambda")
    mc_width: int = param(256, "width N of the Monte Carlo networks")
    mc_depth: int = param(30, "depth of the Monte Carlo networks")
    mc_repeats: int = param(10, "independent networks per Monte Carlo estimate")
    mc_skip: int = param(5, "layers left out of the fit at each end")
    rel_tol: float = param(0.05, "allowed relative gap between Monte Carlo and closed form")
    dataset: str = param("mnist", "data set of the trainability grid", choices=DATASETS)
    depth_factors: tuple[float, ...] = param(
        (0.5, 0.75, 1.5, 2.0),
        "grid depths per batch size, as multiples of its predicted limit 16 / ln lambda(B)",
    )
    batch_sizes: tuple[int, ...] = param(
        (4, 16, 64), "batch sizes of the grid (those of the Monte Carlo, 4 ... 64)"
    )
    width: int = param(64, "width of the grid networks (the paper: 384)")
    eps: float = param(1e-3, "BN eps of the grid networks (the paper's 1e-3)")
    lr: float = param(0.05, "plain SGD learning rate at batch 32 (scaled linearly with B)")
    epochs: float = param(2.0, "passes over the training subset, the same at every B")
    train_subset: int = param(10_000, "training images used")
    popstat_examples: int = param(
        2000, "training images (in batches of B) for the population statistics (Algorithm 2)"
    )
    trainable_acc: float = param(0.5, "mean final test accuracy for a cell to 'train'")
    train_floor: float = param(
        0.5, "train accuracy the shallowest network of every B must reach for rule (3)"
    )
    test_subset: int = param(2000, "test images evaluated (and training images for train acc)")
    remedy_eps: float = param(1.0, "the larger eps of the eps remedy")
    seeds: int = param(3, "seeds per cell (initial weights and batches)")
    threads: int = param(1, "torch CPU threads (0 = as many as there are idle cores)")

    def validate(self) -> None:
        """Checks across fields; raises ValueError with what to change."""
        for name in ("mc_batch_sizes", "batch_sizes"):
            if not getattr(self, name) or min(getattr(self, name)) < 4:
                raise ValueError(f"{name} must list batch sizes >= 4, got {getattr(self, name)}")
        if not self.depth_factors or min(self.depth_factors) <= 0:
            raise ValueError(f"depth_factors must list positive numbers, got {self.depth_factors}")
        if self.mc_depth < 2 * self.mc_skip + 3:
            raise ValueError(f"mc_depth must be at least 2 * mc_skip + 3, got {self.mc_depth}")
        if self.mc_repeats < 2:
            raise ValueError(f"mc_repeats must be at least 2, got {self.mc_repeats}")
        for name in ("mc_width", "width", "seeds", "test_subset", "popstat_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("rel_tol", "lr", "remedy_eps", "epochs"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)}")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {self.eps}")
        for name in ("trainable_acc", "train_floor"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in (0, 1), got {getattr(self, name)}")
        if self.train_subset < max(self.batch_sizes):
            raise ValueError(
                f"train_subset ({self.train_subset}) must hold a batch of {max(self.batch_sizes)}"
            )

    def quick(self) -> Config:
        """A smoke test: small Monte Carlo, two batch sizes, one depth on each side, 2 seeds."""
        return replace(
            self,
            mc_batch_sizes=(4, 8, 16),
            mc_width=64,
            mc_depth=16,
            mc_repeats=4,
            mc_skip=3,
            depth_factors=(0.5, 2.0),
            batch_sizes=(8, 32),
            width=32,
            epochs=1.0,
            train_subset=1000,
            popstat_examples=256,
            test_subset=500,
            seeds=2,
        )

    def steps_for(self, batch_size: int) -> int:
        """SGD steps for ``epochs`` passes over the training subset at ``batch_size``."""
        return max(1, int(round(self.epochs * self.train_subset / batch_size)))

    def lr_for(self, batch_size: int) -> float:
        """The linear scaling rule (Goyal et al. 2017): ``lr * batch_size / 32``."""
        return self.lr * batch_size / 32


class DeepBNNet(torch.nn.Module):
    """``x^l = x^(l-1)[residual] + ReLU(BN(W^l x^(l-1)))``, then a linear readout."""

    def __init__(
        self, inputs: int, width: int, depth: int, classes: int, eps: float, residual: bool
    ) -> None:
        super().__init__()
        sizes = [inputs] + [width] * depth
        self.linears = torch.nn.ModuleList(
            torch.nn.Linear(a, b, bias=False) for a, b in zip(sizes[:-1], sizes[1:])
        )
        # Running buffers only hold the population statistics computed after training
        # (recalibrate); training always normalizes with the batch's statistics.
        self.norms = torch.nn.ModuleList(BatchNorm1d(width, eps=eps) for _ in range(depth))
        self.readout = torch.nn.Linear(width, classes)
        self.residual = residual
        with torch.no_grad():
            for layer in [*self.linears, self.readout]:
                layer.weight.normal_(0.0, 1.0 / math.sqrt(layer.weight.shape[1]))
            self.readout.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (linear, norm) in enumerate(zip(self.linears, self.norms)):
            out = torch.relu(norm(linear(x)))
            x = x + out if (self.residual and i > 0) else out
        return self.readout(x)


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(x[i : i + 1000]).argmax(1) for i in range(0, len(y), 1000)])
    model.train()
    return float((pred == y).double().mean())


def _train_cell(
    data,
    config: Config,
    depth: int,
    batch: int,
    seed: int,
    checkpoint: Path | None = None,
    **variant,
) -> tuple[float, float]:
    """Train one network; its final (test, train) accuracy with population statistics
    (nan, nan if the loss became non-finite). With ``checkpoint``, an interrupted network
    continues where it stopped (the lab's loop, :func:`batchnorm.lab.loop.run_loop`)."""
    from batchnorm.inference import recalibrate

    torch.manual_seed(seed)
    eps = variant.get("eps", config.eps)
    model = DeepBNNet(
        data.num_features,
        config.width,
        depth,
        data.num_classes,
        eps,
        variant.get("residual", False),
    )
    job = _CellJob(model, data, config.lr_for(batch), batch, seed)
    loop = run_loop(
        job,
        steps=config.steps_for(batch),
        desc=f"depth {depth}, batch {batch}, seed {seed}",
        checkpoint=checkpoint,
        signature=[depth, batch, seed, eps, bool(variant.get("residual", False))],
    )
    if loop.stopped:
        return math.nan, math.nan
    x, y, gen = job.x, job.y, job.sampler.generator
    # Algorithm 2: population statistics over training batches of the training size B.
    pop = torch.randperm(len(y), generator=gen)[: config.popstat_examples]
    batches = [x[c] for c in pop.split(batch) if len(c) == batch]
    recalibrate(model, batches, progress=False)
    n = config.test_subset
    test = _accuracy(model, torch.from_numpy(data.test_x[:n]), torch.from_numpy(data.test_y[:n]))
    train = _accuracy(model, x[:n], y[:n])
    return test, train


class _CellJob(ModelTask):
    """One :func:`_train_cell` network as a :class:`batchnorm.lab.loop.Task`: plain SGD on
    reshuffled epochs (:class:`batchnorm.lab.samplers.TorchEpochs`)."""

    def __init__(self, model: torch.nn.Module, data, lr: float, batch: int, seed: int) -> None:
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        self.x = torch.from_numpy(data.train_x)
        self.y = torch.from_numpy(data.train_y)
        self.sampler = TorchEpochs(len(self.y), batch, seed)

    def train_step(self, step: int) -> bool:
        idx = self.sampler.next()
        loss = torch.nn.functional.cross_entropy(self.model(self.x[idx]), self.y[idx])
        if not torch.isfinite(loss):
            return False
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return True

    def evaluate(self, step: int) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        super().load_state_dict(state, step)
        self.sampler.load_state_dict(state["sampler"])


@dataclass
class LambdaNumbers:
    """One Monte Carlo estimate of lambda."""

    nonlinearity: str
    batch_size: int
    growth: float  # the measured lambda
    theory: float  # the closed form's lambda (nan: none for this nonlinearity)


@dataclass
class GridCell:
    """One cell of the trainability grid: final test and train accuracy per seed (nan:
    diverged)."""

    depth: int
    batch_size: int
    accs: list[float]
    train_accs: list[float]


@dataclass
class Numbers:
    """What the claims are decided on."""

    rel_tol: float  # the config's tolerance of the closed forms
    trainable_acc: float  # the config's test accuracy that counts as trained
    train_floor: float  # the config's train accuracy the shallowest networks must reach
    remedy_eps: float
    lambdas: list[LambdaNumbers]  # in the order measured
    grid: list[GridCell]
    predicted_depth: dict[int, float]  # 16 / ln lambda_ReLU(B), by batch size B
    b_min: int  # the smallest Monte Carlo batch size
    plain_lambda: float  # lambda of the plain ReLU network at b_min
    remedy_lambda: dict[str, float]  # lambda of each remedy at b_min
    deep: int  # the deepest grid depth of the smallest grid batch size
    small: int  # the smallest grid batch size
    plain_acc: list[float]  # the plain network at (deep, small), per seed
    remedy_acc: dict[str, list[float]]  # each remedy at (deep, small), per seed


def _mean_acc(values: list[float]) -> float:
    return float(np.mean(np.nan_to_num(values, nan=0.0)))  # diverged counts as 0


def judge(
    numbers: Numbers,
    *,
    closed_form_min_batch: int = 8,
    explosion_floor: float = 1.0,
    agreement_share: float = 0.75,
    spread_factor: float = 2.0,
    min_tolerance: float = 0.005,
) -> list[Claim]:
    """Decide the claims from ``numbers`` alone.

    Args:
        numbers: what :func:`measure` measured.
        closed_form_min_batch: "closed form" checks the batch sizes from this one up (the
            tolerance itself is the config's ``rel_tol``, saved in the numbers).
        explosion_floor: "explosion" holds when every lambda is above this (1: no growth).
        agreement_share: "trainable depth" holds when the prediction agrees with the grid on at
            least this share of its cells (a tie holds).
        spread_factor, min_tolerance: "remedies train" holds when each remedy's test accuracy
            minus the plain network's, paired by seed, has a mean above
            :func:`~batchnorm.lab.rules.paired_tolerance` of these (0.005: 10 of the 2,000 test
            images, so that a hair's difference does not count).
    """
    n = numbers
    checked = [
        e for e in n.lambdas if e.nonlinearity in CLOSED and e.batch_size >= closed_form_min_batch
    ]
    rel = {(e.nonlinearity, e.batch_size): abs(e.growth / e.theory - 1.0) for e in checked}
    trains = {(c.depth, c.batch_size): _mean_acc(c.accs) >= n.trainable_acc for c in n.grid}
    agree = {k: trains[k] == (k[0] <= n.predicted_depth[k[1]]) for k in trains}
    agreement = float(np.mean(list(agree.values()))) if agree else math.nan
    shallowest = {}
    for c in n.grid:
        if c.batch_size not in shallowest or c.depth < shallowest[c.batch_size].depth:
            shallowest[c.batch_size] = c
    grid_reason = untrained(
        {
            f"depth {c.depth} at B={b} (train accuracy)": np.nan_to_num(c.train_accs, nan=0.0)
            for b, c in sorted(shallowest.items())
        },
        floor=n.train_floor,
    )
    plain = np.nan_to_num(np.asarray(n.plain_acc, dtype=np.float64), nan=0.0)
    gains = {
        k: np.nan_to_num(np.asarray(v, dtype=np.float64), nan=0.0) - plain
        for k, v in n.remedy_acc.items()
    }
    tol = {
        k: paired_tolerance(d, spread_factor=spread_factor, min_tolerance=min_tolerance)
        for k, d in gains.items()
    }
    remedies_train = all(
        beyond_tolerance(d, spread_factor=spread_factor, min_tolerance=min_tolerance)
        for d in gains.values()
    )
    plain_acc = _mean_acc(n.plain_acc)
    remedy_reason = (
        f"the plain network trains at depth {n.deep}, B={n.small} ({plain_acc:.3f} >= "
        f"{n.trainable_acc:g}): nothing to remedy"
        if plain_acc >= n.trainable_acc
        else None
    )
    cells = ", ".join(
        f"d={k[0]} B={k[1]} {'trains' if trains[k] else 'fails'}"
        + ("" if agree[k] else " (disagrees)")
        for k in sorted(trains, key=lambda k: (k[1], k[0]))
    )
    return [
        Claim(
            "closed form",
            "The closed forms of lambda(B) for ReLU and linear match the measured growth.",
            f"|lambda_MC / lambda_theory - 1| <= {n.rel_tol:g} for ReLU and linear, "
            f"B >= {closed_form_min_batch}",
            bool(checked) and max(rel.values()) <= n.rel_tol,
            (
                f"largest relative gap {max(rel.values()):.3f} "
                f"({max(rel, key=rel.get)[0]}, B={max(rel, key=rel.get)[1]})"
                if checked
                else f"no batch size >= {closed_form_min_batch} measured"
            ),
        ),
        Claim(
            "explosion",
            "Gradients explode at initialization for every batch size: lambda > 1.",
            "Monte Carlo lambda > "
            + ("1" if explosion_floor == 1.0 else f"{explosion_floor:g}")
            + " for ReLU, tanh and linear at every B",
            all(e.growth > explosion_floor for e in n.lambdas),
            f"smallest lambda {min(e.growth for e in n.lambdas):.4f}",
        ),
        gate(
            Claim(
                "trainable depth",
                "Networks train up to a depth of about 16 / ln(lambda).",
                "trained (mean test acc with population statistics >= "
                f"{n.trainable_acc:g}) == (depth <= 16/ln lambda_ReLU(B)) on >= "
                f"{agreement_share:.0%} of the grid cells, whose depths straddle each B's limit",
                bool(agree) and bool(agreement >= agreement_share),
                f"agreement on {sum(agree.values())}/{len(agree)} cells: {cells}",
            ),
            grid_reason,
        ),
        Claim(
            "remedies reduce lambda",
            "Residual connections and a larger eps reduce the gradient explosion.",
            f"Monte Carlo lambda (ReLU, B={n.b_min}) with each remedy below the plain network's",
            all(g < n.plain_lambda for g in n.remedy_lambda.values()),
            f"plain {n.plain_lambda:.3f}; "
            + ", ".join(f"{k} {g:.3f}" for k, g in n.remedy_lambda.items()),
        ),
        gate(
            Claim(
                "remedies train",
                "With the remedies, a network too deep for its batch size trains better.",
                f"test acc at depth {n.deep}, B={n.small}, each remedy minus plain paired by "
                f"seed: mean above {spread_factor:g} standard errors of the differences (at "
                f"least {min_tolerance:g})",
                remedies_train,
                f"plain {plain_acc:.3f}; "
                + "; ".join(
                    f"{k if k == 'residual' else f'eps={n.remedy_eps:g}'} "
                    f"{_mean_acc(n.remedy_acc[k]):.3f} (gain {gains[k].mean():+.3f}, tolerance "
                    f"{tol[k]:.3f})"
                    for k in n.remedy_acc
                ),
            ),
            remedy_reason,
        ),
    ]


def measure(config: Config, ctx: Context) -> Measurement:
    """Monte Carlo lambda, the trainability grid, the remedies; measure; plot."""
    mc_kwargs = dict(
        depth=config.mc_depth,
        repeats=config.mc_repeats,
        skip_first=config.mc_skip,
        skip_last=config.mc_skip,
        seed=config.seed,
    )
    lam: dict[tuple[str, int], object] = {}
    with ctx.timer("Monte Carlo lambda"):
        jobs = [(nl, b) for nl in MC_NONLINEARITIES for b in config.mc_batch_sizes]
        for nl, b in bar(jobs, desc="lambda (Monte Carlo)"):
            lam[nl, b] = gradient_growth(config.mc_width, b, nonlinearity=nl, **mc_kwargs)
        b_min = min(config.mc_batch_sizes)
        remedy_lam = {
            "residual": gradient_growth(config.mc_width, b_min, residual=True, **mc_kwargs),
            f"eps={config.remedy_eps:g}": gradient_growth(
                config.mc_width, b_min, eps=config.remedy_eps, **mc_kwargs
            ),
        }
    lambda_rows = []
    for (nl, b), est in lam.items():
        theory = CLOSED[nl](b) if nl in CLOSED else math.nan
        lambda_rows.append(
            {
                "nonlinearity": nl,
                "batch_size": b,
                "lambda_mc": est.growth,
                "ci_low": est.ci_low,
                "ci_high": est.ci_high,
                "lambda_theory": theory,
            }
        )
    ctx.write_csv("lambda.csv", lambda_rows, list(lambda_rows[0]))

    data = ctx.load_data(config.dataset, config.train_subset, config.test_subset)
    seeds = config.seed_list()
    depths = {b: grid_depths(b, config.depth_factors) for b in config.batch_sizes}
    grid: dict[tuple[int, int], list[tuple[float, float]]] = {}
    grid_rows = []

    def rows_of(variant: str, d: int, b: int, results: list[tuple[float, float]]) -> list[dict]:
        return [
            {
                "variant": variant,
                "depth": d,
                "batch_size": b,
                "seed": s,
                "test_acc": a,
                "train_acc": t,
                "steps": config.steps_for(b),
                "lr": config.lr_for(b),
            }
            for s, (a, t) in zip(seeds, results)
        ]

    def cached_cell(key: str, depth: int, batch: int, **variant) -> list[tuple[float, float]]:
        """One cell's seeds as a job of the run (jobs/<key>.json): a resumed run skips it."""

        def run() -> list[list[float]]:
            return [
                list(
                    _train_cell(
                        data, config, depth, batch, s, ctx.checkpoint(f"{key}-s{s}"), **variant
                    )
                )
                for s in seeds
            ]

        saved = ctx.cached(key, run, as_json=True)  # JSON keeps a NaN as None
        for s in seeds:
            remove_checked(ctx.run_dir / "jobs" / f"{key}-s{s}.ckpt")
        return [tuple(math.nan if v is None else float(v) for v in pair) for pair in saved]

    with ctx.timer("trainability grid"):
        cells = [(d, b) for b in config.batch_sizes for d in depths[b]]
        for d, b in bar(cells, desc="trainability grid"):
            grid[d, b] = cached_cell(f"grid-d{d}-b{b}", d, b)
            grid_rows += rows_of("plain", d, b, grid[d, b])
    small = min(config.batch_sizes)
    deep = max(depths[small])
    remedy: dict[str, list[tuple[float, float]]] = {}
    with ctx.timer("remedies"):
        for name, variant in (
            ("residual", {"residual": True}),
            ("eps", {"eps": config.remedy_eps}),
        ):
            remedy[name] = cached_cell(f"remedy-{name}-d{deep}-b{small}", deep, small, **variant)
            grid_rows += rows_of(name, deep, small, remedy[name])
    ctx.write_csv("grid.csv", grid_rows, list(grid_rows[0]))

    def mean_acc(values: list[float]) -> float:
        return float(np.mean(np.nan_to_num(values, nan=0.0)))  # diverged counts as 0

    test = {k: [a for a, _ in v] for k, v in grid.items()}
    train = {k: [t for _, t in v] for k, v in grid.items()}
    predicted = {b: trainable_depth(relu_lambda(b)) for b in config.batch_sizes}
    trains = {k: mean_acc(v) >= config.trainable_acc for k, v in test.items()}
    agree = {k: trains[k] == (k[0] <= predicted[k[1]]) for k in grid}
    agreement = float(np.mean(list(agree.values())))
    plain_small = lam["relu", b_min].growth
    numbers = Numbers(
        rel_tol=config.rel_tol,
        trainable_acc=config.trainable_acc,
        train_floor=config.train_floor,
        remedy_eps=config.remedy_eps,
        lambdas=[
            LambdaNumbers(nl, b, float(est.growth), CLOSED[nl](b) if nl in CLOSED else math.nan)
            for (nl, b), est in lam.items()
        ],
        grid=[GridCell(d, b, test[d, b], train[d, b]) for (d, b) in grid],
        predicted_depth={b: float(v) for b, v in predicted.items()},
        b_min=b_min,
        plain_lambda=float(plain_small),
        remedy_lambda={k: float(e.growth) for k, e in remedy_lam.items()},
        deep=deep,
        small=small,
        plain_acc=test[deep, small],
        remedy_acc={k: [a for a, _ in v] for k, v in remedy.items()},
    )
    comparisons = []
    for b in config.mc_batch_sizes:
        for nl in MC_NONLINEARITIES:
            est = lam[nl, b]
            theory = f"{CLOSED[nl](b):.4f}" if nl in CLOSED else "no closed form"
            comparisons.append(
                Comparison(
                    f"lambda, {nl}, B={b}",
                    theory,
                    f"{est.growth:.4f} [{est.ci_low:.4f}, {est.ci_high:.4f}]",
                    value=est.growth,
                )
            )
    comparisons.append(
        Comparison("lambda, ReLU, B -> infinity", f"pi/(pi-1) = {math.pi / (math.pi - 1):.4f}", "-")
    )
    for b in config.batch_sizes:
        comparisons.append(
            Comparison(
                f"max trainable depth, B={b}",
                f"16/ln lambda = {predicted[b]:.1f}",
                ", ".join(f"d={d}: {mean_acc(test[d, b]):.3f}" for d in depths[b]),
            )
        )
    grid_table = md_table(
        ["B (predicted limit)", "depth", "test acc", "train acc", "trains?", "prediction"],
        [
            [
                f"{b} ({predicted[b]:.1f})",
                str(d),
                f"{mean_acc(test[d, b]):.3f}",
                f"{mean_acc(train[d, b]):.3f}",
                "trains" if trains[d, b] else "fails",
                ("trains" if d <= predicted[b] else "fails")
                + ("" if agree[d, b] else " (disagrees)"),
            ]
            for b in config.batch_sizes
            for d in depths[b]
        ],
    )
    remedy_table = md_table(
        ["network", "test acc", "train acc"],
        [
            [
                f"plain, depth {deep}, B={small}",
                f"{mean_acc(test[deep, small]):.3f}",
                f"{mean_acc(train[deep, small]):.3f}",
            ]
        ]
        + [
            [
                f"{k if k == 'residual' else f'eps={config.remedy_eps:g}'}",
                f"{mean_acc([a for a, _ in v]):.3f}",
                f"{mean_acc([t for _, t in v]):.3f}",
            ]
            for k, v in remedy.items()
        ],
    )
    with ctx.timer("plots"):
        _plot(ctx, config, lam, test, predicted, depths)
    shallow = [(min(depths[b]), b) for b in config.batch_sizes]
    largest = max(config.batch_sizes)
    base = (min(depths[largest]), largest)
    return Measurement(
        numbers=numbers,
        comparisons=comparisons,
        metrics={
            "lambda": lambda_rows,
            "remedy_lambda": {k: e.growth for k, e in remedy_lam.items()},
            "grid_depths": {str(b): depths[b] for b in config.batch_sizes},
            "grid_test_acc": {f"depth={d} B={b}": v for (d, b), v in test.items()},
            "grid_train_acc": {f"depth={d} B={b}": v for (d, b), v in train.items()},
            "remedy_test_acc": {k: [a for a, _ in v] for k, v in remedy.items()},
            "remedy_train_acc": {k: [t for _, t in v] for k, v in remedy.items()},
            "predicted_depth": {str(b): v for b, v in predicted.items()},
            "agreement": agreement,
            "steps": {str(b): config.steps_for(b) for b in config.batch_sizes},
            "shallowest_train_acc": {f"depth={d} B={b}": mean_acc(train[d, b]) for d, b in shallow},
            "baseline": f"ReLU + BN, depth {base[0]} (half the predicted limit), B={base[1]}",
            **baseline_metrics(np.nan_to_num(train[base], nan=0.0), np.nan_to_num(test[base])),
        },
        tables=[
            ("Trainability grid: mean final accuracy (population statistics)", grid_table),
            ("Remedies at the deepest depth of the smallest batch", remedy_table),
        ],
        figures=[
            (
                "explosion.png",
                "lambda against B: Monte Carlo (95% interval) for ReLU, tanh, linear and the "
                "closed forms; test accuracy against depth / predicted limit, by batch size",
            )
        ],
        choices=[
            f"Monte Carlo: width {config.mc_width}, depth {config.mc_depth}, "
            f"{config.mc_repeats} repeats, fit skipping {config.mc_skip} layers at each end, "
            "eps = 0, float64, random linear loss",
            "grid depths per batch size: "
            + "; ".join(f"B={b}: {depths[b]}" for b in config.batch_sizes)
            + f" ({', '.join(f'{f:g}' for f in config.depth_factors)} x 16/ln lambda(B)), so "
            "that each B has networks on both sides of its own predicted limit (the paper's "
            "heat map spans depths up to ~100 at every B)",
            f"scaled-down training (the paper: width 384, eps 1e-3, its own learning rates, "
            f"longer training): width {config.width}, eps {config.eps:g}, plain SGD, "
            f"{config.epochs:g} epochs of {config.train_subset} images at every B (steps: "
            + ", ".join(f"B={b}: {config.steps_for(b)}" for b in config.batch_sizes)
            + f"), learning rate {config.lr:g} x B/32 (linear scaling, Goyal et al. 2017), "
            f"{config.seeds} seeds",
            "evaluation in inference mode with population statistics (Algorithm 2, "
            f"batchnorm.inference.recalibrate over {config.popstat_examples} training images in "
            f"batches of B) on the first {config.test_subset} test images; train accuracy the "
            f"same on the first {config.test_subset} training images",
            "the first layer (784 -> width) counts as one of the depth layers; residual "
            "connections skip every layer but the first",
            f"'trains': mean test accuracy >= {config.trainable_acc:g}; rule (3) needs the "
            f"shallowest network of every B to reach train accuracy {config.train_floor:g}",
        ],
        notes=[
            "The closed forms are from SPEC.md 4.3 (the paper's text was not available); "
            "finite width biases the Monte Carlo estimate low by O(1/N), most at small B.",
            "The grid is far shorter than the paper's training: 'fails' means not reaching "
            f"{config.trainable_acc} test accuracy within {config.epochs:g} epochs of "
            f"{config.train_subset} images.",
        ],
    )


def _plot(ctx: Context, config: Config, lam, test, predicted, depths) -> None:
    from batchnorm.lab.plots import new_figure

    figure, axes = new_figure(2, 1, size=(4.8, 3.6))
    ax = axes[0, 0]
    bs = np.array(config.mc_batch_sizes)
    for nl in MC_NONLINEARITIES:
        est = [lam[nl, b] for b in bs]
        g = np.array([e.growth for e in est])
        err = np.array([[e.growth - e.ci_low for e in est], [e.ci_high - e.growth for e in est]])
        ax.errorbar(bs, g, yerr=err, fmt="o", capsize=3, label=f"{nl} (Monte Carlo)")
    fine = np.arange(4, int(bs.max()) + 1)
    ax.plot(fine, [relu_lambda(int(b)) for b in fine], "k-", label="ReLU closed form")
    ax.plot(fine, [linear_lambda(int(b)) for b in fine], "k--", label="linear closed form")
    ax.axhline(math.pi / (math.pi - 1), color="gray", linewidth=0.8, label="pi/(pi-1)")
    ax.set(xscale="log", xlabel="batch size B", ylabel="lambda", title="gradient growth per layer")
    ax.set_xticks(bs, [str(b) for b in bs])
    ax.minorticks_off()
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[0, 1]
    for b in config.batch_sizes:
        ds = depths[b]
        acc = [float(np.mean(np.nan_to_num(test[d, b], nan=0.0))) for d in ds]
        ax.plot([d / predicted[b] for d in ds], acc, "o-", label=f"B={b}")
    ax.axvline(1.0, color="red", linewidth=1, label="16 / ln lambda")
    ax.axhline(config.trainable_acc, color="gray", linewidth=0.8, linestyle=":")
    ax.set(
        xlabel="depth / predicted limit",
        ylabel="final test accuracy",
        ylim=(0, 1),
        title="ReLU + BN on " + config.dataset,
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ctx.save_figure(figure, "explosion.png")


EXPERIMENT = Experiment(
    name="explosion",
    title="Gradient explosion in deep BN networks (Yang et al. 2019)",
    claim=(
        "At initialization, gradients of a deep BN network grow by lambda(B) > 1 per layer, as "
        "the closed forms predict; trainable depth is about 16/ln(lambda); residual "
        "connections and a larger eps help."
    ),
    paper=(
        "Yang et al. (2019), lambda against batch size and the depth x batch-size "
        "trainability map on MNIST (scaled down here: smaller width, shorter training, depths "
        "chosen around each batch size's predicted limit)."
    ),
    config_cls=Config,
    numbers_cls=Numbers,
    measure=measure,
    judge=judge,
    summary="gradient growth lambda(B), trainable depth around 16/ln lambda, remedies",
)
