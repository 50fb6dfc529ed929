"""The real-data review's walk in a 1920×1080 napari window: the 4k EPU micrograph and the Ucsf
micrograph with its RELION autopicks, through every dock, each step on the defaults the one
before left (scripts/screenshots.py `walk_real`, which also makes the pictures of the guide)."""

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
def test_real_data_walk(make_napari_viewer, real_data, tmp_path, monkeypatch):
    monkeypatch.setenv("CRYODDM_CACHE_DIR", str(tmp_path / "cache"))
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1920, 1080)
    out = _walk_module().walk_real(viewer, real_data, tmp_path / "walk")
    epu, ucsf, star, d = out["epu"], out["ucsf"], out["star"], out["defaults"]

    # docks and window: no status message widened anything
    widths = out["widths"]
    assert set(widths.initial) == {"Attach coordinates", "Noise picker", "Forward", "Train", "Predict", "cs2star"}
    assert widths.grown() == {}
    assert widths.window <= 1920
    assert "not shown" in out["cs2star_status"]  # the long message that used to widen the window

    # the autopicks land on the one open micrograph their name matches, at once
    assert out["star_attached_at_open"] == ucsf.name

    # each step's inputs default to what the previous step produced, on the stack with particles
    assert d["attach_image"] is ucsf
    assert d["picker_image"] is ucsf and d["picker_particles"] is star and d["picker_screen"] is True
    assert d["forward"][:3] == (ucsf, star, out["noise_layer"])
    assert d["forward"][3] == pytest.approx(48.0)
    assert Path(d["train_forward"]) == Path(out["forward"].out)
    assert Path(d["predict_model"]) == Path(out["checkpoint"]) and d["predict_layer"] is ucsf
    assert d["cs2star_image"] is ucsf and d["cs2star_box"] == 64

    # boxes keep the size they were picked with when the settings change for another micrograph
    assert np.all(out["noise_sizes"] == 128)  # W for a 48 px particle
    np.testing.assert_array_equal(out["noise_sizes_after"], out["noise_sizes"])
    assert out["noise_layer_for_epu"] is None  # the EPU micrograph has no noise boxes yet
    assert out["picker_back"] == (48.0, "px", 128)  # back on Ucsf: its own settings again
    n = len(out["noise_layer"].data)
    assert out["counts_epu"].startswith("this micrograph: 0 boxes")
    assert out["counts_back"].startswith(f"this micrograph: {n} boxes")
    # pixel screening kept every box off the contamination blob (top right, dark): no box's mean
    # is below the micrograph's 5th percentile of box means
    from napari_cryoddm.io.mrc import read_image

    img = read_image(ucsf.metadata["cryoddm"]["micrographs"][0]["path"])
    boxes = np.asarray(out["noise_layer"].data)
    means = [img[int(y) - 64 : int(y) + 64, int(x) - 64 : int(x) + 64].mean() for _, y, x in boxes]
    blob = img[:300, -300:].mean()
    assert min(means) > blob + 0.5 * (np.median(img) - blob)

    # the 4k micrograph is smoothed when zoomed out (a Gaussian kernel over its pyramid level);
    # robust limits: the bulk of its overview lies inside them, and the slider reaches beyond
    assert epu.multiscale and epu.interpolation2d == "gaussian" and ucsf.interpolation2d == "nearest"
    for layer in (epu, ucsf):
        lo, hi = layer.contrast_limits
        r0, r1 = layer.contrast_limits_range
        assert r0 < lo - 0.4 * (hi - lo) and r1 > hi + 0.4 * (hi - lo)
    overview = np.asarray(epu.data[-1][0], dtype=float)
    assert 0.9 < ((overview > epu.contrast_limits[0]) & (overview < epu.contrast_limits[1])).mean() < 1

    # the forward preview left the slider's axis names alone
    assert out["axis_labels_after_preview"] == out["axis_labels"]

    # the denoised layer opens with robust contrast: the blob does not wash the rest out
    den = out["denoised_layer"]
    lo, hi = den.contrast_limits
    plane = np.asarray(den.data[0])
    inside = ((plane > lo) & (plane < hi)).mean()
    assert inside > 0.5
    assert den.contrast_limits_range[1] - den.contrast_limits_range[0] > 2 * (hi - lo)

    # after Predict: the grid holds exactly the raw and the denoised layer, filling the canvas
    g = out["grid"]
    assert g["enabled"] and sorted(g["visible"]) == sorted([ucsf.name, out["denoised_layer"].name])
    assert g["shape"] in ((1, 2), (2, 1))
    for extent in g["extent"]:
        on_screen = np.asarray(extent) * g["zoom"]
        assert np.max(on_screen / np.asarray(g["viewbox"])) > 0.9
