"""Higher learning rates: batch norm lets a network train at learning rates where it otherwise
fails, and so train faster.

Claim (Ioffe & Szegedy 2015, Sec. 3.3 and 4.2.1): "Batch Normalization enables higher learning
rates": with BN the scale of the weights does not change a layer's Jacobian
(BN(Wu) = BN((aW)u)), so large updates do not make activations explode or saturate. In the paper,
Inception with BN trained at 5x and 30x its learning rate (BN-x5, BN-x30), and BN-x5 reached
72.2% in 14x fewer steps. That is ImageNet; here the stand-in is the Figure 1 network (784-100-
100-100-10, sigmoid, MNIST, batch 60) trained with and without BN over a sweep of learning rates.
What is compared is the shape of the result: where each model still trains, where it diverges,
and how fast the best learning rate of each reaches a target accuracy.

Protocol: for each learning rate and seed, a network with BN and one without, from the same
initial weights and data order, plain SGD for ``steps`` steps. A network "trains" at a learning
rate if every seed reaches ``target`` test accuracy and none diverges (non-finite loss).

Rules (in code): (1) the largest learning rate at which the network trains is larger with BN;
(2) the fewest steps to the target, over learning rates, is smaller with BN.
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
from batchnorm.lab.experiments.common import (
    CURVE_FIELDS,
    CellNumbers,
    SweepConfig,
    build_model,
    cell,
    common_choices,
    curve_rows,
    fmt_steps,
    settings,
    specs_for,
)
from batchnorm.lab.rules import (
    DEFAULT_SPREAD_FACTOR,
    baseline_metrics,
    gate,
    not_tested,
    paired_tolerance,
)

__all__ = ["Config", "Numbers", "EXPERIMENT", "measure", "judge"]

WITH, WITHOUT = "with BN", "without BN"
TRAIN_EVAL_EXAMPLES = 5000  # training examples the final train accuracy is measured on


@dataclass(frozen=True)
class Config(SweepConfig):
    """Learning-rate sweep on the Figure 1 network. Defaults are the full protocol."""

    eval_every: int = param(100, "evaluate every this many steps")
    lrs: tuple[float, ...] = param(
        (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0),
        "learning rates to sweep (the lr field is unused); the top must lie beyond where batch "
        "norm trains, or its largest trainable rate is censored (the report says so)",
    )
    target: float = param(0.9, "test accuracy a network must reach to count as training")

    def validate(self) -> None:
        super().validate()
        if not self.lrs or any(not (math.isfinite(lr) and lr > 0) for lr in self.lrs):
            raise ValueError(f"lrs must list positive learning rates, got {self.lrs}")
        if not 0 < self.target < 1:
            raise ValueError(f"target must lie in (0, 1), got {self.target}")

    def quick(self) -> Config:
        """A smoke test: three learning rates, 600 steps, 2 seeds."""
        return replace(super().quick(), lrs=(0.1, 1.0, 10.0))


@dataclass
class Numbers:
    """What the claims are decided on: each model's cells, one per learning rate."""

    target: float  # the test accuracy a network must reach to count as training
    lrs: list[float]  # sorted ascending
    with_bn: list[CellNumbers]  # one per lr, in the order of lrs
    without_bn: list[CellNumbers]

    def cells(self, name: str) -> list[CellNumbers]:
        return self.with_bn if name == WITH else self.without_bn

    def largest_trainable(self, name: str) -> float | None:
        """The largest lr at which every seed of model ``name`` trains (None: none)."""
        ok = [lr for lr, c in zip(self.lrs, self.cells(name)) if c.trains]
        return max(ok) if ok else None

    def fastest(self, name: str) -> float:
        """The lr with the fewest mean steps to the target (the smallest such lr on a tie)."""
        steps = dict(zip(self.lrs, (c.mean_steps for c in self.cells(name))))
        return min(self.lrs, key=lambda lr: steps[lr])


def _fmt_lr(lr: float | None) -> str:
    return "none" if lr is None else f"{lr:g}"


