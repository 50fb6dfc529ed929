"""The Train dock widget: the face of `train.train`, with a live loss plot, Stop and Resume.

Parameters come from the same `TrainConfig` the CLI uses. The job runs in a napari thread worker,
so the viewer stays responsive; every batch feeds the plot (thin dots per phase) and every epoch
adds the S1/S2/S3 means and the validation loss (lines). Stop finishes the current batch and saves
a resumable `last.pt`; Resume continues it exactly.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from magicgui.widgets import CheckBox, Container, FileEdit, Label, PushButton

from ...errors import CryoDDMError
from ...jobs import Progress
from ...train import PHASES, TrainConfig, TrainResult, read_history, train
from ..session import fill_empty, session
from ..workers import JobHandle, notify, report_error
from ._form import ConfigForm
from ._qt import finish_dock, status_label
from ._run import JobButtons, path_or_none

COLOURS = {"s1": "#1f77b4", "s2": "#ff7f0e", "s3": "#2ca02c", "val": "#111111"}
_REDRAW_S = 0.4  # at most ~2 redraws a second while batches stream in


class LossPlot:
    """A matplotlib canvas (Qt) with per-batch losses and per-epoch means of each phase + val."""

    def __init__(self) -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, 2.8), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(220)
        self.canvas.setMinimumWidth(120)
        self.ax = self.figure.add_subplot(111)
        self.batches: dict[str, tuple[list[float], list[float]]] = {p: ([], []) for p in PHASES}
        self.epochs: dict[str, tuple[list[float], list[float]]] = {p: ([], []) for p in (*PHASES, "val")}
        self._last_draw = 0.0
        self._setup()

    def _setup(self) -> None:
        ax = self.ax
        ax.clear()
        ax.set_xlabel("epoch")
        ax.set_ylabel("MSE loss")
        ax.set_yscale("log")
        ax.set_xlim(0, 1, auto=True)  # until the first batch: one epoch, losses of a normalised image
        ax.set_ylim(1e-2, 10, auto=True)
        self.batch_lines = {p: ax.plot([], [], "o", ms=3.5, alpha=0.45, mew=0, color=COLOURS[p])[0] for p in PHASES}
        self.epoch_lines = {
            p: ax.plot([], [], "-o", ms=3, lw=1.5, color=COLOURS[p], label=p.upper() if p != "val" else "validation")[0]
            for p in (*PHASES, "val")
        }
        ax.legend(loc="upper right", fontsize=7, frameon=False)

    def clear(self) -> None:
        for d in (self.batches, self.epochs):
            for xs, ys in d.values():
                xs.clear()
                ys.clear()
        self._setup()
        self.canvas.draw_idle()

    def add_batch(self, epoch: int, batch: int, batches: int, phase: str, loss: float) -> None:
        xs, ys = self.batches[phase]
        xs.append(epoch - 1 + batch / max(1, batches))
        ys.append(max(loss, 1e-12))
        self._refresh()

    def add_epoch(self, epoch: int, losses: dict[str, float]) -> None:
        for p in (*PHASES, "val"):
            if p in losses:
                xs, ys = self.epochs[p]
                xs.append(float(epoch))
                ys.append(max(float(losses[p]), 1e-12))
        self._refresh(force=True)

    def _refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < _REDRAW_S:
            return
        self._last_draw = now
        for p, line in self.batch_lines.items():
            line.set_data(*self.batches[p])
        for p, line in self.epoch_lines.items():
            line.set_data(*self.epochs[p])
        self.ax.relim()
        self.ax.autoscale_view()
        lo, hi = self.ax.get_xlim()
        if hi - lo < 1.1:  # at least one epoch wide, the epoch means not on the frame
            self.ax.set_xlim(min(lo, -0.05), max(hi, 1.05), auto=True)
        self.canvas.draw_idle()


class TrainWidget(Container):
    """Train the CryoDDM U-Net on a forward folder; watch the losses; stop and resume."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self._forward = FileEdit(
            label="forward folder", mode="d", tooltip="the forward step's output (s1/, s2/, s3/, val/)"
        )
        self._out = FileEdit(
            label="output folder",
            mode="d",
            tooltip="last.pt (every epoch, resumable), best.pt (lowest validation loss) and history.json go here",
        )
        self.form = ConfigForm(
            TrainConfig,
            skip=("resume", "overwrite"),
            advanced=(
                "batch_size",
                "warmup",
                "clip",
                "precision",
                "workers",
                "seed",
                "max_shift",
                "linear_start",
                "fresh_noise",
            ),
        )
        self.form["init"].tooltip += " (empty: random initialisation)"
        self.form["lr"].step = 0.0001  # four decimals: 0.0010, 0.0003 …
        self._overwrite = CheckBox(text="replace checkpoints already in the output folder", value=False)
        self._train_button = PushButton(text="Train")
        self._stop_button = PushButton(text="Stop", enabled=False)
        self._resume_button = PushButton(text="Resume")
        self._status = status_label(Label(value=""))
        self.extend(
            [
                self._forward,
                self._out,
                self.form,
                self._overwrite,
                self._train_button,
                self._stop_button,
                self._resume_button,
                self._status,
            ]
        )
        finish_dock(self, self.form)
        self.plot = LossPlot()
        self.native.layout().addWidget(self.plot.canvas)
        self._train_button.changed.connect(lambda *_: self.start(resume=False))
        self._resume_button.changed.connect(lambda *_: self.start(resume=True))
        self._out.changed.connect(self._show_existing)
        self._runner = JobButtons(
            [self._train_button, self._resume_button],
            self._stop_button,
            self._status,
            stop_message="stopping after the current batch (a resumable last.pt is saved)…",
        )
        self.result: TrainResult | None = None
        self._session = session(napari_viewer)
        self._session.changed.connect(self._on_session)
        if self._session.get("forward") is not None:
            self._on_session("forward", self._session.get("forward"))

    def _on_session(self, key: str, value: Any) -> None:
        """The folder Forward just wrote is the one to train on; the run goes beside it."""
        if key == "forward" and value is not None:
            fill_empty(self._forward, Path(value))
            fill_empty(self._out, Path(value).parent / "train")

    # -- actions ---------------------------------------------------------------------------

    def config(self, resume: bool = False) -> TrainConfig:
        init = path_or_none(self.form["init"].value)
        return self.form.value(init=init, resume=resume, overwrite=bool(self._overwrite.value))

    def start(self, resume: bool = False) -> JobHandle | None:
        """Start training (or resume the output folder's last.pt) in a worker thread."""
        if self._runner.running:
            return self._runner.handle
        forward = path_or_none(self._forward.value)
        out = path_or_none(self._out.value)
        try:
            if forward is None:
                raise CryoDDMError("choose the forward folder (the forward step's output)")
            if out is None:
                raise CryoDDMError("choose an output folder for the checkpoints")
            config = self.config(resume)
        except CryoDDMError as exc:
            self._status.value = str(exc)
            report_error(exc)
            return None
        self.result = None
        self.plot.clear()
        if resume:
            for h in read_history(out):
                self.plot.add_epoch(int(h["epoch"]), h)
        self.form.enabled = False
        return self._runner.start(
            lambda cancel: train(forward, out, config, cancel),
            "train",
            on_progress=self._on_progress,
            on_done=self._done,
            on_error=self._failed,
            on_finish=self._finished,
            message="resuming…" if resume else "starting…",
        )

    def stop(self) -> None:
        """Finish the current batch, save a resumable last.pt, stop."""
        self._runner.stop()

    # -- callbacks -------------------------------------------------------------------------

    def _on_progress(self, event: Progress) -> None:
        p = event.payload
        if p.get("epoch_end"):
            self.plot.add_epoch(int(p["epoch"]), p["losses"])
        elif "loss" in p:
            self.plot.add_batch(int(p["epoch"]), int(p["batch"]), int(p["batches"]), p["phase"], float(p["loss"]))
        if event.message:
            self._status.value = event.message

    def _done(self, result: TrainResult) -> None:
        self.result = result
        checkpoint = result.best or result.last
        if checkpoint is not None:
            self._session.publish("checkpoint", Path(checkpoint))
        if result.stopped:
            msg = f"stopped after {result.epochs_done} full epochs; {result.last} can be resumed (Resume)"
        else:
            msg = f"finished {result.epochs_done} epochs"
        if result.best_epoch is not None:
            msg += f"; best.pt: epoch {result.best_epoch}, validation {result.best_val:.4g}"
        self._status.value = msg
        notify(msg)

    def _failed(self, exc: BaseException) -> None:
        self._status.value = str(exc) if isinstance(exc, CryoDDMError) else f"{type(exc).__name__}: {exc}"
        report_error(exc)

    def _finished(self) -> None:
        self.form.enabled = True

    def _show_existing(self, *_: Any) -> None:
        """Choosing a run folder shows its loss history (e.g. to decide whether to resume)."""
        out = path_or_none(self._out.value)
        if out is None or self._runner.running:
            return
        history = read_history(out)
        if history:
            self.plot.clear()
            for h in history:
                self.plot.add_epoch(int(h["epoch"]), h)
            self._status.value = (
                f"{out} holds {len(history)} epochs (last val {history[-1]['val']:.4g}); Resume continues them"
            )
