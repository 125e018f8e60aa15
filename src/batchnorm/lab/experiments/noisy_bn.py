"""Noisy batch norm: BN helps even when the layer input distributions are made unstable.

Claim (Santurkar, Tsipras, Ilyas, Madry 2018, arXiv 1805.11604, Sec. 2.1, **Figure 2**): if
BN worked by stabilizing the distributions of layer inputs, then injecting a random,
time-varying shift after every BN layer should remove its benefit. It does not: "noisy BN"
trains about as well as BN and better than the standard network, although the distribution of
its layer inputs is less stable than the standard network's. The paper's noise (Sec. 2.1 and
its appendix, as SPEC.md 4.2 gives it), per step and unit j: mu_j ~ U(-0.5, 0.5),
sigma_j ~ U(1, 1.25); per sample i: m_ij ~ U(mu_j - 0.1, mu_j + 0.1), s_ij ~ N(sigma_j, 0.1);
a_ij <- s_ij a_ij + m_ij, after each BN layer (:mod:`batchnorm.lab.theory.noisy_bn`): i.i.d.
noise of non-zero mean and non-unit variance whose distribution changes at every step. Figure 2
shows VGG on CIFAR-10 at lr 0.1 and 0.5: the accuracy over training, and histograms of a
layer's activations over training.

Stand-in: the small VGG-style CNN of :mod:`batchnorm.lab.experiments.cnn` on a Fashion-MNIST
subset (CIFAR-10 is not available here), standard vs BN vs noisy BN, paired by seed (same
initial weights and batches), fixed-lr SGD at the paper's two learning rates.

Evaluation. The noise is a training-time device: the networks are scored without it. The moving
averages of a noisy network are collected while the noise is on, so they describe inputs the
network never sees at test time; every arm is therefore scored with population statistics
recomputed after training with the noise off (Algorithm 2 of Ioffe & Szegedy,
:func:`batchnorm.inference.recalibrate`), on the training subset (training accuracy) and the
test subset. The moving-average accuracies are reported beside them.

Stability. What the noise does to a layer's input distribution is to move it at every step, not
to make it drift slowly over training. Every ``stability_every`` steps, at two consecutive steps
t and t+1 (before each update, in training mode, noise included), the 5th, 10th, ..., 95th
percentiles Q_t(q) of every channel's input to its ReLU in conv layer ``tracked_layer`` are taken
over the step's batch (N x H x W values). The step-to-step change of a channel is
``mean_q |Q_(t+1)(q) - Q_t(q)| / (Q_t(0.85) - Q_t(0.15))``: a quantile (Wasserstein-1) distance
between the two distributions, in units of the distribution's own spread, so that networks whose
activations differ in scale compare. A network's *instability* is the median over channels of
that change averaged over the pairs. (The slow drift of one unit's median, as in ``fig1``, is
reported for context.)

Rules (in code), at each learning rate, every comparison paired by seed with a margin of
``spread_factor`` standard errors of the per-seed differences (at least ``min_tolerance``,
:func:`batchnorm.lab.rules.paired_tolerance`); a claim holds when it holds at every learning rate
where it could be tested:
(1) "as-bn": noisy BN's final training accuracy minus BN's is at least minus the margin;
(2) "beats-standard": noisy BN's final training accuracy minus the standard network's is above
the margin;
(3) "less-stable": noisy BN's instability minus the standard network's is above the margin.
A comparison involving a network that did not train (training accuracy below ``train_floor``) is
"not tested" at that learning rate, except a standard network that did not train in (2), which
noisy BN then beats (Figure 2 at lr 0.5).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

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
    BN,
    COLORS,
    NOISY,
    STANDARD,
    VARIANTS,
    CNNConfig,
    ImageData,
    VGGStyle,
    batch_order,
    cached_job,
    drift_numbers,
    evaluate,
    image_data,
    network_choice,
)
from batchnorm.lab.loop import ModelTask, eval_schedule, run_loop
from batchnorm.lab.rules import (
    baseline_metrics,
    beyond_tolerance,
    not_tested,
    paired_tolerance,
    untrained,
)

__all__ = ["Config", "Numbers", "EXPERIMENT", "measure", "judge", "instability"]

QUANTILES = (0.15, 0.5, 0.85)
# The percentiles whose step-to-step change is the instability: 5th, 10th, ..., 95th.
GRID = tuple(round(0.05 * k, 2) for k in range(1, 20))
_LOW, _HIGH = GRID.index(0.15), GRID.index(0.85)


@dataclass(frozen=True)
class Config(CNNConfig):
    """Standard vs BN vs noisy BN. Defaults are the full protocol (~12 min, 1 thread)."""

    steps: int = param(1000, "SGD steps per network")
    seeds: int = param(3, "number of seeds (each: initial weights, data order, noise)")
    lrs: tuple[float, ...] = param((0.1, 0.5), "learning rates (the paper: 0.1 and 0.5)")
    eval_every: int = param(500, "evaluate (moving-average accuracy, percentiles) every this many")
    stability_every: int = param(
        10, "measure the step-to-step change of the layer inputs at steps t, t+1 every this many"
    )
    tracked_layer: int = param(2, "conv layer (1-based) whose inputs to the ReLU are measured")
    tracked_unit: int = param(0, "channel of that layer whose percentiles are plotted")
    popstat_batches: int = param(
        100, "training mini-batches for the population statistics (noise off) after training"
    )

    def validate(self) -> None:
        super().validate()
        if not self.lrs or any(not (math.isfinite(lr) and lr > 0) for lr in self.lrs):
            raise ValueError(f"lrs must list positive learning rates, got {self.lrs}")
        for name in ("eval_every", "stability_every", "popstat_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.steps < 2:
            raise ValueError("steps must be at least 2 (a pair of consecutive steps)")
        if not 1 <= self.tracked_layer <= len(self.channels):
            raise ValueError(
                f"tracked_layer must be a conv layer, 1..{len(self.channels)}, "
                f"got {self.tracked_layer}"
            )
        width = self.channels[self.tracked_layer - 1]
        if not 0 <= self.tracked_unit < width:
            raise ValueError(
                f"tracked_unit must be a channel of layer {self.tracked_layer}, 0..{width - 1}"
            )

    def quick(self) -> Config:
        """A smoke test: 200 steps, 1 seed, smaller subsets."""
        return replace(
            super().quick(), eval_every=50, eval_examples=1000, popstat_batches=10, seeds=1
        )


def instability(pairs: np.ndarray) -> float:
    """A network's instability from the percentiles of its consecutive steps.

    Args:
        pairs: (P, 2, len(GRID), C): for each of P pairs of consecutive steps (t, t+1), the
            percentiles :data:`GRID` of each of C channels. Pairs with a non-finite value are
            left out.

    Returns:
        The median over channels of ``mean over pairs of mean_q |Q_(t+1)(q) - Q_t(q)| /
        (Q_t(0.85) - Q_t(0.15))``; nan when no pair is finite.

    >>> q = np.linspace(-1.0, 1.0, len(GRID))[None, None, :, None].repeat(2, axis=1)
    >>> q[:, 1] += 0.5                  # the whole distribution moved by 0.5 in one step
    >>> round(instability(q), 4)        # 0.5 / (Q(0.85) - Q(0.15) = 1.5556)
    0.3214
    """
    p = np.asarray(pairs, dtype=np.float64)
    if p.ndim != 4 or p.shape[1] != 2 or p.shape[2] != len(GRID):
        raise ValueError(f"pairs must have shape (P, 2, {len(GRID)}, C), got {p.shape}")
    p = p[np.all(np.isfinite(p), axis=(1, 2, 3))]
    if not len(p):
        return math.nan
    spread = np.maximum(p[:, 0, _HIGH] - p[:, 0, _LOW], 1e-12)  # (P, C)
    change = np.abs(p[:, 1] - p[:, 0]).mean(axis=1) / spread  # (P, C)
    return float(np.median(change.mean(axis=0)))


def _noise_off_forward(data: ImageData) -> Callable[[torch.nn.Module, torch.Tensor], None]:
    """``forward(model, indices)`` for :func:`batchnorm.inference.recalibrate`: the batch of
    those training images, with every noise module switched off (BN in training mode)."""
    from batchnorm.lab.theory.noisy_bn import BatchNormNoise

    def forward(model: torch.nn.Module, idx: torch.Tensor) -> None:
        for module in model.modules():
            if isinstance(module, BatchNormNoise):
                module.training = False  # recalibrate puts every flag back afterwards
        model(data.train_x[idx])

    return forward


def _scores(model: VGGStyle, data: ImageData, n_train: int) -> tuple[float, float]:
    """Training and test accuracy in inference mode (noise off)."""
    train = evaluate(model, data.train_x[:n_train], data.train_y[:n_train])[0]
    return train, evaluate(model, data.test_x, data.test_y)[0]


def _train(
    config: Config,
    data: ImageData,
    variant: str,
    lr: float,
    seed: int,
    desc: str,
    checkpoint: Path | None = None,
) -> dict:
    """One network: SGD for ``config.steps`` steps; curves, percentiles, final accuracies."""
    from batchnorm.inference import recalibrate

    model = VGGStyle.for_config(config, data, variant, seed)
    model.train()
    job = _NoisyJob(config, data, model, lr, seed)
    schedule = list(eval_schedule(config.steps, config.eval_every))
    loop = run_loop(
        job,
        steps=config.steps,
        eval_steps=schedule,
        desc=desc,
        checkpoint=checkpoint,
        signature=[variant, lr, seed],
    )
    start = time.perf_counter()
    steps, train_acc, test_acc, train_loss, pct = (
        job.steps,
        job.train_acc,
        job.test_acc,
        job.train_loss,
        job.pct,
    )
    n_eval = job.n_eval
    result: dict = {"diverged_at": job.diverged_at}
    if job.diverged_at >= 0:  # a diverged network counts as chance from there on
        chance = 1.0 / data.num_classes
        for step in schedule[len(steps) :]:
            steps.append(step)
            train_acc.append(chance)
            test_acc.append(chance)
            train_loss.append(math.nan)
            pct.append([math.nan] * 3)
        result.update(
            final_train_acc=chance,
            final_test_acc=chance,
            ema_train_acc=chance,
            ema_test_acc=chance,
            instability=math.nan,
        )
    else:
        ema_train, ema_test = _scores(model, data, n_eval)
        if variant != STANDARD:
            popstat_order = batch_order(
                len(data.train_y), config.batch_size, config.popstat_batches, 7919 + seed
            )
            recalibrate(
                model,
                [torch.from_numpy(idx) for idx in popstat_order],
                forward=_noise_off_forward(data),
                progress=False,
            )
        final_train, final_test = _scores(model, data, n_eval)
        result.update(
            final_train_acc=final_train,
            final_test_acc=final_test,
            ema_train_acc=ema_train,
            ema_test_acc=ema_test,
            instability=instability(np.asarray(job.pairs)) if job.pairs else math.nan,
        )
    result.update(
        steps=steps,
        train_acc=train_acc,
        test_acc=test_acc,
        train_loss=train_loss,
        percentiles=pct,
        pair_steps=job.pair_steps,
        seconds=loop.train_seconds + loop.eval_seconds + time.perf_counter() - start,
    )
    return result


class _NoisyJob(ModelTask):
    """One :func:`_train` network as a :class:`batchnorm.lab.loop.Task`.

    Every step's forward pass also observes: at evaluation steps (every ``eval_every`` and the
    last) the tracked unit's percentiles, the loss and both accuracies; at stability pairs the
    per-channel percentiles. So the observations live in :meth:`train_step` (one forward, as in
    training), and :meth:`evaluate` only makes the last step's observation (a forward without an
    update); at the other evaluation steps it leaves the loop a clean point to checkpoint at,
    before that step's forward.
    """

    saved = (
        "steps",
        "train_acc",
        "test_acc",
        "train_loss",
        "pct",
        "pair_steps",
        "pairs",
        "pending",
        "diverged_at",
    )

    def __init__(
        self, config: Config, data: ImageData, model: VGGStyle, lr: float, seed: int
    ) -> None:
        self.config, self.data, self.model = config, data, model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        self.order = batch_order(len(data.train_y), config.batch_size, config.steps + 1, seed)
        self.n_eval = min(config.eval_examples, len(data.train_y))
        self.steps: list[int] = []
        self.train_acc: list[float] = []
        self.test_acc: list[float] = []
        self.train_loss: list[float] = []
        self.pct: list[list[float]] = []
        self.pair_steps: list[int] = []
        self.pairs: list[list] = []  # per pair: (2, len(GRID), C)
        self.pending: torch.Tensor | None = None
        self.diverged_at = -1

    def _observe(self, step: int) -> torch.Tensor:
        """The forward pass on step ``step``'s batch, with what it observes; its loss."""
        config, data, model = self.config, self.data, self.model
        at_eval = step % config.eval_every == 0 or step == config.steps
        at_pair = step < config.steps and step % config.stability_every in (0, 1)
        x, y = data.train_x[self.order[step]], data.train_y[self.order[step]]
        model.keep_pre_activations = at_eval or at_pair
        loss = torch.nn.functional.cross_entropy(model(x), y)
        model.keep_pre_activations = False
        if at_eval or at_pair:
            z = model.pre_activations[config.tracked_layer - 1]  # (N, C, H, W)
            if at_eval:
                unit = z[:, config.tracked_unit].reshape(-1).double()
                q = torch.tensor(QUANTILES, dtype=torch.float64)
                self.pct.append(torch.quantile(unit, q).tolist())
                self.steps.append(step)
                self.train_loss.append(float(loss.detach()))
                n = self.n_eval
                self.train_acc.append(evaluate(model, data.train_x[:n], data.train_y[:n])[0])
                self.test_acc.append(evaluate(model, data.test_x, data.test_y)[0])
            if at_pair:
                per_channel = z.transpose(0, 1).reshape(z.shape[1], -1).double()  # (C, N*H*W)
                grid = torch.tensor(GRID, dtype=torch.float64)
                percentiles = torch.quantile(per_channel, grid, dim=1)  # (len(GRID), C)
                if step % config.stability_every == 0:
                    self.pending = percentiles
                elif self.pending is not None:
                    self.pairs.append(torch.stack([self.pending, percentiles]).tolist())
                    self.pair_steps.append(step - 1)
                    self.pending = None
        return loss

    def train_step(self, step: int) -> bool:
        loss = self._observe(step)
        if not math.isfinite(float(loss.detach())):
            self.diverged_at = step
            return False
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return True

    def evaluate(self, step: int) -> str | None:
        if step == self.config.steps:  # one more batch for the percentiles, no update
            self._observe(step)
        return f"test acc {self.test_acc[-1]:.3f}" if self.test_acc else None

    def generators(self) -> list[torch.Generator]:
        return [self.model.noise_generator]


