"""Measure providers x modes x shapes x dtypes x layouts on a GPU.

For every configuration the harness builds the inputs once, checks the provider's output against
float64 (relative error of y, or of dx for backward passes), then times it:

- ``time_us``: median over repetitions of the device time between CUDA events around one call,
  with L2 flushed before each repetition (a write of twice the L2 size): per-call time, cold L2;
  it includes launch gaps when the Python launch path is slower than the kernels.
- ``hot_us``: the same without the flush (the input may be in L2).
- ``kernel_us``: the device time of the call's kernels alone (torch.profiler), and their names.

Bandwidth is the cost model's minimal bytes (:mod:`.suite`) over ``time_us``, as GB/s and as % of
the copy bandwidth measured at start-up. Speedups compare ``time_us`` with the same
configuration's eager and compile rows.

The timer is a parameter so the pipeline (inputs, checks, rows, report) also runs on the CPU in
tests, with a stand-in timer; only a CUDA device gives numbers worth reporting.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from batchnorm.ops.bench.suite import BenchShape, element_size, min_bytes

Timer = Callable[[Callable[[], object], bool], float]  # (fn, flush_l2) -> microseconds


@dataclass
class Row:
    """One measured configuration."""

    shape: str
    group: str
    dtype: str
    layout: str
    mode: str
    provider: str
    time_us: float = float("nan")
    hot_us: float = float("nan")
    kernel_us: float = float("nan")
    bytes: int = 0
    gbps: float = float("nan")
    pct_copy: float = float("nan")
    speedup_vs_eager: float = float("nan")
    speedup_vs_compile: float = float("nan")
    max_rel_err: float = float("nan")
    kernels: str = ""
    plan: str = ""
    note: str = ""


@dataclass
class Config:
    """What to run (the CLI's filters)."""

    shapes: list[BenchShape]
    dtypes: tuple[str, ...]
    layouts: tuple[str, ...]
    modes: tuple[str, ...]
    providers: tuple[str, ...]
    reps: int = 50
    warmup: int = 10
    profile: bool = True
    eps: float = 1e-5
    momentum: float = 0.1
    overrides: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# Timing on a CUDA device
# ------------------------------------------------------------------------------------------------


class CudaTimer:
    """Median device time of ``fn`` between CUDA events, optionally flushing L2 first."""

    def __init__(self, device: torch.device, reps: int = 50, warmup: int = 10) -> None:
        props = torch.cuda.get_device_properties(device)
        l2 = int(getattr(props, "L2_cache_size", 0) or (50 << 20))
        self.flush_buffer = torch.empty(2 * l2 // 4 + 1, dtype=torch.int32, device=device)
        self.reps, self.warmup = reps, warmup

    def __call__(self, fn: Callable[[], object], flush: bool) -> float:
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for start, end in zip(starts, ends):
            if flush:
                self.flush_buffer.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return 1000.0 * statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def copy_bandwidth_gbps(device: torch.device, numel: int = 1 << 28) -> float:
    """GB/s of ``y.copy_(x)`` on a large float32 tensor (1 GiB by default), read + write."""
    x = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    timer = CudaTimer(device, reps=20, warmup=5)
    us = timer(lambda: y.copy_(x), True)
    return 2 * numel * 4 / (us * 1e-6) / 1e9


def kernel_profile(fn: Callable[[], object], calls: int = 5) -> tuple[float, str]:
    """(device microseconds per call, kernel names) of ``fn`` from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total, names = 0.0, []
    for event in prof.events():
        device_us = getattr(event, "device_time", None)
        if device_us is None:
            device_us = getattr(event, "cuda_time", 0.0)
        if getattr(event, "device_type", None) is not None and "CUDA" in str(event.device_type):
            total += device_us
            if event.name not in names:
                names.append(event.name)
    return total / calls, ";".join(names)


# ------------------------------------------------------------------------------------------------
# Providers and passes
# ------------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    x: torch.Tensor
    z: torch.Tensor
    dy: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor


def make_inputs(shape: tuple[int, ...], dtype: str, layout: str, device: str) -> Inputs:
    """Random inputs; parameters and running statistics in float32 (AMP convention)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    torch_dtype = getattr(torch, dtype)
    c = shape[1]

    def activation() -> torch.Tensor:
        t = torch.randn(shape, generator=gen).to(device=device, dtype=torch_dtype)
        if layout == "nhwc":
            t = t.to(memory_format=torch.channels_last)
        return t

    x, z, dy = activation(), activation(), activation()
    return Inputs(
        x=x,
        z=z,
        dy=dy,
        weight=torch.rand(c, generator=gen).add(0.5).to(device),
        bias=torch.randn(c, generator=gen).to(device),
        running_mean=torch.zeros(c, device=device),
        running_var=torch.ones(c, device=device),
    )


def _torch_function(mode: str) -> Callable:
    """The pass written with torch ops (the eager and compile baselines)."""
    import torch.nn.functional as F

    def forward(x, z, w, b, rm, rv, training, momentum, eps):
        y = F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
        if mode.startswith("add_relu"):
            return torch.relu(y + z)
        if mode.startswith("relu"):
            return torch.relu(y)
        return y

    return forward


def _our_function(mode: str) -> Callable:
    from batchnorm import ops

    def forward(x, z, w, b, rm, rv, training, momentum, eps):
        if mode.startswith("add_relu"):
            return ops.batch_norm_add_relu(x, z, rm, rv, w, b, training, momentum, eps)
        if mode.startswith("relu"):
            return ops.batch_norm_relu(x, rm, rv, w, b, training, momentum, eps)
        return ops.batch_norm(x, rm, rv, w, b, training, momentum, eps)

    return forward


def build_call(
    provider: str, mode: str, inputs: Inputs, config: Config
) -> tuple[Callable[[], object], Callable[[], torch.Tensor]]:
    """(the call to time, a function returning the value to check) for one configuration.

    Forward modes time the forward call (training forwards update the running statistics each
    time, as in training). Backward modes run the forward once and time the backward pass alone
    (``retain_graph=True`` keeps what it saved).
    """
    if provider == "ours":
        fn = _our_function(mode)
    elif provider == "eager":
        fn = _torch_function(mode)
    elif provider == "compile":
        fn = torch.compile(_torch_function(mode), fullgraph=True, dynamic=False)
    else:
        raise ValueError(f"unknown provider {provider!r}")
    training = mode != "eval_fwd"
    i = inputs
    args = (i.weight, i.bias, i.running_mean, i.running_var, training, config.momentum, config.eps)

    if not mode.endswith("bwd"):

        def call() -> torch.Tensor:
            return fn(i.x, i.z, *args)

        return call, call

    x = i.x.detach().clone().requires_grad_(True)
    z = i.z.detach().clone().requires_grad_(True)
    w = i.weight.detach().clone().requires_grad_(True)
    b = i.bias.detach().clone().requires_grad_(True)
    wants = [x, w, b] + ([z] if mode.startswith("add_relu") else [])
    y = fn(x, z, w, b, *args[2:])

    def backward() -> torch.Tensor:
        return torch.autograd.grad(y, wants, i.dy, retain_graph=True)[0]

    return backward, backward


def reference_value(mode: str, inputs: Inputs, config: Config) -> torch.Tensor:
    """y (forward modes) or dx (backward modes) in float64 from torch ops."""
    i = inputs
    fn = _torch_function(mode)
    x = i.x.detach().double().requires_grad_(True)
    z = i.z.detach().double()
    rm, rv = i.running_mean.double().clone(), i.running_var.double().clone()
    training = mode != "eval_fwd"
    y = fn(x, z, i.weight.double(), i.bias.double(), rm, rv, training, config.momentum, config.eps)
    if not mode.endswith("bwd"):
        return y.detach()
    return torch.autograd.grad(y, x, i.dy.double())[0]


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = float(expected.abs().max().clamp_min(1e-12))
    return float((actual.double() - expected).abs().max()) / scale


def run(
    config: Config,
    timer: Timer,
    device: str,
    copy_gbps: float,
    profile: Callable[[Callable[[], object]], tuple[float, str]] | None = None,
    on_row: Callable[[Row], None] | None = None,
) -> list[Row]:
    """Measure every configuration; return the rows (speedups filled in at the end)."""
    from batchnorm.ops import _plan
    from batchnorm.ops._layout import kernel_layout

    rows: list[Row] = []
    for bench_shape in config.shapes:
        for dtype in config.dtypes:
            for layout in bench_shape.layouts():
                if layout != "nc" and layout not in config.layouts:
                    continue
                inputs = make_inputs(bench_shape.shape, dtype, layout, device)
                for mode in config.modes:
                    expected = reference_value(mode, inputs, config)
                    nbytes = min_bytes(mode, bench_shape.numel, element_size(dtype))
                    for provider in config.providers:
                        row = Row(
                            bench_shape.name, bench_shape.group, dtype, layout, mode, provider,
                            bytes=nbytes,
                        )  # fmt: skip
                        try:
                            with _plan.override(**config.overrides):
                                _measure(row, provider, mode, inputs, config, timer, profile,
                                         expected)  # fmt: skip
                                if provider == "ours":
                                    _, view = kernel_layout(inputs.x)
                                    plan = _plan.make_plan(
                                        view, inputs.x.element_size(), "add_relu" in mode,
                                        _device_index(inputs.x),
                                    )  # fmt: skip
                                    row.plan = _plan.describe(plan)
                        except Exception as exc:  # a failed configuration is reported, not fatal
                            row.note = f"{type(exc).__name__}: {exc}"[:200]
                        if row.time_us == row.time_us:  # not NaN
                            row.gbps = nbytes / (row.time_us * 1e-6) / 1e9
                            row.pct_copy = 100.0 * row.gbps / copy_gbps if copy_gbps else 0.0
                        rows.append(row)
                        if on_row is not None:
                            on_row(row)
    fill_speedups(rows)
    return rows


def _device_index(x: torch.Tensor) -> int | None:
    return x.device.index if x.device.type == "cuda" else None


def _measure(row, provider, mode, inputs, config, timer, profile, expected) -> None:
    call, value = build_call(provider, mode, inputs, config)
    row.max_rel_err = _rel_err(value(), expected)
    row.time_us = timer(call, True)
    row.hot_us = timer(call, False)
    if profile is not None and config.profile:
        row.kernel_us, row.kernels = profile(call)


def fill_speedups(rows: Iterable[Row]) -> None:
    """speedup_vs_eager / _compile = baseline time / this row's time, per configuration."""
    rows = list(rows)
    by_key = {(r.shape, r.dtype, r.layout, r.mode, r.provider): r for r in rows}
    for r in rows:
        for baseline, attr in (("eager", "speedup_vs_eager"), ("compile", "speedup_vs_compile")):
            base = by_key.get((r.shape, r.dtype, r.layout, r.mode, baseline))
            if base is not None and base.time_us == base.time_us and r.time_us > 0:
                setattr(r, attr, base.time_us / r.time_us)
