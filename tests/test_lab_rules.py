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
    agc,
    decoupling,
    explosion,
    fig1,
    ics,
    init_scale,
    landscape,
    lr_sweep,
    noisy_bn,
    nonlinearity,
    precise_bn,
    regularization,
    theorems,
)
from batchnorm.lab.experiments.common import CellNumbers
from batchnorm.lab.numbers import numbers_from_json, numbers_to_json
from tests.test_lab_rules_batchsize import ghost_numbers, non_iid_numbers, small_batch_numbers


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
    assert claims[1].evidence == "200 steps at lr 1 with BN vs 500 at lr 1 without"


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
    ("bn_best", "plain_best", "margin", "expected"),
    [
        (200, 500, 0.0, True),
        (500, 500, 0.0, False),  # a tie fails
        (499, 500, 0.0, True),  # a near-tie holds
        (499, 500, 1.0, False),  # but not by more than a margin of 1 step
        (INF, INF, 0.0, False),  # neither reaches the target
        (900, INF, 0.0, True),  # only BN reaches it
    ],
)
def test_lr_faster(bn_best, plain_best, margin, expected) -> None:
    numbers = lr_numbers(
        with_bn=cells(([bn_best], 0), ([INF], 0), ([INF], 0)),
        without_bn=cells(([INF], 0), ([plain_best], 0), ([INF], 0)),
    )
    assert held(lr_sweep.judge, numbers, "faster", steps_margin=margin) is expected


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
    assert claims[0].evidence == "worst: 0.9400 (scale 10) with BN vs 0.1100 (scale 10) without"
    assert claims[1].evidence == "range 0.0200 with BN vs 0.8400 without"


@pytest.mark.parametrize(
    ("bn", "plain", "worst", "insensitive"),
    [
        ([[0.5], [0.9], [0.7]], [[0.5], [0.9], [0.7]], False, False),  # identical: ties fail
        ([[0.5], [0.6], [0.7]], [[0.5], [0.95], [0.7]], False, True),  # same worst, narrower
        ([[0.5001], [0.9], [0.7]], [[0.5], [0.9], [0.7]], True, True),  # near-ties hold
        ([[0.3], [0.4], [0.35]], [[0.5], [0.95], [0.7]], False, True),  # narrower but lower
        ([[0.5, 0.7], [0.9], [0.9]], [[0.6], [0.9], [0.9]], False, False),  # mean 0.6 ties
        ([[float("nan")], [0.9], [0.9]], [[0.5], [0.9], [0.9]], False, False),  # NaN: fails
    ],
)
def test_init_rules(bn, plain, worst, insensitive) -> None:
    claims = verdicts(init_scale.judge(init_numbers(final_bn=bn, final_plain=plain)))
    assert claims == {"worst case": worst, "insensitive": insensitive}


def test_init_margins() -> None:
    numbers = init_numbers(final_bn=[[0.55], [0.6], [0.6]], final_plain=[[0.5], [0.7], [0.7]])
    assert verdicts(init_scale.judge(numbers)) == {"worst case": True, "insensitive": True}
    strict = init_scale.judge(numbers, worst_margin=0.1, range_margin=0.2)
    assert verdicts(strict) == {"worst case": False, "insensitive": False}


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


def test_nonlinearity_all_hold_and_evidence() -> None:
    claims = nonlinearity.judge(nonlinearity_numbers())
    assert verdicts(claims) == {"trainable": True, "faster": True, "unsaturated": True}
    assert claims[0].evidence == (
        "sigmoid: final 0.9550, reached on 2/2 seeds; tanh: final 0.9700, reached on 2/2 seeds"
    )
    assert (
        claims[1].evidence
        == "sigmoid: 350 with BN vs never without; tanh: 200 with BN vs 550 without"
    )


def test_nonlinearity_trainable_needs_every_seed_of_every_one() -> None:
    bn = {"sigmoid": CellNumbers([300, INF], 0), "tanh": CellNumbers([200, 200], 0)}
    assert not held(nonlinearity.judge, nonlinearity_numbers(bn=bn), "trainable")
    bn = {"sigmoid": CellNumbers([300, 300], 1), "tanh": CellNumbers([200, 200], 0)}
    assert not held(nonlinearity.judge, nonlinearity_numbers(bn=bn), "trainable")


