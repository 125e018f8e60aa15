"""Recurrent networks: batch norm needs statistics per time step; layer norm needs none.

Claims: Ba, Kiros & Hinton (2016, arXiv 1607.06450, Sec. 1): the summed inputs of a recurrent
network change with the time step, so batch norm "appears to require different statistics for
different time-steps", which "is problematic if a test sequence is longer than any of the
training sequences"; layer norm computes its statistics per example and time step and has
neither problem (Sec. 3.1). Cooijmans, Ballas, Laurent, Gulcehre & Courville (2016, "Recurrent
Batch Normalization", arXiv 1603.09025): batch norm of an LSTM's input-to-hidden and
hidden-to-hidden terms, with statistics per time step (Sec. 3) and gains initialized to 0.1
(Sec. 4, Fig. 1), converges faster and generalizes better than the plain LSTM (sequential MNIST,
Sec. 5.1, Fig. 2, Table 1); beyond the longest training sequence the population statistics of
its last step are reused (Sec. 3), which works because the activations' statistics settle to a
steady state (their Fig. 5).

Stand-in: MNIST read row by row (28 time steps of 28 pixels; the paper reads 784 pixels one at
a time, far beyond what 2 CPU cores train in minutes), a one-layer LSTM with 64 units (the paper:
100), RMSProp at 1e-3 with gradient clipping at 1 (Sec. 5.1), batches of 64, a few epochs of
training. Each training batch is its images followed by 0 ... 14 blank rows (one draw per batch),
so training sequences have 28 ... 42 steps (T_max = 42) and every arm learns to keep its answer
through blank input. As in the paper (Sec. 5.1), batch norm's initial hidden state gets noise in
training: the first rows of MNIST are blank, which leaves the recurrent term with a batch
variance of exactly zero. The cell is
:mod:`batchnorm.lab.experiments.rnn_model` (Cooijmans Eqs. 6-8), in four arms:

- ``none``: the plain LSTM;
- ``BN per step``: batch norm with the mini-batch statistics of each time step in training and
  population statistics per time step at test time (Algorithm 2 of Ioffe & Szegedy at each
  step), those of the last training step reused beyond it;
- ``BN shared``: the same networks with one set of population statistics for all time steps
  (pooled over examples and steps). A network cannot be trained with statistics shared over
  time for the recurrent term (normalizing step t would need the steps after it), so in
  training a batch-norm layer reused at every step normalizes each step by that step's batch;
  the arms differ only in the statistics at test time, which isolates exactly what is shared;
- ``layer norm``: the same cell with layer norm in place of batch norm (gains initialized to 1,
  the usual choice; Ba et al. do not give theirs for this cell).

Longer test sequences (where both papers discuss them): every test image gets ``pad_rows``
blank rows (28 by default: 56 steps, beyond T_max = 42), either after the digit (the sequence
goes on as in training, further than any training sequence: Cooijmans' steady-state case) or
before it (the digit is read at steps 29-56, where per-step batch norm has only statistics of
blank steps: Ba et al.'s concern). All arms see the same padded images; the plain LSTM is the
control for what the padding does to an LSTM that uses no statistics.

Rules (in code; every comparison paired by seed, its margin ``spread_factor`` standard errors of
the per-seed differences and at least ``min_tolerance``; a claim about networks that did not
train, final train accuracy below ``trained_floor``, is "not tested"): see :func:`judge`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from batchnorm.backends import BACKENDS
from batchnorm.lab.config import DataConfig, param
from batchnorm.lab.data import DATASETS
from batchnorm.lab.experiment import (
    Claim,
    Comparison,
    Context,
    Experiment,
    Measurement,
    fmt_mean_std,
    md_table,
)
from batchnorm.lab.experiments.cnn import cached_job, iid_batches
from batchnorm.lab.experiments.rnn_model import TERMS, GroupedLSTM, PopulationStats, StepRecorder
from batchnorm.lab.loop import ModelTask, eval_schedule, run_loop
from batchnorm.lab.progress import log
from batchnorm.lab.rules import baseline_metrics, gate, paired_tolerance, untrained

__all__ = ["Config", "Numbers", "EXPERIMENT", "measure", "judge", "ARMS"]

NONE, SHARED, PER_STEP, LN = "none", "BN shared", "BN per step", "layer norm"
ARMS = (NONE, SHARED, PER_STEP, LN)
COLORS = {NONE: "tab:red", SHARED: "tab:orange", PER_STEP: "tab:blue", LN: "tab:green"}
# Which trained networks (by norm) and which test-time statistics make each arm.
_ARM_SOURCE = {
    NONE: ("none", "batch"),
    SHARED: ("bn", "shared"),
    PER_STEP: ("bn", "per step"),
    LN: ("ln", "batch"),
}
AFTER, BEFORE = "after", "before"


@dataclass(frozen=True)
class Config(DataConfig):
    """An LSTM reading MNIST row by row, four normalizations. Defaults are the full protocol."""

    dataset: str = param("mnist", "data set (images read one row per time step)", choices=DATASETS)
    hidden: int = param(64, "LSTM units (Cooijmans et al. Sec. 5.1: 100)")
    steps: int = param(2500, "RMSProp steps per network (about 2.7 epochs of 60,000 images)")
    batch_size: int = param(
        64,
        "examples per mini-batch (Cooijmans et al.: 64 on their language tasks, 100 in "
        "their MNIST script)",
    )
    lr: float = param(1e-3, "RMSProp learning rate (Cooijmans et al. Sec. 5.1: 1e-3)")
    gain_init: float = param(0.1, "batch norm's initial gains (Cooijmans et al. Sec. 4: 0.1)")
    ln_gain_init: float = param(1.0, "layer norm's initial gains")
    eps: float = param(1e-5, "the norms' epsilon")
    seeds: int = param(3, "number of seeds (each: initial weights and batch order)")
    eval_every: int = param(250, "evaluate every this many steps")
    eval_examples: int = param(2000, "test examples of the evaluations along the learning curve")
    popstat_batches: int = param(
        20, "training mini-batches for batch norm's population statistics along the curve"
    )
    final_popstat_batches: int = param(
        200, "the same for the final evaluation (Algorithm 2 at every time step)"
    )
    train_eval_examples: int = param(
        10_000, "training examples on which the final train accuracy is measured"
    )
    train_pad_rows: int | None = param(
        None,
        "training sequences get 0 ... this many blank rows after the image, drawn per batch "
        "(none = half an image's rows)",
    )
    pad_rows: int | None = param(
        None, "blank rows added for the longer test sequences (none = as many as an image has)"
    )
    h0_noise: float = param(
        0.1,
        "std of the noise in batch norm's initial hidden state in training (Cooijmans et al. "
        "Sec. 5.1; 0 = none)",
    )
    rmsprop_decay: float = param(0.9, "RMSProp's decay of the squared gradients (the authors' 0.9)")
    clip: float = param(1.0, "gradient norm clipping per network (Cooijmans et al. Sec. 5.1: 1)")
    bn_backend: str = param("cpu", "batch norm's implementation", choices=BACKENDS)

    def validate(self) -> None:
        """Checks across fields; raises ValueError with what to change."""
        for name in (
            "hidden",
            "steps",
            "eval_every",
            "eval_examples",
            "popstat_batches",
            "final_popstat_batches",
            "train_eval_examples",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be at least 2 (batch statistics need two values)")
        for name in ("lr", "gain_init", "ln_gain_init", "eps"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value}")
        if self.pad_rows is not None and self.pad_rows < 1:
            raise ValueError(f"pad_rows must be at least 1, got {self.pad_rows}")
        if self.train_pad_rows is not None and self.train_pad_rows < 0:
            raise ValueError(f"train_pad_rows must be at least 0, got {self.train_pad_rows}")
        if not (0 <= self.h0_noise < math.inf):
            raise ValueError(f"h0_noise must be a finite number >= 0, got {self.h0_noise}")
        if not 0 < self.rmsprop_decay < 1:
            raise ValueError(f"rmsprop_decay must lie in (0, 1), got {self.rmsprop_decay}")
        if not self.clip > 0:
            raise ValueError(f"clip must be positive, got {self.clip}")

    def quick(self) -> Config:
        """A smoke test: 16 units, 150 steps on 3,000 examples, 2 seeds."""
        return replace(
            self,
            hidden=16,
            steps=150,
            seeds=2,
            eval_every=50,
            eval_examples=500,
            popstat_batches=5,
            final_popstat_batches=10,
            train_eval_examples=1000,
            train_subset=3000,
            test_subset=1000,
        )


@dataclass
class Numbers:
    """What the claims are decided on, per arm (keys of :data:`ARMS`), one value per seed."""

    train_steps: int  # time steps of an image (rows); the test at the training length
    max_train_steps: int  # the longest training sequence (T_max: the image and blank rows)
    long_steps: int  # time steps of the longer test sequences
    train: dict[str, list[float]]  # final train accuracy (inference mode, training length)
    test: dict[str, list[float]]  # final test accuracy at the training length
    curve: dict[str, list[float]]  # mean test accuracy over the evaluations after step 0
    after: dict[str, list[float]]  # test accuracy, blank rows after the digit
    before: dict[str, list[float]]  # test accuracy, blank rows before the digit


# ------------------------------------------------------------------------------------------
# The rules


def judge(
    numbers: Numbers,
    *,
    spread_factor: float = 2.0,
    min_tolerance: float = 0.0005,
    trained_floor: float = 0.5,
) -> list[Claim]:
    """Decide the claims from ``numbers`` alone; every comparison is paired by seed and uses
    the margin ``tol(d)`` of :func:`batchnorm.lab.rules.paired_tolerance` on the per-seed
    differences ``d``. ``drop`` is an arm's test accuracy at the training length minus that on
    a longer test.

    1. "BN per step trains as well" (Cooijmans Table 1): test(BN per step) - test(none) >=
       -tol;
    2. "BN per step converges faster" (Cooijmans Fig. 2): mean test accuracy over the learning
       curve, BN per step minus none, > tol;
    3. "shared statistics are worse" (Ba et al. Sec. 1; Cooijmans Sec. 3): test(BN per step) -
       test(BN shared) > tol;
    4. "layer norm works" (Ba et al. Sec. 3.1): test(layer norm) - test(none) >= -tol;
    5. "layer norm generalizes to longer sequences" (Ba et al. Sec. 1): on both longer tests,
       drop(layer norm) - drop(none) <= tol;
    6. "the last step's statistics carry BN past the training length" (Cooijmans Sec. 3, Fig.
       5): blank rows after the digit, drop(BN per step) - drop(none) <= tol;
    7. "per-step statistics fail where the input goes on past the training length" (Ba et al.
       Sec. 1): blank rows before the digit, drop(BN per step) - drop(layer norm) > tol.

    A claim is "not tested" when an arm it compares did not train (its mean final train
    accuracy below ``trained_floor``); the shared arm is the per-step networks, so its gate is
    theirs. Claims 5 and 6 compare drops with the plain LSTM's, which say something only where
    the plain LSTM still works on that longer test: they are "not tested" where its mean
    accuracy there is below ``trained_floor``.
    """

    def arr(table: dict[str, list[float]], arm: str) -> np.ndarray:
        return np.asarray(table[arm], dtype=np.float64)

    def tol(d: np.ndarray) -> float:
        return paired_tolerance(d, spread_factor=spread_factor, min_tolerance=min_tolerance)

    def why(*arms: str) -> str | None:
        return untrained({a: numbers.train[a] for a in arms}, trained_floor)

    test = {a: arr(numbers.test, a) for a in ARMS}
    curve = {a: arr(numbers.curve, a) for a in ARMS}
    drop = {
        AFTER: {a: test[a] - arr(numbers.after, a) for a in ARMS},
        BEFORE: {a: test[a] - arr(numbers.before, a) for a in ARMS},
    }
    margin = (
        f"{spread_factor:g} standard errors of the per-seed differences (at least "
        f"{min_tolerance:g})"
    )
    long = (
        f"{numbers.long_steps} steps, longer than any training sequence ({numbers.max_train_steps})"
    )

    def control(*tests: str) -> str | None:
        # A drop compared with the plain LSTM's says something only where the plain LSTM
        # itself still works on the longer test.
        tables = {AFTER: numbers.after, BEFORE: numbers.before}
        return untrained({f"none on blank rows {t}": tables[t][NONE] for t in tests}, trained_floor)

    def both(*reasons: str | None) -> str | None:
        found = [r for r in reasons if r]
        return "; ".join(found) if found else None

    def diff(d: np.ndarray) -> str:
        return f"{d.mean():+.4f} (tolerance {tol(d):.4f})"

    claims = []
    d1 = test[PER_STEP] - test[NONE]
    claims.append(
        gate(
            Claim(
                "BN per step trains as well",
                "An LSTM with batch norm per time step reaches at least the plain LSTM's test "
                "accuracy (Cooijmans et al. Table 1).",
                f"test accuracy, BN per step minus none, paired by seed, at least minus {margin}",
                bool(d1.mean() >= -tol(d1)),
                f"test {test[PER_STEP].mean():.4f} vs {test[NONE].mean():.4f}: {diff(d1)}",
            ),
            why(NONE, PER_STEP),
        )
    )
    d2 = curve[PER_STEP] - curve[NONE]
    claims.append(
        gate(
            Claim(
                "BN per step converges faster",
                "Batch norm per time step makes the LSTM converge faster (Cooijmans et al. "
                "Fig. 2).",
                "mean test accuracy over the learning curve's evaluations after step 0, BN per "
                f"step minus none, paired by seed, above {margin}",
                bool(d2.mean() > tol(d2)),
                f"mean along the curve {curve[PER_STEP].mean():.4f} vs {curve[NONE].mean():.4f}: "
                f"{diff(d2)}",
            ),
            why(NONE, PER_STEP),
        )
    )
    d3 = test[PER_STEP] - test[SHARED]
    claims.append(
        gate(
            Claim(
                "shared statistics are worse",
                "Batch norm with one set of statistics for all time steps does worse than with "
                "statistics per time step (Ba et al. Sec. 1; Cooijmans et al. Sec. 3).",
                f"test accuracy, BN per step minus BN shared (the same networks), paired by seed, "
                f"above {margin}",
                bool(d3.mean() > tol(d3)),
                f"test {test[PER_STEP].mean():.4f} vs {test[SHARED].mean():.4f}: {diff(d3)}",
            ),
            why(PER_STEP),
        )
    )
    d4 = test[LN] - test[NONE]
    claims.append(
        gate(
            Claim(
                "layer norm works",
                "An LSTM with layer norm, which needs no batch statistics, reaches at least the "
                "plain LSTM's test accuracy (Ba et al. Sec. 3.1).",
                f"test accuracy, layer norm minus none, paired by seed, at least minus {margin}",
                bool(d4.mean() >= -tol(d4)),
                f"test {test[LN].mean():.4f} vs {test[NONE].mean():.4f}: {diff(d4)}",
            ),
            why(NONE, LN),
        )
    )
    d5 = {k: drop[k][LN] - drop[k][NONE] for k in (AFTER, BEFORE)}
    claims.append(
        gate(
            Claim(
                "layer norm generalizes to longer sequences",
                "Layer norm's LSTM loses no more accuracy than the plain LSTM on test sequences "
                "longer than any training sequence (Ba et al. Sec. 1).",
                f"on both longer tests ({long}: blank rows after, and before, the digit), the "
                "drop from the training length, layer norm minus none, paired by seed, at most "
                f"{margin}",
                bool(all(d.mean() <= tol(d) for d in d5.values())),
                "; ".join(
                    f"blank rows {k}: drop {drop[k][LN].mean():.4f} vs {drop[k][NONE].mean():.4f}, "
                    f"{diff(d)}"
                    for k, d in d5.items()
                ),
            ),
            both(why(NONE, LN), control(AFTER, BEFORE)),
        )
    )
    d6 = drop[AFTER][PER_STEP] - drop[AFTER][NONE]
    claims.append(
        gate(
            Claim(
                "last step's statistics carry BN on",
                "Batch norm per time step, with the last training step's population statistics "
                "reused beyond it, loses no more accuracy than the plain LSTM where a sequence "
                "goes on past the training length (Cooijmans et al. Sec. 3).",
                f"blank rows after the digit ({long}): the drop, BN per step minus none, paired by "
                f"seed, at most {margin}",
                bool(d6.mean() <= tol(d6)),
                f"drop {drop[AFTER][PER_STEP].mean():.4f} vs {drop[AFTER][NONE].mean():.4f}: "
                f"{diff(d6)}",
            ),
            both(why(NONE, PER_STEP), control(AFTER)),
        )
    )
    d7 = drop[BEFORE][PER_STEP] - drop[BEFORE][LN]
    claims.append(
        gate(
            Claim(
                "per-step statistics fail past the training length",
                "Where the input that matters comes after the training length, batch norm's "
                "per-step statistics fail and layer norm's do not (Ba et al. Sec. 1).",
                f"blank rows before the digit ({long}): the drop, BN per step minus layer norm, "
                f"paired by seed, above {margin}",
                bool(d7.mean() > tol(d7)),
                f"drop {drop[BEFORE][PER_STEP].mean():.4f} vs {drop[BEFORE][LN].mean():.4f}: "
                f"{diff(d7)}",
            ),
            why(LN, PER_STEP),
        )
    )
    return claims


# ------------------------------------------------------------------------------------------
# Training


@dataclass
class _Sequences:
    """A data set as sequences: x (N, T, D) float32, y (N,) int64."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: int


