"""Reading ahead and writing behind in threads while the network runs on the current
micrograph (inline, with lazy futures, when threads are off)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .io.mrc import write_mrc
from .normalise import Normalisation
from .preprocess import read_prepared


class Pipeline:
    """Reads ahead and writes behind in threads (I/O and numpy release the GIL); inline when 0."""

    def __init__(self, workers: int) -> None:
        self._reader = ThreadPoolExecutor(1, "cryoddm-read") if workers else None
        self._writer = ThreadPoolExecutor(1, "cryoddm-write") if workers else None

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: Any) -> None:
        for pool in (self._reader, self._writer):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def _done(fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - surfaced by .result()
            fut.set_exception(exc)
        return fut

    def read(self, path: Path, factor: float, spec: Normalisation) -> Future:
        """`preprocess.read_prepared(path, factor, spec)`, ahead of its turn."""
        if self._reader is None:
            return LazyFuture(read_prepared, path, factor, spec)
        return self._reader.submit(read_prepared, path, factor, spec)

    def write(self, dst: Path, pred: np.ndarray, voxel_size: float, overwrite: bool, labels: list[str]) -> Future:
        args = (dst, pred, voxel_size or None, overwrite, labels)
        fut = self._done(write_mrc, *args) if self._writer is None else self._writer.submit(write_mrc, *args)
        fut.path = dst  # type: ignore[attr-defined]  # named in a failure
        return fut


class LazyFuture(Future):
    """Without prefetch, read when the result is wanted (keeps one micrograph in memory)."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        super().__init__()
        self._fn, self._args = fn, args

    def result(self, timeout: float | None = None) -> Any:
        if not self.done():
            try:
                self.set_result(self._fn(*self._args))
            except BaseException as exc:  # noqa: BLE001
                self.set_exception(exc)
        return super().result(timeout)
