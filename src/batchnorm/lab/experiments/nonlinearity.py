"""Saturating nonlinearities: batch norm makes deep sigmoid and tanh networks trainable.

Claim (Ioffe & Szegedy 2015, Sec. 3.3 and 4.2.1): batch norm "makes it possible to use
saturating nonlinearities", by keeping the inputs of the nonlinearities from drifting into the
saturated regime where gradients vanish. In the paper, an Inception network with sigmoid
nonlinearities reached 69.8% with BN and did not train at all without it. That is ImageNet; the
stand-in here is a deeper fully-connected network than Figure 1 (six hidden layers of 100 by
default) on MNIST, with sigmoid, tanh and (as a non-saturating control) ReLU, each with and
without BN.

Protocol: for each nonlinearity and seed, a network with BN and one without, from the same
initial weights and data order, plain SGD at the Figure 1 learning rate for ``steps`` steps.
Saturation: the fraction of (test example, unit) pairs of the last hidden layer where the
nonlinearity's derivative is below 5% of its maximum (sigmoid |z| > 4.4, tanh |z| > 2.2; for
ReLU z <= 0, reported but not judged).

Rules (in code), for every saturating nonlinearity (sigmoid, tanh): (1) with BN every seed
reaches the target test accuracy; (2) with BN the target is reached in fewer steps than without
(never counts as infinitely many); (3) with BN fewer last-layer units are saturated at the end.
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
    variant_indices,
)
from batchnorm.lab.wide import ACTIVATIONS

__all__ = ["Config", "Numbers", "EXPERIMENT", "measure", "judge"]

SATURATING = ("sigmoid", "tanh")


def _name(activation: str, bn: bool) -> str:
    return f"{activation} {'with' if bn else 'without'} BN"


@dataclass(frozen=True)
class Config(SweepConfig):
    """Nonlinearities in a deeper network. Defaults are the full protocol."""

    hidden: tuple[int, ...] = param((100,) * 6, "widths of the hidden layers (deeper than Fig. 1)")
    steps: int = param(5000, "SGD steps per network")
    activations: tuple[str, ...] = param(
        ("sigmoid", "tanh", "relu"),
        "nonlinearities to compare (the activation field is unused)",
        choices=ACTIVATIONS,
    )
    target: float = param(0.9, "test accuracy a network must reach to count as trained")

    def validate(self) -> None:
        super().validate()
        if not any(a in SATURATING for a in self.activations):
            raise ValueError(
                f"activations must include a saturating one ({', '.join(SATURATING)}); "
                f"got {self.activations}"
            )
        if not 0 < self.target < 1:
            raise ValueError(f"target must lie in (0, 1), got {self.target}")

    def quick(self) -> Config:
        """A smoke test: 600 steps, 2 seeds, a 4-layer network."""
        return replace(super().quick(), hidden=(100,) * 4, eval_every=150)


@dataclass
class Numbers:
    """What the claims are decided on, for each saturating nonlinearity (keyed by its name)."""

    target: float  # the test accuracy a network must reach to count as trained
    saturating: list[str]  # the saturating nonlinearities run, in listing order
    final_bn: dict[str, list[float]]  # final test accuracy per seed, with BN
    bn: dict[str, CellNumbers]  # steps to the target and divergences, with BN
    plain: dict[str, CellNumbers]  # ... without BN
    saturation_bn: dict[str, list[float]]  # saturated fraction at the end per seed, with BN
    saturation_plain: dict[str, list[float]]


def judge(
    numbers: Numbers, *, steps_margin: float = 0.0, saturation_margin: float = 0.0
) -> list[Claim]:
    """Decide the claims from ``numbers`` alone.

    Args:
        numbers: what :func:`measure` measured.
        steps_margin: "faster" holds when, for each saturating nonlinearity, BN's mean steps to
            the target are fewer by more than this (a tie does not hold; never = infinitely many).
        saturation_margin: "unsaturated" holds when, for each, BN's mean saturated fraction is
            smaller by more than this (a tie does not hold).
    """
    n = numbers
    sat_bn = {a: float(np.mean(n.saturation_bn[a])) for a in n.saturating}
    sat_plain = {a: float(np.mean(n.saturation_plain[a])) for a in n.saturating}
    trainable = [n.bn[a].trains for a in n.saturating]
    faster = [n.bn[a].mean_steps < n.plain[a].mean_steps - steps_margin for a in n.saturating]
    less_saturated = [sat_bn[a] < sat_plain[a] - saturation_margin for a in n.saturating]
    listed = " and ".join(n.saturating)
    return [
        Claim(
            "trainable",
            f"With BN, deep {listed} networks train.",
            f"with BN every seed of every saturating nonlinearity reaches {n.target} "
            "test accuracy without diverging",
            all(trainable),
            "; ".join(
                f"{a}: final {np.mean(n.final_bn[a]):.4f}, reached on "
                f"{sum(math.isfinite(s) for s in n.bn[a].to_target)}/"
                f"{len(n.bn[a].to_target)} seeds"
                for a in n.saturating
            ),
        ),
        Claim(
            "faster",
            f"BN trains the {listed} networks faster than they train without it.",
            f"for each saturating nonlinearity, fewer steps to {n.target} with BN (mean "
            "over seeds; never = infinitely many)"
            + (f", by more than {steps_margin:g}" if steps_margin else ""),
            all(faster),
            "; ".join(
                f"{a}: {fmt_steps(n.bn[a].mean_steps)} with BN vs "
                f"{fmt_steps(n.plain[a].mean_steps)} without"
                for a in n.saturating
            ),
        ),
        Claim(
            "unsaturated",
            "BN keeps the nonlinearities out of their saturated regime.",
            "for each saturating nonlinearity, a smaller fraction of saturated last-layer units "
            "(derivative < 5% of its maximum) at the end with BN"
            + (f", by more than {saturation_margin}" if saturation_margin else ""),
            all(less_saturated),
            "; ".join(
                f"{a}: {np.mean(n.saturation_bn[a]):.3f} with BN vs "
                f"{np.mean(n.saturation_plain[a]):.3f} without"
                for a in n.saturating
            ),
        ),
    ]


def measure(config: Config, ctx: Context) -> Measurement:
    """Train every (nonlinearity, BN) pair, measure, plot."""
    data = ctx.load_data(config.dataset, config.train_subset, config.test_subset)
    activations = tuple(a for a in ACTIVATIONS if a in config.activations)
    variants = [
        {"variant": _name(a, bn), "batch_norm": bn, "activation": a}
        for a in activations
        for bn in (True, False)
    ]
    specs = specs_for(config, variants)
    result = ctx.job(
        "nonlinearity",
        lambda: build_model(config, specs, data),
        settings(config, saturation=True),
        data,
        desc=f"nonlinearities ({len(specs)} nets)",
    )
    assert result.saturation is not None
    cells = {
        (a, bn): cell(result, config.target, variant=_name(a, bn))
        for a in activations
        for bn in (True, False)
    }
    saturation = {key: result.saturation[-1, c.indices] for key, c in cells.items()}
    saturating = [a for a in activations if a in SATURATING]

    numbers = Numbers(
        target=config.target,
        saturating=saturating,
        final_bn={a: cells[(a, True)].final.tolist() for a in saturating},
        bn={a: CellNumbers.of(cells[(a, True)]) for a in saturating},
        plain={a: CellNumbers.of(cells[(a, False)]) for a in saturating},
        saturation_bn={a: saturation[(a, True)].tolist() for a in saturating},
        saturation_plain={a: saturation[(a, False)].tolist() for a in saturating},
    )
    comparisons = []
    if "sigmoid" in activations:
        comparisons.append(
            Comparison(
                "sigmoid network: final test accuracy with / without BN",
                "Inception with sigmoid: 69.8% with BN, does not train without",
                f"{fmt_mean_std(cells[('sigmoid', True)].final)} / "
                f"{fmt_mean_std(cells[('sigmoid', False)].final)}",
            )
        )
    for a in activations:
        comparisons.append(
            Comparison(
                f"{a}: steps to {config.target}, with / without BN",
                "-",
                f"{fmt_steps(cells[(a, True)].mean_steps)} / "
                f"{fmt_steps(cells[(a, False)].mean_steps)}",
            )
        )
    rows = []
    for a in activations:
        for bn in (True, False):
            c = cells[(a, bn)]
            rows.append(
                [
                    a,
                    "yes" if bn else "no",
                    fmt_mean_std(c.final),
                    fmt_steps(c.mean_steps),
                    fmt_mean_std(saturation[(a, bn)], 3),
                    str(c.diverged),
                ]
            )
    table = md_table(
        [
            "nonlinearity",
            "BN",
            "final test acc",
            f"steps to {config.target}",
            "saturated fraction (end)",
            "diverged",
        ],
        rows,
    )
    ctx.write_csv(
        "curves.csv",
        curve_rows(
            result,
            {
                g: {"activation": s.activation, "saturation": float(result.saturation[-1, g])}
                for g, s in enumerate(result.specs)
            },
        ),
        [*CURVE_FIELDS, "activation", "saturation"],
    )
    with ctx.timer("plots"):
        _plot(ctx, result, activations)
    metrics = {
        "activations": activations,
        "depth": len(config.hidden),
        "final_test_acc": {_name(*k): c.final for k, c in cells.items()},
        "steps_to_target": {_name(*k): c.to_target for k, c in cells.items()},
        "final_saturation": {_name(*k): v for k, v in saturation.items()},
        "saturation_curve": {_name(*k): result.saturation[:, c.indices] for k, c in cells.items()},
        "steps": result.steps,
    }
    return Measurement(
        numbers=numbers,
        comparisons=comparisons,
        metrics=metrics,
        tables=[("By nonlinearity", table)],
        figures=[
            (
                "nonlinearity.png",
                "Test accuracy (mean over seeds) and saturated fraction "
                "of the last hidden layer over training",
            )
        ],
        choices=[
            *common_choices(config),
            f"architecture: {len(config.hidden)} hidden layers {config.hidden}; "
            "saturation measured in inference mode on the test set",
        ],
        notes=[
            "ImageNet/Inception cannot run here: the comparison is of the shape of the "
            "result, not of the paper's numbers."
        ],
    )


def _plot(ctx: Context, result, activations: tuple[str, ...]) -> None:
    from batchnorm.lab.plots import new_figure

    colors = {"sigmoid": "tab:blue", "tanh": "tab:green", "relu": "tab:orange"}
    figure, axes = new_figure(2, 1)
    for a in activations:
        for bn, style in ((True, "-"), (False, "--")):
            idx = variant_indices(result, variant=_name(a, bn))
            axes[0, 0].plot(
                result.steps,
                result.test_acc[:, idx].mean(1),
                linestyle=style,
                color=colors[a],
                label=_name(a, bn),
            )
            axes[0, 1].plot(
                result.steps,
                result.saturation[:, idx].mean(1),
                linestyle=style,
                color=colors[a],
                label=_name(a, bn),
            )
    axes[0, 0].set(
        xlabel="training step", ylabel="test accuracy", ylim=(0, 1), title="test accuracy"
    )
    axes[0, 1].set(
        xlabel="training step", ylabel="fraction", ylim=(0, 1), title="saturated last-layer units"
    )
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ctx.save_figure(figure, "nonlinearity.png")


EXPERIMENT = Experiment(
    name="nonlinearity",
    title="Saturating nonlinearities with batch norm (Ioffe & Szegedy 2015, Sec. 3.3, 4.2.1)",
    claim=(
        "Batch norm makes networks with saturating nonlinearities (sigmoid, tanh) trainable, "
        "keeping their units out of saturation."
    ),
    paper=(
        "Ioffe & Szegedy (2015), Sec. 3.3 and 4.2.1 (BN-x5-Sigmoid: 69.8% on ImageNet; "
        "without BN the sigmoid Inception never does better than 1/1000). Stand-in: a 6-hidden-"
        "layer MNIST MLP with sigmoid, tanh and ReLU."
    ),
    config_cls=Config,
    numbers_cls=Numbers,
    measure=measure,
    judge=judge,
    summary="sigmoid/tanh vs ReLU in a deeper net, with/without BN",
)
