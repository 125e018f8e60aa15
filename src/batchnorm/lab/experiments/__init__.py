"""The lab's experiments, by name.

======================  ===================================================================
``fig1`` (``mnist``)    Figure 1: MNIST sigmoid MLP with and without BN (the main job)
``lr``                  higher learning rates: where each model trains, where it diverges
``init``                initialization scale: how sensitive each model is to it
``nonlinearity``        saturating nonlinearities (sigmoid, tanh) vs ReLU in a deeper net
``regularization``      BN vs dropout vs both vs neither: test accuracy and train/test gap
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
