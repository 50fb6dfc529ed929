"""The workflow in one napari window: five dock widgets in order on `cryoddm demo`'s sample data, no dialogs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _walk_module():
    spec = importlib.util.spec_from_file_location("cryoddm_screenshots", REPO / "scripts" / "screenshots.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.viewer
@pytest.mark.slow
def test_walk_the_five_widgets_on_the_demos_output(make_napari_viewer, tmp_path, monkeypatch, capsys):
    """`cryoddm demo` first (tiny), then the five-dock walk on the sample folder it wrote: the
    layers come from demo-out/sample's files, every step hands over to the next, the results
    match the core's and the truth; then the demo's closing command shows raw and denoised side
    by side."""
    import shlex

    import napari

    from napari_cryoddm.cli import main
    from napari_cryoddm.io.mrc import read_image
    from napari_cryoddm.predict import PredictModel, denoise_array

    demo = tmp_path / "demo-out"
    argv = ["demo", "--quick", "--micrographs", "2", "--size", "384", "--particles", "3", "--epochs", "1"]
    assert main([*argv, "--out", str(demo), "--device", "cpu"]) == 0
    assert (demo / "sample" / "truth.json").is_file() and (demo / "denoised").is_dir()
    hint = shlex.split(capsys.readouterr().out.rstrip().splitlines()[-1])

    monkeypatch.setenv("CRYODDM_CACHE_DIR", str(tmp_path / "cache"))
    viewer = make_napari_viewer(show=True)
    out = _walk_module().walk(viewer, tmp_path / "walk", epochs=1, max_noise=6, sample_folder=demo / "sample")

    raw, particles, d = out["raw_layer"], out["particles_layer"], out["defaults"]
    raw_paths = [m["path"] for m in raw.metadata["cryoddm"]["micrographs"]]
    assert [Path(p).parent for p in raw_paths] == [demo / "sample" / "micrographs"] * 2  # the demo's files
    assert not (tmp_path / "cache").exists()  # nothing was generated again
    # each step's inputs default to what the step before produced; no dock grew
    assert d["picker"] == (raw, particles, True)
    assert d["forward"][:3] == (raw, particles, out["noise_layer"])
    assert d["forward"][3] == pytest.approx(particles.metadata["cryoddm"]["diameter_px"])
    assert Path(d["train_forward"]) == Path(out["forward"].out)
    assert Path(d["predict"][0]) == Path(out["checkpoint"]) and d["predict"][1] is raw
    assert d["cs2star"][0] is raw
    assert out["widths"].grown() == {}
    # after Predict: side by side, the raw and the denoised stack only
    assert out["grid"]["enabled"]
    assert sorted(out["grid"]["visible"]) == sorted([raw.name, out["denoised_layer"].name])

    # predict: the denoised layer is core predict's output for the checkpoint train made
    layer = out["denoised_layer"]
    data = layer.data[0] if layer.multiscale else layer.data
    pm = PredictModel.from_checkpoint(out["checkpoint"])
    for i, path in enumerate(raw_paths):
        expected = denoise_array(pm, read_image(path), out["predict_config"])
        got = np.asarray(data[i])[: expected.shape[0], : expected.shape[1]]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)

    # cs2star: the converted particles sit on the sample's true positions (within 1 px)
    truth = np.asarray(particles.data)
    got = np.asarray(out["cs2star_layer"].data)
    assert len(got) == len(truth) == 6
    for i in np.unique(truth[:, 0]):
        t, g = truth[truth[:, 0] == i, 1:], got[got[:, 0] == i, 1:]
        dist = np.hypot(*(t[:, None, :] - g[None, :, :]).transpose(2, 0, 1))
        assert dist.min(axis=1).max() <= 1.0 and dist.min(axis=0).max() <= 1.0

    # the demo's last line, as printed: raw and denoised side by side
    assert hint[:2] == ["cryoddm", "view"]
    shown = make_napari_viewer(show=True)
    monkeypatch.setattr(napari, "Viewer", lambda **kw: shown)
    monkeypatch.setattr(napari, "run", lambda *a, **kw: None)
    assert main(hint[1:]) == 0
    assert [lay.name for lay in shown.layers] == ["micrographs", "denoised"]
    assert shown.canvas.grid.enabled and shown.canvas.grid.actual_shape(shown.layers) == (1, 2)
    assert all(lay.data.shape[0] == 2 for lay in shown.layers)
