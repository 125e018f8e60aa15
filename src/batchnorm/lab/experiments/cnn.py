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
      -> global average pool -> linear(num_classes)          (head "gap")
      or -> flatten the last (C, H, W) map -> linear(num_classes)   (head "flatten")

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
from batchnorm.lab.io import remove_checked
from batchnorm.lab.loop import ModelTask, StepDecay, eval_steps, run_loop
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
        # The noise's own random stream (a checkpoint saves its state: noise_generator).
        noise_gen = self.noise_generator = torch.Generator().manual_seed(10_000 + seed)
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
    checkpoint: Path | None = None,
) -> dict[str, Any]:
    """Plain SGD at ``config.lr`` for ``config.steps`` steps of ``config.batch_size``; at steps
    0, probe_every, ... (before that step's update) call ``probe(loss_fn, step)`` with
    ``loss_fn`` the loss on that step's batch, and record the test accuracy. With
    ``checkpoint``, an interrupted run continues from its last probe (the lab's loop,
    :func:`batchnorm.lab.loop.run_loop`).

    Returns:
        ``{"steps", "probes", "test_acc", "final_test_acc", "train_loss", "diverged_at",
        "seconds"}`` with one entry per probed step (``train_loss``: one per step).
    """
    model.train()
    job = _ProbedJob(model, data, config, seed, probe)
    loop = run_loop(
        job,
        steps=config.steps,
        eval_steps=range(0, config.steps, probe_every),
        desc=desc,
        checkpoint=checkpoint,
        signature=_state_signature(model),
    )
    start = time.perf_counter()
    final_test_acc = evaluate(model, data.test_x, data.test_y)[0]
    return {
        "steps": job.probed,
        "probes": job.probes,
        "test_acc": job.test_acc,
        "final_test_acc": final_test_acc,
        "train_loss": job.losses,
        "diverged_at": job.diverged_at,
        "seconds": loop.train_seconds + loop.eval_seconds + time.perf_counter() - start,
    }


def probed_job(
    model: VGGStyle,
    data: ImageData,
    config: CNNConfig,
    *,
    seed: int,
    probe: Callable[[Callable[[], torch.Tensor], int], dict[str, Any]],
    desc: str,
    checkpoint: Path | None = None,
) -> dict[str, Any]:
    """One probed network of ``ics`` or ``landscape``: :func:`train_with_probes` every
    ``config.probe_every`` steps with the test curve on :func:`curve_data`, then the final
    training accuracy (on up to ``config.eval_examples`` training images) and the final test
    accuracy on the whole test set."""
    result = train_with_probes(
        model,
        curve_data(data, config),
        config,
        seed=seed,
        probe_every=config.probe_every,
        probe=probe,
        desc=desc,
        checkpoint=checkpoint,
    )
    n = min(config.eval_examples, len(data.train_y))
    result["final_train_acc"] = evaluate(model, data.train_x[:n], data.train_y[:n])[0]
    result["final_test_acc"] = evaluate(model, data.test_x, data.test_y)[0]
    return result


class _ProbedJob(ModelTask):
    """:func:`train_with_probes` as a :class:`batchnorm.lab.loop.Task`."""

    saved = ("probed", "probes", "test_acc", "losses", "diverged_at")

    def __init__(
        self,
        model: VGGStyle,
        data: ImageData,
        config: CNNConfig,
        seed: int,
        probe: Callable[[Callable[[], torch.Tensor], int], dict[str, Any]],
    ) -> None:
        self.model, self.data, self.probe = model, data, probe
        self.optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
        self.order = batch_order(len(data.train_y), config.batch_size, config.steps, seed)
        self.probed: list[int] = []
        self.probes: list[dict[str, Any]] = []
        self.test_acc: list[float] = []
        self.losses: list[float] = []
        self.diverged_at = -1

    def _loss_fn(self, step: int) -> Callable[[], torch.Tensor]:
        x, y = self.data.train_x[self.order[step]], self.data.train_y[self.order[step]]
        return lambda: F.cross_entropy(self.model(x), y)

    def evaluate(self, step: int) -> str:
        self.probed.append(step)
        self.probes.append(self.probe(self._loss_fn(step), step))
        self.test_acc.append(evaluate(self.model, self.data.test_x, self.data.test_y)[0])
        return f"test acc {self.test_acc[-1]:.3f}"

    def train_step(self, step: int) -> bool:
        loss = self._loss_fn(step)()
        self.losses.append(float(loss.detach()))
        if not math.isfinite(self.losses[-1]):
            self.diverged_at = step
            return False
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return True

    def generators(self) -> list[torch.Generator]:
        return [self.model.noise_generator]


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