def _sequences(ctx: Context, config: Config) -> _Sequences:
    data = ctx.load_data(config.dataset, config.train_subset, config.test_subset)
    if len(data.image_shape) != 2:
        raise ValueError(
            f"data set {config.dataset!r} has no 2-d images (shape {data.image_shape}); use "
            "mnist, fashion-mnist or digits"
        )
    rows, width = (int(s) for s in data.image_shape)

    def seq(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x, dtype=np.float32)).reshape(-1, rows, width)

    return _Sequences(
        seq(data.train_x),
        torch.as_tensor(data.train_y, dtype=torch.int64),
        seq(data.test_x),
        torch.as_tensor(data.test_y, dtype=torch.int64),
        data.num_classes,
    )


def _pad(x: torch.Tensor, rows: int, where: str) -> torch.Tensor:
    """``x`` (..., T, D) with ``rows`` blank (zero) rows after or before each sequence."""
    if rows == 0:
        return x
    blank = x.new_zeros(*x.shape[:-2], rows, x.shape[-1])
    return torch.cat([x, blank] if where == AFTER else [blank, x], dim=-2)


def _train_pad(config: Config, rows: int) -> int:
    """The most blank rows a training sequence gets after its image (T_max - T)."""
    return rows // 2 if config.train_pad_rows is None else config.train_pad_rows


