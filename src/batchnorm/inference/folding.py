"""Folding an eval-mode batch norm into the Linear or convolution that feeds it.

With fixed (population) statistics, BN is the per-channel affine map
``y = gamma (x - E[x]) / s + beta`` with ``s = sqrt(Var[x] + eps)`` (Algorithm 2, last line). If
``x = W u + b`` comes straight from a Linear or convolution, the two collapse into one layer::

    W'[o] = W[o] * gamma[o] / s[o]                   (per output unit / output channel o)
    b'[o] = (b[o] - E[x][o]) * gamma[o] / s[o] + beta[o]

:func:`fold_into` does it for one pair, :func:`fold` for every pair of a model, and only where it
is exact: the layer's output must go to the BN and nowhere else.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.inference.intake import check_model, set_mode
from batchnorm.testing import tolerance

__all__ = ["FoldMismatchError", "FoldReport", "FoldedPair", "fold", "fold_into"]

logger = logging.getLogger(__name__)

_FOLDABLE: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NO_RUNNING_STATISTICS = (
    "no running statistics (track_running_stats=False): it normalizes with batch statistics "
    "in eval mode too, so it is not a fixed affine map and cannot be folded"
)

# (rtol, atol) of the check_input comparison: |folded - original| <= atol + rtol * max|original|
# (the "fold" kind of batchnorm.testing.TOLERANCES).
_CHECK_TOLERANCE = {
    dtype: tolerance(str(dtype), "fold")
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)
}


class FoldMismatchError(RuntimeError):
    """The folded model's output differs from the original's on ``check_input``."""


@dataclass(frozen=True)
class FoldedPair:
    """One fold: ``bn`` (now an ``nn.Identity``) folded into ``layer``.

    ``found_by`` is ``"pairs"`` (given by the caller), ``"fx"`` (a torch.fx trace of the forward)
    or ``"sequential"`` (neighbours in an ``nn.Sequential``, used when the model cannot be traced).
    """

    layer: str
    bn: str
    found_by: str


@dataclass
class FoldReport:
    """What :func:`fold` folded and what it left, with the reason.

    Attributes:
        folded: the folded pairs.
        not_folded: batch-norm layers left in place, by name, with the reason.
        max_abs_diff: the largest ``|original - folded|`` output difference on ``check_input``.
        allowed_diff: the tolerance that output was checked against.
        notes: other remarks (why torch.fx tracing was not used, for example).
    """

    folded: list[FoldedPair] = field(default_factory=list)
    not_folded: dict[str, str] = field(default_factory=dict)
    max_abs_diff: float | None = None
    allowed_diff: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict."""
        return {
            "folded": [{"layer": p.layer, "bn": p.bn, "found_by": p.found_by} for p in self.folded],
            "not_folded": dict(self.not_folded),
            "max_abs_diff": self.max_abs_diff,
            "allowed_diff": self.allowed_diff,
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        lines = [f"Folded {len(self.folded)} batch-norm layer(s), left {len(self.not_folded)}."]
        lines += [f"  folded {p.bn} into {p.layer} (found by {p.found_by})" for p in self.folded]
        lines += [f"  kept {name}: {reason}" for name, reason in self.not_folded.items()]
        if self.max_abs_diff is not None:
            lines.append(
                f"check_input: max |original - folded| = {self.max_abs_diff:.3g} "
                f"(allowed {self.allowed_diff:.3g})"
            )
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _foldable_base(layer: nn.Module) -> type[nn.Module] | None:
    return next((base for base in _FOLDABLE if isinstance(layer, base)), None)


def _fold_problem(layer: nn.Module, bn: nn.Module) -> str | None:
    """Why ``bn`` cannot be folded into ``layer`` (looking at the two modules only), or None."""
    if not isinstance(bn, _BatchNorm):
        return f"{type(bn).__name__} is not a batch-norm layer"
    if bn.running_mean is None or bn.running_var is None:
        return _NO_RUNNING_STATISTICS
    base = _foldable_base(layer)
    if base is None:
        return (
            f"its input comes from a {type(layer).__name__}, not a Linear or "
            "Conv/ConvTranspose 1d/2d/3d"
        )
    if type(layer).forward is not base.forward:
        return (
            f"{type(layer).__name__} overrides forward (its output need not be W u + b), "
            "so folding into its weights is not safe"
        )
    if isinstance(layer.weight, nn.parameter.UninitializedParameter):
        return f"{type(layer).__name__} is lazy and not initialized yet; run it once first"
    if torch.nn.utils.parametrize.is_parametrized(layer):
        return f"{type(layer).__name__} is parametrized (its weight is computed in the forward)"
    for module in (layer, bn):
        if module._forward_hooks or module._forward_pre_hooks:
            return (
                f"the {type(module).__name__} has forward hooks (weight_norm, spectral_norm, ...) "
                "that folding would bypass or lose"
            )
    out_features = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if out_features != bn.num_features:
        return (
            f"{type(layer).__name__} has {out_features} outputs but the batch-norm layer "
            f"normalizes {bn.num_features} features (they do not correspond)"
        )
    if type(bn).forward is not _BatchNorm.forward and not _affine_in_eval(bn):
        return _eval_map_problem(bn)
    return None


def _affine_in_eval(bn: nn.Module) -> bool:
    """Whether ``bn``'s class is one of this package's layers whose eval output is, by
    construction, the affine map of its running statistics: treated as torch's own are."""
    from batchnorm.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
    from batchnorm.nn.frozen import FrozenBatchNorm
    from batchnorm.nn.sync import SyncBatchNorm, _BatchNormXd

    known = (BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm, _BatchNormXd, FrozenBatchNorm)
    return type(bn) in known


def _eval_map_problem(bn: _BatchNorm) -> str | None:
    """Check, on a probe input, that ``bn`` in eval mode is the affine map of its statistics.

    For a subclass with its own forward (a fused activation, say), folding would drop whatever
    the forward adds. The probe puts ``x = E[x] + t * s`` with ``t`` in (-2, -0.5, 0.5, 2) in every
    channel, so the output must be ``gamma * t + beta``; a (4, C, 1, ...) input is tried with 2 to
    5 dimensions until the layer accepts one.
    """
    assert bn.running_mean is not None and bn.running_var is not None
    channels = bn.num_features
    like = {"device": bn.running_mean.device, "dtype": torch.float64}
    t = torch.tensor([-2.0, -0.5, 0.5, 2.0], **like).reshape(4, 1).expand(4, channels)
    mean, var = bn.running_mean.to(**like), bn.running_var.to(**like)
    gamma = torch.ones_like(mean) if bn.weight is None else bn.weight.detach().to(**like)
    beta = torch.zeros_like(mean) if bn.bias is None else bn.bias.detach().to(**like)
    probe = (mean + t * torch.sqrt(var + bn.eps)).to(bn.running_mean.dtype)
    expected = gamma * t + beta
    rtol, atol = _CHECK_TOLERANCE.get(bn.running_mean.dtype, (1e-2, 1e-3))
    training = bn.training
    bn.training = False
    errors: list[str] = []
    try:
        for ndim in (2, 3, 4, 5):
            try:
                with torch.no_grad():
                    out = bn(probe.reshape(4, channels, *([1] * (ndim - 2))))
            except Exception as error:  # this layer may want another number of dimensions
                errors.append(f"{ndim}-D: {type(error).__name__}: {error}")
                continue
            out = out.detach().to(torch.float64).reshape(4, channels)
            error = float((out - expected).abs().max())
            allowed = 10 * (atol + rtol * float(expected.abs().max()))
            if not error <= allowed:
                return (
                    f"in eval mode {type(bn).__name__} is not the affine map of its running "
                    f"statistics (off by {error:.3g} on a probe input; a fused activation?), so "
                    "replacing it by folded weights would change the output"
                )
            return None
    finally:
        bn.training = training
    return (
        f"{type(bn).__name__} overrides forward, and its eval output could not be checked to be "
        "the affine map of its statistics: it raised on every (4, C, 1, ...) probe input of 2 "
        f"to 5 dimensions ({'; '.join(e[:200] for e in errors)})"
    )


def fold_into(layer: nn.Module, bn: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Fold one batch-norm layer, with eval semantics, into the Linear / convolution feeding it.

    With ``s = sqrt(running_var + eps)`` and per output unit (channel) ``o``::

        W'[o] = W[o] * gamma[o] / s[o]
        b'[o] = (b[o] - running_mean[o]) * gamma[o] / s[o] + beta[o]

    so that ``layer'(u) == bn(layer(u))`` with ``bn`` in eval mode (``gamma = 1``, ``beta = 0``
    without ``affine``). A bias is created if the layer had none. Computed in float64 and stored
    in the layer's dtype, on its device, keeping the weight's memory format. The output unit is
    dim 0 of the weight for Linear and Conv (any ``groups``). A ConvTranspose weight is
    ``(C_in, C_out / groups, *kernel)``: output channel ``g * C_out/groups + j`` is
    ``weight[g * C_in/groups:(g + 1) * C_in/groups, j]``.

    A Linear folds exactly only when its output is ``(N, C)``: on an ``(N, L, C)`` input its
    features are on the last axis while ``BatchNorm1d`` normalizes axis 1.

    Args:
        layer: ``nn.Linear``, ``nn.Conv1d/2d/3d`` or ``nn.ConvTranspose1d/2d/3d`` (or a subclass
            that does not override ``forward``).
        bn: a batch-norm layer with running statistics that normalizes ``layer``'s outputs.
        inplace: change ``layer`` itself; by default a copy is folded and returned.

    Returns:
        The folded layer (``layer`` itself if ``inplace``).

    Raises:
        ValueError: the pair cannot be folded (the message says why).

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> conv, bn = torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4).eval()
        >>> _ = bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
        >>> folded = fold_into(conv, bn)
        >>> x = torch.randn(2, 3, 8, 8)
        >>> torch.allclose(folded(x), bn(conv(x)), atol=1e-5), conv.bias is None
        (True, True)
    """
    problem = _fold_problem(layer, bn)
    if problem is not None:
        raise ValueError(f"fold_into: cannot fold {type(bn).__name__}: {problem}")
    assert isinstance(bn, _BatchNorm) and bn.running_mean is not None and bn.running_var is not None
    if not inplace:
        layer = copy.deepcopy(layer)
    weight: torch.Tensor = layer.weight  # type: ignore[assignment]
    bias: torch.Tensor | None = layer.bias  # type: ignore[assignment]
    cpu64 = {"device": "cpu", "dtype": torch.float64}
    with torch.no_grad():
        mean = bn.running_mean.to(**cpu64)
        var = bn.running_var.to(**cpu64)
        gamma = torch.ones_like(mean) if bn.weight is None else bn.weight.to(**cpu64)
        beta = torch.zeros_like(mean) if bn.bias is None else bn.bias.to(**cpu64)
        scale = gamma / torch.sqrt(var + bn.eps)  # (C_out,)
        old_bias = torch.zeros_like(mean) if bias is None else bias.to(**cpu64)
        new_bias = (old_bias - mean) * scale + beta

        w = weight.to(**cpu64)
        if isinstance(layer, _TRANSPOSED):
            groups, kernel = layer.groups, w.shape[2:]
            in_channels, out_per_group = w.shape[0], w.shape[1]
            # (C_in, C_out/g, *k) -> (g, C_in/g, C_out/g, *k): output channel g * C_out/g + j.
            w = w.reshape(groups, in_channels // groups, out_per_group, *kernel)
            w = w * scale.reshape(groups, 1, out_per_group, *([1] * len(kernel)))
            w = w.reshape(in_channels, out_per_group, *kernel)
        else:
            # (C_out, C_in/g, *k) or (C_out, C_in): the output unit is dim 0 whatever the groups.
            w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
        weight.copy_(w)
        if bias is None:
            layer.bias = nn.Parameter(
                new_bias.to(device=weight.device, dtype=weight.dtype),
                requires_grad=weight.requires_grad,
            )
        else:
            bias.copy_(new_bias)
    return layer


# ------------------------------------------------------------------------------------------------
# Finding the pairs: torch.fx where the model traces, nn.Sequential neighbours where it does not.
# ------------------------------------------------------------------------------------------------


def _is_plain_sequential(module: nn.Module) -> bool:
    """An nn.Sequential (or subclass) whose forward chains its children unchanged."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _flatten_sequential(seq: nn.Module, prefix: str) -> Iterable[tuple[str, nn.Module]]:
    """The leaves of nested plain Sequentials, in call order, with qualified names."""
    for child_name, child in seq.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        if _is_plain_sequential(child):
            yield from _flatten_sequential(child, name)
        else:
            yield name, child


