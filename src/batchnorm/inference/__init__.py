"""Batch normalization at inference: population statistics (Algorithm 2) and folding.

Two tools for the frozen network of Ioffe & Szegedy (2015), Sec. 3.1 and Algorithm 2:

- :func:`recalibrate` ("precise BN", :mod:`batchnorm.inference.recalibration`) recomputes the
  population statistics of every batch-norm layer over many training mini-batches, count-weighted,
  instead of trusting the moving averages kept in training, and reports how far those had drifted.
- :func:`fold` and :func:`fold_into` (:mod:`batchnorm.inference.folding`) fold an eval-mode BN
  into the Linear or convolution that feeds it (``W' = W gamma / s``,
  ``b' = (b - E[x]) gamma / s + beta``), with a check that the outputs match.

Conventions are PyTorch's: ``running_var`` stores the unbiased variance, and eval mode uses
``running_mean`` / ``running_var`` whenever they exist. See docs/inference.md.

Built on them: :mod:`batchnorm.inference.doctor` (``batchnorm.doctor``: diagnose and fix a
model's batch norm), :mod:`batchnorm.inference.adapt` (``batchnorm.adapt``: AdaBN and TENT) and
:func:`accumulate` (one running-statistics update per optimizer step under gradient
accumulation). See docs/doctor.md.
"""

from batchnorm.inference.accumulate import StatisticsAccumulator, accumulate
from batchnorm.inference.adapt import AdaBN, Tent, adabn, tent
from batchnorm.inference.doctor import Diagnosis, Finding, diagnose, fix
from batchnorm.inference.folding import FoldedPair, FoldMismatchError, FoldReport, fold, fold_into
from batchnorm.inference.recalibration import LayerRecalibration, RecalibrationReport, recalibrate

__all__ = [
    "AdaBN",
    "Diagnosis",
    "Finding",
    "Tent",
    "adabn",
    "diagnose",
    "fix",
    "tent",
    "FoldMismatchError",
    "FoldReport",
    "FoldedPair",
    "LayerRecalibration",
    "RecalibrationReport",
    "StatisticsAccumulator",
    "accumulate",
    "fold",
    "fold_into",
    "recalibrate",
]
