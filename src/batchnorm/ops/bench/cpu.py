"""``batchnorm bench --device cpu``: the C++ CPU kernels against PyTorch's native kernel and
``torch.compile`` (Inductor), with a copy of the same tensor as the bandwidth yardstick.

Providers, timed in one process on the same tensors:

- ``ours``: :func:`batchnorm.ops.cpu.batch_norm` (the kernels of backend ``"cpu"``).
- ``native``: ``torch.nn.functional.batch_norm`` (PyTorch's CPU kernel).
- ``compile``: the same call through ``torch.compile(fullgraph=True, dynamic=False)``,
  compiled once per configuration and warmed up before timing.
- ``copy``: ``out.copy_(x)`` into a tensor allocated once (read x, write a tensor of its size):
  the yardstick; a training forward moves at least the same bytes (plus one read of x for the
  statistics). Not ``x.clone()``: a fresh allocation faults its pages in at every call above
  glibc's mmap threshold (32 MB) and, depending on the allocator's state, below it, which made
  the yardstick itself vary by up to 3x between runs.
- ``floor`` (``train_fwd`` only): ``x.sum()`` then the same copy, timed as one call: a training
  forward that reads all of x for the statistics before it writes y (one read, then one read
  and one write) at the speed of PyTorch's own reduction and copy. It bounds such forwards: where
  the floor takes more than 1.5x the copy, so do they. A kernel that finishes a block of
  channels while the block is still in cache (the planar kernels do) reads it the second time
  from there and can run below the floor. Two calls: on small tensors the floor holds a second
  call's fixed cost (about 1.5 us for ``x.sum()`` of 64 values here).

Modes: ``train_fwd`` (training forward with the running-statistics update, no graph),
``eval_fwd`` (eval forward, no graph), ``fwd_bwd`` (training forward + backward for x, gamma
and beta, as one training step of the layer costs); and the ResNet block tail
``relu(batch_norm(x) + z)``: ``add_relu_fwd`` (training forward, no graph) and
``add_relu_fwd_bwd`` (forward + backward for x, z, gamma and beta), where ``ours`` is the fused
:func:`batchnorm.ops.cpu.batch_norm_relu` (``save="mask"``, as ``batch_norm_add_relu``'s
default) and ``native`` / ``compile`` the composition ``F.relu(F.batch_norm(x) + z)`` (which
Inductor fuses).

Method: for each configuration (shape, layout, dtype, threads, mode) every provider is warmed up,
then the providers are timed in interleaved rounds (one call each per round, in a rotating
order) so that a neighbour's load on a shared machine hits all of them alike; the reported time
is the median over rounds, and each ratio (to the copy, to native, to compile) is the median over
rounds of the ratio of the two calls in the same round, which cancels a neighbour's load that
slows a whole round. Each provider's output is checked against float64 first.

Example:
    batchnorm bench --device cpu --quick
    batchnorm bench --device cpu --threads 1 --threads 2 --csv benchmarks/cpu.csv
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields

import torch

from batchnorm.ops.bench import files

PROVIDERS: tuple[str, ...] = ("ours", "native", "compile")
# Timed beside the providers in the same rounds, as scales: the copy in every mode, the floor
# (a read of x and the copy) in train_fwd.
YARDSTICKS: tuple[str, ...] = ("copy", "floor")
TRAIN_FWD_TARGET, EVAL_FWD_TARGET = 1.5, 1.2  # issue 13's targets, in copy times
MODES: tuple[str, ...] = ("train_fwd", "eval_fwd", "fwd_bwd", "add_relu_fwd", "add_relu_fwd_bwd")
FUSED_MODES: tuple[str, ...] = ("add_relu_fwd", "add_relu_fwd_bwd")


@dataclass(frozen=True)
class CpuShape:
    """One input shape of the CPU suite and the network layer it comes from."""

    shape: tuple[int, ...]
    group: str

    @property
    def name(self) -> str:
        return "x".join(map(str, self.shape))

    def layouts(self) -> tuple[str, ...]:
        return ("nchw", "nhwc") if len(self.shape) == 4 else ("nc",)


# ResNet-18/50 and MobileNetV2 batch-norm layers at batch 8-64 (ImageNet resolution), the shapes
# quoted in issue 13, BatchNorm1d (N, C) cases, and the last stage of ResNets on small inputs
# (32, 64 and 96 pixels: planes of 4x4, 2x2 and 3x3, shorter than a vector or one vector long).
SUITE: list[CpuShape] = [
    CpuShape((32, 64, 56, 56), "resnet-b32"),
    CpuShape((32, 128, 28, 28), "resnet-b32"),
    CpuShape((32, 256, 14, 14), "resnet-b32"),
    CpuShape((32, 512, 7, 7), "resnet-b32"),
    CpuShape((8, 256, 56, 56), "resnet50-b8"),
    CpuShape((16, 512, 28, 28), "resnet50-b16"),
    CpuShape((64, 1024, 14, 14), "resnet50-b64"),
    CpuShape((64, 2048, 7, 7), "resnet50-b64"),
    CpuShape((8, 32, 112, 112), "mobilenetv2-b8"),
    CpuShape((16, 144, 56, 56), "mobilenetv2-b16"),
    CpuShape((64, 192, 28, 28), "mobilenetv2-b64"),
    CpuShape((64, 960, 7, 7), "mobilenetv2-b64"),
    CpuShape((64, 1280), "bn1d"),
    CpuShape((512, 512), "bn1d"),
    CpuShape((8192, 256), "bn1d"),
    CpuShape((64, 512, 4, 4), "resnet18-32px-b64"),
    CpuShape((64, 512, 2, 2), "resnet18-64px-b64"),
    CpuShape((64, 2048, 3, 3), "resnet50-96px-b64"),
]
QUICK: list[CpuShape] = [SUITE[0], SUITE[2], SUITE[13]]


@dataclass
class CpuRow:
    """One provider on one configuration."""

    shape: str
    group: str
    layout: str
    dtype: str
    threads: int
    mode: str
    provider: str
    time_us: float = float("nan")  # median over rounds
    best_us: float = float("nan")  # fastest round
    copy_us: float = float("nan")
    x_copy: float = float("nan")  # median over rounds of time / copy time in the same round
    speedup_vs_native: float = float("nan")
    speedup_vs_compile: float = float("nan")
    rounds: int = 0
    max_rel_err: float = float("nan")
    note: str = ""


# What a CSV of this benchmark holds at least (read_csv, plot_csv), and who writes one.
KEY_COLUMNS = ("shape", "group", "layout", "dtype", "threads", "mode", "provider", "time_us")
WHAT = "batchnorm bench --device cpu"


def _inputs(shape: tuple[int, ...], layout: str, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).mul_(2).add_(0.5).to(dtype)
    dy = torch.randn(shape, generator=gen).to(dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    weight = torch.rand(c, generator=gen).add_(0.5)
    bias = torch.randn(c, generator=gen)
    return x, dy, weight, bias


def _batch_norm_fn(provider: str) -> Callable:
    import torch.nn.functional as F

    if provider == "ours":
        from batchnorm.ops import cpu

        return cpu.batch_norm
    if provider == "native":
        return F.batch_norm

    def plain(x, rm, rv, w, b, training, momentum, eps):
        return F.batch_norm(x, rm, rv, w, b, training, momentum, eps)

    return torch.compile(plain, fullgraph=True, dynamic=False)


def _add_relu_fn(provider: str) -> Callable:
    """relu(batch_norm(x) + z) with x, z first, then batch_norm's other 7 arguments."""
    import torch.nn.functional as F

    if provider == "ours":
        from batchnorm.ops import cpu

        def fused(x, z, rm, rv, w, b, training, momentum, eps):
            return cpu.batch_norm_relu(x, z, rm, rv, w, b, training, momentum, eps, save="mask")

        return fused

    def plain(x, z, rm, rv, w, b, training, momentum, eps):
        return F.relu(F.batch_norm(x, rm, rv, w, b, training, momentum, eps) + z)

    return plain if provider == "native" else torch.compile(plain, fullgraph=True, dynamic=False)


