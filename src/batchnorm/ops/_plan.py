"""Launch plans: tile sizes, grid shapes and which path a batch-norm call takes.

No autotuning runs in the call path: a plan is a pure function of the (A, C, B) view, the element
size, whether a ReLU mask is packed, and the device (SM count, L2 size); it is cached, so a call
costs one dictionary lookup here. The heuristics, all for memory-bound kernels:

- A tile is about 16 KB of input (4096 float32 or 8192 16-bit values), laid along the contiguous
  axis: spatial planes for channels-first views (``block_c = 1`` unless planes are small), a
  segment of up to 256 bytes of channels for channels-last views.
- Fused path (one launch): one program per channel block computes the statistics, then
  normalizes, reading its slice of x twice; the second read comes from L2 when the slices of the
  programs resident at once fit in it. Taken when there are at least as many channel blocks as
  SMs and a slice is at most L2 / (4 * SMs) bytes.
- Split path (three launches, the parallel-over-N*H*W design): the reduction over the m = A * B
  values of each channel is split into ``splits`` ranges of tiles, about 4 reduction programs per
  SM in all; each writes a partial (count, mean, M2) merged with Chan's formula by a one-program-
  per-channel-block combine, then an elementwise pass (one tile per program) normalizes.

Under the Triton interpreter (``TRITON_INTERPRET=1``) the device is taken to have 2 SMs, so grids
stay small; tests force either path with :func:`override`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

from batchnorm.modes import triton_interpreting
from batchnorm.ops._layout import View3

INT32_MAX = 2**31 - 1
MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension

# Tile budget in bytes of input per tile, and the widest channel segment of a row tile.
TILE_BYTES = 16384
ROW_SEGMENT_BYTES = 256


@dataclass(frozen=True)
class Plan:
    """How to launch one batch-norm pass over a :class:`View3`.

    Attributes:
        block_a, block_c, block_b: tile sizes (powers of two) along A, C, B.
        num_warps: warps per program.
        fused: one program per channel block does the whole pass.
        splits: reduction programs per channel block (split path).
        apply_programs: elementwise programs per channel block.
        index_64: compute offsets in int64 (tensors whose offsets reach 2**31).
    """

    block_a: int
    block_c: int
    block_b: int
    num_warps: int
    fused: bool
    splits: int
    apply_programs: int
    index_64: bool
    channel_blocks: int
    tiles_a: int
    tiles_b: int

    @property
    def tiles(self) -> int:
        """Tiles per channel block."""
        return self.tiles_a * self.tiles_b

    @property
    def tiles_per_split(self) -> int:
        return _cdiv(self.tiles, self.splits)

    @property
    def tiles_per_apply(self) -> int:
        return _cdiv(self.tiles, self.apply_programs)


_OVERRIDABLE = ("block_a", "block_c", "block_b", "num_warps", "fused", "splits", "index_64")
_overrides: dict[str, object] = {}


@contextlib.contextmanager
def override(**settings: object) -> Iterator[None]:
    """Force plan settings inside the block (tests, tuning sweeps); process-wide, not per thread.

    Args:
        **settings: any of block_a, block_c, block_b (powers of two), num_warps, fused (bool),
            splits (int, reduction programs per channel block), index_64 (bool).

    Example:
        >>> with override(fused=False, splits=3):
        ...     current_overrides()
        {'fused': False, 'splits': 3}
    """
    unknown = set(settings) - set(_OVERRIDABLE)
    if unknown:
        raise ValueError(f"unknown plan setting(s) {sorted(unknown)}; choose from {_OVERRIDABLE}")
    for key in ("block_a", "block_c", "block_b"):
        value = settings.get(key)
        if value is not None and (not isinstance(value, int) or value < 1 or value & (value - 1)):
            raise ValueError(f"{key} must be a power of two, got {value!r}")
    saved = dict(_overrides)
    _overrides.update(settings)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


def current_overrides() -> dict[str, object]:
    """The settings forced by the innermost :func:`override` blocks."""
    return dict(_overrides)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return triton_interpreting()


@functools.lru_cache(maxsize=16)
def device_info(device_index: int | None) -> tuple[int, int]:
    """(SM count, L2 bytes) of a CUDA device; (2, 1 MiB) under the interpreter."""
    if device_index is None:
        return 2, 1 << 20
    import torch

    props = torch.cuda.get_device_properties(device_index)
    l2 = int(getattr(props, "L2_cache_size", 0) or (40 << 20))
    return int(props.multi_processor_count), l2


def _cdiv(n: int, d: int) -> int:
    return -(-n // d)


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def make_plan(view: View3, elem_bytes: int, needs_mask: bool, device_index: int | None) -> Plan:
    """The plan for a pass over ``view``: cached heuristics, then any :func:`override`."""
    key = tuple(sorted(_overrides.items()))
    return _make_plan(view, elem_bytes, needs_mask, device_index, key)


@functools.lru_cache(maxsize=1024)
def _make_plan(
    view: View3,
    elem_bytes: int,
    needs_mask: bool,
    device_index: int | None,
    overrides: tuple[tuple[str, object], ...],
) -> Plan:
    sms, l2_bytes = device_info(device_index)
    forced = dict(overrides)
    tile = max(1, TILE_BYTES // elem_bytes)

    if view.planes:
        block_b = min(_pow2(view.b), tile)
        block_a = min(_pow2(view.a), max(1, tile // block_b))
        block_c = min(_pow2(view.c), max(1, tile // (block_a * block_b)))
    else:
        block_b = min(_pow2(view.b), 16)
        block_c = min(_pow2(view.c), max(1, ROW_SEGMENT_BYTES // elem_bytes))
        block_a = min(_pow2(view.a), max(1, tile // (block_c * block_b)))
    block_a = int(forced.get("block_a", block_a))
    block_c = int(forced.get("block_c", block_c))
    block_b = int(forced.get("block_b", block_b))
    # The kernels take BLOCK_B == 1 to mean B == 1 (a constant b0 = 0, see _tile_origin).
    block_b = 1 if view.b == 1 else max(block_b, 2)
    if needs_mask:
        # The mask packs 8 values per byte along one axis: a tile covers whole bytes of it.
        if view.pack_b:
            block_b = max(block_b, 8)
        else:
            block_a = max(block_a, 8)

    channel_blocks = _cdiv(view.c, block_c)
    tiles_a, tiles_b = _cdiv(view.a, block_a), _cdiv(view.b, block_b)
    tiles = tiles_a * tiles_b
    slice_bytes = view.per_channel * min(block_c, view.c) * elem_bytes
    fused = channel_blocks >= sms and slice_bytes <= max(l2_bytes // (4 * sms), 1)
    fused = bool(forced.get("fused", fused))

    if fused:
        splits = 1
    else:
        splits = max(1, min(tiles, _cdiv(4 * sms, channel_blocks)))
        splits = int(forced.get("splits", splits))
        splits = max(1, min(splits, tiles))
        splits = min(splits, MAX_GRID_Y)
        splits = _cdiv(tiles, _cdiv(tiles, splits))  # every split gets at least one tile
    if fused:
        apply_programs = 1
    elif device_index is None:
        apply_programs = splits  # the interpreter pays per program: keep the grid small
    else:
        apply_programs = min(tiles, MAX_GRID_Y)  # beyond, each program loops over tiles

    tile_elems = block_a * block_c * block_b
    num_warps = int(forced.get("num_warps", 8 if tile_elems * elem_bytes >= 8192 else 4))

    # Largest offset any lane of any tile computes (masked lanes included), for x and the mask.
    reach = (
        (tiles_a * block_a - 1) * view.stride_a
        + (channel_blocks * block_c - 1) * view.stride_c
        + (tiles_b * block_b - 1) * view.stride_b
    )
    if view.pack_b:  # mask buffer (A, C, ceil(B / 8)), contiguous
        bytes_b = _cdiv(view.b, 8)
        mask_reach = (
            (tiles_a * block_a - 1) * view.c * bytes_b
            + (channel_blocks * block_c - 1) * bytes_b
            + (tiles_b * block_b) // 8
        )
    else:  # mask buffer (ceil(A / 8), C, B), contiguous
        mask_reach = (
            (tiles_a * block_a) // 8 * view.c * view.b
            + (channel_blocks * block_c - 1) * view.b
            + tiles_b * block_b
        )
    index_64 = reach > INT32_MAX or (needs_mask and mask_reach > INT32_MAX)
    index_64 = bool(forced.get("index_64", index_64)) or index_64

    return Plan(
        block_a=block_a,
        block_c=block_c,
        block_b=block_b,
        num_warps=num_warps,
        fused=fused,
        splits=splits,
        apply_programs=apply_programs,
        index_64=index_64,
        channel_blocks=channel_blocks,
        tiles_a=tiles_a,
        tiles_b=tiles_b,
    )


def describe(plan: Plan) -> str:
    """One line with the plan's settings (for benchmark tables)."""
    path = "fused" if plan.fused else f"split{plan.splits}"
    return f"{path} tile={plan.block_a}x{plan.block_c}x{plan.block_b} w{plan.num_warps}" + (
        " i64" if plan.index_64 else ""
    )


__all__ = [
    "Plan",
    "current_overrides",
    "describe",
    "device_info",
    "interpreting",
    "make_plan",
    "override",
]
