"""Regularization: batch norm regularizes, and can take the place of dropout.

Claim (Ioffe & Szegedy 2015, Sec. 3.4 and 4.2.1): with batch norm "a training example is seen
in conjunction with other examples in the mini-batch, and the training network no longer
produces deterministic values for a given example", which regularizes; "removing Dropout from
Modified BN-Inception speeds up training, without increasing overfitting". That is ImageNet; the
stand-in is an MNIST network trained long enough on a 10,000-example subset to overfit, in four
variants: neither BN nor dropout, dropout only, BN only, BN and dropout.

Protocol: a fully-connected ReLU network (two hidden layers of 256 by default), plain SGD at the
Figure 1 learning rate for ``steps`` steps (60 epochs of the subset by default), dropout after
each hidden nonlinearity with rate ``dropout``. The train/test gap is the accuracy on the
training subset minus that on the test set, both in inference mode at the end.

Rules (in code, every comparison paired by seed, with a tolerance of two standard errors of the
per-seed differences, at least 0.0005): (1) "BN regularizes": BN alone has a smaller train/test
gap and a higher test accuracy than neither; (2) "dropout can be removed" (the paper's "Remove
Dropout", Sec. 4.2.1, is about a batch-norm network): BN alone is not worse than BN + dropout.
Dropout alone is trained and reported for context.
"""

from __future__ import annotations

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
from batchnorm.lab.experiments.common import (
    CURVE_FIELDS,
    CommonConfig,
    build_model,
    common_choices,
    curve_rows,
    settings,
    specs_for,
    variant_indices,
)
from batchnorm.lab.plots import COLORS
from batchnorm.lab.rules import baseline_metrics, gate, paired_tolerance, untrained

__all__ = ["Config", "Numbers", "EXPERIMENT", "measure", "judge", "paired_tolerance"]

NEITHER, DROPOUT, BN, BOTH = "neither", "dropout", "BN", "BN + dropout"
VARIANTS = (NEITHER, DROPOUT, BN, BOTH)


@dataclass(frozen=True)
class Config(CommonConfig):
    """BN vs dropout on an MNIST subset. Defaults are the full protocol."""

    hidden: tuple[int, ...] = param((256, 256), "widths of the hidden layers")
    activation: str = param("relu", "hidden nonlinearity", choices=("sigmoid", "tanh", "relu"))
    steps: int = param(10_000, "SGD steps per network (60 epochs of 10,000 examples)")
    train_subset: int | None = param(
        10_000, "training examples used (a subset, so that the networks can overfit)"
    )
    eval_every: int = param(500, "evaluate every this many steps")
    eval_examples: int | None = param(
        2000, "test examples used at intermediate evaluations (none = all; the last uses all)"
    )
    popstat_batches: int = param(
        20, "training mini-batches for the population statistics at each evaluation"
    )
    final_popstat_batches: int | None = param(
        None, "the same for the final evaluation (none = one pass over the training set)"
    )
    dropout: float = param(0.3, "dropout rate after each hidden nonlinearity (dropout variants)")

    def validate(self) -> None:
        super().validate()
        if not 0 < self.dropout < 1:
            raise ValueError(f"dropout must lie in (0, 1), got {self.dropout}")

    def quick(self) -> Config:
        """A smoke test: 800 steps on 3,000 examples, 2 seeds."""
        return replace(
            self,
            steps=800,
            train_subset=3000,
            seeds=2,
            eval_every=200,
            popstat_batches=10,
            final_popstat_batches=None,
        )


@dataclass
class Numbers:
    """What the claims are decided on: final accuracies per seed, keyed by variant."""

    dropout: float  # the dropout rate of the dropout variants
    test: dict[str, list[float]]  # final test accuracy per seed
    train: dict[str, list[float]]  # final training accuracy (on the subset) per seed


