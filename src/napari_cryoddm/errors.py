"""Errors a user can act on: the CLI and the widgets show their message, not a traceback."""

from __future__ import annotations

from os import PathLike


class CryoDDMError(Exception):
    """A problem with the user's input or request, stated in words the user can act on."""


class InputError(CryoDDMError):
    """A named input file (or folder) is unusable; the message names it and the problem."""

    def __init__(self, path: str | PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class OutputExistsError(CryoDDMError):
    """An output already exists and the user did not ask to overwrite it."""

    def __init__(self, path: str | PathLike[str], hint: str = "pass --overwrite to replace it") -> None:
        self.path = str(path)
        super().__init__(f"{self.path} already exists; {hint}")


class OutputError(CryoDDMError):
    """An output could not be written (disk full, read-only, no permission); names the path."""

    def __init__(self, path: str | PathLike[str], problem: str, errno: int | None = None) -> None:
        self.path = str(path)
        self.problem = problem
        self.errno = errno
        super().__init__(f"{self.path}: {problem}")
