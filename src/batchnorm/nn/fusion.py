"""torch.ao's quantization and fusion on models with our layers.

torch.ao finds what to do with a module by its exact class, never by ``isinstance``:

- Eager-mode fusion (``fuse_modules``, ``fuse_modules_qat``) looks fusers up by the classes of
  the modules it is given (``(Conv2d, BatchNorm2d, ReLU)`` ...), so a converted model would fail
  with "did not find fuser method". :func:`register_fusion_patterns` adds, for every pattern of
  torch's table that holds a ``BatchNorm1d/2d/3d``, the same pattern with ours: the fuser turns
  our layer back into torch's (sharing the very same tensors, :func:`batchnorm.nn.convert`) and
  calls torch's fuser, so the result is exactly what fusing the original model gives (a folded
  ``Conv2d`` in eval, an ``nni.ConvBn2d`` for quantization-aware training).
- FX graph-mode quantization (``prepare_fx``, ``prepare_qat_fx``, ``convert_fx``) matches its
  patterns with ``type_before_parametrizations(module) == nn.BatchNorm2d``: our layers matched
  nothing, silently, so conv + batch norm was neither fused nor folded and a float batch norm
  stayed between quantized convolutions (outputs off by up to 0.04 on a small CNN).
  :func:`register_quantization_types` makes that function, which torch.ao asks for a module's
  float class, answer torch's class for our ``BatchNorm1d/2d/3d`` (they are drop-in
  replacements of exactly those), so every pattern, fuser and ``from_float`` of torch.ao treats
  them as it treats torch's.

- ``torch.fx.experimental.optimization.fuse`` (and ``optimize_for_inference``, which starts
  with it) folds conv/linear + batch norm where ``type(module) is nn.BatchNorm2d``:
  :func:`register_fx_optimization_types` lets its pattern test accept ours in that place.

All three run when :mod:`batchnorm.nn` is imported.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from batchnorm.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = [
    "register_fusion_patterns",
    "register_fx_optimization_types",
    "register_quantization_types",
]

_OURS = {torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d,
         torch.nn.BatchNorm3d: BatchNorm3d}  # fmt: skip


def _as_torch(module: Any) -> Any:
    if type(module) in (BatchNorm1d, BatchNorm2d, BatchNorm3d):
        from batchnorm.nn.convert import convert

        return convert(module, to="torch")
    return module


def _wrap(fuser: Any) -> Any:
    @functools.wraps(fuser)
    def fuse(is_qat: bool, *modules: Any) -> Any:
        return fuser(is_qat, *(_as_torch(m) for m in modules))

    return fuse


def register_fusion_patterns() -> int:
    """Add our batch-norm classes to torch's eager fusion table; returns how many were added.

    Idempotent. Does nothing where torch has no such table (``torch.ao`` absent).
    """
    try:
        from torch.ao.quantization import fuser_method_mappings as mappings
    except ImportError:  # pragma: no cover - torch.ao ships with every supported torch
        return 0
    table = getattr(mappings, "_DEFAULT_OP_LIST_TO_FUSER_METHOD", None)
    if not isinstance(table, dict):  # pragma: no cover - a torch that reorganized its internals
        return 0
    added = 0
    for pattern, fuser in list(table.items()):
        if not any(t in _OURS for t in pattern):
            continue
        ours = tuple(_OURS.get(t, t) for t in pattern)
        if ours not in table:
            table[ours] = _wrap(fuser)
            added += 1
    return added


def _as_torch_type(original: Any) -> Any:
    """``type_before_parametrizations`` answering torch's class for our drop-in layers."""

    @functools.wraps(original)
    def type_before_parametrizations(module: torch.nn.Module) -> type:
        kind = original(module)
        return _TORCH.get(kind, kind)

    type_before_parametrizations._batchnorm_original = original  # type: ignore[attr-defined]
    return type_before_parametrizations


_TORCH = {ours: theirs for theirs, ours in _OURS.items()}


def register_quantization_types() -> int:
    """Let torch.ao see our ``BatchNorm1d/2d/3d`` as torch's (see the module's notes); returns
    how many module references were set.

    Idempotent. Sets ``torch.nn.utils.parametrize.type_before_parametrizations`` (for modules of
    torch.ao imported later) and the copies that torch's modules already imported hold.
    """
    import sys

    from torch.nn.utils import parametrize

    current = getattr(parametrize, "type_before_parametrizations", None)
    if current is None:  # pragma: no cover - a torch without it: nothing matches by it
        return 0
    original = getattr(current, "_batchnorm_original", current)
    patched = current if original is not current else _as_torch_type(original)
    count = 0
    for name, module in list(sys.modules.items()):
        if module is None or not (name == parametrize.__name__ or name.startswith("torch.ao.")):
            continue
        if getattr(module, "type_before_parametrizations", None) is original:
            module.type_before_parametrizations = patched
            count += 1
    return count


def register_fx_optimization_types() -> bool:
    """Let ``torch.fx.experimental.optimization`` fold and convert our ``BatchNorm1d/2d/3d``
    where it folds and converts torch's; returns whether anything was set (idempotent)."""
    try:
        from torch.fx.experimental import optimization
    except ImportError:  # pragma: no cover - a torch without it
        return False
    original = getattr(optimization, "matches_module_pattern", None)
    if original is None or hasattr(original, "_batchnorm_original"):
        return False

    @functools.wraps(original)
    def matches_module_pattern(pattern, node, modules) -> bool:
        if original(pattern, node, modules):
            return True
        ours = tuple(_OURS.get(t, t) for t in pattern)
        return ours != tuple(pattern) and original(ours, node, modules)

    matches_module_pattern._batchnorm_original = original  # type: ignore[attr-defined]
    optimization.matches_module_pattern = matches_module_pattern
    supported = getattr(optimization, "mkldnn_supported", None)
    mapping = getattr(optimization, "mkldnn_map", None)
    if isinstance(supported, list) and isinstance(mapping, dict):
        for theirs, ours in _OURS.items():
            if theirs in supported and ours not in supported:
                supported.append(ours)
            if theirs in mapping:
                mapping.setdefault(ours, mapping[theirs])
    return True
