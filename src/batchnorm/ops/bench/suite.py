"""The benchmark suite: shapes, dtypes, layouts and passes (GPU_BENCHMARKS.md), and the cost model.

Cost model (bytes that must move; statistics and parameters are negligible), with E elements of
s bytes each:

====================  ==========================================================
mode                  minimal bytes
====================  ==========================================================
train_fwd, eval_fwd   read x, write y: 2 E s
bwd                   read x and dy, write dx: 3 E s
relu_fwd              2 E s (the default save="recompute" keeps nothing more)
relu_bwd              3 E s
add_relu_fwd          read x and z, write y, write the 1-bit mask: 3 E s + E / 8
add_relu_bwd          read x, dy and the mask, write dx and dz: 4 E s + E / 8
====================  ==========================================================

Effective bandwidth = minimal bytes / time, reported as GB/s and as % of the copy bandwidth
measured in the same process (a large ``y.copy_(x)``, read + write).
"""

from __future__ import annotations

from dataclasses import dataclass

MODES: tuple[str, ...] = (
    "train_fwd",
    "eval_fwd",
    "bwd",
    "relu_fwd",
    "relu_bwd",
    "add_relu_fwd",
    "add_relu_bwd",
)
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
LAYOUTS: tuple[str, ...] = ("nchw", "nhwc")
PROVIDERS: tuple[str, ...] = ("ours", "eager", "compile")


@dataclass(frozen=True)
class BenchShape:
    """One input shape of the suite.

    Attributes:
        shape: (N, C) or (N, C, H, W) / (N, C, L).
        group: where it comes from ("resnet50-b64", "few-channels", "bn1d", ...).
    """

    shape: tuple[int, ...]
    group: str

    @property
    def name(self) -> str:
        return "x".join(map(str, self.shape))

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def layouts(self) -> tuple[str, ...]:
        """NCHW and channels-last for 4-D inputs; one layout ("nc") otherwise."""
        return LAYOUTS if len(self.shape) == 4 else ("nc",)


def _resnet(batch: int, pairs: list[tuple[int, int]], group: str) -> list[BenchShape]:
    return [BenchShape((batch, c, hw, hw), group) for c, hw in pairs]


# ResNet-50 batch-norm shapes at batch 64 (all unique (C, H=W)), repeats at 256 and 32, few
# channels with large planes, and BatchNorm1d (N, C): GPU_BENCHMARKS.md, "Shape suite".
SUITE: list[BenchShape] = [
    *_resnet(
        64,
        [
            (64, 112),
            (64, 56),
            (256, 56),
            (128, 56),
            (128, 28),
            (512, 28),
            (256, 28),
            (256, 14),
            (1024, 14),
            (512, 14),
            (512, 7),
            (2048, 7),
        ],
        "resnet50-b64",
    ),  # fmt: skip
    *_resnet(256, [(64, 112), (256, 56), (512, 28), (2048, 7)], "resnet50-b256"),
    *_resnet(32, [(64, 56), (1024, 14)], "resnet50-b32"),
    BenchShape((16, 8, 128, 128), "few-channels"),
    BenchShape((20, 6, 65536), "few-channels"),
    BenchShape((8, 32, 256, 256), "few-channels"),
    *[
        BenchShape(s, "bn1d")
        for s in [
            (262144, 64),
            (65536, 256),
            (16384, 1024),
            (2048, 4096),
            (256, 8192),
            (3136, 256),
            (128, 2048),
        ]
    ],  # fmt: skip
]

# --quick: one shape per regime (few channels / large planes, many channels / small planes,
# (N, C)), enough to see where the kernels stand in a minute.
QUICK: list[BenchShape] = [
    BenchShape((64, 64, 112, 112), "resnet50-b64"),
    BenchShape((64, 256, 56, 56), "resnet50-b64"),
    BenchShape((64, 2048, 7, 7), "resnet50-b64"),
    BenchShape((16384, 1024), "bn1d"),
]


def element_size(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def min_bytes(mode: str, numel: int, elem_bytes: int) -> int:
    """The bytes a pass must move at least (the cost model in the module docstring)."""
    e, s = numel, elem_bytes
    mask = (e + 7) // 8
    table = {
        "train_fwd": 2 * e * s,
        "eval_fwd": 2 * e * s,
        "bwd": 3 * e * s,
        "relu_fwd": 2 * e * s,
        "relu_bwd": 3 * e * s,
        "add_relu_fwd": 3 * e * s + mask,
        "add_relu_bwd": 4 * e * s + mask,
    }
    if mode not in table:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    return table[mode]
