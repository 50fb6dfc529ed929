"""Jobs: generators that yield progress events and return their result.

One implementation serves both faces: the CLI drains a job into a tqdm bar (`run_job`), a dock
widget runs the same generator in a napari thread worker. Cancellation is cooperative: a job
checks its `CancelToken` between items (tile, batch, micrograph) and stops cleanly, leaving
whatever it has finished in a consistent state.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

R = TypeVar("R")


@dataclass
class Progress:
    """One progress event. `total` None means unknown; `payload` carries e.g. a loss or a file."""

    done: int
    total: int | None = None
    message: str = ""
    payload: dict[str, Any] = field(default_factory=dict)


Job = Generator[Progress, None, R]


class Cancelled(Exception):
    """Raised inside a job by `CancelToken.raise_if_cancelled` when the user stopped it."""


class CancelToken:
    """A thread-safe stop flag shared by the job and whoever runs it."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signum: int | None = None  # the signal that stopped the job, if one did

    def cancel(self, signum: int | None = None) -> None:
        if signum is not None and self.signum is None:
            self.signum = signum
        self._event.set()

    @property
    def exit_code(self) -> int:
        """The shell's code for a command stopped by this token: 128 + the signal (130 for Ctrl-C)."""
        return 128 + int(self.signum or signal.SIGINT)

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            exc = Cancelled("cancelled by the user")
            exc.token = self  # type: ignore[attr-defined]  # the CLI's exit code comes from it
            raise exc


def collect(job: Job[R], on_progress: Callable[[Progress], None] | None = None) -> R:
    """Drain a job, handing each event to `on_progress` (if given); return its result."""
    while True:
        try:
            event = next(job)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(event)


def run_job(job: Job[R], desc: str = "", cancel: CancelToken | None = None, quiet: bool = False) -> R:
    """Drain a job into a tqdm progress bar on stderr and return its result.

    The first Ctrl-C — or SIGTERM, as a batch system or `kill` sends it — sets `cancel` (when
    given) so the job can finish its current item and save what it has; a second one interrupts
    at once.
    """
    from tqdm.auto import tqdm

    bar = None if quiet else tqdm(desc=desc, unit="it", dynamic_ncols=True, leave=True)
    previous = None
    interrupts = 0

    def on_sigint(signum, frame):  # exercised in a subprocess (tests/test_cli_safety.py)
        nonlocal interrupts
        interrupts += 1
        if cancel is None or interrupts > 1:
            raise KeyboardInterrupt
        cancel.cancel(signum)
        message = "stopping after the current item (Ctrl-C again to abort at once)"
        if bar is not None:
            bar.write(message)
        else:
            print(message, file=sys.stderr)

    handled = (signal.SIGINT, signal.SIGTERM)
    if cancel is not None and threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, on_sigint) for s in handled}

    def show(event: Progress) -> None:
        if event.total is not None and bar.total != event.total:
            bar.total = event.total
        bar.n = event.done
        if event.message:
            bar.set_postfix_str(event.message, refresh=False)
        bar.refresh()

    try:
        return collect(job, show if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
        if previous is not None:
            for s, handler in previous.items():
                signal.signal(s, handler)
