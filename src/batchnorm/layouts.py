"""Memory layouts of outputs and gradients, as PyTorch's own kernels give them.

A drop-in layer must hand back tensors laid out as torch.nn's do, or code that follows it
breaks (``y.view(n, -1)`` needs a contiguous y) or slows down. PyTorch's kernels write:

- batch norm and group norm: y and dx in ``x.suggest_memory_format()`` (channels-last for a
  4-D or 5-D x strided like it, else contiguous), whatever the strides of x or of dy;
- layer norm and instance norm: y and dx contiguous.

Element-wise torch ops instead follow the strides of their operands, so a norm written with
them (the explicit backend) gives a y with x's strides for a sequence stored (N, L, C)
(``x.transpose(1, 2)``) and a dx with dy's strides. :func:`as_torch_output` puts both right,
with a copy only where a layout differs. Under torch.compile, jit tracing and torch.func the
layouts are the tracer's own and nothing is done.

Kept importing nothing of the package but :mod:`batchnorm.modes`, so that the functional API,
the explicit backend and the kernels' launchers share one definition.

Example:
    >>> import torch
    >>> x = torch.randn(2, 5, 3).transpose(1, 2)  # (N, C, L) viewed from (N, L, C) storage
    >>> suggested_format(x) == torch.contiguous_format
    True
    >>> as_torch_output(x * 2, suggested_format(x)).is_contiguous()
    True
"""

from __future__ import annotations

import torch

from batchnorm.modes import functorch_active

__all__ = [
    "GradInLayout",
    "as_torch_output",
    "grad_in_layout",
    "guards_layouts",
    "in_layout",
    "in_suggested_format",
    "standard_strides",
    "suggested_format",
    "vmapping",
]


def suggested_format(x: torch.Tensor) -> torch.memory_format:
    """``x.suggest_memory_format()``: channels-last for 4-D/5-D tensors strided like it, else
    contiguous (the format torch's batch-norm and group-norm kernels give their outputs).

    ATen's rule (``is_channels_last_strides_2d``/``_3d``), on plain int strides in a few
    hundred nanoseconds; symbolic shapes (torch.compile) go to torch's own DDE-safe copy."""
    if x.dim() not in (4, 5):
        return torch.contiguous_format
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    shape, strides = x.shape, x.stride()
    if not all(type(v) is int for v in (*shape, *strides)):
        try:
            from torch._prims_common import suggest_memory_format
        except ImportError:  # pragma: no cover - older torch: the dense check
            dense = x.is_contiguous(memory_format=fmt) and not x.is_contiguous()
            return fmt if dense else torch.contiguous_format
        return suggest_memory_format(x)
    if x.layout != torch.strided or strides[1] == 0:
        return torch.contiguous_format
    least = 0
    for d in (1, 3, 2, 0) if x.dim() == 4 else (1, 4, 3, 2, 0):
        if shape[d] == 0 or strides[d] < least or (d == 0 and least == strides[1]):
            return torch.contiguous_format
        least = strides[d] * shape[d]
    return fmt


def in_suggested_format(x: torch.Tensor) -> bool:
    """Whether ``x`` is dense in the format torch's kernels give their outputs for it (so that
    an output with x's strides is laid out as theirs): contiguous tensors at once."""
    if x.is_contiguous():
        return True
    fmt = suggested_format(x)
    return fmt != torch.contiguous_format and x.is_contiguous(memory_format=fmt)


def standard_strides(shape: torch.Size | tuple[int, ...], fmt: torch.memory_format) -> tuple:
    """The strides ``torch.empty(shape, memory_format=fmt)`` has."""
    order = list(range(len(shape)))[::-1]  # innermost first
    if fmt != torch.contiguous_format:
        order = [1, *order[:-2], 0]  # channels innermost, then the spatial axes, batch last
    strides, step = [0] * len(shape), 1
    for d in order:
        strides[d] = step
        step *= max(shape[d], 1)
    return tuple(strides)


def in_layout(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """t with the standard strides of fmt: t itself where it has them, else a copy."""
    if type(t) is not torch.Tensor or t.stride() == standard_strides(t.shape, fmt):
        return t
    return t.clone(memory_format=fmt)


def guards_layouts() -> bool:
    """Whether layouts are set here: not under torch.compile or jit tracing, which would record
    the copies, nor under torch.func.vmap, whose batched tensors take no channels-last copy
    (torch.func.grad, jvp and jacrev are covered)."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or vmapping())


def vmapping() -> bool:
    """Whether a torch.func.vmap is active, at any level of the transforms."""
    if not functorch_active():
        return False
    try:
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    except ImportError:  # another torch: assume the worst
        return True
    return any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters())


class GradInLayout(torch.autograd.Function):
    """A copy of y, whose backward hands the gradient on with the standard strides of a memory
    format (copied only where they differ); differentiable again. For torch.func transforms
    (grad, jvp), where a tensor hook cannot run. A copy, not a view, so that an in-place op on
    the output (a ReLU(inplace=True)) stays allowed."""

    generate_vmap_rule = True

    @staticmethod
    def forward(y: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
        return y.clone()  # the same strides

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.fmt = inputs[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return in_layout(grad, ctx.fmt), None

    @staticmethod
    def jvp(ctx, y_tangent: torch.Tensor, _fmt_tangent):
        return y_tangent


def grad_in_layout(y: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """y, whose gradient reaches y's own backward with the standard strides of fmt: a tensor
    hook (nothing copied), or under torch.func transforms :class:`GradInLayout`."""
    if not y.requires_grad:
        return y
    if functorch_active():
        return GradInLayout.apply(y, fmt)
    y.register_hook(lambda grad: in_layout(grad, fmt))
    return y


def as_torch_output(y: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """y, computed by element-wise torch ops, laid out as PyTorch's kernel lays out its output
    (``fmt``: see the module's notes), and its gradient handed back in that layout so that the
    input's gradient follows it as torch's does. A copy of y only where its layout differs, a
    copy of the gradient only where the incoming one's differs; nothing under torch.compile,
    jit tracing or torch.func (their layouts are their own)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or functorch_active():
        return y
    if not y.is_contiguous(memory_format=fmt):
        y = y.contiguous(memory_format=fmt)
    return grad_in_layout(y, fmt)
