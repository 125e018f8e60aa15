"""Noisy batch norm: BN helps even when the layer input distributions are made unstable.

Claim (Santurkar, Tsipras, Ilyas, Madry 2018, arXiv 1805.11604, Sec. 2.1, **Figure 2**): if
BN worked by stabilizing the distributions of layer inputs, then injecting a random,
time-varying shift after every BN layer should remove its benefit. It does not: "noisy BN"
trains about as well as BN and better than the standard network, although the distribution of
its layer inputs moves more over training than the standard network's. The paper's noise, per
step and unit j: mu_j ~ U(-0.5, 0.5), sigma_j ~ U(1, 1.25); per sample i: m_ij ~ U(mu_j - 0.1,
mu_j + 0.1), s_ij ~ N(sigma_j, 0.1); a_ij <- s_ij a_ij + m_ij
(:mod:`batchnorm.lab.theory.noisy_bn`). Figure 2 shows VGG on CIFAR-10 at lr 0.1 and 0.5, with
the training/test accuracy and the activation histograms of a layer over training.

Stand-in: the small VGG-style CNN of :mod:`batchnorm.lab.experiments.cnn` on a Fashion-MNIST
subset (CIFAR-10 is not available here), standard vs BN vs noisy BN, fixed-lr SGD at a moderate
and a high learning rate. At evaluation points the 15th/50th/85th percentiles of one unit's input
to its nonlinearity (channel ``tracked_unit`` of conv layer ``tracked_layer``, after BN and
noise), over the positions and examples of the training batch of that step, in training mode;
from them the median drift and spread ratio of :func:`~batchnorm.lab.experiments.cnn.drift_numbers`.

Rules (in code), at every learning rate, on means over seeds:
(1) noisy BN's final test accuracy is at least BN's minus ``margin``;
(2) noisy BN's final test accuracy is at least the standard network's;
(3) noisy BN's tracked unit has a larger median drift than the standard network's.
"""

from __future__ import annotations

import math
import time
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
    BN,
    COLORS,
    NOISY,
    STANDARD,
    VARIANTS,
    CNNConfig,
    VGGStyle,
    batch_order,
    cached_job,
    drift_numbers,
    evaluate,
    image_data,
)
from batchnorm.lab.progress import bar

__all__ = ["Config", "Numbers", "EXPERIMENT", "measure", "judge"]

QUANTILES = (0.15, 0.5, 0.85)


@dataclass(frozen=True)
class Config(CNNConfig):
    """Standard vs BN vs noisy BN. Defaults are the full protocol (~12 min on 2 idle cores)."""

    lrs: tuple[float, ...] = param((0.1, 0.5), "learning rates (the paper: 0.1 and 0.5)")
    eval_every: int = param(100, "evaluate (accuracy, percentiles) every this many steps")
    eval_examples: int = param(2000, "training examples for the training accuracy")
    tracked_layer: int = param(2, "conv layer (1-based) whose unit input is tracked")
    tracked_unit: int = param(0, "channel of that layer whose input is tracked")
    margin: float = param(0.02, "rule (1): noisy BN may trail BN by at most this much accuracy")

    def validate(self) -> None:
        super().validate()
        if not self.lrs or any(not (math.isfinite(lr) and lr > 0) for lr in self.lrs):
            raise ValueError(f"lrs must list positive learning rates, got {self.lrs}")
        if self.eval_every < 1 or self.eval_examples < 1:
            raise ValueError("eval_every and eval_examples must be at least 1")
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
        if not self.margin >= 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")

    def quick(self) -> Config:
        """A smoke test: 200 steps, 1 seed, smaller subsets."""
        return replace(super().quick(), eval_every=50)


def _train(config: Config, data, variant: str, lr: float, seed: int, desc: str) -> dict:
    """One network: SGD for ``config.steps`` steps; curves and tracked-unit percentiles."""
    model = VGGStyle.for_config(config, data, variant, seed)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    order = batch_order(len(data.train_y), config.batch_size, config.steps, seed)
    n_eval = min(config.eval_examples, len(data.train_y))
    q = torch.tensor(QUANTILES)
    steps, train_acc, test_acc, train_loss, pct = [], [], [], [], []
    diverged_at = -1
    start = time.perf_counter()
    for step in bar(range(config.steps + 1), desc=desc, unit="step"):
        at_eval = step % config.eval_every == 0 or step == config.steps
        if step == config.steps:  # the final evaluation's percentiles: one more batch, no update
            idx = order[-1]
        else:
            idx = order[step]
        x, y = data.train_x[idx], data.train_y[idx]
        model.keep_pre_activations = at_eval
        loss = torch.nn.functional.cross_entropy(model(x), y)
        model.keep_pre_activations = False
        if at_eval:
            z = model.pre_activations[config.tracked_layer - 1][:, config.tracked_unit]
            pct.append(torch.quantile(z.reshape(-1).double(), q.double()).tolist())
            steps.append(step)
            train_loss.append(float(loss.detach()))
            train_acc.append(evaluate(model, data.train_x[:n_eval], data.train_y[:n_eval])[0])
            test_acc.append(evaluate(model, data.test_x, data.test_y)[0])
        if step == config.steps:
            break
        if not math.isfinite(float(loss.detach())):
            diverged_at = step
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if diverged_at >= 0:  # a diverged network counts as chance from there on
        chance = 1.0 / data.num_classes
        schedule = sorted(set(range(0, config.steps, config.eval_every)) | {config.steps})
        for step in schedule[len(steps) :]:
            steps.append(step)
            train_acc.append(chance)
            test_acc.append(chance)
            train_loss.append(math.nan)
            pct.append([math.nan] * 3)
    return {
        "steps": steps,
        "train_acc": train_acc,
        "test_acc": test_acc,
        "train_loss": train_loss,
        "percentiles": pct,
        "diverged_at": diverged_at,
        "seconds": time.perf_counter() - start,
    }


