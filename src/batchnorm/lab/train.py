"""Training a :class:`~batchnorm.lab.wide.WideMLP`: SGD, evaluation with population statistics,
divergence handling and checkpoints.

One :func:`train` call is one "job": G networks trained for ``steps`` SGD steps on mini-batches of
``batch_size`` examples, evaluated at the steps listed in ``eval_steps``. What is fixed here, for
every experiment:

- Data order: for a network with seed s, epoch e visits the training set in the order
  ``numpy.random.default_rng([s, e]).permutation(N)``, cut into ``N // batch_size`` mini-batches
  (the last partial batch is dropped). It depends only on (s, e), so networks with the same seed
  see the same batches, and a resumed run sees exactly the batches it would have seen.
- Optimizer: SGD, ``theta <- theta - lr * dL/dtheta`` (with classical momentum if asked,
  ``v <- mu v + dL/dtheta; theta <- theta - lr v``), each network with its own learning rate.
  L is the network's mean cross-entropy over its mini-batch.
- Evaluation (Algorithm 2 of the paper): the batch-norm layers' population statistics are
  recomputed by :func:`batchnorm.inference.recalibrate` over ``popstat_batches`` training
  mini-batches of the training batch size m (``E[x] = E_B[mu_B]``,
  ``Var[x] = m/(m-1) E_B[var_B]``), then the networks run in inference mode on the test set. The
  moving averages kept during training are put back afterwards, so evaluating does not change
  training. At the end, the final evaluation uses ``final_popstat_batches`` batches (default: one
  pass over the training set), and the test accuracy with the moving averages is recorded beside
  it.
- Divergence: a network whose loss becomes NaN or infinite is marked diverged at that step; its
  parameters are set to zero and its learning rate to 0, so it predicts a constant from then on
  and cannot disturb anything else.
- Checkpoints: at evaluation steps, at most every ``checkpoint_seconds``, the whole state (weights,
  buffers, momentum, step, history, random state) is written atomically with its SHA-256
  (:func:`batchnorm.lab.io.atomic_write_checked`); :func:`train` with the same checkpoint path
  continues from it, and refuses one that fails its checksum.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from batchnorm.lab.io import atomic_write_checked, read_checked
from batchnorm.lab.progress import bar
from batchnorm.lab.samplers import EpochBatches, batch_indices, popstat_batches
from batchnorm.lab.wide import NetSpec, WideMLP

__all__ = ["TrainSettings", "JobResult", "train", "batch_indices", "eval_schedule"]

_PERCENTILES = (0.15, 0.50, 0.85)


def eval_schedule(steps: int, every: int, extra: Sequence[int] = ()) -> tuple[int, ...]:
    """Steps 0, every, 2*every, ..., and ``steps`` itself, plus any ``extra`` steps, sorted.

    >>> eval_schedule(1000, 400, extra=(100,))
    (0, 100, 400, 800, 1000)
    """
    if every < 1:
        raise ValueError(f"the evaluation interval must be >= 1 step, got {every}")
    points = set(range(0, steps + 1, every)) | {steps} | {s for s in extra if 0 <= s <= steps}
    return tuple(sorted(points))


@dataclass(frozen=True)
class TrainSettings:
    """How a job trains and evaluates (see the module docstring).

    Attributes:
        steps: SGD steps.
        batch_size: m, examples per mini-batch (per network).
        eval_steps: steps at which the networks are evaluated (0 = before training).
        momentum: SGD momentum (0 = plain SGD).
        popstat_batches: training mini-batches for the population statistics at each evaluation.
        final_popstat_batches: the same at the last evaluation; None = one pass over the training
            set.
        eval_examples: test examples used at intermediate evaluations (None = all); the last
            evaluation always uses the whole test set.
        train_eval_examples: training examples on which accuracy is also measured in inference
            mode (0 = none); for the train/test gap.
        percentiles: record the 15th/50th/85th percentiles over the test examples of every unit's
            input to the last hidden nonlinearity, at every evaluation.
        saturation: record, at every evaluation, the fraction of (test example, unit) pairs of the
            last hidden layer where the nonlinearity is saturated: its derivative is below 5% of
            its maximum (sigmoid: |z| > 4.4; tanh: |z| > 2.2; ReLU: z <= 0).
        checkpoint_seconds: minimum time between two checkpoints.
        layer_stats: record, at every evaluation, each hidden layer's saturated fraction (as
            ``saturation``, on the evaluation's test examples) and each weight layer's gradient
            norm (the training loss over the first ``LAYER_STAT_BATCHES`` training mini-batches,
            batch statistics as in training), in ``JobResult.extra`` as "layer_saturation"
            (T, G, hidden layers) and "layer_grad_norm" (T, G, weight layers): where gradients
            vanish, and whether saturation is why.
        train_eval_final_only: measure the training accuracy at the last evaluation only
            (``train_acc`` is NaN before it), where earlier values are not needed.
    """

    steps: int
    batch_size: int
    eval_steps: tuple[int, ...]
    momentum: float = 0.0
    popstat_batches: int = 100
    final_popstat_batches: int | None = None
    eval_examples: int | None = None
    train_eval_examples: int = 0
    percentiles: bool = False
    saturation: bool = False
    checkpoint_seconds: float = 30.0
    layer_stats: bool = False
    train_eval_final_only: bool = False


@dataclass
class JobResult:
    """What a job measured. Per-network arrays follow ``specs`` (the model's internal order).

    Attributes:
        specs: the networks.
        steps: the evaluation steps, (T,).
        test_acc, test_loss: (T, G) on the test set (a subset at intermediate steps if
            ``eval_examples`` was set).
        train_loss: (T, G) mean training loss over the steps since the previous evaluation
            (NaN at step 0).
        train_acc: (T, G) accuracy on ``train_eval_examples`` training examples, or None.
        percentiles: (T, G, 3, F) 15th/50th/85th percentiles of the last hidden layer's
            pre-activations, or None.
        saturation: (T, G) fraction of saturated units of the last hidden layer, or None.
        diverged_at: (G,) step at which a network diverged, or -1.
        final_test_acc_moving_average: (G,) test accuracy at the end with the moving averages
            instead of the population statistics (equal to ``test_acc[-1]`` without batch norm).
        train_seconds, eval_seconds: time spent training and evaluating.
    """

    specs: tuple[NetSpec, ...]
    steps: np.ndarray
    test_acc: np.ndarray
    test_loss: np.ndarray
    train_loss: np.ndarray
    train_acc: np.ndarray | None
    percentiles: np.ndarray | None
    saturation: np.ndarray | None
    diverged_at: np.ndarray
    final_test_acc_moving_average: np.ndarray
    train_seconds: float
    eval_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def select(self, **match: Any) -> list[int]:
        """Indices of the networks whose spec has every given attribute value."""
        return [
            g
            for g, spec in enumerate(self.specs)
            if all(getattr(spec, key) == value for key, value in match.items())
        ]


def _save_running(model: WideMLP) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(n.running_mean.clone(), n.running_var.clone()) for n in model.norms]


def _restore_running(model: WideMLP, saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for norm, (mean, var) in zip(model.norms, saved):
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var)


def _recalibrate(
    model: WideMLP, x_train: torch.Tensor, step: int, count: int, batch_size: int
) -> None:
    """Population statistics (Algorithm 2) over ``count`` training mini-batches."""
    if not model.num_bn or count <= 0:
        return
    from batchnorm.inference import recalibrate

    indices = popstat_batches(step, count, x_train.shape[0], batch_size)
    batches = (x_train[torch.from_numpy(i)] for i in indices)
    recalibrate(model, batches, progress=False)


@torch.no_grad()
def _evaluate(
    model: WideMLP,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    percentiles: bool = False,
    saturation: bool = False,
    chunk: int = 2000,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Per-network accuracy and mean loss on (x, y) in inference mode; optionally the
    percentiles and the saturated fraction of the last hidden layer's pre-activations."""
    was_training = model.training
    model.eval()
    G = model.num_nets
    correct = torch.zeros(G, dtype=torch.float64)
    loss = torch.zeros(G, dtype=torch.float64)
    captured: list[torch.Tensor] = []
    try:
        for lo in range(0, x.shape[0], chunk):
            xb, yb = x[lo : lo + chunk], y[lo : lo + chunk]
            logits = model(xb, captured if (percentiles or saturation) else None)  # (G, b, C)
            correct += (logits.argmax(-1) == yb).sum(1).double()
            per_example = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), yb.repeat(G), reduction="none"
            )
            loss += per_example.view(G, -1).double().sum(1)
    finally:
        model.train(was_training)
    n = x.shape[0]
    quantiles = saturated = None
    if percentiles:
        z = torch.cat(captured, dim=1)  # (G, N, F)
        # (G, F, N) -> quantiles (3, G, F) -> (G, 3, F); NumPy's partition-based quantile
        # (linear interpolation, as torch.quantile) avoids a full sort.
        by_unit = np.ascontiguousarray(z.transpose(1, 2).numpy())
        quantiles = np.quantile(by_unit, _PERCENTILES, axis=-1).transpose(1, 0, 2)
    if saturation:
        z = torch.cat(captured, dim=1)  # (G, N, F)
        saturated = np.array(
            [
                float(_saturated(z[g], spec.activation).float().mean())
                for g, spec in enumerate(model.specs)
            ]
        )
    return (correct / n).numpy(), (loss / n).numpy(), quantiles, saturated


