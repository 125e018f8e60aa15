"""Precise BN: population statistics recomputed (Algorithm 2) vs moving averages during training.

Claim (Ioffe & Szegedy 2015, Algorithm 2 and Sec. 3.1; Wu & Johnson 2021, "Rethinking 'Batch' in
BatchNorm", arXiv 2105.07576, Sec. 3.1 and Fig. 2; SPEC.md 4.5): at inference batch norm should
use population statistics ``E[x] = E_B[mu_B]``, ``Var[x] = m/(m-1) E_B[var_B]`` of the network
as it is. The usual exponential moving averages (EMA) only approximate them: they mix statistics
of earlier weights, so they lag behind a network that changes quickly, which happens at a high
learning rate and before the learning rate has decayed. Recomputing the statistics with the
current weights ("precise BN", :func:`batchnorm.inference.recalibrate`) then evaluates the
network better; once the learning rate has decayed the weights barely move and the two agree.
Wu & Johnson's Fig. 2 shows this on ImageNet (ResNet-50, a large batch): the EMA's validation
accuracy is lower and unstable during training, precise BN's is not, and they meet at the end.

Stand-in: the small CNN with BN on Fashion-MNIST, the EMA at PyTorch's default momentum 0.1
(weight of the new batch), trained at a base and a high learning rate, each with a constant
learning rate and with a cosine decay to 0; at each of ``evals`` points of training the network
is evaluated with its moving averages and, on a copy, with population statistics recomputed over
``popstat_batches`` training mini-batches.

Rules (in code; every difference is precise minus EMA test accuracy, paired by seed, against
:func:`~batchnorm.lab.rules.paired_tolerance`): (1) *lags at a high learning rate*: at the high
constant learning rate, the difference averaged over the evaluation points exceeds its margin;
(2) *most at a high learning rate*: that average is larger at the high than at the base constant
learning rate, beyond the margin; (3) *decay closes the gap*: at the end of the high learning
rate with decay, the difference is within its margin. A claim about networks whose final train
accuracy (population statistics) is below ``train_floor`` is "not tested".
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

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
    FlatConvConfig,
    common_choices,
    config_net,
    eval_steps,
    evaluate,
    iid_batches,
    image_data,
    train_job,
)
from batchnorm.lab.loop import ModelTask, run_loop
from batchnorm.lab.rules import (
    baseline_metrics,
    beyond_tolerance,
    gate,
    paired_tolerance,
    untrained,
    within_tolerance,
)
from batchnorm.lab.samplers import recalibration_batches

__all__ = ["Config", "Numbers", "EXPERIMENT", "measure", "judge", "ARMS", "lr_at"]

SCHEDULES = ("constant", "cosine")
# (learning rate, schedule) of each arm: "base" is the config's lr, "high" lr * high_factor.
ARMS = {
    "base, constant": ("base", "constant"),
    "base, cosine": ("base", "cosine"),
    "high, constant": ("high", "constant"),
    "high, cosine": ("high", "cosine"),
}
BASELINE = "base, cosine"


def lr_at(step: int, steps: int, lr: float, schedule: str) -> float:
    """The learning rate of ``step`` (1-based) of ``steps``: constant, or a cosine decay from
    ``lr`` to 0 at the last step.

    >>> lr_at(1, 100, 0.1, "cosine"), lr_at(100, 100, 0.1, "cosine"), lr_at(7, 100, 0.1, "constant")
    (0.1, 0.0, 0.1)
    """
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / max(steps - 1, 1)))
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


@dataclass(frozen=True)
class Config(FlatConvConfig):
    """EMA vs precise BN during training, by learning rate and schedule (full protocol)."""

    channels: tuple[int, ...] = param(
        (8, 16, 32), "widths of the conv layers (each: conv3x3, BN, ReLU, max pool)"
    )
    train_subset: int | None = param(20_000, "training examples used (none = all)")
    batch_size: int = param(64, "examples per mini-batch")
    epochs: float = param(4.0, "passes over the training subset")
    lr: float = param(
        0.025,
        "base SGD learning rate at batch 32 (scaled linearly with the batch; at 0.05 the flatten "
        "head did not train at the high rate, 0.4)",
    )
    high_factor: float = param(4.0, "the high learning rate is lr times this")
    bn_momentum: float = param(0.1, "EMA momentum (torch convention: weight of the new batch)")
    evals: int = param(8, "evaluation points, evenly spaced over training")
    test_subset: int | None = param(None, "test images used (none = all)")
    popstat_batches: int = param(100, "training mini-batches for the population statistics")
    seeds: int = param(3, "number of seeds (each: initial weights and data order)")
    train_floor: float = param(0.7, "final train accuracy below which a network did not train")

    def validate(self) -> None:
        super().validate()
        if not (0 < self.bn_momentum <= 1):
            raise ValueError(f"bn_momentum must lie in (0, 1], got {self.bn_momentum}")
        if not (math.isfinite(self.high_factor) and self.high_factor > 1):
            raise ValueError(f"high_factor must be a number > 1, got {self.high_factor}")
        if self.popstat_batches < 1:
            raise ValueError(f"popstat_batches must be >= 1, got {self.popstat_batches}")
        if not 0 < self.train_floor < 1:
            raise ValueError(f"train_floor must lie in (0, 1), got {self.train_floor}")

    def quick(self) -> Config:
        """A smoke test: 2,000 training and 500 test images, 1 epoch, 2 evaluations, 2 seeds."""
        return replace(
            super().quick(),
            epochs=1.0,
            evals=2,
            seeds=2,
            popstat_batches=10,
            channels=(8, 16),
            test_subset=500,
        )

    def lr_of(self, which: str) -> float:
        """The learning rate of an arm ("base" or "high"), scaled to the batch size."""
        return self.scaled_lr(self.batch_size) * (self.high_factor if which == "high" else 1.0)


@dataclass
class Numbers:
    """What the claims are decided on: per arm (see :data:`ARMS`), per seed, per evaluation."""

    steps: list[int]  # the evaluation points
    lrs: dict[str, float]  # "base", "high": the peak learning rates
    train_floor: float  # the config's train accuracy below which a network did not train
    ema: dict[str, list[list[float]]]  # test accuracy with the moving averages, [seed][eval]
    precise: dict[str, list[list[float]]]  # ... with population statistics, [seed][eval]
    train: dict[str, list[float]]  # final train accuracy (population statistics), per seed

    def gaps(self, arm: str) -> np.ndarray:
        """Precise minus EMA test accuracy, (seeds, evaluations)."""
        return np.asarray(self.precise[arm], dtype=np.float64) - np.asarray(
            self.ema[arm], dtype=np.float64
        )


def judge(
    numbers: Numbers, *, spread_factor: float = 2.0, min_tolerance: float = 0.002
) -> list[Claim]:
    """Decide the claims from ``numbers`` alone (differences paired by seed).

    Args:
        numbers: what :func:`measure` measured.
        spread_factor, min_tolerance: the margin of :func:`~batchnorm.lab.rules.paired_tolerance`
            (0.002: 10 of the 5,000 test images).
    """
    n = numbers
    margin = {"spread_factor": spread_factor, "min_tolerance": min_tolerance}

    def tol(d: np.ndarray) -> float:
        return paired_tolerance(d, **margin)

    def reason(*arms: str) -> str | None:
        return untrained({f"{a} (train accuracy)": n.train[a] for a in arms}, floor=n.train_floor)

    high_avg = n.gaps("high, constant").mean(axis=1)  # per seed, over the evaluations
    base_avg = n.gaps("base, constant").mean(axis=1)
    more = high_avg - base_avg
    decayed_end = n.gaps("high, cosine")[:, -1]
    constant_end = n.gaps("high, constant")[:, -1]
    hi, lo = n.lrs["high"], n.lrs["base"]
    return [
        gate(
            Claim(
                "lags at a high learning rate",
                "At a high constant learning rate the moving averages lag behind the weights: "
                "precise BN evaluates the network better during training.",
                f"at lr {hi:g} constant, precise minus EMA test accuracy averaged over the "
                f"{len(n.steps)} evaluations, paired by seed, above {spread_factor:g} standard "
                f"errors (at least {min_tolerance:g})",
                beyond_tolerance(high_avg, **margin),
                f"mean gain {high_avg.mean():+.4f} (tolerance {tol(high_avg):.4f}); by "
                "evaluation: "
                + ", ".join(
                    f"{s}: {g:+.3f}" for s, g in zip(n.steps, n.gaps("high, constant").mean(axis=0))
                ),
            ),
            reason("high, constant"),
        ),
        gate(
            Claim(
                "most at a high learning rate",
                "The moving averages lag more at a high learning rate than at a lower one.",
                f"the averaged gain at lr {hi:g} minus that at lr {lo:g} (both constant), paired "
                f"by seed, above {spread_factor:g} standard errors (at least {min_tolerance:g})",
                beyond_tolerance(more, **margin),
                f"{high_avg.mean():+.4f} (lr {hi:g}) vs {base_avg.mean():+.4f} (lr {lo:g}): "
                f"{more.mean():+.4f} (tolerance {tol(more):.4f})",
            ),
            reason("high, constant", "base, constant"),
        ),
        gate(
            Claim(
                "decay closes the gap",
                "Once the learning rate has decayed, the moving averages agree with the "
                "population statistics.",
                f"at the end of lr {hi:g} with cosine decay, |precise minus EMA| paired by seed "
                f"within {spread_factor:g} standard errors (at least {min_tolerance:g})",
                within_tolerance(decayed_end, **margin),
                f"end gain with decay {decayed_end.mean():+.4f} (tolerance "
                f"{tol(decayed_end):.4f}); without decay {constant_end.mean():+.4f}",
            ),
            reason("high, cosine"),
        ),
    ]


def _train_arm(
    config: Config,
    data,
    seed: int,
    lr: float,
    schedule: str,
    desc: str,
    checkpoint: Path | None = None,
) -> dict[str, list[float] | float]:
    """Train one BN network; at each evaluation point, its test accuracy with the moving
    averages and with recomputed population statistics; its final train accuracy."""
    n = len(data.train_y)
    steps = config.steps_for(config.batch_size, n)
    model = config_net(config, data, "bn", seed, momentum=config.bn_momentum)
    job = _ArmJob(config, data, model, seed, lr, schedule, steps, desc)
    model.train()
    run_loop(
        job,
        steps=steps,
        eval_steps=eval_steps(steps, config.evals),
        desc=desc,
        checkpoint=checkpoint,
        signature=[schedule, lr, seed],
    )
    return job.out


class _ArmJob(ModelTask):
    """One :func:`_train_arm` network as a :class:`batchnorm.lab.loop.Task`."""

    saved = ("out", "running", "count")

    def __init__(
        self,
        config: Config,
        data,
        model: torch.nn.Module,
        seed: int,
        lr: float,
        schedule: str,
        steps: int,
        desc: str,
    ) -> None:
        n, b = len(data.train_y), config.batch_size
        self.data, self.model, self.lr, self.schedule = data, model, lr, schedule
        self.steps, self.desc = steps, desc
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=config.momentum)
        self.batches = iid_batches(n, b, seed)
        self.samplers = [self.batches]
        # The recalibration batches: a fixed shuffle of the training set, the same at every
        # point.
        self.pop = recalibration_batches(n, b, seed, config.popstat_batches)
        self.out: dict[str, Any] = {
            "steps": [],
            "ema_acc": [],
            "precise_acc": [],
            "train_loss": [],
        }
        self.running, self.count = 0.0, 0

    def train_step(self, step: int) -> bool:
        step += 1  # this update's number, as the schedule counts
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.steps, self.lr, self.schedule)
        idx = torch.from_numpy(next(self.batches))
        loss = F.cross_entropy(self.model(self.data.train_x[idx]), self.data.train_y[idx])
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{self.desc}: the loss became {float(loss)} at step {step}; lower lr or "
                "high_factor"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.running, self.count = self.running + float(loss.detach()), self.count + 1
        return True

    def evaluate(self, step: int) -> str:
        from batchnorm.inference import recalibrate

        data, out = self.data, self.out
        ema_acc, _ = evaluate(self.model, data.test_x, data.test_y)
        precise = copy.deepcopy(self.model)
        recalibrate(precise, (data.train_x[c] for c in self.pop), progress=False)
        precise_acc, _ = evaluate(precise, data.test_x, data.test_y)
        out["steps"].append(step)
        out["ema_acc"].append(ema_acc)
        out["precise_acc"].append(precise_acc)
        out["train_loss"].append(self.running / self.count)
        self.running, self.count = 0.0, 0
        if step == self.steps:
            # Final train accuracy with population statistics.
            out["train_acc"], _ = evaluate(precise, data.train_x[:5000], data.train_y[:5000])
        return f"EMA {ema_acc:.3f}, precise {precise_acc:.3f}"


def measure(config: Config, ctx: Context) -> Measurement:
    """Train each arm and seed, evaluating with the EMA and with precise BN along the way."""
    data = image_data(ctx, config)
    lrs = {"base": config.lr_of("base"), "high": config.lr_of("high")}
    seeds = config.seed_list()
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for arm, (which, schedule) in ARMS.items():
        for seed in seeds:
            key = f"bn-{which}-{schedule}-s{seed}"
            results[arm].append(
                train_job(
                    ctx,
                    key,
                    lambda which=which, schedule=schedule, seed=seed, arm=arm, key=key: _train_arm(
                        config,
                        data,
                        seed,
                        lrs[which],
                        schedule,
                        f"{arm} seed {seed}",
                        ctx.checkpoint(key),
                    ),
                )
            )
    steps = [int(s) for s in results[BASELINE][0]["steps"]]
    numbers = Numbers(
        steps=steps,
        lrs=lrs,
        train_floor=config.train_floor,
        ema={a: [[float(v) for v in r["ema_acc"]] for r in rs] for a, rs in results.items()},
        precise={
            a: [[float(v) for v in r["precise_acc"]] for r in rs] for a, rs in results.items()
        },
        train={a: [float(r["train_acc"]) for r in rs] for a, rs in results.items()},
    )
    rows = [
        {
            "step": step,
            "variant": arm,
            "seed": seed,
            "test_acc": r["precise_acc"][i],  # precise BN's; the moving averages' beside it
            "ema_test_acc": r["ema_acc"][i],
            "train_loss": r["train_loss"][i],
            "lr": lrs[ARMS[arm][0]],
            "schedule": ARMS[arm][1],
        }
        for arm, rs in results.items()
        for seed, r in zip(seeds, rs)
        for i, step in enumerate(r["steps"])
    ]
    ctx.write_csv("curves.csv", rows, list(rows[0]))

    def arm_name(arm: str) -> str:
        which, schedule = ARMS[arm]
        return f"lr {lrs[which]:g}, {schedule}"

    gap_table = md_table(
        ["arm", "train acc (end)", *[f"step {s}" for s in steps]],
        [
            [
                arm_name(arm),
                fmt_mean_std(numbers.train[arm]),
                *[
                    f"{e:.3f} / {p:.3f}"
                    for e, p in zip(
                        np.mean(numbers.ema[arm], axis=0), np.mean(numbers.precise[arm], axis=0)
                    )
                ],
            ]
            for arm in ARMS
        ],
    )
    comparisons = [
        Comparison(
            f"precise minus EMA test accuracy, {arm_name(arm)}: mean over training / at the end",
            "EMA lower and unstable at a high learning rate before decay; the two meet after "
            "decay (Wu & Johnson 2021, Fig. 2)",
            f"{numbers.gaps(arm).mean():+.4f} / {numbers.gaps(arm)[:, -1].mean():+.4f}",
            value=float(numbers.gaps(arm).mean()),
        )
        for arm in ARMS
    ]
    with ctx.timer("plots"):
        _plot(ctx, numbers, arm_name)
    base = numbers.train[BASELINE]
    base_test = [p[-1] for p in numbers.precise[BASELINE]]
    return Measurement(
        numbers=numbers,
        comparisons=comparisons,
        metrics={
            "lrs": lrs,
            "eval_steps": steps,
            "gap_mean": {arm: float(numbers.gaps(arm).mean()) for arm in ARMS},
            "gap_end": {arm: float(numbers.gaps(arm)[:, -1].mean()) for arm in ARMS},
            "final_train_acc": numbers.train,
            "baseline": f"BN CNN, lr {lrs['base']:g} with cosine decay, precise BN",
            **baseline_metrics(base, base_test),
        },
        tables=[
            (
                "Test accuracy, moving averages / precise BN, at each evaluation (mean over seeds)",
                gap_table,
            )
        ],
        figures=[
            ("precise_bn.png", "Precise BN minus moving-average test accuracy during training")
        ],
        choices=[
            *[c for c in common_choices(config) if not c.startswith(("optimizer", "test-time"))],
            f"optimizer: SGD, momentum {config.momentum}, base learning rate {lrs['base']:g} "
            f"(lr {config.lr:g} at batch 32, scaled linearly to batch {config.batch_size}) and "
            f"{config.high_factor:g}x that ({lrs['high']:g}); each constant, or with a cosine "
            "decay to 0 at the last step (Wu & Johnson's Fig. 2 contrasts the phases before and "
            "after the decay); no weight decay",
            f"moving averages: momentum {config.bn_momentum:g} (PyTorch's default; Wu & Johnson "
            "Sec. 3.1 use the frameworks' defaults)",
            f"precise BN: batchnorm.inference.recalibrate on a copy of the network, over "
            f"{config.popstat_batches} training mini-batches of {config.batch_size} (a fixed "
            f"shuffle), at each of the {len(steps)} evaluation points {steps}",
            f"final train accuracy: the first 5,000 training images, precise BN; a claim "
            f"about networks below {config.train_floor:g} is not tested",
        ],
        notes=[
            "Wu & Johnson's numbers are ImageNet/ResNet-50 ones; the comparison is of the "
            "shape (who is ahead, when), not of the numbers."
        ],
    )


def _plot(ctx: Context, numbers: Numbers, arm_name) -> None:
    from batchnorm.lab.plots import new_figure

    figure, axes = new_figure(2, 1, size=(4.6, 3.4))
    for arm in ARMS:
        gaps = numbers.gaps(arm)
        axes[0, 0].plot(numbers.steps, gaps.mean(axis=0), "o-", label=arm_name(arm))
        axes[0, 1].plot(numbers.steps, np.mean(numbers.ema[arm], axis=0), "o-", label=arm_name(arm))
    axes[0, 0].axhline(0.0, color="gray", linewidth=0.8)
    axes[0, 0].set(xlabel="training step", ylabel="precise minus EMA test accuracy")
    axes[0, 1].set(xlabel="training step", ylabel="test accuracy, moving averages")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ctx.save_figure(figure, "precise_bn.png")


EXPERIMENT = Experiment(
    name="precise-bn",
    title="Precise BN (Algorithm 2 population statistics) vs moving averages during training",
    claim=(
        "Moving averages lag behind the weights, most at a high learning rate and before the "
        "learning rate decays; population statistics recomputed with the current weights "
        "evaluate the network better then, and the two agree after the decay."
    ),
    paper=(
        "Ioffe & Szegedy (2015), Algorithm 2; Wu & Johnson (2021), 'Rethinking Batch in "
        "BatchNorm', Sec. 3.1, Fig. 2 (EMA vs precise BN during training). Stand-in: a small "
        "CNN on Fashion-MNIST."
    ),
    config_cls=Config,
    numbers_cls=Numbers,
    measure=measure,
    judge=judge,
    summary="EMA vs recomputed population statistics during training, by lr and schedule",
)
