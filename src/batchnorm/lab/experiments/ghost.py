"""Large batches: the generalization gap comes from too few updates; ghost batch norm and
regime adaptation close it.

Claim (Hoffer, Hubara & Soudry 2017, "Train longer, generalize better", arXiv 1705.08741;
SPEC.md 4.5): at the same number of epochs, large-batch training generalizes worse than
small-batch training. The paper traces the gap to the number of weight updates, not to the
batch size: with the learning rate scaled by the square root of the batch ratio (Sec. 4.1, so
that the update's covariance matches), batch norm's statistics computed over small "ghost"
batches of the large batch (Sec. 4.2, Algorithm 1; 128 in the paper) and as many updates as the
small batch takes ("regime adaptation", Sec. 5, Table 1), the large batch reaches the small
batch's test accuracy. Ghost batch norm alone narrows the gap without more updates (Sec. 4.2).

Protocol (the stand-in): a CNN on a Fashion-MNIST subset it can fit; the small batch
(``batch_size``, 32) at learning rate ``lr`` for ``epochs`` epochs (``S`` steps); the large
batch (``large_batch``, 256) at ``lr * sqrt(large_batch / batch_size)`` with plain BN and with
ghost BN over ``ghost_size`` (32, the small batch, as the paper's 128 is its small batch) for
the same epochs (``S / 8`` steps), and with ghost BN for the same ``S`` steps as the small batch
(regime adaptation; 8 times the epochs). Accuracies on the training subset and on the test set,
both in inference mode; the train/test gap is their difference.

Rules (in code), paired by seed, margins from the seed spread (:mod:`batchnorm.lab.rules`):
(1) *large batch worse*: the small batch's test accuracy minus the large batch's (plain BN,
same epochs) is beyond the margin; (2) *ghost helps*: ghost BN's test accuracy minus plain
BN's at the large batch and the same epochs is beyond the margin; (3) *regime adaptation closes
the gap*: with ghost BN and as many updates as the small batch, the large batch's test accuracy
is not below the small batch's, and its train/test gap not above it, beyond the margins. The
claims are "not tested" when the small-batch baseline (and, for (3), the adapted large batch)
did not fit the training subset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from batchnorm.lab.config import param
from batchnorm.lab.experiment import (
    Claim,
    Comparison,
    Context,
    Experiment,
    Measurement,
    fmt_mean_std,
    md_table,
)
from batchnorm.lab.experiments.cnn import (
    CURVE_FIELDS,
    NetJob,
    ScheduledConvConfig,
    common_choices,
    final_acc,
    iid_batches,
    image_data,
    job_curve_rows,
    schedule_text,
    train_jobs,
)
from batchnorm.lab.experiments.cnn_fit import train_accuracy, with_train_accuracy
from batchnorm.lab.rules import (
    baseline_metrics,
    beyond_tolerance,
    gate,
    paired_tolerance,
    untrained,
)

__all__ = ["Config", "Numbers", "EXPERIMENT", "measure", "judge", "ARMS"]

SMALL, LARGE, GHOST, ADAPTED = (
    "small batch",
    "large batch",
    "large batch, ghost BN",
    "large batch, ghost BN, regime adaptation",
)
ARMS = (SMALL, LARGE, GHOST, ADAPTED)


@dataclass(frozen=True)
class Config(ScheduledConvConfig):
    """Small batch vs large batch (plain, ghost BN, ghost BN + regime adaptation). Defaults are
    the full protocol."""

    channels: tuple[int, ...] = param(
        (8, 16, 32), "widths of the conv layers (wide enough to fit the training subset)"
    )
    train_subset: int | None = param(20_000, "training examples used (a subset the nets fit)")
    epochs: float = param(
        3.0, "epochs of the small batch (and of the large batch's same-epoch arms)"
    )
    evals: int = param(2, "evaluations on the test set, evenly spaced over training")
    seeds: int = param(3, "number of seeds (each: initial weights and data order)")
    lr: float = param(0.05, "SGD learning rate at the small batch (batch_size)")
    large_batch: int = param(
        256, "the large training batch (paper: 32 times the small one; here 8)"
    )
    ghost_size: int = param(32, "ghost batch of ghost BN at the large batch; must divide it")
    fit_floor: float = param(
        0.9, "train accuracy (inference mode) a network must reach for the claims on it"
    )

    def validate(self) -> None:
        super().validate()
        if self.large_batch <= self.batch_size:
            raise ValueError(
                f"large_batch ({self.large_batch}) must exceed batch_size ({self.batch_size}), "
                "the small-batch reference"
            )
        v = self.ghost_size
        if v < 2 or v >= self.large_batch or self.large_batch % v:
            raise ValueError(
                f"ghost size {v} must be >= 2, below large_batch ({self.large_batch}) and divide it"
            )
        if self.train_subset is not None and self.train_subset < self.large_batch:
            raise ValueError(
                f"train_subset ({self.train_subset}) must hold one large batch ({self.large_batch})"
            )
        if not 0 < self.fit_floor <= 1:
            raise ValueError(f"fit_floor must lie in (0, 1], got {self.fit_floor}")

    def quick(self) -> Config:
        """A smoke test: narrow nets, 1,024 images, large batch 128, 4 epochs."""
        return replace(
            super().quick(),
            channels=(8, 16),
            train_subset=1024,
            epochs=4.0,
            large_batch=128,
            seeds=2,
        )

    def large_lr(self) -> float:
        """The paper's square-root scaling (Sec. 4.1): ``lr * sqrt(large_batch / batch_size)``."""
        return self.lr * math.sqrt(self.large_batch / self.batch_size)


