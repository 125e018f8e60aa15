"""The stateless torch API: ``batch_norm`` with torch's exact signature, plus a backend choice.

``batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)`` behaves as
``torch.nn.functional.batch_norm``; on top of it:

- ``backend=``: which implementation runs (see :mod:`batchnorm.backends`).
- ``nonfinite=``: what to do when a training batch holds NaN or Inf. ``"propagate"`` (PyTorch's
  behaviour: the NaN reaches the output and the running statistics, which stay poisoned for good),
  ``"skip"`` (the output still shows the NaN, but the running statistics keep their previous values;
  no host synchronization), or ``"raise"`` (a ``FloatingPointError`` before anything is updated;
  this costs one host synchronization per call).
- Every input is checked first, and a bad one gets an error that says what was wrong and what to
  do, before any running statistic is touched.
- Fused tails: :func:`batch_norm_relu` (``relu(batch_norm(x))``) and :func:`batch_norm_add_relu`
  (``relu(batch_norm(x) + z)``, a ResNet block's tail) on every backend: one kernel per pass on
  ``"triton"``, where ``save=`` chooses what the backward pass keeps ("output": y; "mask": 1 bit
  per element; "recompute": nothing, the pre-activation is recomputed from x); one output pass
  on ``"cpu"`` (the C++ kernels: residual and ReLU applied as y is written, the same numbers as
  the composition, ``save=`` as on Triton with a byte per element for "mask"); plain torch
  composition elsewhere (``save=`` is then ignored).

The momentum convention is PyTorch's: ``running = (1 - momentum) * running + momentum * batch``, so
``momentum`` is the weight of the NEW batch (default 0.1), and ``running_var`` holds the unbiased
batch variance ``var_B * m / (m - 1)`` while training normalizes with the biased ``var_B``. Keras,
Flax and ONNX call ``1 - momentum`` their momentum (default 0.99) and store the biased variance;
:func:`batchnorm.reference.torch_to_keras_momentum` converts.

Example:
    >>> import torch
    >>> from batchnorm.functional import batch_norm
    >>> x = torch.tensor([[0.23, 1.26, -2.41], [0.56, 0.75, 1.00]], dtype=torch.float64)
    >>> (batch_norm(x, None, None, training=True, eps=1e-12) + 1).round(decimals=6)
    tensor([[0., 2., 0.],
            [2., 0., 2.]], dtype=torch.float64)
"""

from __future__ import annotations

import math
import warnings

import torch

from batchnorm import backends
from batchnorm.errors import NormDtypeError, NormInputError, NormRankError, NotATensorError
from batchnorm.layouts import (
    as_torch_output,
    grad_in_layout,
    guards_layouts,
    in_layout,
    standard_strides,
    suggested_format,
)
from batchnorm.modes import (
    FUSED_SAVE_MODES,
    forward_ad_active,
    functorch_active,
    holds_values,
    mark_modified,
    records_graph,
)

NONFINITE_POLICIES = ("propagate", "skip", "raise")


__all__ = [
    "batch_norm",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "batch_norm_add_relu",
    "batch_norm_relu",
    "FUSED_SAVE_MODES",
    "NONFINITE_POLICIES",
    "check_momentum",
]


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
    nonfinite: str = "propagate",
) -> torch.Tensor:
    """Batch normalization over the channel axis 1 of an (N, C) or (N, C, *) input.

    Training: ``y = gamma * (x - mu_B) / sqrt(var_B + eps) + beta`` with the batch statistics over
    every axis but 1 (m = N * prod(spatial) values per channel); the running statistics, if given,
    are updated in place. Eval (``training=False``): the running statistics replace the batch ones.

    Args:
        input: (N, C) or (N, C, *) floating-point tensor.
        running_mean, running_var: (C,) buffers, or None (then training must be True).
        weight, bias: (C,) gamma and beta, or None (gamma = 1, beta = 0).
        training: use batch statistics (and update the running ones).
        momentum: weight of the new batch in the running average, in [0, 1].
        eps: added to the variance, >= 0.
        backend: "auto", "torch", "explicit", "triton" or "cpu" (see :mod:`batchnorm.backends`).
        nonfinite: "propagate", "skip" or "raise" (see the module docstring).

    Returns:
        A tensor of the input's shape and dtype.

    Raises:
        TypeError: non-tensor, integer or mismatched dtypes.
        ValueError: wrong number of dimensions, channel-count mismatch, a training batch with one
            value per channel, bad momentum or eps.
        FloatingPointError: NaN/Inf in a training batch with ``nonfinite="raise"``.
    """
    check_momentum(momentum, stacklevel=3)
    y, _ = batch_norm_with_status(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        backend=backend,
        nonfinite=nonfinite,
    )
    return y


