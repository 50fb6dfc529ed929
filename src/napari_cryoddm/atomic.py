"""Atomic outputs: write to a temporary name in the same folder, rename on success."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import CryoDDMError, OutputExistsError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(final: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside `final`; rename it over `final` when the block succeeds.

    A failure (or a cancelled job) removes the temporary file, so a half-written output never
    carries the final name. Refuses to replace an existing file unless `overwrite`.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise OutputExistsError(final)
    folder = final.parent if str(final.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise CryoDDMError(f"cannot write in {folder}: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield `FINAL.partial/`; rename it to `FINAL/` only when the block succeeds.

    A cancelled or failed run leaves `FINAL.partial/` (never `FINAL/`), so it cannot look finished.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise OutputExistsError(final)
    partial = final.with_name(final.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    try:
        partial.mkdir(parents=True)
    except OSError as exc:
        raise CryoDDMError(f"cannot create {partial}: {exc.strerror or exc}") from exc
    yield partial
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
