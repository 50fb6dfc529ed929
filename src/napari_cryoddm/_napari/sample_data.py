"""File ▸ Open Sample ▸ CryoDDM: synthetic micrographs with their true particles and clean signal.

The sample is written once into a cache folder (`$CRYODDM_CACHE_DIR`, else the user cache
directory) and opened from there with the plugin's own reader, so the layers carry real file
paths: every widget (picker, forward, predict) works on them as on micrographs opened from disk.
The first call generates the files (a fraction of a second per 1024² micrograph); later calls
only open them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import __version__
from ..config import to_jsonable
from ..errors import CryoDDMError
from ..jobs import collect
from ..simulation.sample import SampleConfig, config_from_truth, generate_sample, read_truth
from ..simulation.sample_files import FORMAT_VERSION
from .layers import boxes_layer_kwargs
from .reader import micrograph_layer_data

log = logging.getLogger(__name__)

LayerData = tuple[Any, dict, str]

#: One micrograph with 7 particles; a stack of four (≥ 30 noise boxes each at W = 128).
MICROGRAPH_CONFIG = SampleConfig(n_micrographs=1)
STACK_CONFIG = SampleConfig(n_micrographs=4)


def cache_root() -> Path:
    """Where generated samples are kept: `$CRYODDM_CACHE_DIR`, else the user cache directory."""
    env = os.environ.get("CRYODDM_CACHE_DIR")
    if env:
        return Path(env)
    try:
        from platformdirs import user_cache_dir

        return Path(user_cache_dir("napari-cryoddm"))
    except ImportError:  # pragma: no cover - platformdirs comes with napari
        return Path.home() / ".cache" / "napari-cryoddm"


def sample_key(config: SampleConfig) -> str:
    """A short hash of everything that changes the files (config, format, package version)."""
    blob = json.dumps({"config": to_jsonable(config), "format": FORMAT_VERSION, "version": __version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def ensure_sample(config: SampleConfig, root: Path | None = None) -> Path:
    """The folder holding this sample, generated on first use (a temporary folder when the cache
    cannot be written)."""
    root = cache_root() if root is None else Path(root)
    folder = root / f"sample-{sample_key(config)}"
    if (folder / "truth.json").is_file():
        return folder
    try:
        collect(generate_sample(folder, config, overwrite=True))
    except (OSError, CryoDDMError) as exc:
        fallback = Path(tempfile.mkdtemp(prefix="cryoddm-sample-"))
        log.warning("cannot write the sample cache %s (%s); using %s", folder, exc, fallback)
        folder = fallback / "sample"
        collect(generate_sample(folder, config))
    return folder


def sample_layers(
    config: SampleConfig | None, name: str, root: Path | None = None, folder: Path | None = None
) -> list[LayerData]:
    """Noisy micrographs, their clean signal (hidden) and the true particles as boxes: of the
    sample `config` (generated into the cache), or of a sample folder already written (`folder`,
    e.g. `cryoddm demo`'s OUT/sample; its config is read from its truth.json)."""
    if folder is None:
        folder = ensure_sample(config, root)
    doc, table = read_truth(folder)
    config = config_from_truth(doc) if config is None else config
    names = [m["name"] for m in doc["micrographs"]]
    noisy = micrograph_layer_data([str(folder / "micrographs" / n) for n in names])
    clean = micrograph_layer_data([str(folder / "clean" / n) for n in names])
    vs = config.pixel_size
    sample_meta = {
        "folder": str(folder),
        "truth": str(folder / "truth.json"),
        "particles_star": str(folder / "particles.star"),
        "particles_cs": str(folder / "particles.cs"),
        "passthrough_cs": str(folder / "passthrough.cs"),
        "config": to_jsonable(config),
    }
    for layer, label in ((noisy, name), (clean, f"{name} clean signal (truth)")):
        layer[1]["name"] = label
        layer[1]["metadata"]["cryoddm"]["sample"] = sample_meta
    clean[1]["visible"] = False

    index = {n: i for i, n in enumerate(names)}
    idx = table["micrograph"].map(index).to_numpy(np.float64)
    points = (
        np.column_stack([idx, table["y"].to_numpy(np.float64), table["x"].to_numpy(np.float64)])
        if len(table)
        else np.zeros((0, 3))
    )
    features = pd.DataFrame(
        {
            "micrograph": table["micrograph"].astype(str).to_numpy(),
            "conformation": table["conformation"].to_numpy(np.int64),
            "defocus": table["defocus"].to_numpy(np.float64),
        }
    )
    kw = boxes_layer_kwargs(
        "particles",
        config.window,
        source=str(folder / "particles.star"),
        scale=(1.0, vs, vs),
        name=f"{name} particles",
        features=features,
        attached_to=name,
        micrograph_names=names,
        diameter_px=config.diameter_px,
    )
    return [noisy, clean, (points, kw, "points")]


def sample_micrograph() -> list[LayerData]:
    """napari sample: one 1024² micrograph (3 Å/px) with its 7 true particles and clean signal."""
    return sample_layers(MICROGRAPH_CONFIG, "CryoDDM sample")


def sample_stack() -> list[LayerData]:
    """napari sample: four micrographs as one stack, their particles and clean signal."""
    return sample_layers(STACK_CONFIG, "CryoDDM sample stack")
