"""The models the inference tools take, checked at one door.

``recalibrate``, ``fold``, ``diagnose``, ``fix``, AdaBN, TENT and ``accumulate`` find batch
norm as layers (``_BatchNorm`` modules) that they put in train mode, hook and update. Two model
forms hold batch norm that is no such layer, and every tool used to call them batch-norm free:
"no batch-norm layer" from ``diagnose`` (a healthy verdict), a ValueError from ``recalibrate``,
a silent no-op from ``fold`` and ``accumulate``:

- TorchScript (``torch.jit.script``, ``torch.jit.trace``, ``torch.jit.load``): compiled code
  whose submodules take no Python hooks and no replacement of their forward. Refused, with the
  remedy.
- ``torch.export``: an ``ExportedProgram`` is not a module (refused, with the remedy), and its
  ``.module()`` runs batch norm as ``aten.batch_norm`` calls on attributes of plain submodules.
  Those calls are turned back into layers (:func:`batchnorm.inference.exported.
  lift_exported_batch_norm`): in place where the tool changes the model in place anyway, on the
  tool's own copy elsewhere.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from batchnorm.nn.surgery import scripted_batch_norm

__all__ = ["check_model", "set_mode"]


def _unlifted_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` is a graph (``ExportedProgram.module()``) calling aten batch norm."""
    graph = getattr(model, "graph", None)
    if not isinstance(model, torch.fx.GraphModule) or graph is None:
        return False
    targets = {torch.ops.aten.batch_norm.default,
               torch.ops.aten._native_batch_norm_legit_no_training.default}  # fmt: skip
    return any(node.op == "call_function" and node.target in targets for node in graph.nodes)


def check_model(model: Any, who: str, *, lift: str = "inplace") -> nn.Module:
    """``model`` as the tool ``who`` can work on it, or a TypeError that says what to pass.

    Args:
        model: what the caller passed.
        who: the tool's name, for the messages.
        lift: for a graph from ``ExportedProgram.module()``: "inplace" turns its batch-norm
            calls into layers in ``model`` itself, "copy" in a deep copy (returned), "no" leaves
            it as it is.

    Returns:
        ``model``, or its copy with the batch-norm calls lifted (``lift="copy"``).
    """
    if isinstance(model, torch.export.ExportedProgram):
        raise TypeError(
            f"{who}: got a torch.export ExportedProgram, which is not a module; pass "
            "program.module() (its batch-norm calls are turned back into layers)"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: the model must be a torch.nn.Module, got {type(model).__name__}")
    scripted = scripted_batch_norm(model)
    if scripted:
        raise TypeError(
            f"{who}: the model is TorchScript (torch.jit.script, trace or load) with batch norm "
            f"at {scripted[:5]}; compiled modules take no hooks and no train-mode forward of "
            "Python layers, so their statistics cannot be measured or replaced here. Pass the "
            "Python model (the nn.Module before scripting, or its class with the weights loaded: "
            "model.load_state_dict(scripted.state_dict())), or an ExportedProgram's module()."
        )
    if lift != "no" and _unlifted_batch_norm(model):
        from batchnorm.inference.exported import lift_exported_batch_norm

        if lift == "copy":
            model = copy.deepcopy(model)
        lift_exported_batch_norm(model)
    return model


def set_mode(model: nn.Module, training: bool) -> None:
    """``model.train(training)``, also on a graph from ``ExportedProgram.module()``, whose
    ``train()`` and ``eval()`` raise NotImplementedError: there the flags are set as
    ``nn.Module.train`` sets them (every submodule's own ``train`` still runs, so a frozen layer
    stays in eval mode)."""
    try:
        model.train(training)
    except NotImplementedError:
        nn.Module.train(model, training)
