"""Length-direction decoupling and GDNP (Kohler et al. 2019).

Kohler, Daneshmand, Lucchi, Hofmann, Zhou, Neymeyr, "Exponential convergence rates for Batch
Normalization: The power of length-direction decoupling in non-convex optimization", AISTATS 2019,
arXiv 1805.10694 (SPEC.md section 4.4).

Reparametrization. For a unit with zero-mean input x and ``S = E[x x^T]``,
``BN(x^T w) = g x^T w / ||w||_S`` with ``||w||_S = sqrt(w^T S w)``: the weights are
``w~ = g w / ||w||_S``, length g and direction w separate. By the chain rule::

    grad_w f(w, g) = (g / ||w||_S) (I - S w w^T / ||w||_S^2) grad f(w~)
    d f / d g      = w^T grad f(w~) / ||w||_S

Problems (each gives ``loss(w~)``, ``gradient(w~)``, ``S``, ``u`` and the optimum):

- :class:`OLSProblem`: ``f(w~) = E[(y - x^T w~)^2] = E[y^2] + 2 u^T w~ + w~^T S w~``,
  ``u = -E[y x]``; optimum ``w~* = -S^-1 u`` (the normal equations). With the optimal length
  ``g*(w) = -u^T w / ||w||_S`` plugged in, ``f = E[y^2] + rho(w)`` with the generalized Rayleigh
  quotient ``rho(w) = -(u^T w)^2 / (w^T S w)``; its minimum ``-u^T S^-1 u`` is at ``w ~ S^-1 u``.
- :class:`HalfspaceProblem`: ``f(w~) = E[phi(z^T w~)]`` with ``z = -y x`` Gaussian,
  ``z ~ N(u, Sigma)`` and ``S = E[z z^T] = Sigma + u u^T`` (the paper's normality assumption on
  z, imposed directly), and the smooth loss ``phi = softplus`` (``phi(t) = log(1 + e^t)``, i.e.
  the logistic loss of the margin y x^T w~: infinitely differentiable with a bounded derivative,
  as the paper's analysis requires; the choice of this particular loss is ours). The expectation
  over the 1-D Gaussian ``z^T w~`` is a fixed Gauss-Hermite rule, and the gradient is that of the
  discretized objective, ``grad f = c1 u + c2 S w~`` (the paper's form: every critical point lies
  on the line through ``S^-1 u``).

Algorithms (each returns per-iteration suboptimality ``f(w~_t) - f*``):

- :func:`gd` -- plain gradient descent on w~.
- :func:`gd_length_direction` -- gradient descent on (w, g) jointly (what BN + GD does).
- :func:`gdnp` -- Gradient Descent in Normalized Parameterization (the paper's Algorithm 1, as
  reconstructed below), and :func:`fit_linear_rate` for the rate on a log scale.
- :func:`train_mlp_unitwise` -- a one-hidden-layer tanh MLP trained unit by unit with GDNP.

GDNP, as implemented (``length_search="end"``, the default). With ``w~_t = g_t w_t / ||w_t||_S``:

1. direction, for t = 0 .. T_d - 1, if ``h(w_t, g_t) != 0``: ``w_(t+1) = w_t - s_t grad_w
   f(w_t, g_t)`` with the scale-adapted step ``s_t = -||w_t||_S^3 / (L g_t h(w_t, g_t))`` and
   ``h(w, g) = c1(w~) u^T w``, the length held at g_0;
2. length, once at the end: ``g_(T_d) = Bisection(T_s, d f(w_(T_d), .) / d g)`` -- T_s halvings
   of a bracket [a_0, b_0] with ``df/dg(a) < 0 < df/dg(b)``, returning the midpoint (so
   ``|g - g*(w_(T_d))| <= (b_0 - a_0) 2^-(T_s + 1)``, the source of the theorem's
   ``2^-T_s |b_0 - a_0|`` error term, which names the initial bracket).

``length_search="every"`` instead runs the bisection after every direction step (the iterates
w_t are the same; only the length held between steps differs). Per iteration, the runs record
the loss at the best length for w_t (``rho(w_t) - rho*`` for least squares): the quantity the
theorems bound, independent of where the length search happens.

With ``grad f = c1 u + c2 S w~``, ``grad_w f(w, g) = (g c1 / ||w||_S)(u - (u^T w/||w||_S^2) S w)``,
so the step is ``w_(t+1) = w_t + ||w_t||_S^2 / (L u^T w_t) u - S w_t / L`` whatever g_t and c1:
gradient descent on rho(w) with step ``||w||_S^2 / (2 L |rho(w)|)``, whose fixed point is the
direction ``S^-1 u``. On the scale where ``u^T w_t = ||w_t||_S^2`` the step reads
``w_(t+1) - w* = (I - S/L)(w_t - w*)`` with ``w* = S^-1 u``, a contraction by ``1 - mu/L`` in the
S-norm when ``L >= lambda_max(S)`` (mu = lambda_min(S)); rho depends on the direction only, and
the paper's rate is ``rho(w_t) - rho* = O((1 - mu/L)^(2t))``. The tests fit the rate and compare
it with ``(1 - mu/L)^2`` (measured on the seed-0 kappa = 10 problems: 0.78 for OLS, 0.71 for the
halfspace, below the bound 0.81 and 0.78; plain GD on the same halfspace: 0.88).

What could and could not be verified:
    - The paper's text was not available here. The algorithm above is reconstructed from a
      secondary summary of Algorithm 1 (direction step with ``s_t = -||w_t||_S^3 / (L g_t h)``,
      then ``g_t = Bisection(T_s, f, w_t)``, output ``g w / ||w||_S``; stopping when h = 0) and
      from the derivation above. That summary writes, for learning halfspaces,
      ``h(w, g) = E[phi'(z^T w~)] (u^T w) - E[phi''(z^T w~)] (u^T w)^2``; ours,
      ``c1 u^T w = E[phi'] u^T w - E[phi''] (g/||w||_S) (u^T w)^2``, is the same when
      ``g = ||w||_S``, and is the choice that makes the step scale-invariant (the summary's
      form is not: it changes when w is rescaled, which cannot leave the iterates unchanged).
      For OLS (c1 = 2) the step reduces to GD on the Rayleigh quotient with step
      ``||w||_S^2 / (2 L |rho(w)|)``, as the summary states for that case.
    - Where the bisection happens could not be read either: the default runs it once after
      the T_d direction steps, which is what the theorem's error term ``2^-T_s |b_0 - a_0|``
      (the initial bracket) describes; ``length_search="every"`` runs it after every step.
      Since the direction step cancels g, both give the same w_t and the same best-length
      suboptimality curve.
    - The paper's theorem bounds the squared gradient by ``(1 - mu/L)^(2 T_d) Phi^2
      (rho(w_0) - rho*) + 2^-T_s zeta |b_0 - a_0| / mu^2``; the tests check the two pieces
      separately (the direction rate, and the length error halving with each bisection step).
    - The MLP variant (Section 5 of the paper) is reconstructed loosely: each hidden unit's
      (w_i, g_i) is optimized with GDNP while the others are fixed, with the generic
      scale-adapted direction step ``s = eta ||w||_S^2 / g^2`` (for OLS at the optimal length
      this is the step above with ``eta = 1/(2L)``), since the paper's per-unit constants could
      not be read.

Example:
    >>> problem, _ = gaussian_ols_problem(dim=5, condition_number=10.0, seed=0)
    >>> w0 = np.ones(5)
    >>> run = gdnp(problem, w0, iterations=150, bisection_steps=40)
    >>> fit_linear_rate(run.suboptimality[:60]) < (1 - 1 / 10) ** 2  # (1 - mu/L)^2 = 0.81
    True
    >>> bool(np.allclose(run.weights, problem.optimum()[0], atol=1e-8))
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from batchnorm.lab.theory._stats import least_squares_slope

__all__ = [
    "DecouplingRun",
    "HalfspaceProblem",
    "MLPRun",
    "OLSProblem",
    "best_length_suboptimality",
    "bisection",
    "fit_linear_rate",
    "gaussian_halfspace_problem",
    "gaussian_ols_problem",
    "gd",
    "gd_length_direction",
    "gdnp",
    "mlp_unit_gradients",
    "normalized_weights",
    "reparametrized_gradients",
    "s_norm",
    "train_mlp_unitwise",
]


def s_norm(w: np.ndarray, S: np.ndarray) -> float:
    """``||w||_S = sqrt(w^T S w)``."""
    return math.sqrt(float(w @ S @ w))


def normalized_weights(w: np.ndarray, g: float, S: np.ndarray) -> np.ndarray:
    """``w~ = g w / ||w||_S``, the weights a BN unit applies (SPEC.md 4.4)."""
    norm = s_norm(w, S)
    if norm == 0.0:
        raise ValueError("w has zero S-norm: the direction is undefined (start from w != 0)")
    return g * w / norm


def _check_spd(S: np.ndarray, name: str = "S") -> np.ndarray:
    S = np.asarray(S, dtype=np.float64)
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {S.shape}")
    if not np.allclose(S, S.T, rtol=1e-12, atol=1e-12 * float(np.abs(S).max() or 1.0)):
        raise ValueError(f"{name} must be symmetric")
    if float(np.linalg.eigvalsh(S)[0]) <= 0:
        raise ValueError(f"{name} must be positive definite (its smallest eigenvalue is <= 0)")
    return S


@dataclass(frozen=True)
class OLSProblem:
    """Ordinary least squares ``f(w~) = E[y^2] + 2 u^T w~ + w~^T S w~``.

    Attributes:
        S: ``E[x x^T]`` (d, d), symmetric positive definite.
        u: ``-E[y x]`` (d,).
        y_second_moment: ``E[y^2]``.
    """

    S: np.ndarray
    u: np.ndarray
    y_second_moment: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "S", _check_spd(self.S))
        u = np.asarray(self.u, dtype=np.float64)
        if u.shape != (self.S.shape[0],):
            raise ValueError(f"u must have shape ({self.S.shape[0]},), got {u.shape}")
        object.__setattr__(self, "u", u)

    @classmethod
    def from_samples(cls, inputs: np.ndarray, targets: np.ndarray) -> OLSProblem:
        """The empirical problem ``(1/n) sum_k (y_k - x_k^T w~)^2`` of n samples.

        Args:
            inputs: (n, d) inputs x_k (taken as zero-mean: S is the second moment, as for BN).
            targets: (n,) targets y_k.
        """
        X = np.asarray(inputs, dtype=np.float64)
        y = np.asarray(targets, dtype=np.float64)
        if X.ndim != 2 or y.shape != (X.shape[0],):
            raise ValueError(f"need inputs (n, d) and targets (n,), got {X.shape} and {y.shape}")
        n = X.shape[0]
        return cls(S=X.T @ X / n, u=-(X.T @ y) / n, y_second_moment=float(y @ y) / n)

    def loss(self, w_tilde: np.ndarray) -> float:
        """``f(w~)``."""
        return (
            self.y_second_moment + 2.0 * float(self.u @ w_tilde) + float(w_tilde @ self.S @ w_tilde)
        )

    def gradient(self, w_tilde: np.ndarray) -> np.ndarray:
        """``grad f(w~) = 2 u + 2 S w~``."""
        return 2.0 * self.u + 2.0 * self.S @ w_tilde

    def coefficients(self, w_tilde: np.ndarray) -> tuple[float, float]:
        """(c1, c2) with ``grad f = c1 u + c2 S w~``: (2, 2)."""
        return 2.0, 2.0

    def smoothness(self) -> float:
        """Largest eigenvalue of the Hessian 2S (the GD step 1/that is safe)."""
        return 2.0 * float(np.linalg.eigvalsh(self.S)[-1])

    def optimum(self) -> tuple[np.ndarray, float]:
        """(w~*, f*) from the normal equations ``S w~ = -u``."""
        w_star = np.linalg.solve(self.S, -self.u)
        return w_star, self.y_second_moment + float(self.u @ w_star)

    def rayleigh_quotient(self, w: np.ndarray) -> float:
        """``rho(w) = -(u^T w)^2 / (w^T S w)``: the loss with the best length, minus E[y^2]."""
        return -(float(self.u @ w) ** 2) / float(w @ self.S @ w)


@dataclass(frozen=True)
class HalfspaceProblem:
    """Learning a halfspace with Gaussian ``z = -y x``: ``f(w~) = E[softplus(z^T w~)]``.

    Attributes:
        u: mean of z (d,).
        covariance: Sigma, covariance of z (d, d), positive definite.
        nodes: number of Gauss-Hermite nodes for the 1-D expectation.
    """

    u: np.ndarray
    covariance: np.ndarray
    nodes: int = 96

    def __post_init__(self) -> None:
        object.__setattr__(self, "covariance", _check_spd(self.covariance, "covariance"))
        u = np.asarray(self.u, dtype=np.float64)
        if u.shape != (self.covariance.shape[0],):
            raise ValueError(f"u must have shape ({self.covariance.shape[0]},), got {u.shape}")
        object.__setattr__(self, "u", u)
        xi, weights = np.polynomial.hermite_e.hermegauss(self.nodes)
        object.__setattr__(self, "_xi", xi)
        object.__setattr__(self, "_weights", weights / math.sqrt(2.0 * math.pi))

    @property
    def S(self) -> np.ndarray:
        """``E[z z^T] = Sigma + u u^T``."""
        return self.covariance + np.outer(self.u, self.u)

    def _moments(self, w_tilde: np.ndarray) -> tuple[float, float]:
        mean = float(self.u @ w_tilde)
        std = math.sqrt(max(float(w_tilde @ self.covariance @ w_tilde), 0.0))
        return mean, std

    def loss(self, w_tilde: np.ndarray) -> float:
        """``E[phi(t)]`` with ``t = z^T w~ ~ N(u^T w~, w~^T Sigma w~)``, by quadrature."""
        mean, std = self._moments(w_tilde)
        t = mean + std * self._xi
        return float(self._weights @ np.logaddexp(0.0, t))

    def coefficients(self, w_tilde: np.ndarray) -> tuple[float, float]:
        """(c1, c2) with ``grad f = c1 u + c2 S w~`` (exact for the quadrature objective).

        ``grad f = E[phi'(t)] u + (E[phi'(t) xi] / s) Sigma w~`` with t = m + s xi; Stein's lemma
        makes ``E[phi'(t) xi] / s = E[phi''(t)]``. With ``Sigma = S - u u^T``:
        ``c1 = E[phi'] - c2 u^T w~``, ``c2 = E[phi' xi] / s``.
        """
        mean, std = self._moments(w_tilde)
        t = mean + std * self._xi
        sigmoid = 0.5 * (1.0 + np.tanh(0.5 * t))
        e1 = float(self._weights @ sigmoid)
        if std > 0:
            c2 = float(self._weights @ (sigmoid * self._xi)) / std
        else:
            c2 = float(self._weights @ (sigmoid * (1.0 - sigmoid)))
        return e1 - c2 * float(self.u @ w_tilde), c2

    def gradient(self, w_tilde: np.ndarray) -> np.ndarray:
        """``grad f(w~) = c1 u + c2 S w~``."""
        c1, c2 = self.coefficients(w_tilde)
        return c1 * self.u + c2 * (self.S @ w_tilde)

    def smoothness(self) -> float:
        """A bound on the Hessian: ``phi'' <= 1/4``, so ``lambda_max(S) / 4``."""
        return 0.25 * float(np.linalg.eigvalsh(self.S)[-1])

    def optimum(self) -> tuple[np.ndarray, float]:
        """(w~*, f*): the minimizer on the line through ``S^-1 u``, by bisection on the slope."""
        direction = np.linalg.solve(self.S, self.u)
        direction /= s_norm(direction, self.S)

        def slope(alpha: float) -> float:
            return float(self.gradient(alpha * direction) @ direction)

        a, b = _bracket(slope, 0.0)
        alpha = bisection(slope, a, b, 200)
        w_star = alpha * direction
        return w_star, self.loss(w_star)


def gaussian_ols_problem(
    dim: int, condition_number: float, *, noise: float = 0.1, seed: int = 0
) -> tuple[OLSProblem, np.ndarray]:
    """Population OLS with ``x ~ N(0, S)``, ``y = x^T w_true + noise``, cond(S) = kappa.

    S has eigenvalues spaced geometrically from 1 to ``condition_number``, in a random basis.

    Returns:
        (problem, w_true) with ``u = -S w_true`` and ``E[y^2] = w_true^T S w_true + noise^2``.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if not condition_number >= 1:
        raise ValueError(f"condition_number must be >= 1, got {condition_number!r}")
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    eigenvalues = np.geomspace(1.0, condition_number, dim)
    S = (q * eigenvalues) @ q.T
    S = 0.5 * (S + S.T)
    w_true = rng.standard_normal(dim)
    problem = OLSProblem(S=S, u=-S @ w_true, y_second_moment=float(w_true @ S @ w_true) + noise**2)
    return problem, w_true


def gaussian_halfspace_problem(
    dim: int, condition_number: float, *, mean_scale: float = 1.0, seed: int = 0
) -> HalfspaceProblem:
    """A halfspace problem with ``z ~ N(u, Sigma)``, cond(Sigma) = kappa, ``||u|| = mean_scale``."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if not condition_number >= 1:
        raise ValueError(f"condition_number must be >= 1, got {condition_number!r}")
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    covariance = (q * np.geomspace(1.0, condition_number, dim)) @ q.T
    u = rng.standard_normal(dim)
    u *= mean_scale / np.linalg.norm(u)
    return HalfspaceProblem(u=u, covariance=0.5 * (covariance + covariance.T))


Problem = OLSProblem | HalfspaceProblem


def reparametrized_gradients(problem: Problem, w: np.ndarray, g: float) -> tuple[np.ndarray, float]:
    """``(grad_w f(w, g), d f / d g)`` for ``f(w, g) = f(g w / ||w||_S)`` (chain rule).

    ``grad_w f = (g / ||w||_S)(I - S w w^T / ||w||_S^2) grad f(w~)``,
    ``df/dg = w^T grad f(w~) / ||w||_S``.
    """
    S = problem.S
    norm = s_norm(w, S)
    grad = problem.gradient(normalized_weights(w, g, S))
    sw = S @ w
    grad_w = (g / norm) * (grad - sw * float(w @ grad) / norm**2)
    return grad_w, float(w @ grad) / norm


def bisection(derivative: Callable[[float], float], a: float, b: float, steps: int) -> float:
    """T_s halvings of [a, b] keeping ``derivative(a) < 0 <= derivative(b)``; the midpoint.

    Raises:
        ValueError: if the bracket does not straddle a sign change.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not a < b:
        raise ValueError(f"need a < b, got [{a}, {b}]")
    if not (derivative(a) < 0 <= derivative(b)):
        raise ValueError(
            f"the bracket [{a}, {b}] does not contain a minimum: need f'(a) < 0 <= f'(b)"
        )
    for _ in range(steps):
        mid = 0.5 * (a + b)
        if derivative(mid) < 0:
            a = mid
        else:
            b = mid
    return 0.5 * (a + b)


def _bracket(derivative: Callable[[float], float], center: float, max_doublings: int = 60):
    """Expand [center - r, center + r], r = 1, 2, 4, ... until f'(left) < 0 <= f'(right)."""
    radius = 1.0
    for _ in range(max_doublings):
        a, b = center - radius, center + radius
        if derivative(a) < 0 <= derivative(b):
            return a, b
        radius *= 2.0
    raise RuntimeError(
        f"no sign change of the length derivative within +-{radius} of {center}: the loss may "
        "not have a minimum along this direction"
    )


@dataclass(frozen=True)
class DecouplingRun:
    """One optimization run.

    Attributes:
        suboptimality: ``f(w~_t) - f*`` for t = 0 .. iterations (entry 0 at the start); for
            GDNP, the loss at the best length for the direction w_t (what the theorems bound:
            ``rho(w_t) - rho*`` for least squares), whatever length the algorithm holds then.
        weights: the final w~.
        direction: the final w (None for plain GD on w~).
        length: the final g (None for plain GD on w~).
        length_derivative: ``|df/dg|`` at the end (None for plain GD on w~).
        final_suboptimality: ``f(w~) - f*`` of the returned weights (for GDNP: with the length
            of the T_s-step bisection; None where it equals the last ``suboptimality``).
    """

    suboptimality: np.ndarray
    weights: np.ndarray
    direction: np.ndarray | None = None
    length: float | None = None
    length_derivative: float | None = None
    final_suboptimality: float | None = None


def gd(
    problem: Problem, w_tilde0: np.ndarray, iterations: int, step_size: float | None = None
) -> DecouplingRun:
    """Plain gradient descent on w~ (default step 1 / smoothness)."""
    eta = 1.0 / problem.smoothness() if step_size is None else float(step_size)
    _, f_star = problem.optimum()
    w = np.array(w_tilde0, dtype=np.float64)
    values = [problem.loss(w) - f_star]
    for _ in range(iterations):
        w = w - eta * problem.gradient(w)
        values.append(problem.loss(w) - f_star)
    return DecouplingRun(suboptimality=np.array(values), weights=w)


def gd_length_direction(
    problem: Problem, w0: np.ndarray, g0: float, iterations: int, step_size: float
) -> DecouplingRun:
    """Gradient descent on (w, g) jointly, one fixed step size for both (BN trained by GD)."""
    _, f_star = problem.optimum()
    w = np.array(w0, dtype=np.float64)
    g = float(g0)
    values = [problem.loss(normalized_weights(w, g, problem.S)) - f_star]
    for _ in range(iterations):
        grad_w, grad_g = reparametrized_gradients(problem, w, g)
        w, g = w - step_size * grad_w, g - step_size * grad_g
        values.append(problem.loss(normalized_weights(w, g, problem.S)) - f_star)
    _, dg = reparametrized_gradients(problem, w, g)
    return DecouplingRun(
        suboptimality=np.array(values),
        weights=normalized_weights(w, g, problem.S),
        direction=w,
        length=g,
        length_derivative=abs(dg),
    )


LENGTH_SEARCHES = ("end", "every")


def best_length_suboptimality(problem: Problem, w: np.ndarray, f_star: float) -> float:
    """``min_g f(g w / ||w||_S) - f*``: how far the direction w is from optimal, the length
    set to its best (for least squares exactly ``rho(w) - rho*``; for the halfspace by 100
    bisection steps on the convex 1-D problem in g, a measurement, not part of any algorithm)."""
    if isinstance(problem, OLSProblem):
        return problem.y_second_moment + problem.rayleigh_quotient(w) - f_star

    def derivative(g: float) -> float:
        return reparametrized_gradients(problem, w, g)[1]

    a, b = _bracket(derivative, 0.0)
    g = bisection(derivative, a, b, 100)
    return problem.loss(normalized_weights(w, g, problem.S)) - f_star


def gdnp(
    problem: Problem,
    w0: np.ndarray,
    iterations: int,
    bisection_steps: int,
    *,
    smoothness: float | None = None,
    interval: tuple[float, float] | None = None,
    length_search: str = "end",
    g0: float | None = None,
) -> DecouplingRun:
    """Gradient Descent in Normalized Parameterization (Algorithm 1 as reconstructed above).

    Args:
        problem: an :class:`OLSProblem` or :class:`HalfspaceProblem`.
        w0: initial direction, with ``u^T w0 != 0`` (else rho(w0) = 0 is a critical point).
        iterations: T_d, the number of direction steps.
        bisection_steps: T_s, the bisection steps of each length search.
        smoothness: L in the step size (default lambda_max(S)).
        interval: the bisection bracket [a, b] for g (default: found by doubling [-1, 1]
            until it straddles the minimum; the doublings are not counted in T_s).
        length_search: "end" (Algorithm 1: the T_d direction steps run with the length held at
            g0, then one bisection of T_s steps sets it; the theorem's length error
            ``2^-T_s |b_0 - a_0|`` is of that one search) or "every" (a bisection after every
            direction step). The direction iterates are the same in both: the scale-adapted
            step cancels g and c1 (see the module docstring).
        g0: the length during the direction steps with ``length_search="end"`` (default
            ``||w0||_S``, so that w~_0 = w0).

    Returns:
        A :class:`DecouplingRun` with ``iterations + 1`` suboptimality values (the loss at the
        best length for each w_t; see :func:`best_length_suboptimality`) and the final weights
        with the bisected length.
    """
    if length_search not in LENGTH_SEARCHES:
        raise ValueError(
            f"length_search must be one of {', '.join(LENGTH_SEARCHES)}, got {length_search!r}"
        )
    S = problem.S
    w = np.array(w0, dtype=np.float64)
    if float(problem.u @ w) == 0.0:
        raise ValueError("u^T w0 = 0: w0 is a critical direction; start from w0 with u^T w0 != 0")
    lipschitz = float(np.linalg.eigvalsh(S)[-1]) if smoothness is None else float(smoothness)
    _, f_star = problem.optimum()

    def length_step(direction: np.ndarray) -> float:
        def derivative(g: float) -> float:
            return reparametrized_gradients(problem, direction, g)[1]

        a, b = interval if interval is not None else _bracket(derivative, 0.0)
        return bisection(derivative, a, b, bisection_steps)

    every = length_search == "every"
    g = length_step(w) if every else (s_norm(w, S) if g0 is None else float(g0))
    values = [best_length_suboptimality(problem, w, f_star)]
    for _ in range(iterations):
        c1, _ = problem.coefficients(normalized_weights(w, g, S))
        h = c1 * float(problem.u @ w)
        if h == 0.0 or g == 0.0:
            break  # a critical direction: the paper's stopping criterion
        step = -(s_norm(w, S) ** 3) / (lipschitz * g * h)
        grad_w, _ = reparametrized_gradients(problem, w, g)
        w = w - step * grad_w
        if every:
            g = length_step(w)
        values.append(best_length_suboptimality(problem, w, f_star))
    if not every:
        g = length_step(w)
    _, dg = reparametrized_gradients(problem, w, g)
    weights = normalized_weights(w, g, S)
    return DecouplingRun(
        suboptimality=np.array(values),
        weights=weights,
        direction=w,
        length=g,
        length_derivative=abs(dg),
        final_suboptimality=problem.loss(weights) - f_star,
    )


def fit_linear_rate(errors: Sequence[float] | np.ndarray, floor: float = 0.0) -> float:
    """The per-iteration rate q of ``errors[t] ~ C q^t``: exp(slope of log errors vs t).

    Args:
        errors: positive errors per iteration (e.g. suboptimality).
        floor: entries <= floor (rounding noise, exact zeros) are left out of the fit.

    Example:
        >>> round(fit_linear_rate([8.0, 4.0, 2.0, 1.0]), 12)
        0.5
    """
    e = np.asarray(errors, dtype=np.float64)
    t = np.arange(e.size)
    keep = np.isfinite(e) & (e > floor)
    if keep.sum() < 2:
        raise ValueError("need at least 2 errors above the floor to fit a rate")
    slope, _ = least_squares_slope(t[keep].astype(np.float64), np.log(e[keep]))
    return float(np.exp(slope))


@dataclass(frozen=True)
class MLPRun:
    """Unit-by-unit GDNP on a one-hidden-layer tanh MLP.

    Attributes:
        losses: the training loss after each unit update (entry 0 at the start).
        length_derivatives: ``|d loss / d g_i|`` right after each unit's last length step.
        directions: final (hidden, d) directions w_i.
        lengths: final (hidden,) lengths g_i.
    """

    losses: np.ndarray
    length_derivatives: np.ndarray
    directions: np.ndarray
    lengths: np.ndarray
    gradient_norms: np.ndarray | None = None  # full gradient norm at the start, after each sweep


def mlp_unit_gradients(
    inputs: np.ndarray,
    targets: np.ndarray,
    output_weight: float,
    w: np.ndarray,
    g: float,
    rest: np.ndarray,
    S: np.ndarray,
) -> tuple[float, np.ndarray, float]:
    """Loss and gradients of one hidden unit's (w, g), the other units held fixed.

    ``loss = (1/n) sum_k (rest_k + v tanh(g x_k^T w / ||w||_S) - y_k)^2``, where ``rest`` is the
    summed output of the other units. With ``p_k = x_k^T w / ||w||_S`` and
    ``delta_k = d loss / d (g p_k) = 2 r_k v (1 - tanh^2(g p_k)) / n``::

        d loss / d g = sum_k delta_k p_k
        grad_w loss  = (g / ||w||_S) (X^T delta - S w (p^T delta) / ||w||_S)

    Returns:
        (loss, grad_w, d loss / d g).
    """
    X = inputs
    norm = s_norm(w, S)
    pre = X @ w / norm  # (n,) normalized pre-activation p
    act = np.tanh(g * pre)
    residual = rest + output_weight * act - targets
    n = X.shape[0]
    loss = float(residual @ residual) / n
    delta = 2.0 * residual * output_weight * (1.0 - act**2) / n
    dg = float(delta @ pre)
    grad_w = (g / norm) * (X.T @ delta - (S @ w) * float(pre @ delta) / norm)
    return loss, grad_w, dg


def train_mlp_unitwise(
    inputs: np.ndarray,
    targets: np.ndarray,
    output_weights: np.ndarray,
    w0: np.ndarray,
    g0: np.ndarray,
    *,
    sweeps: int = 5,
    direction_steps: int = 20,
    bisection_steps: int = 30,
    step_size: float = 0.5,
) -> MLPRun:
    """Train ``F(x) = sum_i v_i tanh(g_i x^T w_i / ||w_i||_S)`` unit by unit with GDNP.

    Loss ``(1/n) sum_k (y_k - F(x_k))^2``, ``S = X^T X / n`` (BN's normalizer for zero-mean x).
    Output weights v stay fixed. Each sweep visits units 1..m; for unit i, ``direction_steps``
    rounds of: a direction step ``w_i <- w_i - s grad_(w_i) f`` with the scale-adapted
    ``s = step_size ||w_i||_S^2 / g_i^2``, then ``bisection_steps`` bisection steps on g_i
    (bracket found by doubling around the current g_i; if the loss has no minimum along g,
    e.g. a saturated unit, the length is kept).

    Args:
        inputs: (n, d) zero-mean inputs.
        targets: (n,) targets.
        output_weights: (m,) fixed output weights v.
        w0: (m, d) initial directions.
        g0: (m,) initial lengths.
        sweeps: passes over the hidden units.
        direction_steps: GDNP iterations per unit per sweep.
        bisection_steps: T_s.
        step_size: eta in the direction step.
    """
    X = np.asarray(inputs, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    v = np.asarray(output_weights, dtype=np.float64)
    W = np.array(w0, dtype=np.float64)
    G = np.array(g0, dtype=np.float64)
    n, d = X.shape
    if y.shape != (n,) or v.ndim != 1 or W.shape != (v.size, d) or G.shape != (v.size,):
        raise ValueError(
            f"shapes do not fit: inputs {X.shape}, targets {y.shape}, output_weights {v.shape}, "
            f"w0 {W.shape}, g0 {G.shape} (need (n, d), (n,), (m,), (m, d), (m,))"
        )
    S = X.T @ X / n

    def unit_out(i: int, w: np.ndarray, g: float) -> np.ndarray:
        return v[i] * np.tanh(g * (X @ w) / s_norm(w, S))

    outputs = np.stack([unit_out(i, W[i], G[i]) for i in range(v.size)])  # (m, n)

    def loss_and_grads(i: int, w: np.ndarray, g: float, rest: np.ndarray):
        return mlp_unit_gradients(X, y, v[i], w, g, rest, S)

    def gradient_norm() -> float:
        """The norm of the gradient in every unit's (w_i, g_i), the others held fixed."""
        total = outputs.sum(0)
        squares = 0.0
        for i in range(v.size):
            _, grad_w, dg = loss_and_grads(i, W[i], G[i], total - outputs[i])
            squares += float(grad_w @ grad_w) + dg * dg
        return math.sqrt(squares)

    losses = [float(np.square(outputs.sum(0) - y).mean())]
    derivs = []
    norms = [gradient_norm()]
    for _ in range(sweeps):
        for i in range(v.size):
            rest = outputs.sum(0) - outputs[i]
            for _ in range(direction_steps):
                _, grad_w, _ = loss_and_grads(i, W[i], G[i], rest)
                if G[i] != 0.0:
                    W[i] = W[i] - step_size * s_norm(W[i], S) ** 2 / G[i] ** 2 * grad_w

                def derivative(g: float, i: int = i, rest: np.ndarray = rest) -> float:
                    return loss_and_grads(i, W[i], g, rest)[2]

                try:
                    a, b = _bracket(derivative, float(G[i]))
                except RuntimeError:
                    continue  # no minimum along g (saturated unit): keep the length
                G[i] = bisection(derivative, a, b, bisection_steps)
            loss, _, dg = loss_and_grads(i, W[i], G[i], rest)
            outputs[i] = unit_out(i, W[i], G[i])
            losses.append(loss)
            derivs.append(abs(dg))
        norms.append(gradient_norm())
    return MLPRun(
        losses=np.array(losses),
        length_derivatives=np.array(derivs),
        directions=W,
        lengths=G,
        gradient_norms=np.array(norms),
    )
