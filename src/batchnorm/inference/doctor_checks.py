"""The checks behind :func:`batchnorm.inference.doctor.diagnose`, one function per finding kind,
and the helpers they share (batch parsing, output comparison, loss and accuracy).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.inference.doctor_findings import (
    _ACCURACY_DROP,
    _FEW_SAMPLES,
    _OUTPUT_CHANGE,
    _SMALL_BATCH,
    _STALE_LAYER,
    SEVERITIES,
    Diagnosis,
    Finding,
    LayerStatus,
)

# --------------------------------------------------------------------------------------------
# Helpers


def _is_frozen_class(module: nn.Module) -> bool:
    return "frozen" in type(module).__name__.lower()


def _batch_norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every ``_BatchNorm`` and every frozen batch norm with running buffers (torchvision's
    ``FrozenBatchNorm2d`` is not a ``_BatchNorm``)."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, _BatchNorm)
        or (
            _is_frozen_class(module)
            and isinstance(getattr(module, "running_mean", None), torch.Tensor)
            and isinstance(getattr(module, "running_var", None), torch.Tensor)
        )
    ]


def _meant_frozen(module: nn.Module) -> str | None:
    """Why a layer looks meant to be frozen, or None."""
    if _is_frozen_class(module):
        return f"its class is {type(module).__name__}"
    params = [getattr(module, key, None) for key in ("weight", "bias")]
    params = [p for p in params if isinstance(p, nn.Parameter)]
    if params and not any(p.requires_grad for p in params):
        return "its affine parameters have requires_grad=False"
    return None


def _stays_in_eval(module: nn.Module) -> bool:
    """Whether ``module.train()`` leaves the layer in eval mode (a frozen layer). Restores it."""
    before = module.training
    module.train()
    stays = not module.training
    module.training = before
    return stays


def _extract(batch: Any) -> tuple[Any, Any]:
    """``(input, label or None)`` of a batch: a tensor, ``(x, y, ...)``, or ``{"input", ...}``."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        if "input" not in batch:
            raise ValueError(
                f"diagnose: a dict batch needs an 'input' key (it has {sorted(map(str, batch))})"
            )
        return batch["input"], batch.get("target", batch.get("label"))
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise TypeError(
        f"diagnose: cannot find the model input in a batch of type {type(batch).__name__}: give "
        "tensors, (input, label) tuples, or dicts with an 'input' key"
    )


def _model_device(model: nn.Module) -> torch.device | None:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return None


def _to(x: Any, device: torch.device | None) -> Any:
    if device is None or not isinstance(x, torch.Tensor):
        return x
    return x.to(device)


