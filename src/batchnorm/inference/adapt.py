"""Test-time adaptation through batch norm: AdaBN and TENT.

A network trained on one distribution and tested on a shifted one (noise, blur, another camera)
sees inputs whose statistics no longer match its moving averages. Two remedies act on the
batch-norm layers only:

- **AdaBN** (Li, Wang, Shi, Liu, Hou 2016, arXiv 1603.04779): re-estimate every layer's population
  statistics on the target data. That is :func:`batchnorm.inference.recalibrate` (Algorithm 2,
  count-weighted) run on target batches instead of training batches, under another name.
- **TENT** (Wang, Shelhamer, Liu, Olshausen, Darrell 2021, "Tent: Fully Test-Time Adaptation by
  Entropy Minimization", ICLR, arXiv 2006.10726): normalize each test batch with its own
  statistics, and take a gradient step on the batch-norm affine parameters ``gamma``, ``beta``
  (nothing else) that lowers the mean prediction entropy of the batch::

      H(y_hat) = - sum_c p(y_hat_c) log p(y_hat_c),      loss = mean over the batch of H

  online, one step per test batch, predictions made before the step (as the paper's code does).
  The paper uses Adam with lr 1e-3 (CIFAR-10/100-C, batch 128) and SGD with momentum 0.9, lr
  0.00025 (ImageNet-C, batch 64).

Both keep what they need to undo themselves: ``reset()`` puts the model back exactly as it was
(parameters, buffers, train/eval flags, ``requires_grad``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.inference.intake import check_model, set_mode
from batchnorm.inference.recalibration import RecalibrationReport, recalibrate

__all__ = ["AdaBN", "Tent", "adabn", "softmax_entropy", "tent"]


class _Snapshot:
    """Everything :meth:`reset` puts back: state_dict, train/eval flags, requires_grad."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.state = copy.deepcopy(model.state_dict())
        self.training = [(m, m.training) for m in model.modules()]
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self.flags = [
            (m, m.track_running_stats) for m in model.modules() if isinstance(m, _BatchNorm)
        ]

    def restore(self) -> None:
        self.model.load_state_dict(self.state)
        for module, training in self.training:
            module.training = training
        for param, requires_grad in self.requires_grad:
            param.requires_grad_(requires_grad)
        for module, track in self.flags:
            module.track_running_stats = track


