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
- Checkpoints and resumption: the lab's one loop (:func:`batchnorm.lab.loop.run_loop`) writes
  the whole state (weights, buffers, momentum, step, history, random state) with its SHA-256 at
  most every ``checkpoint_seconds`` and at the end; :func:`train` with the same checkpoint
  path continues from it, and refuses one that fails its checksum or belongs to other networks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from batchnorm.lab.loop import ModelTask, eval_schedule, run_loop
from batchnorm.lab.samplers import EpochBatches, batch_indices, popstat_batches
from batchnorm.lab.wide import NetSpec, WideMLP

__all__ = ["TrainSettings", "JobResult", "train", "batch_indices", "eval_schedule"]

_PERCENTILES = (0.15, 0.50, 0.85)


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


_HISTORY_KEYS = (
    "step",
    "test_acc",
    "test_loss",
    "train_loss",
    "train_acc",
    "percentiles",
    "saturation",
)


class _WideJob(ModelTask):
    """One :func:`train` job as a :class:`batchnorm.lab.loop.Task` (SGD written out: each
    network has its own learning rate, and a diverged one is reset)."""

    saved = ("velocity", "lr", "diverged", "history", "loss_sum", "loss_count")

    def __init__(self, model: WideMLP, data: Any, s: TrainSettings) -> None:
        self.model, self.s = model, s
        self.x_train = torch.from_numpy(np.ascontiguousarray(data.train_x, dtype=np.float32))
        self.y_train = torch.from_numpy(np.ascontiguousarray(data.train_y, dtype=np.int64))
        self.x_test = torch.from_numpy(np.ascontiguousarray(data.test_x, dtype=np.float32))
        self.y_test = torch.from_numpy(np.ascontiguousarray(data.test_y, dtype=np.int64))
        if s.eval_examples is not None and s.eval_examples < len(self.y_test):
            self.x_test_part = self.x_test[: s.eval_examples]
            self.y_test_part = self.y_test[: s.eval_examples]
        else:
            self.x_test_part, self.y_test_part = self.x_test, self.y_test
        self.n_train_eval = min(s.train_eval_examples, len(self.y_train))
        self.x_train_eval = self.x_train[: self.n_train_eval]
        self.y_train_eval = self.y_train[: self.n_train_eval]
        self.final_popstat = (
            s.final_popstat_batches
            if s.final_popstat_batches is not None
            else len(self.y_train) // s.batch_size
        )
        G = self.G = model.num_nets
        self.source = EpochBatches(
            [spec.seed for spec in model.specs], len(self.y_train), s.batch_size
        )
        self.lr = torch.tensor([spec.lr for spec in model.specs], dtype=torch.float32)
        self.diverged = torch.full((G,), -1, dtype=torch.int64)
        self.velocity: list[torch.Tensor] | None = (
            [torch.zeros_like(p) for p in model.parameters()] if s.momentum else None
        )
        self.history: dict[str, list[Any]] = {k: [] for k in _HISTORY_KEYS}
        self.loss_sum = torch.zeros(G, dtype=torch.float64)
        self.loss_count = 0
        self.params = list(model.parameters())
        self.param_lr = _param_lrs(model, self.lr)

    def generators(self) -> list[torch.Generator]:
        return [self.model.dropout_generator]

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        super().load_state_dict(state, step)
        self.params = list(self.model.parameters())
        self.param_lr = _param_lrs(self.model, self.lr)

    def evaluate(self, step: int) -> str:
        model, s, history, G = self.model, self.s, self.history, self.G
        final = step == s.steps
        saved = _save_running(model)
        moving_average_acc = None
        if final and model.num_bn:
            moving_average_acc, _, _, _ = _evaluate(model, self.x_test, self.y_test)
        _recalibrate(
            model,
            self.x_train,
            step,
            self.final_popstat if final else s.popstat_batches,
            s.batch_size,
        )
        xt, yt = (self.x_test, self.y_test) if final else (self.x_test_part, self.y_test_part)
        acc, loss, quantiles, saturated = _evaluate(
            model, xt, yt, percentiles=s.percentiles, saturation=s.saturation
        )
        train_acc = None
        if self.n_train_eval and (final or not s.train_eval_final_only):
            train_acc, _, _, _ = _evaluate(model, self.x_train_eval, self.y_train_eval)
        elif self.n_train_eval:
            train_acc = np.full(G, np.nan)
        if s.layer_stats:
            layer_sat, layer_grad = _layer_stats(
                model, xt, self.x_train, self.y_train, s.batch_size
            )
            history.setdefault("layer_saturation", []).append(layer_sat.tolist())
            history.setdefault("layer_grad_norm", []).append(layer_grad.tolist())
        _restore_running(model, saved)
        mean_train_loss = (
            (self.loss_sum / self.loss_count).numpy() if self.loss_count else np.full(G, np.nan)
        )
        history["step"].append(step)
        history["test_acc"].append(acc.tolist())
        history["test_loss"].append(loss.tolist())
        history["train_loss"].append(mean_train_loss.tolist())
        history["train_acc"].append(None if train_acc is None else train_acc.tolist())
        history["percentiles"].append(None if quantiles is None else quantiles.tolist())
        history["saturation"].append(None if saturated is None else saturated.tolist())
        self.loss_sum = torch.zeros(G, dtype=torch.float64)
        self.loss_count = 0
        if final:
            history.setdefault("moving_average_acc", []).append(
                acc.tolist() if moving_average_acc is None else moving_average_acc.tolist()
            )
        return _postfix(model, acc)

    def train_step(self, step: int) -> bool:
        model, G, B = self.model, self.G, self.s.batch_size
        idx = torch.from_numpy(self.source(step)).view(-1)  # (G*B,)
        xb = self.x_train.index_select(0, idx).view(G, B, -1)  # (G, B, D)
        yb = self.y_train.index_select(0, idx).view(G, B)
        logits = model(xb)  # (G, B, C)
        losses = (
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.view(-1), reduction="none")
            .view(G, B)
            .mean(1)
        )  # (G,)
        losses.sum().backward()
        with torch.no_grad():
            for i, (p, rate) in enumerate(zip(self.params, self.param_lr)):
                grad = p.grad
                if grad is None:  # an empty parameter (e.g. no network without BN)
                    continue
                if self.velocity is not None:
                    self.velocity[i].mul_(self.s.momentum).add_(grad)
                    grad = self.velocity[i]
                p.addcmul_(grad, rate, value=-1.0)
                p.grad = None
        finite = torch.isfinite(losses)
        if not bool(finite.all()):
            for g in torch.nonzero(~finite & (self.diverged < 0)).flatten().tolist():
                self.diverged[g] = step
                self.lr[g] = 0.0
                _reset_net(model, g, self.velocity)
            self.param_lr = _param_lrs(model, self.lr)
        self.loss_sum += torch.where(finite, losses.detach(), torch.nan).double()
        self.loss_count += 1
        return True


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
    job = _WideJob(model, data, s)
    if on_eval is not None:
        evaluate = job.evaluate

        def evaluate_and_report(step: int) -> str:
            summary = evaluate(step)
            on_eval(step, np.asarray(job.history["test_acc"][-1]))
            return summary

        job.evaluate = evaluate_and_report  # type: ignore[method-assign]
    model.train()
    loop = run_loop(
        job,
        steps=s.steps,
        eval_steps=set(s.eval_steps) | {s.steps},
        desc=desc,
        checkpoint=checkpoint,
        checkpoint_seconds=s.checkpoint_seconds,
        signature=[dict(spec.__dict__) for spec in model.specs],
    )
    history = job.history

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
        diverged_at=job.diverged.numpy().copy(),
        final_test_acc_moving_average=np.asarray(
            history["moving_average_acc"][-1], dtype=np.float64
        ),
        train_seconds=loop.train_seconds,
        eval_seconds=loop.eval_seconds,
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
