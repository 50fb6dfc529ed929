"""The cs2star dock widget in a real viewer: convert the sample's .cs pair, see the particles on the
raw micrographs at their true positions; job folders; bad input shown, nothing written."""

from __future__ import annotations

import numpy as np
import pytest

from napari_cryoddm.jobs import collect

pytestmark = pytest.mark.viewer


@pytest.fixture(scope="module")
def sample_set(tmp_path_factory):
    from napari_cryoddm.simulation.sample import generate_sample
    from napari_cryoddm.simulation.sample_config import SampleConfig

    out = tmp_path_factory.mktemp("sample") / "sample"
    config = SampleConfig(n_micrographs=2, width=320, height=256, particles=4, pixel_size=3.0)
    return collect(generate_sample(out, config))


@pytest.fixture
def viewer_with_micrographs(make_napari_viewer, sample_set):
    from napari_cryoddm._napari.reader import micrograph_layer_data

    viewer = make_napari_viewer()
    data, kw, _ = micrograph_layer_data([str(p) for p in sample_set.micrographs])
    layer = viewer.add_image(data, **kw)
    return viewer, layer


def _widget(viewer):
    from napari_cryoddm._napari.widgets.cs2star import Cs2StarWidget

    widget = Cs2StarWidget(viewer)
    viewer.window.add_dock_widget(widget)
    return widget


def test_convert_and_show_on_raw_micrographs(viewer_with_micrographs, sample_set, tmp_path):
    from napari_cryoddm.simulation.sample import read_truth

    viewer, image = viewer_with_micrographs
    widget = _widget(viewer)
    assert widget._image.value is image  # the only micrograph stack is chosen
    widget._particles.value = sample_set.particles_cs
    widget._passthrough.value = [sample_set.passthrough_cs]
    out = tmp_path / "raw.star"
    widget._output.value = out
    widget.run()
    assert out.is_file() and widget.results[0].n_particles == 8
    assert len(widget.layers) == 1
    layer = widget.layers[0]
    assert layer.metadata["cryoddm"]["kind"] == "particles"
    assert layer.metadata["cryoddm"]["source"] == str(out)
    assert layer.metadata["cryoddm"]["box_size"] == sample_set.config.window
    assert tuple(layer.scale) == tuple(image.scale)
    _, truth = read_truth(sample_set.truth_json)
    names = [m["name"] for m in image.metadata["cryoddm"]["micrographs"]]
    expected = np.column_stack([[names.index(m) for m in truth.micrograph], truth.y, truth.x])
    got = np.asarray(layer.data)
    assert len(got) == len(expected) == 8
    for row in expected:  # each truth particle has a box within 1 px on its own micrograph
        same = got[got[:, 0] == row[0]]
        assert np.hypot(*(same[:, 1:] - row[1:]).T).min() <= 1.0
    assert set(layer.features["micrograph"]) == set(names)
    assert "8 particles on 2 micrographs" in widget._status.value


def test_binned_scale_from_the_form(viewer_with_micrographs, sample_set, tmp_path):
    """Settings come from the same Cs2StarConfig form: --scale 2 on a ×2-binned pair."""
    from cryosparc.dataset import Dataset

    viewer, image = viewer_with_micrographs
    files = []
    for src in (sample_set.particles_cs, sample_set.passthrough_cs):
        ds = Dataset.load(src)
        ds["location/micrograph_shape"] = ds["location/micrograph_shape"] // 2
        ds.save(tmp_path / src.name)
        files.append(tmp_path / src.name)
    widget = _widget(viewer)
    widget._particles.value = files[0]
    widget._passthrough.value = [files[1]]
    widget._output.value = tmp_path / "scaled.star"
    widget.form["scale"].value = 2.0
    widget.form["strip_uid"].value = True
    assert widget.config().scale == 2.0 and widget.config().raw_apix is None
    widget.run()
    points = np.asarray(widget.layers[0].data)
    unscaled = np.asarray(Dataset.load(sample_set.passthrough_cs)["location/center_x_frac"]) * 320
    assert np.abs(np.sort(points[:, 2]) - np.sort(unscaled)).max() <= 1.0


def test_job_folder_mode(viewer_with_micrographs, sample_set, tmp_path):
    import shutil

    viewer, _ = viewer_with_micrographs
    job = tmp_path / "CS-p" / "J40"
    job.mkdir(parents=True)
    shutil.copy(sample_set.particles_cs, job / "J40_003_particles.cs")
    shutil.copy(sample_set.passthrough_cs, job / "J40_passthrough_particles.cs")
    widget = _widget(viewer)
    widget._mode.value = "job folder"
    assert widget._particles.native.isHidden() and not widget._job_dir.native.isHidden()
    widget._job_dir.value = job
    widget._output.value = tmp_path / "batch"
    widget.run()
    assert (tmp_path / "batch" / "class0" / "cleaned_particles_relion.star").is_file()
    assert [lay.name for lay in widget.layers] == ["cs2star class0"]
    assert len(widget.layers[0].data) == 8


def test_bad_input_is_reported_and_nothing_written(viewer_with_micrographs, tmp_path):
    viewer, _ = viewer_with_micrographs
    widget = _widget(viewer)
    not_cs = tmp_path / "coords.star"
    not_cs.write_text("data_\nloop_\n_rlnCoordinateX #1\n1\n")
    widget._particles.value = not_cs
    widget._output.value = tmp_path / "out.star"
    n_layers = len(viewer.layers)
    widget.run()
    assert "coords.star" in widget._status.value and "failed" in widget._status.value
    assert not (tmp_path / "out.star").exists() and len(viewer.layers) == n_layers
    widget._mode.value = "job folder"
    widget._job_dir.value = tmp_path
    widget.run()
    assert "J<number>" in widget._status.value
    assert widget._run_button.enabled


def test_widget_from_the_manifest(make_napari_viewer):
    """The napari.yaml entry opens this widget."""
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-cryoddm", "cs2star")
    from napari_cryoddm._napari.widgets.cs2star import Cs2StarWidget

    assert isinstance(widget, Cs2StarWidget)


def test_stop_leaves_nothing(viewer_with_micrographs, sample_set, tmp_path, monkeypatch):
    """Stop (the job's cancel token set before its first item) reports and writes nothing."""
    from napari_cryoddm._napari.widgets import _run as mod  # where every dock starts its job
    from napari_cryoddm.jobs import CancelToken

    viewer, _ = viewer_with_micrographs
    widget = _widget(viewer)
    widget._particles.value = sample_set.particles_cs
    widget._output.value = tmp_path / "stopped.star"
    real = mod.start_job

    def cancelled_start(make_job, *args, **kwargs):
        def job(cancel: CancelToken):
            cancel.cancel()
            return make_job(cancel)

        return real(job, *args, **kwargs)

    monkeypatch.setattr(mod, "start_job", cancelled_start)
    widget.run()
    assert widget._status.value == "stopped; nothing was written"
    assert not (tmp_path / "stopped.star").exists() and widget._run_button.enabled
