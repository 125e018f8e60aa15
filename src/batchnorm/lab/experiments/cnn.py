"""The lab's small CNNs on 2-d grey images, and what training them shares.

Two networks, each with its own protocol (docs/lab.md describes both):

- :class:`VGGStyle`, for the Santurkar, Tsipras, Ilyas, Madry (2018, arXiv 1805.11604, SPEC.md
  4.2) experiments ``noisy-bn``, ``ics`` and ``landscape``. The paper trains a VGG network on
  CIFAR-10; CIFAR-10 is not available here (and a VGG is too slow on 2 CPU cores), so a small
  VGG-style stand-in runs on Fashion-MNIST (28 x 28 grey images, 10 classes): for each width in
  ``channels`` a 3x3 convolution (padding 1), then, depending on the variant,

  - ``standard``: nothing,
  - ``BN``: :class:`batchnorm.nn.BatchNorm2d` (``BN(z) = gamma (z - mu_B) / sqrt(sigma_B^2 +
    eps) + beta`` per channel, over the batch and the spatial positions),
  - ``noisy BN``: :class:`batchnorm.nn.BatchNorm2d` followed by the paper's noise
    (:func:`batchnorm.lab.theory.noisy_bn.noisy_batch_norm`),

  then ReLU and 2x2 max pooling (by default of :class:`CNNConfig` not after the last layer);
  finally a linear classifier on the flattened last feature map. Training is plain SGD with a
  fixed learning rate (:func:`train_with_probes`).

- :func:`conv_net`, for the limits-and-alternatives experiments (SPEC.md 4.5) ``small-batch``,
  ``non-iid``, ``ghost``, ``precise-bn`` and ``agc``::

      [conv3x3(c_k) -> norm -> ReLU -> maxpool2] for each width c_k in ``channels``
      -> global average pool -> linear(num_classes)

  ``norm`` is a name of :func:`batchnorm.nn.create_norm` (``bn``, ``gn``, ``in``, ``renorm``,
  ``ghost``), ``ln`` (layer norm over (C, H, W) with a per-channel affine, built as ``gn`` with
  one group, as the registry documents) or ``none`` (no normalization; the convolutions keep
  their bias). A normalized convolution drops its bias (beta takes its role). Training is SGD
  with momentum for a fixed number of steps, each step drawing its mini-batch from a sampler
  (:func:`iid_batches` reshuffles each epoch; :func:`few_class_batches` builds every batch from
  a few classes); see :func:`train_net`. A network whose loss becomes non-finite is stopped and
  counted as diverged (its accuracy is then chance, ``1 / num_classes``). The networks that share
  a batch size and learning rate train together as one grouped network
  (:mod:`batchnorm.lab.grouped`, through :func:`train_jobs`) unless ``grouped`` is false.

Both use the mean cross-entropy over the mini-batch and initial weights drawn from the seed
(PyTorch's default initialization; :class:`VGGStyle` draws its conv weights with He's instead
when ``init="kaiming"``, the default of :class:`CNNConfig`), so the variants of a seed start from
the same weights and see the same batches (paired runs). Shared: the data as image tensors
(:func:`image_data`), the i.i.d. batch order, evaluation in inference mode (:func:`evaluate`)
and resumable jobs (:func:`cached_job`): a finished network is saved as ``jobs/<key>.json``, so
``--resume`` skips it (a network interrupted midway restarts from its beginning).
"""

from __future__ import annotations

import hashlib
import io
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from batchnorm.lab.config import DataConfig, param
from batchnorm.lab.data import DATASETS
from batchnorm.lab.experiment import Context
from batchnorm.lab.io import atomic_write_checked, read_checked, remove_checked
from batchnorm.lab.progress import bar, log
from batchnorm.lab.samplers import batch_order, few_class_batches, iid_batches

__all__ = [
    # shared
    "ImageData",
    "image_data",
    "iid_batches",
    "batch_order",
    "evaluate",
    "cached_job",
    # the VGG-style network (noisy-bn, ics, landscape)
    "VARIANTS",
    "INITS",
    "CNNConfig",
    "VGGStyle",
    "curve_data",
    "curve_choice",
    "network_choice",
    "drift_numbers",
    "train_with_probes",
    "probe_curve_rows",
    "PROBE_CURVE_FIELDS",
    # the network with a pluggable norm (small-batch, non-iid, ghost, precise-bn, agc)
    "ConvConfig",
    "NORMS",
    "conv_net",
    "norm_kwargs",
    "few_class_batches",
    "train_net",
    "train_job",
    "NetJob",
    "train_jobs",
    "job_curve_rows",
    "CURVE_FIELDS",
]