LAYER_STAT_BATCHES = 10  # training mini-batches for the per-layer gradient norms


def _layer_stats(
    model: WideMLP,
    x_test: torch.Tensor,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    batch_size: int,
    chunk: int = 2000,
) -> tuple[np.ndarray, np.ndarray]:
    """(G, hidden layers) saturated fractions on ``x_test`` (inference mode) and (G, weight
    layers) gradient norms of the mean training loss over the first ``LAYER_STAT_BATCHES``
    mini-batches (training mode: batch statistics). The parameters, their gradients and the
    dropout generator are left as they were; the caller restores BN's running averages."""
    was_training = model.training
    G = model.num_nets
    layers = len(model.hidden)
    saturated = torch.zeros(G, layers, dtype=torch.float64)
    with torch.no_grad():
        model.eval()
        try:
            for lo in range(0, x_test.shape[0], chunk):
                captured: list[torch.Tensor] = []
                model(x_test[lo : lo + chunk], capture_layers=captured)
                for layer, z in enumerate(captured):
                    for g, spec in enumerate(model.specs):
                        saturated[g, layer] += float(_saturated(z[g], spec.activation).sum())
        finally:
            model.train(was_training)
    saturated /= x_test.shape[0] * torch.tensor(model.hidden, dtype=torch.float64)
    generator_state = model.dropout_generator.get_state()
    model.train()
    grads = [torch.zeros_like(w) for w in model.weights]
    n_batches = max(1, min(LAYER_STAT_BATCHES, x_train.shape[0] // batch_size))
    try:
        for b in range(n_batches):
            xb = x_train[b * batch_size : (b + 1) * batch_size]
            yb = y_train[b * batch_size : (b + 1) * batch_size]
            with torch.enable_grad():
                logits = model(xb)  # (G, B, C), the batch shared by every network
                loss = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), yb.repeat(G), reduction="none"
                )
                total = loss.view(G, -1).mean(1).sum() / n_batches
                parts = torch.autograd.grad(total, list(model.weights))
            for acc, part in zip(grads, parts):
                acc += part
    finally:
        model.train(was_training)
        model.dropout_generator.set_state(generator_state)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads], dim=1)  # (G, layers + 1)
    return saturated.numpy(), norms.double().numpy()


