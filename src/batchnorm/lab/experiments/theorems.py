"""Theorems 4.1 and 4.2 of Santurkar et al. (2018): the bounds checked on many random instances.

Claim (Santurkar, Tsipras, Ilyas, Madry, "How Does Batch Normalization Help Optimization?",
arXiv 1805.11604, Sec. 4.1; SPEC.md 4.2): for one BN unit over a batch of m, with layer output
``z = gamma yhat + beta`` and a downstream loss ``ell(z)``, the gradient and the curvature along
the gradient seen through BN are bounded by those of the identical network without BN:

- Theorem 4.1: ``||grad_y L_hat||^2 <= gamma^2/sigma_j^2 (||g_hat||^2 - <1,g_hat>^2/m
  - <g_hat,yhat>^2/m)``;
- Theorem 4.2: ``v^T (d^2 L_hat/dy dy) v <= gamma^2/sigma^2 v^T H v - gamma/(m sigma^2)
  <g_hat,yhat> ||v||^2`` with ``v = grad_y L_hat``, and a second form with ``g_hat^T H g_hat``
  when ``v^T H v <= g_hat^T H g_hat``.

The paper proves them without a figure; this experiment reproduces the statements numerically:
both sides are computed by :mod:`batchnorm.lab.theory.single_layer` (autograd, float64) on
``instances`` random instances per eps, with eps = 0 (the theorems' setting) and eps > 0.

Instances (seeded): m drawn from ``batch_sizes``; ``y = a + s N(0, I_m)`` with
``log10 s ~ U(-1, 1)`` and ``a ~ N(0, 1)``; ``gamma = +-10^U(-0.5, 0.5)``, ``beta ~ N(0, 1)``;
a non-convex downstream loss ``ell(z) = z^T A z / 2 + b^T z + sum_k c_k sin(d_k z_k)``, with A
symmetric with N(0, 1/m) entries, b, c, d ~ N(0, 1).

Rules (in code; "holds" means ``lhs <= rhs + tol * max(1, |lhs|, |rhs|)``, tol = 1e-9):
(1) Theorem 4.1 holds on every instance, at every eps; (2) at eps = 0 it is tight: every
ratio lhs/rhs lies within ``1e-8`` of 1 (the proof's identity); (3) Theorem 4.2 (first form)
holds on every eps = 0 instance; (4) the second form holds on every eps = 0 instance where its
condition ``v^T H v <= g_hat^T H g_hat`` holds. With eps > 0 the first form is not a bound
(the module :mod:`~batchnorm.lab.theory.single_layer` derives O(eps) terms of either sign): the
fraction holding is reported, not judged. The ``1/sqrt(m)`` transcription of Theorem 4.1 is
evaluated too, and the fraction of instances on which it fails is reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from batchnorm.lab.config import RunConfig, param
from batchnorm.lab.experiment import Claim, Comparison, Context, Experiment, Measurement, md_table
from batchnorm.lab.progress import bar
from batchnorm.lab.theory.single_layer import gradient_norm_bound, hessian_bound

__all__ = ["Config", "Numbers", "EXPERIMENT", "measure", "judge"]

TOL = 1e-9  # relative rounding allowance in "holds"
TIGHT = 1e-8  # |ratio - 1| allowed for "tight" at eps = 0


@dataclass(frozen=True)
class Config(RunConfig):
    """Random instances of Theorems 4.1 and 4.2. Defaults are the full protocol."""

    instances: int = param(400, "random instances per eps value")
    batch_sizes: tuple[int, ...] = param((4, 8, 16, 32, 64), "batch sizes m to draw from")
    eps_values: tuple[float, ...] = param(
        (0.0, 1e-3, 0.1), "BN eps values (0 is the theorems' setting)"
    )
    seed: int = param(0, "seed of the instance generator")
    threads: int = param(1, "torch CPU threads (0 = as many as there are idle cores)")

    def validate(self) -> None:
        """Checks across fields; raises ValueError with what to change."""
        if self.instances < 2:
            raise ValueError(f"instances must be at least 2, got {self.instances}")
        if not self.batch_sizes or min(self.batch_sizes) < 2:
            raise ValueError(f"batch_sizes must list sizes >= 2, got {self.batch_sizes}")
        if not self.eps_values or any(not (math.isfinite(e) and e >= 0) for e in self.eps_values):
            raise ValueError(f"eps_values must list finite numbers >= 0, got {self.eps_values}")
        if 0.0 not in self.eps_values:
            raise ValueError("eps_values must include 0 (the theorems' setting)")

    def quick(self) -> Config:
        """A smoke test: 40 instances per eps, m up to 16."""
        return replace(self, instances=40, batch_sizes=(4, 8, 16))


def _instance(rng: np.random.Generator, batch_sizes: tuple[int, ...]):
    m = int(rng.choice(batch_sizes))
    scale = 10.0 ** rng.uniform(-1.0, 1.0)
    y = torch.tensor(rng.normal() + scale * rng.standard_normal(m), dtype=torch.float64)
    gamma = float(rng.choice([-1.0, 1.0]) * 10.0 ** rng.uniform(-0.5, 0.5))
    beta = float(rng.normal())
    a = rng.standard_normal((m, m)) / math.sqrt(m)
    A = torch.tensor(0.5 * (a + a.T), dtype=torch.float64)
    b, c, d = (torch.tensor(rng.standard_normal(m), dtype=torch.float64) for _ in range(3))

    def loss(z: torch.Tensor) -> torch.Tensor:
        return 0.5 * z @ A @ z + b @ z + (c * torch.sin(d * z)).sum()

    return m, y, gamma, beta, loss


def _holds(lhs: float, rhs: float) -> bool:
    return lhs <= rhs + TOL * max(1.0, abs(lhs), abs(rhs))


@dataclass
class InstanceNumbers:
    """Both theorems' sides on one random instance."""

    eps: float
    grad_lhs: float  # Theorem 4.1
    grad_rhs: float
    grad_ratio: float  # lhs / rhs
    hess_lhs: float  # Theorem 4.2, first form
    hess_rhs: float
    hess_rel_gap: float  # (rhs - lhs) / max(|lhs|, |rhs|)
    second_applies: bool  # the second form's assumption v^T H v <= g^T H g holds
    second_rhs: float  # the second form's right-hand side


