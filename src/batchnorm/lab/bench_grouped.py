"""Training speed of K separate CNNs vs one grouped CNN (:mod:`batchnorm.lab.grouped`).

Run ``python -m batchnorm.lab.bench_grouped`` (``--help`` for options). For each scenario (the
networks one CNN experiment trains together at one batch size: its variants times its seeds), it
times SGD steps (momentum 0.9; forward, mean cross-entropy, backward, step, each network on its
own mini-batch gathered from a 28 x 28 image tensor) of

- ``separate``: K :func:`batchnorm.lab.experiments.cnn.conv_net` networks, one after another,
  each with its own optimizer (what the experiments do today), and
- ``grouped``: one :class:`batchnorm.lab.grouped.GroupedConvNet` holding the K networks,

with 1 and 2 torch threads, in contiguous (NCHW) and channels-last (NHWC) memory formats. A
"round" is one step of every one of the K networks; the table gives rounds per second and the
speedup ``grouped / separate`` at the same threads and format. Shared machines are noisy, so the
cells are measured interleaved (every cell once, then every cell again, ``--repeats`` times) and
the median is reported with the spread (the 25th and 75th percentiles); the speedup is the
median over repeats of the ratio of the two cells measured back to back in that repeat (paired,
so a change of load between repeats cancels). This is a benchmark, not a test: nothing asserts a
timing.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from batchnorm.lab.experiments.cnn import conv_net
from batchnorm.lab.grouped import ConvNetSpec, GroupedConvNet, grouped_cross_entropy

__all__ = ["Scenario", "SCENARIOS", "main"]

CHANNELS = (8, 16)  # ConvConfig's default widths
IMAGE = 28
CLASSES = 10


@dataclass(frozen=True)
class Scenario:
    """The networks one experiment trains together at one batch size."""

    name: str
    batch_size: int
    norms: tuple[tuple[str, dict], ...]  # one (norm, options) per variant
    seeds: int

    def specs(self) -> list[ConvNetSpec]:
        return [
            ConvNetSpec(f"{norm} {i}", seed=seed, norm=norm, norm_kwargs=options)
            for i, (norm, options) in enumerate(self.norms)
            for seed in range(self.seeds)
        ]


_RENORM = {"warmup_steps": 10, "d_max_reached_at": 50, "r_max_reached_at": 75}
SCENARIOS: tuple[Scenario, ...] = (
    Scenario("one network (overhead)", 32, (("bn", {}),), 1),
    Scenario(
        "small-batch, batch 32",
        32,
        (
            ("bn", {}),
            ("gn", {"num_groups": 4}),
            ("gn", {"num_groups": 1}),
            ("in", {}),
            ("renorm", _RENORM),
        ),
        2,
    ),
    Scenario(
        "small-batch, batch 4",
        4,
        (
            ("bn", {}),
            ("gn", {"num_groups": 4}),
            ("gn", {"num_groups": 1}),
            ("in", {}),
            ("renorm", _RENORM),
        ),
        2,
    ),
    Scenario(
        "non-iid, batch 32",
        32,
        (("bn", {}), ("bn", {}), ("renorm", _RENORM), ("gn", {"num_groups": 4})),
        3,
    ),
    Scenario("agc, batch 128", 128, (("none", {}), ("none", {}), ("bn", {})), 2),
    Scenario(
        "ghost, batch 256",
        256,
        (("bn", {}), ("ghost", {"virtual_batch_size": 64}), ("ghost", {"virtual_batch_size": 16})),
        2,
    ),
)
# (ln is conv_net's group norm with one group; listed as gn with num_groups 1 above so that the
# runs of equal norms stay apart as in the experiment.)


def _separate(
    scenario: Scenario, channels_last: bool
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    nets = [conv_net(s.norm, CHANNELS, CLASSES, s.seed, **s.norm_kwargs) for s in scenario.specs()]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    nets = [n.to(memory_format=fmt) for n in nets]
    opts = [torch.optim.SGD(n.parameters(), lr=0.01, momentum=0.9) for n in nets]

    def step(x: torch.Tensor, y: torch.Tensor) -> None:  # x (K, N, 1, H, W), y (K, N)
        for k, (net, opt) in enumerate(zip(nets, opts)):
            loss = F.cross_entropy(net(x[k].contiguous(memory_format=fmt)), y[k])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return step


def _grouped(
    scenario: Scenario, channels_last: bool
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    model = GroupedConvNet(scenario.specs(), CHANNELS, CLASSES)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        logits = model(x)
        loss = grouped_cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _time_rounds(
    step: Callable[[torch.Tensor, torch.Tensor], None],
    images: torch.Tensor,
    labels: torch.Tensor,
    order: torch.Tensor,
    rounds: int,
) -> float:
    """Seconds per round (one step of every network), batches gathered inside the timing."""
    start = time.perf_counter()
    for r in range(rounds):
        idx = order[r % len(order)]  # (K, N)
        step(images[idx], labels[idx])
    return (time.perf_counter() - start) / rounds


def run(
    scenarios: Sequence[Scenario],
    threads: Sequence[int],
    repeats: int,
    seconds: float,
    out: Path | None,
) -> list[dict]:
    """Measure every cell ``repeats`` times, interleaved; print and return the table."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4096, 1, IMAGE, IMAGE, generator=generator)
    labels = torch.randint(0, CLASSES, (4096,), generator=generator)
    cells = []
    for scenario in scenarios:
        K = len(scenario.specs())
        order = torch.randint(0, len(labels), (16, K, scenario.batch_size), generator=generator)
        for n_threads in threads:
            for channels_last in (False, True):
                for kind, build in (("separate", _separate), ("grouped", _grouped)):
                    cells.append(
                        {
                            "scenario": scenario.name,
                            "K": K,
                            "batch": scenario.batch_size,
                            "threads": n_threads,
                            "format": "channels-last" if channels_last else "contiguous",
                            "kind": kind,
                            "step": build(scenario, channels_last),
                            "order": order,
                            "times": [],
                        }
                    )
    # Calibrate: rounds per measurement so that one takes about `seconds` (warm-up included).
    for cell in cells:
        torch.set_num_threads(cell["threads"])
        per_round = _time_rounds(cell["step"], images, labels, cell["order"], 2)
        cell["rounds"] = max(2, int(seconds / max(per_round, 1e-6)))
    rows: list[dict] = []
    for repeat in range(repeats):
        for cell in cells:
            torch.set_num_threads(cell["threads"])
            cell["times"].append(
                _time_rounds(cell["step"], images, labels, cell["order"], cell["rounds"])
            )
        print(f"[bench] repeat {repeat + 1}/{repeats} done", file=sys.stderr, flush=True)
        rows = _summary(cells)
        if out is not None:  # after every repeat, so that a long run leaves its numbers so far
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    _print(rows)
    return rows