def batch_norm_relu(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
    nonfinite: str = "propagate",
    save: str = "recompute",
) -> torch.Tensor:
    """``relu(batch_norm(x))``: batch norm followed by a ReLU, fused on the Triton backend.

    ``y = max(0, gamma * (x - mu) / sqrt(var + eps) + beta)``; the backward pass gates
    ``dl/dy`` by ``[y > 0]`` before batch norm's own backward.

    Args:
        input, running_mean, running_var, weight, bias, training, momentum, eps, backend,
            nonfinite: as :func:`batch_norm`.
        save: what the Triton backward keeps for the ReLU: "recompute" (default; nothing, the
            pre-activation is recomputed from x), "mask" (1 bit per element) or "output" (y).
            Other backends compose torch ops and ignore it.

    Returns:
        A tensor of the input's shape and dtype.

    Example:
        >>> import torch
        >>> x = torch.tensor([[-1.0, 2.0], [1.0, 4.0]])
        >>> batch_norm_relu(x, None, None, training=True, eps=1e-12)
        tensor([[0., 0.],
                [1., 1.]])
    """
    check_momentum(momentum, stacklevel=3)
    y, _ = batch_norm_with_status(
        input, running_mean, running_var, weight, bias, training, momentum, eps,
        backend=backend, nonfinite=nonfinite, activation="relu", save=save,
    )  # fmt: skip
    return y


def batch_norm_add_relu(
    input: torch.Tensor,
    residual: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
    nonfinite: str = "propagate",
    save: str = "mask",
) -> torch.Tensor:
    """``relu(batch_norm(x) + z)``: the tail of a ResNet block, fused on the Triton backend.

    The backward pass gives ``dl/dz = dl/dy * [y > 0]`` and batch norm's gradients of the same
    gated ``dl/dy``, from one kernel on the Triton backend.

    Args:
        input: (N, C) or (N, C, *), the batch-norm input x.
        residual: z, same shape, dtype and device as ``input``.
        running_mean, running_var, weight, bias, training, momentum, eps, backend,
            nonfinite: as :func:`batch_norm`.
        save: what the Triton backward keeps for the ReLU: "mask" (default; 1 bit per element),
            "recompute" (keeps z and recomputes the pre-activation) or "output" (y). Other
            backends compose torch ops and ignore it.

    Returns:
        A tensor of the input's shape and dtype.

    Example:
        >>> import torch
        >>> x = torch.tensor([[-1.0], [1.0]])
        >>> batch_norm_add_relu(x, torch.tensor([[0.5], [-2.0]]), None, None, training=True,
        ...                     eps=1e-12)
        tensor([[0.],
                [0.]])
    """
    if not isinstance(residual, torch.Tensor):
        raise TypeError(
            f"batch_norm_add_relu needs a residual tensor z, got {type(residual).__name__}; "
            "without one use batch_norm_relu"
        )
    check_momentum(momentum, stacklevel=3)
    y, _ = batch_norm_with_status(
        input, running_mean, running_var, weight, bias, training, momentum, eps,
        backend=backend, nonfinite=nonfinite, residual=residual, activation="relu", save=save,
    )  # fmt: skip
    return y


