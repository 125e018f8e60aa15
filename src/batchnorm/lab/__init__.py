"""The lab: experiments that reproduce published claims about batch normalization.

Run them with the ``batchnorm lab`` command (``batchnorm lab list``, ``batchnorm lab run fig1``,
``batchnorm lab report``, ``batchnorm lab show NAME``) or from Python::

    from batchnorm.lab import experiments, run_experiment, make_config
    exp = experiments.get("fig1")
    result = run_experiment(exp, make_config(exp, quick=True), quick=True)

Parts: :mod:`~batchnorm.lab.data` (MNIST / Fashion-MNIST from their IDX files, fetched and
verified), :mod:`~batchnorm.lab.wide` (many small MLPs trained as one wide network, using
:class:`batchnorm.nn.BatchNorm1d`), :mod:`~batchnorm.lab.train` (SGD, Algorithm 2 evaluation,
checkpoints), :mod:`~batchnorm.lab.experiment` (run directories, verdicts, reports),
:mod:`~batchnorm.lab.experiments` (the experiments), :mod:`~batchnorm.lab.cli` (the command).
The lab uses the layers (:mod:`batchnorm.nn`) and :mod:`batchnorm.inference`, never the kernels
(:mod:`batchnorm.ops`). It needs torch; plots need matplotlib, progress bars tqdm.
"""

from __future__ import annotations

from batchnorm.lab.experiment import make_config, run_experiment

__all__ = ["make_config", "run_experiment"]
