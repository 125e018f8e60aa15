"""The rules of precise-bn, agc and explosion, decided on made-up numbers: each claim made to
hold, to fail and to be "not tested", and the effect of its margin; and the clipping of the final
layer's bias that agc follows from NFNets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from batchnorm.lab.experiments import agc, explosion, precise_bn
from batchnorm.lab.experiments.cnn import iid_batches, train_net
from batchnorm.lab.grouped import ConvNetSpec, train_grouped
from tests.test_lab_grouped import assert_results_equal, build, tiny_images


def claims_of(claims) -> dict:
    return {c.name: c for c in claims}


def verdict(judge, numbers, name: str, **margins) -> str:
    return claims_of(judge(numbers, **margins))[name].verdict


# ---------------------------------------------------------------------------------------------
# precise-bn (Wu & Johnson 2021, Sec. 3.1, Fig. 2)


def precise_numbers(**changes) -> precise_bn.Numbers:
    """Two seeds, three evaluations: the high constant lr lags (gain 0.05), the base one a
    little (0.01), the decayed high lr ends level."""
    ema = {
        "base, constant": [[0.70, 0.75, 0.78], [0.71, 0.74, 0.79]],
        "base, cosine": [[0.70, 0.76, 0.82], [0.71, 0.76, 0.82]],
        "high, constant": [[0.60, 0.65, 0.70], [0.62, 0.66, 0.69]],
        "high, cosine": [[0.60, 0.70, 0.80], [0.62, 0.70, 0.81]],
    }
    gain = {
        "base, constant": [[0.01, 0.01, 0.01], [0.012, 0.008, 0.01]],
        "base, cosine": [[0.01, 0.005, 0.0], [0.01, 0.005, 0.0]],
        "high, constant": [[0.05, 0.06, 0.04], [0.05, 0.05, 0.05]],
        "high, cosine": [[0.05, 0.02, 0.0], [0.05, 0.02, 0.0]],
    }
    precise = {a: (np.asarray(ema[a]) + np.asarray(gain[a])).tolist() for a in precise_bn.ARMS}
    base = precise_bn.Numbers(
        steps=[100, 200, 300],
        lrs={"base": 0.1, "high": 0.4},
        train_floor=0.7,
        ema=ema,
        precise=precise,
        train={a: [0.85, 0.86] for a in precise_bn.ARMS},
    )
    for key, value in changes.items():
        setattr(base, key, value)
    return base


def test_precise_all_hold_and_evidence() -> None:
    claims = precise_bn.judge(precise_numbers())
    assert [c.verdict for c in claims] == ["held"] * 3
    assert "mean gain +0.0500" in claims[0].evidence and "200: +0.055" in claims[0].evidence
    assert "+0.0400 (tolerance" in claims[1].evidence
    assert "without decay +0.0450" in claims[2].evidence


def test_precise_lag_needs_a_gain_above_the_seed_spread() -> None:
    n = precise_numbers()
    n.precise["high, constant"] = [
        [e + g for e, g in zip(row, gains)]
        for row, gains in zip(n.ema["high, constant"], [[0.03, 0.0, 0.0], [-0.02, 0.0, 0.0]])
    ]  # mean +0.0017, per-seed averages +0.010 and -0.0067: within the spread
    assert verdict(precise_bn.judge, n, "lags at a high learning rate") == "did not hold"
    # With no margin from the spread (factor 0) and a tiny floor, the same mean counts.
    assert (
        verdict(
            precise_bn.judge,
            n,
            "lags at a high learning rate",
            spread_factor=0.0,
            min_tolerance=1e-4,
        )
        == "held"
    )


def test_precise_min_tolerance_decides_a_consistent_small_gain() -> None:
    n = precise_numbers()
    n.precise["high, constant"] = (np.asarray(n.ema["high, constant"]) + 0.001).tolist()
    assert verdict(precise_bn.judge, n, "lags at a high learning rate") == "did not hold"
    held = verdict(precise_bn.judge, n, "lags at a high learning rate", min_tolerance=0.0005)
    assert held == "held"


def test_precise_most_at_high_lr() -> None:
    n = precise_numbers()
    n.precise["base, constant"] = (np.asarray(n.ema["base, constant"]) + 0.05).tolist()
    assert verdict(precise_bn.judge, n, "most at a high learning rate") == "did not hold"


def test_precise_decay_closes_the_gap() -> None:
    n = precise_numbers()
    assert verdict(precise_bn.judge, n, "decay closes the gap") == "held"
    n.precise["high, cosine"] = [row[:2] + [row[2] + 0.02] for row in n.precise["high, cosine"]]
    assert verdict(precise_bn.judge, n, "decay closes the gap") == "did not hold"
    # A margin wider than the gap: the two agree within it.
    assert verdict(precise_bn.judge, n, "decay closes the gap", min_tolerance=0.03) == "held"


def test_precise_untrained_networks_are_not_tested() -> None:
    n = precise_numbers(train={**precise_numbers().train, "high, constant": [0.3, 0.4]})
    claims = claims_of(precise_bn.judge(n))
    assert claims["lags at a high learning rate"].verdict == "not tested"
    assert (
        "high, constant (train accuracy) reached 0.3500"
        in claims["lags at a high learning rate"].evidence
    )
    assert claims["most at a high learning rate"].verdict == "not tested"
    assert claims["decay closes the gap"].verdict == "held"


def test_precise_lr_schedule() -> None:
    assert precise_bn.lr_at(1, 11, 0.2, "cosine") == pytest.approx(0.2)
    assert precise_bn.lr_at(6, 11, 0.2, "cosine") == pytest.approx(0.1)
    assert precise_bn.lr_at(11, 11, 0.2, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert precise_bn.lr_at(11, 11, 0.2, "constant") == 0.2
    with pytest.raises(ValueError, match="schedule must be one of"):
        precise_bn.lr_at(1, 11, 0.2, "step")


# ---------------------------------------------------------------------------------------------
# agc (Brock et al. 2021, Sec. 4.1, Fig. 2)


def agc_numbers(**changes) -> agc.Numbers:
    """Three batch sizes, two seeds: BN 0.85 everywhere; unclipped fine at 32, failing at 128
    and 512; AGC within 0.03 of BN everywhere."""
    base = agc.Numbers(
        batch_sizes=[32, 128, 512],
        lrs=[0.05, 0.2, 0.8],
        clippings=[0.113, 0.057, 0.028],
        target_gap=0.03,
        train_floor=0.6,
        acc={
            agc.PLAIN: [[0.84, 0.85], [0.60, 0.62], [0.10, 0.10]],
            agc.CLIPPED: [[0.84, 0.85], [0.83, 0.84], [0.83, 0.84]],
            agc.BN: [[0.85, 0.86], [0.85, 0.86], [0.85, 0.86]],
        },
        train={v: [[0.9, 0.9]] * 3 for v in agc.VARIANTS},
        diverged={agc.PLAIN: [0, 0, 1], agc.CLIPPED: [0, 0, 0], agc.BN: [0, 0, 0]},
    )
    for key, value in changes.items():
        setattr(base, key, value)
    return base


def test_agc_all_hold_and_evidence() -> None:
    claims = agc.judge(agc_numbers())
    assert [c.verdict for c in claims] == ["held"] * 3
    assert claims[0].evidence.startswith("512 (AGC) vs 32 (no AGC)")
    assert "1 diverged" in claims[1].evidence


def test_agc_targets_are_relative_to_bn_at_each_batch() -> None:
    n = agc_numbers()
    assert n.targets() == pytest.approx([0.825, 0.825, 0.825])
    assert n.trains(agc.PLAIN) == [True, False, False]
    # AGC falls more than the gap behind BN at 512: its range ends at 128, still beyond 32.
    n.acc[agc.CLIPPED][2] = [0.80, 0.80]
    assert n.largest(agc.CLIPPED) == 128
    assert verdict(agc.judge, n, "AGC extends the batch range") == "held"
    # ... and at 128 too: no longer beyond the unclipped network's range.
    n.acc[agc.CLIPPED][1] = [0.80, 0.80]
    assert verdict(agc.judge, n, "AGC extends the batch range") == "did not hold"


def test_agc_a_diverged_seed_does_not_train() -> None:
    n = agc_numbers(diverged={agc.PLAIN: [0, 0, 1], agc.CLIPPED: [0, 0, 1], agc.BN: [0, 0, 0]})
    assert n.largest(agc.CLIPPED) == 128


def test_agc_range_not_tested_without_instability_or_without_a_trained_start() -> None:
    stable = agc_numbers()
    stable.acc[agc.PLAIN] = [[0.84, 0.85]] * 3
    stable.diverged[agc.PLAIN] = [0, 0, 0]
    claim = claims_of(agc.judge(stable))["AGC extends the batch range"]
    assert claim.verdict == "not tested" and "no instability" in claim.evidence
    slow = agc_numbers()
    slow.acc[agc.PLAIN][0] = [0.70, 0.70]  # far below BN even at the smallest batch
    claim = claims_of(agc.judge(slow))["AGC extends the batch range"]
    assert claim.verdict == "not tested" and "even at the smallest batch" in claim.evidence


def test_agc_helps_at_the_largest_batch_margin() -> None:
    n = agc_numbers()
    n.acc[agc.PLAIN][2] = [0.84, 0.82]  # gains -0.01, +0.02: mean +0.005 within the spread
    assert verdict(agc.judge, n, "AGC helps at the largest batch") == "did not hold"
    assert verdict(agc.judge, n, "AGC helps at the largest batch", spread_factor=0.0) == "held"


def test_agc_matches_bn_allowance() -> None:
    n = agc_numbers()
    n.acc[agc.CLIPPED][2] = [0.825, 0.835]  # 0.025 behind BN: within the 0.03 allowance
    assert verdict(agc.judge, n, "matches BN at the largest batch") == "held"
    n.acc[agc.CLIPPED][2] = [0.81, 0.82]  # 0.04 behind
    assert verdict(agc.judge, n, "matches BN at the largest batch") == "did not hold"
    n.acc[agc.CLIPPED][2] = [0.70, 0.90]  # -0.05 on average, but the seeds disagree widely
    assert verdict(agc.judge, n, "matches BN at the largest batch") == "held"


def test_agc_untrained_bn_is_not_tested() -> None:
    n = agc_numbers()
    n.train[agc.BN] = [[0.9, 0.9], [0.9, 0.9], [0.3, 0.4]]
    claims = claims_of(agc.judge(n))
    assert all(c.verdict == "not tested" for c in claims.values())
    assert (
        "BN at B=512 (train accuracy) reached 0.3500"
        in claims["AGC extends the batch range"].evidence
    )


def test_agc_threshold_shrinks_with_the_batch() -> None:
    assert agc.clipping_for(4096, 0.01) == pytest.approx(0.01)
    assert agc.clipping_for(512, 0.01) == pytest.approx(0.01 * math.sqrt(8))
    assert agc.clipping_for(32, 0.01) > agc.clipping_for(128, 0.01) > agc.clipping_for(512, 0.01)


def test_classifier_bias_clipped_grouped_as_alone() -> None:
    """AGC with the final layer's bias clipped (its weights not) gives each network of a grouped
    network the result train_net gives it alone, and differs from leaving the bias alone."""
    data = tiny_images()
    specs = [ConvNetSpec("a", seed=0, norm="none"), ConvNetSpec("b", seed=1, norm="none")]
    options = {"steps": 6, "lr": 0.5, "momentum": 0.9, "evals": 2, "desc": "test"}
    grouped, singles = build(specs)
    results = train_grouped(
        grouped,
        data,
        [iid_batches(len(data.train_y), 8, seed=10 + k) for k in range(2)],
        agc_clipping=1e-3,
        clip_classifier_bias=True,
        **options,
    )
    alone = []
    for k, net in enumerate(singles):
        alone.append(
            train_net(
                net,
                data,
                iid_batches(len(data.train_y), 8, seed=10 + k),
                agc_clipping=1e-3,
                clip_classifier_bias=True,
                **options,
            )
        )
        assert_results_equal(results[k], alone[k], f"net {k}")
    _, fresh = build(specs)
    unclipped_bias = train_net(
        fresh[0], data, iid_batches(len(data.train_y), 8, seed=10), agc_clipping=1e-3, **options
    )
    assert unclipped_bias["train_loss"] != alone[0]["train_loss"]


def test_clip_units_adds_only_the_classifier_bias() -> None:
    grouped, _ = build([ConvNetSpec("a", seed=0, norm="none")])
    out = grouped(torch.rand(4, 1, 8, 8, dtype=next(grouped.parameters()).dtype))
    out.sum().backward()
    without = grouped.clip_units()
    with_bias = grouped.clip_units(include_classifier_bias=True)
    everything = grouped.clip_units(include_classifier=True)
    assert len(with_bias) == len(without) + 1 and len(everything) == len(without) + 2
    assert with_bias[-1].shape == (1, grouped.num_classes)


# ---------------------------------------------------------------------------------------------
# explosion (Yang et al. 2019)


def explosion_numbers(**changes) -> explosion.Numbers:
    """Two batch sizes, depths on both sides of their limits (14 at B=4, 30 at B=16), 2 seeds."""
    L = explosion.LambdaNumbers
    base = explosion.Numbers(
        rel_tol=0.05,
        trainable_acc=0.5,
        train_floor=0.5,
        remedy_eps=1.0,
        lambdas=[
            L("relu", 4, 2.9, 3.08),
            L("relu", 8, 1.79, 1.788),
            L("linear", 8, 1.2, 1.2),
            L("tanh", 8, 1.5, math.nan),
        ],
        grid=[
            explosion.GridCell(7, 4, [0.9, 0.9], [0.9, 0.92]),
            explosion.GridCell(28, 4, [0.1, math.nan], [0.1, math.nan]),
            explosion.GridCell(15, 16, [0.9, 0.8], [0.9, 0.8]),
            explosion.GridCell(60, 16, [0.2, 0.2], [0.2, 0.2]),
        ],
        predicted_depth={4: 14.0, 16: 30.0},
        b_min=4,
        plain_lambda=2.9,
        remedy_lambda={"residual": 1.2, "eps=1": 1.3},
        deep=28,
        small=4,
        plain_acc=[0.1, math.nan],
        remedy_acc={"residual": [0.8, 0.85], "eps": [0.3, 0.35]},
    )
    for key, value in changes.items():
        setattr(base, key, value)
    return base


def test_explosion_all_hold_and_evidence() -> None:
    claims = explosion.judge(explosion_numbers())
    assert [c.verdict for c in claims] == ["held"] * 5
    depth = claims_of(claims)["trainable depth"]
    assert depth.evidence.startswith("agreement on 4/4 cells")
    assert "d=28 B=4 fails" in depth.evidence
    remedies = claims_of(claims)["remedies train"].evidence
    assert remedies.startswith("plain 0.050") and "residual 0.825 (gain +0.775" in remedies


@pytest.mark.parametrize(("relu8", "expected"), [(1.79, "held"), (1.9, "did not hold")])
def test_explosion_closed_form(relu8: float, expected: str) -> None:
    lambdas = [explosion.LambdaNumbers("relu", 8, relu8, 1.788)]
    assert verdict(explosion.judge, explosion_numbers(lambdas=lambdas), "closed form") == expected


@pytest.mark.parametrize(("smallest", "expected"), [(1.0, "did not hold"), (1.01, "held")])
def test_explosion_lambda_above_one(smallest: float, expected: str) -> None:
    lambdas = [*explosion_numbers().lambdas, explosion.LambdaNumbers("tanh", 64, smallest, 1.0)]
    assert verdict(explosion.judge, explosion_numbers(lambdas=lambdas), "explosion") == expected


def test_explosion_trainable_depth_disagreement_and_share() -> None:
    n = explosion_numbers()
    n.grid[1] = explosion.GridCell(28, 4, [0.9, 0.9], [0.9, 0.9])  # trains beyond its limit
    n.grid[3] = explosion.GridCell(60, 16, [0.9, 0.9], [0.9, 0.9])
    assert verdict(explosion.judge, n, "trainable depth") == "did not hold"  # 2/4
    assert verdict(explosion.judge, n, "trainable depth", agreement_share=0.5) == "held"


def test_explosion_trainable_depth_not_tested_when_a_shallow_net_did_not_train() -> None:
    n = explosion_numbers()
    n.grid[0] = explosion.GridCell(7, 4, [0.3, 0.3], [0.3, 0.32])
    claim = claims_of(explosion.judge(n))["trainable depth"]
    assert claim.verdict == "not tested"
    assert "depth 7 at B=4 (train accuracy) reached 0.3100" in claim.evidence


def test_explosion_remedies_reduce_lambda() -> None:
    n = explosion_numbers(remedy_lambda={"residual": 1.2, "eps=1": 3.0})
    assert verdict(explosion.judge, n, "remedies reduce lambda") == "did not hold"


def test_explosion_remedies_train_margin() -> None:
    # eps gains +0.003 and +0.005 (plain 0.1, 0.1): below the 0.005 floor of the margin.
    n = explosion_numbers(
        plain_acc=[0.1, 0.1], remedy_acc={"residual": [0.8, 0.8], "eps": [0.103, 0.105]}
    )
    assert verdict(explosion.judge, n, "remedies train") == "did not hold"
    assert verdict(explosion.judge, n, "remedies train", min_tolerance=0.001) == "held"
    # Seeds that disagree: a mean gain inside two standard errors does not count.
    n = explosion_numbers(
        plain_acc=[0.1, 0.1], remedy_acc={"residual": [0.8, 0.8], "eps": [0.3, 0.1]}
    )
    assert verdict(explosion.judge, n, "remedies train") == "did not hold"
    assert verdict(explosion.judge, n, "remedies train", spread_factor=0.5) == "held"


def test_explosion_remedies_not_tested_when_the_plain_network_trains() -> None:
    n = explosion_numbers(plain_acc=[0.8, 0.8])
    claim = claims_of(explosion.judge(n))["remedies train"]
    assert claim.verdict == "not tested" and "nothing to remedy" in claim.evidence


def test_explosion_grid_depths_straddle_the_limit() -> None:
    for b in (4, 8, 32, 128):
        limit = explosion.trainable_depth(explosion.relu_lambda(b))
        depths = explosion.grid_depths(b, (0.5, 0.75, 1.5, 2.0))
        assert len(depths) == 4
        assert min(depths) < limit < max(depths)
        assert sum(d <= limit for d in depths) == 2
