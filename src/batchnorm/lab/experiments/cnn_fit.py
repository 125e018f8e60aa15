"""What the batch-size experiments (``small-batch``, ``ghost``, ``non-iid``) need beyond
:mod:`batchnorm.lab.experiments.cnn`: the training accuracy of a trained network, measured the
way its test accuracy is.

``train_net``'s ``train_acc_final`` is the accuracy on the training *batches*, in training mode,
over the last 10% of steps: it mixes in the batch statistics of each batch (and, with ghost
batches of 2 or few-class batches, exactly the effect these experiments study). Whether a
network fits its training set, and its train/test gap, are read instead from the whole training
subset in inference mode (population statistics from the moving averages, as at test time), so
the two accuracies differ only in the data. :func:`with_train_accuracy` adds that number to
every result as ``train_acc_eval``, through :func:`batchnorm.lab.experiments.cnn.train_jobs`'s
``finish`` hook; :func:`train_accuracy` reads it back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch import nn

from batchnorm.lab.experiments.cnn import ImageData, NetJob, evaluate

__all__ = ["with_train_accuracy", "train_accuracy", "TRAIN_KEY"]

TRAIN_KEY = "train_acc_eval"


def with_train_accuracy(
    data: ImageData,
) -> Callable[[NetJob, nn.Module, dict[str, Any]], dict[str, Any]]:
    """A ``finish`` hook for :func:`~batchnorm.lab.experiments.cnn.train_jobs`: the result with
    ``train_acc_eval``, the trained network's accuracy on the whole training subset in
    inference mode."""

    def finish(job: NetJob, network: nn.Module, result: dict[str, Any]) -> dict[str, Any]:
        if result.get("diverged_at", -1) > 0:
            accuracy = 1.0 / data.num_classes  # as train_net scores a diverged network
        else:
            accuracy, _ = evaluate(network, data.train_x, data.train_y)
        return {**result, TRAIN_KEY: accuracy}

    return finish


def train_accuracy(results: Sequence[dict[str, Any]]) -> np.ndarray:
    """The ``train_acc_eval`` of each result (see :func:`with_train_accuracy`)."""
    return np.array([r[TRAIN_KEY] for r in results], dtype=np.float64)