def _noise(config: Config, norm: str) -> float:
    return config.h0_noise if norm == "bn" else 0.0


@torch.no_grad()
def _population(
    model: GroupedLSTM, data: _Sequences, config: Config, batches: int, seed: int
) -> tuple[PopulationStats, PopulationStats]:
    """Per-step and shared population statistics from ``batches`` training mini-batches per
    network, in training mode (Algorithm 2 at every time step); the batches are drawn from
    their own generator so that training's batch order is untouched."""
    recorder = StepRecorder()
    rng = np.random.default_rng([seed, 7919])
    generator = torch.Generator().manual_seed(seed + 7919)
    n = len(data.train_y)
    # Every batch as long as the longest training sequence: the statistics of a step do not
    # depend on how long a sequence goes on after it, so each step gets all the batches.
    pad = _train_pad(config, data.train_x.shape[1])
    for _ in range(batches):
        idx = np.stack(
            [rng.choice(n, config.batch_size, replace=False) for _ in range(model.groups)]
        )
        x = _pad(data.train_x[torch.as_tensor(idx)], pad, AFTER)
        model(x, recorder=recorder, h0_noise=_noise(config, model.norm), generator=generator)
    return recorder.per_step(config.batch_size), recorder.shared(config.batch_size)


@torch.no_grad()
def _accuracy(
    model: GroupedLSTM,
    x: torch.Tensor,
    y: torch.Tensor,
    stats: PopulationStats | None,
    recorder: StepRecorder | None = None,
    chunk: int = 1000,
) -> list[float]:
    """Each network's accuracy on the sequences ``x`` (N, T, D), in inference mode."""
    correct = torch.zeros(model.groups)
    for start in range(0, len(y), chunk):
        xb = x[start : start + chunk]
        logits = model(xb.unsqueeze(0).expand(model.groups, *xb.shape), stats, recorder)
        correct += (logits.argmax(-1) == y[start : start + chunk]).sum(1)
    return (correct / len(y)).tolist()


