"""The paper's algorithms in NumPy, float64: the specification in code.

Batch normalization as in Ioffe & Szegedy (2015), arXiv 1502.03167, in the paper's notation
(``mu_B``, ``var_B``, ``xhat``, ``gamma``, ``beta``, ``m``). Every fast path in the project is
tested against this module, so it favours clarity and accuracy over speed: it computes in float64,
uses two-pass statistics, and imports nothing but NumPy.

Layout and axes:
    Inputs are ``(N, C)`` or ``(N, C, *spatial)``. Statistics are per channel, over every axis
    except axis 1, so a channel of a ``(N, C, H, W)`` input has ``m = N * H * W`` values
    (SPEC.md section 1). ``gamma``, ``beta`` and the population ``mean`` and ``var`` have
    shape ``(C,)``.

Contents:
    - Algorithm 1 (training): :func:`batch_statistics`, :func:`bn_forward`, and its backward
      :func:`bn_backward` (the chain rule as printed in the paper) and
      :func:`bn_backward_closed_form` (the same gradient, simplified).
    - Inference: :func:`bn_inference`, :func:`bn_inference_backward`, and the folded affine map
      :func:`fold_affine` / :func:`fold_into_linear`.
    - Algorithm 2 (population statistics): :class:`PopulationAccumulator` and
      :func:`population_statistics`, which also handle mini-batches of different sizes.
    - Moving averages and framework conventions: :func:`running_update` and the converters
      :func:`torch_to_keras_momentum`, :func:`keras_to_torch_momentum`,
      :func:`biased_to_unbiased`, :func:`unbiased_to_biased`.

Conventions (SPEC.md section 3):
    Training always normalizes with the biased batch variance ``var_B`` (divisor ``m``).
    Frameworks differ in how they keep running statistics for inference:

    - PyTorch (followed here): ``running = (1 - momentum) * running + momentum * batch`` with
      ``momentum = 0.1`` by default, and ``running_var`` stores the *unbiased* batch variance
      ``var_B * m / (m - 1)``. ``momentum=None`` means a cumulative equal-weight average, which is
      :func:`running_update` with ``momentum = 1 / num_batches_tracked``.
    - Keras, Flax, ONNX: ``running = momentum * running + (1 - momentum) * batch`` with
      ``momentum = 0.99`` (Keras, Flax) or ``0.9`` (ONNX), and the *biased* variance is stored.
      Their ``momentum`` is ``1 -`` PyTorch's (:func:`torch_to_keras_momentum`), and their
      running variance is converted with :func:`unbiased_to_biased` / :func:`biased_to_unbiased`.
    - Algorithm 2 recomputes population statistics after training ("precise BN") instead of
      tracking a moving average: :func:`population_statistics`.

Example:
    The worked example of SPEC.md section 1: two 3-feature vectors, ``gamma = beta = 1`` and
    ``eps = 0``. Each feature has two values, which normalize to -1 and +1:

    >>> import numpy as np
    >>> x = np.array([[0.23, 1.26, -2.41],
    ...               [0.56, 0.75, 1.00]])
    >>> y, cache = bn_forward(x, gamma=np.ones(3), beta=np.ones(3), eps=0.0)
    >>> np.allclose(y, [[0.0, 2.0, 0.0],
    ...                 [2.0, 0.0, 2.0]], rtol=0.0, atol=1e-12)
    True
    >>> cache.mu  # mu_B per feature
    array([ 0.395,  1.005, -0.705])
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "BNCache",
    "PopulationAccumulator",
    "PopulationStatistics",
    "batch_statistics",
    "biased_to_unbiased",
    "bn_backward",
    "bn_backward_closed_form",
    "bn_forward",
    "bn_inference",
    "bn_inference_backward",
    "fold_affine",
    "fold_into_linear",
    "keras_to_torch_momentum",
    "population_statistics",
    "reduction_axes",
    "running_update",
    "torch_to_keras_momentum",
    "unbiased_to_biased",
]


# --------------------------------------------------------------------------------------------
# Axes, shapes and input checks
# --------------------------------------------------------------------------------------------


def reduction_axes(ndim: int) -> tuple[int, ...]:
    """The axes batch statistics reduce over: every axis except the channel axis 1.

    Args:
        ndim: Number of dimensions of the input, at least 2 (``(N, C)`` or ``(N, C, *)``).

    Returns:
        ``(0, 2, 3, ..., ndim - 1)``.

    Raises:
        ValueError: If ``ndim < 2``.

    Example:
        >>> reduction_axes(2), reduction_axes(4)
        ((0,), (0, 2, 3))
    """
    if ndim < 2:
        raise ValueError(
            f"batch norm needs an input of shape (N, C) or (N, C, *), got {ndim} dimension(s); "
            "add a batch axis (x[None]) or a channel axis (x[:, None]) as appropriate"
        )
    return (0, *range(2, ndim))


def _as_input(x: ArrayLike, name: str = "x") -> np.ndarray:
    """``x`` as a float64 array of shape (N, C, *) with at least one value per channel."""
    x = np.asarray(x, dtype=np.float64)
    reduction_axes(x.ndim)
    if x.shape[1] == 0 or x.size == 0:
        raise ValueError(
            f"{name} has shape {x.shape}: every channel needs at least one value "
            "(N and every spatial size must be >= 1, and C >= 1)"
        )
    return x


def _as_per_channel(value: ArrayLike, channels: int, name: str) -> np.ndarray:
    """``value`` as a float64 array of shape (C,), or a ValueError that says what was wrong."""
    value = np.asarray(value, dtype=np.float64)
    if value.shape != (channels,):
        raise ValueError(
            f"{name} has shape {value.shape} but the input has C = {channels} channel(s) "
            f"(axis 1); {name} must have shape ({channels},), one value per channel"
        )
    return value


def _check_eps(eps: float) -> float:
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0 (it is added to the variance), got {eps!r}")
    return float(eps)


def _check_count(m: int, minimum: int) -> int:
    if isinstance(m, bool) or int(m) != m or m < minimum:
        raise ValueError(
            f"m (values per channel, N * prod(spatial)) must be an integer >= {minimum}, got {m!r}"
        )
    return int(m)


def _check_momentum(momentum: float) -> float:
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    return float(momentum)


def _broadcast(per_channel: np.ndarray, ndim: int) -> np.ndarray:
    """A (C,) array reshaped to (1, C, 1, ..., 1) so that it broadcasts against (N, C, *)."""
    return per_channel.reshape((1, -1) + (1,) * (ndim - 2))


def _values_per_channel(x: np.ndarray) -> int:
    """m = N * prod(spatial): how many values each channel's statistics are taken over."""
    return x.size // x.shape[1]


