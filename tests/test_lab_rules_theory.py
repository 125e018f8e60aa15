"""The rules of fig1, nonlinearity and decoupling, decided on made-up numbers: each claim made to
hold, to fail and to be "not tested", and the effect of its margin, without a training run."""

from __future__ import annotations

import dataclasses
import math

import pytest

from batchnorm.lab.experiments import decoupling, fig1, nonlinearity
from batchnorm.lab.experiments.common import CellNumbers
from batchnorm.lab.numbers import numbers_from_json, numbers_to_json

INF = math.inf


def outcome(claims, name: str) -> str:
    """'held', 'did not hold' or 'not tested' for the claim ``name``."""
    claim = next(c for c in claims if c.name == name)
    return claim.verdict


# ---------------------------------------------------------------------------------------------
# fig1


def fig1_numbers(**changes) -> fig1.Numbers:
    """Numbers for which every claim of Figure 1 holds: two rates, BN best at 1.0 early."""
    base = fig1.Numbers(
        first_step=500,
        last_step=50_000,
        tracked_unit=0,
        early_bn=[0.90, 0.91, 0.92],
        early_plain=[0.10, 0.15, 0.12],
        final_bn=[0.981, 0.980, 0.982],
        final_plain=[0.975, 0.976, 0.974],
        median_drift_bn=[0.1, 0.1, 0.12],
        median_drift_plain=[0.4, 0.5, 0.45],
        spread_ratio_bn=[1.9, 2.0, 1.95],
        spread_ratio_plain=[90.0, 80.0, 100.0],
        grid_lrs=[0.1, 1.0],
        early_grid_bn=[[0.90, 0.91, 0.92], [0.95, 0.95, 0.96]],
        early_grid_plain=[[0.10, 0.15, 0.12], [0.85, 0.86, 0.84]],
        final_grid_bn=[[0.981, 0.980, 0.982], [0.983, 0.982, 0.984]],
        final_grid_plain=[[0.975, 0.976, 0.974], [0.978, 0.979, 0.977]],
        diverged_grid_bn=[0, 0],
        diverged_grid_plain=[0, 0],
        train_grid_bn=[[0.99, 0.99, 0.99], [1.0, 1.0, 1.0]],
        train_grid_plain=[[0.98, 0.98, 0.98], [0.99, 0.99, 0.99]],
        lr=0.1,
    )
    return dataclasses.replace(base, **changes)


def test_fig1_all_hold_at_each_models_best_rate() -> None:
    claims = fig1.judge(fig1_numbers())
    assert [c.verdict for c in claims] == ["held"] * 3
    assert claims[0].evidence.startswith("step 500 (BN at lr 1, no BN at lr 1): 0.9533 vs 0.8500")
    assert "at lr 0.1: 0.9100 vs 0.1233" in claims[0].evidence


def test_fig1_best_rate_index() -> None:
    assert fig1.best_lr_index([[0.5], [0.9], [0.95]], [0, 0, 1]) == 1  # diverged: left out
    assert fig1.best_lr_index([[0.5], [0.5]], [0, 0]) == 0  # a tie: the lower rate
    assert fig1.best_lr_index([[0.5], [0.9]], [1, 1]) == 1  # all diverged: all allowed


def test_fig1_faster_uses_the_plain_networks_best_rate() -> None:
    # At its best rate the plain network is as fast as BN: the lead at lr 0.1 does not count.
    numbers = fig1_numbers(early_grid_plain=[[0.10, 0.15, 0.12], [0.95, 0.95, 0.96]])
    assert outcome(fig1.judge(numbers), "faster") == "did not hold"
    # BN behind at the best rates.
    numbers = fig1_numbers(early_grid_plain=[[0.10, 0.15, 0.12], [0.97, 0.97, 0.97]])
    assert outcome(fig1.judge(numbers), "faster") == "did not hold"


