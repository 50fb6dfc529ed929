"""Typed step configurations: one dataclass per step, built into CLI flags and widget forms.

Field metadata keys: `help`, `flag` (CLI flag; default `--field-name`), `choices`, `cli`
(False: not a CLI option), `widget` (False: not in the widget form), `unit`, `label`.

Every config checks itself in `__post_init__` and raises `ConfigError(config, field, problem)`: the
CLI prints it with the field's flag (`--epochs must be at least 1`), a widget with its label.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .errors import CryoDDMError

C = TypeVar("C")


def flag_of(f: dataclasses.Field) -> str:
    """A field's CLI flag (the long one when it has several)."""
    flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
    return flag if isinstance(flag, str) else list(flag)[-1]


def label_of(f: dataclasses.Field) -> str:
    """A field's label in a widget form."""
    return f.metadata.get("label", f.name.replace("_", " "))


class ConfigError(CryoDDMError):
    """An unusable parameter value, keyed by its field: `str()` names the CLI flag,
    `for_widget()` the form's label."""

    def __init__(self, config: Any, name: str, problem: str) -> None:
        fields = {f.name: f for f in dataclasses.fields(config)}
        self.field, self.problem = name, problem
        self.flag = flag_of(fields[name]) if name in fields else "--" + name.replace("_", "-")
        self.label = label_of(fields[name]) if name in fields else name.replace("_", " ")
        super().__init__(f"{self.flag} {problem}")

    def for_widget(self) -> str:
        return f"{self.label}: {self.problem}"


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """Return (type, optional) for annotations such as `float | None`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return annotation, False


def field_type(cls: type, f: dataclasses.Field) -> tuple[Any, bool]:
    hints = typing.get_type_hints(cls)
    return _base_type(hints[f.name])


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one option per dataclass field (defaults, help and choices from the field)."""
    group = parser.add_argument_group(f"{cls.__name__} options")
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if f.name in skip or meta.get("cli", True) is False:
            continue
        typ, _optional = field_type(cls, f)
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        flags = [flag] if isinstance(flag, str) else list(flag)  # all of them (flag_of: the long one)
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        help_text = meta.get("help", "")
        if meta.get("unit"):
            help_text += f" [{meta['unit']}]"
        # one default per option: none when the help already states it or there is none to state
        shown = "" if default in (None, "") or "default" in help_text.lower() else f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "help": f"{help_text}{shown}"}
        if typ is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["default"] = default
        elif typing.get_origin(typ) in (tuple, list):
            inner = typing.get_args(typ)[0]
            kwargs.update(type=inner, nargs="+", default=default)
        else:
            conv = Path if typ is Path else typ
            kwargs.update(type=conv, default=default)
            if meta.get("choices"):
                kwargs["choices"] = list(meta["choices"])
        group.add_argument(*flags, **kwargs)


def config_from_args(cls: type[C], ns: argparse.Namespace, **overrides: Any) -> C:
    """Build the dataclass from parsed arguments (fields absent from the namespace keep defaults)."""
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}
    for f in dataclasses.fields(cls):
        typ, _ = field_type(cls, f)
        if typing.get_origin(typ) is tuple and isinstance(values.get(f.name), list):
            values[f.name] = tuple(values[f.name])
    values.update(overrides)
    return cls(**values)


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types for manifests and checkpoint metadata (paths → str, numpy → Python)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj
