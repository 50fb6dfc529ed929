"""Where outputs may go and what `--overwrite` may replace: one rule for every command and widget.

Why: an output folder is replaced as a whole, so a wrong `-o` (the working directory, a parent,
an input folder, someone's project) would delete what the tool never wrote. The rule:

* an output is never the working directory, one of its parents, the file-system root or the home
  folder, and never equal to or a folder holding any input;
* `--overwrite` replaces only what this tool wrote: a folder is recognised by its marker
  (`.napari-cryoddm.json`, listing the files written) or its manifest (`forward.json`,
  `truth.json`) and must hold nothing else; a file by its own signature (checked by the caller);
* names built from user text (suffixes, names) hold no path separators and no `..`, and every
  destination is checked to resolve inside its output folder;
* an output location is tried for writing before any work starts.

Core only (no napari, no Qt); errors are `CryoDDMError`s naming the path.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import fnmatch
import glob
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import CryoDDMError, InputError, OutputError, OutputExistsError

MARKER = ".napari-cryoddm.json"
MARKER_FORMAT = "napari-cryoddm-output"
# errno values that mean "nothing more can be written here": stop instead of failing file by file
NO_ROOM = frozenset({_errno.ENOSPC, _errno.EDQUOT, _errno.EROFS})
# errno values of a failed write (as opposed to a failed read of an input inside the same block)
WRITE_FAILURES = NO_ROOM | {_errno.EFBIG, _errno.EACCES, _errno.EPERM}


def absolute(path: str | os.PathLike[str]) -> Path:
    """The absolute, `..`-collapsed path without following links (what the user named)."""
    return Path(os.path.abspath(os.fspath(path)))


def real(path: str | os.PathLike[str]) -> Path:
    """The absolute path with links resolved (what the file system will touch)."""
    return Path(os.path.realpath(os.fspath(path)))


def _contains(folder: Path, path: Path) -> bool:
    return folder == path or folder in path.parents


# ----------------------------------------------------------------------------- names


def check_name(text: str, what: str, whole: bool = False) -> str:
    """A name part must stay inside one path component: no `/`, `\\`, NUL or control characters,
    and no `..` in user text such as a suffix (`whole`: a complete file name, which may hold `..`
    inside, as `mic..1.mrc` does, but may not be `.` or `..`), so it never points elsewhere."""
    text = str(text)
    bad = [c for c in text if c in "/\\\x00" or ord(c) < 32 or ord(c) == 127]
    if bad or (text in (".", "..", "") if whole else ".." in text):
        raise CryoDDMError(
            f"{what} {text!r}: must not contain path separators (/ \\), '..' or "
            "control characters; it is part of a file name, not a path"
        )
    return text


def inside(folder: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """`dest` itself, after checking that it resolves to a path inside `folder` (links followed)."""
    root, target = real(folder), real(dest)
    if target == root or root not in target.parents:
        raise CryoDDMError(f"{dest}: resolves to {target}, outside the output folder {root}; refusing to write there")
    return Path(dest)


# ----------------------------------------------------------------------------- locations


def _input_paths(inputs: Iterable[Any]) -> list[Path]:
    out: list[Path] = []
    for item in inputs:
        if item is None:
            continue
        if isinstance(item, (str, os.PathLike)):
            text = os.fspath(item)
            if any(ch in text for ch in "*?["):
                out.extend(Path(h) for h in glob.glob(text))
            elif text:
                out.append(Path(text))
        else:
            out.extend(_input_paths(item))
    return out


def check_location(
    out: str | os.PathLike[str], inputs: Iterable[Any] = (), what: str = "the output", allow_workdir: bool = False
) -> Path:
    """Refuse outputs that are the working directory, a parent of it, the root or the home folder,
    or equal to / a folder holding any input (files, folders or globs, nested lists allowed).

    `allow_workdir`: for folders that only ever receive new files (predict, train), never
    replaced as a whole, the working directory and its parents are allowed."""
    out = Path(out)
    target = real(out)
    cwd = real(os.getcwd())
    if _contains(target, cwd) and not allow_workdir:
        where = "the working directory" if target == cwd else "a parent of the working directory"
        raise CryoDDMError(
            f"{out}: is {where} ({target}); refusing to use it as {what} — give a new folder or file name"
        )
    if not allow_workdir and (target == Path(target.anchor) or target == real(Path.home())):
        raise CryoDDMError(f"{out}: is {target}; refusing to use it as {what}")
    for inp in _input_paths(inputs):
        source = real(inp)
        if _contains(target, source):
            kind = "is the input" if target == source else "holds the input"
            raise CryoDDMError(
                f"{out}: {kind} {inp}; refusing to use it as {what}, where an "
                "output could replace the input — choose another output"
            )
    return out


def check_writable(folder: str | os.PathLike[str]) -> Path:
    """Try writing in `folder` (or, when it does not exist yet, in its nearest existing parent)
    before any work: a read-only or forbidden place fails in a second, not after the work."""
    folder = absolute(folder)
    probe_in = folder
    while not probe_in.exists():
        if probe_in.parent == probe_in:
            break
        probe_in = probe_in.parent
    if probe_in.exists() and not probe_in.is_dir():
        raise OutputError(probe_in, "is a file, not a folder; cannot write the output there")
    try:
        fd, name = tempfile.mkstemp(prefix=".cryoddm-probe-", dir=probe_in)
    except OSError as exc:
        raise OutputError(
            folder if probe_in == folder else probe_in, f"cannot write here ({exc.strerror or exc})", exc.errno
        ) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)
    return folder


def output_error(path: str | os.PathLike[str], exc: OSError) -> OutputError:
    """An `OSError` while writing `path`, as one line naming it (disk full, read-only, …)."""
    problem = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in NO_ROOM:
        problem += "; free space (or choose a writable place) and run the command again"
    return OutputError(path, f"cannot write: {problem}", exc.errno)


# ----------------------------------------------------------------------------- markers


def folder_files(folder: Path) -> list[str]:
    """Every file (and link) under `folder`, relative, with `/`; folders themselves not listed."""
    found: list[str] = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        rel = Path(root).relative_to(folder)
        for name in files + [d for d in dirs if (Path(root) / d).is_symlink()]:
            found.append((rel / name).as_posix())
    return sorted(found)


def write_marker(
    folder: str | os.PathLike[str], kind: str, files: Sequence[str] | None = None, layout: Sequence[str] = ()
) -> Path:
    """Claim `folder` as this tool's output of `kind`, listing the files it wrote (all present now
    unless `files` is given) and/or the `layout` globs its files follow (a folder filled step by
    step, such as the demo's): what a later `--overwrite` may replace."""
    folder = Path(folder)
    listed = sorted(f for f in (folder_files(folder) if files is None else files) if f != MARKER)
    doc = {"format": MARKER_FORMAT, "kind": kind, "package_version": __version__, "files": listed}
    if layout:
        doc["layout"] = list(layout)
    path = folder / MARKER
    tmp = folder / (MARKER + ".tmp")
    try:
        tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise output_error(path, exc) from None
    return path


def read_marker(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    path = Path(folder) / MARKER
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != MARKER_FORMAT:
        return None
    return doc


def check_replaceable(
    folder: str | os.PathLike[str],
    kind: str,
    layout: Sequence[str] = (),
    manifest: Callable[[Path], bool] | None = None,
) -> None:
    """Raise unless `--overwrite` may replace `folder` as a whole: it is empty, or it holds this
    tool's `kind` output (marker, or `manifest(folder)` true for folders written before markers,
    whose files must then match the `layout` globs) and nothing else."""
    folder = Path(folder)
    if not os.path.lexists(folder):
        return
    if folder.is_symlink() or not folder.is_dir():
        raise InputError(folder, "exists and is not a folder; refusing to replace it")
    files = folder_files(folder)
    if not files:
        return
    marker = read_marker(folder)
    if marker is not None:
        if marker.get("kind") != kind:
            raise InputError(
                folder,
                f"holds a napari-cryoddm {marker.get('kind')} output, not a {kind} output; refusing to replace it",
            )
        known = {*marker.get("files", []), MARKER}
        globs = [str(g) for g in marker.get("layout", [])]
        extra = [f for f in files if f not in known and not any(fnmatch.fnmatchcase(f, g) for g in globs)]
    elif manifest is not None and manifest(folder):
        extra = [f for f in files if not any(fnmatch.fnmatchcase(f, g) for g in layout)]
    else:
        raise InputError(
            folder,
            f"is not empty and was not written by napari-cryoddm {kind} "
            f"(it holds {_examples(files)}); --overwrite only replaces this "
            "tool's own outputs — choose another output or remove it yourself",
        )
    if extra:
        raise InputError(
            folder,
            f"holds files napari-cryoddm did not write ({_examples(extra)}); "
            "refusing to replace it — move them out or choose another output",
        )


def check_output_folder(
    out: str | os.PathLike[str],
    kind: str,
    overwrite: bool,
    inputs: Iterable[Any] = (),
    layout: Sequence[str] = (),
    manifest: Callable[[Path], bool] | None = None,
    exists_hint: str = "pass --overwrite to replace it",
) -> Path:
    """Everything `atomic_dir` will insist on, checked before any work: the location
    (`check_location`), an existing folder only with `overwrite` and only if replaceable
    (`check_replaceable`), and a writable parent (`check_writable`)."""

    out = Path(out)
    check_location(out, inputs, what=f"the {kind} output folder")
    if os.path.lexists(out):
        if not overwrite:
            raise OutputExistsError(out, exists_hint)
        check_replaceable(out, kind, layout, manifest)
    check_writable(absolute(out).parent)
    return out


def _examples(files: Sequence[str], n: int = 3) -> str:
    return ", ".join(files[:n]) + (f" and {len(files) - n} more" if len(files) > n else "")


__all__ = [
    "MARKER",
    "NO_ROOM",
    "WRITE_FAILURES",
    "check_name",
    "inside",
    "check_location",
    "check_writable",
    "output_error",
    "write_marker",
    "read_marker",
    "check_replaceable",
    "check_output_folder",
    "folder_files",
    "absolute",
    "real",
]