@dataclass
class Numbers:
    """What the claims are decided on: per arm (:data:`ARMS`), final test and train accuracy per
    seed."""

    fit_floor: float
    test: dict[str, list[float]]
    train: dict[str, list[float]]


def judge(
    numbers: Numbers,
    *,
    spread_factor: float = 2.0,
    min_tolerance: float = 0.0005,
) -> list[Claim]:
    """Decide the claims from ``numbers`` alone; every comparison is paired by seed.

    - "large batch worse": small minus large test accuracy beyond its tolerance;
    - "ghost helps": ghost minus large test accuracy beyond its tolerance;
    - "regime adaptation closes the gap": small minus adapted test accuracy, and adapted minus
      small train/test gap, each at most its tolerance.

    Tolerances are :func:`~batchnorm.lab.rules.paired_tolerance` of the per-seed differences.
    Every claim needs the small batch to fit (mean train accuracy at least ``fit_floor``); the
    last also needs the adapted large batch to.

    Args:
        numbers: what :func:`measure` measured.
        spread_factor, min_tolerance: the margin of :func:`~batchnorm.lab.rules.paired_tolerance`.
    """
    margin = {"spread_factor": spread_factor, "min_tolerance": min_tolerance}
    test = {a: np.asarray(v, dtype=np.float64) for a, v in numbers.test.items()}
    train = {a: np.asarray(v, dtype=np.float64) for a, v in numbers.train.items()}
    gap = {a: train[a] - test[a] for a in test}

    def tol(d: np.ndarray) -> float:
        return paired_tolerance(d, **margin)

    def fit(*arms: str) -> str | None:
        reason = untrained({a: train[a] for a in arms}, floor=numbers.fit_floor)
        return None if reason is None else "did not fit the training set: " + reason

    def acc(arm: str) -> str:
        return f"test {test[arm].mean():.4f}, train {train[arm].mean():.4f}"

    worse = test[SMALL] - test[LARGE]
    helps = test[GHOST] - test[LARGE]
    test_short = test[SMALL] - test[ADAPTED]  # <= tolerance: the adapted large batch is as good
    gap_excess = gap[ADAPTED] - gap[SMALL]  # <= tolerance: and it generalizes as well
    closes = bool(test_short.mean() <= tol(test_short) and gap_excess.mean() <= tol(gap_excess))
    claims = [
        gate(
            Claim(
                "large batch worse",
                "At the same number of epochs, the large batch reaches a lower test accuracy.",
                "small minus large batch (plain BN, same epochs) test accuracy, paired by seed, "
                f"has a mean above {spread_factor:g} standard errors of the differences (at "
                f"least {min_tolerance:g})",
                beyond_tolerance(worse, **margin),
                f"small: {acc(SMALL)}; large: {acc(LARGE)}; difference "
                f"{worse.mean():+.4f} (tolerance {tol(worse):.4f}); train/test gap "
                f"{gap[SMALL].mean():+.4f} (small) vs {gap[LARGE].mean():+.4f} (large)",
            ),
            fit(SMALL),
        ),
        gate(
            Claim(
                "ghost helps",
                "Ghost batch norm raises the large batch's test accuracy without more updates.",
                "ghost BN minus plain BN test accuracy at the large batch and the same epochs, "
                f"paired by seed, has a mean above {spread_factor:g} standard errors of the "
                f"differences (at least {min_tolerance:g})",
                beyond_tolerance(helps, **margin),
                f"ghost: {acc(GHOST)}; plain: {acc(LARGE)}; difference {helps.mean():+.4f} "
                f"(tolerance {tol(helps):.4f})",
            ),
            fit(SMALL),
        ),
        gate(
            Claim(
                "regime adaptation closes the gap",
                "With ghost batch norm and as many updates as the small batch, the large batch "
                "generalizes as well as the small batch.",
                "small minus adapted large batch test accuracy, and adapted minus small train/"
                f"test gap, paired by seed, each have a mean of at most {spread_factor:g} "
                f"standard errors of their differences (at least {min_tolerance:g})",
                closes,
                f"adapted: {acc(ADAPTED)}; small: {acc(SMALL)}; test shortfall "
                f"{test_short.mean():+.4f} (tolerance {tol(test_short):.4f}); gap excess "
                f"{gap_excess.mean():+.4f} (gap {gap[ADAPTED].mean():+.4f} vs "
                f"{gap[SMALL].mean():+.4f}, tolerance {tol(gap_excess):.4f})",
            ),
            fit(SMALL, ADAPTED),
        ),
    ]
    return claims


