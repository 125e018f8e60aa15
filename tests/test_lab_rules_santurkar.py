"""The rules of the Santurkar et al. (2018) experiments (noisy-bn, landscape, ics), decided on
made-up numbers: each claim made to hold, to fail and to go untested, and the margin's effect,
without a training run."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from batchnorm.lab.experiments import ics, landscape, noisy_bn

STANDARD, BN, NOISY = "standard", "BN", "noisy BN"
NAN = math.nan


def by_name(claims) -> dict:
    return {c.name: c for c in claims}


# ---------------------------------------------------------------------------------------------
# noisy-bn (Sec. 2.1, Figure 2)


def noisy_numbers(**changes) -> noisy_bn.Numbers:
    """Three seeds at lr 0.1 and 0.5 for which every claim holds."""
    base = noisy_bn.Numbers(
        lrs=[0.1, 0.5],
        train={
            STANDARD: [[0.80, 0.81, 0.79], [0.70, 0.72, 0.71]],
            BN: [[0.90, 0.91, 0.90], [0.92, 0.91, 0.92]],
            NOISY: [[0.90, 0.90, 0.91], [0.91, 0.91, 0.92]],
        },
        test={
            STANDARD: [[0.79, 0.80, 0.78], [0.70, 0.71, 0.70]],
            BN: [[0.89, 0.90, 0.89], [0.90, 0.90, 0.91]],
            NOISY: [[0.88, 0.89, 0.89], [0.89, 0.90, 0.90]],
        },
        instability={
            STANDARD: [[0.05, 0.06, 0.05], [0.08, 0.07, 0.09]],
            BN: [[0.02, 0.02, 0.02], [0.03, 0.03, 0.03]],
            NOISY: [[0.30, 0.31, 0.29], [0.30, 0.32, 0.31]],
        },
    )
    return dataclasses.replace(base, **changes)


def with_lr(values: dict, variant: str, lr_index: int, seeds: list[float]) -> dict:
    """``values`` with ``variant``'s seeds at one learning rate replaced."""
    out = {v: [list(x) for x in per_lr] for v, per_lr in values.items()}
    out[variant][lr_index] = seeds
    return out


def test_noisy_all_hold_with_evidence_per_lr() -> None:
    claims = noisy_bn.judge(noisy_numbers())
    assert [(c.name, c.verdict) for c in claims] == [
        ("as-bn", "held"),
        ("beats-standard", "held"),
        ("less-stable", "held"),
    ]
    assert claims[0].evidence.startswith("lr 0.1: train 0.9033 (noisy BN) vs 0.9033 (BN)")
    assert "lr 0.5:" in claims[0].evidence and "test 0.8867 vs 0.8933" in claims[0].evidence
    assert "instability 0.3000 (noisy BN) vs 0.0533 (standard)" in claims[2].evidence


def test_noisy_as_bn_fails_beyond_the_seed_spread_and_holds_within_it() -> None:
    base = noisy_numbers()
    # Noisy BN 0.05 behind BN at lr 0.5 with a small spread: beyond the margin, fails.
    behind = with_lr(base.train, NOISY, 1, [0.87, 0.85, 0.87])
    assert by_name(noisy_bn.judge(noisy_numbers(train=behind)))["as-bn"].verdict == "did not hold"
    # The same mean behind, but seeds that disagree widely: within the margin, holds.
    spread = with_lr(base.train, NOISY, 1, [0.97, 0.75, 0.88])
    assert by_name(noisy_bn.judge(noisy_numbers(train=spread)))["as-bn"].held
    # A wider margin (more standard errors) lets the small-spread deficit pass.
    wide = noisy_bn.judge(noisy_numbers(train=behind), spread_factor=20.0)
    assert by_name(wide)["as-bn"].held


def test_noisy_margin_floor_decides_a_single_seed() -> None:
    one = noisy_numbers(
        lrs=[0.1],
        train={STANDARD: [[0.80]], BN: [[0.90]], NOISY: [[0.899]]},
        test={STANDARD: [[0.8]], BN: [[0.9]], NOISY: [[0.9]]},
        instability={STANDARD: [[0.05]], BN: [[0.02]], NOISY: [[0.3]]},
    )
    assert not by_name(noisy_bn.judge(one))["as-bn"].held  # 0.001 behind, floor 0.0005
    assert by_name(noisy_bn.judge(one, min_tolerance=0.002))["as-bn"].held


