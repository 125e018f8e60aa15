"""Every experiment's rules, decided on made-up numbers: each claim made to hold and to fail,
with ties and near-ties at its margin, without a training run."""

from __future__ import annotations

import dataclasses
import math

import pytest

from batchnorm.lab import experiments
from batchnorm.lab.experiments import fig1
from batchnorm.lab.numbers import numbers_from_json, numbers_to_json


def verdicts(claims) -> dict[str, bool]:
    return {c.name: c.held for c in claims}


def held(judge, numbers, name: str, **margins) -> bool:
    return verdicts(judge(numbers, **margins))[name]


# ---------------------------------------------------------------------------------------------
# fig1


def fig1_numbers(**changes) -> fig1.Numbers:
    """Numbers for which every claim of Figure 1 holds."""
    base = fig1.Numbers(
        first_step=500,
        last_step=50_000,
        tracked_unit=0,
        early_bn=[0.95, 0.96],
        early_plain=[0.70, 0.72],
        final_bn=[0.981, 0.980],
        final_plain=[0.975, 0.976],
        median_drift_bn=[0.2, 0.3],
        median_drift_plain=[1.0, 1.2],
        spread_ratio_bn=[1.5, 1.6],
        spread_ratio_plain=[3.0, 4.0],
    )
    return dataclasses.replace(base, **changes)


def test_fig1_all_hold_and_evidence() -> None:
    claims = fig1.judge(fig1_numbers())
    assert verdicts(claims) == {"faster": True, "higher": True, "stable": True}
    assert claims[0].evidence == "step 500: 0.9550 vs 0.7100 (lead +0.2450)"
    assert "by at least 0.05" in claims[0].rule


@pytest.mark.parametrize(
    ("bn", "plain", "margin", "expected"),
    [
        ([0.80, 0.80], [0.75, 0.75], 0.05, True),  # mean lead 0.05 (0.8 - 0.75 in floats)
        ([0.75, 0.75], [0.50, 0.50], 0.25, True),  # exactly at the margin: a tie holds
        ([0.7499, 0.75], [0.50, 0.50], 0.25, False),  # a near-tie below the margin fails
        ([0.95], [0.95], 0.0, True),  # no lead at margin 0
        ([0.70, 0.72], [0.70, 0.72], 0.05, False),
        ([0.60], [0.70], 0.05, False),  # BN behind
    ],
)
def test_fig1_faster(bn, plain, margin, expected) -> None:
    numbers = fig1_numbers(early_bn=bn, early_plain=plain)
    assert held(fig1.judge, numbers, "faster", early_margin=margin) is expected


def test_fig1_faster_tie_uses_float_arithmetic() -> None:
    # 0.8 - 0.75 is 0.050000000000000044 in floats: above 0.05, so it holds; 0.35 - 0.3 is
    # 0.04999999999999999: below, so it fails. The rule compares the float difference as is.
    assert held(fig1.judge, fig1_numbers(early_bn=[0.8], early_plain=[0.75]), "faster")
    assert not held(fig1.judge, fig1_numbers(early_bn=[0.35], early_plain=[0.3]), "faster")


@pytest.mark.parametrize(
    ("bn", "plain", "expected"),
    [
        ([0.98, 0.97], [0.97, 0.96], True),
        ([0.98, 0.97], [0.97, 0.97], False),  # a tie in one seed fails (strictly above)
        ([0.98, 0.9700001], [0.97, 0.97], True),  # a near-tie above holds
        ([0.99, 0.96], [0.97, 0.97], False),  # one seed behind fails, whatever the mean
        ([], [], False),  # no seed: no evidence
    ],
)
def test_fig1_higher(bn, plain, expected) -> None:
    assert held(fig1.judge, fig1_numbers(final_bn=bn, final_plain=plain), "higher") is expected


def test_fig1_higher_margin() -> None:
    numbers = fig1_numbers(final_bn=[0.98], final_plain=[0.97])
    assert held(fig1.judge, numbers, "higher", final_margin=0.005)
    assert not held(fig1.judge, numbers, "higher", final_margin=0.02)
    assert "by more than 0.02" in fig1.judge(numbers, final_margin=0.02)[1].rule


@pytest.mark.parametrize(
    ("drift_bn", "ratio_bn", "expected"),
    [
        ([0.2], [1.5], True),
        ([1.1], [1.5], False),  # the median drift ties the plain one's mean (1.1): fails
        ([0.2], [3.5], False),  # the spread ratio ties: fails
        ([1.0999], [3.4999], True),  # both just below: holds
        ([2.0], [1.0], False),  # one of the two larger: fails
        ([0.2, math.inf], [1.5, 1.6], True),  # a non-finite value is left out of the mean
    ],
)
def test_fig1_stable(drift_bn, ratio_bn, expected) -> None:
    numbers = fig1_numbers(
        median_drift_bn=drift_bn,
        spread_ratio_bn=ratio_bn,
        median_drift_plain=[1.0, 1.2],
        spread_ratio_plain=[3.0, 4.0],
    )
    assert held(fig1.judge, numbers, "stable") is expected


# ---------------------------------------------------------------------------------------------
# Every experiment: the numbers survive the file, and the judge is pure


SAMPLES = {"fig1": fig1_numbers}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_numbers_round_trip_and_judge_is_deterministic(name: str) -> None:
    experiment = experiments.get(name)
    numbers = SAMPLES[name]()
    assert isinstance(numbers, experiment.numbers_cls)
    again = numbers_from_json(experiment.numbers_cls, numbers_to_json(numbers))
    first = experiment.judge(numbers)
    assert experiment.judge(again) == first == experiment.judge(numbers)
    assert again == numbers
