"""A magicgui form built from a step's config dataclass, so the widget and the CLI share defaults."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from magicgui.widgets import Container, create_widget

from ...config import ConfigError, field_type
from ...errors import CryoDDMError


class ConfigForm(Container):
    """One control per config field (fields with metadata `widget=False` are left out).

    `value()` returns a config instance; `set(**values)` fills controls from code (e.g. from the
    files the previous step wrote). An optional number (`float | None = None`) holds 0 for None
    ("not given") and shows `special.get(name, "auto")` in place of the 0: spin boxes cannot hold
    None. Fields named in `advanced` (expert options) go into a collapsed "Advanced" section;
    `labels` overrides a field's label.
    """

    def __init__(
        self,
        cls: type,
        skip: tuple[str, ...] = (),
        advanced: tuple[str, ...] = (),
        labels: dict[str, str] | None = None,
        special: dict[str, str] | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__(labels=True)
        self._cls = cls
        self._controls: dict[str, Any] = {}
        self._zero_is_none: set[str] = set()
        self.advanced_controls: list[Any] = []
        self._whole: set[str] = set()
        labels, special = labels or {}, special or {}
        self._labels = dict(labels)
        for f in dataclasses.fields(cls):
            if f.name in skip or f.metadata.get("widget", True) is False:
                continue
            typ, optional = field_type(cls, f)
            default = overrides.get(
                f.name,
                f.default
                if f.default is not dataclasses.MISSING
                else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None),
            )
            options: dict[str, Any] = {}
            if f.metadata.get("choices"):
                options["choices"] = list(f.metadata["choices"])
                widget_type = "ComboBox"
            else:
                widget_type = None
            if typ is Path:
                options["mode"] = f.metadata.get("path_mode", "r")
            annotation = typ
            if typing.get_origin(typ) in (tuple, list):
                annotation = str
                default = ",".join(str(v) for v in default) if default else ""
            if optional and typ in (int, float):
                self._zero_is_none.add(f.name)
                default = 0 if default is None else default
                if typ is int:  # a whole-number QDoubleSpinBox: Qt's int box here cannot show text for 0
                    annotation = float
                    options.update(step=1, max=1e7)
                    self._whole.add(f.name)
            label = labels.get(f.name, f.metadata.get("label", f.name.replace("_", " ")))
            unit = f.metadata.get("unit")
            if unit and unit not in label:
                label += f" ({unit})"
            kwargs = dict(value=default, annotation=annotation, label=label, options=options, name=f.name)
            if widget_type:
                kwargs["widget_type"] = widget_type
            w = create_widget(**kwargs)
            if f.name in self._whole:
                w.native.setDecimals(0)
            w.tooltip = f.metadata.get("help", "")
            if f.name in self._zero_is_none and hasattr(w.native, "setSpecialValueText"):
                text = special.get(f.name, "auto")
                w.native.setSpecialValueText(text)  # shown instead of the 0 that means None
                w.tooltip += f" ({text} when 0)"
            self._controls[f.name] = w
            if f.name in advanced:
                self.advanced_controls.append(w)
            else:
                self.append(w)
        self.advanced = None
        if self.advanced_controls:
            from superqt import QCollapsible

            inner = Container(labels=True, widgets=self.advanced_controls)
            inner.margins = (0, 0, 0, 0)
            self.advanced = QCollapsible("Advanced")
            self.advanced.addWidget(inner.native)
            self.advanced.collapse(animate=False)
            self._advanced_inner = inner
            self.native.layout().addWidget(self.advanced)

    def __getitem__(self, name):  # type: ignore[override]
        if isinstance(name, str) and name in self._controls:
            return self._controls[name]
        return super().__getitem__(name)

    def set(self, **values: Any) -> None:
        for k, v in values.items():
            if k in self._controls:
                self._controls[k].value = v

    def value(self, **extra: Any) -> Any:
        values: dict[str, Any] = {}
        for f in dataclasses.fields(self._cls):
            if f.name not in self._controls:
                continue
            v = self._controls[f.name].value
            typ, _ = field_type(self._cls, f)
            if typing.get_origin(typ) in (tuple, list):
                inner = typing.get_args(typ)[0]
                v = tuple(inner(s) for s in str(v).split(",") if s.strip())
            if f.name in self._zero_is_none and not v:
                v = None
            elif f.name in self._whole:
                v = int(round(v))
            values[f.name] = v
        values.update(extra)
        try:
            return self._cls(**values)
        except ConfigError as exc:  # said with the form's label, not the CLI flag
            raise CryoDDMError(f"{self._labels.get(exc.field, exc.label)}: {exc.problem}") from exc
