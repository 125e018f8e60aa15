"""Internal covariate shift, measured: batch norm does not reduce it.

Claim (Santurkar, Tsipras, Ilyas, Madry 2018, arXiv 1805.11604, Sec. 2.2, Definition 2.1,
**Figure 5**: VGG and a 25-layer deep linear network (DLN)): measured as an optimization
quantity, internal covariate shift is not reduced by BN; in the DLN, BN increases it markedly
(there the standard network's G and G' nearly coincide, while with BN they are almost
uncorrelated). For layer i at step t, G = grad_(W_i) L at the current weights and G' = the same
gradient, on the same batch, after layers 1..i-1 took their step-t update; reported are
||G - G'||_2 and cos(G, G') (:func:`batchnorm.lab.theory.covariate_shift.internal_covariate_shift`;
a layer's group is its weights and bias with the BN gamma and beta that follow).

Two settings, each with and without BN, paired (same initial weights and batches, per seed):

- the small VGG-style CNN of :mod:`batchnorm.lab.experiments.cnn` on a Fashion-MNIST subset
  (the paper: VGG on CIFAR-10, not available here), SGD at ``lr``, probed every ``probe_every``
  steps before that step's update;
- the DLN of :mod:`batchnorm.lab.theory.deep_linear` at the paper's settings (25 layers of
  10 x 10, 1000 Gaussian samples, full-batch GD, lr 1e-6, 10k steps, Glorot), probed every
  ``dln_probe_every`` steps, over ``dln_seeds`` seeds (problem and initialization).

Scale-free measures. ||G - G'|| grows with ||G||, and the gradient norms of the two networks
differ by orders of magnitude (BN rescales every layer's gradient), so the raw difference,
pooled across layers, says more about gradient scale than about shift. Each layer is compared
on its own, with the relative shift ``||G - G'|| / ||G||`` and ``cos(G, G')``: per seed and
layer, the median over the probed steps.

Rules (in code), per setting, layer by layer (layers 2..k: layer 1 has no layer below, G' = G),
each difference paired by seed with a margin of ``spread_factor`` standard errors of the
per-seed differences (at least ``min_tolerance``, :func:`batchnorm.lab.rules.paired_tolerance`):
(1) "<setting>-relative": at no layer is BN's relative shift below the standard network's by
more than the margin;
(2) "<setting>-cosine": at no layer is BN's cos(G, G') above the standard network's by more
than the margin;
(3) "dln-increases": in the DLN, BN's relative shift is above the standard network's by more
than the margin, and its cosine below by more than the margin, at a majority of layers.
The CNN claims need both CNNs trained (training accuracy >= ``train_floor``), the DLN claims
both DLNs trained (final loss <= ``max_loss_ratio`` x initial loss); else "not tested".
"""

from __future__ import annotations

import math
import warnings
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
from batchnorm.lab.progress import log
from batchnorm.lab.rules import (
    baseline_metrics,
    beyond_tolerance,
    not_tested,
    paired_tolerance,
    untrained,
)

__all__ = ["Config", "Numbers", "EXPERIMENT", "measure", "judge"]

CNN = "CNN"


def dln_setting(lr: float) -> str:
    """The name of the deep-linear setting at GD step ``lr``.

    >>> dln_setting(1e-6)
    'deep linear, lr 1e-06'
    """
    return f"deep linear, lr {lr:g}"


NETS = (STANDARD, BN)


