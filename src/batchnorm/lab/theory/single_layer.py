"""Theorems 4.1 and 4.2 of Santurkar et al. (2018) on a single batch-norm layer.

Santurkar, Tsipras, Ilyas, Madry, "How Does Batch Normalization Help Optimization?",
arXiv 1805.11604, Section 4.1 (SPEC.md section 4.2). Setting, for one unit j over a batch of m
examples: the layer's activations ``y = y_j`` in R^m, the BN layer::

    mu = (1/m) sum_b y_b,   sigma_j^2 = (1/m) sum_b (y_b - mu)^2 + eps,
    yhat = (y - mu) / sigma_j,   z = gamma * yhat + beta,

and a downstream loss ``ell(z)`` (the rest of the network and the loss, as a function of this
layer's output). The BN network's loss is ``L_hat(y) = ell(gamma * yhat(y) + beta)``; the
"identical non-BN network" feeds the layer output straight to the same ell, so its gradient and
Hessian with respect to the layer output are ``g_hat = grad ell(z)`` and ``H = hess ell(z)``, taken
at the same output z (the identification the paper's proof makes, Fact C.1).

Theorem 4.1 (gradient norm)::

    ||grad_y L_hat||^2 <= gamma^2 / sigma_j^2 * ( ||g_hat||^2 - (1/m) <1, g_hat>^2
                                                  - (1/m) <g_hat, yhat>^2 )

Theorem 4.2 (quadratic form of the Hessian along the gradient), with ``v = grad_y L_hat``::

    v^T (d^2 L_hat / dy dy) v <= gamma^2 / sigma^2 * v^T H v
                                 - gamma / (m sigma^2) <g_hat, yhat> ||v||^2

and, "if H preserves the relative norms of g_hat and v", the second form::

    v^T (d^2 L_hat / dy dy) v <= gamma^2 / sigma^2 * ( g_hat^T H g_hat
                                                       - 1/(m gamma) <g_hat, yhat> ||v||^2 )

What the proof gives, derived here and checked by the tests:

- Fact C.1 (the BN backward pass) makes ``v = (gamma / sigma_j) P g_hat`` with
  ``P = I - 11^T/m - yhat yhat^T/m``. With eps = 0, ``||yhat||^2 = m`` and P is the orthogonal
  projection that removes the components along 1 and yhat, so Theorem 4.1 holds with EQUALITY.
  With eps > 0, ``||yhat||^2 = m r`` with ``r = var_B / (var_B + eps) < 1``, and
  ``||v||^2 = gamma^2/sigma^2 (||g||^2 - <1,g>^2/m - (2 - r) <g,yhat>^2/m)``: the bound holds, with
  slack ``(1 - r) <g, yhat>^2 / m``.
- Theorem 4.2 (first form) also holds with EQUALITY at eps = 0: along v (orthogonal to 1 and
  yhat) the batch variance is ``sigma^2 + t^2 ||v||^2 / m``, so ``d^2 z / dt^2 = -gamma yhat
  ||v||^2 / (m sigma^2)`` and ``d^2/dt^2 ell(z(y + t v)) = gamma^2/sigma^2 v^T H v
  - gamma/(m sigma^2) <g_hat, yhat> ||v||^2``, exactly the right-hand side. With eps > 0 the two
  sides differ by O(eps) terms of either sign, so the first form is not a bound there
  (:class:`HessianBound` reports the gap; the tests measure it).
- The second form follows from the first exactly when ``v^T H v <= g_hat^T H g_hat``; that is
  how the vague assumption is made checkable here (:attr:`HessianBound.second_form_applies`).

What could and could not be verified:
    - The statements above are as quoted in SPEC.md and in secondary transcriptions of the
      paper; the paper's own text was not available here. Transcriptions disagree on the last
      coefficient of Theorem 4.1: some print ``1/sqrt(m)`` instead of ``1/m``. With
      ``||yhat||^2 = m`` no normalization makes ``1/sqrt(m)`` correct: it subtracts more than the
      exact identity allows, so that version FAILS whenever ``<g_hat, yhat> != 0`` and m > 1.
      :attr:`GradientBound.rhs_sqrt_m` evaluates it so the failure can be shown (tests do).
    - Both sides are computed numerically (autograd, in float64) on any given instance; the tests
      check the left-hand sides against the project's :class:`batchnorm.nn.BatchNorm1d`
      (gradient) and central finite differences of that gradient (Hessian).

The BN transform is written here in plain torch ops (twice differentiable, and eps = 0 allowed)
rather than through :class:`batchnorm.nn.BatchNorm1d`: its ``"explicit"`` backend is
differentiable once, and torch's native kernel rejects eps = 0 in training.

Example:
    >>> import torch
    >>> y = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=torch.float64)
    >>> loss = lambda z: (z**3).sum() + z[0] * z[1]
    >>> b = gradient_norm_bound(y, loss, gamma=1.5, beta=0.2)
    >>> round(b.ratio, 12)  # eps = 0: the bound is an identity
    1.0
    >>> h = hessian_bound(y, loss, gamma=1.5, beta=0.2)
    >>> abs(h.lhs - h.rhs) < 1e-9 * max(1.0, abs(h.rhs))
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "GradientBound",
    "HessianBound",
    "bn_unit",
    "gradient_norm_bound",
    "hessian_bound",
]

Loss = Callable[[torch.Tensor], torch.Tensor]


def bn_unit(y: torch.Tensor, gamma: float, beta: float, eps: float) -> torch.Tensor:
    """``z = gamma * (y - mu) / sqrt(var_B + eps) + beta`` for one unit over the batch.

    Shape:
        y: (m,); returns (m,).
    """
    mu = y.mean()
    var = (y - mu).square().mean()
    return gamma * (y - mu) / torch.sqrt(var + eps) + beta


def _check(y: torch.Tensor, gamma: float, eps: float) -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.numel() < 2:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(
            f"y must be a 1-D tensor of one unit's activations over a batch of m >= 2, got {shape}"
        )
    if not y.is_floating_point():
        raise TypeError(f"y must be a floating-point tensor, got {y.dtype}")
    if not math.isfinite(gamma) or gamma == 0:
        raise ValueError(f"gamma must be finite and non-zero, got {gamma!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    y = y.detach()
    if eps == 0 and float((y - y.mean()).abs().max()) == 0.0:
        raise ValueError(
            "y is constant over the batch: with eps = 0, sigma_j = 0 and BN is undefined"
        )
    return y


@dataclass(frozen=True)
class GradientBound:
    """Both sides of Theorem 4.1 on one instance.

    Attributes:
        lhs: ``||grad_y L_hat||^2``.
        rhs: ``gamma^2/sigma_j^2 (||g_hat||^2 - <1,g_hat>^2/m - <g_hat,yhat>^2/m)``.
        ratio: lhs / rhs (1 when the bound is tight; nan if rhs == 0).
        rhs_sqrt_m: the right-hand side with ``1/sqrt(m)`` on the last term (a transcription
            variant; it can be smaller than lhs, i.e. that variant is false).
        sigma: sigma_j = sqrt(var_B + eps).
        g_dot_yhat: ``<g_hat, yhat>``, whose size sets the slack for eps > 0.
    """

    lhs: float
    rhs: float
    ratio: float
    rhs_sqrt_m: float
    sigma: float
    g_dot_yhat: float


@dataclass(frozen=True)
class HessianBound:
    """Both sides of Theorem 4.2 on one instance.

    Attributes:
        lhs: ``v^T (d^2 L_hat/dy dy) v`` with ``v = grad_y L_hat``.
        rhs: ``gamma^2/sigma^2 v^T H v - gamma/(m sigma^2) <g_hat, yhat> ||v||^2`` (first form).
        gap: rhs - lhs (>= 0 when the bound holds; 0 up to rounding at eps = 0).
        ratio: lhs / rhs (nan if rhs == 0).
        rhs_second_form: ``gamma^2/sigma^2 (g_hat^T H g_hat - <g_hat,yhat> ||v||^2/(m gamma))``.
        second_form_applies: whether ``v^T H v <= g_hat^T H g_hat``, the condition under which the
            second form follows from the first.
    """

    lhs: float
    rhs: float
    gap: float
    ratio: float
    rhs_second_form: float
    second_form_applies: bool


def _terms(y: torch.Tensor, loss: Loss, gamma: float, beta: float, eps: float):
    """Shared pieces: v = grad_y L_hat (with graph), g_hat, yhat, sigma, z."""
    y = y.clone().requires_grad_(True)
    z = bn_unit(y, gamma, beta, eps)
    (v,) = torch.autograd.grad(loss(z), y, create_graph=True)
    z0 = z.detach().clone().requires_grad_(True)
    (g_hat,) = torch.autograd.grad(loss(z0), z0)
    yd = y.detach()
    mu = yd.mean()
    sigma = torch.sqrt((yd - mu).square().mean() + eps)
    yhat = (yd - mu) / sigma
    return y, v, z0, g_hat, yhat, sigma


def gradient_norm_bound(
    y: torch.Tensor, loss: Loss, gamma: float = 1.0, beta: float = 0.0, eps: float = 0.0
) -> GradientBound:
    """Evaluate both sides of Theorem 4.1 (gradient norm under BN) on one instance.

    Args:
        y: (m,) activations of one unit over the batch (float64 recommended).
        loss: ``ell``, a twice-differentiable function of the (m,) layer output z to a scalar.
        gamma: BN scale.
        beta: BN shift.
        eps: BN's eps (0 is the theorem's setting).

    Returns:
        A :class:`GradientBound`.
    """
    y = _check(y, gamma, eps)
    _, v, _, g_hat, yhat, sigma = _terms(y, loss, gamma, beta, eps)
    m = y.numel()
    lhs = float(v.detach().square().sum())
    g_sq = float(g_hat.square().sum())
    one_g = float(g_hat.sum())
    g_yhat = float(torch.dot(g_hat, yhat))
    factor = gamma**2 / float(sigma) ** 2
    rhs = factor * (g_sq - one_g**2 / m - g_yhat**2 / m)
    rhs_sqrt_m = factor * (g_sq - one_g**2 / m - g_yhat**2 / math.sqrt(m))
    return GradientBound(
        lhs=lhs,
        rhs=rhs,
        ratio=lhs / rhs if rhs != 0 else math.nan,
        rhs_sqrt_m=rhs_sqrt_m,
        sigma=float(sigma),
        g_dot_yhat=g_yhat,
    )


def hessian_bound(
    y: torch.Tensor, loss: Loss, gamma: float = 1.0, beta: float = 0.0, eps: float = 0.0
) -> HessianBound:
    """Evaluate both sides of Theorem 4.2 (Hessian along the gradient under BN) on one instance.

    ``d^2 L_hat / dy dy`` is applied to v by double backward (a Hessian-vector product); H is
    the full (m, m) Hessian of ``loss`` at z.

    Args:
        y: (m,) activations of one unit over the batch.
        loss: ``ell``, twice differentiable.
        gamma: BN scale.
        beta: BN shift.
        eps: BN's eps.

    Returns:
        A :class:`HessianBound`.
    """
    y = _check(y, gamma, eps)
    y_var, v, z0, g_hat, yhat, sigma = _terms(y, loss, gamma, beta, eps)
    m = y.numel()
    v_const = v.detach()
    (hv,) = torch.autograd.grad(v, y_var, grad_outputs=v_const)
    lhs = float(torch.dot(v_const, hv))
    hessian = torch.autograd.functional.hessian(loss, z0.detach())
    s2 = float(sigma) ** 2
    v_h_v = float(v_const @ hessian @ v_const)
    g_h_g = float(g_hat @ hessian @ g_hat)
    g_yhat = float(torch.dot(g_hat, yhat))
    v_sq = float(v_const.square().sum())
    rhs = gamma**2 / s2 * v_h_v - gamma / (m * s2) * g_yhat * v_sq
    rhs2 = gamma**2 / s2 * (g_h_g - g_yhat * v_sq / (m * gamma))
    return HessianBound(
        lhs=lhs,
        rhs=rhs,
        gap=rhs - lhs,
        ratio=lhs / rhs if rhs != 0 else math.nan,
        rhs_second_form=rhs2,
        second_form_applies=v_h_v <= g_h_g,
    )