def _residual(x: torch.Tensor) -> torch.Tensor:
    """The block's residual input z: fixed values shaped and laid out like x."""
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(x.shape, generator=gen).to(x.dtype)
    return (
        z.contiguous(memory_format=torch.channels_last)
        if x.dim() == 4 and not (x.is_contiguous())
        else z
    )


def _call(provider: str, mode: str, x, dy, weight, bias) -> Callable[[], torch.Tensor]:
    """The call to time: returns y (forward modes) or dx (fwd_bwd)."""
    c = x.shape[1]
    rm, rv = torch.zeros(c), torch.ones(c)
    if provider == "copy":
        out = torch.empty_like(x)
        return lambda: out.copy_(x)
    if provider == "floor":
        out = torch.empty_like(x)

        def floor() -> torch.Tensor:
            x.sum()  # one read of x: the statistics' least traffic
            return out.copy_(x)

        return floor
    if mode in FUSED_MODES:
        return _call_add_relu(provider, mode, x, dy, weight, bias, rm, rv)
    fn = _batch_norm_fn(provider)
    if mode != "fwd_bwd":
        training = mode == "train_fwd"

        def forward() -> torch.Tensor:
            with torch.no_grad():
                return fn(x, rm, rv, weight, bias, training, 0.1, 1e-5)

        return forward
    xg = x.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    b = bias.detach().clone().requires_grad_(True)

    def step() -> torch.Tensor:
        y = fn(xg, rm, rv, w, b, True, 0.1, 1e-5)
        return torch.autograd.grad(y, (xg, w, b), dy)[0]

    return step


def _call_add_relu(provider, mode, x, dy, weight, bias, rm, rv) -> Callable[[], torch.Tensor]:
    fn = _add_relu_fn(provider)
    z = _residual(x)
    if mode == "add_relu_fwd":

        def forward() -> torch.Tensor:
            with torch.no_grad():
                return fn(x, z, rm, rv, weight, bias, True, 0.1, 1e-5)

        return forward
    xg = x.detach().clone().requires_grad_(True)
    zg = z.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    b = bias.detach().clone().requires_grad_(True)

    def step() -> torch.Tensor:
        y = fn(xg, zg, rm, rv, w, b, True, 0.1, 1e-5)
        return torch.autograd.grad(y, (xg, zg, w, b), dy)[0]

    return step


def _expected(mode: str, x, dy, weight, bias) -> torch.Tensor:
    import torch.nn.functional as F

    c = x.shape[1]
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    grad = mode in ("fwd_bwd", "add_relu_fwd_bwd")
    x64 = x.double().requires_grad_(grad)
    y = F.batch_norm(x64, rm, rv, weight.double(), bias.double(), mode != "eval_fwd", 0.1, 1e-5)
    if mode in FUSED_MODES:
        y = F.relu(y + _residual(x).double())
    if not grad:
        return y.detach()
    return torch.autograd.grad(y, x64, dy.double())[0]


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = float(expected.abs().max().clamp_min(1e-12))
    return float((actual.detach().double() - expected).abs().max()) / scale


