"""Ghost batch norm: normalizing small virtual batches helps large-batch training.

Claim (Hoffer, Hubara & Soudry 2017, "Train longer, generalize better", Sec. 4 and Table 1;
SPEC.md 4.5): training with large batches generalizes worse than with small ones at the same
number of epochs; computing the batch-norm statistics over small "ghost" batches (chunks of the
large batch) instead of the whole batch recovers part of that gap, because the small-batch noise
of the statistics regularizes. Stand-in: the small CNN on Fashion-MNIST at a large batch
(``large_batch``, 512 by default) with plain BN over the whole batch and with ghost batch norm
(:class:`batchnorm.nn.GhostBatchNorm`) at several virtual batch sizes, plus plain BN at a small
batch (32) as the reference; the same epochs for all, learning rate scaled linearly with the
batch (Goyal et al. 2017). The paper's numbers (CIFAR/ImageNet networks) are not comparable;
the report compares the shape only.

Rules (in code): (1) *large batches generalize worse*: plain BN's mean final test accuracy at
the small batch is above that at the large batch; (2) *ghost helps*: the best ghost variant's
mean final test accuracy is above plain BN's at the large batch.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class Config(ConvConfig):
    """Ghost batch sizes at a large batch. Defaults are the full protocol (~5 min)."""

    epochs: float = param(6.0, "passes over the training subset")
    train_subset: int | None = param(5000, "training examples used (none = all)")
    lr: float = param(0.02, "SGD learning rate at batch 32 (scaled linearly with the batch)")
    large_batch: int = param(512, "the large training batch")
    ghost_sizes: tuple[int, ...] = param(
        (128, 32, 8), "virtual (ghost) batch sizes; each must divide large_batch"
    )

    def validate(self) -> None:
        super().validate()
        if self.large_batch <= self.batch_size:
            raise ValueError(
                f"large_batch ({self.large_batch}) must exceed batch_size ({self.batch_size}), "
                "the small-batch reference"
            )
        if not self.ghost_sizes:
            raise ValueError("ghost_sizes must list at least one virtual batch size")
        for v in self.ghost_sizes:
            if v < 2 or v >= self.large_batch or self.large_batch % v:
                raise ValueError(
                    f"ghost size {v} must be >= 2, below large_batch ({self.large_batch}) and "
                    "divide it"
                )
        if self.train_subset is not None and self.train_subset < self.large_batch:
            raise ValueError(
                f"train_subset ({self.train_subset}) must hold one large batch ({self.large_batch})"
            )

    def quick(self) -> Config:
        """A smoke test: 2,000 images, large batch 256, ghost sizes 64 and 16, 3 epochs."""
        return replace(super().quick(), epochs=3.0, large_batch=256, ghost_sizes=(64, 16))


@dataclass
class Numbers:
    """What the claims are decided on: final test accuracy per seed, keyed by variant name."""

    big: int  # the large batch size
    small: int  # the small one
    ghosts: list[str]  # the ghost variants' names, largest virtual batch first
    acc: dict[str, list[float]]


def judge(numbers: Numbers, *, large_margin: float = 0.0, ghost_margin: float = 0.0) -> list[Claim]:
    """Decide the claims from ``numbers`` alone (every comparison is of means over seeds).

    Args:
        numbers: what :func:`measure` measured.
        large_margin: "large batch worse" holds when plain BN at the small batch is above plain
            BN at the large batch by more than this (a tie does not hold).
        ghost_margin: "ghost helps" holds when the best ghost variant is above plain BN at the
            large batch by more than this (a tie does not hold; the first best on a tie).
    """
    n = numbers
    big, small = n.big, n.small
    plain_big, plain_small = f"BN, batch {big}", f"BN, batch {small}"
    mean = {v: float(np.mean(a)) for v, a in n.acc.items()}
    best = max(n.ghosts, key=lambda v: mean[v])
    return [
        Claim(
            "large batch worse",
            "At the same number of epochs, large-batch training generalizes worse.",
            f"plain BN's mean final test accuracy at batch {small} is above that at batch {big}"
            + (f" by more than {large_margin}" if large_margin else ""),
            bool(mean[plain_small] > mean[plain_big] + large_margin),
            f"{mean[plain_small]:.4f} (batch {small}) vs {mean[plain_big]:.4f} (batch {big})",
        ),
        Claim(
            "ghost helps",
            "Ghost batch norm (statistics over small virtual batches) improves large-batch "
            "training.",
            f"the best ghost variant's mean final test accuracy is above plain BN's at batch {big}"
            + (f" by more than {ghost_margin}" if ghost_margin else ""),
            bool(mean[best] > mean[plain_big] + ghost_margin),
            f"{mean[best]:.4f} ({best}) vs {mean[plain_big]:.4f} ({plain_big})",
        ),
    ]


def measure(config: Config, ctx: Context) -> Measurement:
    """Train each variant and seed, tabulate and plot."""
    data = image_data(ctx, config)
    n = len(data.train_y)
    big, small = config.large_batch, config.batch_size
    plain_big, plain_small = f"BN, batch {big}", f"BN, batch {small}"
    ghosts = {
        f"ghost BN {v}, batch {big}": v for v in sorted(set(config.ghost_sizes), reverse=True)
    }
    variants = {plain_small: ("bn", small, None), plain_big: ("bn", big, None)}
    variants |= {name: ("ghost", big, v) for name, v in ghosts.items()}
    results: dict[str, list[dict]] = {v: [] for v in variants}
    rows = []
    # The networks of one batch size train together (same steps and learning rate).
    for b in sorted({b for _, b, _ in variants.values()}):
        steps = config.steps_for(b, n)
        mine = [(name, norm, virtual) for name, (norm, vb, virtual) in variants.items() if vb == b]
        jobs = [
            NetJob(
                key=f"{norm}-b{b}-v{virtual or b}-s{seed}",
                norm=norm,
                seed=seed,
                batches=lambda b=b, seed=seed: iid_batches(n, b, seed),
                desc=f"{name} seed {seed}",
                options={} if virtual is None else {"virtual_batch_size": virtual},
            )
            for name, norm, virtual in mine
            for seed in config.seed_list()
        ]
        trained = iter(train_jobs(ctx, config, data, jobs, steps=steps, lr=config.scaled_lr(b)))
        for name, _, virtual in mine:
            for seed in config.seed_list():
                result = next(trained)
                results[name].append(result)
                rows += job_curve_rows(
                    result, name, seed, {"batch_size": b, "virtual": virtual or b}
                )
    ctx.write_csv("curves.csv", rows, [*CURVE_FIELDS, "batch_size", "virtual"])

    acc = {v: final_acc(results[v]) for v in variants}
    mean = {v: float(np.mean(acc[v])) for v in variants}
    gap = {
        v: float(np.mean([r["train_acc_final"] for r in results[v]])) - mean[v] for v in variants
    }
    best = max(ghosts, key=lambda v: mean[v])
    numbers = Numbers(
        big=big,
        small=small,
        ghosts=list(ghosts),
        acc={v: acc[v].tolist() for v in variants},
    )
    comparisons = [
        Comparison(
            f"test accuracy: BN batch {small} / BN batch {big} / best ghost ({best})",
            "large batch worse; ghost BN closes part of the gap (CIFAR, ImageNet)",
            f"{mean[plain_small]:.4f} / {mean[plain_big]:.4f} / {mean[best]:.4f}",
            value=mean[best] - mean[plain_big],
        )
    ]
    table = md_table(
        ["variant", "steps", "final test accuracy", "train-batch acc - test acc"],
        [
            [
                v,
                str(config.steps_for(variants[v][1], n)),
                fmt_mean_std(acc[v]),
                f"{gap[v]:+.4f}",
            ]
            for v in variants
        ],
    )
    with ctx.timer("plots"):
        _plot(ctx, variants, acc, big)
    return Measurement(
        numbers=numbers,
        comparisons=comparisons,
        metrics={
            "final_test_acc": {v: acc[v] for v in variants},
            "mean_final_test_acc": mean,
            "train_minus_test": gap,
        },
        tables=[("Final accuracy by variant (mean ± std over seeds)", table)],
        figures=[("ghost.png", f"Final test accuracy against the virtual batch size at {big}")],
        choices=[
            *common_choices(config),
            f"large batch {big} at learning rate {config.scaled_lr(big):g}, the small-batch "
            f"reference {small} at {config.scaled_lr(small):g}; no warm-up",
            "ghost batch norm: batchnorm.nn.GhostBatchNorm, each chunk of virtual_batch_size "
            "normalized with its own statistics in training; moving averages in eval mode",
        ],
        notes=[
            "The train-batch accuracy is measured in training mode on the last 10% of steps.",
        ],
    )


def _plot(ctx: Context, variants, acc, big: int) -> None:
    from batchnorm.lab.plots import new_figure

    figure, axes = new_figure(1, 1, size=(5.2, 3.8))
    ax = axes[0, 0]
    sizes = [virtual or b for _, b, virtual in variants.values() if b == big]
    names = [v for v, (_, b, _) in variants.items() if b == big]
    means = [float(np.mean(acc[v])) for v in names]
    ax.plot(sizes, means, marker="o", label=f"batch {big}")
    small_name = next(v for v, (_, b, _) in variants.items() if b != big)
    ax.axhline(float(np.mean(acc[small_name])), color="gray", linestyle="--", label=small_name)
    ax.set(xscale="log", xlabel="virtual batch size", ylabel="final test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    ctx.save_figure(figure, "ghost.png")


EXPERIMENT = Experiment(
    name="ghost",
    title="Ghost batch norm for large-batch training (Hoffer et al. 2017)",
    claim=(
        "Large-batch training generalizes worse; normalizing small ghost batches recovers "
        "part of the gap."
    ),
    paper=(
        "Hoffer, Hubara & Soudry (2017), 'Train longer, generalize better', Sec. 4 (ghost batch "
        "normalization). Stand-in: a small CNN on Fashion-MNIST at batch 512."
    ),
    config_cls=Config,
    numbers_cls=Numbers,
    measure=measure,
    judge=judge,
    summary="ghost batch size at a large batch vs plain BN",
)