@pytest.mark.parametrize(
    ("bn_steps", "plain_steps", "margin", "expected"),
    [
        ([550, 550], [550, 550], 0.0, False),  # a tie fails
        ([549, 550], [550, 550], 0.0, True),  # a near-tie holds
        ([549, 550], [550, 550], 1.0, False),
        ([INF, 100], [INF, 100], 0.0, False),  # never in both: a tie of infinities fails
        ([5000, 5000], [INF, 100], 0.0, True),  # never without BN counts as infinitely many
    ],
)
def test_nonlinearity_faster(bn_steps, plain_steps, margin, expected) -> None:
    numbers = nonlinearity_numbers(
        bn={"sigmoid": CellNumbers([100], 0), "tanh": CellNumbers(bn_steps, 0)},
        plain={"sigmoid": CellNumbers([200], 0), "tanh": CellNumbers(plain_steps, 0)},
    )
    assert held(nonlinearity.judge, numbers, "faster", steps_margin=margin) is expected


@pytest.mark.parametrize(
    ("tanh_bn", "tanh_plain", "margin", "expected"),
    [
        ([0.1, 0.1], [0.1, 0.1], 0.0, False),  # a tie fails
        ([0.0999, 0.1], [0.1, 0.1], 0.0, True),
        ([0.0999, 0.1], [0.1, 0.1], 0.01, False),
        ([0.0, 0.0], [0.0, 0.0], 0.0, False),  # nothing saturates in either: no difference
    ],
)
def test_nonlinearity_unsaturated(tanh_bn, tanh_plain, margin, expected) -> None:
    numbers = nonlinearity_numbers(
        saturation_bn={"sigmoid": [0.0], "tanh": tanh_bn},
        saturation_plain={"sigmoid": [0.5], "tanh": tanh_plain},
    )
    assert held(nonlinearity.judge, numbers, "unsaturated", saturation_margin=margin) is expected


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
    train = {v: [0.75, 0.75] for v in both}
    tie = regularization_numbers(test={**both, "BN": [0.5 - step] * 2}, train=train)
    assert held(regularization.judge, tie, "dropout can be removed", min_tolerance=step)
    gain = regularization_numbers(
        test={**both, "BN": [0.5 + step] * 2}, train={**train, "BN": [0.75 - step] * 2}
    )
    assert not held(regularization.judge, gain, "regularizes", min_tolerance=step)


# ---------------------------------------------------------------------------------------------
# explosion


def explosion_numbers(**changes) -> explosion.Numbers:
    L = explosion.LambdaNumbers
    base = explosion.Numbers(
        rel_tol=0.1,
        trainable_acc=0.5,
        remedy_eps=0.1,
        lambdas=[
            L("relu", 4, 1.30, 1.25),
            L("tanh", 4, 1.10, math.nan),
            L("linear", 4, 1.20, 1.20),
            L("relu", 8, 1.21, 1.20),
            L("linear", 8, 1.10, 1.11),
        ],
        grid=[
            explosion.GridCell(2, 4, [0.9, 0.9]),
            explosion.GridCell(50, 4, [0.1, math.nan]),
            explosion.GridCell(2, 16, [0.9, 0.8]),
            explosion.GridCell(50, 16, [0.7, 0.7]),
        ],
        predicted_depth={4: 20.0, 16: 60.0},
        b_min=4,
        plain_lambda=1.30,
        remedy_lambda={"residual": 1.01, "eps=0.1": 1.2},
        deep=50,
        small=4,
        plain_acc=[0.1, math.nan],
        remedy_acc={"residual": [0.5, 0.6], "eps": [0.2, 0.2]},
    )
    return dataclasses.replace(base, **changes)


def test_explosion_all_hold_and_evidence() -> None:
    claims = explosion.judge(explosion_numbers())
    assert all(verdicts(claims).values()), claims
    assert claims[0].evidence == "largest relative gap 0.009 (linear, B=8)"  # B=4 is not checked
    assert claims[2].evidence == "agreement on 4/4 cells"
    assert claims[4].evidence == "plain 0.050; residual 0.550; eps=0.1 0.200"  # NaN counts as 0