@dataclass(frozen=True)
class FlatConvConfig(ConvConfig):
    """:class:`ConvConfig` with the choice of :func:`conv_net`'s head, whose default here is
    the flattened last feature map (a trained baseline within the time of a protocol)."""

    head: str = param(
        "flatten",
        "the final linear layer's input: flatten (the whole last feature map) or gap (global "
        "average pool, one value per channel)",
        choices=HEADS,
    )


@dataclass(frozen=True)
class ScheduledConvConfig(FlatConvConfig):
    """:class:`FlatConvConfig` for experiments trained through :func:`train_jobs`, with its
    step decay of the learning rate (:class:`batchnorm.lab.loop.StepDecay`)."""

    decay_at: float = param(
        0.75,
        "fraction of the steps after which the learning rate drops by decay_factor (a step "
        "decay; 1 = a constant rate)",
    )
    decay_factor: float = param(0.1, "the learning rate's factor after the drop (decay_at)")

    def validate(self) -> None:
        """Checks across fields; raises ValueError with what to change."""
        super().validate()
        if not (math.isfinite(self.decay_at) and 0 < self.decay_at <= 1):
            raise ValueError(f"decay_at must lie in (0, 1], got {self.decay_at}")
        if not (math.isfinite(self.decay_factor) and 0 < self.decay_factor <= 1):
            raise ValueError(f"decay_factor must lie in (0, 1], got {self.decay_factor}")


def head_of(config: ConvConfig) -> str:
    """The head of ``config``'s networks: its ``head`` field, else ``gap`` (a plain
    :class:`ConvConfig` builds :func:`conv_net`'s original network)."""
    return str(getattr(config, "head", "gap"))


def config_net(
    config: ConvConfig, data: ImageData, norm: str, seed: int, **options: Any
) -> nn.Sequential:
    """:func:`conv_net` with ``config``'s widths and head for ``data``'s images and classes."""
    return conv_net(
        norm,
        config.channels,
        data.num_classes,
        seed,
        head=head_of(config),
        image_shape=data.image_shape,
        **options,
    )


def decay_of(config: ConvConfig) -> tuple[float, float]:
    """``(decay_at, decay_factor)`` of ``config``: its fields, else a constant rate."""
    return float(getattr(config, "decay_at", 1.0)), float(getattr(config, "decay_factor", 1.0))


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


