"""Drop-in replacements for ``torch.nn.BatchNorm1d/2d/3d``.

Each class subclasses its torch counterpart, so it has the same constructor signature, parameters
(``weight``, ``bias``), buffers (``running_mean``, ``running_var``, ``num_batches_tracked``),
``state_dict`` keys and ``repr``; a torch checkpoint loads into it and back, and ``isinstance(layer,
torch.nn.BatchNorm2d)`` holds, so code that looks for torch's batch norm finds ours.

What is added, all keyword-only:

- ``backend=``: the implementation (see :mod:`batchnorm.backends`); None follows the context
  manager / environment variable / default. ``layer.last_backend`` tells what ran.
- ``nonfinite=``: "propagate" (torch's behaviour), "skip" (a NaN/Inf batch leaves the running
  statistics and ``num_batches_tracked`` untouched) or "raise".

Differences from torch that only show on bad input: errors are raised before anything changes
(torch increments ``num_batches_tracked`` before it rejects a batch with one value per channel), and
they say what to do.

Example:
    >>> import torch
    >>> from batchnorm.nn import BatchNorm2d
    >>> bn = BatchNorm2d(3)
    >>> bn
    BatchNorm2d(3, eps=1e-05, momentum=0.1, affine=True, ...track_running_stats=True)
    >>> y = bn(torch.randn(4, 3, 5, 5))
    >>> bn.num_batches_tracked.item(), bn.last_backend
    (1, 'torch')
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings
from typing import Any

import torch

from batchnorm import backends
from batchnorm.errors import NormInputError, NotATensorError
from batchnorm.functional import (
    NONFINITE_POLICIES,
    batch_norm_with_status,
    check_eps,
    check_momentum,
)
from batchnorm.nn.fast_path import make_plan
from batchnorm.nn.surgery import mark_fx_leaf
from batchnorm.primitives import update_running_statistics

# torch >= 2.12 takes a keyword-only bias= (affine scale without a shift); older ones do not.
_TORCH_HAS_BIAS_ARG = (
    "bias" in inspect.signature(torch.nn.modules.batchnorm._NormBase.__init__).parameters
)

__all__ = [
    "BackendChoice",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormMixin",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
]


_NN_DIR = os.path.dirname(os.path.abspath(__file__))


def init_batch_norm_state(
    module: torch.nn.Module,
    after: type,
    num_features: int,
    eps: float,
    momentum: float | None,
    affine: bool,
    track_running_stats: bool,
    device: Any,
    dtype: Any,
    bias: bool,
) -> None:
    """Check the arguments, then run torch's ``_BatchNorm.__init__`` (the class after ``after``
    in ``module``'s MRO), on any torch version: the ``bias=`` argument is newer than some."""
    if isinstance(num_features, bool) or not isinstance(num_features, int):
        raise TypeError(f"num_features must be a positive int, got {num_features!r}")
    if num_features < 0:
        raise NormInputError(f"num_features must be a positive int, got {num_features}")
    if num_features == 0:
        warnings.warn(
            f"{type(module).__name__}(0): a layer with no channels normalizes nothing (torch "
            "accepts it, and so does this layer); num_features is the number of channels C of "
            "the (N, C, *) input",
            UserWarning,
            stacklevel=3,
        )
    check_eps(eps)
    # Point a momentum warning at the user's line, past every constructor in this package.
    frame, nn_frames = sys._getframe(0), 0
    while frame is not None and frame.f_code.co_filename.startswith(_NN_DIR):
        frame, nn_frames = frame.f_back, nn_frames + 1
    check_momentum(momentum, stacklevel=nn_frames + 2)
    args = (num_features, eps, momentum, affine, track_running_stats, device, dtype)
    if _TORCH_HAS_BIAS_ARG:
        super(after, module).__init__(*args, bias=bias)  # type: ignore[call-arg]
    else:
        # Older torch (before the bias= argument): same result, done by hand.
        super(after, module).__init__(*args)  # type: ignore[call-arg]
        if not bias:
            module.register_parameter("bias", None)