def test_noisy_beats_standard_needs_a_gain_beyond_the_margin() -> None:
    base = noisy_numbers()
    tie = with_lr(base.train, STANDARD, 0, [0.90, 0.90, 0.91])  # equal to noisy BN, paired
    assert not by_name(noisy_bn.judge(noisy_numbers(train=tie)))["beats-standard"].held
    # A standard network that did not train is beaten (the paper's lr 0.5): tested, holds.
    dead = with_lr(base.train, STANDARD, 1, [0.10, 0.10, 0.10])
    claim = by_name(noisy_bn.judge(noisy_numbers(train=dead)))["beats-standard"]
    assert claim.verdict == "held"


def test_noisy_less_stable() -> None:
    base = noisy_numbers()
    calm = with_lr(base.instability, NOISY, 0, [0.05, 0.06, 0.05])  # equal to the standard
    assert not by_name(noisy_bn.judge(noisy_numbers(instability=calm)))["less-stable"].held
    # A diverged noisy seed (nan) is left out of the mean and the spread.
    gap = with_lr(base.instability, NOISY, 0, [0.30, NAN, 0.29])
    assert by_name(noisy_bn.judge(noisy_numbers(instability=gap)))["less-stable"].held


def test_noisy_untrained_networks_leave_claims_not_tested() -> None:
    base = noisy_numbers()
    # Noisy BN did not train at lr 0.5: that lr is not tested; lr 0.1 decides.
    dead = with_lr(base.train, NOISY, 1, [0.10, 0.11, 0.10])
    claims = by_name(noisy_bn.judge(noisy_numbers(train=dead)))
    for name in ("as-bn", "beats-standard", "less-stable"):
        assert claims[name].verdict == "held"
        assert "lr 0.5: not tested (noisy BN reached 0.1033" in claims[name].evidence
    # ... and at both: every claim is "not tested", never "did not hold".
    dead = with_lr(dead, NOISY, 0, [0.10, 0.10, 0.10])
    claims = noisy_bn.judge(noisy_numbers(train=dead))
    assert [c.verdict for c in claims] == ["not tested"] * 3
    # The floor is a parameter: with floor 0.95 no network trained.
    assert all(c.verdict == "not tested" for c in noisy_bn.judge(base, train_floor=0.95))


def test_instability_is_scale_free_and_sees_a_shift() -> None:
    rng = np.random.default_rng(0)
    grid = np.asarray(noisy_bn.GRID)
    quantiles = np.sort(rng.normal(size=(len(grid), 4)), axis=0)  # (Q, C)
    still = np.stack([quantiles, quantiles])[None]  # the same distribution twice
    assert noisy_bn.instability(still) == 0.0
    moved = np.stack([quantiles, quantiles + 0.5])[None]
    scaled = 10.0 * moved  # the same change, in a network with 10x larger activations
    assert noisy_bn.instability(scaled) == pytest.approx(noisy_bn.instability(moved))
    assert noisy_bn.instability(moved) > 0.1
    assert math.isnan(noisy_bn.instability(np.full((1, 2, len(grid), 4), NAN)))
    with pytest.raises(ValueError, match="shape"):
        noisy_bn.instability(np.zeros((1, 2, 3, 4)))


# ---------------------------------------------------------------------------------------------
# landscape (Sec. 3.1, Figure 4)


