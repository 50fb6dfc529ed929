"""The Forward dock widget in a real napari viewer: layers in, preview strip, dataset out."""

from __future__ import annotations

import mrcfile
import numpy as np
import pandas as pd
import pytest
import scipy.ndimage as ndi

from napari_cryoddm.forward_layout import read_manifest
from napari_cryoddm.io.mrc import write_mrc
from napari_cryoddm.io.star import write_coordinates_star

pytestmark = pytest.mark.viewer

SHAPE = (320, 352)
CENTRES = [[(100.0, 110.0), (200.0, 150.0), (250.0, 240.0)], [(120.0, 200.0), (230.0, 100.0)]]
NOISE = [[(80, 250)], [(280, 250)]]


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    paths, images = [], []
    for m, centres in enumerate(CENTRES):
        img = rng.normal(0, 1, SHAPE)
        for x, y in centres:
            img += 6 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 3.0**2))
        img = (500 + 20 * img).astype(np.float32)
        write_mrc(tmp_path / f"mic_{m}.mrc", img, voxel_size=2.0)
        paths.append(tmp_path / f"mic_{m}.mrc")
        images.append(img)
    return tmp_path, paths, np.stack(images)


def _viewer_with_layers(make_napari_viewer, data):
    from napari_cryoddm._napari.layers import add_boxes_layer

    tmp, paths, stack = data
    viewer = make_napari_viewer()
    meta = {
        "cryoddm": {
            "micrographs": [{"path": str(p), "name": p.name, "shape": list(SHAPE), "voxel_size": 2.0} for p in paths]
        }
    }
    image = viewer.add_image(stack, name="micrographs", metadata=meta)
    pts = [(i, y, x) for i, cs in enumerate(CENTRES) for x, y in cs]
    add_boxes_layer(viewer, np.array(pts), "particles", 64, image_layer=image)
    noise = [(i, y, x) for i, cs in enumerate(NOISE) for x, y in cs]
    add_boxes_layer(viewer, np.array(noise), "noise", 128, image_layer=image)
    return viewer


def _widget(viewer):
    from napari_cryoddm._napari.widgets.forward import ForwardWidget

    w = ForwardWidget(viewer)
    viewer.window.add_dock_widget(w)
    return w


def test_widget_picks_layers_and_schedule_presets(make_napari_viewer, data):
    viewer = _viewer_with_layers(make_napari_viewer, data)
    w = _widget(viewer)
    assert w._micrographs.value is viewer.layers["micrographs"]
    assert w._particles.value is viewer.layers["particles"]
    assert w._noise.value is viewer.layers["noise"]
    assert w.form["beta"].value == pytest.approx(0.1288) and not w.form["beta"].enabled
    w.form["diameter"].value = 20
    cfg = w.config()
    assert cfg.preset == "config1" and cfg.schedule == (0.1288, 5, 2)
    w.form["preset"].value = "config2"
    assert w.form["steps"].value == 6 and w.config().schedule == (0.1, 6, 2)
    w.form["preset"].value = "custom"
    assert w.form["beta"].enabled
    w.form["beta"].value, w.form["steps"].value, w.form["start"].value = 0.05, 8, 3
    assert w.config().schedule == (0.05, 8, 3)
    mics, particles, noise = w.inputs()
    assert mics == [str(p) for p in data[1]]
    assert sorted(zip(particles.micrograph, particles.x, particles.y)) == sorted(
        (f"mic_{i}.mrc", x, y) for i, cs in enumerate(CENTRES) for x, y in cs
    )


def test_preview_shows_one_chain_in_the_dock(make_napari_viewer, data):
    viewer = _viewer_with_layers(make_napari_viewer, data)
    w = _widget(viewer)
    w.form["diameter"].value = 20
    w.form["jitter"].value = 0.0
    w._preview_crop.value = 1
    labels = tuple(viewer.dims.axis_labels)
    n_layers = len(viewer.layers)
    w.run_preview()
    # the chain is drawn in the dock: no layer is added and the slider keeps its axis names
    assert len(viewer.layers) == n_layers and tuple(viewer.dims.axis_labels) == labels
    assert len(w.chain_plot.figure.axes) == 6
    # crop 1 is the particle at x 200, y 150 of micrograph 0
    assert w.preview.shape == (6, 128, 128)
    assert w.preview_info == {**w.preview_info, "micrograph": "mic_0.mrc", "x": 200, "y": 150}
    chain = np.asarray(w.preview)
    # x_0 is the micrograph under the window, normalised (clipped, then a linear map)
    raw = data[2][0, 150 - 64 : 150 + 64, 200 - 64 : 200 + 64]
    assert np.corrcoef(chain[0].ravel(), raw.ravel())[0, 1] > 0.99  # (the blob top is clipped)
    x0 = ndi.gaussian_filter(chain[0].astype(float), 3)
    near = x0[48:81, 48:81]
    py, px = np.unravel_index(np.argmax(near), near.shape)
    assert abs(py - 16) <= 1 and abs(px - 16) <= 1
    # the particle fades along the chain: x_T keeps 6 % of x_0
    c1 = np.corrcoef(chain[0].ravel(), chain[1].ravel())[0, 1]
    c5 = np.corrcoef(chain[0].ravel(), chain[5].ravel())[0, 1]
    assert c1 > 0.9 > 0.5 > c5
    assert "crop 1 of 5 (mic_0.mrc, x 200, y 150)" in w._status.value
    # a second preview replaces the strip
    w._preview_crop.value = 4
    w.run_preview()
    assert len(w.chain_plot.figure.axes) == 6 and len(viewer.layers) == n_layers
    assert (w.preview_info["micrograph"], w.preview_info["x"], w.preview_info["y"]) == ("mic_1.mrc", 230, 100)