def check_channels(module: torch.nn.Module, input: Any, *, any_rank: bool = False) -> None:
    """A tensor with ``module.num_features`` channels on axis 1, or an error saying what to do.

    With ``any_rank`` every (N, C, *) input is accepted; otherwise the module's own
    ``_check_input_dim`` has already checked the number of dimensions.
    """
    name = type(module).__name__
    if not isinstance(input, torch.Tensor):
        raise NotATensorError(f"{name} expects a tensor, got {type(input).__name__}")
    if any_rank and input.dim() < 2:
        raise NormInputError(
            f"{name} expects an (N, C) or (N, C, *) input, got a {input.dim()}-D input of shape "
            f"{tuple(input.shape)}; add a batch axis with x.unsqueeze(0)"
        )
    channels = module.num_features
    if input.shape[1] != channels:
        channels_last = ""
        if input.shape[-1] == channels:
            order = ", ".join(str(i) for i in range(1, input.dim() - 1))
            channels_last = (
                f" (channels-last data: x.permute(0, {input.dim() - 1}, {order}), "
                "or x.movedim(-1, 1))"
            )
        raise NormInputError(
            f"{name}({channels}) got {input.shape[1]} channels on axis 1 (input shape "
            f"{tuple(input.shape)}); set num_features={input.shape[1]} or put the channel axis "
            f"at position 1{channels_last}"
        )


class BackendChoice:
    """The ``backend=`` choice of layers that run either PyTorch's native kernels or the
    primitives (:mod:`batchnorm.primitives`): layer, group, instance and ghost batch norm.

    ``"auto"`` and ``"torch"`` run the native kernel, ``"explicit"`` the primitives, and
    ``"triton"`` (no Triton kernels for these layers yet) warns once and runs the native kernel.
    """

    kernel = "torch"
    # Plain class attributes (str or None), unannotated: TorchScript reads class annotations
    # and cannot parse "str | None".
    backend = None
    last_backend = None

    def _set_backend(self, backend: str | None) -> None:
        if backend is not None:
            backends.requested_backend(backend)  # validates the name now, not at first forward
        self.backend = backend
        self.last_backend = None
        mark_fx_leaf(self)

    def _native(self, input: torch.Tensor) -> bool:
        """True to run PyTorch's kernel, False for :func:`normalize_over` (one dispatch:
        :func:`batchnorm.backends.resolve`)."""
        name = backends.resolve(
            self.backend,
            device_type=input.device.type,
            dtype_name=str(input.dtype).replace("torch.", ""),
            norm=type(self).__name__,
            zero_eps=self.eps == 0,  # type: ignore[attr-defined]
        )
        self.last_backend = name
        return name != "explicit"

    def extra_repr(self) -> str:
        text = super().extra_repr()  # type: ignore[misc]
        if self.backend is not None:
            text += f", backend={self.backend!r}"
        return text