def _sequential_pairs(model: nn.Module) -> dict[str, str]:
    """bn name -> the module right before it in a (nested) plain Sequential.

    This trusts that each Sequential runs as a whole, which only a trace can confirm.
    """
    by_name = dict(model.named_modules())
    found: dict[str, str] = {}
    for name, module in by_name.items():
        if not _is_plain_sequential(module):
            continue
        if name and _is_plain_sequential(by_name[name.rpartition(".")[0]]):
            continue  # flattened as part of its parent
        leaves = list(_flatten_sequential(module, name))
        for (previous, _), (bn_name, bn) in itertools.pairwise(leaves):
            if isinstance(bn, _BatchNorm):
                found.setdefault(bn_name, previous)
    return found


def _fx_pairs(model: nn.Module, bn_names: Iterable[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Trace ``model`` with torch.fx; return (bn -> producer, bn -> why not) for ``bn_names``.

    A producer qualifies when every call of the batch-norm layer takes the output of a call of
    that same module as its only argument, that output has no other user, the module is called
    nowhere else, and the forward does not read its weight or bias directly.
    """
    import torch.fx

    class LeafTracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
            return isinstance(m, (_BatchNorm, *_FOLDABLE)) or super().is_leaf_module(
                m, module_qualified_name
            )

    graph = LeafTracer().trace(model)
    calls: dict[str, list[torch.fx.Node]] = {}
    attributes_read = set()
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(str(node.target), []).append(node)
        elif node.op == "get_attr":
            attributes_read.add(str(node.target))
    found: dict[str, str] = {}
    refused: dict[str, str] = {}
    for bn_name in bn_names:
        bn_calls = calls.get(bn_name)
        if not bn_calls:
            refused[bn_name] = "the forward never calls it (torch.fx trace)"
            continue
        sources = [n.args[0] if len(n.args) == 1 and not n.kwargs else None for n in bn_calls]
        bad = [s for s in sources if not isinstance(s, torch.fx.Node) or s.op != "call_module"]
        if bad:
            what = bad[0].format_node() if isinstance(bad[0], torch.fx.Node) else repr(bad[0])
            refused[bn_name] = f"its input is not the output of a module (torch.fx: {what})"
            continue
        producers = {str(s.target) for s in sources}  # type: ignore[union-attr]
        if len(producers) > 1:
            refused[bn_name] = f"it is fed by several modules ({sorted(producers)})"
            continue
        producer = producers.pop()
        shared = [s for s in sources if len(s.users) != 1]  # type: ignore[union-attr]
        if shared:
            refused[bn_name] = (
                f"the output of {producer} is also used elsewhere ({len(shared[0].users)} users), "
                "so its weights cannot absorb the batch norm"
            )
        elif len(calls[producer]) != len(bn_calls):
            refused[bn_name] = (
                f"{producer} is also called where no batch norm follows "
                f"({len(calls[producer])} calls, {len(bn_calls)} of {bn_name})"
            )
        elif {f"{producer}.weight", f"{producer}.bias"} & attributes_read:
            refused[bn_name] = f"the forward also reads the weight or bias of {producer} directly"
        else:
            found[bn_name] = producer
    return found, refused


def _shared_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters registered at several places (tied weights)."""
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {key for key, count in counts.items() if count > 1}


def _flatten_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _flatten_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flatten_outputs(v)]
    return []


def _run(model: nn.Module, example: Any) -> list[torch.Tensor]:
    """The output tensors of ``model`` on ``example`` (tuple: positional args; dict: keywords)."""
    with torch.no_grad():
        if isinstance(example, tuple):
            return _flatten_outputs(model(*example))
        if isinstance(example, Mapping):
            return _flatten_outputs(model(**example))
        return _flatten_outputs(model(example))


def _float64_truth(model: nn.Module, example: Any) -> list[torch.Tensor] | None:
    """The unfolded model's outputs computed in float64: the yardstick of its own rounding.

    None where the model cannot run in float64 (a dtype-specific layer, a device without it).
    """

    def to64(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return obj.to(torch.float64) if obj.is_floating_point() else obj
        if isinstance(obj, Mapping):
            return {k: to64(v) for k, v in obj.items()}
        if isinstance(obj, (tuple, list)):
            return type(obj)(to64(v) for v in obj)
        return obj

    try:
        model64 = copy.deepcopy(model).to(torch.float64).eval()
        return _run(model64, to64(example))
    except Exception:  # noqa: BLE001 - the float64 yardstick is optional
        return None


def _compare_outputs(
    actual: list[torch.Tensor],
    expected: list[torch.Tensor],
    atol: float | None,
    rtol: float | None,
    report: FoldReport,
    truth: list[torch.Tensor] | None = None,
) -> None:
    """Raise FoldMismatchError unless every output matches; record the worst one in report.

    With ``truth`` (the unfolded model in float64), an output also passes when the folded one is
    within twice the original's own rounding error of the truth (plus ``atol``): folding
    changes the rounding, and a fixed relative tolerance gives false alarms on deep float32
    networks whose own error is larger than it.
    """
    if len(actual) != len(expected):
        raise FoldMismatchError(
            f"fold: the folded model returns {len(actual)} tensors, the original {len(expected)}"
        )
    worst_ratio = -1.0
    for index, (a, e) in enumerate(zip(actual, expected)):
        if a.shape != e.shape:
            raise FoldMismatchError(
                f"fold: output {index} has shape {tuple(a.shape)} after folding, "
                f"{tuple(e.shape)} before"
            )
        default_rtol, default_atol = _CHECK_TOLERANCE.get(e.dtype, (0.0, 0.0))
        r = default_rtol if rtol is None else rtol
        t = default_atol if atol is None else atol
        a64, e64 = a.detach().to(torch.float64), e.detach().to(torch.float64)
        # NaN on both sides counts as equal, on one side as an infinite difference.
        diff = torch.where(torch.isnan(a64) & torch.isnan(e64), 0.0, (a64 - e64).abs())
        diff = torch.nan_to_num(diff, nan=math.inf)
        scale = float(torch.nan_to_num(e64.abs(), nan=0.0, posinf=0.0).max()) if e.numel() else 0.0
        allowed = t + r * scale
        max_diff = float(diff.max()) if diff.numel() else 0.0
        if truth is not None and max_diff > allowed and diff.numel():
            t64 = truth[index].detach().to(torch.float64)
            own_rounding = float(torch.nan_to_num((e64 - t64).abs(), nan=math.inf).max())
            folded_error = float(torch.nan_to_num((a64 - t64).abs(), nan=math.inf).max())
            if folded_error <= 2 * own_rounding + t:
                allowed = max(allowed, max_diff)  # as close to the truth as the original is
        ratio = max_diff / allowed if allowed > 0 else (math.inf if max_diff > 0 else 0.0)
        if ratio > worst_ratio:
            worst_ratio = ratio
            report.max_abs_diff, report.allowed_diff = max_diff, allowed
        if max_diff > allowed:
            folded = [(p.layer, p.bn) for p in report.folded]
            where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
            raise FoldMismatchError(
                f"fold: folded output {index} differs from the original by up to {max_diff:.3g} "
                f"at index {where} (folded {float(a64[where]):.6g}, original "
                f"{float(e64[where]):.6g}); allowed {allowed:.3g} = atol {t:g} + rtol {r:g} * "
                f"max|original| {scale:.3g}. Folded pairs: {folded}"
            )


@overload
def fold(
    model: nn.Module,
    *,
    pairs: Sequence[tuple[str, str]] | None = ...,
    check_input: Any = ...,
    atol: float | None = ...,
    rtol: float | None = ...,
    inplace: bool = ...,
    trace: bool = ...,
    return_report: Literal[False] = ...,
) -> nn.Module: ...


@overload
def fold(
    model: nn.Module,
    *,
    pairs: Sequence[tuple[str, str]] | None = ...,
    check_input: Any = ...,
    atol: float | None = ...,
    rtol: float | None = ...,
    inplace: bool = ...,
    trace: bool = ...,
    return_report: Literal[True],
) -> tuple[nn.Module, FoldReport]: ...


def fold(
    model: nn.Module,
    *,
    pairs: Sequence[tuple[str, str]] | None = None,
    check_input: Any = None,
    atol: float | None = None,
    rtol: float | None = None,
    inplace: bool = False,
    trace: bool = True,
    return_report: bool = False,
) -> nn.Module | tuple[nn.Module, FoldReport]:
    """Fold every batch-norm layer that directly follows a Linear or convolution into it.

    Each foldable BN is folded into the layer feeding it by :func:`fold_into` (eval semantics:
    running statistics) and replaced by ``nn.Identity``. "Directly follows" means the layer's
    output goes to the BN and nowhere else. The pairs come from, in order of precedence:

    1. ``pairs=[("conv1", "bn1"), ...]``: qualified module names, trusted as given (pass
       ``check_input`` to verify them).
    2. A ``torch.fx`` trace of the forward (``trace=True``): a BN whose only input is the output
       of a Linear/Conv module that is called only there, whose output has no other user and
       whose weights the forward does not read directly. Every batch-norm layer the trace does
       not pair is left, with the reason (including layers the forward never calls).
    3. Where the model cannot be traced (data-dependent control flow, say) or ``trace=False``:
       neighbours in ``nn.Sequential`` containers, nested Sequentials flattened. This trusts that
       each Sequential runs as a whole; pass ``check_input`` to verify.

    Left in place, with the reason in the report: BN without running statistics
    (``track_running_stats=False``), BN after anything else (a ReLU, an addition, a pooling),
    layers or BNs registered at several places, tied weights, layers overriding ``forward``,
    parametrized or hooked layers, channel-count mismatches, and batch-norm subclasses whose eval
    output is not the affine map of their statistics (checked on a probe input: a fused
    activation). ConvTranspose layers are folded.

    Args:
        model: the network. Not modified unless ``inplace``.
        pairs: explicit ``(layer name, bn name)`` pairs.
        check_input: an example input (a tensor, a tuple of positional arguments or a dict of
            keyword arguments): the original and the folded model run on it in eval mode and
            their outputs are compared.
        atol, rtol: the check passes when ``max |original - folded| <= atol + rtol *
            max |original|`` for every output tensor; defaults by dtype (float64: 1e-12, 1e-10;
            float32: 1e-6, 1e-4; float16: 1e-3, 1e-2; bfloat16: 1e-2, 3e-2).
        inplace: fold into ``model`` itself (put back as it was if the check fails).
        trace: use torch.fx to find the pairs.
        return_report: also return a :class:`FoldReport`.

    Returns:
        The folded model, in eval mode (and the report if ``return_report``).

    Raises:
        FoldMismatchError: outputs on ``check_input`` differ by more than the tolerance.
        ValueError: ``pairs`` names a module that does not exist, or a pair that cannot be folded.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        ...                     nn.BatchNorm2d(8))
        >>> x = torch.randn(4, 3, 10, 10)
        >>> _ = net(x)  # a training step: the running statistics move away from 0 and 1
        >>> folded, report = fold(net, check_input=x, return_report=True)
        >>> [type(m).__name__ for m in folded], folded.training, net.training
        (['Conv2d', 'Identity', 'ReLU', 'BatchNorm2d'], False, True)
        >>> report.not_folded
        {'3': 'its input comes from a ReLU, not a Linear or Conv/ConvTranspose 1d/2d/3d'}
    """
    check_model(model, "fold", lift="no")
    expected: list[torch.Tensor] = []
    truth: list[torch.Tensor] | None = None
    if check_input is not None:
        modes = [(module, module.training) for module in model.modules()]
        try:
            set_mode(model, False)
            expected = _run(model, check_input)
            low_precision = any(e.dtype in (torch.float32, torch.float16, torch.bfloat16)
                                for e in expected)  # fmt: skip
            if low_precision and atol is None and rtol is None:
                truth = _float64_truth(model, check_input)
        finally:
            for module, training in modes:
                module.training = training

    target = model if inplace else copy.deepcopy(model)
    report = FoldReport()
    plan = _plan(target, pairs, trace, report)  # raises before anything changes
    modes = [(module, module.training) for module in target.modules()]
    set_mode(target, False)
    undo: list[tuple[nn.Module, torch.Tensor, torch.Tensor | None, str, nn.Module]] = []
    for pair in plan:
        layer, bn = target.get_submodule(pair.layer), target.get_submodule(pair.bn)
        saved_bias = None if layer.bias is None else layer.bias.detach().clone()
        undo.append((layer, layer.weight.detach().clone(), saved_bias, pair.bn, bn))
        fold_into(layer, bn, inplace=True)
        parent_name, _, attribute = pair.bn.rpartition(".")
        setattr(target.get_submodule(parent_name), attribute, nn.Identity())
        report.folded.append(pair)

    if check_input is not None:
        try:
            _compare_outputs(_run(target, check_input), expected, atol, rtol, report, truth)
        except BaseException:
            if inplace:  # put the model back as it was
                with torch.no_grad():
                    for layer, weight, bias, bn_name, bn in reversed(undo):
                        layer.weight.copy_(weight)
                        if bias is None:
                            layer.bias = None
                        else:
                            layer.bias.copy_(bias)
                        parent_name, _, attribute = bn_name.rpartition(".")
                        setattr(target.get_submodule(parent_name), attribute, bn)
                for module, training in modes:
                    module.training = training
            raise

    logger.info("fold: %s", report)
    if return_report:
        return target, report
    return target


def _plan(
    model: nn.Module, pairs: Sequence[tuple[str, str]] | None, trace: bool, report: FoldReport
) -> list[FoldedPair]:
    """The pairs :func:`fold` will fold; the others go to ``report.not_folded`` with the reason.

    Raises:
        ValueError: a pair in ``pairs`` is unknown or cannot be folded.
    """
    by_name = dict(model.named_modules())
    bn_names = [name for name, m in by_name.items() if isinstance(m, _BatchNorm)]

    candidates: dict[str, tuple[str, str]] = {}  # bn name -> (producer name, how found)
    refused: dict[str, str] = {}  # bn name -> why no producer
    for layer_name, bn_name in pairs or ():
        for name in (layer_name, bn_name):
            if name not in by_name:
                raise ValueError(f"fold: pairs names {name!r}, which is not a module of the model")
        if bn_name in candidates:
            raise ValueError(f"fold: pairs names the batch-norm layer {bn_name!r} twice")
        candidates[bn_name] = (layer_name, "pairs")
    remaining = [name for name in bn_names if name not in candidates]
    traced = False
    if trace and remaining:
        try:
            found, refused = _fx_pairs(model, remaining)
            traced = True
            candidates.update({bn: (layer, "fx") for bn, layer in found.items()})
        except Exception as error:  # an untraceable forward: fall back to Sequential neighbours
            message = str(error).splitlines()[0] if str(error) else ""
            report.notes.append(
                f"torch.fx could not trace the model ({type(error).__name__}: {message}); "
                "pairs were taken from nn.Sequential neighbours, which assumes each Sequential "
                "runs as a whole (pass check_input to verify)"
            )
    if not traced:
        for bn_name, layer_name in _sequential_pairs(model).items():
            if bn_name in remaining:
                candidates[bn_name] = (layer_name, "sequential")

    occurrences = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    tied = _shared_parameters(model)
    plan: list[FoldedPair] = []
    used_layers: dict[str, str] = {}
    for bn_name in [*(bn for _, bn in pairs or ()), *remaining]:
        bn = by_name[bn_name]
        if bn_name not in candidates:
            if bn.running_mean is None or bn.running_var is None:
                report.not_folded[bn_name] = _NO_RUNNING_STATISTICS
            else:
                report.not_folded[bn_name] = refused.get(
                    bn_name, "no Linear/Conv directly before it in an nn.Sequential (and no trace)"
                )
            continue
        layer_name, found_by = candidates[bn_name]
        layer = by_name[layer_name]
        problem = _fold_problem(layer, bn)
        if problem is None and (occurrences[id(layer)] > 1 or occurrences[id(bn)] > 1):
            problem = "the layer or the batch norm is registered at several places (shared)"
        if problem is None and any(id(p) in tied for p in layer.parameters(recurse=False)):
            problem = f"the weight or bias of {layer_name} is shared with another module"
        if problem is None and layer_name in used_layers:
            problem = f"{layer_name!r} already absorbs {used_layers[layer_name]!r}"
        if problem is not None and found_by == "pairs":
            raise ValueError(f"fold: cannot fold {bn_name!r} into {layer_name!r}: {problem}")
        if problem is not None:
            report.not_folded[bn_name] = problem
        else:
            used_layers[layer_name] = bn_name
            plan.append(FoldedPair(layer_name, bn_name, found_by))
    return plan