def _modes(model: GroupedLSTM, data: _Sequences, config: Config, batches: int, seed: int):
    """The test-time statistics of each arm this model makes: {mode: stats or None}."""
    if model.norm != "bn":
        return {"batch": None}
    per_step, shared = _population(model, data, config, batches, seed)
    return {"per step": per_step, "shared": shared}


def _feature_std(var: torch.Tensor, eps: float) -> list[list[float]]:
    """(S, G, K) variances -> (S, G): batch norm's divisor sqrt(var + eps), averaged over the
    features."""
    return (var.clamp_min(0) + eps).sqrt().mean(-1).tolist()


def _train_arm(
    norm: str, data: _Sequences, config: Config, checkpoint: Path | None = None
) -> dict[str, Any]:
    """Train one network per seed with ``norm``; evaluate along the way and at the end. With
    ``checkpoint``, an interrupted arm continues where it stopped (the lab's loop,
    :func:`batchnorm.lab.loop.run_loop`)."""
    seeds = config.seed_list()
    pad = config.pad_rows or data.train_x.shape[1]
    job = _ArmJob(norm, data, config)
    model = job.model
    eval_steps = list(eval_schedule(config.steps, config.eval_every))
    loop = run_loop(
        job,
        steps=config.steps,
        eval_steps=eval_steps,
        desc=f"rnn {norm}",
        checkpoint=checkpoint,
        signature=[norm, seeds],
    )
    curve, losses = job.curve, job.losses
    train_seconds, eval_seconds = loop.train_seconds, loop.eval_seconds

    # The final evaluation: Algorithm 2 with more batches, the whole test set, the longer tests.
    start = time.perf_counter()
    model.eval()
    modes = _modes(model, data, config, config.final_popstat_batches, config.steps + 1)
    train_x = data.train_x[: config.train_eval_examples]
    train_y = data.train_y[: config.train_eval_examples]
    final: dict[str, dict[str, list[float]]] = {}
    observed: dict[str, dict[str, list[list[float]]]] = {}
    for mode, stats in modes.items():
        final[mode] = {
            "train": _accuracy(model, train_x, train_y, stats),
            "test": _accuracy(model, data.test_x, data.test_y, stats),
        }
        for where in (AFTER, BEFORE):
            # The statistics the per-step networks actually meet on the longer tests.
            recorder = StepRecorder() if mode == "per step" else None
            padded = _pad(data.test_x, pad, where)
            final[mode][where] = _accuracy(model, padded, data.test_y, stats, recorder)
            if recorder is not None:
                seen = recorder.per_step(1000)  # chunks of 1,000 test sequences
                observed[where] = {t: _feature_std(seen.var[t], config.eps) for t in TERMS}
    result: dict[str, Any] = {
        "norm": norm,
        "seeds": seeds,
        "eval_steps": eval_steps,
        "curve": curve,
        "train_loss": losses,
        "final": final,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds + time.perf_counter() - start,
    }
    if "per step" in modes:
        per_step, shared = modes["per step"], modes["shared"]
        result["population_std"] = {t: _feature_std(per_step.var[t], config.eps) for t in TERMS}
        result["population_mean"] = {t: per_step.mean[t].abs().mean(-1).tolist() for t in TERMS}
        result["shared_std"] = {t: _feature_std(shared.var[t], config.eps)[0] for t in TERMS}
        result["observed_std"] = observed
    model.train()
    return result


