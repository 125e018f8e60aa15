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
- a normalization is one layer over the channels of a run of networks that use the same norm
  with the same options (usually all K): batch norm, ghost batch norm, batch renorm and instance
  norm work per channel (over the batch and/or the spatial positions), so channel ``k * C + c``
  is normalized exactly as network k's channel c; group norm with ``G`` groups per network is
  group norm with ``n * G`` groups over the ``n * C`` channels of n networks (a group is a
  contiguous block of ``C / G`` channels, which never straddles two networks); layer norm over
  (C, H, W) is group norm with one group per network. A network without normalization adds its
  convolution bias instead. Ghost batches split the batch axis, which every network shares with
  the same batch size, into the same ghost batches as a single network does;
- the classifier is one batched matrix product over K, ``logits[k] = pool(x)[k] @ W[k]^T + b[k]``
  (``torch.baddbmm``), with the weights stored as (K * classes, C);
- the loss is the sum of the K networks' mean cross-entropies
  (:func:`grouped_cross_entropy`), so each network's gradient is that of its own loss.

Every parameter and buffer has the single network's tensor of network k at rows
``[k * n_k, (k + 1) * n_k)`` of its axis 0 (axis 0 of the single tensor has n_k entries), and
nothing else of network k anywhere; so an elementwise optimizer (SGD with momentum and weight
decay) steps each network exactly as its own optimizer would. Adaptive gradient clipping, which
takes norms over units, is applied per network by :func:`clip_grad_per_network_` (each network's
bias and gain vectors are one unit each, as for a single network). Network k starts from the
weights :func:`conv_net` draws from its seed, copied in (:meth:`GroupedConvNet.load_network`), and
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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ConvNetSpec",
    "GroupedConvNet",
    "GroupedAGC",
    "clip_grad_per_network_",
    "grouped_cross_entropy",
    "evaluate_grouped",
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


class _ConvBias(nn.Module):
    """The bias of the convolutions of networks without normalization: ``x + b`` per channel."""

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias.view(1, -1, 1, 1)