def _summary(cells: list[dict]) -> list[dict]:
    """Median and quartiles of the rounds per second of every cell, and the speedups."""
    rows = []
    by_key = {}
    for cell in cells:
        rates = sorted(1.0 / t for t in cell["times"])
        q = statistics.quantiles(rates, n=4) if len(rates) > 1 else [rates[0]] * 3
        row = {k: cell[k] for k in ("scenario", "K", "batch", "threads", "format", "kind")}
        row |= {"rounds_per_s": statistics.median(rates), "p25": q[0], "p75": q[2]}
        row["repeats"] = len(rates)
        by_key[(cell["scenario"], cell["threads"], cell["format"], cell["kind"])] = row
        rows.append(row)
    times = {(c["scenario"], c["threads"], c["format"], c["kind"]): c["times"] for c in cells}
    for row in rows:
        key = (row["scenario"], row["threads"], row["format"])
        # Paired: grouped and separate of one repeat ran back to back, under the same load.
        ratios = [s / g for s, g in zip(times[(*key, "separate")], times[(*key, row["kind"])])]
        row["speedup"] = statistics.median(ratios)
        row["speedup_min"], row["speedup_max"] = min(ratios), max(ratios)
        row["seconds_per_round"] = " ".join(f"{t:.5f}" for t in times[(*key, row["kind"])])
    return rows


def _print(rows: list[dict]) -> None:
    by_key = {(r["scenario"], r["threads"], r["format"], r["kind"]): r for r in rows}
    print(
        f"torch {torch.__version__}, {platform.machine()}, {platform.processor() or '?'}; "
        "rounds/s = steps/s of all K networks; median [25th-75th percentile]; speedup: median "
        "[min-max] over repeats of separate / grouped seconds in the same repeat"
    )
    print(
        "| scenario | K | batch | threads | format | separate rounds/s | grouped rounds/s | "
        "speedup (paired) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        if row["kind"] != "grouped":
            continue
        sep = by_key[(row["scenario"], row["threads"], row["format"], "separate")]
        print(
            f"| {row['scenario']} | {row['K']} | {row['batch']} | {row['threads']} | "
            f"{row['format']} | {sep['rounds_per_s']:.1f} [{sep['p25']:.1f}-{sep['p75']:.1f}] | "
            f"{row['rounds_per_s']:.1f} [{row['p25']:.1f}-{row['p75']:.1f}] | "
            f"{row['speedup']:.2f}x [{row['speedup_min']:.2f}-{row['speedup_max']:.2f}] |"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m batchnorm.lab.bench_grouped [--repeats R] ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m batchnorm.lab.bench_grouped",
        description="Training speed of K separate CNNs vs one grouped CNN (see the module doc).",
    )
    parser.add_argument("--repeats", type=int, default=5, help="measurements per cell (median)")
    parser.add_argument("--seconds", type=float, default=0.5, help="about how long one takes")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads")
    parser.add_argument(
        "--scenarios", nargs="+", default=None, help="scenario numbers (0-based; default all)"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as CSV")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.seconds <= 0:
        parser.error("--repeats must be >= 1 and --seconds > 0")
    cores = os.cpu_count() or 1
    if any(t < 1 or t > cores for t in args.threads):
        parser.error(f"--threads must lie in 1..{cores} (the machine's cores)")
    try:
        chosen = (
            SCENARIOS
            if args.scenarios is None
            else tuple(SCENARIOS[int(i)] for i in args.scenarios)
        )
    except (ValueError, IndexError):
        parser.error(f"--scenarios takes numbers in 0..{len(SCENARIOS) - 1}")
    run(chosen, args.threads, args.repeats, args.seconds, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
