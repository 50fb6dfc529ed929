"""The documentation holds together: every relative link and image in README.md and docs/**/*.md
points at a file of the repository, every page is in the mkdocs site's nav, and the README stays
short."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
README = REPO / "README.md"
README_MAX_LINES = 250

PAGES = sorted([README, *DOCS.rglob("*.md")])

# [text](target) and ![alt](target), with an optional "title"; <target> allowed
INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'][^\"']*[\"'])?\s*\)")
# [label]: target (reference definitions)
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+[\"'(].*)?$", re.MULTILINE)
# <img src="target"> and <a href="target">
HTML = re.compile(r"<(?:img|a)\b[^>]*?\b(?:src|href)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, …


def _strip_code(text: str) -> str:
    """Text without fenced code blocks and inline code spans, which hold no links."""
    out, fence = [], None
    for line in text.splitlines():
        stripped = line.lstrip()
        marker = re.match(r"(`{3,}|~{3,})", stripped)
        if fence is None and marker:
            fence = marker.group(1)[0] * len(marker.group(1))
            out.append("")
            continue
        if fence is not None:
            if stripped.startswith(fence) and not stripped[len(fence) :].strip("`~ "):
                fence = None
            out.append("")
            continue
        out.append(re.sub(r"(`+)(?:(?!\1).)+?\1", "", line))
    return "\n".join(out)


def links(page: Path) -> list[str]:
    """Every link and image target of a Markdown page, outside code."""
    text = _strip_code(page.read_text(encoding="utf-8"))
    return [m.group(1) for rx in (INLINE, REFERENCE, HTML) for m in rx.finditer(text)]


def relative_targets(page: Path) -> list[tuple[str, Path]]:
    """(link as written, the file it names) for every relative link; anchors are ignored."""
    out = []
    for target in links(page):
        if not target or target.startswith("#") or SCHEME.match(target) or target.startswith("//"):
            continue
        path = unquote(target.split("#", 1)[0].split("?", 1)[0])
        if not path:
            continue
        base = REPO if path.startswith("/") else page.parent
        out.append((target, (base / path.lstrip("/")).resolve()))
    return out


def test_the_link_finder_sees_links_and_skips_code(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        'See [a](a.md#part), ![img](images/x.png "title"), [web](https://example.org), [top](#top)\n'
        "[ref]: other.md\n"
        '<img src="pic.png" width="10">\n'
        "`[not](code.md)` and\n"
        "```\n[not](fenced.md)\n```\n"
        "a table | [b](../b.md) |\n",
        encoding="utf-8",
    )
    assert links(page) == ["a.md#part", "images/x.png", "https://example.org", "#top", "../b.md", "other.md", "pic.png"]
    assert [t for t, _ in relative_targets(page)] == ["a.md#part", "images/x.png", "../b.md", "other.md", "pic.png"]


def test_there_are_pages_to_check():
    assert README in PAGES
    assert len(PAGES) > 5, PAGES


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    broken = [target for target, path in relative_targets(page) if not path.exists()]
    assert not broken, f"{page.relative_to(REPO)}: links to missing files: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_stay_inside_the_repository(page):
    outside = [target for target, path in relative_targets(page) if not path.is_relative_to(REPO)]
    assert not outside, f"{page.relative_to(REPO)}: links leave the repository: {outside}"


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; keep it to {README_MAX_LINES} (details go under docs/)"


def test_every_docs_page_is_in_the_site_nav():
    nav = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    listed = set(re.findall(r":\s*([\w./-]+\.md)\s*$", nav, re.MULTILINE))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert not pages - listed, f"pages missing from mkdocs.yml's nav: {sorted(pages - listed)}"
    assert not listed - pages, f"mkdocs.yml's nav names missing pages: {sorted(listed - pages)}"


def test_readme_keeps_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert (
        "python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e . && "
        ".venv/bin/cryoddm demo --quick --out demo-out"
    ) in text
    assert "\nbash .ci/run\n" in text
