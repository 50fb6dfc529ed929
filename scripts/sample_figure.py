"""Draw docs/images/sample.png: a sample micrograph beside its clean signal and its Thon rings.

Run from the repository root: `python scripts/sample_figure.py [OUT.png]`. The data are made in
memory with the default `SampleConfig` (seed 0), exactly as `cryoddm sample` writes them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Circle  # noqa: E402
from scipy import ndimage  # noqa: E402

from napari_cryoddm.simulation.sample import molecule_for, simulate_micrograph  # noqa: E402
from napari_cryoddm.simulation.sample_config import SampleConfig


def limits(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> tuple[float, float]:
    lo, hi = np.percentile(image, [low, high])
    return float(lo), float(hi)


def main(out: Path) -> None:
    config = SampleConfig()
    sim = simulate_micrograph(config, molecule_for(config), 0)
    r = config.diameter_px / 2
    fig, axes = plt.subplots(2, 3, figsize=(16, 11), constrained_layout=True)
    gray = dict(cmap="gray", interpolation="nearest")

    ax = axes[0, 0]
    ax.imshow(sim.noisy, vmin=limits(sim.noisy)[0], vmax=limits(sim.noisy)[1], **gray)
    ax.set_title(f"{sim.name}: noisy (SNR {config.snr:g} over particle envelopes)")

    ax = axes[0, 1]
    band = ndimage.gaussian_filter(sim.noisy, 2.5) - ndimage.gaussian_filter(sim.noisy, 25.0)
    ax.imshow(band, vmin=limits(band)[0], vmax=limits(band)[1], **gray)
    for _, p in sim.particles.iterrows():
        colour = "#3fd13f" if p.conformation == 1 else "#ff9b29"
        ax.add_patch(Circle((p.x, p.y), r * 1.3, fill=False, lw=1.5, ec=colour))
    ax.set_title("noisy, band-passed 2.5–25 px; true particles (green A, orange B)")

    ax = axes[0, 2]
    lo, hi = limits(sim.clean, 0.01, 99.99)
    ax.imshow(sim.clean, vmin=lo, vmax=hi, **gray)
    ax.set_title(f"clean CTF-modulated signal (defocus {sim.defocus / 1e4:.2f} µm)")

    # a zoom on the first particle: the raw pixels, and the truth a denoiser should approach
    p = sim.particles.iloc[0]
    h = 96
    y0, x0 = int(p.y) - h, int(p.x) - h
    crop = (slice(max(y0, 0), y0 + 2 * h), slice(max(x0, 0), x0 + 2 * h))
    for ax, image, what in ((axes[1, 0], sim.noisy, "noisy"), (axes[1, 1], sim.clean, "clean")):
        part = image[crop]
        lo, hi = limits(part) if what == "noisy" else limits(part, 0.05, 99.95)
        ax.imshow(part, vmin=lo, vmax=hi, **gray)
        ax.set_title(f"{what}, {2 * h}×{2 * h} px around particle 1 (conformation {'AB'[int(p.conformation) - 1]})")

    ax = axes[1, 2]
    ps = np.abs(np.fft.fftshift(np.fft.fft2(sim.clean))) ** 2
    ax.imshow(np.log1p(ps / np.median(ps)), cmap="magma")
    ax.set_title("power spectrum of the clean signal: Thon rings")
    for a in axes.ravel():
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle(
        f"napari-cryoddm sample: {config.width}×{config.height} px at {config.pixel_size:g} Å/px, "
        f"{config.particles} particles of {config.diameter:g} Å ({config.diameter_px:.0f} px), "
        f"seed {config.seed}",
        fontsize=14,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=72)
    plt.close(fig)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/images/sample.png"))
