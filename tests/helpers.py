"""One comparison helper and one tolerance table for the whole test suite.

Every fast path is compared against the float64 NumPy reference (and against torch) through
:func:`assert_close`, whose failure message says how large the mismatch is and where.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Tolerances by dtype: (rtol, atol) for forward outputs and for gradients. Gradients get more
# room: dx is a difference of three terms of similar size.
TOLERANCES: dict[str, dict[str, tuple[float, float]]] = {
    "float64": {"forward": (1e-10, 1e-12), "gradient": (1e-8, 1e-10)},
    "float32": {"forward": (1e-5, 1e-5), "gradient": (1e-4, 1e-4)},
    "float16": {"forward": (1e-2, 2e-3), "gradient": (2e-2, 5e-3)},
    "bfloat16": {"forward": (2e-2, 1e-2), "gradient": (5e-2, 2e-2)},
}


def tolerance(dtype: object, kind: str = "forward") -> tuple[float, float]:
    """(rtol, atol) for a dtype (numpy or torch dtype, or its name) and kind."""
    name = str(dtype).replace("torch.", "")
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


def make_input(case: Case, seed: int = 0) -> np.ndarray:
    """A float64 input for a catalogue case, with per-channel offsets so channels differ."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(case.shape) * case.std + case.mean
    c = case.shape[1]
    offsets = np.linspace(-0.5, 0.5, c).reshape((1, c) + (1,) * (len(case.shape) - 2))
    return x + offsets * case.std


class NormActStandIn(torch.nn.BatchNorm2d):
    """timm's BatchNormAct2d pattern: batch norm written out with F.batch_norm, then drop, act."""

    def __init__(self, num_features: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.drop = torch.nn.Identity()
        self.act = torch.nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        x = torch.nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias,
            self.training or self.running_mean is None, factor, self.eps,
        )  # fmt: skip
        return self.act(self.drop(x))