class BatchNormMixin:
    """The forward pass shared by the drop-in classes (torch's ``_BatchNorm.forward`` semantics)."""

    # The class whose __init__ is skipped: torch's _BatchNorm.__init__ runs after it (after
    # torch.nn.SyncBatchNorm for our SyncBatchNorm, whose own signature differs).
    _init_after: type = object  # replaced below, once the class exists
    # Set by the concrete classes: the accepted numbers of input dimensions and a description.
    _accepted_dims: tuple[int, ...] = ()
    _dims_text: str = ""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        backend: str | None = None,
        nonfinite: str = "propagate",
    ) -> None:
        init_batch_norm_state(
            self, self._init_after, num_features, eps, momentum, affine, track_running_stats,
            device, dtype, bias,
        )  # fmt: skip
        if backend is not None:
            backends.requested_backend(backend)  # validates the name now, not at first forward
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        self.backend = backend
        self.nonfinite = nonfinite
        self.last_backend: str | None = None
        mark_fx_leaf(self)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if not isinstance(input, torch.Tensor):
            raise NotATensorError(
                f"{type(self).__name__} expects a tensor, got {type(input).__name__}"
            )
        if input.dim() not in self._accepted_dims:
            raise NormInputError(
                f"{type(self).__name__} expects {self._dims_text}, got a {input.dim()}-D input of "
                f"shape {tuple(input.shape)}. {self._dims_hint(input)}"
            )
        check_channels(self, input)

    def _dims_hint(self, input: torch.Tensor) -> str:
        for cls, dims in (("BatchNorm1d", (2, 3)), ("BatchNorm2d", (4,)), ("BatchNorm3d", (5,))):
            if input.dim() in dims:
                return f"For a {input.dim()}-D input use {cls}."
        if input.dim() == 1:
            return (
                "Batch norm needs a batch axis 0 and a channel axis 1: for one sample of C "
                "features use x.unsqueeze(0) (and model.eval(): training needs several samples)."
            )
        return "Batch norm needs a batch axis 0 and a channel axis 1."

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            # TorchScript compiles only this branch (torch.nn's own forward, as its layers do).
            return self._torchscript_forward(input)
        plan = self.__dict__.get("_plan")
        if plan is not None and not torch.compiler.is_compiling() and plan.admits(self, input):
            return plan.run(self, input)
        if torch.jit.is_tracing() or isinstance(input, torch.fx.Proxy):
            # A traced graph (jit.trace; torch.fx with this layer as the root, where it is not a
            # leaf) holds torch's standard op, as torch.nn's layers give.
            return self._torchscript_forward(input)
        self._check_input_dim(input)
        track = self.training and self.track_running_stats
        keep_stats = not self.training or self.track_running_stats
        running_mean = self.running_mean if keep_stats else None
        running_var = self.running_var if keep_stats else None
        cumulative = None  # the 1/k weight of a cumulative average, as a tensor
        if self.momentum is None:
            factor = 0.0
            if track and self.num_batches_tracked is not None:
                # Cumulative average: the k-th batch gets weight 1/k.
                if input.device.type == "cpu" and not torch.compiler.is_compiling():
                    factor = 1.0 / float(self.num_batches_tracked + 1)  # bit-identical to torch
                elif running_mean is not None and running_var is not None:
                    # No host synchronization (GPU) and no data-dependent Python float (compile,
                    # export): the kernel writes this batch's statistics into copies (momentum 1),
                    # and the buffers move towards them by 1/k as tensor arithmetic.
                    factor = 1.0
                    cumulative = 1.0 / (self.num_batches_tracked.to(torch.float64) + 1)
                    running_mean, running_var = running_mean.clone(), running_var.clone()
        else:
            factor = self.momentum
        if self.training:
            use_batch_stats = True
        else:
            use_batch_stats = self.running_mean is None and self.running_var is None
        y, updated = batch_norm_with_status(
            input,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
            backend=self.backend,
            nonfinite=self.nonfinite,
        )
        self.last_backend = backends.last_backend()
        if cumulative is not None and updated is not None and updated is not False:
            assert self.running_mean is not None and self.running_var is not None
            assert running_mean is not None and running_var is not None
            update_running_statistics(
                self.running_mean,
                self.running_var,
                running_mean,
                running_var,
                cumulative,
                mask=updated if isinstance(updated, torch.Tensor) else None,  # nonfinite="skip"
            )
        if track and self.num_batches_tracked is not None and input.numel() == 0:
            # As torch.nn: an empty training batch is counted (it changes nothing else), so a
            # cumulative average (momentum=None) weighs the next batches exactly as torch does.
            self.num_batches_tracked.add_(1)
        elif track and self.num_batches_tracked is not None and updated is not None:
            if isinstance(updated, torch.Tensor):
                self.num_batches_tracked.add_(updated.to(self.num_batches_tracked.dtype))
            elif updated:
                self.num_batches_tracked.add_(1)
        if self.last_backend in ("torch", "cpu"):
            # This signature passed every check and resolved to PyTorch's kernel or the C++ CPU
            # kernels: later calls with the same signature skip the checks and the dispatch
            # (nn.fast_path).
            self.__dict__["_plan"] = make_plan(self, input, self.last_backend)
        return y

    def _apply(self, fn, *args, **kwargs):
        # module.to(), .double(), .cuda(), ...: parameters and buffers may change dtype, device
        # (or be replaced); the next call is checked again.
        self.__dict__.pop("_plan", None)
        return super()._apply(fn, *args, **kwargs)

    def _torchscript_forward(self, input: torch.Tensor) -> torch.Tensor:
        """torch.nn's ``_BatchNorm.forward`` (scriptable): used by TorchScript and jit.trace."""
        exponential_average_factor = 0.0
        if self.momentum is not None:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        keep = not self.training or self.track_running_stats
        return torch.nn.functional.batch_norm(
            input,
            self.running_mean if keep else None,
            self.running_var if keep else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )

    def extra_repr(self) -> str:
        text = super().extra_repr()  # type: ignore[misc]
        if self.backend is not None:
            text += f", backend={self.backend!r}"
        if self.nonfinite != "propagate":
            text += f", nonfinite={self.nonfinite!r}"
        return text


