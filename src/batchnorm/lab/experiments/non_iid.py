"""Non-i.i.d. mini-batches: batch norm suffers, batch renormalization much less.

Claim (Ioffe 2017, Batch Renormalization, arXiv 1702.03275, Sec. 1 and 4.3, Figure 3; SPEC.md
4.5): batch norm assumes the examples of a mini-batch are independent draws; when they are not,
the network learns to rely on batch statistics that differ from the population statistics used
at test time, and test accuracy drops. Batch renormalization corrects the batch statistics
towards the moving averages (``r``, ``d``), so training and test normalize alike, and recovers
most of the loss. The paper's non-i.i.d. batches (Sec. 1, the metric-learning example, and Sec.
4.3) hold a few labels with several examples each: a batch of 32 is 16 labels with 2 images
each, where an i.i.d. batch of 32 ImageNet images holds about 32 different labels.

Protocol (the stand-in): a CNN on a Fashion-MNIST subset it can fit, batches of 32, the same
steps and learning rate for every network. Fashion-MNIST has 10 classes, so the paper's 16
labels cannot be drawn; a non-i.i.d. batch draws ``classes_per_batch`` (8) classes and
``batch_size / classes_per_batch`` (4) examples of each, where an i.i.d. batch of 32 holds
about 9.7 of the 10 classes with 3.2 examples each on average: fewer labels, several examples
each, as in the paper. (With 4 classes of 8 examples, group norm no longer fits the training
set: such batches break SGD itself, which is what the control is there to catch.) Two batch
orders, i.i.d. and non-i.i.d., for BN and for group norm; batch renorm on non-i.i.d. batches.
Group norm does not use the batch, so its drop from i.i.d. to non-i.i.d. batches is what the
batches do to SGD itself; what batch norm loses beyond that is batch norm's. The test set is
the usual one.

Rules (in code), paired by seed, margins from the seed spread (:mod:`batchnorm.lab.rules`):
(1) *BN suffers*: BN's drop in test accuracy from i.i.d. to non-i.i.d. batches minus GN's drop
is beyond the margin; (2) *renorm helps*: batch renorm's test accuracy minus BN's, both on
non-i.i.d. batches, is beyond the margin. Both are "not tested" when BN on i.i.d. batches or GN
on either batch order did not fit the training subset (then the batches broke training itself).
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
    NetJob,
    ScheduledConvConfig,
    common_choices,
    few_class_batches,
    final_acc,
    iid_batches,
    image_data,
    job_curve_rows,
    norm_kwargs,
    schedule_text,
    train_jobs,
)
from batchnorm.lab.experiments.cnn_fit import train_accuracy, with_train_accuracy
from batchnorm.lab.rules import (
    baseline_metrics,
    beyond_tolerance,
    gate,
    paired_tolerance,
    untrained,
)

__all__ = ["Config", "Numbers", "EXPERIMENT", "measure", "judge"]

# name -> (norm, i.i.d. batches?)
VARIANTS = {
    "BN, i.i.d. batches": ("bn", True),
    "BN, non-i.i.d. batches": ("bn", False),
    "BatchRenorm, non-i.i.d. batches": ("renorm", False),
    "GN, i.i.d. batches": ("gn", True),
    "GN, non-i.i.d. batches": ("gn", False),
}
BN_IID, BN_NON, RENORM_NON, GN_IID, GN_NON = VARIANTS


@dataclass(frozen=True)
class Config(ScheduledConvConfig):
    """BN, BatchRenorm and GN on few-class batches. Defaults are the full protocol."""

    channels: tuple[int, ...] = param(
        (8, 16, 32), "widths of the conv layers (wide enough to fit the training subset)"
    )
    train_subset: int | None = param(20_000, "training examples used (a subset the nets fit)")
    epochs: float = param(4.0, "passes over the training subset")
    lr: float = param(0.05, "SGD learning rate, the same for every network")
    evals: int = param(2, "evaluations on the test set, evenly spaced over training")
    seeds: int = param(3, "number of seeds (each: initial weights and data order)")
    classes_per_batch: int = param(8, "classes each non-i.i.d. training batch is drawn from")
    gn_groups: int = param(4, "groups of group norm (must divide every width in channels)")
    fit_floor: float = param(
        0.9, "train accuracy (inference mode) the reference networks must reach for the claims"
    )

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
        if not 0 < self.fit_floor <= 1:
            raise ValueError(f"fit_floor must lie in (0, 1], got {self.fit_floor}")

    def quick(self) -> Config:
        """A smoke test: narrow nets, 1,000 images, 1 epoch, 2 seeds."""
        return replace(super().quick(), channels=(8, 16), train_subset=1000, epochs=1.0, seeds=2)


@dataclass
class Numbers:
    """What the claims are decided on: final test and train accuracy per seed, by variant."""

    classes_per_batch: int
    fit_floor: float
    test: dict[str, list[float]]
    train: dict[str, list[float]]


def judge(
    numbers: Numbers,
    *,
    spread_factor: float = 2.0,
    min_tolerance: float = 0.0005,
) -> list[Claim]:
    """Decide the claims from ``numbers`` alone; every comparison is paired by seed.

    - "BN suffers": (BN i.i.d. - BN non-i.i.d.) - (GN i.i.d. - GN non-i.i.d.) test accuracy has
      a mean beyond its :func:`~batchnorm.lab.rules.paired_tolerance`;
    - "renorm helps": BatchRenorm minus BN test accuracy on non-i.i.d. batches, likewise.

    Both are "not tested" when BN on i.i.d. batches, or GN on either batch order, has a mean
    train accuracy below ``numbers.fit_floor``.

    Args:
        numbers: what :func:`measure` measured.
        spread_factor, min_tolerance: the margin of :func:`~batchnorm.lab.rules.paired_tolerance`.
    """
    margin = {"spread_factor": spread_factor, "min_tolerance": min_tolerance}
    test = {v: np.asarray(a, dtype=np.float64) for v, a in numbers.test.items()}
    train = {v: np.asarray(a, dtype=np.float64) for v, a in numbers.train.items()}
    bn_drop = test[BN_IID] - test[BN_NON]
    gn_drop = test[GN_IID] - test[GN_NON]
    excess = bn_drop - gn_drop
    helps = test[RENORM_NON] - test[BN_NON]
    reason = untrained({v: train[v] for v in (BN_IID, GN_IID, GN_NON)}, floor=numbers.fit_floor)
    if reason is not None:
        reason = "did not fit the training set: " + reason

    def tol(d: np.ndarray) -> float:
        return paired_tolerance(d, **margin)

    k = numbers.classes_per_batch
    suffers = Claim(
        "BN suffers",
        "Batch norm trained on non-i.i.d. batches tests worse, beyond what the batches do to "
        "training itself (group norm's drop).",
        f"BN's drop in test accuracy from i.i.d. to non-i.i.d. batches ({k} classes per batch) "
        f"minus GN's, paired by seed, has a mean above {spread_factor:g} standard errors of "
        f"the differences (at least {min_tolerance:g})",
        beyond_tolerance(excess, **margin),
        f"BN {test[BN_IID].mean():.4f} -> {test[BN_NON].mean():.4f} (drop "
        f"{bn_drop.mean():+.4f}); GN {test[GN_IID].mean():.4f} -> {test[GN_NON].mean():.4f} "
        f"(drop {gn_drop.mean():+.4f}); excess {excess.mean():+.4f} (tolerance "
        f"{tol(excess):.4f})",
    )
    renorm = Claim(
        "renorm helps",
        "Batch renormalization loses less on non-i.i.d. batches than batch norm.",
        "BatchRenorm minus BN test accuracy on non-i.i.d. batches, paired by seed, has a mean "
        f"above {spread_factor:g} standard errors of the differences (at least "
        f"{min_tolerance:g})",
        beyond_tolerance(helps, **margin),
        f"{test[RENORM_NON].mean():.4f} (BatchRenorm) vs {test[BN_NON].mean():.4f} (BN): "
        f"{helps.mean():+.4f} (tolerance {tol(helps):.4f})",
    )
    return [gate(suffers, reason), gate(renorm, reason)]


def measure(config: Config, ctx: Context) -> Measurement:
    """Train each variant and seed (one grouped network), tabulate and plot."""
    data = image_data(ctx, config)
    n = len(data.train_y)
    steps = config.steps_for(config.batch_size, n)
    labels = data.train_y.numpy()
    jobs = []
    for name, (norm, iid) in VARIANTS.items():
        for seed in config.seed_list():

            def batches(iid=iid, seed=seed):
                if iid:
                    return iid_batches(n, config.batch_size, seed)
                return few_class_batches(labels, config.batch_size, config.classes_per_batch, seed)

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
        ctx, config, data, jobs, steps=steps, lr=config.lr, finish=with_train_accuracy(data)
    )
    results: dict[str, list[dict]] = {}
    rows = []
    done = iter(trained)
    for name in VARIANTS:
        results[name] = [next(done) for _ in config.seed_list()]
        for seed, result in zip(config.seed_list(), results[name]):
            rows += job_curve_rows(result, name, seed)
    ctx.write_csv("curves.csv", rows, list(CURVE_FIELDS))

    test = {v: final_acc(results[v]) for v in VARIANTS}
    train = {v: train_accuracy(results[v]) for v in VARIANTS}
    mean = {v: float(np.mean(test[v])) for v in VARIANTS}
    numbers = Numbers(
        classes_per_batch=config.classes_per_batch,
        fit_floor=config.fit_floor,
        test={v: test[v].tolist() for v in VARIANTS},
        train={v: train[v].tolist() for v in VARIANTS},
    )
    comparisons = [
        Comparison(
            "test accuracy: BN i.i.d. / BN non-i.i.d. / BatchRenorm non-i.i.d.",
            "BN drops well below its i.i.d. result; BatchRenorm recovers most of it "
            "(Inception, ImageNet, Figure 3; values not quoted here)",
            f"{mean[BN_IID]:.4f} / {mean[BN_NON]:.4f} / {mean[RENORM_NON]:.4f}",
            value=mean[RENORM_NON] - mean[BN_NON],
        ),
        Comparison(
            "test accuracy: GN i.i.d. / GN non-i.i.d. (the control: no batch statistics)",
            "not in the paper",
            f"{mean[GN_IID]:.4f} / {mean[GN_NON]:.4f}",
        ),
    ]
    table = md_table(
        ["variant", "test accuracy", "train accuracy", "train - test", "train-batch accuracy"],
        [
            [
                v,
                fmt_mean_std(test[v]),
                fmt_mean_std(train[v]),
                fmt_mean_std(train[v] - test[v]),
                fmt_mean_std([r["train_acc_final"] for r in results[v]]),
            ]
            for v in VARIANTS
        ],
    )
    with ctx.timer("plots"):
        _plot(ctx, results)
    k = config.classes_per_batch
    return Measurement(
        numbers=numbers,
        comparisons=comparisons,
        metrics={
            "final_test_acc": {v: test[v] for v in VARIANTS},
            "final_train_acc": {v: train[v] for v in VARIANTS},
            "mean_final_test_acc": mean,
            "steps": steps,
            "classes_per_batch": k,
            "baseline": "BN on i.i.d. batches",
            **baseline_metrics(train[BN_IID], test[BN_IID]),
        },
        tables=[("Final accuracy by variant (mean ± std over seeds)", table)],
        figures=[("non_iid.png", "Test accuracy during training (mean over seeds)")],
        choices=[
            *common_choices(config)[:2],
            f"optimizer: SGD, momentum {config.momentum}, learning rate {config.lr:g}, batch "
            f"{config.batch_size}, {steps} steps ({config.epochs:g} epochs) for every network; no "
            f"weight decay; {schedule_text(config)} (the paper's Inception training decays its "
            "rate too)",
            common_choices(config)[4],
            f"non-i.i.d. batches (Sec. 1 and 4.3: few labels, several examples each; the "
            f"paper's 16 labels x 2 images of 1000 ImageNet classes cannot be drawn from 10): "
            f"each batch of {config.batch_size} draws {k} classes at random, then "
            f"{config.batch_size // k} examples of each (an i.i.d. batch of 32 holds about 9.7 "
            "classes); the test set is the usual one",
            "group norm on both batch orders is the control: it has no batch statistics, so "
            "its drop is what the batches do to SGD; BN's claim is judged on its drop beyond "
            "GN's",
            "batch renorm: r_max 3, d_max 5, warm-up and ramps at 4% / 20% / 30% of the "
            f"{steps} steps (the paper's 5k / 25k / 40k in proportion); group norm: "
            f"{config.gn_groups} groups",
            "train accuracy: the whole training subset in inference mode; the claims need BN "
            f"on i.i.d. batches and GN on both at {config.fit_floor:g} or more",
            "rules paired by seed (every variant of a seed shares its initial weights): "
            "margins of 2 standard errors of the per-seed differences, at least 0.0005",
        ],
        notes=[
            "The train-batch accuracy is measured on the training batches in training mode over "
            "the last 10% of steps (of those after the drop of the learning rate); its gap to the "
            "inference-mode train accuracy shows the train/test mismatch of batch statistics.",
            "Sec. 4.3 of the paper could not be read here in full; the construction (16 labels x "
            "2 examples in a batch of 32) is the one its Sec. 1 describes and SPEC.md records.",
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
        "Ioffe (2017), Batch Renormalization, Sec. 1 and 4.3, Figure 3 (non-i.i.d. mini-batches, "
        "Inception on ImageNet). Stand-in: a CNN on a Fashion-MNIST subset, batches of 32 drawn "
        "from 8 classes, 4 examples each; group norm as the control."
    ),
    config_cls=Config,
    numbers_cls=Numbers,
    measure=measure,
    judge=judge,
    summary="BN vs BatchRenorm on few-class batches, GN as the control",
)
