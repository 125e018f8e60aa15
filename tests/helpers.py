"""Test helpers: the project's testing module (one comparison helper, one tolerance table, the
shape catalogue: :mod:`batchnorm.testing`), and a few stand-in layers."""

from __future__ import annotations

import torch

from batchnorm.testing import (  # noqa: F401 - re-exported for the tests
    CHECK_CASES,
    SHAPES,
    TOLERANCES,
    Case,
    assert_close,
    make_input,
    tolerance,
)


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
