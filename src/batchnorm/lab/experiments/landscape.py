"""The loss landscape along the gradient: with batch norm it is smoother.

Claim (Santurkar, Tsipras, Ilyas, Madry 2018, arXiv 1805.11604, Sec. 3.1, **Figure 4**): BN
makes the loss landscape significantly smoother. At the parameters theta of a training step,
with gradient g on the step's batch, moving along the gradient by step lengths eta in
[0.5, 4] x lr (capped at 0.4 for VGG) the paper records (a) the loss L(theta - eta g): its range
over eta, (b) "gradient predictiveness": ||grad L(theta - eta g) - grad L(theta)|| over eta, and
(c) the "effective beta-smoothness" max_eta ||grad L(theta - eta g) - grad L(theta)|| / ||eta g||.
With BN the three are far smaller and vary less over training (up to two orders of magnitude
early in training) (:func:`batchnorm.lab.theory.landscape.probe_landscape`).

Stand-in: the small VGG-style CNN of :mod:`batchnorm.lab.experiments.cnn` on a Fashion-MNIST
subset (the paper: VGG on CIFAR-10, not available here), standard and BN, paired (same initial
weights and batches), plain SGD at ``lr``; every ``probe_every`` steps, before that step's
update, the landscape is probed on the step's batch over all parameters.

Initialization. Under PyTorch's default conv initialization (a third of He's variance) the
standard network starts with vanishing gradients: its landscape at step 0 is flat for want of a
gradient, not because it is smooth, and its first steps are a transient out of that regime. The
conv weights are therefore drawn with He et al.'s (2015) initialization (``init="kaiming"``:
N(0, 2 / fan_in), the ReLU gain, zero bias), under which the standard network trains from the
first step; both networks of a seed start from the same weights.

Per probe: the loss range ``max_eta L - min_eta L``, the largest gradient change
``max_eta ||grad L(theta - eta g) - grad L(theta)||`` and the effective beta-smoothness.

Rules (in code), one claim per quantity, judged on the probes at steps >= ``early_steps`` (the
earlier probes are reported apart), every comparison paired by seed with a margin of
``spread_factor`` standard errors of the per-seed values (at least ``min_tolerance``,
:func:`batchnorm.lab.rules.paired_tolerance`):
(a) smaller: the mean over the judged steps of log(standard / BN), step by step, is above the
margin;
(b) steadier: log(spread without BN / spread with BN), the spread being max - min over the
judged steps, is above the margin.
A claim holds when both do. Networks that did not train (final training accuracy below
``train_floor``) leave the claims "not tested".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

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
    BN,
    COLORS,
    PROBE_CURVE_FIELDS,
    STANDARD,
    CNNConfig,
    VGGStyle,
    cached_job,
    curve_choice,
    image_data,
    network_choice,
    probe_curve_rows,
    probed_job,
)
from batchnorm.lab.rules import (
    baseline_metrics,
    beyond_tolerance,
    gate,
    not_tested,
    paired_tolerance,
    untrained,
)

__all__ = ["Config", "Numbers", "EXPERIMENT", "measure", "judge"]

NETS = (STANDARD, BN)
QUANTITIES = {
    "loss_range": "loss range over eta",
    "grad_change": "max gradient change ||grad L(theta - eta g) - grad L(theta)||",
    "beta": "effective beta-smoothness",
}
PAPER = {
    "loss_range": "Fig. 4(a): far smaller and steadier with BN",
    "grad_change": "Fig. 4(b): far smaller and steadier with BN",
    "beta": "Fig. 4(c): smaller with BN, up to two orders of magnitude early in training",
}


@dataclass(frozen=True)
class Config(CNNConfig):
    """Landscape probes with and without BN. Defaults are the full protocol."""

    steps: int = param(3000, "SGD steps per network")
    seeds: int = param(3, "number of seeds (each: initial weights and data order)")
    probe_every: int = param(50, "probe the landscape every this many steps")
    early_steps: int = param(
        100, "probes before this step are the early transient: reported apart, not judged"
    )
    eta_low: float = param(0.5, "smallest step length, in multiples of lr (the paper: 0.5)")
    eta_high: float = param(4.0, "largest step length, in multiples of lr (the paper: 4)")
    eta_num: int = param(8, "step lengths in the grid")
    eta_cap: float | None = param(
        0.4, "cap on the step length (the paper, VGG: 0.4; none = no cap)"
    )

    def validate(self) -> None:
        super().validate()
        if self.probe_every < 1 or self.eta_num < 1:
            raise ValueError("probe_every and eta_num must be at least 1")
        if not 0 <= self.early_steps < self.steps:
            raise ValueError(
                f"early_steps must lie in 0..steps-1 (some probes must be judged), got "
                f"{self.early_steps}"
            )
        if not 0 < self.eta_low <= self.eta_high:
            raise ValueError(
                f"need 0 < eta_low <= eta_high, got {self.eta_low} and {self.eta_high}"
            )
        if self.eta_cap is not None and not self.eta_cap > 0:
            raise ValueError(f"eta_cap must be positive (or none), got {self.eta_cap}")

    def quick(self) -> Config:
        """A smoke test: 200 steps, 1 seed, 4 step lengths."""
        return replace(
            super().quick(), probe_every=50, eta_num=4, early_steps=50, eval_examples=1000
        )


def _job(
    config: Config,
    data,
    variant: str,
    seed: int,
    etas: tuple[float, ...],
    key: str,
    checkpoint: Path | None = None,
) -> dict:
    from batchnorm.lab.theory.landscape import probe_landscape

    model = VGGStyle.for_config(config, data, variant, seed)
    params = [p for p in model.parameters()]

    def probe(loss_fn, step: int) -> dict:
        result = probe_landscape(params, loss_fn, etas, module=model)
        low, high = result.loss_range
        return {
            "losses": list(result.losses),
            "grad_differences": list(result.grad_differences),
            "loss_at_start": result.loss_at_start,
            "grad_norm": result.grad_norm,
            "loss_range": high - low,
            "grad_change": max(result.grad_differences),
            "beta": result.beta_smoothness,
        }

    return probed_job(model, data, config, seed=seed, probe=probe, desc=key, checkpoint=checkpoint)


@dataclass
class Numbers:
    """What the claims are decided on: the probed steps, and every probed value keyed by
    quantity, then network (standard, BN), as [seed][probe] (nan: not probed, diverged); the
    final accuracies per seed."""

    steps: list[int]  # the probed steps, the same for every network
    early_steps: int  # the config's: probes before this step are not judged
    values: dict[str, dict[str, list[list[float]]]]
    train: dict[str, list[float]]  # final training accuracy per seed
    test: dict[str, list[float]]  # final test accuracy per seed


def _log_ratios(
    numbers: Numbers, q: str, early_steps: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per seed, over the judged probes (step >= early_steps, both finite and positive): the
    mean of log(standard / BN) step by step, log(spread without / spread with BN), and the two
    spreads."""
    judged = np.asarray(numbers.steps) >= early_steps
    st = np.asarray(numbers.values[q][STANDARD], dtype=np.float64)[:, judged]
    bn = np.asarray(numbers.values[q][BN], dtype=np.float64)[:, judged]
    per_step, spread_ratio, st_spread, bn_spread = [], [], [], []
    for a, b in zip(st, bn):
        ok = np.isfinite(a) & np.isfinite(b) & (a > 0) & (b > 0)
        if ok.sum() < 2:
            per_step.append(math.nan)
            spread_ratio.append(math.nan)
            st_spread.append(math.nan)
            bn_spread.append(math.nan)
            continue
        a, b = a[ok], b[ok]
        per_step.append(float(np.mean(np.log(a / b))))
        sa, sb = float(a.max() - a.min()), float(b.max() - b.min())
        st_spread.append(sa)
        bn_spread.append(sb)
        spread_ratio.append(math.log(sa / sb) if sa > 0 and sb > 0 else math.nan)
    return tuple(
        np.array(x, dtype=np.float64) for x in (per_step, spread_ratio, st_spread, bn_spread)
    )


