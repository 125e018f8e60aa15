"""What the Santurkar et al. (2018) experiments share: a small VGG-style CNN and its SGD loop.

Santurkar, Tsipras, Ilyas, Madry, arXiv 1805.11604 (SPEC.md section 4.2) train a VGG network on
CIFAR-10. CIFAR-10 is not available here (and a VGG is too slow on 2 CPU cores), so the
experiments ``noisy-bn``, ``ics`` and ``landscape`` use a small VGG-style stand-in on
Fashion-MNIST (28 x 28 grey images, 10 classes): for each width in ``channels`` a 3x3
convolution (padding 1), then, depending on the variant,

- ``standard``: nothing,
- ``BN``: :class:`batchnorm.nn.BatchNorm2d` (``BN(z) = gamma (z - mu_B) / sqrt(sigma_B^2 + eps)
  + beta`` per channel, over the batch and the spatial positions),
- ``noisy BN``: :class:`batchnorm.nn.BatchNorm2d` followed by the paper's noise
  (:func:`batchnorm.lab.theory.noisy_bn.noisy_batch_norm`),

then ReLU and 2x2 max pooling; finally a linear classifier on the flattened features. The loss
is the mean cross-entropy over the mini-batch; training is plain SGD with a fixed learning rate.
Weights use PyTorch's default initialization, drawn from the seed, so the variants of a seed
start from the same convolution and classifier weights and see the same batches (paired runs).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchnorm.lab.config import param
from batchnorm.lab.data import DATASETS
from batchnorm.lab.io import atomic_write_json, to_jsonable

__all__ = [
    "VARIANTS",
    "CNNConfig",
    "VGGStyle",
    "ImageData",
    "image_data",
    "batch_order",
    "accuracy",
    "cached_job",
    "drift_numbers",
    "train_with_probes",
]

STANDARD, BN, NOISY = "standard", "BN", "noisy BN"
VARIANTS: tuple[str, ...] = (STANDARD, BN, NOISY)
COLORS = {STANDARD: "tab:red", BN: "tab:blue", NOISY: "tab:green"}


@dataclass(frozen=True)
class CNNConfig:
    """Fields the CNN experiments share. Defaults give a full run within minutes on 2 cores."""

    dataset: str = param(
        "fashion-mnist", "data set (CIFAR-10, the paper's, is not available)", choices=DATASETS
    )
    channels: tuple[int, ...] = param(
        (8, 16, 32), "output channels of the 3x3 conv layers (each: [BN], ReLU, 2x2 max pool)"
    )
    batch_size: int = param(128, "examples per mini-batch (the paper: 128)")
    steps: int = param(1500, "SGD steps per network")
    lr: float = param(0.1, "SGD learning rate (the paper: 0.1)")
    eps: float = param(1e-5, "batch norm epsilon")
    seeds: int = param(2, "number of seeds (each: initial weights, data order, noise)")
    seed: int = param(0, "the first seed; the seeds are seed, seed+1, ...")
    train_subset: int | None = param(
        20000, "use only this many training examples (none = all 60,000)"
    )
    test_subset: int | None = param(5000, "use only this many test examples (none = all)")
    threads: int = param(0, "torch CPU threads (0 = as many as there are idle cores)")

    def validate(self) -> None:
        """Checks across fields; raises ValueError with what to change."""
        for name in ("steps", "seeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be at least 2 (batch statistics need two values)")
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"channels must list positive widths, got {self.channels}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a positive finite number, got {self.eps}")
        if self.train_subset is not None and self.train_subset < self.batch_size:
            raise ValueError(
                f"train_subset ({self.train_subset}) must hold at least one batch "
                f"({self.batch_size})"
            )
        if self.test_subset is not None and self.test_subset < 1:
            raise ValueError(f"test_subset must be positive, got {self.test_subset}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = automatic), got {self.threads}")

    def seed_list(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]


class VGGStyle(torch.nn.Module):
    """Conv 3x3 -> [BN [-> noise]] -> ReLU -> max pool 2, per width; then a linear classifier.

    Args:
        image_shape: (H, W) of the grey input images.
        channels: output channels of the conv layers.
        num_classes: outputs of the classifier.
        variant: one of :data:`VARIANTS`.
        seed: seeds the weights (the same for every variant) and the noise.
        eps: BN epsilon.

    Attributes:
        convs: the convolutions; ``norms``: the BN (or BN + noise) modules, identity if none;
        ``pre_activations``: filled by :meth:`forward` when ``keep_pre_activations`` is set with
        the input of each ReLU (after BN and noise): the layer inputs the paper plots.
    """

    def __init__(
        self,
        image_shape: tuple[int, int],
        channels: tuple[int, ...],
        num_classes: int,
        variant: str,
        seed: int,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        from batchnorm.lab.theory.noisy_bn import noisy_batch_norm
        from batchnorm.nn import BatchNorm2d

        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        torch.manual_seed(seed)
        self.variant = variant
        self.convs = torch.nn.ModuleList()
        self.norms = torch.nn.ModuleList()
        h, w = image_shape
        previous = 1
        for width in channels:
            self.convs.append(torch.nn.Conv2d(previous, width, 3, padding=1))
            previous = width
            h, w = h // 2, w // 2
            if h < 1 or w < 1:
                raise ValueError(
                    f"{len(channels)} conv layers with 2x2 pooling are too many for "
                    f"{image_shape} images; give fewer channels"
                )
        self.classifier = torch.nn.Linear(previous * h * w, num_classes)
        noise_gen = torch.Generator().manual_seed(10_000 + seed)
        for width in channels:
            if variant == STANDARD:
                self.norms.append(torch.nn.Identity())
            elif variant == BN:
                self.norms.append(BatchNorm2d(width, eps=eps))
            else:
                self.norms.append(noisy_batch_norm(width, conv=True, generator=noise_gen, eps=eps))
        self.keep_pre_activations = False
        self.pre_activations: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.pre_activations = []
        for conv, norm in zip(self.convs, self.norms):
            z = norm(conv(x))
            if self.keep_pre_activations:
                self.pre_activations.append(z.detach())
            x = torch.nn.functional.max_pool2d(torch.relu(z), 2)
        return self.classifier(x.flatten(1))

    def layer_groups(self) -> list[list[torch.Tensor]]:
        """One parameter group per layer, input first: conv weight, bias, BN gamma, beta; the
        classifier last."""
        groups = [
            [*conv.parameters(), *norm.parameters()] for conv, norm in zip(self.convs, self.norms)
        ]
        groups.append(list(self.classifier.parameters()))
        return groups


@dataclass(frozen=True)
class ImageData:
    """A data set as image tensors (N, 1, H, W), float32 in [0, 1]."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    image_shape: tuple[int, int]
    num_classes: int
    description: str


