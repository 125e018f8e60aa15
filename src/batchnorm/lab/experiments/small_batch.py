"""Small batches: batch norm degrades as the batch shrinks; group norm does not.

Claim (Wu & He 2018, Group Normalization, Sec. 1 and Figure 1 / Table 2; SPEC.md 4.5): batch
norm's error grows quickly as the batch gets small, because its batch statistics become noisy
estimates and training and test normalize differently; group norm, which normalizes each example
on its own, is unaffected by the batch size. The paper's ResNet-50 ImageNet validation error at
batch 32 / 16 / 8 / 4 / 2 images per worker: BN 23.6 / 23.7 / 24.8 / 27.3 / 34.7 %, GN
24.1 / 24.2 / 24.0 / 24.2 / 24.1 %. Stand-in: a small CNN on Fashion-MNIST with BN, GN, LN, IN
and batch renormalization (Ioffe 2017) at the same batch sizes, the same number of epochs each,
learning rate scaled linearly with the batch.

Rules (in code), with the smallest and largest batch of the sweep: (1) *BN degrades*: BN's mean
test error at the smallest batch exceeds that at the largest by at least ``min_degradation``;
(2) *GN does not*: GN's change in mean test error from the largest to the smallest batch is
smaller than BN's, and GN's error at the smallest batch is below BN's.
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
    norm_kwargs,
    train_jobs,
)

__all__ = ["Config", "Numbers", "EXPERIMENT", "measure", "judge"]

LABELS = {
    "bn": "BN",
    "gn": "GN",
    "ln": "LN",
    "in": "IN",
    "renorm": "BatchRenorm",
}
PAPER = {  # Wu & He 2018, Figure 1 / Table 2: ResNet-50 ImageNet val error (%), per batch size
    "bn": {32: 23.6, 16: 23.7, 8: 24.8, 4: 27.3, 2: 34.7},
    "gn": {32: 24.1, 16: 24.2, 8: 24.0, 4: 24.2, 2: 24.1},
}


@dataclass(frozen=True)
class Config(ConvConfig):
    """Batch-size sweep of five normalizations. Defaults are the full protocol (~8 min)."""

    train_subset: int | None = param(3000, "training examples used (none = all)")
    batch_sizes: tuple[int, ...] = param((32, 16, 8, 4, 2), "batch sizes of the sweep")
    norms: tuple[str, ...] = param(
        ("bn", "gn", "ln", "in", "renorm"), "normalizations compared (bn and gn are required)"
    )
    gn_groups: int = param(4, "groups of group norm (must divide every width in channels)")
    min_degradation: float = param(
        0.01,
        "rule (1): smallest increase of BN's test error from the largest to the smallest batch",
    )

    def validate(self) -> None:
        super().validate()
        if len(set(self.batch_sizes)) < 2 or min(self.batch_sizes) < 2:
            raise ValueError(
                f"batch_sizes must list at least two sizes, each >= 2, got {self.batch_sizes}"
            )
        unknown = [n for n in self.norms if n not in LABELS]
        if unknown or not {"bn", "gn"} <= set(self.norms):
            raise ValueError(
                f"norms must include bn and gn and use only {', '.join(LABELS)}; got {self.norms}"
            )
        if any(c % self.gn_groups for c in self.channels) or self.gn_groups < 1:
            raise ValueError(
                f"gn_groups={self.gn_groups} must divide every width in channels={self.channels}"
            )

    def quick(self) -> Config:
        """A smoke test: three batch sizes, BN / GN / BatchRenorm, 1,000 images, 1 epoch."""
        return replace(
            super().quick(),
            batch_sizes=(32, 8, 2),
            norms=("bn", "gn", "renorm"),
            train_subset=1000,
            epochs=1.0,
        )


@dataclass
class Numbers:
    """What the claims are decided on: BN's and GN's test errors at the largest and the smallest
    batch size, per seed (keyed by norm, "bn" or "gn", then by batch size)."""

    big: int  # the largest batch size
    small: int  # the smallest
    min_degradation: float  # the config's least growth of BN's error for "BN degrades"
    error: dict[str, dict[int, list[float]]]  # final test error (1 - accuracy)


def judge(numbers: Numbers, *, gn_margin: float = 0.0) -> list[Claim]:
    """Decide the claims from ``numbers`` alone.

    Args:
        numbers: what :func:`measure` measured; "BN degrades" holds when BN's mean error grows
            by at least the config's ``min_degradation`` (saved in the numbers; a tie holds).
        gn_margin: "GN does not" needs GN's change in error below BN's, and GN's error at the
            smallest batch below BN's, each by more than this (ties do not hold).
    """
    n = numbers
    big, small = n.big, n.small
    mean_err = {m: {b: float(np.mean(v)) for b, v in per_b.items()} for m, per_b in n.error.items()}
    bn_change = mean_err["bn"][small] - mean_err["bn"][big]
    gn_change = mean_err["gn"][small] - mean_err["gn"][big]
    gn_holds = (
        gn_change < bn_change - gn_margin
        and mean_err["gn"][small] < mean_err["bn"][small] - gn_margin
    )
    return [
        Claim(
            "BN degrades",
            "Batch norm's test error grows as the batch shrinks.",
            f"BN's mean test error at batch {small} exceeds that at batch {big} by at least "
            f"{n.min_degradation}",
            bool(bn_change >= n.min_degradation),
            f"BN error {mean_err['bn'][big]:.4f} at batch {big} -> {mean_err['bn'][small]:.4f} "
            f"at batch {small} (change {bn_change:+.4f})",
        ),
        Claim(
            "GN does not",
            "Group norm's test error does not depend on the batch size the way BN's does.",
            f"GN's change in mean test error from batch {big} to {small} is smaller than BN's, "
            f"and GN's error at batch {small} is below BN's"
            + (f" (each by more than {gn_margin})" if gn_margin else ""),
            bool(gn_holds),
            f"change {gn_change:+.4f} (GN) vs {bn_change:+.4f} (BN); at batch {small}: "
            f"{mean_err['gn'][small]:.4f} (GN) vs {mean_err['bn'][small]:.4f} (BN)",
        ),
    ]


def measure(config: Config, ctx: Context) -> Measurement:
    """Train every (norm, batch size, seed), tabulate and plot."""
    data = image_data(ctx, config)
    n = len(data.train_y)
    batch_sizes = tuple(sorted(set(config.batch_sizes), reverse=True))
    norms = tuple(dict.fromkeys(config.norms))
    results: dict[str, dict[int, list[dict]]] = {m: {b: [] for b in batch_sizes} for m in norms}
    rows = []
    for b in batch_sizes:
        steps = config.steps_for(b, n)
        jobs = [
            NetJob(
                key=f"{norm}-b{b}-s{seed}",
                norm=norm,
                seed=seed,
                batches=lambda b=b, seed=seed: iid_batches(n, b, seed),
                desc=f"{LABELS[norm]} batch {b} seed {seed}",
                options=norm_kwargs(norm, steps, config.gn_groups),
            )
            for norm in norms
            for seed in config.seed_list()
        ]
        trained = iter(train_jobs(ctx, config, data, jobs, steps=steps, lr=config.scaled_lr(b)))
        for norm in norms:
            for seed in config.seed_list():
                result = next(trained)
                results[norm][b].append(result)
                rows += job_curve_rows(result, LABELS[norm], seed, {"batch_size": b})
    ctx.write_csv("curves.csv", rows, [*CURVE_FIELDS, "batch_size"])

    error = {m: {b: 1.0 - final_acc(results[m][b]) for b in batch_sizes} for m in norms}
    mean_err = {m: {b: float(np.mean(error[m][b])) for b in batch_sizes} for m in norms}
    big, small = batch_sizes[0], batch_sizes[-1]
    numbers = Numbers(
        big=big,
        small=small,
        min_degradation=config.min_degradation,
        error={m: {b: error[m][b].tolist() for b in (big, small)} for m in ("bn", "gn")},
    )
    comparisons = []
    for m in ("bn", "gn"):
        comparisons.append(
            Comparison(
                f"{LABELS[m]} test error (%) at batch {' / '.join(str(b) for b in batch_sizes)}",
                " / ".join(f"{PAPER[m][b]:.1f}" if b in PAPER[m] else "-" for b in batch_sizes)
                + " (ResNet-50, ImageNet)",
                " / ".join(f"{100 * mean_err[m][b]:.1f}" for b in batch_sizes)
                + f" (small CNN, {data.name})",
                value=mean_err[m][small],
            )
        )
    table = md_table(
        ["norm", *[f"batch {b}" for b in batch_sizes], f"change {big} -> {small}"],
        [
            [
                LABELS[m],
                *[fmt_mean_std(100 * error[m][b], 1) for b in batch_sizes],
                f"{100 * (mean_err[m][small] - mean_err[m][big]):+.1f}",
            ]
            for m in norms
        ],
    )
    paper_table = md_table(
        ["norm", *[f"batch {b}" for b in batch_sizes]],
        [
            [f"{LABELS[m]} (paper)", *[f"{PAPER[m].get(b, '-')}" for b in batch_sizes]]
            for m in ("bn", "gn")
        ],
    )
    with ctx.timer("plots"):
        _plot(ctx, norms, batch_sizes, error)
    return Measurement(
        numbers=numbers,
        comparisons=comparisons,
        metrics={
            "batch_sizes": batch_sizes,
            "test_error": {LABELS[m]: {str(b): error[m][b] for b in batch_sizes} for m in norms},
            "mean_test_error": {
                LABELS[m]: {str(b): mean_err[m][b] for b in batch_sizes} for m in norms
            },
            "steps": {str(b): config.steps_for(b, n) for b in batch_sizes},
        },
        tables=[
            ("Test error (%) by batch size (mean ± std over seeds)", table),
            ("The paper's table (Wu & He 2018, ResNet-50 ImageNet val error, %)", paper_table),
        ],
        figures=[("small_batch.png", "Test error against batch size, per normalization")],
        choices=[
            *common_choices(config),
            f"group norm: {config.gn_groups} groups; layer norm: one group over (C, H, W); "
            "instance norm: per channel and example, with affine",
            "batch renorm: r_max 3, d_max 5, its warm-up and ramps at 4% / 20% / 30% of the "
            "steps (the paper's 5k / 25k / 40k in proportion)",
            "steps per batch size: "
            + ", ".join(f"{b}: {config.steps_for(b, n)}" for b in batch_sizes),
        ],
        notes=[
            "The paper's numbers are ImageNet ResNet-50 errors; only the shape (BN rising at small "
            "batch, GN flat) is comparable, not the values.",
        ],
    )


def _plot(ctx: Context, norms, batch_sizes, error) -> None:
    from batchnorm.lab.plots import new_figure

    figure, axes = new_figure(1, 1, size=(5.2, 3.8))
    ax = axes[0, 0]
    for m in norms:
        means = [100 * float(np.mean(error[m][b])) for b in batch_sizes]
        ax.plot(batch_sizes, means, marker="o", label=LABELS[m])
    ax.set(xscale="log", xlabel="batch size", ylabel="test error (%)", title="error vs batch")
    ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend()
    ctx.save_figure(figure, "small_batch.png")


EXPERIMENT = Experiment(
    name="small-batch",
    title="Batch norm at small batch sizes vs group / layer / instance norm and batch renorm",
    claim="Batch norm's error grows as the batch shrinks; group norm's does not.",
    paper=(
        "Wu & He (2018), Group Normalization, Figure 1 / Table 2 (ResNet-50 ImageNet error vs "
        "batch size). Stand-in: a small CNN on Fashion-MNIST, batch 32 ... 2."
    ),
    config_cls=Config,
    numbers_cls=Numbers,
    measure=measure,
    judge=judge,
    summary="BN vs GN/LN/IN/BatchRenorm across batch sizes 32..2",
)