@dataclass
class Numbers:
    """What the claims are decided on: every instance at every eps."""

    eps_values: list[float]
    instances: list[InstanceNumbers]


def judge(numbers: Numbers, *, tolerance: float = TOL, tight: float = TIGHT) -> list[Claim]:
    """Decide the claims from ``numbers`` alone.

    Args:
        numbers: what :func:`measure` measured.
        tolerance: a bound holds when lhs <= rhs + tolerance * max(1, |lhs|, |rhs|) (rounding).
        tight: "thm 4.1 tight" holds when every eps = 0 ratio lhs/rhs is within this of 1 (a
            tie holds).
    """

    def holds(lhs: float, rhs: float) -> bool:
        return lhs <= rhs + tolerance * max(1.0, abs(lhs), abs(rhs))

    rows = numbers.instances
    zero = [r for r in rows if r.eps == 0.0]
    zero_dev = max((abs(r.grad_ratio - 1.0) for r in zero), default=math.nan)
    hess_zero = [holds(r.hess_lhs, r.hess_rhs) for r in zero]
    second_zero = [holds(r.hess_lhs, r.second_rhs) for r in zero if r.second_applies]
    grad_holds = [holds(r.grad_lhs, r.grad_rhs) for r in rows]
    rel_gap_median = float(np.median([r.hess_rel_gap for r in zero])) if zero else math.nan
    relative = f"up to {tolerance:g} relative".replace("e-0", "e-")  # 1e-9, not 1e-09
    return [
        Claim(
            "thm 4.1 holds",
            "Theorem 4.1: BN's gradient norm is bounded as stated.",
            f"lhs <= rhs ({relative}) on every instance, at every eps",
            all(grad_holds),
            f"{sum(grad_holds)}/{len(rows)} instances hold "
            f"(eps values {', '.join(f'{e:g}' for e in numbers.eps_values)})",
        ),
        Claim(
            "thm 4.1 tight",
            "At eps = 0, Theorem 4.1 holds with equality (Fact C.1 makes it an identity).",
            f"every eps = 0 ratio lhs/rhs within {tight:g} of 1",
            bool(zero_dev <= tight),
            f"max |ratio - 1| = {zero_dev:.2e} over {len(zero)} instances",
        ),
        Claim(
            "thm 4.2 holds",
            "Theorem 4.2 (first form): the curvature along the gradient is bounded as stated.",
            f"lhs <= rhs ({relative}) on every eps = 0 instance",
            all(hess_zero),
            f"{sum(hess_zero)}/{len(zero)} eps = 0 instances hold; "
            f"median relative gap {rel_gap_median:.1e}",
        ),
        Claim(
            "thm 4.2 second form",
            "Theorem 4.2 (second form) holds where its assumption v^T H v <= g^T H g holds.",
            "lhs <= second-form rhs on every eps = 0 instance satisfying the assumption",
            bool(second_zero) and all(second_zero),
            f"{sum(second_zero)}/{len(second_zero)} instances "
            f"(the assumption held on {len(second_zero)}/{len(zero)})",
        ),
    ]