def test_fig1_faster_margin_from_the_seed_spread() -> None:
    # Paired leads 0.01, 0.03, 0.05: mean 0.03, standard error 0.0115.
    numbers = fig1_numbers(
        early_grid_bn=[[0.5, 0.5, 0.5], [0.91, 0.93, 0.95]],
        early_grid_plain=[[0.1, 0.1, 0.1], [0.90, 0.90, 0.90]],
    )
    assert outcome(fig1.judge(numbers), "faster") == "held"  # 0.03 > 2 x 0.0115
    assert outcome(fig1.judge(numbers, spread_factor=3.0), "faster") == "did not hold"
    # With one seed the floor decides.
    one = fig1_numbers(
        early_grid_bn=[[0.5], [0.9004]],
        early_grid_plain=[[0.1], [0.9]],
        train_grid_bn=[[1.0], [1.0]],
        train_grid_plain=[[1.0], [1.0]],
    )
    assert outcome(fig1.judge(one), "faster") == "did not hold"  # 0.0004 < 0.0005
    assert outcome(fig1.judge(one, min_tolerance=0.0001), "faster") == "held"


def test_fig1_faster_skips_diverged_rates() -> None:
    numbers = fig1_numbers(
        early_grid_plain=[[0.10, 0.15, 0.12], [0.99, 0.99, 0.99]], diverged_grid_plain=[0, 1]
    )
    claim = fig1.judge(numbers)[0]
    assert claim.verdict == "held" and "no BN at lr 0.1" in claim.evidence


def test_fig1_not_tested_when_the_networks_did_not_train() -> None:
    numbers = fig1_numbers(train_grid_plain=[[0.2, 0.2, 0.2], [0.3, 0.3, 0.3]])
    claims = fig1.judge(numbers)
    assert [c.verdict for c in claims] == ["not tested"] * 3
    assert "without BN (lr 1) reached 0.3000" in claims[0].evidence
    assert [c.verdict for c in fig1.judge(numbers, trained_floor=0.1)] == ["held"] * 3


def test_fig1_higher_is_paired_with_a_margin() -> None:
    numbers = fig1_numbers(final_bn=[0.98, 0.98, 0.98], final_plain=[0.98, 0.98, 0.98])
    assert outcome(fig1.judge(numbers), "higher") == "did not hold"  # a tie
    numbers = fig1_numbers(final_bn=[0.983, 0.981, 0.98], final_plain=[0.98, 0.98, 0.98])
    assert outcome(fig1.judge(numbers), "higher") == "did not hold"  # within the spread
    assert outcome(fig1.judge(numbers, spread_factor=0.5), "higher") == "held"
    assert outcome(fig1.judge(fig1_numbers(final_bn=[], final_plain=[])), "higher") == (
        "did not hold"
    )


def test_fig1_stable_needs_both_measures_beyond_their_margin() -> None:
    assert outcome(fig1.judge(fig1_numbers(median_drift_bn=[0.4, 0.5, 0.45])), "stable") == (
        "did not hold"
    )
    numbers = fig1_numbers(spread_ratio_bn=[85.0, 85.0, 85.0])  # differences 5, -5, 15
    assert outcome(fig1.judge(numbers), "stable") == "did not hold"
    assert outcome(fig1.judge(numbers, spread_factor=0.1), "stable") == "held"


def test_fig1_numbers_without_the_grid_still_judge() -> None:
    """A run made before the grid existed: "faster" at its one rate, nothing gated."""
    old = fig1_numbers(
        grid_lrs=None,
        early_grid_bn=None,
        early_grid_plain=None,
        final_grid_bn=None,
        final_grid_plain=None,
        diverged_grid_bn=None,
        diverged_grid_plain=None,
        train_grid_bn=None,
        train_grid_plain=None,
        lr=None,
    )
    claims = fig1.judge(old)
    assert [c.verdict for c in claims] == ["held"] * 3
    assert claims[0].evidence.startswith("step 500 (one learning rate): 0.9100 vs 0.1233")


def test_fig1_numbers_round_trip() -> None:
    numbers = fig1_numbers()
    again = numbers_from_json(fig1.Numbers, numbers_to_json(numbers))
    assert fig1.judge(again) == fig1.judge(numbers)


# ---------------------------------------------------------------------------------------------
# nonlinearity


