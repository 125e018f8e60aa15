"""Non-i.i.d. mini-batches: batch norm suffers, batch renormalization much less.

Claim (Ioffe 2017, Batch Renormalization, Sec. 1 and 4.3; SPEC.md 4.5): batch norm assumes the
examples of a mini-batch are independent draws; when they are not (a batch built from a few
classes), the batch statistics the network learns to rely on in training differ from the
population statistics used at test time, and test accuracy drops. Batch renormalization
corrects the batch statistics towards the moving averages (``r``, ``d``), so training and test
normalize alike, and recovers most of the loss. The paper shows this for Inception on ImageNet
(no number is quoted here; the report compares the shape only). Stand-in: the small CNN on
Fashion-MNIST, every training batch of 32 drawn from ``classes_per_batch`` classes only; the
test set is unchanged. Group norm (no batch statistics) and BN on i.i.d. batches are references.

Rules (in code): (1) *BN suffers*: BN's mean final test accuracy on non-i.i.d. batches is below
BN's on i.i.d. batches by at least ``min_drop``; (2) *renorm helps*: BatchRenorm's mean final
test accuracy on non-i.i.d. batches is higher than BN's on the same batches.
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
from batchnorm.lab.experiments.cnn import (
    CURVE_FIELDS,
    ConvConfig,
    NetJob,
    common_choices,
    few_class_batches,
    final_acc,
    iid_batches,
    image_data,
    job_curve_rows,
    norm_kwargs,
    train_jobs,
)

__all__ = ["Config", "Numbers", "EXPERIMENT", "measure", "judge"]

# name -> (norm, i.i.d. batches?)
VARIANTS = {
    "BN, i.i.d. batches": ("bn", True),
    "BN, non-i.i.d. batches": ("bn", False),
    "BatchRenorm, non-i.i.d. batches": ("renorm", False),
    "GN, non-i.i.d. batches": ("gn", False),
}
BN_IID, BN_NON, RENORM_NON, GN_NON = VARIANTS


@dataclass(frozen=True)
class Config(ConvConfig):
    """BN vs BatchRenorm on few-class batches. Defaults are the full protocol (~6 min)."""

    epochs: float = param(3.0, "passes over the training subset")
    seeds: int = param(3, "number of seeds (each: initial weights and data order)")
    classes_per_batch: int = param(2, "classes each non-i.i.d. training batch is drawn from")
    gn_groups: int = param(4, "groups of group norm (must divide every width in channels)")
    min_drop: float = param(0.02, "rule (1): smallest drop of BN's accuracy, i.i.d. -> non-i.i.d.")

    def validate(self) -> None:
        super().validate()
        if self.classes_per_batch < 1:
            raise ValueError(f"classes_per_batch must be >= 1, got {self.classes_per_batch}")
        if self.batch_size < 2 * self.classes_per_batch:
            raise ValueError(
                f"batch_size ({self.batch_size}) must hold at least two examples of each of the "
                f"classes_per_batch ({self.classes_per_batch}) classes"
            )
        if any(c % self.gn_groups for c in self.channels) or self.gn_groups < 1:
            raise ValueError(
                f"gn_groups={self.gn_groups} must divide every width in channels={self.channels}"
            )

    def quick(self) -> Config:
        """A smoke test: 2,000 images, 1 epoch, 2 seeds."""
        return replace(super().quick(), epochs=1.0, seeds=2)


@dataclass
class Numbers:
    """What the claims are decided on: final test accuracy per seed, keyed by variant."""

    min_drop: float  # the config's least drop of BN's accuracy for "BN suffers"
    classes_per_batch: int
    acc: dict[str, list[float]]


def judge(numbers: Numbers, *, renorm_margin: float = 0.0) -> list[Claim]:
    """Decide the claims from ``numbers`` alone.

    Args:
        numbers: what :func:`measure` measured; "BN suffers" holds when BN's mean accuracy drops
            by at least the config's ``min_drop`` (saved in the numbers; a tie holds).
        renorm_margin: "renorm helps" holds when BatchRenorm's mean accuracy on non-i.i.d.
            batches is above BN's by more than this (a tie does not hold).
    """
    n = numbers
    mean = {v: float(np.mean(a)) for v, a in n.acc.items()}
    drop = mean[BN_IID] - mean[BN_NON]
    return [
        Claim(
            "BN suffers",
            "Batch norm trained on non-i.i.d. batches tests worse than on i.i.d. batches.",
            f"BN's mean final test accuracy drops by at least {n.min_drop} from i.i.d. to "
            f"non-i.i.d. batches ({n.classes_per_batch} classes per batch)",
            bool(drop >= n.min_drop),
            f"{mean[BN_IID]:.4f} (i.i.d.) -> {mean[BN_NON]:.4f} (non-i.i.d.), drop {drop:+.4f}",
        ),
        Claim(
            "renorm helps",
            "Batch renormalization loses less on non-i.i.d. batches than batch norm.",
            "BatchRenorm's mean final test accuracy on non-i.i.d. batches is above BN's"
            + (f" by more than {renorm_margin}" if renorm_margin else ""),
            bool(mean[RENORM_NON] > mean[BN_NON] + renorm_margin),
            f"{mean[RENORM_NON]:.4f} (BatchRenorm) vs {mean[BN_NON]:.4f} (BN)",
        ),
    ]


def measure(config: Config, ctx: Context) -> Measurement:
    """Train each variant and seed, tabulate and plot."""
    data = image_data(ctx, config)
    n = len(data.train_y)
    steps = config.steps_for(config.batch_size, n)
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    jobs = []
    for name, (norm, iid) in VARIANTS.items():
        for seed in config.seed_list():

            def batches(iid=iid, seed=seed):
                if iid:
                    return iid_batches(n, config.batch_size, seed)
                return few_class_batches(
                    data.train_y.numpy(), config.batch_size, config.classes_per_batch, seed
                )

            jobs.append(
                NetJob(
                    key=f"{norm}-{'iid' if iid else 'noniid'}-s{seed}",
                    norm=norm,
                    seed=seed,
                    batches=batches,
                    desc=f"{name} seed {seed}",
                    options=norm_kwargs(norm, steps, config.gn_groups),
                )
            )
    trained = train_jobs(
        ctx, config, data, jobs, steps=steps, lr=config.scaled_lr(config.batch_size)
    )
    rows = []
    done = iter(trained)
    for name in VARIANTS:
        for seed in config.seed_list():
            result = next(done)
            results[name].append(result)
            rows += job_curve_rows(result, name, seed)
    ctx.write_csv("curves.csv", rows, list(CURVE_FIELDS))

    acc = {v: final_acc(results[v]) for v in VARIANTS}
    mean = {v: float(np.mean(acc[v])) for v in VARIANTS}
    numbers = Numbers(
        min_drop=config.min_drop,
        classes_per_batch=config.classes_per_batch,
        acc={v: acc[v].tolist() for v in (BN_IID, BN_NON, RENORM_NON)},
    )
    comparisons = [
        Comparison(
            "test accuracy: BN i.i.d. / BN non-i.i.d. / BatchRenorm non-i.i.d.",
            "BN drops well below its i.i.d. result; BatchRenorm recovers most of it "
            "(Inception, ImageNet)",
            f"{mean[BN_IID]:.4f} / {mean[BN_NON]:.4f} / {mean[RENORM_NON]:.4f}",
            value=mean[RENORM_NON] - mean[BN_NON],
        ),
        Comparison(
            "test accuracy: GN non-i.i.d. (no batch statistics)",
            "not in the paper",
            f"{mean[GN_NON]:.4f}",
        ),
    ]
    table = md_table(
        ["variant", "final test accuracy", "final train-batch accuracy"],
        [
            [
                v,
                fmt_mean_std(acc[v]),
                fmt_mean_std([r["train_acc_final"] for r in results[v]]),
            ]
            for v in VARIANTS
        ],
    )
    with ctx.timer("plots"):
        _plot(ctx, results)
    return Measurement(
        numbers=numbers,
        comparisons=comparisons,
        metrics={
            "final_test_acc": {v: acc[v] for v in VARIANTS},
            "mean_final_test_acc": mean,
            "steps": steps,
        },
        tables=[("Final accuracy by variant (mean ± std over seeds)", table)],
        figures=[("non_iid.png", "Test accuracy during training (mean over seeds)")],
        choices=[
            *common_choices(config),
            f"non-i.i.d. batches: each training batch of {config.batch_size} draws "
            f"{config.classes_per_batch} classes at random, then equal shares of examples from "
            "them; the test set is the usual one",
            "batch renorm: r_max 3, d_max 5, warm-up and ramps at 4% / 20% / 30% of the "
            f"{steps} steps; group norm: {config.gn_groups} groups",
        ],
        notes=[
            "The train-batch accuracy is measured on the (non-i.i.d.) training batches in "
            "training mode over the last 10% of steps; its gap to the test accuracy shows the "
            "train/test mismatch of batch statistics.",
        ],
    )


def _plot(ctx: Context, results) -> None:
    from batchnorm.lab.plots import band, new_figure

    figure, axes = new_figure(1, 1, size=(5.2, 3.8))
    ax = axes[0, 0]
    for v, rs in results.items():
        values = np.array([r["test_acc"] for r in rs]).T
        band(ax, rs[0]["steps"], values, label=v)
    ax.set(xlabel="training step", ylabel="test accuracy", ylim=(0, 1), title="non-i.i.d. batches")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ctx.save_figure(figure, "non_iid.png")


EXPERIMENT = Experiment(
    name="non-iid",
    title="Batch norm vs batch renormalization on non-i.i.d. mini-batches (Ioffe 2017)",
    claim=(
        "Batch norm degrades when the examples of a mini-batch are not independent; batch "
        "renormalization much less."
    ),
    paper=(
        "Ioffe (2017), Batch Renormalization, Sec. 4.3 (non-i.i.d. mini-batches, Inception on "
        "ImageNet). Stand-in: a small CNN on Fashion-MNIST, batches drawn from 2 classes each."
    ),
    config_cls=Config,
    numbers_cls=Numbers,
    measure=measure,
    judge=judge,
    summary="BN vs BatchRenorm (and GN) on few-class batches",
)
