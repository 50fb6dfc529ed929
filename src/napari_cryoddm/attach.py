"""Attach a coordinate table to an opened micrograph stack: names → slice index, (x, y) → (i, y, x).

A napari reader sees only a path, never the viewer, so coordinates open with the micrograph
names their file gives; this step maps those names onto the stack's per-slice names by stem
(folder and extension ignored, RELION's `<micrograph>_<suffix>` coordinate files too) and says
which names matched nothing instead of silently dropping their points.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .errors import CryoDDMError
from .names import NameMatch, match_names


@dataclass
class AttachResult:
    """`points` (N, 3) float `(i, y, x)` for the matched rows; `features` their table rows with
    `micrograph` set to the stack's name; `unmatched` names (and how many points they held)."""

    points: np.ndarray
    features: pd.DataFrame
    unmatched: list[str]
    n_unmatched_points: int
    n_outside: int  # matched points whose centre lies outside the micrograph's true size
    match: NameMatch = field(repr=False)

    @property
    def n_points(self) -> int:
        return len(self.points)

    def summary(self) -> str:
        msg = f"attached {self.n_points} points to {len(set(self.points[:, 0].astype(int)))} micrographs"
        if self.unmatched:
            msg += (
                f"; {self.n_unmatched_points} points on {len(self.unmatched)} unmatched "
                f"micrograph names left out: {', '.join(self.unmatched[:5])}"
                + (" …" if len(self.unmatched) > 5 else "")
            )
        if self.n_outside:
            msg += f"; {self.n_outside} points lie outside their micrograph"
        return msg


def attach_coordinates(
    table: pd.DataFrame,
    micrograph_names: Sequence[str],
    shapes: Sequence[Sequence[int]] | None = None,
    require_match: bool = True,
) -> AttachResult:
    """Map `table` (`micrograph`, `x`, `y`, …) onto stack slices named `micrograph_names`.

    `shapes` (true [y, x] per slice) lets it count points outside their micrograph. With
    `require_match`, a table none of whose names match raises a `CryoDDMError` that shows
    examples of both sides of the mismatch."""
    for col in ("micrograph", "x", "y"):
        if col not in table.columns:
            raise CryoDDMError(f"coordinate table has no {col!r} column")
    if not len(micrograph_names):
        raise CryoDDMError("no micrographs to attach the coordinates to")
    names = table["micrograph"].astype(str).to_numpy()
    match = match_names(names, list(micrograph_names))
    if require_match and len(table) and not match.mapping:
        raise CryoDDMError("none of the coordinates' micrographs is open: " + match.describe_mismatch())
    index = np.array([match.mapping.get(n, -1) for n in names], dtype=np.int64)
    keep = index >= 0
    x = table["x"].to_numpy(np.float64)[keep]
    y = table["y"].to_numpy(np.float64)[keep]
    points = np.column_stack([index[keep].astype(np.float64), y, x]) if keep.any() else np.zeros((0, 3))
    features = table.loc[keep].drop(columns=["x", "y"]).reset_index(drop=True)
    if "micrograph" in features.columns and len(features):
        features["source_micrograph"] = features["micrograph"].to_numpy()
    features["micrograph"] = [micrograph_names[i] for i in index[keep]]
    n_outside = 0
    if shapes is not None and keep.any():
        sh = np.asarray([list(s)[-2:] for s in shapes], dtype=np.float64)[index[keep]]
        outside = (x < 0) | (y < 0) | (x > sh[:, 1] - 1) | (y > sh[:, 0] - 1)
        n_outside = int(outside.sum())
    unmatched = list(match.unmatched)
    return AttachResult(points, features, unmatched, int((~keep).sum()), n_outside, match)


def detach_points(points: np.ndarray, features: pd.DataFrame) -> pd.DataFrame:
    """The inverse: `(i, y, x)` + features → a table `micrograph`, `x`, `y`, other features."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if "micrograph" not in features.columns or len(features) != len(points):
        raise CryoDDMError("points need a 'micrograph' feature per point to be written")
    table = pd.DataFrame(
        {"micrograph": features["micrograph"].astype(str).to_numpy(), "x": points[:, 2], "y": points[:, 1]}
    )
    rest = features.drop(columns=["micrograph", "source_micrograph", "x", "y"], errors="ignore")
    return pd.concat([table, rest.reset_index(drop=True)], axis=1)
