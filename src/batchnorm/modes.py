"""Small shared vocabularies: what a fused ReLU's backward keeps, whether Triton interprets,
whether autograd records a graph.

Kept in one place (and importing nothing of the package) so that the functional API, the
backend choice and the Triton launchers cannot drift apart.

Example:
    >>> FusedSave("mask").code, [mode.value for mode in FusedSave]
    (2, ['output', 'mask', 'recompute'])
"""

from __future__ import annotations

import enum
import os

__all__ = [
    "FUSED_SAVE_MODES",
    "RELU_NONE",
    "FusedSave",
    "dual_level_active",
    "forward_ad_active",
    "functorch_active",
    "holds_values",
    "mark_modified",
    "records_graph",
    "triton_interpreting",
]


class FusedSave(str, enum.Enum):
    """What the backward pass of a fused batch norm + ReLU keeps (the ``save=`` argument).

    - ``OUTPUT``: y itself (the ReLU gate is ``y > 0``);
    - ``MASK``: one bit per element;
    - ``RECOMPUTE``: nothing extra: the pre-activation is recomputed from x (and the residual).
    """

    OUTPUT = "output"
    MASK = "mask"
    RECOMPUTE = "recompute"

    @property
    def code(self) -> int:
        """The integer the Triton kernels and custom ops take (0 means no ReLU)."""
        return _CODES[self.value]


_CODES = {"output": 1, "mask": 2, "recompute": 3}
RELU_NONE = 0  # the code of "no ReLU fused"
FUSED_SAVE_MODES: tuple[str, ...] = tuple(mode.value for mode in FusedSave)


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET`` set to 1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def records_graph(*tensors: object) -> bool:
    """True when autograd would record a graph through these (grad mode on and one of them,
    ignoring None, requires grad): a kernel then has to keep what its backward pass needs.

    >>> import torch
    >>> records_graph(torch.ones(2, requires_grad=True), None)
    True
    >>> with torch.no_grad():
    ...     records_graph(torch.ones(2, requires_grad=True))
    False
    """
    import torch

    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in tensors
    )


def mark_modified(*tensors: object) -> None:
    """Count an in-place change of ``tensors`` that autograd did not see (a kernel that wrote
    through a ``.data`` alias or a raw pointer): their version counters go up by one, as an
    in-place torch op would make them, so a graph that saved one of them before the change
    fails loudly at backward ("modified by an inplace operation") instead of silently using the
    new values.

    >>> import torch
    >>> t = torch.zeros(2)
    >>> t.data.add_(1.0).sum().item(), t._version
    (2.0, 0)
    >>> mark_modified(t)
    >>> t._version
    1
    """
    _increment_versions(tensors)


def _first_increment(tensors: tuple) -> None:
    """Resolves, on first use, how this torch bumps version counters (a sequence of tensors
    since torch 2.1's ``torch.autograd.graph.increment_version``; one tensor before)."""
    global _increment_versions
    import torch

    increment = torch._C._increment_version
    try:
        increment(())
        _increment_versions = increment
    except TypeError:  # pragma: no cover - older torch

        def one_by_one(sequence: tuple) -> None:
            for t in sequence:
                increment(t)

        _increment_versions = one_by_one
    _increment_versions(tensors)


_increment_versions = _first_increment


def holds_values(t) -> bool:
    """Whether tensor ``t`` has values that can be read on the host: not a meta tensor (a model
    built on ``device="meta"``) nor a fake one (shape propagation, FLOP counters, tracing), on
    which a data-dependent check (``bool(...)``, ``.item()``) raises.

    >>> import torch
    >>> holds_values(torch.zeros(2)), holds_values(torch.zeros(2, device="meta"))
    (True, False)
    """
    if t.is_meta:
        return False
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - a torch without fake tensors has none to meet
        return True
    return not is_fake(t)


def functorch_active() -> bool:
    """True inside a torch.func transform (grad, vmap, jacrev, ...), where tensors are wrapped:
    ``.data`` aliases would escape its checks, and custom autograd Functions without functorch
    support fail.

    >>> import torch
    >>> functorch_active(), torch.func.grad(lambda x: x * float(functorch_active()))(
    ...     torch.tensor(2.0)).item()
    (False, 1.0)
    """
    return _functorch_check()


def _first_functorch_check() -> bool:
    """Resolves the check on first use: a C function in torch >= 2.1 (tens of nanoseconds), or
    the interpreter stack."""
    global _functorch_check
    import torch

    _functorch_check = getattr(
        torch._C,
        "_are_functorch_transforms_active",
        lambda: torch._C._functorch.peek_interpreter_stack() is not None,
    )
    return _functorch_check()


_functorch_check = _first_functorch_check


def forward_ad_active(*tensors: object) -> bool:
    """True where forward-mode AD (``torch.autograd.forward_ad``) is on and one of ``tensors``
    carries a tangent at the current level. Kernels written as custom autograd nodes without a
    forward-mode formula would drop that tangent (the C++ CPU node) or raise; PyTorch's own
    ops carry it. Outside a ``dual_level`` the cost is one attribute read.

    >>> import torch
    >>> import torch.autograd.forward_ad as fwAD
    >>> x = torch.ones(2)
    >>> with fwAD.dual_level():
    ...     dual = fwAD.make_dual(x, torch.ones(2))
    ...     forward_ad_active(dual, None), forward_ad_active(x)
    (True, False)
    """
    if not dual_level_active():
        return False
    forward_ad = _forward_ad or _load_forward_ad()
    return any(
        t is not None and forward_ad.unpack_dual(t).tangent is not None  # type: ignore[arg-type]
        for t in tensors
    )


def dual_level_active() -> bool:
    """True inside ``torch.autograd.forward_ad.dual_level`` (whether or not a tensor carries a
    tangent): one attribute read, for the layers' per-call checks."""
    return (_forward_ad or _load_forward_ad())._current_level >= 0


_forward_ad = None


def _load_forward_ad():
    global _forward_ad
    from torch.autograd import forward_ad

    _forward_ad = forward_ad
    return forward_ad
