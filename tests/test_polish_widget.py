"""Dock details from the real-data review: labels that say what they mean, expert options folded
away under "Advanced", a loss plot that reads before and during training, a Predict status that
names the job running, mixed voxel sizes shown in the viewer, and the demo's closing command
(`cryoddm view`: two folders opened with this plugin, side by side)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_cryoddm.io.mrc import write_mrc

pytestmark = pytest.mark.viewer


def test_labels_special_values_and_advanced(make_napari_viewer):
    from napari_cryoddm._napari.widgets.forward import ForwardWidget
    from napari_cryoddm._napari.widgets.picker import NoisePickerWidget
    from napari_cryoddm._napari.widgets.predict import PredictWidget

    viewer = make_napari_viewer()
    forward = ForwardWidget(viewer)
    labels = {name: c.label for name, c in forward.form._controls.items()}
    assert not any("0 = auto" in label for label in labels.values())
    assert labels["diameter_A"] == "diameter Å" and labels["target_apix"] == "target Å/px"
    # an optional number left at 0 reads as what it means, not as a 0
    assert forward.form["diameter"].native.text() == "not given"
    assert forward.form["target_apix"].native.text() == "auto"
    assert forward.form["window"].native.text() == "auto"
    forward.form["window"].value = 256
    assert forward.config().window == 256 and isinstance(forward.config().window, int)
    # the greyed-out schedule shows the preset's values, no "auto" label
    assert not forward.form["beta"].enabled and forward.form["beta"].value == pytest.approx(0.1288)

    predict = PredictWidget(viewer)
    advanced = {c.name for c in predict.form.advanced_controls}
    assert {"channels_last", "compile", "threads", "batch_size", "tile", "overlap"} <= advanced
    assert not ({"channels_last", "compile", "threads"} & {c.name for c in predict.form})
    assert not predict.form.advanced.isExpanded()

    picker = NoisePickerWidget(viewer)
    assert picker.form["max_per_micrograph"].label == "max per image"
    assert picker.form["screen"].value is True  # pixel screening on by default
    # the picker's settings sit in the dock's own column: same label width, no indent
    widths = {w._labeled_widget().label_width for w in (picker.diameter, picker.form["overlap"])}
    assert len(widths) == 1
    assert not picker.form._labeled_widget()._label_widget.native.isVisibleTo(picker.native)


def test_loss_plot_before_and_during_training():
    from napari_cryoddm._napari.widgets.train import LossPlot

    plot = LossPlot()
    assert plot.ax.get_ylim() == pytest.approx((1e-2, 10))  # not −0.04…0.04 before training
    assert all(line.get_markersize() >= 3 for line in plot.batch_lines.values())
    for k in range(1, 5):
        plot.add_batch(1, k, 4, "s2", 0.5 / k)
    plot.add_epoch(1, {"s1": 0.3, "s2": 0.2, "s3": 0.25, "val": 0.22})
    lo, hi = plot.ax.get_ylim()
    assert lo < 0.125 and hi > 0.5 and plot.ax.get_xlim()[1] > 1.0


def test_predict_status_names_the_running_job(make_napari_viewer, tmp_path):
    from napari_cryoddm._napari.reader import micrograph_layer_data
    from napari_cryoddm._napari.widgets.predict import PredictWidget
    from napari_cryoddm.predict import PredictModel

    rng = np.random.default_rng(0)
    path = tmp_path / "a_micrograph.mrc"
    write_mrc(path, rng.normal(0, 1, (96, 96)).astype(np.float32), voxel_size=1.5)
    viewer = make_napari_viewer()
    data, kw, _ = micrograph_layer_data(str(path))
    viewer.add_image(data, **kw)
    w = PredictWidget(viewer)
    w.status.value = "denoised something_else.mrc"
    seen = []

    w.set_model(PredictModel.__new__(PredictModel))  # never run: the status is what is checked
    w._start = lambda make, description, done, progress=None: seen.append(w.status.value)
    w.denoise_current()
    assert seen == [f"denoising {w.raw_layer().metadata['cryoddm']['micrographs'][0]['name']}…"]
    assert "something_else" not in seen[0]


def test_mixed_voxel_sizes_are_shown_in_the_viewer(tmp_path, monkeypatch):
    from napari_cryoddm._napari import reader

    shown = []
    monkeypatch.setattr(reader, "_show_warning", shown.append)
    for k, vs in enumerate((1.0, 1.0, 2.0)):
        write_mrc(tmp_path / f"m{k}.mrc", np.zeros((64, 64), np.float32) + k, voxel_size=vs)
    reader.micrograph_layer_data(str(tmp_path))
    assert len(shown) == 1 and "another voxel size" in shown[0]


def test_demo_closing_command_opens_raw_and_denoised_side_by_side(make_napari_viewer, tmp_path, monkeypatch):
    """`cryoddm view SAMPLE/micrographs DENOISED` (the demo's last line): both folders through this
    plugin's reader, one tile each in the grid, fitted; the denoised stack is binned 2× (its
    voxel size doubles) and still fills a tile of the same world size."""
    import napari

    from napari_cryoddm.cli import main

    raw, den = tmp_path / "sample" / "micrographs", tmp_path / "denoised"
    raw.mkdir(parents=True)
    den.mkdir()
    rng = np.random.default_rng(1)
    for k in range(2):
        write_mrc(raw / f"mic_{k}.mrc", rng.normal(5, 1, (64, 64)).astype(np.float32), voxel_size=2.0)
        write_mrc(den / f"mic_{k}.mrc", rng.normal(0, 1, (32, 32)).astype(np.float32), voxel_size=4.0)
    viewer = make_napari_viewer(show=True)
    ran = []
    monkeypatch.setattr(napari, "Viewer", lambda **kw: viewer)
    monkeypatch.setattr(napari, "run", lambda *a, **kw: ran.append(True))
    monkeypatch.setenv("DISPLAY", ":0")
    assert main(["view", str(raw), str(den)]) == 0 and ran == [True]
    assert [lay.name for lay in viewer.layers] == ["micrographs", "denoised"]
    assert all(lay.data.shape[0] == 2 and lay.visible for lay in viewer.layers)
    assert viewer.canvas.grid.enabled and viewer.canvas.grid.actual_shape(viewer.layers) == (1, 2)
    extents = [tuple(np.array(lay.data.shape[1:]) * lay.scale[1:]) for lay in viewer.layers]
    assert extents[0] == extents[1] == (128.0, 128.0)  # Å: the same field of view in both tiles

    viewer.layers.clear()
    assert main(["view", str(raw), str(den), "--overlay"]) == 0
    assert not viewer.canvas.grid.enabled and [lay.name for lay in viewer.layers] == ["micrographs", "denoised"]


def test_view_names_a_path_it_cannot_open(tmp_path, monkeypatch, capsys):
    from napari_cryoddm.cli import main

    star = tmp_path / "particles.star"
    star.write_text("data_\n")
    assert main(["view", str(tmp_path / "missing")]) == 2
    assert f"{tmp_path / 'missing'}: no such file or folder" in capsys.readouterr().err
    assert main(["view", str(star)]) == 2
    assert f"{star}: not an MRC file" in capsys.readouterr().err
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(name, raising=False)
    assert main(["view", str(tmp_path)]) == 2
    assert "no screen to open napari on" in capsys.readouterr().err


def test_a_bad_value_is_named_by_its_label_not_its_flag(make_napari_viewer):
    """ConfigError is keyed by field: the CLI says --max-per-micrograph, the form its label."""
    from napari_cryoddm._napari.widgets._form import ConfigForm
    from napari_cryoddm.errors import CryoDDMError
    from napari_cryoddm.picking import PickConfig

    form = ConfigForm(PickConfig, labels={"max_per_micrograph": "max per image"})
    with pytest.raises(CryoDDMError, match=r"^max per image: must be at least 1, got 0$"):
        form.value(diameter=100.0, max_per_micrograph=0)
