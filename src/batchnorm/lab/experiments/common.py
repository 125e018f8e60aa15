"""What the experiments share: the common config fields, and turning a config into jobs.

Every experiment's config subclasses :class:`CommonConfig` (overriding defaults where its
protocol differs; the sweeps ``lr``, ``init`` and ``nonlinearity`` through :class:`SweepConfig`)
and adds its own fields. :func:`settings` turns a config into the
:class:`~batchnorm.lab.train.TrainSettings` of a job, :func:`specs_for` into the networks of a
job (one per variant and seed), and the helpers below read a
:class:`~batchnorm.lab.train.JobResult` by variant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from batchnorm.lab.config import DataConfig, param
from batchnorm.lab.loop import eval_schedule
from batchnorm.lab.train import JobResult, TrainSettings
from batchnorm.lab.wide import ACTIVATIONS, BN_IMPLEMENTATIONS, NetSpec, WideMLP

__all__ = [
    "CommonConfig",
    "SweepConfig",
    "settings",
    "specs_for",
    "build_model",
    "variant_indices",
    "final_values",
    "steps_to_target",
    "curve_rows",
    "CURVE_FIELDS",
]


@dataclass(frozen=True)
class CommonConfig(DataConfig):
    """Fields the MLP experiments share (with the seeds, threads and data of
    :class:`batchnorm.lab.config.DataConfig`). Defaults here are those of the Figure 1
    protocol."""

    hidden: tuple[int, ...] = param((100, 100, 100), "widths of the hidden layers")
    activation: str = param("sigmoid", "hidden nonlinearity", choices=ACTIVATIONS)
    steps: int = param(50_000, "SGD steps (mini-batches) per network")
    batch_size: int = param(60, "examples per mini-batch (m)")
    lr: float = param(0.1, "SGD learning rate (the paper does not state it)")
    momentum: float = param(0.0, "SGD momentum (0 = plain SGD)")
    init_scale: float = param(1.0, "initial weights ~ N(0, init_scale^2 / fan_in)")
    eps: float = param(1e-5, "batch norm epsilon (added to the variance)")
    eval_every: int = param(500, "evaluate every this many steps")
    eval_examples: int | None = param(
        None, "test examples used at intermediate evaluations (none = all; the last uses all)"
    )
    popstat_batches: int = param(
        100, "training mini-batches for the population statistics at each evaluation"
    )
    final_popstat_batches: int | None = param(
        None, "the same for the final evaluation (none = one pass over the training set)"
    )
    bn_impl: str = param(
        "batchnorm",
        "batch norm layer: the project's batchnorm.nn.BatchNorm1d, or torch.nn's to cross-check",
        choices=BN_IMPLEMENTATIONS,
    )
    checkpoint_seconds: float = param(
        30.0, "seconds between checkpoints, written at evaluations (0 = at every evaluation)"
    )

    def validate(self) -> None:
        """Checks across fields; raises ValueError with what to change."""
        positive = ("steps", "batch_size", "seeds", "eval_every", "popstat_batches")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be at least 2 (batch statistics need two values)")
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"hidden must list positive widths, got {self.hidden}")
        for name in ("lr", "momentum", "eps"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.momentum >= 1:
            raise ValueError(f"momentum must be below 1, got {self.momentum}")
        if not (math.isfinite(self.init_scale) and self.init_scale > 0):
            raise ValueError(f"init_scale must be positive, got {self.init_scale}")
        if not self.checkpoint_seconds >= 0:
            raise ValueError(f"checkpoint_seconds must be >= 0, got {self.checkpoint_seconds}")


@dataclass(frozen=True)
class SweepConfig(CommonConfig):
    """The shorter protocol of the sweeps (``lr``, ``init``, ``nonlinearity``): far fewer steps
    than Figure 1, intermediate evaluations on part of the test set with fewer batches for the
    population statistics."""

    steps: int = param(3000, "SGD steps per network")
    eval_every: int = param(250, "evaluate every this many steps")
    eval_examples: int | None = param(
        2000, "test examples used at intermediate evaluations (none = all; the last uses all)"
    )
    popstat_batches: int = param(
        20, "training mini-batches for the population statistics at each evaluation"
    )
    final_popstat_batches: int | None = param(
        200, "the same for the final evaluation (none = one pass over the training set)"
    )

    def quick(self) -> SweepConfig:
        """The smoke-test sizes: 600 steps, 2 seeds, smaller population statistics."""
        return replace(self, steps=600, seeds=2, popstat_batches=10, final_popstat_batches=50)


def seeds_of(config: CommonConfig) -> list[int]:
    return config.seed_list()


def settings(
    config: CommonConfig,
    *,
    extra_eval_steps: Sequence[int] = (),
    percentiles: bool = False,
    saturation: bool = False,
    train_eval_examples: int = 0,
) -> TrainSettings:
    """The training settings a config describes."""
    return TrainSettings(
        steps=config.steps,
        batch_size=config.batch_size,
        eval_steps=eval_schedule(config.steps, config.eval_every, extra_eval_steps),
        momentum=config.momentum,
        popstat_batches=config.popstat_batches,
        final_popstat_batches=config.final_popstat_batches,
        eval_examples=config.eval_examples,
        train_eval_examples=train_eval_examples,
        percentiles=percentiles,
        saturation=saturation,
        checkpoint_seconds=config.checkpoint_seconds,
    )


def specs_for(config: CommonConfig, variants: Sequence[dict[str, Any]]) -> list[NetSpec]:
    """One NetSpec per (variant, seed). Each variant is a dict of NetSpec fields with a
    ``variant`` name; missing fields come from the config (activation, init_scale, lr)."""
    specs = []
    for variant in variants:
        for seed in seeds_of(config):
            fields = {
                "activation": config.activation,
                "init_scale": config.init_scale,
                "lr": config.lr,
                **variant,
            }
            specs.append(NetSpec(seed=seed, **fields))
    return specs


def build_model(config: CommonConfig, specs: Sequence[NetSpec], data: Any) -> WideMLP:
    """The wide network for ``specs`` on ``data``."""
    return WideMLP(
        specs,
        data.num_features,
        config.hidden,
        data.num_classes,
        bn_impl=config.bn_impl,
        eps=config.eps,
    )


def variant_indices(result: JobResult, **match: Any) -> list[int]:
    """The networks matching ``match`` (NetSpec fields), ordered by seed."""
    found = result.select(**match)
    return sorted(found, key=lambda g: result.specs[g].seed)


def final_values(result: JobResult, indices: Sequence[int], what: str = "test_acc") -> np.ndarray:
    """The last evaluation's value of ``what`` for each network in ``indices``."""
    return getattr(result, what)[-1, list(indices)]