def train_net(
    model: nn.Module,
    data: ImageData,
    batches: Iterator[np.ndarray],
    *,
    steps: int,
    lr: float | StepDecay,
    momentum: float,
    evals: int,
    desc: str,
    agc_clipping: float | None = None,
    eval_fn: Callable[[nn.Module], tuple[float, float]] | None = None,
    clip_classifier_bias: bool = False,
    checkpoint: Path | None = None,
    checkpoint_seconds: float | None = None,
) -> dict[str, Any]:
    """Train ``model`` for ``steps`` SGD steps; evaluate ``evals`` times.

    Args:
        model: the network (left trained, in train mode).
        data: the training and test images.
        batches: yields the indices of each mini-batch.
        steps, lr, momentum: SGD; ``lr`` a rate or a :class:`batchnorm.lab.loop.StepDecay`
            (the rate drops once, the optimizer and its momentum go on).
        evals: evaluations, evenly spaced (the last at ``steps``).
        desc: progress bar label.
        agc_clipping: if given, adaptive gradient clipping (:class:`batchnorm.optim.AGC`) with
            this ``lambda``; the final linear layer is not clipped (as in NFNets).
        eval_fn: how to evaluate (default :func:`evaluate` on the test set).
        clip_classifier_bias: AGC clips the final layer's bias too, leaving only its weights
            unclipped (as the NFNets code does); default: the whole final layer unclipped.
        checkpoint: a file to resume from if it exists, and to write the training state to
            (weights, buffers, optimizer, results so far, random state; with its SHA-256) at
            most every ``checkpoint_seconds`` (None: the loop's default) and at the end, by
            :func:`batchnorm.lab.loop.run_loop`. A resumed network draws and
            drops the mini-batches it already trained on, so it continues exactly where it
            stopped.

    Returns:
        ``steps``, ``test_acc``, ``test_loss``, ``train_loss`` (mean over the steps since the
        previous evaluation) per evaluation, ``diverged_at`` (the step whose loss was not finite,
        or -1) and ``train_acc_final`` (training-batch accuracy over the last 10% of steps).
    """
    evaluate_now = eval_fn or (lambda m: evaluate(m, data.test_x, data.test_y))
    rate = lr if isinstance(lr, StepDecay) else StepDecay(lr, steps, 1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=rate.lr, momentum=momentum)
    agc = None
    if agc_clipping is not None:
        from batchnorm.optim import AGC

        excluded = [model[-1].weight] if clip_classifier_bias else [model[-1]]
        agc = AGC(optimizer, clipping=agc_clipping, exclude=excluded)
    schedule = eval_steps(steps, evals)
    job = _NetJob(model, data, batches, optimizer, evaluate_now, steps, rate)
    model.train()
    try:
        run_loop(
            job,
            steps=steps,
            eval_steps=schedule,
            desc=desc,
            checkpoint=checkpoint,
            checkpoint_seconds=checkpoint_seconds,
            signature=_state_signature(model),
        )
    finally:
        if agc is not None:
            agc.remove()
    from batchnorm.lab.grouped import finish_result

    finish_result(job.out, schedule, data.num_classes, job.tail_correct, job.tail_seen)
    return job.out


