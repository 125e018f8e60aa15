"""Adaptive gradient clipping: without batch norm, AGC keeps large batches trainable.

Claim (Brock, De, Smith & Simonyan 2021, NFNets, arXiv 2102.06171, Sec. 4 and Fig. 2; SPEC.md
4.5): batch norm lets a network train at large batch sizes with the correspondingly large
(linearly scaled) learning rates; an unnormalized network becomes unstable there, and clipping
each unit's gradient relative to its weights' norm (AGC, :mod:`batchnorm.optim`) restores it, up
to an accuracy matching the batch-norm network's (their Fig. 2, left: NF-ResNet-50 with and
without AGC against BN-ResNet-50 on ImageNet at batch sizes 256 ... 4096, learning rate
``0.1 x B / 256``). The clipping threshold ``lambda`` depends on the batch size: smaller for larger
batches (Sec. 4.1, Fig. 2 right; 0.01 at batch 4096). The paper clips every parameter but the
final linear layer's weights (its bias and the gains are clipped).

Stand-in: the small CNN on Fashion-MNIST without normalization (convolutions with bias), with and
without AGC, and with BN, at each batch size of ``batch_sizes`` for the same number of epochs,
the learning rate scaled linearly with the batch (``lr`` at batch 32), ``lambda(B) =
clipping_4096 * sqrt(4096 / B)`` (0.01 at 4096 as in the paper, larger for smaller batches).

Rules (in code): a variant *trains* at a batch size when no seed diverged and its mean final test
accuracy is at least BN's at that batch size minus ``target_gap`` (targets relative to batch
norm, so that they are within reach). (1) *AGC extends the batch range*: the largest batch size
at which the clipped network trains is larger than the unclipped one's ("not tested" when the
unclipped network trains at every batch size: there is no instability to repair; when it does
not train even at the smallest batch, where the paper's NF networks match BN; or when BN did
not train); (2) *AGC helps at the largest batch*: there, AGC minus no AGC test accuracy, paired
by seed, exceeds two standard errors of the differences; (3) *matches BN at the largest batch*:
there, AGC minus BN test accuracy, paired by seed, is at least minus the larger of
``target_gap`` and two standard errors of the differences. Rules (2) and (3) are "not tested"
when BN did not train at the largest batch (the budget, not the clipping, would decide).
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
    HEADS,
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
from batchnorm.lab.rules import baseline_metrics, gate, paired_tolerance, untrained

__all__ = ["Config", "Numbers", "EXPERIMENT", "measure", "judge", "clipping_for"]

PLAIN, CLIPPED, BN = "no norm", "no norm + AGC", "BN"
VARIANTS = {PLAIN: ("none", False), CLIPPED: ("none", True), BN: ("bn", False)}


def clipping_for(batch_size: int, clipping_4096: float) -> float:
    """AGC's ``lambda`` at ``batch_size``: ``clipping_4096 * sqrt(4096 / batch_size)``.

    NFNets use 0.01 at batch 4096 and larger thresholds for smaller batches (Sec. 4.1); the
    square root follows the gradient noise, whose norm falls as ``1 / sqrt(B)``.

    >>> round(clipping_for(4096, 0.01), 4), round(clipping_for(256, 0.01), 4)
    (0.01, 0.04)
    """
    return clipping_4096 * math.sqrt(4096 / batch_size)


@dataclass(frozen=True)
class Config(ScheduledConvConfig):
    """Batch-size sweep of an unnormalized CNN with / without AGC, and BN (full protocol)."""

    channels: tuple[int, ...] = param(
        (16, 32, 64), "widths of the conv layers (each: conv3x3, norm, ReLU, max pool)"
    )
    head: str = param(
        "gap",
        "the final linear layer's input: gap (global average pool; with flatten, BN at batch "
        "512 and learning rate 0.8 did not train: 0.43) or flatten",
        choices=HEADS,
    )
    train_subset: int | None = param(20_000, "training examples used (none = all)")
    batch_sizes: tuple[int, ...] = param(
        (32, 128, 512), "batch sizes of the sweep (learning rate scaled linearly)"
    )
    epochs: float = param(4.0, "passes over the training subset at every batch size")
    lr: float = param(0.05, "SGD learning rate at batch 32 (scaled linearly with the batch)")
    clipping_4096: float = param(
        0.01, "AGC lambda at batch 4096 (NFNets); lambda(B) = this * sqrt(4096 / B)"
    )
    target_gap: float = param(
        0.03, "a variant trains at B when within this of BN's mean test accuracy at B"
    )
    train_floor: float = param(0.6, "final train accuracy below which BN did not train")
    seeds: int = param(3, "number of seeds (each: initial weights and data order)")
    test_subset: int | None = param(None, "test images used (none = all)")

    def validate(self) -> None:
        super().validate()
        if not self.batch_sizes or min(self.batch_sizes) < 2:
            raise ValueError(f"batch_sizes must list sizes >= 2, got {self.batch_sizes}")
        if not self.clipping_4096 > 0:
            raise ValueError(f"clipping_4096 must be > 0, got {self.clipping_4096}")
        if not 0 < self.target_gap < 1:
            raise ValueError(f"target_gap must lie in (0, 1), got {self.target_gap}")
        if not 0 < self.train_floor < 1:
            raise ValueError(f"train_floor must lie in (0, 1), got {self.train_floor}")

    def quick(self) -> Config:
        """A smoke test: 2,000 images, 2 epochs, batch sizes 32 and 256, 2 seeds."""
        return replace(
            super().quick(), epochs=2.0, batch_sizes=(32, 256), seeds=2, channels=(8, 16)
        )


@dataclass
class Numbers:
    """What the claims are decided on, keyed by variant, then one entry per batch size."""

    batch_sizes: list[int]  # ascending
    lrs: list[float]  # the learning rate at each batch size
    clippings: list[float]  # AGC's lambda at each batch size
    target_gap: float  # the config's allowance below BN
    train_floor: float  # the config's train accuracy below which BN did not train
    acc: dict[str, list[list[float]]]  # final test accuracy, [batch][seed]
    train: dict[str, list[list[float]]]  # final train accuracy, [batch][seed]
    diverged: dict[str, list[int]]  # seeds that diverged, [batch]

    def targets(self) -> list[float]:
        """The test accuracy a variant must reach at each batch size: BN's mean minus the gap."""
        return [float(np.mean(a)) - self.target_gap for a in self.acc[BN]]

    def trains(self, variant: str) -> list[bool]:
        """At each batch size: no seed diverged and the mean reached the target."""
        return [
            d == 0 and float(np.mean(a)) >= t
            for a, d, t in zip(self.acc[variant], self.diverged[variant], self.targets())
        ]

    def largest(self, variant: str) -> float:
        """The largest batch size at which ``variant`` trains (-inf: none)."""
        return max(
            (b for b, ok in zip(self.batch_sizes, self.trains(variant)) if ok), default=-math.inf
        )


