"""What is wrong with a model's batch norm: :func:`diagnose` and :func:`fix`.

The usual batch-norm trouble is not the forward pass but the layer's state: moving averages that
lag the weights (eval mode far worse than train mode, pytorch#5406), a Keras momentum put into
PyTorch, a frozen layer that still updates, dead channels, statistics from a per-device batch of
2, NaN that an fp16 overflow wrote into ``running_var`` (pytorch#88474). :func:`diagnose` checks a
model for each of these on a few batches of data and returns a :class:`Diagnosis`: a per-layer
table and a list of :class:`Finding` s, each with the layer, a ``kind``, a severity, the numbers
behind it and the remedy. The user's model is never modified: statistics are measured on copies.

Finding kinds (:data:`KINDS`):

- ``stale-statistics``: the moving averages against population statistics recomputed on the data
  by Algorithm 2 (:func:`batchnorm.inference.recalibrate`): the mean shift in population standard
  deviations ``max_c |mu_run - mu_pop| / sqrt(var_pop + eps)``, the variance ratio
  ``max_c max(r, 1/r)`` with ``r = (var_run + eps) / (var_pop + eps)``, and (one model-level
  finding) the relative change of the model's outputs, loss and accuracy when the moving
  averages are replaced by the population statistics.
- ``train-eval-gap``: the outputs with batch statistics (the batch-norm layers in train mode,
  everything else in eval mode, so dropout is off) against eval mode, on the same batches.
- ``nonfinite-statistics``: NaN/Inf in ``running_mean``/``running_var``/``weight``/``bias``.
- ``dead-channel``: ``|gamma_c| < dead_gamma`` (the channel outputs the constant ``beta_c``), or
  ``running_var_c < eps`` (eps dominates the denominator: the channel's input is almost constant).
- ``small-batch``: the values per channel ``m = n * prod(spatial)`` that training statistics are
  taken over (``n`` the batch size, or the ghost batch size), with the expected noise of the batch
  statistics: ``1/sqrt(m)`` population standard deviations for the mean and ``sqrt(2/(m-1))``
  relative for the variance (independent Gaussian values; values within one sample are
  correlated, so with few samples the noise is between that and ``1/sqrt(n)``).
- ``keras-momentum``: ``momentum > 0.5``: PyTorch's momentum weighs the new batch (0.1), Keras and
  Flax weigh the old value (0.99); 0.99 in PyTorch keeps the statistics of the last batch only.
- ``frozen-but-updating``: a layer meant to be frozen (affine parameters with
  ``requires_grad=False``, or a class named ``*Frozen*``) whose running statistics change in a
  ``model.train()`` forward.
- ``foldable``: the layers :func:`batchnorm.inference.fold` can fold into a Linear/convolution.
- ``no-batch-norm``: the model has none (the only finding then).

Severities (:data:`SEVERITIES`), in increasing order: ``"info"`` (worth knowing, nothing to fix),
``"warning"`` (likely to cost accuracy; the remedy is advised) and ``"error"`` (the model is
broken as it stands: NaN outputs, eval mode unusable). A healthy trained model gets nothing above
``"info"``.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.inference.folding import fold
from batchnorm.inference.recalibration import recalibrate

__all__ = [
    "KINDS",
    "SEVERITIES",
    "Diagnosis",
    "Finding",
    "FixReport",
    "LayerStatus",
    "diagnose",
    "fix",
]

SEVERITIES: tuple[str, ...] = ("info", "warning", "error")
KINDS: tuple[str, ...] = (
    "no-batch-norm",
    "nonfinite-statistics",
    "dead-channel",
    "keras-momentum",
    "frozen-but-updating",
    "small-batch",
    "stale-statistics",
    "train-eval-gap",
    "foldable",
)

# Thresholds (documented in docs/doctor.md). Mean shift in population standard deviations and
# variance ratio of one layer's moving averages against Algorithm 2's population statistics.
_STALE_LAYER = {"info": (0.1, 1.25), "warning": (0.5, 2.0), "error": (3.0, 10.0)}
# Relative change of the model's outputs (||a - b|| / ||b||), for stale-statistics (moving
# averages vs population statistics) and train-eval-gap (batch statistics vs moving averages).
_OUTPUT_CHANGE = {"info": 0.05, "warning": 0.25, "error": 1.0}
# Accuracy lost, as a fraction (0.02 = two points), when labels are given.
_ACCURACY_DROP = {"info": 0.005, "warning": 0.02, "error": 0.2}
# Values per channel in a training batch below which the statistics are noisy.
_SMALL_BATCH = {"info": 256, "warning": 32, "error": 2}
_FEW_SAMPLES = 4  # fewer samples per batch than this: a warning whatever the spatial size


@dataclass
class Finding:
    """One problem (or fact) about a model's batch norm.

    Attributes:
        kind: one of :data:`KINDS`.
        severity: ``"info"``, ``"warning"`` or ``"error"`` (:data:`SEVERITIES`).
        layer: the qualified module name, ``""`` for a model that is itself the layer, or
            ``None`` for a finding about the whole model.
        message: what is wrong, in one sentence with the numbers.
        remedy: what to do about it.
        numbers: the measurements behind it, by name.
    """

    kind: str
    severity: str
    layer: str | None
    message: str
    remedy: str
    numbers: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        """The layer name for display: ``(model)`` for the whole model or a bare layer."""
        return "(model)" if not self.layer else self.layer

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict."""
        return {
            "kind": self.kind,
            "severity": self.severity,
            "layer": self.layer,
            "message": self.message,
            "remedy": self.remedy,
            "numbers": dict(self.numbers),
        }

    def __str__(self) -> str:
        return (
            f"[{self.severity}] {self.kind} at {self.where}: {self.message} Remedy: {self.remedy}"
        )