def _saturated(z: torch.Tensor, activation: str) -> torch.Tensor:
    """Where the nonlinearity's derivative is below 5% of its maximum."""
    if activation == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1 - s) < 0.05 * 0.25
    if activation == "tanh":
        return 1 - torch.tanh(z) ** 2 < 0.05
    return z <= 0


def _state(
    model: WideMLP,
    velocity: list[torch.Tensor] | None,
    step: int,
    lr: torch.Tensor,
    diverged: torch.Tensor,
    history: dict[str, list[Any]],
    loss_sum: torch.Tensor,
    loss_count: int,
    seconds: dict[str, float],
) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "velocity": velocity,
        "step": step,
        "lr": lr,
        "diverged": diverged,
        "history": history,
        "loss_sum": loss_sum,
        "loss_count": loss_count,
        "seconds": dict(seconds),
        "rng": torch.get_rng_state(),
        "dropout_rng": model.dropout_generator.get_state(),
        "specs": [spec.__dict__ for spec in model.specs],
    }


def _write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_checked(path, buffer.getvalue())


def _reset_net(model: WideMLP, g: int, velocity: list[torch.Tensor] | None) -> None:
    """Zero every parameter of network g and reset its running statistics."""
    with torch.no_grad():
        for view in model.net_parameters(g):
            view.zero_()
        if g < model.num_bn:
            for norm, width in zip(model.norms, model.hidden):
                norm.running_mean[g * width : (g + 1) * width] = 0.0
                norm.running_var[g * width : (g + 1) * width] = 1.0
        if velocity is not None:
            for v in velocity:
                v.nan_to_num_(0.0, 0.0, 0.0)


