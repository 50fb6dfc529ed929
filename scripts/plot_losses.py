"""Per-batch training losses of a run (OUT/train/losses.json from scripts/train_reference.py),
with each phase's running mean and the 3× band of the stability criterion.

    python scripts/plot_losses.py reference-run/train/losses.json -o docs/images/training-stability.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("losses", type=Path)
    ap.add_argument("-o", "--out", type=Path, default=Path("training-stability.png"))
    ap.add_argument("--title", default="reference model: per-batch loss")
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = json.loads(args.losses.read_text())
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110)
    colours = {"s1": "tab:blue", "s2": "tab:orange", "s3": "tab:green"}
    for phase in sorted({e["phase"] for e in losses}):
        idx = np.array([i for i, e in enumerate(losses) if e["phase"] == phase])
        val = np.array([losses[i]["loss"] for i in idx])
        mean = np.cumsum(val) / np.arange(1, len(val) + 1)
        ax.scatter(idx, val, s=4, alpha=0.35, color=colours.get(phase), label=f"{phase.upper()} batch")
        ax.plot(idx, mean, color=colours.get(phase), lw=1.5, label=f"{phase.upper()} running mean")
        ax.plot(idx, 3 * mean, color=colours.get(phase), lw=0.8, ls="--", label="3× running mean")
    ax.set_xlabel("batch")
    ax.set_ylabel("MSE")
    ax.set_title(args.title)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