BatchNormMixin._init_after = BatchNormMixin


class BatchNorm1d(BatchNormMixin, torch.nn.BatchNorm1d):
    """Drop-in ``torch.nn.BatchNorm1d``: input (N, C) or (N, C, L).

    Args: as ``torch.nn.BatchNorm1d`` (including the keyword-only ``bias``), plus keyword-only
    ``backend`` and ``nonfinite`` (see the module docstring).
    """

    _accepted_dims = (2, 3)
    _dims_text = "a 2-D (N, C) or 3-D (N, C, L) input"


class BatchNorm2d(BatchNormMixin, torch.nn.BatchNorm2d):
    """Drop-in ``torch.nn.BatchNorm2d``: input (N, C, H, W), contiguous or channels-last.

    Args: as ``torch.nn.BatchNorm2d``, plus keyword-only ``backend`` and ``nonfinite``.
    """

    _accepted_dims = (4,)
    _dims_text = "a 4-D (N, C, H, W) input"


class BatchNorm3d(BatchNormMixin, torch.nn.BatchNorm3d):
    """Drop-in ``torch.nn.BatchNorm3d``: input (N, C, D, H, W).

    Args: as ``torch.nn.BatchNorm3d``, plus keyword-only ``backend`` and ``nonfinite``.
    """

    _accepted_dims = (5,)
    _dims_text = "a 5-D (N, C, D, H, W) input"


class LazyNormMixin:
    """Torch's lazy norms (``num_features`` from the first input), becoming this package's class
    (``cls_to_become``) when materialized, with ``backend`` (and, for batch norm, ``nonfinite``)
    as the layers take them. Shared by the lazy batch-norm and instance-norm classes."""

    # The keyword-only options of cls_to_become beyond torch's, with their defaults.
    _own_options: dict[str, Any] = {"nonfinite": "propagate"}
    # Whether cls_to_become takes a negative eps (with a warning), as torch's instance norm does.
    _negative_eps_allowed = False

    def __init__(
        self,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        backend: str | None = None,
        **options: Any,
    ) -> None:
        unknown = set(options) - set(self._own_options)
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unexpected keyword argument(s) {sorted(unknown)}"
            )
        check_eps(eps, allow_negative=self._negative_eps_allowed)
        check_momentum(momentum, stacklevel=3)
        kwargs = {"bias": bias} if _TORCH_HAS_BIAS_ARG else {}
        super().__init__(eps, momentum, affine, track_running_stats, device, dtype, **kwargs)  # type: ignore[call-arg]
        if backend is not None:
            backends.requested_backend(backend)
        values = {**self._own_options, **options}
        if "nonfinite" in values and values["nonfinite"] not in NONFINITE_POLICIES:
            raise ValueError(
                f"nonfinite must be one of {NONFINITE_POLICIES}, got {values['nonfinite']!r}"
            )
        self.backend = backend
        for name, value in values.items():
            setattr(self, name, value)
        self.last_backend: str | None = None
        mark_fx_leaf(self)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # torch's lazy pre-hook turned this module into cls_to_become before forward runs.
        forward = type(self).forward
        if forward is LazyNormMixin.forward:
            raise RuntimeError(
                f"{type(self).__name__} has not inferred num_features yet; call it on an input"
            )
        return forward(self, input)


class LazyBatchNorm1d(LazyNormMixin, torch.nn.LazyBatchNorm1d):
    """Drop-in ``torch.nn.LazyBatchNorm1d``: becomes :class:`BatchNorm1d` at the first input."""

    cls_to_become = BatchNorm1d  # type: ignore[assignment]


class LazyBatchNorm2d(LazyNormMixin, torch.nn.LazyBatchNorm2d):
    """Drop-in ``torch.nn.LazyBatchNorm2d``: becomes :class:`BatchNorm2d` at the first input."""

    cls_to_become = BatchNorm2d  # type: ignore[assignment]


class LazyBatchNorm3d(LazyNormMixin, torch.nn.LazyBatchNorm3d):
    """Drop-in ``torch.nn.LazyBatchNorm3d``: becomes :class:`BatchNorm3d` at the first input."""

    cls_to_become = BatchNorm3d  # type: ignore[assignment]
