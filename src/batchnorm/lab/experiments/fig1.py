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

"Faster" at each model's best learning rate: the paper does not state its learning rate, and at
0.1 the network without batch norm is still near chance at step 500, which makes "faster" easy.
So both models are also trained at every learning rate of ``lr_grid`` (same seeds, initial
weights and data order, in the same wide network), and "faster" compares the test accuracy at the
first plotted point with each model at ITS best rate of the grid (the one with the highest mean
accuracy there, among those where no seed diverged): the most favourable choice for the network
without batch norm. "Higher" keeps the Figure 1 learning rate; the final accuracies at each
model's best rate (by final accuracy) are reported beside it.

Rules (in code; every difference paired by seed, with the margin of
:func:`batchnorm.lab.rules.paired_tolerance`, two standard errors of the per-seed differences and
at least 0.0005): "faster": with BN minus without, each at its best rate, at the first plotted
point, beyond the margin; "higher": with BN minus without at ``lr``, final test accuracy, beyond
the margin; "stable": the drift numbers of the tracked unit (median drift and spread ratio) are
smaller with BN, each paired difference beyond its margin. A claim whose networks did not train
(final training accuracy below ``trained_floor``) is "not tested".

Speed: both models, all learning rates and all seeds train at once as one wide network
(:mod:`batchnorm.lab.wide`); each network in it still follows exactly the protocol above.
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
from batchnorm.lab.rules import baseline_metrics, gate, paired_tolerance, untrained

__all__ = ["Config", "Numbers", "EXPERIMENT", "measure", "judge", "drift"]

WITH, WITHOUT = "with BN", "without BN"
TARGET = 0.95  # for "steps to reach", reported beside the curves
TRAINED_FLOOR = 0.5  # final training accuracy below which a network counts as untrained


def grid_variant(bn: bool, lr: float, default_lr: float) -> str:
    """The variant name of a model at a learning rate of the grid (the Figure 1 rate keeps the
    plain names "with BN" / "without BN", so that the metrics' keys stay as they were)."""
    name = WITH if bn else WITHOUT
    return name if lr == default_lr else f"{name}, lr {lr:g}"


@dataclass(frozen=True)
class Config(CommonConfig):
    """Figure 1: the paper's MNIST protocol. Defaults are the full protocol."""

    tracked_unit: int = param(0, "the last-hidden-layer unit whose input Fig. 1(b, c) follow")
    lr_grid: tuple[float, ...] = param(
        (0.1, 1.0),
        "learning rates both models also train at; 'faster' is judged at each model's best "
        "(lr itself is always included)",
    )
    train_eval_examples: int = param(
        10_000, "training examples on which the final training accuracy is measured"
    )

    def validate(self) -> None:
        super().validate()
        if not all(math.isfinite(r) and r > 0 for r in self.lr_grid):
            raise ValueError(f"lr_grid must list positive learning rates, got {self.lr_grid}")
        if self.train_eval_examples < 1:
            raise ValueError(
                f"train_eval_examples must be at least 1, got {self.train_eval_examples}"
            )
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
            lr_grid=(0.1, 1.0),
            train_eval_examples=2000,
        )

    def grid(self) -> list[float]:
        """The learning rates trained, ascending (``lr`` and the grid)."""
        return sorted({float(self.lr), *(float(r) for r in self.lr_grid)})


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
    # The learning-rate grid (absent in runs made before it existed: "faster" then uses lr).
    grid_lrs: list[float] | None = None  # ascending
    early_grid_bn: list[list[float]] | None = None  # [lr][seed] test acc at first_step, with BN
    early_grid_plain: list[list[float]] | None = None
    final_grid_bn: list[list[float]] | None = None  # [lr][seed] final test accuracy
    final_grid_plain: list[list[float]] | None = None
    diverged_grid_bn: list[int] | None = None  # [lr] networks that diverged
    diverged_grid_plain: list[int] | None = None
    train_grid_bn: list[list[float]] | None = None  # [lr][seed] final training accuracy
    train_grid_plain: list[list[float]] | None = None
    lr: float | None = None  # the Figure 1 learning rate ("higher", the drift)