def judge(
    numbers: Numbers,
    *,
    spread_factor: float = 2.0,
    min_tolerance: float = 0.0005,
    train_floor: float = 0.5,
) -> list[Claim]:
    """Decide the claims, one per quantity, from ``numbers`` alone (rules in the module
    docstring).

    Args:
        numbers: what :func:`measure` measured; probes before its ``early_steps`` (the
            config's) are the early transient, not judged.
        spread_factor, min_tolerance: the margin of :func:`batchnorm.lab.rules.paired_tolerance`
            on the per-seed log ratios.
        train_floor: a network whose mean final training accuracy is below this did not train.
    """
    reason = untrained(numbers.train, train_floor)
    early_steps = numbers.early_steps
    claims = []
    margin = (
        f"{spread_factor:g} standard errors of the per-seed values (at least {min_tolerance:g})"
    )
    for q, label in QUANTITIES.items():
        per_step, spread, st_spread, bn_spread = _log_ratios(numbers, q, early_steps)
        kw = {"spread_factor": spread_factor, "min_tolerance": min_tolerance}
        statement = f"With BN the {label} is smaller and steadier over training."
        rule = (
            f"over the probes at steps >= {early_steps}, paired by seed: the mean of "
            f"log(standard / BN) step by step, and log(spread without / with BN) (spread "
            f"= max - min over those steps), each above {margin}"
        )
        if not np.isfinite(per_step).any():
            claims.append(
                not_tested(
                    q, statement, rule, f"fewer than two judged probes (steps >= {early_steps})"
                )
            )
            continue
        smaller = beyond_tolerance(per_step, **kw)
        steadier = np.isfinite(spread).any() and beyond_tolerance(spread, **kw)
        mean_step, mean_spread = np.nanmean(per_step), np.nanmean(spread)
        evidence = (
            f"steps >= {early_steps}: mean log(standard / BN) {mean_step:+.3f} "
            f"(x{math.exp(mean_step):.3g}), margin {paired_tolerance(per_step, **kw):.3g}; "
            f"spread {np.nanmean(st_spread):.4g} without vs {np.nanmean(bn_spread):.4g} with BN, "
            f"mean log ratio {mean_spread:+.3f}, margin {paired_tolerance(spread, **kw):.3g}"
        )
        claims.append(gate(Claim(q, statement, rule, bool(smaller and steadier), evidence), reason))
    return claims


