"""Many small CNNs trained at once, as one grouped network.

The CNN experiments (``small-batch``, ``non-iid``, ``ghost``, ``precise-bn``, ``agc``) train
several copies of :func:`batchnorm.lab.experiments.cnn.conv_net`: one per variant (a norm, its
options) and seed. Such a network (widths 8 and 16) is far too small to keep a CPU busy, so
training the copies one after another spends most of its time in per-step Python and per-op
overhead. :class:`GroupedConvNet` holds K of them (the same widths, each with its own weights,
normalization and seed) and runs them all in each step, as :class:`batchnorm.lab.wide.WideMLP`
does for MLPs:

- a convolution is ONE grouped convolution with ``groups = K``: its (K * C_out, C_in, 3, 3)
  weight is the K networks' (C_out, C_in, 3, 3) weights stacked, so output channel
  ``k * C_out + c`` is network k's channel c computed from network k's input channels only. The
  first layer sees the images: a (N, 1, H, W) batch shared by all networks is convolved with
  ``groups = 1`` (every network reads the same channel), a per-network batch with ``groups = K``;
- consecutive networks that use the same norm with the same options (usually all K) form a run,
  computed as one block of grouped layers; its normalization is one layer over the channels of
  all its networks: batch norm, ghost batch norm, batch renorm and instance
  norm work per channel (over the batch and/or the spatial positions), so channel ``k * C + c``
  is normalized exactly as network k's channel c; group norm with ``G`` groups per network is
  group norm with ``n * G`` groups over the ``n * C`` channels of n networks (a group is a
  contiguous block of ``C / G`` channels, which never straddles two networks); layer norm over
  (C, H, W) is group norm with one group per network. Networks without normalization keep
  their convolution bias (in the grouped convolution). Ghost batches split the batch axis, which
  every network shares with the same batch size, into the same ghost batches as a single
  network does;
- max pooling comes before the ReLU (the same numbers, since max and ReLU commute and a window
  whose max is <= 0 gets a zero gradient either way, on a quarter of the values);
- the classifier is one batched matrix product over K, ``logits[k] = pool(x)[k] @ W[k]^T + b[k]``
  (``torch.baddbmm``), with the weights stored as (K * classes, C);
- the loss is the sum of the K networks' mean cross-entropies
  (:func:`grouped_cross_entropy`), so each network's gradient is that of its own loss.

Every parameter and buffer of a run's block holds network k's tensor at rows ``[p * n_k, (p + 1) *
n_k)`` of its axis 0 (p: k's position in its run; axis 0 of the single tensor has n_k entries), and
nothing else of network k is anywhere; so an elementwise optimizer (SGD with momentum and weight
decay) steps each network exactly as its own optimizer would. Adaptive gradient clipping, which
takes norms over units, is applied per network by :func:`clip_grad_per_network_` (each network's
bias and gain vectors are one unit each, as for a single network). Network k starts from the weights
:func:`conv_net` draws from its seed, copied in (:meth:`GroupedConvNet.load_network`), and
:meth:`GroupedConvNet.network_tensors` gives its tensors under :func:`conv_net`'s state-dict keys.
So the K networks train exactly as K separate runs would, up to float rounding order (tests:
``tests/test_lab_grouped.py``, float64).

Example:
    >>> import torch
    >>> specs = [ConvNetSpec("BN", seed=0), ConvNetSpec("GN", seed=0, norm="gn",
    ...          norm_kwargs={"num_groups": 2})]
    >>> model = GroupedConvNet(specs, channels=(4, 8), num_classes=3)
    >>> model(torch.randn(5, 1, 12, 12)).shape  # (K, N, classes); the images shared by all
    torch.Size([2, 5, 3])
    >>> w = model.network_tensors(0)["0.weight"]  # network 0's first conv, (4, 1, 3, 3)
    >>> bool((w == model.network_tensors(1)["0.weight"]).all())  # same seed, same weights
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from batchnorm.lab.loop import ModelTask, StepDecay, eval_steps, run_loop

if TYPE_CHECKING:
    from batchnorm.lab.experiments.cnn import ImageData

__all__ = [
    "ConvNetSpec",
    "GroupedConvNet",
    "GroupedAGC",
    "clip_grad_per_network_",
    "grouped_cross_entropy",
    "evaluate_grouped",
    "train_grouped",
]


@dataclass(frozen=True)
class ConvNetSpec:
    """One network of a grouped CNN.

    Attributes:
        variant: the name of the variant it belongs to (its results are averaged over seeds).
        seed: the seed :func:`batchnorm.lab.experiments.cnn.conv_net` draws its weights from.
        norm: one of :data:`batchnorm.lab.experiments.cnn.NORMS`.
        norm_kwargs: the norm's options beyond the width (``num_groups`` of ``gn``,
            ``virtual_batch_size`` of ``ghost``, renorm's schedule, batch norm's ``momentum``),
            as :func:`conv_net` takes them.
    """

    variant: str
    seed: int
    norm: str = "bn"
    norm_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from batchnorm.lab.experiments.cnn import NORMS

        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose one of {', '.join(NORMS)}")
        object.__setattr__(self, "norm_kwargs", dict(self.norm_kwargs))

    def norm_key(self) -> tuple[str, tuple[tuple[str, Any], ...]]:
        """What networks must share to share one normalization layer."""
        return self.norm, tuple(sorted(self.norm_kwargs.items()))


class _GroupedConv2d(nn.Module):
    """K 3x3 convolutions (padding 1) of C_in -> C_out channels as one grouped one.

    Shape:
        input: (N, C_in, H, W) shared by all K networks, or (N, K * C_in, H, W).
        output: (N, K * C_out, H, W).
    """

    def __init__(self, num_nets: int, in_channels: int, out_channels: int, bias: bool) -> None:
        super().__init__()
        self.num_nets, self.in_channels = num_nets, in_channels
        self.weight = nn.Parameter(torch.empty(num_nets * out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.empty(num_nets * out_channels)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A shared input (C_in channels) feeds every output channel: groups = 1.
        groups = 1 if x.shape[1] == self.in_channels else self.num_nets
        return F.conv2d(x, self.weight, self.bias, padding=1, groups=groups)


def _norm_layer(norm: str, channels: int, nets: int, kwargs: Mapping[str, Any]) -> nn.Module:
    """The normalization of ``nets`` networks of ``channels`` channels each, as one layer over
    their ``nets * channels`` channels (see the module docstring), built as :func:`conv_net`
    builds a single network's."""
    from batchnorm.nn import create_norm

    width = nets * channels
    if norm == "none":  # the convolution keeps its bias
        return nn.Identity()
    if norm == "ln":  # conv_net: group norm with one group, whatever the options
        return create_norm("gn", width, num_groups=nets)
    if norm == "in":
        return create_norm("in", width, affine=True)
    options = dict(kwargs)
    if norm == "gn":
        groups = int(options.pop("num_groups", 32))
        if channels % groups:
            raise ValueError(
                f"group norm: {channels} channels cannot be split into num_groups={groups} "
                "equal groups; give a num_groups that divides every width"
            )
        return create_norm("gn", width, num_groups=groups * nets, **options)
    return create_norm(norm, width, **options)