@dataclass
class LayerStatus:
    """One batch-norm layer as :func:`diagnose` measured it (a row of the table).

    Attributes:
        name: qualified module name.
        type: class name.
        num_features: channels C.
        momentum: the layer's momentum (None: cumulative average).
        eps: the layer's eps.
        mode: ``"batch"`` (batch statistics in training), ``"frozen"`` (stays in eval mode under
            ``model.train()``) or ``"batch-only"`` (no running statistics).
        values_per_channel: ``m`` of a training batch of the data (None before any data).
        samples_per_batch: ``n``, the samples (or ghost-batch samples) ``m`` comes from.
        mean_shift: max over channels of ``|mu_run - mu_pop| / sqrt(var_pop + eps)``.
        var_ratio: max over channels of ``max(r, 1/r)``, ``r = (var_run + eps)/(var_pop + eps)``.
        mean_shift_per_channel, var_ratio_per_channel: the same per channel, shape (C,).
        dead_channels: channels with ``|gamma| < dead_gamma`` or ``running_var < eps``.
        nonfinite: NaN/Inf entries in the running statistics and affine parameters.
        running_var, population_var: shape (C,) (population_var None without recalibration).
        gamma: ``|weight|``, shape (C,) (None without affine parameters).
    """

    name: str
    type: str
    num_features: int
    momentum: float | None
    eps: float
    mode: str
    values_per_channel: int | None = None
    samples_per_batch: int | None = None
    mean_shift: float | None = None
    var_ratio: float | None = None
    mean_shift_per_channel: torch.Tensor | None = None
    var_ratio_per_channel: torch.Tensor | None = None
    dead_channels: int = 0
    nonfinite: int = 0
    running_var: torch.Tensor | None = None
    population_var: torch.Tensor | None = None
    gamma: torch.Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (per-channel tensors as lists)."""

        def listed(t: torch.Tensor | None) -> list[float] | None:
            return None if t is None else [float(v) for v in t]

        return {
            "name": self.name,
            "type": self.type,
            "num_features": self.num_features,
            "momentum": self.momentum,
            "eps": self.eps,
            "mode": self.mode,
            "values_per_channel": self.values_per_channel,
            "samples_per_batch": self.samples_per_batch,
            "mean_shift": self.mean_shift,
            "var_ratio": self.var_ratio,
            "dead_channels": self.dead_channels,
            "nonfinite": self.nonfinite,
            "mean_shift_per_channel": listed(self.mean_shift_per_channel),
            "var_ratio_per_channel": listed(self.var_ratio_per_channel),
            "running_var": listed(self.running_var),
            "population_var": listed(self.population_var),
            "gamma": listed(self.gamma),
        }


@dataclass
class Diagnosis:
    """The result of :func:`diagnose`; ``print(diagnosis)`` shows the table and the findings.

    Attributes:
        findings: every finding, most severe first.
        layers: the batch-norm layers by qualified name, in model order.
        metrics: model-level measurements: ``num_batches``, ``num_samples``, and where measured
            ``output_change`` (moving averages vs population statistics), ``train_eval_gap``
            (batch statistics vs moving averages), ``train_recalibrated_gap`` (batch statistics vs
            population statistics), and with labels ``loss_eval``, ``loss_recalibrated``,
            ``loss_train``, ``accuracy_eval``, ``accuracy_recalibrated``, ``accuracy_train``.
        notes: remarks on what could not be measured, and why.
    """

    findings: list[Finding] = field(default_factory=list)
    layers: dict[str, LayerStatus] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def worst(self) -> str | None:
        """The highest severity among the findings (None when there are none)."""
        if not self.findings:
            return None
        return max((f.severity for f in self.findings), key=SEVERITIES.index)

    @property
    def healthy(self) -> bool:
        """True when no finding is above ``"info"``."""
        return self.worst in (None, "info")

    def of_kind(self, kind: str) -> list[Finding]:
        """The findings of one kind (see :data:`KINDS`)."""
        if kind not in KINDS:
            raise ValueError(f"unknown finding kind {kind!r}; the kinds are {list(KINDS)}")
        return [f for f in self.findings if f.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict."""
        return {
            "worst": self.worst,
            "findings": [f.to_dict() for f in self.findings],
            "layers": {name: layer.to_dict() for name, layer in self.layers.items()},
            "metrics": dict(self.metrics),
            "notes": list(self.notes),
        }

    def table(self) -> str:
        """The per-layer table as aligned text."""
        header = ("layer", "type", "C", "momentum", "values/ch", "mean shift", "var ratio", "dead")
        rows = []
        for layer in self.layers.values():
            rows.append(
                (
                    layer.name or "(model)",
                    layer.type if layer.mode == "batch" else f"{layer.type} ({layer.mode})",
                    str(layer.num_features),
                    "None" if layer.momentum is None else f"{layer.momentum:g}",
                    "-" if layer.values_per_channel is None else str(layer.values_per_channel),
                    "-" if layer.mean_shift is None else f"{layer.mean_shift:.3g}",
                    "-" if layer.var_ratio is None else f"{layer.var_ratio:.3g}",
                    str(layer.dead_channels),
                )
            )
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = []
        for row in [header, *rows]:
            left = [row[i].ljust(widths[i]) for i in range(2)]
            lines.append("  ".join(left + [c.rjust(w) for c, w in zip(row[2:], widths[2:])]))
        return "\n".join(lines)

    def summary(self) -> str:
        """One line: how many findings of each severity."""
        if not self.findings:
            return "No findings."
        counts = [
            f"{sum(f.severity == s for f in self.findings)} {s}"
            for s in reversed(SEVERITIES)
            if any(f.severity == s for f in self.findings)
        ]
        verdict = "healthy (nothing above info)" if self.healthy else f"worst: {self.worst}"
        return f"{len(self.findings)} finding(s): {', '.join(counts)}; {verdict}."

    def __str__(self) -> str:
        lines = []
        if self.layers:
            lines += [self.table(), ""]
        m = self.metrics
        for key, text in (
            ("output_change", "outputs, moving averages vs population statistics"),
            ("train_eval_gap", "outputs, batch statistics vs moving averages"),
            ("train_recalibrated_gap", "outputs, batch statistics vs population statistics"),
        ):
            if m.get(key) is not None:
                lines.append(f"{text}: relative change {m[key]:.3g}")
        for key, text in (("accuracy", "accuracy"), ("loss", "loss")):
            if m.get(f"{key}_eval") is not None:
                parts = [
                    f"{label} {m[f'{key}_{suffix}']:.4g}"
                    for suffix, label in (
                        ("eval", "eval"),
                        ("recalibrated", "recalibrated"),
                        ("train", "batch statistics"),
                    )
                    if m.get(f"{key}_{suffix}") is not None
                ]
                lines.append(f"{text}: " + ", ".join(parts))
        lines.append(self.summary())
        lines += [f"  {finding}" for finding in self.findings]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


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
    if _stays_in_eval(module):
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