def _mean(values) -> float:
    """The mean of ``values``, NaN (without a warning) when there are none."""
    return float(np.mean(values)) if len(values) else math.nan


def best_lr_index(values: list[list[float]], diverged: list[int]) -> int:
    """The grid index with the highest mean over seeds among the rates where no seed diverged
    (all rates if every one diverged somewhere); the lower rate wins a tie.

    >>> best_lr_index([[0.5, 0.6], [0.9, 0.8], [0.95, 0.9]], [0, 0, 1])
    1
    """
    means = [float(np.mean(v)) if len(v) else -math.inf for v in values]
    allowed = [i for i, d in enumerate(diverged) if d == 0] or list(range(len(values)))
    return max(allowed, key=lambda i: (means[i], -i))


def judge(
    numbers: Numbers,
    *,
    spread_factor: float = 2.0,
    min_tolerance: float = 0.0005,
    trained_floor: float = TRAINED_FLOOR,
) -> list[Claim]:
    """Decide the claims of Figure 1 from ``numbers`` alone (see the module docstring).

    Args:
        numbers: what :func:`measure` measured.
        spread_factor, min_tolerance: the margin of :func:`paired_tolerance` (every difference
            is paired by seed and must exceed it).
        trained_floor: the final training accuracy below which the networks of a claim count as
            untrained, which makes the claim "not tested".
    """
    n = numbers

    def tol(d: np.ndarray) -> float:
        return paired_tolerance(d, spread_factor=spread_factor, min_tolerance=min_tolerance)

    def arr(values) -> np.ndarray:
        return np.asarray(values, dtype=np.float64)

    grid = n.grid_lrs is not None and n.early_grid_bn is not None
    if grid:
        assert n.early_grid_plain is not None and n.grid_lrs is not None
        div_bn = n.diverged_grid_bn or [0] * len(n.grid_lrs)
        div_plain = n.diverged_grid_plain or [0] * len(n.grid_lrs)
        i_bn = best_lr_index(n.early_grid_bn, div_bn)
        i_plain = best_lr_index(n.early_grid_plain, div_plain)
        fast_bn, fast_plain = arr(n.early_grid_bn[i_bn]), arr(n.early_grid_plain[i_plain])
        where = f"BN at lr {n.grid_lrs[i_bn]:g}, no BN at lr {n.grid_lrs[i_plain]:g}"
        fast_train = {
            f"with BN (lr {n.grid_lrs[i_bn]:g})": (n.train_grid_bn or [[]] * 99)[i_bn],
            f"without BN (lr {n.grid_lrs[i_plain]:g})": (n.train_grid_plain or [[]] * 99)[i_plain],
        }
        fast_train = {k: v for k, v in fast_train.items() if len(v)}
        at_default = (
            f"; at lr {n.lr:g}: {np.mean(n.early_bn):.4f} vs {np.mean(n.early_plain):.4f}"
            if n.lr is not None
            else ""
        )
        grid_text = ", ".join(f"{r:g}" for r in n.grid_lrs)
        fast_rule = (
            f"each model at its best learning rate of the grid ({grid_text}: the highest mean "
            f"test accuracy at step {n.first_step} among rates where no seed diverged), with BN "
            f"minus without, paired by seed, exceeds {spread_factor:g} standard errors of the "
            f"differences (at least {min_tolerance:g})"
        )
    else:
        fast_bn, fast_plain = arr(n.early_bn), arr(n.early_plain)
        where, at_default, fast_train = "one learning rate", "", {}
        fast_rule = (
            f"test accuracy at step {n.first_step} with BN minus without, paired by seed, "
            f"exceeds {spread_factor:g} standard errors of the differences (at least "
            f"{min_tolerance:g})"
        )
    lead = fast_bn - fast_plain
    faster = Claim(
        "faster",
        "With BN the network reaches a higher test accuracy faster (Fig. 1a).",
        fast_rule,
        bool(lead.mean() > tol(lead)),
        f"step {n.first_step} ({where}): {fast_bn.mean():.4f} vs {fast_plain.mean():.4f} "
        f"(lead {lead.mean():+.4f}, tolerance {tol(lead):.4f}){at_default}",
    )

    paired_final = arr(n.final_bn) - arr(n.final_plain)
    higher = Claim(
        "higher",
        f"With BN the final test accuracy is higher (Fig. 1a, at {n.last_step:,} steps).",
        "final test accuracy with BN minus without"
        + (f" at lr {n.lr:g}" if n.lr is not None else "")
        + f", paired by seed (same initial weights and data order), exceeds {spread_factor:g} "
        f"standard errors of the differences (at least {min_tolerance:g})",
        bool(len(paired_final) > 0 and paired_final.mean() > tol(paired_final)),
        f"{_mean(n.final_bn):.4f} vs {_mean(n.final_plain):.4f}; BN minus no BN per seed: "
        + ", ".join(f"{d:+.4f}" for d in paired_final)
        + f" (tolerance {tol(paired_final):.4f})",
    )

    center = arr(n.median_drift_plain) - arr(n.median_drift_bn)  # > 0: BN drifts less
    ratio = arr(n.spread_ratio_plain) - arr(n.spread_ratio_bn)
    stable = Claim(
        "stable",
        "With BN the input distribution of a sigmoid stays stable; without BN its mean and "
        "spread drift (Fig. 1b, c).",
        f"for the tracked unit {n.tracked_unit}, the median drift and the spread ratio are each "
        f"smaller with BN, the paired differences beyond {spread_factor:g} standard errors (at "
        f"least {min_tolerance:g})",
        bool(center.mean() > tol(center) and ratio.mean() > tol(ratio)),
        f"median drift {np.mean(n.median_drift_bn):.3f} vs {np.mean(n.median_drift_plain):.3f} "
        f"(tolerance {tol(center):.3f}); spread ratio {np.mean(n.spread_ratio_bn):.3f} vs "
        f"{np.mean(n.spread_ratio_plain):.3f} (tolerance {tol(ratio):.3f})",
    )

    default_train: dict[str, list[float]] = {}
    if grid and n.lr is not None and n.train_grid_bn and n.train_grid_plain:
        i = n.grid_lrs.index(n.lr) if n.lr in n.grid_lrs else None
        if i is not None:
            default_train = {
                f"with BN (lr {n.lr:g})": n.train_grid_bn[i],
                f"without BN (lr {n.lr:g})": n.train_grid_plain[i],
            }
    at_default_reason = untrained(default_train, trained_floor) if default_train else None
    return [
        gate(faster, untrained(fast_train, trained_floor) if fast_train else None),
        gate(higher, at_default_reason),
        gate(stable, at_default_reason),
    ]


