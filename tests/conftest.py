"""Shared fixtures: the real third-party data beside the clone, and deterministic napari workers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("CRYODDM_REAL_DATA", REPO.parent / "shared" / "data" / "real"))

# Dock widgets run their jobs inline in tests, so assertions see finished results.
os.environ.setdefault("CRYODDM_NAPARI_NOTHREADS", "1")


@pytest.fixture(scope="session")
def real_data() -> Path:
    """`../shared/data/real` (third-party micrographs and coordinates); skip when absent."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data not found at {REAL_DATA} (a user's clone has no ../shared)")
    return REAL_DATA
