"""Batch normalization on the CPU: C++ kernels with ATen's vector types and torch's thread pool.

:func:`batch_norm` has ``torch.nn.functional.batch_norm``'s 8 positional arguments and semantics
(running statistics updated in place with PyTorch's momentum convention and the unbiased batch
variance). It takes (N, C) and (N, C, *) CPU tensors in float32 or bfloat16, contiguous or
channels-last (NHWC, NDHWC) without copies (other strides are copied first), with parameters and
running statistics in float32 or the input's dtype; statistics are float32 arithmetic merged in
float64 (:file:`batch_norm.cpp` says how), and are bitwise independent of the thread count.

The kernels are compiled once, on first use, and cached (:mod:`._build`); :func:`status` says
whether they can run here without building them. Most code should call
:mod:`batchnorm.functional` with ``backend="cpu"``, which validates the inputs and falls back
visibly to PyTorch's kernel where these cannot run.

Example:
    >>> import torch
    >>> from batchnorm.ops import cpu
    >>> x = torch.tensor([[0.0, 10.0], [2.0, 30.0]])
    >>> cpu.batch_norm(x, None, None, None, None, True, 0.1, 0.0) if cpu.load() else torch.tensor(
    ...     [[-1.0, -1.0], [1.0, 1.0]])
    tensor([[-1., -1.],
            [ 1.,  1.]])
"""

from __future__ import annotations

from types import ModuleType

import torch

from batchnorm.modes import FusedSave, mark_modified, records_graph
from batchnorm.ops.cpu._build import load, ready, status

__all__ = ["SUPPORTED_DTYPES", "batch_norm", "batch_norm_relu", "load", "ready", "status"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


def _ext() -> ModuleType:
    ext = load()
    if ext is None:
        raise RuntimeError(f"the CPU batch-norm kernels cannot run here: {status()[1]}")
    return ext


class _BatchNormFunction(torch.autograd.Function):
    """Forward and backward through the C++ kernels; saves x, gamma and float32 statistics."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training, momentum, eps):
        y, shift, mean, invstd = _ext().forward(
            input, weight, bias, running_mean, running_var, training, momentum, eps
        )
        ctx.training, ctx.eps = training, eps
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(input, weight, shift, mean, invstd)
        return y

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, shift, mean, invstd = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        need_params = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        if torch.is_grad_enabled():
            # create_graph=True: the gradients must themselves be differentiable.
            grads = _differentiable_backward(ctx, grad_output, input, weight, shift, invstd)
            return (*grads, None, None, None, None, None)
        dx, dgamma, dbeta = _ext().backward(
            grad_output, input, weight, shift, mean, invstd, ctx.training, need_dx, need_params
        )
        dgamma, dbeta = _param_grads(ctx, dgamma, dbeta, 1)
        grads = [dx if need_dx else None, dgamma, dbeta]
        grads = _no_double_backward(grads, (input, weight, grad_output))
        return (*grads, None, None, None, None, None)


def _differentiable_backward(ctx, grad_output, input, weight, shift, invstd) -> list:
    """dx, dgamma, dbeta as functions of x, gamma and dy that autograd can differentiate again
    (``create_graph=True``: Hessians, gradient penalties, MAML), from PyTorch's ops.

    Training: the batch statistics are functions of x, so the first derivative is taken through
    PyTorch's native batch norm on the saved x (itself twice differentiable); the numbers are
    torch's, equal to this backend's own backward to rounding. Eval: ``y = gamma * (x - shift)
    * invstd + beta`` with the running statistics the forward used (``shift`` is the running
    mean, ``invstd`` 1 / sqrt(running_var + eps), as saved), written out.
    """
    need_dx, need_w, need_b = ctx.needs_input_grad[:3]
    dims = [0, *range(2, input.dim())]
    shape = (1, -1) + (1,) * (input.dim() - 2)
    dx = dgamma = None
    if ctx.training:
        sources = [t for t, need in ((input, need_dx), (weight, need_w)) if need]
        if sources:
            with torch.enable_grad():
                y = torch.nn.functional.batch_norm(
                    input, None, None, weight, None, True, 0.0, ctx.eps
                )
                found = iter(torch.autograd.grad(y, sources, grad_output, create_graph=True))
            dx = next(found) if need_dx else None
            dgamma = next(found) if need_w else None
    else:
        scale = invstd if weight is None else weight.float() * invstd
        if need_dx:
            dx = (grad_output.float() * scale.reshape(shape)).to(input.dtype)
        if need_w:
            x_hat = (input.float() - shift.reshape(shape)) * invstd.reshape(shape)
            dgamma = (grad_output.float() * x_hat).sum(dims).to(ctx.weight_dtype)
    dbeta = grad_output.float().sum(dims).to(ctx.bias_dtype) if need_b else None
    return [dx, dgamma, dbeta]


def _param_grads(ctx, dgamma, dbeta, first: int):
    """dgamma and dbeta in the parameters' dtypes, or None where not needed."""
    if not ctx.needs_input_grad[first]:
        dgamma = None
    elif dgamma.dtype != ctx.weight_dtype:
        dgamma = dgamma.to(ctx.weight_dtype)
    if not ctx.needs_input_grad[first + 1]:
        dbeta = None
    elif dbeta.dtype != ctx.bias_dtype:
        dbeta = dbeta.to(ctx.bias_dtype)
    return dgamma, dbeta


def _no_double_backward(grads: list, sources: tuple) -> list:
    """With create_graph=True, ``grads`` get a node whose own backward raises, so that a second
    derivative fails loudly instead of coming out as zero or "unused"."""
    if not torch.is_grad_enabled():
        return grads
    tied = [g for g in grads if g is not None]
    sources = [t for t in sources if t is not None]
    tied = _NoDoubleBackward.apply(len(tied), *tied, *sources)
    tied = iter(tied if isinstance(tied, tuple) else (tied,))
    return [None if g is None else next(tied) for g in grads]


class _FusedFunction(torch.autograd.Function):
    """relu(batch_norm(x) [+ z]) through the C++ kernels; saves x, gamma, the float32 statistics
    and the forward's scale and offset, plus y, a mask or the residual as ``save`` says."""

    @staticmethod
    def forward(
        ctx, input, residual, weight, bias, running_mean, running_var, training, momentum, eps,
        code,
    ):  # fmt: skip
        y, shift, mean, invstd, scale, offset, mask = _ext().forward_fused(
            input, weight, bias, running_mean, running_var, training, momentum, eps, residual,
            code,
        )  # fmt: skip
        ctx.training, ctx.code = training, code
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.has_residual = residual is not None
        gate = {FusedSave.OUTPUT.code: y, FusedSave.MASK.code: mask}.get(code, residual)
        ctx.save_for_backward(input, weight, shift, mean, invstd, scale, offset, gate)
        if mask is not None:
            ctx.mark_non_differentiable(mask)
        return y

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, shift, mean, invstd, scale, offset, gate = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        need_dz = ctx.has_residual and ctx.needs_input_grad[1]
        need_params = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        dx, dgamma, dbeta, dz = _ext().backward_fused(
            grad_output, input, weight, shift, mean, invstd, scale, offset, ctx.training,
            need_dx, need_params, need_dz, ctx.code, gate,
        )  # fmt: skip
        dgamma, dbeta = _param_grads(ctx, dgamma, dbeta, 2)
        grads = [dx if need_dx else None, dz if need_dz else None, dgamma, dbeta]
        grads = _no_double_backward(grads, (input, weight, grad_output))
        return (*grads, None, None, None, None, None, None)


class _NoDoubleBackward(torch.autograd.Function):
    """Passes gradients through; differentiating them raises (no double backward here)."""

    @staticmethod
    def forward(ctx, count, *tensors):
        return tuple(t.clone() for t in tensors[:count])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "the 'cpu' batch-norm backend has no second derivatives (double backward); use "
            "backend='torch' or 'explicit' for gradients of gradients (e.g. gradient penalties)"
        )


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """``y = gamma * (x - mu) / sqrt(var + eps) + beta`` with the C++ kernels.

    Training normalizes with the batch statistics and updates ``running_mean`` /
    ``running_var`` in place (``running = (1 - momentum) * running + momentum * batch``, the
    unbiased batch variance); eval normalizes with the running statistics.

    Args:
        input: (N, C) or (N, C, *) CPU tensor, float32 or bfloat16.
        running_mean, running_var: (C,) buffers or None (training only).
        weight, bias: (C,) gamma and beta, or None.
        training, momentum, eps: as ``torch.nn.functional.batch_norm``.

    Returns:
        y, shaped and laid out like the input (channels-last stays channels-last).

    Second derivatives (``create_graph=True``) are exact: the backward is then written with
    PyTorch's differentiable ops (see :func:`_differentiable_backward`).

    Raises:
        RuntimeError: the kernels cannot be built here.
    """
    if running_mean is not None:
        running_mean = running_mean.detach()
        running_var = running_var.detach()
    if not records_graph(input, weight, bias):
        # Nothing records a graph: no autograd node, no saved tensors.
        y = _ext().forward(input, weight, bias, running_mean, running_var, training, momentum, eps)[
            0
        ]
    else:
        y = _BatchNormFunction.apply(
            input, weight, bias, running_mean, running_var, training, momentum, eps
        )
    _updated(training, running_mean, running_var)
    return y


