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

from napari_cryoddm.sample import SampleConfig, molecule_for, simulate_micrograph  # noqa: E402


def limits(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> tuple[float, float]:
    lo, hi = np.percentile(image, [low, high])
    return float(lo), float(hi)


def main(out: Path) -> None:
    config = SampleConfig()
    sim = simulate_micrograph(config, molecule_for(config), 0)
    r = config.diameter_px / 2
    fig, axes = plt.subplots(1, 4, figsize=(20, 5.6), constrained_layout=True)

    ax = axes[0]
    ax.imshow(sim.noisy, cmap="gray", vmin=limits(sim.noisy)[0], vmax=limits(sim.noisy)[1])
    ax.set_title(f"{sim.name}: noisy (SNR {config.snr:g} over particle envelopes)")

    ax = axes[1]
    smooth = ndimage.gaussian_filter(sim.noisy, 2.5) - ndimage.gaussian_filter(sim.noisy, 25.0)
    ax.imshow(smooth, cmap="gray", vmin=limits(smooth)[0], vmax=limits(smooth)[1])
    for _, p in sim.particles.iterrows():
        colour = "#3fd13f" if p.conformation == 1 else "#ff9b29"
        ax.add_patch(Circle((p.x, p.y), r, fill=False, lw=1.2, ec=colour))
    ax.set_title("noisy band-passed (2.5–25 px), true particles (green A, orange B)")

    ax = axes[2]
    ax.imshow(sim.clean, cmap="gray", vmin=limits(sim.clean)[0], vmax=limits(sim.clean)[1])
    ax.set_title(f"clean CTF-modulated signal (defocus {sim.defocus / 1e4:.2f} µm)")

    ax = axes[3]
    ps = np.abs(np.fft.fftshift(np.fft.fft2(sim.clean))) ** 2
    ax.imshow(np.log1p(ps / np.median(ps)), cmap="magma")
    ax.set_title("power spectrum of the clean signal: Thon rings")
    for a in axes:
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle(f"napari-cryoddm sample: {config.width}×{config.height} px at {config.pixel_size:g} Å/px, "
                 f"{config.particles} particles of {config.diameter:g} Å ({config.diameter_px:.0f} px), "
                 f"seed {config.seed}", fontsize=13)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/images/sample.png"))
