"""``torch.ao.quantization.fuse_modules`` (and ``fuse_modules_qat``) on models with our layers.

torch's eager-mode fusion looks fusers up by the exact classes of the modules it is given
(``(Conv2d, BatchNorm2d, ReLU)`` ...), so a converted model would fail with "did not find fuser
method". Importing :mod:`batchnorm.nn` registers, for every pattern of torch's table that holds a
``BatchNorm1d/2d/3d``, the same pattern with ours: the fuser turns our layer back into torch's
(sharing the very same tensors, :func:`batchnorm.nn.convert`) and calls torch's fuser, so the
result is exactly what fusing the original model gives (a folded ``Conv2d`` in eval, an
``nni.ConvBn2d`` for quantization-aware training).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from batchnorm.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["register_fusion_patterns"]

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
