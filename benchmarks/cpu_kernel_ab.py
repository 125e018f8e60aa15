"""Two builds of the C++ CPU kernels against each other, in one process, on the same tensors.

For a change to ``src/batchnorm/ops/cpu/batch_norm.cpp``: each build is compiled once into its
own folder under ``~/.cache/batchnorm/ext`` (named by the source's hash), so the build of the
previous commit and the current one can be loaded side by side. What is timed: the extension's
training forward (``forward``: statistics, running-statistics update, output), its eval forward
(``--eval``: the output pass alone) or its training backward (``--backward``: dx, dgamma, dbeta);
with ``--fused``, the same for ``relu(bn(x) + z)`` (``--save``, default "recompute": the
backward recomputes the ReLU's gate from x and z; "mask", "output"; it returns dz too); and
a copy of the same tensor (``out.copy_(x)``) as the scale. Method: 20 interleaved rounds
(the two builds in alternating order), 5 calls per round; reported are medians over rounds and
the paired median of new / old within a round (the ratio that a neighbour's load on a shared
machine disturbs least). One torch thread unless ``--threads`` says otherwise; float32 inputs
unless ``--dtype bfloat16``.

Repeated calls on the same tensors find them in the last-level cache when the tensors are
smaller than it (about 32-48 MB is what one core gets here). ``--cold`` reads a buffer larger
than that (``--evict-mb``, 128 MB) before every call and times each call alone, so that x, dy
and the outputs come from memory, as after a layer whose output did not stay in cache.
``--dy-warm`` (with ``--cold --backward``) rewrites dy in place (times 1) after the eviction:
the gradient that the layer after has just written is in cache, the x saved by the forward is
not.

One build given twice with ``--walk-old`` and ``--walk-new`` ("rows" or "chunks") times the
channels-last backward's two walks against each other (the walk is set before every call):
    PYTHONPATH=src python benchmarks/cpu_kernel_ab.py DIR DIR --walk-old rows --walk-new chunks \
        --backward --cold 32x512x7x7 512x512

Run (the folders are those that ``ls -t ~/.cache/batchnorm/ext`` lists):
    PYTHONPATH=src python benchmarks/cpu_kernel_ab.py OLD_DIR NEW_DIR 64x2048x7x7 32x64x56x56
    PYTHONPATH=src python benchmarks/cpu_kernel_ab.py OLD_DIR NEW_DIR --backward 64x960x7x7

A change meant to keep every value (a new walk, a new split) is checked first with ``--bits``:
no timing; each shape's results from both builds (training forward with its saved and running
statistics, eval, backward, fused forward and backward) are compared bit for bit, on randn, on
1e4 + randn and on a mean drifting along the batch, and the exit status is 1 where any differ:
    PYTHONPATH=src python benchmarks/cpu_kernel_ab.py OLD_DIR NEW_DIR --bits --threads 2 64x1280
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch


def load_build(folder: str) -> ModuleType:
    """The compiled extension in ``folder`` (one ``.so``), imported under its own name."""
    libraries = sorted(Path(folder).expanduser().glob("*.so"))
    if len(libraries) != 1:
        raise SystemExit(f"expected one compiled .so in {folder}, found {len(libraries)}")
    spec = importlib.util.spec_from_file_location(libraries[0].stem, libraries[0])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _per_call(fn: Callable[[], object], calls: int = 5) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def _cold_call(
    fn: Callable[[], object], evict: torch.Tensor, warm: torch.Tensor | None = None
) -> float:
    """One call of fn after reading ``evict`` (the caches hold none of fn's data, but ``warm``
    when given: rewritten in place, as a layer leaves its output), in us."""
    evict.sum()
    if warm is not None:
        warm.mul_(1.0)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e6


def compare(
    old: ModuleType,
    new: ModuleType,
    x: torch.Tensor,
    backward: bool,
    rounds: int,
    evict: torch.Tensor | None = None,
    training: bool = True,
    fused: bool = False,
    save: str = "recompute",
    walks: tuple[str | None, str | None] = (None, None),
    dy_warm: bool = False,
) -> dict:
    channels = x.shape[1]
    weight, bias = torch.rand(channels) + 0.5, torch.randn(channels)
    dy = torch.randn_like(x)
    z = torch.randn_like(x)
    out = torch.empty_like(x)

    def call(ext: ModuleType) -> Callable[[], object]:
        stats = [torch.zeros(channels), torch.ones(channels)]
        if fused:  # relu(bn(x) + z), keeping what `save` says for the backward
            code = SAVE_CODES[save]
            forward = (x, weight, bias, *stats, training, 0.1, 1e-5, z, code)
            if not backward:
                return lambda: ext.forward_fused(*forward)
            result = ext.forward_fused(*forward)
            saved, gate = result[1:6], _gate(save, result, z)
            return lambda: ext.backward_fused(
                dy, x, weight, *saved, True, True, True, True, code, gate
            )
        if not backward:
            return lambda: ext.forward(x, weight, bias, *stats, training, 0.1, 1e-5)
        saved = ext.forward(x, weight, bias, *stats, True, 0.1, 1e-5)
        return lambda: ext.backward(dy, x, weight, *saved[1:4], True, True, True)

    def walking(ext: ModuleType, walk: str | None) -> Callable[[], object]:
        fn = call(ext)
        if walk is None:
            return fn
        return lambda: (ext.set_channels_last_walk(walk), fn())

    fns = {"old": walking(old, walks[0]), "new": walking(new, walks[1])}
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {"copy": [], "old": [], "new": []}

    def timed(fn: Callable[[], object]) -> float:
        if evict is None:
            return _per_call(fn)
        return _cold_call(fn, evict, dy if dy_warm else None)

    for r in range(rounds):
        times["copy"].append(timed(lambda: out.copy_(x)))
        for key in ("old", "new") if r % 2 else ("new", "old"):
            times[key].append(timed(fns[key]))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "copy_us": med["copy"],
        "old_x_copy": med["old"] / med["copy"],
        "new_x_copy": med["new"] / med["copy"],
        "new_over_old": statistics.median(n / o for o, n in zip(times["old"], times["new"])),
    }


# The fused kernels' codes for what the backward keeps (batchnorm.modes.FusedSave).
SAVE_CODES = {"output": 1, "mask": 2, "recompute": 3}


def _gate(save: str, forward: list, z: torch.Tensor) -> torch.Tensor:
    """What the fused backward reads for the ReLU's gate: y, the mask, or z (recompute)."""
    return {"output": forward[0], "mask": forward[-1], "recompute": z}[save]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (so that NaNs and signed zeros compare by their bits)."""
    return t.detach().contiguous().view(torch.uint8) if t.numel() else t


def same_bits(old: ModuleType, new: ModuleType, x: torch.Tensor) -> list[str]:
    """What differs between the builds' results on x, bit for bit: the training forward (y, the
    saved statistics, the running statistics), the eval forward, the training backward (dx,
    dgamma, dbeta) and the fused forward and backward (save="recompute", "mask" and "output", the
    mask too). Empty: nothing."""
    channels = x.shape[1]
    gen = torch.Generator().manual_seed(0)
    weight = torch.rand(channels, generator=gen) + 0.5
    bias = torch.randn(channels, generator=gen)
    dy = torch.randn(x.shape, generator=gen).to(x.dtype)
    z = torch.randn(x.shape, generator=gen).to(x.dtype)
    dy, z = torch.empty_like(x).copy_(dy), torch.empty_like(x).copy_(z)  # laid out as x

    def results(ext: ModuleType) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        stats = [torch.zeros(channels), torch.ones(channels)]
        saved = ext.forward(x, weight, bias, *stats, True, 0.1, 1e-5)
        out.update({f"forward[{i}]": t for i, t in enumerate(saved)})
        out.update(running_mean=stats[0], running_var=stats[1])
        out["eval"] = ext.forward(x, weight, bias, *stats, False, 0.1, 1e-5)[0]
        grads = ext.backward(dy, x, weight, *saved[1:4], True, True, True)
        out.update({f"backward[{i}]": t for i, t in enumerate(grads)})
        for save in ("recompute", "mask", "output"):
            code = SAVE_CODES[save]
            fused = ext.forward_fused(x, weight, bias, *stats, True, 0.1, 1e-5, z, code)
            out[f"fused {save}"] = fused[0]
            out[f"fused {save} gate"] = _gate(save, fused, z)
            fgrads = ext.backward_fused(
                dy, x, weight, *fused[1:6], True, True, True, True, code, _gate(save, fused, z)
            )
            out.update({f"fused {save} backward[{i}]": t for i, t in enumerate(fgrads)})
        return out

    a, b = results(old), results(new)
    return [
        k
        for k in a
        if (a[k] is None) != (b[k] is None)
        or (a[k] is not None and not torch.equal(_bits(a[k]), _bits(b[k])))
    ]


def _layouts(shape: tuple[int, ...]) -> tuple[str, ...]:
    """The layouts timed for a shape: both storages of images and of sequences."""
    return {4: ("nchw", "nhwc"), 3: ("ncl", "nlc"), 2: ("nc",)}.get(len(shape), ("contiguous",))


def _laid_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x (contiguous) in ``layout``: "nhwc" channels-last, "nlc" a sequence stored (N, L, C)."""
    if layout == "nhwc":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "nlc":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    return x


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", help="folder of the old build")
    parser.add_argument("new", help="folder of the new build")
    parser.add_argument("shapes", nargs="+", help="e.g. 64x2048x7x7 (N x C [x spatial])")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--backward", action="store_true", help="time the training backward")
    mode.add_argument("--eval", action="store_true", help="time the eval forward")
    parser.add_argument("--fused", action="store_true", help="time relu(bn(x) + z)")
    parser.add_argument(
        "--save", choices=tuple(SAVE_CODES), default="recompute", help="--fused: what it keeps"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="the input's dtype"
    )
    parser.add_argument("--rounds", type=int, default=20)
    for side in ("old", "new"):
        parser.add_argument(
            f"--walk-{side}",
            choices=("rows", "chunks"),
            help=f"set the channels-last walk before each call of the {side} build (one "
            "build given twice compares its two walks)",
        )
    parser.add_argument(
        "--cold", action="store_true", help="evict the caches before every timed call"
    )
    parser.add_argument("--evict-mb", type=int, default=128, help="size of the eviction read")
    parser.add_argument(
        "--dy-warm",
        action="store_true",
        help="with --cold --backward: rewrite dy in cache after the eviction",
    )
    parser.add_argument(
        "--bits",
        action="store_true",
        help="compare the builds' results bit for bit (no timing); exit 1 where they differ",
    )
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    torch.set_num_threads(args.threads)
    evict = torch.ones(args.evict_mb << 18) if args.cold else None
    old, new = load_build(args.old), load_build(args.new)
    walks = (args.walk_old, args.walk_new)
    if args.dy_warm and not (args.cold and args.backward):
        parser.error("--dy-warm needs --cold and --backward")
    dtype = getattr(torch, args.dtype)
    if args.bits:
        differ = False
        for text in args.shapes:
            shape = tuple(int(v) for v in text.split("x"))
            for layout in _layouts(shape):
                for kind in ("randn", "1e4 + randn", "drift"):
                    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
                    if kind == "1e4 + randn":
                        x = x + 1e4
                    elif kind == "drift":  # a mean that moves along the batch: redone blocks
                        ramp = torch.arange(shape[0], dtype=x.dtype) * 50.0
                        x = x + ramp.view(-1, *([1] * (len(shape) - 1)))
                    x = x.to(dtype)
                    x = _laid_out(x, layout)
                    bad = same_bits(old, new, x)
                    differ |= bool(bad)
                    verdict = "differ: " + ", ".join(bad) if bad else "same bits"
                    print(f"{text} {layout} {kind}: {verdict}")
        raise SystemExit(1 if differ else 0)
    print("shape | layout | copy us | old x copy | new x copy | new / old (paired median)")
    print("---|---|---|---|---|---")
    for text in args.shapes:
        shape = tuple(int(v) for v in text.split("x"))
        for layout in _layouts(shape):
            x = _laid_out(torch.randn(shape).to(dtype), layout)
            r = compare(
                old,
                new,
                x,
                args.backward,
                args.rounds,
                evict,
                not args.eval,
                args.fused,
                args.save,
                walks,
                args.dy_warm,
            )
            print(
                f"{text} | {layout} | {r['copy_us']:.0f} | {r['old_x_copy']:.2f} | "
                f"{r['new_x_copy']:.2f} | {r['new_over_old']:.3f}"
            )


if __name__ == "__main__":
    main()