class _SameNormNets(nn.Module):
    """n networks with the same normalization as one: grouped convolutions, one norm layer per
    conv layer, a batched classifier.

    Shape:
        input: (N, C_in, H, W) shared by the n networks, or (N, n * C_in, H, W).
        output: (n, N, num_classes).
    """

    def __init__(
        self,
        spec: ConvNetSpec,
        nets: int,
        in_channels: int,
        channels: tuple[int, ...],
        classes: int,
        head: str,
        features: int,
    ) -> None:
        super().__init__()
        self.nets, self.channels, self.num_classes = nets, channels, classes
        self.head = head
        self.features = features  # inputs of each classifier: C (gap) or C * H * W (flatten)
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        c_in = in_channels
        for c in channels:
            self.convs.append(_GroupedConv2d(nets, c_in, c, bias=spec.norm == "none"))
            self.norms.append(_norm_layer(spec.norm, c, nets, spec.norm_kwargs))
            c_in = c
        self.classifier_weight = nn.Parameter(torch.empty(nets * classes, features))
        self.classifier_bias = nn.Parameter(torch.empty(nets * classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.norms):
            z = norm(conv(x))  # (N, n * c, H, W)
            # Pooling before the ReLU gives the same numbers (max and ReLU commute, and a
            # window whose max is <= 0 gets a zero gradient either way) on 4x fewer values.
            x = torch.relu(F.max_pool2d(z, 2, ceil_mode=True))
        n, c = self.nets, self.features
        if self.head == "gap":  # the mean of each channel
            x = F.adaptive_avg_pool2d(x, 1)
        # (N, n * C', H', W') -> (N, n, C' * H' * W'): network k's feature map flattened in
        # conv_net's (C, H, W) order (reshape: the activations may be channels-last).
        per_net = x.reshape(x.shape[0], n, c).transpose(0, 1)  # (n, N, c)
        weight = self.classifier_weight.view(n, self.num_classes, c).transpose(1, 2)  # (n, c, out)
        return torch.baddbmm(self.classifier_bias.view(n, 1, self.num_classes), per_net, weight)


class GroupedConvNet(nn.Module):
    """K networks :func:`batchnorm.lab.experiments.cnn.conv_net` builds, as one (module doc).

    Networks keep the order of ``specs``. Consecutive networks with the same
    :meth:`ConvNetSpec.norm_key` form a run (:attr:`runs`) computed as one block of grouped
    layers; different runs are different blocks (splitting one tensor by channels instead would
    hand the norm layers non-contiguous slices, which their CPU kernels process several times
    slower), so list the networks of one norm together.

    Args:
        specs: one :class:`ConvNetSpec` per network.
        channels: the widths of the conv layers, as for :func:`conv_net`.
        num_classes: outputs of each network.
        in_channels: channels of the images (1: grey).
        head, image_shape: the classifier's input, as for :func:`conv_net` (``gap``: the
            channel means; ``flatten``: the whole last feature map of (H, W) images).

    Attributes:
        runs: ``(start, stop, spec)`` per run of networks with the same norm.
        blocks: one module per run, with ``convs`` (one grouped convolution per layer),
            ``norms`` (one norm layer per conv layer), ``classifier_weight``
            (n * classes, C) and ``classifier_bias`` (n * classes,).

    Shape:
        input: (N, in_channels, H, W), shared by every network, or (K, N, in_channels, H, W),
            one batch per network.
        output: (K, N, num_classes) logits.
    """

    def __init__(
        self,
        specs: Sequence[ConvNetSpec],
        channels: Sequence[int],
        num_classes: int,
        *,
        in_channels: int = 1,
        head: str = "gap",
        image_shape: Sequence[int] | None = None,
    ) -> None:
        from batchnorm.lab.experiments.cnn import head_features

        super().__init__()
        if not specs:
            raise ValueError("GroupedConvNet needs at least one ConvNetSpec")
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must list positive widths, got {tuple(channels)}")
        self.head = head
        self.image_shape = None if image_shape is None else tuple(int(v) for v in image_shape)
        features = head_features(head, channels, self.image_shape)
        self.specs: tuple[ConvNetSpec, ...] = tuple(specs)
        self.channels = tuple(int(c) for c in channels)
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.num_nets = len(self.specs)
        self.runs: list[tuple[int, int, ConvNetSpec]] = []
        for k, spec in enumerate(self.specs):
            if self.runs and self.runs[-1][2].norm_key() == spec.norm_key():
                self.runs[-1] = (self.runs[-1][0], k + 1, self.runs[-1][2])
            else:
                self.runs.append((k, k + 1, spec))
        self.blocks = nn.ModuleList(
            _SameNormNets(
                spec,
                stop - start,
                self.in_channels,
                self.channels,
                self.num_classes,
                head,
                features,
            )
            for start, stop, spec in self.runs
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Network k gets the weights :func:`conv_net` draws from its seed (torch's default
        initialization after ``torch.manual_seed(seed)``); torch's global random state is left
        as it was."""
        with torch.random.fork_rng(devices=[]):
            for k, spec in enumerate(self.specs):
                single = self._spec_net(spec)
                self.load_network(k, single)

    def _run_of(self, k: int) -> tuple[int, int]:
        """(index of network k's run, k's position in it)."""
        if not 0 <= k < self.num_nets:
            raise IndexError(f"network {k} out of range: the model holds {self.num_nets}")
        for r, (start, stop, _) in enumerate(self.runs):
            if start <= k < stop:
                return r, k - start
        raise AssertionError("the runs cover every network")

    def network_tensors(self, k: int, *, grads: bool = False) -> dict[str, torch.Tensor]:
        """Network k's parameters and buffers (or, with ``grads``, the parameters' gradients),
        as views keyed like the ``state_dict`` of its :func:`conv_net` network.

        A scalar buffer (``num_batches_tracked``) is shared by the networks of a run; with
        ``grads``, a parameter without a gradient is left out.
        """
        run, position = self._run_of(k)
        block = self.blocks[run]
        out: dict[str, torch.Tensor] = {}

        def put(key: str, tensor: torch.Tensor, rows: int, *, param: bool) -> None:
            # Rows [position * rows, (position + 1) * rows) of axis 0; a scalar is shared.
            if grads:
                if not param or tensor.grad is None:
                    return
                tensor = tensor.grad
            out[key] = (
                tensor if tensor.dim() == 0 else tensor[rows * position : rows * (position + 1)]
            )

        j = 0  # the module index in conv_net's nn.Sequential
        for conv, norm, c in zip(block.convs, block.norms, self.channels):
            put(f"{j}.weight", conv.weight, c, param=True)
            if self.specs[k].norm == "none":
                put(f"{j}.bias", conv.bias, c, param=True)
                j += 3  # conv, ReLU, pool
                continue
            params = dict(norm.named_parameters(recurse=False))
            for name, tensor in norm.state_dict(keep_vars=True).items():
                if tensor is not None:
                    put(f"{j + 1}.{name}", tensor, c, param=name in params)
            j += 4  # conv, norm, ReLU, pool
        j += 2 if self.head == "gap" else 1  # [global average pool,] flatten
        put(f"{j}.weight", block.classifier_weight, self.num_classes, param=True)
        put(f"{j}.bias", block.classifier_bias, self.num_classes, param=True)
        return out

    def _spec_net(self, spec: ConvNetSpec) -> nn.Sequential:
        """The :func:`conv_net` that ``spec`` describes, alone (it draws from torch's global
        random state: callers fork it)."""
        from batchnorm.lab.experiments.cnn import conv_net

        return conv_net(
            spec.norm,
            self.channels,
            self.num_classes,
            spec.seed,
            head=self.head,
            image_shape=self.image_shape,
            **spec.norm_kwargs,
        )

    def network(self, k: int) -> nn.Sequential:
        """Network k as its own :func:`conv_net` module: a copy of its parameters and buffers,
        in the model's dtype and mode (torch's global random state is left as it was)."""
        with torch.random.fork_rng(devices=[]):
            net = self._spec_net(self.specs[k])
        reference = self.blocks[0].convs[0].weight
        net = net.to(dtype=reference.dtype, device=reference.device)
        net.load_state_dict({key: t.detach().clone() for key, t in self.network_tensors(k).items()})
        return net.train(self.training)

    @torch.no_grad()
    def load_network(self, k: int, network: nn.Module) -> None:
        """Copy a :func:`conv_net` network's parameters and buffers into network k.

        Raises:
            ValueError: its state-dict keys or shapes are not those of network k.
        """
        views = self.network_tensors(k)
        state = network.state_dict()
        if set(state) != set(views):
            raise ValueError(
                f"network {k} has tensors {sorted(views)}, the given network {sorted(state)}; "
                "build it with conv_net and the same norm and channels"
            )
        for key, view in views.items():
            if view.shape != state[key].shape:
                raise ValueError(
                    f"network {k}: {key} has shape {tuple(view.shape)}, the given network's "
                    f"{tuple(state[key].shape)}"
                )
            view.copy_(state[key])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every network.

        Args:
            x: (N, C_in, H, W) shared by all networks, or (K, N, C_in, H, W).

        Returns:
            (K, N, num_classes) logits.
        """
        K, c_in = self.num_nets, self.in_channels
        if x.dim() == 4 and x.shape[1] == c_in:
            parts = [block(x) for block in self.blocks]
        elif x.dim() == 5 and x.shape[0] == K and x.shape[2] == c_in:
            parts = []
            for block, (start, stop, _) in zip(self.blocks, self.runs):
                # (n, N, C, H, W) -> (N, n * C, H, W): network k's channels at k * C + c.
                mine = x[start:stop].transpose(0, 1).reshape(x.shape[1], -1, *x.shape[3:])
                parts.append(block(mine))
        else:
            raise ValueError(
                f"GroupedConvNet expects a (N, {c_in}, H, W) batch shared by all networks or a "
                f"({K}, N, {c_in}, H, W) one per network; got {tuple(x.shape)}"
            )
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def clip_units(
        self, *, include_classifier: bool = False, include_classifier_bias: bool = False
    ) -> list[torch.Tensor]:
        """Views of the parameters, shaped so that :func:`batchnorm.optim.unitwise_norm` takes
        the norms of network k's units, each with its gradient (a view of the parameter's) as
        ``.grad``: what :func:`clip_grad_per_network_` clips.

        A conv weight's and the classifier weight's rows are units (output channels, output
        units) as they are; a vector (bias, gain), one unit per network in a single network, is
        viewed as (networks, C). ``include_classifier_bias`` adds the classifier's bias alone
        (NFNets leave only the final layer's weights unclipped).
        """
        units: list[torch.Tensor] = []

        def add(param: torch.Tensor, shape: tuple[int, ...]) -> None:
            if param.grad is None:
                return
            view = param.detach().view(shape)
            view.grad = param.grad.view(shape)
            units.append(view)

        for block in self.blocks:
            for conv, norm, c in zip(block.convs, block.norms, self.channels):
                add(conv.weight, tuple(conv.weight.shape))
                vectors = [*norm.parameters()] + ([conv.bias] if conv.bias is not None else [])
                for param in vectors:
                    add(param, (block.nets, c))
            if include_classifier:
                add(block.classifier_weight, tuple(block.classifier_weight.shape))
            if include_classifier or include_classifier_bias:
                add(block.classifier_bias, (block.nets, self.num_classes))
        return units

    def classifier_parameters(self) -> list[nn.Parameter]:
        """The final linear layers' weights and biases (AGC leaves them unclipped, as NFNets
        do)."""
        return [
            p for block in self.blocks for p in (block.classifier_weight, block.classifier_bias)
        ]