def measure(config: Config, ctx: Context) -> Measurement:
    """Train and probe both networks; plot."""
    from batchnorm.lab.theory.landscape import step_grid

    data = image_data(ctx, config)
    etas = step_grid(config.lr, config.eta_low, config.eta_high, config.eta_num, config.eta_cap)
    jobs: dict[str, list[dict]] = {}
    with ctx.timer("train and probe"):
        for variant in NETS:
            jobs[variant] = [
                cached_job(
                    ctx,
                    f"{variant}-seed{seed}",
                    lambda v=variant, s=seed: _job(
                        config, data, v, s, etas, f"{v} seed {s}", ctx.checkpoint(f"{v}-seed{s}")
                    ),
                    as_json=True,
                )
                for seed in config.seed_list()
            ]
    schedule = list(range(0, config.steps, config.probe_every))

    def padded(job: dict, q: str) -> list[float]:
        got = {step: p[q] for step, p in zip(job["steps"], job["probes"])}
        return [math.nan if got.get(t) is None else float(got[t]) for t in schedule]

    train = {v: [job["final_train_acc"] for job in jobs[v]] for v in NETS}
    test = {v: [job["final_test_acc"] for job in jobs[v]] for v in NETS}
    numbers = Numbers(
        steps=schedule,
        early_steps=config.early_steps,
        values={q: {v: [padded(job, q) for job in jobs[v]] for v in NETS} for q in QUANTITIES},
        train=train,
        test=test,
    )
    grid = {
        (v, q): np.asarray(numbers.values[q][v], dtype=np.float64) for v in NETS for q in QUANTITIES
    }  # (S, T)
    early = np.asarray(schedule) < config.early_steps
    comparisons = []
    for q, label in QUANTITIES.items():
        st, bn = grid[STANDARD, q], grid[BN, q]
        ratio = np.nanmean(np.log(st[:, ~early] / bn[:, ~early]))
        comparisons.append(
            Comparison(
                f"{label}, steps >= {config.early_steps}: mean without / with BN (geometric "
                "mean of the paired ratios)",
                PAPER[q],
                f"{np.nanmean(st[:, ~early]):.4g} / {np.nanmean(bn[:, ~early]):.4g} "
                f"(x{math.exp(ratio):.3g})",
                float(math.exp(ratio)) if math.isfinite(ratio) else None,
            )
        )
        if early.any():
            comparisons.append(
                Comparison(
                    f"{label}, early steps (< {config.early_steps}, not judged): mean without / "
                    "with BN",
                    "the paper's gap is largest early in training",
                    f"{np.nanmean(st[:, early]):.4g} / {np.nanmean(bn[:, early]):.4g}",
                )
            )
    comparisons.append(
        Comparison(
            "final train / test accuracy without BN; with BN",
            "VGG, CIFAR-10: 80% / 83% test",
            f"{fmt_mean_std(train[STANDARD])} / {fmt_mean_std(test[STANDARD])}; "
            f"{fmt_mean_std(train[BN])} / {fmt_mean_std(test[BN])}",
        )
    )
    # Per probed step (mean over seeds): is the standard network still learning?
    steps = jobs[STANDARD][0]["steps"]
    rows = []
    for t, step in enumerate(steps):
        row = [str(step)]
        for v in NETS:
            probes = [job["probes"][t] for job in jobs[v] if t < len(job["probes"])]
            accs = [job["test_acc"][t] for job in jobs[v] if t < len(job["test_acc"])]
            row += [f"{np.mean(accs):.4f}"] + [
                f"{np.mean([p[q] for p in probes]):.4g}" for q in QUANTITIES
            ]
        rows.append(row)
    header = ["step"]
    for v in NETS:
        header += [f"test acc, {v}", f"loss range, {v}", f"grad change, {v}", f"beta, {v}"]
    table = md_table(header, rows)
    probe_rows = [
        {"step": step, "variant": v, "seed": seed, **{q: p[q] for q in QUANTITIES}}
        for v in NETS
        for seed, job in zip(config.seed_list(), jobs[v])
        for step, p in zip(job["steps"], job["probes"])
    ]
    ctx.write_csv("curves.csv", probe_curve_rows(jobs, config.seed_list()), PROBE_CURVE_FIELDS)
    ctx.write_csv("landscape.csv", probe_rows, ["step", "variant", "seed", *QUANTITIES])
    with ctx.timer("plots"):
        _plot(ctx, jobs)
    return Measurement(
        numbers=numbers,
        comparisons=comparisons,
        metrics={
            **baseline_metrics(train[BN], test[BN]),
            "baseline": "BN",
            "final_train_acc": train,
            "final_test_acc": test,
            "step_sizes": etas,
            "early_steps": config.early_steps,
            "jobs": jobs,
        },
        tables=[("Per probed step (mean over seeds)", table)],
        figures=[
            (
                "landscape.png",
                "Loss along the gradient (band: min-max over eta), largest gradient change and "
                "effective beta-smoothness over training (first seed)",
            )
        ],
        choices=[
            network_choice(config),
            f"SGD lr {config.lr} (the paper's), batch {config.batch_size} (the paper's), "
            f"{config.steps} steps, {data.description}",
            curve_choice(config, data),
            f"initialization: conv weights {config.init} (kaiming: He et al. 2015, N(0, 2 / "
            "fan_in), zero bias; classifier PyTorch's default), the same for both networks of a "
            "seed; under PyTorch's default conv init the standard network starts with vanishing "
            "gradients (a flat landscape at step 0 for want of a gradient)",
            "step lengths eta (Sec. 3.1: [0.5, 4] x lr, capped at 0.4 for VGG): "
            + ", ".join(f"{e:.4g}" for e in etas),
            f"judged: the probes at steps >= {config.early_steps}, paired by seed and step; the "
            "earlier ones (the first steps' transient) are reported apart",
            "the probe uses all parameters (BN gamma and beta included), the step's own batch, "
            "BN in training mode; it leaves weights and running statistics untouched",
            "loss range = max - min over eta of L(theta - eta g); gradient change = max over eta",
        ],
        notes=[
            "CIFAR-10 and the paper's VGG cannot run here: a small CNN on Fashion-MNIST stands "
            "in, so the comparison is of the shape of the result, not of the paper's numbers.",
            "Fig. 4 plots the range over eta at each step; the rules compare, step by step and "
            "seed by seed, the standard network's value with BN's, and the spread of each over "
            "the judged steps.",
        ],
    )


