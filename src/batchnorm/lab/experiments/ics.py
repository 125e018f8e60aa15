"""Internal covariate shift, measured: batch norm does not reduce it.

Claim (Santurkar, Tsipras, Ilyas, Madry 2018, arXiv 1805.11604, Sec. 2.2, Definition 2.1,
**Figure 5** (VGG) and **Figure 12** (25-layer deep linear network)): measured as an optimization
quantity, internal covariate shift is not reduced by BN; in the deep linear network BN increases
it. For layer i at step t, G = grad_(W_i) L at the current weights and G' = the same gradient,
on the same batch, after layers 1..i-1 took their step-t update; reported are ||G - G'||_2 and
cos(G, G') (:func:`batchnorm.lab.theory.covariate_shift.internal_covariate_shift`; a layer's
group is its weights and bias with the BN gamma and beta that follow).

Two settings, each with and without BN, paired (same initial weights and batches):

- the small VGG-style CNN of :mod:`batchnorm.lab.experiments.cnn` on a Fashion-MNIST subset
  (the paper: VGG on CIFAR-10, not available here), SGD at ``lr``, probed every ``probe_every``
  steps before that step's update;
- the deep linear network of :mod:`batchnorm.lab.theory.deep_linear` at the paper's settings
  (25 layers of 10 x 10, 1000 Gaussian samples, full-batch GD, lr 1e-6, 10k steps, Glorot),
  probed every ``dln_probe_every`` steps.

Rules (in code), on the median over probed steps and over layers 2..k (layer 1 has no layer
below it: G' = G), averaged over seeds, in *each* setting:
(1) ``||G - G'||`` with BN is at least ``1 - tolerance`` times that without BN;
(2) ``cos(G, G')`` with BN is at most that without BN plus ``cos_tolerance``.
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
from batchnorm.lab.progress import log

__all__ = ["Config", "Numbers", "EXPERIMENT", "measure", "judge"]

CNN, DLN = "CNN", "deep linear"
SETTINGS = (CNN, DLN)
NETS = (STANDARD, BN)


@dataclass(frozen=True)
class Config(CNNConfig):
    """Covariate shift per layer with and without BN. Defaults are the full protocol."""

    steps: int = param(1000, "SGD steps per CNN")
    probe_every: int = param(100, "measure the CNN's covariate shift every this many steps")
    dln_depth: int = param(25, "layers of the deep linear network (the paper: 25)")
    dln_dim: int = param(10, "width of its square layers (the paper: 10)")
    dln_samples: int = param(1000, "Gaussian samples (the paper: 1000)")
    dln_lr: float = param(1e-6, "its full-batch GD step, loss summed over samples (paper: 1e-6)")
    dln_steps: int = param(10_000, "its GD steps (the paper: 10k)")
    dln_probe_every: int = param(1000, "measure its covariate shift every this many steps")
    dln_seeds: int = param(1, "seeds of the deep linear network (problem and initialization)")
    tolerance: float = param(0.1, "rule (1): BN's ||G - G'|| may be this fraction below")
    cos_tolerance: float = param(0.05, "rule (2): BN's cos(G, G') may be this much above")

    def validate(self) -> None:
        super().validate()
        for name in ("probe_every", "dln_depth", "dln_dim", "dln_steps", "dln_probe_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.dln_depth < 2:
            raise ValueError("dln_depth must be at least 2 (layer 1 has no shift)")
        if self.dln_samples < 2 or self.dln_seeds < 1:
            raise ValueError("dln_samples must be at least 2 and dln_seeds at least 1")
        if not (math.isfinite(self.dln_lr) and self.dln_lr > 0):
            raise ValueError(f"dln_lr must be a positive finite number, got {self.dln_lr}")
        if not 0 <= self.tolerance < 1 or not self.cos_tolerance >= 0:
            raise ValueError("tolerance must lie in [0, 1) and cos_tolerance be >= 0")

    def quick(self) -> Config:
        """A smoke test: 200 CNN steps, 1 seed, 1000 deep-linear steps."""
        return replace(super().quick(), probe_every=50, dln_steps=1000, dln_probe_every=250)


def _shift_rows(shifts) -> dict:
    return {
        "l2": [s.l2_difference for s in shifts],
        "cos": [s.cosine for s in shifts],
        "grad_norm": [s.grad_norm for s in shifts],
    }


def _cnn_job(config: Config, data, variant: str, seed: int, key: str) -> dict:
    from batchnorm.lab.theory.covariate_shift import internal_covariate_shift

    model = VGGStyle.for_config(config, data, variant, seed)
    groups = model.layer_groups()

    def probe(loss_fn, step: int) -> dict:
        return _shift_rows(internal_covariate_shift(groups, loss_fn, config.lr, module=model))

    return train_with_probes(
        model, data, config, seed=seed, probe_every=config.probe_every, probe=probe, desc=key
    )


def _dln_job(config: Config, batch_norm: bool, seed: int) -> dict:
    import time

    from batchnorm.lab.theory.deep_linear import make_problem, train_deep_linear

    start = time.perf_counter()
    problem = make_problem(config.dln_dim, config.dln_samples, seed)
    result = train_deep_linear(
        problem,
        depth=config.dln_depth,
        batch_norm=batch_norm,
        lr=config.dln_lr,
        steps=config.dln_steps,
        seed=seed,
        shift_every=config.dln_probe_every,
    )
    every = max(1, config.dln_steps // 200)
    return {
        "steps": list(result.shift_steps),
        "probes": [_shift_rows(s) for s in result.shifts],
        "loss_steps": list(range(0, config.dln_steps + 1, every)),
        "losses": result.losses[::every].tolist(),
        "final_loss": float(result.losses[-1]),
        "seconds": time.perf_counter() - start,
    }


def _medians(jobs: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per seed: the median over probes and layers 2..k of l2 and cos; per layer: the medians
    over probes, averaged over seeds."""
    l2 = np.array([[p["l2"][1:] for p in job["probes"]] for job in jobs], dtype=np.float64)
    cos = np.array([[p["cos"][1:] for p in job["probes"]] for job in jobs], dtype=np.float64)
    # l2, cos: (S, T, layers-1)
    per_seed_l2 = np.nanmedian(l2.reshape(len(jobs), -1), axis=1)
    per_seed_cos = np.nanmedian(cos.reshape(len(jobs), -1), axis=1)
    return (
        per_seed_l2,
        per_seed_cos,
        np.nanmedian(l2, axis=1).mean(0),
        np.nanmedian(cos, axis=1).mean(0),
    )


