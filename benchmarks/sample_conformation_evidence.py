"""How much conformation evidence the raw sample data hold (the quality metric's NCC call).

    python benchmarks/sample_conformation_evidence.py [--micrographs 8] [--particles 15]

1024² micrographs at 1.5 Å/px (90 px particles): at SNR 0.05 / hinge 12° the raw data should be
nearly saturated, at SNR 0.01 / 6° well above chance (0.5) but below the clean data's 1.0 —
the regime where denoisers can be told apart (the quality metrics of docs/quality.md).
"""

from __future__ import annotations

import argparse

from napari_cryoddm.simulation import quality as q
from napari_cryoddm.simulation import sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micrographs", type=int, default=8)
    ap.add_argument("--particles", type=int, default=15)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    print("| data | particles | clean accuracy | raw accuracy ± s.e. |")
    print("|---|---:|---:|---:|")
    for snr, hinge in ((0.05, 12.0), (0.01, 6.0)):
        cfg = sample.SampleConfig(
            n_micrographs=args.micrographs,
            pixel_size=1.5,
            particles=args.particles,
            snr=snr,
            hinge_angle=hinge,
            seed=args.seed,
        )
        arr = sample.sample_arrays(cfg)
        box = q.box_size_for(cfg.diameter_px)
        refs = q.sample_references(arr.table, arr.molecule, cfg, box)
        clean = list(arr.clean)
        right_clean = q.conformation_correct(clean, clean, arr.table, refs, box)
        right_raw = q.conformation_correct(list(arr.noisy), clean, arr.table, refs, box)
        acc = q.conformation_accuracy(right_clean, right_raw)
        print(f"| SNR {snr:g}, hinge {hinge:g}° | {acc.n} | {acc.acc:.3f} | {acc.acc_raw:.3f} ± {acc.se_raw:.3f} |")


if __name__ == "__main__":
    main()
