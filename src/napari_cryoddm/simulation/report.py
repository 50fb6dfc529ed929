"""The demo's quality report: montage, power spectra, FRC curves and the metrics table.

Everything is measured against the known clean signal with `quality.py`'s definitions, so the
demo's table and the benchmark harness's compare. Figures are drawn with matplotlib's Agg backend
(no display needed on a cluster node).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write
from ..config import to_jsonable
from . import quality as q


@dataclass
class ReportResult:
    """Paths of the report's files and the metrics rows (method → metric → value)."""

    folder: Path
    files: dict[str, Path]
    rows: dict[str, dict[str, float]]
    table: str


@dataclass
class ReportInput:
    """The micrographs a report compares: raw, clean truth and each method's output (same order)."""

    names: list[str]
    raw: list[np.ndarray]
    clean: list[np.ndarray]
    methods: dict[str, list[np.ndarray]]  # e.g. {"CryoDDM (this run)": [...]}
    particles: list[np.ndarray] = field(default_factory=list)  # per micrograph: (n, 2) rows (y, x)
    notes: list[str] = field(default_factory=list)
    extra_rows: dict[str, dict[str, Any]] = field(default_factory=dict)


def _display(image: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Percentile contrast for display only (the data are never changed)."""
    lo, hi = np.percentile(image, [low, high])
    return np.clip((image - lo) / ((hi - lo) or 1.0), 0, 1)


def _fit_for_display(d: np.ndarray, c: np.ndarray) -> np.ndarray:
    """What a method made, shown without the ice band (|k| ≤ 3 cycles/image) and with the
    truth's contrast sign. Not F itself: F's ice-band part is fitted to the truth and would paint
    the particles' smooth footprint into every panel."""
    _, a = q.ice_fit(d, c)
    return (-1.0 if a < 0 else 1.0) * q.remove_ice(d)


def _zoom_window(shape: tuple[int, int], particles: np.ndarray, size: int) -> tuple[slice, slice]:
    size = min(size, shape[0], shape[1])
    if particles.size:
        cy, cx = (int(v) for v in particles[0])
    else:
        cy, cx = shape[0] // 2, shape[1] // 2
    y0 = int(np.clip(cy - size // 2, 0, shape[0] - size))
    x0 = int(np.clip(cx - size // 2, 0, shape[1] - size))
    return slice(y0, y0 + size), slice(x0, x0 + size)


def montage(path: Path, data: ReportInput, max_micrographs: int = 3, zoom: int = 192) -> None:
    """Rows: a few micrographs, then a zoom on one particle; columns: raw, methods, clean."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = min(max_micrographs, len(data.raw))
    cols = ["raw", *data.methods, "clean"]
    rows = n + 1
    fig, axes = plt.subplots(rows, len(cols), figsize=(2.6 * len(cols), 2.6 * rows), squeeze=False)
    for i in range(rows):
        mi = min(i, n - 1) if i < n else 0
        clean = data.clean[mi]
        parts = data.particles[mi] if mi < len(data.particles) else np.zeros((0, 2))
        window = (slice(None), slice(None)) if i < n else _zoom_window(clean.shape, parts, zoom)
        for j, col in enumerate(cols):
            if col == "raw":
                img = _fit_for_display(data.raw[mi], clean)
            elif col == "clean":
                img = q.remove_ice(clean)
            else:
                img = _fit_for_display(data.methods[col][mi], clean)
            ax = axes[i, j]
            ax.imshow(_display(img[window]), cmap="gray", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col, fontsize=9)
            if j == 0:
                ax.set_ylabel(data.names[mi] if i < n else f"zoom {zoom}² px", fontsize=8)
    fig.suptitle(
        "raw / denoised / clean (ice band |k| ≤ 3 cycles/image removed from each, 1–99 % contrast)", fontsize=9
    )
    fig.tight_layout()
    _save(fig, path)


def spectra(path: Path, data: ReportInput) -> None:
    """Rotationally averaged power spectra before and after, with the truth's for reference."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    curves = {"raw": data.raw, **data.methods, "clean": data.clean}
    for name, images in curves.items():
        # each method on the truth's scale, so the curves are comparable
        fitted = (
            images
            if name == "clean"
            else [q.ice_fit(d, c)[1] * np.asarray(d, np.float64) for d, c in zip(images, data.clean)]
        )
        fq, p = None, None
        for im in fitted:
            f, pw = q.radial_power(im)
            p = pw if p is None else p + pw
            fq = f
        ax.semilogy(fq[1:], p[1:] / len(fitted), label=name, lw=1.2 if name != "clean" else 2)
    ax.set_xlabel("spatial frequency (fraction of Nyquist)")
    ax.set_ylabel("power")
    ax.set_title("power spectra (each method scaled by its fit to the truth)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def frc_plot(path: Path, scores: dict[str, q.Scores]) -> None:
    """FRC against the clean signal (ice band removed), with the bands marked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, s in scores.items():
        rings = s.rings
        if rings is None:
            continue
        keep = (rings.q <= 1.0) & (np.arange(rings.q.size) > rings.ice_ring)
        ax.plot(rings.q[keep], rings.frc()[keep], label=f"{name} (r = {s.r:.2f})", lw=1.2)
        # per-ring gain Σ Re(F·C*) / Σ|C|² relative to the low band: what a blur takes away
        g_low = rings.band_gain("low")
        with np.errstate(invalid="ignore", divide="ignore"):
            gain = rings.cross / np.where(rings.cc > 0, rings.cc, np.nan) / g_low
        ax2.plot(rings.q[keep], gain[keep], lw=1.2, label=name)
    for a in (ax, ax2):
        for edge in (0.1, 0.3, 0.5):
            a.axvline(edge, color="0.7", lw=0.8, ls="--")
        a.set_xlabel("spatial frequency (fraction of Nyquist); bands low | mid | high")
    ax.set_ylim(-0.1, 1.02)
    ax.set_ylabel("FRC with the clean signal")
    ax.set_title("Fourier ring correlation against the truth")
    ax.legend(fontsize=8)
    ax2.set_xlim(0, 0.6)
    ax2.set_ylim(-0.2, 1.5)
    ax2.axhline(1.0, color="0.5", lw=0.8)
    ax2.set_ylabel("signal transfer (gain / low-band gain)")
    ax2.set_title("signal transfer per ring (1 = kept, 0 = smoothed away)")
    fig.tight_layout()
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_write(path, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def write_report(folder: str | Path, data: ReportInput, accuracy: dict[str, q.Accuracy] | None = None) -> ReportResult:
    """Score every method (and the raw data) against the truth and write the report's files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scores = {"raw": q.score(data.raw, data.clean)}
    for name, images in data.methods.items():
        scores[name] = q.score(images, data.clean)
    rows: dict[str, dict[str, Any]] = {name: s.as_row() for name, s in scores.items()}
    for name, extra in data.extra_rows.items():
        rows.setdefault(name, {}).update(extra)
    columns = list(q.COLUMNS)
    if accuracy:
        for name, acc in accuracy.items():
            rows.setdefault(name, {}).update(acc.as_row())
        columns += ["acc", "acc_se", "acc_diff", "acc_diff_se"]
    table = q.markdown_table(rows, columns)
    files = {
        "montage": folder / "montage.png",
        "spectra": folder / "power_spectra.png",
        "frc": folder / "frc.png",
        "metrics_json": folder / "metrics.json",
        "metrics_md": folder / "metrics.md",
        "report": folder / "report.md",
    }
    montage(files["montage"], data)
    spectra(files["spectra"], data)
    frc_plot(files["frc"], scores)
    payload = {
        "definitions": "docs/quality.md (napari_cryoddm.simulation.quality)",
        "micrographs": data.names,
        "rows": rows,
        "notes": data.notes,
        "r_each": {name: s.r_each for name, s in scores.items()},
    }
    with atomic_write(files["metrics_json"], overwrite=True) as tmp:
        tmp.write_text(json.dumps(to_jsonable(json_finite(payload)), indent=1) + "\n", encoding="utf-8")
    with atomic_write(files["metrics_md"], overwrite=True) as tmp:
        tmp.write_text(table + "\n", encoding="utf-8")
    lines = [
        "# CryoDDM demo report",
        "",
        f"{len(data.raw)} micrographs ({', '.join(data.names)}), scored against their clean signal.",
        "",
        table,
        "",
        "r: Pearson with the truth after the fit a·D + b + ice band (|k| ≤ 3 cycles/image); "
        "r_plain: plain a·D + b fit; FRC and T per band (fractions of Nyquist: low 0–0.1, "
        "mid 0.1–0.3, high 0.3–0.5); T = signal transfer relative to the low band "
        "(a blur drives T_high to 0).",
        "",
    ]
    if accuracy:
        lines += [
            "acc: conformation calls (NCC against both conformations' clean projections at "
            "the true pose), acc_diff: paired difference to the raw data, with standard errors.",
            "",
        ]
    lines += [
        *(f"- {n}" for n in data.notes),
        "",
        "![montage](montage.png)",
        "",
        "![power spectra](power_spectra.png)",
        "",
        "![FRC](frc.png)",
        "",
    ]
    with atomic_write(files["report"], overwrite=True) as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")
    return ReportResult(folder, files, rows, table)


def json_finite(obj: Any) -> Any:
    """JSON has no NaN: write null instead."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_finite(v) for v in obj]
    return obj
