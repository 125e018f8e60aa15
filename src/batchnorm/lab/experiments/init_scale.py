"""Initialization scale: with batch norm a network is far less sensitive to how its weights are
initialized.

Claim (Ioffe & Szegedy 2015, Sec. 3.3 and the abstract): batch norm "allows us to use much
higher learning rates and be less careful about initialization": BN(Wu) = BN((aW)u) for any
scale a, so the forward pass of a BN network does not depend on the scale of its weights (only
the effective step size of W does, as 1/a^2). The paper gives no figure for this; the stand-in
is the Figure 1 network (784-100-100-100-10, sigmoid, MNIST, batch 60) started from weights
N(0, s^2 / fan_in) for a sweep of scales s, with and without BN.

Protocol: for each scale and seed, a network with BN and one without, from the same underlying
random draws (scaled), plain SGD at the Figure 1 learning rate for ``steps`` steps.

Rules (in code): (1) the worst final test accuracy over the scales (mean over seeds) is higher
with BN; (2) the range of final test accuracy over the scales (max - min of the means) is
smaller with BN.
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
    paired_tolerance,
    untrained,
)

__all__ = ["Config", "Numbers", "EXPERIMENT", "measure", "judge"]

WITH, WITHOUT = "with BN", "without BN"
TRAIN_EVAL_EXAMPLES = 5000  # training examples the final train accuracy is measured on


@dataclass(frozen=True)
class Config(SweepConfig):
    """Initialization-scale sweep on the Figure 1 network. Defaults are the full protocol."""

    init_scales: tuple[float, ...] = param(
        (0.1, 0.3, 1.0, 3.0, 10.0),
        "initial weight scales s: W ~ N(0, s^2 / fan_in) (the init_scale field is unused)",
    )
    target: float = param(0.9, "test accuracy for the steps-to-target column")

    def validate(self) -> None:
        super().validate()
        if not self.init_scales or any(not (math.isfinite(s) and s > 0) for s in self.init_scales):
            raise ValueError(f"init_scales must list positive scales, got {self.init_scales}")
        if not 0 < self.target < 1:
            raise ValueError(f"target must lie in (0, 1), got {self.target}")

    def quick(self) -> Config:
        """A smoke test: three scales, 600 steps, 2 seeds."""
        return replace(super().quick(), init_scales=(0.1, 1.0, 10.0), eval_every=150)


@dataclass
class Numbers:
    """What the claims are decided on: the final test accuracy of each seed at each scale."""

    scales: list[float]  # sorted ascending
    final_bn: list[list[float]]  # [scale][seed], with BN
    final_plain: list[list[float]]  # [scale][seed], without BN

    def per_seed(self, name: str) -> np.ndarray:
        """(scales, seeds) final test accuracies of model ``name``; a non-finite one (a diverged
        network) counts as 0."""
        finals = np.asarray(self.final_bn if name == WITH else self.final_plain, dtype=np.float64)
        return np.where(np.isfinite(finals), finals, 0.0)

    def means(self, name: str) -> dict[float, float]:
        """The mean final test accuracy over seeds at each scale, of model ``name``."""
        return {s: float(m) for s, m in zip(self.scales, self.per_seed(name).mean(axis=1))}

    def worst(self, name: str) -> tuple[float, float]:
        """The worst mean final accuracy over the scales, and its scale (the smallest on a tie)."""
        means = self.means(name)
        return min(means.values()), min(self.scales, key=lambda s: means[s])

    def spread(self, name: str) -> float:
        """The range (max - min) over the scales of the mean final accuracy."""
        means = self.means(name)
        return max(means.values()) - min(means.values())

    def standard_scale(self) -> float:
        """The scale nearest (in ratio) to 1, the standard initialization."""
        return min(self.scales, key=lambda s: abs(math.log(s)))


def judge(
    numbers: Numbers,
    *,
    spread_factor: float = DEFAULT_SPREAD_FACTOR,
    min_difference: float = 0.0005,
    trained_floor: float = 0.5,
) -> list[Claim]:
    """Decide the claims from ``numbers`` alone; both rules compare seeds paired (the same seed
    gives both models the same data order).

    - "worst case": BN's accuracy at its worst scale minus the plain network's at its own worst
      scale has a mean above ``spread_factor`` standard errors of the per-seed differences (at
      least ``min_difference``);
    - "insensitive": each seed's range (max - min over the scales) of final accuracy is smaller
      with BN, the mean paired reduction beyond the same margin.

    Both are "not tested" when either model falls below ``trained_floor`` test accuracy at the
    standard scale (the one nearest 1): the sweep is about the scale, so the networks must train
    at the usual one.
    """
    acc = {name: numbers.per_seed(name) for name in (WITH, WITHOUT)}
    if acc[WITH].shape != acc[WITHOUT].shape:
        raise ValueError(
            f"with and without BN must have the same scales and seeds, got {acc[WITH].shape} "
            f"and {acc[WITHOUT].shape}"
        )
    worst = {name: numbers.worst(name) for name in (WITH, WITHOUT)}
    spread = {name: numbers.spread(name) for name in (WITH, WITHOUT)}
    worst_seed = {name: acc[name][numbers.scales.index(worst[name][1])] for name in (WITH, WITHOUT)}
    worst_gain = worst_seed[WITH] - worst_seed[WITHOUT]
    ranges = {name: acc[name].max(axis=0) - acc[name].min(axis=0) for name in (WITH, WITHOUT)}
    range_cut = ranges[WITHOUT] - ranges[WITH]

    def tol(d: np.ndarray) -> float:
        return paired_tolerance(d, spread_factor=spread_factor, min_tolerance=min_difference)

    margin = (
        f"exceeds {spread_factor:g} standard errors of the per-seed differences (at least "
        f"{min_difference:g})"
    )
    standard = numbers.standard_scale()
    reason = untrained(
        {
            f"{name} at scale {standard:g}": acc[name][numbers.scales.index(standard)]
            for name in (WITH, WITHOUT)
        },
        trained_floor,
    )
    return [
        gate(
            Claim(
                "worst case",
                "With BN, a badly scaled initialization costs less accuracy.",
                "BN's final test accuracy at its worst scale minus the plain network's at its "
                f"worst, paired by seed, {margin}",
                bool(worst_gain.mean() > tol(worst_gain)),
                f"worst: {worst[WITH][0]:.4f} (scale {worst[WITH][1]:g}) with BN vs "
                f"{worst[WITHOUT][0]:.4f} (scale {worst[WITHOUT][1]:g}) without (paired gain "
                f"{worst_gain.mean():+.4f}, tolerance {tol(worst_gain):.4f})",
            ),
            reason,
        ),
        gate(
            Claim(
                "insensitive",
                "With BN, the final accuracy depends less on the initial scale.",
                "each seed's range (max - min over scales) of final test accuracy is smaller with "
                f"BN: the mean paired reduction {margin}",
                bool(range_cut.mean() > tol(range_cut)),
                f"range {spread[WITH]:.4f} with BN vs {spread[WITHOUT]:.4f} without (per-seed "
                f"reduction {range_cut.mean():+.4f}, tolerance {tol(range_cut):.4f})",
            ),
            reason,
        ),
    ]


def measure(config: Config, ctx: Context) -> Measurement:
    """Train both models at every scale, measure, plot."""
    data = ctx.load_data(config.dataset, config.train_subset, config.test_subset)
    scales = tuple(sorted(set(config.init_scales)))
    variants = []
    for s in scales:
        variants.append({"variant": WITH, "batch_norm": True, "init_scale": s})
        variants.append({"variant": WITHOUT, "batch_norm": False, "init_scale": s})
    specs = specs_for(config, variants)
    result = ctx.job(
        "init_scale",
        lambda: build_model(config, specs, data),
        settings(config, train_eval_examples=min(TRAIN_EVAL_EXAMPLES, len(data.train_y))),
        data,
        desc=f"init scale ({len(specs)} nets)",
    )
    cells = {
        name: {s: cell(result, config.target, variant=name, init_scale=s) for s in scales}
        for name in (WITH, WITHOUT)
    }
    numbers = Numbers(
        scales=list(scales),
        final_bn=[cells[WITH][s].final.tolist() for s in scales],
        final_plain=[cells[WITHOUT][s].final.tolist() for s in scales],
    )
    worst = {name: numbers.worst(name)[0] for name in (WITH, WITHOUT)}
    spread = {name: numbers.spread(name) for name in (WITH, WITHOUT)}
    comparisons = [
        Comparison(
            "range of final test accuracy over init scales "
            f"{', '.join(f'{s:g}' for s in scales)}: with / without BN",
            "no number given ('be less careful about initialization')",
            f"{spread[WITH]:.4f} / {spread[WITHOUT]:.4f}",
        ),
        Comparison(
            "worst final test accuracy over the scales: with / without BN",
            "no number given",
            f"{worst[WITH]:.4f} / {worst[WITHOUT]:.4f}",
        ),
    ]
    rows = []
    for s in scales:
        row = [f"{s:g}"]
        for name in (WITH, WITHOUT):
            c = cells[name][s]
            row += [fmt_mean_std(c.final), fmt_steps(c.mean_steps), str(c.diverged)]
        rows.append(row)
    table = md_table(
        [
            "init scale",
            "final acc, BN",
            f"steps to {config.target}, BN",
            "diverged, BN",
            "final acc, no BN",
            f"steps to {config.target}, no BN",
            "diverged, no BN",
        ],
        rows,
    )
    ctx.write_csv(
        "curves.csv",
        curve_rows(result, {g: {"init_scale": s.init_scale} for g, s in enumerate(result.specs)}),
        [*CURVE_FIELDS, "init_scale"],
    )
    with ctx.timer("plots"):
        _plot(ctx, result, scales)
    standard = numbers.standard_scale()
    baseline = cells[WITHOUT][standard].indices
    assert result.train_acc is not None
    metrics = {
        "baseline": f"the network without BN at the standard scale {standard:g}",
        **baseline_metrics(result.train_acc[-1, baseline], result.test_acc[-1, baseline]),
        "init_scales": scales,
        "final_test_acc": {n: {f"{s:g}": cells[n][s].final for s in scales} for n in cells},
        "steps_to_target": {n: {f"{s:g}": cells[n][s].to_target for s in scales} for n in cells},
        "worst_mean_final_acc": worst,
        "range_mean_final_acc": spread,
    }
    return Measurement(
        numbers=numbers,
        comparisons=comparisons,
        metrics=metrics,
        tables=[("Final test accuracy by initial scale", table)],
        figures=[
            (
                "init_scale.png",
                "Final test accuracy by initial weight scale, and test "
                "accuracy curves (mean over seeds) for each scale",
            )
        ],
        choices=[
            *common_choices(config, swept="init_scale"),
            f"architecture: {config.hidden} {config.activation} (the Figure 1 network); "
            "the scale multiplies every layer's initial weights, output layer included",
        ],
        notes=[
            "With BN only the forward pass is scale-invariant: the gradient of W scales as "
            "1/s, so the effective learning rate of W is lr/s^2 and large scales learn W "
            "slowly (Sec. 3.3 of the paper)."
        ],
    )


def _plot(ctx: Context, result, scales: tuple[float, ...]) -> None:
    from batchnorm.lab.experiments.common import variant_indices
    from batchnorm.lab.plots import COLORS, band, new_figure

    figure, axes = new_figure(3, 1, size=(4.6, 3.4))
    for name in (WITH, WITHOUT):
        finals = np.array(
            [
                result.test_acc[-1, variant_indices(result, variant=name, init_scale=s)]
                for s in scales
            ]
        )
        band(axes[0, 0], scales, finals, label=name, color=COLORS[name])
        axes[0, 0].scatter(scales, finals.mean(1), color=COLORS[name], s=12)
    axes[0, 0].set(
        xscale="log",
        xlabel="initial weight scale s",
        ylabel="final test accuracy",
        ylim=(0, 1),
        title="final test accuracy",
    )
    axes[0, 0].legend()
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    for name, ax in ((WITH, axes[0, 1]), (WITHOUT, axes[0, 2])):
        for i, s in enumerate(scales):
            idx = variant_indices(result, variant=name, init_scale=s)
            ax.plot(
                result.steps,
                result.test_acc[:, idx].mean(1),
                color=cmap(i / max(1, len(scales) - 1)),
                label=f"s={s:g}",
            )
        ax.set(xlabel="training step", ylabel="test accuracy", ylim=(0, 1), title=name)
        ax.legend(fontsize=8)
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    ctx.save_figure(figure, "init_scale.png")


EXPERIMENT = Experiment(
    name="init",
    title="Initialization scale with and without batch norm (Ioffe & Szegedy 2015, Sec. 3.3)",
    claim=(
        "With batch norm the network is much less sensitive to the scale of its initial weights."
    ),
    paper=(
        "Ioffe & Szegedy (2015), abstract and Sec. 3.3 ('be less careful about "
        "initialization'; BN(Wu) = BN((aW)u)); no figure. Stand-in: the Figure 1 MNIST network "
        "over a sweep of initial weight scales."
    ),
    config_cls=Config,
    numbers_cls=Numbers,
    measure=measure,
    judge=judge,
    summary="initial weight scale sweep with/without BN",
)
