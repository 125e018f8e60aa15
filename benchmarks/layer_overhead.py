"""The layers' per-call cost against torch.nn's, on the CPU, in one process.

What is measured: a whole call of the layer as a model makes it, ``layer(x)`` in eval mode under
``torch.no_grad()`` and a training step ``layer(x).backward(dy)`` (forward with the
running-statistics update, then dx, dgamma and dbeta), for this package's ``BatchNorm1d/2d`` and
``torch.nn``'s, created with the same parameters and fed the same tensors.

Method: for each configuration the providers are warmed up, then timed in interleaved rounds
(each round times a loop of ``--calls`` calls of every provider, in a rotating order, with
``time.perf_counter_ns``), so that a neighbour's load on a shared machine hits all of them alike.
Reported: each provider's best per-call time over the rounds, and the ratio ours / torch.nn as
the ratio of the bests and as the median over rounds of the ratio within a round (the two agree
when the machine was quiet). One torch thread unless ``--threads`` says otherwise.

Run:
    PYTHONPATH=src python benchmarks/layer_overhead.py
    PYTHONPATH=src python benchmarks/layer_overhead.py --provider cpu   # also backend="cpu"
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from batchnorm.nn import BatchNorm1d, BatchNorm2d

SHAPES: tuple[tuple[int, ...], ...] = ((32, 64), (32, 64, 8, 8), (32, 64, 28, 28))
MODES: tuple[str, ...] = ("eval_nograd", "train_fwd_bwd")


def _layer(provider: str, channels: int, dims: int) -> torch.nn.Module:
    if provider == "torch.nn":
        cls = torch.nn.BatchNorm1d if dims < 4 else torch.nn.BatchNorm2d
        return cls(channels)
    ours = BatchNorm1d if dims < 4 else BatchNorm2d
    backend = None if provider == "ours" else provider.removeprefix("ours-")
    return ours(channels, backend=backend)


def _step(layer: torch.nn.Module, mode: str, x: torch.Tensor, dy: torch.Tensor) -> Callable:
    if mode == "eval_nograd":
        layer.eval()

        def call() -> None:
            with torch.no_grad():
                layer(x)

        return call
    layer.train()
    xg = x.clone().requires_grad_()

    def step() -> None:
        layer(xg).backward(dy)

    return step


def measure(shape, mode, providers, calls, rounds, layout) -> dict[str, list[float]]:
    """Per-call nanoseconds of each provider, one value per round."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    dy = torch.randn(shape, generator=gen)
    if layout == "nhwc" and len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    steps = {}
    for p in providers:
        layer = _layer(p, shape[1], len(shape))
        steps[p] = _step(layer, mode, x, dy)
        for _ in range(max(20, calls // 4)):
            steps[p]()
    times: dict[str, list[float]] = {p: [] for p in providers}
    for r in range(rounds):
        order = providers[r % len(providers) :] + providers[: r % len(providers)]
        for p in order:
            step = steps[p]
            t0 = time.perf_counter_ns()
            for _ in range(calls):
                step()
            times[p].append((time.perf_counter_ns() - t0) / calls)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--provider", action="append", default=[], help="extra: a backend of ours, e.g. cpu"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--layout", default="nchw", choices=("nchw", "nhwc"))
    parser.add_argument(
        "--budget", type=float, default=0.25, help="seconds per provider and round (sets calls)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    providers = ["torch.nn", "ours", *(f"ours-{p}" for p in args.provider)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), layout {args.layout}, "
          f"{args.rounds} interleaved rounds; per-call us: best over rounds")  # fmt: skip
    header = "| shape | mode | " + " | ".join(f"{p} us" for p in providers)
    header += " | " + " | ".join(f"{p} / torch.nn (best, median)" for p in providers[1:]) + " |"
    print(header)
    print("|" + "---|" * (2 + len(providers) + len(providers) - 1))
    for shape in SHAPES:
        for mode in MODES:
            probe = measure(shape, mode, providers[:1], 5, 1, args.layout)["torch.nn"][0]
            calls = max(5, min(20000, int(args.budget * 1e9 / probe)))
            times = measure(shape, mode, providers, calls, args.rounds, args.layout)
            best = {p: min(t) for p, t in times.items()}
            cells = [f"{best[p] / 1e3:.2f}" for p in providers]
            for p in providers[1:]:
                paired = statistics.median(a / b for a, b in zip(times[p], times["torch.nn"]))
                cells.append(f"{best[p] / best['torch.nn']:.3f}, {paired:.3f}")
            name = "x".join(map(str, shape))
            print(f"| {name} | {mode} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