def diagnose(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    labels: Any = None,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    num_batches: int | None = None,
    batch_size: int | None = None,
    dead_gamma: float = 1e-3,
    fold_check: bool = True,
    progress: bool = False,
) -> Diagnosis:
    """Find what is wrong with a model's batch norm: see the module docstring for each kind.

    The model is measured on copies (``copy.deepcopy``) and under ``torch.no_grad``: its
    parameters, buffers and train/eval flags are left exactly as they were. Three forward passes
    per batch compare eval mode (the moving averages), eval mode with population statistics
    recomputed on ``batches`` (Algorithm 2, :func:`batchnorm.inference.recalibrate`), and the
    batch-norm layers in train mode (batch statistics, everything else in eval mode).

    Args:
        model: the network (torch.nn batch norm, :mod:`batchnorm.nn` layers and variants, or
            none at all).
        batches: batches of data like the training data: tensors, ``(input, label, ...)``
            tuples or dicts with an ``"input"`` key. They are held in memory (see
            ``num_batches``).
        labels: one label tensor per batch (a list), or one tensor for all samples; by default
            the second element of tuple batches, if every batch has one.
        loss_fn: ``loss_fn(output, label) -> scalar``; default cross-entropy for integer labels,
            mean squared error otherwise. Accuracy is reported for integer labels.
        num_batches: use at most this many batches.
        batch_size: the training batch size per device, if not the data's (for ``small-batch``).
        dead_gamma: ``|gamma|`` below which a channel is dead.
        fold_check: check which layers :func:`batchnorm.inference.fold` can fold (``foldable``).
        progress: a progress bar (tqdm, on stderr) over the batches.

    Returns:
        A :class:`Diagnosis`.

    Raises:
        TypeError, ValueError: unusable batches or labels (a message says which and why).

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8, momentum=0.99))
        >>> batches = [torch.randn(32, 4) * 3 + 1 for _ in range(4)]
        >>> diagnosis = diagnose(net, batches)  # never trained: running statistics are 0 and 1
        >>> sorted({f.kind for f in diagnosis.findings if f.severity != "info"})
        ['keras-momentum', 'stale-statistics', 'train-eval-gap']
        >>> fixed, report = fix(net, batches)
        >>> sorted({f.kind for f in diagnose(fixed, batches).findings if f.severity != "info"})
        ['keras-momentum']
    """
    if isinstance(batches, torch.Tensor):
        raise TypeError(
            f"diagnose: batches is a single tensor of shape {tuple(batches.shape)}; pass an "
            "iterable of batches, for example x.split(64)"
        )
    if num_batches is not None and (isinstance(num_batches, bool) or num_batches < 1):
        raise ValueError(f"diagnose: num_batches must be a positive int, got {num_batches!r}")
    diagnosis = Diagnosis()
    layers = _batch_norm_layers(model)
    if not layers:
        diagnosis.findings.append(
            Finding(
                "no-batch-norm",
                "info",
                None,
                f"the model ({type(model).__name__}) has no batch-norm layer; there is nothing "
                "to diagnose.",
                "none needed",
            )
        )
        return diagnosis

    findings: list[Finding] = []
    for name, module in layers:
        status = _layer_status(name, module)
        diagnosis.layers[name] = status
        findings += _static_findings(name, module, status, dead_gamma)

    batch_list = list(itertools.islice(batches, num_batches))
    if not batch_list:
        raise ValueError("diagnose: batches yielded no batch; pass a non-empty iterable")
    device = _model_device(model)
    inputs = [_to(_extract(batch)[0], device) for batch in batch_list]
    label_list = _with_labels(inputs, labels, batch_list)
    if label_list is not None:
        label_list = [_to(label, device) for label in label_list]
    sizes = [int(x.shape[0]) for x in inputs if isinstance(x, torch.Tensor) and x.dim()]
    diagnosis.metrics["num_batches"] = len(inputs)
    diagnosis.metrics["num_samples"] = sum(sizes) if len(sizes) == len(inputs) else None

    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=3 * len(inputs), desc="diagnosing batch norm", unit="pass", leave=False
            )
        except ImportError:
            bar = None

    def tick() -> None:
        if bar is not None:
            bar.update(1)

    work = copy.deepcopy(model)
    work_layers = dict(_batch_norm_layers(work))
    shapes: dict[str, tuple[int, ...]] = {}

    def shape_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor):
                shapes.setdefault(name, tuple(args[0].shape))

        return hook

    handles = [m.register_forward_pre_hook(shape_hook(n)) for n, m in work_layers.items()]
    eval_outputs: list[torch.Tensor | None] = []
    train_outputs: list[torch.Tensor | None] | None = []
    try:
        with torch.no_grad():
            work.eval()
            for x in inputs:
                eval_outputs.append(_first_tensor(work(x)))
                tick()
        for handle in handles:
            handle.remove()
        handles = []
        # Batch statistics: the batch-norm layers in train mode, their buffers put back.
        with torch.no_grad(), _buffers_kept(work_layers.values()):
            _batch_stats_mode(work, work_layers.values())
            for x in inputs:
                try:
                    train_outputs.append(_first_tensor(work(x)))
                except (ValueError, RuntimeError) as error:
                    diagnosis.notes.append(
                        f"batch statistics: the model failed in train mode ({error}); no "
                        "train-eval comparison"
                    )
                    train_outputs = None
                    break
                finally:
                    tick()
        # A layer meant to be frozen must keep its statistics under model.train().
        frozen = {name: why for name, m in work_layers.items() if (why := _meant_frozen(m))}
        if frozen:
            with torch.no_grad(), _buffers_kept(work_layers.values()):
                before = {
                    name: (
                        work_layers[name].running_mean.clone(),
                        work_layers[name].running_var.clone(),
                    )
                    for name in frozen
                    if getattr(work_layers[name], "running_mean", None) is not None
                }
                work.train()
                try:
                    work(inputs[0])
                except (ValueError, RuntimeError) as error:
                    diagnosis.notes.append(f"model.train() forward failed ({error})")
                    before = {}
                for name, (mean, var) in before.items():
                    module = work_layers[name]
                    if torch.equal(mean, module.running_mean) and torch.equal(
                        var, module.running_var
                    ):
                        continue
                    change = float((module.running_mean - mean).abs().max())
                    findings.append(
                        Finding(
                            "frozen-but-updating",
                            "warning",
                            name,
                            f"the layer looks frozen ({frozen[name]}) but model.train() puts it "
                            "in train mode: one forward changed running_mean by up to "
                            f"{change:.3g}, and it normalizes with batch statistics.",
                            "keep it in eval mode under model.train(): replace it by "
                            "batchnorm.nn.FrozenBatchNorm.from_batchnorm(layer) (or "
                            "FrozenBatchNorm.convert_frozen_batchnorm(model)), or call "
                            "layer.eval() after every model.train()",
                            {"running_mean_change": change},
                        )
                    )
        work.eval()
    finally:
        for handle in handles:
            handle.remove()

    batch_size = batch_size or (min(sizes) if sizes else None)
    for name, module in layers:
        status = diagnosis.layers[name]
        if name in shapes and batch_size:
            finding = _small_batch_finding(name, module, status, shapes[name], batch_size)
            if finding is not None:
                findings.append(finding)
        elif status.mode == "batch" and name not in shapes:
            diagnosis.notes.append(f"layer {name!r} saw no batch (the forward does not call it)")

    # Population statistics (Algorithm 2) on the data, on another copy.
    recalibrated: nn.Module | None = copy.deepcopy(model)
    report = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = recalibrate(recalibrated, list(inputs), progress=False, allow_unused=True)
        diagnosis.notes += [str(w.message) for w in caught]
    except (ValueError, RuntimeError, TypeError) as error:
        diagnosis.notes.append(f"no population statistics: {error}")
        recalibrated = None
    if report is not None:
        for name, layer in report.layers.items():
            finding = _stale_layer_finding(name, diagnosis.layers[name], layer)
            if finding is not None:
                findings.append(finding)

    recal_outputs: list[torch.Tensor | None] = []
    if recalibrated is not None:
        with torch.no_grad():
            recalibrated.eval()
            for x in inputs:
                recal_outputs.append(_first_tensor(recalibrated(x)))
                tick()
    if bar is not None:
        bar.close()

    findings += _output_findings(
        diagnosis, eval_outputs, recal_outputs or None, train_outputs, label_list, loss_fn
    )

    if fold_check:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, fold_report = fold(model, check_input=inputs[0], return_report=True)
            if fold_report.folded:
                pairs = [f"{p.bn} into {p.layer}" for p in fold_report.folded]
                findings.append(
                    Finding(
                        "foldable",
                        "info",
                        None,
                        f"{len(pairs)} of {len(layers)} batch-norm layer(s) can be folded into "
                        f"the layer before them for inference ({'; '.join(pairs[:6])}"
                        + (", ..." if len(pairs) > 6 else "")
                        + f"); max output difference {fold_report.max_abs_diff:.3g}.",
                        "for deployment, batchnorm.inference.fold(model) (or `batchnorm doctor "
                        "--fix --fold`) removes them, after recalibration",
                        {
                            "foldable": len(pairs),
                            "not_foldable": len(fold_report.not_folded),
                            "max_abs_diff": fold_report.max_abs_diff,
                        },
                    )
                )
        except Exception as error:  # noqa: BLE001 - a diagnosis, not a fold: report and go on
            diagnosis.notes.append(f"fold check failed: {type(error).__name__}: {error}")

    order = {name: index for index, (name, _) in enumerate(layers)}
    findings.sort(
        key=lambda f: (-SEVERITIES.index(f.severity), order.get(f.layer, -1) if f.layer else -1)
    )
    diagnosis.findings = findings
    return diagnosis


