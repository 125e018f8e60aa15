"""Batch-norm layers of an ``ExportedProgram`` (``torch.export``) as modules again.

``ExportedProgram.module()`` runs batch norm as a call of ``aten.batch_norm`` on attributes of a
plain submodule, so nothing in it is a batch-norm layer that :func:`batchnorm.doctor.diagnose` or
:func:`batchnorm.inference.recalibrate` could find, put in train mode or measure.
:func:`lift_exported_batch_norm` turns each call back into a module call.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["ExportedBatchNorm", "lift_exported_batch_norm"]


class ExportedBatchNorm(_BatchNorm):
    """A batch-norm layer lifted from an exported graph: torch's batch norm on (N, C, *)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an (N, C, *) input, got {tuple(input.shape)}")


def lift_exported_batch_norm(graph_module: Any) -> int:
    """Turn the batch-norm calls of an unlifted ExportedProgram back into modules.

    ``ExportedProgram.module()`` keeps the batch-norm state as attributes of a plain submodule
    and calls ``aten.batch_norm(x, weight, bias, running_mean, running_var, training, momentum,
    eps, cudnn)``, or after ``run_decompositions()``
    ``aten._native_batch_norm_legit_no_training(x, weight, bias, running_mean, running_var,
    momentum, eps)`` whose first output is used. Each such call becomes a call of a batch-norm
    module (a ``_BatchNorm`` on any (N, C, *) input) that holds the same tensors under the same
    name, so the diagnosis, the recalibration and train mode work on it. Returns the number of
    layers lifted.
    """
    lifted = 0
    graph = graph_module.graph
    decomposed = torch.ops.aten._native_batch_norm_legit_no_training.default
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch.ops.aten.batch_norm.default:
            momentum, eps = float(node.args[6]), float(node.args[7])
            training = bool(node.args[5])
            outputs = [node]
        elif node.target is decomposed:
            momentum, eps = float(node.args[5]), float(node.args[6])
            # (output, mean, invstd): lifted only when nothing but the output is used.
            if any(user.target is not operator.getitem for user in node.users):
                continue
            if any(user.args[1] != 0 and user.users for user in node.users):
                continue
            outputs = [user for user in node.users if user.args[1] == 0]
            training = False
        else:
            continue
        x, weight, bias, mean, var = node.args[:5]
        if getattr(mean, "op", None) != "get_attr" or getattr(var, "op", None) != "get_attr":
            continue
        prefix, _, _ = mean.target.rpartition(".")
        if var.target != f"{prefix}.running_var" or not prefix:
            continue
        old = graph_module.get_submodule(prefix)
        running_mean = old.running_mean
        layer = ExportedBatchNorm(
            running_mean.numel(), eps=eps, momentum=momentum, affine=weight is not None
        )
        with torch.no_grad():
            for name in ("weight", "bias"):
                value = getattr(old, name, None)
                if value is not None and getattr(layer, name, None) is not None:
                    setattr(layer, name, torch.nn.Parameter(value.detach().clone()))
            layer.running_mean = running_mean
            layer.running_var = old.running_var
            tracked = getattr(old, "num_batches_tracked", None)
            if tracked is not None:
                layer.num_batches_tracked = tracked
        layer.train(training)  # the mode the program was exported in
        parent_name, _, child = prefix.rpartition(".")
        setattr(graph_module.get_submodule(parent_name), child, layer)
        with graph.inserting_after(node):
            call = graph.call_module(prefix, (x,))
        for output in outputs:
            output.replace_all_uses_with(call)
        lifted += 1
    graph.eliminate_dead_code()
    graph_module.recompile()
    return lifted
