"""batchnorm: batch normalization (Ioffe & Szegedy, 2015) done properly.

Layers, importing one way (a lower layer never imports a higher one):

- :mod:`batchnorm.reference`: the paper's algorithms in NumPy, float64 (no torch needed).
- :mod:`batchnorm.ops`: GPU kernels (Triton), imported lazily.
- :mod:`batchnorm.functional`: the stateless torch API, ``batch_norm(..., backend=...)``.
- :mod:`batchnorm.nn`: drop-in replacements for ``torch.nn.BatchNorm1d/2d/3d``.
- :mod:`batchnorm.inference`: ``recalibrate`` (Algorithm 2) and ``fold``; built on them
  :mod:`batchnorm.doctor` (diagnose and fix), :mod:`batchnorm.adapt` (AdaBN, TENT) and
  ``batchnorm.accumulate`` (statistics under gradient accumulation).
- :mod:`batchnorm.lab`: experiments that reproduce published claims.
- :mod:`batchnorm.cli`: the ``batchnorm`` command.

``import batchnorm`` imports nothing heavy; submodules load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = (
    "reference",
    "ops",
    "functional",
    "nn",
    "inference",
    "lab",
    "cli",
    "backends",
    "doctor",
    "adapt",
)

__all__ = ["__version__", "accumulate", *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name == "accumulate":  # batchnorm.accumulate(model, micro_batches=k), a function
        return importlib.import_module(f"{__name__}.inference.accumulate").accumulate
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'batchnorm' has no attribute {name!r}")
