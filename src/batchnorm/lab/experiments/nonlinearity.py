"""Saturating nonlinearities: batch norm makes deep sigmoid and tanh networks trainable.

Claim (Ioffe & Szegedy 2015, Sec. 3.3 and 4.2.1): batch norm "makes it possible to use
saturating nonlinearities", by keeping the inputs of the nonlinearities from drifting into the
saturated regime where gradients vanish. In the paper, an Inception network with sigmoid
nonlinearities (BN-x5-Sigmoid, Sec. 4.2.1) reached 69.8% with BN and did not train at all without
it. That is ImageNet; the stand-in here is a deeper fully-connected network than Figure 1 (six
hidden layers of 100 by default) on MNIST, with sigmoid, tanh and (as a non-saturating control)
ReLU, each with and without BN.

Protocol: for each setting (a nonlinearity and an initial weight scale) and seed, a network with
BN and one without, from the same initial weights and data order, plain SGD at the Figure 1
learning rate for ``steps`` steps. Two initial scales: the LeCun default (``init_scale``), and a
larger one (``large_init_scale``) under which a plain sigmoid or tanh network starts with many
units saturated. At the default scale a plain deep sigmoid network fails for another reason:
its gradients vanish layer by layer (the sigmoid's derivative is at most 1/4) while its units sit
in the unsaturated middle, so the saturation claim cannot be tested there. ReLU runs at the
default scale only (a control; a larger scale makes a plain ReLU network diverge).

Measured at every evaluation: for every hidden layer, the saturated fraction of (test example,
unit) pairs, where the nonlinearity's derivative is below 5% of its maximum (sigmoid |z| > 4.4,
tanh |z| > 2.2; for ReLU z <= 0, reported but not judged); for every weight layer, the norm of
the gradient of the training loss (the first 10 training mini-batches, batch statistics as in
training) - where gradients vanish, and whether saturation is why.

Rules (in code), over the settings of the saturating nonlinearities:
(1) "trainable": with BN every seed of every setting reaches the target test accuracy;
(2) "faster": in every setting BN reaches the target on every seed, and either the network
without BN misses it on some seed or the paired per-seed differences of steps (without minus
with) clear the margin of :func:`batchnorm.lab.rules.paired_tolerance` (at least one evaluation
interval);
(3) "unsaturated": in every setting where some network saturates (a layer's mean saturated
fraction reaches ``saturation_floor`` at some evaluation), BN's saturated fraction (mean over
hidden layers and over the evaluations after step 0) is smaller, the paired differences beyond
their margin; "not tested" when no network of any setting saturates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

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
from batchnorm.lab.rules import baseline_metrics, not_tested, paired_tolerance
from batchnorm.lab.wide import ACTIVATIONS

__all__ = ["Config", "Numbers", "EXPERIMENT", "measure", "judge", "setting_name"]

SATURATING = ("sigmoid", "tanh")
SATURATION_FLOOR = 0.05  # a layer "saturates" when this fraction of its units is saturated


def setting_name(activation: str, init_scale: float, default_scale: float) -> str:
    """A setting's key: the nonlinearity, and the initial scale when it is not the default."""
    if init_scale == default_scale:
        return activation
    return f"{activation}, init {init_scale:g}"


def _name(setting: str, bn: bool) -> str:
    return f"{setting} {'with' if bn else 'without'} BN"


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
    large_init_scale: float | None = param(
        8.0,
        "a second, larger initial scale for the saturating nonlinearities, under which the "
        "networks without BN start saturated (none = the default scale only)",
    )
    saturation_floor: float = param(
        SATURATION_FLOOR,
        "saturated fraction a layer must reach (mean over seeds) for a setting to test the "
        "saturation claim",
    )
    train_eval_examples: int = param(
        10_000, "training examples on which the final training accuracy is measured"
    )

    def validate(self) -> None:
        super().validate()
        if not any(a in SATURATING for a in self.activations):
            raise ValueError(
                f"activations must include a saturating one ({', '.join(SATURATING)}); "
                f"got {self.activations}"
            )
        if not 0 < self.target < 1:
            raise ValueError(f"target must lie in (0, 1), got {self.target}")
        if self.large_init_scale is not None and not (
            math.isfinite(self.large_init_scale) and self.large_init_scale > 0
        ):
            raise ValueError(
                f"large_init_scale must be a positive number, got {self.large_init_scale}"
            )
        if not 0 < self.saturation_floor < 1:
            raise ValueError(f"saturation_floor must lie in (0, 1), got {self.saturation_floor}")
        if self.train_eval_examples < 1:
            raise ValueError(
                f"train_eval_examples must be at least 1, got {self.train_eval_examples}"
            )

    def quick(self) -> Config:
        """A smoke test: 600 steps, 2 seeds, a 4-layer network."""
        return replace(super().quick(), hidden=(100,) * 4, eval_every=150, train_eval_examples=2000)

    def scales(self) -> list[float]:
        """The initial scales of the saturating nonlinearities."""
        scales = [float(self.init_scale)]
        if self.large_init_scale is not None and self.large_init_scale != self.init_scale:
            scales.append(float(self.large_init_scale))
        return scales


