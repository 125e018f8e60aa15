"""``batchnorm bench``: the GPU benchmark of the Triton kernels against PyTorch; with
``--device cpu``, the CPU benchmark of the C++ kernels (:mod:`.cpu`).

Providers (ours, eager, compile) x modes (train_fwd, eval_fwd, bwd, relu_fwd/bwd,
add_relu_fwd/bwd) x the shape suite of GPU_BENCHMARKS.md x dtypes x layouts; prints a table and
writes a CSV with the GPU, driver, CUDA, torch, Triton and cuDNN versions. See BENCHMARKS.md for
the method and the cost model. ``--mode memory`` reports the bytes autograd keeps for each
fused variant instead of times.

Example:
    batchnorm bench --quick
    batchnorm bench --dtype bfloat16 --layout nhwc --mode train_fwd --mode bwd --csv bn.csv
    batchnorm bench --device cpu --threads 1 --threads 2 --csv benchmarks/cpu.csv
"""

from __future__ import annotations

import argparse
import sys

from batchnorm.ops.bench import files
from batchnorm.ops.bench.suite import DTYPES, LAYOUTS, MODES, PROVIDERS, QUICK, SUITE

CPU_MODES = (
    "fwd_bwd",
    "add_relu_fwd_bwd",
)  # the CPU benchmark's modes beyond the GPU ones (train_fwd, eval_fwd, add_relu_fwd)
CPU_PROVIDERS = ("native",)

NEEDS_GPU = (
    "batchnorm bench needs a CUDA GPU: it times kernels on the device (CUDA events, L2 flushes, "
    "torch.profiler). No CUDA device is visible here (torch.cuda.is_available() is False). Run "
    "it on a machine with an NVIDIA GPU and Triton installed (pip install 'batchnorm[triton]'); "
    "to check the kernels' correctness on the CPU, run the tests (TRITON_INTERPRET=1). To "
    "benchmark the C++ CPU kernels here instead: batchnorm bench --device cpu."
)