def steps_to_target(result: JobResult, g: int, target: float) -> float:
    """The first evaluated step at which network ``g`` reached ``target`` test accuracy (inf if
    never)."""
    reached = np.nonzero(result.test_acc[:, g] >= target)[0]
    return float(result.steps[reached[0]]) if len(reached) else math.inf


def mean_steps(values: Sequence[float]) -> float:
    """Mean of steps-to-target over seeds; inf if any seed never reached the target."""
    return math.inf if any(math.isinf(v) for v in values) else float(np.mean(values))


def fmt_steps(value: float) -> str:
    return "never" if math.isinf(value) else f"{value:,.0f}"


CURVE_FIELDS = ("step", "variant", "seed", "test_acc", "test_loss", "train_loss", "train_acc")


def curve_rows(result: JobResult, extra: dict[int, dict[str, Any]] | None = None) -> list[dict]:
    """One CSV row per (evaluation, network)."""
    rows = []
    for t, step in enumerate(result.steps):
        for g, spec in enumerate(result.specs):
            row = {
                "step": int(step),
                "variant": spec.variant,
                "seed": spec.seed,
                "test_acc": float(result.test_acc[t, g]),
                "test_loss": float(result.test_loss[t, g]),
                "train_loss": float(result.train_loss[t, g]),
                "train_acc": (
                    float(result.train_acc[t, g]) if result.train_acc is not None else ""
                ),
            }
            rows.append(row | (extra or {}).get(g, {}))
    return rows


@dataclass
class Cell:
    """The networks of one variant at one setting (all seeds)."""

    indices: list[int]
    final: np.ndarray  # (S,) final test accuracy
    to_target: list[float]  # steps to the target accuracy per seed (inf: never)
    diverged: int  # networks whose loss became non-finite

    @property
    def trains(self) -> bool:
        """No seed diverged and every seed reached the target."""
        return self.diverged == 0 and all(math.isfinite(s) for s in self.to_target)

    @property
    def mean_steps(self) -> float:
        return mean_steps(self.to_target)


@dataclass
class CellNumbers:
    """What a rule needs of a :class:`Cell`: steps to the target per seed and divergences."""

    to_target: list[float]  # steps to the target accuracy per seed (inf: never)
    diverged: int  # networks whose loss became non-finite

    @classmethod
    def of(cls, c: Cell) -> CellNumbers:
        return cls(to_target=[float(v) for v in c.to_target], diverged=int(c.diverged))

    @property
    def trains(self) -> bool:
        """No seed diverged and every seed reached the target (as :attr:`Cell.trains`)."""
        return self.diverged == 0 and all(math.isfinite(s) for s in self.to_target)

    @property
    def mean_steps(self) -> float:
        return mean_steps(self.to_target)


def cell(result: JobResult, target: float, **match: Any) -> Cell:
    """The :class:`Cell` of the networks matching ``match``."""
    indices = variant_indices(result, **match)
    if not indices:
        raise ValueError(f"no network matches {match}")
    return Cell(
        indices=indices,
        final=final_values(result, indices),
        to_target=[steps_to_target(result, g, target) for g in indices],
        diverged=int(np.sum(result.diverged_at[indices] >= 0)),
    )


def common_choices(config: CommonConfig, *, swept: str = "") -> list[str]:
    """The protocol choices every experiment shares, as report lines."""
    lines = [
        f"optimizer: plain SGD{' with momentum ' + str(config.momentum) if config.momentum else ''}"
        + ("" if swept == "lr" else f", learning rate {config.lr}")
        + ", no weight decay, no schedule; loss: mean cross-entropy over the mini-batch",
        "initialization: W ~ N(0, "
        + ("scale" if swept == "init_scale" else str(config.init_scale))
        + "^2 / fan_in), biases 0, gamma 1, beta 0",
        f"batch norm: on Wu before each hidden nonlinearity, bias of Wu dropped, eps {config.eps}"
        f", none on the output layer; layer: {config.bn_impl}"
        + (" (batchnorm.nn.BatchNorm1d)" if config.bn_impl == "batchnorm" else " (torch.nn)"),
        f"data: {config.dataset}"
        + (f", first {config.train_subset} training examples" if config.train_subset else "")
        + f"; batch {config.batch_size}, reshuffled every epoch, the same order and initial "
        "weights for every variant of a seed (paired runs)",
        f"test-time BN: Algorithm 2 over {config.popstat_batches} training mini-batches at each "
        "evaluation, "
        + (
            "one pass over the training set"
            if config.final_popstat_batches is None
            else f"{config.final_popstat_batches} mini-batches"
        )
        + " at the end",
        f"evaluation every {config.eval_every} steps"
        + (
            f" on the first {config.eval_examples} test examples (the final one on all)"
            if config.eval_examples
            else " on the whole test set"
        ),
    ]
    return lines
