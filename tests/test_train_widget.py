"""The Train dock widget: trains from the form, plots the losses, stops resumably and resumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers.training import make_forward
from napari_cryoddm.checkpoint import load_checkpoint

torch.set_num_threads(1)
pytestmark = pytest.mark.viewer


@pytest.fixture
def data(tmp_path):
    return make_forward(tmp_path, n=2, window=64, m=2, steps=3, start=2)


def _widget(make_napari_viewer, data, out, **form):
    from napari_cryoddm._napari.widgets.train import TrainWidget

    viewer = make_napari_viewer()
    widget = TrainWidget(viewer)
    widget._forward.value = data["folder"]
    widget._out.value = out
    widget.form.set(epochs=2, batch_size=2, device="cpu", **form)
    return viewer, widget


def test_trains_and_plots_phase_and_validation_losses(make_napari_viewer, data, tmp_path):
    out = tmp_path / "run"
    _viewer, widget = _widget(make_napari_viewer, data, out)
    cfg = widget.config()
    assert cfg.init is None and cfg.epochs == 2 and cfg.lr is None and cfg.workers is None
    widget._train_button.clicked.emit()
    res = widget.result
    assert res is not None and not res.stopped and res.epochs_done == 2
    assert (out / "last.pt").is_file() and (out / "best.pt").is_file()
    # three batches (S1, S2, S3) per epoch → 6 dots; 2 epoch means per phase + validation
    plot = widget.plot
    assert sum(len(plot.batches[p][0]) for p in ("s1", "s2", "s3")) == 6
    for p in ("s1", "s2", "s3", "val"):
        xs, ys = plot.epoch_lines[p].get_data()
        assert list(xs) == [1.0, 2.0]
        assert np.allclose(ys, [h[p] for h in res.history])
    assert "finished 2 epochs" in widget._status.value
    assert widget._train_button.enabled and not widget._stop_button.enabled


def test_stop_saves_resumable_state_and_resume_finishes(make_napari_viewer, data, tmp_path):
    out = tmp_path / "run"
    _viewer, widget = _widget(make_napari_viewer, data, out)
    original = widget._on_progress

    def stop_after_first_batch(event):
        original(event)
        if event.payload.get("batch") == 1:
            widget.stop()

    widget._on_progress = stop_after_first_batch
    widget.start()
    assert widget.result.stopped and widget.result.epochs_done == 0
    assert "can be resumed" in widget._status.value
    state = load_checkpoint(out / "last.pt").resume
    assert (state["epoch"], state["batch"]) == (0, 1)
    widget._on_progress = original
    widget._resume_button.clicked.emit()
    assert not widget.result.stopped and widget.result.epochs_done == 2
    assert list(widget.plot.epoch_lines["val"].get_data()[0]) == [1.0, 2.0]


def test_bad_input_is_reported_in_the_widget(make_napari_viewer, tmp_path):
    from napari_cryoddm._napari.widgets.train import TrainWidget

    widget = TrainWidget(make_napari_viewer())
    widget.start()
    assert "choose the forward folder" in widget._status.value
    (tmp_path / "fw").mkdir()
    widget._forward.value = tmp_path / "fw"
    widget._out.value = tmp_path / "out"
    widget.start()
    assert "missing s1/particles.mrcs" in widget._status.value
    assert not (tmp_path / "out").exists()


def test_choosing_a_run_folder_shows_its_history(make_napari_viewer, data, tmp_path):
    from napari_cryoddm.jobs import collect
    from napari_cryoddm.train import TrainConfig, train

    collect(train(data["folder"], tmp_path / "done", TrainConfig(epochs=1, batch_size=2, device="cpu")))
    _viewer, widget = _widget(make_napari_viewer, data, tmp_path / "elsewhere")
    widget._out.value = tmp_path / "done"
    assert list(widget.plot.epoch_lines["val"].get_data()[0]) == [1.0]
    assert "holds 1 epochs" in widget._status.value


def test_widget_from_the_manifest(make_napari_viewer):
    from napari_cryoddm._napari.widgets.train import TrainWidget

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-cryoddm", "Train")
    assert isinstance(widget, TrainWidget)


def test_training_in_a_thread_keeps_the_viewer_responsive(make_napari_viewer, data, tmp_path, qtbot, monkeypatch):
    """With real threads the Qt event loop keeps running (a 20 ms timer keeps firing) while the
    worker trains, and the plot receives the worker's progress."""
    from qtpy.QtCore import QTimer

    monkeypatch.setenv("CRYODDM_NAPARI_NOTHREADS", "0")
    _viewer, widget = _widget(make_napari_viewer, data, tmp_path / "run")
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(widget._runner.running))
    timer.start(20)
    handle = widget.start()
    assert handle is not None and handle.worker is not None
    assert not widget._train_button.enabled and widget._stop_button.enabled
    qtbot.waitUntil(lambda: not handle.running, timeout=180_000)
    timer.stop()
    assert sum(ticks) >= 10  # the GUI thread ran the timer many times during training
    assert widget.result is not None and widget.result.epochs_done == 2
    assert list(widget.plot.epoch_lines["val"].get_data()[0]) == [1.0, 2.0]
    assert widget._train_button.enabled
