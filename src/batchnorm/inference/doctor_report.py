"""The Markdown report of a :class:`batchnorm.doctor.Diagnosis`, with plots (matplotlib, Agg).

Written by ``batchnorm doctor --out DIR``: ``DIR/report.md``, ``DIR/diagnosis.json`` and PNG plots:
the mean shift and variance ratio of every channel of every layer (moving averages against the
population statistics), and ``|gamma|`` and ``running_var`` per channel with the dead-channel
thresholds. matplotlib is imported only here.
"""

from __future__ import annotations

import json
from pathlib import Path

from batchnorm.inference.doctor import Diagnosis

__all__ = ["write_report"]


def _plot_stale(diagnosis: Diagnosis, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [lay for lay in diagnosis.layers.values() if lay.mean_shift_per_channel is not None]
    if not layers:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for index, layer in enumerate(layers):
        for ax, values in zip(axes, (layer.mean_shift_per_channel, layer.var_ratio_per_channel)):
            ax.scatter([index] * len(values), values.numpy(), s=8, alpha=0.6)
    for ax, title, lines in (
        (axes[0], "mean shift (population std units)", (0.1, 0.5, 3.0)),
        (axes[1], "variance ratio max(r, 1/r)", (1.25, 2.0, 10.0)),
    ):
        for value, style in zip(lines, (":", "--", "-")):
            ax.axhline(value, color="grey", linestyle=style, linewidth=0.8)
        ax.set_title(title)
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels([lay.name or "(model)" for lay in layers], rotation=60, fontsize=7)
        ax.set_yscale(
            "symlog" if "shift" in title else "log",
            **({"linthresh": 0.1} if "shift" in title else {}),
        )
    fig.suptitle(
        "moving averages vs population statistics, per channel (lines: info/warning/error)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_channels(diagnosis: Diagnosis, path: Path, dead_gamma: float) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(diagnosis.layers.values())
    if not layers:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for index, layer in enumerate(layers):
        if layer.gamma is not None:
            axes[0].scatter([index] * len(layer.gamma), layer.gamma.clamp_min(1e-8).numpy(), s=8)
        if layer.running_var is not None:
            var = layer.running_var.clamp_min(1e-12).numpy()
            axes[1].scatter([index] * len(var), var, s=8)
            axes[1].scatter([index], [layer.eps], marker="_", s=200, color="red")
    axes[0].axhline(dead_gamma, color="red", linewidth=0.8)
    axes[0].set_title("|gamma| per channel (red: dead below)")
    axes[1].set_title("running_var per channel (red: eps)")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels([lay.name or "(model)" for lay in layers], rotation=60, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(
    diagnosis: Diagnosis, out_dir: str | Path, *, title: str = "", dead_gamma: float = 1e-3
) -> Path:
    """Write ``report.md``, ``diagnosis.json`` and the plots into ``out_dir``.

    Args:
        diagnosis: what :func:`batchnorm.doctor.diagnose` returned.
        out_dir: the directory (created if missing).
        title: what was diagnosed (the model's path, say), for the heading.
        dead_gamma: the threshold drawn on the ``|gamma|`` plot.

    Returns:
        The path of ``report.md``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnosis.json").write_text(json.dumps(diagnosis.to_dict(), indent=1))
    lines = [f"# Batch-norm diagnosis{': ' + title if title else ''}", "", diagnosis.summary(), ""]
    if diagnosis.findings:
        lines += [
            "## Findings",
            "",
            "| severity | kind | layer | what | remedy |",
            "|---|---|---|---|---|",
        ]
        for f in diagnosis.findings:
            cells = [f.severity, f"`{f.kind}`", f.where, f.message, f.remedy]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    if diagnosis.layers:
        lines += ["## Layers", "", "```", diagnosis.table(), "```", ""]
    metrics = {k: v for k, v in diagnosis.metrics.items() if v is not None}
    if metrics:
        lines += ["## Measurements", "", "| measurement | value |", "|---|---|"]
        lines += [
            f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
            for key, value in metrics.items()
        ]
        lines.append("")
    plots = []
    if _plot_stale(diagnosis, out / "statistics.png"):
        plots.append(("statistics.png", "Moving averages against population statistics"))
    if _plot_channels(diagnosis, out / "channels.png", dead_gamma):
        plots.append(("channels.png", "|gamma| and running_var per channel"))
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{text}]({name})\n" for name, text in plots]
    if diagnosis.notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in diagnosis.notes] + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