def _relative(jobs: list[dict]) -> np.ndarray:
    """Per layer 2..k: the median over probes of ||G - G'|| / ||G||, averaged over seeds."""
    ratios = [
        [
            [a / g if g > 0 else np.nan for a, g in zip(p["l2"][1:], p["grad_norm"][1:])]
            for p in job["probes"]
        ]
        for job in jobs
    ]
    return np.nanmedian(np.array(ratios, dtype=np.float64), axis=1).mean(0)


@dataclass
class Numbers:
    """What the claims are decided on: per seed, the median over probes and layers 2..k, keyed
    by setting (CNN, deep linear) and then by network (standard, BN)."""

    tolerance: float  # the config's allowance of "l2" (a fraction)
    cos_tolerance: float  # the config's allowance of "cosine"
    l2: dict[str, dict[str, list[float]]]  # median ||G - G'||
    cos: dict[str, dict[str, list[float]]]  # median cos(G, G')


def _evidence(values: dict, digits: int) -> str:
    return "; ".join(
        f"{s}: {values[s, BN]:.{digits}g} with BN vs {values[s, STANDARD]:.{digits}g} without"
        for s in SETTINGS
    )


def judge(numbers: Numbers) -> list[Claim]:
    """Decide the claims from ``numbers`` alone.

    The margins are the config's, saved in the numbers: "l2" holds when, in both settings, BN's
    mean median ||G - G'|| is at least ``1 - tolerance`` times the standard network's (a tie
    holds); "cosine" when BN's mean median cos(G, G') is at most the standard network's plus
    ``cos_tolerance`` (a tie holds).
    """
    n = numbers
    l2 = {(s, v): float(np.mean(n.l2[s][v])) for s in SETTINGS for v in NETS}
    cos = {(s, v): float(np.mean(n.cos[s][v])) for s in SETTINGS for v in NETS}
    l2_held = all(l2[s, BN] >= (1 - n.tolerance) * l2[s, STANDARD] for s in SETTINGS)
    cos_held = all(cos[s, BN] <= cos[s, STANDARD] + n.cos_tolerance for s in SETTINGS)
    return [
        Claim(
            "l2",
            "BN does not reduce internal covariate shift measured as ||G - G'||.",
            f"in both settings, median ||G - G'|| (probes x layers 2..k, mean over seeds) with "
            f"BN >= {1 - n.tolerance:g} x that without BN",
            l2_held,
            _evidence(l2, 4),
        ),
        Claim(
            "cosine",
            "BN does not make G' better aligned with G (cos(G, G') is not higher with BN).",
            f"in both settings, median cos(G, G') with BN <= that without BN + {n.cos_tolerance:g}",
            cos_held,
            _evidence(cos, 4),
        ),
    ]


