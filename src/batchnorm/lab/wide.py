"""Many small MLPs trained at once, as one wide network.

The lab's experiments train many copies of a small fully-connected network: with and without
batch norm, several seeds, several learning rates or initial scales. A 100-unit MLP at batch 60 is
far too small to keep a CPU busy, so training the copies one after another would spend most of
its time in per-step Python and module overhead. :class:`WideMLP` holds G such networks (the same
layer widths, each with its own weights, data order, learning rate, nonlinearity, dropout rate and
choice of batch norm) and runs them all in each step:

- a linear layer is one batched matrix product, ``h[g] = a[g] @ W[g]`` for every network g, with
  the weights stored as a (G, fan_in, fan_out) tensor (``torch.bmm``);
- batch norm of the Gb networks that use it is ONE :class:`batchnorm.nn.BatchNorm1d` over the
  (B, Gb * F) view of their pre-activations. Batch norm normalizes every feature (column)
  separately over the batch, and column (g, f) holds network g's unit f over network g's own
  mini-batch, so this is exactly per-network, per-unit batch norm (Algorithm 1), with one
  (gamma, beta) pair per unit of every network;
- the loss is the sum of the networks' mean cross-entropies, so each network's gradient is that
  of its own loss (no parameter is shared, and the networks never see each other's data).

So the G networks train exactly as G separate runs would, up to float rounding order.

Layer by layer, for a network g with batch norm (``z = g(BN(Wu))``, the bias of Wu dropped
because beta subsumes it, Sec. 3.2 of the paper) and without (``z = g(Wu + b)``)::

    x_hat = (W u - mu_B) / sqrt(var_B + eps);   y = gamma * x_hat + beta;   z = act(y)
    z = act(W u + b)

then dropout on z if the network uses it, and a final linear layer ``logits = W z + b``.

Example:
    >>> import torch
    >>> specs = [NetSpec("bn", seed=0, batch_norm=True), NetSpec("plain", seed=0)]
    >>> model = WideMLP(specs, in_features=8, hidden=(5, 5), num_classes=3)
    >>> model(torch.randn(4, 8)).shape  # (G, B, classes); a (B, D) input is shared by all nets
    torch.Size([2, 4, 3])
    >>> bool((model.weights[0][0] == model.weights[0][1]).all())  # same seed, same initial W
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ACTIVATIONS", "BN_IMPLEMENTATIONS", "NetSpec", "WideMLP", "init_generator"]

ACTIVATIONS: tuple[str, ...] = ("sigmoid", "tanh", "relu")
BN_IMPLEMENTATIONS: tuple[str, ...] = ("batchnorm", "torch")

_ACTIVATION_FUNCTIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu}


@dataclass(frozen=True)
class NetSpec:
    """One network of a wide ensemble.

    Attributes:
        variant: the name of the variant it belongs to (e.g. "bn", "plain"); networks that differ
            only in ``seed`` form one variant, whose results are averaged over seeds.
        seed: fixes the initial weights and the order of the training examples. Networks with
            the same seed start from the same weights (where their shapes agree) and see the same
            mini-batches, so variants are compared on paired runs.
        batch_norm: BN before every hidden nonlinearity (and no bias in those layers).
        activation: "sigmoid", "tanh" or "relu".
        init_scale: weights start as N(0, init_scale^2 / fan_in) (LeCun normal times a scale).
        lr: this network's SGD learning rate.
        dropout: probability of zeroing a hidden unit's output in training (0 = no dropout).
    """

    variant: str
    seed: int
    batch_norm: bool = False
    activation: str = "sigmoid"
    init_scale: float = 1.0
    lr: float = 0.1
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation {self.activation!r} is not one of {', '.join(ACTIVATIONS)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if not (self.init_scale > 0 and math.isfinite(self.init_scale)):
            raise ValueError(f"init_scale must be a positive number, got {self.init_scale}")
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a number >= 0, got {self.lr}")


def init_generator(seed: int, stream: int = 0) -> torch.Generator:
    """A torch generator for one seed's stream (0: initial weights, 2: dropout masks)."""
    generator = torch.Generator()
    generator.manual_seed(int(seed) * 1_000_003 + int(stream) * 7919 + 12345)
    return generator


def _make_batch_norm(impl: str, num_features: int, eps: float, momentum: float) -> nn.Module:
    if impl == "batchnorm":
        from batchnorm.nn import BatchNorm1d

        return BatchNorm1d(num_features, eps=eps, momentum=momentum)
    if impl == "torch":
        return nn.BatchNorm1d(num_features, eps=eps, momentum=momentum)
    raise ValueError(f"bn_impl {impl!r} is not one of {', '.join(BN_IMPLEMENTATIONS)}")


