"""`benchmarks/gpu_check.py --smoke`: every part of the GPU check runs on the CPU at tiny sizes,
so the script a GPU machine will run cannot rot unnoticed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_smoke_runs_every_part(tmp_path):
    out = tmp_path / "gpu-smoke"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--cap", "120"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "gpu_check.json").read_text())
    assert set(res["parts"]) == {"train", "predict", "reference", "ddp", "cpu"}
    assert not [n for n, r in res["parts"].items() if "error" in r]
    train = res["parts"]["train"]["rows"]["fp32"]
    assert train["bare_samples_s"] > 0 and train["pipeline_samples_s"] > 0
    pred = res["parts"]["predict"]["rows"]
    assert {"topaz", "original", "ours fp32"} <= set(pred)
    assert pred["ours fp32"]["model_speedup_vs_topaz"] > 0
    assert res["parts"]["ddp"]["ok"], res["parts"]["ddp"]
    assert res["parts"]["reference"]["scores"]["sample"]["input"]["r"] > 0
    md = (out / "gpu_check.md").read_text()
    for heading in (
        "Training speed",
        "Prediction of one micrograph",
        "Reference training",
        "torchrun",
        "CPU prediction",
    ):
        assert heading in md
    assert "failed" not in md
