"""GPU kernels for batch normalization, written in Triton.

Stateless functions with ``torch.nn.functional.batch_norm`` semantics (running statistics
updated in place, ``running = (1 - momentum) * running + momentum * batch`` with the unbiased
batch variance), plus the fused ResNet tails:

- :func:`batch_norm`: ``y = gamma * (x - mu) / sqrt(var + eps) + beta``.
- :func:`batch_norm_relu`: ``relu(batch_norm(x))``.
- :func:`batch_norm_add_relu`: ``relu(batch_norm(x) + z)`` (the tail of a ResNet block).

They take (N, C) and (N, C, *) CUDA tensors in float32, float16 or bfloat16, contiguous or
channels-last without a copy (other strides run as strided views, or are copied first when no
such view exists), with parameters and running statistics in float32 or the input's dtype;
statistics and arithmetic are float32, and the saved mean (an exact pair of float32 values) and
inverse standard deviation are float32. They are PyTorch custom operators (``batchnorm::forward``
and ``batchnorm::backward``) with autograd, fake implementations for ``torch.compile`` and no
graph breaks. Under the Triton interpreter (``TRITON_INTERPRET=1`` set before the first call)
they also run on CPU tensors, slowly: that is how the tests exercise every kernel without a GPU.

What the fused ReLU keeps for the backward pass (``save=``):

- ``"output"``: the output y (E elements; free when the next layer keeps y anyway).
- ``"mask"``: one bit per element (E / 8 bytes).
- ``"recompute"``: nothing beyond what batch norm keeps (x and the per-channel statistics);
  the backward pass recomputes the pre-activation from x (and reads the residual z, which is then
  kept too).

Most code should call :mod:`batchnorm.functional` (``backend="triton"``), which validates the
inputs, falls back visibly where these kernels cannot run, and offers the same fused functions on
every backend. This module imports without Triton; the kernels load on first use.
"""

from __future__ import annotations

import os

import torch

from batchnorm.errors import NormRankError
from batchnorm.modes import FUSED_SAVE_MODES, FusedSave, triton_interpreting

__all__ = [
    "SAVE_MODES",
    "SUPPORTED_DTYPES",
    "batch_norm",
    "batch_norm_add_relu",
    "batch_norm_relu",
    "load_interpreter",
    "triton_status",
]

MIN_TRITON = (3, 6)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SAVE_MODES = FUSED_SAVE_MODES


def _interpreting() -> bool:
    return triton_interpreting()


def triton_status() -> tuple[bool, str]:
    """Whether the Triton kernels can run here, and a one-line reason.

    Example:
        >>> ok, reason = triton_status()
        >>> isinstance(ok, bool) and isinstance(reason, str)
        True
    """
    try:
        import triton
    except ImportError as exc:
        return False, f"Triton is not installed ({exc}); pip install 'batchnorm[triton]'"
    try:
        version = tuple(int(p) for p in triton.__version__.split(".")[:2])
    except ValueError:
        version = MIN_TRITON
    if version < MIN_TRITON:
        return False, (
            f"Triton {triton.__version__} is too old; the kernels need Triton "
            f"{'.'.join(map(str, MIN_TRITON))} or newer"
        )
    if _interpreting():
        return True, (
            f"Triton {triton.__version__} interpreter (TRITON_INTERPRET=1): CPU tensors, slow, "
            "for testing"
        )
    if torch.cuda.is_available():
        return True, f"Triton {triton.__version__} on {torch.cuda.get_device_name()}"
    return False, (
        "no CUDA device; set TRITON_INTERPRET=1 before the first call to run the kernels on "
        "the CPU under Triton's interpreter (slow, for testing)"
    )


_status_cache: dict[str, tuple[bool, str]] = {}


def _cached_status(interpret: str) -> tuple[bool, str]:
    # Checked on every call: Triton's presence and the device do not change within a process,
    # TRITON_INTERPRET (the key) may. A plain dict, which torch.compile traces without warnings.
    if interpret not in _status_cache:
        _status_cache[interpret] = triton_status()
    return _status_cache[interpret]


