"""Figure 1 of Ioffe & Szegedy (2015): batch norm on MNIST trains faster and keeps the inputs of
the nonlinearities stable.

Claim (Sec. 4.1, Figure 1): a 784-100-100-100-10 network with sigmoid hidden units, trained with
mini-batches of 60 for 50,000 steps, reaches a higher test accuracy faster when batch norm is
inserted before each sigmoid (Fig. 1a: with BN ~0.95 at the first plotted point and ~0.98 at 50k
steps; without BN ~0.70 early and ~0.97 at 50k, values read off the plot). The distribution of
a last-hidden-layer sigmoid's input, shown by its 15th/50th/85th percentiles over training, drifts
in both mean and spread without batch norm (Fig. 1b) and stays stable with it (Fig. 1c).

Protocol here: exactly the paper's where it says something (architecture, sigmoid, batch 60,
50,000 steps, BN on ``Wu`` before each sigmoid with the bias of ``Wu`` dropped, population
statistics at test time by Algorithm 2). What the paper leaves open, chosen before the full run
and not tuned to match the figure:

- optimizer: plain SGD, learning rate 0.1, no momentum, weight decay or schedule;
- initialization: W ~ N(0, 1/fan_in) (LeCun normal), biases 0, gamma 1, beta 0;
- eps = 1e-5 (PyTorch's default); loss: mean cross-entropy over the mini-batch;
- inputs: pixels / 255, no preprocessing or augmentation; the training set reshuffled each epoch
  (1,000 steps), the same order for the BN and the plain network of each seed (paired runs from
  the same initial weights);
- test-time BN: Algorithm 2 over 100 training mini-batches of 60 at each plotted point, over one
  whole pass (1,000 mini-batches) at the end; the moving-average accuracy is reported beside it;
- plotted points every 500 steps; "the first plotted point" is step 500;
- Fig. 1(b, c): percentiles over the 10,000 test images, in inference mode, of the input to unit
  0 of the last hidden layer (for BN: y = BN(Wu), the sigmoid's input), for seed 0; the drift
  numbers are averaged over seeds and also given for all 100 units.

Drift numbers (for a unit, over the plotted points t, including step 0; the report also gives
them over the second half of training alone, outside the verdict):
``median drift = (max_t p50 - min_t p50) / mean_t (p85 - p15)`` (how far the centre moves, in
units of the typical spread) and ``spread ratio = max_t (p85 - p15) / min_t (p85 - p15)``.

Speed: both models and all seeds train at once as one wide network (:mod:`batchnorm.lab.wide`);
each network in it still follows exactly the protocol above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

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
    mean_std,
)
from batchnorm.lab.experiments.common import (
    CURVE_FIELDS,
    CommonConfig,
    build_model,
    curve_rows,
    fmt_steps,
    mean_steps,
    settings,
    specs_for,
    steps_to_target,
    variant_indices,
)

__all__ = ["Config", "Numbers", "EXPERIMENT", "measure", "judge", "drift"]

WITH, WITHOUT = "with BN", "without BN"
# The default margin of the "faster" rule (see judge): BN must lead by this much at the first
# plotted point.
EARLY_MARGIN = 0.05
TARGET = 0.95  # for "steps to reach", reported beside the curves


@dataclass(frozen=True)
class Config(CommonConfig):
    """Figure 1: the paper's MNIST protocol. Defaults are the full protocol."""

    tracked_unit: int = param(0, "the last-hidden-layer unit whose input Fig. 1(b, c) follow")

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.tracked_unit < self.hidden[-1]:
            raise ValueError(
                f"tracked_unit must be a unit of the last hidden layer, 0..{self.hidden[-1] - 1}; "
                f"got {self.tracked_unit}"
            )

    def quick(self) -> Config:
        """A smoke test: 1,500 steps, 2 seeds, smaller evaluations (well under a minute)."""
        return replace(
            self,
            steps=1500,
            seeds=2,
            eval_every=250,
            eval_examples=2000,
            popstat_batches=20,
            final_popstat_batches=100,
        )