@dataclass
class Numbers:
    """What the claims are decided on, keyed by variant, then [lr][seed] (seeds paired)."""

    lrs: list[float]  # sorted ascending
    train: dict[str, list[list[float]]]  # final training accuracy, population statistics
    test: dict[str, list[list[float]]]  # final test accuracy, population statistics
    instability: dict[str, list[list[float]]]  # step-to-step change (nan: diverged)


def judge(
    numbers: Numbers,
    *,
    spread_factor: float = 2.0,
    min_tolerance: float = 0.0005,
    train_floor: float = 0.5,
) -> list[Claim]:
    """Decide the claims from ``numbers`` alone (rules in the module docstring).

    Args:
        numbers: what :func:`measure` measured.
        spread_factor, min_tolerance: the margin of :func:`batchnorm.lab.rules.paired_tolerance`.
        train_floor: a network whose mean final training accuracy is below this did not train.
    """
    n = numbers

    def arr(values: dict[str, list[list[float]]], v: str, i: int) -> np.ndarray:
        return np.asarray(values[v][i], dtype=np.float64)

    def tol(d: np.ndarray) -> float:
        return paired_tolerance(d, spread_factor=spread_factor, min_tolerance=min_tolerance)

    def beyond(d: np.ndarray) -> bool:
        return beyond_tolerance(d, spread_factor=spread_factor, min_tolerance=min_tolerance)

    def decide(name, statement, rule, per_lr) -> Claim:
        """``per_lr(i)`` gives (reason it is not tested or None, held, evidence) at lr i."""
        results = [(lr, *per_lr(i)) for i, lr in enumerate(n.lrs)]
        tested = [(lr, ok, ev) for lr, reason, ok, ev in results if reason is None]
        evidence = "; ".join(
            f"lr {lr:g}: " + (ev if reason is None else f"not tested ({reason}); {ev}")
            for lr, reason, ok, ev in results
        )
        if not tested:
            return not_tested(name, statement, rule, evidence)
        return Claim(name, statement, rule, all(ok for _, ok, _ in tested), evidence)

    def as_bn(i: int):
        noisy, bn = arr(n.train, NOISY, i), arr(n.train, BN, i)
        d = noisy - bn
        reason = untrained({BN: bn, NOISY: noisy}, train_floor)
        evidence = (
            f"train {noisy.mean():.4f} (noisy BN) vs {bn.mean():.4f} (BN), difference "
            f"{np.mean(d):+.4f}, margin {tol(d):.4f}; test {arr(n.test, NOISY, i).mean():.4f} vs "
            f"{arr(n.test, BN, i).mean():.4f}"
        )
        return reason, bool(np.mean(d) >= -tol(d)), evidence

    def beats_standard(i: int):
        noisy, standard = arr(n.train, NOISY, i), arr(n.train, STANDARD, i)
        d = noisy - standard
        reason = untrained({NOISY: noisy}, train_floor)
        evidence = (
            f"train {noisy.mean():.4f} (noisy BN) vs {standard.mean():.4f} (standard), "
            f"difference {np.mean(d):+.4f}, margin {tol(d):.4f}; test "
            f"{arr(n.test, NOISY, i).mean():.4f} vs {arr(n.test, STANDARD, i).mean():.4f}"
        )
        return reason, beyond(d), evidence

    def less_stable(i: int):
        noisy, standard = arr(n.instability, NOISY, i), arr(n.instability, STANDARD, i)
        d = noisy - standard
        reason = untrained(
            {NOISY: arr(n.train, NOISY, i), STANDARD: arr(n.train, STANDARD, i)}, train_floor
        )
        if reason is None and not np.isfinite(d).any():
            reason = "no finite instability (a network diverged)"
        evidence = (
            f"instability {np.nanmean(noisy):.4f} (noisy BN) vs {np.nanmean(standard):.4f} "
            f"(standard), BN {np.nanmean(arr(n.instability, BN, i)):.4f}; difference "
            f"{np.nanmean(d):+.4f}, margin {tol(d):.4f}"
        )
        return reason, beyond(d), evidence

    margin = (
        f"{spread_factor:g} standard errors of the per-seed differences (at least "
        f"{min_tolerance:g})"
    )
    return [
        decide(
            "as-bn",
            "Noisy BN trains about as well as BN.",
            "at every lr where both trained, noisy BN's final training accuracy minus BN's "
            f"(population statistics, noise off; paired by seed) is at least minus {margin}",
            as_bn,
        ),
        decide(
            "beats-standard",
            "Noisy BN trains better than the standard network.",
            "at every lr where noisy BN trained, its final training accuracy minus the standard "
            f"network's (paired by seed) is above {margin}",
            beats_standard,
        ),
        decide(
            "less-stable",
            "Yet the layer input distributions of noisy BN are less stable than the standard "
            "network's.",
            "at every lr where both trained, noisy BN's instability (step-to-step change of the "
            "tracked layer's input distributions, in units of their spread) minus the standard "
            f"network's (paired by seed) is above {margin}",
            less_stable,
        ),
    ]