def batch_norm_with_status(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    *,
    backend: str | None = None,
    nonfinite: str = "propagate",
    residual: torch.Tensor | None = None,
    activation: str | None = None,
    save: str = "recompute",
) -> tuple[torch.Tensor, torch.Tensor | bool | None]:
    """:func:`batch_norm`, also telling whether the running statistics were updated.

    The second value is None when no update was due (eval, or no running statistics), True/False
    as a Python bool when known without synchronizing, or a 0-d bool tensor (``nonfinite="skip"``)
    so that callers such as the layers can count tracked batches without a host synchronization.
    ``residual``, ``activation`` ("relu" or None) and ``save`` select the fused tails of
    :func:`batch_norm_relu` and :func:`batch_norm_add_relu`.
    """
    _validate(input, running_mean, running_var, weight, bias, training, momentum, eps, nonfinite)
    _validate_fused(input, residual, activation, save)
    updates = training and running_mean is not None and running_var is not None

    if input.numel() == 0:
        # A batch with no samples has no statistics: return an empty output connected to the
        # parameters (zero gradients) and leave the running statistics untouched.
        y = input * 0
        if input.dim() < 2:
            return y, (False if updates else None)
        if weight is not None:
            y = y * _expand(weight, input.dim()).to(y.dtype)
        if bias is not None:
            y = y + _expand(bias, input.dim()).to(y.dtype)
        if residual is not None:
            y = y + residual
        if activation == "relu":
            y = torch.relu(y)
        return y, (False if updates else None)

    if training and nonfinite == "raise":
        finite = torch.isfinite(input).all()
        if not bool(finite):
            bad = int((~torch.isfinite(input)).sum())
            raise FloatingPointError(
                f"batch norm input holds {bad} NaN/Inf value(s) out of {input.numel()}; "
                "the running "
                "statistics were not updated. Find where they come from (e.g. torch.autograd."
                "set_detect_anomaly, a lower learning rate, loss scaling under AMP), or pass "
                "nonfinite='skip' to keep training while protecting the running statistics."
            )

    if training and eps == 0:
        dims = (0, *range(2, input.dim()))
        check_defined_at_zero_eps(input, dims, "batch norm", "channel(s)", nonfinite)

    device_type = input.device.type
    name = backends.resolve(
        backend,
        device_type=device_type,
        dtype_name=str(input.dtype).replace("torch.", ""),
        zero_eps=training and eps == 0,
        # The layout only matters to a CPU "auto" with cases listed: not computed otherwise.
        layout=(
            backends.input_layout(input)
            if backends.CPU_AUTO_CASES and device_type == "cpu"
            else None
        ),
        training=training,
        forward_ad=forward_ad_active(input, weight, bias, residual, running_mean, running_var),
    )
    if name == "torch":
        _check_native_dtypes(input, running_mean, running_var, weight, bias)
    impl = _implementation(name)
    if activation is not None:
        impl = _fused_implementation(name, impl, residual, save)

    if updates and nonfinite in ("skip", "raise"):
        new_mean, new_var = running_mean.clone(), running_var.clone()
        y = impl(input, new_mean, new_var, weight, bias, True, momentum, eps)
        with torch.no_grad():
            finite = torch.isfinite(new_mean).all() & torch.isfinite(new_var).all()
            if nonfinite == "raise" and not bool(finite):
                # Finite inputs whose statistics overflow (|x| ~ 1e19 in float32: x^2 is Inf).
                raise FloatingPointError(
                    "batch norm: the batch statistics overflow to Inf/NaN although the input is "
                    f"finite (largest |x| = {float(input.detach().abs().max()):.3g} in "
                    f"{input.dtype}); the running statistics were not updated. Scale the input "
                    "down, compute in float64, or pass nonfinite='skip'."
                )
            running_mean.copy_(torch.where(finite, new_mean, running_mean))
            running_var.copy_(torch.where(finite, new_var, running_var))
        return y, finite

    y = impl(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return y, (True if updates else None)


def _check_native_dtypes(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> None:
    """Refuses, with the remedies, what PyTorch's CPU kernel refuses with a bare message: a
    float16/bfloat16 input whose parameters and statistics are some of its dtype and some
    float32 ("expected scalar type BFloat16 but found Float", or an internal assert in eval).
    The ``cpu`` and ``explicit`` backends take such a mix (a superset of torch)."""
    if input.device.type != "cpu" or input.numel() == 0:
        return
    given = {
        name: t.dtype
        for name, t in (
            ("weight", weight),
            ("bias", bias),
            ("running_mean", running_mean),
            ("running_var", running_var),
        )  # fmt: skip
        if t is not None
    }
    if len(set(given.values())) > 1:
        listed = ", ".join(f"{name} {str(d).replace('torch.', '')}" for name, d in given.items())
        raise NormDtypeError(
            f"mixed dtypes: with a {input.dtype} input, PyTorch's batch-norm kernel needs the "
            f"parameters and statistics all of one dtype (all {input.dtype}, or all float32 for "
            f"mixed precision), got {listed}. Convert the module with module.float() (float32 "
            f"parameters and statistics) or module.to({input.dtype}), or pass backend='cpu'"
        )


def _implementation(name: str):
    if name == "explicit":
        from batchnorm import explicit

        return explicit.batch_norm
    if name == "triton":
        from batchnorm import ops

        return ops.batch_norm
    if name == "cpu":
        from batchnorm.ops import cpu

        return cpu.batch_norm
    return _torch_native


def _torch_native(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """PyTorch's kernel, with running statistics that a later in-place change cannot affect.

    The native op saves the running-statistics tensors it was given for its backward pass, so an
    in-place change to the buffers between forward and backward (a second forward, DDP's buffer
    broadcast, a user's edit) makes torch.nn's backward fail with "modified by an inplace
    operation" (pytorch#22095). Here:

    - No graph recorded (``torch.no_grad``, inference mode, nothing requires grad): nothing is
      saved, and the kernel gets the buffers themselves.
    - Training with a graph: the backward (and the double backward) of the native kernel reads
      only the batch statistics it saved, never the running ones (ATen's
      ``batch_norm_backward_cpu_template`` and the CUDA kernels take ``save_mean`` /
      ``save_invstd`` when ``train``). The kernel gets ``tensor.data`` aliases: the same storage,
      so the update lands in the buffers with no copy, but their own version counter, so a later
      in-place change of the buffers cannot invalidate what was saved; the buffers' own counters
      are then bumped (:func:`batchnorm.modes.mark_modified`) as torch.nn's kernel bumps them.
      The numbers are those of torch.nn's call bit for bit.
    - Eval with a graph: the backward does read the running statistics, so the kernel gets private
      copies: a later in-place change neither breaks the graph nor silently changes the gradient.
    - Under a torch.func transform or torch.compile, training runs on private copies too, which
      are then copied into the buffers, as before the aliases existed: ``.data`` would hide the
      update from functorch's checks of in-place changes and from the traced graph.
    """
    if running_mean is None or running_var is None or not records_graph(input, weight, bias):
        return _native_batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps
        )
    if training and not _transformed():
        y = _native_batch_norm(
            input, running_mean.data, running_var.data, weight, bias, training, momentum, eps
        )
        # The buffers changed in place behind the aliases: a graph that saved one of them
        # before must still notice (as with torch.nn, whose kernel bumps them itself).
        mark_modified(running_mean, running_var)
        return y
    mean_copy, var_copy = running_mean.detach().clone(), running_var.detach().clone()
    y = _native_batch_norm(input, mean_copy, var_copy, weight, bias, training, momentum, eps)
    if training:
        with torch.no_grad():
            running_mean.copy_(mean_copy)
            running_var.copy_(var_copy)
    return y


def _native_batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """``torch.nn.functional.batch_norm``, with x and dy in one standard layout wherever a
    dimension of one value makes the layout ambiguous.

    A stride on a dimension of one value addresses nothing, so such a tensor can be dense in
    both the contiguous and the channels-last format, with strides standard in neither.
    PyTorch's batch-norm backward (2.13, CPU, training and eval) then reads x in one format and
    dy in the other when they disagree and returns wrong dx and dgamma, silently: e.g. (N, L, C)
    features viewed as an (N, C, L, 1) image, ``seq.transpose(1, 2).unsqueeze(3)``, with a
    contiguous dy, or a contiguous x whose dy comes back through ``squeeze(3).transpose(1, 2)``:
    dx and dgamma 23-200 % of their largest value off. The forward is right. Here, where
    autograd records a graph through a 4-D or 5-D input with a dimension of one value, x is
    handed to the kernel with the standard strides of its format (a copy only where they
    differ), and dy in that same layout (:func:`batchnorm.layouts.grad_in_layout` on y, a copy
    only where dy's differ), torch.func.grad and jvp included. Under torch.compile, jit tracing
    or vmap the call is left as it is.
    """
    layout = _ambiguous_layout(input) if records_graph(input, weight, bias) else None
    if layout is None or not guards_layouts():
        return torch.nn.functional.batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps
        )
    y = torch.nn.functional.batch_norm(
        in_layout(input, layout), running_mean, running_var, weight, bias, training, momentum,
        eps,
    )  # fmt: skip
    return grad_in_layout(y, layout)


def _ambiguous_layout(t: torch.Tensor) -> torch.memory_format | None:
    """The memory format in which PyTorch's kernel must get a 4-D or 5-D tensor with a dimension
    of one value and its gradient (see :func:`_native_batch_norm`), or None where no dimension
    has one value or t is dense in neither format (the kernel reads such a t through a copy,
    correctly). The format whose standard strides t has; else the one t is dense in
    (contiguous first)."""
    if t.dim() not in (4, 5) or 1 not in t.shape or t.numel() == 0 or type(t) is not torch.Tensor:
        return None
    channels_last = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    formats = (torch.contiguous_format, channels_last)
    for fmt in formats:
        if t.stride() == standard_strides(t.shape, fmt):
            return fmt
    for fmt in formats:
        if t.is_contiguous(memory_format=fmt):
            return fmt
    return None


def _transformed() -> bool:
    """Whether a torch.func transform (grad, vmap, ...) is active or torch.compile / export is
    tracing: then tensors are wrapped or traced, and ``.data`` aliases would escape both."""
    return functorch_active() or torch.compiler.is_compiling()


def check_defined_at_zero_eps(
    x: torch.Tensor, dims: tuple[int, ...], what: str, groups: str, nonfinite: str = "propagate"
) -> None:
    """At ``eps = 0`` a group of equal values (variance 0: a dead ReLU channel, a constant
    feature) normalizes to 0/0 = NaN. Say so instead of returning NaN quietly: a
    ``RuntimeWarning`` naming the first such groups, or ``FloatingPointError`` before anything
    is computed or updated under ``nonfinite="raise"``. ``groups`` names the groups in the
    message ("channel(s)", "sample(s)", ...). Skipped where the check would break a trace
    (torch.compile, torch.func, jit tracing) or there are no values (meta and fake tensors):
    two reductions and a host synchronization, paid by ``eps = 0`` calls alone.
    """
    if x.numel() == 0 or not _readable(x):
        return
    with torch.no_grad():
        high = x.amax(dim=dims)
        constant = (high == x.amin(dim=dims)) & torch.isfinite(high)  # inf: non-finite input
    report_zero_variance(constant, what, groups, nonfinite)


def _readable(t: torch.Tensor) -> bool:
    """Whether a data-dependent check on ``t`` can run: values on hand, nothing tracing."""
    return not (_transformed() or torch.jit.is_tracing()) and holds_values(t)


def report_zero_variance(
    constant: torch.Tensor, what: str, groups: str, nonfinite: str = "propagate"
) -> None:
    """The message of :func:`check_defined_at_zero_eps` for the groups where ``constant`` (a
    boolean tensor, one entry per group) is True; nothing where none is, or no values are on
    hand (meta and fake tensors, tracing). Also for statistics already reduced across processes
    (sync batch norm: ``M2 == 0``)."""
    if not _readable(constant):
        return
    count = int(constant.sum())
    if count == 0:
        return
    first = [tuple(i) if len(i) > 1 else i[0] for i in constant.nonzero().tolist()[:5]]
    message = (
        f"{what} with eps=0: {count} of {constant.numel()} {groups} hold one value repeated "
        f"(variance 0), so their output is 0/0 = NaN (first: {', '.join(map(str, first))}). "
        "Use eps > 0 (torch's default is 1e-5), or find where the constant values come from "
        "(a dead ReLU channel, a constant feature)."
    )
    if nonfinite == "raise":
        raise FloatingPointError(message + " Nothing was updated.")
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def _fused_implementation(name: str, impl, residual: torch.Tensor | None, save: str):
    """The batch norm + (residual) + ReLU callable, with batch_norm's 8 positional arguments."""
    if name == "triton":
        from batchnorm import ops

        if residual is None:
            return lambda *args: ops.batch_norm_relu(*args, save=save)
        return lambda input, *args: ops.batch_norm_add_relu(input, residual, *args, save=save)
    if name == "cpu":
        from batchnorm.ops import cpu

        return lambda input, *args: cpu.batch_norm_relu(input, residual, *args, save=save)
    if residual is None:
        return lambda *args: torch.relu(impl(*args))
    return lambda *args: torch.relu(impl(*args) + residual)


def _validate_fused(
    input: torch.Tensor, residual: torch.Tensor | None, activation: str | None, save: str
) -> None:
    if activation not in (None, "relu"):
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    if save not in FUSED_SAVE_MODES:
        raise ValueError(f"save must be one of {FUSED_SAVE_MODES}, got {save!r}")
    if residual is None:
        return
    if activation is None:
        raise ValueError("a residual is only added before a ReLU: use batch_norm_add_relu")
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"the residual must be a tensor, got {type(residual).__name__}")
    if residual.shape != input.shape:
        raise ValueError(
            f"the residual has shape {tuple(residual.shape)} but the input has "
            f"{tuple(input.shape)}; relu(batch_norm(x) + z) needs z shaped like x"
        )
    if residual.dtype != input.dtype or residual.device != input.device:
        raise TypeError(
            f"the residual is {residual.dtype} on {residual.device} but the input is "
            f"{input.dtype} on {input.device}; convert one of them (z.to(x))"
        )