@dataclass
class Numbers:
    """What the claims are decided on, for each setting of a saturating nonlinearity (keyed by
    :func:`setting_name`: "sigmoid", "sigmoid, init 8", ...)."""

    target: float  # the test accuracy a network must reach to count as trained
    saturating: list[str]  # the settings of the saturating nonlinearities, in order
    final_bn: dict[str, list[float]]  # final test accuracy per seed, with BN
    bn: dict[str, CellNumbers]  # steps to the target and divergences, with BN
    plain: dict[str, CellNumbers]  # ... without BN
    saturation_bn: dict[str, list[float]]  # saturated fraction per seed, with BN (see judge)
    saturation_plain: dict[str, list[float]]
    # The largest saturated fraction of any hidden layer at any evaluation (mean over seeds),
    # with BN and without; absent in runs made before it was measured.
    peak_saturation_bn: dict[str, float] = field(default_factory=dict)
    peak_saturation_plain: dict[str, float] = field(default_factory=dict)
    eval_every: int = 0  # steps between evaluations (the resolution of steps to the target)


def judge(
    numbers: Numbers,
    *,
    spread_factor: float = 2.0,
    min_tolerance: float = 0.0005,
    saturation_floor: float = SATURATION_FLOOR,
) -> list[Claim]:
    """Decide the claims from ``numbers`` alone (see the module docstring).

    Args:
        numbers: what :func:`measure` measured.
        spread_factor, min_tolerance: the margin of :func:`paired_tolerance` for the saturated
            fractions; for steps to the target the floor is one evaluation interval instead.
        saturation_floor: a setting tests "unsaturated" when the peak saturated fraction of the
            networks with or without BN reaches it (without peaks recorded: every setting).
    """
    n = numbers

    def tol(d: np.ndarray, floor: float = min_tolerance) -> float:
        return paired_tolerance(d, spread_factor=spread_factor, min_tolerance=floor)

    trainable = [n.bn[a].trains for a in n.saturating]

    faster: dict[str, bool] = {}
    faster_text = []
    step_floor = float(max(n.eval_every, 1))
    for a in n.saturating:
        bn_steps = np.asarray(n.bn[a].to_target, dtype=np.float64)
        plain_steps = np.asarray(n.plain[a].to_target, dtype=np.float64)
        if not n.bn[a].trains:
            faster[a] = False
            faster_text.append(f"{a}: BN misses {n.target} on some seed")
        elif not (np.all(np.isfinite(plain_steps)) and n.plain[a].diverged == 0):
            faster[a] = True
            faster_text.append(
                f"{a}: {fmt_steps(n.bn[a].mean_steps)} with BN vs never (on "
                f"{int(np.sum(~np.isfinite(plain_steps)))}/{len(plain_steps)} seeds) without"
            )
        else:
            d = plain_steps - bn_steps
            faster[a] = bool(d.mean() > tol(d, step_floor))
            faster_text.append(
                f"{a}: {fmt_steps(n.bn[a].mean_steps)} with BN vs "
                f"{fmt_steps(n.plain[a].mean_steps)} without (gain {d.mean():+.0f}, tolerance "
                f"{tol(d, step_floor):.0f})"
            )

    tested, skipped, less_saturated, sat_text = [], [], [], []
    for a in n.saturating:
        peak = max(n.peak_saturation_bn.get(a, 1.0), n.peak_saturation_plain.get(a, 1.0))
        if not peak >= saturation_floor:
            skipped.append(f"{a} (peak {peak:.3f})")
            continue
        tested.append(a)
        d = np.asarray(n.saturation_plain[a], dtype=np.float64) - np.asarray(
            n.saturation_bn[a], dtype=np.float64
        )
        less_saturated.append(bool(d.mean() > tol(d)))
        sat_text.append(
            f"{a}: {np.mean(n.saturation_bn[a]):.3f} with BN vs "
            f"{np.mean(n.saturation_plain[a]):.3f} without (difference {d.mean():+.3f}, "
            f"tolerance {tol(d):.4f})"
        )
    if skipped:
        sat_text.append(f"no network saturates in {', '.join(skipped)}")
    sat_statement = "BN keeps the nonlinearities out of their saturated regime."
    sat_rule = (
        "in every setting where a layer's saturated fraction (derivative < 5% of its maximum) "
        f"reaches {saturation_floor:g} in some network, the fraction with BN (mean over hidden "
        "layers and over the evaluations after step 0) is smaller, the paired difference beyond "
        f"{spread_factor:g} standard errors (at least {min_tolerance:g})"
    )
    if tested:
        unsaturated = Claim(
            "unsaturated", sat_statement, sat_rule, all(less_saturated), "; ".join(sat_text)
        )
    else:
        unsaturated = not_tested(
            "unsaturated",
            sat_statement,
            sat_rule,
            "no network saturates in any setting: " + "; ".join(skipped),
        )

    listed = " and ".join(dict.fromkeys(a.split(",")[0] for a in n.saturating))
    return [
        Claim(
            "trainable",
            f"With BN, deep {listed} networks train.",
            f"with BN every seed of every setting of a saturating nonlinearity reaches "
            f"{n.target} test accuracy without diverging",
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
            f"in every setting BN reaches {n.target} on every seed, and without BN some seed "
            "never does, or the paired differences of steps (without minus with) exceed "
            f"{spread_factor:g} standard errors (at least one evaluation interval)",
            all(faster.values()),
            "; ".join(faster_text),
        ),
        unsaturated,
    ]


