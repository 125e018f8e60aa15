"""What the limits-and-alternatives experiments share: a small CNN with a pluggable
normalization layer, its training loop, batch samplers and resumable jobs (SPEC.md 4.5).

The network (for images ``H x W``, one input channel)::

    [conv3x3(c_k) -> norm -> ReLU -> maxpool2] for each width c_k in ``channels``
    -> global average pool -> linear(num_classes)

``norm`` is a name of :func:`batchnorm.nn.create_norm` (``bn``, ``gn``, ``in``, ``renorm``,
``ghost``), ``ln`` (layer norm over (C, H, W) with a per-channel affine, built as ``gn`` with one
group, as the registry documents) or ``none`` (no normalization; the convolutions keep their
bias). A normalized convolution drops its bias (beta takes its role).

Training: SGD with momentum on the mean cross-entropy, a fixed number of steps; each step draws
its mini-batch from a sampler (:func:`iid_batches` reshuffles each epoch; :func:`few_class_batches`
builds every batch from a few classes). A job trains one network and is saved as
``jobs/<key>.json`` when done, so ``--resume`` skips finished networks (a job interrupted midway
restarts from its beginning). A network whose loss becomes non-finite is stopped and counted as
diverged (its accuracy is then chance, ``1 / num_classes``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from batchnorm.lab.config import param
from batchnorm.lab.data import DATASETS
from batchnorm.lab.experiment import Context
from batchnorm.lab.io import atomic_write_json
from batchnorm.lab.progress import bar, log

__all__ = [
    "ConvConfig",
    "NORMS",
    "conv_net",
    "images",
    "iid_batches",
    "few_class_batches",
    "evaluate",
    "train_net",
    "cached_job",
    "job_curve_rows",
    "CURVE_FIELDS",
]

NORMS: tuple[str, ...] = ("bn", "gn", "ln", "in", "renorm", "ghost", "none")
CURVE_FIELDS = ("step", "variant", "seed", "test_acc", "test_loss", "train_loss")


@dataclass(frozen=True)
class ConvConfig:
    """Fields every CNN experiment has. Defaults: Fashion-MNIST, a 10,000-image subset."""

    dataset: str = param("fashion-mnist", "data set", choices=DATASETS)
    channels: tuple[int, ...] = param((8, 16), "widths of the conv layers (each: conv3x3, norm)")
    batch_size: int = param(32, "examples per mini-batch")
    epochs: float = param(2.0, "passes over the training subset")
    lr: float = param(0.05, "SGD learning rate at batch 32 (scaled linearly with the batch)")
    momentum: float = param(0.9, "SGD momentum")
    evals: int = param(4, "evaluations on the test set, evenly spaced over training")
    train_subset: int | None = param(10_000, "training examples used (none = all)")
    test_subset: int | None = param(None, "test examples used (none = all)")
    seeds: int = param(2, "number of seeds (each: initial weights and data order)")
    seed: int = param(0, "the first seed; the seeds are seed, seed+1, ...")
    threads: int = param(0, "torch CPU threads (0 = as many as there are idle cores)")

    def validate(self) -> None:
        """Checks across fields; raises ValueError with what to change."""
        for name in ("batch_size", "seeds", "evals"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be at least 2 (batch statistics need two values)")
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"channels must list positive widths, got {self.channels}")
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ValueError(f"epochs must be a positive number, got {self.epochs}")
        for name in ("lr", "momentum"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.momentum >= 1:
            raise ValueError(f"momentum must be below 1, got {self.momentum}")
        if self.train_subset is not None and self.train_subset < 64:
            raise ValueError(f"train_subset must be at least 64, got {self.train_subset}")
        if self.test_subset is not None and self.test_subset < 1:
            raise ValueError(f"test_subset must be positive, got {self.test_subset}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = automatic), got {self.threads}")

    def seed_list(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]

    def steps_for(self, batch_size: int, n_train: int) -> int:
        """Steps for ``epochs`` passes over ``n_train`` examples at ``batch_size`` (at least 1)."""
        return max(1, int(round(self.epochs * n_train / batch_size)))

    def scaled_lr(self, batch_size: int) -> float:
        """The linear scaling rule (Goyal et al. 2017): ``lr * batch_size / 32``."""
        return self.lr * batch_size / 32


def conv_net(
    norm: str,
    channels: Sequence[int],
    num_classes: int,
    seed: int,
    **norm_kwargs: Any,
) -> nn.Sequential:
    """The CNN of the module docstring, its weights drawn from ``torch.manual_seed(seed)``.

    Raises:
        ValueError: an unknown ``norm`` (the message lists :data:`NORMS`).
    """
    from batchnorm.nn import create_norm

    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    c_in = 1
    for c in channels:
        layers.append(nn.Conv2d(c_in, c, 3, padding=1, bias=norm == "none"))
        if norm == "ln":
            layers.append(create_norm("gn", c, num_groups=1))
        elif norm == "in":
            layers.append(create_norm("in", c, affine=True))
        elif norm != "none":
            layers.append(create_norm(norm, c, **norm_kwargs))
        layers += [nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
        c_in = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)


def images(data: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The data set as (N, 1, H, W) float tensors and int64 labels: train x, y, test x, y."""
    h, w = data.image_shape[-2:]

    def as_images(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).reshape(len(x), 1, h, w)

    return (
        as_images(data.train_x),
        torch.from_numpy(data.train_y),
        as_images(data.test_x),
        torch.from_numpy(data.test_y),
    )