def _expand(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def check_momentum(momentum: float | None, *, stacklevel: int = 3) -> None:
    """Check a momentum as torch.nn would accept it, warning where it is almost surely a mistake.

    Raises for a non-number and for NaN (which would poison the running statistics for good);
    warns for a value outside [0, 1] (PyTorch accepts it: the running average then extrapolates
    past the new batch or away from it) and for one in (0.5, 1), which looks like a Keras/Flax
    momentum put into PyTorch's convention.
    """
    if momentum is None or isinstance(momentum, torch.Tensor):
        return
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a float in [0, 1] or None, got {momentum!r}")
    if math.isnan(momentum):
        raise ValueError(
            "momentum is NaN, which would make every running statistic NaN for good; it must lie "
            "in [0, 1]: the weight of the new batch in the running average (PyTorch's convention, "
            "default 0.1)"
        )
    if not 0.0 <= momentum <= 1.0:
        warnings.warn(
            f"momentum={momentum} lies outside [0, 1]: the running average then overshoots the "
            "new batch or moves away from it. PyTorch accepts it, and so does this layer, but it "
            "is almost surely a mistake: momentum is the weight of the NEW batch, default 0.1 "
            "(momentum=None averages all batches equally).",
            UserWarning,
            stacklevel=stacklevel,
        )
        return
    if 0.5 < momentum < 1.0:  # 1.0 (keep only the last batch) is a deliberate choice
        warnings.warn(
            f"momentum={momentum} gives the new batch more weight than the running average. In "
            "PyTorch's convention (followed here) momentum is the weight of the NEW batch, "
            "default 0.1; Keras and Flax call the weight of the OLD value momentum (default "
            f"0.99). If you ported a Keras/Flax value, use momentum={1 - momentum:.4g} instead.",
            UserWarning,
            stacklevel=stacklevel,
        )


def _validate(
    input: object,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    nonfinite: str,
) -> None:
    if not isinstance(input, torch.Tensor):
        raise NotATensorError(
            f"batch norm expects a torch.Tensor input, got {type(input).__name__}"
        )
    if not input.is_floating_point():
        raise NormDtypeError(
            f"batch norm expects a floating-point input, got {input.dtype}; convert it first, "
            "e.g. x.float() (and scale integer images to [0, 1])"
        )
    if input.dim() < 2 and input.numel() == 0:
        warnings.warn(
            f"batch norm got an empty {input.dim()}-D input; it returns an empty output (as "
            "torch.nn.functional.batch_norm does), but batch norm expects (N, C) or (N, C, *): "
            "check the shape you pass",
            UserWarning,
            stacklevel=4,
        )
        return
    if input.dim() < 2:
        raise NormRankError(
            f"batch norm expects an (N, C) or (N, C, *) input, got {input.dim()}-D shape "
            f"{tuple(input.shape)}; for a single sample of C features use x.unsqueeze(0) "
            "(and note that training needs more than one sample)"
        )
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    check_eps(eps)
    if momentum is None:
        raise TypeError(
            "the functional batch_norm needs a float momentum; the cumulative average "
            "(momentum=None) is a layer feature: use batchnorm.nn.BatchNorm*d(momentum=None), or "
            "pass momentum=1/num_batches_tracked"
        )
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or momentum != momentum:
        raise ValueError(
            f"momentum must be a number in [0, 1], got {momentum!r}; it is the weight of the new "
            "batch in the running average (PyTorch's convention, default 0.1)"
        )

    channels = input.shape[1]
    # Before the parameters' checks, as torch's batch-size check comes before its kernel's.
    if training and input.numel() > 0:
        per_channel = input.numel() // channels
        if per_channel == 1:
            raise NormInputError(
                f"batch norm in training mode needs more than one value per channel, got input "
                f"shape {tuple(input.shape)} (1 value per channel): the batch variance of a single "
                "value is 0 and its normalized output is always 0. Remedies: call model.eval() "
                "for inference (population statistics are used); train with a batch larger than "
                "one; or use a norm that needs no batch (batchnorm GroupNorm/LayerNorm), or "
                "ghost/sync batch norm to get statistics across more samples."
            )
    for name, t in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise NotATensorError(f"{name} must be a tensor or None, got {type(t).__name__}")
        if t.shape != (channels,):
            raise NormInputError(
                f"{name} has shape {tuple(t.shape)} but the input has {channels} channels on "
                f"axis 1 (input shape {tuple(input.shape)}); batch norm needs ({channels},). Check "
                "num_features, or move the channel axis to position 1 (e.g. x.permute)"
            )
        if not t.is_floating_point():
            raise NormDtypeError(f"{name} must be floating point, got {t.dtype}")
        if t.device != input.device:
            raise NormInputError(
                f"{name} is on {t.device} but the input is on {input.device}; move the module or "
                "tensors to one device (module.to(x.device))"
            )
        low_precision_input = input.dtype in (torch.float16, torch.bfloat16)
        mixed = t.dtype != input.dtype and not (low_precision_input and t.dtype == torch.float32)
        if mixed and input.numel() == 0:
            warnings.warn(
                f"batch norm got an empty {input.dtype} batch while {name} is {t.dtype}; an empty "
                "batch passes (as in torch), but a non-empty one of this dtype will raise: "
                f"convert with module.to({input.dtype}) or x.to({t.dtype})",
                UserWarning,
                stacklevel=4,
            )
            mixed = False
        if mixed:
            raise NormDtypeError(
                f"mixed dtypes: input is {input.dtype} but {name} is {t.dtype}. Parameters and "
                "statistics must match the input, or be float32 with a float16/bfloat16 input "
                f"(mixed precision). Convert with module.to({input.dtype}) or x.to({t.dtype})"
            )
    if (running_mean is None) != (running_var is None):
        raise NormInputError("pass both running_mean and running_var, or neither")
    if not training and running_mean is None:
        raise NormInputError(
            "eval-mode batch norm (training=False) needs running_mean and running_var; pass them, "
            "or use training=True to normalize with the batch statistics"
        )


# --- layer, group and instance norm --------------------------------------------------------------


def check_eps(eps: object, *, allow_negative: bool = False) -> None:
    """Check ``eps``: a number, not NaN (which would poison every output), and >= 0.

    With ``allow_negative`` (layer, group and instance norm, where torch accepts any eps) a
    negative value only warns: it gives NaN wherever the variance is below ``-eps``.
    """
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps != eps:
        raise ValueError(f"eps must be a number >= 0, got {eps!r} (default 1e-5)")
    if eps < 0:
        if not allow_negative:
            raise ValueError(f"eps must be a number >= 0, got {eps!r} (default 1e-5)")
        warnings.warn(
            f"eps={eps} is negative: the output is NaN wherever the variance is below {-eps}. "
            "torch accepts it, and so does this norm, but eps is meant to be a small positive "
            "number (default 1e-5)",
            UserWarning,
            stacklevel=4,
        )


def _check_tensor(input: object, what: str) -> None:
    if not isinstance(input, torch.Tensor):
        raise NotATensorError(f"{what} expects a tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise NormDtypeError(
            f"{what} expects a floating-point input, got {input.dtype}; convert it first "
            "(x.float())"
        )


def _dtype_name(input: torch.Tensor) -> str:
    return str(input.dtype).replace("torch.", "")


def layer_norm(
    input: torch.Tensor,
    normalized_shape: int | list[int] | tuple[int, ...] | torch.Size,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``torch.nn.functional.layer_norm`` with a backend choice (Ba et al. 2016).

    Per sample over the trailing ``normalized_shape`` axes:
    ``y = gamma * (x - mu) / sqrt(var + eps) + beta`` (biased variance). ``backend``: "auto" or
    "torch" run PyTorch's kernel, "explicit" the batch-norm primitives; "triton" warns once
    and runs "torch" (see :func:`batchnorm.backends.resolve`).

    Shape:
        input: (*, *normalized_shape); weight, bias: normalized_shape. Returns input's shape.

    Example:
        >>> x = torch.tensor([[1.0, 2.0, 3.0]])
        >>> layer_norm(x, (3,), eps=0.0, backend="explicit").mul((2 / 3) ** 0.5).round(decimals=4)
        tensor([[-1.,  0.,  1.]])
    """
    _check_tensor(input, "layer_norm")
    check_eps(eps, allow_negative=True)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    k = len(shape)
    if k == 0 or input.dim() < k or tuple(input.shape[input.dim() - k :]) != shape:
        raise NormInputError(
            f"layer_norm normalizes the last {k} axis(es), which must have shape {shape}, but "
            f"the input has shape {tuple(input.shape)}; use normalized_shape="
            f"{tuple(input.shape[-max(k, 1) :])} or move the normalized axes to the end"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != shape:
            raise NormInputError(
                f"layer_norm's {name} has shape {tuple(t.shape)}; it must be normalized_shape "
                f"{shape}"
            )
    if all(s == 1 for s in shape) and input.numel() > 0 and eps != 0:  # eps = 0: 0/0, below
        warnings.warn(
            f"layer norm over normalized_shape={shape} normalizes one value per sample, whose "
            "variance is 0: every output is the bias. normalized_shape is usually the feature "
            f"size, here perhaps {tuple(input.shape[-1:])} (LayerNorm(num_features))",
            UserWarning,
            stacklevel=3,
        )
    name = backends.resolve(
        backend,
        device_type=input.device.type,
        dtype_name=_dtype_name(input),
        norm="layer_norm",
        zero_eps=eps == 0,
    )
    dims = tuple(range(input.dim() - k, input.dim()))
    if eps == 0:
        check_defined_at_zero_eps(input, dims, "layer norm", "sample(s)")
    if name == "torch":
        return torch.nn.functional.layer_norm(input, shape, weight, bias, eps)
    from batchnorm.primitives import normalize_over

    y, _ = normalize_over(input, dims, eps, weight, bias)
    return as_torch_output(y, torch.contiguous_format)  # torch's layer norm: contiguous


def check_num_groups(num_groups: object, num_channels: int | None = None) -> None:
    """``num_groups`` a positive int dividing ``num_channels``, or the error torch raises."""
    from batchnorm.errors import GroupCountError

    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f"num_groups must be a positive int, got {num_groups!r}")
    if num_groups == 0:
        raise GroupCountError(
            "num_groups must be a positive int, got 0; group norm splits the channels into "
            "num_groups groups (1 group: layer norm over (C, *); C groups: instance norm)"
        )
    if num_groups < 0:
        raise NormInputError(f"num_groups must be a positive int, got {num_groups}")
    if num_channels is not None and num_channels % num_groups != 0:
        raise NormInputError(
            f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups}); "
            f"divisors of {num_channels}: "
            + ", ".join(str(d) for d in range(1, num_channels + 1) if num_channels % d == 0)
        )


def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``torch.nn.functional.group_norm`` with a backend choice (Wu & He 2018).

    The (N, C, *) input is viewed as (N, G, C/G, S); each (n, g) is normalized over its
    ``C/G * S`` values, then ``gamma``, ``beta`` per channel. ``backend`` as :func:`layer_norm`.

    Shape:
        input: (N, C, *); weight, bias: (C,). Returns input's shape.

    Example:
        >>> x = torch.randn(2, 4, 3)
        >>> torch.allclose(group_norm(x, 2, backend="explicit"),
        ...                torch.nn.functional.group_norm(x, 2), atol=1e-6)
        True
    """
    _check_tensor(input, "group_norm")
    check_eps(eps, allow_negative=True)
    if input.dim() < 2:
        raise NormInputError(
            f"group_norm expects an (N, C, *) input, got shape {tuple(input.shape)}; add a batch "
            "axis with x.unsqueeze(0)"
        )
    check_num_groups(num_groups, input.shape[1])
    channels = input.shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (channels,):
            raise NormInputError(
                f"group_norm's {name} has shape {tuple(t.shape)} but the input has {channels} "
                "channels on axis 1"
            )
    spatial = 1
    for s in input.shape[2:]:  # not math.prod over a generator: torch.compile traces this
        spatial *= s
    if channels // num_groups * spatial == 1 and input.numel() > 0:
        one_value = (
            f"group norm with num_groups={num_groups} on an input of shape "
            f"{tuple(input.shape)} puts one value in each (sample, group), whose variance is 0: "
            "every output is the bias. Use fewer groups (GroupNorm(1, C) normalizes each sample "
            "over all its channels), or a norm over another axis (BatchNorm1d for (N, C) features)"
        )
        if input.shape[0] == 1:  # where torch raises (its check counts N * C/G * spatial values)
            raise NormInputError(one_value)
        warnings.warn(one_value, UserWarning, stacklevel=3)
    name = backends.resolve(
        backend,
        device_type=input.device.type,
        dtype_name=_dtype_name(input),
        norm="group_norm",
        zero_eps=eps == 0,
    )
    if eps == 0 and input.shape[0] > 0:
        view = input.reshape(input.shape[0], num_groups, -1)
        check_defined_at_zero_eps(view, (2,), "group norm", "(sample, group) pair(s)")
    if name == "torch":
        return torch.nn.functional.group_norm(input, num_groups, weight, bias, eps)
    from batchnorm.primitives import normalize_over

    n = input.shape[0]
    grouped = input.reshape(n, num_groups, channels // num_groups, spatial)  # (N, G, C/G, S)
    shape = (1, num_groups, channels // num_groups, 1)  # gamma, beta per channel on that view
    w = None if weight is None else weight.reshape(shape)
    b = None if bias is None else bias.reshape(shape)
    y, _ = normalize_over(grouped, (2, 3), eps, w, b)
    return as_torch_output(y.reshape(input.shape), suggested_format(input))


def instance_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``torch.nn.functional.instance_norm`` with a backend choice (Ulyanov et al. 2016).

    Per sample and channel over the spatial axes. With ``use_input_stats`` and running
    statistics given, these move towards the batch average of the per-instance means and
    unbiased variances (torch's convention). ``backend`` as :func:`layer_norm`.

    Shape:
        input: (N, C, *) with at least one spatial axis; running statistics, weight, bias: (C,).

    Example:
        >>> x = torch.randn(2, 3, 5)
        >>> torch.allclose(instance_norm(x, backend="explicit"),
        ...                torch.nn.functional.instance_norm(x), atol=1e-6)
        True
    """
    _check_tensor(input, "instance_norm")
    check_eps(eps, allow_negative=True)
    check_momentum(momentum, stacklevel=3)
    if input.dim() < 3:
        raise NormInputError(
            f"instance_norm expects an (N, C, *) input with at least one spatial axis, got shape "
            f"{tuple(input.shape)}; for (N, C) features use layer_norm or batch_norm"
        )
    channels = input.shape[1]
    for name, t in (
        ("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
        ("bias", bias),
    ):  # fmt: skip
        if t is not None and tuple(t.shape) != (channels,):
            raise NormInputError(
                f"instance_norm's {name} has shape {tuple(t.shape)} but the input has "
                f"{channels} channels on axis 1"
            )
    if not use_input_stats and (running_mean is None or running_var is None):
        raise NormInputError(
            "instance_norm with use_input_stats=False needs running_mean and running_var"
        )
    spatial = 1
    for s in input.shape[2:]:
        spatial *= s
    if use_input_stats and spatial <= 1:
        raise NormInputError(
            f"instance norm normalizes each sample and channel over its spatial axes, so it needs "
            f"more than one spatial element; got input shape {tuple(input.shape)}. For (N, C) "
            "features use LayerNorm or BatchNorm1d."
        )
    name = backends.resolve(
        backend, device_type=input.device.type, dtype_name=_dtype_name(input),
        norm="instance_norm", zero_eps=use_input_stats and eps == 0,
    )  # fmt: skip
    if use_input_stats and eps == 0:
        dims = tuple(range(2, input.dim()))
        check_defined_at_zero_eps(input, dims, "instance norm", "(sample, channel) pair(s)")
    if name == "torch":
        y = torch.nn.functional.instance_norm(
            input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps
        )
        if input.shape[0] == 1 and _ambiguous_layout(input) is not None and guards_layouts():
            # PyTorch's instance norm (2.13, CPU) runs a batch of one as its own (1, C, *) batch
            # norm without a copy, so a channels-last dy reaches that backward beside the
            # contiguous x it made, and dx and dgamma come out wrong, silently (6-15 absolute
            # on randn, 4-D and 5-D). Its y is contiguous: dy goes on contiguous too.
            y = grad_in_layout(y, torch.contiguous_format)
        return y
    from batchnorm.primitives import (
        accumulation_dtype,
        invstd,
        normalize,
        normalize_over,
        update_running_statistics,
        variance,
    )

    shape = (1, channels) + (1,) * (input.dim() - 2)
    w = None if weight is None else weight.reshape(shape)
    b = None if bias is None else bias.reshape(shape)
    if not use_input_stats:
        assert running_mean is not None and running_var is not None
        acc = accumulation_dtype(input.dtype)
        mean = running_mean.to(acc).reshape(shape)
        y = normalize(input, mean, invstd(running_var.to(acc).reshape(shape), eps), w, b)
        return as_torch_output(y, torch.contiguous_format)  # torch's instance norm: contiguous
    y, stats = normalize_over(input, tuple(range(2, input.dim())), eps, w, b)
    if running_mean is not None and running_var is not None:
        # As torch: the batch average of the per-instance means and unbiased variances.
        update_running_statistics(
            running_mean,
            running_var,
            stats.mean.mean(0),
            variance(stats, unbiased=True).mean(0),
            momentum,
        )
    return as_torch_output(y, torch.contiguous_format)
