"""``batchnorm.doctor``: what is wrong with a model's batch norm, and the fix.

The implementation is :mod:`batchnorm.inference.doctor` (it builds on ``recalibrate`` and
``fold``); this module is its public name. See docs/doctor.md.
"""

from batchnorm.inference.doctor import (
    KINDS,
    SEVERITIES,
    Diagnosis,
    Finding,
    FixReport,
    LayerStatus,
    diagnose,
    fix,
)

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
