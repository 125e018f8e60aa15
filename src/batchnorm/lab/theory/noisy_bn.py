"""Noisy batch norm: BN followed by injected, time-varying distributional shift.

Santurkar, Tsipras, Ilyas, Madry, arXiv 1805.11604, Section 2.1 and Figure 2 (SPEC.md section
4.2). To test whether the stability of layer input distributions is what makes BN work, the paper
adds, after each BN layer, random noise with non-zero mean and non-unit variance that changes at
every training step. For the activation ``a_ij`` of sample i and unit j, at each step:

    mu_j    ~ U(-0.5, 0.5),          sigma_j ~ U(1, 1.25)          (per step, per unit)
    m_ij    ~ U(mu_j - 0.1, mu_j + 0.1)
    s_ij    ~ N(sigma_j, 0.1)                                      (per step, unit and sample)
    a_ij   <- s_ij * a_ij + m_ij

The noise is a constant for backpropagation, so ``d out / d a = s``. For convolutional layers
the spatial positions are treated as batch dimensions: "sample i" ranges over (n, h, w), unit j
is a channel. ``N(sigma_j, 0.1)`` is read as standard deviation 0.1 (the paper's notation does not
say whether 0.1 is a variance; SPEC.md writes it the same way).

In eval mode the noise module is the identity. Draws come from an optional ``torch.Generator``
(seeded runs are reproducible); one set of (mu, sigma) is drawn per forward call, i.e. per
training step when the layer runs once per step.

Example:
    >>> import torch
    >>> noise = BatchNormNoise(3, generator=torch.Generator().manual_seed(0))
    >>> a = torch.zeros(4, 3)
    >>> out = noise(a)           # with a = 0 the output is m_ij, within [-0.6, 0.6]
    >>> bool(out.abs().max() <= 0.6)
    True
    >>> _ = noise.eval()
    >>> bool(noise(a).eq(a).all())
    True
"""

from __future__ import annotations

import torch

from batchnorm.nn import BatchNorm1d, BatchNorm2d

__all__ = ["BatchNormNoise", "noisy_batch_norm"]


class BatchNormNoise(torch.nn.Module):
    """The paper's noise injection, placed after a BN layer (identity in eval mode).

    Args:
        num_features: number of units (channels), the size of axis 1 of the input.
        mean_range: mu_j ~ U(-mean_range, mean_range) (paper: 0.5).
        scale_range: sigma_j ~ U(*scale_range) (paper: (1, 1.25)).
        mean_jitter: m_ij ~ U(mu_j - mean_jitter, mu_j + mean_jitter) (paper: 0.1).
        scale_std: s_ij ~ N(sigma_j, scale_std^2) (paper: 0.1).
        generator: optional torch.Generator for reproducible draws (on the input's device).
        record: keep the last draw in ``last_scale`` / ``last_shift`` (off by default: each is
            as large as the activation).

    Shape:
        input: (N, C) or (N, C, *spatial); output: the same.

    Attributes:
        last_scale: s of the last training-mode call if ``record``, else None.
        last_shift: m of the last training-mode call if ``record``, else None.
    """

    def __init__(
        self,
        num_features: int,
        *,
        mean_range: float = 0.5,
        scale_range: tuple[float, float] = (1.0, 1.25),
        mean_jitter: float = 0.1,
        scale_std: float = 0.1,
        generator: torch.Generator | None = None,
        record: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if not mean_range >= 0 or not mean_jitter >= 0 or not scale_std >= 0:
            raise ValueError(
                "mean_range, mean_jitter and scale_std must be >= 0, got "
                f"{mean_range!r}, {mean_jitter!r}, {scale_std!r}"
            )
        low, high = scale_range
        if not low <= high:
            raise ValueError(f"scale_range must be (low, high) with low <= high, got {scale_range}")
        self.num_features = num_features
        self.mean_range = float(mean_range)
        self.scale_range = (float(low), float(high))
        self.mean_jitter = float(mean_jitter)
        self.scale_std = float(scale_std)
        self.generator = generator
        self.record = bool(record)
        self.last_scale: torch.Tensor | None = None
        self.last_shift: torch.Tensor | None = None

    def _uniform(self, shape, low, high, like: torch.Tensor) -> torch.Tensor:
        u = torch.rand(shape, generator=self.generator, device=like.device, dtype=like.dtype)
        return low + (high - low) * u

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if not isinstance(a, torch.Tensor) or a.dim() < 2 or a.shape[1] != self.num_features:
            shape = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
            raise ValueError(
                f"BatchNormNoise({self.num_features}) expects an (N, {self.num_features}, *) "
                f"tensor with units on axis 1, got {shape}"
            )
        if not self.training:
            return a
        # Per-unit parameters broadcast over every axis but 1: (1, C, 1, ..., 1).
        unit_shape = (1, self.num_features) + (1,) * (a.dim() - 2)
        with torch.no_grad():
            mu = self._uniform(unit_shape, -self.mean_range, self.mean_range, a)
            sigma = self._uniform(unit_shape, *self.scale_range, a)
            jitter = self._uniform(a.shape, -self.mean_jitter, self.mean_jitter, a)
            normal = torch.randn(a.shape, generator=self.generator, device=a.device, dtype=a.dtype)
            shift = mu + jitter
            scale = sigma + self.scale_std * normal
        if self.record:
            self.last_scale, self.last_shift = scale, shift
        # scale and shift carry no graph: the noise is a constant for backprop.
        return a * scale + shift

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, mean_range={self.mean_range}, scale_range={self.scale_range}, "
            f"mean_jitter={self.mean_jitter}, scale_std={self.scale_std}"
        )


def noisy_batch_norm(
    num_features: int,
    *,
    conv: bool = False,
    generator: torch.Generator | None = None,
    **bn_kwargs,
) -> torch.nn.Sequential:
    """``Sequential(BatchNorm1d/2d, BatchNormNoise)``: the paper's "noisy BatchNorm" layer.

    Args:
        num_features: units (fully-connected) or channels (``conv=True``).
        conv: use :class:`batchnorm.nn.BatchNorm2d` (input (N, C, H, W)) instead of
            :class:`batchnorm.nn.BatchNorm1d`.
        generator: passed to :class:`BatchNormNoise`.
        **bn_kwargs: passed to the BN layer (eps, momentum, ...).

    Example:
        >>> layer = noisy_batch_norm(4, conv=True)
        >>> [type(m).__name__ for m in layer]
        ['BatchNorm2d', 'BatchNormNoise']
    """
    bn_cls = BatchNorm2d if conv else BatchNorm1d
    return torch.nn.Sequential(
        bn_cls(num_features, **bn_kwargs), BatchNormNoise(num_features, generator=generator)
    )