@pytest.mark.parametrize(
    ("relu8", "expected"),
    [(3.0, True), (3.0000001, False), (1.0, True), (0.9999999, False)],  # tol 0.5 of 2.0
)
def test_explosion_closed_form_tolerance(relu8: float, expected: bool) -> None:
    lambdas = [explosion.LambdaNumbers("relu", 8, relu8, 2.0)]
    numbers = explosion_numbers(lambdas=lambdas, rel_tol=0.5)
    assert held(explosion.judge, numbers, "closed form") is expected


def test_explosion_closed_form_needs_a_checked_batch_size() -> None:
    numbers = explosion_numbers(lambdas=[explosion.LambdaNumbers("relu", 4, 1.25, 1.25)])
    claims = explosion.judge(numbers)
    assert not verdicts(claims)["closed form"]
    assert claims[0].evidence == "no batch size >= 8 measured"
    assert held(explosion.judge, numbers, "closed form", closed_form_min_batch=4)


@pytest.mark.parametrize(("smallest", "expected"), [(1.0, False), (1.0001, True), (0.9, False)])
def test_explosion_lambda_above_one(smallest: float, expected: bool) -> None:
    lambdas = [
        explosion.LambdaNumbers("relu", 8, 1.2, 1.2),
        explosion.LambdaNumbers("tanh", 8, smallest, math.nan),
    ]
    assert held(explosion.judge, explosion_numbers(lambdas=lambdas), "explosion") is expected


@pytest.mark.parametrize(
    ("accs", "expected"),
    [
        ([[0.9], [0.1], [0.9], [0.7]], True),  # 4/4 agree
        ([[0.9], [0.9], [0.9], [0.7]], True),  # 3/4 = 75%: a tie holds
        ([[0.9], [0.9], [0.1], [0.7]], False),  # 2/4
        ([[0.9], [0.1], [0.9], [0.4999]], True),  # a cell just below trainable_acc fails to train
        ([[0.9], [0.1], [0.9], [0.5]], True),  # at trainable_acc it trains
    ],
)
def test_explosion_trainable_depth(accs, expected) -> None:
    grid = [
        explosion.GridCell(d, b, a) for (d, b), a in zip([(2, 4), (50, 4), (2, 16), (50, 16)], accs)
    ]
    assert held(explosion.judge, explosion_numbers(grid=grid), "trainable depth") is expected


def test_explosion_trainable_depth_share() -> None:
    grid = [explosion.GridCell(2, 4, [0.9]), explosion.GridCell(50, 4, [0.9])]  # 1/2 agree
    numbers = explosion_numbers(grid=grid)
    assert not held(explosion.judge, numbers, "trainable depth")
    assert held(explosion.judge, numbers, "trainable depth", agreement_share=0.5)


@pytest.mark.parametrize(
    ("remedies", "expected"),
    [({"residual": 1.2, "eps=0.1": 1.29}, True), ({"residual": 1.2, "eps=0.1": 1.30}, False)],
)
def test_explosion_remedies_reduce_lambda(remedies, expected) -> None:
    numbers = explosion_numbers(remedy_lambda=remedies)
    assert held(explosion.judge, numbers, "remedies reduce lambda") is expected


@pytest.mark.parametrize(
    ("eps_accs", "margin", "expected"),
    [
        ([0.05, 0.05], 0.0, False),  # ties plain's mean 0.05 (NaN counted as 0)
        ([0.0501, 0.05], 0.0, True),
        ([0.0501, 0.05], 0.01, False),
        ([math.nan, math.nan], 0.0, False),  # diverged: 0
    ],
)
def test_explosion_remedies_train(eps_accs, margin, expected) -> None:
    numbers = explosion_numbers(remedy_acc={"residual": [0.9, 0.9], "eps": eps_accs})
    assert held(explosion.judge, numbers, "remedies train", remedy_margin=margin) is expected


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
    )
    return dataclasses.replace(base, **changes)


def test_decoupling_all_hold_and_evidence() -> None:
    claims = decoupling.judge(decoupling_numbers())
    assert all(verdicts(claims).values())
    assert claims[1].evidence == "2/2 problems with kappa >= 10"
    assert claims[2].evidence == "rate 0.500 per bisection step over T_s = 0..9"
    assert claims[3].evidence == "loss 1.0000 -> 0.2000; max |dL/dg_i| in the last sweep 1.0e-05"


