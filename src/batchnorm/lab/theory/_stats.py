"""Small statistics helpers shared by the theory modules (no SciPy needed).

- :func:`student_t_quantile`: the quantile of Student's t distribution, for confidence intervals
  over a handful of repeats (the normal quantile would make them too narrow).
- :func:`mean_confidence_interval`: mean and two-sided t interval of a sample.
- :func:`least_squares_slope`: slope and intercept of a straight-line fit.

Example:
    >>> round(student_t_quantile(0.975, 9), 4)  # tables: 2.2622
    2.2622
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["student_t_quantile", "mean_confidence_interval", "least_squares_slope"]


def _t_cdf(t: float, dof: float) -> float:
    """P(T <= t) for Student's t with ``dof`` degrees of freedom, by Simpson's rule.

    The density is integrated in the variable theta = arctan(t / sqrt(dof)), where it becomes
    c * cos(theta)^(dof - 1): smooth and bounded on (-pi/2, pi/2), so a fixed grid is accurate.
    """
    theta = math.atan(t / math.sqrt(dof))
    log_c = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(math.pi)
    n = 2000  # even number of Simpson panels
    grid = np.linspace(0.0, theta, n + 1)
    f = np.cos(grid) ** (dof - 1)
    weights = np.ones(n + 1)
    weights[1:-1:2] = 4.0
    weights[2:-1:2] = 2.0
    integral = float(np.dot(weights, f)) * (theta / n) / 3.0
    return 0.5 + math.exp(log_c) * integral


def student_t_quantile(p: float, dof: float) -> float:
    """The p-quantile of Student's t distribution with ``dof`` > 0 degrees of freedom.

    Found by bisection on the CDF (accurate to about 1e-9).

    Args:
        p: probability in (0, 1).
        dof: degrees of freedom (> 0; the number of repeats minus one for a mean).
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    if not dof > 0:
        raise ValueError(f"dof must be > 0, got {dof!r}")
    if p < 0.5:
        return -student_t_quantile(1.0 - p, dof)
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, dof) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if _t_cdf(mid, dof) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def mean_confidence_interval(
    values: Sequence[float] | np.ndarray, confidence: float = 0.95
) -> tuple[float, float, float]:
    """(mean, low, high): the sample mean and its two-sided Student-t confidence interval.

    Args:
        values: at least two finite numbers (independent repeats).
        confidence: coverage of the interval, in (0, 1).
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size < 2:
        raise ValueError(f"a confidence interval needs at least 2 values, got {x.size}")
    if not np.all(np.isfinite(x)):
        raise ValueError("values must be finite for a confidence interval")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    mean = float(x.mean())
    half = student_t_quantile(0.5 + confidence / 2, x.size - 1) * float(x.std(ddof=1))
    half /= math.sqrt(x.size)
    return mean, mean - half, mean + half


def least_squares_slope(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(slope, intercept) of the least-squares line y ~ slope * x + intercept.

    ``y`` may be 1-D (one series: 0-d arrays come back) or 2-D (points x series: one slope and
    intercept per series).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.size < 2 or y.shape[0] != x.size:
        raise ValueError(
            f"need at least 2 points with matching lengths, got x {x.shape} and y {y.shape}"
        )
    xc = x - x.mean()
    denom = float(np.dot(xc, xc))
    if denom == 0.0:
        raise ValueError("x values are all equal: the slope is undefined")
    yc = y - y.mean(axis=0)
    slope = np.asarray(np.tensordot(xc, yc, axes=(0, 0)) / denom)
    intercept = np.asarray(y.mean(axis=0) - slope * x.mean())
    return slope, intercept