def landscape_numbers(bn_scale: float = 0.5, **changes) -> landscape.Numbers:
    """Three seeds, probes at steps 0, 50, ..., 300; BN's values ``bn_scale`` times the standard
    network's after the early steps (a larger one at step 0, as the default init gave)."""
    steps = list(range(0, 301, 50))
    standard = [
        [5.0, 3.0, 4.0, 2.0, 3.5, 2.5, 3.0],
        [5.5, 3.2, 4.2, 2.1, 3.4, 2.6, 3.1],
        [4.8, 2.9, 3.9, 1.9, 3.6, 2.4, 2.9],
    ]
    bn = [[20.0] + [bn_scale * x for x in row[1:]] for row in standard]
    base = landscape.Numbers(
        steps=steps,
        early_steps=50,
        values={q: {STANDARD: standard, BN: bn} for q in landscape.QUANTITIES},
        train={STANDARD: [0.85, 0.86, 0.85], BN: [0.90, 0.90, 0.91]},
        test={STANDARD: [0.84, 0.85, 0.84], BN: [0.89, 0.89, 0.90]},
    )
    return dataclasses.replace(base, **changes)


def test_landscape_holds_after_the_early_steps_only() -> None:
    claims = landscape.judge(landscape_numbers())
    assert [c.name for c in claims] == list(landscape.QUANTITIES)
    assert all(c.verdict == "held" for c in claims)
    assert "mean log(standard / BN) +0.693 (x2)" in claims[0].evidence
    # Judging the step-0 probe too (BN's 20 there) makes BN's spread the larger: fails.
    early = landscape.judge(landscape_numbers(early_steps=0))
    assert all(c.verdict == "did not hold" for c in early)


def test_landscape_needs_both_smaller_and_steadier() -> None:
    # Equal values: neither smaller nor steadier.
    assert not any(c.held for c in landscape.judge(landscape_numbers(bn_scale=1.0)))
    # BN larger everywhere: fails.
    assert not any(c.held for c in landscape.judge(landscape_numbers(bn_scale=2.0)))
    # BN smaller step by step but with a wider spread over the judged steps: fails.
    numbers = landscape_numbers()
    wild = [[20.0, 0.1, 3.5, 0.1, 3.0, 0.1, 2.0] for _ in range(3)]
    values = {q: {STANDARD: numbers.values[q][STANDARD], BN: wild} for q in landscape.QUANTITIES}
    claims = landscape.judge(landscape_numbers(values=values))
    assert not any(c.held for c in claims)


def test_landscape_margin_from_the_seed_spread() -> None:
    # BN 0.95x: a real but small gain, consistent over seeds: beyond 2 standard errors...
    assert all(c.held for c in landscape.judge(landscape_numbers(bn_scale=0.95)))
    # ... but not beyond a floor of 0.1 in log ratio.
    assert not any(
        c.held for c in landscape.judge(landscape_numbers(bn_scale=0.95), min_tolerance=0.1)
    )


def test_landscape_untrained_is_not_tested() -> None:
    numbers = landscape_numbers(train={STANDARD: [0.1, 0.1, 0.1], BN: [0.9, 0.9, 0.9]})
    claims = landscape.judge(numbers)
    assert [c.verdict for c in claims] == ["not tested"] * 3
    assert claims[0].evidence.startswith("not tested: standard reached 0.1000")
    # A diverged seed (nan probes) drops out of the paired statistics.
    values = landscape_numbers().values
    values = {q: {STANDARD: [*v[STANDARD][:2], [NAN] * 7], BN: v[BN]} for q, v in values.items()}
    assert all(c.held for c in landscape.judge(landscape_numbers(values=values)))


# ---------------------------------------------------------------------------------------------
# ics (Sec. 2.2, Definition 2.1, Figure 5)

CNN, DLN6, DLN7 = "CNN", "deep linear, lr 1e-06", "deep linear, lr 1e-07"