def measure(
    shape: CpuShape,
    layout: str,
    dtype: str,
    threads: Iterable[int],
    modes: Iterable[str],
    providers: Iterable[str],
    rounds: int = 30,
    min_seconds: float = 0.3,
    on_row: Callable[[CpuRow], None] | None = None,
) -> list[CpuRow]:
    """Time every provider (and the copy) on one shape and layout, for each mode and thread count.

    Providers are compiled/warmed once per mode; then for each thread count they are timed in
    ``rounds`` interleaved rounds (more if the rounds take under ``min_seconds`` in all).
    """
    torch_dtype = getattr(torch, dtype)
    x, dy, weight, bias = _inputs(shape.shape, layout, torch_dtype)
    rows: list[CpuRow] = []
    before = torch.get_num_threads()
    try:
        for mode in modes:
            torch._dynamo.reset()  # one compiled graph per configuration (no recompile limit)
            expected = _expected(mode, x, dy, weight, bias)
            calls: dict[str, Callable[[], torch.Tensor]] = {
                "copy": _call("copy", mode, x, dy, weight, bias)
            }
            if mode == "train_fwd":
                calls["floor"] = _call("floor", mode, x, dy, weight, bias)
            errors: dict[str, float] = {}
            notes: dict[str, str] = {}
            for provider in providers:
                try:
                    call = _call(provider, mode, x, dy, weight, bias)
                    errors[provider] = _rel_err(call(), expected)  # compiles here
                    calls[provider] = call
                except Exception as exc:  # a provider that fails is reported, not fatal
                    notes[provider] = f"{type(exc).__name__}: {exc}"[:200]
            for n_threads in threads:
                torch.set_num_threads(n_threads)
                times = _interleaved(calls, rounds, min_seconds)
                copy_us = statistics.median(times["copy"])
                medians = {p: statistics.median(t) for p, t in times.items()}

                for provider in [*providers, *(y for y in YARDSTICKS if y in calls)]:
                    row = CpuRow(
                        shape.name,
                        shape.group,
                        layout,
                        dtype,
                        n_threads,
                        mode,
                        provider,
                        copy_us=copy_us,
                        note=notes.get(provider, ""),
                    )
                    if provider in medians:
                        t = medians[provider]
                        row.time_us = t
                        row.best_us = min(times[provider])
                        row.rounds = len(times[provider])
                        row.x_copy = _paired(times, provider, "copy")
                        row.max_rel_err = errors.get(provider, 0.0)
                        if "native" in medians:
                            row.speedup_vs_native = _paired(times, "native", provider)
                        if "compile" in medians:
                            row.speedup_vs_compile = _paired(times, "compile", provider)
                    rows.append(row)
                    if on_row is not None:
                        on_row(row)
    finally:
        torch.set_num_threads(before)
    return rows