def _first_tensor(output: Any) -> torch.Tensor | None:
    """The tensor an output is compared by: the output itself, or its first tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


@dataclass
class _Gap:
    """Accumulates ``||a - b||^2`` and ``||b||^2`` over batches, in float64."""

    diff: float = 0.0
    norm: float = 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a64, b64 = a.detach().double(), b.detach().double()
        self.diff += float(((a64 - b64) ** 2).sum())
        self.norm += float((b64**2).sum())

    @property
    def value(self) -> float:
        if self.norm == 0.0:
            return 0.0 if self.diff == 0.0 else math.inf
        return math.sqrt(self.diff / self.norm)


@dataclass
class _Score:
    """Loss and accuracy summed over batches."""

    loss: float = 0.0
    correct: float = 0.0
    samples: int = 0
    classified: bool = True

    def add(self, output: torch.Tensor, label: Any, loss_fn: Callable[..., Any] | None) -> None:
        n = int(label.shape[0]) if isinstance(label, torch.Tensor) and label.dim() else 1
        classes = (
            isinstance(label, torch.Tensor)
            and not label.is_floating_point()
            and output.dim() >= 2
            and output.shape[0] == label.shape[0]
        )
        if loss_fn is not None:
            loss = loss_fn(output, label)
        elif classes:
            loss = F.cross_entropy(output.float(), label)
        else:
            loss = F.mse_loss(output.float(), label.to(output.device).float())
        self.loss += float(loss) * n
        self.samples += n
        if classes:
            self.correct += float((output.argmax(1) == label).sum())
        else:
            self.classified = False

    def result(self) -> tuple[float, float | None]:
        n = max(self.samples, 1)
        return self.loss / n, (self.correct / n if self.classified else None)


@contextlib.contextmanager
def _buffers_kept(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Put the buffers of ``modules`` back on exit (a train-mode forward updates them)."""
    saved = [
        (module, name, buffer, buffer.detach().clone())
        for module in modules
        for name, buffer in module._buffers.items()
        if buffer is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, buffer, value in saved:
                module._buffers[name] = buffer
                buffer.copy_(value)


def _level(value: float, thresholds: Mapping[str, float]) -> str | None:
    """The highest severity whose threshold ``value`` reaches (NaN reaches none)."""
    for level in reversed(SEVERITIES):
        if value >= thresholds[level]:
            return level
    return None


def _max_level(*levels: str | None) -> str | None:
    present = [level for level in levels if level is not None]
    return max(present, key=SEVERITIES.index) if present else None


def _fmt_channels(mask: torch.Tensor, limit: int = 8) -> str:
    indices = [int(i) for i in torch.nonzero(mask).flatten()]
    text = ", ".join(map(str, indices[:limit]))
    return text + (f", ... ({len(indices)} in all)" if len(indices) > limit else "")


# --------------------------------------------------------------------------------------------
# Checks that need no data


def _layer_status(name: str, module: nn.Module) -> LayerStatus:
    running_mean = getattr(module, "running_mean", None)
    if not isinstance(module, _BatchNorm) or _stays_in_eval(module):  # torchvision's frozen BN
        mode = "frozen"
    elif running_mean is None:
        mode = "batch-only"
    else:
        mode = "batch"
    weight = getattr(module, "weight", None)
    running_var = getattr(module, "running_var", None)
    momentum = getattr(module, "momentum", None)
    return LayerStatus(
        name=name,
        type=type(module).__name__,
        num_features=int(
            getattr(module, "num_features", 0)
            or (running_mean.numel() if running_mean is not None else 0)
        ),
        momentum=None if momentum is None else float(momentum),
        eps=float(getattr(module, "eps", 0.0)),
        mode=mode,
        running_var=None if running_var is None else running_var.detach().double().cpu(),
        gamma=None if weight is None else weight.detach().double().abs().cpu(),
    )


def _static_findings(
    name: str, module: nn.Module, status: LayerStatus, dead_gamma: float
) -> list[Finding]:
    findings = []
    nonfinite = {}
    for key in ("running_mean", "running_var", "weight", "bias"):
        tensor = getattr(module, key, None)
        if isinstance(tensor, torch.Tensor):
            count = int((~torch.isfinite(tensor.detach())).sum())
            if count:
                nonfinite[key] = count
    status.nonfinite = sum(nonfinite.values())
    if nonfinite:
        in_weights = "weight" in nonfinite or "bias" in nonfinite
        findings.append(
            Finding(
                "nonfinite-statistics",
                "error",
                name,
                "NaN/Inf in "
                + ", ".join(
                    f"{key} ({count} of {status.num_features})" for key, count in nonfinite.items()
                )
                + ": every eval-mode output through this layer is NaN.",
                (
                    "the affine parameters are corrupt: reload a checkpoint from before the "
                    "overflow; "
                    if in_weights
                    else "recalibrate the statistics (`batchnorm doctor --fix`, or "
                    "batchnorm.inference.recalibrate on training batches); "
                )
                + "to prevent it, keep statistics in float32 under AMP and train with "
                "batchnorm.nn layers' nonfinite='skip'",
                {f"nonfinite_{key}": count for key, count in nonfinite.items()},
            )
        )
    momentum = status.momentum
    if status.mode == "batch" and momentum is not None and momentum > 0.5:
        findings.append(
            Finding(
                "keras-momentum",
                "warning",
                name,
                f"momentum={momentum:g}: in PyTorch this is the weight of the NEW batch, so the "
                f"running statistics are {momentum:.0%} the last batch's. It is almost surely a "
                "Keras/Flax value (there it is the weight of the old value).",
                f"use momentum={1 - momentum:.3g} (1 - the Keras value), then recalibrate the "
                "statistics (`batchnorm doctor --fix`)",
                {"momentum": momentum, "pytorch_equivalent": 1 - momentum},
            )
        )
    gamma_dead = (
        status.gamma < dead_gamma
        if status.gamma is not None
        else torch.zeros(status.num_features, dtype=torch.bool)
    )
    var_dead = (
        status.running_var < status.eps
        if status.running_var is not None
        else torch.zeros(status.num_features, dtype=torch.bool)
    )
    dead = gamma_dead | var_dead
    status.dead_channels = int(dead.sum())
    if status.dead_channels:
        severity = "warning" if 4 * status.dead_channels >= status.num_features else "info"
        parts = []
        if gamma_dead.any():
            parts.append(
                f"|gamma| < {dead_gamma:g} in {int(gamma_dead.sum())} channel(s) "
                f"({_fmt_channels(gamma_dead)}): they output the constant beta"
            )
        if var_dead.any():
            parts.append(
                f"running_var < eps={status.eps:g} in {int(var_dead.sum())} channel(s) "
                f"({_fmt_channels(var_dead)}): eps dominates, their input is almost constant"
            )
        findings.append(
            Finding(
                "dead-channel",
                severity,
                name,
                f"{status.dead_channels} of {status.num_features} channels are dead: "
                + "; ".join(parts)
                + ".",
                "prune these channels (and the filters feeding them), or re-initialize them "
                "and fine-tune; check the learning rate and weight decay on gamma",
                {
                    "dead_channels": status.dead_channels,
                    "gamma_below_threshold": int(gamma_dead.sum()),
                    "running_var_below_eps": int(var_dead.sum()),
                    "num_features": status.num_features,
                },
            )
        )
    return findings


# --------------------------------------------------------------------------------------------
# Checks on data


def _small_batch_finding(
    name: str, module: nn.Module, status: LayerStatus, shape: tuple[int, ...], batch_size: int
) -> Finding | None:
    spatial = math.prod(shape[2:]) if len(shape) > 2 else 1
    n = batch_size
    ghost = getattr(module, "virtual_batch_size", None)
    if isinstance(ghost, int) and 0 < ghost < n:
        n = ghost
    m = n * spatial
    status.values_per_channel, status.samples_per_batch = m, n
    if status.mode != "batch":
        return None
    severity = _max_level(
        "error" if m < _SMALL_BATCH["error"] else None,
        "warning" if m < _SMALL_BATCH["warning"] or n < _FEW_SAMPLES else None,
        "info" if m < _SMALL_BATCH["info"] else None,
    )
    if severity is None:
        return None
    noise_mean = 1 / math.sqrt(m)
    noise_var = math.sqrt(2 / (m - 1)) if m > 1 else math.inf
    sync = "sync" in type(module).__name__.lower()
    if sync and severity != "error":
        severity = "info"
    message = (
        f"training statistics over m = {n} sample(s) x {spatial} position(s) = {m} value(s) per "
        f"channel: the batch mean is off by ~{noise_mean:.2g} standard deviations and the batch "
        f"variance by ~{noise_var:.0%} (1/sqrt(m), sqrt(2/(m-1)))"
    )
    if n < _FEW_SAMPLES and spatial > 1:
        message += (
            f"; values within a sample are correlated, so with {n} sample(s) the noise can reach "
            f"~{1 / math.sqrt(n):.2g}"
        )
    if m < 2:
        message += "; training mode cannot normalize one value per channel"
    if sync:
        message += " (per process: a synchronized layer pools over the processes)"
    return Finding(
        "small-batch",
        severity,
        name,
        message + ".",
        "train with larger batches per device, synchronize statistics across devices "
        "(SyncBatchNorm), or use a norm that needs no batch (GroupNorm) or batch renorm "
        "(batchnorm.nn.BatchRenorm); for inference recalibrate on larger batches",
        {
            "values_per_channel": m,
            "samples": n,
            "positions": spatial,
            "noise_mean_std_units": noise_mean,
            "noise_var_relative": noise_var,
        },
    )


def _stale_layer_finding(name: str, status: LayerStatus, layer: Any) -> Finding | None:
    eps = layer.eps
    shift = (layer.old_mean - layer.new_mean).abs() / torch.sqrt(layer.new_var + eps)
    ratio = (layer.old_var + eps) / (layer.new_var + eps)
    ratio = torch.maximum(ratio, 1 / ratio)
    status.mean_shift_per_channel, status.var_ratio_per_channel = shift, ratio
    status.population_var = layer.new_var
    status.mean_shift, status.var_ratio = float(shift.max()), float(ratio.max())
    if status.nonfinite:
        return None  # nonfinite-statistics says it
    severity = _max_level(
        *(
            level
            for level, (max_shift, max_ratio) in _STALE_LAYER.items()
            if status.mean_shift >= max_shift or status.var_ratio >= max_ratio
        )
    )
    if severity is None:
        return None
    worst = int(shift.argmax())
    return Finding(
        "stale-statistics",
        severity,
        name,
        f"the moving averages differ from the population statistics of the data (Algorithm 2, "
        f"{layer.count} values per channel): mean shift up to {status.mean_shift:.3g} population "
        f"standard deviations (channel {worst}), variance ratio up to {status.var_ratio:.3g}.",
        "recalibrate the statistics on training batches (`batchnorm doctor --fix`, or "
        "batchnorm.inference.recalibrate)",
        {
            "mean_shift": status.mean_shift,
            "var_ratio": status.var_ratio,
            "channels_shift_over_0.5": int((shift > 0.5).sum()),
            "values_per_channel": layer.count,
        },
    )


def _batch_stats_mode(model: nn.Module, layers: Iterable[nn.Module]) -> None:
    """Everything in eval mode (dropout off) except the batch-norm layers (batch statistics)."""
    model.eval()
    for module in layers:
        module.train()


def _with_labels(inputs: list[Any], labels: Any, batches: list[Any]) -> list[Any] | None:
    if labels is None:
        found = [_extract(batch)[1] for batch in batches]
        return found if all(label is not None for label in found) else None
    if isinstance(labels, torch.Tensor):
        sizes = [int(x.shape[0]) for x in inputs]
        if labels.shape[0] != sum(sizes):
            raise ValueError(
                f"diagnose: labels has {labels.shape[0]} rows but the batches hold {sum(sizes)} "
                "samples; pass one label per sample, or a list with one label tensor per batch"
            )
        return list(labels.split(sizes))
    found = list(itertools.islice(labels, len(inputs)))
    if len(found) != len(inputs):
        raise ValueError(
            f"diagnose: {len(found)} label batch(es) for {len(inputs)} input batch(es); pass one "
            "per batch"
        )
    return found


def _output_findings(
    diagnosis: Diagnosis,
    eval_outputs: list[torch.Tensor | None],
    recal_outputs: list[torch.Tensor | None] | None,
    train_outputs: list[torch.Tensor | None] | None,
    labels: list[Any] | None,
    loss_fn: Callable[..., Any] | None,
) -> list[Finding]:
    """``stale-statistics`` (model level) and ``train-eval-gap`` from the three passes."""
    metrics = diagnosis.metrics

    def gap(
        outputs: list[torch.Tensor | None] | None, reference: list[torch.Tensor | None] | None
    ) -> float | None:
        if not outputs or not reference:
            return None
        total = _Gap()
        for a, b in zip(outputs, reference):
            if a is None or b is None:
                return None
            total.add(a, b)
        return total.value

    metrics["output_change"] = gap(eval_outputs, recal_outputs)
    metrics["train_eval_gap"] = gap(eval_outputs, train_outputs)
    metrics["train_recalibrated_gap"] = gap(recal_outputs, train_outputs)
    if labels is not None:
        for suffix, outputs in (
            ("eval", eval_outputs),
            ("recalibrated", recal_outputs),
            ("train", train_outputs),
        ):
            if not outputs or any(o is None for o in outputs):
                continue
            score = _Score()
            try:
                for output, label in zip(outputs, labels):
                    score.add(output, label, loss_fn)  # type: ignore[arg-type]
            except Exception as error:  # noqa: BLE001 - a user loss_fn: report and go on
                diagnosis.notes.append(f"no loss/accuracy: {type(error).__name__}: {error}")
                break
            metrics[f"loss_{suffix}"], metrics[f"accuracy_{suffix}"] = score.result()

    def drop(worse: str, better: str) -> float | None:
        a, b = metrics.get(f"accuracy_{worse}"), metrics.get(f"accuracy_{better}")
        return None if a is None or b is None else b - a

    def accuracy_text(worse: str, better: str, labels_text: tuple[str, str]) -> str:
        a, b = metrics.get(f"accuracy_{worse}"), metrics.get(f"accuracy_{better}")
        if a is None or b is None:
            loss_a, loss_b = metrics.get(f"loss_{worse}"), metrics.get(f"loss_{better}")
            if loss_a is None or loss_b is None:
                return ""
            return f"; loss {loss_a:.4g} ({labels_text[0]}) vs {loss_b:.4g} ({labels_text[1]})"
        return f"; accuracy {a:.2%} ({labels_text[0]}) vs {b:.2%} ({labels_text[1]})"

    findings = []
    change = metrics["output_change"]
    if change is not None:
        accuracy_drop = drop("eval", "recalibrated")
        severity = _max_level(
            _level(change, _OUTPUT_CHANGE),
            None if accuracy_drop is None else _level(accuracy_drop, _ACCURACY_DROP),
        )
        if severity is not None:
            findings.append(
                Finding(
                    "stale-statistics",
                    severity,
                    None,
                    "replacing the moving averages by the population statistics of the data "
                    f"changes the model's outputs by {change:.3g} (relative)"
                    + accuracy_text("eval", "recalibrated", ("moving averages", "population"))
                    + ".",
                    "recalibrate on training batches (`batchnorm doctor --fix`, or "
                    "batchnorm.inference.recalibrate); if this data is not the training "
                    "distribution, this is AdaBN (batchnorm.adapt.adabn)",
                    {
                        "output_change": change,
                        **({} if accuracy_drop is None else {"accuracy_gain": accuracy_drop}),
                    },
                )
            )
    gap_value = metrics["train_eval_gap"]
    if gap_value is not None:
        accuracy_drop = drop("eval", "train")
        severity = _max_level(
            _level(gap_value, _OUTPUT_CHANGE),
            None if accuracy_drop is None else _level(accuracy_drop, _ACCURACY_DROP),
        )
        if severity is not None:
            recal_gap = metrics["train_recalibrated_gap"]
            recal_gain = drop("eval", "recalibrated")
            stale_cause = recal_gap is not None and (
                recal_gap < 0.75 * gap_value
                or (recal_gain is not None and _level(recal_gain, _ACCURACY_DROP) is not None)
            )
            if stale_cause:
                cause = (
                    f"; with population statistics it is {recal_gap:.3g}, so the moving averages "
                    "are a cause (see stale-statistics)"
                )
                remedy = "recalibrate (`batchnorm doctor --fix`)"
            else:
                cause = (
                    ""
                    if recal_gap is None
                    else f"; with population statistics it stays at {recal_gap:.3g}, so the "
                    "outputs depend on the batch (noisy statistics of small or non-i.i.d. "
                    "batches)"
                )
                remedy = (
                    "evaluate in eval mode with recalibrated statistics; for training, larger or "
                    "shuffled batches, GhostBatchNorm/BatchRenorm, or GroupNorm"
                )
            findings.append(
                Finding(
                    "train-eval-gap",
                    severity,
                    None,
                    f"with batch statistics (train mode) the outputs differ from eval mode's by "
                    f"{gap_value:.3g} (relative)"
                    + accuracy_text("eval", "train", ("eval", "train mode"))
                    + cause
                    + ".",
                    remedy,
                    {
                        "train_eval_gap": gap_value,
                        "train_recalibrated_gap": recal_gap,
                        **({} if accuracy_drop is None else {"accuracy_drop": accuracy_drop}),
                    },
                )
            )
    return findings
