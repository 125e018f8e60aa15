"""The benchmark's outputs: environment metadata, a printed table and a CSV (written atomically)."""

from __future__ import annotations

import dataclasses
import io
import platform
import subprocess

import torch

from batchnorm.ops.bench import files
from batchnorm.ops.bench.harness import Row


def environment(device: torch.device | None, copy_gbps: float) -> dict[str, str]:
    """GPU name, driver, CUDA, torch, Triton and cuDNN versions, and the measured copy bandwidth."""
    info = {
        "gpu": "none",
        "driver": "unknown",
        "cuda": str(torch.version.cuda),
        "torch": torch.__version__,
        "triton": "not installed",
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "",
        "python": platform.python_version(),
        "copy_gbps": f"{copy_gbps:.1f}",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            )
            info["driver"] = out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    return info


_COLUMNS = [
    ("shape", "shape", "{}"),
    ("dtype", "dtype", "{}"),
    ("layout", "layout", "{}"),
    ("mode", "mode", "{}"),
    ("provider", "provider", "{}"),
    ("time_us", "us", "{:.1f}"),
    ("kernel_us", "kern us", "{:.1f}"),
    ("hot_us", "hot us", "{:.1f}"),
    ("gbps", "GB/s", "{:.0f}"),
    ("pct_copy", "%copy", "{:.0f}%"),
    ("speedup_vs_eager", "vs eager", "{:.2f}x"),
    ("speedup_vs_compile", "vs compile", "{:.2f}x"),
    ("max_rel_err", "rel err", "{:.1e}"),
    ("plan", "plan", "{}"),
    ("note", "note", "{}"),
]


def _cell(value: object, fmt: str) -> str:
    if isinstance(value, float) and value != value:  # NaN
        return "-"
    return fmt.format(value)


def format_table(rows: list[Row], env: dict[str, str]) -> str:
    """A fixed-width table, preceded by the environment line."""
    header = [title for _, title, _ in _COLUMNS]
    lines = [[_cell(getattr(r, key), fmt) for key, _, fmt in _COLUMNS] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *lines)]
    out = io.StringIO()
    out.write(
        f"# {env['gpu']} | driver {env['driver']} | CUDA {env['cuda']} | torch {env['torch']} | "
        f"Triton {env['triton']} | cuDNN {env['cudnn']} | copy {env['copy_gbps']} GB/s\n"
    )
    out.write("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip() + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for line in lines:
        out.write("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() + "\n")
    return out.getvalue()


def write_csv(path: str, rows: list[Row], env: dict[str, str]) -> None:
    """One row per configuration, each with the environment columns; written atomically."""
    fields = [f.name for f in dataclasses.fields(Row)]
    files.write_csv(path, list(env) + fields, ({**env, **dataclasses.asdict(r)} for r in rows))
