"""Plots drawn from a benchmark CSV: % of the copy bandwidth per configuration and provider."""

from __future__ import annotations

import math

from batchnorm.ops.bench import files


def plot_csv(csv_path: str, out_path: str) -> str:
    """One bar panel per mode: % of copy bandwidth for each (shape, dtype, layout) and provider.

    Returns:
        ``out_path`` (a PNG, written atomically).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = files.read_csv(
        csv_path, ("shape", "dtype", "layout", "mode", "provider", "pct_copy"), "batchnorm bench"
    )
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig_width = 8.0
    fig, axes = plt.subplots(len(modes), 1, figsize=(fig_width, 3.0 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        sub = [r for r in rows if r["mode"] == mode]
        configs = list(dict.fromkeys((r["shape"], r["dtype"], r["layout"]) for r in sub))
        fig_width = max(fig_width, 0.3 * len(configs) * len(providers))
        width = 0.8 / len(providers)
        by_key = {(r["shape"], r["dtype"], r["layout"], r["provider"]): r for r in sub}
        for k, provider in enumerate(providers):
            values = []
            for config in configs:
                row = by_key.get((*config, provider))
                value = float(row["pct_copy"]) if row and row["pct_copy"] else math.nan
                values.append(value)
            ax.bar([i + k * width for i in range(len(configs))], values, width, label=provider)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(configs))])
        ax.set_xticklabels([" ".join(c) for c in configs], rotation=90, fontsize=6)
        ax.set_ylabel("% of copy bandwidth")
        ax.set_title(mode)
        ax.legend(fontsize=7)
    fig.set_size_inches(fig_width, 3.0 * len(modes) + 1.0)
    first = rows[0]
    fig.suptitle(
        f"{first.get('gpu', '?')}, torch {first.get('torch', '?')}, "
        f"Triton {first.get('triton', '?')}, copy {first.get('copy_gbps', '?')} GB/s"
    )
    fig.tight_layout()
    try:
        return files.save_figure(fig, out_path)
    finally:
        plt.close(fig)
