"""The shared helpers every step relies on: jobs, atomic outputs, configs, windows, normalisation."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_cryoddm.atomic import atomic_dir, atomic_write
from napari_cryoddm.config import add_config_arguments, config_from_args, to_jsonable
from napari_cryoddm.errors import CryoDDMError, OutputExistsError
from napari_cryoddm.jobs import Cancelled, CancelToken, Progress, collect, run_job
from napari_cryoddm.normalise import MINMAX, Normalisation, normalisation_stats, normalise
from napari_cryoddm.params import check_window, diameter_px, window_for_diameter


def _counting_job(n: int, cancel: CancelToken | None = None):
    done = 0
    for i in range(n):
        if cancel is not None and cancel.cancelled:
            break
        done += 1
        yield Progress(i + 1, n, f"item {i}")
    return done


def test_collect_and_run_job_return_the_result():
    assert collect(_counting_job(5)) == 5
    assert run_job(_counting_job(7), quiet=True) == 7


def test_cancel_token_stops_a_job_between_items():
    token = CancelToken()
    job = _counting_job(100, token)
    next(job), next(job)
    token.cancel()
    assert collect(job) == 2
    with pytest.raises(Cancelled):
        token.raise_if_cancelled()


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_write(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole"
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's owner-only 0600
    with pytest.raises(OutputExistsError, match="out.txt already exists"):
        with atomic_write(target):
            pass
    assert target.read_text() == "whole"


def test_atomic_dir_is_complete_only_after_success(tmp_path: Path):
    final = tmp_path / "dataset"
    with pytest.raises(KeyError):
        with atomic_dir(final) as d:
            (d / "a").write_text("1")
            raise KeyError("cancelled")
    assert not final.exists() and (tmp_path / "dataset.partial").exists()
    with atomic_dir(final) as d:
        (d / "a").write_text("2")
    assert (final / "a").read_text() == "2" and not (tmp_path / "dataset.partial").exists()


@dataclasses.dataclass
class _Cfg:
    beta: float = dataclasses.field(default=0.1288, metadata={"help": "noise step"})
    steps: int = 5
    name: str = dataclasses.field(default="a", metadata={"choices": ("a", "b")})
    out: Path | None = None
    flag: bool = True
    sizes: tuple[int, ...] = (1, 2)


def test_config_round_trips_through_argparse():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, _Cfg)
    cfg = config_from_args(_Cfg, parser.parse_args(["--beta", "0.2", "--no-flag", "--sizes", "3", "4", "--out", "x"]))
    assert cfg == _Cfg(beta=0.2, steps=5, name="a", out=Path("x"), flag=False, sizes=(3, 4))
    assert config_from_args(_Cfg, parser.parse_args([])) == _Cfg()
    with pytest.raises(SystemExit):
        parser.parse_args(["--name", "c"])
    assert to_jsonable(cfg)["out"] == "x"


@pytest.mark.parametrize(
    "d, w",
    [
        (101, 256),
        (170, 256),
        (171, 384),
        (200, 384),
        (255, 384),
        (256, 512),
        (303, 512),
        (342, 640),
        (45, 128),
        (90, 256),
    ],
)
def test_window_rule_matches_the_original_table(d, w):
    assert window_for_diameter(d) == w


def test_window_and_diameter_checks():
    assert check_window(160) == 160
    for bad in (96, 150, 0):
        with pytest.raises(CryoDDMError, match="multiple of 32"):
            check_window(bad)
    assert diameter_px(diameter_A=150.0, apix=1.5) == pytest.approx(100.0)
    with pytest.raises(CryoDDMError, match="pixel size"):
        diameter_px(diameter_A=150.0, apix=0.0)
    with pytest.raises(CryoDDMError, match="not both"):
        diameter_px(100, 150.0, 1.0)


def test_robust_normalisation_ignores_hot_pixels_where_minmax_does_not():
    rng = np.random.default_rng(0)
    image = rng.normal(3500, 60, (512, 512)).astype(np.float32)
    hot = image.copy()
    hot[rng.integers(0, 512, 40), rng.integers(0, 512, 40)] = 13556
    robust = Normalisation()
    s_clean = normalisation_stats(image, robust)[3]
    s_hot = normalisation_stats(hot, robust)[3]
    assert abs(s_hot / s_clean - 1) < 0.02
    m_clean = normalisation_stats(image, MINMAX)[3]
    m_hot = normalisation_stats(hot, MINMAX)[3]
    assert m_hot / m_clean > 5
    out = normalise(hot, robust)
    assert out.dtype == np.float32 and abs(float(np.median(out))) < 0.05
    assert 0.95 < float(np.median(np.abs(out))) * 1.4826 < 1.05
    mm = normalise(image, MINMAX)
    assert mm.min() == 0 and mm.max() == 1
    with pytest.raises(CryoDDMError, match="unknown normalisation"):
        Normalisation("zscore")
    assert Normalisation.from_dict(robust.to_dict()) == robust


def test_cli_version_and_module_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "napari_cryoddm", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("napari-cryoddm ")


def test_cli_reports_user_errors_without_traceback(tmp_path: Path):
    bad = tmp_path / "not.mrc"
    bad.write_text("hello, I am text")
    out = subprocess.run([sys.executable, "-m", "napari_cryoddm", "info", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2
    assert "not.mrc" in out.stderr and "Traceback" not in out.stderr


def test_cli_imports_only_the_chosen_subcommand():
    code = (
        "import sys\nfrom napari_cryoddm.cli import main\n"
        "try:\n    main(['info', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, 'napari' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False False"
