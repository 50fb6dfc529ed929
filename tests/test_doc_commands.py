"""Every `cryoddm …` command written in the README and the user guide parses against the real CLI:
its subcommand exists, every flag exists and every value has the right type and choice.

(The README's own-data recipe also runs, on sample data: tests/test_readme_recipe.py; the quick
demo runs in tests/test_demo.py.)
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from napari_cryoddm.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs" / "user-guide").glob("*.md"))]


def commands(page: Path) -> list[list[str]]:
    """The `cryoddm` lines of a page's bash blocks (continuations joined, comments dropped)."""
    out = []
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if not line or line.startswith("#"):
                continue
            for part in re.split(r"\s*(?:&&|\|\||;)\s*", line):
                words = shlex.split(part, comments=True)
                if words and Path(words[0]).name == "cryoddm":
                    out.append(words[1:])
    return out


ALL = [(page.relative_to(ROOT).as_posix(), argv) for page in PAGES for argv in commands(page)]


def test_the_pages_hold_commands():
    pages = {page for page, _ in ALL}
    assert "README.md" in pages and len(ALL) >= 20
    assert {argv[0] for _, argv in ALL if argv} >= {
        "sample",
        "pick-noise",
        "forward",
        "train",
        "predict",
        "cs2star",
        "demo",
        "info",
    }


@pytest.mark.parametrize("page,argv", ALL, ids=[f"{p}:{' '.join(a)[:60]}" for p, a in ALL])
def test_documented_command_parses(page, argv, capsys):
    if argv in (["--help"], ["-h"]) or argv[-1:] in (["--help"], ["-h"]):
        return  # help is printed and exits 0 by design
    parser = build_parser(argv)
    try:
        parser.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{page}: `cryoddm {' '.join(argv)}` does not parse: {capsys.readouterr().err.strip()}")
        raise AssertionError from exc