def measure(config: Config, ctx: Context) -> Measurement:
    """Train both settings with and without BN, measuring the shift; plot."""
    data = image_data(ctx, config)
    jobs: dict[tuple[str, str], list[dict]] = {}
    with ctx.timer("CNN"):
        for variant in NETS:
            jobs[CNN, variant] = [
                cached_job(
                    ctx,
                    f"cnn-{variant}-seed{seed}",
                    lambda v=variant, s=seed: _cnn_job(config, data, v, s, f"CNN {v} seed {s}"),
                    as_json=True,
                )
                for seed in config.seed_list()
            ]
    with ctx.timer("deep linear"):
        for variant in NETS:
            runs = []
            for seed in range(config.seed, config.seed + config.dln_seeds):
                log(f"[lab] deep linear network, {variant}, seed {seed}: {config.dln_steps} steps")
                runs.append(
                    cached_job(
                        ctx,
                        f"dln-{variant}-seed{seed}",
                        lambda v=variant, s=seed: _dln_job(config, v == BN, s),
                        as_json=True,
                    )
                )
            jobs[DLN, variant] = runs
    med = {key: _medians(value) for key, value in jobs.items()}
    l2 = {key: float(np.mean(m[0])) for key, m in med.items()}
    cos = {key: float(np.mean(m[1])) for key, m in med.items()}
    numbers = Numbers(
        tolerance=config.tolerance,
        cos_tolerance=config.cos_tolerance,
        l2={s: {v: med[s, v][0].tolist() for v in NETS} for s in SETTINGS},
        cos={s: {v: med[s, v][1].tolist() for v in NETS} for s in SETTINGS},
    )

    comparisons = [
        Comparison(
            "CNN: median ||G - G'|| / cos(G, G'), without BN -> with BN",
            "VGG, CIFAR-10 (Fig. 5): with BN the l2 difference is similar or larger, the cosine "
            "similar or smaller",
            f"{l2[CNN, STANDARD]:.4g} / {cos[CNN, STANDARD]:.4f} -> {l2[CNN, BN]:.4g} / "
            f"{cos[CNN, BN]:.4f}",
            l2[CNN, BN],
        ),
        Comparison(
            "deep linear network: median ||G - G'|| / cos(G, G'), without BN -> with BN",
            "25-layer DLN (Fig. 12): BN increases the shift (larger l2, cosine far from 1)",
            f"{l2[DLN, STANDARD]:.4g} / {cos[DLN, STANDARD]:.4f} -> {l2[DLN, BN]:.4g} / "
            f"{cos[DLN, BN]:.4f}",
            l2[DLN, BN],
        ),
        Comparison(
            "final test accuracy of the CNN: without / with BN",
            "VGG: 80% / 83%",
            f"{fmt_mean_std([j['final_test_acc'] for j in jobs[CNN, STANDARD]])} / "
            f"{fmt_mean_std([j['final_test_acc'] for j in jobs[CNN, BN]])}",
        ),
        Comparison(
            "final loss of the deep linear network: without / with BN",
            "both decrease (Fig. 12)",
            f"{fmt_mean_std([j['final_loss'] for j in jobs[DLN, STANDARD]], 1)} / "
            f"{fmt_mean_std([j['final_loss'] for j in jobs[DLN, BN]], 1)}",
        ),
    ]
    rows = []
    for s in SETTINGS:
        for v in NETS:
            per_layer_l2, per_layer_cos = med[s, v][2], med[s, v][3]
            relative = _relative(jobs[s, v])
            for layer, (a, b) in enumerate(zip(per_layer_l2, per_layer_cos), start=2):
                rows.append(
                    [s, v, str(layer), f"{a:.4g}", f"{relative[layer - 2]:.4g}", f"{b:.4f}"]
                )
    table = md_table(
        [
            "setting",
            "network",
            "layer",
            "median ||G - G'||",
            "median ||G - G'|| / ||G|| (outside the rules)",
            "median cos",
        ],
        rows,
    )
    ctx.write_csv(
        "curves.csv",
        probe_curve_rows({v: jobs[CNN, v] for v in NETS}, config.seed_list()),
        PROBE_CURVE_FIELDS,
    )
    shift_rows = []
    for (s, v), runs in jobs.items():
        for i, job in enumerate(runs):
            for step, p in zip(job["steps"], job["probes"]):
                for layer, (a, b) in enumerate(zip(p["l2"], p["cos"]), start=1):
                    shift_rows.append(
                        {
                            "setting": s,
                            "variant": v,
                            "run": i,
                            "step": step,
                            "layer": layer,
                            "l2_difference": a,
                            "cosine": b,
                        }
                    )
    ctx.write_csv(
        "shift.csv",
        shift_rows,
        ["setting", "variant", "run", "step", "layer", "l2_difference", "cosine"],
    )
    with ctx.timer("plots"):
        _plot(ctx, jobs)
    return Measurement(
        numbers=numbers,
        comparisons=comparisons,
        metrics={
            "median_l2": {f"{s}|{v}": l2[s, v] for s, v in l2},
            "median_cos": {f"{s}|{v}": cos[s, v] for s, v in cos},
            "per_layer_median_l2": {f"{s}|{v}": m[2] for (s, v), m in med.items()},
            "per_layer_median_cos": {f"{s}|{v}": m[3] for (s, v), m in med.items()},
            "jobs": {f"{s}|{v}": runs for (s, v), runs in jobs.items()},
        },
        tables=[("Covariate shift per layer (median over probed steps, mean over seeds)", table)],
        figures=[
            ("ics.png", "||G - G'|| and cos(G, G') over training, per layer (first seed)"),
        ],
        choices=[
            f"CNN: conv 3x3 widths {config.channels}, each [BN], ReLU, 2x2 max pool, linear "
            f"classifier; SGD lr {config.lr}, batch {config.batch_size}, {config.steps} steps, "
            f"{data.description}",
            "a CNN layer's group: conv weight and bias with the BN gamma and beta after it; the "
            "classifier is the last layer",
            "the probe runs on the step's own batch, before its update, with the step's lr; BN "
            "in training mode (batch statistics); the probe leaves weights and running "
            "statistics untouched",
            f"deep linear network: {config.dln_depth} layers of {config.dln_dim} x "
            f"{config.dln_dim}, {config.dln_samples} samples, loss summed over samples, lr "
            f"{config.dln_lr:g}, {config.dln_steps} steps, Glorot normal init, BN after every "
            "layer but the last",
        ],
        notes=[
            "CIFAR-10 and the paper's VGG cannot run here: a small CNN on Fashion-MNIST stands "
            "in. The deep linear network is the paper's setting"
            + (
                "."
                if (config.dln_depth, config.dln_steps, config.dln_lr) == (25, 10_000, 1e-6)
                else f", scaled to {config.dln_depth} layers and {config.dln_steps} steps."
            )
        ],
    )