def ics_numbers(**changes) -> ics.Numbers:
    """Three seeds; the CNN has layers 2..4, the DLN layers 2..5 (4 layers) at two learning
    rates. BN's relative shift is larger and its cosine lower at every layer."""

    def seeds(row: list[float], jitter: float = 0.01) -> list[list[float]]:
        return [[x + k * jitter for x in row] for k in (-1, 0, 1)]

    relative = {
        CNN: {STANDARD: seeds([0.10, 0.20, 0.30]), BN: seeds([0.20, 0.30, 0.40])},
        DLN6: {STANDARD: seeds([0.01, 0.02, 0.03, 0.04]), BN: seeds([0.3, 0.5, 0.7, 0.9])},
        DLN7: {STANDARD: seeds([0.01, 0.01, 0.02, 0.02]), BN: seeds([0.3, 0.4, 0.6, 0.8])},
    }
    cos = {
        CNN: {STANDARD: seeds([0.99, 0.98, 0.97], 0.001), BN: seeds([0.95, 0.94, 0.93], 0.001)},
        DLN6: {STANDARD: seeds([0.99] * 4, 0.001), BN: seeds([0.9, 0.5, 0.2, 0.1], 0.001)},
        DLN7: {STANDARD: seeds([0.99] * 4, 0.001), BN: seeds([0.9, 0.6, 0.3, 0.0], 0.001)},
    }
    base = ics.Numbers(
        settings=[CNN, DLN6, DLN7],
        relative=relative,
        cos=cos,
        cnn_train={STANDARD: [0.85, 0.86, 0.85], BN: [0.9, 0.9, 0.9]},
        dln_loss_ratio={s: {STANDARD: [0.2] * 3, BN: [0.05] * 3} for s in (DLN6, DLN7)},
    )
    return dataclasses.replace(base, **changes)


def replaced(values: dict, setting: str, variant: str, layer: int, seeds: list[float]) -> dict:
    """``values`` with one layer's per-seed values (layer 0 = layer 2) replaced."""
    out = {s: {v: [list(row) for row in rows] for v, rows in d.items()} for s, d in values.items()}
    for k, x in enumerate(seeds):
        out[setting][variant][k][layer] = x
    return out


def test_ics_all_hold_with_per_layer_evidence() -> None:
    claims = ics.judge(ics_numbers())
    assert [(c.name, c.verdict) for c in claims] == [
        ("cnn-relative", "held"),
        ("cnn-cosine", "held"),
        ("dln-relative", "held"),
        ("dln-cosine", "held"),
        ("dln-increases", "held"),
    ]
    assert claims[0].evidence.startswith(
        "CNN: BN higher beyond the margin at layers 2, 3, 4; lower at layers none (of 2..4)"
    )
    assert f"{DLN6}: relative shift higher with BN at 4 of 4 layers" in claims[4].evidence
    assert f" || {DLN7}: " in claims[2].evidence


def test_ics_one_layer_where_bn_reduces_the_shift_breaks_the_claim() -> None:
    base = ics_numbers()
    # CNN layer 3: BN's relative shift 0.1 below the standard network's, consistently.
    relative = replaced(base.relative, CNN, BN, 1, [0.09, 0.10, 0.11])
    claim = by_name(ics.judge(ics_numbers(relative=relative)))["cnn-relative"]
    assert claim.verdict == "did not hold" and "lower at layers 3 (of 2..4)" in claim.evidence
    # The same mean, with seeds that disagree: within the margin, holds.
    relative = replaced(base.relative, CNN, BN, 1, [-0.2, 0.10, 0.40])
    assert by_name(ics.judge(ics_numbers(relative=relative)))["cnn-relative"].held


def test_ics_cosine_rule_and_its_margin() -> None:
    base = ics_numbers()
    # DLN lr 1e-7, layer 2: BN's cosine 0.005 above the standard network's.
    cos = replaced(base.cos, DLN7, BN, 0, [0.994, 0.995, 0.996])
    claims = by_name(ics.judge(ics_numbers(cos=cos)))
    assert not claims["dln-cosine"].held and claims["cnn-cosine"].held
    # A margin floor of 0.01 covers it.
    assert by_name(ics.judge(ics_numbers(cos=cos), min_tolerance=0.01))["dln-cosine"].held


def test_ics_dln_increases_needs_a_majority_of_layers_at_every_lr() -> None:
    base = ics_numbers()
    # At lr 1e-6 BN's relative shift equals the standard network's at 3 of 4 layers.
    relative = base.relative
    for layer in range(3):
        relative = replaced(
            relative, DLN6, BN, layer, [r[layer] for r in base.relative[DLN6][STANDARD]]
        )
    claims = by_name(ics.judge(ics_numbers(relative=relative)))
    assert not claims["dln-increases"].held
    assert claims["dln-relative"].held  # equal is not reduced
    assert (
        f"{DLN6}: relative shift higher with BN at 1 of 4 layers"
        in claims["dln-increases"].evidence
    )


