"""Training jobs: data order, Algorithm 2 evaluation, divergence, checkpoints and resuming."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from batchnorm.inference import recalibrate
from batchnorm.lab import samplers
from batchnorm.lab.data import load_dataset
from batchnorm.lab.train import TrainSettings, batch_indices, eval_schedule, train
from batchnorm.lab.wide import NetSpec, WideMLP


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread avoids waiting on busy cores of a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic").subset(500, 150)


def settings(**kw) -> TrainSettings:
    base = dict(
        steps=30,
        batch_size=20,
        eval_steps=eval_schedule(30, 10),
        popstat_batches=4,
        final_popstat_batches=10,
        checkpoint_seconds=0.0,
    )
    return TrainSettings(**(base | kw))


def test_eval_schedule() -> None:
    assert eval_schedule(50, 20) == (0, 20, 40, 50)
    assert eval_schedule(10, 5, extra=(3, 99)) == (0, 3, 5, 10)
    with pytest.raises(ValueError, match="interval must be >= 1"):
        eval_schedule(10, 0)


def test_batch_indices_visit_every_example_once_per_epoch() -> None:
    per_epoch = 103 // 10  # the last partial batch is dropped
    epoch0 = np.concatenate([batch_indices(4, t, 103, 10) for t in range(per_epoch)])
    assert len(set(epoch0.tolist())) == per_epoch * 10
    epoch1 = np.concatenate([batch_indices(4, t, 103, 10) for t in range(per_epoch, 2 * per_epoch)])
    assert not np.array_equal(epoch0, epoch1)  # reshuffled
    assert np.array_equal(batch_indices(4, 7, 103, 10), batch_indices(4, 7, 103, 10))
    assert not np.array_equal(batch_indices(4, 0, 103, 10), batch_indices(5, 0, 103, 10))
    with pytest.raises(ValueError, match="smaller than one batch"):
        batch_indices(0, 0, 5, 10)


def test_final_evaluation_uses_population_statistics(data) -> None:
    specs = [NetSpec("bn", 0, batch_norm=True, lr=0.3), NetSpec("bn", 1, batch_norm=True)]
    model = WideMLP(specs, 64, (16,), 10)
    result = train(model, data, settings())
    # Training left the moving averages in place (evaluation restores them) ...
    x_test = torch.from_numpy(data.test_x)
    y_test = torch.from_numpy(data.test_y)
    with torch.no_grad():
        moving = (model.eval()(x_test).argmax(-1) == y_test).double().mean(1).numpy()
    np.testing.assert_allclose(result.final_test_acc_moving_average, moving)
    # ... and the reported accuracy is that of Algorithm 2 over the final batches.
    frozen = copy.deepcopy(model).train()
    x_train = torch.from_numpy(data.train_x)
    batches = [
        x_train[torch.from_numpy(i)]
        for i in samplers.popstat_batches(30, 10, len(data.train_y), 20)
    ]
    recalibrate(frozen, batches, progress=False)
    with torch.no_grad():
        population = (frozen.eval()(x_test).argmax(-1) == y_test).double().mean(1).numpy()
    np.testing.assert_allclose(result.test_acc[-1], population)
    assert result.steps.tolist() == [0, 10, 20, 30]
    assert np.isnan(result.train_loss[0]).all() and np.isfinite(result.train_loss[1:]).all()


def test_a_diverging_network_is_isolated(data) -> None:
    healthy = NetSpec("healthy", 0, batch_norm=True, lr=0.2)
    doomed = NetSpec("doomed", 0, activation="relu", lr=1e30)
    both = train(WideMLP([healthy, doomed], 64, (16,), 10), data, settings())
    alone = train(WideMLP([healthy], 64, (16,), 10), data, settings())
    g, d = both.specs.index(healthy), both.specs.index(doomed)
    assert both.diverged_at[g] == -1 and both.diverged_at[d] >= 0
    np.testing.assert_allclose(both.test_loss[:, g], alone.test_loss[:, 0], rtol=1e-5, atol=1e-6)
    assert np.isfinite(both.test_loss[-1, d])  # zeroed: it predicts a constant, not NaN


def test_momentum_changes_the_updates(data) -> None:
    spec = [NetSpec("x", 0, lr=0.05)]
    plain = train(WideMLP(spec, 64, (16,), 10), data, settings())
    heavy = train(WideMLP(spec, 64, (16,), 10), data, settings(momentum=0.9))
    assert not np.allclose(plain.train_loss[1:], heavy.train_loss[1:])


class Interrupt(Exception):
    pass


def test_resume_from_checkpoint_gives_the_uninterrupted_result(data, tmp_path: Path) -> None:
    specs = [
        NetSpec("bn", 0, batch_norm=True, dropout=0.3),
        NetSpec("plain", 1, lr=0.2),
        NetSpec("mom", 2, batch_norm=True, activation="tanh"),
    ]
    s = settings(
        steps=40,
        eval_steps=eval_schedule(40, 10),
        momentum=0.5,
        percentiles=True,
        saturation=True,
        train_eval_examples=100,
    )
    torch.manual_seed(123)
    reference = train(WideMLP(specs, 64, (16, 8), 10), data, s)

    checkpoint = tmp_path / "job.ckpt"

    def stop_at_20(step: int, acc: np.ndarray) -> None:
        if step == 20:
            raise Interrupt

    torch.manual_seed(123)
    with pytest.raises(Interrupt):
        train(WideMLP(specs, 64, (16, 8), 10), data, s, checkpoint=checkpoint, on_eval=stop_at_20)
    assert checkpoint.is_file()  # written at step 10 (the step-20 one was not reached)
    torch.manual_seed(999)  # the checkpoint restores the random state (dropout masks)
    resumed = train(WideMLP(specs, 64, (16, 8), 10), data, s, checkpoint=checkpoint)
    for name in (
        "steps",
        "test_acc",
        "test_loss",
        "train_loss",
        "train_acc",
        "percentiles",
        "saturation",
        "diverged_at",
        "final_test_acc_moving_average",
    ):
        np.testing.assert_array_equal(
            getattr(resumed, name), getattr(reference, name), err_msg=name
        )


def test_checkpoint_of_other_networks_is_refused(data, tmp_path: Path) -> None:
    checkpoint = tmp_path / "job.ckpt"
    train(
        WideMLP([NetSpec("a", 0)], 64, (8,), 10),
        data,
        settings(steps=10, eval_steps=(0, 10)),
        checkpoint=checkpoint,
    )
    with pytest.raises(ValueError, match="written for other networks"):
        train(WideMLP([NetSpec("b", 0)], 64, (8,), 10), data, settings(), checkpoint=checkpoint)