def measure(config: Config, ctx: Context) -> Measurement:
    """Train each arm and seed (one grouped network per batch size and step count), tabulate
    and plot."""
    data = image_data(ctx, config)
    n = len(data.train_y)
    small, big, v = config.batch_size, config.large_batch, config.ghost_size
    seeds = config.seed_list()
    small_steps = config.steps_for(small, n)
    epoch_steps = config.steps_for(big, n)
    ghost = {"virtual_batch_size": v}
    # arm -> (batch, steps, lr, norm, options)
    plan = {
        SMALL: (small, small_steps, config.lr, "bn", {}),
        LARGE: (big, epoch_steps, config.large_lr(), "bn", {}),
        GHOST: (big, epoch_steps, config.large_lr(), "ghost", ghost),
        ADAPTED: (big, small_steps, config.large_lr(), "ghost", ghost),
    }
    labels = {
        SMALL: f"BN, batch {small}",
        LARGE: f"BN, batch {big}",
        GHOST: f"ghost BN {v}, batch {big}",
        ADAPTED: f"ghost BN {v}, batch {big}, {small_steps} steps",
    }
    results: dict[str, list[dict]] = {}
    rows = []
    groups: dict[tuple[int, int, float], list[str]] = {}
    for arm, (batch, steps, lr, _, _) in plan.items():
        groups.setdefault((batch, steps, lr), []).append(arm)
    finish = with_train_accuracy(data)
    for (batch, steps, lr), arms in groups.items():
        jobs = [
            NetJob(
                key=f"{arm.replace(', ', '-').replace(' ', '-')}-s{seed}",
                norm=plan[arm][3],
                seed=seed,
                batches=lambda batch=batch, seed=seed: iid_batches(n, batch, seed),
                desc=f"{labels[arm]} seed {seed}",
                options=plan[arm][4],
            )
            for arm in arms
            for seed in seeds
        ]
        trained = iter(train_jobs(ctx, config, data, jobs, steps=steps, lr=lr, finish=finish))
        for arm in arms:
            results[arm] = [next(trained) for _ in seeds]
            for seed, result in zip(seeds, results[arm]):
                rows += job_curve_rows(
                    result,
                    labels[arm],
                    seed,
                    {"batch_size": batch, "virtual": plan[arm][4].get("virtual_batch_size", batch)},
                )
    ctx.write_csv("curves.csv", rows, [*CURVE_FIELDS, "batch_size", "virtual"])

    test = {a: final_acc(results[a]) for a in ARMS}
    train = {a: train_accuracy(results[a]) for a in ARMS}
    numbers = Numbers(
        fit_floor=config.fit_floor,
        test={a: test[a].tolist() for a in ARMS},
        train={a: train[a].tolist() for a in ARMS},
    )
    mean = {a: float(np.mean(test[a])) for a in ARMS}
    comparisons = [
        Comparison(
            f"test accuracy: batch {small} / {big} / + ghost BN {v} / + regime adaptation",
            "large batch below small; +LR, +GBN narrow the gap, +RA closes it (Table 1, e.g. "
            "ResNet-44 on CIFAR-10; values not quoted here)",
            " / ".join(f"{mean[a]:.4f}" for a in ARMS),
            value=mean[ADAPTED] - mean[SMALL],
        )
    ]
    table = md_table(
        ["network", "batch", "steps", "lr", "test accuracy", "train accuracy", "train - test"],
        [
            [
                labels[a],
                str(plan[a][0]),
                str(plan[a][1]),
                f"{plan[a][2]:g}",
                fmt_mean_std(test[a]),
                fmt_mean_std(train[a]),
                fmt_mean_std(train[a] - test[a]),
            ]
            for a in ARMS
        ],
    )
    with ctx.timer("plots"):
        _plot(ctx, results, labels)
    return Measurement(
        numbers=numbers,
        comparisons=comparisons,
        metrics={
            "final_test_acc": {labels[a]: test[a] for a in ARMS},
            "final_train_acc": {labels[a]: train[a] for a in ARMS},
            "train_minus_test": {labels[a]: train[a] - test[a] for a in ARMS},
            "steps": {labels[a]: plan[a][1] for a in ARMS},
            "lr": {labels[a]: plan[a][2] for a in ARMS},
            "baseline": f"BN at the small batch {small}",
            **baseline_metrics(train[SMALL], test[SMALL]),
        },
        tables=[("Final accuracy by network (mean ± std over seeds)", table)],
        figures=[("ghost.png", "Test accuracy against updates, per network (mean over seeds)")],
        choices=[
            *common_choices(config)[:2],
            f"optimizer: SGD, momentum {config.momentum}, no weight decay; learning "
            f"rate {config.lr:g} at batch {small}, {config.large_lr():g} at batch {big} (the "
            "paper's square-root scaling, Sec. 4.1); no warm-up or gradient clipping; in every "
            f"arm {schedule_text(config)}, at the same fraction of its own steps (the paper's "
            "regime adaptation stretches the whole schedule, its decay steps included, Sec. 5)",
            f"length: {config.epochs:g} epochs of the subset for the small batch ({small_steps} "
            f"steps) and the large batch's same-epoch arms ({epoch_steps} steps); regime "
            f"adaptation (Sec. 5): the large batch for {small_steps} steps, as many as the small "
            "batch",
            common_choices(config)[4],
            f"ghost BN (Sec. 4.2, Algorithm 1): batchnorm.nn.GhostBatchNorm over {v} examples, "
            "the small batch, as the paper's 128 is its small batch; moving averages "
            "(momentum 0.1) pool the ghost batches' statistics, used at test time",
            "train accuracy: the whole training subset in inference mode; train/test gap: train "
            f"minus test accuracy; the claims need the small batch at {config.fit_floor:g} or "
            "more (and regime adaptation, the adapted arm)",
            "rules paired by seed (every arm of a seed shares its initial weights): margins of "
            "2 standard errors of the per-seed differences, at least 0.0005",
        ],
        notes=[
            f"The paper's ratio of large to small batch is 32 (4096 / 128); here {big // small}.",
            "Plain BN with regime adaptation (without ghost batches) is not run, to keep the "
            "protocol within its time; the paper's Table 1 adds +RA on top of +LR and +GBN.",
        ],
    )


