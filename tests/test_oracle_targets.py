"""`benchmarks/oracle_targets.py`: the crops it trains on are aligned with their targets, its ideal
chain's target has the property the package's signal target promises, and a tiny run writes
every score it promises (docs/benchmarks.md quotes its full run)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

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


def test_a_tiny_run_scores_every_target_beside_the_input_and_the_filters(tmp_path):
    out = tmp_path / "oracle.json"
    argv = ["--minutes", "0.05", "--targets", "clean", "noisy2", "chain-signal", "chain-step"]
    argv += ["--micrographs", "1", "--size", "256", "--particles", "2", "--window", "64", "--batch", "2"]
    assert _module().main([*argv, "--test-micrographs", "1", "--held-out", "sample", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["scores"]["sample"]
    assert {f"U-Net, target {t}" for t in ("clean", "noisy2", "chain-signal", "chain-step")} <= set(rows)
    assert "input" in rows
    assert any(name.startswith("gaussian") for name in rows)
    assert all(math.isfinite(row["r"]) for row in rows.values())
    assert all(info["samples"] > 0 for info in report["train"].values())


def test_the_ideal_chains_signal_target_has_noise_uncorrelated_with_its_input():
    """On pure unit noise the target `train --s2-target signal` uses is uncorrelated with x_k (so
    the network learns the signal part only); on a noise-free crop it is c_k·x0."""
    import torch

    from napari_cryoddm.estimators import chain_statistics

    oracle = _module()
    x0 = torch.from_numpy(np.random.default_rng(2).standard_normal((64, 1, 64, 64)).astype(np.float32))
    xk, t = oracle.chain_pair(x0, np.random.default_rng(3))
    assert abs(float(np.corrcoef(xk.numpy().ravel(), t.numpy().ravel())[0, 1])) < 0.01
    beta, steps, k = oracle.REFERENCE_CHAIN
    c_k = chain_statistics(beta, steps)["signal"][k]
    flat = torch.full((4, 1, 32, 32), 2.0)
    _, t = oracle.chain_pair(flat, np.random.default_rng(4))
    assert float(t.mean()) == pytest.approx(c_k * 2.0, abs=0.05)
    _, step = oracle.chain_pair(flat, np.random.default_rng(4), "chain-step")  # x_{k−1}: c_{k−1}·x0
    assert float(step.mean()) == pytest.approx(chain_statistics(beta, steps)["signal"][k - 1] * 2.0, abs=0.05)