class _ArmJob(ModelTask):
    """One arm's networks (one per seed, trained together) as a
    :class:`batchnorm.lab.loop.Task`."""

    saved = ("curve", "losses", "loss_sum", "loss_count")

    def __init__(self, norm: str, data: _Sequences, config: Config) -> None:
        seeds = config.seed_list()
        self.data, self.config, self.norm = data, config, norm
        self.model = GroupedLSTM(
            seeds,
            data.train_x.shape[2],
            config.hidden,
            data.classes,
            norm,
            gain_init=config.ln_gain_init if norm == "ln" else config.gain_init,
            eps=config.eps,
            backend=config.bn_backend,
        )
        self.optimizer = torch.optim.RMSprop(
            self.model.parameters(), lr=config.lr, alpha=config.rmsprop_decay
        )
        self.generator = torch.Generator().manual_seed(config.seed)
        self.pad_rng = np.random.default_rng([config.seed, 104729])  # the same for every arm
        self.train_pad = _train_pad(config, data.train_x.shape[1])
        self.samplers = [iid_batches(len(data.train_y), config.batch_size, s) for s in seeds]
        self.eval_x = data.test_x[: config.eval_examples]
        self.eval_y = data.test_y[: config.eval_examples]
        self.curve: dict[str, list[list[float]]] = {}
        self.losses: list[list[float]] = []
        self.loss_sum, self.loss_count = torch.zeros(len(seeds)), 0

    def train_step(self, step: int) -> bool:
        data, config, model = self.data, self.config, self.model
        idx = torch.as_tensor(np.stack([next(s) for s in self.samplers]))  # (G, B)
        # A batch's sequences: the images, then 0 ... train_pad blank rows (one draw per step).
        xb = _pad(data.train_x[idx], int(self.pad_rng.integers(0, self.train_pad + 1)), AFTER)
        logits = model(xb, h0_noise=_noise(config, self.norm), generator=self.generator)
        loss = model.loss(logits, data.train_y[idx])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        model.clip_grad_norm_(config.clip)
        self.optimizer.step()
        with torch.no_grad():
            per_net = F.cross_entropy(
                logits.detach().transpose(1, 2), data.train_y[idx], reduction="none"
            ).mean(1)
        self.loss_sum += per_net
        self.loss_count += 1
        return True

    def evaluate(self, step: int) -> str:
        if step == 0:
            self.losses.append([math.nan] * len(self.samplers))
        else:
            self.losses.append((self.loss_sum / self.loss_count).tolist())
        self.loss_sum, self.loss_count = torch.zeros(len(self.samplers)), 0
        model, config = self.model, self.config
        model.eval()
        modes = _modes(model, self.data, config, config.popstat_batches, step)
        for mode, stats in modes.items():
            self.curve.setdefault(mode, []).append(
                _accuracy(model, self.eval_x, self.eval_y, stats)
            )
        model.train()
        return ", ".join(f"{mode} {np.mean(acc[-1]):.3f}" for mode, acc in self.curve.items())

    def generators(self) -> list[torch.Generator]:
        return [self.generator]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pad_rng": self.pad_rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        super().load_state_dict(state, step)
        self.pad_rng.bit_generator.state = state["pad_rng"]


# ------------------------------------------------------------------------------------------
# Measure


