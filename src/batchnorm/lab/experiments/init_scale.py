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

__all__ = ["Config", "Numbers", "EXPERIMENT", "measure", "judge"]

WITH, WITHOUT = "with BN", "without BN"


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

    def means(self, name: str) -> dict[float, float]:
        """The mean final test accuracy over seeds at each scale, of model ``name``."""
        finals = self.final_bn if name == WITH else self.final_plain
        return {
            s: float(np.mean(np.asarray(f, dtype=np.float64))) for s, f in zip(self.scales, finals)
        }

    def worst(self, name: str) -> tuple[float, float]:
        """The worst mean final accuracy over the scales, and its scale (the smallest on a tie)."""
        means = self.means(name)
        return min(means.values()), min(self.scales, key=lambda s: means[s])

    def spread(self, name: str) -> float:
        """The range (max - min) over the scales of the mean final accuracy."""
        means = self.means(name)
        return max(means.values()) - min(means.values())


def judge(numbers: Numbers, *, worst_margin: float = 0.0, range_margin: float = 0.0) -> list[Claim]:
    """Decide the claims from ``numbers`` alone.

    Args:
        numbers: what :func:`measure` measured.
        worst_margin: "worst case" holds when BN's worst mean final accuracy over the scales is
            above the plain network's by more than this (a tie does not hold).
        range_margin: "insensitive" holds when BN's range over the scales is below the plain
            network's by more than this (a tie does not hold).
    """
    worst = {name: numbers.worst(name) for name in (WITH, WITHOUT)}
    spread = {name: numbers.spread(name) for name in (WITH, WITHOUT)}
    return [
        Claim(
            "worst case",
            "With BN, a badly scaled initialization costs less accuracy.",
            "the worst final test accuracy over the scales (mean over seeds) is higher with BN"
            + (f" by more than {worst_margin}" if worst_margin else ""),
            bool(worst[WITH][0] > worst[WITHOUT][0] + worst_margin),
            f"worst: {worst[WITH][0]:.4f} (scale {worst[WITH][1]:g}) with BN vs "
            f"{worst[WITHOUT][0]:.4f} (scale {worst[WITHOUT][1]:g}) without",
        ),
        Claim(
            "insensitive",
            "With BN, the final accuracy depends less on the initial scale.",
            "the range (max - min) over scales of the mean final test accuracy is smaller with BN"
            + (f" by more than {range_margin}" if range_margin else ""),
            bool(spread[WITH] < spread[WITHOUT] - range_margin),
            f"range {spread[WITH]:.4f} with BN vs {spread[WITHOUT]:.4f} without",
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
        settings(config),
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
    metrics = {
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
