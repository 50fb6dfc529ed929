"""What every dock does the same way: read a file field that may be empty, and run one job at a
time with its Run buttons disabled and its Stop button enabled while it runs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ...jobs import CancelToken, Job, Progress
from ..workers import JobHandle, start_job

EMPTY = ("", ".", "None")  # what magicgui gives for an empty file field (or a None choice)


def path_or_none(value: Any) -> Path | list[Path] | None:
    """A FileEdit's value, or None when the field is empty; a multi-file field gives its
    non-empty paths, or None."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        paths = [Path(p) for p in value if str(p) not in EMPTY]
        return paths or None
    return None if str(value) in EMPTY else Path(value)


class JobButtons:
    """The Run buttons, the Stop button and the running job of one dock."""

    def __init__(
        self, run: Any | Sequence[Any], stop: Any, status: Any = None, stop_message: str | None = None
    ) -> None:
        self.run_buttons = list(run) if isinstance(run, (list, tuple)) else [run]
        self.stop_button = stop
        self.status = status
        self.stop_message = stop_message
        self.handle: JobHandle | None = None
        self._cancel: CancelToken | None = None
        self._active = False
        self.stop_button.enabled = False
        self.stop_button.changed.connect(lambda *_: self.stop())

    @property
    def running(self) -> bool:
        return self._active

    def start(
        self,
        make_job: Callable[[CancelToken], Job],
        description: str,
        *,
        on_done: Callable[[Any], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        on_finish: Callable[[], None] | None = None,
        message: str | None = "running…",
    ) -> JobHandle | None:
        """Start `make_job(cancel)` unless a job of this dock is running (then return that one)."""
        if self.running:
            return self.handle
        self._active = True
        self._set_running(True)
        if message and self.status is not None:
            self.status.value = message

        def job(cancel: CancelToken) -> Job:
            self._cancel = cancel  # known before the first item, also when the job runs inline
            return make_job(cancel)

        def finish() -> None:
            self._cancel, self._active = None, False
            self._set_running(False)
            if on_finish is not None:
                on_finish()

        self.handle = start_job(
            job, description, on_progress=on_progress, on_done=on_done, on_error=on_error, on_finish=finish
        )
        return self.handle

    def stop(self) -> None:
        """Ask the running job to stop after its current item (and say so)."""
        if self._cancel is not None and not self._cancel.cancelled:
            self._cancel.cancel()
            if self.stop_message and self.status is not None:
                self.status.value = self.stop_message

    def _set_running(self, running: bool) -> None:
        for button in self.run_buttons:
            button.enabled = not running
        self.stop_button.enabled = running
