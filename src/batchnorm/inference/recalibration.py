"""Population statistics recomputed after training: the paper's Algorithm 2 ("precise BN").

During training, PyTorch keeps a moving average of the batch statistics. Algorithm 2 of Ioffe &
Szegedy (2015) instead freezes the network and averages the statistics of many training
mini-batches. :func:`recalibrate` does that for every batch-norm layer of a model, per channel and
in float64::

    E[x]   = sum_b m_b mu_b / sum_b m_b                (count-weighted mean of the mu_B)
    Var[x] = sum_b m_b var_b / sum_b (m_b - 1)         (pooled unbiased variance)

with ``mu_b`` and ``var_b`` the mean and biased variance of mini-batch ``b`` at the layer's input
and ``m_b`` its number of values per channel (N times the spatial size). For batches of one size
``m`` these are Algorithm 2's ``E_B[mu_B]`` and ``m/(m-1) E_B[var_B]``; batches of different sizes
(the last batch of a loader) are weighted by their size. The formulas are those of
:class:`batchnorm.reference.PopulationAccumulator`, and the tests check that the two agree.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["LayerRecalibration", "RecalibrationReport", "recalibrate"]


@dataclass
class LayerRecalibration:
    """What :func:`recalibrate` did to one batch-norm layer.

    ``old_*`` are the buffers before recalibration, ``new_*`` the population statistics written in
    their place (float64, on the CPU; variances unbiased, as ``running_var`` stores them).

    Attributes:
        name: qualified module name (``""`` when the model is the layer itself).
        num_features: channels C.
        eps: the layer's eps.
        num_batches: forward calls of the layer that contributed (one per batch, unless the layer
            is called several times per forward).
        count: values per channel over those calls, ``sum_b m_b``.
        old_mean, old_var, new_mean, new_var: shape (C,).
    """

    name: str
    num_features: int
    eps: float
    num_batches: int
    count: int
    old_mean: torch.Tensor
    old_var: torch.Tensor
    new_mean: torch.Tensor
    new_var: torch.Tensor

    @property
    def mean_shift(self) -> float:
        """``max_c |old_mean - new_mean| / sqrt(new_var + eps)``.

        How far the stored mean was off, in population standard deviations: 0.5 means eval mode
        had shifted that channel's normalized output by half a unit.
        """
        shift = (self.old_mean - self.new_mean).abs() / torch.sqrt(self.new_var + self.eps)
        return float(shift.max())

    @property
    def var_change(self) -> float:
        """``max_c |old_var - new_var| / (new_var + eps)``: the old variance's relative error."""
        return float(((self.old_var - self.new_var).abs() / (self.new_var + self.eps)).max())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (tensors as lists)."""
        return {
            "name": self.name,
            "num_features": self.num_features,
            "eps": self.eps,
            "num_batches": self.num_batches,
            "count": self.count,
            "mean_shift": self.mean_shift,
            "var_change": self.var_change,
            "old_mean": self.old_mean.tolist(),
            "old_var": self.old_var.tolist(),
            "new_mean": self.new_mean.tolist(),
            "new_var": self.new_var.tolist(),
        }


@dataclass
class RecalibrationReport:
    """The result of :func:`recalibrate`; ``print(report)`` shows a table.

    Attributes:
        layers: the recalibrated layers, by qualified module name.
        num_batches: batches that contributed (skipped batches not included).
        num_samples: sum of the inputs' leading dimension over those batches; ``None`` with a
            user ``forward=``, whose batches are opaque.
        skipped_batches: ``(batch index, layer name, input shape)`` of batches left out because a
            layer saw one value per channel there (training mode cannot normalize them).
        skipped_layers: batch-norm layers left unchanged, with the reason.
        nonfinite_batches: ``(batch index, layer name, (values per channel, channels))`` of
            batches left out because their statistics at that layer hold NaN/Inf (a layer with
            ``nonfinite="raise"`` raises instead); NaN never reaches the running statistics.
    """

    layers: dict[str, LayerRecalibration] = field(default_factory=dict)
    num_batches: int = 0
    num_samples: int | None = None
    skipped_batches: list[tuple[int, str, tuple[int, ...]]] = field(default_factory=list)
    skipped_layers: dict[str, str] = field(default_factory=dict)
    nonfinite_batches: list[tuple[int, str, tuple[int, ...] | None]] = field(default_factory=list)

    @property
    def max_mean_shift(self) -> float:
        """The largest :attr:`LayerRecalibration.mean_shift` over layers."""
        return max((layer.mean_shift for layer in self.layers.values()), default=0.0)

    @property
    def max_var_change(self) -> float:
        """The largest :attr:`LayerRecalibration.var_change` over layers."""
        return max((layer.var_change for layer in self.layers.values()), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict."""
        return {
            "num_batches": self.num_batches,
            "num_samples": self.num_samples,
            "max_mean_shift": self.max_mean_shift,
            "max_var_change": self.max_var_change,
            "layers": {name: layer.to_dict() for name, layer in self.layers.items()},
            "skipped_batches": [
                {"batch": index, "layer": name, "shape": list(shape)}
                for index, name, shape in self.skipped_batches
            ],
            "skipped_layers": dict(self.skipped_layers),
        }

    def __str__(self) -> str:
        samples = "" if self.num_samples is None else f", {self.num_samples} samples"
        lines = [
            f"Recalibrated {len(self.layers)} batch-norm layer(s) over {self.num_batches} "
            f"batch(es){samples} (Algorithm 2, count-weighted)."
        ]
        header = ("layer", "channels", "batches", "values/channel", "mean shift", "var change")
        rows = [
            (
                name or "(model)",
                str(layer.num_features),
                str(layer.num_batches),
                str(layer.count),
                f"{layer.mean_shift:.3g}",
                f"{layer.var_change:.3g}",
            )
            for name, layer in self.layers.items()
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
            lines.append("  ".join(cells))
        lines.append(
            "mean shift = max |old - new mean| / sqrt(new var + eps); "
            "var change = max |old - new var| / (new var + eps)"
        )
        lines.extend(
            f"skipped layer {name or '(model)'}: {why}" for name, why in self.skipped_layers.items()
        )
        for index, name, shape in self.skipped_batches:
            lines.append(
                f"skipped batch #{index}: one value per channel at {name!r}, input {shape}"
            )
        for index, name, _ in self.nonfinite_batches:
            lines.append(f"skipped batch #{index}: NaN/Inf statistics at {name!r}")
        return "\n".join(lines)


class _OneValuePerChannel(Exception):
    """Raised by the statistics hook to abandon a batch that training mode cannot normalize."""


@dataclass
class _Accumulator:
    """Float64 sums for one layer, kept on the layer's device (no host synchronization).

    ``weighted_mean = sum_b m_b mu_b`` and ``weighted_var = sum_b m_b var_b`` (biased var_b),
    each of shape (C,); ``count = sum_b m_b``; ``dof = sum_b (m_b - 1)``.
    """

    calls: int = 0
    count: int = 0
    dof: int = 0
    weighted_mean: torch.Tensor | float = 0.0
    weighted_var: torch.Tensor | float = 0.0

    def add_call(self, statistics: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        """One forward call of the layer: ``(m_b, mu_b, var_b)`` of each of its mini-batches."""
        self.calls += 1
        for m, mean, var in statistics:
            self.count += m
            self.dof += m - 1  # a mini-batch with m = 1 adds to the mean only (var_b = 0)
            self.weighted_mean = self.weighted_mean + m * mean
            self.weighted_var = self.weighted_var + m * var


def _nonfinite_layer(
    current: list[tuple[str, list[tuple[int, torch.Tensor, torch.Tensor]]]],
) -> tuple[str, tuple[int, ...] | None] | None:
    """The first layer whose statistics of this batch hold NaN/Inf, with its input's size."""
    for name, statistics in current:
        for m, mean, var in statistics:
            if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
                return name, (m, int(mean.numel()))
    return None


def _batch_statistics(x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(m, mu_B, var_B)`` per channel of an (N, C, *) input, in float64 (two-pass variance).

    Shape:
        x: (N, C, *); returns m = N * prod(*) and two (C,) tensors.
    """
    if x.device.type == "mps":  # no float64 there
        x = x.cpu()
    x64 = x.detach().to(torch.float64)
    var, mean = torch.var_mean(x64, dim=[0, *range(2, x64.dim())], correction=0)
    return x64.numel() // x64.shape[1], mean, var


def _extract_input(batch: Any) -> Any:
    """The model input of a batch: the batch itself, its first element, or its ``"input"``."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        if "input" not in batch:
            raise KeyError(
                "recalibrate: a dict batch must hold the model input under the key 'input' "
                f"(its keys: {sorted(map(str, batch))}); or pass "
                "forward=lambda model, batch: model(batch['your_key'])"
            )
        return batch["input"]
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise TypeError(
        f"recalibrate: cannot find the model input in a batch of type {type(batch).__name__}: "
        "give tensors, (input, target, ...) tuples or lists, dicts with an 'input' key, or pass "
        "forward=lambda model, batch: ..."
    )


def _to_device(obj: Any, device: torch.device | str | None) -> Any:
    """Every tensor of a (nested) tuple/list/dict moved to ``device``."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {key: _to_device(value, device) for key, value in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_to_device(value, device) for value in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(value, device) for value in obj)
    return obj


@contextlib.contextmanager
def _state_restored(model: nn.Module) -> Iterator[None]:
    """Put every buffer and every train/eval flag of ``model`` back on exit, whatever happens."""
    modes = [(module, module.training) for module in model.modules()]
    buffers = [
        (module, name, buffer, buffer.detach().clone())
        for module in model.modules()
        for name, buffer in module._buffers.items()
        if buffer is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, buffer, saved in buffers:
                module._buffers[name] = buffer  # in case a forward replaced it out of place
                buffer.copy_(saved)
        for module, training in modes:
            module.training = training


def _add_note(error: BaseException, note: str) -> None:
    """``error.add_note(note)`` where Python has it (3.11+); the traceback then shows the note."""
    if hasattr(error, "add_note"):
        error.add_note(note)


def _progress_bar(total: int | None, enabled: bool) -> Any:
    """A tqdm bar, or ``None`` when disabled or tqdm is not installed."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="recalibrating batch norm", unit="batch", leave=False)


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    progress: bool = True,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    device: torch.device | str | None = None,
    allow_unused: bool = False,
) -> RecalibrationReport:
    """Recompute the population statistics of every batch-norm layer (Algorithm 2, "precise BN").

    The model runs in training mode under ``torch.no_grad`` over ``batches``, so every layer
    normalizes with batch statistics as in training, and a forward pre-hook takes the statistics of
    each batch-norm layer's input. Per channel, in float64::

        running_mean <- sum_b m_b mu_b / sum_b m_b
        running_var  <- sum_b m_b var_b / sum_b (m_b - 1)     (unbiased, torch's convention)

    with ``mu_b``, ``var_b`` the batch mean and biased batch variance and
    ``m_b = N * prod(spatial)`` the values per channel in batch ``b``. For equal batch sizes
    this is the paper's ``E[x] = E_B[mu_B]`` and ``Var[x] = m/(m-1) E_B[var_B]``.

    Nothing else changes: every buffer of the model is saved before the pass and put back after it
    (so the moving-average updates of the training-mode forwards and ``num_batches_tracked`` are
    undone), the train/eval flag of every module is restored, and only then are the new
    statistics written. If anything fails (a bad batch, an exception in the loader, a
    KeyboardInterrupt), the model is left exactly as it was.

    A layer with an int attribute ``virtual_batch_size`` (ghost batch norm) normalizes chunks of
    that many samples separately in training; each chunk then counts as one mini-batch ``b``.

    Which layers: every ``torch.nn.modules.batchnorm._BatchNorm`` (``torch.nn.BatchNorm1d/2d/3d``,
    ``SyncBatchNorm``, :mod:`batchnorm.nn` and other subclasses) with running buffers. Layers
    without them (``track_running_stats=False``) use batch statistics in eval mode too and are
    skipped, as are layers that stay in eval mode under ``model.train()`` (frozen layers).

    Notes:
        Dropout is active during the pass, as in training. The statistics are those of one
        process: under distributed training, recalibrate on one process over enough batches. A
        batch in which some layer sees one value per channel (typically a last batch of size 1)
        cannot be normalized in training mode; it is skipped with a warning.

    Args:
        model: the network, recalibrated in place; its device placement is left alone.
        batches: an iterable of training batches: tensors, tuples/lists whose first element is the
            input (``(x, y)`` from a DataLoader), or dicts with an ``"input"`` key. Not a single
            tensor (split it: ``x.split(batch_size)``).
        num_batches: use at most this many batches (default: all).
        progress: show a tqdm progress bar (none if tqdm is not installed).
        forward: ``forward(model, batch)`` runs the model on one batch, for other batch layouts or
            models with several inputs; its return value is ignored.
        device: move every tensor of a batch to this device first.
        allow_unused: keep the old statistics of layers that no batch reached (an auxiliary head,
            say) instead of raising.

    Returns:
        A :class:`RecalibrationReport`: old and new statistics per layer and how far the moving
        averages had drifted.

    Raises:
        TypeError: ``batches`` is a single tensor, or a batch has no recognizable input.
        ValueError: no batch-norm layer with running statistics, ``batches`` is empty, every batch
            had one value per channel somewhere, or a layer saw no batch (unless
            ``allow_unused``). An exception from the model's forward propagates as it is, with a
            note naming the batch.

    Example:
        >>> import torch
        >>> bn = torch.nn.BatchNorm1d(2, momentum=0.9)
        >>> batches = [torch.tensor([[0.0, 1.0], [2.0, 5.0]]),
        ...            torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])]
        >>> report = recalibrate(bn, batches, progress=False)
        >>> bn.running_mean  # (0 + 2 + 1 + 3 + 5) / 5, (1 + 5 + 2 + 4 + 6) / 5
        tensor([2.2000, 3.6000])
        >>> bn.running_var   # (2 * 1 + 3 * 8/3) / ((2 - 1) + (3 - 1)), (2 * 4 + 3 * 8/3) / 3
        tensor([3.3333, 5.3333])
        >>> int(bn.num_batches_tracked), bn.training, report.num_batches
        (0, True, 2)
    """
    if isinstance(batches, torch.Tensor):
        raise TypeError(
            f"recalibrate: batches is a single tensor of shape {tuple(batches.shape)}; iterating "
            "it would yield single samples without a batch axis. Pass an iterable of batches, "
            "for example x.split(batch_size) or a DataLoader"
        )
    if num_batches is not None and (isinstance(num_batches, bool) or num_batches < 1):
        raise ValueError(
            f"recalibrate: num_batches must be a positive int or None, got {num_batches!r}"
        )
    from batchnorm.inference.intake import check_model, set_mode

    model = check_model(model, "recalibrate")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    if not layers:
        raise ValueError(
            "recalibrate: the model has no batch-norm layer (no subclass of "
            "torch.nn.modules.batchnorm._BatchNorm: BatchNorm1d/2d/3d, SyncBatchNorm, ...)"
        )
    report = RecalibrationReport()
    targets = []
    for name, module in layers:
        if module.running_mean is None or module.running_var is None:
            report.skipped_layers[name] = (
                "no running statistics (track_running_stats=False): it normalizes with batch "
                "statistics in eval mode too, so there is nothing to recalibrate"
            )
        else:
            targets.append((name, module))
    if not targets:
        raise ValueError(
            "recalibrate: no batch-norm layer keeps running statistics (all of "
            f"{[name for name, _ in layers]} have track_running_stats=False)"
        )

    accumulators: dict[str, _Accumulator] = {}
    # Statistics of the current batch, added to the accumulators only once the batch went through.
    current: list[tuple[str, list[tuple[int, torch.Tensor, torch.Tensor]]]] = []
    spoiled: list[tuple[str, tuple[int, ...]]] = []  # (layer, input shape) with m = 1

    def make_hook(name: str, num_features: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[1] != num_features:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(
                    f"recalibrate: batch-norm layer {name!r} expects an (N, {num_features}, *) "
                    f"input, got {got}"
                )
            if x.numel() // max(x.shape[1], 1) < 2:
                spoiled.append((name, tuple(x.shape)))
                raise _OneValuePerChannel(name)
            # Ghost batch norm normalizes chunks of virtual_batch_size samples separately: each
            # chunk is one of Algorithm 2's mini-batches.
            ghost = getattr(module, "virtual_batch_size", None)
            split = isinstance(ghost, int) and 0 < ghost < x.shape[0]
            current.append(
                (name, [_batch_statistics(c) for c in (x.split(ghost) if split else [x])])
            )

        return hook

    by_name = dict(targets)
    handles = []
    bar = None
    used = 0
    num_samples: int | None = 0 if forward is None else None
    with _state_restored(model):
        try:
            set_mode(model, True)
            for name, module in targets:
                if not module.training:
                    report.skipped_layers[name] = (
                        "stays in eval mode under model.train() (frozen): training does not "
                        "normalize it with batch statistics, so its statistics are kept"
                    )
                    continue
                accumulators[name] = _Accumulator()
                hook = make_hook(name, module.num_features)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            if not accumulators:
                raise ValueError(
                    "recalibrate: every batch-norm layer with running statistics stays in eval "
                    "mode under model.train() (frozen); there is nothing to recalibrate"
                )
            total = num_batches
            with contextlib.suppress(TypeError):  # no len(): a bar without a total
                length = len(batches)  # type: ignore[arg-type]
                total = length if total is None else min(total, length)
            bar = _progress_bar(total, progress)
            for index, batch in enumerate(itertools.islice(batches, num_batches)):
                current.clear()
                spoiled.clear()
                x = None
                try:
                    with torch.no_grad():
                        if forward is not None:
                            forward(model, _to_device(batch, device))
                        else:
                            x = _to_device(_extract_input(batch), device)
                            model(x)
                except _OneValuePerChannel:
                    pass
                except Exception as error:
                    shape = tuple(x.shape) if isinstance(x, torch.Tensor) else None
                    _add_note(
                        error,
                        f"recalibrate: raised by batch #{index}"
                        + ("" if shape is None else f" (input shape {shape})")
                        + "; the model's statistics, buffers and train/eval modes are unchanged",
                    )
                    raise
                if bar is not None:
                    bar.update(1)
                if spoiled:  # also when a user forward swallowed _OneValuePerChannel
                    report.skipped_batches.append((index, *spoiled[0]))
                    continue
                bad = _nonfinite_layer(current)
                if bad is not None:
                    name, counts = bad
                    if getattr(by_name[name], "nonfinite", "propagate") == "raise":
                        raise FloatingPointError(
                            f"recalibrate: batch #{index} gives NaN/Inf statistics at layer "
                            f"{name!r}, whose nonfinite='raise'; nothing was "
                            "changed. Remove the batch or find where the values come from"
                        )
                    # "skip", and also "propagate": a NaN must never reach population statistics.
                    report.nonfinite_batches.append((index, name, counts))
                    continue
                for name, statistics in current:
                    accumulators[name].add_call(statistics)
                if num_samples is not None:
                    size = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() else None
                    num_samples = None if size is None else num_samples + int(size)
                used += 1
        finally:
            for handle in handles:
                handle.remove()
            if bar is not None:
                bar.close()

    if used == 0:
        if report.skipped_batches:
            _, name, shape = report.skipped_batches[0]
            raise ValueError(
                f"recalibrate: every batch ({len(report.skipped_batches)}) has one value per "
                f"channel at some batch-norm layer (first: {name!r}, input {shape}); batch "
                "statistics need at least two, so use larger batches"
            )
        raise ValueError(
            "recalibrate: batches yielded no batch; pass a non-empty iterable of training batches "
            "(is the DataLoader empty, or an iterator already consumed?)"
        )
    unused = [name for name, acc in accumulators.items() if acc.calls == 0]
    if unused and not allow_unused:
        raise ValueError(
            f"recalibrate: batch-norm layer(s) {unused} saw no batch (the forward pass does not "
            "call them); pass allow_unused=True to keep their old statistics, or a forward= that "
            "reaches them. Nothing was changed"
        )

    no_spread = [name for name, acc in accumulators.items() if acc.calls and acc.dof == 0]
    if no_spread:
        raise ValueError(
            f"recalibrate: batch-norm layer(s) {no_spread} only saw ghost batches with one value "
            "per channel, so the within-batch variance is undefined; use a larger "
            "virtual_batch_size. Nothing was changed"
        )
    with torch.no_grad():
        for name, acc in accumulators.items():
            module = by_name[name]
            if acc.calls == 0:
                report.skipped_layers[name] = "saw no batch; old statistics kept"
                continue
            assert isinstance(acc.weighted_mean, torch.Tensor)
            new_mean = (acc.weighted_mean / acc.count).cpu()
            new_var = (acc.weighted_var / acc.dof).cpu()
            report.layers[name] = LayerRecalibration(
                name=name,
                num_features=module.num_features,
                eps=float(module.eps),
                num_batches=acc.calls,
                count=acc.count,
                old_mean=module.running_mean.detach().to("cpu", torch.float64).clone(),
                old_var=module.running_var.detach().to("cpu", torch.float64).clone(),
                new_mean=new_mean,
                new_var=new_var,
            )
            if not (torch.isfinite(new_mean).all() and torch.isfinite(new_var).all()):
                # Finite batches can still overflow when summed: keep the old statistics.
                del report.layers[name]
                report.skipped_layers[name] = (
                    "population statistics overflowed to Inf/NaN; old statistics kept"
                )
                warnings.warn(
                    f"recalibrate: layer {name!r}: the population statistics overflowed "
                    "(Inf/NaN); its running statistics were left unchanged",
                    stacklevel=2,
                )
                continue
            module.running_mean.copy_(new_mean)
            module.running_var.copy_(new_var)
    report.num_batches = used
    report.num_samples = num_samples
    if report.nonfinite_batches:
        index, name, shape = report.nonfinite_batches[0]
        warnings.warn(
            f"recalibrate: skipped {len(report.nonfinite_batches)} batch(es) whose statistics "
            f"hold NaN/Inf (first: batch #{index}, layer {name!r}); they are left out of the "
            "population statistics",
            stacklevel=2,
        )
    if report.skipped_batches:
        index, name, shape = report.skipped_batches[0]
        warnings.warn(
            f"recalibrate: skipped {len(report.skipped_batches)} batch(es) in which a batch-norm "
            "layer saw one value per channel (training-mode statistics need at least two): "
            f"first batch #{index}, layer {name!r}, input shape {shape}",
            stacklevel=2,
        )
    return report
