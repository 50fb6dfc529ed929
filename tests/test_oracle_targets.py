"""`benchmarks/oracle_targets.py`: the crops it trains on are aligned with their targets, and a tiny
run writes every score it promises (docs/benchmarks.md quotes its full run)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "oracle_targets.py"


def _module():
    spec = importlib.util.spec_from_file_location("oracle_targets", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_input_and_target_crops_share_position_and_symmetry():
    oracle = _module()
    ramp = np.add.outer(np.arange(40.0), 100 * np.arange(50.0)).astype(np.float32)  # every pixel unique
    data = [{"input": ramp, "clean": ramp + 1, "noisy2": 2 * ramp}]
    x, y = next(oracle.batches(data, "clean", 16, 64, np.random.default_rng(0)))
    np.testing.assert_array_equal(y - x, np.ones_like(x))
    x, y = next(oracle.batches(data, "noisy2", 16, 64, np.random.default_rng(1)))
    np.testing.assert_array_equal(y, 2 * x)
    # the 8 symmetries of the square are all drawn: the crop's first row runs along y or x, either way
    steps = {(float(c[0, 0, 1] - c[0, 0, 0]), float(c[0, 1, 0] - c[0, 0, 0])) for c in x.numpy()}
    assert steps == {(1.0, 100.0), (1.0, -100.0), (-1.0, 100.0), (-1.0, -100.0),
                     (100.0, 1.0), (100.0, -1.0), (-100.0, 1.0), (-100.0, -1.0)}  # fmt: skip


def test_a_tiny_run_scores_both_targets_beside_the_input_and_the_filters(tmp_path):
    out = tmp_path / "oracle.json"
    argv = [
        "--minutes",
        "0.05",
        "--micrographs",
        "1",
        "--size",
        "256",
        "--particles",
        "2",
        "--window",
        "64",
        "--batch",
        "2",
    ]
    assert _module().main([*argv, "--test-micrographs", "1", "--held-out", "sample", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["scores"]["sample"]
    assert {"input", "U-Net, target clean", "U-Net, target noisy2"} <= set(rows)
    assert any(name.startswith("gaussian") for name in rows)
    assert all(math.isfinite(row["r"]) for row in rows.values())
    assert all(info["samples"] > 0 for info in report["train"].values())
