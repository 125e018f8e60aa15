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

Rules (in code): (1) "BN regularizes": BN alone has a smaller train/test gap and a higher test
accuracy than neither (means over seeds); (2) "BN can replace dropout": BN alone reaches at least
the test accuracy of dropout alone.
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
    mean_std,
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

__all__ = ["Config", "Numbers", "EXPERIMENT", "measure", "judge"]

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
    gap_margin: float = 0.0,
    accuracy_margin: float = 0.0,
    dropout_margin: float = 0.0,
) -> list[Claim]:
    """Decide the claims from ``numbers`` alone (every comparison is of means over seeds).

    Args:
        numbers: what :func:`measure` measured.
        gap_margin: "regularizes" needs BN's train/test gap below neither's by more than this...
        accuracy_margin: ... and BN's test accuracy above neither's by more than this (ties do
            not hold).
        dropout_margin: "replaces dropout" holds when BN's test accuracy is at least dropout's
            minus this (a tie holds).
    """
    test = {v: np.asarray(a, dtype=np.float64) for v, a in numbers.test.items()}
    train = {v: np.asarray(a, dtype=np.float64) for v, a in numbers.train.items()}
    gap = {v: train[v] - test[v] for v in test}

    def m(values: np.ndarray) -> float:
        return mean_std(values)[0]

    regularizes = (
        m(gap[BN]) < m(gap[NEITHER]) - gap_margin
        and m(test[BN]) > m(test[NEITHER]) + accuracy_margin
    )
    replaces = m(test[BN]) >= m(test[DROPOUT]) - dropout_margin
    margins = ", ".join(
        f"{name} margin {value}"
        for name, value in (("gap", gap_margin), ("accuracy", accuracy_margin))
        if value
    )
    return [
        Claim(
            "regularizes",
            "Batch norm regularizes: it narrows the train/test gap and raises test accuracy.",
            "BN alone has a smaller train/test gap and a higher test accuracy than neither "
            "(means over seeds)" + (f" ({margins})" if margins else ""),
            bool(regularizes),
            f"gap {m(gap[BN]):.4f} vs {m(gap[NEITHER]):.4f}; test {m(test[BN]):.4f} vs "
            f"{m(test[NEITHER]):.4f}",
        ),
        Claim(
            "replaces dropout",
            "Batch norm can take the place of dropout.",
            "BN alone reaches at least the mean test accuracy of dropout alone"
            + (f" minus {dropout_margin}" if dropout_margin else ""),
            bool(replaces),
            f"test {m(test[BN]):.4f} (BN) vs {m(test[DROPOUT]):.4f} (dropout {numbers.dropout})",
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
            "test accuracy: BN alone vs dropout alone",
            "BN-Inception without dropout: faster, no more overfitting (no number given)",
            f"{fmt_mean_std(test[BN])} vs {fmt_mean_std(test[DROPOUT])}",
        ),
        Comparison(
            "test accuracy: BN + dropout vs BN alone",
            "dropout removed from BN-Inception ('not needed')",
            f"{fmt_mean_std(test[BOTH])} vs {fmt_mean_std(test[BN])}",
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
    claim=("Batch norm regularizes the network (smaller train/test gap) and can replace dropout."),
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