def _plot(ctx: Context, results, labels) -> None:
    from batchnorm.lab.plots import band, new_figure

    figure, axes = new_figure(1, 1, size=(5.2, 3.8))
    ax = axes[0, 0]
    for arm, rs in results.items():
        values = np.array([r["test_acc"] for r in rs]).T
        band(ax, rs[0]["steps"], values, label=labels[arm])
    ax.set(xscale="log", xlabel="updates", ylabel="test accuracy", title="large vs small batch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ctx.save_figure(figure, "ghost.png")


EXPERIMENT = Experiment(
    name="ghost",
    title="Large-batch training: ghost batch norm and regime adaptation (Hoffer et al. 2017)",
    claim=(
        "Large-batch training generalizes worse at the same epochs; ghost batch norm narrows "
        "the gap, and as many updates as the small batch close it."
    ),
    paper=(
        "Hoffer, Hubara & Soudry (2017), 'Train longer, generalize better', Sec. 4.1-4.2 and 5, "
        "Table 1. Stand-in: a CNN on a Fashion-MNIST subset, batch 32 vs 256."
    ),
    config_cls=Config,
    numbers_cls=Numbers,
    measure=measure,
    judge=judge,
    summary="small vs large batch: sqrt LR, ghost BN, regime adaptation",
)
