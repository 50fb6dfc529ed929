"""Micrograph names: match coordinate files to micrographs by stem, whatever folder or extension."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath

_EXTENSIONS = (
    ".gz",
    ".bz2",
    ".mrcs",
    ".mrc",
    ".st",
    ".map",
    ".rec",
    ".star",
    ".txt",
    ".box",
    ".cbox",
    ".tif",
    ".tiff",
    ".eer",
    ".cs",
)


def micrograph_stem(name: str) -> str:
    """`a/b/stack_0001.mrcs.gz` → `stack_0001`; strips a leading `>` (cryoSPARC export) too."""
    base = PurePath(str(name).strip().lstrip(">").replace("\\", "/")).name
    changed = True
    while changed:
        changed = False
        low = base.lower()
        for ext in _EXTENSIONS:
            if low.endswith(ext) and len(base) > len(ext):
                base = base[: -len(ext)]
                changed = True
                break
    return base


@dataclass
class NameMatch:
    """`mapping[name] = index of the micrograph`; `unmatched` names found no micrograph."""

    mapping: dict[str, int]
    unmatched: list[str] = field(default_factory=list)
    micrograph_examples: list[str] = field(default_factory=list)

    def describe_mismatch(self, n: int = 3) -> str:
        ours = ", ".join(self.unmatched[:n]) or "(none)"
        theirs = ", ".join(self.micrograph_examples[:n]) or "(none)"
        return f"names such as {ours} match no micrograph; open micrographs are named like {theirs}"


def match_names(names: Iterable[str], micrograph_names: Sequence[str]) -> NameMatch:
    """Match names to micrographs: equal stems first, then RELION's `<micrograph>_<suffix>`
    per-micrograph coordinate files (the longest micrograph stem that prefixes the name wins)."""
    stems = [micrograph_stem(m) for m in micrograph_names]
    by_stem = {s: i for i, s in enumerate(stems)}
    by_length = sorted(by_stem, key=len, reverse=True)
    mapping: dict[str, int] = {}
    unmatched: list[str] = []
    for name in dict.fromkeys(names):
        stem = micrograph_stem(name)
        if stem in by_stem:
            mapping[name] = by_stem[stem]
            continue
        hit = next((s for s in by_length if stem.startswith(s + "_")), None)
        if hit is None:
            unmatched.append(name)
        else:
            mapping[name] = by_stem[hit]
    return NameMatch(mapping, unmatched, list(micrograph_names[:5]))