def measure(config: Config, ctx: Context) -> Measurement:
    """Train both models on all seeds, evaluate, and draw Figure 1."""
    data = ctx.load_data(config.dataset, config.train_subset, config.test_subset)
    lrs = config.grid()
    specs = specs_for(
        config,
        [
            {"variant": grid_variant(bn, lr, config.lr), "batch_norm": bn, "lr": lr}
            for bn in (True, False)
            for lr in lrs
        ],
    )
    result = ctx.job(
        "fig1",
        lambda: build_model(config, specs, data),
        replace(
            settings(
                config,
                percentiles=True,
                train_eval_examples=min(config.train_eval_examples, len(data.train_y)),
            ),
            train_eval_final_only=True,
        ),
        data,
        desc=f"fig1 {config.dataset} ({len(specs)} nets)",
    )
    bn = variant_indices(result, variant=WITH)
    plain = variant_indices(result, variant=WITHOUT)
    grid_bn = [variant_indices(result, variant=grid_variant(True, lr, config.lr)) for lr in lrs]
    grid_plain = [variant_indices(result, variant=grid_variant(False, lr, config.lr)) for lr in lrs]
    assert result.train_acc is not None
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
        grid_lrs=lrs,
        early_grid_bn=[acc[first, g].tolist() for g in grid_bn],
        early_grid_plain=[acc[first, g].tolist() for g in grid_plain],
        final_grid_bn=[acc[-1, g].tolist() for g in grid_bn],
        final_grid_plain=[acc[-1, g].tolist() for g in grid_plain],
        diverged_grid_bn=[int(np.sum(result.diverged_at[g] >= 0)) for g in grid_bn],
        diverged_grid_plain=[int(np.sum(result.diverged_at[g] >= 0)) for g in grid_plain],
        train_grid_bn=[result.train_acc[-1, g].tolist() for g in grid_bn],
        train_grid_plain=[result.train_acc[-1, g].tolist() for g in grid_plain],
        lr=float(config.lr),
    )
    assert numbers.diverged_grid_bn is not None and numbers.diverged_grid_plain is not None
    fast_bn = best_lr_index(numbers.early_grid_bn or [], numbers.diverged_grid_bn)
    fast_plain = best_lr_index(numbers.early_grid_plain or [], numbers.diverged_grid_plain)
    best_bn = best_lr_index(numbers.final_grid_bn or [], numbers.diverged_grid_bn)
    best_plain = best_lr_index(numbers.final_grid_plain or [], numbers.diverged_grid_plain)

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
        Comparison(
            f"test accuracy at step {first_step}, each model at its best learning rate for it "
            f"(BN: {lrs[fast_bn]:g}, no BN: {lrs[fast_plain]:g}), with / without BN",
            "BN faster (lr not stated)",
            f"{fmt_mean_std(acc[first, grid_bn[fast_bn]])} / "
            f"{fmt_mean_std(acc[first, grid_plain[fast_plain]])}",
        ),
        Comparison(
            f"final test accuracy, each model at its best learning rate for it (BN: "
            f"{lrs[best_bn]:g}, no BN: {lrs[best_plain]:g}), with / without BN",
            "~0.98 / ~0.97 (lr not stated)",
            f"{fmt_mean_std(acc[-1, grid_bn[best_bn]])} / "
            f"{fmt_mean_std(acc[-1, grid_plain[best_plain]])}",
        ),
        Comparison(
            f"final training accuracy (first {min(config.train_eval_examples, len(data.train_y)):,}"
            f" training images) at lr {config.lr:g}, with / without BN",
            "-",
            f"{fmt_mean_std(result.train_acc[-1, bn])} / "
            f"{fmt_mean_std(result.train_acc[-1, plain])}",
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
    grid_rows = []
    for i, lr in enumerate(lrs):
        for name, gs, div in (
            (WITH, grid_bn[i], numbers.diverged_grid_bn[i]),
            (WITHOUT, grid_plain[i], numbers.diverged_grid_plain[i]),
        ):
            grid_rows.append(
                [
                    f"{lr:g}",
                    name,
                    fmt_mean_std(acc[first, gs]),
                    fmt_mean_std(acc[list(steps).index(marks[min(1, len(marks) - 1)]), gs]),
                    fmt_mean_std(acc[-1, gs]),
                    fmt_mean_std(result.train_acc[-1, gs]),
                    fmt_steps(mean_steps([steps_to_target(result, g, TARGET) for g in gs])),
                    str(div),
                ]
            )
    tables.append(
        (
            "Learning-rate grid (each model's best rate decides 'faster')",
            md_table(
                [
                    "lr",
                    "model",
                    f"test acc, step {first_step}",
                    f"step {marks[min(1, len(marks) - 1)]:,}",
                    f"final ({last_step:,})",
                    "final train acc",
                    f"steps to {TARGET}",
                    "diverged",
                ],
                grid_rows,
            ),
        )
    )

    ctx.write_csv("curves.csv", curve_rows(result), CURVE_FIELDS)
    pct_rows = []
    for g in bn + plain:  # the Figure 1 learning rate
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
        _plot_grid(ctx, result, lrs, grid_bn, grid_plain)

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
        "lr_grid": lrs,
        "early_test_acc_by_lr": {
            WITH: {f"{lr:g}": acc[first, g] for lr, g in zip(lrs, grid_bn)},
            WITHOUT: {f"{lr:g}": acc[first, g] for lr, g in zip(lrs, grid_plain)},
        },
        "final_test_acc_by_lr": {
            WITH: {f"{lr:g}": acc[-1, g] for lr, g in zip(lrs, grid_bn)},
            WITHOUT: {f"{lr:g}": acc[-1, g] for lr, g in zip(lrs, grid_plain)},
        },
        "final_train_acc_by_lr": {
            WITH: {f"{lr:g}": result.train_acc[-1, g] for lr, g in zip(lrs, grid_bn)},
            WITHOUT: {f"{lr:g}": result.train_acc[-1, g] for lr, g in zip(lrs, grid_plain)},
        },
        "best_lr_early": {WITH: lrs[fast_bn], WITHOUT: lrs[fast_plain]},
        "best_lr_final": {WITH: lrs[best_bn], WITHOUT: lrs[best_plain]},
        "final_train_acc": {WITH: result.train_acc[-1, bn], WITHOUT: result.train_acc[-1, plain]},
        # The network without batch norm at the Figure 1 rate is the baseline: it trained.
        "baseline": f"without BN (784-100-100-100-10 sigmoid, lr {config.lr:g})",
        **baseline_metrics(result.train_acc[-1, plain], final_plain),
    }
    choices = [
        f"optimizer: plain SGD, learning rate {config.lr}, momentum {config.momentum}, no weight "
        "decay, no schedule (the paper does not state its rate, Sec. 4.1)",
        "learning-rate grid " + ", ".join(f"{r:g}" for r in lrs) + ": both models train at "
        "every rate (same seeds, weights, data order); 'faster' compares each model at its best "
        f"rate by mean test accuracy at step {first_step} (no seed diverged), the choice most "
        f"favourable to the network without BN; 'higher' and Fig. 1(b, c) use lr {config.lr:g}",
        f"training accuracy on the first {min(config.train_eval_examples, len(data.train_y)):,} "
        "training images, inference mode (population statistics), at the end",
        "rules paired by seed: a difference counts when its mean clears 2 standard errors of the "
        "per-seed differences (at least 0.0005); a claim whose networks end below "
        f"{TRAINED_FLOOR} training accuracy is 'not tested'",
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
            (
                "fig1_lr.png",
                "Test accuracy (mean over seeds) at every learning rate of the grid, with BN "
                "(solid) and without (dashed)",
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


def _plot_grid(
    ctx: Context,
    result: Any,
    lrs: list[float],
    grid_bn: list[list[int]],
    grid_plain: list[list[int]],
) -> None:
    from batchnorm.lab.plots import new_figure

    figure, axes = new_figure(1, 1, size=(5.5, 3.8))
    ax = axes[0, 0]
    colors = [f"C{i}" for i in range(len(lrs))]
    for lr, gb, gp, color in zip(lrs, grid_bn, grid_plain, colors):
        ax.plot(result.steps, result.test_acc[:, gb].mean(1), "-", color=color, label=f"BN, {lr:g}")
        ax.plot(
            result.steps, result.test_acc[:, gp].mean(1), "--", color=color, label=f"no BN, {lr:g}"
        )
    ax.set_xscale("symlog", linthresh=max(1, int(result.steps[1]) if len(result.steps) > 1 else 1))
    ax.set(xlabel="training step", ylabel="test accuracy", ylim=(0, 1), title="learning rates")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ctx.save_figure(figure, "fig1_lr.png")


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