def measure(config: Config, ctx: Context) -> Measurement:
    """Train the three kinds of network (none, BN, LN) for every seed, evaluate the four arms,
    plot, and report."""
    data = _sequences(ctx, config)
    steps_t = int(data.train_x.shape[1])
    long_steps = steps_t + (config.pad_rows or steps_t)
    max_train_steps = steps_t + _train_pad(config, steps_t)
    jobs: dict[str, dict[str, Any]] = {}
    for norm in ("none", "bn", "ln"):
        with ctx.timer(f"train {norm}"):
            jobs[norm] = cached_job(
                ctx,
                f"rnn-{norm}",
                lambda n=norm: _train_arm(n, data, config, ctx.checkpoint(f"rnn-{n}")),
                as_json=True,
            )
        log(f"[lab] rnn {norm}: trained in {jobs[norm]['train_seconds']:.0f} s")

    def final(arm: str, key: str) -> list[float]:
        norm, mode = _ARM_SOURCE[arm]
        return [float(v) for v in jobs[norm]["final"][mode][key]]

    def curve(arm: str) -> np.ndarray:
        norm, mode = _ARM_SOURCE[arm]
        return np.asarray(jobs[norm]["curve"][mode], dtype=np.float64)  # (E, G)

    eval_steps = [int(s) for s in jobs["none"]["eval_steps"]]
    numbers = Numbers(
        train_steps=steps_t,
        max_train_steps=max_train_steps,
        long_steps=long_steps,
        train={a: final(a, "train") for a in ARMS},
        test={a: final(a, "test") for a in ARMS},
        curve={a: curve(a)[1:].mean(0).tolist() for a in ARMS},
        after={a: final(a, AFTER) for a in ARMS},
        before={a: final(a, BEFORE) for a in ARMS},
    )
    test = {a: np.asarray(numbers.test[a]) for a in ARMS}
    after = {a: np.asarray(numbers.after[a]) for a in ARMS}
    before = {a: np.asarray(numbers.before[a]) for a in ARMS}
    bn = jobs["bn"]

    rows = [
        [
            a,
            fmt_mean_std(numbers.train[a]),
            fmt_mean_std(test[a]),
            fmt_mean_std(numbers.curve[a]),
            fmt_mean_std(after[a]),
            fmt_mean_std(before[a]),
        ]
        for a in ARMS
    ]
    table = md_table(
        [
            "arm",
            f"train acc ({steps_t} steps)",
            f"test acc ({steps_t} steps)",
            "mean test acc along the curve",
            f"test acc, blank rows after ({long_steps} steps)",
            f"test acc, blank rows before ({long_steps} steps)",
        ],
        rows,
    )
    stat_rows = []
    for term, label in zip(TERMS, ("W_x x_t", "W_h h_{t-1}", "c_t")):
        std = np.asarray(bn["population_std"][term]).mean(1)  # (T,)
        stat_rows.append(
            [
                label,
                f"{std[0]:.3f}",
                f"{std[min(3, len(std) - 1)]:.3f}",
                f"{std[steps_t // 2]:.3f}",
                f"{std[steps_t - 1]:.3f}",
                f"{std[-1]:.3f}",
                f"{np.mean(bn['shared_std'][term]):.3f}",
            ]
        )
    stat_table = md_table(
        [
            "term",
            "step 1",
            "step 4",
            f"step {steps_t // 2 + 1}",
            f"step {steps_t} (last image row)",
            f"step {max_train_steps} (T_max)",
            "shared (pooled)",
        ],
        stat_rows,
    )
    mismatch = _beyond_mismatch(bn, max_train_steps)
    comparisons = [
        Comparison(
            "test accuracy: plain LSTM vs BN-LSTM (per-step statistics)",
            "sequential MNIST, 784 pixel steps, 100 units: LSTM 98.9%, BN-LSTM 99.0%; "
            "permuted: 90.2% vs 95.4% (Cooijmans et al. Table 1; a different, longer task)",
            f"{fmt_mean_std(test[NONE])} vs {fmt_mean_std(test[PER_STEP])} ({steps_t} row "
            f"steps, {config.hidden} units, {config.steps} steps of training)",
            float(test[PER_STEP].mean()),
        ),
        Comparison(
            "convergence: mean test accuracy along the learning curve, none vs BN per step",
            "BN-LSTM converges faster (Cooijmans et al. Fig. 2, validation accuracy curves)",
            f"{fmt_mean_std(numbers.curve[NONE])} vs {fmt_mean_std(numbers.curve[PER_STEP])}",
        ),
        Comparison(
            "test accuracy: BN with statistics shared over time vs per time step",
            "separate statistics per time step (Cooijmans et al. Sec. 3); BN appears to need "
            "them (Ba et al. Sec. 1); no number",
            f"{fmt_mean_std(test[SHARED])} vs {fmt_mean_std(test[PER_STEP])}",
            float(test[SHARED].mean()),
        ),
        Comparison(
            "test accuracy: layer norm LSTM",
            "no sequential-MNIST number in Ba et al. (their full text was not read here)",
            fmt_mean_std(test[LN]),
            float(test[LN].mean()),
        ),
        Comparison(
            f"longer test sequences ({long_steps} steps), blank rows after the digit: "
            "none / BN per step / layer norm",
            "population statistics of step T_max reused beyond it (Cooijmans et al. Sec. 3; "
            "activations settle to a steady state, Fig. 5)",
            f"{after[NONE].mean():.4f} / {after[PER_STEP].mean():.4f} / {after[LN].mean():.4f}",
        ),
        Comparison(
            f"longer test sequences ({long_steps} steps), blank rows before the digit: "
            "none / BN per step / layer norm",
            "per-step statistics are a problem for test sequences longer than any in "
            "training (Ba et al. Sec. 1)",
            f"{before[NONE].mean():.4f} / {before[PER_STEP].mean():.4f} / {before[LN].mean():.4f}",
        ),
    ]
    ctx.write_csv("curves.csv", _curve_rows(jobs, eval_steps), CURVE_FIELDS)
    with ctx.timer("plots"):
        _plot_curves(ctx, jobs, eval_steps)
        _plot_statistics(ctx, bn, (steps_t, max_train_steps))
    metrics = {
        "final_train_acc": numbers.train,
        "final_test_acc": numbers.test,
        "curve_mean_test_acc": numbers.curve,
        "long_after_test_acc": numbers.after,
        "long_before_test_acc": numbers.before,
        "eval_steps": eval_steps,
        "train_steps": steps_t,
        "long_steps": long_steps,
        "beyond_training_std_mismatch": mismatch,
        "population_std": bn["population_std"],
        "shared_std": bn["shared_std"],
        "train_seconds": {n: jobs[n]["train_seconds"] for n in jobs},
        "baseline": f"plain LSTM ({config.hidden} units, no normalization)",
        **baseline_metrics(numbers.train[NONE], numbers.test[NONE]),
    }
    return Measurement(
        numbers=numbers,
        comparisons=comparisons,
        metrics=metrics,
        tables=[
            ("By arm (at the end)", table),
            (
                "Per-step population statistics of the BN per step networks (the divisor "
                "sqrt(var + eps), mean over features and seeds)",
                stat_table,
            ),
            (
                "Beyond the longest training sequence: the statistics the per-step networks meet "
                "on the longer tests against the reused step-T_max statistics (mean over steps "
                f"{max_train_steps + 1}-{long_steps} and seeds of |log(observed / used)|, "
                "each the divisor sqrt(var + eps) averaged over the features)",
                md_table(
                    ["test", *[f"{t}" for t in ("W_x x_t", "W_h h_{t-1}", "c_t")]],
                    [[w, *[f"{mismatch[w][t]:.3f}" for t in TERMS]] for w in (AFTER, BEFORE)],
                ),
            ),
        ],
        figures=[
            (
                "rnn.png",
                "Test accuracy and training loss along training (mean and range over seeds)",
            ),
            (
                "rnn_stats.png",
                "Per-step population statistics of the BN per step networks, and "
                "the statistics they meet on the longer tests",
            ),
        ],
        choices=[
            f"data: {config.dataset} read row by row ({steps_t} steps of "
            f"{int(data.train_x.shape[2])} pixels), not pixel by pixel as Cooijmans et al. "
            "Sec. 5.1 (784 steps would not train here in minutes)",
            f"cell: Cooijmans et al. Eqs. 6-8 (input and recurrent terms normalized separately, "
            f"gains without shifts; the cell state normalized before its tanh), {config.hidden} "
            "units, one layer, a linear classifier on the last hidden state",
            f"batch norm's gains start at {config.gain_init} (Cooijmans et al. Sec. 4, Fig. 1); "
            f"layer norm's at {config.ln_gain_init} (Ba et al. state no value for this cell)",
            "initial weights: PyTorch's nn.LSTM default (uniform +-1/sqrt(units)), forget-gate "
            "bias +1 (the authors' code also adds 1); Cooijmans et al. Sec. 5.1 use orthogonal "
            "matrices and an identity block instead; the same initial weights and batch order "
            "for every arm of a seed",
            f"training: RMSProp at {config.lr} with decay {config.rmsprop_decay}, gradient "
            f"norm clipped at {config.clip} per network (Cooijmans et al. Sec. 5.1 and the "
            f"authors' sequential_mnist.py), batches of {config.batch_size} (the paper's other "
            f"tasks; the authors' MNIST script uses 100), {config.steps} steps, the final "
            "networks (no early stopping)",
            f"batch norm's initial hidden state gets Gaussian noise of std {config.h0_noise} "
            "in training and for the population statistics (Cooijmans et al. Sec. 5.1: the "
            "first steps of in-order MNIST are alike for every example, so the recurrent "
            "term's batch variance is exactly zero and its gradient explodes; the authors' "
            "script uses 0.1); h_0 = 0 at test time; the plain and layer-norm LSTMs have "
            "h_0 = 0 throughout",
            f"sequence lengths: every training batch is its images followed by 0 ... "
            f"{max_train_steps - steps_t} blank rows (drawn per batch, the same draws for "
            f"every arm), so the longest training sequence is T_max = {max_train_steps} and "
            "every arm learns to keep its answer through blank rows; per-step population "
            f"statistics for steps 1 ... {max_train_steps}, from batches of full length (a "
            "step's statistics do not depend on what follows it)",
            "batch norm in training: the mini-batch statistics of each time step; at test: "
            f"population statistics from {config.final_popstat_batches} training batches "
            "(Algorithm 2 at every step; "
            f"{config.popstat_batches} batches along the curve); per step, with steps beyond "
            "the training length reusing the last step's (Cooijmans et al. Sec. 3), or one set "
            "pooled over examples and steps ('BN shared': the same networks, test-time "
            "statistics only; training with shared statistics is not causal for the recurrent "
            "term)",
            f"longer tests ({long_steps} steps, beyond T_max = {max_train_steps}): "
            f"{config.pad_rows or steps_t} blank rows after, or before, every test image. "
            "'After' continues the sequences as in training, further than any went "
            "(Cooijmans' steady-state case); 'before' puts the digit at steps "
            f"{long_steps - steps_t + 1}-{long_steps}, read with statistics of blank steps "
            "(Ba et al.'s concern); the plain LSTM, which uses no statistics, is the control: "
            "where it falls below 0.5 on a longer test, the claims compared with it are not "
            "tested",
            "train accuracy on the first "
            f"{min(config.train_eval_examples, len(data.train_y))} training images, inference "
            "mode; the learning curve on the first "
            f"{min(config.eval_examples, len(data.test_y))} test images",
            "rules paired by seed: a difference counts when its mean clears 2 standard errors "
            "of the per-seed differences, and at least 0.0005; an arm whose final train "
            "accuracy is below 0.5 did not train, and claims about it are not tested",
        ],
        notes=[
            "Cooijmans et al. were read in the LaTeX source of the paper in the authors' "
            "repository (cooijmanstim/recurrent-batch-normalization, paper/index.tex) and "
            "their sequential_mnist.py and experiment scripts (epsilon 1e-5, noise 0.1, "
            "RMSProp decay 0.9, clipping 1); Ba et al. only through quotations of Sec. 1 and "
            "their related-work section, not the full text (their gain initialization for "
            "the LSTM is not known here).",
            "A row-by-row LSTM on MNIST is a short-sequence task (28 steps): the paper's "
            "784-step task is where vanishing gradients and the gain initialization matter "
            "most; the comparison is of the shape of the results, not of the numbers.",
        ],
    )