def test_ics_untrained_networks_are_not_tested() -> None:
    claims = by_name(ics.judge(ics_numbers(cnn_train={STANDARD: [0.1] * 3, BN: [0.9] * 3})))
    assert claims["cnn-relative"].verdict == claims["cnn-cosine"].verdict == "not tested"
    assert claims["dln-relative"].verdict == "held"
    # A DLN whose loss did not fall at one lr: that lr is not tested, the other decides.
    ratio = {
        DLN6: {STANDARD: [0.9] * 3, BN: [0.05] * 3},
        DLN7: {STANDARD: [0.2] * 3, BN: [0.05] * 3},
    }
    claims = by_name(ics.judge(ics_numbers(dln_loss_ratio=ratio)))
    assert claims["dln-increases"].verdict == "held"
    assert (
        f"{DLN6}: not tested (standard final/initial loss 0.9" in claims["dln-increases"].evidence
    )
    # ... and with max_loss_ratio 0.01 no DLN trained.
    claims = by_name(ics.judge(ics_numbers(), max_loss_ratio=0.01))
    assert [claims[n].verdict for n in ("dln-relative", "dln-cosine", "dln-increases")] == [
        "not tested"
    ] * 3


def test_ics_per_layer_medians_are_scale_free() -> None:
    def job(scale: float) -> dict:
        probes = [
            {"l2": [0.0, 1.0 * scale, 2.0 * scale], "cos": [1.0, 0.9, 0.8],
             "grad_norm": [1.0, 10.0 * scale, 4.0 * scale]},
            {"l2": [0.0, 3.0 * scale, 2.0 * scale], "cos": [1.0, 0.7, 0.6],
             "grad_norm": [1.0, 10.0 * scale, 4.0 * scale]},
        ]  # fmt: skip
        return {"probes": probes}

    relative, cosine, raw = ics.per_layer_medians([job(1.0), job(1000.0)])
    assert relative.shape == (2, 2)
    np.testing.assert_allclose(relative[0], [0.2, 0.5])  # medians of 0.1, 0.3 and 0.5, 0.5
    np.testing.assert_allclose(relative[1], relative[0])  # a 1000x larger gradient: the same
    np.testing.assert_allclose(cosine[0], [0.8, 0.7])
    np.testing.assert_allclose(raw[1], 1000.0 * raw[0])


def test_landscape_fewer_than_two_judged_probes_is_not_tested() -> None:
    numbers = landscape_numbers(early_steps=300)  # only the probe at step 300 is judged
    claims = landscape.judge(numbers)
    assert [c.verdict for c in claims] == ["not tested"] * 3
    assert "fewer than two judged probes" in claims[0].evidence


def test_ics_a_diverged_seed_drops_out_and_is_named() -> None:
    base = ics_numbers()
    # The diverged seed's probes before it diverged (here a large shift at layer 2) are left
    # out with it: they would make BN's shift look smaller there.
    relative = replaced(base.relative, DLN6, STANDARD, 0, [5.0, 0.01, 0.01])
    ratio = {DLN6: {STANDARD: [NAN, 0.2, 0.2], BN: [0.05] * 3}, DLN7: base.dln_loss_ratio[DLN7]}
    claims = by_name(ics.judge(ics_numbers(relative=relative, dln_loss_ratio=ratio)))
    assert claims["dln-relative"].held and claims["dln-increases"].held
    assert "(standard diverged in 1 of 3 seeds: left out)" in claims["dln-relative"].evidence
    assert claims["cnn-relative"].evidence.endswith("4: 0.3/0.4")  # nothing added for the CNN


def test_ics_saved_nans_come_back() -> None:
    job = {"final_loss": None, "probes": [{"l2": [0.0, None], "cos": [1.0, 0.5]}], "seed": 1}
    back = ics._nan_back(job)
    assert math.isnan(back["final_loss"]) and math.isnan(back["probes"][0]["l2"][1])
    assert back["probes"][0]["cos"] == [1.0, 0.5] and back["seed"] == 1