def test_run_writes_the_dataset_from_layers(make_napari_viewer, data, tmp_path):
    viewer = _viewer_with_layers(make_napari_viewer, data)
    w = _widget(viewer)
    w.form["diameter"].value = 20
    w.form["jitter"].value = 0.0
    w._output.value = tmp_path / "fw"
    handle = w.run()
    assert handle is not None and handle.error is None, handle.error
    m = read_manifest(tmp_path / "fw")
    assert m["counts"]["crops"] == 5 and m["counts"]["noise"] == 2 and m["window"] == 128
    assert [(e["micrograph"], e["x"], e["y"]) for e in m["crops"]] == [
        (i, int(x), int(y)) for i, cs in enumerate(CENTRES) for x, y in cs
    ]
    with mrcfile.open(tmp_path / "fw/s2/label.mrcs") as f:
        assert f.data.shape == (15, 128, 128)
    assert "5 crops" in w._status.value and w._run_button.enabled and not w._stop_button.enabled
    # a second run into the finished folder is refused and leaves it alone
    before = (tmp_path / "fw/s1/particles.mrcs").read_bytes()
    handle = w.run()
    assert "already exists" in str(handle.error) and "already exists" in w._status.value
    assert (tmp_path / "fw/s1/particles.mrcs").read_bytes() == before


def test_files_instead_of_layers_and_bad_input(make_napari_viewer, data, tmp_path):
    tmp, paths, _ = data
    viewer = make_napari_viewer()
    w = _widget(viewer)
    assert w._micrographs.value is None and w._particles.value is None
    w.form["diameter"].value = 20
    w._output.value = tmp_path / "fw"
    w.run()
    assert "choose a micrograph layer" in w._status.value
    w._micrograph_files.value = paths
    star = tmp / "particles.star"
    write_coordinates_star(
        star,
        pd.DataFrame(
            [(f"mic_{i}.mrc", x, y) for i, cs in enumerate(CENTRES) for x, y in cs], columns=["micrograph", "x", "y"]
        ),
    )
    w._particles_file.value = star
    noise = tmp / "noise.txt"
    noise.write_text("mic_0.mrc 80 250\nmic_1.mrc 280 250\n")
    w._noise_file.value = noise
    w.form["window"].value = 384  # larger than the 320-px micrographs
    w.run()
    assert "larger than the micrograph" in w._status.value
    assert not (tmp_path / "fw").exists() and not (tmp_path / "fw.partial").exists()
    w.form["window"].value = 0  # 0 = automatic
    w.run()
    assert read_manifest(tmp_path / "fw")["counts"]["crops"] == 5


def test_stop_cancels_the_job(make_napari_viewer, data, tmp_path, monkeypatch):
    """Stop sets the job's cancel token: the run ends without a finished folder."""
    from napari_cryoddm._napari.widgets import forward as fw

    viewer = _viewer_with_layers(make_napari_viewer, data)
    w = _widget(viewer)
    w.form["diameter"].value = 20
    w._output.value = tmp_path / "fw"
    real = fw.run_forward

    def stopping(*args, **kw):  # press Stop as soon as the job reports progress
        job, i = real(*args, **kw), 0
        while True:
            try:
                event = next(job)
            except StopIteration as stop:
                return stop.value
            if i == 1:
                w.stop()
            i += 1
            yield event

    monkeypatch.setattr(fw, "run_forward", stopping)
    w.run()
    assert "stopped" in w._status.value
    assert not (tmp_path / "fw").exists()


def test_run_in_a_thread_worker(make_napari_viewer, data, tmp_path, qtbot, monkeypatch):
    """The real threaded path: a napari worker runs the job; the widget is re-enabled at the end."""
    monkeypatch.setenv("CRYODDM_NAPARI_NOTHREADS", "0")
    viewer = _viewer_with_layers(make_napari_viewer, data)
    w = _widget(viewer)
    w.form["diameter"].value = 20
    w._output.value = tmp_path / "fw"
    handle = w.run()
    assert handle.worker is not None and not w._run_button.enabled
    qtbot.waitUntil(lambda: not handle.running, timeout=30000)
    assert handle.error is None and w.result is not None
    assert w.result.counts["crops"] == 5 and (tmp_path / "fw/forward.json").is_file()
    assert w._run_button.enabled and not w._stop_button.enabled


@pytest.mark.viewer
def test_diameter_comes_from_the_sample_particles_layer(make_napari_viewer, tmp_path, monkeypatch):
    from napari_cryoddm._napari.widgets.forward import ForwardWidget

    monkeypatch.setenv("CRYODDM_CACHE_DIR", str(tmp_path / "cache"))
    viewer = make_napari_viewer()
    viewer.open_sample("napari-cryoddm", "stack")
    widget = ForwardWidget(viewer)
    widget._particles.value = viewer.layers["CryoDDM sample stack particles"]
    assert widget.form["diameter"].value == pytest.approx(45.0)
    widget.form["diameter"].value = 50  # a diameter the user typed is kept
    widget._particles.value = None
    widget._particles.value = viewer.layers["CryoDDM sample stack particles"]
    assert widget.form["diameter"].value == pytest.approx(50.0)