def judge(
    numbers: Numbers, *, spread_factor: float = DEFAULT_SPREAD_FACTOR, min_steps: float = 0.0
) -> list[Claim]:
    """Decide the claims from ``numbers`` alone.

    - "higher": the largest learning rate at which every seed trains is larger with BN. Not
      tested when neither network trains at any rate of the grid.
    - "faster": at each network's fastest learning rate, the plain network's steps to the target
      minus BN's, paired by seed, have a mean above ``spread_factor`` standard errors of those
      differences (and above ``min_steps``; a tie does not hold). Not tested when the plain
      network reaches the target at no rate: there is then no speed to compare against.

    Args:
        numbers: what :func:`measure` measured.
        spread_factor, min_steps: the margin of :func:`batchnorm.lab.rules.paired_tolerance`,
            in steps.
    """
    n = numbers
    best = {name: n.largest_trainable(name) for name in (WITH, WITHOUT)}
    fastest = {name: n.fastest(name) for name in (WITH, WITHOUT)}
    per_seed = {
        name: np.asarray(n.cells(name)[n.lrs.index(fastest[name])].to_target, dtype=np.float64)
        for name in (WITH, WITHOUT)
    }
    steps = {name: n.cells(name)[n.lrs.index(fastest[name])].mean_steps for name in (WITH, WITHOUT)}
    higher = best[WITH] is not None and (best[WITHOUT] is None or best[WITH] > best[WITHOUT])
    higher_claim = Claim(
        "higher",
        "Batch norm lets the network train at higher learning rates.",
        f"the largest learning rate at which every seed reaches {n.target} test "
        "accuracy without diverging is larger with BN",
        bool(higher),
        f"largest trainable lr: {_fmt_lr(best[WITH])} with BN vs "
        f"{_fmt_lr(best[WITHOUT])} without"
        + (
            f" (BN trains at the top of the grid, {max(n.lrs):g}: its limit is higher)"
            if best[WITH] is not None and best[WITH] == max(n.lrs)
            else ""
        ),
    )
    rule = (
        f"at each model's fastest lr, steps to {n.target} test accuracy without BN minus with "
        f"BN, paired by seed, exceed {spread_factor:g} standard errors of the differences"
        + (f" (at least {min_steps:g} steps)" if min_steps else "")
    )
    statement = (
        "With its higher learning rates, the BN network reaches a given accuracy in fewer steps."
    )
    if not math.isfinite(steps[WITHOUT]):
        faster_claim = not_tested(
            "faster",
            statement,
            rule,
            f"the network without BN reached {n.target} at no learning rate of the grid "
            f"(with BN: {fmt_steps(steps[WITH])} steps at lr {fastest[WITH]:g})",
        )
    else:
        if math.isfinite(steps[WITH]) and len(per_seed[WITH]) == len(per_seed[WITHOUT]):
            gain = per_seed[WITHOUT] - per_seed[WITH]
            tol = paired_tolerance(gain, spread_factor=spread_factor, min_tolerance=min_steps)
            faster = bool(gain.mean() > tol)
            margin = f" (paired gain {gain.mean():,.0f} steps, tolerance {tol:,.0f})"
        else:
            tol = paired_tolerance(
                [steps[WITHOUT] - steps[WITH]], spread_factor=spread_factor, min_tolerance=min_steps
            )
            faster = bool(steps[WITHOUT] - steps[WITH] > tol)
            margin = ""
        faster_claim = Claim(
            "faster",
            statement,
            rule,
            faster,
            f"{fmt_steps(steps[WITH])} steps at lr {fastest[WITH]:g} with BN vs "
            f"{fmt_steps(steps[WITHOUT])} at lr {fastest[WITHOUT]:g} without" + margin,
        )
    trained = (
        None
        if best[WITH] is not None or best[WITHOUT] is not None
        else (f"neither network reached {n.target} test accuracy at any learning rate of the grid")
    )
    return [gate(higher_claim, trained), faster_claim]