def nonlinearity_numbers(**changes) -> nonlinearity.Numbers:
    """Every claim holds: the default-scale settings do not saturate, the large ones do."""
    base = nonlinearity.Numbers(
        target=0.9,
        saturating=["sigmoid", "sigmoid, init 8"],
        final_bn={"sigmoid": [0.95, 0.96], "sigmoid, init 8": [0.95, 0.95]},
        bn={"sigmoid": CellNumbers([300, 400], 0), "sigmoid, init 8": CellNumbers([500, 500], 0)},
        plain={
            "sigmoid": CellNumbers([INF, INF], 0),
            "sigmoid, init 8": CellNumbers([1000, 1250], 0),
        },
        saturation_bn={"sigmoid": [0.0, 0.0], "sigmoid, init 8": [0.0, 0.01]},
        saturation_plain={"sigmoid": [0.0, 0.0], "sigmoid, init 8": [0.30, 0.35]},
        peak_saturation_bn={"sigmoid": 0.0, "sigmoid, init 8": 0.01},
        peak_saturation_plain={"sigmoid": 0.001, "sigmoid, init 8": 0.4},
        eval_every=250,
    )
    return dataclasses.replace(base, **changes)


def test_nonlinearity_all_hold() -> None:
    claims = nonlinearity.judge(nonlinearity_numbers())
    assert [c.verdict for c in claims] == ["held"] * 3
    assert "sigmoid: 350 with BN vs never (on 2/2 seeds) without" in claims[1].evidence
    assert "no network saturates in sigmoid (peak 0.001)" in claims[2].evidence


def test_nonlinearity_trainable_needs_every_seed_of_every_setting() -> None:
    bn = {"sigmoid": CellNumbers([300, 400], 0), "sigmoid, init 8": CellNumbers([500, INF], 0)}
    claims = nonlinearity.judge(nonlinearity_numbers(bn=bn))
    assert outcome(claims, "trainable") == "did not hold"
    assert outcome(claims, "faster") == "did not hold"  # BN misses the target on a seed
    bn = {"sigmoid": CellNumbers([300, 400], 1), "sigmoid, init 8": CellNumbers([500, 500], 0)}
    assert outcome(nonlinearity.judge(nonlinearity_numbers(bn=bn)), "trainable") == "did not hold"


@pytest.mark.parametrize(
    ("bn_steps", "plain_steps", "expected"),
    [
        ([500, 500], [500, 500], "did not hold"),  # a tie
        ([500, 500], [750, 750], "did not hold"),  # one evaluation interval: at the floor
        ([500, 500], [1000, 1000], "held"),  # two intervals ahead on every seed
        ([500, 500], [600, 700], "did not hold"),  # less than one interval: below the floor
        ([500, 750], [1000, 750], "did not hold"),  # gains 500 and 0: within the spread
        ([500, 500], [INF, 500], "held"),  # the plain network misses the target on a seed
    ],
)
def test_nonlinearity_faster(bn_steps, plain_steps, expected) -> None:
    numbers = nonlinearity_numbers(
        bn={"sigmoid": CellNumbers([300, 400], 0), "sigmoid, init 8": CellNumbers(bn_steps, 0)},
        plain={
            "sigmoid": CellNumbers([INF, INF], 0),
            "sigmoid, init 8": CellNumbers(plain_steps, 0),
        },
    )
    assert outcome(nonlinearity.judge(numbers), "faster") == expected


def test_nonlinearity_faster_margin() -> None:
    numbers = nonlinearity_numbers(
        bn={"sigmoid": CellNumbers([300, 400], 0), "sigmoid, init 8": CellNumbers([500, 500], 0)},
        plain={
            "sigmoid": CellNumbers([INF, INF], 0),
            "sigmoid, init 8": CellNumbers([1500, 2500], 0),
        },
    )  # gains 1000 and 2000: mean 1500, standard error 500
    assert outcome(nonlinearity.judge(numbers), "faster") == "held"
    assert outcome(nonlinearity.judge(numbers, spread_factor=3.5), "faster") == "did not hold"


@pytest.mark.parametrize(
    ("bn", "plain", "expected"),
    [
        ([0.30, 0.35], [0.30, 0.35], "did not hold"),  # a tie
        ([0.40, 0.45], [0.30, 0.35], "did not hold"),  # BN more saturated
        ([0.0, 0.01], [0.30, 0.35], "held"),
        ([0.0003, 0.0003], [0.0005, 0.0005], "did not hold"),  # below the 0.0005 floor
    ],
)
def test_nonlinearity_unsaturated(bn, plain, expected) -> None:
    numbers = nonlinearity_numbers(
        saturation_bn={"sigmoid": [0.0, 0.0], "sigmoid, init 8": bn},
        saturation_plain={"sigmoid": [0.0, 0.0], "sigmoid, init 8": plain},
    )
    assert outcome(nonlinearity.judge(numbers), "unsaturated") == expected


