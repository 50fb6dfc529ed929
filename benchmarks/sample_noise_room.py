"""Why the sample has 7 particles per micrograph: how many noise boxes the picker's rule finds.

    python benchmarks/sample_noise_room.py [--seeds 40] [--particles 6 7 8 9 10]

For each particle count, the default micrographs (1024², 3 Å/px, 45 px particles, W = 128) of
`--seeds` sample sets (8 micrographs each) are laid out (positions only, no pixels) and the
picker's own `auto_boxes_from_particles` (W boxes clear of every particle disc, no overlap, grid
step W/8, seeded random greedy order) counts the boxes. The baseline row is an empty micrograph:
random greedy packing alone caps the count near 36, whatever the particles do.
"""

from __future__ import annotations

import argparse

import numpy as np

from napari_cryoddm.box_placement import auto_boxes_from_particles
from napari_cryoddm.simulation.sample import micrograph_layout
from napari_cryoddm.simulation.sample_config import SampleConfig


def counts(config: SampleConfig, seeds: int) -> np.ndarray:
    out = []
    for seed in range(seeds):
        cfg = SampleConfig(**{**config.__dict__, "seed": seed})
        for i in range(cfg.n_micrographs):
            lay = micrograph_layout(cfg, i)
            boxes = auto_boxes_from_particles(
                cfg.shape, lay.centres.astype(float), cfg.diameter_px, cfg.window, name=lay.name, seed=0
            )
            out.append(len(boxes))
    return np.asarray(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=40)
    ap.add_argument("--particles", type=int, nargs="+", default=[0, 6, 7, 8, 9, 10])
    args = ap.parse_args()
    print(f"default micrographs (1024², 3 Å/px, W 128), {args.seeds} seeds × 8 micrographs each")
    print()
    print("| particles per micrograph | boxes: mean | min | micrographs with < 30 | default seed 0: min |")
    print("|---:|---:|---:|---:|---:|")
    for n in args.particles:
        c = counts(SampleConfig(particles=n), args.seeds)
        c0 = counts(SampleConfig(particles=n), 1)
        print(f"| {n} | {c.mean():.1f} | {c.min()} | {100 * (c < 30).mean():.1f} % | {c0.min()} |")


if __name__ == "__main__":
    main()