@dataclass
class Numbers:
    """What the claims are decided on, keyed by variant, then [lr][seed]."""

    lrs: list[float]  # sorted ascending
    margin: float  # the config's allowance of "as-bn"
    test: dict[str, list[list[float]]]  # final test accuracy
    median_drift: dict[str, list[list[float]]]  # the tracked unit's median drift (nan: diverged)


def judge(numbers: Numbers, *, standard_margin: float = 0.0) -> list[Claim]:
    """Decide the claims from ``numbers`` alone.

    Args:
        numbers: what :func:`measure` measured; its ``margin`` (the config's) is how far noisy
            BN's mean accuracy may fall below BN's for "as-bn" (a tie at the margin holds).
        standard_margin: "beats-standard" holds when noisy BN's mean accuracy is at least the
            standard network's minus this (a tie holds).
    """
    n = numbers
    lrs = n.lrs
    mean = {
        (v, lr): float(np.mean(np.asarray(accs, dtype=np.float64)))
        for v, per_lr in n.test.items()
        for lr, accs in zip(lrs, per_lr)
    }
    mean_drift = {
        (v, lr): float(np.nanmean(np.asarray(d, dtype=np.float64)))
        for v, per_lr in n.median_drift.items()
        for lr, d in zip(lrs, per_lr)
    }

    def per_lr(fmt) -> str:
        return "; ".join(f"lr {lr:g}: {fmt(lr)}" for lr in lrs)

    as_bn = all(mean[NOISY, lr] >= mean[BN, lr] - n.margin for lr in lrs)
    beats_standard = all(mean[NOISY, lr] >= mean[STANDARD, lr] - standard_margin for lr in lrs)
    less_stable = all(
        math.isfinite(mean_drift[NOISY, lr])
        and (
            not math.isfinite(mean_drift[STANDARD, lr])
            or mean_drift[NOISY, lr] > mean_drift[STANDARD, lr]
        )
        for lr in lrs
    )
    return [
        Claim(
            "as-bn",
            "Noisy BN trains about as well as BN.",
            f"at every lr, mean final test accuracy of noisy BN >= BN's - {n.margin}",
            as_bn,
            per_lr(lambda lr: f"noisy BN {mean[NOISY, lr]:.4f} vs BN {mean[BN, lr]:.4f}"),
        ),
        Claim(
            "beats-standard",
            "Noisy BN trains better than the standard network.",
            "at every lr, mean final test accuracy of noisy BN >= the standard network's"
            + (f" - {standard_margin}" if standard_margin else ""),
            beats_standard,
            per_lr(
                lambda lr: f"noisy BN {mean[NOISY, lr]:.4f} vs standard {mean[STANDARD, lr]:.4f}"
            ),
        ),
        Claim(
            "less-stable",
            "Yet the layer input distributions of noisy BN are less stable than the standard "
            "network's.",
            "at every lr, the tracked unit's median drift (mean over seeds) is larger with noisy "
            "BN than in the standard network (a diverged standard network counts as less stable)",
            less_stable,
            per_lr(
                lambda lr: (
                    f"noisy BN {mean_drift[NOISY, lr]:.3f} vs standard "
                    f"{mean_drift[STANDARD, lr]:.3f}"
                )
            ),
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
                        lambda v=variant, lr=lr, s=seed, k=key: _train(config, data, v, lr, s, k),
                        as_json=True,
                    )
    seeds = config.seed_list()

    def finals(variant: str, lr: float, what: str) -> np.ndarray:
        return np.array([jobs[variant, lr, s][what][-1] for s in seeds])

    def drifts(variant: str, lr: float) -> np.ndarray:
        out = []
        for s in seeds:
            p = np.asarray(jobs[variant, lr, s]["percentiles"], dtype=np.float64)
            p = p[np.all(np.isfinite(p), axis=1)]
            out.append(drift_numbers(p) if len(p) > 1 else (math.nan, math.nan))
        return np.array(out)  # (S, 2): median drift, spread ratio

    test = {(v, lr): finals(v, lr, "test_acc") for v in VARIANTS for lr in lrs}
    train_acc = {(v, lr): finals(v, lr, "train_acc") for v in VARIANTS for lr in lrs}
    drift = {(v, lr): drifts(v, lr) for v in VARIANTS for lr in lrs}
    mean = {k: float(np.mean(v)) for k, v in test.items()}
    mean_drift = {k: float(np.nanmean(v[:, 0])) for k, v in drift.items()}

    def per_lr(fmt) -> str:
        return "; ".join(f"lr {lr:g}: {fmt(lr)}" for lr in lrs)

    numbers = Numbers(
        lrs=list(lrs),
        margin=config.margin,
        test={v: [test[v, lr].tolist() for lr in lrs] for v in VARIANTS},
        median_drift={v: [drift[v, lr][:, 0].tolist() for lr in lrs] for v in VARIANTS},
    )
    comparisons = []
    paper_acc = {0.1: ("~83% (BN), ~80% (standard), noisy BN close to BN (CIFAR-10, VGG)")}
    for lr in lrs:
        comparisons.append(
            Comparison(
                f"final test accuracy at lr {lr:g}: standard / BN / noisy BN",
                paper_acc.get(
                    lr,
                    "lr 0.5: the standard network does not train; BN and noisy BN do"
                    if lr == 0.5
                    else "-",
                ),
                " / ".join(f"{mean[v, lr]:.4f}" for v in VARIANTS),
                mean[NOISY, lr],
            )
        )
        comparisons.append(
            Comparison(
                f"tracked unit median drift at lr {lr:g}: standard / BN / noisy BN",
                "noisy BN's distributions move the most (Figure 2, histograms)",
                " / ".join(f"{mean_drift[v, lr]:.3f}" for v in VARIANTS),
                mean_drift[NOISY, lr],
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
                    fmt_mean_std(train_acc[v, lr]),
                    fmt_mean_std(test[v, lr]),
                    fmt_mean_std(drift[v, lr][:, 0], 3),
                    fmt_mean_std(drift[v, lr][:, 1], 2),
                    str(diverged),
                ]
            )
    table = md_table(
        [
            "lr",
            "variant",
            "final train acc",
            "final test acc",
            "median drift",
            "spread ratio",
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
                {
                    "step": step,
                    "variant": v,
                    "seed": s,
                    "lr": lr,
                    "p15": p15,
                    "p50": p50,
                    "p85": p85,
                }
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
    return Measurement(
        numbers=numbers,
        comparisons=comparisons,
        metrics={
            "lrs": lrs,
            "final_test_acc": {v: {f"{lr:g}": test[v, lr] for lr in lrs} for v in VARIANTS},
            "final_train_acc": {v: {f"{lr:g}": train_acc[v, lr] for lr in lrs} for v in VARIANTS},
            "median_drift": {v: {f"{lr:g}": drift[v, lr][:, 0] for lr in lrs} for v in VARIANTS},
            "spread_ratio": {v: {f"{lr:g}": drift[v, lr][:, 1] for lr in lrs} for v in VARIANTS},
            "jobs": {f"{v}|{lr:g}|{s}": job for (v, lr, s), job in jobs.items()},
        },
        tables=[("Final accuracy and layer input stability", table)],
        figures=[
            ("accuracy.png", "Training and test accuracy over training (mean over seeds)"),
            (
                "percentiles.png",
                f"15th/50th/85th percentiles of channel {config.tracked_unit} of conv layer "
                f"{config.tracked_layer} (input to its ReLU), first seed",
            ),
        ],
        choices=[
            f"network: VGG-style CNN, conv 3x3 widths {config.channels}, each [BN [+ noise]], "
            "ReLU, 2x2 max pool; linear classifier; PyTorch default initialization, the same "
            "weights for every variant of a seed",
            f"data: {data.description}; batch {config.batch_size}, reshuffled every epoch",
            f"optimizer: plain SGD, fixed lr, {config.steps} steps, no momentum, weight decay or "
            "augmentation; mean cross-entropy",
            "noise: the paper's, after every BN layer, per step (one draw per forward pass); "
            "0.1 in N(sigma_j, 0.1) read as a standard deviation; identity at test time",
            "test-time BN: moving averages (momentum 0.1); accuracies in inference mode on "
            f"the test subset and the first {config.eval_examples} training examples",
            "layer input percentiles: over the N x H x W values of the tracked channel on the "
            "step's training batch, in training mode (noise included), before the update",
            "a diverged network (non-finite loss) stops and counts as chance accuracy",
        ],
        notes=[
            "CIFAR-10 and the paper's VGG cannot run here: Fashion-MNIST and a small CNN stand "
            "in, so the comparison is of the shape of the result, not of the paper's numbers."
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
    summary="standard vs BN vs noisy BN: accuracy and layer input stability",
)
