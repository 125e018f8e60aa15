"""Gradient explosion at initialization in deep batch-normalized networks (Yang et al. 2019).

Claim (Yang, Pennington, Rao, Sohl-Dickstein, Schoenholz, "A Mean Field Theory of Batch
Normalization", arXiv 1902.08129; SPEC.md section 4.3): in a fully-connected network of width N
with batch norm before the nonlinearity, ``x^l = phi(BN(W^l x^(l-1)))``, ``W ~ N(0, 1/N)``,
``gamma = 1``, ``beta = 0``, ``eps = 0``, evaluated on a batch of B inputs, the squared gradient
norm grows by a factor lambda per layer going backwards: ``||grad_l||^2 ~ lambda^(L - l)``.

Closed forms (as stated in SPEC.md 4.3):

- ReLU: with ``c0 = -1/(B-1)``, ``J(c) = (sqrt(1 - c^2) + (pi - arccos c) c) / pi`` and
  ``J'(c) = (pi - arccos c) / pi``::

      lambda(B) = (J'(c0) + (B - 1)) / ((B - 3)(1 - J(c0))) - 1/(B - 3)

  decreasing to ``pi / (pi - 1) ~ 1.467`` as B -> infinity (:func:`relu_lambda`).
- Linear: ``lambda(B) = (B - 2)/(B - 3)`` (:func:`linear_lambda`). It is the ReLU formula with
  J(c) = c, J'(c) = 1, and it has an elementary derivation: per unit, the backward pass of BN
  divides by sigma_B (``E[1/sigma_B^2] = (B-1)/(B-3)`` for an isotropic Gaussian batch, an
  inverse chi-square with B-1 degrees of freedom) and projects out the direction of xhat (keeps
  ``(B-2)/(B-1)`` of a random vector orthogonal to the all-ones vector); the product is
  ``(B-2)/(B-3)``.
- Predicted maximal trainable depth ``~ 16 / ln(lambda)`` (:func:`trainable_depth`).

Both closed forms need B > 3 (the inverse chi-square mean is infinite for B <= 3).

Monte Carlo (:func:`gradient_growth`): the network above built from
:class:`batchnorm.nn.BatchNorm1d`, a random linear loss ``L = sum_(b,i) R_bi x^L_bi`` with
``R ~ N(0, 1)``, and the squared Frobenius norms ``||dL/dW^l||^2`` of the weight gradients. For each
independent repeat (fresh weights, batch and R), ``log ||dL/dW^l||^2`` is fitted against l by least
squares over the layers ``skip_first <= l < depth - skip_last`` (skipping the forward transient at
the bottom and the backward transient at the top); ``log lambda`` is minus the slope. The estimate
is the mean of ``log lambda`` over repeats with a Student-t confidence interval, exponentiated.

What was and was not verified:
    - The ReLU and linear formulas are taken from SPEC.md; the paper's text was not available
      here. They are checked against each other (the linear one is the ReLU one with J(c) = c),
      against the limit pi/(pi-1), the arc-cosine kernel terms J(c0), J'(c0) against numerical
      integration, and the whole formula against the Monte Carlo estimate (tests).
    - The theory is a mean-field (N -> infinity) result; at finite width the estimate is biased
      low by O(1/N). Measured with this function (width 256, depth 30, 10 repeats, float64;
      "coverage" = how many of seeds 0-9 put the closed form inside the 95% interval):
      linear B=8: mean estimate 1.190 for 1.200, coverage 9/10; ReLU B=8: 1.781 for 1.788,
      9/10; ReLU B=16: 1.590 for 1.590, 10/10; linear B=6: 1.316 for 1.333, 7/10. At width 512,
      linear B=8 gave 1.193 (coverage 7/10: the interval narrows faster than the bias shrinks).
      At B=4, where 1/sigma_B^2 has infinite variance, the estimate is far below the theory
      (seed 0: ReLU 2.80 for 3.08, linear 1.85 for 2.00). Agreement within the interval thus
      needs B >= 8 and a width of a few hundred.
    - torch's native batch-norm kernel rejects eps = 0 in training, so an eps = 0 run uses the
      project's ``"explicit"`` backend (the paper's hand-derived backward in torch ops).

Example:
    >>> round(relu_lambda(10**9), 4), round(math.pi / (math.pi - 1), 4)
    (1.4669, 1.4669)
    >>> linear_lambda(8)
    1.2
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from batchnorm.lab.theory._stats import least_squares_slope, mean_confidence_interval
from batchnorm.nn import BatchNorm1d

__all__ = [
    "NONLINEARITIES",
    "RELU_LAMBDA_LIMIT",
    "GradientGrowth",
    "gradient_growth",
    "linear_lambda",
    "relu_lambda",
    "trainable_depth",
]

RELU_LAMBDA_LIMIT: float = math.pi / (math.pi - 1)
"""lim_(B -> infinity) of the ReLU growth factor: pi / (pi - 1) ~ 1.4669."""

NONLINEARITIES: tuple[str, ...] = ("relu", "tanh", "linear")


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 4:
        raise ValueError(
            f"batch_size must be an int >= 4 (the growth factor is infinite for B <= 3), "
            f"got {batch_size!r}"
        )


def relu_lambda(batch_size: int) -> float:
    """Per-layer growth factor of the squared gradient norm for ReLU (SPEC.md 4.3).

    ``lambda(B) = (J'(c0) + (B-1)) / ((B-3)(1 - J(c0))) - 1/(B-3)`` with ``c0 = -1/(B-1)``,
    ``J(c) = (sqrt(1-c^2) + (pi - arccos c) c)/pi``, ``J'(c) = (pi - arccos c)/pi``.

    Args:
        batch_size: B >= 4.

    Example:
        >>> round(relu_lambda(8), 4)
        1.7882
    """
    _check_batch_size(batch_size)
    b = float(batch_size)
    c0 = -1.0 / (b - 1.0)
    j = (math.sqrt(1.0 - c0 * c0) + (math.pi - math.acos(c0)) * c0) / math.pi
    j_prime = (math.pi - math.acos(c0)) / math.pi
    return (j_prime + (b - 1.0)) / ((b - 3.0) * (1.0 - j)) - 1.0 / (b - 3.0)


def linear_lambda(batch_size: int) -> float:
    """Per-layer growth factor for the linear nonlinearity: ``(B - 2)/(B - 3)``.

    Args:
        batch_size: B >= 4.
    """
    _check_batch_size(batch_size)
    return (batch_size - 2.0) / (batch_size - 3.0)


def trainable_depth(growth: float) -> float:
    """Predicted maximal trainable depth ``16 / ln(lambda)`` (SPEC.md 4.3).

    Args:
        growth: lambda > 1 (for lambda <= 1 gradients do not explode and the depth is unbounded:
            ``inf`` is returned).
    """
    if not math.isfinite(growth) or growth <= 0:
        raise ValueError(f"growth must be a finite positive number, got {growth!r}")
    if growth <= 1.0:
        return math.inf
    return 16.0 / math.log(growth)


@dataclass(frozen=True)
class GradientGrowth:
    """A Monte Carlo estimate of the per-layer gradient growth factor lambda.

    Attributes:
        growth: exp(mean over repeats of the fitted log lambda).
        ci_low: lower end of the confidence interval for lambda.
        ci_high: upper end.
        per_repeat: lambda fitted on each repeat.
        log_sq_grad_norms: (repeats, depth) array of ``log ||dL/dW^l||^2``, layer 0 at the input.
        fit_layers: the layer indices used in the fit.
        confidence: coverage of the interval.
    """

    growth: float
    ci_low: float
    ci_high: float
    per_repeat: tuple[float, ...]
    log_sq_grad_norms: np.ndarray
    fit_layers: tuple[int, ...]
    confidence: float

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies in the confidence interval."""
        return self.ci_low <= value <= self.ci_high


def _activation(name: str, z: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return torch.relu(z)
    if name == "tanh":
        return torch.tanh(z)
    return z


def _check_positive_int(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def gradient_growth(
    width: int,
    batch_size: int,
    depth: int,
    nonlinearity: str = "relu",
    *,
    eps: float = 0.0,
    residual: bool = False,
    repeats: int = 10,
    skip_first: int = 5,
    skip_last: int = 5,
    confidence: float = 0.95,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> GradientGrowth:
    """Monte Carlo estimate of lambda, the per-layer growth of ``||dL/dW^l||^2`` at init.

    Network (one repeat), for l = 0 .. depth-1, with ``x^0 ~ N(0, 1)`` of shape (B, N)::

        h^l = x^(l-1) W^l^T,   W^l ~ N(0, 1/N)   (N x N, no bias)
        x^l = phi(BN(h^l))                   (plain)
        x^l = x^(l-1) + phi(BN(h^l))         (residual=True)

    with BN = :class:`batchnorm.nn.BatchNorm1d` in training mode (batch statistics, gamma = 1,
    beta = 0), and the loss ``L = sum(R * x^depth)``, ``R ~ N(0, 1)``.

    Args:
        width: N, the number of units per layer.
        batch_size: B, the number of inputs in the batch (>= 4).
        depth: number of layers; must exceed ``skip_first + skip_last + 1``.
        nonlinearity: "relu", "tanh" or "linear".
        eps: BN's eps (0 as in the paper's analysis; the paper's experiments use 1e-3).
        residual: add skip connections around each layer.
        repeats: independent networks (>= 2, for the confidence interval).
        skip_first: bottom layers left out of the fit (forward transient).
        skip_last: top layers left out of the fit (backward transient).
        confidence: coverage of the Student-t interval over repeats.
        seed: seed of the torch.Generator that draws weights, inputs and R.
        dtype: float64 by default (gradients span many orders of magnitude).

    Returns:
        A :class:`GradientGrowth`.

    Example:
        >>> est = gradient_growth(32, 8, 12, "linear", repeats=3, skip_first=2, skip_last=2)
        >>> est.log_sq_grad_norms.shape, est.fit_layers
        ((3, 12), (2, 3, 4, 5, 6, 7, 8, 9))
    """
    _check_positive_int("width", width)
    _check_batch_size(batch_size)
    _check_positive_int("repeats", repeats, 2)
    _check_positive_int("skip_first", skip_first, 0)
    _check_positive_int("skip_last", skip_last, 0)
    _check_positive_int("depth", depth, skip_first + skip_last + 2)
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(
            f"nonlinearity must be one of {', '.join(NONLINEARITIES)}, got {nonlinearity!r}"
        )
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    # torch's native kernel refuses eps = 0 in training; the explicit backend computes the same
    # transform with the paper's backward.
    backend = "explicit" if eps == 0 else None
    generator = torch.Generator().manual_seed(seed)
    scale = 1.0 / math.sqrt(width)
    log_norms = np.empty((repeats, depth))
    for r in range(repeats):
        weights = [
            (torch.randn(width, width, generator=generator, dtype=dtype) * scale).requires_grad_()
            for _ in range(depth)
        ]
        norms = [
            BatchNorm1d(
                width, eps=float(eps), track_running_stats=False, dtype=dtype, backend=backend
            )
            for _ in range(depth)
        ]
        x = torch.randn(batch_size, width, generator=generator, dtype=dtype)
        for weight, norm in zip(weights, norms):
            out = _activation(nonlinearity, norm(x @ weight.T))
            x = x + out if residual else out
        readout = torch.randn(batch_size, width, generator=generator, dtype=dtype)
        grads = torch.autograd.grad((readout * x).sum(), weights)
        log_norms[r] = [math.log(float(g.square().sum())) for g in grads]
    fit_layers = np.arange(skip_first, depth - skip_last)
    slopes, _ = least_squares_slope(fit_layers, log_norms[:, fit_layers].T)
    log_growth = -np.asarray(slopes, dtype=np.float64)
    mean, low, high = mean_confidence_interval(log_growth, confidence)
    return GradientGrowth(
        growth=math.exp(mean),
        ci_low=math.exp(low),
        ci_high=math.exp(high),
        per_repeat=tuple(float(v) for v in np.exp(log_growth)),
        log_sq_grad_norms=log_norms,
        fit_layers=tuple(int(v) for v in fit_layers),
        confidence=confidence,
    )