@pytest.mark.parametrize(
    ("rate", "expected"),
    [(0.83, True), (0.8300001, False), (math.nan, False), (math.inf, False), (-math.inf, False)],
)
def test_decoupling_linear_rate(rate: float, expected: bool) -> None:
    problems = [decoupling.ProblemNumbers("OLS", 10.0, rate, 0.9, 0.83)]
    numbers = decoupling_numbers(problems=problems)
    assert held(decoupling.judge, numbers, "linear rate") is expected


@pytest.mark.parametrize(
    ("kappa", "gdnp", "gd", "expected"),
    [
        (10.0, 0.5, 0.8, True),
        (10.0, 0.8, 0.8, False),  # a tie fails
        (9.99, 0.5, 0.8, False),  # no problem with kappa >= 10: no evidence
        (100.0, 0.9, 0.8, False),
    ],
)
def test_decoupling_faster(kappa, gdnp, gd, expected) -> None:
    problems = [decoupling.ProblemNumbers("OLS", kappa, gdnp, gd, 1.0)]
    numbers = decoupling_numbers(problems=problems)
    assert held(decoupling.judge, numbers, "faster than GD") is expected


@pytest.mark.parametrize(
    ("rate", "expected"),
    [(0.35, True), (0.65, True), (0.3499, False), (0.6501, False), (math.nan, False)],
)
def test_decoupling_bisection_band(rate: float, expected: bool) -> None:
    assert held(decoupling.judge, decoupling_numbers(ts_rate=rate), "bisection") is expected


@pytest.mark.parametrize(("final", "expected"), [(0.5, False), (0.4999, True), (2.0, False)])
def test_decoupling_mlp(final: float, expected: bool) -> None:
    numbers = decoupling_numbers(mlp_initial=1.0, mlp_final=final)
    assert held(decoupling.judge, numbers, "MLP") is expected
    assert held(decoupling.judge, numbers, "MLP", mlp_fraction=2.5)


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
# noisy-bn (Santurkar et al. Figure 2)

STANDARD, BN, NOISY = "standard", "BN", "noisy BN"


def noisy_numbers(**changes) -> noisy_bn.Numbers:
    base = noisy_bn.Numbers(
        lrs=[0.1, 0.5],
        margin=0.02,
        test={
            STANDARD: [[0.80, 0.80], [0.70, 0.70]],
            BN: [[0.90, 0.90], [0.92, 0.92]],
            NOISY: [[0.89, 0.89], [0.91, 0.91]],
        },
        median_drift={
            STANDARD: [[0.5, 0.5], [0.6, 0.6]],
            BN: [[0.2, 0.2], [0.2, 0.2]],
            NOISY: [[1.5, 1.5], [2.0, 2.0]],
        },
    )
    return dataclasses.replace(base, **changes)


def test_noisy_all_hold_and_evidence() -> None:
    claims = noisy_bn.judge(noisy_numbers())
    assert all(verdicts(claims).values())
    assert claims[0].rule == "at every lr, mean final test accuracy of noisy BN >= BN's - 0.02"
    assert (
        claims[0].evidence
        == "lr 0.1: noisy BN 0.8900 vs BN 0.9000; lr 0.5: noisy BN 0.9100 vs BN 0.9200"
    )


@pytest.mark.parametrize(
    ("noisy", "bn", "margin", "expected"),
    [
        ([0.875], [0.9], 0.025, True),  # 0.9 - 0.025 == 0.875 in floats: a tie at the margin holds
        ([0.87499], [0.9], 0.025, False),  # a near-tie below: fails
        ([0.9], [0.9], 0.0, True),  # a tie at margin 0 holds
        ([0.95], [0.9], 0.0, True),
    ],
)
def test_noisy_as_bn(noisy, bn, margin, expected) -> None:
    numbers = noisy_numbers(
        lrs=[0.1],
        margin=margin,
        test={STANDARD: [[0.5]], BN: [bn], NOISY: [noisy]},
        median_drift={STANDARD: [[0.5]], BN: [[0.1]], NOISY: [[1.0]]},
    )
    assert held(noisy_bn.judge, numbers, "as-bn") is expected


