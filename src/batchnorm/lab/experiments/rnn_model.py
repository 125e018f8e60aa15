"""The LSTMs of the ``rnn`` experiment: several networks trained at once, with their norms.

One :class:`GroupedLSTM` holds ``G`` independent one-layer LSTM classifiers (one per seed) of
the same kind, their weights stacked along a leading group axis, so that one batched matrix
product per time step runs them all. Every operation acts on each group alone (the losses are
summed over groups and the optimizer is element-wise), so a group trains exactly as it would by
itself.

The cell is Cooijmans et al. (2016, arXiv 1603.09025), Eqs. 6-8, with ``N`` a normalization::

    (f, i, o, g) = N_h(W_h h_{t-1}) + N_x(W_x x_t) + b
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
    h_t = sigmoid(o) * tanh(N_c(c_t))

The input and recurrent terms are normalized separately, with gains and no shifts (``b`` takes
that role); the cell state is normalized (gain and shift) only where it enters the output, so
the cell recurrence keeps its gradient path (Cooijmans Sec. 3). ``norm`` chooses ``N``:

- ``"none"``: identity (a plain LSTM);
- ``"bn"``: batch norm (:func:`batchnorm.functional.batch_norm`), per feature over the
  mini-batch, in training mode with the batch statistics of each time step; in inference mode
  with population statistics given by the caller (:class:`PopulationStats`), either one set per
  time step (steps beyond the last one that has statistics reuse it, Cooijmans Sec. 3) or one
  set shared by every time step;
- ``"ln"``: layer norm (:func:`batchnorm.functional.layer_norm`), per example over the features
  of each term (Ba et al. 2016, arXiv 1607.06450, Sec. 3.1), the same in training and inference.

Shapes: ``G`` groups, ``B`` examples, ``T`` time steps, ``D`` inputs per step, ``H`` hidden
units, ``F = 4H`` gate pre-activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from batchnorm.functional import batch_norm, layer_norm

__all__ = ["NORMS", "TERMS", "GroupedLSTM", "PopulationStats", "StepRecorder"]

NORMS = ("none", "bn", "ln")
# The three normalized quantities: input term W_x x_t, recurrent term W_h h_{t-1}, cell c_t.
TERMS = ("x", "h", "c")


@dataclass
class PopulationStats:
    """Batch-norm statistics for inference, per term: ``mean`` and ``var`` of shape (S, G, K)
    (S = 1 when shared by every time step, else one per training time step; K the term's
    features). Time steps past S use the last row (Cooijmans Sec. 3)."""

    mean: dict[str, torch.Tensor]
    var: dict[str, torch.Tensor]

    def at(self, term: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance for time steps 0 ... steps-1, each (steps, G, K)."""
        mean, var = self.mean[term], self.var[term]
        index = torch.clamp(torch.arange(steps), max=mean.shape[0] - 1)
        return mean[index], var[index]


class StepRecorder:
    """Collects, for each term and time step, the mini-batch mean and biased variance of the
    pre-normalization values (each (G, K)) over the forward passes it sees; a step counts the
    batches that reached it (sequences of different lengths reach different steps)."""

    def __init__(self) -> None:
        self.sums: dict[str, list[list[torch.Tensor]]] = {t: [] for t in TERMS}
        self.counts: dict[str, list[int]] = {t: [] for t in TERMS}

    def add(self, term: str, step: int, values: torch.Tensor) -> None:
        """``values`` (G, B, K) at ``step``."""
        var, mean = torch.var_mean(values.detach(), dim=1, unbiased=False)
        rows, counts = self.sums[term], self.counts[term]
        while len(rows) <= step:
            rows.append([torch.zeros_like(mean), torch.zeros_like(var)])
            counts.append(0)
        rows[step][0] += mean
        rows[step][1] += var
        counts[step] += 1

    def per_step(self, batch_size: int) -> PopulationStats:
        """Algorithm 2 of Ioffe & Szegedy (2015) at every time step: the mean of the batch means,
        and the mean of the batch variances times m / (m - 1)."""
        means, variances = {}, {}
        correction = batch_size / (batch_size - 1)
        for term, rows in self.sums.items():
            counts = self.counts[term]
            means[term] = torch.stack([r[0] / n for r, n in zip(rows, counts)])
            variances[term] = torch.stack([r[1] / n * correction for r, n in zip(rows, counts)])
        return PopulationStats(means, variances)

    def shared(self, batch_size: int) -> PopulationStats:
        """One set of statistics for all time steps: the mean and variance of the values pooled
        over the examples and the time steps (the within-step variance plus the variance of the
        step means)."""
        per_step = self.per_step(batch_size)
        means, variances = {}, {}
        for term in TERMS:
            step_mean, step_var = per_step.mean[term], per_step.var[term]  # (T, G, K)
            pooled = step_mean.mean(0, keepdim=True)
            spread = ((step_mean - pooled) ** 2).mean(0, keepdim=True)
            means[term] = pooled
            variances[term] = step_var.mean(0, keepdim=True) + spread
        return PopulationStats(means, variances)