def measure(config: Config, ctx: Context) -> Measurement:
    """Evaluate both theorems on random instances at every eps, plot."""
    rows = []
    instances = []
    with ctx.timer("instances"):
        for eps in config.eps_values:
            rng = np.random.default_rng(config.seed)  # the same instances at every eps
            for i in bar(range(config.instances), desc=f"instances, eps={eps:g}"):
                m, y, gamma, beta, loss = _instance(rng, config.batch_sizes)
                g = gradient_norm_bound(y, loss, gamma, beta, eps)
                h = hessian_bound(y, loss, gamma, beta, eps)
                rows.append(
                    {
                        "eps": eps,
                        "instance": i,
                        "m": m,
                        "grad_lhs": g.lhs,
                        "grad_rhs": g.rhs,
                        "grad_ratio": g.ratio,
                        "grad_rhs_sqrt_m": g.rhs_sqrt_m,
                        "grad_holds": _holds(g.lhs, g.rhs),
                        "sqrt_m_holds": _holds(g.lhs, g.rhs_sqrt_m),
                        "hess_lhs": h.lhs,
                        "hess_rhs": h.rhs,
                        "hess_rel_gap": h.gap / max(abs(h.lhs), abs(h.rhs), 1e-300),
                        "hess_holds": _holds(h.lhs, h.rhs),
                        "second_applies": h.second_form_applies,
                        "second_holds": _holds(h.lhs, h.rhs_second_form),
                    }
                )
                instances.append(
                    InstanceNumbers(
                        eps=float(eps),
                        grad_lhs=float(g.lhs),
                        grad_rhs=float(g.rhs),
                        grad_ratio=float(g.ratio),
                        hess_lhs=float(h.lhs),
                        hess_rhs=float(h.rhs),
                        hess_rel_gap=float(rows[-1]["hess_rel_gap"]),
                        second_applies=bool(h.second_form_applies),
                        second_rhs=float(h.rhs_second_form),
                    )
                )
    fields = list(rows[0])
    ctx.write_csv("instances.csv", rows, fields)

    def sel(eps: float) -> list[dict]:
        return [r for r in rows if r["eps"] == eps]

    def frac(rs: list[dict], key: str) -> float:
        return float(np.mean([r[key] for r in rs])) if rs else math.nan

    per_eps = {}
    for eps in config.eps_values:
        rs = sel(eps)
        second = [r for r in rs if r["second_applies"]]
        ratios = np.array([r["grad_ratio"] for r in rs])
        per_eps[eps] = {
            "thm41_holds": frac(rs, "grad_holds"),
            "thm41_ratio_min": float(np.nanmin(ratios)),
            "thm41_ratio_median": float(np.nanmedian(ratios)),
            "thm41_ratio_max": float(np.nanmax(ratios)),
            "thm41_sqrt_m_fails": 1.0 - frac(rs, "sqrt_m_holds"),
            "thm42_holds": frac(rs, "hess_holds"),
            "thm42_rel_gap_median": float(np.median([r["hess_rel_gap"] for r in rs])),
            "thm42_second_applies": frac(rs, "second_applies"),
            "thm42_second_holds_where_applies": frac(second, "second_holds"),
        }
    numbers = Numbers(eps_values=[float(e) for e in config.eps_values], instances=instances)
    comparisons = []
    for eps in config.eps_values:
        p = per_eps[eps]
        comparisons += [
            Comparison(
                f"Thm 4.1, eps={eps:g}: fraction holding; ratio lhs/rhs min / median / max",
                "holds (proved for eps = 0)",
                f"{p['thm41_holds']:.3f}; {p['thm41_ratio_min']:.6f} / "
                f"{p['thm41_ratio_median']:.6f} / {p['thm41_ratio_max']:.6f}",
                value=p["thm41_holds"],
            ),
            Comparison(
                f"Thm 4.2 first form, eps={eps:g}: fraction holding",
                "holds (proved for eps = 0)",
                f"{p['thm42_holds']:.3f}",
                value=p["thm42_holds"],
            ),
            Comparison(
                f"Thm 4.1 with 1/sqrt(m) instead of 1/m, eps={eps:g}: fraction failing",
                "(a transcription variant; not the paper's claim)",
                f"{p['thm41_sqrt_m_fails']:.3f}",
                value=p["thm41_sqrt_m_fails"],
            ),
        ]
    table = md_table(
        [
            "eps",
            "Thm 4.1 holds",
            "ratio median",
            "1/sqrt(m) fails",
            "Thm 4.2 holds",
            "median rel. gap 4.2",
            "2nd-form assumption",
            "2nd form holds (where assumed)",
        ],
        [
            [
                f"{eps:g}",
                f"{p['thm41_holds']:.3f}",
                f"{p['thm41_ratio_median']:.6f}",
                f"{p['thm41_sqrt_m_fails']:.3f}",
                f"{p['thm42_holds']:.3f}",
                f"{p['thm42_rel_gap_median']:.2e}",
                f"{p['thm42_second_applies']:.3f}",
                f"{p['thm42_second_holds_where_applies']:.3f}",
            ]
            for eps, p in per_eps.items()
        ],
    )
    with ctx.timer("plots"):
        _plot(ctx, rows, config.eps_values)
    return Measurement(
        numbers=numbers,
        comparisons=comparisons,
        metrics={"per_eps": {f"{e:g}": p for e, p in per_eps.items()}, "instances": len(rows)},
        tables=[("By eps (fractions over instances)", table)],
        figures=[
            (
                "theorems.png",
                "Tightness: histograms of lhs/rhs for Theorem 4.1 and of the relative gap "
                "(rhs - lhs)/max(|lhs|, |rhs|) for Theorem 4.2, by eps",
            )
        ],
        choices=[
            f"{config.instances} instances per eps, m from {config.batch_sizes}; the same "
            "instances (same seed) at every eps",
            "downstream loss: ell(z) = z^T A z/2 + b^T z + sum_k c_k sin(d_k z_k) (non-convex, "
            "smooth); float64 autograd for both sides",
            f"'holds' allows a relative rounding error of {TOL:g}",
        ],
        notes=[
            "Transcriptions of the paper disagree on the last coefficient of Theorem 4.1 "
            "(1/m or 1/sqrt(m)). With ||yhat||^2 = m the proof's identity gives 1/m; the "
            "1/sqrt(m) variant subtracts more than the identity allows and fails whenever "
            "<g_hat, yhat> != 0 and m > 1 (the 'fails' column).",
            "With eps > 0, Theorem 4.1 keeps holding with slack (1 - r)<g, yhat>^2/m, "
            "r = var_B/(var_B + eps); the first form of Theorem 4.2 is then off by O(eps) "
            "terms of either sign, so its fraction at eps > 0 is reported, not judged.",
            "The theorems' statements are as quoted in SPEC.md 4.2 and secondary "
            "transcriptions; the paper's text was not available.",
        ],
    )