# Shared ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageData:
    """A data set as image tensors (N, 1, H, W), float32 in [0, 1], and int64 labels."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    image_shape: tuple[int, int]
    num_classes: int
    description: str


def image_data(ctx: Context, config: CNNConfig | ConvConfig) -> ImageData:
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
        name=data.name,
        train_x=images(data.train_x),
        train_y=torch.as_tensor(data.train_y, dtype=torch.int64),
        test_x=images(data.test_x),
        test_y=torch.as_tensor(data.test_y, dtype=torch.int64),
        image_shape=shape,
        num_classes=data.num_classes,
        description=data.describe(),
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1000
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy in inference mode (BN with its population statistics, no
    noise), in chunks."""
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    for start in range(0, len(y), chunk):
        logits = model(x[start : start + chunk])
        target = y[start : start + chunk]
        loss += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(1) == target).sum())
    model.train(was_training)
    return correct / len(y), loss / len(y)


def cached_job(
    ctx: Context, key: str, compute: Callable[[], dict[str, Any]], *, as_json: bool = False
) -> dict[str, Any]:
    """``compute()`` through the run's one job cache (:meth:`Context.cached`): saved as
    ``jobs/<key>.json``, loaded from there when a resumed run has it."""
    return ctx.cached(key, compute, as_json=as_json)


# The VGG-style network (noisy-bn, ics, landscape) -------------------------------------------

STANDARD, BN, NOISY = "standard", "BN", "noisy BN"
VARIANTS: tuple[str, ...] = (STANDARD, BN, NOISY)
INITS: tuple[str, ...] = ("default", "kaiming")
COLORS = {STANDARD: "tab:red", BN: "tab:blue", NOISY: "tab:green"}


def _check_network_fields(config: CNNConfig | ConvConfig, at_least_one: Sequence[str]) -> None:
    """The checks both CNN configs share: counts >= 1, a batch of two or more, positive widths."""
    for name in at_least_one:
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")
    if config.batch_size < 2:
        raise ValueError("batch_size must be at least 2 (batch statistics need two values)")
    if not config.channels or min(config.channels) < 1:
        raise ValueError(f"channels must list positive widths, got {config.channels}")