def train(
    model: WideMLP,
    data: Any,
    settings: TrainSettings,
    *,
    desc: str = "train",
    checkpoint: Path | None = None,
    on_eval: Callable[[int, np.ndarray], None] | None = None,
) -> JobResult:
    """Train every network of ``model`` on ``data`` and evaluate it (see the module docstring).

    Args:
        model: the networks, in training mode.
        data: a :class:`batchnorm.lab.data.Dataset` (float32 arrays in [0, 1]).
        settings: steps, batch size, evaluation schedule.
        desc: the progress bar's label.
        checkpoint: a file to resume from if it exists, and to write checkpoints to.
        on_eval: called with (step, test accuracy per network) after each evaluation.

    Returns:
        A :class:`JobResult`.
    """
    s = settings
    if s.steps < 0:
        raise ValueError(f"steps must be >= 0, got {s.steps}")
    x_train = torch.from_numpy(np.ascontiguousarray(data.train_x, dtype=np.float32))
    y_train = torch.from_numpy(np.ascontiguousarray(data.train_y, dtype=np.int64))
    x_test = torch.from_numpy(np.ascontiguousarray(data.test_x, dtype=np.float32))
    y_test = torch.from_numpy(np.ascontiguousarray(data.test_y, dtype=np.int64))
    if s.eval_examples is not None and s.eval_examples < len(y_test):
        x_test_part, y_test_part = x_test[: s.eval_examples], y_test[: s.eval_examples]
    else:
        x_test_part, y_test_part = x_test, y_test
    n_train_eval = min(s.train_eval_examples, len(y_train))
    x_train_eval, y_train_eval = x_train[:n_train_eval], y_train[:n_train_eval]
    final_popstat = (
        s.final_popstat_batches
        if s.final_popstat_batches is not None
        else len(y_train) // s.batch_size
    )
    eval_steps = sorted(set(s.eval_steps) | {s.steps})

    G = model.num_nets
    source = EpochBatches([spec.seed for spec in model.specs], len(y_train), s.batch_size)
    lr = torch.tensor([spec.lr for spec in model.specs], dtype=torch.float32)
    diverged = torch.full((G,), -1, dtype=torch.int64)
    velocity: list[torch.Tensor] | None = None
    history: dict[str, list[Any]] = {
        k: []
        for k in (
            "step",
            "test_acc",
            "test_loss",
            "train_loss",
            "train_acc",
            "percentiles",
            "saturation",
        )
    }
    loss_sum = torch.zeros(G, dtype=torch.float64)
    loss_count = 0
    seconds = {"train": 0.0, "eval": 0.0}
    start_step = 0
    if s.momentum:
        velocity = [torch.zeros_like(p) for p in model.parameters()]

    if checkpoint is not None and checkpoint.is_file():
        # read_checked refuses an empty, truncated or corrupted checkpoint (CorruptFileError).
        state = torch.load(io.BytesIO(read_checked(checkpoint)), weights_only=True)
        saved_specs = [NetSpec(**d) for d in state["specs"]]
        if saved_specs != list(model.specs):
            raise ValueError(
                f"checkpoint {checkpoint} was written for other networks; delete it to restart"
            )
        model.load_state_dict(state["model"])
        velocity = state["velocity"]
        start_step = int(state["step"])
        lr, diverged = state["lr"], state["diverged"]
        history = state["history"]
        loss_sum, loss_count = state["loss_sum"], int(state["loss_count"])
        seconds = dict(state["seconds"])
        torch.set_rng_state(state["rng"])
        if "dropout_rng" in state:
            model.dropout_generator.set_state(state["dropout_rng"])

    params = list(model.parameters())
    param_lr = _param_lrs(model, lr)
    model.train()
    last_checkpoint = time.monotonic()
    pending_evals = [t for t in eval_steps if t >= start_step and t not in history["step"]]

    with bar(total=s.steps, initial=start_step, desc=desc, unit="step") as pbar:
        step = start_step
        while True:
            if pending_evals and pending_evals[0] == step:
                pending_evals.pop(0)
                t0 = time.perf_counter()
                final = step == s.steps
                saved = _save_running(model)
                moving_average_acc = None
                if final and model.num_bn:
                    moving_average_acc, _, _, _ = _evaluate(model, x_test, y_test)
                _recalibrate(
                    model,
                    x_train,
                    step,
                    final_popstat if final else s.popstat_batches,
                    s.batch_size,
                )
                xt, yt = (x_test, y_test) if final else (x_test_part, y_test_part)
                acc, loss, quantiles, saturated = _evaluate(
                    model, xt, yt, percentiles=s.percentiles, saturation=s.saturation
                )
                train_acc = None
                if n_train_eval and (final or not s.train_eval_final_only):
                    train_acc, _, _, _ = _evaluate(model, x_train_eval, y_train_eval)
                elif n_train_eval:
                    train_acc = np.full(G, np.nan)
                if s.layer_stats:
                    layer_sat, layer_grad = _layer_stats(model, xt, x_train, y_train, s.batch_size)
                    history.setdefault("layer_saturation", []).append(layer_sat.tolist())
                    history.setdefault("layer_grad_norm", []).append(layer_grad.tolist())
                _restore_running(model, saved)
                mean_train_loss = (
                    (loss_sum / loss_count).numpy() if loss_count else np.full(G, np.nan)
                )
                history["step"].append(step)
                history["test_acc"].append(acc.tolist())
                history["test_loss"].append(loss.tolist())
                history["train_loss"].append(mean_train_loss.tolist())
                history["train_acc"].append(None if train_acc is None else train_acc.tolist())
                history["percentiles"].append(None if quantiles is None else quantiles.tolist())
                history["saturation"].append(None if saturated is None else saturated.tolist())
                loss_sum = torch.zeros(G, dtype=torch.float64)
                loss_count = 0
                if final:
                    history.setdefault("moving_average_acc", []).append(
                        acc.tolist() if moving_average_acc is None else moving_average_acc.tolist()
                    )
                seconds["eval"] += time.perf_counter() - t0
                pbar.set_postfix_str(_postfix(model, acc), refresh=False)
                if on_eval is not None:
                    on_eval(step, acc)
                if checkpoint is not None and (
                    final or time.monotonic() - last_checkpoint >= s.checkpoint_seconds
                ):
                    _write_checkpoint(
                        checkpoint,
                        _state(
                            model,
                            velocity,
                            step,
                            lr,
                            diverged,
                            history,
                            loss_sum,
                            loss_count,
                            seconds,
                        ),
                    )
                    last_checkpoint = time.monotonic()
            if step >= s.steps:
                break

            t0 = time.perf_counter()
            idx = torch.from_numpy(source(step)).view(-1)  # (G*B,)
            xb = x_train.index_select(0, idx).view(G, s.batch_size, -1)  # (G, B, D)
            yb = y_train.index_select(0, idx).view(G, s.batch_size)
            logits = model(xb)  # (G, B, C)
            losses = (
                F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.view(-1), reduction="none")
                .view(G, s.batch_size)
                .mean(1)
            )  # (G,)
            losses.sum().backward()
            with torch.no_grad():
                for i, (p, rate) in enumerate(zip(params, param_lr)):
                    grad = p.grad
                    if grad is None:  # an empty parameter (e.g. no network without BN)
                        continue
                    if velocity is not None:
                        velocity[i].mul_(s.momentum).add_(grad)
                        grad = velocity[i]
                    p.addcmul_(grad, rate, value=-1.0)
                    p.grad = None
            finite = torch.isfinite(losses)
            if not bool(finite.all()):
                for g in torch.nonzero(~finite & (diverged < 0)).flatten().tolist():
                    diverged[g] = step
                    lr[g] = 0.0
                    _reset_net(model, g, velocity)
                param_lr = _param_lrs(model, lr)
            loss_sum += torch.where(finite, losses.detach(), torch.nan).double()
            loss_count += 1
            step += 1
            seconds["train"] += time.perf_counter() - t0
            pbar.update(1)

    def array(key: str) -> np.ndarray | None:
        values = history[key]
        if not values or values[0] is None:
            return None
        return np.asarray(values, dtype=np.float64)

    return JobResult(
        specs=model.specs,
        steps=np.asarray(history["step"], dtype=np.int64),
        test_acc=np.asarray(history["test_acc"], dtype=np.float64),
        test_loss=np.asarray(history["test_loss"], dtype=np.float64),
        train_loss=np.asarray(history["train_loss"], dtype=np.float64),
        train_acc=array("train_acc"),
        percentiles=array("percentiles"),
        saturation=array("saturation"),
        diverged_at=diverged.numpy().copy(),
        final_test_acc_moving_average=np.asarray(
            history["moving_average_acc"][-1], dtype=np.float64
        ),
        train_seconds=seconds["train"],
        eval_seconds=seconds["eval"],
        extra={
            key: np.asarray(history[key], dtype=np.float64)
            for key in ("layer_saturation", "layer_grad_norm")
            if history.get(key)
        },
    )


def _param_lrs(model: WideMLP, lr: torch.Tensor) -> list[torch.Tensor]:
    """Per-entry learning rates in the order of ``model.parameters()``."""
    by_param = {id(p): rate for p, rate in model.learning_rates(lr)}
    return [by_param[id(p)] for p in model.parameters()]


def _postfix(model: WideMLP, acc: np.ndarray) -> str:
    """Mean test accuracy per variant, for the progress bar."""
    groups: dict[str, list[float]] = {}
    for spec, a in zip(model.specs, acc):
        groups.setdefault(spec.variant, []).append(float(a))
    parts = [f"{name} {np.mean(v):.3f}" for name, v in list(groups.items())[:6]]
    return "acc " + ", ".join(parts) if parts else ""
