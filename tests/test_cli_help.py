"""`cryoddm <command> --help` reads cleanly: one default per option, none for "not given", wrapped
descriptions, and pick-noise says a diameter is required."""

from __future__ import annotations

import contextlib
import io
import re

import pytest

from napari_cryoddm.cli import main

COMMANDS = ["sample", "pick-noise", "forward", "train", "predict", "cs2star", "demo", "info"]


def _help(command: str) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        main([command, "--help"])
    return buf.getvalue()


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_one_default_and_wrapped_lines(command):
    text = _help(command)
    assert "(default: None)" not in text and "(default: )" not in text
    options = re.split(r"\n  (?=-)", text)
    doubled = [o.split()[0] for o in options if len(re.findall(r"\(default", o)) > 1]
    assert doubled == []
    description = text.split("\n\n")[1]
    assert max(len(line) for line in description.splitlines()) <= 80


def test_pick_noise_says_a_diameter_is_required():
    text = " ".join(_help("pick-noise").split())
    assert "One of --diameter (px) or --diameter-A (Å) is required" in text


def test_demo_progress_keeps_one_total_of_seven_steps():
    from napari_cryoddm.jobs import Progress, collect
    from napari_cryoddm.simulation.demo import STEPS, _stage

    def step():
        for k in range(4):
            yield Progress(k + 1, 4, f"item {k + 1}")
        return "done"

    events: list[Progress] = []
    timings: dict[str, float] = {}
    assert collect(_stage(step(), 2, STEPS[2], timings), events.append) == "done"
    assert {e.total for e in events} == {len(STEPS)}
    assert [e.done for e in events] == [2, 2.25, 2.5, 2.75, 3.0]
    assert events[-1].message == "[3/7 forward] 4/4 item 4" and "forward" in timings
