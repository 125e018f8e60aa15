"""Adaptive gradient clipping: an unnormalized network trains at high learning rates with AGC.

Claim (Brock, De, Smith & Simonyan 2021, NFNets, Sec. 4 and Figure 2; SPEC.md 4.5): much of
what batch norm buys (training at large learning rates and batches) can be had without it by
clipping each unit's gradient relative to its weights' norm (AGC, :mod:`batchnorm.optim`);
an unnormalized network without it becomes unstable at learning rates a BN network takes, and
with it trains there and reaches an accuracy close to the BN network's. The paper's numbers
(ImageNet NFNets) are not comparable; the report compares the shape. Stand-in: the small CNN on
Fashion-MNIST without normalization (convolutions with bias), with and without AGC, and with BN,
over a sweep of learning rates at batch ``batch_size``.

Rules (in code): (1) *AGC stabilizes*: the largest learning rate at which every seed reaches
``target`` test accuracy without diverging is larger with AGC than without (none: -inf);
(2) *close to BN*: the best mean final test accuracy over learning rates with AGC is within
``tolerance`` of BN's best.
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
    ConvConfig,
    NetJob,
    common_choices,
    final_acc,
    iid_batches,
    image_data,
    job_curve_rows,
    train_jobs,
)

__all__ = ["Config", "Numbers", "EXPERIMENT", "measure", "judge"]

PLAIN, CLIPPED, BN = "no norm", "no norm + AGC", "BN"
VARIANTS = {PLAIN: ("none", False), CLIPPED: ("none", True), BN: ("bn", False)}


@dataclass(frozen=True)
class Config(ConvConfig):
    """Learning-rate sweep of an unnormalized CNN with / without AGC, and BN (~4 min)."""

    batch_size: int = param(128, "examples per mini-batch")
    epochs: float = param(3.0, "passes over the training subset")
    train_subset: int | None = param(5000, "training examples used (none = all)")
    lrs: tuple[float, ...] = param(
        (0.05, 0.4, 3.2), "learning rates of the sweep (used as given, not scaled)"
    )
    clipping: float = param(0.05, "AGC threshold lambda (NFNets: 0.01 at batch 4096)")
    target: float = param(0.7, "test accuracy a seed must reach to count as trained")
    tolerance: float = param(0.02, "rule (2): largest shortfall of AGC's best accuracy vs BN's")

    def validate(self) -> None:
        super().validate()
        if not self.lrs or any(not (math.isfinite(x) and x > 0) for x in self.lrs):
            raise ValueError(f"lrs must list positive learning rates, got {self.lrs}")
        if not self.clipping > 0:
            raise ValueError(f"clipping must be > 0, got {self.clipping}")
        if not 0 < self.target < 1:
            raise ValueError(f"target must lie in (0, 1), got {self.target}")

    def quick(self) -> Config:
        """A smoke test: 2,000 images, 2 epochs, learning rates 0.1 and 3.2."""
        return replace(super().quick(), epochs=2.0, lrs=(0.1, 3.2))


@dataclass
class Numbers:
    """What the claims are decided on, keyed by variant, then one entry per learning rate."""

    lrs: list[float]  # in the config's order
    target: float  # the config's test accuracy that counts as training
    tolerance: float  # the config's allowance of "close to BN"
    acc: dict[str, list[list[float]]]  # final test accuracy, [lr][seed]
    diverged: dict[str, list[int]]  # seeds that diverged, [lr]

    def largest(self, variant: str) -> float:
        """The largest lr at which no seed diverged and every seed reached the target (-inf:
        none)."""
        return max(
            (
                lr
                for lr, a, d in zip(self.lrs, self.acc[variant], self.diverged[variant])
                if d == 0 and bool(np.all(np.asarray(a, dtype=np.float64) >= self.target))
            ),
            default=-math.inf,
        )

    def best(self, variant: str) -> float:
        """The best mean final test accuracy over the learning rates."""
        return max(float(np.mean(a)) for a in self.acc[variant])


def judge(numbers: Numbers) -> list[Claim]:
    """Decide the claims from ``numbers`` alone.

    "AGC stabilizes" holds when AGC's largest trainable learning rate is strictly larger than
    the unclipped network's; "close to BN" when AGC's best mean accuracy is at least BN's best
    minus the config's ``tolerance`` (saved in the numbers; a tie holds).
    """
    n = numbers
    largest = {v: n.largest(v) for v in VARIANTS}
    best = {v: n.best(v) for v in VARIANTS}
    return [
        Claim(
            "AGC stabilizes",
            "With AGC an unnormalized network trains at higher learning rates than without.",
            f"the largest learning rate at which every seed reaches {n.target} test accuracy "
            "without diverging is larger with AGC",
            bool(largest[CLIPPED] > largest[PLAIN]),
            f"{_fmt_lr(largest[CLIPPED])} (AGC) vs {_fmt_lr(largest[PLAIN])} (no AGC); BN: "
            f"{_fmt_lr(largest[BN])}",
        ),
        Claim(
            "close to BN",
            "The clipped unnormalized network comes close to the BN network.",
            f"the best mean final test accuracy over learning rates with AGC is within "
            f"{n.tolerance} of BN's best",
            bool(best[CLIPPED] >= best[BN] - n.tolerance),
            f"{best[CLIPPED]:.4f} (AGC) vs {best[BN]:.4f} (BN); no AGC: {best[PLAIN]:.4f}",
        ),
    ]


def measure(config: Config, ctx: Context) -> Measurement:
    """Train each variant at each learning rate and seed, tabulate, plot."""
    data = image_data(ctx, config)
    n = len(data.train_y)
    b = config.batch_size
    steps = config.steps_for(b, n)
    lrs = tuple(sorted(set(config.lrs)))
    results: dict[str, dict[float, list[dict]]] = {v: {lr: [] for lr in lrs} for v in VARIANTS}
    rows = []
    for lr in lrs:
        jobs = [
            NetJob(
                key=f"{norm}{'-agc' if clip else ''}-lr{lr:g}-s{seed}",
                norm=norm,
                seed=seed,
                batches=lambda seed=seed: iid_batches(n, b, seed),
                desc=f"{name} lr {lr:g} seed {seed}",
                clipped=clip,
            )
            for name, (norm, clip) in VARIANTS.items()
            for seed in config.seed_list()
        ]
        trained = iter(
            train_jobs(ctx, config, data, jobs, steps=steps, lr=lr, agc_clipping=config.clipping)
        )
        for name in VARIANTS:
            for seed in config.seed_list():
                result = next(trained)
                results[name][lr].append(result)
                rows += job_curve_rows(result, name, seed, {"lr": lr})
    ctx.write_csv("curves.csv", rows, [*CURVE_FIELDS, "lr"])

    acc = {v: {lr: final_acc(results[v][lr]) for lr in lrs} for v in VARIANTS}
    diverged = {
        v: {lr: sum(r["diverged_at"] > 0 for r in results[v][lr]) for lr in lrs} for v in VARIANTS
    }

    def trains(v: str, lr: float) -> bool:
        return diverged[v][lr] == 0 and bool(np.all(acc[v][lr] >= config.target))

    largest = {v: max((lr for lr in lrs if trains(v, lr)), default=-math.inf) for v in VARIANTS}
    best = {v: max(float(np.mean(acc[v][lr])) for lr in lrs) for v in VARIANTS}
    numbers = Numbers(
        lrs=list(lrs),
        target=config.target,
        tolerance=config.tolerance,
        acc={v: [acc[v][lr].tolist() for lr in lrs] for v in VARIANTS},
        diverged={v: [int(diverged[v][lr]) for lr in lrs] for v in VARIANTS},
    )
    comparisons = [
        Comparison(
            "largest learning rate that trains: no norm / no norm + AGC / BN",
            "AGC lets normalizer-free networks train where unclipped ones are unstable",
            " / ".join(_fmt_lr(largest[v]) for v in (PLAIN, CLIPPED, BN)),
        ),
        Comparison(
            "best test accuracy: no norm / no norm + AGC / BN",
            "NFNets match or beat BN networks (ImageNet)",
            f"{best[PLAIN]:.4f} / {best[CLIPPED]:.4f} / {best[BN]:.4f}",
            value=best[CLIPPED] - best[BN],
        ),
    ]
    table = md_table(
        ["lr", *[f"{v}: final acc (diverged)" for v in VARIANTS]],
        [
            [
                f"{lr:g}",
                *[f"{fmt_mean_std(acc[v][lr])} ({diverged[v][lr]})" for v in VARIANTS],
            ]
            for lr in lrs
        ],
    )
    with ctx.timer("plots"):
        _plot(ctx, lrs, acc)
    return Measurement(
        numbers=numbers,
        comparisons=comparisons,
        metrics={
            "lrs": lrs,
            "final_test_acc": {v: {f"{lr:g}": acc[v][lr] for lr in lrs} for v in VARIANTS},
            "diverged": {v: {f"{lr:g}": diverged[v][lr] for lr in lrs} for v in VARIANTS},
            "largest_lr_that_trains": largest,
            "best_mean_final_acc": best,
            "steps": steps,
        },
        tables=[("Final test accuracy by learning rate (diverged seeds in brackets)", table)],
        figures=[("agc.png", "Final test accuracy against the learning rate")],
        choices=[
            *[c for c in common_choices(config) if not c.startswith("optimizer")],
            f"optimizer: SGD, momentum {config.momentum}, the learning rates of the sweep as "
            f"given (batch {b}, {steps} steps), no weight decay or schedule",
            f"AGC: batchnorm.optim.AGC, lambda {config.clipping}, eps 1e-3, unit-wise over "
            "output channels, the final linear layer not clipped (as in NFNets); the threshold "
            "was fixed before the run, not tuned",
            "the unnormalized network keeps its conv biases and torch's default initialization "
            "(no scaled weight standardization or other NFNet ingredients)",
            "a network whose loss becomes non-finite is stopped and scored at chance",
        ],
    )


def _fmt_lr(lr: float) -> str:
    """A learning rate, or "none" for -inf (no learning rate of the sweep trains)."""
    return "none" if math.isinf(lr) else f"{lr:g}"


def _plot(ctx: Context, lrs, acc) -> None:
    from batchnorm.lab.plots import band, new_figure

    figure, axes = new_figure(1, 1, size=(5.2, 3.8))
    ax = axes[0, 0]
    for v in VARIANTS:
        band(ax, lrs, np.array([acc[v][lr] for lr in lrs]), label=v)
    ax.set(xscale="log", xlabel="learning rate", ylabel="final test accuracy", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend()
    ctx.save_figure(figure, "agc.png")


EXPERIMENT = Experiment(
    name="agc",
    title="Adaptive gradient clipping vs batch norm at high learning rates (NFNets, 2021)",
    claim=(
        "An unnormalized network with adaptive gradient clipping trains at learning rates where "
        "it otherwise fails, and comes close to batch norm."
    ),
    paper=(
        "Brock, De, Smith & Simonyan (2021), NFNets, Sec. 4 (adaptive gradient clipping). "
        "Stand-in: a small CNN on Fashion-MNIST over a learning-rate sweep."
    ),
    config_cls=Config,
    numbers_cls=Numbers,
    measure=measure,
    judge=judge,
    summary="unnormalized CNN with/without AGC vs BN over learning rates",
)
