"""The noise picker dock widget in a real napari viewer: hand edits, refusal, Ctrl-click, box size,
load/save round trip, automatic modes, bad input."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from napari_cryoddm.box_placement import overlap_fraction, particle_box_distance
from napari_cryoddm.io.mrc import write_mrc
from napari_cryoddm.io.noise import read_noise_txt

pytestmark = pytest.mark.viewer

SHAPE = (320, 352)
CENTRES = [[(100.0, 110.0), (200.0, 150.0), (250.0, 240.0)], [(120.0, 200.0), (230.0, 100.0)]]


@pytest.fixture
def mics(tmp_path):
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    paths = []
    for m, centres in enumerate(CENTRES):
        img = rng.normal(0, 1, SHAPE)
        for x, y in centres:
            r2 = (xx - x) ** 2 + (yy - y) ** 2
            img += 4 * np.exp(-r2 / (2 * 6.0**2)) - 2 * np.exp(-r2 / (2 * 12.0**2))
        path = tmp_path / f"mic_{m}.mrc"
        write_mrc(path, (500 + 20 * img).astype(np.float32), voxel_size=2.0)
        paths.append(path)
    return paths


def _setup(make_napari_viewer, paths, diameter=60.0):
    from napari_cryoddm._napari.reader import micrograph_layer_data
    from napari_cryoddm._napari.widgets.picker import NoisePickerWidget

    viewer = make_napari_viewer()
    data, kw, _ = micrograph_layer_data([str(p) for p in paths])
    image = viewer.add_image(data, **kw)
    widget = NoisePickerWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.image.value = image
    widget.diameter.value = diameter
    layer = widget.ensure_noise_layer()
    return viewer, widget, image, layer


def _event(layer, i, y, x, kind="mouse_press", modifiers=()):
    return SimpleNamespace(
        type=kind,
        modifiers=modifiers,
        position=tuple(layer.data_to_world([i, y, x])),
        pos=np.array([10.0, 10.0]),
        view_direction=None,
        dims_displayed=[1, 2],
        handled=False,
        is_dragging=False,
    )


def test_layer_style_and_window_default(make_napari_viewer, mics):
    viewer, widget, image, layer = _setup(make_napari_viewer, mics)
    assert widget.box.value == 128  # W for a 60 px particle
    assert layer.name == "noise" and layer.metadata["cryoddm"]["kind"] == "noise"
    assert layer.metadata["cryoddm"]["box_size"] == 128
    assert tuple(layer.scale) == tuple(image.scale) == (1.0, 2.0, 2.0)
    assert layer.current_symbol.value == "square"
    layer.add([0, 100, 100])
    assert layer.face_color[0][3] == 0 and np.allclose(layer.border_color[0], [1, 0, 0, 1])
    assert layer.size.tolist() == [128]
    widget.unit.value = "Å"
    widget.diameter.value = 240.0  # 120 px at 2 Å/px → W = 256
    assert widget.diameter_px() == pytest.approx(120.0) and widget.box.value == 256


def test_hand_add_refuse_and_ctrl_click(make_napari_viewer, mics):
    from napari.utils.interactions import mouse_press_callbacks, mouse_release_callbacks

    viewer, widget, image, layer = _setup(make_napari_viewer, mics)
    layer.mode = "add"
    layer.add([0, 100, 100])
    layer.add([1, 200, 250])
    assert len(layer.data) == 2
    assert layer.features["micrograph"].tolist() == ["mic_0.mrc", "mic_1.mrc"]
    assert np.allclose(layer.border_color, [[1, 0, 0, 1]] * 2)
    # a 128 box at x = 300 would leave the 352-wide micrograph: refused, with a message
    layer.add([0, 100, 300])
    assert len(layer.data) == 2 and "refused" in widget.message.value
    layer.add([1, 63, 200])
    assert len(layer.data) == 2
    layer.add([1, 64, 200])
    assert len(layer.data) == 3
    assert widget.count_per_micrograph() == {"mic_0.mrc": 1, "mic_1.mrc": 2}
    # Ctrl-click through napari's own mouse callbacks, in add mode: removes, adds nothing
    press = _event(layer, 1, 230, 270, modifiers=("Control",))
    mouse_press_callbacks(layer, press)
    release = _event(layer, 1, 230, 270, kind="mouse_release", modifiers=("Control",))
    mouse_release_callbacks(layer, release)
    assert len(layer.data) == 2
    assert sorted(map(tuple, np.asarray(layer.data).tolist())) == [(0.0, 100.0, 100.0), (1.0, 64.0, 200.0)]
    # a plain click in add mode still adds
    mouse_press_callbacks(layer, _event(layer, 0, 200, 200))
    mouse_release_callbacks(layer, _event(layer, 0, 200, 200, kind="mouse_release"))
    assert len(layer.data) == 3
    # Ctrl-click where there is no box changes nothing
    widget._ctrl_click(layer, _event(layer, 1, 300, 20, modifiers=("Control",)))
    assert len(layer.data) == 3 and "no box" in widget.message.value
    # moving a box (select-mode drag sets the data) so that it leaves its micrograph flags it
    data = np.asarray(layer.data).copy()
    data[0, 2] = 340.0
    layer.data = data
    assert layer.features["valid"].tolist() == [False, True, True]
    assert np.allclose(layer.border_color[0], [1, 0.85, 0, 1])
    data[0, 2] = 100.0
    layer.data = data
    assert layer.features["valid"].all()
    # delete by selection (napari's own remove_selected)
    layer.selected_data = {0}
    layer.remove_selected()
    assert widget.count_per_micrograph() == {"mic_0.mrc": 1, "mic_1.mrc": 1}


def test_box_size_applies_to_new_boxes_and_misfits_block_save(make_napari_viewer, mics, tmp_path):
    viewer, widget, image, layer = _setup(make_napari_viewer, mics)
    for p in ([0, 70, 70], [0, 160, 176], [1, 250, 280]):
        layer.add(p)
    widget.box.value = 256  # boxes already picked keep the size they were picked with
    assert layer.size.tolist() == [128, 128, 128]
    assert layer.features["valid"].tolist() == [True, True, True]
    assert widget.message.value == ""  # nothing to warn about
    layer.add([0, 160, 200])
    assert layer.size.tolist() == [128, 128, 128, 256]
    # boxes loaded at 256 px that do not fit are flagged yellow and block saving
    src = tmp_path / "loaded_noise.txt"
    src.write_text("mic_0.mrc 60 300\nmic_1.mrc 180 150\n")
    assert widget.load(src) == 2
    assert layer.size.tolist() == [128, 128, 128, 256, 256, 256]
    assert layer.features["valid"].tolist() == [True, True, True, True, False, True]
    assert np.allclose(layer.border_color[4], [1, 0.85, 0, 1]) and np.allclose(layer.border_color[1], [1, 0, 0, 1])
    out = tmp_path / "noise.txt"
    assert widget.save(out) is None and not out.exists()
    assert "do not fit" in widget.message.value
    assert widget.delete_invalid() == 1
    assert widget.save(out) == out
    assert len(read_noise_txt(out)) == 5


def test_save_reload_identical_and_keeps_micrographs_not_open(make_napari_viewer, mics, tmp_path):
    viewer, widget, image, layer = _setup(make_napari_viewer, mics)
    src = tmp_path / "noise_coordinates.txt"
    src.write_text("stack_0009_2x_dfpt.mrc 3274 2914\nmic_0.mrc 90 80\n")
    assert widget.load(src) == 2
    assert len(layer.data) == 1 and len(widget.other_boxes) == 1
    assert "not open" in widget.message.value
    for p in ([0, 200, 250], [1, 100, 100], [1, 230, 250]):
        layer.add(p)
    before = widget.all_boxes().sort_values(["micrograph", "x", "y"]).reset_index(drop=True)
    out = tmp_path / "saved.txt"
    widget.save(out)
    text = out.read_text().splitlines()
    assert "stack_0009_2x_dfpt.mrc 3274 2914" in text and len(text) == 5
    # a fresh viewer and widget reload exactly the same boxes
    viewer2, widget2, image2, layer2 = _setup(make_napari_viewer, mics)
    widget2.load(out)
    after = widget2.all_boxes().sort_values(["micrograph", "x", "y"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(before, after)
    assert np.array_equal(
        np.asarray(layer2.data)[np.lexsort(np.asarray(layer2.data).T[::-1])],
        np.asarray(layer.data)[np.lexsort(np.asarray(layer.data).T[::-1])],
    )
    # STAR too
    star = tmp_path / "saved.star"
    widget2.save(star)
    viewer3, widget3, _, _ = _setup(make_napari_viewer, mics)
    widget3.load(star)
    pd.testing.assert_frame_equal(
        widget3.all_boxes().sort_values(["micrograph", "x", "y"]).reset_index(drop=True), before
    )
    # saving over a file written elsewhere keeps its boxes of micrographs that are not open
    other = tmp_path / "shared.txt"
    other.write_text("far_away.mrc 500 500\nmic_1.mrc 100 100\n")
    widget3.save(other)
    lines = other.read_text().splitlines()
    assert "far_away.mrc 500 500" in lines and len(lines) == 6


def test_bad_files_give_messages_and_write_nothing(make_napari_viewer, mics, tmp_path):
    viewer, widget, image, layer = _setup(make_napari_viewer, mics)
    layer.add([0, 100, 100])
    empty = tmp_path / "empty_noise.txt"
    empty.write_text("")
    assert widget.load(empty) == 0 and "holds no noise boxes" in widget.message.value
    bad = tmp_path / "bad_noise.txt"
    bad.write_text("mic_0.mrc 10 20\nmic_0.mrc ten 20\n")
    assert widget.load(bad) == 0
    assert "line 2" in widget.message.value and str(bad) in widget.message.value
    assert len(layer.data) == 1
    # saving over a malformed file: refused, the file untouched
    assert widget.save(bad) is None and bad.read_text() == "mic_0.mrc 10 20\nmic_0.mrc ten 20\n"
    # a particle STAR naming micrographs that are not open: clear message, no boxes added
    star = tmp_path / "particles.star"
    star.write_text(
        "data_particles\nloop_\n_rlnMicrographName #1\n_rlnCoordinateX #2\n_rlnCoordinateY #3\n"
        "mic_0.mrc 100 100\nFoilHole_123_Data_456.mrc 50 50\n"
    )
    widget.particles_file.value = star
    widget.pick_from_particles()
    assert "FoilHole_123_Data_456.mrc" in widget.message.value and "mic_0.mrc" in widget.message.value
    assert len(layer.data) == 1
    # a box larger than the micrographs
    widget.box.value = 400
    widget.form["allow_unmatched"].value = True
    widget.pick_from_particles()
    assert "does not fit" in widget.message.value
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".txt") == ["bad_noise.txt", "empty_noise.txt"]


def test_automatic_from_particles_layer_keeps_manual_boxes(make_napari_viewer, mics):
    from napari_cryoddm._napari.layers import add_boxes_layer

    viewer, widget, image, layer = _setup(make_napari_viewer, mics, diameter=40.0)
    pts = np.array([(i, y, x) for i, cs in enumerate(CENTRES) for x, y in cs])
    particles = add_boxes_layer(viewer, pts, "particles", 64, image_layer=image, name="particles")
    layer.add([0, 64, 64])
    widget.particles_layer.reset_choices()
    widget.particles_layer.value = particles
    widget.form["max_per_micrograph"].value = 5
    widget.pick_from_particles()
    table = widget.boxes_table()
    assert ["mic_0.mrc", 64, 64] in table.values.tolist()  # the manual box is kept
    counts = widget.count_per_micrograph()
    new = widget.last_result.new
    assert len(new) >= 3 and new.groupby("micrograph").size().max() <= 5
    assert counts == {
        "mic_0.mrc": 1 + int((new.micrograph == "mic_0.mrc").sum()),
        "mic_1.mrc": int((new.micrograph == "mic_1.mrc").sum()),
    }
    for m, centres in enumerate(CENTRES):
        t = new[new.micrograph == f"mic_{m}.mrc"]
        c = np.array(centres)
        assert particle_box_distance(t.x, t.y, 128, c[:, 0], c[:, 1]).min() >= 20
        xy = t[["x", "y"]].to_numpy()
        for a in range(len(xy)):
            for b in range(a + 1, len(xy)):
                assert overlap_fraction(*(xy[a] - xy[b]), 128) == 0
    warnings = " ".join(widget.last_result.warnings)
    assert "only" in warnings  # low yield
    assert "1 existing box" in warnings  # the manual box at (64, 64) holds a particle
    assert f"{len(table)} boxes on 2 micrographs" in widget.counts.value


def test_propose_empty_then_accept(make_napari_viewer, mics):
    viewer, widget, image, layer = _setup(make_napari_viewer, mics, diameter=40.0)
    widget.box.value = 64
    widget.form["max_per_micrograph"].value = 6
    widget.propose_empty()
    prop = widget.proposals_layer
    assert prop is not None and prop.name == "noise proposals" and 1 <= len(prop.data) <= 12
    assert len(layer.data) == 0
    proposed = len(prop.data)
    prop.selected_data = {0}
    assert widget.accept_proposals() == 1
    assert len(layer.data) == 1 and len(prop.data) == proposed - 1
    n = len(prop.data)
    assert widget.accept_proposals() == n
    assert len(layer.data) == 1 + n and len(prop.data) == 0
    assert set(layer.features["micrograph"]) <= {"mic_0.mrc", "mic_1.mrc"}


def test_on_the_napari_sample_stack(make_napari_viewer, tmp_path, monkeypatch):
    """File ▸ Open Sample ▸ CryoDDM stack, then the widget: boxes avoid the true particles, ≥ 30
    per micrograph, and proposals limited to the current micrograph stay on it."""
    from napari_cryoddm._napari.widgets.picker import NoisePickerWidget

    monkeypatch.setenv("CRYODDM_CACHE_DIR", str(tmp_path / "cache"))
    viewer = make_napari_viewer()
    viewer.open_sample("napari-cryoddm", "stack")
    widget = NoisePickerWidget(viewer)
    viewer.window.add_dock_widget(widget)
    image = viewer.layers["CryoDDM sample stack"]
    particles = viewer.layers["CryoDDM sample stack particles"]
    widget.image.value = image
    widget.particles_layer.value = particles
    assert widget.diameter.value == pytest.approx(45.0) and widget.box.value == 128
    # proposals on the current micrograph only
    viewer.dims.set_current_step(0, 2)
    widget.scope.value = "current micrograph"
    widget.propose_empty()
    prop = np.asarray(widget.proposals_layer.data)
    assert len(prop) >= 3 and set(np.round(prop[:, 0]).astype(int)) == {2}
    viewer.layers.remove(widget.proposals_layer)
    widget.scope.value = "all micrographs"
    widget.pick_from_particles()
    counts = widget.count_per_micrograph()
    assert len(counts) == 4 and min(counts.values()) >= 30
    truth = np.asarray(particles.data)
    table = widget.boxes_table()
    names = [m["name"] for m in image.metadata["cryoddm"]["micrographs"]]
    for i, name in enumerate(names):
        t = table[table.micrograph == name]
        p = truth[np.round(truth[:, 0]) == i]
        assert particle_box_distance(t.x, t.y, 128, p[:, 2], p[:, 1]).min() >= 22.5
    out = tmp_path / "noise_coordinates.txt"
    widget.save(out)
    assert len(read_noise_txt(out)) == len(table)


def test_threaded_job_delivers_boxes(make_napari_viewer, mics, qtbot, monkeypatch):
    """Outside tests jobs run in a napari thread worker; the boxes still land in the layer."""
    monkeypatch.setenv("CRYODDM_NAPARI_NOTHREADS", "0")
    viewer, widget, image, layer = _setup(make_napari_viewer, mics, diameter=40.0)
    star = mics[0].parent / "particles.star"
    star.write_text(
        "data_\nloop_\n_rlnMicrographName #1\n_rlnCoordinateX #2\n_rlnCoordinateY #3\n"
        + "".join(f"mic_{m}.mrc {x} {y}\n" for m, cs in enumerate(CENTRES) for x, y in cs)
    )
    widget.particles_file.value = star
    handle = widget.pick_from_particles()
    assert handle.worker is not None
    qtbot.waitUntil(lambda: not handle.running, timeout=20_000)
    qtbot.waitUntil(lambda: len(layer.data) > 0, timeout=5_000)
    assert handle.error is None
    assert set(layer.features["micrograph"]) == {"mic_0.mrc", "mic_1.mrc"}


def test_adopts_a_noise_file_opened_through_the_reader(make_napari_viewer, mics, tmp_path):
    from napari_cryoddm._napari.reader import coordinate_layer_data, micrograph_layer_data
    from napari_cryoddm._napari.widgets.picker import NoisePickerWidget

    viewer = make_napari_viewer()
    data, kw, _ = micrograph_layer_data([str(p) for p in mics])
    image = viewer.add_image(data, **kw)
    src = tmp_path / "noise_coordinates.txt"
    src.write_text("mic_0.mrc 100 90\nmic_1.mrc 200 150\n")
    pdata, pkw, _ = coordinate_layer_data(src, image_layer=image)
    opened = viewer.add_points(pdata, **pkw)
    widget = NoisePickerWidget(viewer)
    widget.image.value = image
    widget.diameter.value = 60.0
    assert widget.ensure_noise_layer() is opened
    assert widget.count_per_micrograph() == {"mic_0.mrc": 1, "mic_1.mrc": 1}
    assert opened.size.tolist() == [128, 128]
    widget._ctrl_click(opened, _event(opened, 1, 150, 200, modifiers=("Control",)))
    assert widget.count_per_micrograph() == {"mic_0.mrc": 1}
