"""The lab's one training loop: steps, evaluation schedule, checkpoints, resumption, progress.

Every network the lab trains (wide MLPs, CNNs alone or grouped, recurrent networks, the deep
networks of ``explosion``) goes through :func:`run_loop`. What differs between experiments (the
model, its sampler, its optimizer, what a step and an evaluation measure) lives in a
:class:`Task`; what is the same for all of them lives here, once:

- **Counting.** ``step`` is always the number of updates done so far. ``task.evaluate(step)``
  runs after ``step`` updates (``0`` = before training), at the steps listed in ``eval_steps``;
  ``task.train_step(step)`` does update number ``step + 1``. A task that returns ``False`` from
  ``train_step`` stops the loop at once (for example every network diverged): that update does
  not count, and no evaluation follows.
- **Checkpoints.** Between two updates (after that step's evaluation, if any), if
  ``checkpoint`` is given and at least ``checkpoint_seconds`` passed since the last checkpoint,
  and after the last update, the loop writes the whole state (the task's
  :meth:`Task.state_dict`, the step, the time spent, torch's global random state) atomically
  with its SHA-256 (:func:`batchnorm.lab.io.atomic_write_checked`).
- **Resumption.** If ``checkpoint`` exists, the loop refuses it when it fails its checksum
  (:class:`~batchnorm.lab.io.CorruptFileError`) or was written for another task (a
  :class:`CheckpointMismatch` naming the file; ``signature`` is what must match), and otherwise
  continues from it: ``task.load_state_dict(state, step)`` restores the task (a task whose
  sampler is an iterator draws and drops the batches already trained on), the evaluations up to
  that step are not repeated (a checkpoint is written after its step's evaluation), and torch's
  random state is put back, so a resumed run ends with the numbers of an uninterrupted one.
- **Progress and time.** One progress bar (``desc``) shows the updates and the task's latest
  evaluation summary; :class:`LoopResult` says how long training and evaluation took, summed
  over every attempt of a resumed run.
"""

from __future__ import annotations

import io
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from batchnorm.lab.io import CorruptFileError, atomic_write_checked, read_checked
from batchnorm.lab.progress import bar

__all__ = [
    "Task",
    "LoopResult",
    "CheckpointMismatch",
    "run_loop",
    "read_checkpoint",
    "eval_schedule",
    "eval_steps",
    "ModelTask",
    "StepDecay",
]

_FORMAT = "batchnorm-lab-loop/1"

#: The least time between two checkpoints of a job that does not set its own.
CHECKPOINT_SECONDS = 30.0


def eval_schedule(steps: int, every: int, extra: Iterable[int] = ()) -> tuple[int, ...]:
    """Evaluate before training and every ``every`` steps: 0, every, 2*every, ..., and
    ``steps`` itself, plus any ``extra`` steps, sorted.

    >>> eval_schedule(1000, 400, extra=(100,))
    (0, 100, 400, 800, 1000)
    """
    if every < 1:
        raise ValueError(f"the evaluation interval must be >= 1 step, got {every}")
    points = set(range(0, steps + 1, every)) | {steps} | {s for s in extra if 0 <= s <= steps}
    return tuple(sorted(points))


def eval_steps(steps: int, evals: int) -> list[int]:
    """Evaluate ``evals`` times, evenly spaced in 1..steps, the last at ``steps``.

    >>> eval_steps(100, 4)
    [25, 50, 75, 100]
    """
    return sorted({max(1, int(round(steps * (i + 1) / evals))) for i in range(evals)})


@dataclass(frozen=True)
class StepDecay:
    """A learning rate that drops once: ``lr`` for the updates before ``at`` (0-based, as the
    loop counts them), ``lr * factor`` from ``at`` on. The optimizer (its momentum buffer
    included) goes on across the drop.

    >>> rate = StepDecay.of(0.1, steps=100, decay_at=0.75, factor=0.1)
    >>> rate.at, rate(74), round(rate(75), 6)
    (75, 0.1, 0.01)
    >>> StepDecay.of(0.1, steps=100, decay_at=1.0, factor=0.1)(99)  # no drop
    0.1
    """

    lr: float
    at: int
    factor: float

    @classmethod
    def of(cls, lr: float, *, steps: int, decay_at: float, factor: float) -> StepDecay:
        """The drop after the first ``decay_at`` fraction of ``steps`` (none when that leaves
        no step on either side)."""
        at = int(round(steps * decay_at))
        return cls(lr, at if decay_at < 1 and 1 <= at < steps else steps, factor)

    def __call__(self, step: int) -> float:
        return self.lr * self.factor if step >= self.at else self.lr

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Set the rate of update ``step`` in every parameter group of ``optimizer``."""
        rate = self(step)
        for group in optimizer.param_groups:
            group["lr"] = rate


class Task(Protocol):
    """What one training job does; :func:`run_loop` drives it."""

    def train_step(self, step: int) -> bool:
        """Do update number ``step + 1``; return False to stop training now (the update did
        not happen)."""
        ...

    def evaluate(self, step: int) -> str | None:
        """Measure after ``step`` updates; return a short summary for the progress bar (or
        None)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (weights, optimizer, results so far, ...);
        loadable with ``torch.load(weights_only=True)``."""
        ...

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        """Restore :meth:`state_dict`'s ``state``, saved after ``step`` updates."""
        ...