def judge(
    numbers: Numbers, *, spread_factor: float = 2.0, min_tolerance: float = 0.0005
) -> list[Claim]:
    """Decide the claims from ``numbers`` alone (the target gap is the config's, saved in the
    numbers).

    Args:
        numbers: what :func:`measure` measured.
        spread_factor, min_tolerance: the seed-spread margin of "matches BN" (see
            :func:`~batchnorm.lab.rules.paired_tolerance`); the allowance is the larger of it
            and the target gap.
    """
    n = numbers
    largest = {v: n.largest(v) for v in VARIANTS}
    trains = {v: n.trains(v) for v in VARIANTS}
    big = len(n.batch_sizes) - 1
    bn_reason = untrained(
        {f"BN at B={b} (train accuracy)": n.train[BN][i] for i, b in enumerate(n.batch_sizes)},
        floor=n.train_floor,
    )
    if all(trains[PLAIN]):
        range_reason = (
            f"the unclipped network trains at every batch size up to {n.batch_sizes[-1]}: no "
            "instability for AGC to repair"
        )
    elif not trains[PLAIN][0]:
        range_reason = (
            f"the unclipped network does not come within {n.target_gap:g} of BN even at the "
            f"smallest batch ({n.batch_sizes[0]}), where the paper's NF networks match BN: the "
            "stand-in cannot show where instability begins"
        )
    else:
        range_reason = None
    big_reason = untrained(
        {f"BN at B={n.batch_sizes[-1]} (train accuracy)": n.train[BN][big]},
        floor=n.train_floor,
    )
    plain_big = np.asarray(n.acc[PLAIN][big], dtype=np.float64)
    gain = np.asarray(n.acc[CLIPPED][big], dtype=np.float64) - plain_big
    gain_tol = paired_tolerance(gain, spread_factor=spread_factor, min_tolerance=min_tolerance)
    diff = np.asarray(n.acc[CLIPPED][big], dtype=np.float64) - np.asarray(
        n.acc[BN][big], dtype=np.float64
    )
    allowance = max(
        n.target_gap,
        paired_tolerance(diff, spread_factor=spread_factor, min_tolerance=min_tolerance),
    )
    by_batch = "; ".join(
        f"B={b}: target {t:.3f}, " + ", ".join(f"{v} {np.mean(n.acc[v][i]):.3f}" for v in VARIANTS)
        for i, (b, t) in enumerate(zip(n.batch_sizes, n.targets()))
    )
    return [
        gate(
            Claim(
                "AGC extends the batch range",
                "Without normalization, AGC lets the network train at batch sizes (and linearly "
                "scaled learning rates) where it fails unclipped.",
                "the largest batch size at which no seed diverges and the mean test accuracy is "
                f"within {n.target_gap:g} of BN's at that batch size is larger with AGC",
                bool(largest[CLIPPED] > largest[PLAIN]),
                f"{_fmt(largest[CLIPPED])} (AGC) vs {_fmt(largest[PLAIN])} (no AGC); {by_batch}",
            ),
            bn_reason or range_reason,
        ),
        gate(
            Claim(
                "AGC helps at the largest batch",
                "At a large batch and learning rate, the clipped unnormalized network does better "
                "than the unclipped one.",
                f"at B={n.batch_sizes[-1]}, AGC minus no AGC test accuracy paired by seed "
                f"above {spread_factor:g} standard errors of the differences (at least "
                f"{min_tolerance:g})",
                bool(gain.mean() > gain_tol),
                f"{np.mean(n.acc[CLIPPED][big]):.4f} (AGC) vs {plain_big.mean():.4f} (no AGC, "
                f"{n.diverged[PLAIN][big]} diverged): {gain.mean():+.4f}, tolerance {gain_tol:.4f}",
            ),
            big_reason,
        ),
        gate(
            Claim(
                "matches BN at the largest batch",
                "With AGC the unnormalized network matches the BN network at a large batch.",
                f"at B={n.batch_sizes[-1]}, AGC minus BN test accuracy paired by seed >= minus "
                f"the larger of {n.target_gap:g} and {spread_factor:g} standard errors",
                bool(diff.mean() >= -allowance),
                f"{np.mean(n.acc[CLIPPED][big]):.4f} (AGC) vs {np.mean(n.acc[BN][big]):.4f} "
                f"(BN): {diff.mean():+.4f}, allowance {allowance:.4f}; no AGC "
                f"{np.mean(n.acc[PLAIN][big]):.4f} ({n.diverged[PLAIN][big]} diverged)",
            ),
            big_reason,
        ),
    ]


