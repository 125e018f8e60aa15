"""Precise BN: population statistics recomputed after training (Algorithm 2) vs moving averages.

Claim (Ioffe & Szegedy 2015, Algorithm 2 and Sec. 3.1; Wu & Johnson 2021, "Rethinking 'Batch' in
BatchNorm", Sec. 3; SPEC.md 4.5): at inference batch norm should use population statistics
``E[x] = E_B[mu_B]``, ``Var[x] = m/(m-1) E_B[var_B]`` of the trained network. The usual moving
averages (EMA) only approximate them: they mix statistics of earlier, different weights, and
their momentum must suit the length of training. Recomputing the statistics with the final
weights ("precise BN", :func:`batchnorm.inference.recalibrate`) is never worse, and repairs a
badly chosen momentum. Wu & Johnson give no single number to compare; the report compares the
shape. Stand-in: the small CNN with BN on Fashion-MNIST, trained once per seed for every EMA
momentum in ``bn_momenta`` (the momentum of the moving averages does not change training, so
the networks of a seed end with identical weights, which the run checks), then evaluated with
its moving averages and after recalibration.

Rules (in code): (1) *repairs a bad momentum*: with ``bad_momentum``, precise BN's mean test
accuracy exceeds the moving averages' by at least ``min_gain``; (2) *never worse*: for every
momentum, precise BN's mean test accuracy is at least the moving averages' minus
``tolerance``; (3) *drift*: the moving averages drifted further from the population statistics
(largest mean shift over layers and channels, in population standard deviations) with
``bad_momentum`` than with ``good_momentum``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch

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
    CURVE_FIELDS,
    ConvConfig,
    NetJob,
    common_choices,
    evaluate,
    iid_batches,
    image_data,
    job_curve_rows,
    train_jobs,
)

__all__ = ["Config", "Numbers", "EXPERIMENT", "measure", "judge"]


@dataclass(frozen=True)
class Config(ConvConfig):
    """EMA momenta vs recalibrated statistics. Defaults are the full protocol (~3 min)."""

    bn_momenta: tuple[float, ...] = param(
        (0.1, 0.9, 0.001), "momenta of the moving averages (torch convention: weight of the new)"
    )
    good_momentum: float = param(0.1, "the well-chosen momentum (must be in bn_momenta)")
    bad_momentum: float = param(
        0.001, "the badly chosen momentum (must be in bn_momenta): far too slow for the run"
    )
    popstat_batches: int = param(200, "training mini-batches for the population statistics")
    min_gain: float = param(0.01, "rule (1): smallest accuracy gain of precise BN, bad momentum")
    tolerance: float = param(0.005, "rule (2): largest accuracy loss of precise BN allowed")

    def validate(self) -> None:
        super().validate()
        if any(not (0 < m <= 1) for m in self.bn_momenta):
            raise ValueError(f"bn_momenta must lie in (0, 1], got {self.bn_momenta}")
        for name in ("good_momentum", "bad_momentum"):
            if getattr(self, name) not in self.bn_momenta:
                raise ValueError(
                    f"{name} ({getattr(self, name)}) must be one of bn_momenta {self.bn_momenta}"
                )
        if self.good_momentum == self.bad_momentum:
            raise ValueError("good_momentum and bad_momentum must differ")
        if self.popstat_batches < 1:
            raise ValueError(f"popstat_batches must be >= 1, got {self.popstat_batches}")

    def quick(self) -> Config:
        """A smoke test: 2,000 images, 1 epoch, 2 seeds, 30 recalibration batches."""
        return replace(super().quick(), epochs=1.0, popstat_batches=30)


@dataclass
class Numbers:
    """What the claims are decided on, per seed, keyed by BN momentum."""

    good: float  # the config's good and bad momenta
    bad: float
    min_gain: float  # the config's least gain of "repairs a bad momentum"
    tolerance: float  # the config's allowance of "never worse"
    momenta: list[float]  # in the config's order
    ema: dict[float, list[float]]  # final test accuracy with the moving averages
    precise: dict[float, list[float]]  # ... with the population statistics (Algorithm 2)
    shift: dict[float, list[float]]  # largest mean shift, in population std units


def judge(numbers: Numbers, *, drift_margin: float = 0.0) -> list[Claim]:
    """Decide the claims from ``numbers`` alone (every comparison is of means over seeds).

    The config's margins are saved in the numbers: "repairs a bad momentum" holds when, at the
    bad momentum, precise BN gains at least ``min_gain`` (a tie holds); "never worse" when at
    every momentum precise BN is at least the moving averages minus ``tolerance`` (a tie holds).

    Args:
        numbers: what :func:`measure` measured.
        drift_margin: "drift" holds when the mean shift at the bad momentum is above that at the
            good one by more than this (a tie does not hold).
    """
    n = numbers
    momenta = n.momenta
    ema = {m: float(np.mean(n.ema[m])) for m in momenta}
    precise = {m: float(np.mean(n.precise[m])) for m in momenta}
    shift = {m: float(np.mean(n.shift[m])) for m in momenta}
    good, bad = n.good, n.bad
    worst_m = min(momenta, key=lambda m: precise[m] - ema[m])
    return [
        Claim(
            "repairs a bad momentum",
            "Recomputing the population statistics repairs a badly chosen moving-average momentum.",
            f"with momentum {bad:g}, precise BN's mean test accuracy exceeds the moving "
            f"averages' by at least {n.min_gain}",
            bool(precise[bad] - ema[bad] >= n.min_gain),
            f"{precise[bad]:.4f} (precise) vs {ema[bad]:.4f} (moving averages), "
            f"gain {precise[bad] - ema[bad]:+.4f}",
        ),
        Claim(
            "never worse",
            "Precise BN is never worse than the moving averages.",
            f"for every momentum, precise BN's mean test accuracy >= the moving averages' - "
            f"{n.tolerance}",
            bool(all(precise[m] >= ema[m] - n.tolerance for m in momenta)),
            f"smallest gain {precise[worst_m] - ema[worst_m]:+.4f} (momentum {worst_m:g})",
        ),
        Claim(
            "drift",
            "A badly chosen momentum leaves the moving averages far from the population "
            "statistics.",
            f"the largest mean shift (population std units) is larger with momentum {bad:g} than "
            f"with {good:g}" + (f" by more than {drift_margin}" if drift_margin else ""),
            bool(shift[bad] > shift[good] + drift_margin),
            f"{shift[bad]:.3f} (momentum {bad:g}) vs {shift[good]:.3f} (momentum {good:g})",
        ),
    ]


def measure(config: Config, ctx: Context) -> Measurement:
    """Train per seed and momentum, evaluate with EMA and with precise BN, measure."""
    from batchnorm.inference import recalibrate

    data = image_data(ctx, config)
    n = len(data.train_y)
    b = config.batch_size
    steps = config.steps_for(b, n)
    momenta = tuple(dict.fromkeys(config.bn_momenta))
    per: dict[float, list[dict]] = {m: [] for m in momenta}
    rows = []
    weight_gap = 0.0

    def finish(model: torch.nn.Module, result: dict, seed: int) -> dict:
        """Evaluate a trained network with its moving averages, then after recalibration."""
        ema_acc, _ = evaluate(model, data.test_x, data.test_y)
        order = np.random.default_rng(10_000 + seed).permutation(n)
        chunks = torch.from_numpy(order[: (n // b) * b]).split(b)
        report = recalibrate(
            model,
            (data.train_x[c] for c in chunks),
            num_batches=config.popstat_batches,
            progress=False,
        )
        precise_acc, _ = evaluate(model, data.test_x, data.test_y)
        layers = list(report.layers.values())
        return result | {
            "ema_acc": ema_acc,
            "precise_acc": precise_acc,
            "mean_shift": max(layer.mean_shift for layer in layers),
            "var_change": max(layer.var_change for layer in layers),
            "popstat_batches": report.num_batches,
            "weights": [p.detach().flatten().tolist() for p in model.parameters() if p.dim() > 1],
        }

    # One job per (momentum, seed), listed momentum by momentum so that the seeds of one
    # momentum form one block of a grouped network.
    jobs = [
        NetJob(
            key=f"bn-m{m:g}-s{seed}",
            norm="bn",
            seed=seed,
            batches=lambda seed=seed: iid_batches(n, b, seed),
            desc=f"BN momentum {m:g} seed {seed}",
            options={"momentum": m},
        )
        for m in momenta
        for seed in config.seed_list()
    ]
    with warnings.catch_warnings():
        # A large momentum is chosen on purpose here; the layer's warning about Keras-style
        # momenta does not apply.
        warnings.filterwarnings("ignore", message="momentum=", category=UserWarning)
        trained = train_jobs(
            ctx,
            config,
            data,
            jobs,
            steps=steps,
            lr=config.scaled_lr(b),
            finish=lambda job, model, result: finish(model, result, job.seed),
        )
    by_key = {job.key: result for job, result in zip(jobs, trained)}
    for seed in config.seed_list():
        reference: list[torch.Tensor] | None = None
        for m in momenta:
            result = dict(by_key[f"bn-m{m:g}-s{seed}"])
            weights = [torch.tensor(w) for w in result.pop("weights")]
            if reference is None:
                reference = weights
            else:
                weight_gap = max(
                    weight_gap,
                    max(
                        float((w - r).abs().max()) for w, r in zip(weights, reference, strict=True)
                    ),
                )
            per[m].append(result)
            rows += job_curve_rows(result, f"BN momentum {m:g}", seed, {"bn_momentum": m})
    ctx.write_csv("curves.csv", rows, [*CURVE_FIELDS, "bn_momentum"])

    def values(m: float, key: str) -> np.ndarray:
        return np.array([r[key] for r in per[m]], dtype=np.float64)

    ema = {m: float(np.mean(values(m, "ema_acc"))) for m in momenta}
    precise = {m: float(np.mean(values(m, "precise_acc"))) for m in momenta}
    shift = {m: float(np.mean(values(m, "mean_shift"))) for m in momenta}
    good, bad = config.good_momentum, config.bad_momentum
    numbers = Numbers(
        good=good,
        bad=bad,
        min_gain=config.min_gain,
        tolerance=config.tolerance,
        momenta=list(momenta),
        ema={m: values(m, "ema_acc").tolist() for m in momenta},
        precise={m: values(m, "precise_acc").tolist() for m in momenta},
        shift={m: values(m, "mean_shift").tolist() for m in momenta},
    )
    comparisons = [
        Comparison(
            f"test accuracy, moving averages / precise BN, momentum {m:g}",
            "precise BN >= EMA; the gap grows when the EMA is poorly tuned (Wu & Johnson 2021)",
            f"{ema[m]:.4f} / {precise[m]:.4f}",
            value=precise[m] - ema[m],
        )
        for m in momenta
    ]
    table = md_table(
        [
            "momentum",
            "test acc, moving averages",
            "test acc, precise BN",
            "max mean shift (std)",
            "max rel. var error",
        ],
        [
            [
                f"{m:g}",
                fmt_mean_std(values(m, "ema_acc")),
                fmt_mean_std(values(m, "precise_acc")),
                fmt_mean_std(values(m, "mean_shift"), 3),
                fmt_mean_std(values(m, "var_change"), 3),
            ]
            for m in momenta
        ],
    )
    with ctx.timer("plots"):
        _plot(ctx, momenta, ema, precise, shift)
    return Measurement(
        numbers=numbers,
        comparisons=comparisons,
        metrics={
            "bn_momenta": momenta,
            "ema_acc": {f"{m:g}": values(m, "ema_acc") for m in momenta},
            "precise_acc": {f"{m:g}": values(m, "precise_acc") for m in momenta},
            "mean_shift": {f"{m:g}": values(m, "mean_shift") for m in momenta},
            "var_change": {f"{m:g}": values(m, "var_change") for m in momenta},
            "max_weight_difference_across_momenta": weight_gap,
            "steps": steps,
        },
        tables=[("Moving averages vs precise BN (mean ± std over seeds)", table)],
        figures=[("precise_bn.png", "Test accuracy and drift of the moving averages by momentum")],
        choices=[
            *common_choices(config),
            f"precise BN: batchnorm.inference.recalibrate over {config.popstat_batches} training "
            f"mini-batches of {b} (a fixed shuffle), after the last step; drift: the "
            "recalibration report's mean_shift = max_c |EMA mean - population mean| / "
            "sqrt(population var + eps) and var_change (relative error of the variance), the "
            "largest over the layers",
            f"{steps} training steps; intermediate evaluations (curves.csv) use the moving "
            "averages",
        ],
        notes=[
            "The networks of a seed trained with different moving-average momenta end with "
            f"weights that differ by at most {weight_gap:.3g} (0 expected: the momentum only "
            "changes the buffers)."
            + ("" if math.isfinite(weight_gap) and weight_gap < 1e-5 else " (NOT zero: check!)"),
        ],
    )


def _plot(ctx: Context, momenta, ema, precise, shift) -> None:
    from batchnorm.lab.plots import new_figure

    figure, axes = new_figure(2, 1, size=(4.6, 3.4))
    x = np.arange(len(momenta))
    axes[0, 0].bar(x - 0.2, [ema[m] for m in momenta], 0.4, label="moving averages")
    axes[0, 0].bar(x + 0.2, [precise[m] for m in momenta], 0.4, label="precise BN")
    axes[0, 0].set_xticks(x, [f"{m:g}" for m in momenta])
    axes[0, 0].set(xlabel="EMA momentum", ylabel="test accuracy", ylim=(0, 1))
    axes[0, 0].legend(fontsize=8)
    axes[0, 1].bar(x, [shift[m] for m in momenta], color="tab:red")
    axes[0, 1].set_xticks(x, [f"{m:g}" for m in momenta])
    axes[0, 1].set(xlabel="EMA momentum", ylabel="max mean shift (population std)")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    ctx.save_figure(figure, "precise_bn.png")


EXPERIMENT = Experiment(
    name="precise-bn",
    title="Precise BN (Algorithm 2 population statistics) vs moving averages",
    claim=(
        "Population statistics recomputed with the final weights are never worse than the moving "
        "averages and repair a badly chosen momentum."
    ),
    paper=(
        "Ioffe & Szegedy (2015), Algorithm 2; Wu & Johnson (2021), 'Rethinking Batch in "
        "BatchNorm', Sec. 3 (precise BN). Stand-in: a small CNN on Fashion-MNIST."
    ),
    config_cls=Config,
    numbers_cls=Numbers,
    measure=measure,
    judge=judge,
    summary="recalibrated population statistics vs EMA (incl. a bad momentum)",
)