def _seeded_uniform(shape: tuple[int, ...], bound: float, generator: torch.Generator):
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


class GroupedLSTM(nn.Module):
    """``len(seeds)`` LSTM classifiers (one per seed), normalized by ``norm``.

    Initialization per seed (so the networks of one seed start from the same weights whatever
    their norm): every weight and bias uniform in +-1/sqrt(H) (PyTorch's ``nn.LSTM`` default),
    the forget gate's bias 1 more; the norms' gains ``gain_init`` and shifts 0.

    Args:
        seeds: one network per seed.
        input_size: D, the values read per time step.
        hidden: H.
        classes: outputs of the linear classifier on the last hidden state.
        norm: ``"none"``, ``"bn"`` or ``"ln"``.
        gain_init: the gains' initial value (Cooijmans Sec. 4: 0.1).
        eps: the norms' epsilon.
        backend: batch norm's implementation (see :mod:`batchnorm.backends`).
    """

    def __init__(
        self,
        seeds: list[int],
        input_size: int,
        hidden: int,
        classes: int,
        norm: str,
        gain_init: float = 0.1,
        eps: float = 1e-5,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.norm, self.hidden, self.eps, self.backend = norm, hidden, eps, backend
        groups, features = len(seeds), 4 * hidden
        bound = 1.0 / math.sqrt(hidden)
        w_x, w_h, b, w_o, b_o = [], [], [], [], []
        for seed in seeds:
            gen = torch.Generator().manual_seed(int(seed))
            w_x.append(_seeded_uniform((input_size, features), bound, gen))
            w_h.append(_seeded_uniform((hidden, features), bound, gen))
            bias = _seeded_uniform((features,), bound, gen)
            bias[hidden : 2 * hidden] += 1.0  # gate order (i, f, o, g): the forget gate
            b.append(bias)
            w_o.append(_seeded_uniform((hidden, classes), bound, gen))
            b_o.append(_seeded_uniform((classes,), bound, gen))
        self.w_x = nn.Parameter(torch.stack(w_x))  # (G, D, F)
        self.w_h = nn.Parameter(torch.stack(w_h))  # (G, H, F)
        self.b = nn.Parameter(torch.stack(b).unsqueeze(1))  # (G, 1, F)
        self.w_o = nn.Parameter(torch.stack(w_o))  # (G, H, C)
        self.b_o = nn.Parameter(torch.stack(b_o).unsqueeze(1))  # (G, 1, C)
        if norm != "none":
            self.gain_x = nn.Parameter(torch.full((groups, features), gain_init))
            self.gain_h = nn.Parameter(torch.full((groups, features), gain_init))
            self.gain_c = nn.Parameter(torch.full((groups, hidden), gain_init))
            self.shift_c = nn.Parameter(torch.zeros(groups, hidden))

    @property
    def groups(self) -> int:
        return self.w_x.shape[0]

    def _bn(
        self,
        values: torch.Tensor,
        gain: torch.Tensor,
        shift: torch.Tensor | None,
        stats: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """Batch norm of ``values`` (G, B, *K) per (group, feature) over the batch: with the
        batch statistics when ``stats`` is None, else with ``stats`` (mean, var), each (G, *K)."""
        groups, batch = values.shape[:2]
        features = values.shape[2:]
        flat = values.transpose(0, 1).reshape(batch, -1)  # (B, G * prod(K)): one channel each
        weight = gain.reshape(groups, *([1] * (len(features) - 1)), features[-1]).expand(
            groups, *features
        )
        bias = None
        if shift is not None:
            bias = shift.reshape(weight.shape[0], *([1] * (len(features) - 1)), features[-1])
            bias = bias.expand(groups, *features).reshape(-1)
        if stats is None:
            out = batch_norm(
                flat,
                None,
                None,
                weight.reshape(-1),
                bias,
                True,
                0.0,
                self.eps,
                backend=self.backend,
            )
        else:
            mean, var = (s.reshape(-1) for s in stats)
            out = batch_norm(
                flat,
                mean,
                var,
                weight.reshape(-1),
                bias,
                False,
                0.0,
                self.eps,
                backend=self.backend,
            )
        return out.reshape(batch, groups, *features).transpose(0, 1)

    def _ln(self, values: torch.Tensor, gain: torch.Tensor, shift: torch.Tensor | None):
        """Layer norm of ``values`` (G, B, K) per example over its K features."""
        out = layer_norm(values, (values.shape[-1],), eps=self.eps) * gain.unsqueeze(1)
        return out if shift is None else out + shift.unsqueeze(1)

    def forward(
        self,
        x: torch.Tensor,
        stats: PopulationStats | None = None,
        recorder: StepRecorder | None = None,
        h0_noise: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Logits (G, B, C) for the sequences ``x`` (G, B, T, D), read one step at a time.

        Args:
            stats: batch norm's inference statistics; None = the mini-batch's statistics at each
                step (training mode). Ignored unless ``norm == "bn"``.
            recorder: receives each term's pre-normalization values at each step.
            h0_noise: standard deviation of Gaussian noise in the initial hidden state (0: h_0
                = 0). Cooijmans et al. (Sec. 5.1) add it for batch norm: where every sequence
                starts alike (blank rows) the recurrent term's batch variance is otherwise
                exactly zero, and dividing by it makes gradients explode.
            generator: the noise's random generator.
        """
        groups, batch, steps, _ = x.shape
        hidden = self.hidden
        # Input terms of every step at once: (G, B*T, D) @ (G, D, F) -> (G, B, T, F).
        x_term = torch.bmm(x.reshape(groups, batch * steps, -1), self.w_x)
        x_term = x_term.reshape(groups, batch, steps, -1)
        if recorder is not None:
            for t in range(steps):
                recorder.add("x", t, x_term[:, :, t])
        step_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if self.norm == "bn":
            if stats is not None:
                step_stats = {term: stats.at(term, steps) for term in TERMS}
                # (T, G, F) -> (G, T, F): one channel per (group, step, feature)
                mean, var = (s.transpose(0, 1) for s in step_stats["x"])
                x_term = self._bn(x_term, self.gain_x, None, (mean, var))
            else:
                # per-step statistics: each (group, step, feature) is its own channel
                x_term = self._bn(x_term, self.gain_x, None, None)
        elif self.norm == "ln":
            x_term = self._ln(x_term.reshape(groups, batch * steps, -1), self.gain_x, None)
            x_term = x_term.reshape(groups, batch, steps, -1)

        # One tensor per step (unbind's backward stacks once; indexing per step would build a
        # full-size gradient for every step).
        x_steps = x_term.unbind(2)
        h = x.new_zeros(groups, batch, hidden)
        if h0_noise > 0:
            h = torch.randn(h.shape, generator=generator) * h0_noise
        c = x.new_zeros(groups, batch, hidden)
        for t in range(steps):
            h_term = torch.bmm(h, self.w_h)  # (G, B, F)
            if recorder is not None:
                recorder.add("h", t, h_term)
            if self.norm == "bn":
                h_stats = None if stats is None else tuple(s[t] for s in step_stats["h"])
                h_term = self._bn(h_term, self.gain_h, None, h_stats)
            elif self.norm == "ln":
                h_term = self._ln(h_term, self.gain_h, None)
            gates = x_steps[t] + h_term + self.b
            i, f, o, g = gates.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            if recorder is not None:
                recorder.add("c", t, c)
            if self.norm == "bn":
                c_stats = None if stats is None else tuple(s[t] for s in step_stats["c"])
                c_out = self._bn(c, self.gain_c, self.shift_c, c_stats)
            elif self.norm == "ln":
                c_out = self._ln(c, self.gain_c, self.shift_c)
            else:
                c_out = c
            h = torch.sigmoid(o) * torch.tanh(c_out)
        return torch.bmm(h, self.w_o) + self.b_o

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale each network's gradient so that its norm (over all its parameters) is at most
        ``max_norm``, as clipping each network alone would; returns the norms before, (G,)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        squares = sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads)
        norms = torch.as_tensor(squares).sqrt()
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.reshape(-1, *([1] * (g.dim() - 1))))
        return norms

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The sum over groups of each group's mean cross-entropy (so each group's gradient is
        its own); ``logits`` (G, B, C), ``y`` (G, B)."""
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)) * (self.groups)