def measure(config: Config, ctx: Context) -> Measurement:
    """Train both models at every learning rate, measure, plot."""
    data = ctx.load_data(config.dataset, config.train_subset, config.test_subset)
    lrs = tuple(sorted(set(config.lrs)))
    variants = []
    for lr in lrs:
        variants.append({"variant": WITH, "batch_norm": True, "lr": lr})
        variants.append({"variant": WITHOUT, "batch_norm": False, "lr": lr})
    specs = specs_for(config, variants)
    result = ctx.job(
        "lr_sweep",
        lambda: build_model(config, specs, data),
        settings(config, train_eval_examples=min(TRAIN_EVAL_EXAMPLES, len(data.train_y))),
        data,
        desc=f"lr sweep ({len(specs)} nets)",
    )
    cells = {
        name: {lr: cell(result, config.target, variant=name, lr=lr) for lr in lrs}
        for name in (WITH, WITHOUT)
    }
    numbers = Numbers(
        target=config.target,
        lrs=list(lrs),
        with_bn=[CellNumbers.of(cells[WITH][lr]) for lr in lrs],
        without_bn=[CellNumbers.of(cells[WITHOUT][lr]) for lr in lrs],
    )
    best_lr = {WITH: numbers.largest_trainable(WITH), WITHOUT: numbers.largest_trainable(WITHOUT)}
    fastest = {WITH: numbers.fastest(WITH), WITHOUT: numbers.fastest(WITHOUT)}
    fastest_steps = {name: cells[name][fastest[name]].mean_steps for name in (WITH, WITHOUT)}

    def fmt_lr(lr: float | None) -> str:
        return "none" if lr is None else f"{lr:g}"

    ratio = (
        fastest_steps[WITHOUT] / fastest_steps[WITH]
        if math.isfinite(fastest_steps[WITH]) and fastest_steps[WITH] > 0
        else math.nan
    )
    comparisons = [
        Comparison(
            "learning rates at which the BN network trains (vs without BN)",
            "Inception: BN-x5 and BN-x30 train at 5x and 30x the base rate",
            f"largest trainable lr {fmt_lr(best_lr[WITH])} with BN vs "
            f"{fmt_lr(best_lr[WITHOUT])} without",
        ),
        Comparison(
            f"steps to {config.target} test accuracy, best lr of each model: without / with BN",
            "Inception: 31.0M / 2.1M steps to 72.2% (BN-x5, 14x fewer)",
            f"{fmt_steps(fastest_steps[WITHOUT])} / {fmt_steps(fastest_steps[WITH])}"
            + (f" ({ratio:.1f}x fewer)" if math.isfinite(ratio) else ""),
            None if not math.isfinite(ratio) else float(ratio),
        ),
    ]
    rows = []
    for lr in lrs:
        row = [f"{lr:g}"]
        for name in (WITH, WITHOUT):
            c = cells[name][lr]
            row += [fmt_mean_std(c.final), fmt_steps(c.mean_steps), str(c.diverged)]
        rows.append(row)
    table = md_table(
        [
            "lr",
            "final acc, BN",
            "steps to target, BN",
            "diverged, BN",
            "final acc, no BN",
            "steps to target, no BN",
            "diverged, no BN",
        ],
        rows,
    )
    ctx.write_csv(
        "curves.csv",
        curve_rows(result, {g: {"lr": s.lr} for g, s in enumerate(result.specs)}),
        [*CURVE_FIELDS, "lr"],
    )
    with ctx.timer("plots"):
        _plot(ctx, lrs, cells, config.target)
    baseline = cells[WITHOUT][fastest[WITHOUT]].indices
    assert result.train_acc is not None
    metrics = {
        "baseline": f"the network without BN at its fastest learning rate ({fastest[WITHOUT]:g})",
        **baseline_metrics(result.train_acc[-1, baseline], result.test_acc[-1, baseline]),
        "lrs": lrs,
        "final_test_acc": {n: {f"{lr:g}": cells[n][lr].final for lr in lrs} for n in cells},
        "steps_to_target": {n: {f"{lr:g}": cells[n][lr].to_target for lr in lrs} for n in cells},
        "diverged": {n: {f"{lr:g}": cells[n][lr].diverged for lr in lrs} for n in cells},
        "largest_trainable_lr": best_lr,
        "fastest": {n: {"lr": fastest[n], "steps": fastest_steps[n]} for n in cells},
        "target": config.target,
    }
    return Measurement(
        numbers=numbers,
        comparisons=comparisons,
        metrics=metrics,
        tables=[(f"Final test accuracy and steps to {config.target}, by learning rate", table)],
        figures=[
            (
                "lr_sweep.png",
                "Final test accuracy and steps to the target by learning "
                "rate (mean, min-max band over seeds)",
            )
        ],
        choices=[
            *common_choices(config, swept="lr"),
            f"architecture: {config.hidden} {config.activation} (the Figure 1 network)",
            f"a network trains at an lr if all seeds reach {config.target} without "
            "diverging; diverged networks are zeroed and count as failures",
        ],
        notes=[
            "ImageNet/Inception cannot run here: the comparison is of the shape of the "
            "result (who trains where, who is faster), not of the paper's numbers."
        ],
    )


def _plot(ctx: Context, lrs: tuple[float, ...], cells: dict, target: float) -> None:
    from batchnorm.lab.plots import COLORS, band, new_figure

    figure, axes = new_figure(2, 1)
    for name in (WITH, WITHOUT):
        finals = np.array([cells[name][lr].final for lr in lrs])  # (L, S)
        band(axes[0, 0], lrs, finals, label=name, color=COLORS[name], linestyle="-")
        axes[0, 0].scatter(lrs, finals.mean(1), color=COLORS[name], s=12)
        steps = [cells[name][lr].mean_steps for lr in lrs]
        axes[0, 1].plot(
            [lr for lr, s in zip(lrs, steps) if math.isfinite(s)],
            [s for s in steps if math.isfinite(s)],
            marker="o",
            color=COLORS[name],
            label=name,
        )
    axes[0, 0].set(
        xscale="log",
        xlabel="learning rate",
        ylabel="final test accuracy",
        title="final test accuracy",
        ylim=(0, 1),
    )
    axes[0, 1].set(
        xscale="log",
        xlabel="learning rate",
        ylabel="steps",
        title=f"steps to {target} (missing: never)",
    )
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend()
    ctx.save_figure(figure, "lr_sweep.png")


EXPERIMENT = Experiment(
    name="lr",
    title="Higher learning rates with batch norm (Ioffe & Szegedy 2015, Sec. 3.3, 4.2.1)",
    claim=(
        "Batch norm lets a network train at much higher learning rates, and so reach a given "
        "accuracy in fewer steps."
    ),
    paper=(
        "Ioffe & Szegedy (2015), Sec. 3.3 and 4.2.1-4.2.2 (BN-x5, BN-x30, Figure 2-3; "
        "ImageNet). Stand-in: the Figure 1 MNIST network over a learning-rate sweep."
    ),
    config_cls=Config,
    numbers_cls=Numbers,
    measure=measure,
    judge=judge,
    summary="learning-rate sweep with/without BN: where each trains, diverges, how fast",
)