def drift(percentiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median drift and spread ratio of each unit (see the module docstring).

    Args:
        percentiles: (T, 3, F) 15th/50th/85th percentiles of F units at T points.

    Returns:
        (F,) median drift and (F,) spread ratio.

    >>> p = np.array([[[-1.0], [0.0], [1.0]], [[0.0], [1.0], [4.0]]])  # spread 2, then 4
    >>> drift(p)
    (array([0.33333333]), array([2.]))
    """
    p15, p50, p85 = percentiles[:, 0, :], percentiles[:, 1, :], percentiles[:, 2, :]
    spread = p85 - p15
    with np.errstate(divide="ignore", invalid="ignore"):
        median_drift = (p50.max(0) - p50.min(0)) / spread.mean(0)
        ratio = spread.max(0) / spread.min(0)
    return median_drift, ratio


@dataclass
class Numbers:
    """What the claims of Figure 1 are decided on: per-seed values, paired by seed."""

    first_step: int  # the first plotted point after step 0
    last_step: int
    tracked_unit: int
    early_bn: list[float]  # test accuracy at first_step, with BN, one per seed
    early_plain: list[float]  # ... without BN
    final_bn: list[float]  # test accuracy at last_step, with BN
    final_plain: list[float]
    median_drift_bn: list[float]  # the tracked unit's median drift, with BN
    median_drift_plain: list[float]
    spread_ratio_bn: list[float]  # the tracked unit's spread ratio, with BN
    spread_ratio_plain: list[float]


def judge(
    numbers: Numbers, *, early_margin: float = EARLY_MARGIN, final_margin: float = 0.0
) -> list[Claim]:
    """Decide the claims of Figure 1 from ``numbers`` alone.

    Args:
        numbers: what :func:`measure` measured.
        early_margin: "faster" holds when BN's mean test accuracy at the first plotted point
            leads by at least this much (a tie at the margin holds).
        final_margin: "higher" holds when, for every seed, BN's final test accuracy exceeds the
            plain network's by more than this (a tie does not hold).
    """
    n = numbers
    early_bn, early_plain = mean_std(n.early_bn)[0], mean_std(n.early_plain)[0]
    lead = early_bn - early_plain
    paired_final = np.asarray(n.final_bn, dtype=np.float64) - np.asarray(
        n.final_plain, dtype=np.float64
    )
    center_bn, center_plain = mean_std(n.median_drift_bn)[0], mean_std(n.median_drift_plain)[0]
    ratio_bn, ratio_plain = mean_std(n.spread_ratio_bn)[0], mean_std(n.spread_ratio_plain)[0]
    return [
        Claim(
            "faster",
            "With BN the network reaches a higher test accuracy faster (Fig. 1a).",
            f"mean test accuracy with BN at the first plotted point (step {n.first_step}) exceeds "
            f"that without BN by at least {early_margin}",
            bool(lead >= early_margin),
            f"step {n.first_step}: {early_bn:.4f} vs {early_plain:.4f} (lead {lead:+.4f})",
        ),
        Claim(
            "higher",
            f"With BN the final test accuracy is higher (Fig. 1a, at {n.last_step:,} steps).",
            "test accuracy with BN above that without BN for every seed (paired runs: same "
            "initial weights and data order)"
            + (f", by more than {final_margin}" if final_margin else ""),
            bool(len(paired_final) > 0 and np.all(paired_final > final_margin)),
            "BN minus no BN per seed: " + ", ".join(f"{d:+.4f}" for d in paired_final),
        ),
        Claim(
            "stable",
            "With BN the input distribution of a sigmoid stays stable; without BN its mean and "
            "spread drift (Fig. 1b, c).",
            f"for the tracked unit {n.tracked_unit}, both the median drift and the spread ratio, "
            "averaged over seeds, are smaller with BN",
            bool(center_bn < center_plain and ratio_bn < ratio_plain),
            f"median drift {center_bn:.3f} vs {center_plain:.3f}; spread ratio "
            f"{ratio_bn:.3f} vs {ratio_plain:.3f}",
        ),
    ]


def measure(config: Config, ctx: Context) -> Measurement:
    """Train both models on all seeds, evaluate, and draw Figure 1."""
    data = ctx.load_data(config.dataset, config.train_subset, config.test_subset)
    specs = specs_for(
        config, [{"variant": WITH, "batch_norm": True}, {"variant": WITHOUT, "batch_norm": False}]
    )
    result = ctx.job(
        "fig1",
        lambda: build_model(config, specs, data),
        settings(config, percentiles=True),
        data,
        desc=f"fig1 {config.dataset} ({len(specs)} nets)",
    )
    bn = variant_indices(result, variant=WITH)
    plain = variant_indices(result, variant=WITHOUT)
    steps = result.steps
    acc = result.test_acc
    first = 1 if len(steps) > 1 else 0  # the first plotted point after step 0
    first_step = int(steps[first])
    last_step = int(steps[-1])

    early_bn, early_plain = acc[first, bn], acc[first, plain]
    final_bn, final_plain = acc[-1, bn], acc[-1, plain]
    to_target_bn = [steps_to_target(result, g, TARGET) for g in bn]
    to_target_plain = [steps_to_target(result, g, TARGET) for g in plain]

    assert result.percentiles is not None
    unit = config.tracked_unit
    drift_bn = [drift(result.percentiles[:, g]) for g in bn]  # per seed: (F,), (F,)
    drift_plain = [drift(result.percentiles[:, g]) for g in plain]
    unit_center_bn = [d[0][unit] for d in drift_bn]
    unit_center_plain = [d[0][unit] for d in drift_plain]
    unit_ratio_bn = [d[1][unit] for d in drift_bn]
    unit_ratio_plain = [d[1][unit] for d in drift_plain]
    all_center_bn = [float(np.nanmedian(d[0])) for d in drift_bn]
    all_center_plain = [float(np.nanmedian(d[0])) for d in drift_plain]
    all_ratio_bn = [float(np.nanmedian(d[1])) for d in drift_bn]
    all_ratio_plain = [float(np.nanmedian(d[1])) for d in drift_plain]
    # The same over the second half of training only (not part of the verdict): how much of the
    # drift is the early transient.
    late = steps >= steps[-1] / 2
    late_bn = [drift(result.percentiles[late, g]) for g in bn]
    late_plain = [drift(result.percentiles[late, g]) for g in plain]
    late_center = {WITH: [d[0][unit] for d in late_bn], WITHOUT: [d[0][unit] for d in late_plain]}
    late_ratio = {WITH: [d[1][unit] for d in late_bn], WITHOUT: [d[1][unit] for d in late_plain]}

    numbers = Numbers(
        first_step=first_step,
        last_step=last_step,
        tracked_unit=unit,
        early_bn=early_bn.tolist(),
        early_plain=early_plain.tolist(),
        final_bn=final_bn.tolist(),
        final_plain=final_plain.tolist(),
        median_drift_bn=[float(v) for v in unit_center_bn],
        median_drift_plain=[float(v) for v in unit_center_plain],
        spread_ratio_bn=[float(v) for v in unit_ratio_bn],
        spread_ratio_plain=[float(v) for v in unit_ratio_plain],
    )

    comparisons = [
        Comparison(
            f"test accuracy at the first plotted point (step {first_step}), with BN",
            "~0.95",
            fmt_mean_std(early_bn),
            *mean_std(early_bn)[:2],
        ),
        Comparison(
            f"test accuracy at the first plotted point (step {first_step}), without BN",
            "~0.70",
            fmt_mean_std(early_plain),
            *mean_std(early_plain)[:2],
        ),
        Comparison(
            f"test accuracy at {last_step:,} steps, with BN (paper: 50k)",
            "~0.98",
            fmt_mean_std(final_bn),
            *mean_std(final_bn)[:2],
        ),
        Comparison(
            f"test accuracy at {last_step:,} steps, without BN (paper: 50k)",
            "~0.97",
            fmt_mean_std(final_plain),
            *mean_std(final_plain)[:2],
        ),
        Comparison(
            f"steps to reach {TARGET} test accuracy, with BN / without BN",
            "not given (BN: 'faster')",
            f"{fmt_steps(mean_steps(to_target_bn))} / {fmt_steps(mean_steps(to_target_plain))}",
        ),
        Comparison(
            f"unit {unit}: median drift (centre movement / mean 15-85 spread), with BN",
            "stable (Fig. 1c)",
            fmt_mean_std(unit_center_bn, 3),
            *mean_std(unit_center_bn)[:2],
        ),
        Comparison(
            f"unit {unit}: median drift, without BN",
            "drifts (Fig. 1b)",
            fmt_mean_std(unit_center_plain, 3),
            *mean_std(unit_center_plain)[:2],
        ),
        Comparison(
            f"unit {unit}: spread ratio (max / min of the 15-85 spread), with BN",
            "stable (Fig. 1c)",
            fmt_mean_std(unit_ratio_bn, 3),
            *mean_std(unit_ratio_bn)[:2],
        ),
        Comparison(
            f"unit {unit}: spread ratio, without BN",
            "changes (Fig. 1b)",
            fmt_mean_std(unit_ratio_plain, 3),
            *mean_std(unit_ratio_plain)[:2],
        ),
        Comparison(
            f"all {config.hidden[-1]} last-layer units, median over units: median drift, "
            "with / without BN",
            "-",
            f"{fmt_mean_std(all_center_bn, 3)} / {fmt_mean_std(all_center_plain, 3)}",
        ),
        Comparison(
            "all units, median over units: spread ratio, with / without BN",
            "-",
            f"{fmt_mean_std(all_ratio_bn, 3)} / {fmt_mean_std(all_ratio_plain, 3)}",
        ),
        Comparison(
            f"unit {unit}, second half of training only (steps >= {int(steps[-1]) // 2:,}): "
            "median drift, with / without BN",
            "-",
            f"{fmt_mean_std(late_center[WITH], 3)} / {fmt_mean_std(late_center[WITHOUT], 3)}",
        ),
        Comparison(
            f"unit {unit}, second half of training only: spread ratio, with / without BN",
            "-",
            f"{fmt_mean_std(late_ratio[WITH], 3)} / {fmt_mean_std(late_ratio[WITHOUT], 3)}",
        ),
        Comparison(
            "final test accuracy with BN using the moving averages instead of Algorithm 2",
            "Algorithm 2 used",
            fmt_mean_std(result.final_test_acc_moving_average[bn]),
        ),
    ]

    # Accuracy at a few steps, for reading the curves.
    marks = [s for s in (first_step, 1000, 2000, 5000, 10_000, 20_000, 30_000, 40_000) if s]
    marks = sorted({s for s in marks if s in set(steps.tolist())} | {last_step})
    rows = [
        [
            f"{s:,}",
            fmt_mean_std(acc[list(steps).index(s), bn]),
            fmt_mean_std(acc[list(steps).index(s), plain]),
        ]
        for s in marks
    ]
    tables = [("Test accuracy over training", md_table(["step", WITH, WITHOUT], rows))]

    ctx.write_csv("curves.csv", curve_rows(result), CURVE_FIELDS)
    pct_rows = []
    for g in bn + plain:
        spec = result.specs[g]
        for t, step in enumerate(steps):
            p = result.percentiles[t, g, :, unit]
            pct_rows.append(
                {
                    "step": int(step),
                    "variant": spec.variant,
                    "seed": spec.seed,
                    "unit": unit,
                    "p15": p[0],
                    "p50": p[1],
                    "p85": p[2],
                }
            )
    ctx.write_csv(
        "percentiles.csv", pct_rows, ["step", "variant", "seed", "unit", "p15", "p50", "p85"]
    )
    with ctx.timer("plots"):
        _plot(ctx, result, bn, plain, unit)

    metrics: dict[str, Any] = {
        "steps": steps,
        "first_plotted_step": first_step,
        "test_acc": {WITH: acc[:, bn], WITHOUT: acc[:, plain]},
        "final_test_acc": {WITH: final_bn, WITHOUT: final_plain},
        "early_test_acc": {WITH: early_bn, WITHOUT: early_plain},
        "final_test_acc_moving_average": {WITH: result.final_test_acc_moving_average[bn]},
        f"steps_to_{TARGET}": {WITH: to_target_bn, WITHOUT: to_target_plain},
        "tracked_unit": unit,
        "median_drift_tracked_unit": {WITH: unit_center_bn, WITHOUT: unit_center_plain},
        "spread_ratio_tracked_unit": {WITH: unit_ratio_bn, WITHOUT: unit_ratio_plain},
        "median_drift_all_units_median": {WITH: all_center_bn, WITHOUT: all_center_plain},
        "spread_ratio_all_units_median": {WITH: all_ratio_bn, WITHOUT: all_ratio_plain},
        "median_drift_tracked_unit_second_half": late_center,
        "spread_ratio_tracked_unit_second_half": late_ratio,
        "diverged_at": result.diverged_at,
        "seeds": [result.specs[g].seed for g in bn],
    }
    choices = [
        f"optimizer: plain SGD, learning rate {config.lr}, momentum {config.momentum}, no weight "
        "decay, no schedule",
        f"initialization: W ~ N(0, {config.init_scale}^2 / fan_in), biases 0, gamma 1, beta 0",
        f"eps = {config.eps}; loss: mean cross-entropy over the mini-batch",
        "BN on Wu before each sigmoid, bias of Wu dropped; no BN on the output layer",
        "inputs: pixels / 255, no preprocessing or augmentation; reshuffled every epoch, the "
        "same order for the BN and the plain network of a seed (paired, same initial weights)",
        f"test-time BN: Algorithm 2 over {config.popstat_batches} training mini-batches of "
        f"{config.batch_size} at each plotted point, "
        + (
            "one whole pass over the training set"
            if config.final_popstat_batches is None
            else f"{config.final_popstat_batches} mini-batches"
        )
        + " at the end",
        f"plotted points every {config.eval_every} steps"
        + (
            f" (intermediate ones on the first {config.eval_examples} test images)"
            if config.eval_examples
            else " on the whole test set"
        ),
        f"Fig. 1(b, c): percentiles over the test images, inference mode, of the input to unit "
        f"{unit} of the last hidden layer (with BN: y = BN(Wu)); plotted for the first seed",
        f"BN layer: {config.bn_impl} ("
        + ("batchnorm.nn.BatchNorm1d" if config.bn_impl == "batchnorm" else "torch.nn.BatchNorm1d")
        + ")",
    ]
    notes = []
    diverged = int(np.sum(result.diverged_at >= 0))
    if diverged:
        notes.append(f"{diverged} network(s) diverged (non-finite loss); see metrics.json")
    if config.dataset != "mnist":
        notes.append(f"data set {config.dataset!r}, not MNIST: the paper's numbers do not apply")
    return Measurement(
        numbers=numbers,
        comparisons=comparisons,
        metrics=metrics,
        tables=tables,
        figures=[
            (
                "fig1.png",
                "Figure 1 reproduced: (a) test accuracy, mean and min-max band over "
                f"seeds; (b, c) 15th/50th/85th percentiles of unit {unit}'s input (first seed)",
            ),
        ],
        choices=choices,
        notes=notes,
    )


def _plot(ctx: Context, result: Any, bn: list[int], plain: list[int], unit: int) -> None:
    from batchnorm.lab.plots import COLORS, band, new_figure

    figure, axes = new_figure(3, 1, size=(4.6, 3.4))
    ax = axes[0, 0]
    band(ax, result.steps, result.test_acc[:, bn], label=WITH, color=COLORS[WITH])
    band(ax, result.steps, result.test_acc[:, plain], label=WITHOUT, color=COLORS[WITHOUT])
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy")
    low = float(np.nanmin(result.test_acc[1:, bn + plain])) if len(result.steps) > 1 else 0.0
    ax.set_ylim(max(0.0, min(0.7, math.floor(low * 10) / 10)), 1.0)
    ax.set_title("(a) test accuracy")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    for ax, g, title in (
        (axes[0, 1], plain[0], f"(b) {WITHOUT}: unit {unit} input"),
        (axes[0, 2], bn[0], f"(c) {WITH}: unit {unit} input"),
    ):
        p = result.percentiles[:, g, :, unit]
        for i, (name, style) in enumerate((("15th", "--"), ("50th", "-"), ("85th", "--"))):
            ax.plot(result.steps, p[:, i], linestyle=style, color="k", linewidth=1.2, label=name)
        ax.set_xlabel("training step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    # Same y range for (b) and (c), so that their stability can be compared by eye.
    lows = [axes[0, i].get_ylim()[0] for i in (1, 2)]
    highs = [axes[0, i].get_ylim()[1] for i in (1, 2)]
    for i in (1, 2):
        axes[0, i].set_ylim(min(lows), max(highs))
    ctx.save_figure(figure, "fig1.png")


EXPERIMENT = Experiment(
    name="fig1",
    aliases=("mnist",),
    title="Figure 1: batch norm on MNIST (Ioffe & Szegedy 2015, Sec. 4.1)",
    claim=(
        "Batch norm before each sigmoid of a 784-100-100-100-10 MNIST network makes it reach "
        "a higher test accuracy faster, and keeps the inputs of the sigmoids stable over training."
    ),
    paper=(
        "Ioffe & Szegedy (2015), arXiv 1502.03167, Figure 1(a, b, c) and Sec. 4.1: batch 60, "
        "50,000 steps; with BN ~0.95 at the first plotted point and ~0.98 at 50k, without BN "
        "~0.70 early and ~0.97 at 50k (read off the plot)."
    ),
    config_cls=Config,
    numbers_cls=Numbers,
    measure=measure,
    judge=judge,
    summary="MNIST sigmoid MLP with/without BN: accuracy curves and sigmoid-input percentiles",
)
