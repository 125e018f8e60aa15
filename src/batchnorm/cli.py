"""The ``batchnorm`` command: a thin layer that parses, calls the library and prints.

Sub-commands:
    env      versions, devices and which backends can run here
    check    every available backend against the NumPy reference (a table of errors)
    lab      the experiments (``batchnorm lab --help``)
    bench    GPU benchmarks of the kernels (``batchnorm bench --help``)
    doctor   what is wrong with a model's batch norm, and the fix (``batchnorm doctor --help``)
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Sequence

from batchnorm import __version__
from batchnorm.backends import BACKENDS


def _cmd_env(args: argparse.Namespace) -> int:
    from batchnorm import backends

    try:
        backends.requested_backend()
    except ValueError as exc:
        print(f"error: {exc}; or unset {backends.ENV_VAR}", file=sys.stderr)
        return 2
    print(f"batchnorm {__version__}")
    print(f"python    {platform.python_version()} ({sys.executable})")
    print(f"platform  {platform.platform()}")
    try:
        import numpy

        print(f"numpy     {numpy.__version__}")
    except ImportError:  # pragma: no cover - numpy is a dependency
        print("numpy     not installed")
    try:
        import torch
    except ImportError:
        print("torch     not installed (pip install torch==2.13.0 for the CPU build)")
        return 0
    print(f"torch     {torch.__version__}")
    try:
        import triton

        print(f"triton    {triton.__version__}")
    except ImportError:
        print("triton    not installed (pip install 'batchnorm[triton]')")
    print(f"export    {_export_status()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"device    cuda:{i} {torch.cuda.get_device_name(i)}")
        print(f"cudnn     {torch.backends.cudnn.version()}")
    else:
        print("device    cpu only (no CUDA device)")
    print("backends:")
    for name, (ok, reason) in backends.available().items():
        print(f"  {name:<9} {'available' if ok else 'unavailable'}: {reason}")
    from batchnorm.ops.cpu import _build

    print(
        f"  cpu cache {_build.cache_limit_from_env() / (1 << 20):g} MB of freed outputs kept for "
        f"reuse by the cpu backend (set {_build.CACHE_ENV}; 0 turns it off)"
    )
    ext = _build.load_if_built()
    if ext is not None:
        print(f"  cpu walk  {ext.channels_last_walk()} (the channels-last backward's walk here)")
        threshold = ext.stream_min_bytes()
        streaming = (
            f"from {threshold / (1 << 20):g} MB moved per pass"
            if threshold >= 0
            else "never (no AVX2 or AVX512 in this build)"
        )
        print(f"  cpu nt    {streaming} (streaming stores for large outputs)")
    print(f"  default   {backends.requested_backend()} (set {backends.ENV_VAR} to change)")
    print(f"  auto      {backends.auto_summary()}")
    return 0


def _export_status() -> str:
    """torch.export always; ONNX when its packages (the 'export' extra) are installed."""
    from importlib import metadata

    versions = {}
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    if "onnx" not in versions or "onnxscript" not in versions:
        return "torch.export; ONNX needs onnx and onnxscript (pip install 'batchnorm[export]')"
    return "torch.export, ONNX (" + ", ".join(f"{k} {v}" for k, v in versions.items()) + ")"


def _device_problem(device: str) -> str | None:
    """Why ``batchnorm check`` cannot run on ``device`` here, or None if it can."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        return f"unknown device {device!r}; use cpu or cuda (or cuda:N)"
    if parsed.type == "meta":
        return "device 'meta' holds no values, so there is nothing to compare; use cpu or cuda"
    if parsed.type == "cuda" and not torch.cuda.is_available():
        return f"device {device!r} is not available here (no CUDA device); use --device cpu"
    if parsed.type == "cuda" and parsed.index is not None:
        count = torch.cuda.device_count()
        if parsed.index >= count:
            return f"device {device!r} is not available here ({count} CUDA device(s))"
    try:
        torch.zeros(1, device=parsed).cpu()
    except Exception as exc:  # noqa: BLE001 - any backend's complaint means "not here"
        text = str(exc).strip() or type(exc).__name__
        reason = text.splitlines()[0].split(". ")[0][:160]  # torch's messages run on for lines
        return f"device {device!r} is not available here ({reason}); use --device cpu"
    return None


def _cmd_check(args: argparse.Namespace) -> int:
    from batchnorm.check import format_table, run_check

    problem = _device_problem(args.device)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    dtypes = tuple(args.dtype) if args.dtype else ("float64", "float32")
    results = run_check(args.backend or None, dtypes=dtypes, seed=args.seed, device=args.device)
    print(format_table(results))
    failed = [r for r in results if not r.passed]
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def _add_optional(sub: argparse._SubParsersAction, name: str, module: str, help_text: str) -> None:
    """Register a sub-command that lives in an optional part; explain if that part is missing."""
    import importlib

    try:
        register = importlib.import_module(module).register
    except (ImportError, AttributeError) as exc:  # missing part, or one without register()
        message = f"`batchnorm {name}` is unavailable: {exc}"

        def unavailable(args: argparse.Namespace, message: str = message) -> int:
            print(message, file=sys.stderr)
            return 2

        sub.add_parser(name, help=f"{help_text} (unavailable here)").set_defaults(func=unavailable)
        return
    register(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchnorm",
        description="Batch normalization done properly: reference, layers, kernels and lab.",
    )
    parser.add_argument("--version", action="version", version=f"batchnorm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    env = sub.add_parser("env", help="versions, devices and available backends")
    env.set_defaults(func=_cmd_env)

    check = sub.add_parser("check", help="check every backend against the NumPy reference")
    check.add_argument(
        "--backend",
        action="append",
        choices=[name for name in BACKENDS if name != "auto"],
        help="backend to check (repeatable; default: every available one)",
    )
    check.add_argument(
        "--dtype",
        action="append",
        choices=["float64", "float32", "float16", "bfloat16"],
        help="dtype to check (repeatable; default: float64 and float32)",
    )
    check.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    check.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    check.set_defaults(func=_cmd_check)

    _add_optional(sub, "lab", "batchnorm.lab.cli", "run the experiments")
    _add_optional(sub, "bench", "batchnorm.ops.bench", "benchmark the GPU kernels")
    _add_optional(
        sub, "doctor", "batchnorm.inference.doctor_cli", "diagnose and fix a model's batch norm"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