def _paired(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of time(a) / time(b) within the same round."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def _interleaved(
    calls: dict[str, Callable[[], object]], rounds: int, min_seconds: float
) -> dict[str, list[float]]:
    """Microseconds per call for each provider, over interleaved rounds in a rotating order."""
    names = list(calls)
    for name in names:  # warm-up: caches, allocator, thread pool
        for _ in range(3):
            calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    r = 0
    while r < rounds or (time.perf_counter() - start < min_seconds and r < 20 * rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            calls[name]()
            times[name].append((time.perf_counter() - t0) * 1e6)
        r += 1
    return times


def environment(threads: Iterable[int]) -> dict[str, str]:
    """Machine and library versions written at the top of the CSV."""
    cpu_name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from batchnorm.ops.cpu import _build

    return {
        "cpu": cpu_name,
        "cores": str(_cores()),
        "torch": torch.__version__,
        "isa": _build.isa(),
        "threads": ",".join(map(str, threads)),
    }


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def write_csv(path: str, rows: list[CpuRow], env: dict[str, str]) -> None:
    """The rows, preceded by ``# key: value`` lines for the environment; written atomically."""
    files.write_csv(
        path,
        [fl.name for fl in fields(CpuRow)],
        (asdict(row) for row in rows),
        preamble=(f"{key}: {value}" for key, value in env.items()),
    )


def format_table(rows: list[CpuRow]) -> str:
    """One line per configuration: times of each provider, ours/copy and the speedups."""
    by_key: dict[tuple, dict[str, CpuRow]] = {}
    for r in rows:
        by_key.setdefault((r.shape, r.layout, r.dtype, r.threads, r.mode), {})[r.provider] = r
    head = (
        f"{'shape':<16} {'layout':<5} {'dtype':<8} {'thr':>3} {'mode':<9} {'copy':>8} "
        f"{'floor':>8} {'ours':>8} {'native':>8} {'compile':>8} {'ours/copy':>9} {'vs nat':>7} "
        f"{'vs comp':>7}"
    )
    lines = [head, "-" * len(head)]

    def us(p: dict[str, CpuRow], name: str) -> str:
        r = p.get(name)
        return f"{r.time_us:8.0f}" if r and r.time_us == r.time_us else f"{'-':>8}"

    for (shape, layout, dtype, threads, mode), p in by_key.items():
        ours = p.get("ours")
        ratio = (
            f"{ours.x_copy:9.2f} {ours.speedup_vs_native:7.2f} {ours.speedup_vs_compile:7.2f}"
            if ours
            else ""
        )
        lines.append(
            f"{shape:<16} {layout:<5} {dtype:<8} {threads:>3} {mode:<9} "
            f"{us(p, 'copy')} {us(p, 'floor')} {us(p, 'ours')} {us(p, 'native')} "
            f"{us(p, 'compile')} "
            f"{ratio}"
        )
    return "\n".join(lines)


def geomean(values: Iterable[float]) -> float:
    vals = [v for v in values if v == v and v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else float("nan")


def summary(rows: list[CpuRow]) -> str:
    """The issue's targets, per thread count: ours/copy for the forwards (median, worst, how
    many within the target), the floor of the training forward beside it, and the geometric
    mean and minimum speedups of fwd_bwd against native and compile."""
    lines = []
    targets = {"train_fwd": TRAIN_FWD_TARGET, "eval_fwd": EVAL_FWD_TARGET}
    for threads in sorted({r.threads for r in rows}):
        ours = [r for r in rows if r.provider == "ours" and r.threads == threads]
        for mode, target in targets.items():
            sel = [r.x_copy for r in ours if r.mode == mode and r.x_copy == r.x_copy]
            if sel:
                within = sum(v <= target for v in sel)
                lines.append(
                    f"{threads} thread(s) {mode}: ours/copy median {statistics.median(sel):.2f}, "
                    f"max {max(sel):.2f} over {len(sel)} configurations, {within} within "
                    f"{target}x"
                )
        floors = _floor_pairs(rows, threads)
        if floors:
            fl = [f.x_copy for _, f in floors]
            over = [o.x_copy / f.x_copy for o, f in floors]
            above = sum(v > TRAIN_FWD_TARGET for v in fl)
            lines.append(
                f"{threads} thread(s) train_fwd floor (x.sum() + the copy): x copy median "
                f"{statistics.median(fl):.2f}, max {max(fl):.2f}, above {TRAIN_FWD_TARGET}x in "
                f"{above} of {len(fl)}; ours / floor median {statistics.median(over):.2f}, "
                f"max {max(over):.2f}"
            )
        for mode in ("fwd_bwd", *FUSED_MODES):
            fb = [r for r in ours if r.mode == mode]
            if fb:
                nat = [r.speedup_vs_native for r in fb]
                comp = [r.speedup_vs_compile for r in fb]
                lines.append(
                    f"{threads} thread(s) {mode}: vs native geomean {geomean(nat):.2f} "
                    f"(min {min(nat):.2f}), vs compile geomean {geomean(comp):.2f} "
                    f"(min {min(comp):.2f}) over {len(fb)} configurations"
                )
    return "\n".join(lines)


def _floor_pairs(rows: list[CpuRow], threads: int) -> list[tuple[CpuRow, CpuRow]]:
    """(ours, floor) rows of the training forwards at this thread count, where both were timed."""
    floor = {
        (r.shape, r.layout, r.dtype): r
        for r in rows
        if r.provider == "floor" and r.threads == threads and r.x_copy == r.x_copy
    }
    return [
        (r, floor[(r.shape, r.layout, r.dtype)])
        for r in rows
        if r.provider == "ours"
        and r.mode == "train_fwd"
        and r.threads == threads
        and r.x_copy == r.x_copy
        and (r.shape, r.layout, r.dtype) in floor
    ]


def read_csv(path: str) -> list[CpuRow]:
    """Rows of a CSV written by :func:`write_csv`."""
    types = {fl.name: fl.type for fl in fields(CpuRow)}
    out = []
    for rec in files.read_csv(path, KEY_COLUMNS, WHAT):
        kwargs: dict[str, object] = {}
        for key, value in rec.items():
            kind = types.get(key)
            if kind in (int, "int"):
                kwargs[key] = int(value)
            elif kind in (float, "float"):
                kwargs[key] = float(value) if value else float("nan")
            elif kind is not None:  # columns of another version are left out
                kwargs[key] = value
        out.append(CpuRow(**kwargs))
    return out


def markdown(rows: list[CpuRow]) -> str:
    """The BENCHMARKS.md table: per configuration, time / copy time of each provider for the
    forwards, and the fwd_bwd speedups of ours over native and compile (paired medians)."""
    by_key: dict[tuple, dict[tuple[str, str], CpuRow]] = {}
    for r in rows:
        key = (r.shape, r.layout, r.dtype, r.threads)
        by_key.setdefault(key, {})[(r.mode, r.provider)] = r

    def ratio(p: dict, mode: str, provider: str) -> str:
        r = p.get((mode, provider))
        return f"{r.x_copy:.2f}" if r is not None and r.x_copy == r.x_copy else "-"

    def speed(p: dict, attr: str) -> str:
        r = p.get(("fwd_bwd", "ours"))
        v = getattr(r, attr) if r is not None else float("nan")
        return f"{v:.2f}" if v == v else "-"

    lines = [
        "| shape | layout | dtype | thr | copy us | train fwd ours / native / compile (x copy) "
        "| train fwd floor (x copy) | eval fwd ours / native / compile (x copy) "
        "| fwd+bwd ours us | vs native | vs compile |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (shape, layout, dtype, threads), p in by_key.items():
        copy = p.get(("train_fwd", "copy")) or next(iter(p.values()))
        fb = p.get(("fwd_bwd", "ours"))
        lines.append(
            f"| {shape} | {layout} | {dtype} | {threads} | {copy.copy_us:.0f} | "
            f"{ratio(p, 'train_fwd', 'ours')} / {ratio(p, 'train_fwd', 'native')} / "
            f"{ratio(p, 'train_fwd', 'compile')} | {ratio(p, 'train_fwd', 'floor')} | "
            f"{ratio(p, 'eval_fwd', 'ours')} / "
            f"{ratio(p, 'eval_fwd', 'native')} / {ratio(p, 'eval_fwd', 'compile')} | "
            f"{fb.time_us if fb else float('nan'):.0f} | {speed(p, 'speedup_vs_native')} | "
            f"{speed(p, 'speedup_vs_compile')} |"
        )
    fused = {k: p for k, p in by_key.items() if any(m in FUSED_MODES for m, _ in p)}
    if fused:
        lines += [
            "",
            "| shape | layout | dtype | thr | relu(bn(x) + z) fwd: ours / native / compile "
            "(x copy) | fwd+bwd ours us | vs native | vs compile |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for (shape, layout, dtype, threads), p in fused.items():
            fb = p.get(("add_relu_fwd_bwd", "ours"))

            def fused_speed(attr: str, fb: CpuRow | None = fb) -> str:
                v = getattr(fb, attr) if fb is not None else float("nan")
                return f"{v:.2f}" if v == v else "-"

            lines.append(
                f"| {shape} | {layout} | {dtype} | {threads} | "
                f"{ratio(p, 'add_relu_fwd', 'ours')} / {ratio(p, 'add_relu_fwd', 'native')} / "
                f"{ratio(p, 'add_relu_fwd', 'compile')} | "
                f"{fb.time_us if fb else float('nan'):.0f} | "
                f"{fused_speed('speedup_vs_native')} | {fused_speed('speedup_vs_compile')} |"
            )
    return "\n".join(lines)


def plot_csv(path: str, out: str) -> str:
    """Bar chart from a CSV of this benchmark: ours / native / compile time over copy time, per
    configuration (fwd_bwd and train_fwd), one panel per thread count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = files.read_csv(path, KEY_COLUMNS, WHAT)
    rows = [r for r in rows if r["dtype"] == rows[0]["dtype"]]
    threads = sorted({int(r["threads"]) for r in rows})
    modes = [m for m in ("train_fwd", "fwd_bwd") if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(
        len(modes), len(threads), figsize=(7 * len(threads), 4.5 * len(modes)), squeeze=False
    )
    for i, mode in enumerate(modes):
        for j, t in enumerate(threads):
            ax = axes[i][j]
            sel = [r for r in rows if r["mode"] == mode and int(r["threads"]) == t]
            keys = list(dict.fromkeys((r["shape"], r["layout"]) for r in sel))
            width = 0.27
            for k, provider in enumerate(PROVIDERS):
                vals = []
                for key in keys:
                    match = [
                        r
                        for r in sel
                        if (r["shape"], r["layout"]) == key and r["provider"] == provider
                    ]
                    vals.append(
                        float(match[0]["x_copy"]) if match and match[0]["x_copy"] else float("nan")
                    )
                ax.bar([p + (k - 1) * width for p in range(len(keys))], vals, width, label=provider)
            if mode == "train_fwd":  # the target, and the floor (a read of x + the copy)
                ax.axhline(TRAIN_FWD_TARGET, color="k", lw=0.8, ls="--")
                floor = [
                    next(
                        (
                            float(r["x_copy"])
                            for r in sel
                            if (r["shape"], r["layout"]) == key
                            and r["provider"] == "floor"
                            and r["x_copy"]
                        ),
                        float("nan"),
                    )
                    for key in keys
                ]
                if any(v == v for v in floor):  # a level across each configuration's bars
                    at = range(len(keys))
                    ax.hlines(floor, [p - 1.5 * width for p in at], [p + 1.5 * width for p in at],
                              colors="k", lw=2, zorder=3, label="floor: read + copy")  # fmt: skip
            ax.set_xticks(range(len(keys)))
            ax.set_xticklabels([f"{s} {lay}" for s, lay in keys], rotation=75, fontsize=7)
            ax.set_ylabel("time / copy time")
            ax.set_title(f"{mode}, {t} thread(s)")
            ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        return files.save_figure(fig, out)
    finally:
        plt.close(fig)


def main(args) -> int:
    """``batchnorm bench --device cpu`` (called by :func:`batchnorm.ops.bench.main`)."""
    import sys

    from batchnorm.ops import cpu

    if cpu.load() is None:
        print(
            f"batchnorm bench: the C++ CPU kernels cannot run here: {cpu.status()[1]}",
            file=sys.stderr,
        )
        return 2
    shapes = QUICK if args.quick else SUITE
    if args.shape:
        shapes = [s for s in shapes if any(f in s.name for f in args.shape)]
    if args.group:
        shapes = [s for s in shapes if s.group in args.group]
    if not shapes:
        from batchnorm.ops.bench import no_shape_matches

        print(no_shape_matches(args, QUICK if args.quick else SUITE), file=sys.stderr)
        return 2
    modes = [m for m in (args.mode or MODES) if m in MODES]
    if not modes:
        print(f"batchnorm bench --device cpu: modes are {', '.join(MODES)}", file=sys.stderr)
        return 2
    providers = [p for p in (args.provider or PROVIDERS) if p in PROVIDERS]
    threads = args.threads or [1, 2]
    dtypes = [d for d in (args.dtype or ["float32"]) if d in ("float32", "bfloat16")]
    layouts = args.layout or ["nchw", "nhwc"]
    env = environment(threads)
    print(", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    rows: list[CpuRow] = []

    def progress(row: CpuRow) -> None:
        if row.provider == "ours":
            print(
                f"  {row.shape} {row.layout} {row.dtype} {row.threads}t {row.mode}: "
                f"ours {row.time_us:.0f} us = {row.x_copy:.2f}x copy, "
                f"{row.speedup_vs_native:.2f}x native, {row.speedup_vs_compile:.2f}x compile",
                flush=True,
            )

    for shape in shapes:
        for layout in shape.layouts():
            if layout != "nc" and layout not in layouts:
                continue
            for dtype in dtypes:
                rows += measure(
                    shape,
                    layout,
                    dtype,
                    threads,
                    modes,
                    providers,
                    rounds=args.reps,
                    on_row=progress,
                )
    print()
    print(format_table(rows))
    print()
    print(summary(rows))
    print()
    print(markdown(rows))
    write_csv(args.csv, rows, env)
    print(f"wrote {args.csv} ({len(rows)} rows)")
    return 0