@dataclass
class FixReport:
    """What :func:`fix` did, and the check of its outputs.

    Attributes:
        recalibration: the :class:`batchnorm.inference.RecalibrationReport`.
        fold: the :class:`batchnorm.inference.FoldReport` (None without folding).
        gap_before, gap_after: relative output difference between eval mode and batch
            statistics, before and after the fix (recalibration should shrink it).
        finite: whether every eval output of the fixed model is finite.
    """

    recalibration: Any
    fold: Any = None
    gap_before: float | None = None
    gap_after: float | None = None
    finite: bool = True

    @property
    def ok(self) -> bool:
        """The check passed: finite outputs, no larger a train-eval gap than before."""
        if not self.finite:
            return False
        if self.gap_before is None or self.gap_after is None or math.isnan(self.gap_before):
            return True
        return self.gap_after <= self.gap_before * 1.05 + 1e-6

    def __str__(self) -> str:
        lines = [str(self.recalibration)]
        if self.fold is not None:
            lines.append(str(self.fold))
        if self.gap_before is not None and self.gap_after is not None:
            lines.append(
                "check: outputs, batch statistics vs eval mode: relative difference "
                f"{self.gap_before:.3g} before, {self.gap_after:.3g} after"
            )
        lines.append("check: every output finite" if self.finite else "check: NaN/Inf outputs")
        lines.append("fix: ok" if self.ok else "fix: FAILED the check")
        return "\n".join(lines)