@pytest.mark.parametrize(
    ("noisy", "standard", "margin", "expected"),
    [([0.8], [0.8], 0.0, True), ([0.7999], [0.8], 0.0, False), ([0.7999], [0.8], 0.001, True)],
)
def test_noisy_beats_standard(noisy, standard, margin, expected) -> None:
    numbers = noisy_numbers(
        lrs=[0.1],
        test={STANDARD: [standard], BN: [[0.8]], NOISY: [noisy]},
        median_drift={STANDARD: [[0.5]], BN: [[0.1]], NOISY: [[1.0]]},
    )
    assert held(noisy_bn.judge, numbers, "beats-standard", standard_margin=margin) is expected


def test_noisy_beats_standard_at_every_lr() -> None:
    test = {STANDARD: [[0.5], [0.95]], BN: [[0.9], [0.9]], NOISY: [[0.9], [0.9]]}
    assert not held(noisy_bn.judge, noisy_numbers(test=test), "beats-standard")


@pytest.mark.parametrize(
    ("noisy", "standard", "expected"),
    [
        ([1.0, 2.0], [1.5, 1.5], False),  # mean 1.5 ties: fails
        ([1.0, 2.0001], [1.5, 1.5], True),
        ([1.0, NAN], [0.5, 0.5], True),  # a diverged seed is left out of the mean
        ([NAN, NAN], [0.5, 0.5], False),  # noisy BN diverged everywhere: no evidence
        ([0.1, 0.1], [NAN, NAN], True),  # a diverged standard network counts as less stable
        ([0.1, 0.1], [INF, INF], True),
    ],
)
def test_noisy_less_stable(noisy, standard, expected) -> None:
    numbers = noisy_numbers(
        lrs=[0.1],
        test={STANDARD: [[0.5]], BN: [[0.8]], NOISY: [[0.8]]},
        median_drift={STANDARD: [standard], BN: [[0.1]], NOISY: [noisy]},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the mean of no finite value
        assert held(noisy_bn.judge, numbers, "less-stable") is expected


# ---------------------------------------------------------------------------------------------
# ics (Santurkar et al. Definition 2.1)


def ics_numbers(**changes) -> ics.Numbers:
    base = ics.Numbers(
        tolerance=0.1,
        cos_tolerance=0.05,
        l2={
            "CNN": {STANDARD: [1.0, 1.0], BN: [1.2, 1.4]},
            "deep linear": {STANDARD: [2.0], BN: [2.5]},
        },
        cos={
            "CNN": {STANDARD: [0.9, 0.9], BN: [0.8, 0.8]},
            "deep linear": {STANDARD: [0.5], BN: [0.5]},
        },
    )
    return dataclasses.replace(base, **changes)


def test_ics_all_hold_and_evidence() -> None:
    claims = ics.judge(ics_numbers())
    assert all(verdicts(claims).values())
    assert claims[0].rule.endswith("with BN >= 0.9 x that without BN")
    assert (
        claims[0].evidence == "CNN: 1.3 with BN vs 1 without; deep linear: 2.5 with BN vs 2 without"
    )


@pytest.mark.parametrize(
    ("bn", "tolerance", "expected"),
    [
        ([0.75], 0.25, True),  # exactly (1 - 0.25) x 1.0: a tie holds
        ([0.7499], 0.25, False),
        ([1.0], 0.0, True),  # equal at no tolerance
        ([0.9999], 0.0, False),
    ],
)
def test_ics_l2(bn, tolerance: float, expected: bool) -> None:
    base = ics_numbers()
    l2 = {"CNN": {STANDARD: [1.0], BN: bn}, "deep linear": base.l2["deep linear"]}
    numbers = ics_numbers(l2=l2, tolerance=tolerance)
    assert held(ics.judge, numbers, "l2") is expected


@pytest.mark.parametrize(
    ("bn", "cos_tolerance", "expected"),
    [([0.75], 0.25, True), ([0.7501], 0.25, False), ([0.5], 0.0, True), ([0.5001], 0.0, False)],
)
def test_ics_cosine(bn, cos_tolerance: float, expected: bool) -> None:
    base = ics_numbers()
    cos = {"CNN": base.cos["CNN"], "deep linear": {STANDARD: [0.5], BN: bn}}
    numbers = ics_numbers(cos=cos, cos_tolerance=cos_tolerance)
    assert held(ics.judge, numbers, "cosine") is expected


# ---------------------------------------------------------------------------------------------
# landscape (Santurkar et al. Sec. 3.1)


def landscape_numbers(bn=(1.0, 2.0), standard=(1.0, 5.0)) -> landscape.Numbers:
    return landscape.Numbers(
        values={q: {STANDARD: list(standard), BN: list(bn)} for q in landscape.QUANTITIES}
    )


def test_landscape_one_claim_per_quantity() -> None:
    claims = landscape.judge(landscape_numbers())
    assert [c.name for c in claims] == list(landscape.QUANTITIES) and all(c.held for c in claims)
    assert claims[0].evidence == "max 2 with BN vs 5 without; spread 1 vs 4"


@pytest.mark.parametrize(
    ("bn", "standard", "expected"),
    [
        ((1.0, 5.0), (1.0, 5.0), False),  # identical: ties fail
        ((2.0, 4.9999), (1.0, 5.0), True),  # both just smaller
        ((4.9999, 0.0), (1.0, 5.0), False),  # a lower maximum but a wider spread
        ((0.0, 4.0), (1.0, 5.0), False),  # spread 4 ties standard's 4
        ((1.0, 2.0, NAN, INF), (1.0, 5.0), True),  # non-finite probes are left out
        ((NAN,), (1.0, 5.0), False),  # nothing finite with BN
    ],
)
def test_landscape_rule(bn, standard, expected) -> None:
    claims = landscape.judge(landscape_numbers(bn, standard))
    assert {c.held for c in claims} == {expected}


def test_landscape_margins() -> None:
    numbers = landscape_numbers(bn=(1.0, 4.0), standard=(1.0, 5.0))  # max 4 vs 5, spread 3 vs 4
    assert all(c.held for c in landscape.judge(numbers, max_margin=0.5, spread_margin=0.5))
    assert not any(c.held for c in landscape.judge(numbers, max_margin=1.0))
    assert not any(c.held for c in landscape.judge(numbers, spread_margin=1.0))


# small-batch, non-iid, ghost: tests/test_lab_rules_batchsize.py (SAMPLES below uses its numbers)


# ---------------------------------------------------------------------------------------------
# precise-bn (Wu & Johnson 2021)


def precise_numbers(ema=(0.9, 0.5), precise=(0.9, 0.9), shift=(0.1, 2.0), **changes):
    """Momenta 0.1 (good) and 0.9 (bad); one value per seed for each."""
    base = precise_bn.Numbers(
        good=0.1,
        bad=0.9,
        min_gain=0.05,
        tolerance=0.01,
        momenta=[0.1, 0.9],
        ema={0.1: [ema[0]], 0.9: [ema[1]]},
        precise={0.1: [precise[0]], 0.9: [precise[1]]},
        shift={0.1: [shift[0]], 0.9: [shift[1]]},
    )
    return dataclasses.replace(base, **changes)


def test_precise_all_hold_and_evidence() -> None:
    claims = precise_bn.judge(precise_numbers())
    assert all(verdicts(claims).values())
    assert claims[0].evidence == "0.9000 (precise) vs 0.5000 (moving averages), gain +0.4000"
    assert claims[1].evidence == "smallest gain +0.0000 (momentum 0.1)"


@pytest.mark.parametrize(
    ("ema_bad", "precise_bad", "min_gain", "expected"),
    [
        (0.5, 0.75, 0.25, True),
        (0.5, 0.7499, 0.25, False),
        (0.5, 0.5, 0.0, True),
        (0.6, 0.5, 0.0, False),
    ],
)
def test_precise_repairs(ema_bad, precise_bad, min_gain, expected) -> None:
    numbers = precise_numbers(ema=(0.9, ema_bad), precise=(0.9, precise_bad), min_gain=min_gain)
    assert held(precise_bn.judge, numbers, "repairs a bad momentum") is expected


@pytest.mark.parametrize(
    ("precise_good", "tolerance", "expected"),
    [(0.75, 0.25, True), (0.7499, 0.25, False), (1.0, 0.0, True), (0.9999, 0.0, False)],
)
def test_precise_never_worse(precise_good, tolerance, expected) -> None:
    # the moving averages give 1.0 at the good momentum; a tie at 1.0 - tolerance holds
    numbers = precise_numbers(ema=(1.0, 0.5), precise=(precise_good, 0.9), tolerance=tolerance)
    assert held(precise_bn.judge, numbers, "never worse") is expected


@pytest.mark.parametrize(
    ("shift", "margin", "expected"),
    [((1.0, 1.0), 0.0, False), ((1.0, 1.0001), 0.0, True), ((1.0, 1.0001), 0.001, False)],
)
def test_precise_drift(shift, margin, expected) -> None:
    numbers = precise_numbers(shift=shift)
    assert held(precise_bn.judge, numbers, "drift", drift_margin=margin) is expected


# ---------------------------------------------------------------------------------------------
# agc (Brock et al. 2021)


def agc_numbers(acc=None, diverged=None, target=0.5, tolerance=0.05) -> agc.Numbers:
    """Learning rates 0.1, 1, 10; two seeds each."""
    acc = acc or {
        agc.PLAIN: [[0.8, 0.8], [0.3, 0.9], [0.1, 0.1]],
        agc.CLIPPED: [[0.8, 0.8], [0.85, 0.86], [0.7, 0.7]],
        agc.BN: [[0.85, 0.85], [0.88, 0.88], [0.6, 0.6]],
    }
    diverged = diverged or {agc.PLAIN: [0, 0, 2], agc.CLIPPED: [0, 0, 0], agc.BN: [0, 0, 0]}
    return agc.Numbers(
        lrs=[0.1, 1.0, 10.0], target=target, tolerance=tolerance, acc=acc, diverged=diverged
    )


def test_agc_all_hold_and_evidence() -> None:
    claims = agc.judge(agc_numbers())
    assert verdicts(claims) == {"AGC stabilizes": True, "close to BN": True}
    assert claims[0].evidence == "10 (AGC) vs 0.1 (no AGC); BN: 10"
    assert claims[1].evidence == "0.8550 (AGC) vs 0.8800 (BN); no AGC: 0.8000"


def test_agc_stabilizes_rules() -> None:
    numbers = agc_numbers()
    acc = {**numbers.acc, agc.PLAIN: [[0.8, 0.8], [0.5, 0.9], [0.1, 0.1]]}  # at the target
    assert held(agc.judge, agc_numbers(acc=acc), "AGC stabilizes")  # lr 10 vs 1
    # the same largest lr is a tie: fails
    acc = {**numbers.acc, agc.PLAIN: [[0.8, 0.8], [0.5, 0.9], [0.5, 0.5]]}
    diverged = {**numbers.diverged, agc.PLAIN: [0, 0, 0]}
    assert not held(agc.judge, agc_numbers(acc=acc, diverged=diverged), "AGC stabilizes")
    # a diverged seed at lr 10 (even with a good final accuracy) does not train
    diverged = {**numbers.diverged, agc.PLAIN: [0, 0, 0], agc.CLIPPED: [0, 0, 1]}
    claims = agc.judge(agc_numbers(acc=acc, diverged=diverged))
    assert not verdicts(claims)["AGC stabilizes"]
    # nothing trains anywhere: -inf against -inf fails, shown as "none"
    low = {v: [[0.1, 0.1]] * 3 for v in numbers.acc}
    claims = agc.judge(agc_numbers(acc=low))
    assert not verdicts(claims)["AGC stabilizes"]
    assert claims[0].evidence == "none (AGC) vs none (no AGC); BN: none"


@pytest.mark.parametrize(
    ("clipped_best", "tolerance", "expected"),
    [(0.9, 0.0, True), (0.755, 0.125, True), (0.7549, 0.125, False), (0.88, 0.0, True)],
)
def test_agc_close_to_bn(clipped_best, tolerance, expected) -> None:
    # BN's best mean 0.88; 0.88 - 0.125 = 0.755 (a tie holds)
    numbers = agc_numbers()
    acc = {**numbers.acc, agc.CLIPPED: [[0.1, 0.1], [clipped_best, clipped_best], [0.1, 0.1]]}
    assert held(agc.judge, agc_numbers(acc=acc, tolerance=tolerance), "close to BN") is expected


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
