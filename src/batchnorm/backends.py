"""Choosing the implementation behind :func:`batchnorm.functional.batch_norm`.

Backends:

- ``"torch"``: PyTorch's own native kernel (cuDNN on CUDA). The default on the CPU.
- ``"explicit"``: pure torch ops with the paper's hand-derived backward pass
  (:mod:`batchnorm.explicit`). Slower; it exists to check the others against the paper.
- ``"triton"``: the project's Triton kernels (:mod:`batchnorm.ops`), for CUDA tensors (or the CPU
  under the Triton interpreter, ``TRITON_INTERPRET=1``, for testing).
- ``"cpu"``: the project's C++ kernels for CPU tensors in float32 and bfloat16
  (:mod:`batchnorm.ops.cpu`), compiled once on first use and cached; where no compiler is
  available it falls back to ``"torch"`` with a warning (``batchnorm env`` tells which).
- ``"auto"``: ``"triton"`` for CUDA tensors in float32, float16 or bfloat16 when Triton can run;
  on the CPU, ``"cpu"`` for the dtypes in :data:`CPU_AUTO_DTYPES` (where BENCHMARKS.md measured
  it faster) when its kernels can run; else ``"torch"`` (always while ``torch.export`` traces or
  ``torch.compile`` compiles: those graphs hold standard ATen ops; and inside torch.func
  transforms, which the C++ kernels' autograd nodes do not support). BENCHMARKS.md tells how to
  measure them.

The choice, strongest first: the ``backend=`` argument of a call or layer, the innermost
:func:`use_backend` context, the ``BATCHNORM_BACKEND`` environment variable, then ``"auto"``.
A backend that cannot run an input (Triton with float64, or with no GPU) falls back to ``"torch"``
visibly: a warning is issued once per reason, and :func:`last_backend` tells what actually ran.

Example:
    >>> import batchnorm.backends as backends
    >>> with backends.use_backend("explicit"):
    ...     backends.requested_backend()
    'explicit'
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from collections.abc import Iterator

from batchnorm.modes import functorch_active, triton_interpreting

BACKENDS: tuple[str, ...] = ("auto", "torch", "explicit", "triton", "cpu")
# The CPU dtypes for which "auto" picks the C++ kernels. Empty: on the measured suite
# (BENCHMARKS.md, CPU section) they win clearly on NCHW but not on every channels-last and (N, C)
# shape, and this choice sees only the device and dtype; "cpu" is opt-in until it wins on all.
CPU_AUTO_DTYPES: tuple[str, ...] = ()
# Finer: the (dtype, layout, training) cases for which "auto" picks the C++ kernels on the CPU,
# layout being "planar" (contiguous NCHW or NCDHW), "channels_last", "nc" ((N, C)) or "other"
# (see input_layout). Empty: BENCHMARKS.md ("The auto choice") says what a switch still needs.
# A layer remembers its choice per call signature (layout included), so it costs nothing per call.
CPU_AUTO_CASES: frozenset[tuple[str, str, bool]] = frozenset()
ENV_VAR = "BATCHNORM_BACKEND"


def _env_reader():
    """A callable giving the raw value of ``ENV_VAR`` (None when unset), cheap enough per call.

    ``os.environ.get`` costs about a microsecond (key encoding, and a KeyError caught when the
    variable is unset); the mapping behind ``os.environ`` (``_data``, updated by every
    ``os.environ[...] = ...`` and ``del``) answers the same question in tens of nanoseconds. The
    value is raw (bytes on POSIX): fit for noticing a change, not for reading the choice.
    """
    data, encode = getattr(os.environ, "_data", None), getattr(os.environ, "encodekey", None)
    if isinstance(data, dict) and callable(encode):
        return functools.partial(data.get, encode(ENV_VAR))
    return functools.partial(os.environ.get, ENV_VAR)  # pragma: no cover - other platforms


env_value = _env_reader()


class _ThreadState(threading.local):
    """Per-thread state: the :func:`use_backend` stack and the last backend that ran.

    Class-level defaults (not attributes created on first use): a new thread sees the same
    values as the first one did, so ``torch.compile``'s guards on them hold in every thread and
    a compiled model is not compiled again there.
    """

    stack: tuple[str, ...] = ()
    last: str | None = None


_local = _ThreadState()
_warned: set[str] = set()


def _check_name(name: str, where: str) -> str:
    key = name.strip().lower()
    if key not in BACKENDS:
        raise ValueError(
            f"unknown batch-norm backend {name!r} (from {where}); "
            f"choose one of {', '.join(BACKENDS)}"
        )
    return key


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within the block, batch norm calls without an explicit ``backend=`` use ``name``."""
    previous = _local.stack
    _local.stack = (*previous, _check_name(name, "use_backend()"))
    try:
        yield
    finally:
        _local.stack = previous


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for, before checking that it can run the input."""
    if backend is not None:
        return _check_name(backend, "the backend= argument")
    stack = _local.stack
    if stack:
        return stack[-1]
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_name(env, f"the {ENV_VAR} environment variable")
    return "auto"


def triton_status() -> tuple[bool, str]:
    """Whether the Triton backend can run here, and why not if it cannot."""
    try:
        from batchnorm import ops
    except ImportError as exc:  # pragma: no cover - ops ships with the package
        return False, f"batchnorm.ops failed to import: {exc}"
    status = getattr(ops, "triton_status", None)
    if status is None:
        return False, "the Triton kernels are not part of this build"
    return status()


def cpu_status(load: bool = False) -> tuple[bool, str]:
    """Whether the C++ CPU kernels can run here, and how; ``load=True`` builds them if needed."""
    try:
        from batchnorm.ops import cpu
    except ImportError as exc:  # pragma: no cover - ops.cpu ships with the package
        return False, f"batchnorm.ops.cpu failed to import: {exc}"
    if load and cpu.ready():
        return True, ""
    return cpu.status()


_FORWARD_AD_REASON = (
    "forward-mode AD (torch.autograd.forward_ad) needs PyTorch's own ops: these kernels have no "
    "forward-mode formula"
)
_FUNCTORCH_REASON = "torch.func transforms need PyTorch's own ops"


# The norms with native kernels of their own, which accept eps = 0; any other ``norm`` given to
# resolve() is a layer's class name whose native path is torch's batch-norm kernel.
_OWN_KERNEL_NORMS = frozenset({"layer_norm", "group_norm", "instance_norm"})


def resolve(
    backend: str | None,
    *,
    device_type: str,
    dtype_name: str,
    zero_eps: bool = False,
    norm: str = "batch_norm",
    layout: str | None = None,
    training: bool = False,
    forward_ad: bool = False,
) -> str:
    """The backend that will run: the request, or a fallback (with a warning) if it cannot.

    ``norm`` names the operation: ``"batch_norm"`` (every backend), or another norm
    (``"layer_norm"``, ``"group_norm"``, ``"instance_norm"``, ``"ghost_batch_norm"``), which has
    PyTorch's native kernel (``"torch"``, also what ``"auto"`` picks) and the primitives
    (``"explicit"``) but no Triton kernels: asking for ``"triton"`` warns once and runs ``"torch"``.

    ``zero_eps``: the call normalizes with batch statistics and ``eps == 0`` (as in the theory of
    Yang et al. 2019). PyTorch's native kernel refuses that, and the Triton kernels' float32
    statistics round a variance under 1e-38 to 0 (inf outputs), so ``"torch"`` and ``"triton"``
    become ``"explicit"`` (float64 statistics at such eps), silently under ``"auto"`` and with a
    warning when one of them was asked for; also where ``"cpu"`` falls back. The C++ CPU kernels
    handle it (they measure such channels again in float64).

    For the other norms ``zero_eps`` (statistics of the input, ``eps == 0``) turns ``"auto"``
    into ``"explicit"`` too: PyTorch's layer, group and instance norm accept eps = 0 but keep
    float32 statistics (off by 10-25 % at a spread of 1e-22, inf at 1e-24). An explicit
    ``"torch"`` stays PyTorch's, except for the layers named by their class (ghost batch norm and
    its subclasses), whose native path is the batch-norm kernel that refuses it.

    ``layout`` (:func:`input_layout`) and ``training`` (batch statistics) matter only to ``"auto"``
    on the CPU, through :data:`CPU_AUTO_CASES`.

    ``forward_ad``: an input carries a forward-mode tangent (:func:`modes.forward_ad_active`).
    The C++ CPU and Triton kernels have no forward-mode formula (the C++ node would drop the
    tangent silently), so ``"cpu"`` and ``"triton"`` become ``"torch"``, with a warning.
    """
    name = requested_backend(backend)
    if norm != "batch_norm":
        if name in ("triton", "cpu"):
            kernels = "Triton" if name == "triton" else "C++ CPU"
            _warn_once(
                f"{norm}: the {kernels} kernels do not cover this norm yet; using 'torch' "
                "(PyTorch's native kernel)"
            )
        asked = name
        name = "explicit" if name == "explicit" else "torch"
        if zero_eps and name == "torch":
            if asked == "auto":
                name = "explicit"
            elif norm not in _OWN_KERNEL_NORMS:  # a batch-statistics layer: torch's batch norm
                _warn_once(
                    f"{norm}: PyTorch's native kernel refuses eps=0 with batch statistics; "
                    "using the 'explicit' backend (float64 statistics)"
                )
                name = "explicit"
        _local.last = name
        return name
    if zero_eps and name in ("auto", "torch", "triton"):
        if name != "auto":
            why = (
                "PyTorch's native kernel refuses eps=0 with batch statistics"
                if name == "torch"
                else "at eps=0 the Triton kernels' float32 statistics round a variance under "
                "1e-38 to 0 (inf outputs)"
            )
            _warn_once(f"batch norm: {why}; using the 'explicit' backend (float64 statistics)")
        _local.last = "explicit"
        return "explicit"
    if name == "auto":
        if _exporting():
            # An exported program (torch.export, ONNX) should hold standard ATen ops that any
            # runtime can run, not this package's custom ops.
            name = "torch"
        elif (
            device_type == "cpu"
            and (dtype_name in CPU_AUTO_DTYPES or (dtype_name, layout, training) in CPU_AUTO_CASES)
            and not _compiling()
            and not functorch_active()
            and not forward_ad
        ):
            name = "cpu" if cpu_status(load=True)[0] else "torch"
        else:
            name = _auto_choice(device_type, dtype_name, os.environ.get("TRITON_INTERPRET", ""))
    if name == "triton":
        ok, reason = triton_status()
        if ok and dtype_name == "float64":
            ok, reason = (
                False,
                "the Triton kernels handle float32, float16 and bfloat16, not float64",
            )
        if ok and forward_ad:
            ok, reason = False, _FORWARD_AD_REASON
        if ok and functorch_active():
            ok, reason = False, _FUNCTORCH_REASON
        if ok and device_type != "cuda" and not triton_interpreting():
            ok, reason = (
                False,
                f"the Triton kernels need a CUDA tensor (got a {device_type} tensor)",
            )
        if not ok:
            _warn_once(f"batch norm: backend 'triton' unavailable ({reason}); using 'torch'")
            name = "torch"
    if name == "cpu":
        ok, reason = True, ""
        if device_type != "cpu":
            ok, reason = False, f"the C++ kernels need a CPU tensor (got a {device_type} tensor)"
        elif dtype_name not in ("float32", "bfloat16"):
            ok, reason = False, f"the C++ kernels handle float32 and bfloat16, not {dtype_name}"
        elif _compiling():
            ok, reason = False, "torch.compile traces standard ATen ops"
        elif functorch_active():
            ok, reason = False, _FUNCTORCH_REASON
        elif forward_ad:
            ok, reason = False, _FORWARD_AD_REASON
        else:
            ok, reason = cpu_status(load=True)
        if not ok:
            name = "explicit" if zero_eps else "torch"  # torch refuses eps=0 (above)
            _warn_once(f"batch norm: backend 'cpu' unavailable ({reason}); using '{name}'")
    _local.last = name
    return name


def input_layout(input) -> str:
    """The memory layout that :data:`CPU_AUTO_CASES` distinguishes: "nc" for (N, C), "planar"
    for contiguous (N, C, H, W) and (N, C, D, H, W), "channels_last" for their channels-last
    forms, "other" otherwise (strided views, (N, C, L)).

    >>> import torch
    >>> [input_layout(torch.ones(s)) for s in [(2, 3), (2, 3, 4), (2, 3, 4, 4)]]
    ['nc', 'other', 'planar']
    >>> input_layout(torch.ones(2, 3, 4, 4).contiguous(memory_format=torch.channels_last))
    'channels_last'
    """
    import torch

    dims = input.dim()
    if dims == 2:
        return "nc"
    if dims in (4, 5):
        if input.is_contiguous():
            return "planar"
        fmt = torch.channels_last if dims == 4 else torch.channels_last_3d
        if input.is_contiguous(memory_format=fmt):
            return "channels_last"
    return "other"


def _compiling() -> bool:
    """Whether torch.compile (Dynamo) is tracing the call: the C++ kernels are opaque to it."""
    import torch

    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling is not None and is_compiling())


_auto_cache: dict[tuple[str, str, str], str] = {}


def _exporting() -> bool:
    """Whether ``torch.export`` (or an exporter built on it) is tracing the call."""
    import torch

    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())


def _auto_choice(device_type: str, dtype_name: str, interpret: str) -> str:
    # Decided without the cache where the answer is fixed (not CUDA, or a dtype the kernels do
    # not take): a compiled graph then guards on no cache entry, and is not compiled again when
    # the cache fills. Cached in a plain dict otherwise (torch.compile traces it); TRITON_INTERPRET
    # is part of the key because triton_status depends on it.
    if device_type != "cuda" or dtype_name not in ("float32", "float16", "bfloat16"):
        return "torch"
    key = (device_type, dtype_name, interpret)
    if key not in _auto_cache:
        supported = dtype_name in ("float32", "float16", "bfloat16")
        use_triton = device_type == "cuda" and supported and triton_status()[0]
        _auto_cache[key] = "triton" if use_triton else "torch"
    return _auto_cache[key]


def last_backend() -> str | None:
    """The backend that ran the most recent batch norm call in this thread (None before any)."""
    return _local.last


def _warn_once(message: str) -> None:
    if _compiling():
        # warnings.warn is opaque to Dynamo: it would split the compiled graph. A compiled graph
        # holds standard ATen ops by design (the module's docstring), so nothing is lost.
        return
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def auto_summary() -> str:
    """What ``"auto"`` resolves to here, per device type and dtype, as one line (``batchnorm
    env``): the resolution itself is run, so the line cannot drift from the rule.

    >>> "cpu:" in auto_summary() and "cuda:" in auto_summary()
    True
    """
    previous = _local.last
    parts = []
    for device_type in ("cpu", "cuda"):
        choices: dict[str, list[str]] = {}
        for dtype_name in ("float32", "bfloat16", "float16", "float64"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                name = resolve("auto", device_type=device_type, dtype_name=dtype_name)
            choices.setdefault(name, []).append(dtype_name)
        parts.append(
            f"{device_type}: "
            + ", ".join(f"{name} ({', '.join(dtypes)})" for name, dtypes in choices.items())
        )
    for dtype_name, layout, training in sorted(CPU_AUTO_CASES):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            name = resolve(
                "auto", device_type="cpu", dtype_name=dtype_name, layout=layout, training=training
            )
        mode = "training" if training else "eval"
        parts.append(f"cpu {dtype_name} {layout} {mode}: {name}")
    _local.last = previous
    return "; ".join(parts)


def available() -> dict[str, tuple[bool, str]]:
    """Each backend with whether it can run here and a one-line reason."""
    import torch

    triton_ok, triton_reason = triton_status()
    return {
        "torch": (True, f"PyTorch {torch.__version__} native kernel"),
        "explicit": (True, "pure torch ops, the paper's backward written out"),
        "triton": (triton_ok, triton_reason),
        "cpu": cpu_status(),
    }