_probe: list[tuple[bool, str]] = []  # the interpreter probe's result, once per process


def load_interpreter() -> tuple[bool, str]:
    """Build Triton and the kernels for Triton's CPU interpreter in this process.

    Triton decides at import time whether a ``@triton.jit`` function (its own ``tl.zeros`` as
    well as these kernels) is compiled for a GPU or interpreted, from ``TRITON_INTERPRET``. This
    sets the variable while importing Triton and the kernels, then restores it; calls that should
    run on CPU tensors still need ``TRITON_INTERPRET=1`` when they are made. Call it before
    anything imports Triton (``torch.compile`` does); later calls only report.

    Returns:
        ``(ok, reason)``: ok is True when the kernels run under the interpreter here.
    """
    import sys

    already = "triton" in sys.modules
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        from batchnorm.ops import _kernels

        interpreted = _kernels.AVAILABLE and _kernels.INTERPRETED and _kernels.LANGUAGE_INTERPRETED
        if interpreted and not _probe:
            # The first interpreted launch imports more of Triton, which must see the variable.
            _probe.append(_kernels.interpreter_works())
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    if not _kernels.AVAILABLE:
        return False, "Triton is not installed; pip install 'batchnorm[triton]'"
    if interpreted:
        works, problem = _probe[0]
        if not works:
            return False, problem
        return True, "the kernels run under Triton's interpreter"
    when = "before this call" if already else "without TRITON_INTERPRET"
    return False, (
        f"Triton was imported {when} and built for the GPU; set TRITON_INTERPRET=1 before "
        "anything imports Triton (e.g. torch.compile) to run the kernels on the CPU"
    )


def _check(
    input: torch.Tensor,
    tensors: dict[str, torch.Tensor | None],
    training: bool,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"batch norm expects a torch.Tensor input, got {type(input).__name__}")
    if input.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"the Triton kernels take float32, float16 or bfloat16 input, got {input.dtype}; "
            "use batchnorm.functional.batch_norm (it falls back to PyTorch) or convert the input"
        )
    if input.dim() < 2:
        raise NormRankError(
            f"batch norm expects an (N, C) or (N, C, *) input, got shape {tuple(input.shape)}"
        )
    ok, reason = _cached_status(os.environ.get("TRITON_INTERPRET", ""))
    if not ok and (input.device.type == "cuda" or "not installed" in reason):
        raise RuntimeError(f"the Triton kernels cannot run: {reason}")
    if input.numel() == 0:
        raise ValueError(
            f"the Triton kernels need a non-empty input, got shape {tuple(input.shape)}; "
            "batchnorm.functional handles empty batches"
        )
    if input.device.type != "cuda":
        if not _interpreting():
            raise RuntimeError(
                f"the Triton kernels need a CUDA tensor, got one on {input.device}; move it with "
                ".cuda(), or set TRITON_INTERPRET=1 before the first call to run on the CPU"
            )
        from batchnorm.ops import _kernels

        if not (_kernels.INTERPRETED and _kernels.LANGUAGE_INTERPRETED):
            raise RuntimeError(
                "the Triton kernels (or Triton itself) were loaded for the GPU in this process "
                "(TRITON_INTERPRET was unset when Triton was first imported), so they cannot take "
                "CPU tensors; set TRITON_INTERPRET=1 before anything imports Triton, or call "
                "batchnorm.ops.load_interpreter() first"
            )
    channels = input.shape[1]
    for name, t in tensors.items():
        if t is None:
            continue
        if t.shape != (channels,):
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}; the input has {channels} channels, so it "
                f"must be ({channels},)"
            )
        if t.dtype not in (input.dtype, torch.float32):
            raise TypeError(
                f"{name} is {t.dtype}; with a {input.dtype} input it must be {input.dtype} or "
                "float32"
            )
        if t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but the input is on {input.device}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("pass both running_mean and running_var, or neither")
    if not training and running_mean is None:
        raise ValueError("eval-mode batch norm (training=False) needs running_mean and running_var")
    if torch.is_grad_enabled():
        # As torch's kernel: the Function gives the running statistics no gradient (wrong in
        # eval mode, where y depends on them) and updates them in place in training.
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t is not None and t.requires_grad:
                raise RuntimeError(
                    f"the Triton batch-norm kernels are not differentiable with respect to "
                    f"{name}, which requires grad (torch's kernel refuses it too): keep the "
                    f"running statistics as buffers that do not require grad "
                    f"({name}.requires_grad_(False)), call under torch.no_grad(), or use "
                    "backend='explicit', which differentiates through them in eval mode"
                )
    if training and input.numel() // channels == 1:
        raise ValueError(
            f"batch norm in training mode needs more than one value per channel, got input shape "
            f"{tuple(input.shape)}: the variance of one value is 0 and its output always 0. "
            "Remedies: eval mode for inference (the running statistics are used), a batch larger "
            "than one, a norm that needs no batch (GroupNorm, LayerNorm), or ghost or sync batch "
            "norm for statistics over more samples."
        )


