"""Testing helpers of the project, as ``torch.testing`` is torch's: one tolerance table by dtype,
one comparison helper, and the shared shape catalogue.

The test suite, ``batchnorm check``, ``batchnorm.inference.fold`` and the benchmark harness all
read their tolerances here, so "close enough" means one thing across the project.
:func:`assert_close`'s failure message says how large the mismatch is and where.

Example:
    >>> import numpy as np
    >>> rtol, atol = tolerance("float64")
    >>> assert_close(np.array([1.0, 2.0]), np.array([1.0, 2.0 + 1e-13]), rtol=rtol, atol=atol)
    >>> [case.id for case in SHAPES][:2]
    ['8x3-small-2d', '2x5-two-per-channel']
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "CHECK_CASES",
    "Case",
    "SHAPES",
    "TOLERANCES",
    "assert_close",
    "make_input",
    "tolerance",
]

# Tolerances by dtype: (rtol, atol) for forward outputs and for gradients. Gradients get more
# room: dx is a difference of three terms of similar size.
#
# Kinds:
# - "forward", "gradient": (rtol, atol) elementwise, |actual - expected| <= atol + rtol * |expected|
#   (the tests, the benchmark harness's correctness check);
# - "scaled_forward", "scaled_gradient": (threshold, 0) on max |actual - expected| / max |expected|
#   (``batchnorm check``, which reports that one number per output);
# - "fold": (rtol, atol) of ``fold``'s output check, max |folded - original| <= atol + rtol *
#   max |original| (widened by the model's own float32 rounding, see ``fold``).
TOLERANCES: dict[str, dict[str, tuple[float, float]]] = {
    "float64": {
        "forward": (1e-10, 1e-12), "gradient": (1e-8, 1e-10),
        "scaled_forward": (1e-9, 0.0), "scaled_gradient": (1e-7, 0.0), "fold": (1e-10, 1e-12),
    },
    "float32": {
        "forward": (1e-5, 1e-5), "gradient": (1e-4, 1e-4),
        "scaled_forward": (2e-4, 0.0), "scaled_gradient": (2e-3, 0.0), "fold": (1e-4, 1e-6),
    },
    "float16": {
        "forward": (1e-2, 2e-3), "gradient": (2e-2, 5e-3),
        "scaled_forward": (2e-2, 0.0), "scaled_gradient": (5e-2, 0.0), "fold": (1e-2, 1e-3),
    },
    "bfloat16": {
        "forward": (2e-2, 1e-2), "gradient": (5e-2, 2e-2),
        "scaled_forward": (5e-2, 0.0), "scaled_gradient": (1e-1, 0.0), "fold": (3e-2, 1e-2),
    },
}  # fmt: skip


def tolerance(dtype: object, kind: str = "forward") -> tuple[float, float]:
    """(rtol, atol) for a dtype (numpy or torch dtype, or its name) and kind.

    Example:
        >>> tolerance("float32"), tolerance("torch.float64", "gradient")
        ((1e-05, 1e-05), (1e-08, 1e-10))
    """
    name = str(dtype).replace("torch.", "")
    if name not in TOLERANCES:
        raise KeyError(f"no tolerance for dtype {name!r}; known: {', '.join(TOLERANCES)}")
    return TOLERANCES[name][kind]


def _to_numpy(a: object) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu()
        if str(a.dtype) == "torch.bfloat16":
            a = a.float()
        a = a.numpy()
    return np.asarray(a, dtype=np.float64)


def assert_close(
    actual: object, expected: object, *, rtol: float, atol: float, name: str = "value"
) -> None:
    """Assert |actual - expected| <= atol + rtol * |expected| elementwise.

    On failure the message gives the worst element's index, both values, the max absolute and
    relative error, and how many elements are out of tolerance.
    """
    a = _to_numpy(actual)
    e = _to_numpy(expected)
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {a.shape} != expected {e.shape}")
    # 0-d values compare as 1-element arrays (NumPy scalars do not support item assignment).
    a, e = np.atleast_1d(a).copy(), np.atleast_1d(e)
    if a.size == 0:
        return
    nan_mismatch = np.isnan(a) != np.isnan(e)
    if nan_mismatch.any():
        idx = np.unravel_index(np.argmax(nan_mismatch), a.shape)
        raise AssertionError(
            f"{name}: NaN mismatch at {idx}: actual {a[idx]!r}, expected {e[idx]!r} "
            f"({int(nan_mismatch.sum())} of {a.size} elements)"
        )
    diff = np.abs(a - e)
    diff[np.isnan(a) & np.isnan(e)] = 0.0
    both_inf = np.isinf(a) & np.isinf(e) & (np.sign(a) == np.sign(e))
    diff[both_inf] = 0.0
    allowed = atol + rtol * np.abs(np.nan_to_num(e, posinf=0.0, neginf=0.0))
    bad = ~(diff <= allowed)
    if bad.any():
        worst = np.unravel_index(np.argmax(np.where(bad, diff - allowed, -np.inf)), a.shape)
        rel = diff / np.maximum(np.abs(e), np.finfo(np.float64).tiny)
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {a.size} elements out of tolerance "
            f"(rtol={rtol:g}, atol={atol:g}); worst at index {tuple(int(i) for i in worst)}: "
            f"actual {a[worst]:.10g}, expected {e[worst]:.10g}; "
            f"max abs err {np.nanmax(diff):.3g}, max rel err {np.nanmax(rel[bad]):.3g}"
        )


@dataclass(frozen=True)
class Case:
    """One input shape of the shared catalogue, with what makes it awkward."""

    shape: tuple[int, ...]
    note: str
    mean: float = 0.0
    std: float = 1.0

    @property
    def id(self) -> str:
        tag = "x".join(map(str, self.shape))
        return f"{tag}-{self.note}"


# The shared shape catalogue: (N, C) and (N, C, *) inputs, including awkward ones.
SHAPES: list[Case] = [
    Case((8, 3), "small-2d"),
    Case((2, 5), "two-per-channel"),
    Case((16, 1), "one-channel"),
    Case((7, 13), "odd-sizes"),
    Case((4, 3, 5), "1d-with-length"),
    Case((1, 4, 6), "batch-of-one-with-length"),
    Case((3, 6, 4, 5), "odd-2d"),
    Case((2, 1, 3, 3), "one-channel-2d"),
    Case((5, 4, 1, 1), "1x1-spatial"),
    Case((2, 3, 2, 3, 4), "3d"),
    Case((6, 4), "large-mean", mean=1e4, std=1.0),
    Case((4, 3, 3, 3), "large-mean-2d", mean=1e3, std=0.5),
    Case((10, 2, 3), "tiny-std", mean=0.0, std=1e-3),
]

# What ``batchnorm check`` runs: ordinary, awkward and large-mean inputs of every rank.
CHECK_CASES: list[Case] = [
    Case((32, 16), "features"),
    Case((7, 5, 9), "odd-1d", mean=0.5, std=2.0),
    Case((4, 6, 5, 5), "2d", mean=-1.0, std=0.5),
    Case((2, 3, 3, 4, 4), "3d"),
    Case((16, 4, 8, 8), "large-mean-2d", mean=1e3, std=1.0),
]


def make_input(case: Case, seed: int = 0) -> np.ndarray:
    """A float64 input for a catalogue case, with per-channel offsets so channels differ."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(case.shape) * case.std + case.mean
    c = case.shape[1]
    offsets = np.linspace(-0.5, 0.5, c).reshape((1, c) + (1,) * (len(case.shape) - 2))
    return x + offsets * case.std
