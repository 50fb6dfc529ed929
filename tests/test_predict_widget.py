"""Predict widget in a real viewer: the denoised layer sits beside the raw one and equals core output."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import torch
from torch import nn

from napari_cryoddm.io.mrc import write_mrc
from napari_cryoddm.normalise import Normalisation
from napari_cryoddm.predict import PredictConfig, PredictModel, denoise_array

pytestmark = pytest.mark.viewer


def _model(bin_factor: float = 1.0) -> PredictModel:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 5, padding=2), nn.LeakyReLU(0.1), nn.Conv2d(4, 1, 3, padding=1))
    return PredictModel(net, Normalisation(), bin_factor, "test-net")


def _widget(viewer):
    from napari_cryoddm._napari.widgets.predict import PredictWidget

    w = PredictWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.form.set(device="cpu", tile=256, overlap=32, channels_last=False)
    return w


def test_quick_look_on_sample_data_beside_raw_equals_core(make_napari_viewer, tmp_path, monkeypatch):
    monkeypatch.setenv("CRYODDM_CACHE_DIR", str(tmp_path / "cache"))
    from napari_cryoddm._napari.sample_data import sample_micrograph

    viewer = make_napari_viewer()
    for data, kw, kind in sample_micrograph():
        getattr(viewer, f"add_{kind}")(data, **kw)
    raw = next(layer for layer in viewer.layers if layer.metadata.get("cryoddm", {}).get("micrographs"))
    w = _widget(viewer)
    w.layer_combo.value = raw
    pm = _model()
    w.set_model(pm)
    w.denoise_current()
    name = f"{raw.name} denoised"
    assert name in viewer.layers
    den = viewer.layers[name]
    assert viewer.layers.index(den) == viewer.layers.index(raw) + 1  # right beside the raw one
    entry = raw.metadata["cryoddm"]["micrographs"][0]
    h, w_ = entry["shape"]
    plane = np.asarray((raw.data[0] if raw.multiscale else raw.data)[0])[:h, :w_]
    expect = denoise_array(pm, plane, w.config())
    shown = np.asarray(den.data[0])[:h, :w_]
    np.testing.assert_array_equal(shown, expect)
    assert tuple(den.scale) == tuple(raw.scale)
    lo, hi = den.contrast_limits
    assert np.percentile(expect, 0.1) <= lo < hi <= np.percentile(expect, 99.9)
    grid = getattr(getattr(viewer, "canvas", None), "grid", None) or viewer.grid
    assert grid.enabled  # side by side by default
    w.overlay.value = True
    assert not grid.enabled


def test_denoise_all_writes_files_and_layer_reads_them(make_napari_viewer, tmp_path):
    from napari_cryoddm._napari.reader import micrograph_layer_data

    rng = np.random.default_rng(0)
    paths = []
    for i, shape in enumerate([(96, 128), (128, 80)]):
        p = tmp_path / "in" / f"m{i}.mrc"
        p.parent.mkdir(exist_ok=True)
        write_mrc(p, rng.normal(5, 1, shape).astype(np.float32), voxel_size=2.0)
        paths.append(p)
    viewer = make_napari_viewer()
    data, kw, _ = micrograph_layer_data([str(p) for p in paths])
    raw = viewer.add_image(data, **kw)
    w = _widget(viewer)
    w.layer_combo.value = raw
    pm = _model(bin_factor=2.0)
    w.set_model(pm)
    w.out_dir.value = tmp_path / "out"
    w.denoise_all()
    den = viewer.layers[f"{raw.name} denoised"]
    assert tuple(den.scale[-2:]) == pytest.approx(tuple(2 * s for s in raw.scale[-2:]))
    for i, p in enumerate(paths):
        out = tmp_path / "out" / p.name
        with mrcfile.open(out) as m:
            assert m.voxel_size.x == pytest.approx(4.0)
            arr = m.data.copy()
        assert arr.shape == tuple(s // 2 for s in mrcfile.read(p).shape)
        np.testing.assert_array_equal(arr, denoise_array(pm, mrcfile.read(p), w.config()))
        shown = np.asarray(den.data[i])[: arr.shape[0], : arr.shape[1]]
        np.testing.assert_array_equal(shown, arr)
    assert den.metadata["cryoddm"]["micrographs"][0]["voxel_size"] == pytest.approx(4.0)
    # contrast from the first result (median ± 3 robust σ), not the placeholder set before any
    # result; the slider's range reaches well beyond it
    from napari_cryoddm._napari.reader import robust_limits

    first = mrcfile.read(tmp_path / "out" / paths[0].name)
    assert tuple(den.contrast_limits) == pytest.approx(robust_limits(first)[0], rel=1e-5)
    lo, hi = den.contrast_limits
    assert den.contrast_limits_range[0] < lo - (hi - lo) and den.contrast_limits_range[1] > hi + (hi - lo)


def test_missing_model_and_folder_are_reported_not_raised(make_napari_viewer, tmp_path, monkeypatch):
    from napari_cryoddm._napari.widgets import predict as mod

    errors = []
    monkeypatch.setattr(mod, "report_error", lambda exc: errors.append(str(exc)))
    viewer = make_napari_viewer()
    w = _widget(viewer)
    w.denoise_current()
    assert "open micrographs first" in errors[-1]
    p = tmp_path / "m.mrc"
    write_mrc(p, np.ones((64, 64), np.float32), voxel_size=1.0)
    from napari_cryoddm._napari.reader import micrograph_layer_data

    data, kw, _ = micrograph_layer_data(str(p))
    w.layer_combo.value = viewer.add_image(data, **kw)
    w.denoise_current()
    assert "choose a model file" in errors[-1]
    w.set_model(_model())
    w.denoise_all()
    assert "output folder" in errors[-1]
    assert PredictConfig  # the widget's form is built from the same config as the CLI