class ModelTask:
    """A base for tasks whose state is a model, its optimizer, random generators and a few
    attributes: :meth:`state_dict` and :meth:`load_state_dict` written once.

    A subclass sets ``model`` and ``optimizer`` (None for a hand-written update), lists in
    ``saved`` the names of its attributes that change as it trains (results so far, running
    sums), returns its own random generators from :meth:`generators` (a noise generator, a
    dropout generator), and puts iterator samplers in ``samplers``: on loading, each draws and
    drops the batches already trained on, so it goes on where it was.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None = None
    saved: tuple[str, ...] = ()
    samplers: Sequence[Iterator[Any]] = ()

    def generators(self) -> list[torch.Generator]:
        """The task's own random generators (torch's global one is the loop's)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "generators": [g.get_state() for g in self.generators()],
            **{name: getattr(self, name) for name in self.saved},
        }

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        self.model.load_state_dict(state["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        for generator, saved in zip(self.generators(), state["generators"], strict=True):
            generator.set_state(saved)
        for name in self.saved:
            setattr(self, name, state[name])
        for sampler in self.samplers:  # the batches already trained on, drawn and dropped
            for _ in range(step):
                next(sampler)


class CheckpointMismatch(CorruptFileError):
    """A checkpoint belongs to another job (other networks, another protocol): refused like a
    damaged file, whose message tells how to train the job again (``--restart-job``)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "was written for other networks or another protocol")


@dataclass(frozen=True)
class LoopResult:
    """How a :func:`run_loop` call went.

    Attributes:
        steps: updates done (``steps`` asked for, unless the task stopped early).
        stopped: the task stopped training before the last step.
        resumed_from: the step of the checkpoint the loop continued from (0 = a fresh start).
        train_seconds, eval_seconds: time in ``train_step`` and ``evaluate``, over every attempt.
    """

    steps: int
    stopped: bool
    resumed_from: int
    train_seconds: float
    eval_seconds: float


def read_checkpoint(path: Path, signature: Any) -> dict[str, Any]:
    """The state :func:`run_loop` saved in ``path``.

    Raises:
        CorruptFileError: ``path`` is empty, truncated or fails its checksum.
        CheckpointMismatch: it was written by another kind of job or for another ``signature``.
    """
    state = torch.load(io.BytesIO(read_checked(path)), weights_only=True)
    if (
        not isinstance(state, dict)
        or state.get("format") != _FORMAT
        or state.get("signature") != signature
    ):
        raise CheckpointMismatch(path)
    return state


def _write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_checked(path, buffer.getvalue())


def run_loop(
    task: Task,
    *,
    steps: int,
    eval_steps: Iterable[int] = (),
    desc: str = "train",
    checkpoint: Path | None = None,
    checkpoint_seconds: float | None = None,
    signature: Any = None,
    leave: bool = False,
) -> LoopResult:
    """Train ``task`` for ``steps`` updates, evaluating at ``eval_steps`` (see the module doc).

    Args:
        task: the job.
        steps: updates to do (>= 0).
        eval_steps: steps (0..steps) after which ``task.evaluate`` runs; others are ignored.
        desc: the progress bar's label.
        checkpoint: a file to continue from if it exists, and to write checkpoints to.
        checkpoint_seconds: the least time between two checkpoints (the end of training always
            writes one); None = :data:`CHECKPOINT_SECONDS`.
        signature: what identifies the job (plain lists, dicts, strings and numbers): a
            checkpoint written with another signature is refused.
        leave: keep the progress bar on screen when done.

    Returns:
        A :class:`LoopResult`.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if checkpoint_seconds is None:
        checkpoint_seconds = CHECKPOINT_SECONDS
    schedule = sorted({int(t) for t in eval_steps if 0 <= int(t) <= steps})
    step, seconds = 0, {"train": 0.0, "eval": 0.0}
    resumed = checkpoint is not None and checkpoint.is_file()
    if resumed:
        assert checkpoint is not None
        state = read_checkpoint(checkpoint, signature)
        step, seconds = int(state["step"]), dict(state["seconds"])
        task.load_state_dict(state["task"], step)
        torch.set_rng_state(state["rng"])
    start = step
    # A checkpoint is written after the evaluation at its step, if any: that one is done.
    pending = deque(t for t in schedule if t > step or (t == step and not resumed))
    last_checkpoint = time.monotonic()
    stopped = False
    with bar(total=steps, initial=start, desc=desc, unit="step", leave=leave) as progress:
        while True:
            if pending and pending[0] == step:
                pending.popleft()
                t0 = time.perf_counter()
                summary = task.evaluate(step)
                seconds["eval"] += time.perf_counter() - t0
                if summary:
                    progress.set_postfix_str(summary, refresh=False)
            if checkpoint is not None and (
                step == steps or time.monotonic() - last_checkpoint >= checkpoint_seconds
            ):
                _write_checkpoint(
                    checkpoint,
                    {
                        "format": _FORMAT,
                        "signature": signature,
                        "step": step,
                        "seconds": seconds,
                        "rng": torch.get_rng_state(),
                        "task": task.state_dict(),
                    },
                )
                last_checkpoint = time.monotonic()
            if step >= steps:
                break
            t0 = time.perf_counter()
            done = task.train_step(step)
            seconds["train"] += time.perf_counter() - t0
            if not done:
                stopped = True
                break
            step += 1
            progress.update(1)
    return LoopResult(
        steps=step,
        stopped=stopped,
        resumed_from=start,
        train_seconds=seconds["train"],
        eval_seconds=seconds["eval"],
    )
