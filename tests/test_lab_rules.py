"""Every experiment's rules, decided on made-up numbers: each claim made to hold and to fail,
with ties and near-ties at its margin, without a training run."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest

from batchnorm.lab import experiments
from batchnorm.lab.experiments import (
    adapt,
    decoupling,
    fig1,
    init_scale,
    lr_sweep,
    nonlinearity,
    regularization,
    theorems,
)
from batchnorm.lab.experiments.common import CellNumbers
from batchnorm.lab.numbers import numbers_from_json, numbers_to_json
from tests.test_lab_rules_batchsize import ghost_numbers, non_iid_numbers, small_batch_numbers
from tests.test_lab_rules_rnn import numbers as rnn_numbers
from tests.test_lab_rules_santurkar import ics_numbers, landscape_numbers, noisy_numbers
from tests.test_lab_rules_training import agc_numbers, explosion_numbers, precise_numbers


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


# The rules of fig1 are tested in tests/test_lab_rules_theory.py.


# ---------------------------------------------------------------------------------------------
# lr: learning-rate sweep

INF = math.inf
NAN = math.nan


def cells(*steps_and_diverged) -> list[CellNumbers]:
    return [CellNumbers(list(steps), diverged) for steps, diverged in steps_and_diverged]


def lr_numbers(**changes) -> lr_sweep.Numbers:
    """BN trains up to lr 10 and reaches the target in 200 steps; without BN up to lr 1, 500."""
    base = lr_sweep.Numbers(
        target=0.9,
        lrs=[0.1, 1.0, 10.0],
        with_bn=cells(([900, 1000], 0), ([200, 200], 0), ([300, 300], 0)),
        without_bn=cells(([800, 900], 0), ([500, 500], 0), ([INF, INF], 2)),
    )
    return dataclasses.replace(base, **changes)


def test_lr_all_hold_and_evidence() -> None:
    claims = lr_sweep.judge(lr_numbers())
    assert verdicts(claims) == {"higher": True, "faster": True}
    assert claims[0].evidence == (
        "largest trainable lr: 10 with BN vs 1 without (BN trains at the top of the grid, 10: "
        "its limit is higher)"
    )
    assert claims[1].evidence == (
        "200 steps at lr 1 with BN vs 500 at lr 1 without (paired gain 300 steps, tolerance 0)"
    )


@pytest.mark.parametrize(
    ("with_bn", "without_bn", "expected"),
    [
        # the same largest trainable lr: a tie fails
        (cells(([1], 0), ([1], 0), ([INF], 1)), cells(([1], 0), ([1], 0), ([INF], 1)), False),
        # one seed of BN at lr 10 never reaches the target: BN's largest is 1, a tie
        (cells(([1], 0), ([1], 0), ([1, INF], 0)), cells(([1], 0), ([1], 0), ([INF], 0)), False),
        # one seed diverged (though both reached the target first) does not train
        (cells(([1], 0), ([1], 0), ([1, 1], 1)), cells(([1], 0), ([1], 0), ([INF], 0)), False),
        # BN trains somewhere, the plain network nowhere: holds
        (cells(([INF], 0), ([INF], 0), ([5], 0)), cells(([INF], 0), ([INF], 0), ([INF], 0)), True),
        # neither trains anywhere: fails
        (
            cells(([INF], 0), ([INF], 0), ([INF], 0)),
            cells(([INF], 0), ([INF], 0), ([INF], 0)),
            False,
        ),
        # BN's largest is lower
        (cells(([1], 0), ([INF], 0), ([INF], 0)), cells(([1], 0), ([1], 0), ([INF], 0)), False),
    ],
)
def test_lr_higher(with_bn, without_bn, expected) -> None:
    numbers = lr_numbers(with_bn=with_bn, without_bn=without_bn)
    assert held(lr_sweep.judge, numbers, "higher") is expected


@pytest.mark.parametrize(
    ("bn_best", "plain_best", "min_steps", "expected"),
    [
        ([200, 200], [500, 500], 0.0, True),
        ([500, 500], [500, 500], 0.0, False),  # a tie fails
        ([499, 499], [500, 500], 0.0, True),  # a near-tie the seeds agree on holds
        ([499, 499], [500, 500], 1.0, False),  # but not by more than a floor of 1 step
        ([200, 700], [500, 500], 0.0, False),  # a gain of 50 steps within the seed spread fails
        ([400, 360], [500, 500], 0.0, True),  # 120 steps, beyond 2 standard errors (40)
        ([900, 900], [INF, INF], 0.0, None),  # the plain network never trains: not tested
        ([INF, INF], [500, 500], 0.0, False),  # only the plain network reaches it
    ],
)
def test_lr_faster(bn_best, plain_best, min_steps, expected) -> None:
    numbers = lr_numbers(
        with_bn=cells((bn_best, 0), ([INF, INF], 0), ([INF, INF], 0)),
        without_bn=cells(([INF, INF], 0), (plain_best, 0), ([INF, INF], 0)),
    )
    claim = {c.name: c for c in lr_sweep.judge(numbers, min_steps=min_steps)}["faster"]
    assert (claim.held if claim.tested else None) is expected
    if expected is None:
        assert claim.verdict == "not tested" and "at no learning rate" in claim.evidence


def test_lr_higher_is_not_tested_when_nothing_trains() -> None:
    never = cells(([INF], 0), ([INF], 0), ([INF], 3))
    claim = lr_sweep.judge(lr_numbers(with_bn=never, without_bn=never))[0]
    assert claim.verdict == "not tested" and "neither network" in claim.evidence


def test_lr_fastest_tie_takes_the_smallest_lr() -> None:
    numbers = lr_numbers(with_bn=cells(([300], 0), ([300], 0), ([300], 0)))
    assert numbers.fastest("with BN") == 0.1
    assert "at lr 0.1 with BN" in lr_sweep.judge(numbers)[1].evidence


# ---------------------------------------------------------------------------------------------
# init: initialization scale


def init_numbers(**changes) -> init_scale.Numbers:
    base = init_scale.Numbers(
        scales=[0.1, 1.0, 10.0],
        final_bn=[[0.95, 0.95], [0.96, 0.96], [0.94, 0.94]],
        final_plain=[[0.50, 0.60], [0.95, 0.95], [0.11, 0.11]],
    )
    return dataclasses.replace(base, **changes)


def test_init_all_hold_and_evidence() -> None:
    claims = init_scale.judge(init_numbers())
    assert verdicts(claims) == {"worst case": True, "insensitive": True}
    assert claims[0].evidence == (
        "worst: 0.9400 (scale 10) with BN vs 0.1100 (scale 10) without (paired gain +0.8300, "
        "tolerance 0.0005)"
    )
    assert claims[1].evidence == (
        "range 0.0200 with BN vs 0.8400 without (per-seed reduction +0.8200, tolerance 0.0005)"
    )


@pytest.mark.parametrize(
    ("bn", "plain", "worst", "insensitive"),
    [
        ([[0.5], [0.9], [0.7]], [[0.5], [0.9], [0.7]], False, False),  # identical: ties fail
        ([[0.5], [0.6], [0.7]], [[0.5], [0.95], [0.7]], False, True),  # same worst, narrower
        ([[0.5001], [0.9], [0.7]], [[0.5], [0.9], [0.7]], False, False),  # within the floor
        ([[0.502], [0.9], [0.7]], [[0.5], [0.9], [0.7]], True, True),  # beyond it
        ([[0.3], [0.6], [0.35]], [[0.5], [0.95], [0.7]], False, True),  # narrower but lower
        ([[float("nan")], [0.9], [0.9]], [[0.5], [0.9], [0.9]], False, False),  # NaN counts 0
    ],
)
def test_init_rules(bn, plain, worst, insensitive) -> None:
    claims = verdicts(init_scale.judge(init_numbers(final_bn=bn, final_plain=plain)))
    assert claims == {"worst case": worst, "insensitive": insensitive}


def test_init_margins_come_from_the_seed_spread() -> None:
    # Worst-case gains of +0.10 and -0.02 over two seeds: mean +0.04, 2 standard errors 0.12.
    numbers = init_numbers(
        final_bn=[[0.60, 0.60], [0.9, 0.9], [0.9, 0.9]],
        final_plain=[[0.50, 0.62], [0.9, 0.9], [0.9, 0.9]],
    )
    claims = {c.name: c for c in init_scale.judge(numbers)}
    assert not claims["worst case"].held and "tolerance 0.1200" in claims["worst case"].evidence
    assert {c.name: c.held for c in init_scale.judge(numbers, spread_factor=0.5)} == {
        "worst case": True,
        "insensitive": True,
    }


def test_init_is_not_tested_when_the_standard_scale_does_not_train() -> None:
    numbers = init_numbers(final_plain=[[0.5, 0.6], [0.2, 0.3], [0.11, 0.11]])
    claims = init_scale.judge(numbers)
    assert [c.verdict for c in claims] == ["not tested", "not tested"]
    assert "without BN at scale 1 reached 0.2500" in claims[0].evidence
    with pytest.raises(ValueError, match="same scales and seeds"):
        init_scale.judge(init_numbers(final_bn=[[0.9], [0.9], [0.9]]))


# ---------------------------------------------------------------------------------------------
# nonlinearity


def nonlinearity_numbers(**changes) -> nonlinearity.Numbers:
    base = nonlinearity.Numbers(
        target=0.9,
        saturating=["sigmoid", "tanh"],
        final_bn={"sigmoid": [0.95, 0.96], "tanh": [0.97, 0.97]},
        bn={"sigmoid": CellNumbers([300, 400], 0), "tanh": CellNumbers([200, 200], 0)},
        plain={"sigmoid": CellNumbers([INF, 2000], 0), "tanh": CellNumbers([500, 600], 0)},
        saturation_bn={"sigmoid": [0.01, 0.02], "tanh": [0.0, 0.0]},
        saturation_plain={"sigmoid": [0.5, 0.4], "tanh": [0.1, 0.1]},
    )
    return dataclasses.replace(base, **changes)


# The rules of nonlinearity are tested in tests/test_lab_rules_theory.py.


# ---------------------------------------------------------------------------------------------
# regularization


def regularization_numbers(**changes) -> regularization.Numbers:
    N, D, B, BD = regularization.VARIANTS
    base = regularization.Numbers(
        dropout=0.3,
        test={N: [0.90, 0.90], D: [0.92, 0.92], B: [0.93, 0.93], BD: [0.93, 0.93]},
        train={N: [1.0, 1.0], D: [0.97, 0.97], B: [0.98, 0.98], BD: [0.96, 0.96]},
    )
    return dataclasses.replace(base, **changes)


def test_regularization_all_hold_and_evidence() -> None:
    claims = regularization.judge(regularization_numbers())
    assert verdicts(claims) == {"regularizes": True, "dropout can be removed": True}
    assert claims[0].evidence.startswith("gap 0.0500 vs 0.1000 (reduction +0.0500, tolerance")
    assert "test 0.9300 (BN) vs 0.9300 (BN + dropout 0.3): +0.0000" in claims[1].evidence
    assert "dropout alone 0.9200" in claims[1].evidence


def test_paired_tolerance_is_two_standard_errors_with_a_floor() -> None:
    assert regularization.paired_tolerance(np.array([0.01])) == 0.0005  # one seed: the floor
    assert regularization.paired_tolerance(np.array([0.01, 0.01])) == 0.0005  # no spread
    d = np.array([0.0, 0.04])  # sd 0.02828, se 0.02
    assert regularization.paired_tolerance(d) == pytest.approx(0.04)
    assert regularization.paired_tolerance(d, spread_factor=1.0) == pytest.approx(0.02)


@pytest.mark.parametrize(
    ("bn_test", "removable"),
    [
        ([0.93, 0.93], True),  # equal to BN + dropout
        ([0.9296, 0.9296], True),  # below by less than the floor 0.0005: holds
        ([0.9294, 0.9294], False),  # just beyond the floor, seeds agree: fails
        ([0.90, 0.94], True),  # mean -0.01, but spread: se 0.02, tolerance 0.04
        ([0.88, 0.90], False),  # mean -0.04 with se 0.01: tolerance 0.02, fails
        ([0.95, 0.96], True),  # better without dropout
    ],
)
def test_regularization_removing_dropout_rule(bn_test, removable) -> None:
    base = regularization_numbers()
    numbers = regularization_numbers(test={**base.test, "BN": bn_test})
    assert verdicts(regularization.judge(numbers))["dropout can be removed"] is removable


@pytest.mark.parametrize(
    ("bn_test", "bn_train", "regularizes"),
    [
        ([0.93, 0.93], [0.98, 0.98], True),
        ([0.9004, 0.9004], [0.95, 0.95], False),  # gain just under the floor 0.0005
        ([0.9006, 0.9006], [0.95, 0.95], True),  # just beyond
        ([0.93, 0.93], [1.03, 1.03], False),  # gap ties neither's
        ([0.95, 0.91], [0.99, 0.95], False),  # gain 0.03 but se 0.02: tolerance 0.04
    ],
)
def test_regularization_regularizes_rule(bn_test, bn_train, regularizes) -> None:
    base = regularization_numbers()
    numbers = regularization_numbers(
        test={**base.test, "BN": bn_test}, train={**base.train, "BN": bn_train}
    )
    assert verdicts(regularization.judge(numbers))["regularizes"] is regularizes


def test_regularization_margins_are_parameters() -> None:
    numbers = regularization_numbers()
    assert not held(regularization.judge, numbers, "regularizes", min_tolerance=0.06)
    lower = regularization_numbers(test={**numbers.test, "BN": [0.91, 0.91]})
    assert not held(regularization.judge, lower, "dropout can be removed")
    assert held(regularization.judge, lower, "dropout can be removed", min_tolerance=0.021)


def test_regularization_exact_ties_at_the_margin() -> None:
    """Binary-exact accuracies: a loss exactly equal to the tolerance holds ("at least minus");
    a gain exactly equal to it does not ("beyond")."""
    step = 2.0**-9
    both = {"neither": [0.5, 0.5], "dropout": [0.5, 0.5], "BN": [0.5, 0.5],
            "BN + dropout": [0.5, 0.5]}  # fmt: skip
    train = {v: [0.9375, 0.9375] for v in both}
    tie = regularization_numbers(test={**both, "BN": [0.5 - step] * 2}, train=train)
    assert held(regularization.judge, tie, "dropout can be removed", min_tolerance=step)
    gain = regularization_numbers(
        test={**both, "BN": [0.5 + step] * 2}, train={**train, "BN": [0.9375 - step] * 2}
    )
    assert not held(regularization.judge, gain, "regularizes", min_tolerance=step)


# ---------------------------------------------------------------------------------------------
# explosion: its rules are tested in test_lab_rules_training.py


# ---------------------------------------------------------------------------------------------
# decoupling


def decoupling_numbers(**changes) -> decoupling.Numbers:
    P = decoupling.ProblemNumbers
    base = decoupling.Numbers(
        problems=[
            P("OLS", 3.0, 0.2, 0.5, 0.45),
            P("halfspace", 3.0, 0.3, 0.6, 0.45),
            P("OLS", 10.0, 0.5, 0.82, 0.83),
            P("halfspace", 10.0, 0.6, 0.82, 0.83),
        ],
        ts_rate=0.5,
        ts_first=0,
        ts_last=9,
        mlp_initial=1.0,
        mlp_final=0.2,
        mlp_last_dg=1e-5,
        mlp_gradient_norms=[1.0, 0.1, 0.01, 0.001],
    )
    return dataclasses.replace(base, **changes)


# The rules of decoupling are tested in tests/test_lab_rules_theory.py.


# ---------------------------------------------------------------------------------------------
# theorems


def instance(eps=0.0, lhs=1.0, rhs=1.0, hess=(1.0, 2.0), applies=True, second=3.0):
    return theorems.InstanceNumbers(
        eps=eps,
        grad_lhs=lhs,
        grad_rhs=rhs,
        grad_ratio=lhs / rhs,
        hess_lhs=hess[0],
        hess_rhs=hess[1],
        hess_rel_gap=(hess[1] - hess[0]) / max(abs(hess[0]), abs(hess[1])),
        second_applies=applies,
        second_rhs=second,
    )


def theorems_numbers(*instances) -> theorems.Numbers:
    rows = list(instances) or [instance(), instance(0.01, 0.9, 1.0), instance(applies=False)]
    return theorems.Numbers(eps_values=sorted({r.eps for r in rows}), instances=rows)


def test_theorems_all_hold_and_evidence() -> None:
    claims = theorems.judge(theorems_numbers())
    assert all(verdicts(claims).values())
    assert claims[0].rule == "lhs <= rhs (up to 1e-9 relative) on every instance, at every eps"
    assert claims[0].evidence == "3/3 instances hold (eps values 0, 0.01)"
    assert claims[3].evidence == "1/1 instances (the assumption held on 1/2)"


@pytest.mark.parametrize(
    ("lhs", "rhs", "expected"),
    [
        (1.0, 1.0, True),  # equality holds
        (1.0 + 1e-9, 1.0, True),  # within the rounding allowance: holds
        (1.0 + 3e-9, 1.0, False),  # beyond it: fails
        (1e6 + 1e-4, 1e6, True),  # the allowance is relative to the larger side
        (1e6 + 1e-2, 1e6, False),
    ],
)
def test_theorems_41_holds(lhs: float, rhs: float, expected: bool) -> None:
    # At eps = 0.01 so that the eps = 0 "tight" rule is not involved.
    numbers = theorems_numbers(instance(), instance(eps=0.01, lhs=lhs, rhs=rhs))
    assert held(theorems.judge, numbers, "thm 4.1 holds") is expected


@pytest.mark.parametrize(
    ("ratio", "expected"), [(1.0, True), (1.0 + 5e-9, True), (1.0 + 2e-8, False), (0.99, False)]
)
def test_theorems_41_tight(ratio: float, expected: bool) -> None:
    numbers = theorems_numbers(instance(lhs=ratio, rhs=1.0))
    assert held(theorems.judge, numbers, "thm 4.1 tight") is expected


def test_theorems_tight_without_eps_zero_fails() -> None:
    claims = verdicts(theorems.judge(theorems_numbers(instance(eps=0.1))))
    assert claims["thm 4.1 tight"] is False and claims["thm 4.2 second form"] is False


@pytest.mark.parametrize(
    ("hess", "eps", "expected"),
    [
        ((2.0, 2.0), 0.0, True),
        ((2.1, 2.0), 0.0, False),
        ((2.1, 2.0), 0.1, True),
    ],  # eps > 0: not checked
)
def test_theorems_42_holds(hess, eps: float, expected: bool) -> None:
    numbers = theorems_numbers(instance(), instance(eps=eps, hess=hess))
    assert held(theorems.judge, numbers, "thm 4.2 holds") is expected


@pytest.mark.parametrize(
    ("applies", "second", "expected"),
    [
        (True, 1.0, True),  # lhs 1.0 <= 1.0
        (True, 0.9, False),
        (False, 0.9, None),  # the assumption fails: not checked (then no instance is: fails)
    ],
)
def test_theorems_42_second_form(applies: bool, second: float, expected) -> None:
    numbers = theorems_numbers(instance(applies=applies, second=second))
    result = held(theorems.judge, numbers, "thm 4.2 second form")
    assert result is (False if expected is None else expected)


# ---------------------------------------------------------------------------------------------
# small-batch, non-iid, ghost: tests/test_lab_rules_batchsize.py (SAMPLES below uses its numbers)


# ---------------------------------------------------------------------------------------------
# precise-bn and agc: their rules are tested in test_lab_rules_training.py


# ---------------------------------------------------------------------------------------------
# Every experiment: the numbers survive the file, and the judge is pure


SAMPLES = {
    "fig1": fig1_numbers,
    "lr": lr_numbers,
    "init": init_numbers,
    "nonlinearity": nonlinearity_numbers,
    "regularization": regularization_numbers,
    "explosion": explosion_numbers,
    "decoupling": decoupling_numbers,
    "theorems": theorems_numbers,
    "noisy-bn": noisy_numbers,
    "ics": ics_numbers,
    "landscape": landscape_numbers,
    "small-batch": small_batch_numbers,
    "non-iid": non_iid_numbers,
    "ghost": ghost_numbers,
    "precise-bn": precise_numbers,
    "agc": agc_numbers,
}


# --- adapt (Wang et al. 2021, TENT; AdaBN) ---------------------------------------------------


def adapt_numbers(**changes) -> adapt.Numbers:
    def errors(source, batch_bn, adabn, tent):
        return {"source": source, "test-batch BN": batch_bn, "AdaBN": adabn, "TENT": tent}

    values = {
        "min_shift": 0.05,
        "clean": errors(0.10, 0.11, 0.10, 0.11),
        "corrupted": {"blur": errors(0.40, 0.17, 0.18, 0.14),
                      "noise": errors(0.30, 0.15, 0.16, 0.12)},
    }  # fmt: skip
    values.update(changes)
    return adapt.Numbers(**values)


def test_adapt_rules_hold_on_the_papers_shape_and_fail_at_ties() -> None:
    assert [c.held for c in adapt.judge(adapt_numbers())] == [True, True, True]
    # A shift exactly at the margin holds; a margin just above it does not (binary-exact values).
    corrupted = {
        "a": {"source": 0.5, "test-batch BN": 0.2, "AdaBN": 0.2, "TENT": 0.1},
        "b": {"source": 0.25, "test-batch BN": 0.2, "AdaBN": 0.2, "TENT": 0.1},
    }
    clean = {"source": 0.25, "test-batch BN": 0.1, "AdaBN": 0.1, "TENT": 0.1}  # shift 0.125
    assert adapt.judge(adapt_numbers(min_shift=0.125, clean=clean, corrupted=corrupted))[0].held
    near = adapt_numbers(min_shift=0.125 + 1e-9, clean=clean, corrupted=corrupted)
    assert not adapt.judge(near)[0].held
    # AdaBN equal to the source: not lower, so it does not hold; TENT tied with BN neither.
    tie = {"x": {"source": 0.3, "test-batch BN": 0.2, "AdaBN": 0.3, "TENT": 0.2}}
    assert [c.held for c in adapt.judge(adapt_numbers(corrupted=tie))] == [True, False, False]


SAMPLES["adapt"] = adapt_numbers

# rnn: its rules are tested in tests/test_lab_rules_rnn.py
SAMPLES["rnn"] = rnn_numbers


def test_every_experiment_has_rule_tests() -> None:
    assert set(SAMPLES) == set(experiments.NAMES)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_numbers_round_trip_and_judge_is_deterministic(name: str) -> None:
    experiment = experiments.get(name)
    numbers = SAMPLES[name]()
    assert isinstance(numbers, experiment.numbers_cls)
    again = numbers_from_json(experiment.numbers_cls, numbers_to_json(numbers))
    first = experiment.judge(numbers)
    assert experiment.judge(again) == first == experiment.judge(numbers)
    assert again == numbers


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_judge_opens_no_file_and_draws_no_random_number(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins
    import io
    import os

    import numpy as np

    numbers = SAMPLES[name]()
    expected = experiments.get(name).judge(numbers)

    def forbidden(*args, **kwargs):
        raise AssertionError(f"{name}'s judge touched a file or drew a random number")

    for module, attribute in (
        (builtins, "open"),
        (io, "open"),
        (os, "open"),
        (np.random, "default_rng"),
        (np.random, "random"),
    ):
        monkeypatch.setattr(module, attribute, forbidden)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert experiments.get(name).judge(numbers) == expected


# --------------------------------------------------------------------------------------------
# The shared rule primitives (batchnorm.lab.rules)


def test_margins_come_from_the_seed_spread() -> None:
    from batchnorm.lab import rules

    d = np.array([0.01, 0.03, 0.02])
    assert rules.paired_tolerance(d) == pytest.approx(2 * 0.01 / np.sqrt(3))
    assert rules.paired_tolerance(d, spread_factor=1.0) == pytest.approx(0.01 / np.sqrt(3))
    assert rules.paired_tolerance([0.5]) == 0.0005  # one seed: only the floor
    assert rules.beyond_tolerance(d) and not rules.within_tolerance(d)
    noisy = np.array([0.02, -0.015, 0.01])  # mean 0.005, spread much larger
    assert not rules.beyond_tolerance(noisy) and rules.within_tolerance(noisy)
    # A NaN seed (a diverged run) does not shrink the spread or move the mean.
    assert rules.standard_error([1.0, 2.0, 3.0, float("nan")]) == rules.standard_error([1, 2, 3])


def test_an_untrained_network_gives_not_tested_never_did_not_hold() -> None:
    from batchnorm.lab import rules
    from batchnorm.lab.experiment import Claim, overall_verdict

    assert rules.untrained({"bn": [0.9, 0.95], "plain": [0.92]}, floor=0.5) is None
    reason = rules.untrained({"bn": [0.9], "plain": [0.1, float("nan")]}, floor=0.5)
    assert reason is not None and "plain reached 0.1000" in reason and "bn" not in reason
    assert "plain" in rules.untrained({"plain": [float("nan")]}, floor=0.5)
    failed = Claim("faster", "BN trains faster.", "steps", False, "inf vs inf")
    gated = rules.gate(failed, reason)
    assert gated.verdict == "not tested" and not gated.tested and not gated.held
    assert gated.evidence.startswith("not tested: plain reached") and "inf vs inf" in gated.evidence
    held = Claim("stable", "", "", True, "")
    assert overall_verdict([gated]) == "not tested"
    assert overall_verdict([held, gated]) == "held (1 of 2 claims not tested)"
    assert overall_verdict([failed, gated]) == "did not hold (1 of 2 claims not tested)"
    assert rules.baseline_metrics([0.99, 0.97], 0.9) == {
        "baseline_train_accuracy": pytest.approx(0.98),
        "baseline_test_accuracy": pytest.approx(0.9),
    }


def test_regularization_is_not_tested_on_networks_that_did_not_fit() -> None:
    N, D, B, BD = regularization.VARIANTS
    numbers = regularization_numbers(
        train={N: [0.5, 0.6], D: [0.97, 0.97], B: [0.98, 0.98], BD: [0.96, 0.96]}
    )
    claims = regularization.judge(numbers)
    assert [c.verdict for c in claims] == ["not tested", "held"]
    assert "neither reached 0.5500" in claims[0].evidence
    assert regularization.judge(numbers, trained_floor=0.5)[0].tested


def test_adapt_margins_come_from_the_paired_seeds() -> None:
    def errors(source, batch_bn, adabn, tent):
        return {"source": source, "test-batch BN": batch_bn, "AdaBN": adabn, "TENT": tent}

    # AdaBN beats the source by 0.10 on one seed and loses by 0.06 on the other: mean +0.02,
    # 2 standard errors 0.16, so the gain is within the seed spread.
    per_seed = {
        "clean": errors([0.1, 0.1], [0.1, 0.1], [0.1, 0.1], [0.1, 0.1]),
        "blur": errors([0.4, 0.3], [0.2, 0.2], [0.3, 0.36], [0.1, 0.1]),
    }
    numbers = adapt_numbers(per_seed=per_seed, corrupted={"blur": errors(0.35, 0.2, 0.33, 0.1)})
    claims = {c.name: c for c in adapt.judge(numbers)}
    assert claims["corruptions hurt"].held and claims["TENT adapts further"].held
    assert not claims["statistics adapt"].held
    assert "tolerance 0.1600" in claims["statistics adapt"].evidence
    assert adapt.judge(numbers, spread_factor=0.1)[1].held


def test_adapt_is_not_tested_when_the_source_network_did_not_learn() -> None:
    def errors(source, batch_bn, adabn, tent):
        return {"source": source, "test-batch BN": batch_bn, "AdaBN": adabn, "TENT": tent}

    per_seed = {
        "clean": errors([0.8, 0.9], [0.8, 0.9], [0.8, 0.9], [0.8, 0.9]),
        "blur": errors([0.9, 0.9], [0.8, 0.8], [0.8, 0.8], [0.7, 0.7]),
    }
    numbers = adapt_numbers(per_seed=per_seed, corrupted={"blur": errors(0.9, 0.8, 0.8, 0.7)})
    claims = adapt.judge(numbers)
    assert [c.verdict for c in claims] == ["not tested"] * 3
    assert "source network (clean test) reached 0.1500" in claims[0].evidence
