"""Plots a results CSV of ``python -m benchmarks.run``: one panel per (op, shape), achieved GB/s per
provider on a log axis, with the measured copy bandwidth as the line to reach.

    python -m benchmarks.plot benchmarks/results/<device>-<date>.csv   # writes <same name>.png
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import matplotlib.pyplot as plt


def plot(csv_path: Path) -> Path:
    rows = list(csv.DictReader(csv_path.open()))
    copy_gbps = next(float(r["gbps"]) for r in rows if r["op"] == "copy")
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["op"] != "copy" and r["gbps"]:
            groups.setdefault((r["op"], r["shape"]), []).append(r)
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 1.2 + 0.45 * len(rows)), squeeze=False)
    for ax, ((op, shape), members) in zip(axes[:, 0], groups.items(), strict=True):
        names = [m["provider"] for m in members]
        colors = ["tab:orange" if n.startswith("rlkernels") else "tab:gray" for n in names]
        ax.barh(names, [float(m["gbps"]) for m in members], color=colors)
        ax.axvline(copy_gbps, color="tab:red", linestyle="--", label=f"copy {copy_gbps:.1f} GB/s")
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_title(f"{op} {shape}", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    axes[-1, 0].set_xlabel("GB/s (bytes the op must move / median time)")
    first = rows[0]
    fig.suptitle(f"{first['device']}, commit {first['commit']}, {first['date']}", fontsize=10)
    fig.tight_layout()
    out = csv_path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    return out


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(f"wrote {plot(Path(path))}")
