"""The kernels as PyTorch custom operators, so autograd, torch.compile and autocast see them.

Two operators, each with a fake (meta) implementation that gives output shapes and strides
without running anything, so ``torch.compile(fullgraph=True)`` traces through them:

- ``batchnorm::forward(x, weight, bias, running_mean, running_var, residual, training,
  momentum, eps, relu_save) -> (y, stats, mask)``; mutates the running statistics. ``stats`` is
  (3, C) float32: the mean (mu = mean + mean_lo, exact), mean_lo and the inverse std used.
- ``batchnorm::backward(grad_out, x, weight, bias, stats, gate, residual, training,
  gate_mode, has_residual, param_grads) -> (dx, dweight, dbias, dresidual)``.

``relu_save``: 0 no ReLU; 1 ReLU, the backward gate reads the saved output y; 2 ReLU, a 1-bit
mask is saved instead (E / 8 bytes); 3 ReLU, nothing extra is saved and the gate is recomputed
from x (and the residual) in the backward pass. :class:`BatchNormFunction` ties the two together
for autograd (an autograd formula cannot be registered on an operator that mutates its inputs);
the backward is not itself differentiable (no double backward). Autocast leaves these operators
alone: they take float16/bfloat16 inputs with float32 parameters as they come, as PyTorch's batch
norm does.

This module has no ``from __future__ import annotations``: torch.library reads the type
annotations to build the operator schemas.
"""

import torch

from batchnorm import modes as _modes
from batchnorm.ops import _layout

RELU_NONE = _modes.RELU_NONE
RELU_SAVE_OUTPUT = _modes.FusedSave.OUTPUT.code
RELU_SAVE_MASK = _modes.FusedSave.MASK.code
RELU_RECOMPUTE = _modes.FusedSave.RECOMPUTE.code


def _launcher():
    # Imported on first use: the kernels are built for the interpreter or the GPU according to
    # TRITON_INTERPRET at that moment.
    from batchnorm.ops import _launch

    return _launch


@torch.library.custom_op("batchnorm::forward", mutates_args=("running_mean", "running_var"))
def forward_op(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    residual: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    relu_save: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch norm forward (+ residual, + ReLU); see the module docstring."""
    return _launcher().forward(
        x,
        weight,
        bias,
        running_mean,
        running_var,
        residual,
        training,
        momentum,
        eps,
        relu=relu_save != RELU_NONE,
        save_mask=relu_save == RELU_SAVE_MASK,
    )


@forward_op.register_fake
def _forward_fake(
    x, weight, bias, running_mean, running_var, residual, training, momentum, eps, relu_save
):
    _, view = _layout.kernel_layout(x)
    y = _layout.empty_output(x)
    stats = x.new_empty((3, x.shape[1]), dtype=torch.float32)
    if relu_save == RELU_SAVE_MASK:
        mask = x.new_empty(view.mask_shape(), dtype=torch.uint8)
    else:
        mask = x.new_empty((0,), dtype=torch.uint8)
    return y, stats, mask


@torch.library.custom_op("batchnorm::backward", mutates_args=())
def backward_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    stats: torch.Tensor,
    gate: torch.Tensor | None,
    residual: torch.Tensor | None,
    training: bool,
    gate_mode: int,
    has_residual: bool,
    param_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`forward_op`; see the module docstring."""
    return _launcher().backward(
        grad_out,
        x,
        weight,
        bias,
        stats,
        gate,
        residual,
        training,
        gate_mode,
        has_residual,
        param_grads,
    )


@backward_op.register_fake
def _backward_fake(
    grad_out,
    x,
    weight,
    bias,
    stats,
    gate,
    residual,
    training,
    gate_mode,
    has_residual,
    param_grads,
):
    dx = _layout.empty_output(x)
    dz = _layout.empty_output(x) if has_residual else x.new_empty((0,))
    dweight = torch.empty_like(weight) if param_grads and weight is not None else x.new_empty((0,))
    dbias = torch.empty_like(bias) if param_grads and bias is not None else x.new_empty((0,))
    return dx, dweight, dbias, dz


class BatchNormFunction(torch.autograd.Function):
    """Autograd for :func:`forward_op` (which mutates the running statistics, so PyTorch cannot
    take an autograd formula registered on the operator itself): forward_op in, backward_op
    out. ``torch.compile`` traces through it without a graph break."""

    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        bias,
        running_mean,
        running_var,
        residual,
        training,
        momentum,
        eps,
        relu_save,
    ):
        y, stats, mask = forward_op(
            x, weight, bias, running_mean, running_var, residual, training, momentum, eps,
            relu_save,
        )  # fmt: skip
        if relu_save == RELU_SAVE_OUTPUT:
            gate = y
        elif relu_save == RELU_SAVE_MASK:
            gate = mask
        else:
            gate = None
        kept_residual = residual if relu_save == RELU_RECOMPUTE else None
        ctx.save_for_backward(x, weight, bias, stats, gate, kept_residual)
        ctx.training = training
        ctx.eps = eps
        ctx.relu_save = relu_save
        ctx.has_residual = residual is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias, stats, gate, residual = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():
            return _double_differentiable_backward(ctx, grad_y, x, weight, bias, stats)
        dx, dweight, dbias, dz = backward_op(
            grad_y,
            x,
            weight,
            bias,
            stats,
            gate,
            residual,
            ctx.training,
            ctx.relu_save,  # the gate codes of the kernels are the relu_save codes
            ctx.has_residual,
            bool(needs[1] or needs[2]),
        )
        return (
            dx if needs[0] else None,
            dweight if needs[1] else None,
            dbias if needs[2] else None,
            None,
            None,
            dz if ctx.has_residual and needs[5] else None,
            None,
            None,
            None,
            None,
        )


def _double_differentiable_backward(ctx, grad_y, x, weight, bias, stats):
    """The backward pass as a graph (``backward(create_graph=True)``, Hessians, gradient
    penalties): batch norm rebuilt from the saved x in differentiable torch ops (batch statistics
    recomputed from x in training; the statistics the kernel used, constants, in eval) and
    differentiated by autograd. The kernels' own backward is not differentiable."""
    from batchnorm.primitives import accumulation_dtype, differentiate_rebuilt

    if ctx.relu_save != RELU_NONE or ctx.has_residual:
        raise RuntimeError(
            "the fused Triton batch_norm_relu / batch_norm_add_relu kernels have no second "
            "derivative (backward(create_graph=True) was called); compose batch_norm with "
            "torch.relu, or use backend='torch' or 'explicit' for gradient penalties and Hessians"
        )
    eps, training = ctx.eps, ctx.training
    dims = (0, *range(2, x.dim()))
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)

    def rebuild(x, weight, bias):
        acc = accumulation_dtype(x.dtype)
        xc = x.to(acc)
        if training:
            var, mean = torch.var_mean(xc, dim=dims, correction=0, keepdim=True)
            inv_std = torch.rsqrt(var + eps)
        else:
            mean = (stats[0].double() + stats[1].double()).to(acc).reshape(shape)
            inv_std = stats[2].to(acc).reshape(shape)
        y = (xc - mean) * inv_std
        if weight is not None:
            y = y * weight.to(acc).reshape(shape)
        if bias is not None:
            y = y + bias.to(acc).reshape(shape)
        return y.to(x.dtype)

    dx, dweight, dbias = differentiate_rebuilt(
        rebuild, (x, weight, bias), ctx.needs_input_grad[:3], grad_y
    )
    return dx, dweight, dbias, None, None, None, None, None, None, None
