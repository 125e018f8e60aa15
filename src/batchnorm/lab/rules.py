"""What every experiment's rules share: margins from the seed spread, and "not tested".

A rule that decides on a difference (with BN against without, a small batch against a large
one) must clear a margin the run itself measured: :func:`paired_tolerance` is a multiple of the
standard error of the per-seed differences, with a floor for the case where the seeds say nothing
(one seed, or seeds that agree exactly). :func:`within_tolerance` and :func:`beyond_tolerance`
are the two questions rules ask of it.

A claim about what batch norm does to a network's training can only be tested on networks that
trained. :func:`untrained` names the arms whose accuracy stayed below a floor, and
:func:`not_tested` turns such a claim into the verdict "not tested" (never "did not hold"), with
the reason in its evidence. :func:`gate` does both in one call.

Example:
    >>> import numpy as np
    >>> d = np.array([0.010, 0.012, 0.008])       # BN minus plain, paired by seed
    >>> round(paired_tolerance(d), 4)               # 2 standard errors of the differences
    0.0023
    >>> beyond_tolerance(d)                          # the mean 0.010 clears it
    True
    >>> untrained({"plain": [0.11, 0.10]}, floor=0.5)
    'plain reached 0.1050 (below the 0.5 a trained network reaches)'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from batchnorm.lab.experiment import Claim

__all__ = [
    "DEFAULT_SPREAD_FACTOR",
    "paired_tolerance",
    "standard_error",
    "within_tolerance",
    "beyond_tolerance",
    "untrained",
    "not_tested",
    "gate",
    "baseline_metrics",
]

DEFAULT_SPREAD_FACTOR = 2.0


def standard_error(values: Sequence[float] | np.ndarray) -> float:
    """The standard error of the mean of the finite ``values`` (0 for fewer than two).

    >>> round(standard_error([1.0, 2.0, 3.0]), 4)
    0.5774
    """
    finite = np.asarray(values, dtype=np.float64).ravel()
    finite = finite[np.isfinite(finite)]
    if finite.size < 2:
        return 0.0
    return float(np.std(finite, ddof=1) / math.sqrt(finite.size))


def paired_tolerance(
    differences: Sequence[float] | np.ndarray,
    *,
    spread_factor: float = DEFAULT_SPREAD_FACTOR,
    min_tolerance: float = 0.0005,
) -> float:
    """The margin a mean difference must clear: ``spread_factor`` standard errors of the
    per-seed (paired) differences, and at least ``min_tolerance`` (with one seed, or seeds that
    agree exactly, the spread says nothing; 0.0005 is 5 images of a 10,000-image test set).

    >>> round(paired_tolerance([0.01, 0.03, 0.02]), 4)  # 2 * 0.01 / sqrt(3)
    0.0115
    >>> paired_tolerance([0.01])
    0.0005
    """
    return float(max(spread_factor * standard_error(differences), min_tolerance))


def _mean(values: Sequence[float] | np.ndarray) -> float:
    array = np.asarray(values, dtype=np.float64).ravel()
    finite = array[np.isfinite(array)]
    return float(finite.mean()) if finite.size else math.nan


def beyond_tolerance(
    differences: Sequence[float] | np.ndarray,
    *,
    spread_factor: float = DEFAULT_SPREAD_FACTOR,
    min_tolerance: float = 0.0005,
) -> bool:
    """Whether the mean of the paired ``differences`` is above :func:`paired_tolerance`.

    >>> beyond_tolerance([0.001, -0.001, 0.002])
    False
    """
    tol = paired_tolerance(differences, spread_factor=spread_factor, min_tolerance=min_tolerance)
    return bool(_mean(differences) > tol)


def within_tolerance(
    differences: Sequence[float] | np.ndarray,
    *,
    spread_factor: float = DEFAULT_SPREAD_FACTOR,
    min_tolerance: float = 0.0005,
) -> bool:
    """Whether the absolute mean of the paired ``differences`` is within
    :func:`paired_tolerance` (no difference the seeds can tell apart).

    >>> within_tolerance([0.001, -0.001, 0.002])
    True
    """
    tol = paired_tolerance(differences, spread_factor=spread_factor, min_tolerance=min_tolerance)
    return bool(abs(_mean(differences)) <= tol)


def untrained(
    accuracies: Mapping[str, Sequence[float] | np.ndarray | float], floor: float
) -> str | None:
    """Why the networks cannot test a claim: the arms whose mean final accuracy is below
    ``floor`` (a NaN counts as below), or None when every arm trained.

    >>> untrained({"BN": [0.97, 0.98], "plain": [0.96]}, floor=0.5) is None
    True
    """
    below = []
    for arm, values in accuracies.items():
        mean = _mean(np.atleast_1d(np.asarray(values, dtype=np.float64)))
        if not (mean >= floor):
            below.append(f"{arm} reached {mean:.4f}")
    if not below:
        return None
    return f"{', '.join(below)} (below the {floor:g} a trained network reaches)"


def not_tested(name: str, statement: str, rule: str, reason: str) -> Claim:
    """A claim the run could not test, with the reason as its evidence.

    >>> not_tested("faster", "BN trains faster.", "steps to 0.9", "no arm trained").verdict
    'not tested'
    """
    return Claim(name, statement, rule, False, f"not tested: {reason}", tested=False)


def gate(claim: Claim, reason: str | None) -> Claim:
    """``claim`` itself when ``reason`` is None, else the same claim marked "not tested" (the
    evidence the rule saw is kept after the reason).

    >>> c = Claim("a", "A holds.", "x > 0", False, "x = -1")
    >>> gate(c, None) is c
    True
    >>> gate(c, "the plain network did not train").evidence
    'not tested: the plain network did not train; measured: x = -1'
    """
    if reason is None:
        return claim
    return Claim(
        claim.name,
        claim.statement,
        claim.rule,
        False,
        f"not tested: {reason}; measured: {claim.evidence}",
        tested=False,
    )


def baseline_metrics(
    train_accuracy: Sequence[float] | np.ndarray | float,
    test_accuracy: Sequence[float] | np.ndarray | float,
) -> dict[str, float]:
    """The two metrics every classification experiment records: its baseline's final train
    and test accuracy, each the mean over seeds (the report states them, so a reader sees the
    networks were trained).

    >>> baseline_metrics([0.99, 0.97], [0.95, 0.93])
    {'baseline_train_accuracy': 0.98, 'baseline_test_accuracy': 0.94}
    """
    return {
        "baseline_train_accuracy": _mean(np.atleast_1d(train_accuracy)),
        "baseline_test_accuracy": _mean(np.atleast_1d(test_accuracy)),
    }
