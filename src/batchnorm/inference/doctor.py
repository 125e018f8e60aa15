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

import copy
import itertools
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from batchnorm.inference.doctor_checks import (
    _batch_norm_layers,
    _batch_stats_mode,
    _buffers_kept,
    _extract,
    _first_tensor,
    _Gap,
    _layer_status,
    _meant_frozen,
    _model_device,
    _output_findings,
    _small_batch_finding,
    _stale_layer_finding,
    _static_findings,
    _to,
    _with_labels,
)
from batchnorm.inference.doctor_findings import (
    KINDS,
    SEVERITIES,
    Diagnosis,
    Finding,
    LayerStatus,
)
from batchnorm.inference.folding import fold
from batchnorm.inference.intake import check_model
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
    model = check_model(model, "diagnose", lift="copy")
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
    check_model(model, "fix", lift="no")  # the copy's batch-norm calls are lifted by recalibrate
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