def _fmt(batch: float) -> str:
    """A batch size, or "none" for -inf (no batch size of the sweep trains)."""
    return "none" if math.isinf(batch) else f"{batch:g}"


def measure(config: Config, ctx: Context) -> Measurement:
    """Train each variant at each batch size and seed, tabulate, plot."""
    data = image_data(ctx, config)
    n = len(data.train_y)
    sizes = sorted(set(config.batch_sizes))
    results: dict[str, dict[int, list[dict]]] = {v: {b: [] for b in sizes} for v in VARIANTS}
    rows = []
    steps = {b: config.steps_for(b, n) for b in sizes}
    lrs = {b: config.scaled_lr(b) for b in sizes}
    clips = {b: clipping_for(b, config.clipping_4096) for b in sizes}
    for b in sizes:
        jobs = [
            NetJob(
                key=f"{norm}{'-agc' if clip else ''}-b{b}-s{seed}",
                norm=norm,
                seed=seed,
                batches=lambda seed=seed, b=b: iid_batches(n, b, seed),
                desc=f"{name} B={b} seed {seed}",
                clipped=clip,
            )
            for name, (norm, clip) in VARIANTS.items()
            for seed in config.seed_list()
        ]
        trained = iter(
            train_jobs(
                ctx,
                config,
                data,
                jobs,
                steps=steps[b],
                lr=lrs[b],
                agc_clipping=clips[b],
                clip_classifier_bias=True,
            )
        )
        for name in VARIANTS:
            for seed in config.seed_list():
                result = next(trained)
                results[name][b].append(result)
                rows += job_curve_rows(result, name, seed, {"batch_size": b, "lr": lrs[b]})
    ctx.write_csv("curves.csv", rows, [*CURVE_FIELDS, "batch_size", "lr"])

    acc = {v: {b: final_acc(results[v][b]) for b in sizes} for v in VARIANTS}
    train = {
        v: {b: np.array([r["train_acc_final"] for r in results[v][b]]) for b in sizes}
        for v in VARIANTS
    }
    diverged = {
        v: {b: sum(r["diverged_at"] > 0 for r in results[v][b]) for b in sizes} for v in VARIANTS
    }
    numbers = Numbers(
        batch_sizes=sizes,
        lrs=[lrs[b] for b in sizes],
        clippings=[clips[b] for b in sizes],
        target_gap=config.target_gap,
        train_floor=config.train_floor,
        acc={v: [acc[v][b].tolist() for b in sizes] for v in VARIANTS},
        train={v: [np.nan_to_num(train[v][b]).tolist() for b in sizes] for v in VARIANTS},
        diverged={v: [int(diverged[v][b]) for b in sizes] for v in VARIANTS},
    )
    largest = {v: numbers.largest(v) for v in VARIANTS}
    comparisons = [
        Comparison(
            "largest batch size that trains (within the gap of BN): no norm / no norm + AGC",
            "NF-ResNets degrade at large batches unclipped; with AGC they match BN up to 4096 "
            "(Fig. 2, left)",
            " / ".join(_fmt(largest[v]) for v in (PLAIN, CLIPPED)),
        ),
        *[
            Comparison(
                f"test accuracy at B={b} (lr {lrs[b]:g}, lambda {clips[b]:.3f}): no norm / "
                "no norm + AGC / BN",
                "AGC matches BN; unclipped falls behind at large batches",
                " / ".join(f"{np.mean(acc[v][b]):.4f}" for v in (PLAIN, CLIPPED, BN)),
                value=float(np.mean(acc[CLIPPED][b]) - np.mean(acc[BN][b])),
            )
            for b in sizes
        ],
    ]
    table = md_table(
        ["batch", "lr", "lambda", *[f"{v}: test (train) [diverged]" for v in VARIANTS]],
        [
            [
                str(b),
                f"{lrs[b]:g}",
                f"{clips[b]:.3f}",
                *[
                    f"{fmt_mean_std(acc[v][b])} ({np.nanmean(train[v][b]):.3f}) [{diverged[v][b]}]"
                    for v in VARIANTS
                ],
            ]
            for b in sizes
        ],
    )
    with ctx.timer("plots"):
        _plot(ctx, sizes, acc)
    base_b = sizes[0]
    return Measurement(
        numbers=numbers,
        comparisons=comparisons,
        metrics={
            "batch_sizes": sizes,
            "lrs": {str(b): lrs[b] for b in sizes},
            "clipping": {str(b): clips[b] for b in sizes},
            "final_test_acc": {v: {str(b): acc[v][b] for b in sizes} for v in VARIANTS},
            "final_train_acc": {v: {str(b): train[v][b] for b in sizes} for v in VARIANTS},
            "diverged": {v: {str(b): diverged[v][b] for b in sizes} for v in VARIANTS},
            "largest_batch_that_trains": largest,
            "steps": {str(b): steps[b] for b in sizes},
            "baseline": f"BN CNN at batch {base_b} (lr {lrs[base_b]:g})",
            **baseline_metrics(np.nan_to_num(train[BN][base_b]), acc[BN][base_b]),
        },
        tables=[
            (
                "Final test accuracy (mean ± std), train accuracy and diverged seeds by batch",
                table,
            )
        ],
        figures=[("agc.png", "Final test accuracy against the batch size")],
        choices=[
            *[c for c in common_choices(config) if not c.startswith(("optimizer", "length"))],
            f"optimizer: SGD, momentum {config.momentum}, learning rate {config.lr:g} x B/32 "
            "(linear scaling, as NFNets' 0.1 x B/256 in Fig. 2), no weight decay; "
            f"{schedule_text(config)} (NFNets decay theirs with a cosine); "
            f"{config.epochs:g} epochs at every batch size (steps: "
            + ", ".join(f"B={b}: {steps[b]}" for b in sizes)
            + ")",
            "AGC: batchnorm.optim.AGC (unit-wise, eps 1e-3), lambda(B) = "
            f"{config.clipping_4096:g} x sqrt(4096 / B) ("
            + ", ".join(f"B={b}: {clips[b]:.3f}" for b in sizes)
            + "): the paper's 0.01 at batch 4096 and its 'smaller for larger batches' (Sec. 4.1, "
            "Fig. 2 right; the square-root form is this stand-in's extrapolation, fixed before "
            "the run); every parameter clipped except the final linear layer's weights (its "
            "bias is clipped, as in the NFNets code)",
            "the unnormalized network keeps its conv biases and torch's default initialization "
            "(no scaled weight standardization or other NFNet ingredients)",
            f"a variant trains at B when no seed diverged and its mean test accuracy is within "
            f"{config.target_gap:g} of BN's at B; train accuracy: training batches of the last "
            "10% of steps" + (" after the drop" if config.decay_at < 1 else ""),
            "a network whose loss becomes non-finite is stopped and scored at chance",
        ],
        notes=[
            "The paper's figure could not be read here; the batch sizes, learning-rate scaling "
            "and thresholds follow its text as summarized in SPEC.md 4.5 and the NFNets docs."
        ],
    )


def _plot(ctx: Context, sizes, acc) -> None:
    from batchnorm.lab.plots import band, new_figure

    figure, axes = new_figure(1, 1, size=(5.2, 3.8))
    ax = axes[0, 0]
    for v in VARIANTS:
        band(ax, sizes, np.array([acc[v][b] for b in sizes]), label=v)
    ax.set(xscale="log", xlabel="batch size (lr scaled linearly)", ylabel="final test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ctx.save_figure(figure, "agc.png")


EXPERIMENT = Experiment(
    name="agc",
    title="Adaptive gradient clipping vs batch norm at large batch sizes (NFNets, 2021)",
    claim=(
        "An unnormalized network with adaptive gradient clipping trains at batch sizes (and "
        "linearly scaled learning rates) where it otherwise fails, and matches batch norm there."
    ),
    paper=(
        "Brock, De, Smith & Simonyan (2021), NFNets, Sec. 4.1 and Fig. 2 (AGC across batch "
        "sizes). Stand-in: a small CNN on Fashion-MNIST over a batch-size sweep."
    ),
    config_cls=Config,
    numbers_cls=Numbers,
    measure=measure,
    judge=judge,
    summary="unnormalized CNN with/without AGC vs BN over batch sizes (lr scaled)",
)
