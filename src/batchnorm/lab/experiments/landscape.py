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
subset (the paper: VGG on CIFAR-10, not available here), standard and BN, paired, plain SGD at
``lr``; every ``probe_every`` steps, before that step's update, the landscape is probed on the
step's batch over all parameters. Fashion-MNIST is hard enough that the standard network is still
learning over the probed steps (its test accuracy is reported at each probe).

Per probe: the loss range ``max_eta L - min_eta L``, the largest gradient change
``max_eta ||grad L(theta - eta g) - grad L(theta)||`` and the effective beta-smoothness. Over
training (the probed steps, pooled over seeds) the *maximum* and the *spread* (max - min) of each
are compared, not means.

Rules (in code), one per quantity: with BN both the maximum and the spread over training are
smaller than without BN.
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
    BN,
    COLORS,
    PROBE_CURVE_FIELDS,
    STANDARD,
    CNNConfig,
    VGGStyle,
    cached_job,
    image_data,
    probe_curve_rows,
    train_with_probes,
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

    steps: int = param(1000, "SGD steps per network")
    probe_every: int = param(50, "probe the landscape every this many steps")
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
        if not 0 < self.eta_low <= self.eta_high:
            raise ValueError(
                f"need 0 < eta_low <= eta_high, got {self.eta_low} and {self.eta_high}"
            )
        if self.eta_cap is not None and not self.eta_cap > 0:
            raise ValueError(f"eta_cap must be positive (or none), got {self.eta_cap}")

    def quick(self) -> Config:
        """A smoke test: 200 steps, 1 seed, 4 step lengths."""
        return replace(super().quick(), probe_every=50, eta_num=4)


def _job(config: Config, data, variant: str, seed: int, etas: tuple[float, ...], key: str) -> dict:
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

    return train_with_probes(
        model, data, config, seed=seed, probe_every=config.probe_every, probe=probe, desc=key
    )


@dataclass
class Numbers:
    """What the claims are decided on: every probed value (all probes of all seeds), keyed by
    quantity and then by network (standard, BN)."""

    values: dict[str, dict[str, list[float]]]


def _stats(x: np.ndarray) -> tuple[float, float]:
    """The maximum and the spread (max - min) of the finite values (nan, nan: none)."""
    x = x[np.isfinite(x)]
    return (float(x.max()), float(x.max() - x.min())) if len(x) else (math.nan, math.nan)


def judge(numbers: Numbers, *, max_margin: float = 0.0, spread_margin: float = 0.0) -> list[Claim]:
    """Decide the claims, one per quantity, from ``numbers`` alone.

    Args:
        numbers: what :func:`measure` measured.
        max_margin: a quantity's claim needs BN's maximum below the standard network's by more
            than this...
        spread_margin: ... and BN's spread below it by more than this (ties do not hold; no
            finite value at all does not hold).
    """
    claims = []
    for q, label in QUANTITIES.items():
        bn_max, bn_spread = _stats(np.asarray(numbers.values[q][BN], dtype=np.float64))
        st_max, st_spread = _stats(np.asarray(numbers.values[q][STANDARD], dtype=np.float64))
        held = bool(bn_max < st_max - max_margin and bn_spread < st_spread - spread_margin)
        claims.append(
            Claim(
                q,
                f"With BN the {label} is smaller and steadier over training.",
                "over the probed steps (pooled over seeds), both the maximum and the spread "
                "(max - min) are smaller with BN"
                + (
                    f" (by more than {max_margin:g} and {spread_margin:g})"
                    if max_margin or spread_margin
                    else ""
                ),
                held,
                f"max {bn_max:.4g} with BN vs {st_max:.4g} without; spread {bn_spread:.4g} vs "
                f"{st_spread:.4g}",
            )
        )
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
                    lambda v=variant, s=seed: _job(config, data, v, s, etas, f"{v} seed {s}"),
                    as_json=True,
                )
                for seed in config.seed_list()
            ]
    values = {
        (v, q): np.array([p[q] for job in jobs[v] for p in job["probes"]], dtype=np.float64)
        for v in NETS
        for q in QUANTITIES
    }

    numbers = Numbers(values={q: {v: values[v, q].tolist() for v in NETS} for q in QUANTITIES})
    summary = {key: _stats(x) for key, x in values.items()}
    comparisons = []
    for q, label in QUANTITIES.items():
        (bn_max, _), (st_max, _) = summary[BN, q], summary[STANDARD, q]
        ratio = st_max / bn_max if bn_max > 0 else math.nan
        comparisons.append(
            Comparison(
                f"{label}: max over training without / with BN (ratio)",
                PAPER[q],
                f"{st_max:.4g} / {bn_max:.4g} ({ratio:.3g}x)",
                float(ratio) if math.isfinite(ratio) else None,
            )
        )
    comparisons.append(
        Comparison(
            "test accuracy at the end: without / with BN",
            "VGG, CIFAR-10: 80% / 83%",
            f"{fmt_mean_std([j['final_test_acc'] for j in jobs[STANDARD]])} / "
            f"{fmt_mean_std([j['final_test_acc'] for j in jobs[BN]])}",
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
            "step_sizes": etas,
            "max": {f"{v}|{q}": summary[v, q][0] for v, q in summary},
            "spread": {f"{v}|{q}": summary[v, q][1] for v, q in summary},
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
            f"network: conv 3x3 widths {config.channels}, each [BN], ReLU, 2x2 max pool, linear "
            f"classifier; SGD lr {config.lr}, batch {config.batch_size}, {config.steps} steps, "
            f"{data.description}",
            "step lengths eta: " + ", ".join(f"{e:.4g}" for e in etas),
            "the probe uses all parameters (BN gamma and beta included), the step's own batch, "
            "BN in training mode; it leaves weights and running statistics untouched",
            "loss range = max - min over eta of L(theta - eta g); gradient change = max over eta",
        ],
        notes=[
            "CIFAR-10 and the paper's VGG cannot run here: a small CNN on Fashion-MNIST stands "
            "in, so the comparison is of the shape of the result, not of the paper's numbers."
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
