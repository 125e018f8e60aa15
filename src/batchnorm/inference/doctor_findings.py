"""The result of a batch-norm diagnosis: findings, per-layer status, severities, thresholds.

See :mod:`batchnorm.inference.doctor` for what each finding kind measures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["KINDS", "SEVERITIES", "Diagnosis", "Finding", "LayerStatus"]

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
