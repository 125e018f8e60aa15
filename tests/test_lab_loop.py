"""The lab's one training loop (batchnorm.lab.loop): its counting, checkpoints and refusals, and,
for every kind of job the lab trains through it, that a run interrupted after a checkpoint and
resumed ends with exactly the results and weights of an uninterrupted run."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from batchnorm.lab import loop
from batchnorm.lab.data import load_dataset
from batchnorm.lab.experiments.cnn import ImageData, VGGStyle
from batchnorm.lab.io import CorruptFileError
from batchnorm.lab.loop import CheckpointMismatch, run_loop


class Counter:
    """A toy task: a number that each step adds to, and a log of what ran."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.value = 0.0
        self.log: list[str] = []
        self.stop_at = stop_at

    def train_step(self, step: int) -> bool:
        if step == self.stop_at:
            self.log.append(f"stop {step}")
            return False
        self.value += torch.rand(()).item() + step
        self.log.append(f"train {step}")
        return True

    def evaluate(self, step: int) -> str:
        self.log.append(f"eval {step}")
        return f"value {self.value:.2f}"

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "log": list(self.log)}

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        self.value, self.log = state["value"], list(state["log"])


def test_steps_and_evaluations_interleave_as_documented() -> None:
    task = Counter()
    result = run_loop(task, steps=3, eval_steps=[3, 0, 2, 7, -1])
    assert task.log == ["eval 0", "train 0", "train 1", "eval 2", "train 2", "eval 3"]
    assert (result.steps, result.stopped, result.resumed_from) == (3, False, 0)


def test_a_task_that_stops_ends_the_loop_without_counting_that_step() -> None:
    task = Counter(stop_at=1)
    result = run_loop(task, steps=5, eval_steps=[0, 1, 5])
    assert task.log == ["eval 0", "train 0", "eval 1", "stop 1"]
    assert (result.steps, result.stopped) == (1, True)


class Interrupt(Exception):
    pass


def interrupt_after_checkpoints(monkeypatch, count: int) -> dict[str, int]:
    """Make every step checkpoint, and raise :class:`Interrupt` (a stand-in for Ctrl-C) right
    after the ``count``-th checkpoint is written."""
    write = loop._write_checkpoint
    calls = {"n": 0}

    def write_then_stop(path: Path, state: dict[str, Any]) -> None:
        write(path, state)
        calls["n"] += 1
        if calls["n"] == count:
            raise Interrupt

    monkeypatch.setattr(loop, "CHECKPOINT_SECONDS", 0.0)
    monkeypatch.setattr(loop, "_write_checkpoint", write_then_stop)
    return calls


def test_resumed_toy_task_equals_an_uninterrupted_one(tmp_path, monkeypatch) -> None:
    torch.manual_seed(0)
    whole = Counter()
    run_loop(whole, steps=6, eval_steps=[0, 3, 6])
    torch.manual_seed(0)
    checkpoint = tmp_path / "toy.ckpt"
    interrupt_after_checkpoints(monkeypatch, 4)
    with pytest.raises(Interrupt):
        run_loop(Counter(), steps=6, eval_steps=[0, 3, 6], checkpoint=checkpoint)
    torch.manual_seed(123)  # the checkpoint's random state wins
    resumed = Counter()
    result = run_loop(resumed, steps=6, eval_steps=[0, 3, 6], checkpoint=checkpoint)
    assert result.resumed_from == 3
    assert resumed.log == whole.log and resumed.value == whole.value