@dataclass(frozen=True)
class Config(CNNConfig):
    """Covariate shift per layer with and without BN. Defaults are the full protocol."""

    steps: int = param(2500, "SGD steps per CNN")
    seeds: int = param(3, "CNN seeds (each: initial weights, data order)")
    probe_every: int = param(250, "measure the CNN's covariate shift every this many steps")
    dln_depth: int = param(25, "layers of the deep linear network (the paper: 25)")
    dln_dim: int = param(10, "width of its square layers (the paper: 10)")
    dln_samples: int = param(1000, "Gaussian samples (the paper: 1000)")
    dln_lrs: tuple[float, ...] = param(
        (1e-6, 1e-7), "its full-batch GD steps, loss summed over samples (paper: 1e-6, 1e-7)"
    )
    dln_steps: int = param(10_000, "its GD steps (the paper: 10k)")
    dln_probe_every: int = param(1000, "measure its covariate shift every this many steps")
    dln_seeds: int = param(3, "seeds of the deep linear network (problem and initialization)")

    def validate(self) -> None:
        super().validate()
        for name in ("probe_every", "dln_depth", "dln_dim", "dln_steps", "dln_probe_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.dln_depth < 2:
            raise ValueError("dln_depth must be at least 2 (layer 1 has no shift)")
        if self.dln_samples < 2 or self.dln_seeds < 1:
            raise ValueError("dln_samples must be at least 2 and dln_seeds at least 1")
        if not self.dln_lrs or not all(math.isfinite(lr) and lr > 0 for lr in self.dln_lrs):
            raise ValueError(f"dln_lrs must list positive learning rates, got {self.dln_lrs}")

    def quick(self) -> Config:
        """A smoke test: 200 CNN steps, 1 seed, 1000 deep-linear steps, 1 DLN seed."""
        return replace(
            super().quick(),
            probe_every=50,
            dln_steps=1000,
            dln_probe_every=250,
            dln_seeds=1,
            eval_examples=1000,
        )


def _shift_rows(shifts) -> dict:
    return {
        "l2": [s.l2_difference for s in shifts],
        "cos": [s.cosine for s in shifts],
        "grad_norm": [s.grad_norm for s in shifts],
    }


def _cnn_job(
    config: Config, data, variant: str, seed: int, key: str, checkpoint: Path | None = None
) -> dict:
    from batchnorm.lab.theory.covariate_shift import internal_covariate_shift

    model = VGGStyle.for_config(config, data, variant, seed)
    groups = model.layer_groups()

    def probe(loss_fn, step: int) -> dict:
        return _shift_rows(internal_covariate_shift(groups, loss_fn, config.lr, module=model))

    return probed_job(model, data, config, seed=seed, probe=probe, desc=key, checkpoint=checkpoint)


def _dln_job(
    config: Config, batch_norm: bool, lr: float, seed: int, checkpoint: Path | None = None
) -> dict:
    import time

    from batchnorm.lab.theory.deep_linear import make_problem, train_deep_linear

    start = time.perf_counter()
    problem = make_problem(config.dln_dim, config.dln_samples, seed)
    result = train_deep_linear(
        problem,
        depth=config.dln_depth,
        batch_norm=batch_norm,
        lr=lr,
        steps=config.dln_steps,
        seed=seed,
        shift_every=config.dln_probe_every,
        checkpoint=checkpoint,
        desc=f"deep linear, {'BN' if batch_norm else 'standard'}, lr {lr:g}, seed {seed}",
    )
    every = max(1, config.dln_steps // 200)
    return {
        "steps": list(result.shift_steps),
        "probes": [_shift_rows(s) for s in result.shifts],
        "loss_steps": list(range(0, config.dln_steps + 1, every)),
        "losses": result.losses[::every].tolist(),
        "initial_loss": float(result.losses[0]),
        "final_loss": float(result.losses[-1]),
        "seconds": time.perf_counter() - start,
    }


def _nan_back(value):
    """``value`` with every None (how JSON stored a NaN) turned back into NaN."""
    if value is None:
        return math.nan
    if isinstance(value, dict):
        return {k: _nan_back(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_back(v) for v in value]
    return value


def per_layer_medians(jobs: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per seed (one job each) and layer 2..k, the median over the probed steps of the relative
    shift ||G - G'|| / ||G||, of cos(G, G') and of ||G - G'||; each (seeds, layers - 1)."""

    def median(key: str, relative: bool = False) -> np.ndarray:
        out = []
        for job in jobs:
            rows = []
            for p in job["probes"]:
                a = np.asarray(p[key][1:], dtype=np.float64)
                if relative:
                    g = np.asarray(p["grad_norm"][1:], dtype=np.float64)
                    a = np.where(g > 0, a / np.where(g > 0, g, 1.0), np.nan)
                rows.append(a)
            rows_array = np.asarray(rows, dtype=np.float64)  # (T, layers - 1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN layer stays NaN
                out.append(np.nanmedian(rows_array, axis=0))
        return np.asarray(out, dtype=np.float64)

    return median("l2", relative=True), median("cos"), median("l2")


@dataclass
class Numbers:
    """What the claims are decided on, keyed by setting (the CNN, the deep linear network at
    each learning rate), then network (standard, BN): per seed, per layer 2..k, the median over
    the probed steps."""

    settings: list[str]  # CNN first, then one deep-linear setting per learning rate
    relative: dict[str, dict[str, list[list[float]]]]  # ||G - G'|| / ||G||, [seed][layer]
    cos: dict[str, dict[str, list[list[float]]]]  # cos(G, G'), [seed][layer]
    cnn_train: dict[str, list[float]]  # the CNNs' final training accuracy per seed
    dln_loss_ratio: dict[str, dict[str, list[float]]]  # per DLN setting: final / initial loss


def _layer_tests(
    bn: np.ndarray, standard: np.ndarray, kw: dict
) -> tuple[list[bool], list[bool], np.ndarray, np.ndarray]:
    """Per layer: is BN's value above the standard network's beyond the margin, below it
    beyond the margin; the mean paired difference (BN - standard) and its margin."""
    above, below, mean, margin = [], [], [], []
    for layer in range(bn.shape[1]):
        d = bn[:, layer] - standard[:, layer]
        above.append(bool(np.isfinite(d).any() and beyond_tolerance(d, **kw)))
        below.append(bool(np.isfinite(d).any() and beyond_tolerance(-d, **kw)))
        finite = d[np.isfinite(d)]
        mean.append(float(finite.mean()) if finite.size else math.nan)
        margin.append(paired_tolerance(d, **kw))
    return above, below, np.asarray(mean), np.asarray(margin)


def _layers(flags: list[bool]) -> str:
    chosen = [str(i + 2) for i, f in enumerate(flags) if f]
    return ", ".join(chosen) if chosen else "none"


def judge(
    numbers: Numbers,
    *,
    spread_factor: float = 2.0,
    min_tolerance: float = 0.0005,
    train_floor: float = 0.5,
    max_loss_ratio: float = 0.5,
) -> list[Claim]:
    """Decide the claims from ``numbers`` alone (rules in the module docstring).

    Args:
        numbers: what :func:`measure` measured.
        spread_factor, min_tolerance: the margin of :func:`batchnorm.lab.rules.paired_tolerance`
            on the per-seed differences BN - standard of one layer.
        train_floor: a CNN whose mean final training accuracy is below this did not train.
        max_loss_ratio: a DLN whose mean final / initial loss is above this did not train.
    """
    n = numbers
    kw = {"spread_factor": spread_factor, "min_tolerance": min_tolerance}
    margin = (
        f"{spread_factor:g} standard errors of the per-seed differences (at least "
        f"{min_tolerance:g})"
    )
    dln_settings = [s for s in n.settings if s != CNN]

    def dln_reason(s: str) -> str | None:
        ratio = {v: float(np.nanmean(n.dln_loss_ratio[s][v])) for v in NETS}
        if all(r <= max_loss_ratio for r in ratio.values()):
            return None
        return (
            ", ".join(f"{v} final/initial loss {r:.3g}" for v, r in ratio.items())
            + f" (a trained DLN reaches <= {max_loss_ratio:g})"
        )

    reasons = {CNN: untrained(n.cnn_train, train_floor)} | {s: dln_reason(s) for s in dln_settings}

    def values(what: str, s: str, v: str) -> np.ndarray:
        """(seeds, layers) of ``what``; the seeds of a diverged DLN (non-finite loss) are nan:
        their probes before the divergence say nothing about a trained network."""
        x = np.asarray(getattr(n, what)[s][v], dtype=np.float64).copy()
        if s != CNN:
            x[~np.isfinite(np.asarray(n.dln_loss_ratio[s][v], dtype=np.float64))] = np.nan
        return x

    arrays = {
        (what, s, v): values(what, s, v)
        for what in ("relative", "cos")
        for s in n.settings
        for v in NETS
    }
    tests = {
        (what, s): _layer_tests(arrays[what, s, BN], arrays[what, s, STANDARD], kw)
        for what in ("relative", "cos")
        for s in n.settings
    }

    def summary(what: str, s: str) -> str:
        above, below, mean, _ = tests[what, s]
        bn = np.nanmean(arrays[what, s, BN], axis=0)
        st = np.nanmean(arrays[what, s, STANDARD], axis=0)
        per_layer = ", ".join(
            f"{i + 2}: {a:.3g}/{b:.3g}" for i, (a, b) in enumerate(zip(st.tolist(), bn.tolist()))
        )
        return (
            f"BN higher beyond the margin at layers {_layers(above)}; lower at layers "
            f"{_layers(below)} (of 2..{len(above) + 1}); per layer standard/BN: {per_layer}"
        )

    def diverged(s: str) -> str:
        """Which networks of setting ``s`` diverged (a non-finite loss) in how many seeds:
        their seeds drop out of the paired differences."""
        if s == CNN:
            return ""
        counts = {
            v: int((~np.isfinite(np.asarray(n.dln_loss_ratio[s][v], dtype=np.float64))).sum())
            for v in NETS
        }
        lost = [
            f"{v} diverged in {k} of {len(n.dln_loss_ratio[s][v])} seeds"
            for v, k in counts.items()
            if k
        ]
        return f" ({'; '.join(lost)}: left out)" if lost else ""

    def decide(name: str, statement: str, rule: str, settings: list[str], held_at) -> Claim:
        """The claim over ``settings``: it holds when ``held_at(s)`` (held, evidence) holds at
        every setting whose networks trained; not tested when none did."""
        parts, tested = [], []
        for s in settings:
            held, evidence = held_at(s)
            evidence += diverged(s)
            if reasons[s] is None:
                tested.append(held)
                parts.append(f"{s}: {evidence}")
            else:
                parts.append(f"{s}: not tested ({reasons[s]}); {evidence}")
        evidence = " || ".join(parts)
        if not tested:
            return not_tested(name, statement, rule, evidence)
        return Claim(name, statement, rule, all(tested), evidence)

    claims = []
    for prefix, settings, where in (
        ("cnn", [CNN], "the CNN"),
        ("dln", dln_settings, "the deep linear network (at every learning rate)"),
    ):
        claims.append(
            decide(
                f"{prefix}-relative",
                f"In {where}, BN does not reduce internal covariate shift measured as "
                "||G - G'|| / ||G||.",
                "at no layer 2..k is BN's median ||G - G'|| / ||G|| below the standard "
                f"network's by more than {margin}",
                settings,
                lambda s: (not any(tests["relative", s][1]), summary("relative", s)),
            )
        )
        claims.append(
            decide(
                f"{prefix}-cosine",
                f"In {where}, BN does not make G' better aligned with G.",
                "at no layer 2..k is BN's median cos(G, G') above the standard network's by "
                f"more than {margin}",
                settings,
                lambda s: (not any(tests["cos", s][0]), summary("cos", s)),
            )
        )

    def increases(s: str) -> tuple[bool, str]:
        rel_above, cos_below = tests["relative", s][0], tests["cos", s][1]
        layers = len(rel_above)
        return (
            sum(rel_above) > layers / 2 and sum(cos_below) > layers / 2,
            f"relative shift higher with BN at {sum(rel_above)} of {layers} layers, cosine "
            f"lower at {sum(cos_below)} of {layers}",
        )

    claims.append(
        decide(
            "dln-increases",
            "In the deep linear network, BN increases internal covariate shift.",
            "at every learning rate, at a majority of layers 2..k BN's median ||G - G'|| / ||G||"
            " is above the standard network's, and at a majority its median cos(G, G') is "
            f"below, each by more than {margin}",
            dln_settings,
            increases,
        )
    )
    return claims


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
                    lambda v=variant, s=seed: _cnn_job(
                        config,
                        data,
                        v,
                        s,
                        f"CNN {v} seed {s}",
                        ctx.checkpoint(f"cnn-{v}-seed{s}"),
                    ),
                    as_json=True,
                )
                for seed in config.seed_list()
            ]
    dln_lrs = sorted(set(config.dln_lrs), reverse=True)
    settings = [CNN] + [dln_setting(lr) for lr in dln_lrs]
    with ctx.timer("deep linear"):
        for lr in dln_lrs:
            for variant in NETS:
                runs = []
                for seed in range(config.seed, config.seed + config.dln_seeds):
                    log(
                        f"[lab] deep linear network, {variant}, lr {lr:g}, seed {seed}: "
                        f"{config.dln_steps} steps"
                    )
                    key = f"dln-{variant}-lr{lr:g}-seed{seed}"
                    runs.append(
                        cached_job(
                            ctx,
                            key,
                            lambda v=variant, s=seed, lr=lr, key=key: _dln_job(
                                config, v == BN, lr, s, ctx.checkpoint(key)
                            ),
                            as_json=True,
                        )
                    )
                jobs[dln_setting(lr), variant] = runs
    # A saved job holds None where a diverged network's numbers were NaN (JSON has no NaN).
    jobs = {key: [_nan_back(job) for job in runs] for key, runs in jobs.items()}
    med = {key: per_layer_medians(runs) for key, runs in jobs.items()}
    cnn_train = {v: [j["final_train_acc"] for j in jobs[CNN, v]] for v in NETS}
    cnn_test = {v: [j["final_test_acc"] for j in jobs[CNN, v]] for v in NETS}
    numbers = Numbers(
        settings=settings,
        relative={s: {v: med[s, v][0].tolist() for v in NETS} for s in settings},
        cos={s: {v: med[s, v][1].tolist() for v in NETS} for s in settings},
        cnn_train=cnn_train,
        dln_loss_ratio={
            s: {v: [j["final_loss"] / j["initial_loss"] for j in jobs[s, v]] for v in NETS}
            for s in settings[1:]
        },
    )

    def layer_means(s: str, v: str, which: int) -> np.ndarray:
        return np.nanmean(med[s, v][which], axis=0)  # mean over seeds, per layer 2..k

    def overall(s: str, v: str, which: int) -> float:
        return float(np.nanmedian(layer_means(s, v, which)))

    comparisons = [
        Comparison(
            f"{s}: median over layers of ||G - G'|| / ||G|| and cos(G, G'), without BN -> with BN",
            "VGG (Fig. 5): with BN the shift is similar or larger, the cosine similar or smaller"
            if s == CNN
            else "DLN (Fig. 5): BN increases the shift; without BN G and G' nearly coincide, "
            "with BN they are almost uncorrelated",
            f"{overall(s, STANDARD, 0):.4g} / {overall(s, STANDARD, 1):.4f} -> "
            f"{overall(s, BN, 0):.4g} / {overall(s, BN, 1):.4f}",
            overall(s, BN, 0),
        )
        for s in settings
    ]
    comparisons += [
        Comparison(
            "final train / test accuracy of the CNN: without BN; with BN",
            "VGG: 80% / 83% test",
            f"{fmt_mean_std(cnn_train[STANDARD])} / {fmt_mean_std(cnn_test[STANDARD])}; "
            f"{fmt_mean_std(cnn_train[BN])} / {fmt_mean_std(cnn_test[BN])}",
        ),
    ]
    comparisons += [
        Comparison(
            f"{s}, final / initial loss: without / with BN",
            "both decrease",
            f"{fmt_mean_std(numbers.dln_loss_ratio[s][STANDARD])} / "
            f"{fmt_mean_std(numbers.dln_loss_ratio[s][BN])}",
        )
        for s in settings[1:]
    ]
    rows = []
    for s in settings:
        for v in NETS:
            relative, cosine, raw = (layer_means(s, v, k) for k in range(3))
            for layer in range(len(relative)):
                rows.append(
                    [
                        s,
                        v,
                        str(layer + 2),
                        f"{relative[layer]:.4g}",
                        f"{cosine[layer]:.4f}",
                        f"{raw[layer]:.4g}",
                    ]
                )
    table = md_table(
        [
            "setting",
            "network",
            "layer",
            "median ||G - G'|| / ||G||",
            "median cos(G, G')",
            "median ||G - G'|| (raw, outside the rules)",
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
        _plot(ctx, jobs, settings)
    return Measurement(
        numbers=numbers,
        comparisons=comparisons,
        metrics={
            **baseline_metrics(cnn_train[BN], cnn_test[BN]),
            "baseline": "the CNN with BN",
            "cnn_final_train_acc": cnn_train,
            "cnn_final_test_acc": cnn_test,
            "per_layer_relative": {f"{s}|{v}": layer_means(s, v, 0) for s, v in med},
            "per_layer_cos": {f"{s}|{v}": layer_means(s, v, 1) for s, v in med},
            "per_layer_l2": {f"{s}|{v}": layer_means(s, v, 2) for s, v in med},
            "jobs": {f"{s}|{v}": runs for (s, v), runs in jobs.items()},
        },
        tables=[("Covariate shift per layer (median over probed steps, mean over seeds)", table)],
        figures=[
            ("ics.png", "||G - G'|| / ||G|| and cos(G, G') over training, per layer (first seed)"),
        ],
        choices=[
            "CNN " + network_choice(config),
            f"CNN: conv init {config.init} (kaiming: He et al. 2015); SGD lr {config.lr}, "
            f"batch {config.batch_size}, {config.steps} steps, {config.seeds} seeds, "
            f"{data.description}",
            "CNN " + curve_choice(config, data),
            "measures: per layer, ||G - G'|| / ||G|| and cos(G, G') (scale-free: the two "
            "networks' gradient norms differ by orders of magnitude), median over the probed "
            "steps per seed, compared layer by layer and paired by seed",
            "a CNN layer's group: conv weight and bias with the BN gamma and beta after it; the "
            "classifier is the last layer",
            "the probe runs on the step's own batch, before its update, with the step's lr; BN "
            "in training mode (batch statistics); the probe leaves weights and running "
            "statistics untouched",
            f"deep linear network: {config.dln_depth} layers of {config.dln_dim} x "
            f"{config.dln_dim}, {config.dln_samples} samples, loss summed over samples, lr "
            f"{' and '.join(f'{lr:g}' for lr in dln_lrs)}, {config.dln_steps} steps, Glorot "
            "normal init, BN after every "
            f"layer but the last; {config.dln_seeds} seeds (problem and initialization), probed "
            f"every {config.dln_probe_every} steps",
        ],
        notes=[
            "CIFAR-10 and the paper's VGG cannot run here: a small CNN on Fashion-MNIST stands "
            "in. The deep linear network is the paper's setting"
            + (
                "."
                if (config.dln_depth, config.dln_steps) == (25, 10_000)
                else f", scaled to {config.dln_depth} layers and {config.dln_steps} steps."
            )
        ],
    )


def _plot(ctx: Context, jobs: dict, settings: list[str]) -> None:
    from batchnorm.lab.plots import new_figure

    figure, axes = new_figure(2, len(settings))
    for r, s in enumerate(settings):
        for v in NETS:
            job = jobs[s, v][0]
            l2 = np.array(
                [
                    np.divide(p["l2"][1:], np.maximum(p["grad_norm"][1:], 1e-300))
                    for p in job["probes"]
                ]
            )
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
        axes[r, 0].set(
            xlabel="step", ylabel="||G - G'|| / ||G||", yscale="log", title=f"{s}: relative shift"
        )
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
