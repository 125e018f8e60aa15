"""The ``"explicit"`` backend: batch norm in plain torch ops, with the paper's backward written out.

This is :mod:`batchnorm.reference` carried over to torch tensors so that it runs inside autograd,
on any device and dtype. It is not fast; it is there to check the fast paths against the paper
(``batchnorm check``), and as a fallback whose every step can be read.

Training forward (Algorithm 1), per channel over the m = N * prod(spatial) values::

    mu_B = mean(x);  var_B = mean((x - mu_B)^2)       # two passes: no E[x^2] - E[x]^2
    xhat = (x - mu_B) / sqrt(var_B + eps);  y = gamma * xhat + beta

Backward (the chain rule as printed in the paper, section 3)::

    dl/dxhat = dl/dy * gamma
    dl/dvar  = sum(dl/dxhat * (x - mu_B)) * (-1/2) * (var_B + eps)^(-3/2)
    dl/dmu   = sum(dl/dxhat) * (-1/sqrt(var_B + eps)) + dl/dvar * sum(-2 (x - mu_B)) / m
    dl/dx    = dl/dxhat / sqrt(var_B + eps) + dl/dvar * 2 (x - mu_B) / m + dl/dmu / m
    dl/dgamma = sum(dl/dy * xhat);  dl/dbeta = sum(dl/dy)

Half-precision inputs are computed in float32 and the output cast back.
"""

from __future__ import annotations

import torch


def _axes(x: torch.Tensor) -> list[int]:
    return [d for d in range(x.dim()) if d != 1]