class _GroupedConv2d(nn.Module):
    """K 3x3 convolutions (padding 1, no bias) of C_in -> C_out channels as one grouped one.

    Shape:
        input: (N, C_in, H, W) shared by all K networks, or (N, K * C_in, H, W).
        output: (N, K * C_out, H, W).
    """

    def __init__(self, num_nets: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.num_nets, self.in_channels = num_nets, in_channels
        self.weight = nn.Parameter(torch.empty(num_nets * out_channels, in_channels, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A shared input (C_in channels) feeds every output channel: groups = 1.
        groups = 1 if x.shape[1] == self.in_channels else self.num_nets
        return F.conv2d(x, self.weight, None, padding=1, groups=groups)


def _norm_layer(norm: str, channels: int, nets: int, kwargs: Mapping[str, Any]) -> nn.Module:
    """The normalization of ``nets`` networks of ``channels`` channels each, as one layer over
    their ``nets * channels`` channels (see the module docstring), built as :func:`conv_net`
    builds a single network's."""
    from batchnorm.nn import create_norm

    width = nets * channels
    if norm == "none":
        return _ConvBias(width)
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


class GroupedConvNet(nn.Module):
    """K networks :func:`batchnorm.lab.experiments.cnn.conv_net` builds, as one (module doc).

    Networks keep the order of ``specs``; consecutive networks with the same
    :meth:`ConvNetSpec.norm_key` share one normalization layer per conv layer (:attr:`runs`), so
    list the networks of one norm together.

    Args:
        specs: one :class:`ConvNetSpec` per network.
        channels: the widths of the conv layers, as for :func:`conv_net`.
        num_classes: outputs of each network.
        in_channels: channels of the images (1: grey).

    Attributes:
        runs: ``(start, stop, spec)`` per run of networks sharing a normalization layer.
        convs: one :class:`_GroupedConv2d` per conv layer; ``norms``: per conv layer, one
            layer per run; ``classifier_weight`` (K * classes, C), ``classifier_bias``
            (K * classes,).

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
    ) -> None:
        super().__init__()
        if not specs:
            raise ValueError("GroupedConvNet needs at least one ConvNetSpec")
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must list positive widths, got {tuple(channels)}")
        self.specs: tuple[ConvNetSpec, ...] = tuple(specs)
        self.channels = tuple(int(c) for c in channels)
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.num_nets = K = len(self.specs)
        self.runs: list[tuple[int, int, ConvNetSpec]] = []
        for k, spec in enumerate(self.specs):
            if self.runs and self.runs[-1][2].norm_key() == spec.norm_key():
                self.runs[-1] = (self.runs[-1][0], k + 1, self.runs[-1][2])
            else:
                self.runs.append((k, k + 1, spec))
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        c_in = self.in_channels
        for c in self.channels:
            self.convs.append(_GroupedConv2d(K, c_in, c))
            self.norms.append(
                nn.ModuleList(
                    _norm_layer(spec.norm, c, stop - start, spec.norm_kwargs)
                    for start, stop, spec in self.runs
                )
            )
            c_in = c
        self.classifier_weight = nn.Parameter(torch.empty(K * self.num_classes, c_in))
        self.classifier_bias = nn.Parameter(torch.empty(K * self.num_classes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Network k gets the weights :func:`conv_net` draws from its seed (torch's default
        initialization after ``torch.manual_seed(seed)``); torch's global random state is left
        as it was."""
        from batchnorm.lab.experiments.cnn import conv_net

        with torch.random.fork_rng(devices=[]):
            for k, spec in enumerate(self.specs):
                single = conv_net(
                    spec.norm, self.channels, self.num_classes, spec.seed, **spec.norm_kwargs
                )
                self.load_network(k, single)

    def _run_of(self, k: int) -> tuple[int, int]:
        """(index of network k's run, k's position in it)."""
        for r, (start, stop, _) in enumerate(self.runs):
            if start <= k < stop:
                return r, k - start
        raise IndexError(f"network {k} out of range: the model holds {self.num_nets}")

    def network_tensors(self, k: int, *, grads: bool = False) -> dict[str, torch.Tensor]:
        """Network k's parameters and buffers (or, with ``grads``, the parameters' gradients),
        as views keyed like the ``state_dict`` of its :func:`conv_net` network.

        A scalar buffer (``num_batches_tracked``) is shared by the networks of a run; with
        ``grads``, a parameter without a gradient is left out.
        """
        if not 0 <= k < self.num_nets:
            raise IndexError(f"network {k} out of range: the model holds {self.num_nets}")
        run, position = self._run_of(k)
        spec = self.specs[k]
        out: dict[str, torch.Tensor] = {}

        def put(key: str, tensor: torch.Tensor, rows: int, index: int, *, param: bool) -> None:
            # Rows [index * rows, (index + 1) * rows) of axis 0; a scalar is shared.
            if grads:
                if not param or tensor.grad is None:
                    return
                tensor = tensor.grad
            out[key] = tensor if tensor.dim() == 0 else tensor[rows * index : rows * (index + 1)]

        j = 0  # the module index in conv_net's nn.Sequential
        for conv, norms, c in zip(self.convs, self.norms, self.channels):
            put(f"{j}.weight", conv.weight, c, k, param=True)
            norm = norms[run]  # holds the networks of k's run only: k is at `position` there
            if spec.norm == "none":
                put(f"{j}.bias", norm.bias, c, position, param=True)
                j += 3  # conv, ReLU, pool
                continue
            params = dict(norm.named_parameters(recurse=False))
            for name, tensor in norm.state_dict(keep_vars=True).items():
                if tensor is not None:
                    put(f"{j + 1}.{name}", tensor, c, position, param=name in params)
            j += 4  # conv, norm, ReLU, pool
        j += 2  # global average pool, flatten
        put(f"{j}.weight", self.classifier_weight, self.num_classes, k, param=True)
        put(f"{j}.bias", self.classifier_bias, self.num_classes, k, param=True)
        return out

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
        K = self.num_nets
        if x.dim() == 5 and x.shape[0] == K and x.shape[2] == self.in_channels:
            # (K, N, C, H, W) -> (N, K * C, H, W): network k's channels at k * C + c.
            x = x.transpose(0, 1).reshape(x.shape[1], K * self.in_channels, *x.shape[3:])
        elif not (x.dim() == 4 and x.shape[1] == self.in_channels):
            raise ValueError(
                f"GroupedConvNet expects a (N, {self.in_channels}, H, W) batch shared by all "
                f"networks or a ({K}, N, {self.in_channels}, H, W) one per network; got "
                f"{tuple(x.shape)}"
            )
        for conv, norms, c in zip(self.convs, self.norms, self.channels):
            z = conv(x)  # (N, K * c, H, W)
            if len(self.runs) == 1:
                z = norms[0](z)
            else:
                z = torch.cat(
                    [
                        norm(z[:, start * c : stop * c])
                        for norm, (start, stop, _) in zip(norms, self.runs)
                    ],
                    dim=1,
                )
            x = F.max_pool2d(torch.relu(z), 2, ceil_mode=True)
        features = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (N, K * C)
        n, c = features.shape[0], self.channels[-1]
        per_net = features.view(n, K, c).transpose(0, 1)  # (K, N, C)
        weight = self.classifier_weight.view(K, self.num_classes, c).transpose(1, 2)  # (K, C, out)
        bias = self.classifier_bias.view(K, 1, self.num_classes)
        return torch.baddbmm(bias, per_net, weight)

    def clip_units(self, *, include_classifier: bool = False) -> list[torch.Tensor]:
        """Views of the parameters, shaped so that :func:`batchnorm.optim.unitwise_norm` takes
        the norms of network k's units, each with its gradient (a view of the parameter's) as
        ``.grad``: what :func:`clip_grad_per_network_` clips.

        A conv weight's and the classifier weight's rows are units (output channels, output
        units) as they are; a vector (bias, gain), one unit per network in a single network, is
        viewed as (networks, C).
        """
        units: list[torch.Tensor] = []

        def add(param: torch.Tensor, shape: tuple[int, ...]) -> None:
            if param.grad is None:
                return
            view = param.detach().view(shape)
            view.grad = param.grad.view(shape)
            units.append(view)

        for conv, norms, c in zip(self.convs, self.norms, self.channels):
            add(conv.weight, tuple(conv.weight.shape))
            for norm, (start, stop, _) in zip(norms, self.runs):
                for param in norm.parameters():
                    add(param, (stop - start, c))
        if include_classifier:
            add(self.classifier_weight, tuple(self.classifier_weight.shape))
            add(self.classifier_bias, (self.num_nets, self.num_classes))
        return units

    def classifier_parameters(self) -> list[nn.Parameter]:
        """The final linear layer's weight and bias (AGC leaves them unclipped, as NFNets do)."""
        return [self.classifier_weight, self.classifier_bias]


def clip_grad_per_network_(
    model: GroupedConvNet,
    clipping: float,
    eps: float = 1e-3,
    *,
    include_classifier: bool = False,
) -> None:
    """Adaptive gradient clipping (:func:`batchnorm.optim.adaptive_clip_grad_`) of every network
    of ``model`` exactly as on its own: units are network k's units (see
    :meth:`GroupedConvNet.clip_units`); the classifier is left out unless asked."""
    from batchnorm.optim import adaptive_clip_grad_

    adaptive_clip_grad_(model.clip_units(include_classifier=include_classifier), clipping, eps)


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