def test_foreign_or_damaged_checkpoints_are_refused(tmp_path) -> None:
    checkpoint = tmp_path / "job.ckpt"
    run_loop(Counter(), steps=2, checkpoint=checkpoint, signature=["a", 1])
    with pytest.raises(CheckpointMismatch, match="written for other networks"):
        run_loop(Counter(), steps=2, checkpoint=checkpoint, signature=["b", 1])
    blob = bytearray(checkpoint.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    checkpoint.write_bytes(bytes(blob))
    with pytest.raises(CorruptFileError, match="checksum"):
        run_loop(Counter(), steps=2, checkpoint=checkpoint, signature=["a", 1])
    checkpoint.write_bytes(b"")
    with pytest.raises(CorruptFileError, match="empty"):
        run_loop(Counter(), steps=2, checkpoint=checkpoint, signature=["a", 1])


def test_negative_steps_are_refused() -> None:
    with pytest.raises(ValueError, match="steps must be >= 0"):
        run_loop(Counter(), steps=-1)


# Every kind of job the lab trains: interrupted, resumed, equal ------------------------------


def digits_images(n_train: int = 96, n_test: int = 48) -> ImageData:
    data = load_dataset("digits")
    x = torch.as_tensor(np.asarray(data.train_x[:n_train], dtype=np.float32))
    t = torch.as_tensor(np.asarray(data.test_x[:n_test], dtype=np.float32))
    return ImageData(
        name="digits",
        train_x=x.reshape(-1, 1, 8, 8),
        train_y=torch.as_tensor(data.train_y[:n_train], dtype=torch.int64),
        test_x=t.reshape(-1, 1, 8, 8),
        test_y=torch.as_tensor(data.test_y[:n_test], dtype=torch.int64),
        image_shape=(8, 8),
        num_classes=data.num_classes,
        description="digits",
    )


def same(a: Any, b: Any, path: str = "result") -> None:
    """Exactly equal, NaN equal to NaN; time measurements ignored."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            if "seconds" not in str(key):
                same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, path


def record_builds(monkeypatch, owner, name: str) -> list[torch.nn.Module]:
    """Patches ``owner.name`` (a model builder) to keep the model of its latest call in the
    returned list, for :func:`check_resume` to compare weights."""
    models: list[torch.nn.Module] = []
    build = getattr(owner, name)

    def record(*args, **kwargs):
        models[:] = [build(*args, **kwargs)]
        return models[0]

    monkeypatch.setattr(owner, name, record)
    return models


def check_resume(monkeypatch, tmp_path, train, models, interrupt_at: int) -> None:
    """``train(checkpoint)`` uninterrupted, then interrupted after ``interrupt_at`` checkpoints
    and run again: equal results, and equal weights in ``models()`` (the modules the last
    ``train`` call trained)."""
    expected = copy.deepcopy(train(None))
    weights = [copy.deepcopy(m.state_dict()) for m in models()]
    checkpoint = tmp_path / "job.ckpt"
    calls = interrupt_after_checkpoints(monkeypatch, interrupt_at)
    with pytest.raises(Interrupt):
        train(checkpoint)
    assert checkpoint.is_file()
    calls["n"] = -(10**9)  # no more interruptions
    resumed = train(checkpoint)
    same(resumed, expected)
    for model, state in zip(models(), weights):
        for key, value in state.items():
            assert torch.equal(model.state_dict()[key], value), key


def test_noisy_bn_network_resumes_exactly(monkeypatch, tmp_path) -> None:
    from batchnorm.lab.experiments import noisy_bn

    config = replace(
        noisy_bn.Config(),
        channels=(4, 8),
        batch_size=16,
        steps=12,
        eval_every=5,
        stability_every=4,
        popstat_batches=2,
        eval_examples=48,
    )
    data = digits_images()
    built = record_builds(monkeypatch, VGGStyle, "for_config")

    def train(checkpoint):
        return noisy_bn._train(config, data, noisy_bn.NOISY, 0.1, 5, "test", checkpoint)

    check_resume(monkeypatch, tmp_path, train, lambda: built, interrupt_at=7)


def test_probed_network_resumes_exactly(monkeypatch, tmp_path) -> None:
    from batchnorm.lab.experiments.cnn import CNNConfig, train_with_probes

    config = replace(CNNConfig(), channels=(4, 8), batch_size=16, steps=9)
    data = digits_images()
    models: list[torch.nn.Module] = []

    def probe(loss_fn, step: int) -> dict[str, Any]:
        return {"loss": float(loss_fn().detach()), "step": step}

    def train(checkpoint):
        models[:] = [VGGStyle.for_config(config, data, "BN", 2)]
        return train_with_probes(
            models[0], data, config, seed=2, probe_every=4, probe=probe, desc="t",
            checkpoint=checkpoint,
        )  # fmt: skip

    check_resume(monkeypatch, tmp_path, train, lambda: models, interrupt_at=5)


def test_precise_bn_arm_resumes_exactly(monkeypatch, tmp_path) -> None:
    from batchnorm.lab.experiments import precise_bn

    config = replace(
        precise_bn.Config(), channels=(4, 8), batch_size=16, epochs=2.0, evals=3,
        popstat_batches=2,
    )  # fmt: skip
    data = digits_images()
    models = record_builds(monkeypatch, precise_bn, "config_net")

    def train(checkpoint):
        return precise_bn._train_arm(config, data, 4, 0.1, "cosine", "t", checkpoint)

    check_resume(monkeypatch, tmp_path, train, lambda: models, interrupt_at=6)


def test_explosion_cell_resumes_exactly(monkeypatch, tmp_path) -> None:
    from batchnorm.lab.experiments import explosion

    config = replace(explosion.Config(), width=16, test_subset=48)
    steps = config.steps_for(8)
    monkeypatch.setattr(explosion.Config, "steps_for", lambda self, batch: min(steps, 14))
    data = load_dataset("digits").subset(100, 48, seed=0)
    models = record_builds(monkeypatch, explosion, "DeepBNNet")

    def train(checkpoint):
        return explosion._train_cell(data, config, 4, 8, 1, checkpoint)

    check_resume(monkeypatch, tmp_path, train, lambda: models, interrupt_at=9)


def test_recurrent_arm_resumes_exactly(monkeypatch, tmp_path) -> None:
    from batchnorm.lab.experiments import rnn

    config = replace(
        rnn.Config().quick(), dataset="digits", hidden=6, steps=8, eval_every=3, eval_examples=20,
        popstat_batches=2, final_popstat_batches=2, train_eval_examples=20, batch_size=8,
    )  # fmt: skip
    images = digits_images()
    data = rnn._Sequences(
        images.train_x[:, 0], images.train_y, images.test_x[:, 0], images.test_y, 10
    )
    models = record_builds(monkeypatch, rnn, "GroupedLSTM")

    def train(checkpoint):
        return rnn._train_arm("bn", data, config, checkpoint)

    check_resume(monkeypatch, tmp_path, train, lambda: models, interrupt_at=5)


def test_deep_linear_network_resumes_exactly(monkeypatch, tmp_path) -> None:
    """ics's deep linear network (full-batch GD with covariate-shift probes) through the loop:
    interrupted after a checkpoint and resumed, the losses, probes and weights of an
    uninterrupted run."""
    from batchnorm.lab.theory import deep_linear

    problem = deep_linear.make_problem(6, 40, seed=3)
    models = record_builds(monkeypatch, deep_linear, "build_deep_linear")

    def train(checkpoint):
        run = deep_linear.train_deep_linear(
            problem, depth=4, batch_norm=True, lr=1e-3, steps=12, seed=3, shift_every=4,
            checkpoint=checkpoint,
        )  # fmt: skip
        return {"losses": run.losses.tolist(), "steps": run.shift_steps, "shifts": run.shifts}

    check_resume(monkeypatch, tmp_path, train, lambda: models, interrupt_at=6)