def measure(config: Config, ctx: Context) -> Measurement:
    """Train the three variants at every learning rate and seed; measure; plot."""
    data = image_data(ctx, config)
    lrs = tuple(sorted(set(config.lrs)))
    jobs: dict[tuple[str, float, int], dict] = {}
    with ctx.timer("train"):
        for lr in lrs:
            for seed in config.seed_list():
                for variant in VARIANTS:
                    key = f"{variant.replace(' ', '_')}-lr{lr:g}-seed{seed}"
                    jobs[variant, lr, seed] = cached_job(
                        ctx,
                        key,
                        lambda v=variant, lr=lr, s=seed, k=key: _train(
                            config, data, v, lr, s, k, ctx.checkpoint(k)
                        ),
                        as_json=True,
                    )
    seeds = config.seed_list()

    def finals(variant: str, lr: float, what: str) -> np.ndarray:
        return np.array(
            [math.nan if (x := jobs[variant, lr, s].get(what)) is None else x for s in seeds],
            dtype=np.float64,
        )

    def drifts(variant: str, lr: float) -> np.ndarray:
        out = []
        for s in seeds:
            p = np.asarray(jobs[variant, lr, s]["percentiles"], dtype=np.float64)
            p = p[np.all(np.isfinite(p), axis=1)]
            out.append(drift_numbers(p) if len(p) > 1 else (math.nan, math.nan))
        return np.array(out)  # (S, 2): median drift, spread ratio

    keys = [(v, lr) for v in VARIANTS for lr in lrs]
    train = {k: finals(*k, "final_train_acc") for k in keys}
    test = {k: finals(*k, "final_test_acc") for k in keys}
    ema_train = {k: finals(*k, "ema_train_acc") for k in keys}
    ema_test = {k: finals(*k, "ema_test_acc") for k in keys}
    unstable = {k: finals(*k, "instability") for k in keys}
    drift = {k: drifts(*k) for k in keys}

    def mean(values: np.ndarray) -> float:
        finite = values[np.isfinite(values)]
        return float(finite.mean()) if finite.size else math.nan

    numbers = Numbers(
        lrs=list(lrs),
        train={v: [train[v, lr].tolist() for lr in lrs] for v in VARIANTS},
        test={v: [test[v, lr].tolist() for lr in lrs] for v in VARIANTS},
        instability={v: [unstable[v, lr].tolist() for lr in lrs] for v in VARIANTS},
    )
    comparisons = []
    paper_acc = {
        0.1: "BN ~83%, standard ~80% test; noisy BN close to BN (CIFAR-10, VGG)",
        0.5: "the standard network does not train; BN and noisy BN do",
    }
    for lr in lrs:
        comparisons.append(
            Comparison(
                f"final train / test accuracy at lr {lr:g}: standard, BN, noisy BN "
                "(population statistics, noise off)",
                paper_acc.get(lr, "-"),
                ", ".join(f"{mean(train[v, lr]):.4f} / {mean(test[v, lr]):.4f}" for v in VARIANTS),
                mean(train[NOISY, lr]),
            )
        )
        comparisons.append(
            Comparison(
                f"instability (step-to-step change) at lr {lr:g}: standard / BN / noisy BN",
                "noisy BN's distributions are the least stable (Figure 2, histograms)",
                " / ".join(f"{mean(unstable[v, lr]):.4f}" for v in VARIANTS),
                mean(unstable[NOISY, lr]),
            )
        )
    rows = []
    for lr in lrs:
        for v in VARIANTS:
            diverged = sum(jobs[v, lr, s]["diverged_at"] >= 0 for s in seeds)
            rows.append(
                [
                    f"{lr:g}",
                    v,
                    fmt_mean_std(train[v, lr]),
                    fmt_mean_std(test[v, lr]),
                    fmt_mean_std(ema_train[v, lr]),
                    fmt_mean_std(ema_test[v, lr]),
                    fmt_mean_std(unstable[v, lr]),
                    fmt_mean_std(drift[v, lr][:, 0], 3),
                    str(diverged),
                ]
            )
    table = md_table(
        [
            "lr",
            "variant",
            "train acc (pop. stats)",
            "test acc (pop. stats)",
            "train acc (moving avg.)",
            "test acc (moving avg.)",
            "instability",
            "median drift (context)",
            "diverged",
        ],
        rows,
    )
    curve_rows, pct_rows = [], []
    for (v, lr, s), job in jobs.items():
        for t, step in enumerate(job["steps"]):
            curve_rows.append(
                {
                    "step": step,
                    "variant": v,
                    "seed": s,
                    "lr": lr,
                    "test_acc": job["test_acc"][t],
                    "train_acc": job["train_acc"][t],
                    "train_loss": job["train_loss"][t],
                }
            )
            p15, p50, p85 = job["percentiles"][t]
            pct_rows.append(
                {"step": step, "variant": v, "seed": s, "lr": lr}
                | {"p15": p15, "p50": p50, "p85": p85}
            )
    ctx.write_csv(
        "curves.csv",
        curve_rows,
        ["step", "variant", "seed", "lr", "test_acc", "train_acc", "train_loss"],
    )
    ctx.write_csv(
        "percentiles.csv", pct_rows, ["step", "variant", "seed", "lr", "p15", "p50", "p85"]
    )
    with ctx.timer("plots"):
        _plot(ctx, config, jobs, lrs)
    base_lr = lrs[0]
    return Measurement(
        numbers=numbers,
        comparisons=comparisons,
        metrics={
            **baseline_metrics(train[BN, base_lr], test[BN, base_lr]),
            "baseline": f"BN at lr {base_lr:g} (population statistics)",
            "lrs": lrs,
            "final_train_acc": {v: {f"{lr:g}": train[v, lr] for lr in lrs} for v in VARIANTS},
            "final_test_acc": {v: {f"{lr:g}": test[v, lr] for lr in lrs} for v in VARIANTS},
            "ema_train_acc": {v: {f"{lr:g}": ema_train[v, lr] for lr in lrs} for v in VARIANTS},
            "ema_test_acc": {v: {f"{lr:g}": ema_test[v, lr] for lr in lrs} for v in VARIANTS},
            "instability": {v: {f"{lr:g}": unstable[v, lr] for lr in lrs} for v in VARIANTS},
            "median_drift": {v: {f"{lr:g}": drift[v, lr][:, 0] for lr in lrs} for v in VARIANTS},
            "jobs": {f"{v}|{lr:g}|{s}": job for (v, lr, s), job in jobs.items()},
        },
        tables=[("Final accuracy and layer input stability", table)],
        figures=[
            ("accuracy.png", "Training and test accuracy over training (moving averages)"),
            (
                "percentiles.png",
                f"15th/50th/85th percentiles of channel {config.tracked_unit} of conv layer "
                f"{config.tracked_layer} (input to its ReLU), first seed",
            ),
        ],
        choices=[
            network_choice(config, "[BN [+ noise]]"),
            f"conv init {config.init} (He et al. 2015 for kaiming), the same weights for every "
            "variant of a seed",
            f"data: {data.description}; batch {config.batch_size} (the paper: 128), reshuffled "
            "every epoch",
            f"optimizer: plain SGD, fixed lr {', '.join(f'{lr:g}' for lr in lrs)} (Figure 2), "
            f"{config.steps} steps, no momentum, weight decay or augmentation; mean cross-entropy",
            "noise (Sec. 2.1; distributions as SPEC.md 4.2 gives the appendix's): after every "
            "BN layer, i.e. after its gamma and beta, one draw per forward pass; the 0.1 of "
            "N(sigma_j, 0.1) read as a standard deviation; none at test time",
            "scoring: after training, every BN layer's population statistics are recomputed "
            f"over {config.popstat_batches} training batches with the noise off (Algorithm 2, "
            "batchnorm.inference.recalibrate); training accuracy on the first "
            f"{config.eval_examples} training images, test accuracy on the whole test (sub)set",
            "instability: every "
            f"{config.stability_every} steps, the 5th..95th percentiles of every channel of "
            f"conv layer {config.tracked_layer} (input to its ReLU, after BN and noise) on the "
            "batches of two consecutive steps, before their updates; mean absolute change over "
            "the percentiles over the 15th-85th percentile spread; mean over pairs, median over "
            "channels",
            "a diverged network (non-finite loss) stops and counts as chance accuracy",
        ],
        notes=[
            "CIFAR-10 and the paper's VGG cannot run here: Fashion-MNIST and a small CNN stand "
            "in, so the comparison is of the shape of the result, not of the paper's numbers.",
            "The paper's appendix could not be read here; the noise distributions follow "
            "SPEC.md 4.2 and the main text (Sec. 2.1: i.i.d. noise of non-zero mean and "
            "non-unit variance, changing at every step, injected after BatchNorm layers).",
        ],
    )