def judge(
    numbers: Numbers,
    *,
    spread_factor: float = 2.0,
    min_tolerance: float = 0.0005,
    trained_floor: float = 0.9,
) -> list[Claim]:
    """Decide the claims from ``numbers`` alone; every comparison is paired by seed.

    Both claims are about trained networks: when a variant they compare stays below
    ``trained_floor`` training accuracy, the claim is "not tested".

    - "regularizes": BN alone narrows the train/test gap and raises test accuracy against
      neither, each mean paired difference beyond its :func:`paired_tolerance`;
    - "dropout can be removed" (Sec. 4.2.1, "Remove Dropout"): BN alone is not worse than BN +
      dropout: the mean paired difference of test accuracy, BN alone minus BN + dropout, is at
      least minus its tolerance. Dropout alone is shown for context, not judged.

    Args:
        numbers: what :func:`measure` measured.
        spread_factor, min_tolerance: the margin of :func:`paired_tolerance`.
    """
    test = {v: np.asarray(a, dtype=np.float64) for v, a in numbers.test.items()}
    train = {v: np.asarray(a, dtype=np.float64) for v, a in numbers.train.items()}
    gap = {v: train[v] - test[v] for v in test}

    def tol(d: np.ndarray) -> float:
        return paired_tolerance(d, spread_factor=spread_factor, min_tolerance=min_tolerance)

    gap_gain = gap[NEITHER] - gap[BN]  # > 0: BN narrows the gap
    test_gain = test[BN] - test[NEITHER]  # > 0: BN raises test accuracy
    regularizes = gap_gain.mean() > tol(gap_gain) and test_gain.mean() > tol(test_gain)
    removal = test[BN] - test[BOTH]  # >= -tolerance: removing dropout does not hurt
    removable = removal.mean() >= -tol(removal)
    return [
        gate(
            Claim(
                "regularizes",
                "Batch norm regularizes: it narrows the train/test gap and raises test accuracy.",
                "against neither, BN alone's paired mean gap reduction and test-accuracy gain each "
                f"exceed {spread_factor:g} standard errors of their per-seed differences (at least "
                f"{min_tolerance:g})",
                bool(regularizes),
                f"gap {gap[BN].mean():.4f} vs {gap[NEITHER].mean():.4f} (reduction "
                f"{gap_gain.mean():+.4f}, tolerance {tol(gap_gain):.4f}); test "
                f"{test[BN].mean():.4f} vs {test[NEITHER].mean():.4f} (gain "
                f"{test_gain.mean():+.4f}, tolerance {tol(test_gain):.4f})",
            ),
            untrained({v: train[v] for v in (NEITHER, BN)}, trained_floor),
        ),
        gate(
            Claim(
                "dropout can be removed",
                "Removing dropout from a batch-norm network does not hurt its test accuracy "
                "(Sec. 4.2.1).",
                "BN alone minus BN + dropout, test accuracy paired by seed, has a mean of at least "
                f"minus {spread_factor:g} standard errors of the differences (at least "
                f"{min_tolerance:g})",
                bool(removable),
                f"test {test[BN].mean():.4f} (BN) vs {test[BOTH].mean():.4f} (BN + dropout "
                f"{numbers.dropout}): {removal.mean():+.4f}, tolerance {tol(removal):.4f}; dropout "
                f"alone {test[DROPOUT].mean():.4f}",
            ),
            untrained({v: train[v] for v in (BN, BOTH)}, trained_floor),
        ),
    ]