def iid_batches(n: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Endless mini-batch indices: a fresh permutation each epoch, the last partial batch
    dropped."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def few_class_batches(
    labels: np.ndarray, batch_size: int, classes_per_batch: int, seed: int
) -> Iterator[np.ndarray]:
    """Endless non-i.i.d. mini-batches: each draws ``classes_per_batch`` classes at random, then
    ``batch_size`` examples from those classes only (equal shares, without replacement within a
    batch)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    if not 1 <= classes_per_batch <= len(classes):
        raise ValueError(
            f"classes_per_batch must lie in 1..{len(classes)} (the classes present), "
            f"got {classes_per_batch}"
        )
    by_class = {int(c): np.nonzero(labels == c)[0] for c in classes}
    while True:
        chosen = rng.choice(classes, size=classes_per_batch, replace=False)
        shares = np.full(classes_per_batch, batch_size // classes_per_batch)
        shares[: batch_size - shares.sum()] += 1
        parts = [
            rng.choice(by_class[int(c)], size=min(int(s), len(by_class[int(c)])), replace=False)
            for c, s in zip(chosen, shares, strict=True)
        ]
        yield rng.permutation(np.concatenate(parts))


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1000
) -> tuple[float, float]:
    """Test accuracy and mean cross-entropy in eval mode (population statistics), in chunks."""
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    for start in range(0, len(y), chunk):
        logits = model(x[start : start + chunk])
        target = y[start : start + chunk]
        loss += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(1) == target).sum())
    model.train(was_training)
    return correct / len(y), loss / len(y)


def eval_steps(steps: int, evals: int) -> list[int]:
    """``evals`` evenly spaced steps in 1..steps, the last one ``steps``.

    >>> eval_steps(100, 4)
    [25, 50, 75, 100]
    """
    return sorted({max(1, int(round(steps * (i + 1) / evals))) for i in range(evals)})


def train_net(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    batches: Iterator[np.ndarray],
    *,
    steps: int,
    lr: float,
    momentum: float,
    evals: int,
    desc: str,
    agc_clipping: float | None = None,
    eval_fn: Callable[[nn.Module], tuple[float, float]] | None = None,
) -> dict[str, Any]:
    """Train ``model`` for ``steps`` SGD steps; evaluate ``evals`` times.

    Args:
        model: the network (left trained, in train mode).
        data: train x, train y, test x, test y (see :func:`images`).
        batches: yields the indices of each mini-batch.
        steps, lr, momentum: SGD.
        evals: evaluations, evenly spaced (the last at ``steps``).
        desc: progress bar label.
        agc_clipping: if given, adaptive gradient clipping (:class:`batchnorm.optim.AGC`) with
            this ``lambda``; the final linear layer is not clipped (as in NFNets).
        eval_fn: how to evaluate (default :func:`evaluate` on the test set).

    Returns:
        ``steps``, ``test_acc``, ``test_loss``, ``train_loss`` (mean over the steps since the
        previous evaluation) per evaluation, ``diverged_at`` (the step whose loss was not finite,
        or -1) and ``train_acc_final`` (training-batch accuracy over the last 10% of steps).
    """
    train_x, train_y, test_x, test_y = data
    num_classes = int(max(int(train_y.max()), int(test_y.max()))) + 1
    evaluate_now = eval_fn or (lambda m: evaluate(m, test_x, test_y))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    agc = None
    if agc_clipping is not None:
        from batchnorm.optim import AGC

        agc = AGC(optimizer, clipping=agc_clipping, exclude=[model[-1]])
    schedule = set(eval_steps(steps, evals))
    out: dict[str, Any] = {
        "steps": [],
        "test_acc": [],
        "test_loss": [],
        "train_loss": [],
        "diverged_at": -1,
    }
    running, count, tail_correct, tail_seen = 0.0, 0, 0, 0
    tail_from = steps - max(1, steps // 10)
    model.train()
    with bar(total=steps, desc=desc, leave=False, unit="step") as progress:
        for step in range(1, steps + 1):
            idx = torch.from_numpy(next(batches))
            logits = model(train_x[idx])
            loss = F.cross_entropy(logits, train_y[idx])
            if not torch.isfinite(loss):
                out["diverged_at"] = step
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += float(loss.detach())
            count += 1
            if step > tail_from:
                tail_correct += int((logits.argmax(1) == train_y[idx]).sum())
                tail_seen += len(idx)
            progress.update(1)
            if step in schedule:
                acc, test_loss = evaluate_now(model)
                out["steps"].append(step)
                out["test_acc"].append(acc)
                out["test_loss"].append(test_loss)
                out["train_loss"].append(running / max(count, 1))
                running, count = 0.0, 0
                progress.set_postfix_str(f"test acc {acc:.3f}")
    if agc is not None:
        agc.remove()
    if out["diverged_at"] > 0:
        # A diverged network predicts nothing useful: chance accuracy from there on.
        for step in sorted(schedule):
            if step >= out["diverged_at"]:
                out["steps"].append(step)
                out["test_acc"].append(1.0 / num_classes)
                out["test_loss"].append(math.nan)
                out["train_loss"].append(math.nan)
    out["train_acc_final"] = tail_correct / tail_seen if tail_seen else math.nan
    return out


def cached_job(ctx: Context, key: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one job, or load it from ``jobs/<key>.json`` if a previous invocation finished it."""
    jobs = ctx.run_dir / "jobs"
    done = jobs / f"{key}.json"
    if done.is_file():
        log(f"[lab] {key}: already finished, loaded from {done}")
        return _nan_back(json.loads(done.read_text()))
    jobs.mkdir(exist_ok=True)
    with ctx.timer("train"):
        result = run()
    atomic_write_json(done, result)
    return result


