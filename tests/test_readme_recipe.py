"""The README's "your own data" recipe, run as written on sample data laid out under its names.

The only change to the commands: `train` runs one epoch (the recipe's default of 60 is for a GPU);
`view` opens no window here: the paths it would show are checked instead.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import mrcfile
import pandas as pd
import pytest
import starfile

from napari_cryoddm.cli import main
from napari_cryoddm.io.star import read_coordinates
from napari_cryoddm.jobs import collect
from napari_cryoddm.simulation.sample import generate_sample
from napari_cryoddm.simulation.sample_config import SampleConfig

README = Path(__file__).resolve().parents[1] / "README.md"
pytestmark = pytest.mark.slow


def recipe() -> list[list[str]]:
    """The `cryoddm …` lines of the README's first bash block under "Your own data"."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Your own data") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    block = block.replace("\\\n", " ")
    commands = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            assert words[0] == "cryoddm", line
            commands.append(words[1:])
    return commands


def test_the_recipe_is_found():
    steps = [c[0] for c in recipe()]
    assert steps == ["info", "pick-noise", "forward", "train", "predict", "view", "cs2star"]


def test_the_readme_recipe_runs_on_sample_data(tmp_path, monkeypatch, capsys):
    from napari_cryoddm._napari import view

    shown = []
    monkeypatch.setattr(view, "show", lambda paths, overlay=False: shown.append((paths, overlay)))
    monkeypatch.setenv("DISPLAY", ":0")
    sample = collect(
        generate_sample(tmp_path / "sample", SampleConfig(n_micrographs=3, width=768, height=768, particles=8, seed=3))
    )
    monkeypatch.chdir(tmp_path)
    shutil.copytree(sample.micrographs[0].parent, "Micrographs")
    shutil.copyfile(sample.particles_star, "autopick.star")
    Path("J102").mkdir()
    shutil.copyfile(sample.particles_cs, "J102/J102_008_particles.cs")
    shutil.copyfile(sample.passthrough_cs, "J102/J102_passthrough_particles.cs")
    Path("CtfFind/job004").mkdir(parents=True)
    names = sorted(p.name for p in Path("Micrographs").glob("*.mrc"))
    starfile.write(
        {"micrographs": pd.DataFrame({"rlnMicrographName": [f"Micrographs/{n}" for n in names]})},
        "CtfFind/job004/micrographs_ctf.star",
    )

    for argv in recipe():
        if argv[0] == "train":
            argv = [*argv, "--epochs", "1", "--batch-size", "8"]
        assert main(argv) == 0, (argv, capsys.readouterr().err[-2000:])

    assert Path("noise.txt").read_text().strip()
    assert shown == [([Path("Micrographs"), Path("Denoised")], False)]
    assert Path("forward/forward.json").is_file() and Path("run/best.pt").is_file()
    denoised = sorted(Path("Denoised").glob("*.mrc"))
    assert [p.name for p in denoised] == names
    with mrcfile.open(denoised[0], permissive=True) as m:
        assert m.data.shape == (768 // 2, 768 // 2)  # the model was trained ×2 binned
    raw = read_coordinates("raw_particles.star")
    truth = read_coordinates("autopick.star")
    assert len(raw) == len(truth) and set(raw["micrograph"].map(lambda s: Path(s).name)) <= set(names)
