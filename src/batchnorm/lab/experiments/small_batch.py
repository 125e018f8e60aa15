"""Small batches: batch norm degrades as its statistics come from fewer examples; group norm
does not.

Claim (Wu & He 2018, Group Normalization, arXiv 1803.08494, Sec. 1, Figure 1 and Table 2;
SPEC.md 4.5): batch norm's error grows quickly as the batch its statistics are computed over
gets small, because those statistics become noisy estimates (and training and test normalize
differently); group norm, which normalizes each example on its own, is unaffected. The paper's
ResNet-50 ImageNet validation error at 32 / 16 / 8 / 4 / 2 images per worker: BN 23.6 / 23.7 /
24.8 / 27.3 / 34.7 %, GN 24.1 / 24.2 / 24.0 / 24.2 / 24.1 %. There (Sec. 4.1) 8 workers each
compute BN's statistics over their own images, and the learning rate is scaled with the total
batch: what shrinks is the set of examples the statistics are computed over.

Protocol (the stand-in): only that set varies. Every network trains on the same total batch of
``batch_size`` (32) Fashion-MNIST images per step, for the same number of steps, at the same
learning rate, from the same initial weights and batch order per seed; batch norm computes its
statistics over consecutive groups of ``stat_sizes`` (32, 16, 8, 4, 2) examples of that batch
(ghost-batch statistics, :class:`batchnorm.nn.GhostBatchNorm`; 32 is plain BN), as the paper's
workers each do over their share. Group norm's statistics do not involve the batch at all, so
one GN network per seed serves every group size (its change is zero by construction; what
remains to test is that it is as good as BN at its best and better than BN at its worst). The
network is wide and trained long enough on a subset to fit it (train accuracy reported beside
test accuracy, both in inference mode; a baseline that did not fit makes the claims "not
tested").

Rules (in code), paired by seed, margins from the seed spread (:mod:`batchnorm.lab.rules`):
(1) *BN degrades*: BN's test error with statistics over the smallest group minus that over the
whole batch is positive beyond the margin; (2) *GN does not*: GN's absolute change in error
between those group sizes is within the margin, and BN's error at the smallest group exceeds
GN's beyond the margin.
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
    within_tolerance,
)

__all__ = ["Config", "Numbers", "EXPERIMENT", "measure", "judge"]

PAPER = {  # Wu & He 2018, Figure 1 / Table 2: ResNet-50 ImageNet val error (%), per batch size
    "bn": {32: 23.6, 16: 23.7, 8: 24.8, 4: 27.3, 2: 34.7},
    "gn": {32: 24.1, 16: 24.2, 8: 24.0, 4: 24.2, 2: 24.1},
}


@dataclass(frozen=True)
class Config(ScheduledConvConfig):
    """BN with statistics over groups of 32 ... 2 examples of a batch of 32, and GN. Defaults
    are the full protocol."""

    channels: tuple[int, ...] = param(
        (8, 16, 32), "widths of the conv layers (wide enough to fit the training subset)"
    )
    train_subset: int | None = param(20_000, "training examples used (a subset the nets fit)")
    epochs: float = param(4.0, "passes over the training subset (the same for every network)")
    lr: float = param(0.05, "SGD learning rate, the same for every network")
    evals: int = param(2, "evaluations on the test set, evenly spaced over training")
    seeds: int = param(3, "number of seeds (each: initial weights and data order)")
    stat_sizes: tuple[int, ...] = param(
        (32, 16, 8, 4, 2),
        "examples BN computes its statistics over (groups of the batch; batch_size = plain BN)",
    )
    gn_groups: int = param(4, "groups of group norm (must divide every width in channels)")
    fit_floor: float = param(
        0.9, "train accuracy (inference mode) the baselines must reach for the claims to be tested"
    )

    def validate(self) -> None:
        super().validate()
        sizes = self.stat_sizes
        if len(set(sizes)) < 2 or min(sizes) < 2:
            raise ValueError(f"stat_sizes must list at least two sizes, each >= 2, got {sizes}")
        if any(self.batch_size % s for s in sizes):
            raise ValueError(
                f"every stat size must divide batch_size ({self.batch_size}), got {sizes}"
            )
        if any(c % self.gn_groups for c in self.channels) or self.gn_groups < 1:
            raise ValueError(
                f"gn_groups={self.gn_groups} must divide every width in channels={self.channels}"
            )
        if not 0 < self.fit_floor <= 1:
            raise ValueError(f"fit_floor must lie in (0, 1], got {self.fit_floor}")

    def quick(self) -> Config:
        """A smoke test: statistics over 32, 8 and 2, narrow nets, 1,000 images, 1 epoch."""
        return replace(
            super().quick(),
            channels=(8, 16),
            stat_sizes=(32, 8, 2),
            train_subset=1000,
            epochs=1.0,
            seeds=2,
        )


@dataclass
class Numbers:
    """What the claims are decided on: per seed, the test error and the train accuracy of BN
    with statistics over the largest and the smallest group, and of GN."""

    big: int  # the largest statistics group (the whole batch)
    small: int  # the smallest
    fit_floor: float  # train accuracy the baselines must reach
    bn_error: dict[int, list[float]]  # group size -> final test error (1 - accuracy)
    gn_error: dict[int, list[float]]  # group size -> GN's final test error
    bn_train: dict[int, list[float]]  # group size -> final train accuracy
    gn_train: list[float]


def judge(
    numbers: Numbers,
    *,
    spread_factor: float = 2.0,
    min_tolerance: float = 0.0005,
) -> list[Claim]:
    """Decide the claims from ``numbers`` alone; every comparison is paired by seed.

    - "BN degrades": BN's error at the smallest group minus at the largest has a mean beyond
      :func:`~batchnorm.lab.rules.paired_tolerance` (above it);
    - "GN does not": GN's change between the same sizes has an absolute mean within its
      tolerance, and BN's error minus GN's at the smallest group is beyond its tolerance.

    Both are "not tested" when BN over the whole batch or GN did not fit the training set
    (mean train accuracy below ``numbers.fit_floor``).

    Args:
        numbers: what :func:`measure` measured.
        spread_factor, min_tolerance: the margin of :func:`~batchnorm.lab.rules.paired_tolerance`.
    """
    n = numbers
    big, small = n.big, n.small
    margin = {"spread_factor": spread_factor, "min_tolerance": min_tolerance}

    def arr(values: list[float]) -> np.ndarray:
        return np.asarray(values, dtype=np.float64)

    bn_change = arr(n.bn_error[small]) - arr(n.bn_error[big])
    gn_change = arr(n.gn_error[small]) - arr(n.gn_error[big])
    bn_over_gn = arr(n.bn_error[small]) - arr(n.gn_error[small])
    reason = untrained(
        {f"BN (statistics over {big})": n.bn_train[big], "GN": n.gn_train}, floor=n.fit_floor
    )
    if reason is not None:
        reason = "did not fit the training set: " + reason

    def tol(d: np.ndarray) -> float:
        return paired_tolerance(d, **margin)

    degrades = Claim(
        "BN degrades",
        "Batch norm's test error grows as its statistics come from fewer examples.",
        f"BN's test error with statistics over {small} minus over {big} examples, paired by "
        f"seed, has a mean above {spread_factor:g} standard errors of the differences (at least "
        f"{min_tolerance:g})",
        beyond_tolerance(bn_change, **margin),
        f"BN error {np.mean(n.bn_error[big]):.4f} (over {big}) -> "
        f"{np.mean(n.bn_error[small]):.4f} (over {small}), change {bn_change.mean():+.4f}, "
        f"tolerance {tol(bn_change):.4f}",
    )
    gn_flat = within_tolerance(gn_change, **margin)
    gn_better = beyond_tolerance(bn_over_gn, **margin)
    does_not = Claim(
        "GN does not",
        "Group norm's test error does not depend on the batch; at small batches it is below "
        "batch norm's.",
        f"GN's absolute change in test error from {big} to {small} is within {spread_factor:g} "
        f"standard errors of its per-seed changes, and BN's error minus GN's at {small} is "
        "beyond its own (each at least "
        f"{min_tolerance:g})",
        gn_flat and gn_better,
        f"GN change {gn_change.mean():+.4f} (tolerance {tol(gn_change):.4f}); at {small}: BN "
        f"{np.mean(n.bn_error[small]):.4f} vs GN {np.mean(n.gn_error[small]):.4f}, difference "
        f"{bn_over_gn.mean():+.4f} (tolerance {tol(bn_over_gn):.4f})",
    )
    return [gate(degrades, reason), gate(does_not, reason)]


def _bn_job_options(size: int, batch_size: int) -> tuple[str, dict[str, int]]:
    """BN over groups of ``size``: plain BN for the whole batch, else ghost-batch statistics."""
    if size == batch_size:
        return "bn", {}
    return "ghost", {"virtual_batch_size": size}


def measure(config: Config, ctx: Context) -> Measurement:
    """Train BN at every statistics group size and GN (one grouped network: same batch size,
    steps and learning rate), tabulate and plot."""
    data = image_data(ctx, config)
    n = len(data.train_y)
    sizes = tuple(sorted(set(config.stat_sizes), reverse=True))
    seeds = config.seed_list()
    steps = config.steps_for(config.batch_size, n)
    lr = config.lr  # the same for every network: only the statistics' group size varies
    arms: list[tuple[str, str, dict]] = []  # (label, norm, options)
    for size in sizes:
        norm, options = _bn_job_options(size, config.batch_size)
        arms.append((f"BN over {size}", norm, options))
    arms.append(("GN", "gn", {"num_groups": config.gn_groups}))
    jobs = [
        NetJob(
            key=f"{label.replace(' ', '-')}-s{seed}",
            norm=norm,
            seed=seed,
            batches=lambda seed=seed: iid_batches(n, config.batch_size, seed),
            desc=f"{label} seed {seed}",
            options=options,
        )
        for label, norm, options in arms
        for seed in seeds
    ]
    trained = iter(
        train_jobs(ctx, config, data, jobs, steps=steps, lr=lr, finish=with_train_accuracy(data))
    )
    results: dict[str, list[dict]] = {}
    rows = []
    for label, _, _ in arms:
        results[label] = [next(trained) for _ in seeds]
        for seed, result in zip(seeds, results[label]):
            rows += job_curve_rows(result, label, seed)
    ctx.write_csv("curves.csv", rows, list(CURVE_FIELDS))

    error = {label: 1.0 - final_acc(rs) for label, rs in results.items()}
    train = {label: train_accuracy(rs) for label, rs in results.items()}
    bn = {size: f"BN over {size}" for size in sizes}
    big, small = sizes[0], sizes[-1]
    numbers = Numbers(
        big=big,
        small=small,
        fit_floor=config.fit_floor,
        bn_error={s: error[bn[s]].tolist() for s in (big, small)},
        gn_error={s: error["GN"].tolist() for s in (big, small)},
        bn_train={s: train[bn[s]].tolist() for s in (big, small)},
        gn_train=train["GN"].tolist(),
    )
    mean_err = {label: float(np.mean(e)) for label, e in error.items()}
    comparisons = [
        Comparison(
            f"BN test error (%), statistics over {' / '.join(str(s) for s in sizes)}",
            " / ".join(f"{PAPER['bn'][s]:.1f}" if s in PAPER["bn"] else "-" for s in sizes)
            + " (ResNet-50, ImageNet; images per worker)",
            " / ".join(f"{100 * mean_err[bn[s]]:.1f}" for s in sizes)
            + f" (CNN, {data.name}; batch {config.batch_size})",
            value=mean_err[bn[small]] - mean_err[bn[big]],
        ),
        Comparison(
            "GN test error (%)",
            " / ".join(f"{PAPER['gn'][s]:.1f}" if s in PAPER["gn"] else "-" for s in sizes),
            f"{100 * mean_err['GN']:.1f} at every size (its statistics do not involve the batch)",
            value=mean_err["GN"],
        ),
    ]
    table = md_table(
        ["network", "test error (%)", "train accuracy", "train - test accuracy"],
        [
            [
                label,
                fmt_mean_std(100 * error[label], 1),
                fmt_mean_std(train[label]),
                f"{float(np.mean(train[label] - (1 - error[label]))):+.4f}",
            ]
            for label, _, _ in arms
        ],
    )
    paper_table = md_table(
        ["norm", *[f"{s} per worker" for s in sizes]],
        [
            [f"{m.upper()} (paper)", *[f"{PAPER[m].get(s, '-')}" for s in sizes]]
            for m in ("bn", "gn")
        ],
    )
    with ctx.timer("plots"):
        _plot(ctx, sizes, error, bn)
    return Measurement(
        numbers=numbers,
        comparisons=comparisons,
        metrics={
            "stat_sizes": sizes,
            "batch_size": config.batch_size,
            "steps": steps,
            "lr": lr,
            "test_error": {label: e for label, e in error.items()},
            "mean_test_error": mean_err,
            "train_acc": {label: t for label, t in train.items()},
            "baseline": f"BN with statistics over the whole batch of {big}",
            **baseline_metrics(train[bn[big]], 1.0 - error[bn[big]]),
        },
        tables=[
            ("Final accuracy by network (mean ± std over seeds)", table),
            ("The paper's table (Wu & He 2018, ResNet-50 ImageNet val error, %)", paper_table),
        ],
        figures=[("small_batch.png", "Test error against the examples BN's statistics cover")],
        choices=[
            *common_choices(config)[:2],
            f"optimizer: SGD, momentum {config.momentum}, no weight decay; every "
            f"network: batch {config.batch_size}, {steps} steps ({config.epochs:g} epochs), "
            f"learning rate {lr:g} (not scaled: the batch does not change), "
            f"{schedule_text(config)} (the paper divides it by 10 at epochs 30, 60 and 90, "
            "Sec. 4.1); only the group BN's statistics cover changes, as the paper's per-worker "
            "statistics do (Sec. 4.1: 8 workers, BN over each worker's images)",
            common_choices(config)[4],
            "BN over a group of g < batch: batchnorm.nn.GhostBatchNorm(virtual_batch_size=g), "
            "its moving averages (momentum 0.1) pool the groups' statistics; test time uses them",
            f"group norm: {config.gn_groups} groups (the paper's default is 32 groups of wider "
            "layers, Sec. 3.1); one GN network per seed serves every group size, since its "
            "statistics do not involve the batch",
            f"train accuracy: the whole training subset in inference mode; the claims need the "
            f"baselines (BN over {big}, GN) at {config.fit_floor:g} or more",
            "rules paired by seed (every network of a seed shares its initial weights and batch "
            "order): margins of 2 standard errors of the per-seed differences, at least 0.0005",
        ],
        notes=[
            "The paper's numbers are ImageNet ResNet-50 errors; only the shape (BN rising as its "
            "statistics cover fewer examples, GN flat) is comparable, not the values.",
            "The paper changes the total batch with the per-worker batch (learning rate scaled "
            "linearly, same epochs); here the total batch, steps and learning rate are fixed so "
            "that nothing but the statistics' group size differs between BN's networks.",
            "LN, IN and batch renorm are not run: LN and IN, like GN, do not involve the batch, "
            "and batch renorm has no ghost-group form here.",
        ],
    )


def _plot(ctx: Context, sizes, error, bn) -> None:
    from batchnorm.lab.plots import new_figure

    figure, axes = new_figure(1, 1, size=(5.2, 3.8))
    ax = axes[0, 0]
    means = [100 * float(np.mean(error[bn[s]])) for s in sizes]
    stds = [100 * float(np.std(error[bn[s]])) for s in sizes]
    ax.errorbar(sizes, means, yerr=stds, marker="o", capsize=3, label="BN")
    gn = 100 * float(np.mean(error["GN"]))
    ax.axhline(gn, color="tab:orange", linestyle="--", label="GN (any size)")
    ax.set(
        xscale="log",
        xlabel="examples per BN statistics group",
        ylabel="test error (%)",
        title="error vs statistics group",
    )
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend()
    ctx.save_figure(figure, "small_batch.png")


EXPERIMENT = Experiment(
    name="small-batch",
    title="Batch norm with statistics over few examples vs group norm (Wu & He 2018)",
    claim=(
        "Batch norm's error grows as its statistics come from fewer examples; group norm's "
        "does not."
    ),
    paper=(
        "Wu & He (2018), Group Normalization, Sec. 4.1, Figure 1 / Table 2 (ResNet-50 ImageNet "
        "error vs images per worker). Stand-in: a CNN on Fashion-MNIST, a batch of 32 with BN "
        "statistics over groups of 32 ... 2."
    ),
    config_cls=Config,
    numbers_cls=Numbers,
    measure=measure,
    judge=judge,
    summary="BN with statistics over 32..2 examples of a fixed batch vs GN",
)