def _beyond_mismatch(bn: dict[str, Any], steps_t: int) -> dict[str, dict[str, float]]:
    """For each longer test and term: the mean over the steps past the longest training
    sequence (``steps_t``) and the seeds of |log(observed / reused)|, each the divisor
    sqrt(var + eps) averaged over the features."""
    out: dict[str, dict[str, float]] = {}
    for where, terms in bn["observed_std"].items():
        out[where] = {}
        for term in TERMS:
            observed = np.asarray(terms[term], dtype=np.float64)[steps_t:]  # (T', G)
            used = np.asarray(bn["population_std"][term], dtype=np.float64)[-1]  # (G,)
            ratio = np.abs(np.log(observed / used))
            out[where][term] = float(np.nanmean(ratio)) if ratio.size else math.nan
    return out


CURVE_FIELDS = ["variant", "seed", "step", "test_acc", "train_loss"]


def _curve_rows(jobs: dict[str, dict[str, Any]], eval_steps: list[int]) -> list[dict[str, Any]]:
    rows = []
    for arm in ARMS:
        norm, mode = _ARM_SOURCE[arm]
        job = jobs[norm]
        for e, step in enumerate(eval_steps):
            for g, seed in enumerate(job["seeds"]):
                rows.append(
                    {
                        "variant": arm,
                        "seed": seed,
                        "step": step,
                        "test_acc": job["curve"][mode][e][g],
                        "train_loss": job["train_loss"][e][g],
                    }
                )
    return rows


