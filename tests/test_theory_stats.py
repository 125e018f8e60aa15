"""The small statistics helpers of batchnorm.lab.theory against tables and SciPy."""

from __future__ import annotations

import numpy as np
import pytest

from batchnorm.lab.theory._stats import (
    least_squares_slope,
    mean_confidence_interval,
    student_t_quantile,
)
from tests.helpers import assert_close


@pytest.mark.parametrize(
    ("p", "dof", "table"),
    [
        (0.975, 1, 12.7062),
        (0.975, 9, 2.2622),
        (0.975, 29, 2.0452),
        (0.995, 4, 4.6041),
        (0.95, 2, 2.9200),
        (0.975, 10**6, 1.9600),
    ],
)
def test_t_quantile_matches_tables(p, dof, table):
    assert student_t_quantile(p, dof) == pytest.approx(table, abs=1e-4)
    assert student_t_quantile(1 - p, dof) == pytest.approx(-table, abs=1e-4)


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for dof in (1, 2, 3, 5, 9, 19, 50):
        for p in (0.6, 0.9, 0.975, 0.999):
            assert student_t_quantile(p, dof) == pytest.approx(stats.t.ppf(p, dof), rel=1e-7)


def test_confidence_interval_and_slope():
    mean, low, high = mean_confidence_interval([1.0, 2.0, 3.0, 4.0], 0.95)
    half = 3.1824 * np.std([1, 2, 3, 4], ddof=1) / 2
    assert mean == 2.5 and low == pytest.approx(2.5 - half, abs=1e-3)
    assert high == pytest.approx(2.5 + half, abs=1e-3)
    x = np.arange(5.0)
    slope, intercept = least_squares_slope(x, np.stack([3 * x + 1, -x], axis=1))
    assert_close(slope, np.array([3.0, -1.0]), rtol=0, atol=1e-12, name="slope")
    assert_close(intercept, np.array([1.0, 0.0]), rtol=0, atol=1e-12, name="intercept")
    with pytest.raises(ValueError, match="at least 2 values"):
        mean_confidence_interval([1.0])
    with pytest.raises(ValueError, match="all equal"):
        least_squares_slope(np.ones(3), np.arange(3.0))