def test_nonlinearity_unsaturated_margin() -> None:
    numbers = nonlinearity_numbers(
        saturation_bn={"sigmoid": [0.0, 0.0], "sigmoid, init 8": [0.0, 0.0]},
        saturation_plain={"sigmoid": [0.0, 0.0], "sigmoid, init 8": [0.1, 0.3]},
    )  # differences 0.1, 0.3: mean 0.2, standard error 0.1
    assert outcome(nonlinearity.judge(numbers, spread_factor=2.5), "unsaturated") == (
        "did not hold"
    )
    assert outcome(nonlinearity.judge(numbers, spread_factor=1.5), "unsaturated") == "held"


def test_nonlinearity_unsaturated_not_tested_without_saturation() -> None:
    """The old failure: two unsaturated networks tie at 0 - the claim cannot be tested."""
    numbers = nonlinearity_numbers(
        saturating=["sigmoid"],
        peak_saturation_bn={"sigmoid": 0.0},
        peak_saturation_plain={"sigmoid": 0.001},
    )
    claim = nonlinearity.judge(numbers)[2]
    assert claim.verdict == "not tested"
    assert "no network saturates in any setting: sigmoid (peak 0.001)" in claim.evidence
    # The floor decides what saturating means.
    assert outcome(nonlinearity.judge(numbers, saturation_floor=0.0005), "unsaturated") == (
        "did not hold"
    )


def test_nonlinearity_numbers_round_trip() -> None:
    numbers = nonlinearity_numbers()
    again = numbers_from_json(nonlinearity.Numbers, numbers_to_json(numbers))
    assert nonlinearity.judge(again) == nonlinearity.judge(numbers)


# ---------------------------------------------------------------------------------------------
# decoupling


