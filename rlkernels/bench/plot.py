"""Plots a results CSV of ``rlkernels-bench`` (``python -m rlkernels.bench``).

Fixed shapes: one panel per op, shape and cache state, achieved GB/s per provider as bars on a log axis. A ``--sizes``
sweep (the CSV's ``series`` column is filled): one panel per op and layout, GB/s against the number of
elements, one line per provider. Both draw the measured copy bandwidth as the line to reach.

    python -m rlkernels.bench.plot results.csv   # writes results.png
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed (CI, SSH sessions)
import matplotlib.pyplot as plt


def plot(csv_path: Path) -> Path:
    """Draws ``csv_path`` into a PNG next to it and returns the PNG's path."""
    csv_path = Path(csv_path)
    rows = list(csv.DictReader(csv_path.open()))
    if any(r.get("series") for r in rows):
        fig = _plot_sizes(rows)
    else:
        fig = _plot_shapes(rows)
    first = rows[0]
    fig.suptitle(f"{first['device']}, commit {first['commit']}, {first['date']}", fontsize=10)
    fig.tight_layout()
    out = csv_path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _copy_gbps(rows: list[dict]) -> float:
    return next(float(r["gbps"]) for r in rows if r["op"] == "copy")


def _plot_shapes(rows: list[dict]):
    copy_gbps = _copy_gbps(rows)
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        if r["op"] not in ("copy", "read") and r["gbps"]:
            groups.setdefault((r["op"], r["shape"], r.get("cache", "")), []).append(r)
    states = {cache for _, _, cache in groups}
    bars = sum(len(members) for members in groups.values())
    fig, axes = plt.subplots(max(1, len(groups)), 1, figsize=(8, 1.2 + 0.3 * bars + 0.5 * len(groups)),
                             squeeze=False)
    for ax, ((op, shape, cache), members) in zip(axes[:, 0], groups.items()):
        names = [m["provider"] for m in members]
        colors = ["tab:orange" if n.startswith("rlkernels") else "tab:gray" for n in names]
        ax.barh(names, [float(m["gbps"]) for m in members], color=colors)
        ax.axvline(copy_gbps, color="tab:red", linestyle="--", label=f"copy {copy_gbps:.1f} GB/s")
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_title(f"{op} {shape}" + (f", {cache}" if len(states) > 1 else ""), fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    axes[-1, 0].set_xlabel("GB/s (bytes the op must move / median time)")
    return fig


def _plot_sizes(rows: list[dict]):
    copy_gbps = _copy_gbps(rows)
    panels: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for r in rows:
        if r["op"] == "copy" or not r.get("series"):
            continue
        lines = panels.setdefault(r["series"], {})
        points = lines.setdefault(r["provider"], [])
        if r["gbps"]:  # a skipped or failed provider keeps its legend entry without points
            points.append((int(r["numel"]), float(r["gbps"])))
    n = max(1, len(panels))
    cols = 2 if n > 1 else 1
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 4 * nrows), squeeze=False)
    for ax, (series, lines) in zip(axes.flat, panels.items()):
        for provider, points in lines.items():
            if not points:
                continue
            points.sort()
            style = {"linewidth": 2.2, "marker": "o"} if provider.startswith("rlkernels") else {"marker": "."}
            ax.plot([p[0] for p in points], [p[1] for p in points], label=provider, **style)
        ax.axhline(copy_gbps, color="tab:red", linestyle="--", label=f"copy {copy_gbps:.1f} GB/s")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(series, fontsize=9)
        ax.set_xlabel("elements (product of the shape)")
        ax.set_ylabel("GB/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    return fig


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(f"wrote {plot(Path(path))}")
