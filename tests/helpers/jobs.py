"""Driving a job the way a user does: let it run, press Stop at a chosen event."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from napari_cryoddm.jobs import CancelToken, Job, Progress, collect


def stop_when(job: Job[Any], cancel: CancelToken, when: Callable[[Progress], bool]) -> Any:
    """Drain `job`, asking it to stop (`cancel`) at every event `when` accepts; return its result
    (a job that stops cleanly returns what it finished rather than raising)."""
    return collect(job, lambda event: cancel.cancel() if when(event) else None)