class WideMLP(nn.Module):
    """G fully-connected networks of the same widths, trained together (see the module doc).

    The networks are kept in an internal order (batch-norm networks first, then grouped by
    nonlinearity) so that each kind is a contiguous slice; :attr:`specs` lists them in that
    order, and every per-network output (axis 0 of the logits) follows it.

    Args:
        specs: one :class:`NetSpec` per network.
        in_features: D, the input size.
        hidden: the widths of the hidden layers, e.g. (100, 100, 100).
        num_classes: C, the number of outputs.
        bn_impl: "batchnorm" (the project's :class:`batchnorm.nn.BatchNorm1d`) or "torch"
            (``torch.nn.BatchNorm1d``, to cross-check).
        eps: batch norm's epsilon.
        bn_momentum: weight of the new batch in the running averages (PyTorch's convention).

    Shape:
        input: (B, D), shared by every network, or (G, B, D), one batch per network.
        output: (G, B, C) logits.
    """

    def __init__(
        self,
        specs: Sequence[NetSpec],
        in_features: int,
        hidden: Sequence[int],
        num_classes: int,
        *,
        bn_impl: str = "batchnorm",
        eps: float = 1e-5,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        if not specs:
            raise ValueError("WideMLP needs at least one NetSpec")
        if not hidden or any(int(w) < 1 for w in hidden):
            raise ValueError(f"hidden must list at least one positive width, got {tuple(hidden)}")
        if bn_impl not in BN_IMPLEMENTATIONS:
            raise ValueError(f"bn_impl {bn_impl!r} is not one of {', '.join(BN_IMPLEMENTATIONS)}")
        order = sorted(
            range(len(specs)),
            key=lambda i: (not specs[i].batch_norm, ACTIVATIONS.index(specs[i].activation), i),
        )
        self.specs: tuple[NetSpec, ...] = tuple(specs[i] for i in order)
        self.in_features = int(in_features)
        self.hidden = tuple(int(w) for w in hidden)
        self.num_classes = int(num_classes)
        self.bn_impl = bn_impl
        self.num_nets = len(self.specs)
        self.num_bn = sum(1 for s in self.specs if s.batch_norm)
        # Contiguous runs of one nonlinearity: (start, stop, name).
        self.activation_runs: list[tuple[int, int, str]] = []
        for g, spec in enumerate(self.specs):
            if self.activation_runs and self.activation_runs[-1][2] == spec.activation:
                start, _, name = self.activation_runs[-1]
                self.activation_runs[-1] = (start, g + 1, name)
            else:
                self.activation_runs.append((g, g + 1, spec.activation))
        keep = torch.tensor([1.0 - s.dropout for s in self.specs], dtype=torch.float32)
        self.register_buffer("keep_prob", keep.view(-1, 1, 1), persistent=False)
        self.uses_dropout = bool((keep < 1).any())
        # Dropout masks from a generator of the networks' own (not torch's global one), so that
        # a run is reproducible from its seeds; its state goes into training checkpoints.
        self.dropout_generator = init_generator(
            sum((i + 1) * 7_919 * s.seed for i, s in enumerate(self.specs)), stream=2
        )

        widths = (self.in_features, *self.hidden, self.num_classes)
        G, Gb = self.num_nets, self.num_bn
        self.weights = nn.ParameterList()
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            self.weights.append(nn.Parameter(torch.empty(G, fan_in, fan_out)))
        # Hidden biases only for the networks without batch norm; the output bias for all.
        self.hidden_biases = nn.ParameterList(
            nn.Parameter(torch.zeros(G - Gb, 1, width)) for width in self.hidden
        )
        self.output_bias = nn.Parameter(torch.zeros(G, 1, self.num_classes))
        self.norms = (
            nn.ModuleList(
                _make_batch_norm(bn_impl, Gb * width, eps, bn_momentum) for width in self.hidden
            )
            if Gb
            else nn.ModuleList()
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """W ~ N(0, init_scale^2 / fan_in) per network from its seed; biases 0; gamma 1, beta 0.

        The draws depend only on the seed and the layer shapes, so networks that share a seed
        start from the same weights whatever their batch norm, nonlinearity or learning rate.
        """
        with torch.no_grad():
            for g, spec in enumerate(self.specs):
                generator = init_generator(spec.seed)
                for weight in self.weights:
                    fan_in, fan_out = weight.shape[1:]
                    w = torch.randn(fan_in, fan_out, generator=generator)
                    weight[g].copy_(w * (spec.init_scale / math.sqrt(fan_in)))
            for bias in (*self.hidden_biases, self.output_bias):
                bias.zero_()
            for norm in self.norms:
                norm.reset_parameters()

    def learning_rates(
        self, lr: torch.Tensor | None = None
    ) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """Each parameter with the learning rate of every entry, shaped to broadcast against it.

        Args:
            lr: (G,) learning rate per network; default: each spec's ``lr``.
        """
        if lr is None:
            lr = torch.tensor([s.lr for s in self.specs], dtype=torch.float32)
        Gb = self.num_bn
        pairs: list[tuple[nn.Parameter, torch.Tensor]] = []
        for weight in self.weights:
            pairs.append((weight, lr.view(-1, 1, 1)))
        for bias in self.hidden_biases:
            pairs.append((bias, lr[Gb:].view(-1, 1, 1)))
        pairs.append((self.output_bias, lr.view(-1, 1, 1)))
        for norm, width in zip(self.norms, self.hidden):
            per_unit = lr[:Gb].repeat_interleave(width)  # (Gb * width,), network-major
            pairs.append((norm.weight, per_unit))
            pairs.append((norm.bias, per_unit))
        return pairs

    def net_parameters(self, g: int) -> list[torch.Tensor]:
        """Views of every parameter entry that belongs to network ``g`` (for resetting it)."""
        views: list[torch.Tensor] = [w[g] for w in self.weights] + [self.output_bias[g]]
        Gb = self.num_bn
        if g < Gb:
            for norm, width in zip(self.norms, self.hidden):
                views += [norm.weight[g * width : (g + 1) * width]]
                views += [norm.bias[g * width : (g + 1) * width]]
        else:
            views += [b[g - Gb] for b in self.hidden_biases]
        return views

    def forward(
        self,
        x: torch.Tensor,
        capture: list[torch.Tensor] | None = None,
        capture_layers: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits of every network.

        Args:
            x: (B, D) shared by all networks, or (G, B, D).
            capture: if given, the input of the last hidden layer's nonlinearity, (G, B, F), is
                appended to it (for batch-norm networks: BN's output y).
            capture_layers: if given, the input of every hidden layer's nonlinearity, (G, B, F)
                each, is appended to it, first layer first (for per-layer saturation).

        Returns:
            (G, B, C) logits.
        """
        G = self.num_nets
        if x.dim() == 2:
            B, D = x.shape
            # One (B, D) @ (D, G*F) product instead of G copies of the input.
            w = self.weights[0].permute(1, 0, 2).reshape(D, -1)  # (D, G*F)
            h = (x @ w).view(B, G, -1).transpose(0, 1)  # (G, B, F)
        elif x.dim() == 3 and x.shape[0] == G:
            h = torch.bmm(x, self.weights[0])  # (G, B, F)
        else:
            raise ValueError(
                f"WideMLP expects a (B, {self.in_features}) input shared by all nets or a "
                f"({G}, B, {self.in_features}) input, one batch per net; got {tuple(x.shape)}"
            )
        last = len(self.hidden) - 1
        for layer in range(len(self.hidden)):
            z = self._pre_activation(layer, h)
            if capture is not None and layer == last:
                capture.append(z.detach())
            if capture_layers is not None:
                capture_layers.append(z.detach())
            a = self._activate(z)
            if self.uses_dropout and self.training:
                draws = torch.rand(a.shape, generator=self.dropout_generator, dtype=a.dtype)
                mask = draws.to(a.device) < self.keep_prob
                a = a * mask / self.keep_prob
            h = torch.bmm(a, self.weights[layer + 1])
        return h + self.output_bias

    def _pre_activation(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """BN(Wu) for the batch-norm networks, Wu + b for the others; (G, B, F)."""
        Gb, G = self.num_bn, self.num_nets
        parts = []
        if Gb:
            hb = h[:Gb]
            _, B, F = hb.shape
            flat = hb.transpose(0, 1).reshape(B, Gb * F)  # (B, Gb*F): column g*F + f
            parts.append(self.norms[layer](flat).view(B, Gb, F).transpose(0, 1))
        if Gb < G:
            parts.append(h[Gb:] + self.hidden_biases[layer])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def _activate(self, z: torch.Tensor) -> torch.Tensor:
        if len(self.activation_runs) == 1:
            return _ACTIVATION_FUNCTIONS[self.activation_runs[0][2]](z)
        return torch.cat(
            [
                _ACTIVATION_FUNCTIONS[name](z[start:stop])
                for start, stop, name in self.activation_runs
            ],
            dim=0,
        )
