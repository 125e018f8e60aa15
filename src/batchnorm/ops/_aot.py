"""Compile the kernels for a GPU architecture without a GPU: a build and vectorization check.

The Triton interpreter runs the kernels' arithmetic on the CPU, but it accepts programs that the
compiler rejects and says nothing about code quality. This tool runs the real launchers on
``meta`` tensors with a recording stand-in for the kernels, turns each recorded launch into the
signature Triton's JIT would specialize (an int equal to 1 becomes a constant, a multiple of 16
gets a divisibility hint, as do 16-byte-aligned pointers), compiles it with Triton's compiler
for the target (default sm_90, the H100) and counts the global memory instructions in the PTX:
``ld.global.v4.b32`` means 16-byte vector loads.

Run it in a process where TRITON_INTERPRET is unset::

    python -m batchnorm.ops._aot [--arch 90] [--quick] [--json]

Exit status: 0 all compiled, 1 some failed, 2 Triton missing or interpreted, 3 no NVIDIA backend.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

# (name, shape, dtype, channels_last): layouts and dtypes whose JIT specialization differs.
SHAPES: list[tuple[str, tuple[int, ...], torch.dtype, bool]] = [
    ("nchw-bf16", (64, 64, 56, 56), torch.bfloat16, False),
    ("nhwc-bf16", (64, 64, 56, 56), torch.bfloat16, True),
    ("nc-fp32", (16384, 1024), torch.float32, False),
    ("nchw7x7-fp16", (64, 2048, 7, 7), torch.float16, False),
]
QUICK_SHAPES = SHAPES[:2]


@dataclass
class Launch:
    kernel: object
    args: tuple
    kwargs: dict
    label: str = ""


@dataclass
class Compiled:
    label: str
    kernel: str
    constexprs: dict
    seconds: float = 0.0
    memory_ops: dict = field(default_factory=dict)
    error: str = ""

    @property
    def vectorized(self) -> bool:
        return any(".v4." in op or ".v2." in op for op in self.memory_ops if "ld.global" in op)


class _Recorder:
    """Stands in for the kernels module inside the launcher: records launches."""

    def __init__(self, kernels) -> None:
        self._kernels = kernels
        self.launches: list[Launch] = []

    def __getattr__(self, name: str):
        value = getattr(self._kernels, name)
        if not name.endswith("_kernel"):
            return value
        recorder = self

        class _Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    recorder.launches.append(Launch(value, args, kwargs))

                return launch

        return _Grid()


def record_launches(quick: bool = False) -> list[Launch]:
    """Every kernel launch of forward and backward passes over the representative shapes."""
    from batchnorm.ops import _kernels, _launch, _plan

    recorder = _Recorder(_kernels)
    real = _launch.K
    _launch.K = recorder
    try:
        for name, shape, dtype, channels_last in QUICK_SHAPES if quick else SHAPES:
            for path in ({"fused": True}, {"fused": False, "splits": 8}):
                for relu_save in (0, 2, 3) if not quick else (0, 2):
                    start = len(recorder.launches)
                    _record_pass(_launch, shape, dtype, channels_last, path, relu_save, _plan)
                    tag = f"{name} {'fused' if path['fused'] else 'split'} relu_save={relu_save}"
                    for launch in recorder.launches[start:]:
                        launch.label = tag
        if not quick:
            start = len(recorder.launches)
            with _plan.override(index_64=True):
                _record_pass(_launch, (8, 16, 8, 8), torch.float32, True, {}, 1, _plan)
            for launch in recorder.launches[start:]:
                launch.label = "int64 offsets"
    finally:
        _launch.K = real
    return recorder.launches


def _record_pass(_launch, shape, dtype, channels_last, path, relu_save, _plan) -> None:
    x = torch.empty(shape, dtype=dtype, device="meta")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    c = shape[1]
    params = [torch.empty(c, device="meta") for _ in range(4)]
    z = torch.empty_like(x) if relu_save == 2 else None
    with _plan.override(**path):
        for training in (True, False):
            y, stats, mask = _launch.forward(
                x, params[0], params[1], params[2], params[3], z, training, 0.1, 1e-5,
                relu=relu_save != 0, save_mask=relu_save == 2,
            )  # fmt: skip
            gate = mask if relu_save == 2 else (y if relu_save == 1 else None)
            _launch.backward(
                torch.empty_like(y), x, params[0], params[1], stats, gate, z, training,
                relu_save, z is not None, True,
            )  # fmt: skip


_TRITON_TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.uint8: "u8",
}


def signature(launch: Launch) -> tuple[dict, dict, dict, int]:
    """(signature, constexprs, attrs, num_warps) as Triton's JIT would specialize the launch."""
    kernel = launch.kernel
    names = kernel.arg_names
    values = dict(zip(names, launch.args))
    kwargs = dict(launch.kwargs)
    num_warps = int(kwargs.pop("num_warps", 4))
    values.update(kwargs)
    sig, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(names):
        value = values[name]
        param = kernel.params[index]
        if param.is_constexpr:
            sig[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            sig[name] = "*" + _TRITON_TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]  # fresh allocations are aligned
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                sig[name] = "constexpr"
                constexprs[name] = 1
            else:
                sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{name}: cannot type {type(value).__name__}")
    return sig, constexprs, attrs, num_warps


def compile_launches(launches: list[Launch], arch: int) -> Iterator[Compiled]:
    """Compile each distinct launch signature for ``sm_{arch}``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    seen = set()
    for launch in launches:
        sig, constexprs, attrs, num_warps = signature(launch)
        key = (launch.kernel.__name__, tuple(sig.items()), tuple(sorted(constexprs.items())),
               tuple(sorted(attrs)), num_warps)  # fmt: skip
        if key in seen:
            continue
        seen.add(key)
        result = Compiled(launch.label, launch.kernel.__name__, constexprs)
        start = time.perf_counter()
        try:
            src = ASTSource(fn=launch.kernel, signature=sig, constexprs=constexprs, attrs=attrs)
            compiled = triton.compile(src, target=target, options={"num_warps": num_warps})
            ops = re.findall(r"(?:ld|st)\.global[.\w]*", compiled.asm["ptx"])
            result.memory_ops = dict(collections.Counter(ops))
        except Exception as exc:  # report every failure, keep going
            result.error = f"{type(exc).__name__}: {exc}"[:2000]
        result.seconds = time.perf_counter() - start
        yield result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="SM version (default 90: H100)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and variants")
    parser.add_argument("--json", action="store_true", help="one JSON object per kernel")
    args = parser.parse_args(argv)
    from batchnorm.ops import _kernels

    if not _kernels.AVAILABLE:
        print("Triton is not installed", file=sys.stderr)
        return 2
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError as exc:
        print(f"Triton has no NVIDIA backend here ({exc})", file=sys.stderr)
        return 3
    if _kernels.INTERPRETED:
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    failures = 0
    for result in compile_launches(record_launches(args.quick), args.arch):
        failures += bool(result.error)
        if args.json:
            print(json.dumps({**result.__dict__, "vectorized": result.vectorized}), flush=True)
        else:
            status = result.error or " ".join(f"{k}x{v}" for k, v in result.memory_ops.items())
            print(f"{result.label:<36} {result.kernel:<20} {result.seconds:5.1f}s  {status}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