def _run(
    input: torch.Tensor,
    residual: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    relu_save: int,
) -> torch.Tensor:
    _check(
        input,
        {"weight": weight, "bias": bias, "running_mean": running_mean, "running_var": running_var},
        training,
        running_mean,
        running_var,
    )
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or residual.shape != input.shape:
            got = tuple(residual.shape) if isinstance(residual, torch.Tensor) else type(residual)
            raise ValueError(
                f"the residual must have the input's shape {tuple(input.shape)}, got {got}"
            )
        if residual.dtype != input.dtype or residual.device != input.device:
            raise TypeError(
                f"the residual is {residual.dtype} on {residual.device}; it must match the "
                f"input ({input.dtype} on {input.device})"
            )
    from batchnorm.ops import _custom

    return _custom.BatchNormFunction.apply(
        input,
        weight,
        bias,
        running_mean,
        running_var,
        residual,
        bool(training),
        float(momentum),
        float(eps),
        relu_save,
    )


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``torch.nn.functional.batch_norm`` on the Triton kernels.

    Training: ``y = gamma * (x - mu_B) / sqrt(var_B + eps) + beta`` over the m = N * prod(*)
    values of each channel (biased ``var_B``), and the running statistics, when given, become
    ``(1 - momentum) * running + momentum * (mu_B, var_B * m / (m - 1))``. Eval: the running
    statistics replace ``mu_B`` and ``var_B``.

    Shape:
        input: (N, C) or (N, C, *); running_mean, running_var, weight, bias: (C,).
        Returns a tensor like ``input`` (same strides for contiguous and channels-last input).
    """
    return _run(input, None, running_mean, running_var, weight, bias, training, momentum, eps, 0)


def _save_code(save: str) -> int:
    if save not in SAVE_MODES:
        raise ValueError(f"save must be one of {SAVE_MODES}, got {save!r}")
    return FusedSave(save).code


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
    save: str = "recompute",
) -> torch.Tensor:
    """``relu(batch_norm(x))`` in one pass; ``save`` chooses what the backward keeps.

    The backward gate is ``dl/dy_bn = dl/dy * [gamma * xhat + beta > 0]``. With the default
    ``save="recompute"`` nothing is kept beyond batch norm's own x and statistics.

    Shape:
        as :func:`batch_norm`.
    """
    return _run(
        input, None, running_mean, running_var, weight, bias, training, momentum, eps,
        _save_code(save),
    )  # fmt: skip


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
    save: str = "mask",
) -> torch.Tensor:
    """``relu(batch_norm(x) + z)`` in one pass (ResNet block tail); dz comes out of the same
    backward kernel as dx.

    ``save="mask"`` (default) keeps 1 bit per element; ``"recompute"`` keeps the residual z
    instead; ``"output"`` keeps y.

    Shape:
        input, residual: (N, C) or (N, C, *), same shape and dtype; the rest as
        :func:`batch_norm`.
    """
    if residual is None:
        raise ValueError("batch_norm_add_relu needs a residual tensor; use batch_norm_relu")
    return _run(
        input, residual, running_mean, running_var, weight, bias, training, momentum, eps,
        _save_code(save),
    )  # fmt: skip