def clip_grad_per_network_(
    model: GroupedConvNet,
    clipping: float,
    eps: float = 1e-3,
    *,
    include_classifier: bool = False,
    include_classifier_bias: bool = False,
) -> None:
    """Adaptive gradient clipping (:func:`batchnorm.optim.adaptive_clip_grad_`) of every network
    of ``model`` exactly as on its own: units are network k's units (see
    :meth:`GroupedConvNet.clip_units`); the classifier (or only its weights, with
    ``include_classifier_bias``) is left out unless asked."""
    from batchnorm.optim import adaptive_clip_grad_

    units = model.clip_units(
        include_classifier=include_classifier, include_classifier_bias=include_classifier_bias
    )
    adaptive_clip_grad_(units, clipping, eps)


class GroupedAGC:
    """:class:`batchnorm.optim.AGC` for a :class:`GroupedConvNet`: every ``optimizer.step()``
    first clips the gradients per network (:func:`clip_grad_per_network_`), the classifier
    excluded as in :func:`batchnorm.lab.experiments.cnn.train_net`.

    Args:
        optimizer: the optimizer of ``model``'s parameters.
        model: the grouped network.
        clipping: ``lambda``.
        eps: lower bound on a unit's weight norm.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: GroupedConvNet,
        clipping: float = 0.01,
        eps: float = 1e-3,
    ) -> None:
        from batchnorm.optim import adaptive_clip_grad_

        adaptive_clip_grad_([], clipping, eps)  # checks clipping and eps, clips nothing
        self.model, self.clipping, self.eps = model, float(clipping), float(eps)
        self._handle = optimizer.register_step_pre_hook(self._clip)

    def _clip(self, *_: Any) -> None:
        clip_grad_per_network_(self.model, self.clipping, self.eps)

    def remove(self) -> None:
        """Detach from the optimizer: later steps are not clipped."""
        self._handle.remove()


def grouped_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, *, per_network: bool = False
) -> torch.Tensor:
    """The sum over networks of each network's mean cross-entropy (or, with ``per_network``,
    the K means).

    Args:
        logits: (K, N, classes).
        target: (N,) class indices shared by every network, or (K, N).
    """
    K, n, classes = logits.shape
    if target.dim() == 1:
        target = target.expand(K, n)
    losses = F.cross_entropy(
        logits.reshape(K * n, classes), target.reshape(K * n), reduction="none"
    )
    means = losses.view(K, n).mean(1)
    return means if per_network else means.sum()


@torch.no_grad()
def evaluate_grouped(
    model: GroupedConvNet, x: torch.Tensor, y: torch.Tensor, chunk: int = 1000
) -> tuple[list[float], list[float]]:
    """Each network's accuracy and mean cross-entropy on (x, y), in inference mode and in
    chunks (as :func:`batchnorm.lab.experiments.cnn.evaluate` for one network)."""
    if len(y) == 0:
        raise ValueError("evaluate_grouped needs at least one example")
    was_training = model.training
    model.eval()
    K = model.num_nets
    correct = torch.zeros(K, dtype=torch.int64)
    loss = torch.zeros(K, dtype=torch.float64)
    for start in range(0, len(y), chunk):
        logits = model(x[start : start + chunk])  # (K, n, classes)
        target = y[start : start + chunk]
        n = len(target)
        per_example = F.cross_entropy(
            logits.reshape(K * n, -1), target.expand(K, n).reshape(-1), reduction="none"
        )
        loss += per_example.view(K, n).double().sum(1)
        correct += (logits.argmax(2) == target).sum(1)
    model.train(was_training)
    return [int(c) / len(y) for c in correct], [float(v) / len(y) for v in loss]


def train_grouped(
    model: GroupedConvNet,
    data: ImageData,
    batches: Sequence[Iterator[np.ndarray]],
    *,
    steps: int,
    lr: float | StepDecay,
    momentum: float,
    evals: int,
    desc: str,
    agc_clipping: float | None = None,
    clipped: Sequence[bool] | None = None,
    eval_fn: Callable[[GroupedConvNet], tuple[list[float], list[float]]] | None = None,
    channels_last: bool = True,
    checkpoint: Path | None = None,
    checkpoint_seconds: float | None = None,
    clip_classifier_bias: bool = False,
) -> list[dict[str, Any]]:
    """:func:`batchnorm.lab.experiments.cnn.train_net` for the K networks of ``model`` at once:
    network k trains on the mini-batches of ``batches[k]`` and gets the result ``train_net``
    would give it alone (its entry k of the returned list, in the same format).

    One SGD optimizer steps all networks (elementwise, so each as its own would). A network
    whose loss is not finite is stopped as ``train_net`` stops it: from that step on its
    gradients are zeroed and its parameters and buffers are put back after every step (its
    numbers are confined to its own slices, so the others go on unaffected), and its
    evaluations from then on are chance.

    Args:
        model: the networks (left trained, in train mode).
        data: the training and test images.
        batches: one iterator of mini-batch indices per network, all of one batch size.
        steps, lr, momentum, evals, desc: as for ``train_net``.
        agc_clipping: adaptive gradient clipping ``lambda`` for the networks ``clipped`` marks
            (default all), per network and classifier excluded, as ``train_net`` does.
        clipped: which networks AGC clips (K booleans).
        clip_classifier_bias: AGC clips the classifier's bias too, leaving only its weights
            unclipped (as the NFNets code does); default: the whole classifier unclipped.
        eval_fn: how to evaluate (default :func:`evaluate_grouped` on the test set).
        channels_last: keep the weights, and so the activations, in channels-last (NHWC)
            memory format, faster on CPUs for these layers (docs/lab.md, "Grouped CNNs"); the
            same numbers up to float rounding order.
        checkpoint: a file to resume from if it exists, and to write the whole training state
            to (weights, optimizer, results so far, diverged networks; with its SHA-256) at
            most every ``checkpoint_seconds`` (None: the loop's default) and at the end, by
            :func:`batchnorm.lab.loop.run_loop`. A resumed group draws and
            drops the mini-batches it already trained on, so it continues exactly where it
            stopped: an interrupted group does not start again.

    Returns:
        One ``train_net`` result per network, in the order of ``model.specs``.
    """

    K = model.num_nets
    if len(batches) != K:
        raise ValueError(f"give one batch iterator per network: {K}, got {len(batches)}")
    if clipped is not None and len(clipped) != K:
        raise ValueError(f"clipped must have one entry per network ({K}), got {len(clipped)}")
    if channels_last:
        model.to(memory_format=torch.channels_last)
    rate = lr if isinstance(lr, StepDecay) else StepDecay(lr, steps, 1.0)
    job = _GroupJob(
        model,
        data,
        batches,
        torch.optim.SGD(model.parameters(), lr=rate.lr, momentum=momentum),
        eval_fn or (lambda m: evaluate_grouped(m, data.test_x, data.test_y)),
        steps=steps,
        rate=rate,
        agc_clipping=agc_clipping,
        unclipped=[] if clipped is None else [k for k in range(K) if not clipped[k]],
        clip_classifier_bias=clip_classifier_bias,
    )
    schedule = eval_steps(steps, evals)
    model.train()
    run_loop(
        job,
        steps=steps,
        eval_steps=schedule,
        desc=desc,
        checkpoint=checkpoint,
        checkpoint_seconds=checkpoint_seconds,
        signature=_spec_records(model),
    )
    for k, out in enumerate(job.outs):
        finish_result(out, schedule, data.num_classes, job.tail_correct[k], job.tail_seen[k])
    return job.outs


def finish_result(
    out: dict[str, Any],
    schedule: Sequence[int],
    num_classes: int,
    tail_correct: int,
    tail_seen: int,
) -> None:
    """Complete a CNN job's result: a network that diverged predicts nothing useful, so its
    evaluations from then on are chance accuracy (and NaN losses); ``train_acc_final`` is the
    training-batch accuracy over the last 10% of steps."""
    if out["diverged_at"] > 0:
        for step in schedule:
            if step >= out["diverged_at"]:
                out["steps"].append(step)
                out["test_acc"].append(1.0 / num_classes)
                out["test_loss"].append(math.nan)
                out["train_loss"].append(math.nan)
    out["train_acc_final"] = tail_correct / tail_seen if tail_seen else math.nan


class _GroupJob(ModelTask):
    """The K networks of :func:`train_grouped` as one :class:`batchnorm.lab.loop.Task`."""

    saved = ("outs", "running", "count", "tail_correct", "tail_seen", "frozen")

    def __init__(
        self,
        model: GroupedConvNet,
        data: ImageData,
        batches: Sequence[Iterator[np.ndarray]],
        optimizer: torch.optim.Optimizer,
        evaluate_now: Callable[[GroupedConvNet], tuple[list[float], list[float]]],
        *,
        steps: int,
        rate: StepDecay,
        agc_clipping: float | None,
        unclipped: list[int],
        clip_classifier_bias: bool,
    ) -> None:
        K = self.K = model.num_nets
        self.rate = rate
        self.model, self.data, self.batches = model, data, batches
        self.samplers = batches
        self.optimizer, self.evaluate_now = optimizer, evaluate_now
        self.agc_clipping, self.unclipped = agc_clipping, unclipped
        self.clip_classifier_bias = clip_classifier_bias
        self.outs: list[dict[str, Any]] = [
            {"steps": [], "test_acc": [], "test_loss": [], "train_loss": [], "diverged_at": -1}
            for _ in range(K)
        ]
        self.running, self.count = [0.0] * K, [0] * K
        self.tail_correct, self.tail_seen = [0] * K, [0] * K
        self.tail_from = steps - max(1, steps // 10)
        self.frozen: dict[int, dict[str, torch.Tensor]] = {}  # diverged network -> its tensors

    def train_step(self, step: int) -> bool:
        model, K, frozen = self.model, self.K, self.frozen
        step += 1  # this update's number, as diverged_at counts
        idx = torch.from_numpy(np.stack([next(b) for b in self.batches]))  # (K, N)
        targets = self.data.train_y[idx]
        logits = model(self.data.train_x[idx])  # (K, N, classes)
        losses = grouped_cross_entropy(logits, targets, per_network=True)
        values = losses.detach().tolist()
        for k in range(K):
            if k not in frozen and not math.isfinite(values[k]):
                self.outs[k]["diverged_at"] = step
                frozen[k] = {  # after this forward, as train_net leaves a diverged network
                    key: t.detach().clone()
                    for key, t in model.network_tensors(k).items()
                    if t.dim() > 0
                }
        if len(frozen) == K:
            return False
        alive = torch.tensor([k not in frozen for k in range(K)])
        self.optimizer.zero_grad(set_to_none=True)
        losses.masked_fill(~alive, 0.0).sum().backward()
        with torch.no_grad():
            for k in frozen:
                for grad in model.network_tensors(k, grads=True).values():
                    grad.zero_()
            if self.agc_clipping is not None:
                keep = [
                    {key: g.clone() for key, g in model.network_tensors(k, grads=True).items()}
                    for k in self.unclipped
                ]
                clip_grad_per_network_(
                    model, self.agc_clipping, include_classifier_bias=self.clip_classifier_bias
                )
                for k, saved in zip(self.unclipped, keep):
                    for key, grad in model.network_tensors(k, grads=True).items():
                        grad.copy_(saved[key])
        self.rate.apply(self.optimizer, step - 1)  # step counts from 1 here
        self.optimizer.step()
        with torch.no_grad():
            for k, saved in frozen.items():
                for key, tensor in model.network_tensors(k).items():
                    if key in saved:
                        tensor.copy_(saved[key])
        correct = (logits.detach().argmax(2) == targets).sum(1).tolist()
        for k in range(K):
            if k in frozen:
                continue
            self.running[k] += values[k]
            self.count[k] += 1
            if step > self.tail_from:
                self.tail_correct[k] += int(correct[k])
                self.tail_seen[k] += idx.shape[1]
        return True

    def evaluate(self, step: int) -> str:
        accs, test_losses = self.evaluate_now(self.model)
        for k in range(self.K):
            if k in self.frozen:
                continue
            out = self.outs[k]
            out["steps"].append(step)
            out["test_acc"].append(accs[k])
            out["test_loss"].append(test_losses[k])
            out["train_loss"].append(self.running[k] / max(self.count[k], 1))
            self.running[k], self.count[k] = 0.0, 0
        return f"mean test acc {sum(accs) / self.K:.3f}"


def _spec_records(model: GroupedConvNet) -> list[dict[str, Any]]:
    return [
        {
            "variant": sp.variant,
            "seed": sp.seed,
            "norm": sp.norm,
            "norm_kwargs": repr(sorted(sp.norm_kwargs.items())),
        }
        for sp in model.specs
    ]