def _plot(ctx: Context, jobs: dict) -> None:
    from batchnorm.lab.plots import new_figure

    figure, axes = new_figure(3, 1)
    for v in NETS:
        job = jobs[v][0]
        steps = job["steps"]
        losses = np.array([p["losses"] for p in job["probes"]])
        axes[0, 0].fill_between(
            steps, losses.min(1), losses.max(1), color=COLORS[v], alpha=0.3, label=v
        )
        axes[0, 1].plot(steps, [p["grad_change"] for p in job["probes"]], color=COLORS[v], label=v)
        axes[0, 2].plot(steps, [p["beta"] for p in job["probes"]], color=COLORS[v], label=v)
    axes[0, 0].set(xlabel="step", ylabel="L(theta - eta g)", title="loss landscape")
    axes[0, 1].set(
        xlabel="step", ylabel="max gradient change", yscale="log", title="gradient predictiveness"
    )
    axes[0, 2].set(xlabel="step", ylabel="beta", yscale="log", title="effective beta-smoothness")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend()
    ctx.save_figure(figure, "landscape.png")


EXPERIMENT = Experiment(
    name="landscape",
    title="The loss landscape with and without BN (Santurkar et al. 2018, Sec. 3.1, Figure 4)",
    claim=(
        "With BN the loss and its gradient change less along the gradient direction: loss range, "
        "gradient predictiveness and effective beta-smoothness are smaller and steadier."
    ),
    paper=(
        "Santurkar et al. (2018), Sec. 3.1, Figure 4 (VGG, CIFAR-10). Stand-in: a small "
        "VGG-style CNN on Fashion-MNIST."
    ),
    config_cls=Config,
    numbers_cls=Numbers,
    measure=measure,
    judge=judge,
    summary="loss range, gradient predictiveness, beta-smoothness along the gradient",
)