def _plot_curves(ctx: Context, jobs: dict[str, dict[str, Any]], eval_steps: list[int]) -> None:
    from batchnorm.lab.plots import band, new_figure

    figure, axes = new_figure(2, 1)
    for arm in ARMS:
        norm, mode = _ARM_SOURCE[arm]
        acc = np.asarray(jobs[norm]["curve"][mode], dtype=np.float64)
        style = "--" if arm == SHARED else "-"
        band(axes[0, 0], eval_steps, acc, label=arm, color=COLORS[arm], linestyle=style)
        if arm != SHARED:  # the shared arm is the per-step networks: the same training loss
            loss = np.asarray(jobs[norm]["train_loss"], dtype=np.float64)
            band(axes[0, 1], eval_steps[1:], loss[1:], label=arm, color=COLORS[arm])
    axes[0, 0].set(xlabel="training step", ylabel="test accuracy", title="test accuracy")
    axes[0, 1].set(
        xlabel="training step", ylabel="cross-entropy", title="training loss", yscale="log"
    )
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ctx.save_figure(figure, "rnn.png")


def _plot_statistics(ctx: Context, bn: dict[str, Any], marks: tuple[int, int]) -> None:
    from batchnorm.lab.plots import new_figure

    figure, axes = new_figure(3, 1)
    labels = {"x": "W_x x_t", "h": "W_h h_{t-1}", "c": "c_t"}
    for ax, term in zip(axes[0], TERMS):
        population = np.asarray(bn["population_std"][term], dtype=np.float64).mean(1)
        steps = np.arange(1, len(population) + 1)
        ax.plot(steps, population, color="tab:blue", label="population std, per step")
        ax.axhline(
            np.mean(bn["shared_std"][term]),
            color="tab:orange",
            linestyle="--",
            label="shared (pooled over steps)",
        )
        for where, color in ((AFTER, "tab:green"), (BEFORE, "tab:purple")):
            observed = np.asarray(bn["observed_std"][where][term], dtype=np.float64).mean(1)
            ax.plot(
                np.arange(1, len(observed) + 1),
                observed,
                color=color,
                linewidth=0.8,
                label=f"observed on test, blank rows {where}",
            )
        for mark in marks:  # the last image row; the longest training sequence
            ax.axvline(mark + 0.5, color="grey", linewidth=0.8)
        ax.set(xlabel="time step", ylabel="sqrt(var + eps), mean over features", title=labels[term])
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    ctx.save_figure(figure, "rnn_stats.png")


EXPERIMENT = Experiment(
    name="rnn",
    title=(
        "Normalizing a recurrent network: batch norm per time step, shared over time, or layer "
        "norm (Cooijmans et al. 2016; Ba et al. 2016)"
    ),
    claim=(
        "Batch norm suits recurrent networks only with statistics per time step (then it trains "
        "an LSTM at least as well and faster); layer norm needs no batch statistics and "
        "carries over to sequences longer than in training."
    ),
    paper=(
        "Cooijmans et al. (2016, arXiv 1603.09025), Sec. 3-5.1, Fig. 1-2, Table 1; Ba et al. "
        "(2016, arXiv 1607.06450), Sec. 1, 3.1. Stand-in: MNIST read row by row (28 steps) by "
        "a 64-unit LSTM, longer tests with blank rows added."
    ),
    config_cls=Config,
    numbers_cls=Numbers,
    measure=measure,
    judge=judge,
    summary="LSTM on row-by-row MNIST: none / BN shared / BN per step / LN, longer test sequences",
)
