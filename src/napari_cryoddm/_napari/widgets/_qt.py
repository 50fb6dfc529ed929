"""Qt details every dock shares: status lines that wrap instead of widening the dock, combo boxes
that do not grow with long layer names, and one label column for a dock and its nested forms."""

from __future__ import annotations

from typing import Any


def status_label(label: Any) -> Any:
    """A magicgui Label for messages of any length: it wraps at spaces and never asks the dock
    for more width (a long path without spaces is clipped, its full text is in the tooltip)."""
    from qtpy.QtWidgets import QSizePolicy

    native = label.native
    native.setWordWrap(True)
    native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
    native.setMinimumWidth(10)

    def _tooltip(value: Any = None) -> None:
        native.setToolTip(str(label.value))

    label.changed.connect(_tooltip)
    return label


def narrow(widget: Any, chars: int = 14) -> None:
    """Combo boxes and file fields in `widget` (a magicgui Container) keep a modest minimum width
    whatever the names they hold."""
    from qtpy.QtWidgets import QComboBox, QLineEdit, QSizePolicy

    for combo in widget.native.findChildren(QComboBox):
        combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        combo.setMinimumContentsLength(chars)
        combo.setSizePolicy(QSizePolicy.Policy.Expanding, combo.sizePolicy().verticalPolicy())
    for edit in widget.native.findChildren(QLineEdit):
        edit.setMinimumWidth(60)


def flush_forms(host: Any, *forms: Any) -> None:
    """Nested forms sit in the host's column (no indent) and share its label width."""
    from magicgui.widgets.bases import ButtonWidget

    for w in host:  # status lines (no label) use the whole width
        if not w.label and w._labeled_widget() is not None:
            w._labeled_widget()._label_widget.native.hide()
    for form in forms:
        wrapper = form._labeled_widget()
        if wrapper is not None:
            wrapper._label_widget.native.hide()
        form.margins = (0, 0, 0, 0)
    rows = [w for c in (host, *forms) for w in c if not isinstance(w, ButtonWidget) and w not in forms and w.label]
    rows += [w for form in forms for w in getattr(form, "advanced_controls", ())]
    if not rows:
        return
    from magicgui.application import use_app

    measure = use_app().get_obj("get_text_width")
    width = max(measure(w.label) for w in rows) + 12  # the measure runs a little short
    for w in rows:
        wrapper = w._labeled_widget()
        if wrapper is not None:
            wrapper.label_width = width


def finish_dock(host: Any, *forms: Any) -> None:
    """What every dock does once its controls are in place."""
    flush_forms(host, *forms)
    narrow(host)