def image_data(ctx: Any, config: CNNConfig) -> ImageData:
    """Load ``config.dataset`` (subsets as configured) as images."""
    data = ctx.load_data(config.dataset, config.train_subset, config.test_subset)
    if len(data.image_shape) != 2:
        raise ValueError(
            f"data set {config.dataset!r} has no 2-d images (shape {data.image_shape}); "
            "use mnist, fashion-mnist or digits"
        )
    shape = (int(data.image_shape[0]), int(data.image_shape[1]))

    def images(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x, dtype=np.float32)).reshape(-1, 1, *shape)

    return ImageData(
        train_x=images(data.train_x),
        train_y=torch.as_tensor(data.train_y, dtype=torch.int64),
        test_x=images(data.test_x),
        test_y=torch.as_tensor(data.test_y, dtype=torch.int64),
        image_shape=shape,
        num_classes=data.num_classes,
        description=data.describe(),
    )


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """(steps, batch_size) example indices: reshuffled every epoch, the last partial batch of an
    epoch dropped."""
    rng = np.random.default_rng(seed)
    per_epoch = n // batch_size
    epochs = -(-steps // per_epoch)
    rows = [
        rng.permutation(n)[: per_epoch * batch_size].reshape(per_epoch, batch_size)
        for _ in range(epochs)
    ]
    return np.concatenate(rows)[:steps]


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1000) -> float:
    """Accuracy in inference mode (BN with its moving averages, no noise)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(y), chunk):
        correct += int(
            (model(x[start : start + chunk]).argmax(1) == y[start : start + chunk]).sum()
        )
    model.train(was_training)
    return correct / len(y)


def cached_job(run_dir: Path, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``compute()``, or its saved result from ``jobs/<key>.json`` when a resumed run has it."""
    from batchnorm.lab.progress import log

    path = run_dir / "jobs" / f"{key}.json"
    if path.is_file():
        log(f"[lab] {key}: already finished, loaded from {path}")
        return json.loads(path.read_text())
    result = to_jsonable(compute())
    path.parent.mkdir(exist_ok=True)
    atomic_write_json(path, result)
    return result


def drift_numbers(percentiles: np.ndarray) -> tuple[float, float]:
    """Median drift and spread ratio of a unit's (T, 3) 15th/50th/85th percentiles over time.

    ``median drift = (max_t p50 - min_t p50) / mean_t (p85 - p15)`` and
    ``spread ratio = max_t (p85 - p15) / min_t (p85 - p15)`` (as in the ``fig1`` experiment).

    >>> drift_numbers(np.array([[-1.0, 0.0, 1.0], [0.0, 1.0, 2.0]]))
    (0.5, 1.0)
    """
    p = np.asarray(percentiles, dtype=np.float64)
    spread = p[:, 2] - p[:, 0]
    drift = float((p[:, 1].max() - p[:, 1].min()) / max(spread.mean(), 1e-12))
    return drift, float(spread.max() / max(spread.min(), 1e-12))


def train_with_probes(
    model: VGGStyle,
    data: ImageData,
    *,
    lr: float,
    steps: int,
    batch_size: int,
    seed: int,
    probe_every: int,
    probe: Callable[[Callable[[], torch.Tensor], int], dict[str, Any]],
    desc: str,
) -> dict[str, Any]:
    """Plain SGD; at steps 0, probe_every, ... (before that step's update) call
    ``probe(loss_fn, step)`` with ``loss_fn`` the loss on that step's batch, and record the test
    accuracy.

    Returns:
        ``{"steps", "probes", "test_acc", "train_loss", "diverged_at", "seconds"}`` with one
        entry per probed step (``train_loss``: one per step).
    """
    import time

    from batchnorm.lab.progress import bar

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    order = batch_order(len(data.train_y), batch_size, steps, seed)
    probed, probes, test_acc, losses = [], [], [], []
    diverged_at = -1
    start = time.perf_counter()
    for step in bar(range(steps), desc=desc, unit="step"):
        x, y = data.train_x[order[step]], data.train_y[order[step]]

        def loss_fn(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(model(x), y)

        if step % probe_every == 0:
            probed.append(step)
            probes.append(probe(loss_fn, step))
            test_acc.append(accuracy(model, data.test_x, data.test_y))
        loss = loss_fn()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            diverged_at = step
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {
        "steps": probed,
        "probes": probes,
        "test_acc": test_acc,
        "final_test_acc": accuracy(model, data.test_x, data.test_y),
        "train_loss": losses,
        "diverged_at": diverged_at,
        "seconds": time.perf_counter() - start,
    }
