"""The lab's experiments, by name.

======================  ===================================================================
``fig1`` (``mnist``)    Figure 1: MNIST sigmoid MLP with and without BN (the main job)
``lr``                  higher learning rates: where each model trains, where it diverges
``init``                initialization scale: how sensitive each model is to it
``nonlinearity``        saturating nonlinearities (sigmoid, tanh) vs ReLU in a deeper net
``regularization``      BN vs dropout vs both vs neither: test accuracy and train/test gap
``small-batch``         BN with statistics over 32 ... 2 examples of a batch vs GN (CNN)
``non-iid``             BN vs BatchRenorm on few-class batches, GN as the control (CNN)
``ghost``               large batches: sqrt learning rate, ghost BN, regime adaptation (CNN)
``precise-bn``          moving averages vs recomputed population statistics during training (CNN)
``agc``                 unnormalized CNN with / without adaptive gradient clipping vs BN, by batch
``adapt``               test-time adaptation on corrupted data: AdaBN and TENT (Wang et al. 2021)
``noisy-bn``            Santurkar et al. Figure 2: BN with injected noise still helps
``ics``                 Santurkar et al. Definition 2.1: BN does not reduce covariate shift
``landscape``           Santurkar et al. Sec. 3.1: BN smooths the loss landscape
``explosion``           gradient explosion at init in deep BN nets (Yang et al. 2019)
``decoupling``          length-direction decoupling and GDNP (Kohler et al. 2019)
``theorems``            single-layer bounds, Theorems 4.1 and 4.2 (Santurkar et al. 2018)
``rnn``                 LSTM on row-by-row MNIST: BN per time step / shared / layer norm
======================  ===================================================================

Each module opens with the claim it tests, the figure it reproduces and the choices it made.
"""

from __future__ import annotations

import importlib

from batchnorm.lab.experiment import Experiment

__all__ = ["NAMES", "get", "all_experiments"]

# name -> module; the order is the order of ``batchnorm lab list``.
_MODULES = {
    "fig1": "fig1",
    "lr": "lr_sweep",
    "init": "init_scale",
    "nonlinearity": "nonlinearity",
    "regularization": "regularization",
    "noisy-bn": "noisy_bn",
    "ics": "ics",
    "landscape": "landscape",
    "explosion": "explosion",
    "decoupling": "decoupling",
    "theorems": "theorems",
    "small-batch": "small_batch",
    "non-iid": "non_iid",
    "ghost": "ghost",
    "precise-bn": "precise_bn",
    "agc": "agc",
    "adapt": "adapt",
    "rnn": "rnn",
}
NAMES: tuple[str, ...] = tuple(_MODULES)


def _load(name: str) -> Experiment:
    module = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    return module.EXPERIMENT


def all_experiments() -> list[Experiment]:
    """Every experiment, in listing order."""
    return [_load(name) for name in NAMES]


def get(name: str) -> Experiment:
    """The experiment called ``name`` (or one of its aliases).

    Raises:
        KeyError: unknown name; the message lists the known ones.
    """
    key = name.strip().lower()
    if key in _MODULES:
        return _load(key)
    for experiment in all_experiments():
        if key in experiment.aliases:
            return experiment
    known = ", ".join(
        f"{e.name}{' (' + ', '.join(e.aliases) + ')' if e.aliases else ''}"
        for e in all_experiments()
    )
    raise KeyError(f"unknown experiment {name!r}; known: {known} (see `batchnorm lab list`)")