@dataclass(frozen=True)
class CNNConfig(DataConfig):
    """Fields the VGG-style experiments share (with the seeds, threads and data of
    :class:`batchnorm.lab.config.DataConfig`). Defaults give a full run within minutes on 2
    cores."""

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
    train_subset: int | None = param(
        None, "use only this many training examples (none = all 60,000)"
    )
    test_subset: int | None = param(None, "use only this many test examples (none = all)")
    init: str = param(
        "kaiming",
        "conv weight initialization: kaiming (He et al. 2015, normal, fan-in, ReLU gain; zero "
        "bias), under which the standard network trains from step 0, or default (PyTorch's, "
        "whose small weights start the standard network with vanishing gradients)",
        choices=INITS,
    )
    eval_examples: int = param(5000, "training examples on which the training accuracy is taken")
    pool_last: bool = param(
        False,
        "2x2 max pool after the last conv layer too; false: the classifier reads the last conv "
        "layer's whole feature map (7 x 7 on 28 x 28 images), more capacity at no conv cost",
    )
    hidden: int = param(0, "width of a hidden ReLU layer before the classifier (0: none)")
    channels_last: bool = param(
        True,
        "compute the convolutions in channels-last (NHWC) memory order, faster on the CPU; "
        "the same network",
    )
    curve_test_examples: int | None = param(
        2000,
        "test images for the accuracy curve during training, the first ones of the test set "
        "(none: all); the final test accuracy always uses the whole test (sub)set",
    )

    def validate(self) -> None:
        """Checks across fields; raises ValueError with what to change."""
        _check_network_fields(self, ("steps", "seeds", "eval_examples"))
        if self.hidden < 0:
            raise ValueError(f"hidden must be >= 0 (0: no hidden layer), got {self.hidden}")
        if self.curve_test_examples is not None and self.curve_test_examples < 1:
            raise ValueError(
                f"curve_test_examples must be at least 1 (or none), got {self.curve_test_examples}"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a positive finite number, got {self.eps}")
        if self.train_subset is not None and self.train_subset < self.batch_size:
            raise ValueError(
                f"train_subset ({self.train_subset}) must hold at least one batch "
                f"({self.batch_size})"
            )

    def quick(self) -> CNNConfig:
        """The smoke-test sizes: 200 steps, 1 seed, 5,000 training and 1,000 test images."""
        return replace(self, steps=200, seeds=1, train_subset=5000, test_subset=1000)


class VGGStyle(nn.Module):
    """Conv 3x3 -> [BN [-> noise]] -> ReLU -> max pool 2, per width; then a linear classifier.

    Args:
        image_shape: (H, W) of the grey input images.
        channels: output channels of the conv layers.
        num_classes: outputs of the classifier.
        variant: one of :data:`VARIANTS`.
        seed: seeds the weights (the same for every variant) and the noise.
        eps: BN epsilon.
        init: ``"default"`` (PyTorch's initialization) or ``"kaiming"``: every conv weight
            drawn from N(0, 2 / fan_in) (He et al. 2015, the ReLU gain), conv biases zero, the
            classifier left at PyTorch's default. With PyTorch's default (uniform with bound
            1 / sqrt(fan_in), a third of He's variance) each conv layer shrinks the signal of a
            network without BN, so its first steps see vanishing gradients.
        pool_last: pool after the last conv layer too. Without that pool the classifier reads
            the last conv layer's whole map (e.g. 32 x 7 x 7 instead of 32 x 3 x 3 on 28 x 28
            images): at the same convolution cost, a classifier that knows where each feature
            is, worth ~1-2 points of Fashion-MNIST test accuracy here.
        hidden: width of a hidden ReLU layer between the flattened map and the classifier's
            output layer (0: none); its parameters join the classifier's group.
        channels_last: keep the conv weights and activations in channels-last (NHWC) memory
            order, which the CPU convolutions run faster in (~25% per step here); the same
            function up to float rounding order.

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
        init: str = "default",
        pool_last: bool = True,
        hidden: int = 0,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        from batchnorm.lab.theory.noisy_bn import noisy_batch_norm
        from batchnorm.nn import BatchNorm2d

        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        torch.manual_seed(seed)
        self.variant = variant
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        if hidden < 0:
            raise ValueError(f"hidden must be >= 0 (0: no hidden layer), got {hidden}")
        self.pool_last = pool_last
        h, w = image_shape
        previous = 1
        for k, width in enumerate(channels):
            self.convs.append(nn.Conv2d(previous, width, 3, padding=1))
            previous = width
            if pool_last or k < len(channels) - 1:
                h, w = h // 2, w // 2
            if h < 1 or w < 1:
                raise ValueError(
                    f"{len(channels)} conv layers with 2x2 pooling are too many for "
                    f"{image_shape} images; give fewer channels"
                )
        if hidden:
            self.classifier: nn.Module = nn.Sequential(
                nn.Linear(previous * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
            )
        else:
            self.classifier = nn.Linear(previous * h * w, num_classes)
        if init == "kaiming":
            # Drawn after the default ones, from the same seed: every variant gets the same.
            for conv in self.convs:
                nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(conv.bias)
        noise_gen = torch.Generator().manual_seed(10_000 + seed)
        for width in channels:
            if variant == STANDARD:
                self.norms.append(nn.Identity())
            elif variant == BN:
                self.norms.append(BatchNorm2d(width, eps=eps))
            else:
                self.norms.append(noisy_batch_norm(width, conv=True, generator=noise_gen, eps=eps))
        self.keep_pre_activations = False
        self.pre_activations: list[torch.Tensor] = []
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    @classmethod
    def for_config(cls, config: CNNConfig, data: ImageData, variant: str, seed: int) -> VGGStyle:
        """The network ``config`` describes, for the images of ``data``."""
        return cls(
            data.image_shape,
            config.channels,
            data.num_classes,
            variant,
            seed,
            config.eps,
            init=config.init,
            pool_last=config.pool_last,
            hidden=config.hidden,
            channels_last=config.channels_last,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.pre_activations = []
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        last = len(self.convs) - 1
        for k, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            z = norm(conv(x))
            if self.keep_pre_activations:
                self.pre_activations.append(z.detach())
            x = torch.relu(z)
            if self.pool_last or k < last:
                x = F.max_pool2d(x, 2)
        return self.classifier(x.flatten(1))

    def layer_groups(self) -> list[list[torch.Tensor]]:
        """One parameter group per layer, input first: conv weight, bias, BN gamma, beta; the
        classifier last."""
        groups = [
            [*conv.parameters(), *norm.parameters()] for conv, norm in zip(self.convs, self.norms)
        ]
        groups.append(list(self.classifier.parameters()))
        return groups


def network_choice(config: CNNConfig, norm: str = "[BN]") -> str:
    """The report line that describes :class:`VGGStyle` as ``config`` builds it."""
    pools = "2x2 max pool" if config.pool_last else "2x2 max pool (not after the last)"
    head = f"a hidden ReLU layer of {config.hidden}, " if config.hidden else ""
    return (
        f"network: VGG-style CNN, conv 3x3 widths {config.channels}, each {norm}, ReLU, {pools};"
        f" the last feature map flattened, {head}linear classifier; channels-last memory order "
        f"{'on' if config.channels_last else 'off'} (the same network, faster on the CPU)"
    )


def curve_choice(config: CNNConfig, data: ImageData) -> str:
    """The report line that says on which test images the accuracies are measured."""
    n = len(curve_data(data, config).test_y)
    curve = "the whole test set" if n == len(data.test_y) else f"the first {n} test images"
    return (
        f"test accuracy during training on {curve} (cheap to repeat at every probe); the final "
        "test accuracy on the whole test (sub)set"
    )


def curve_data(data: ImageData, config: CNNConfig) -> ImageData:
    """``data`` with only the first ``config.curve_test_examples`` test images: what the test
    accuracy curve during training is measured on (an evaluation of the whole test set at every
    probe would cost as much as hundreds of training steps); the final accuracy is measured on
    the whole ``data``."""
    n = config.curve_test_examples
    if n is None or n >= len(data.test_y):
        return data
    return replace(data, test_x=data.test_x[:n], test_y=data.test_y[:n])


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
    config: CNNConfig,
    *,
    seed: int,
    probe_every: int,
    probe: Callable[[Callable[[], torch.Tensor], int], dict[str, Any]],
    desc: str,
) -> dict[str, Any]:
    """Plain SGD at ``config.lr`` for ``config.steps`` steps of ``config.batch_size``; at steps
    0, probe_every, ... (before that step's update) call ``probe(loss_fn, step)`` with
    ``loss_fn`` the loss on that step's batch, and record the test accuracy.

    Returns:
        ``{"steps", "probes", "test_acc", "final_test_acc", "train_loss", "diverged_at",
        "seconds"}`` with one entry per probed step (``train_loss``: one per step).
    """
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    order = batch_order(len(data.train_y), config.batch_size, config.steps, seed)
    probed, probes, test_acc, losses = [], [], [], []
    diverged_at = -1
    start = time.perf_counter()
    for step in bar(range(config.steps), desc=desc, unit="step"):
        x, y = data.train_x[order[step]], data.train_y[order[step]]

        def loss_fn(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            return F.cross_entropy(model(x), y)

        if step % probe_every == 0:
            probed.append(step)
            probes.append(probe(loss_fn, step))
            test_acc.append(evaluate(model, data.test_x, data.test_y)[0])
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
        "final_test_acc": evaluate(model, data.test_x, data.test_y)[0],
        "train_loss": losses,
        "diverged_at": diverged_at,
        "seconds": time.perf_counter() - start,
    }


PROBE_CURVE_FIELDS = ("step", "variant", "seed", "test_acc", "train_loss")


def probe_curve_rows(jobs: dict[str, list[dict[str, Any]]], seeds: Sequence[int]) -> list[dict]:
    """One ``curves.csv`` row per probed step of each :func:`train_with_probes` job, given as
    ``{variant: [job of each seed]}``."""
    rows = []
    for variant, runs in jobs.items():
        for seed, job in zip(seeds, runs):
            for t, step in enumerate(job["steps"]):
                rows.append(
                    {
                        "step": step,
                        "variant": variant,
                        "seed": seed,
                        "test_acc": job["test_acc"][t],
                        "train_loss": job["train_loss"][min(step, len(job["train_loss"]) - 1)],
                    }
                )
    return rows


# The network with a pluggable norm (small-batch, non-iid, ghost, precise-bn, agc) ------------

NORMS: tuple[str, ...] = ("bn", "gn", "ln", "in", "renorm", "ghost", "none")
HEADS: tuple[str, ...] = ("gap", "flatten")
CURVE_FIELDS = ("step", "variant", "seed", "test_acc", "test_loss", "train_loss")


@dataclass(frozen=True)
class ConvConfig(DataConfig):
    """Fields the experiments with :func:`conv_net` share. Defaults: Fashion-MNIST, a
    10,000-image subset."""

    dataset: str = param("fashion-mnist", "data set", choices=DATASETS)
    channels: tuple[int, ...] = param((8, 16), "widths of the conv layers (each: conv3x3, norm)")
    batch_size: int = param(32, "examples per mini-batch")
    epochs: float = param(2.0, "passes over the training subset")
    lr: float = param(0.05, "SGD learning rate at batch 32 (scaled linearly with the batch)")
    momentum: float = param(0.9, "SGD momentum")
    evals: int = param(4, "evaluations on the test set, evenly spaced over training")
    train_subset: int | None = param(10_000, "training examples used (none = all)")
    seeds: int = param(2, "number of seeds (each: initial weights and data order)")
    grouped: bool = param(
        True,
        "train the networks of one batch size and learning rate together as one grouped network "
        "(batchnorm.lab.grouped; the same numbers up to float rounding order); false: one by one",
    )

    def validate(self) -> None:
        """Checks across fields; raises ValueError with what to change."""
        _check_network_fields(self, ("batch_size", "seeds", "evals"))
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ValueError(f"epochs must be a positive number, got {self.epochs}")
        for name in ("lr", "momentum"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.momentum >= 1:
            raise ValueError(f"momentum must be below 1, got {self.momentum}")
        if self.train_subset is not None and self.train_subset < 64:
            raise ValueError(f"train_subset must be at least 64, got {self.train_subset}")

    def quick(self) -> ConvConfig:
        """The smoke-test sizes: 2,000 training and 2,000 test images, 2 evaluations."""
        return replace(self, train_subset=2000, test_subset=2000, evals=2)

    def steps_for(self, batch_size: int, n_train: int) -> int:
        """Steps for ``epochs`` passes over ``n_train`` examples at ``batch_size`` (at least 1)."""
        return max(1, int(round(self.epochs * n_train / batch_size)))

    def scaled_lr(self, batch_size: int) -> float:
        """The linear scaling rule (Goyal et al. 2017): ``lr * batch_size / 32``."""
        return self.lr * batch_size / 32


def feature_shape(channels: Sequence[int], image_shape: Sequence[int]) -> tuple[int, int, int]:
    """(C, H, W) of :func:`conv_net`'s last feature map: each layer's 2x2 max pooling (ceil
    mode) halves H and W, rounding up.

    >>> feature_shape((8, 16), (28, 28))
    (16, 7, 7)
    """
    h, w = (int(v) for v in image_shape)
    for _ in channels:
        h, w = -(-h // 2), -(-w // 2)
    return int(channels[-1]), h, w


def head_features(head: str, channels: Sequence[int], image_shape: Sequence[int] | None) -> int:
    """Inputs of :func:`conv_net`'s final linear layer: the last width (``gap``) or the whole
    last feature map (``flatten``, which needs the images' (H, W)).

    Raises:
        ValueError: an unknown ``head``, or ``flatten`` without ``image_shape``.
    """
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    if head == "gap":
        return int(channels[-1])
    if image_shape is None or len(image_shape) != 2:
        raise ValueError(f"head 'flatten' needs the images' (H, W), got {image_shape!r}")
    c, h, w = feature_shape(channels, image_shape)
    return c * h * w


def conv_net(
    norm: str,
    channels: Sequence[int],
    num_classes: int,
    seed: int,
    *,
    head: str = "gap",
    image_shape: Sequence[int] | None = None,
    **norm_kwargs: Any,
) -> nn.Sequential:
    """The CNN of the module docstring, its weights drawn from ``torch.manual_seed(seed)``.

    Args:
        norm: one of :data:`NORMS`.
        channels: the conv layers' widths.
        num_classes: outputs of the final linear layer.
        seed: seeds the weights.
        head: what the final linear layer reads (:data:`HEADS`): ``gap``, the global average of
            each channel of the last feature map (C inputs); ``flatten``, the whole last
            feature map (C x H x W inputs: where a feature is, not only whether it is there,
            at the cost of one larger linear layer and no more convolutions).
        image_shape: (H, W) of the input images; needed by ``flatten``.
        norm_kwargs: the norm's options beyond the width.

    Raises:
        ValueError: an unknown ``norm`` (the message lists :data:`NORMS`) or ``head``.
    """
    from batchnorm.nn import create_norm

    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    features = head_features(head, channels, image_shape)
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    c_in = 1
    for c in channels:
        layers.append(nn.Conv2d(c_in, c, 3, padding=1, bias=norm == "none"))
        if norm == "ln":
            layers.append(create_norm("gn", c, num_groups=1))
        elif norm == "in":
            layers.append(create_norm("in", c, affine=True))
        elif norm != "none":
            layers.append(create_norm(norm, c, **norm_kwargs))
        layers += [nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
        c_in = c
    if head == "gap":
        layers.append(nn.AdaptiveAvgPool2d(1))
    layers += [nn.Flatten(), nn.Linear(features, num_classes)]
    return nn.Sequential(*layers)


def norm_kwargs(norm: str, steps: int, gn_groups: int) -> dict[str, Any]:
    """The keyword arguments of ``norm`` beyond the width: the groups of group norm, and batch
    renorm's schedule for a run of ``steps`` steps."""
    if norm == "gn":
        return {"num_groups": gn_groups}
    if norm == "renorm":
        # The paper's schedule (warm-up 5k, d_max at 25k, r_max at 40k of ~130k steps) in
        # proportion to this run's length.
        return {
            "warmup_steps": int(0.04 * steps),
            "d_max_reached_at": int(0.2 * steps),
            "r_max_reached_at": int(0.3 * steps),
        }
    return {}


def eval_steps(steps: int, evals: int) -> list[int]:
    """``evals`` evenly spaced steps in 1..steps, the last one ``steps``.

    >>> eval_steps(100, 4)
    [25, 50, 75, 100]
    """
    return sorted({max(1, int(round(steps * (i + 1) / evals))) for i in range(evals)})


def train_net(
    model: nn.Module,
    data: ImageData,
    batches: Iterator[np.ndarray],
    *,
    steps: int,
    lr: float,
    momentum: float,
    evals: int,
    desc: str,
    agc_clipping: float | None = None,
    eval_fn: Callable[[nn.Module], tuple[float, float]] | None = None,
    clip_classifier_bias: bool = False,
    checkpoint: Path | None = None,
    checkpoint_seconds: float = 30.0,
) -> dict[str, Any]:
    """Train ``model`` for ``steps`` SGD steps; evaluate ``evals`` times.

    Args:
        model: the network (left trained, in train mode).
        data: the training and test images.
        batches: yields the indices of each mini-batch.
        steps, lr, momentum: SGD.
        evals: evaluations, evenly spaced (the last at ``steps``).
        desc: progress bar label.
        agc_clipping: if given, adaptive gradient clipping (:class:`batchnorm.optim.AGC`) with
            this ``lambda``; the final linear layer is not clipped (as in NFNets).
        eval_fn: how to evaluate (default :func:`evaluate` on the test set).
        clip_classifier_bias: AGC clips the final layer's bias too, leaving only its weights
            unclipped (as the NFNets code does); default: the whole final layer unclipped.
        checkpoint: a file to resume from if it exists, and to write the training state to
            (weights, buffers, optimizer, results so far, random state; with its SHA-256) at
            evaluation steps, at most every ``checkpoint_seconds``. A resumed network draws and
            drops the mini-batches it already trained on, so it continues exactly where it
            stopped.

    Returns:
        ``steps``, ``test_acc``, ``test_loss``, ``train_loss`` (mean over the steps since the
        previous evaluation) per evaluation, ``diverged_at`` (the step whose loss was not finite,
        or -1) and ``train_acc_final`` (training-batch accuracy over the last 10% of steps).
    """
    train_x, train_y = data.train_x, data.train_y
    evaluate_now = eval_fn or (lambda m: evaluate(m, data.test_x, data.test_y))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    agc = None
    if agc_clipping is not None:
        from batchnorm.optim import AGC

        excluded = [model[-1].weight] if clip_classifier_bias else [model[-1]]
        agc = AGC(optimizer, clipping=agc_clipping, exclude=excluded)
    schedule = set(eval_steps(steps, evals))
    out: dict[str, Any] = {
        "steps": [],
        "test_acc": [],
        "test_loss": [],
        "train_loss": [],
        "diverged_at": -1,
    }
    running, count, tail_correct, tail_seen = 0.0, 0, 0, 0
    tail_from = steps - max(1, steps // 10)
    start = 0
    if checkpoint is not None and checkpoint.is_file():
        state = _read_net_checkpoint(checkpoint, model)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start, out = int(state["step"]), state["out"]
        running, count = float(state["running"]), int(state["count"])
        tail_correct, tail_seen = int(state["tail_correct"]), int(state["tail_seen"])
        for _ in range(start):  # the batches already trained on, drawn again and dropped
            next(batches)
    last_checkpoint = time.monotonic()
    model.train()
    with bar(total=steps, initial=start, desc=desc, leave=False, unit="step") as progress:
        for step in range(start + 1, steps + 1):
            idx = torch.from_numpy(next(batches))
            logits = model(train_x[idx])
            loss = F.cross_entropy(logits, train_y[idx])
            if not torch.isfinite(loss):
                out["diverged_at"] = step
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += float(loss.detach())
            count += 1
            if step > tail_from:
                tail_correct += int((logits.argmax(1) == train_y[idx]).sum())
                tail_seen += len(idx)
            progress.update(1)
            if step in schedule:
                acc, test_loss = evaluate_now(model)
                out["steps"].append(step)
                out["test_acc"].append(acc)
                out["test_loss"].append(test_loss)
                out["train_loss"].append(running / max(count, 1))
                running, count = 0.0, 0
                progress.set_postfix_str(f"test acc {acc:.3f}")
                if checkpoint is not None and (
                    step < steps and time.monotonic() - last_checkpoint >= checkpoint_seconds
                ):
                    _write_net_checkpoint(
                        checkpoint,
                        model,
                        {
                            "step": step,
                            "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "rng": torch.get_rng_state(),
                            "out": out,
                            "running": running,
                            "count": count,
                            "tail_correct": tail_correct,
                            "tail_seen": tail_seen,
                        },
                    )
                    last_checkpoint = time.monotonic()
    if agc is not None:
        agc.remove()
    if out["diverged_at"] > 0:
        # A diverged network predicts nothing useful: chance accuracy from there on.
        for step in sorted(schedule):
            if step >= out["diverged_at"]:
                out["steps"].append(step)
                out["test_acc"].append(1.0 / data.num_classes)
                out["test_loss"].append(math.nan)
                out["train_loss"].append(math.nan)
    out["train_acc_final"] = tail_correct / tail_seen if tail_seen else math.nan
    return out


def _state_signature(model: nn.Module) -> list[list[Any]]:
    """What a checkpoint must match: the names and shapes of the network's tensors."""
    return [[name, list(t.shape)] for name, t in model.state_dict().items()]


def _write_net_checkpoint(path: Path, model: nn.Module, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save({**state, "signature": _state_signature(model)}, buffer)
    atomic_write_checked(path, buffer.getvalue())


def _read_net_checkpoint(path: Path, model: nn.Module) -> dict[str, Any]:
    # read_checked refuses an empty, truncated or corrupted checkpoint (CorruptFileError).
    state = torch.load(io.BytesIO(read_checked(path)), weights_only=True)
    if state.get("signature") != _state_signature(model):
        raise ValueError(f"checkpoint {path} was written for another network; delete it to restart")
    return state


def train_job(ctx: Context, key: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A :func:`train_net` job through :func:`cached_job`: ``run()`` timed as "train"; a saved
    result gets its NaNs back (JSON stored them as None)."""

    def timed() -> dict[str, Any]:
        with ctx.timer("train"):
            return run()

    return _nan_back(cached_job(ctx, key, timed))


@dataclass(frozen=True)
class NetJob:
    """One :func:`conv_net` network to train, as one job of :func:`train_jobs`.

    Attributes:
        key: its job name (``jobs/<key>.json``).
        norm, seed, options: ``conv_net(norm, channels, classes, seed, **options)``.
        batches: builds its mini-batch sampler (called once, when it trains).
        desc: its progress-bar label.
        clipped: adaptive gradient clipping applies to it (when ``agc_clipping`` is given).
    """

    key: str
    norm: str
    seed: int
    batches: Callable[[], Iterator[np.ndarray]]
    desc: str
    options: dict[str, Any] = field(default_factory=dict)
    clipped: bool = True


def train_jobs(
    ctx: Context,
    config: ConvConfig,
    data: ImageData,
    jobs: Sequence[NetJob],
    *,
    steps: int,
    lr: float,
    agc_clipping: float | None = None,
    finish: Callable[[NetJob, nn.Module, dict[str, Any]], dict[str, Any]] | None = None,
    clip_classifier_bias: bool = False,
) -> list[dict[str, Any]]:
    """Train networks that share a batch size, step count and learning rate; one
    :func:`train_net` result per job, in order, each saved as its job (resumed runs load it).

    With ``config.grouped`` the jobs not yet saved train together as one
    :class:`batchnorm.lab.grouped.GroupedConvNet` (:func:`batchnorm.lab.grouped.train_grouped`:
    each gets the result it would get alone, up to float rounding order); otherwise one by one
    with :func:`train_net`. ``finish(job, network, result)``, if given, runs on each trained network
    (a :func:`conv_net` module holding its weights) and returns its final result.
    ``clip_classifier_bias`` makes AGC clip the final layer's bias (see :func:`train_net`).
    """
    from batchnorm.lab.grouped import ConvNetSpec, GroupedConvNet, train_grouped

    results: dict[str, dict[str, Any]] = {}
    missing = []
    for job in jobs:
        path = ctx.run_dir / "jobs" / f"{job.key}.json"
        if path.is_file():
            results[job.key] = train_job(ctx, job.key, lambda: {})  # loads the saved result
        else:
            missing.append(job)
    if len(missing) > 1 and config.grouped:
        specs = [ConvNetSpec(j.key, j.seed, j.norm, j.options) for j in missing]
        model = GroupedConvNet(specs, config.channels, data.num_classes)
        # The group's checkpoint is named by its networks: a resumed run finds the same ones
        # missing, and continues the group where it stopped.
        digest = hashlib.sha256("\n".join(j.key for j in missing).encode()).hexdigest()[:12]
        checkpoint = ctx.run_dir / "jobs" / f"group-{digest}.ckpt"
        checkpoint.parent.mkdir(exist_ok=True)
        if checkpoint.is_file():
            log(f"[lab] {len(missing)} networks together: resuming from {checkpoint}")
        with ctx.timer("train"):
            trained = train_grouped(
                model,
                data,
                [j.batches() for j in missing],
                steps=steps,
                lr=lr,
                momentum=config.momentum,
                evals=config.evals,
                desc=f"{len(missing)} networks together",
                agc_clipping=agc_clipping,
                clipped=[j.clipped for j in missing],
                checkpoint=checkpoint,
                clip_classifier_bias=clip_classifier_bias,
            )
            if finish is not None:
                trained = [
                    finish(job, model.network(k), result)
                    for k, (job, result) in enumerate(zip(missing, trained))
                ]
        for job, result in zip(missing, trained):
            results[job.key] = train_job(ctx, job.key, lambda result=result: result)
        remove_checked(checkpoint)
    else:
        for job in missing:

            def alone(job: NetJob = job) -> dict[str, Any]:
                model = conv_net(
                    job.norm, config.channels, data.num_classes, job.seed, **job.options
                )
                result = train_net(
                    model,
                    data,
                    job.batches(),
                    steps=steps,
                    lr=lr,
                    momentum=config.momentum,
                    evals=config.evals,
                    desc=job.desc,
                    agc_clipping=agc_clipping if job.clipped else None,
                    checkpoint=ctx.run_dir / "jobs" / f"{job.key}.ckpt",
                    clip_classifier_bias=clip_classifier_bias,
                )
                return result if finish is None else finish(job, model, result)

            results[job.key] = train_job(ctx, job.key, alone)
            remove_checked(ctx.run_dir / "jobs" / f"{job.key}.ckpt")
    return [results[job.key] for job in jobs]


def _nan_back(value: Any) -> Any:
    # JSON has no NaN: the writer stored None for it (a fresh result holds no None).
    if isinstance(value, dict):
        return {k: _nan_back(v) for k, v in value.items()}
    if isinstance(value, list):
        return [math.nan if v is None else _nan_back(v) for v in value]
    return value


def job_curve_rows(
    result: dict[str, Any], variant: str, seed: int, extra: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """One ``curves.csv`` row per evaluation of a job."""
    return [
        {
            "step": int(step),
            "variant": variant,
            "seed": seed,
            "test_acc": float(acc),
            "test_loss": float(result["test_loss"][i]),
            "train_loss": float(result["train_loss"][i]),
            **(extra or {}),
        }
        for i, (step, acc) in enumerate(zip(result["steps"], result["test_acc"], strict=True))
    ]


def final_acc(results: Sequence[dict[str, Any]]) -> np.ndarray:
    """The final test accuracy of each job."""
    return np.array([r["test_acc"][-1] for r in results], dtype=np.float64)


def common_choices(config: ConvConfig) -> list[str]:
    """The protocol choices the :func:`conv_net` experiments share, as report lines."""
    return [
        f"network: {len(config.channels)} x [conv3x3 -> norm -> ReLU -> maxpool 2] with widths "
        f"{config.channels}, global average pool, linear; torch's default initialization; "
        "normalized convolutions have no bias",
        f"data: {config.dataset}"
        + (
            f", a fixed random subset of {config.train_subset} training images"
            if config.train_subset
            else ""
        )
        + (f", {config.test_subset} test images" if config.test_subset else ", the whole test set")
        + "; pixels / 255, no augmentation",
        f"optimizer: SGD, momentum {config.momentum}, learning rate {config.lr} at batch 32, "
        "scaled linearly with the batch size (Goyal et al. 2017); no weight decay or schedule; "
        "mean cross-entropy",
        f"length: {config.epochs:g} epochs of the training subset for every batch size (so "
        "smaller batches take more steps); a seed fixes the initial weights (torch.manual_seed) "
        "and the batch order, the same for every variant (paired runs)",
        "test-time normalization: batch-norm-type layers use their moving averages (momentum "
        "0.1) in eval mode unless stated otherwise; GN, LN and IN need no population statistics",
    ]