def _plot(ctx: Context, jobs: dict) -> None:
    from batchnorm.lab.plots import new_figure

    figure, axes = new_figure(2, 2)
    for r, s in enumerate(SETTINGS):
        for v in NETS:
            job = jobs[s, v][0]
            l2 = np.array([p["l2"][1:] for p in job["probes"]])
            cos = np.array([p["cos"][1:] for p in job["probes"]])
            style = "-" if v == BN else "--"
            for layer in range(l2.shape[1]):
                label = v if layer == 0 else None
                alpha = 0.3 + 0.7 * (layer + 1) / l2.shape[1]
                axes[r, 0].plot(
                    job["steps"], l2[:, layer], style, color=COLORS[v], alpha=alpha, label=label
                )
                axes[r, 1].plot(
                    job["steps"], cos[:, layer], style, color=COLORS[v], alpha=alpha, label=label
                )
        axes[r, 0].set(xlabel="step", ylabel="||G - G'||", yscale="log", title=f"{s}: l2")
        axes[r, 1].set(xlabel="step", ylabel="cos(G, G')", title=f"{s}: cosine")
        for ax in axes[r]:
            ax.grid(alpha=0.3)
            ax.legend()
    ctx.save_figure(figure, "ics.png")


EXPERIMENT = Experiment(
    name="ics",
    title="Internal covariate shift, measured (Santurkar et al. 2018, Definition 2.1, Fig. 5)",
    claim=(
        "Measured as the change of a layer's gradient caused by the updates of the layers below "
        "(||G - G'||, cos(G, G')), internal covariate shift is not reduced by BN."
    ),
    paper=(
        "Santurkar et al. (2018), Sec. 2.2, Definition 2.1, Figure 5 (VGG, CIFAR-10) and the "
        "25-layer deep linear network. Stand-in for VGG: a small CNN on Fashion-MNIST."
    ),
    config_cls=Config,
    numbers_cls=Numbers,
    measure=measure,
    judge=judge,
    summary="||G - G'|| and cos(G, G') per layer with/without BN (CNN, deep linear net)",
)
