"""Run core jobs from dock widgets: a napari thread worker, a progress bar, a Stop that saves.

The job generator is the same one the CLI drains. `Stop` sets the job's `CancelToken`, so the job
finishes its current item (a batch, a tile, a micrograph) and leaves a consistent, resumable
state. `CRYODDM_NAPARI_NOTHREADS=1` runs jobs synchronously (deterministic tests, debugging).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from napari.utils import progress
from napari.utils.notifications import show_error, show_info

from ..errors import CryoDDMError
from ..jobs import CancelToken, Job, Progress, collect

log = logging.getLogger(__name__)


def nothreads() -> bool:
    return os.environ.get("CRYODDM_NAPARI_NOTHREADS", "") not in ("", "0", "false", "False")


def report_error(exc: BaseException) -> None:
    """Users see the message of their own mistakes, and the type for a bug (traceback in the log)."""
    if isinstance(exc, CryoDDMError):
        show_error(str(exc))
    else:
        log.exception("job failed", exc_info=exc)
        show_error(f"{type(exc).__name__}: {exc}")


class JobHandle:
    """What a widget keeps of a running job: stop it, ask whether it runs, reach its worker."""

    def __init__(self, cancel: CancelToken) -> None:
        self.cancel = cancel
        self.worker = None
        self.running = True
        self.result: Any = None
        self.error: BaseException | None = None

    def stop(self) -> None:
        self.cancel.cancel()


def start_job(
    make_job: Callable[[CancelToken], Job],
    description: str = "",
    on_progress: Callable[[Progress], None] | None = None,
    on_done: Callable[[Any], None] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
    on_finish: Callable[[], None] | None = None,
) -> JobHandle:
    """Start `make_job(cancel)` in a thread (or inline under NOTHREADS) with a napari progress bar."""
    cancel = CancelToken()
    handle = JobHandle(cancel)
    bar = progress(total=0, desc=description)

    def _progress(event: Progress) -> None:
        if event.total is not None and bar.total != event.total:
            bar.total = event.total
        bar.n = event.done
        if event.message:
            bar.set_description(f"{description}: {event.message}" if description else event.message)
        bar.refresh()
        if on_progress is not None:
            on_progress(event)

    def _done(result: Any) -> None:
        handle.result = result
        if on_done is not None:
            on_done(result)

    def _error(exc: BaseException) -> None:
        handle.error = exc
        (on_error or report_error)(exc)

    def _finish() -> None:
        handle.running = False
        bar.close()
        if on_finish is not None:
            on_finish()

    if nothreads():
        try:
            _done(collect(make_job(cancel), _progress))
        except Exception as exc:  # reported like a threaded failure
            _error(exc)
        finally:
            _finish()
        return handle

    from napari.qt.threading import create_worker

    def _run():
        return (yield from make_job(cancel))

    worker = create_worker(_run, _start_thread=False)
    worker.yielded.connect(_progress)
    worker.returned.connect(_done)
    worker.errored.connect(_error)
    worker.finished.connect(_finish)
    handle.worker = worker
    worker.start()
    return handle


def notify(message: str) -> None:
    show_info(message)