def _per_channel(v: torch.Tensor, ndim: int) -> torch.Tensor:
    # (C,) -> (1, C, 1, ..., 1) so it broadcasts against (N, C, *)
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def batch_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mu_B, var_B), var biased, accumulated in float32 (float64 for float64 input).

    Shifted two-pass: each channel is first shifted by one of its own values (the first sample's),
    so the sum runs over small deviations instead of large values (with x = 1e4 + randn, float32
    sums of raw values lose several ulps of the mean); then the mean of squared deviations from
    mu_B, with no E[x^2] - E[x]^2 cancellation.

    Shape:
        x: (N, C, *); returns two (C,) tensors.
    """
    xc = x.to(_compute_dtype(x))
    axes = _axes(x)
    shift = xc.select(0, 0).reshape(xc.shape[1], -1)[:, 0]  # (C,) one value of each channel
    mu = shift + (xc - _per_channel(shift, x.dim())).mean(dim=axes)
    var = (xc - _per_channel(mu, x.dim())).square().mean(dim=axes)
    return mu, var


class _TrainFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gamma, beta, eps):  # type: ignore[override]
        mu, var = batch_statistics(x)
        ndim = x.dim()
        xc = x.to(mu.dtype)
        inv_std = torch.rsqrt(var + eps)
        xhat = (xc - _per_channel(mu, ndim)) * _per_channel(inv_std, ndim)
        y = xhat
        if gamma is not None:
            y = y * _per_channel(gamma.to(mu.dtype), ndim)
        if beta is not None:
            y = y + _per_channel(beta.to(mu.dtype), ndim)
        ctx.save_for_backward(x, gamma, mu, var)
        ctx.eps = eps
        ctx.has_beta = beta is not None
        return y.to(x.dtype), mu, var

    @staticmethod
    def backward(ctx, dy, _dmu, _dvar):  # type: ignore[override]
        x, gamma, mu, var = ctx.saved_tensors
        if torch.is_grad_enabled():
            # backward(create_graph=True): the formulas below are differentiable torch ops, so
            # recomputing mu_B and var_B from x makes them a graph whose derivative is the exact
            # second derivative (the saved mu_B, var_B are constants to autograd).
            mu, var = batch_statistics(x)
        eps, ndim, axes = ctx.eps, x.dim(), _axes(x)
        m = x.numel() // x.shape[1]
        dy = dy.to(mu.dtype)
        x_mu = x.to(mu.dtype) - _per_channel(mu, ndim)
        std_inv = torch.rsqrt(var + eps)
        # dl/dxhat_i = dl/dy_i * gamma
        dxhat = dy if gamma is None else dy * _per_channel(gamma.to(mu.dtype), ndim)
        # dl/dvar_B = sum_i dl/dxhat_i (x_i - mu_B) (-1/2) (var_B + eps)^(-3/2)
        dvar = (dxhat * x_mu).sum(dim=axes) * -0.5 * std_inv.pow(3)
        # dl/dmu_B = sum_i dl/dxhat_i (-1/sqrt(var_B + eps)) + dl/dvar_B sum_i (-2 (x_i - mu_B)) / m
        dmu = dxhat.sum(dim=axes) * -std_inv + dvar * (-2.0 * x_mu).sum(dim=axes) / m
        # dl/dx_i = dl/dxhat_i / sqrt(var_B + eps) + dl/dvar_B 2 (x_i - mu_B) / m + dl/dmu_B / m
        dx = (
            dxhat * _per_channel(std_inv, ndim)
            + _per_channel(dvar, ndim) * 2.0 * x_mu / m
            + _per_channel(dmu, ndim) / m
        )
        dgamma = dbeta = None
        if gamma is not None and ctx.needs_input_grad[1]:
            xhat = x_mu * _per_channel(std_inv, ndim)
            dgamma = (dy * xhat).sum(dim=axes).to(gamma.dtype)
        if ctx.has_beta and ctx.needs_input_grad[2]:
            dbeta = dy.sum(dim=axes).to(_param_dtype(gamma, x))
        return dx.to(x.dtype), dgamma, dbeta, None


def _param_dtype(gamma: torch.Tensor | None, x: torch.Tensor) -> torch.dtype:
    return gamma.dtype if gamma is not None else _compute_dtype(x)


class _EvalFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mean, var, gamma, beta, eps):  # type: ignore[override]
        cdt = _compute_dtype(x)
        ndim = x.dim()
        inv_std = torch.rsqrt(var.to(cdt) + eps)
        xhat = (x.to(cdt) - _per_channel(mean.to(cdt), ndim)) * _per_channel(inv_std, ndim)
        y = xhat
        if gamma is not None:
            y = y * _per_channel(gamma.to(cdt), ndim)
        if beta is not None:
            y = y + _per_channel(beta.to(cdt), ndim)
        # Save a copy of the statistics, not the buffers themselves: a later in-place update of
        # the running buffers must not invalidate this graph.
        ctx.save_for_backward(x, gamma, mean.to(cdt, copy=True), inv_std)
        ctx.has_beta = beta is not None
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        # Differentiable torch ops throughout: second derivatives (in x through dl/dgamma, in
        # gamma through dl/dx) come out of autograd with backward(create_graph=True).
        x, gamma, mean, inv_std = ctx.saved_tensors
        ndim, axes = x.dim(), _axes(x)
        dy = dy.to(inv_std.dtype)
        # Eval mode is an affine map: dl/dx = dl/dy * gamma / sqrt(Var[x] + eps)
        scale = inv_std if gamma is None else gamma.to(inv_std.dtype) * inv_std
        dx = dy * _per_channel(scale, ndim)
        dgamma = dbeta = None
        if gamma is not None and ctx.needs_input_grad[3]:
            xhat = (x.to(inv_std.dtype) - _per_channel(mean, ndim)) * _per_channel(inv_std, ndim)
            dgamma = (dy * xhat).sum(dim=axes).to(gamma.dtype)
        if ctx.has_beta and ctx.needs_input_grad[4]:
            dbeta = dy.sum(dim=axes).to(_param_dtype(gamma, x))
        return dx.to(x.dtype), None, None, dgamma, dbeta, None


def batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """Same contract as ``torch.nn.functional.batch_norm`` with a float momentum.

    In training the running statistics (if given) are updated in place with the unbiased batch
    variance, PyTorch's convention: running = (1 - momentum) * running + momentum * batch.
    """
    if training:
        y, mu, var = _TrainFunction.apply(x, weight, bias, eps)
        if running_mean is not None and running_var is not None:
            m = x.numel() // x.shape[1]
            with torch.no_grad():
                unbiased = var * (m / (m - 1))
                running_mean.lerp_(mu.to(running_mean.dtype), momentum)
                running_var.lerp_(unbiased.to(running_var.dtype), momentum)
        return y
    if running_mean is None or running_var is None:
        raise ValueError("eval-mode batch norm needs running_mean and running_var")
    return _EvalFunction.apply(x, running_mean, running_var, weight, bias, eps)