def measure(config: Config, ctx: Context) -> Measurement:
    """Train every (setting, BN) pair, measure, plot."""
    data = ctx.load_data(config.dataset, config.train_subset, config.test_subset)
    activations = tuple(a for a in ACTIVATIONS if a in config.activations)
    default = float(config.init_scale)
    setups: list[tuple[str, str, float]] = []  # (setting, activation, init scale)
    for a in activations:
        for scale in config.scales() if a in SATURATING else [default]:
            setups.append((setting_name(a, scale, default), a, scale))
    variants = [
        {"variant": _name(key, bn), "batch_norm": bn, "activation": a, "init_scale": scale}
        for key, a, scale in setups
        for bn in (True, False)
    ]
    specs = specs_for(config, variants)
    train_examples = min(config.train_eval_examples, len(data.train_y))
    job_settings = replace(
        settings(config, saturation=True, train_eval_examples=train_examples),
        layer_stats=True,
        train_eval_final_only=True,
    )
    result = ctx.job(
        "nonlinearity",
        lambda: build_model(config, specs, data),
        job_settings,
        data,
        desc=f"nonlinearities ({len(specs)} nets)",
    )
    assert result.saturation is not None and result.train_acc is not None
    layer_sat = result.extra["layer_saturation"]  # (T, G, hidden layers)
    layer_grad = result.extra["layer_grad_norm"]  # (T, G, weight layers)
    keys = [key for key, _, _ in setups]
    cells = {
        (key, bn): cell(result, config.target, variant=_name(key, bn))
        for key in keys
        for bn in (True, False)
    }
    later = result.steps > 0
    # Per network: the saturated fraction averaged over hidden layers and over the evaluations
    # after step 0 (what "unsaturated" compares), and the peak of any layer at any evaluation.
    during = layer_sat[later].mean(axis=(0, 2)) if later.any() else layer_sat[-1].mean(-1)
    saturation = {k: during[c.indices] for k, c in cells.items()}
    peak = {k: float(layer_sat[:, c.indices, :].mean(1).max()) for k, c in cells.items()}
    saturating = [key for key, a, _ in setups if a in SATURATING]

    numbers = Numbers(
        target=config.target,
        saturating=saturating,
        final_bn={k: cells[(k, True)].final.tolist() for k in saturating},
        bn={k: CellNumbers.of(cells[(k, True)]) for k in saturating},
        plain={k: CellNumbers.of(cells[(k, False)]) for k in saturating},
        saturation_bn={k: saturation[(k, True)].tolist() for k in saturating},
        saturation_plain={k: saturation[(k, False)].tolist() for k in saturating},
        peak_saturation_bn={k: peak[(k, True)] for k in saturating},
        peak_saturation_plain={k: peak[(k, False)] for k in saturating},
        eval_every=int(config.eval_every),
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
    for key in keys:
        comparisons.append(
            Comparison(
                f"{key}: steps to {config.target}, with / without BN",
                "-",
                f"{fmt_steps(cells[(key, True)].mean_steps)} / "
                f"{fmt_steps(cells[(key, False)].mean_steps)}",
            )
        )
    final_train = {k: result.train_acc[-1, c.indices] for k, c in cells.items()}
    rows = []
    for key in keys:
        for bn in (True, False):
            c = cells[(key, bn)]
            rows.append(
                [
                    key,
                    "yes" if bn else "no",
                    fmt_mean_std(c.final),
                    fmt_mean_std(final_train[(key, bn)]),
                    fmt_steps(c.mean_steps),
                    fmt_mean_std(saturation[(key, bn)], 3),
                    f"{peak[(key, bn)]:.3f}",
                    str(c.diverged),
                ]
            )
    table = md_table(
        [
            "setting",
            "BN",
            "final test acc",
            "final train acc",
            f"steps to {config.target}",
            "saturated fraction (layers, steps > 0)",
            "peak layer saturation",
            "diverged",
        ],
        rows,
    )
    # Per layer: saturation and gradient norm at step 0 and at the end (mean over seeds).
    layer_rows = []
    for key in keys:
        for bn in (True, False):
            idx = cells[(key, bn)].indices
            for t, when in ((0, "step 0"), (-1, "end")):
                sat = layer_sat[t][idx].mean(0)
                grad = layer_grad[t][idx].mean(0)
                layer_rows.append(
                    [
                        key,
                        "yes" if bn else "no",
                        when,
                        " / ".join(f"{v:.2f}" for v in sat),
                        " / ".join(f"{v:.1e}" for v in grad),
                    ]
                )
    layer_table = md_table(
        [
            "setting",
            "BN",
            "when",
            "saturated fraction per hidden layer (first ... last)",
            "gradient norm per weight layer (first ... output)",
        ],
        layer_rows,
    )
    ctx.write_csv(
        "curves.csv",
        curve_rows(
            result,
            {
                g: {
                    "activation": s.activation,
                    "init_scale": s.init_scale,
                    "saturation": float(result.saturation[-1, g]),
                }
                for g, s in enumerate(result.specs)
            },
        ),
        [*CURVE_FIELDS, "activation", "init_scale", "saturation"],
    )
    layer_csv = []
    for t, step in enumerate(result.steps):
        for g, spec in enumerate(result.specs):
            row: dict[str, object] = {"step": int(step), "variant": spec.variant, "seed": spec.seed}
            row |= {f"saturation_{i + 1}": float(v) for i, v in enumerate(layer_sat[t, g])}
            row |= {f"grad_norm_{i + 1}": float(v) for i, v in enumerate(layer_grad[t, g])}
            layer_csv.append(row)
    ctx.write_csv(
        "layers.csv",
        layer_csv,
        ["step", "variant", "seed"]
        + [f"saturation_{i + 1}" for i in range(layer_sat.shape[2])]
        + [f"grad_norm_{i + 1}" for i in range(layer_grad.shape[2])],
    )
    with ctx.timer("plots"):
        _plot(ctx, result, keys, cells, layer_sat, layer_grad)
    baseline_key = next(k for k in keys if k in SATURATING)
    baseline_cell = cells[(baseline_key, True)]
    metrics = {
        "activations": activations,
        "settings": keys,
        "init_scales": config.scales(),
        "depth": len(config.hidden),
        "final_test_acc": {_name(*k): c.final for k, c in cells.items()},
        "final_train_acc": {_name(*k): v for k, v in final_train.items()},
        "steps_to_target": {_name(*k): c.to_target for k, c in cells.items()},
        "final_saturation": {_name(*k): result.saturation[-1, c.indices] for k, c in cells.items()},
        "saturation_curve": {_name(*k): result.saturation[:, c.indices] for k, c in cells.items()},
        "saturation_during_training": {_name(*k): v for k, v in saturation.items()},
        "peak_layer_saturation": {_name(*k): v for k, v in peak.items()},
        "layer_saturation": {_name(*k): layer_sat[:, c.indices] for k, c in cells.items()},
        "layer_grad_norm": {_name(*k): layer_grad[:, c.indices] for k, c in cells.items()},
        "steps": result.steps,
        # The deep sigmoid (or tanh) network with BN at the default scale is the baseline: the
        # paper's BN-x5-Sigmoid stand-in; these show it trained.
        "baseline": f"{_name(baseline_key, True)} ({len(config.hidden)} hidden layers)",
        **baseline_metrics(final_train[(baseline_key, True)], baseline_cell.final),
    }
    notes = [
        "ImageNet/Inception cannot run here: the comparison is of the shape of the "
        "result, not of the paper's numbers."
    ]
    for key in saturating:
        c = cells[(key, False)]
        if not all(math.isfinite(v) for v in c.to_target):
            grad0 = layer_grad[0][c.indices].mean(0)
            notes.append(
                f"{key} without BN misses {config.target} on some seed: at step 0 its "
                f"first-layer gradient norm is {grad0[0]:.1e} against {grad0[-1]:.1e} at the "
                f"output layer, and its peak layer saturation is {peak[(key, False)]:.3f}"
                + (
                    " (below the floor: vanishing gradients, not saturation)"
                    if peak[(key, False)] < config.saturation_floor
                    else ""
                )
            )
    return Measurement(
        numbers=numbers,
        comparisons=comparisons,
        metrics=metrics,
        tables=[("By setting", table), ("By layer (mean over seeds)", layer_table)],
        figures=[
            (
                "nonlinearity.png",
                "Test accuracy, saturated fraction (mean over hidden layers) and first-layer "
                "gradient norm over training (mean over seeds)",
            )
        ],
        choices=[
            *common_choices(config),
            f"architecture: {len(config.hidden)} hidden layers {config.hidden}",
            f"initial scales: {', '.join(f'{v:g}' for v in config.scales())} for the saturating "
            f"nonlinearities (the larger one so that networks without BN start saturated, as "
            f"Sec. 3.3's argument needs), {default:g} for ReLU",
            "saturation: derivative below 5% of its maximum, per hidden layer, on the evaluation's "
            "test examples in inference mode; 'unsaturated' compares the mean over layers and over "
            "the evaluations after step 0, in settings whose peak reaches "
            f"{config.saturation_floor:g}",
            "gradient norms: per weight layer, of the mean loss over the first 10 training "
            "mini-batches in training mode, at every evaluation",
            f"training accuracy on the first {train_examples:,} training images, inference mode",
            "rules paired by seed: a difference counts when its mean clears 2 standard errors of "
            "the per-seed differences (at least 0.0005 for fractions, one evaluation interval "
            "for steps)",
        ],
        notes=notes,
    )


def _plot(ctx: Context, result, keys, cells, layer_sat, layer_grad) -> None:
    from batchnorm.lab.plots import new_figure

    colors = {}
    palette = ["tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:red", "tab:brown"]
    for i, key in enumerate(keys):
        colors[key] = palette[i % len(palette)]
    figure, axes = new_figure(3, 1)
    for key in keys:
        for bn, style in ((True, "-"), (False, "--")):
            idx = cells[(key, bn)].indices
            label = _name(key, bn)
            axes[0, 0].plot(
                result.steps,
                result.test_acc[:, idx].mean(1),
                linestyle=style,
                color=colors[key],
                label=label,
            )
            axes[0, 1].plot(
                result.steps,
                layer_sat[:, idx, :].mean(axis=(1, 2)),
                linestyle=style,
                color=colors[key],
                label=label,
            )
            axes[0, 2].semilogy(
                result.steps,
                np.maximum(layer_grad[:, idx, 0].mean(1), 1e-30),
                linestyle=style,
                color=colors[key],
                label=label,
            )
    axes[0, 0].set(
        xlabel="training step", ylabel="test accuracy", ylim=(0, 1), title="test accuracy"
    )
    axes[0, 1].set(
        xlabel="training step",
        ylabel="fraction",
        ylim=(0, 1),
        title="saturated units (mean over layers)",
    )
    axes[0, 2].set(xlabel="training step", ylabel="norm", title="first-layer gradient norm")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=6)
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
        "layer MNIST MLP with sigmoid, tanh and ReLU, at the default and a larger initial scale."
    ),
    config_cls=Config,
    numbers_cls=Numbers,
    measure=measure,
    judge=judge,
    summary="sigmoid/tanh vs ReLU in a deeper net, with/without BN",
)
