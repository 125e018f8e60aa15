"""Model surgery: the one tree walk and the one rebuild behind every conversion.

``convert`` (torch's classes <-> ours), ``convert_sync_batchnorm`` and its inverse, and the frozen
conversion all replace layers of a model. They share two mechanisms, so that a converted model
behaves exactly as the original under every tool that walks it:

- :func:`replace_modules`: visit the root and every descendant once, replacing where a rule says
  so (the root too, which is then returned). A TorchScript model holding batch norm
  (:func:`scripted_batch_norm`) is refused: its compiled modules cannot be swapped, and
  returning it unchanged would be a silent no-op.
- :func:`rebuild_as`: a layer of another class carrying *everything* the original had: the very
  same parameter and buffer tensors (optimizers holding them keep working), non-persistent
  buffers, every kind of hook (forward and pre-forward, with or without kwargs, always-called,
  backward, state-dict and load-state-dict hooks: the hook dictionaries are shared, so the
  handles a user holds still remove them), the training flag, and any attribute a user or
  library set on the instance.

:func:`mark_fx_leaf` makes ``torch.fx`` treat a layer as it treats torch's own: an opaque
``call_module`` node (``symbolic_trace``, torchvision's ``create_feature_extractor``, FX fusion,
``prepare_fx``), instead of tracing into its Python forward. Traced as the root itself (where
no tracer keeps it opaque), a layer gives torch's standard op where one exists
(:func:`trace_with_running_statistics`) and raises :func:`root_trace_error` otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "mark_fx_leaf",
    "rebuild_as",
    "rebuild_layer",
    "replace_modules",
    "root_trace_error",
    "scripted_batch_norm",
    "trace_with_running_statistics",
]

# torch.fx's default Tracer.is_leaf_module keeps a module opaque when ``m.__module__`` starts with
# "torch.nn". Our layers' classes live in this package, so each instance says where the behaviour
# it mirrors lives; the class itself (pickling, isinstance, repr) is untouched.
_FX_LEAF_MODULE = "torch.nn.modules.batchnorm"

# Attributes the project's layers add to an instance, dropped when converting back to torch's.
OWN_ATTRIBUTES = ("backend", "nonfinite", "last_backend", "last_sync", "__module__", "_plan")


def mark_fx_leaf(module: torch.nn.Module) -> None:
    """Make ``torch.fx`` trace ``module`` as one ``call_module`` node, as it does torch's norms."""
    module.__dict__["__module__"] = _FX_LEAF_MODULE


def trace_with_running_statistics(module: torch.nn.Module, input: Any) -> Any:
    """A batch-norm layer normalizing with its running statistics, on a ``torch.fx`` proxy: the
    graph node torch.nn's own layers give in eval mode (``batch_norm`` with training False)."""
    return torch.nn.functional.batch_norm(
        input,
        module.running_mean,
        module.running_var,
        module.weight,
        module.bias,
        False,
        0.0,
        module.eps,
    )


def root_trace_error(module: torch.nn.Module, why: str) -> torch.fx.proxy.TraceError:
    """The error for a layer whose forward cannot be a ``torch.fx`` graph when it is the root of
    the trace: ``why``, and the two ways that do work."""
    mode = "in training" if module.training else "in eval without running statistics"
    return torch.fx.proxy.TraceError(
        f"torch.fx cannot trace {type(module).__name__} {mode} as the root module: {why}. "
        "Trace it in eval mode with running statistics (module.eval()), or trace a model that "
        "holds it, where it stays one call_module node."
    )


def rebuild_as(module: torch.nn.Module, target: type, **attributes: Any) -> torch.nn.Module:
    """An instance of ``target`` carrying ``module``'s whole state (see the module docstring).

    Args:
        module: The layer to rebuild.
        target: The new class (it must keep the same parameter and buffer names).
        attributes: Set on the new instance afterwards (e.g. ``backend``, ``process_group``).

    Returns:
        The new layer; ``module`` itself is left as it was.
    """
    new = target.__new__(target)
    state = dict(module.__dict__)
    for key in ("_parameters", "_buffers", "_modules"):
        state[key] = state[key].copy()
    if "_non_persistent_buffers_set" in state:
        state["_non_persistent_buffers_set"] = set(state["_non_persistent_buffers_set"])
    new.__dict__.update(state)
    for name, value in attributes.items():
        setattr(new, name, value)
    return new


def rebuild_layer(
    module: torch.nn.Module, target: type, *, ours: bool, **attributes: Any
) -> torch.nn.Module:
    """:func:`rebuild_as` for a conversion between torch's norm layers and this package's.

    Into one of ours (``ours=True``): the layer gets this package's own attributes (``backend``
    and ``nonfinite`` kept from the original where it had them, ``last_backend`` reset, then
    ``attributes``) and is marked as an fx leaf. Into torch's (or a user's) class: those
    attributes are dropped again, and ``attributes`` set.
    """
    if ours:
        defaults = {
            "backend": getattr(module, "backend", None),
            "nonfinite": getattr(module, "nonfinite", "propagate"),
            "last_backend": None,
        }
        new = rebuild_as(module, target, **{**defaults, **attributes})
        mark_fx_leaf(new)
        return new
    new = rebuild_as(module, target, **attributes)
    for name in OWN_ATTRIBUTES:
        new.__dict__.pop(name, None)
    return new


# torch.nn's batch-norm classes and this package's, as TorchScript records them (original_name)
_BATCH_NORM_NAMES = frozenset(
    {
        "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "_BatchNorm", "_NormBase",
        "GhostBatchNorm", "BatchRenorm", "FrozenBatchNorm", "FrozenBatchNorm2d",
        "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d",
    }
)  # fmt: skip


def scripted_batch_norm(model: torch.nn.Module) -> list[str]:
    """Names of the TorchScript submodules of ``model`` that are batch norm (by the class they
    were compiled from, or by running statistics of their own)."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.jit.ScriptModule):
            continue
        original = getattr(module, "original_name", "")
        has_statistics = all(
            isinstance(getattr(module, key, None), torch.Tensor)
            for key in ("running_mean", "running_var")
        )
        if original in _BATCH_NORM_NAMES or has_statistics:
            found.append(name or "(model)")
    return found


def replace_modules(
    model: torch.nn.Module, swap: Callable[[str, torch.nn.Module], torch.nn.Module]
) -> torch.nn.Module:
    """Apply ``swap(qualified_name, module)`` to the root and every descendant, once each.

    ``swap`` returns the module itself to keep it, or a replacement; a replacement's children are
    not visited again. Returns the (possibly replaced) root.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    scripted = scripted_batch_norm(model)
    if scripted:  # its compiled modules cannot be swapped: nothing would change, silently
        raise TypeError(
            f"the model is TorchScript (torch.jit.script, trace or load) with batch norm at "
            f"{scripted[:5]}, whose compiled modules cannot be replaced; convert the Python "
            "model before scripting it (torch.jit.script(convert(model)))"
        )
    root = swap("", model)
    if root is not model:
        return root

    def visit(prefix: str, parent: torch.nn.Module) -> None:
        for child_name, child in list(parent.named_children()):
            full = f"{prefix}.{child_name}" if prefix else child_name
            new = swap(full, child)
            if new is not child:
                setattr(parent, child_name, new)
            else:
                visit(full, child)

    visit("", root)
    return root