def _nan_back(value: Any) -> Any:
    # JSON has no NaN: the writer stored None for it.
    if isinstance(value, dict):
        return {k: _nan_back(v) for k, v in value.items()}
    if isinstance(value, list):
        return [math.nan if v is None else _nan_back(v) for v in value]
    return value


def job_curve_rows(
    result: dict[str, Any], variant: str, seed: int, extra: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """One ``curves.csv`` row per evaluation of a job."""
    return [
        {
            "step": int(step),
            "variant": variant,
            "seed": seed,
            "test_acc": float(acc),
            "test_loss": float(result["test_loss"][i]),
            "train_loss": float(result["train_loss"][i]),
            **(extra or {}),
        }
        for i, (step, acc) in enumerate(zip(result["steps"], result["test_acc"], strict=True))
    ]


def final_acc(results: Sequence[dict[str, Any]]) -> np.ndarray:
    """The final test accuracy of each job."""
    return np.array([r["test_acc"][-1] for r in results], dtype=np.float64)


def common_choices(config: ConvConfig) -> list[str]:
    """The protocol choices the CNN experiments share, as report lines."""
    return [
        f"network: {len(config.channels)} x [conv3x3 -> norm -> ReLU -> maxpool 2] with widths "
        f"{config.channels}, global average pool, linear; torch's default initialization; "
        "normalized convolutions have no bias",
        f"data: {config.dataset}"
        + (
            f", a fixed random subset of {config.train_subset} training images"
            if config.train_subset
            else ""
        )
        + (f", {config.test_subset} test images" if config.test_subset else ", the whole test set")
        + "; pixels / 255, no augmentation",
        f"optimizer: SGD, momentum {config.momentum}, learning rate {config.lr} at batch 32, "
        "scaled linearly with the batch size (Goyal et al. 2017); no weight decay or schedule; "
        "mean cross-entropy",
        f"length: {config.epochs:g} epochs of the training subset for every batch size (so "
        "smaller batches take more steps); a seed fixes the initial weights (torch.manual_seed) "
        "and the batch order, the same for every variant (paired runs)",
        "test-time normalization: batch-norm-type layers use their moving averages (momentum "
        "0.1) in eval mode unless stated otherwise; GN, LN and IN need no population statistics",
    ]
