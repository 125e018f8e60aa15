"""The ``rnn`` experiment's rules on made-up numbers (each claim made to hold, to fail, to be
not tested, and moved by its margin), its model's batch-norm bookkeeping, and a quick run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from batchnorm.lab import experiments
from batchnorm.lab.experiment import make_config, run_experiment
from batchnorm.lab.experiments import rnn
from batchnorm.lab.experiments.rnn import LN, NONE, PER_STEP, SHARED
from batchnorm.lab.experiments.rnn_model import GroupedLSTM, StepRecorder
from batchnorm.lab.numbers import numbers_from_json, numbers_to_json
from tests.lab_helpers import check_run_dir

ARMS = rnn.ARMS


def numbers(**changes) -> rnn.Numbers:
    """Numbers for which every claim holds (three seeds)."""
    base = rnn.Numbers(
        train_steps=28,
        max_train_steps=42,
        long_steps=56,
        train={a: [0.98, 0.985, 0.99] for a in ARMS},
        test={
            NONE: [0.970, 0.972, 0.968],
            SHARED: [0.60, 0.62, 0.58],
            PER_STEP: [0.978, 0.980, 0.976],
            LN: [0.975, 0.977, 0.973],
        },
        curve={
            NONE: [0.90, 0.91, 0.89],
            SHARED: [0.50, 0.52, 0.48],
            PER_STEP: [0.95, 0.96, 0.94],
            LN: [0.94, 0.95, 0.93],
        },
        after={
            NONE: [0.960, 0.962, 0.958],
            SHARED: [0.40, 0.42, 0.38],
            PER_STEP: [0.968, 0.970, 0.966],
            LN: [0.966, 0.968, 0.964],
        },
        before={
            NONE: [0.900, 0.905, 0.895],
            SHARED: [0.20, 0.22, 0.18],
            PER_STEP: [0.30, 0.32, 0.28],
            LN: [0.905, 0.910, 0.900],
        },
    )
    return dataclasses.replace(base, **changes)


def with_arm(table: str, arm: str, values: list[float], **changes) -> rnn.Numbers:
    """``numbers()`` with ``table[arm]`` replaced."""
    base = numbers(**changes)
    return dataclasses.replace(base, **{table: {**getattr(base, table), arm: values}})


def claims(n: rnn.Numbers, **margins) -> dict[str, object]:
    return {c.name: c for c in rnn.judge(n, **margins)}


def verdict(n: rnn.Numbers, name: str, **margins) -> str:
    return claims(n, **margins)[name].verdict


NAMES = [
    "BN per step trains as well",
    "BN per step converges faster",
    "shared statistics are worse",
    "layer norm works",
    "layer norm generalizes to longer sequences",
    "last step's statistics carry BN on",
    "per-step statistics fail past the training length",
]


def test_every_claim_holds_on_the_base_numbers() -> None:
    judged = rnn.judge(numbers())
    assert [c.name for c in judged] == NAMES
    assert all(c.held and c.tested for c in judged), [c.evidence for c in judged]


def test_numbers_round_trip_through_json() -> None:
    n = numbers()
    assert numbers_from_json(rnn.Numbers, json.loads(json.dumps(numbers_to_json(n)))) == n


# Each claim made to fail by one change of the numbers.
FAILING = {
    "BN per step trains as well": ("test", PER_STEP, [0.950, 0.952, 0.948]),
    "BN per step converges faster": ("curve", PER_STEP, [0.90, 0.91, 0.89]),
    "shared statistics are worse": ("test", SHARED, [0.978, 0.980, 0.976]),
    "layer norm works": ("test", LN, [0.950, 0.952, 0.948]),
    "layer norm generalizes to longer sequences": ("after", LN, [0.90, 0.91, 0.89]),
    "last step's statistics carry BN on": ("after", PER_STEP, [0.90, 0.91, 0.89]),
    "per-step statistics fail past the training length": ("before", PER_STEP, [0.91, 0.912, 0.908]),
}


@pytest.mark.parametrize("name", NAMES)
def test_each_claim_fails_when_its_numbers_say_so(name: str) -> None:
    table, arm, values = FAILING[name]
    judged = claims(with_arm(table, arm, values))
    assert judged[name].verdict == "did not hold", judged[name].evidence
    others = [c for n, c in judged.items() if n != name and n in FAILING]
    # The change touches only the claims that read that table and arm.
    assert any(c.held for c in others)


def test_layer_norm_must_generalize_on_both_longer_tests() -> None:
    # Fine after the digit, a large loss where the digit comes past the training length.
    n = with_arm("before", LN, [0.60, 0.61, 0.59])
    assert verdict(n, "layer norm generalizes to longer sequences") == "did not hold"
    assert verdict(n, "per-step statistics fail past the training length") == "held"


# Which arms each claim needs trained ("not tested" otherwise).
GATES = {
    "BN per step trains as well": {NONE, PER_STEP},
    "BN per step converges faster": {NONE, PER_STEP},
    "shared statistics are worse": {PER_STEP},
    "layer norm works": {NONE, LN},
    "layer norm generalizes to longer sequences": {NONE, LN},
    "last step's statistics carry BN on": {NONE, PER_STEP},
    "per-step statistics fail past the training length": {LN, PER_STEP},
}


@pytest.mark.parametrize("arm", [NONE, PER_STEP, LN])
def test_a_claim_about_an_untrained_arm_is_not_tested(arm: str) -> None:
    judged = claims(with_arm("train", arm, [0.11, 0.10, 0.12]))
    for name, arms in GATES.items():
        expected = "not tested" if arm in arms else "held"
        assert judged[name].verdict == expected, (name, judged[name].evidence)
        if expected == "not tested":
            assert f"{arm} reached" in judged[name].evidence


@pytest.mark.parametrize("table", ["after", "before"])
def test_longer_sequence_claims_need_the_plain_lstm_to_carry_over(table: str) -> None:
    judged = claims(with_arm(table, NONE, [0.11, 0.12, 0.10]))
    assert judged["layer norm generalizes to longer sequences"].verdict == "not tested"
    expected = "not tested" if table == "after" else "held"
    assert judged["last step's statistics carry BN on"].verdict == expected
    assert "none on blank rows" in judged["layer norm generalizes to longer sequences"].evidence
    # The per-step failure is judged against layer norm, not the plain LSTM.
    assert judged["per-step statistics fail past the training length"].verdict == "held"


def test_the_shared_arm_alone_untrained_gates_nothing() -> None:
    # BN shared is the per-step networks with other statistics: its gate is theirs.
    judged = claims(with_arm("train", SHARED, [0.1, 0.1, 0.1]))
    assert all(c.tested for c in judged.values())


def test_the_trained_floor_is_a_margin_of_judge() -> None:
    n = with_arm("train", NONE, [0.55, 0.56, 0.54])
    assert verdict(n, "layer norm works") == "held"
    assert verdict(n, "layer norm works", trained_floor=0.6) == "not tested"


def test_margin_from_the_seed_spread_decides_near_ties() -> None:
    # BN per step 0.004 below the plain LSTM with seeds that disagree: within 2 standard errors.
    noisy = with_arm("test", PER_STEP, [0.976, 0.960, 0.962])  # differences +0.006 -0.012 -0.006
    assert verdict(noisy, "BN per step trains as well") == "held"
    # A tighter margin (fewer standard errors) turns the same numbers into a failure.
    assert verdict(noisy, "BN per step trains as well", spread_factor=0.1) == "did not hold"
    # Seeds that agree exactly: only the floor min_tolerance is left.
    exact = with_arm("test", PER_STEP, [0.966, 0.968, 0.964])  # -0.004 each
    assert verdict(exact, "BN per step trains as well") == "did not hold"
    assert verdict(exact, "BN per step trains as well", min_tolerance=0.005) == "held"


def test_margin_of_a_claim_that_needs_a_gain() -> None:
    # Faster by 0.004 on every seed: beyond the floor 0.0005, not beyond a floor of 0.01.
    n = with_arm("curve", PER_STEP, [0.904, 0.914, 0.894])
    assert verdict(n, "BN per step converges faster") == "held"
    assert verdict(n, "BN per step converges faster", min_tolerance=0.01) == "did not hold"
    # Shared worse by 0.002 with noisy seeds: not beyond 2 standard errors.
    shared = with_arm("test", SHARED, [0.966, 0.988, 0.970])
    assert verdict(shared, "shared statistics are worse") == "did not hold"


# ---------------------------------------------------------------------------------------------
# The model's batch-norm bookkeeping


def test_grouped_lstm_groups_are_independent_and_seeded() -> None:
    x, y = torch.rand(2, 8, 5, 4), torch.randint(0, 3, (2, 8))
    pair = GroupedLSTM([3, 4], 4, 6, 3, "bn")
    alone = GroupedLSTM([4], 4, 6, 3, "bn")
    torch.testing.assert_close(pair(x)[1], alone(x[1:])[0])
    # The same seed starts every norm from the same weights.
    torch.testing.assert_close(GroupedLSTM([4], 4, 6, 3, "ln").w_h, alone.w_h)
    # Each group's gradient is its own (the loss sums the groups' mean losses).
    pair.loss(pair(x), y).backward()
    alone.loss(alone(x[1:]), y[1:]).backward()
    torch.testing.assert_close(pair.w_h.grad[1], alone.w_h.grad[0])


def test_population_statistics_of_the_training_batch_reproduce_training_mode() -> None:
    torch.manual_seed(0)
    model = GroupedLSTM([0, 1], 4, 6, 3, "bn", gain_init=0.5)
    x = torch.randn(2, 16, 5, 4)
    recorder = StepRecorder()
    with torch.no_grad():
        train_mode = model(x, recorder=recorder)
        # Statistics of this one batch, biased (m / (m - 1) undone): inference = training mode.
        stats = recorder.per_step(16)
        stats.var = {k: v * 15 / 16 for k, v in stats.var.items()}
        torch.testing.assert_close(model(x, stats), train_mode, atol=1e-5, rtol=1e-4)


def test_statistics_past_the_last_step_reuse_it_and_shared_ones_pool_the_steps() -> None:
    recorder = StepRecorder()
    for step, shift in enumerate((0.0, 2.0)):
        values = torch.tensor([[[shift - 1.0], [shift + 1.0]]])  # (G=1, B=2, K=1)
        for term in ("x", "h", "c"):
            recorder.add(term, step, values)
    per_step = recorder.per_step(2)
    mean, var = per_step.at("h", 4)
    assert mean.flatten().tolist() == [0.0, 2.0, 2.0, 2.0]  # steps 3 and 4 reuse step 2
    assert var.flatten().tolist() == [2.0, 2.0, 2.0, 2.0]  # biased 1 times m / (m - 1) = 2
    shared = recorder.shared(2)
    mean, var = shared.at("h", 3)
    assert mean.flatten().tolist() == [1.0, 1.0, 1.0]
    # Within-step variance 2 plus the variance of the step means (0 and 2 around 1) 1.
    assert var.flatten().tolist() == [3.0, 3.0, 3.0]


def test_steps_count_the_batches_that_reached_them() -> None:
    recorder = StepRecorder()
    for length in (1, 2):  # one batch of one step, one of two
        for step in range(length):
            recorder.add("x", step, torch.full((1, 2, 1), float(step + length)))
    for term in ("h", "c"):
        recorder.add(term, 0, torch.zeros(1, 2, 1))
    # step 1: values 1 and 2 (mean 1.5); step 2: one batch, value 3
    assert recorder.per_step(2).mean["x"].flatten().tolist() == [1.5, 3.0]


def test_per_network_clipping_scales_each_network_alone() -> None:
    model = GroupedLSTM([0, 1], 4, 6, 3, "none")
    x, y = torch.rand(2, 8, 5, 4), torch.randint(0, 3, (2, 8))
    model.loss(model(x), y).backward()
    before = [p.grad.clone() for p in model.parameters()]
    norms = model.clip_grad_norm_(1e-3)
    after = torch.stack(
        [torch.cat([p.grad[g].flatten() for p in model.parameters()]).norm() for g in (0, 1)]
    )
    torch.testing.assert_close(after, torch.full((2,), 1e-3), rtol=1e-4, atol=0)
    # The direction of each network's gradient is kept.
    for b, p in zip(before, model.parameters()):
        torch.testing.assert_close(p.grad[0] * norms[0] / 1e-3, b[0], rtol=1e-3, atol=1e-6)


def test_initial_noise_gives_the_first_recurrent_term_a_variance() -> None:
    model = GroupedLSTM([0], 4, 6, 3, "bn")
    x = torch.zeros(1, 16, 3, 4)  # blank rows: every example alike
    quiet, noisy = StepRecorder(), StepRecorder()
    with torch.no_grad():
        model(x, recorder=quiet)
        model(x, recorder=noisy, h0_noise=0.1, generator=torch.Generator().manual_seed(0))
    assert quiet.per_step(16).var["h"][0].max() == 0
    assert noisy.per_step(16).var["h"][0].min() > 1e-4


def test_unknown_norm_is_refused() -> None:
    with pytest.raises(ValueError, match="norm must be one of"):
        GroupedLSTM([0], 4, 6, 3, "gn")


# ---------------------------------------------------------------------------------------------
# A quick run


def test_quick_run_is_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHNORM_PROGRESS", "0")
    experiment = experiments.get("rnn")
    config = make_config(
        experiment,
        quick=True,
        overrides=["dataset=digits", "steps=60", "eval_every=30", "threads=1", "hidden=8"],
    )
    result = run_experiment(experiment, config, quick=True, out=tmp_path)
    metrics = check_run_dir(result.run_dir, "rnn")
    assert (result.run_dir / "rnn.png").is_file() and (result.run_dir / "rnn_stats.png").is_file()
    m = metrics["metrics"]
    assert m["eval_steps"] == [0, 30, 60] and m["train_steps"] == 8 and m["long_steps"] == 16
    assert m["baseline"].startswith("plain LSTM")
    assert np.isclose(m["baseline_train_accuracy"], np.mean(m["final_train_acc"][NONE]))
    assert len(m["population_std"]["h"]) == 12  # one row per step up to T_max = 8 + 4
