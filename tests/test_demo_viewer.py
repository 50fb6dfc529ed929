"""The workflow in one napari window: five dock widgets in order on the sample data, no dialogs."""

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
def test_walk_the_five_widgets(make_napari_viewer, tmp_path, monkeypatch):
    pytest.importorskip("napari_cryoddm._napari.widgets.predict")
    from napari_cryoddm.io.mrc import read_image
    from napari_cryoddm.predict import PredictModel, denoise_array
    from napari_cryoddm.simulation.sample_config import SampleConfig

    monkeypatch.setenv("CRYODDM_CACHE_DIR", str(tmp_path / "cache"))
    viewer = make_napari_viewer(show=True)
    tiny = SampleConfig(n_micrographs=2, width=384, height=384, particles=3, seed=4)
    out = _walk_module().walk(viewer, tmp_path / "walk", epochs=1, max_noise=6, sample_config=tiny)

    # each step's inputs default to what the step before produced; no dock grew
    raw, particles, d = out["raw_layer"], out["particles_layer"], out["defaults"]
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
    raw_paths = [m["path"] for m in out["raw_layer"].metadata["cryoddm"]["micrographs"]]
    layer = out["denoised_layer"]
    data = layer.data[0] if layer.multiscale else layer.data
    pm = PredictModel.from_checkpoint(out["checkpoint"])
    for i, path in enumerate(raw_paths):
        expected = denoise_array(pm, read_image(path), out["predict_config"])
        got = np.asarray(data[i])[: expected.shape[0], : expected.shape[1]]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)

    # cs2star: the converted particles sit on the sample's true positions (within 1 px)
    truth = np.asarray(out["particles_layer"].data)
    got = np.asarray(out["cs2star_layer"].data)
    assert len(got) == len(truth) == 6
    for i in np.unique(truth[:, 0]):
        t, g = truth[truth[:, 0] == i, 1:], got[got[:, 0] == i, 1:]
        d = np.hypot(*(t[:, None, :] - g[None, :, :]).transpose(2, 0, 1))
        assert d.min(axis=1).max() <= 1.0 and d.min(axis=0).max() <= 1.0


@pytest.mark.viewer
@pytest.mark.slow
def test_walk_on_the_demos_output(make_napari_viewer, tmp_path, monkeypatch, capsys):
    """`cryoddm demo` first (tiny), then the same five-dock walk on the sample folder it wrote:
    the layers come from demo-out/sample's files, and every step hands over as before; the
    demo's closing command opens its raw and denoised micrographs side by side."""
    import shlex

    import napari

    from napari_cryoddm.cli import main

    demo = tmp_path / "demo-out"
    argv = ["demo", "--quick", "--micrographs", "2", "--size", "384", "--particles", "3", "--epochs", "1"]
    assert main([*argv, "--out", str(demo), "--device", "cpu"]) == 0
    assert (demo / "sample" / "truth.json").is_file() and (demo / "denoised").is_dir()
    hint = shlex.split(capsys.readouterr().out.rstrip().splitlines()[-1])

    monkeypatch.setenv("CRYODDM_CACHE_DIR", str(tmp_path / "cache"))
    viewer = make_napari_viewer(show=True)
    out = _walk_module().walk(viewer, tmp_path / "walk", epochs=1, max_noise=6, sample_folder=demo / "sample")

    raw, particles, d = out["raw_layer"], out["particles_layer"], out["defaults"]
    paths = [Path(m["path"]) for m in raw.metadata["cryoddm"]["micrographs"]]
    assert [p.parent for p in paths] == [demo / "sample" / "micrographs"] * 2  # the demo's own files
    assert not (tmp_path / "cache").exists()  # nothing was generated again
    assert d["picker"] == (raw, particles, True)
    assert d["forward"][:3] == (raw, particles, out["noise_layer"])
    assert Path(d["train_forward"]) == Path(out["forward"].out)
    assert Path(d["predict"][0]) == Path(out["checkpoint"]) and d["predict"][1] is raw
    assert d["cs2star"][0] is raw
    assert out["widths"].grown() == {}
    assert out["grid"]["enabled"]
    assert sorted(out["grid"]["visible"]) == sorted([raw.name, out["denoised_layer"].name])
    assert len(out["cs2star_layer"].data) == len(particles.data) == 6

    # the demo's last line, as printed
    assert hint[:2] == ["cryoddm", "view"]
    shown = make_napari_viewer(show=True)
    monkeypatch.setattr(napari, "Viewer", lambda **kw: shown)
    monkeypatch.setattr(napari, "run", lambda *a, **kw: None)
    assert main(hint[1:]) == 0
    assert [lay.name for lay in shown.layers] == ["micrographs", "denoised"]
    assert shown.canvas.grid.enabled and shown.canvas.grid.actual_shape(shown.layers) == (1, 2)
    assert all(lay.data.shape[0] == 2 for lay in shown.layers)
