"""Atomic outputs: write to a temporary name in the same folder, rename on success."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import CryoDDMError, OutputError, OutputExistsError
from .safety import (
    WRITE_FAILURES,
    absolute,
    check_output_folder,
    check_replaceable,
    output_error,
    read_marker,
    write_marker,
)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _commit_new(tmp: Path, final: Path) -> None:
    """Give `tmp` the name `final` only if nothing holds that name yet (a hard link fails on an
    existing name, where a rename would replace what another run just wrote)."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise OutputExistsError(final) from None
    except OSError:  # a file system without hard links: check, then rename
        if os.path.lexists(final):
            raise OutputExistsError(final) from None
        os.replace(tmp, final)
        return
    with contextlib.suppress(OSError):
        tmp.unlink()


@contextlib.contextmanager
def atomic_write(final: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside `final`; rename it over `final` when the block succeeds.

    A failure (or a cancelled job) removes the temporary file, so a half-written output never
    carries the final name. Refuses to replace an existing file unless `overwrite`, also when
    another process created it meanwhile. A write failure (disk full, read-only) is an
    `OutputError` naming `final`.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise OutputExistsError(final)
    folder = final.parent if str(final.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise OutputError(folder, f"cannot write here ({exc.strerror or exc})", exc.errno) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
        except OSError as exc:
            if exc.errno not in WRITE_FAILURES:
                raise
            raise output_error(final, exc) from None
        try:
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
            if overwrite:
                os.replace(tmp_path, final)
            else:
                _commit_new(tmp_path, final)
        except OSError as exc:
            raise output_error(final, exc) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(
    final: str | os.PathLike[str],
    overwrite: bool = False,
    kind: str = "output",
    inputs: Iterable[Any] = (),
    layout: Sequence[str] = (),
    manifest: Callable[[Path], bool] | None = None,
) -> Iterator[Path]:
    """Yield `FINAL.partial/`; rename it to `FINAL/` only when the block succeeds.

    A cancelled or failed run leaves `FINAL.partial/` (never `FINAL/`), so it cannot look finished;
    a write failure (disk full, read-only) removes it. `FINAL` must pass
    `safety.check_output_folder`: not the working directory or a parent, not holding an input,
    and replaced (`overwrite`) only when `safety.check_replaceable` recognises it as this tool's
    `kind` output (its marker, or `manifest` + `layout` for folders written before markers). The
    finished folder carries a marker listing the files written.
    """
    named = Path(final)
    final = absolute(named)
    check_output_folder(named, kind, overwrite, inputs, layout, manifest)
    partial = final.with_name(final.name + ".partial")
    if os.path.lexists(partial):  # a stopped run's leftovers: ours to remove, nothing else
        left = read_marker(partial) if partial.is_dir() and not partial.is_symlink() else None
        if left is None or left.get("kind") != kind:
            check_replaceable(partial, kind, layout, manifest)
        shutil.rmtree(partial)
    try:
        partial.mkdir(parents=True)
        write_marker(partial, kind, files=())
    except OSError as exc:
        raise OutputError(partial, f"cannot create it ({exc.strerror or exc})", exc.errno) from None
    except OutputError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    try:
        yield partial
        write_marker(partial, kind)
    except (OSError, OutputError) as exc:
        if isinstance(exc, OSError) and exc.errno not in WRITE_FAILURES:
            raise
        shutil.rmtree(partial, ignore_errors=True)  # no debris from a full or read-only disk
        where = Path(exc.path if isinstance(exc, OutputError) else (exc.filename or partial))
        with contextlib.suppress(ValueError):  # name the output the user asked for
            where = named / absolute(where).relative_to(partial)
        if isinstance(exc, OutputError):
            raise OutputError(where, exc.problem, exc.errno) from None
        raise output_error(where, exc) from None
    try:
        if os.path.lexists(final):
            check_replaceable(named, kind, layout, manifest)  # again: a file may have appeared
            trash = final.with_name(f".{final.name}.replaced-{os.getpid()}")
            os.replace(final, trash)
            os.replace(partial, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(partial, final)
    except OSError as exc:
        raise output_error(final, exc) from None


__all__ = ["atomic_write", "atomic_dir", "CryoDDMError"]
