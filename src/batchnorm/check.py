"""``batchnorm check``: every available backend against the NumPy reference, on random inputs.

For each backend, case and mode it runs one training step (forward, backward, running-statistics
update) or one eval step through :func:`batchnorm.functional.batch_norm`, does the same in float64
with :mod:`batchnorm.reference`, and reports the largest relative error of every output:
y, dx, dgamma, dbeta, running_mean, running_var. A result passes when each error is within the
tolerance for its dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from batchnorm import reference
from batchnorm.testing import CHECK_CASES, tolerance


def _thresholds(dtype_name: str) -> tuple[float, float]:
    """Pass thresholds (forward values, gradients) of the scaled max error, by dtype
    (:data:`batchnorm.testing.TOLERANCES`)."""
    return (
        tolerance(dtype_name, "scaled_forward")[0],
        tolerance(dtype_name, "scaled_gradient")[0],
    )


# (shape, mean, std): ordinary, awkward and large-mean inputs (batchnorm.testing.CHECK_CASES).
CASES: list[tuple[tuple[int, ...], float, float]] = [
    (case.shape, case.mean, case.std) for case in CHECK_CASES
]


@dataclass
class CheckResult:
    backend: str
    dtype: str
    shape: tuple[int, ...]
    mean: float
    mode: str
    errors: dict[str, float]
    passed: bool
    ran: str  # the backend that actually ran (after any fallback)


def _rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    scale = max(float(np.max(np.abs(expected))), 1e-12)
    return float(np.max(np.abs(actual - expected))) / scale


def run_check(
    backends_to_check: list[str] | None = None,
    dtypes: tuple[str, ...] = ("float64", "float32"),
    seed: int = 0,
    device: str = "cpu",
) -> list[CheckResult]:
    """Run every (backend, dtype, case, mode) and return the results."""
    import torch

    from batchnorm import backends
    from batchnorm.functional import batch_norm

    if backends_to_check is None:
        backends_to_check = [n for n, (ok, _) in backends.available().items() if ok]
    results: list[CheckResult] = []
    rng = np.random.default_rng(seed)
    for backend in backends_to_check:
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            for shape, mean, std in CASES:
                c = shape[1]
                x64 = rng.standard_normal(shape) * std + mean
                gamma = rng.uniform(0.5, 1.5, c)
                beta = rng.standard_normal(c)
                dy64 = rng.standard_normal(shape)
                rm0 = rng.standard_normal(c) * 0.1
                rv0 = rng.uniform(0.5, 2.0, c)
                # The reference sees exactly the values the backend sees (after rounding).
                x_t = torch.tensor(x64, dtype=dtype, device=device)
                x64 = x_t.double().cpu().numpy()
                for mode in ("train", "eval"):
                    xt = x_t.clone().requires_grad_(True)
                    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
                    g = torch.tensor(gamma, dtype=pdtype, device=device, requires_grad=True)
                    b = torch.tensor(beta, dtype=pdtype, device=device, requires_grad=True)
                    rm = torch.tensor(rm0, dtype=pdtype, device=device)
                    rv = torch.tensor(rv0, dtype=pdtype, device=device)
                    training = mode == "train"
                    y = batch_norm(xt, rm, rv, g, b, training, 0.1, 1e-5, backend=backend)
                    ran = backends.last_backend() or backend
                    dy = torch.tensor(dy64, dtype=dtype, device=device)
                    dx, dg, db = torch.autograd.grad(y, (xt, g, b), dy)
                    if training:
                        y_ref, cache = reference.bn_forward(x64, gamma, beta, 1e-5)
                        dx_ref, dg_ref, db_ref = reference.bn_backward(dy64, cache)
                        m = x64.size // c
                        rm_ref, rv_ref = reference.running_update(
                            rm0, rv0, cache.mu, cache.var, m, 0.1
                        )
                    else:
                        y_ref = reference.bn_inference(x64, gamma, beta, rm0, rv0, 1e-5)
                        dx_ref, dg_ref, db_ref = reference.bn_inference_backward(
                            dy64, x64, gamma, rm0, rv0, 1e-5
                        )
                        rm_ref, rv_ref = rm0, rv0

                    def np64(t: torch.Tensor) -> np.ndarray:
                        return t.detach().double().cpu().numpy()

                    errors = {
                        "y": _rel_err(np64(y), y_ref),
                        "dx": _rel_err(np64(dx), dx_ref),
                        "dgamma": _rel_err(np64(dg), dg_ref),
                        "dbeta": _rel_err(np64(db), db_ref),
                        "running_mean": _rel_err(np64(rm), rm_ref),
                        "running_var": _rel_err(np64(rv), rv_ref),
                    }
                    fwd_tol, grad_tol = _thresholds(dtype_name)
                    passed = all(
                        err <= (grad_tol if k in ("dx", "dgamma", "dbeta") else fwd_tol)
                        for k, err in errors.items()
                    )
                    results.append(
                        CheckResult(backend, dtype_name, shape, mean, mode, errors, passed, ran)
                    )
    return results


def format_table(results: list[CheckResult]) -> str:
    """A fixed-width table of the results, one row per check."""
    keys = ["y", "dx", "dgamma", "dbeta", "running_mean", "running_var"]
    header = ["backend", "dtype", "shape", "mean", "mode", *keys, "ok"]
    rows = [header]
    for r in results:
        backend = r.backend if r.ran == r.backend else f"{r.backend}->{r.ran}"
        rows.append(
            [backend, r.dtype, "x".join(map(str, r.shape)), f"{r.mean:g}", r.mode]
            + [f"{r.errors[k]:.1e}" for k in keys]
            + ["yes" if r.passed else "NO"]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