class AdaBN:
    """AdaBN: the population statistics of every batch-norm layer re-estimated on target data.

    Exactly :func:`batchnorm.inference.recalibrate` on the target batches (count-weighted,
    Algorithm 2), with :meth:`reset` to go back to the source statistics.

    Args:
        model: the network, adapted in place.

    Example:
        >>> import torch
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> adapter = AdaBN(bn)
        >>> _ = adapter.adapt([torch.ones(4, 2) * 3, torch.ones(2, 2) * 6], progress=False)
        >>> bn.running_mean  # (4 * 3 + 2 * 6) / 6
        tensor([4., 4.])
        >>> adapter.reset(); bn.running_mean
        tensor([0., 0.])
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model = check_model(model, "AdaBN")
        self._snapshot = _Snapshot(model)
        self.report: RecalibrationReport | None = None

    def adapt(self, batches: Iterable[Any], **recalibrate_kwargs: Any) -> RecalibrationReport:
        """Re-estimate the statistics on ``batches`` (keyword arguments as ``recalibrate``)."""
        self.report = recalibrate(self.model, batches, **recalibrate_kwargs)
        return self.report

    def reset(self) -> None:
        """The model as it was before :meth:`adapt`."""
        self._snapshot.restore()
        self.report = None


def adabn(model: nn.Module, batches: Iterable[Any], **recalibrate_kwargs: Any) -> AdaBN:
    """AdaBN in one call: adapt ``model`` in place to ``batches``; returns the :class:`AdaBN`
    (``.report`` says how far the statistics moved, ``.reset()`` undoes it)."""
    adapter = AdaBN(model)
    adapter.adapt(batches, **recalibrate_kwargs)
    return adapter


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``H = -sum_c softmax(z)_c log softmax(z)_c`` per sample of (N, classes, *) logits."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


class Tent:
    """TENT: online entropy minimisation over the batch-norm affine parameters.

    Calling it on a test batch ``x``:

    1. runs the model with every batch-norm layer in train mode (statistics of ``x``; the moving
       averages are left unchanged) and everything else in eval mode (no dropout);
    2. computes ``loss = mean_n H(softmax(output_n))`` and takes one optimizer step on the
       ``gamma``, ``beta`` of the batch-norm layers (all other parameters frozen);
    3. returns the outputs of step 1 (the predictions for ``x``, made before its update).

    With ``steps > 1`` steps 1-2 repeat on the same batch and the last forward's outputs are
    returned. :meth:`reset` restores the model (and the optimizer) as they were.

    Args:
        model: the network, adapted in place. Its forward must return (N, classes, ...) logits.
        optimizer: ``"adam"`` (the paper's CIFAR setting, betas (0.9, 0.999)) or ``"sgd"``
            (momentum 0.9, the paper's ImageNet setting).
        lr: learning rate (1e-3, the paper's Adam value; use 0.00025 with SGD as the paper).
        steps: optimizer steps per test batch (1 in the paper).

    Raises:
        ValueError: no batch-norm layer with affine parameters that trains, or a bad option.
    """

    def __init__(
        self, model: nn.Module, *, optimizer: str = "adam", lr: float = 1e-3, steps: int = 1
    ) -> None:
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"tent: optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
            raise ValueError(f"tent: steps must be a positive int, got {steps!r}")
        if not lr > 0:
            raise ValueError(f"tent: lr must be > 0, got {lr!r}")
        self.model = model = check_model(model, "tent")
        self.steps = steps
        self._snapshot = _Snapshot(model)
        self.layers = [
            m
            for m in model.modules()
            if isinstance(m, _BatchNorm) and m.weight is not None and _trains(m)
        ]
        self.params = [p for m in self.layers for p in (m.weight, m.bias) if p is not None]
        if not self.params:
            raise ValueError(
                "tent: the model has no batch-norm layer with affine parameters that trains "
                "(TENT adapts gamma and beta of batch norm only)"
            )
        self._make_optimizer = (
            (lambda: torch.optim.Adam(self.params, lr=lr, betas=(0.9, 0.999)))
            if optimizer == "adam"
            else (lambda: torch.optim.SGD(self.params, lr=lr, momentum=0.9))
        )
        self.optimizer = self._make_optimizer()
        self.losses: list[float] = []
        self.outputs: list[torch.Tensor] = []

    def _configure(self) -> None:
        set_mode(self.model, False)
        self.model.requires_grad_(False)
        for layer in self.layers:
            layer.train()
        for param in self.params:
            param.requires_grad_(True)

    def _forward(self, x: Any) -> torch.Tensor:
        # The layers update copies of their running buffers; the buffers stay as they are.
        saved = [
            (layer, key, layer._buffers[key])
            for layer in self.layers
            for key in ("running_mean", "running_var", "num_batches_tracked")
            if layer._buffers.get(key) is not None
        ]
        for layer, key, buffer in saved:
            layer._buffers[key] = buffer.detach().clone()
        try:
            return self.model(x)
        finally:
            for layer, key, buffer in saved:
                layer._buffers[key] = buffer

    def __call__(self, x: Any) -> torch.Tensor:
        """Adapt on one test batch; returns its outputs (made before this batch's update)."""
        self._configure()
        try:
            for _ in range(self.steps):
                with torch.enable_grad():
                    outputs = self._forward(x)
                    loss = softmax_entropy(outputs).mean()
                    loss.backward()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.losses.append(float(loss.detach()))
        finally:
            self._unconfigure()
        return outputs.detach()

    def _unconfigure(self) -> None:
        for module, training in self._snapshot.training:
            module.training = training
        for param, requires_grad in self._snapshot.requires_grad:
            param.requires_grad_(requires_grad)

    def adapt(self, batches: Iterable[Any]) -> list[torch.Tensor]:
        """Adapt online over a stream of batches (tensors or ``(input, ...)`` tuples); returns
        the outputs of each."""
        outputs = []
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            outputs.append(self(x))
        return outputs

    def reset(self) -> None:
        """The model and the optimizer as they were before adaptation."""
        self._snapshot.restore()
        self.optimizer = self._make_optimizer()
        self.losses = []
        self.outputs = []


def _trains(module: nn.Module) -> bool:
    """Whether ``module.train()`` puts the layer in train mode (not a frozen layer)."""
    before = module.training
    module.train()
    trains = module.training
    module.training = before
    return trains


def tent(model: nn.Module, batches: Iterable[Any], **options: Any) -> Tent:
    """TENT in one call: adapt ``model`` online over ``batches``; returns the :class:`Tent`,
    whose ``.outputs`` hold the predictions for each batch (``.reset()`` undoes it).

    Keyword arguments as :class:`Tent` (``optimizer``, ``lr``, ``steps``).
    """
    adapter = Tent(model, **options)
    adapter.outputs = adapter.adapt(batches)
    return adapter