def fix(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    fold_layers: bool = False,
    num_batches: int | None = None,
    progress: bool = False,
) -> tuple[nn.Module, FixReport]:
    """The safe remedies, on a copy: recalibrate (Algorithm 2), then optionally fold.

    Recalibration replaces stale, Keras-momentum and non-finite moving averages by population
    statistics of ``batches`` (which should be training data). The check runs the copy in eval
    mode on the batches: every output must be finite, and the relative difference from the
    outputs with batch statistics must not grow. Folding (``fold_layers``) checks its own outputs
    against the recalibrated model (:func:`batchnorm.inference.fold`).

    Args:
        model: the network; not modified.
        batches: training batches (as for :func:`diagnose`).
        fold_layers: also fold batch norms into the preceding Linear/convolution layers.
        num_batches: use at most this many batches.
        progress: a progress bar over the recalibration.

    Returns:
        ``(fixed, report)``: the fixed copy, in eval mode, and a :class:`FixReport` (check
        ``report.ok``).

    Raises:
        ValueError: no batch-norm layer to recalibrate, or unusable batches.
        batchnorm.inference.FoldMismatchError: the folded model's outputs differ.
    """
    batch_list = list(itertools.islice(batches, num_batches))
    if not batch_list:
        raise ValueError("fix: batches yielded no batch; pass a non-empty iterable")
    device = _model_device(model)
    inputs = [_to(_extract(batch)[0], device) for batch in batch_list]
    fixed = copy.deepcopy(model)
    layers = [m for _, m in _batch_norm_layers(fixed)]

    def gap_to_batch_statistics(candidate: nn.Module) -> tuple[float | None, bool]:
        total, finite = _Gap(), True
        with torch.no_grad():
            candidate.eval()
            outputs = [_first_tensor(candidate(x)) for x in inputs]
            finite = all(o is None or bool(torch.isfinite(o).all()) for o in outputs)
            try:
                with _buffers_kept(layers):
                    _batch_stats_mode(fixed, layers)
                    for x, output in zip(inputs, outputs):
                        reference = _first_tensor(fixed(x))
                        if output is None or reference is None:
                            return None, finite
                        total.add(output, reference)
            except (ValueError, RuntimeError):
                return None, finite
            finally:
                candidate.eval()
                fixed.eval()
        return total.value, finite

    gap_before, _ = gap_to_batch_statistics(fixed)
    recalibration = recalibrate(fixed, inputs, progress=progress, allow_unused=True)
    fixed.eval()
    gap_after, finite = gap_to_batch_statistics(fixed)
    report = FixReport(recalibration, gap_before=gap_before, gap_after=gap_after, finite=finite)
    if fold_layers:
        fixed, report.fold = fold(fixed, check_input=inputs[0], return_report=True)
    fixed.eval()
    return fixed, report