def measure(config: Config, ctx: Context) -> Measurement:
    """Train the four variants, measure, plot."""
    data = ctx.load_data(config.dataset, config.train_subset, config.test_subset)
    variants = [
        {"variant": NEITHER, "batch_norm": False, "dropout": 0.0},
        {"variant": DROPOUT, "batch_norm": False, "dropout": config.dropout},
        {"variant": BN, "batch_norm": True, "dropout": 0.0},
        {"variant": BOTH, "batch_norm": True, "dropout": config.dropout},
    ]
    specs = specs_for(config, variants)
    result = ctx.job(
        "regularization",
        lambda: build_model(config, specs, data),
        settings(config, train_eval_examples=len(data.train_y)),
        data,
        desc=f"regularization ({len(specs)} nets)",
    )
    assert result.train_acc is not None
    idx = {v: variant_indices(result, variant=v) for v in VARIANTS}
    test = {v: result.test_acc[-1, idx[v]] for v in VARIANTS}
    train = {v: result.train_acc[-1, idx[v]] for v in VARIANTS}
    gap = {v: train[v] - test[v] for v in VARIANTS}

    numbers = Numbers(
        dropout=config.dropout,
        test={v: test[v].tolist() for v in VARIANTS},
        train={v: train[v].tolist() for v in VARIANTS},
    )
    comparisons = [
        Comparison(
            "test accuracy: BN alone vs BN + dropout (the claim)",
            "dropout removed from BN-Inception: faster, no more overfitting (Sec. 4.2.1; no "
            "number for the effect alone)",
            f"{fmt_mean_std(test[BN])} vs {fmt_mean_std(test[BOTH])}",
        ),
        Comparison(
            "test accuracy: BN alone vs dropout alone (context)",
            "not compared in the paper",
            f"{fmt_mean_std(test[BN])} vs {fmt_mean_std(test[DROPOUT])}",
        ),
        Comparison(
            "train/test gap: BN alone vs neither",
            "BN regularizes (Sec. 3.4)",
            f"{fmt_mean_std(gap[BN])} vs {fmt_mean_std(gap[NEITHER])}",
        ),
    ]
    rows = [
        [v, fmt_mean_std(test[v]), fmt_mean_std(train[v]), fmt_mean_std(gap[v])] for v in VARIANTS
    ]
    table = md_table(["variant", "test acc", "train acc (subset)", "train - test gap"], rows)
    ctx.write_csv("curves.csv", curve_rows(result), CURVE_FIELDS)
    with ctx.timer("plots"):
        _plot(ctx, result, idx)
    metrics = {
        "final_test_acc": test,
        "final_train_acc": train,
        "gap": gap,
        "dropout": config.dropout,
        "train_examples": len(data.train_y),
        # The batch-norm network (without dropout) is the baseline: it trained, as these say.
        "baseline": "BN alone (784-256-256-10 ReLU)",
        **baseline_metrics(train[BN], test[BN]),
    }
    return Measurement(
        numbers=numbers,
        comparisons=comparisons,
        metrics=metrics,
        tables=[("By variant (at the end)", table)],
        figures=[
            (
                "regularization.png",
                "Test accuracy and train/test gap over training (mean over seeds)",
            )
        ],
        choices=[
            *common_choices(config),
            f"architecture: {config.hidden} {config.activation}; dropout {config.dropout} "
            "after each hidden nonlinearity (inverted dropout, off at test time)",
            "train accuracy on the whole training subset, in inference mode",
            "with dropout, Algorithm 2's training-mode pass keeps dropout active",
            "rules paired by seed (every variant of a seed shares its initial weights' seed and "
            "batch order): a difference counts when its mean clears 2 standard errors of the "
            "per-seed differences, and at least 0.0005 (5 test images)",
        ],
        notes=[
            "ImageNet/Inception cannot run here: the comparison is of the shape of the "
            "result, not of the paper's numbers."
        ],
    )


def _plot(ctx: Context, result, idx: dict[str, list[int]]) -> None:
    from batchnorm.lab.plots import new_figure

    colors = {
        NEITHER: COLORS["without BN"],
        DROPOUT: "tab:orange",
        BN: COLORS["with BN"],
        BOTH: "tab:purple",
    }
    figure, axes = new_figure(2, 1)
    for v, gs in idx.items():
        axes[0, 0].plot(result.steps, result.test_acc[:, gs].mean(1), color=colors[v], label=v)
        gap = result.train_acc[:, gs] - result.test_acc[:, gs]
        axes[0, 1].plot(result.steps, gap.mean(1), color=colors[v], label=v)
    axes[0, 0].set(xlabel="training step", ylabel="test accuracy", title="test accuracy")
    low = float(np.nanmin(result.test_acc[len(result.steps) // 4 :]))
    axes[0, 0].set_ylim(max(0.0, low - 0.01), 1.0)
    axes[0, 1].set(xlabel="training step", ylabel="train - test accuracy", title="train/test gap")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ctx.save_figure(figure, "regularization.png")


EXPERIMENT = Experiment(
    name="regularization",
    title="Batch norm as a regularizer, vs dropout (Ioffe & Szegedy 2015, Sec. 3.4, 4.2.1)",
    claim=(
        "Batch norm regularizes the network (smaller train/test gap), and dropout can be removed "
        "from a batch-norm network without loss."
    ),
    paper=(
        "Ioffe & Szegedy (2015), Sec. 3.4 and 4.2.1 ('Remove Dropout'); ImageNet, no number for "
        "the effect alone. Stand-in: an MNIST MLP on a 10,000-example subset, four variants."
    ),
    config_cls=Config,
    numbers_cls=Numbers,
    measure=measure,
    judge=judge,
    summary="BN vs dropout vs both vs neither: test accuracy and train/test gap",
)
