"""What autograd keeps for the backward pass, in bytes (device-independent).

Used by the benchmark harness (``batchnorm bench --mode memory``) and the tests to measure what the
fused ReLU variants save: a 1-bit mask or recomputation instead of the pre-activation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def saved_tensor_bytes(fn: Callable[[], torch.Tensor]) -> tuple[int, torch.Tensor]:
    """Run ``fn()`` and count the bytes of every tensor autograd saves for its backward pass.

    Each storage is counted once (a view and its base, or a tensor saved twice, cost one
    storage), at its full size. Parameters and per-channel statistics count too; they are small
    next to activations.

    Returns:
        ``(bytes, output)``.

    Example:
        >>> x = torch.randn(4, 8, requires_grad=True)
        >>> n, y = saved_tensor_bytes(lambda: torch.relu(x * 2))
        >>> n == 4 * 8 * 4  # relu keeps its output; x * 2 by a constant keeps nothing
        True
    """
    storages: dict[tuple[str, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[(str(t.device), storage.data_ptr())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


def fused_saved_bytes(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str
) -> dict[str, int]:
    """Saved bytes of relu(bn(x)) and relu(bn(x) + z): torch's composition and each ``save``
    mode of the Triton kernels, for one training step on a random input."""
    from batchnorm import ops

    c = shape[1]
    x = torch.randn(shape, device=device).to(dtype).requires_grad_(True)
    z = torch.randn(shape, device=device).to(dtype).requires_grad_(True)
    w = torch.ones(c, device=device, requires_grad=True)
    b = torch.zeros(c, device=device, requires_grad=True)

    def stats() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(c, device=device), torch.ones(c, device=device)

    def bn(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.batch_norm(t, *stats(), w, b, True, 0.1, 1e-5)

    out = {"torch relu": saved_tensor_bytes(lambda: torch.relu(bn(x)))[0]}
    for save in ops.SAVE_MODES:
        out[f"ours relu save={save}"] = saved_tensor_bytes(
            lambda save=save: ops.batch_norm_relu(x, *stats(), w, b, True, save=save)
        )[0]
    out["torch add_relu"] = saved_tensor_bytes(lambda: torch.relu(bn(x) + z))[0]
    for save in ops.SAVE_MODES:
        out[f"ours add_relu save={save}"] = saved_tensor_bytes(
            lambda save=save: ops.batch_norm_add_relu(x, z, *stats(), w, b, True, save=save)
        )[0]
    return out


def memory_table(shapes, dtypes, device: torch.device | str) -> str:
    """A table of :func:`fused_saved_bytes` (MiB, and % of torch's composition) per shape."""
    lines = []
    for bench_shape in shapes:
        for dtype in dtypes:
            counts = fused_saved_bytes(bench_shape.shape, getattr(torch, dtype), device)
            for key, value in counts.items():
                base = counts["torch add_relu" if "add_relu" in key else "torch relu"]
                lines.append(
                    f"{bench_shape.name:>18} {dtype:>9} {key:<28} {value / 2**20:10.2f} MiB "
                    f"{100.0 * value / base:6.1f}%"
                )
    header = f"{'shape':>18} {'dtype':>9} {'variant':<28} {'saved':>14} {'of torch':>7}"
    return "\n".join([header, *lines])