def _plot(ctx: Context, config: Config, jobs: dict, lrs: tuple[float, ...]) -> None:
    from batchnorm.lab.plots import new_figure

    seeds = config.seed_list()
    figure, axes = new_figure(2, len(lrs))
    for r, lr in enumerate(lrs):
        for v in VARIANTS:
            steps = jobs[v, lr, seeds[0]]["steps"]
            for c, what in enumerate(("train_acc", "test_acc")):
                values = np.mean([jobs[v, lr, s][what] for s in seeds], axis=0)
                axes[r, c].plot(steps, values, color=COLORS[v], label=v)
                axes[r, c].set(
                    xlabel="step", ylabel=what.replace("_", " "), title=f"{what} (lr {lr:g})"
                )
        for ax in axes[r]:
            ax.grid(alpha=0.3)
            ax.legend()
    ctx.save_figure(figure, "accuracy.png")
    figure, axes = new_figure(len(VARIANTS), len(lrs))
    for r, lr in enumerate(lrs):
        for c, v in enumerate(VARIANTS):
            job = jobs[v, lr, seeds[0]]
            p = np.asarray(job["percentiles"], dtype=np.float64)
            ax = axes[r, c]
            ax.fill_between(job["steps"], p[:, 0], p[:, 2], color=COLORS[v], alpha=0.25)
            ax.plot(job["steps"], p[:, 1], color=COLORS[v])
            ax.set(xlabel="step", ylabel="layer input", title=f"{v}, lr {lr:g}")
            ax.grid(alpha=0.3)
    ctx.save_figure(figure, "percentiles.png")


EXPERIMENT = Experiment(
    name="noisy-bn",
    title="Noisy BN: BN works without stable layer inputs (Santurkar et al. 2018, Figure 2)",
    claim=(
        "BN with injected, time-varying noise trains about as well as BN and better than the "
        "standard network, although its layer input distributions are less stable."
    ),
    paper=(
        "Santurkar et al. (2018), Sec. 2.1, Figure 2 (VGG, CIFAR-10, lr 0.1 and 0.5). "
        "Stand-in: a small VGG-style CNN on Fashion-MNIST."
    ),
    config_cls=Config,
    numbers_cls=Numbers,
    measure=measure,
    judge=judge,
    summary="standard vs BN vs noisy BN: accuracy (noise off) and step-to-step input stability",
)