def _positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``bench`` sub-command to the ``batchnorm`` CLI."""
    p = subparsers.add_parser(
        "bench",
        help="benchmark the kernels against PyTorch (GPU; --device cpu for the CPU ones)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cuda: the Triton kernels (default); cpu: the C++ kernels against native and compile",
    )
    p.add_argument("--quick", action="store_true", help="4 shapes, bfloat16, a minute or so")
    p.add_argument(
        "--mode", action="append", choices=[*MODES, "memory", *CPU_MODES], help="pass (repeatable)"
    )
    p.add_argument(
        "--threads",
        action="append",
        type=_positive_int,
        help="--device cpu: torch threads (repeatable)",
    )
    p.add_argument("--dtype", action="append", choices=DTYPES, help="dtype (repeatable)")
    p.add_argument("--layout", action="append", choices=LAYOUTS, help="4-D layout (repeatable)")
    p.add_argument(
        "--provider", action="append", choices=[*PROVIDERS, *CPU_PROVIDERS], help="(repeatable)"
    )
    p.add_argument("--shape", action="append", help="substring of a shape name, e.g. 64x64x112")
    p.add_argument("--group", action="append", help="shape group, e.g. resnet50-b64, bn1d")
    p.add_argument("--reps", type=_positive_int, default=50, help="timed repetitions (median)")
    p.add_argument("--no-profile", action="store_true", help="skip torch.profiler kernel times")
    p.add_argument("--csv", default="bench.csv", help="CSV output path (default bench.csv)")
    p.add_argument(
        "--plot",
        metavar="CSV",
        help="no benchmark: draw %% of copy bandwidth from an earlier CSV into CSV's name .png",
    )
    p.add_argument(
        "--plan",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="force a kernel plan setting for 'ours' (block_a, block_c, block_b, num_warps, "
        "fused, splits), e.g. --plan fused=0 --plan splits=264",
    )
    p.set_defaults(func=main)


def _parse_plan(items: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--plan expects KEY=VALUE, got {item!r}")
        if key in ("fused", "index_64"):
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            out[key] = int(value)
    return out


def select_shapes(args: argparse.Namespace):
    shapes = QUICK if args.quick else SUITE
    if args.group:
        shapes = [s for s in shapes if s.group in args.group]
    if args.shape:
        shapes = [s for s in shapes if any(f in s.name for f in args.shape)]
    return shapes


def no_shape_matches(args: argparse.Namespace, suite) -> str:
    """The error for filters that leave no shape: what was asked and what there is."""
    asked = [f"--shape {f}" for f in args.shape or []] + [f"--group {g}" for g in args.group or []]
    groups = sorted({s.group for s in suite})
    return (
        f"batchnorm bench: no shape matches {' '.join(asked) or 'the filters'}"
        f"{' with --quick' if args.quick else ''}. Shapes: {', '.join(s.name for s in suite)}; "
        f"groups: {', '.join(groups)}."
    )


def _plot(plot_csv, path: str) -> int:
    """``--plot``: the PNG beside the CSV, or a clear error (exit status 2) for a CSV that is
    missing or not one of this benchmark's."""
    try:
        out = plot_csv(path, path.rsplit(".", 1)[0] + ".png")
    except ValueError as exc:
        print(f"batchnorm bench --plot: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def main(args: argparse.Namespace) -> int:
    """Run the benchmark (CLI entry point)."""
    import torch

    if args.plot:  # the CSV says which benchmark wrote it, whatever --device says
        from batchnorm.ops.bench import cpu
        from batchnorm.ops.bench.plot import plot_csv

        is_cpu = args.device == "cpu" or files.has_columns(args.plot, cpu.KEY_COLUMNS)
        return _plot(cpu.plot_csv if is_cpu else plot_csv, args.plot)
    if args.device == "cpu":
        from batchnorm.ops.bench import cpu

        problem = files.output_problem(args.csv)
        if problem is not None:
            print(f"batchnorm bench --csv: {problem}", file=sys.stderr)
            return 2
        if args.reps == 50:  # the GPU default; CPU calls take milliseconds
            args.reps = 30
        return cpu.main(args)
    if not torch.cuda.is_available():
        print(NEEDS_GPU, file=sys.stderr)
        return 2
    from batchnorm import ops

    ok, reason = ops.triton_status()
    if not ok:
        print(f"batchnorm bench: the Triton kernels cannot run here: {reason}", file=sys.stderr)
        return 2
    shapes = select_shapes(args)
    if not shapes:
        print(no_shape_matches(args, QUICK if args.quick else SUITE), file=sys.stderr)
        return 2
    problem = files.output_problem(args.csv)
    if problem is not None:
        print(f"batchnorm bench --csv: {problem}", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    modes = tuple(args.mode or (("train_fwd", "bwd") if args.quick else MODES))
    dtypes = tuple(args.dtype or (("bfloat16",) if args.quick else DTYPES))
    if "memory" in modes:
        from batchnorm.ops.bench.memory import memory_table

        print(memory_table(shapes, dtypes, device))
        return 0

    from batchnorm.ops.bench import harness, report

    copy_gbps = harness.copy_bandwidth_gbps(device)
    env = report.environment(device, copy_gbps)
    config = harness.Config(
        shapes=list(shapes),
        dtypes=dtypes,
        layouts=tuple(args.layout or LAYOUTS),
        modes=modes,
        providers=tuple(args.provider or PROVIDERS),
        reps=args.reps,
        profile=not args.no_profile,
        overrides=_parse_plan(args.plan),
    )
    timer = harness.CudaTimer(device, reps=config.reps, warmup=config.warmup)
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s; {len(shapes)} shapes", flush=True)

    def progress(row: harness.Row) -> None:
        status = f"{row.time_us:8.1f} us" if row.time_us == row.time_us else row.note
        print(f"  {row.shape} {row.dtype} {row.layout} {row.mode} {row.provider}: {status}",
              flush=True)  # fmt: skip

    rows = harness.run(config, timer, "cuda", copy_gbps, harness.kernel_profile, progress)
    print()
    print(report.format_table(rows, env))
    report.write_csv(args.csv, rows, env)
    print(f"wrote {args.csv} ({len(rows)} rows)")
    return 0