class _NetJob(ModelTask):
    """One :func:`train_net` network as a :class:`batchnorm.lab.loop.Task`."""

    saved = ("out", "running", "count", "tail_correct", "tail_seen")

    def __init__(
        self,
        model: nn.Module,
        data: ImageData,
        batches: Iterator[np.ndarray],
        optimizer: torch.optim.Optimizer,
        evaluate_now: Callable[[nn.Module], tuple[float, float]],
        steps: int,
        rate: StepDecay,
    ) -> None:
        self.model, self.data, self.batches, self.rate = model, data, batches, rate
        self.samplers = [batches]
        self.optimizer, self.evaluate_now = optimizer, evaluate_now
        self.out: dict[str, Any] = {
            "steps": [],
            "test_acc": [],
            "test_loss": [],
            "train_loss": [],
            "diverged_at": -1,
        }
        self.running, self.count, self.tail_correct, self.tail_seen = 0.0, 0, 0, 0
        self.tail_from = steps - max(1, steps // 10)

    def train_step(self, step: int) -> bool:
        train_x, train_y = self.data.train_x, self.data.train_y
        idx = torch.from_numpy(next(self.batches))
        logits = self.model(train_x[idx])
        loss = F.cross_entropy(logits, train_y[idx])
        if not torch.isfinite(loss):
            self.out["diverged_at"] = step + 1
            return False
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.rate.apply(self.optimizer, step)
        self.optimizer.step()
        self.running += float(loss.detach())
        self.count += 1
        if step + 1 > self.tail_from:
            self.tail_correct += int((logits.argmax(1) == train_y[idx]).sum())
            self.tail_seen += len(idx)
        return True

    def evaluate(self, step: int) -> str:
        acc, test_loss = self.evaluate_now(self.model)
        self.out["steps"].append(step)
        self.out["test_acc"].append(acc)
        self.out["test_loss"].append(test_loss)
        self.out["train_loss"].append(self.running / max(self.count, 1))
        self.running, self.count = 0.0, 0
        return f"test acc {acc:.3f}"


def _state_signature(model: nn.Module) -> list[list[Any]]:
    """What a checkpoint must match: the names and shapes of the network's tensors."""
    return [[name, list(t.shape)] for name, t in model.state_dict().items()]


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

    With ``config.decay_at`` < 1 (a :class:`ScheduledConvConfig`) the learning rate drops to
    ``config.decay_factor`` times ``lr`` for the last steps, within the same run of the
    training loop (:class:`batchnorm.lab.loop.StepDecay`: the optimizer and its momentum go on
    across the drop, and an interrupted network resumes from its checkpoint on either side).
    """
    from batchnorm.lab.grouped import ConvNetSpec, GroupedConvNet, train_grouped

    decay_at, factor = decay_of(config)
    rate = StepDecay.of(lr, steps=steps, decay_at=decay_at, factor=factor)
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
        model = GroupedConvNet(
            specs,
            config.channels,
            data.num_classes,
            head=head_of(config),
            image_shape=data.image_shape,
        )
        # The group's checkpoint is named by its networks: a resumed run finds the same ones
        # missing, and continues the group where it stopped.
        digest = hashlib.sha256("\n".join(j.key for j in missing).encode()).hexdigest()[:12]
        checkpoint = ctx.checkpoint(f"group-{digest}")
        streams = [j.batches() for j in missing]
        with ctx.timer("train"):
            trained = train_grouped(
                model,
                data,
                streams,
                steps=steps,
                lr=rate,
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
        remove_checked(checkpoint)  # every network of the group is saved as its job
    else:
        for job in missing:

            def alone(job: NetJob = job) -> dict[str, Any]:
                model = config_net(config, data, job.norm, job.seed, **job.options)
                result = train_net(
                    model,
                    data,
                    job.batches(),
                    steps=steps,
                    lr=rate,
                    momentum=config.momentum,
                    evals=config.evals,
                    desc=job.desc,
                    agc_clipping=agc_clipping if job.clipped else None,
                    checkpoint=ctx.checkpoint(job.key),
                    clip_classifier_bias=clip_classifier_bias,
                )
                return result if finish is None else finish(job, model, result)

            results[job.key] = train_job(ctx, job.key, alone)
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


def schedule_text(config: ConvConfig) -> str:
    """The learning-rate schedule of ``config`` (:class:`batchnorm.lab.loop.StepDecay`), as a
    report phrase."""
    decay_at, decay_factor = decay_of(config)
    if decay_at >= 1:
        return "a constant learning rate"
    return (
        f"the learning rate drops to {decay_factor:g} times its value after "
        f"{decay_at:.0%} of the steps (a step decay, as the papers' schedules end; the SGD "
        "optimizer and its momentum go on across the drop)"
    )


def common_choices(config: ConvConfig) -> list[str]:
    """The protocol choices the :func:`conv_net` experiments share, as report lines."""
    return [
        f"network: {len(config.channels)} x [conv3x3 -> norm -> ReLU -> maxpool 2] with widths "
        f"{config.channels}, "
        + (
            "global average pool, linear"
            if head_of(config) == "gap"
            else "a linear layer on the flattened last feature map (where a feature is, not only "
            "whether it is there: several points of accuracy on Fashion-MNIST for no more "
            "convolutions)"
        )
        + "; torch's default initialization; normalized convolutions have no bias",
        f"data: {config.dataset}"
        + (
            f", a fixed random subset of {config.train_subset} training images"
            if config.train_subset
            else ""
        )
        + (f", {config.test_subset} test images" if config.test_subset else ", the whole test set")
        + "; pixels / 255, no augmentation",
        f"optimizer: SGD, momentum {config.momentum}, learning rate {config.lr} at batch 32, "
        "scaled linearly with the batch size (Goyal et al. 2017); "
        + (
            "no weight decay or schedule"
            if decay_of(config)[0] >= 1
            else f"no weight decay; {schedule_text(config)}"
        )
        + "; mean cross-entropy",
        f"length: {config.epochs:g} epochs of the training subset for every batch size (so "
        "smaller batches take more steps); a seed fixes the initial weights (torch.manual_seed) "
        "and the batch order, the same for every variant (paired runs)",
        "test-time normalization: batch-norm-type layers use their moving averages (momentum "
        "0.1) in eval mode unless stated otherwise; GN, LN and IN need no population statistics",
    ]
