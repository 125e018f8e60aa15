"""Gradient explosion at initialization in deep batch-normalized networks (Yang et al. 2019).

Claim (Yang, Pennington, Rao, Sohl-Dickstein, Schoenholz, "A Mean Field Theory of Batch
Normalization", arXiv 1902.08129; SPEC.md 4.3): at initialization, in a deep fully-connected
network with BN before the nonlinearity, the squared gradient norm grows by a factor lambda > 1
per layer going backwards, for every batch size B; for ReLU
``lambda(B) -> pi/(pi - 1)`` and for the linear network ``lambda(B) = (B - 2)/(B - 3)``. The
maximal trainable depth is about ``16 / ln(lambda)``; residual connections and a larger eps
reduce the explosion. The paper's figures: lambda against B (theory and measurement), and a
depth x batch-size trainability heat map on MNIST (width 384, eps 1e-3).

Protocol. (a) lambda by Monte Carlo (:func:`~batchnorm.lab.theory.gradient_explosion.
gradient_growth`: width ``mc_width``, depth ``mc_depth``, ``mc_repeats`` networks, eps = 0,
float64) for ReLU, tanh and linear at each B in ``mc_batch_sizes``, beside the closed forms
(:func:`relu_lambda`, :func:`linear_lambda`). (b) Scaled down from the paper: ReLU networks of
width ``width`` and depth ``depths`` (BN layers; the first maps the 784 pixels to ``width``),
BN (:class:`batchnorm.nn.BatchNorm1d`, eps ``eps``, batch statistics at train and test time)
before every ReLU, W ~ N(0, 1/fan_in), trained with plain SGD at ``lr`` for ``steps`` steps at
each B in ``batch_sizes``; test accuracy over the first ``test_subset`` test images in batches
of B; a cell "trains" if the mean final test accuracy over seeds is at least ``trainable_acc``.
The prediction: it trains iff depth <= 16 / ln(relu_lambda(B)). (c) Remedies at the deepest depth
and smallest B: residual connections (``x + ReLU(BN(Wx))``) and eps = ``remedy_eps``, by Monte
Carlo lambda and by training.

Rules (in code): (1) for ReLU and linear, the Monte Carlo lambda is within ``rel_tol`` of the
closed form at every B >= 8 (the module's finite-width bias makes B = 4 unreliable); (2) lambda
> 1 for every nonlinearity and B; (3) the trainability grid agrees with the depth prediction on
at least 75% of the cells; (4) both remedies give a smaller Monte Carlo lambda than the plain
network at the smallest B; (5) both remedies reach a higher test accuracy than the plain network
at the deepest depth and smallest B.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from batchnorm.lab.config import param
from batchnorm.lab.data import DATASETS
from batchnorm.lab.experiment import (
    Claim,
    Comparison,
    Context,
    Experiment,
    Measurement,
    md_table,
)
from batchnorm.lab.progress import bar
from batchnorm.lab.theory.gradient_explosion import (
    gradient_growth,
    linear_lambda,
    relu_lambda,
    trainable_depth,
)
from batchnorm.nn import BatchNorm1d

__all__ = ["Config", "Numbers", "EXPERIMENT", "measure", "judge"]

MC_NONLINEARITIES = ("relu", "tanh", "linear")
CLOSED = {"relu": relu_lambda, "linear": linear_lambda}


@dataclass(frozen=True)
class Config:
    """lambda by Monte Carlo, the trainability grid and the remedies. Defaults: full protocol."""

    mc_batch_sizes: tuple[int, ...] = param((4, 8, 16, 32, 64), "batch sizes B for lambda")
    mc_width: int = param(256, "width N of the Monte Carlo networks")
    mc_depth: int = param(30, "depth of the Monte Carlo networks")
    mc_repeats: int = param(10, "independent networks per Monte Carlo estimate")
    mc_skip: int = param(5, "layers left out of the fit at each end")
    rel_tol: float = param(0.05, "allowed relative gap between Monte Carlo and closed form")
    dataset: str = param("mnist", "data set of the trainability grid", choices=DATASETS)
    depths: tuple[int, ...] = param((6, 12, 24, 48), "depths (BN layers) of the grid")
    batch_sizes: tuple[int, ...] = param((4, 8, 32, 128), "batch sizes of the grid")
    width: int = param(64, "width of the grid networks (the paper: 384)")
    eps: float = param(1e-3, "BN eps of the grid networks (the paper's 1e-3)")
    lr: float = param(0.1, "plain SGD learning rate")
    steps: int = param(500, "SGD steps per network")
    trainable_acc: float = param(0.5, "mean final test accuracy for a cell to 'train'")
    test_subset: int = param(2000, "test images evaluated (in batches of B)")
    remedy_eps: float = param(1.0, "the larger eps of the eps remedy")
    seeds: int = param(2, "seeds per cell (initial weights and batches)")
    seed: int = param(0, "the first seed")
    threads: int = param(1, "torch CPU threads (0 = as many as there are idle cores)")

    def validate(self) -> None:
        """Checks across fields; raises ValueError with what to change."""
        for name in ("mc_batch_sizes", "batch_sizes"):
            if not getattr(self, name) or min(getattr(self, name)) < 4:
                raise ValueError(f"{name} must list batch sizes >= 4, got {getattr(self, name)}")
        if not self.depths or min(self.depths) < 1:
            raise ValueError(f"depths must list depths >= 1, got {self.depths}")
        if self.mc_depth < 2 * self.mc_skip + 3:
            raise ValueError(f"mc_depth must be at least 2 * mc_skip + 3, got {self.mc_depth}")
        if self.mc_repeats < 2:
            raise ValueError(f"mc_repeats must be at least 2, got {self.mc_repeats}")
        for name in ("mc_width", "width", "steps", "seeds", "test_subset"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("rel_tol", "lr", "remedy_eps"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)}")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {self.eps}")
        if not 0 < self.trainable_acc < 1:
            raise ValueError(f"trainable_acc must lie in (0, 1), got {self.trainable_acc}")

    def quick(self) -> Config:
        """A smoke test: small Monte Carlo, a 2 x 2 grid, 100 steps, one seed."""
        return replace(
            self,
            mc_batch_sizes=(4, 8, 16),
            mc_width=64,
            mc_depth=16,
            mc_repeats=4,
            mc_skip=3,
            depths=(6, 24),
            batch_sizes=(4, 32),
            width=32,
            steps=100,
            test_subset=500,
            seeds=1,
        )


class DeepBNNet(torch.nn.Module):
    """``x^l = x^(l-1)[residual] + ReLU(BN(W^l x^(l-1)))``, then a linear readout."""

    def __init__(
        self, inputs: int, width: int, depth: int, classes: int, eps: float, residual: bool
    ) -> None:
        super().__init__()
        sizes = [inputs] + [width] * depth
        self.linears = torch.nn.ModuleList(
            torch.nn.Linear(a, b, bias=False) for a, b in zip(sizes[:-1], sizes[1:])
        )
        self.norms = torch.nn.ModuleList(
            BatchNorm1d(width, eps=eps, track_running_stats=False) for _ in range(depth)
        )
        self.readout = torch.nn.Linear(width, classes)
        self.residual = residual
        with torch.no_grad():
            for layer in [*self.linears, self.readout]:
                layer.weight.normal_(0.0, 1.0 / math.sqrt(layer.weight.shape[1]))
            self.readout.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (linear, norm) in enumerate(zip(self.linears, self.norms)):
            out = torch.relu(norm(linear(x)))
            x = x + out if (self.residual and i > 0) else out
        return self.readout(x)


def _train_cell(data, config: Config, depth: int, batch: int, seed: int, **variant) -> float:
    """Train one network; its final test accuracy (nan if the loss became non-finite)."""
    torch.manual_seed(seed)
    eps = variant.get("eps", config.eps)
    model = DeepBNNet(
        data.num_features,
        config.width,
        depth,
        data.num_classes,
        eps,
        variant.get("residual", False),
    )
    opt = torch.optim.SGD(model.parameters(), lr=config.lr)
    x = torch.from_numpy(data.train_x)
    y = torch.from_numpy(data.train_y)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=gen)
    pos = 0
    for _ in range(config.steps):
        if pos + batch > len(y):
            order, pos = torch.randperm(len(y), generator=gen), 0
        idx = order[pos : pos + batch]
        pos += batch
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        if not torch.isfinite(loss):
            return math.nan
        opt.zero_grad()
        loss.backward()
        opt.step()
    tx = torch.from_numpy(data.test_x[: config.test_subset])
    ty = torch.from_numpy(data.test_y[: config.test_subset])
    n = (len(ty) // batch) * batch
    with torch.no_grad():
        pred = torch.cat([model(tx[i : i + batch]).argmax(1) for i in range(0, n, batch)])
    return float((pred == ty[:n]).double().mean())


@dataclass
class LambdaNumbers:
    """One Monte Carlo estimate of lambda."""

    nonlinearity: str
    batch_size: int
    growth: float  # the measured lambda
    theory: float  # the closed form's lambda (nan: none for this nonlinearity)


@dataclass
class GridCell:
    """One cell of the trainability grid: final test accuracy per seed (nan: diverged)."""

    depth: int
    batch_size: int
    accs: list[float]


@dataclass
class Numbers:
    """What the claims are decided on."""

    rel_tol: float  # the config's tolerance of the closed forms
    trainable_acc: float  # the config's test accuracy that counts as trained
    remedy_eps: float
    lambdas: list[LambdaNumbers]  # in the order measured
    grid: list[GridCell]
    predicted_depth: dict[int, float]  # 16 / ln lambda_ReLU(B), by batch size B
    b_min: int  # the smallest Monte Carlo batch size
    plain_lambda: float  # lambda of the plain ReLU network at b_min
    remedy_lambda: dict[str, float]  # lambda of each remedy at b_min
    deep: int  # the deepest grid depth
    small: int  # the smallest grid batch size
    plain_acc: list[float]  # the plain network at (deep, small), per seed
    remedy_acc: dict[str, list[float]]  # each remedy at (deep, small), per seed


def _mean_acc(values: list[float]) -> float:
    return float(np.mean(np.nan_to_num(values, nan=0.0)))  # diverged counts as 0


def judge(
    numbers: Numbers,
    *,
    closed_form_min_batch: int = 8,
    explosion_floor: float = 1.0,
    agreement_share: float = 0.75,
    remedy_margin: float = 0.0,
) -> list[Claim]:
    """Decide the claims from ``numbers`` alone.

    Args:
        numbers: what :func:`measure` measured.
        closed_form_min_batch: "closed form" checks the batch sizes from this one up (the
            tolerance itself is the config's ``rel_tol``, saved in the numbers).
        explosion_floor: "explosion" holds when every lambda is above this (1: no growth).
        agreement_share: "trainable depth" holds when the prediction agrees with the grid on at
            least this share of its cells (a tie holds).
        remedy_margin: "remedies train" holds when each remedy's mean test accuracy is above
            the plain network's by more than this (a tie does not hold).
    """
    n = numbers
    checked = [
        e for e in n.lambdas if e.nonlinearity in CLOSED and e.batch_size >= closed_form_min_batch
    ]
    rel = {(e.nonlinearity, e.batch_size): abs(e.growth / e.theory - 1.0) for e in checked}
    trains = {(c.depth, c.batch_size): _mean_acc(c.accs) >= n.trainable_acc for c in n.grid}
    agree = {k: trains[k] == (k[0] <= n.predicted_depth[k[1]]) for k in trains}
    agreement = float(np.mean(list(agree.values())))
    plain_acc = _mean_acc(n.plain_acc)
    return [
        Claim(
            "closed form",
            "The closed forms of lambda(B) for ReLU and linear match the measured growth.",
            f"|lambda_MC / lambda_theory - 1| <= {n.rel_tol:g} for ReLU and linear, "
            f"B >= {closed_form_min_batch}",
            bool(checked) and max(rel.values()) <= n.rel_tol,
            (
                f"largest relative gap {max(rel.values()):.3f} "
                f"({max(rel, key=rel.get)[0]}, B={max(rel, key=rel.get)[1]})"
                if checked
                else f"no batch size >= {closed_form_min_batch} measured"
            ),
        ),
        Claim(
            "explosion",
            "Gradients explode at initialization for every batch size: lambda > 1.",
            "Monte Carlo lambda > "
            + ("1" if explosion_floor == 1.0 else f"{explosion_floor:g}")
            + " for ReLU, tanh and linear at every B",
            all(e.growth > explosion_floor for e in n.lambdas),
            f"smallest lambda {min(e.growth for e in n.lambdas):.4f}",
        ),
        Claim(
            "trainable depth",
            "Networks train up to a depth of about 16 / ln(lambda).",
            "trained (mean test acc >= trainable_acc) == (depth <= 16/ln lambda_ReLU(B)) on "
            f">= {agreement_share:.0%} of the grid cells",
            bool(agreement >= agreement_share),
            f"agreement on {sum(agree.values())}/{len(agree)} cells",
        ),
        Claim(
            "remedies reduce lambda",
            "Residual connections and a larger eps reduce the gradient explosion.",
            f"Monte Carlo lambda (ReLU, B={n.b_min}) with each remedy below the plain network's",
            all(g < n.plain_lambda for g in n.remedy_lambda.values()),
            f"plain {n.plain_lambda:.3f}; "
            + ", ".join(f"{k} {g:.3f}" for k, g in n.remedy_lambda.items()),
        ),
        Claim(
            "remedies train",
            "With the remedies, the deepest small-batch network trains better.",
            f"mean test acc at depth {n.deep}, B={n.small}: each remedy above plain"
            + (f" by more than {remedy_margin}" if remedy_margin else ""),
            all(_mean_acc(v) > plain_acc + remedy_margin for v in n.remedy_acc.values()),
            f"plain {plain_acc:.3f}; residual {_mean_acc(n.remedy_acc['residual']):.3f}; "
            f"eps={n.remedy_eps:g} {_mean_acc(n.remedy_acc['eps']):.3f}",
        ),
    ]


def measure(config: Config, ctx: Context) -> Measurement:
    """Monte Carlo lambda, the trainability grid, the remedies; measure; plot."""
    mc_kwargs = dict(
        depth=config.mc_depth,
        repeats=config.mc_repeats,
        skip_first=config.mc_skip,
        skip_last=config.mc_skip,
        seed=config.seed,
    )
    lam: dict[tuple[str, int], object] = {}
    with ctx.timer("Monte Carlo lambda"):
        jobs = [(nl, b) for nl in MC_NONLINEARITIES for b in config.mc_batch_sizes]
        for nl, b in bar(jobs, desc="lambda (Monte Carlo)"):
            lam[nl, b] = gradient_growth(config.mc_width, b, nonlinearity=nl, **mc_kwargs)
        b_min = min(config.mc_batch_sizes)
        remedy_lam = {
            "residual": gradient_growth(config.mc_width, b_min, residual=True, **mc_kwargs),
            f"eps={config.remedy_eps:g}": gradient_growth(
                config.mc_width, b_min, eps=config.remedy_eps, **mc_kwargs
            ),
        }
    lambda_rows = []
    for (nl, b), est in lam.items():
        theory = CLOSED[nl](b) if nl in CLOSED else math.nan
        lambda_rows.append(
            {
                "nonlinearity": nl,
                "batch_size": b,
                "lambda_mc": est.growth,
                "ci_low": est.ci_low,
                "ci_high": est.ci_high,
                "lambda_theory": theory,
            }
        )
    ctx.write_csv("lambda.csv", lambda_rows, list(lambda_rows[0]))

    data = ctx.load_data(config.dataset)
    seeds = [config.seed + i for i in range(config.seeds)]
    grid: dict[tuple[int, int], list[float]] = {}
    grid_rows = []
    with ctx.timer("trainability grid"):
        cells = [(d, b) for d in config.depths for b in config.batch_sizes]
        for d, b in bar(cells, desc="trainability grid"):
            grid[d, b] = [_train_cell(data, config, d, b, s) for s in seeds]
            grid_rows += [
                {"variant": "plain", "depth": d, "batch_size": b, "seed": s, "test_acc": a}
                for s, a in zip(seeds, grid[d, b])
            ]
    deep, small = max(config.depths), min(config.batch_sizes)
    remedy_acc: dict[str, list[float]] = {}
    with ctx.timer("remedies"):
        for name, variant in (
            ("residual", {"residual": True}),
            ("eps", {"eps": config.remedy_eps}),
        ):
            remedy_acc[name] = [_train_cell(data, config, deep, small, s, **variant) for s in seeds]
            grid_rows += [
                {"variant": name, "depth": deep, "batch_size": small, "seed": s, "test_acc": a}
                for s, a in zip(seeds, remedy_acc[name])
            ]
    ctx.write_csv("grid.csv", grid_rows, ["variant", "depth", "batch_size", "seed", "test_acc"])

    def mean_acc(values: list[float]) -> float:
        return float(np.mean(np.nan_to_num(values, nan=0.0)))  # diverged counts as 0

    predicted = {b: trainable_depth(relu_lambda(b)) for b in config.batch_sizes}
    trains = {k: mean_acc(v) >= config.trainable_acc for k, v in grid.items()}
    agree = {k: trains[k] == (k[0] <= predicted[k[1]]) for k in grid}
    agreement = float(np.mean(list(agree.values())))
    plain_small = lam["relu", b_min].growth
    numbers = Numbers(
        rel_tol=config.rel_tol,
        trainable_acc=config.trainable_acc,
        remedy_eps=config.remedy_eps,
        lambdas=[
            LambdaNumbers(nl, b, float(est.growth), CLOSED[nl](b) if nl in CLOSED else math.nan)
            for (nl, b), est in lam.items()
        ],
        grid=[GridCell(d, b, [float(a) for a in accs]) for (d, b), accs in grid.items()],
        predicted_depth={b: float(v) for b, v in predicted.items()},
        b_min=b_min,
        plain_lambda=float(plain_small),
        remedy_lambda={k: float(e.growth) for k, e in remedy_lam.items()},
        deep=deep,
        small=small,
        plain_acc=[float(a) for a in grid[deep, small]],
        remedy_acc={k: [float(a) for a in v] for k, v in remedy_acc.items()},
    )
    comparisons = []
    for b in config.mc_batch_sizes:
        for nl in MC_NONLINEARITIES:
            est = lam[nl, b]
            theory = f"{CLOSED[nl](b):.4f}" if nl in CLOSED else "no closed form"
            comparisons.append(
                Comparison(
                    f"lambda, {nl}, B={b}",
                    theory,
                    f"{est.growth:.4f} [{est.ci_low:.4f}, {est.ci_high:.4f}]",
                    value=est.growth,
                )
            )
    comparisons.append(
        Comparison("lambda, ReLU, B -> infinity", f"pi/(pi-1) = {math.pi / (math.pi - 1):.4f}", "-")
    )
    for b in config.batch_sizes:
        comparisons.append(
            Comparison(
                f"max trainable depth, B={b}",
                f"16/ln lambda = {predicted[b]:.1f}",
                ", ".join(f"d={d}: {mean_acc(grid[d, b]):.3f}" for d in config.depths),
            )
        )
    grid_table = md_table(
        ["depth \\ B", *[f"B={b} (pred. {predicted[b]:.0f})" for b in config.batch_sizes]],
        [
            [str(d)]
            + [
                f"{mean_acc(grid[d, b]):.3f} {'trains' if trains[d, b] else 'fails'}"
                + ("" if agree[d, b] else " (disagrees)")
                for b in config.batch_sizes
            ]
            for d in config.depths
        ],
    )
    with ctx.timer("plots"):
        _plot(ctx, config, lam, grid, predicted)
    return Measurement(
        numbers=numbers,
        comparisons=comparisons,
        metrics={
            "lambda": lambda_rows,
            "remedy_lambda": {k: e.growth for k, e in remedy_lam.items()},
            "grid_test_acc": {f"depth={d} B={b}": v for (d, b), v in grid.items()},
            "remedy_test_acc": remedy_acc,
            "predicted_depth": {str(b): v for b, v in predicted.items()},
            "agreement": agreement,
        },
        tables=[("Trainability grid: mean final test accuracy", grid_table)],
        figures=[
            (
                "explosion.png",
                "lambda against B: Monte Carlo (95% interval) for ReLU, tanh, linear and the "
                "closed forms; trainability grid with the predicted depth 16/ln lambda",
            )
        ],
        choices=[
            f"Monte Carlo: width {config.mc_width}, depth {config.mc_depth}, "
            f"{config.mc_repeats} repeats, fit skipping {config.mc_skip} layers at each end, "
            "eps = 0, float64, random linear loss",
            f"scaled-down grid (the paper: width 384, eps 1e-3, tuned lr, long training): width "
            f"{config.width}, eps {config.eps:g}, plain SGD lr {config.lr:g}, {config.steps} "
            f"steps, {config.seeds} seed(s); BN uses batch statistics at test time too, on test "
            f"batches of B (first {config.test_subset} test images)",
            "the first layer (784 -> width) counts as one of the depth layers; residual "
            "connections skip every layer but the first",
        ],
        notes=[
            "The closed forms are from SPEC.md 4.3 (the paper's text was not available); "
            "finite width biases the Monte Carlo estimate low by O(1/N), most at small B.",
            "The grid is far shorter than the paper's training: 'fails' means not reaching "
            f"{config.trainable_acc} test accuracy within {config.steps} steps.",
        ],
    )


def _plot(ctx: Context, config: Config, lam, grid, predicted) -> None:
    from batchnorm.lab.plots import new_figure

    figure, axes = new_figure(2, 1, size=(4.8, 3.6))
    ax = axes[0, 0]
    bs = np.array(config.mc_batch_sizes)
    for nl in MC_NONLINEARITIES:
        est = [lam[nl, b] for b in bs]
        g = np.array([e.growth for e in est])
        err = np.array([[e.growth - e.ci_low for e in est], [e.ci_high - e.growth for e in est]])
        ax.errorbar(bs, g, yerr=err, fmt="o", capsize=3, label=f"{nl} (Monte Carlo)")
    fine = np.arange(4, int(bs.max()) + 1)
    ax.plot(fine, [relu_lambda(int(b)) for b in fine], "k-", label="ReLU closed form")
    ax.plot(fine, [linear_lambda(int(b)) for b in fine], "k--", label="linear closed form")
    ax.axhline(math.pi / (math.pi - 1), color="gray", linewidth=0.8, label="pi/(pi-1)")
    ax.set(xscale="log", xlabel="batch size B", ylabel="lambda", title="gradient growth per layer")
    ax.set_xticks(bs, [str(b) for b in bs])
    ax.minorticks_off()
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[0, 1]
    acc = np.array([[np.nanmean(grid[d, b]) for b in config.batch_sizes] for d in config.depths])
    image = ax.imshow(acc, origin="lower", aspect="auto", vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(config.batch_sizes)), [str(b) for b in config.batch_sizes])
    ax.set_yticks(range(len(config.depths)), [str(d) for d in config.depths])
    depths = np.array(config.depths, dtype=np.float64)
    pred_pos = [
        np.interp(math.log(predicted[b]), np.log(depths), np.arange(len(depths)))
        for b in config.batch_sizes
    ]  # clipped to the plotted depths
    ax.plot(range(len(config.batch_sizes)), pred_pos, "r-o", label="16 / ln lambda")
    ax.set(xlabel="batch size B", ylabel="depth", title="final test accuracy (ReLU + BN)")
    ax.legend(fontsize=7)
    figure.colorbar(image, ax=ax)
    ctx.save_figure(figure, "explosion.png")


EXPERIMENT = Experiment(
    name="explosion",
    title="Gradient explosion in deep BN networks (Yang et al. 2019)",
    claim=(
        "At initialization, gradients of a deep BN network grow by lambda(B) > 1 per layer, as "
        "the closed forms predict; trainable depth is about 16/ln(lambda); residual "
        "connections and a larger eps help."
    ),
    paper=(
        "Yang et al. (2019), lambda against batch size and the depth x batch-size "
        "trainability map on MNIST (scaled down here: smaller width, fewer steps)."
    ),
    config_cls=Config,
    numbers_cls=Numbers,
    measure=measure,
    judge=judge,
    summary="gradient growth lambda(B), trainable depth, remedies",
)