def decoupling_numbers(**changes) -> decoupling.Numbers:
    P = decoupling.ProblemNumbers
    base = decoupling.Numbers(
        problems=[
            P("OLS", 3.0, [0.2, 0.25], [0.3, 0.3], 0.45, [0.9, 0.9]),
            P("halfspace", 3.0, [0.3, 0.35], [0.6, 0.65], 0.45, [0.9, 0.9]),
            P("OLS", 10.0, [0.8, 0.8], [0.78, 0.79], 0.81, [0.95, 0.95]),
            P("halfspace", 10.0, [0.7, 0.72], [0.85, 0.86], 0.81, [0.96, 0.96]),
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


def test_decoupling_all_hold() -> None:
    claims = decoupling.judge(decoupling_numbers())
    assert [c.verdict for c in claims] == ["held"] * 4
    assert "GD on (w, g) 0.960" in claims[1].evidence
    assert "least squares, not judged" in claims[1].evidence


@pytest.mark.parametrize(
    ("rates", "expected"),
    [
        ([0.81, 0.8], "held"),  # at the bound: holds
        ([0.8100001, 0.8], "did not hold"),
        ([math.nan, 0.8], "did not hold"),
        ([math.inf, 0.8], "did not hold"),
    ],
)
def test_decoupling_linear_rate(rates, expected) -> None:
    problems = [decoupling.ProblemNumbers("OLS", 10.0, rates, [0.9, 0.9], 0.81)]
    numbers = decoupling_numbers(problems=problems)
    assert outcome(decoupling.judge(numbers), "linear rate") == expected


def test_decoupling_least_squares_is_not_judged_for_speed() -> None:
    """The theory gives GD and GDNP the same kind of rate there: GD faster on OLS is fine."""
    P = decoupling.ProblemNumbers
    problems = [
        P("OLS", 10.0, [0.8, 0.8], [0.5, 0.5], 0.81),
        P("halfspace", 10.0, [0.7, 0.72], [0.85, 0.86], 0.81),
    ]
    assert (
        outcome(
            decoupling.judge(decoupling_numbers(problems=problems)), "faster than GD on halfspaces"
        )
        == "held"
    )
    # Without a halfspace problem there is no evidence.
    problems = [P("OLS", 10.0, [0.5, 0.5], [0.8, 0.8], 0.81)]
    assert (
        outcome(
            decoupling.judge(decoupling_numbers(problems=problems)), "faster than GD on halfspaces"
        )
        == "did not hold"
    )


@pytest.mark.parametrize(
    ("gdnp", "gd", "expected"),
    [
        ([0.7, 0.7], [0.7, 0.7], "did not hold"),  # a tie
        ([0.7, 0.7], [0.7004, 0.7004], "did not hold"),  # below the 0.0005 floor
        ([0.7, 0.7], [0.8, 0.8], "held"),
        ([0.7, 0.7], [0.6, 0.9], "did not hold"),  # gaps -0.1, 0.2: within the spread
        ([0.9, 0.9], [0.8, 0.8], "did not hold"),  # GDNP slower
        ([math.nan, 0.7], [0.8, 0.8], "did not hold"),
    ],
)
def test_decoupling_faster_on_halfspaces(gdnp, gd, expected) -> None:
    problems = [decoupling.ProblemNumbers("halfspace", 10.0, gdnp, gd, 0.81)]
    numbers = decoupling_numbers(problems=problems)
    assert outcome(decoupling.judge(numbers), "faster than GD on halfspaces") == expected


def test_decoupling_faster_margin() -> None:
    problems = [decoupling.ProblemNumbers("halfspace", 10.0, [0.7, 0.7], [0.75, 0.85], 0.81)]
    numbers = decoupling_numbers(problems=problems)  # gaps 0.05, 0.15: mean 0.1, SE 0.05
    claims = decoupling.judge(numbers, spread_factor=2.5)
    assert outcome(claims, "faster than GD on halfspaces") == "did not hold"
    assert (
        outcome(decoupling.judge(numbers, spread_factor=1.5), "faster than GD on halfspaces")
        == "held"
    )


@pytest.mark.parametrize(
    ("rate", "expected"),
    [(0.35, "held"), (0.65, "held"), (0.3499, "did not hold"), (math.nan, "did not hold")],
)
def test_decoupling_bisection_band(rate, expected) -> None:
    assert outcome(decoupling.judge(decoupling_numbers(ts_rate=rate)), "bisection") == expected


@pytest.mark.parametrize(
    ("norms", "expected"),
    [
        ([1.0, 0.1, 0.01, 0.001], "held"),
        ([1.0, 0.5, 0.2, 0.02], "did not hold"),  # only 50x down: above 1/100 of the start
        ([1.0, 1.0, 1.0, 1.0], "did not hold"),  # no progress: rate 1
        ([], "did not hold"),  # nothing measured
        ([1.0, math.nan], "did not hold"),
    ],
)
def test_decoupling_mlp(norms, expected) -> None:
    numbers = decoupling_numbers(mlp_gradient_norms=norms)
    assert outcome(decoupling.judge(numbers), "MLP") == expected


def test_decoupling_mlp_fraction() -> None:
    numbers = decoupling_numbers(mlp_gradient_norms=[1.0, 0.5, 0.2, 0.02])
    assert outcome(decoupling.judge(numbers, mlp_fraction=0.05), "MLP") == "held"


def test_decoupling_old_numbers_with_one_rate_per_problem() -> None:
    """Runs made before the seeds: one float per rate still judges."""
    P = decoupling.ProblemNumbers
    numbers = decoupling_numbers(problems=[P("halfspace", 10.0, 0.7, 0.85, 0.81)])
    assert outcome(decoupling.judge(numbers), "linear rate") == "held"
    assert outcome(decoupling.judge(numbers), "faster than GD on halfspaces") == "held"


def test_decoupling_numbers_round_trip() -> None:
    numbers = decoupling_numbers()
    again = numbers_from_json(decoupling.Numbers, numbers_to_json(numbers))
    assert decoupling.judge(again) == decoupling.judge(numbers)


def test_decoupling_each_seed_against_its_own_bound() -> None:
    """Halfspace problems differ by seed (S = Sigma + u u^T), and so do their bounds."""
    P = decoupling.ProblemNumbers
    problems = [P("halfspace", 3.0, [0.50, 0.45], [0.7, 0.7], [0.48, 0.52])]
    assert outcome(decoupling.judge(decoupling_numbers(problems=problems)), "linear rate") == (
        "did not hold"
    )  # 0.50 is below the larger bound but above its own
    problems = [P("halfspace", 3.0, [0.47, 0.51], [0.7, 0.7], [0.48, 0.52])]
    assert outcome(decoupling.judge(decoupling_numbers(problems=problems)), "linear rate") == (
        "held"
    )