# --------------------------------------------------------------------------------------------
# Algorithm 1: the BN transform in training, and its backward pass
# --------------------------------------------------------------------------------------------


class BNCache(NamedTuple):
    """What :func:`bn_backward` needs from :func:`bn_forward`.

    Attributes:
        x: The input, shape (N, C, *), float64.
        mu: ``mu_B``, the batch mean per channel, shape (C,).
        var: ``var_B``, the biased batch variance per channel, shape (C,).
        xhat: The normalized input, shape (N, C, *).
        gamma: The scale, shape (C,).
        eps: The constant added to the variance.
    """

    x: np.ndarray
    mu: np.ndarray
    var: np.ndarray
    xhat: np.ndarray
    gamma: np.ndarray
    eps: float


def batch_statistics(x: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mini-batch mean and biased variance (Algorithm 1, lines 1-2).

    ``mu_B = (1/m) sum_i x_i`` and ``var_B = (1/m) sum_i (x_i - mu_B)^2``, with ``m`` the number
    of values per channel. Two passes: the variance is the mean of squared deviations from
    ``mu_B``, never ``E[x^2] - E[x]^2``, which cancels catastrophically when the mean is large
    compared with the spread.

    Args:
        x: Input of shape (N, C) or (N, C, *).

    Returns:
        ``(mu_B, var_B)``, each of shape (C,), float64.

    Shape:
        - x: (N, C, *); m = N * prod(*).
        - mu_B, var_B: (C,).

    Example:
        >>> import numpy as np
        >>> x = 1e8 + np.array([[1.0], [2.0], [3.0]])  # a large mean: no cancellation
        >>> batch_statistics(x)
        (array([1.00000002e+08]), array([0.66666667]))
    """
    x = _as_input(x)
    axes = reduction_axes(x.ndim)
    mu_B = x.mean(axis=axes)
    var_B = ((x - _broadcast(mu_B, x.ndim)) ** 2).mean(axis=axes)
    return mu_B, var_B


def bn_forward(
    x: ArrayLike, gamma: ArrayLike, beta: ArrayLike, eps: float = 1e-5
) -> tuple[np.ndarray, BNCache]:
    """The BN transform in training mode (Algorithm 1).

    Per channel, over the ``m`` values of the mini-batch B::

        mu_B   = (1/m) sum_i x_i
        var_B  = (1/m) sum_i (x_i - mu_B)^2
        xhat_i = (x_i - mu_B) / sqrt(var_B + eps)
        y_i    = gamma * xhat_i + beta

    With ``eps = 0`` a constant channel gives ``0 / 0`` (NaN); use ``eps > 0`` for such data.

    Args:
        x: Input of shape (N, C) or (N, C, *).
        gamma: Scale, shape (C,).
        beta: Shift, shape (C,).
        eps: Non-negative constant added to the variance.

    Returns:
        ``(y, cache)``: the output, same shape as ``x``, and the :class:`BNCache` for
        :func:`bn_backward`.

    Raises:
        ValueError: On a wrong number of dimensions, a ``gamma``/``beta`` that is not (C,),
            or ``eps < 0``.

    Shape:
        - x, y: (N, C, *).
        - gamma, beta: (C,).

    Example:
        >>> import numpy as np
        >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
        >>> y, _ = bn_forward(x, gamma=[1.0, 2.0], beta=[0.0, 5.0], eps=0.0)
        >>> y
        array([[-1.,  3.],
               [ 1.,  7.]])
    """
    x = _as_input(x)
    channels = x.shape[1]
    gamma = _as_per_channel(gamma, channels, "gamma")
    beta = _as_per_channel(beta, channels, "beta")
    eps = _check_eps(eps)

    mu_B, var_B = batch_statistics(x)
    s = np.sqrt(var_B + eps)
    xhat = (x - _broadcast(mu_B, x.ndim)) / _broadcast(s, x.ndim)
    y = _broadcast(gamma, x.ndim) * xhat + _broadcast(beta, x.ndim)
    return y, BNCache(x=x, mu=mu_B, var=var_B, xhat=xhat, gamma=gamma, eps=eps)


def bn_backward(dy: ArrayLike, cache: BNCache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward of :func:`bn_forward` by the chain rule, term by term as printed in the paper.

    ``mu_B`` and ``var_B`` are functions of every ``x_i``, so the gradient flows through them
    (treating them as constants is the classic bug: the loss then cannot see a shift of ``x``,
    SPEC.md section 2). With ``l`` the loss and sums over the ``m`` values of a channel::

        dl/dxhat_i = dl/dy_i * gamma
        dl/dvar_B  = sum_i dl/dxhat_i * (x_i - mu_B) * (-1/2) * (var_B + eps)^(-3/2)
        dl/dmu_B   = sum_i dl/dxhat_i * (-1 / sqrt(var_B + eps))
                     + dl/dvar_B * sum_i (-2 (x_i - mu_B)) / m
        dl/dx_i    = dl/dxhat_i / sqrt(var_B + eps)
                     + dl/dvar_B * 2 (x_i - mu_B) / m
                     + dl/dmu_B / m
        dl/dgamma  = sum_i dl/dy_i * xhat_i
        dl/dbeta   = sum_i dl/dy_i

    Derivation: ``x_i`` reaches the loss along three paths, directly through ``xhat_i``
    (``dxhat_i/dx_i = 1/sqrt(var_B + eps)``), through ``var_B``
    (``dvar_B/dx_i = 2 (x_i - mu_B) / m``) and through ``mu_B`` (``dmu_B/dx_i = 1/m``).
    ``var_B`` depends on ``mu_B`` too, hence the second term of ``dl/dmu_B``; that term is zero
    in exact arithmetic (deviations from the mean sum to zero) and is kept to match the paper.

    Args:
        dy: ``dl/dy``, same shape as the input.
        cache: The :class:`BNCache` returned by :func:`bn_forward`.

    Returns:
        ``(dx, dgamma, dbeta)``: ``dl/dx`` with the input's shape, ``dl/dgamma`` and
        ``dl/dbeta`` of shape (C,).

    Shape:
        - dy, dx: (N, C, *).
        - dgamma, dbeta: (C,).

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(6, 2))
        >>> y, cache = bn_forward(x, gamma=np.ones(2), beta=np.zeros(2))
        >>> dx, dgamma, dbeta = bn_backward(np.ones_like(y), cache)
        >>> np.allclose(dx, 0.0)  # sum_i y_i = m * beta does not depend on x
        True
        >>> dbeta
        array([6., 6.])
    """
    x, mu_B, var_B, xhat, gamma, eps = cache
    dy = np.asarray(dy, dtype=np.float64)
    if dy.shape != x.shape:
        raise ValueError(f"dy has shape {dy.shape}, but the forward input had {x.shape}")
    axes = reduction_axes(x.ndim)
    m = _values_per_channel(x)

    def per_channel(v: np.ndarray) -> np.ndarray:
        return _broadcast(v, x.ndim)  # (C,) -> (1, C, 1, ..., 1)

    x_minus_mu = x - per_channel(mu_B)
    s = per_channel(np.sqrt(var_B + eps))
    dxhat = dy * per_channel(gamma)
    dvar = (dxhat * x_minus_mu).sum(axis=axes) * -0.5 * (var_B + eps) ** -1.5
    dmu_direct = (dxhat * -1.0 / s).sum(axis=axes)
    dmu_through_var = dvar * (-2.0 * x_minus_mu).sum(axis=axes) / m
    dmu = dmu_direct + dmu_through_var
    dx = dxhat / s + per_channel(dvar) * 2.0 * x_minus_mu / m + per_channel(dmu) / m
    dgamma = (dy * xhat).sum(axis=axes)
    dbeta = dy.sum(axis=axes)
    return dx, dgamma, dbeta


def bn_backward_closed_form(
    dy: ArrayLike, cache: BNCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The gradient of :func:`bn_backward` in closed form (exact, including ``eps``).

    Substituting ``dl/dvar_B`` and ``dl/dmu_B`` into ``dl/dx_i`` and writing ``g = dl/dxhat``,
    ``s = sqrt(var_B + eps)`` and ``mean`` for the per-channel mean over the ``m`` values::

        dl/dx_i = (g_i - mean(g) - xhat_i * mean(g * xhat)) / s

    because ``(x_i - mu_B) / s = xhat_i`` and ``(x_i - mu_B)^2 / s^2 = xhat_i^2``. This is the
    form fast kernels use: two per-channel reductions, then one elementwise pass.

    Args:
        dy: ``dl/dy``, same shape as the input.
        cache: The :class:`BNCache` returned by :func:`bn_forward`.

    Returns:
        ``(dx, dgamma, dbeta)``, as :func:`bn_backward`.

    Shape:
        - dy, dx: (N, C, *).
        - dgamma, dbeta: (C,).

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(1)
        >>> y, cache = bn_forward(rng.normal(size=(5, 3, 4)), np.ones(3), np.zeros(3))
        >>> dy = rng.normal(size=y.shape)
        >>> all(np.allclose(a, b) for a, b in zip(bn_backward_closed_form(dy, cache),
        ...                                        bn_backward(dy, cache)))
        True
    """
    x, _, var_B, xhat, gamma, eps = cache
    dy = np.asarray(dy, dtype=np.float64)
    if dy.shape != x.shape:
        raise ValueError(f"dy has shape {dy.shape}, but the forward input had {x.shape}")
    axes = reduction_axes(x.ndim)
    s = _broadcast(np.sqrt(var_B + eps), x.ndim)
    g = dy * _broadcast(gamma, x.ndim)
    mean_g = g.mean(axis=axes, keepdims=True)
    mean_g_xhat = (g * xhat).mean(axis=axes, keepdims=True)
    dx = (g - mean_g - xhat * mean_g_xhat) / s
    return dx, (dy * xhat).sum(axis=axes), dy.sum(axis=axes)


# --------------------------------------------------------------------------------------------
# Inference: fixed statistics make BN an affine map
# --------------------------------------------------------------------------------------------


def bn_inference(
    x: ArrayLike,
    gamma: ArrayLike,
    beta: ArrayLike,
    mean: ArrayLike,
    var: ArrayLike,
    eps: float = 1e-5,
) -> np.ndarray:
    """The BN transform in eval mode, with population statistics (Algorithm 2, last line).

    ::

        y = gamma * (x - E[x]) / sqrt(Var[x] + eps) + beta

    which is the paper's ``gamma / sqrt(Var[x] + eps) * x + (beta - gamma E[x] / sqrt(Var[x] +
    eps))`` evaluated without forming the large, cancelling shift (see :func:`fold_affine`).

    Args:
        x: Input of shape (N, C) or (N, C, *).
        gamma: Scale, shape (C,).
        beta: Shift, shape (C,).
        mean: Population mean ``E[x]``, shape (C,).
        var: Population variance ``Var[x]``, shape (C,) (PyTorch's ``running_var``).
        eps: Non-negative constant added to the variance.

    Returns:
        ``y``, same shape as ``x``.

    Shape:
        - x, y: (N, C, *).
        - gamma, beta, mean, var: (C,).

    Example:
        >>> import numpy as np
        >>> bn_inference(np.array([[3.0], [5.0]]), gamma=[2.0], beta=[1.0], mean=[1.0],
        ...              var=[4.0], eps=0.0)
        array([[3.],
               [5.]])
    """
    x = _as_input(x)
    channels = x.shape[1]
    gamma = _as_per_channel(gamma, channels, "gamma")
    beta = _as_per_channel(beta, channels, "beta")
    mean = _as_per_channel(mean, channels, "mean")
    var = _as_per_channel(var, channels, "var")
    eps = _check_eps(eps)
    xhat = (x - _broadcast(mean, x.ndim)) / _broadcast(np.sqrt(var + eps), x.ndim)
    return _broadcast(gamma, x.ndim) * xhat + _broadcast(beta, x.ndim)


def bn_inference_backward(
    dy: ArrayLike,
    x: ArrayLike,
    gamma: ArrayLike,
    mean: ArrayLike,
    var: ArrayLike,
    eps: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward of :func:`bn_inference`: the statistics are constants here.

    With ``s = sqrt(Var[x] + eps)`` and ``xhat_i = (x_i - E[x]) / s``::

        dl/dx_i   = dl/dy_i * gamma / s
        dl/dgamma = sum_i dl/dy_i * xhat_i
        dl/dbeta  = sum_i dl/dy_i

    Args:
        dy: ``dl/dy``, same shape as ``x``.
        x: The forward input, shape (N, C) or (N, C, *).
        gamma: Scale, shape (C,).
        mean: Population mean, shape (C,).
        var: Population variance, shape (C,).
        eps: Non-negative constant added to the variance.

    Returns:
        ``(dx, dgamma, dbeta)``.

    Shape:
        - dy, x, dx: (N, C, *).
        - gamma, mean, var, dgamma, dbeta: (C,).

    Example:
        >>> import numpy as np
        >>> dx, dgamma, dbeta = bn_inference_backward(
        ...     np.ones((2, 1)), np.array([[3.0], [5.0]]), [2.0], [1.0], [4.0], eps=0.0)
        >>> dx.ravel(), dgamma, dbeta
        (array([1., 1.]), array([3.]), array([2.]))
    """
    x = _as_input(x)
    dy = np.asarray(dy, dtype=np.float64)
    if dy.shape != x.shape:
        raise ValueError(f"dy has shape {dy.shape}, but x has {x.shape}; they must match")
    channels = x.shape[1]
    gamma = _as_per_channel(gamma, channels, "gamma")
    mean = _as_per_channel(mean, channels, "mean")
    var = _as_per_channel(var, channels, "var")
    eps = _check_eps(eps)
    axes = reduction_axes(x.ndim)
    s = _broadcast(np.sqrt(var + eps), x.ndim)
    xhat = (x - _broadcast(mean, x.ndim)) / s
    dx = dy * _broadcast(gamma, x.ndim) / s
    return dx, (dy * xhat).sum(axis=axes), dy.sum(axis=axes)


def fold_affine(
    gamma: ArrayLike, beta: ArrayLike, mean: ArrayLike, var: ArrayLike, eps: float = 1e-5
) -> tuple[np.ndarray, np.ndarray]:
    """The eval-mode BN transform as one per-channel affine map ``y = scale * x + shift``.

    ::

        scale = gamma / sqrt(Var[x] + eps)
        shift = beta - scale * E[x]

    ``shift`` cancels against ``scale * x`` when ``|E[x]|`` is large compared with the spread of
    ``x``, so the folded map loses about ``log10(|E[x]| / std)`` digits against
    :func:`bn_inference`; in float64 this is rarely visible.

    Args:
        gamma: Scale, shape (C,).
        beta: Shift, shape (C,).
        mean: Population mean, shape (C,).
        var: Population variance, shape (C,).
        eps: Non-negative constant added to the variance.

    Returns:
        ``(scale, shift)``, each of shape (C,).

    Example:
        >>> fold_affine(gamma=[2.0], beta=[1.0], mean=[1.0], var=[4.0], eps=0.0)
        (array([1.]), array([0.]))
    """
    gamma = np.asarray(gamma, dtype=np.float64)
    if gamma.ndim != 1:
        raise ValueError(f"gamma must have shape (C,), got {gamma.shape}")
    channels = gamma.shape[0]
    beta = _as_per_channel(beta, channels, "beta")
    mean = _as_per_channel(mean, channels, "mean")
    var = _as_per_channel(var, channels, "var")
    eps = _check_eps(eps)
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - scale * mean


def fold_into_linear(
    weight: ArrayLike,
    bias: ArrayLike | None,
    gamma: ArrayLike,
    beta: ArrayLike,
    mean: ArrayLike,
    var: ArrayLike,
    eps: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold an eval-mode BN into the linear or convolution layer before it (SPEC.md section 3).

    For ``z = W u + b`` followed by BN over the output units (channels), per output unit ``c``::

        W'[c] = W[c] * gamma[c] / s[c]
        b'[c] = (b[c] - E[x][c]) * gamma[c] / s[c] + beta[c]      with s = sqrt(Var[x] + eps)

    so that ``W' u + b' = bn_inference(W u + b, gamma, beta, mean, var, eps)``.

    Args:
        weight: A Linear weight (C_out, C_in) or a Conv weight (C_out, C_in / groups, *kernel);
            the output unit is axis 0. (A transposed convolution keeps its output channels on
            axis 1 and is not handled here.)
        bias: The layer's bias, shape (C_out,), or ``None`` for a layer without bias (as is usual
            before BN, whose ``beta`` subsumes it).
        gamma: BN scale, shape (C_out,).
        beta: BN shift, shape (C_out,).
        mean: BN population mean, shape (C_out,).
        var: BN population variance, shape (C_out,).
        eps: Non-negative constant added to the variance.

    Returns:
        ``(new_weight, new_bias)``: same shape as ``weight``, and shape (C_out,).

    Shape:
        - weight, new_weight: (C_out, ...).
        - bias, gamma, beta, mean, var, new_bias: (C_out,).

    Example:
        >>> import numpy as np
        >>> w, b = fold_into_linear(np.array([[1.0, 2.0]]), None, gamma=[2.0], beta=[1.0],
        ...                         mean=[1.0], var=[4.0], eps=0.0)
        >>> w, b
        (array([[1., 2.]]), array([0.]))
    """
    weight = np.asarray(weight, dtype=np.float64)
    if weight.ndim < 2:
        raise ValueError(
            f"weight must be (C_out, C_in) or (C_out, C_in/groups, *kernel), got {weight.shape}"
        )
    out_units = weight.shape[0]
    gamma = _as_per_channel(gamma, out_units, "gamma")
    bias = np.zeros(out_units) if bias is None else _as_per_channel(bias, out_units, "bias")
    scale = gamma / np.sqrt(_as_per_channel(var, out_units, "var") + _check_eps(eps))
    new_weight = weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    new_bias = (bias - _as_per_channel(mean, out_units, "mean")) * scale + _as_per_channel(
        beta, out_units, "beta"
    )
    return new_weight, new_bias


# --------------------------------------------------------------------------------------------
# Algorithm 2: population statistics over many mini-batches
# --------------------------------------------------------------------------------------------


class PopulationStatistics(NamedTuple):
    """Population statistics for inference.

    Attributes:
        mean: ``E[x]`` per channel, shape (C,).
        var: ``Var[x]`` per channel, shape (C,): the unbiased within-batch variance.
        count: Total number of values per channel, ``sum_b m_b``.
        num_batches: Number of mini-batches.
    """

    mean: np.ndarray
    var: np.ndarray
    count: int
    num_batches: int


class PopulationAccumulator:
    """Algorithm 2's population statistics, accumulated one mini-batch at a time.

    For mini-batches ``b`` with ``m_b`` values per channel, mean ``mu_b`` and biased variance
    ``var_b``::

        E[x]   = sum_b m_b mu_b / sum_b m_b
        Var[x] = sum_b m_b var_b / sum_b (m_b - 1)

    When every batch has the same size ``m`` these are exactly Algorithm 2's
    ``E[x] = E_B[mu_B]`` and ``Var[x] = m/(m-1) E_B[var_B]``. With batches of different sizes,
    averaging per-batch statistics with equal weights would over-weight small batches; here the
    mean is weighted by count and the variance is the pooled unbiased within-batch variance
    (each batch's sum of squared deviations ``m_b var_b`` over the pooled degrees of freedom).

    ``Var[x]`` is a *within-batch* variance: the spread of values around their own batch's
    mean, which is what the network was normalized with in training. It is not the variance of
    all data pooled together, which adds the spread of the batch means (between-batch
    variance). A batch with ``m_b = 1`` has no within-batch spread: it counts towards ``E[x]``
    but not ``Var[x]``.

    Numerics: the accumulator keeps float64 sums of ``m_b mu_b`` and ``m_b var_b`` per channel
    (each batch's statistics are themselves two-pass). The relative rounding error of such a sum
    grows at most like ``num_batches * 2**-53`` (about 1e-12 after 10,000 batches), far below
    the sampling error of the estimate. Large means do not cancel: ``var_b`` is computed about
    each batch's own mean.

    Example:
        >>> import numpy as np
        >>> acc = PopulationAccumulator()
        >>> acc.update(np.array([[0.0], [2.0]]))            # m = 2, mu = 1, var = 1
        >>> acc.update(np.array([[4.0], [4.0], [7.0], [9.0]]))  # m = 4, mu = 6, var = 4.5
        >>> stats = acc.result()
        >>> stats.mean  # (2 * 1 + 4 * 6) / 6
        array([4.33333333])
        >>> stats.var  # (2 * 1 + 4 * 4.5) / (1 + 3)
        array([5.])
        >>> stats.count, stats.num_batches
        (6, 2)
    """

    def __init__(self) -> None:
        self._sum_m_mu: np.ndarray | None = None  # sum_b m_b * mu_b, shape (C,)
        self._sum_m_var: np.ndarray | None = None  # sum_b m_b * var_b, shape (C,)
        self._count = 0  # sum_b m_b
        self._degrees_of_freedom = 0  # sum_b (m_b - 1)
        self._num_batches = 0

    def update(self, x: ArrayLike) -> None:
        """Add one mini-batch.

        Args:
            x: A mini-batch of shape (N, C) or (N, C, *), with the same C as earlier batches.
        """
        x = _as_input(x)
        mu_B, var_B = batch_statistics(x)
        self.update_from_batch_statistics(mu_B, var_B, _values_per_channel(x))

    def update_from_batch_statistics(self, mu_B: ArrayLike, var_B: ArrayLike, m: int) -> None:
        """Add one mini-batch known only by its statistics.

        Args:
            mu_B: The batch mean per channel, shape (C,).
            var_B: The *biased* batch variance per channel (divisor ``m``), shape (C,). A
                running variance stored unbiased (PyTorch) must first go through
                :func:`unbiased_to_biased`.
            m: Values per channel in the batch, ``N * prod(spatial)``, at least 1.
        """
        mu_B = np.asarray(mu_B, dtype=np.float64)
        if mu_B.ndim != 1:
            raise ValueError(f"mu_B must have shape (C,), got {mu_B.shape}")
        channels = mu_B.shape[0] if self._sum_m_mu is None else self._sum_m_mu.shape[0]
        mu_B = _as_per_channel(mu_B, channels, "mu_B")
        var_B = _as_per_channel(var_B, channels, "var_B")
        m = _check_count(m, minimum=1)
        if np.any(var_B < 0):
            raise ValueError("var_B must be >= 0 in every channel")
        if self._sum_m_mu is None or self._sum_m_var is None:
            self._sum_m_mu = np.zeros(channels)
            self._sum_m_var = np.zeros(channels)
        self._sum_m_mu += m * mu_B
        if m > 1:  # a single value has no within-batch spread
            self._sum_m_var += m * var_B
            self._degrees_of_freedom += m - 1
        self._count += m
        self._num_batches += 1

    def result(self) -> PopulationStatistics:
        """The population statistics of every batch added so far.

        Raises:
            ValueError: If no batch was added, or if every batch had a single value per channel
                (the variance is then undefined).
        """
        if self._sum_m_mu is None or self._sum_m_var is None:
            raise ValueError(
                "no mini-batch has been added: call update(x) or update_from_batch_statistics() "
                "at least once before result()"
            )
        if self._degrees_of_freedom == 0:
            raise ValueError(
                f"all {self._num_batches} mini-batch(es) had a single value per channel (m = 1), "
                "so the within-batch variance is undefined; use batches with at least two values "
                "per channel (N * prod(spatial) >= 2)"
            )
        return PopulationStatistics(
            mean=self._sum_m_mu / self._count,
            var=self._sum_m_var / self._degrees_of_freedom,
            count=self._count,
            num_batches=self._num_batches,
        )


def population_statistics(batches: Iterable[ArrayLike]) -> PopulationStatistics:
    """Algorithm 2's population statistics over an iterable of mini-batches.

    See :class:`PopulationAccumulator` for the formulas, including batches of different sizes.

    Args:
        batches: Mini-batches of shape (N_b, C, *), with the same C (sizes may differ).

    Returns:
        The :class:`PopulationStatistics`.

    Raises:
        ValueError: If ``batches`` is empty or every batch has a single value per channel.

    Example:
        >>> import numpy as np
        >>> batches = [np.array([[0.0], [2.0]]), np.array([[4.0], [8.0]])]
        >>> stats = population_statistics(batches)
        >>> stats.mean, stats.var  # E_B[mu_B] = 3.5; m/(m-1) * E_B[var_B] = 2 * 2.5
        (array([3.5]), array([5.]))
    """
    accumulator = PopulationAccumulator()
    for x in batches:
        accumulator.update(x)
    return accumulator.result()


# --------------------------------------------------------------------------------------------
# Moving averages and framework conventions
# --------------------------------------------------------------------------------------------


def running_update(
    running_mean: ArrayLike,
    running_var: ArrayLike,
    batch_mean: ArrayLike,
    batch_var: ArrayLike,
    m: int,
    momentum: float,
) -> tuple[np.ndarray, np.ndarray]:
    """One step of PyTorch's moving averages of the batch statistics.

    ::

        new_mean = (1 - momentum) * running_mean + momentum * mu_B
        new_var  = (1 - momentum) * running_var  + momentum * var_B * m / (m - 1)

    The stored variance is the *unbiased* batch variance, although training normalizes with the
    biased ``var_B``. PyTorch's ``momentum=None`` (a cumulative average) is
    ``momentum = 1 / num_batches_tracked``. For the Keras/Flax/ONNX convention see the module
    docstring.

    Args:
        running_mean: Current running mean, shape (C,).
        running_var: Current running (unbiased) variance, shape (C,).
        batch_mean: ``mu_B``, shape (C,).
        batch_var: ``var_B``, the *biased* batch variance, shape (C,).
        m: Values per channel in the batch, at least 2 (the unbiased variance needs two).
        momentum: PyTorch momentum in [0, 1] (default in torch: 0.1).

    Returns:
        ``(new_mean, new_var)``, each of shape (C,).

    Example:
        >>> running_update([0.0], [1.0], batch_mean=[1.0], batch_var=[3.0], m=4, momentum=0.5)
        (array([0.5]), array([2.5]))
    """
    running_mean = np.asarray(running_mean, dtype=np.float64)
    if running_mean.ndim != 1:
        raise ValueError(f"running_mean must have shape (C,), got {running_mean.shape}")
    channels = running_mean.shape[0]
    running_var = _as_per_channel(running_var, channels, "running_var")
    batch_mean = _as_per_channel(batch_mean, channels, "batch_mean")
    batch_var = _as_per_channel(batch_var, channels, "batch_var")
    momentum = _check_momentum(momentum)
    unbiased_var = biased_to_unbiased(batch_var, m)
    new_mean = (1.0 - momentum) * running_mean + momentum * batch_mean
    new_var = (1.0 - momentum) * running_var + momentum * unbiased_var
    return new_mean, new_var


def torch_to_keras_momentum(momentum: float) -> float:
    """PyTorch momentum (weight of the new batch) to Keras/Flax/ONNX momentum (weight of the old).

    Example:
        >>> torch_to_keras_momentum(0.1)
        0.9
    """
    return 1.0 - _check_momentum(momentum)


def keras_to_torch_momentum(momentum: float) -> float:
    """Keras/Flax/ONNX momentum (weight of the old value) to PyTorch momentum (weight of the new).

    Example:
        >>> round(keras_to_torch_momentum(0.99), 12)
        0.01
    """
    return 1.0 - _check_momentum(momentum)


def biased_to_unbiased(var: ArrayLike, m: int) -> np.ndarray:
    """Biased variance (divisor m) to unbiased (divisor m - 1): ``var * m / (m - 1)``.

    Example:
        >>> biased_to_unbiased([3.0], m=4)
        array([4.])
    """
    m = _check_count(m, minimum=2)
    return np.asarray(var, dtype=np.float64) * m / (m - 1)


def unbiased_to_biased(var: ArrayLike, m: int) -> np.ndarray:
    """Unbiased variance (divisor m - 1) to biased (divisor m): ``var * (m - 1) / m``.

    Example:
        >>> unbiased_to_biased([4.0], m=4)
        array([3.])
    """
    m = _check_count(m, minimum=1)
    return np.asarray(var, dtype=np.float64) * (m - 1) / m