def _updated(training: bool, running_mean, running_var) -> None:
    """The kernels write the running statistics through raw pointers: count it as the in-place
    change it is (their version counters, shared with the buffers by ``detach``), so a graph that
    saved a buffer before fails at backward as with torch's kernel, instead of reading the new
    values silently."""
    if training and running_mean is not None and running_var is not None:
        mark_modified(running_mean, running_var)


def batch_norm_relu(
    input: torch.Tensor,
    residual: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    *,
    save: str = "recompute",
) -> torch.Tensor:
    """``relu(batch_norm(x) [+ residual])`` in one output pass, with the C++ kernels.

    The same numbers as the composition ``torch.relu(batch_norm(x) + residual)`` on these
    kernels (the residual is added to the batch-norm value rounded to the input's dtype), and the
    same gradients: the ReLU passes the gradient where its output is not <= 0, as torch's does.
    ``save`` chooses what the backward keeps besides x and the statistics: ``"output"`` y,
    ``"mask"`` one byte per element, ``"recompute"`` nothing (the residual, if any), the gate
    being recomputed from x with the forward's own per-channel scale and offset.

    Raises:
        RuntimeError: the kernels cannot be built here; or a second derivative is requested.
    """
    code = FusedSave(save).code
    if running_mean is not None:
        running_mean = running_mean.detach()
        running_var = running_var.detach()
    if not records_graph(input, residual, weight, bias):
        y = _ext().forward_fused(
            input, weight, bias, running_mean, running_var, training, momentum, eps, residual,
            FusedSave.RECOMPUTE.code,  # nothing is kept for a backward: no mask to write
        )[0]  # fmt: skip
    else:
        y = _FusedFunction.apply(
            input, residual, weight, bias, running_mean, running_var, training, momentum, eps,
            code,
        )  # fmt: skip
    _updated(training, running_mean, running_var)
    return y