def _plot(ctx: Context, rows: list[dict], eps_values: tuple[float, ...]) -> None:
    from batchnorm.lab.plots import new_figure

    figure, axes = new_figure(2, 1, size=(4.8, 3.4))

    def values(key: str, eps: float) -> np.ndarray:
        v = np.array([r[key] for r in rows if r["eps"] == eps], dtype=np.float64)
        return v[np.isfinite(v)]

    for ax, key in ((axes[0, 0], "grad_ratio"), (axes[0, 1], "hess_rel_gap")):
        every = np.concatenate([values(key, eps) for eps in eps_values])
        lo, hi = float(every.min()), float(every.max())
        pad = max(1e-6, 0.02 * (hi - lo))  # equal values (exact identities) still get bins
        bins = np.linspace(lo - pad, hi + pad, 41)
        for eps in eps_values:
            ax.hist(values(key, eps), bins=bins, alpha=0.5, label=f"eps={eps:g}")
    axes[0, 0].set(xlabel="lhs / rhs (Thm 4.1; <= 1 holds)", ylabel="instances", yscale="log")
    axes[0, 1].set(xlabel="(rhs - lhs) / max(|lhs|, |rhs|) (Thm 4.2; >= 0 holds)", yscale="log")
    for ax in axes[0]:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ctx.save_figure(figure, "theorems.png")


EXPERIMENT = Experiment(
    name="theorems",
    title="Theorems 4.1 and 4.2 on random instances (Santurkar et al. 2018)",
    claim=(
        "For one BN layer, the gradient norm and the curvature along the gradient are bounded "
        "by those of the same network without BN (Theorems 4.1 and 4.2)."
    ),
    paper=(
        "Santurkar et al. (2018), Sec. 4.1, Theorems 4.1 and 4.2 (no figure): both sides "
        "evaluated on random instances, eps = 0 and eps > 0."
    ),
    config_cls=Config,
    numbers_cls=Numbers,
    measure=measure,
    judge=judge,
    summary="single-layer gradient and Hessian bounds on random instances",
)
