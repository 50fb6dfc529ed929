"""Data safety at the command line (issue 14): one test per reported case, each asserting the exit
code, the message and — for the data-loss cases 1–4 — that every file that was there before is
still there, byte for byte. Plus a property test: no output name or suffix leaves OUT.

Everything is tiny (64–256 px micrographs, a random-weight network, 1-epoch runs of a 64-px forward
folder), so the file runs in a few CPU minutes. Signals and the resume message run the real
`python -m napari_cryoddm` in a subprocess.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.jobs import stop_when
from helpers.training import make_forward
from napari_cryoddm.checkpoint import load_checkpoint, save_checkpoint
from napari_cryoddm.cli import main
from napari_cryoddm.errors import CryoDDMError
from napari_cryoddm.io.mrc import write_mrc
from napari_cryoddm.jobs import CancelToken, collect
from napari_cryoddm.model import UDenoiseNet
from napari_cryoddm.predict import plan_outputs
from napari_cryoddm.safety import MARKER, inside, real
from napari_cryoddm.simulation.sample import generate_sample
from napari_cryoddm.simulation.sample_config import SampleConfig
from napari_cryoddm.train import TrainConfig, train

torch.set_num_threads(1)

TINY_SAMPLE = [
    "-n",
    "1",
    "--width",
    "256",
    "--height",
    "256",
    "--pixel-size",
    "6",
    "--particles",
    "2",
    "--atoms",
    "50",
    "-q",
]
FAST_PREDICT = ["--device", "cpu", "--tile", "128", "--overlap", "0"]
SYS_KERNEL = Path("/sys/kernel")


# ----------------------------------------------------------------------------- helpers


def digests(root: Path) -> dict[str, str]:
    """Every file under `root` (relative path → sha256): 'still there, byte for byte'."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def debris(root: Path) -> list[str]:
    """Temporary files and partial folders a failed write must not leave behind."""
    return sorted(p.name for p in root.rglob("*") if p.name.endswith((".tmp", ".partial")))


def one_error_line(err: str) -> bool:
    """The failure is one `cryoddm X: error: …` line (progress bars aside), never a traceback."""
    return err.count(": error:") == 1 and "Traceback" not in err


def env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
    }


@contextmanager
def file_size_limit(limit: int):
    """Writes beyond `limit` bytes fail with EFBIG (a real write failure from the kernel, as a full
    disk gives ENOSPC); SIGXFSZ is ignored so the process is not killed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def unwritable(path: Path) -> None:
    if not path.is_dir():
        pytest.skip(f"{path} does not exist here")
    try:
        (path / "cryoddm-probe").write_text("x")
    except OSError:
        return
    (path / "cryoddm-probe").unlink()
    pytest.skip(f"{path} is writable here")


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """Two 256² micrographs with 2 particles each (22 px, W = 128), STAR and .cs pair."""
    root = tmp_path_factory.mktemp("sample")
    cfg = SampleConfig(n_micrographs=2, width=256, height=256, pixel_size=6.0, particles=2, atoms=50)
    return collect(generate_sample(root / "s", cfg))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A random-weight UDenoiseNet checkpoint: prediction runs, the values do not matter here."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    return save_checkpoint(path, UDenoiseNet(), {"normalisation": {"method": "robust"}})


def mics(folder: Path, shapes=((64, 64),), names=None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = names or [f"mic_{i:03d}.mrc" for i in range(len(shapes))]
    return [
        write_mrc(folder / n, rng.normal(0, 1, s).astype(np.float32), voxel_size=2.0) for n, s in zip(names, shapes)
    ]


def noise_txt(path: Path, names=("mic_000.mrc", "mic_001.mrc")) -> Path:
    path.write_text("".join(f"{n} 64 192\n{n} 192 64\n" for n in names))
    return path


# ----------------------------------------------------------------------------- 1–4: data loss


def test_01_sample_overwrite_never_replaces_cwd_parents_or_foreign_folders(tmp_path, capsys, monkeypatch):
    parent = tmp_path / "parent"
    (parent / "child").mkdir(parents=True)
    (parent / "notes.txt").write_text("my notes")
    (parent / "data").mkdir()
    (parent / "data" / "x.bin").write_bytes(os.urandom(256))
    (parent / "somefolder").mkdir()
    (parent / "somefolder" / "thesis.tex").write_text("chapter 1")
    before = digests(parent)
    monkeypatch.chdir(parent / "child")
    rc, _, err = cli(capsys, "sample", "..", "--overwrite", *TINY_SAMPLE)
    assert rc == 2 and "is a parent of the working directory" in err and "Traceback" not in err
    rc, _, err = cli(capsys, "sample", ".", "--overwrite", *TINY_SAMPLE)
    assert rc == 2 and "is the working directory" in err and "empty name" not in err
    monkeypatch.chdir(parent)
    rc, _, err = cli(capsys, "sample", "somefolder", "--overwrite", *TINY_SAMPLE)
    assert rc == 2 and "somefolder" in err and "not written by napari-cryoddm sample" in err
    assert digests(parent) == before
    # its own output is replaced, and only while it holds nothing else
    assert cli(capsys, "sample", "ours", *TINY_SAMPLE)[0] == 0
    assert (parent / "ours" / MARKER).is_file()
    assert cli(capsys, "sample", "ours", "--overwrite", *TINY_SAMPLE)[0] == 0
    (parent / "ours" / "mine.txt").write_text("added by hand")
    rc, _, err = cli(capsys, "sample", "ours", "--overwrite", *TINY_SAMPLE)
    assert rc == 2 and "holds files napari-cryoddm did not write (mine.txt)" in err
    assert (parent / "ours" / "mine.txt").read_text() == "added by hand"
    assert digests(parent / "data") == {k[5:]: v for k, v in before.items() if k.startswith("data/")}


def test_02_cs2star_never_replaces_its_inputs_or_foreign_folders(sample, tmp_path, capsys):
    job = tmp_path / "J6"
    job.mkdir()
    shutil.copy(sample.particles_cs, job / "J6_005_particles.cs")
    shutil.copy(sample.passthrough_cs, job / "J6_passthrough_particles.cs")
    other = tmp_path / "other_folder"
    other.mkdir()
    (other / "results.csv").write_text("a,b\n1,2\n")
    existing_dir = tmp_path / "existing_dir"
    existing_dir.mkdir()
    (existing_dir / "keep.star").write_text("data_\n")
    before = digests(tmp_path)
    rc, _, err = cli(capsys, "cs2star", "--job-dir", job, "-o", job, "--overwrite")
    assert rc == 2 and "is the input" in err and "J6" in err
    rc, _, err = cli(capsys, "cs2star", "--job-dir", job, "-o", other, "--overwrite")
    assert rc == 2 and "not written by napari-cryoddm cs2star" in err and "results.csv" in err
    rc, _, err = cli(capsys, "cs2star", job / "J6_005_particles.cs", "-o", existing_dir, "--overwrite")
    assert rc == 2 and "is a folder" in err and "IsADirectoryError" not in err
    rc, _, err = cli(capsys, "cs2star", job / "J6_005_particles.cs", "-o", job / "J6_005_particles.cs", "--overwrite")
    assert rc == 2 and "is the input" in err
    assert digests(tmp_path) == before
    # its own folder output is replaced
    assert cli(capsys, "cs2star", "--job-dir", job, "-o", tmp_path / "converted")[0] == 0
    assert cli(capsys, "cs2star", "--job-dir", job, "-o", tmp_path / "converted", "--overwrite")[0] == 0


def test_03_pick_noise_never_rewrites_a_particle_star(sample, tmp_path, capsys):
    p = tmp_path / "p"
    p.mkdir()
    star = shutil.copy(sample.particles_star, p / "particles.star")
    copy = shutil.copy(sample.particles_star, p / "copy.star")
    before = digests(tmp_path)
    base = ["pick-noise", sample.micrographs[0].parent, "--particles", star, "--diameter", "22"]
    for mode in ("--merge", "--overwrite"):
        rc, _, err = cli(capsys, *base, "-o", star, mode)
        assert rc == 2 and "is the input" in err
        rc, _, err = cli(capsys, *base, "-o", copy, mode)
        assert rc == 2 and "is not a noise-box file" in err
    assert digests(tmp_path) == before
    # a noise file it wrote is merged into and replaced
    assert cli(capsys, *base, "-o", p / "noise.star", "--quiet")[0] == 0
    assert cli(capsys, *base, "-o", p / "noise.star", "--merge", "--quiet")[0] == 0
    assert cli(capsys, *base, "-o", p / "noise.star", "--overwrite", "--quiet")[0] == 0


def test_04_predict_suffix_cannot_leave_out(model, tmp_path, capsys):
    (src,) = mics(tmp_path / "in")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "mic_001.mrc").write_bytes(b"precious")
    before = digests(tmp_path)
    out = tmp_path / "a" / "b" / "OUT"
    rc, _, err = cli(capsys, "predict", model, src, "-o", out, "--suffix", "/../../../victim/mic_001", *FAST_PREDICT)
    assert rc == 2 and "--suffix" in err and "path separators" in err
    four = mics(tmp_path / "four", [(64, 64)] * 4)
    rc, _, err = cli(capsys, "predict", model, *four, "-o", out, "--suffix", "/../same", *FAST_PREDICT)
    assert rc == 2 and "--suffix" in err and "denoised" not in err
    assert {k: v for k, v in digests(tmp_path).items() if not k.startswith("four/")} == before
    assert not out.exists() or not any(out.iterdir())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    suffix=st.text(max_size=24),
    name=st.text(min_size=1, max_size=24),
    rel=st.lists(st.sampled_from(["..", ".", "a", "b", "", "/", "mic.mrc"]), max_size=6),
)
def test_no_output_name_or_suffix_resolves_outside_out(tmp_path, suffix, name, rel):
    out = tmp_path / "OUT"
    out.mkdir(exist_ok=True)
    try:
        pairs = plan_outputs([tmp_path / "in" / name], out, suffix)
    except CryoDDMError:
        pairs = []
    for _src, dst in pairs:
        assert real(dst).parent == real(out), (suffix, name, dst)
    try:
        dest = inside(out, out.joinpath(*rel) if rel else out)
    except CryoDDMError:
        return
    assert real(out) in real(dest).parents


# ----------------------------------------------------------------------------- 5–9: silent wrong results


@pytest.mark.parametrize(
    "field,value,what",
    [
        ("location/center_x_frac", np.nan, "NaN or infinite"),
        ("location/center_y_frac", 5.0, "outside 0…1"),
        ("location/micrograph_shape", 0, "0 (or not a size)"),
    ],
)
def test_05_cs2star_refuses_impossible_locations(sample, tmp_path, capsys, field, value, what):
    arr = np.load(sample.passthrough_cs)
    arr[field][1] = value
    bad = tmp_path / "bad.cs"
    with open(bad, "wb") as fh:
        np.save(fh, arr)
    rc, _, err = cli(capsys, "cs2star", bad, "-o", tmp_path / "out.star")
    assert rc == 2 and "bad.cs" in err and field in err and what in err and "row 2" in err
    assert not (tmp_path / "out.star").exists()


def test_06_predict_refuses_a_checkpoint_holding_nan(tmp_path, capsys):
    (src,) = mics(tmp_path / "in")
    net = UDenoiseNet()
    with torch.no_grad():
        net.dec1[0].weight[0, 0, 0, 0] = float("nan")
    bad = save_checkpoint(tmp_path / "diverged.pt", net, {})
    rc, out, err = cli(capsys, "predict", bad, src, "-o", tmp_path / "out", *FAST_PREDICT)
    assert rc == 2 and "diverged.pt" in err and "NaN or infinite" in err and "denoised" not in err
    assert not list((tmp_path / "out").glob("*.mrc"))


def test_07_particles_outside_every_micrograph_are_an_error(sample, tmp_path, capsys):
    blocks = starfile.read(sample.particles_star, always_dict=True)
    blocks["particles"]["rlnCoordinateX"] += 10000
    shifted = tmp_path / "shifted.star"
    starfile.write(blocks, shifted)
    rc, _, err = cli(
        capsys,
        "pick-noise",
        sample.micrographs[0].parent,
        "--particles",
        shifted,
        "--diameter",
        "22",
        "-o",
        tmp_path / "noise.txt",
    )
    assert rc == 2 and "lie outside their micrograph" in err and "shifted.star" in err
    assert not (tmp_path / "noise.txt").exists()
    rc, _, err = cli(
        capsys,
        "forward",
        sample.micrographs[0].parent,
        "--particles",
        shifted,
        "--noise",
        noise_txt(tmp_path / "n.txt"),
        "--diameter",
        "22",
        "-o",
        tmp_path / "fw",
    )
    assert rc == 2 and "lie outside their micrograph" in err and "would not help" in err
    assert "use a smaller --window" not in err and not (tmp_path / "fw").exists()


def test_08_blank_and_nan_micrographs_and_zero_boxes(sample, tmp_path, capsys):
    good, other = sample.micrographs
    folder = tmp_path / "mics"
    folder.mkdir()
    nan = write_mrc(folder / "mic_nan.mrc", np.full((256, 256), np.nan, np.float32))
    rc, _, err = cli(capsys, "pick-noise", nan, "--no-particles", "--diameter", "22", "-o", tmp_path / "a.txt")
    assert rc == 2 and "mic_nan.mrc" in err and "NaN" in err and not (tmp_path / "a.txt").exists()
    shutil.copy(good, folder / good.name)
    rc, out, _ = cli(
        capsys, "pick-noise", folder, "--no-particles", "--diameter", "22", "-o", tmp_path / "b.txt", "--quiet"
    )
    assert rc == 0 and "skipped (no boxes proposed)" in out and "mic_nan.mrc" in out
    assert "mic_nan" not in (tmp_path / "b.txt").read_text()
    # forward: an all-zero micrograph never reaches training
    zero = tmp_path / "zero"
    zero.mkdir()
    write_mrc(zero / good.name, np.zeros((256, 256), np.float32), voxel_size=6.0)
    shutil.copy(other, zero / other.name)
    rc, _, err = cli(
        capsys,
        "forward",
        zero,
        "--particles",
        sample.particles_star,
        "--noise",
        noise_txt(tmp_path / "n.txt"),
        "--diameter",
        "22",
        "--jitter",
        "0",
        "-o",
        tmp_path / "fw",
    )
    assert rc == 2 and good.name in err and "all pixels are 0" in err
    assert not (tmp_path / "fw").exists()
    rc, _, err = cli(
        capsys,
        "pick-noise",
        good,
        "--particles",
        sample.particles_star,
        "--diameter",
        "22",
        "--max-per-micrograph",
        "0",
        "-o",
        tmp_path / "c.txt",
    )
    assert rc == 2 and "--max-per-micrograph must be at least 1" in err
    assert not (tmp_path / "c.txt").exists()


def _stopped_run(folder: Path, out: Path, epochs: int) -> None:
    """A run of `epochs` stopped after its first batch (as Ctrl-C would)."""
    cancel = CancelToken()
    job = train(folder, out, TrainConfig(epochs=epochs, batch_size=2, device="cpu", warmup=0), cancel)
    assert stop_when(job, cancel, lambda ev: ev.payload.get("batch") == 1).stopped


def test_09_resume_keeps_the_stopped_runs_epochs_and_says_so(tmp_path):
    fw = make_forward(tmp_path / "data", n=2, window=64, m=2, steps=3, start=2)
    out = tmp_path / "run"
    _stopped_run(fw["folder"], out, epochs=2)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "napari_cryoddm",
            "train",
            str(fw["folder"]),
            "-o",
            str(out),
            "--resume",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "with the stopped run's plan: 2 epochs" in proc.stderr
    assert "UserWarning" not in proc.stderr and "warnings.warn" not in proc.stderr
    assert "epoch 2:" in proc.stdout and "epoch 3" not in proc.stdout
    assert len(json.loads((out / "history.json").read_text())["epochs"]) == 2


# ----------------------------------------------------------------------------- 10–14: clear messages


def test_10_non_ascii_names_and_one_bad_file_never_stop_the_others(tmp_path, capsys):
    folder = tmp_path / "in"
    mics(folder, [(64, 64), (64, 64)], names=["mïc 000.mrc", "plain.mrc"])
    (folder / "broken.mrc").write_bytes(b"not an MRC file at all" * 10)
    net_path = save_checkpoint(tmp_path / "mödel ü.pt", UDenoiseNet(), {})
    rc, _, err = cli(capsys, "predict", net_path, folder, "-o", tmp_path / "out", *FAST_PREDICT)
    assert rc == 1 and "2 denoised" in err and "1 failed" in err and "broken.mrc" in err
    assert "Label contains" not in err and "Traceback" not in err
    with mrcfile.open(tmp_path / "out" / "mïc 000.mrc") as m:
        labels = [bytes(m.header.label[i]).decode("ascii").strip() for i in range(int(m.header.nlabl))]
    assert "napari-cryoddm predict: m?c 000.mrc" in labels and "model m?del ?.pt epoch None" in labels
    assert (tmp_path / "out" / "plain.mrc").is_file()


def test_11_predict_write_failure_fails_that_file_and_leaves_no_debris(model, tmp_path, capsys):
    small, big = mics(tmp_path / "in", [(64, 64), (256, 256)])  # 17 kB and 263 kB outputs
    out = tmp_path / "out"
    with file_size_limit(100_000):
        rc, _, err = cli(capsys, "predict", model, small, big, "-o", out, *FAST_PREDICT)
    assert rc == 1 and "1 denoised" in err and "1 failed" in err
    assert f"{out / 'mic_001.mrc'}: cannot write: File too large" in err
    assert (out / "mic_000.mrc").is_file() and not (out / "mic_001.mrc").exists()
    assert debris(tmp_path) == []


def test_11_predict_stops_cleanly_on_a_full_disk(model, tmp_path, capsys, monkeypatch):
    sources = mics(tmp_path / "in", [(64, 64)] * 3)
    out = tmp_path / "out"
    import napari_cryoddm.io.mrc as mrc_io

    real_new, calls = mrc_io.mrcfile.new, []

    def full_after_one(path, *a, **kw):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_new(path, *a, **kw)

    monkeypatch.setattr(mrc_io.mrcfile, "new", full_after_one)
    rc, _, err = cli(capsys, "predict", model, *sources, "-o", out, *FAST_PREDICT)
    assert rc == 2 and f"{out / 'mic_001.mrc'}: cannot write: No space left on device" in err
    assert "stopped after 1 written" in err and one_error_line(err)
    assert sorted(p.name for p in out.iterdir()) == ["mic_000.mrc"] and debris(tmp_path) == []


@pytest.mark.parametrize("command", ["sample", "forward"])
def test_11_sample_and_forward_write_failures_leave_nothing(sample, tmp_path, capsys, command):
    out = tmp_path / "out"
    if command == "sample":
        argv = ["sample", out, *TINY_SAMPLE]
    else:
        argv = [
            "forward",
            sample.micrographs[0].parent,
            "--particles",
            sample.particles_star,
            "--noise",
            noise_txt(tmp_path / "n.txt"),
            "--diameter",
            "22",
            "-o",
            out,
        ]
    with file_size_limit(100_000):
        rc, _, err = cli(capsys, *argv)
    assert rc == 2 and "cannot write: File too large" in err and str(out) in err
    assert one_error_line(err) and "Traceback" not in err
    assert not out.exists() and debris(tmp_path) == []


def test_11_train_write_failure_keeps_the_last_good_checkpoint(tmp_path, capsys):
    fw = make_forward(tmp_path / "data", n=2, window=64, m=2, steps=3, start=2)
    out = tmp_path / "run"
    base = ["train", fw["folder"], "-o", out, "--batch-size", "2", "--device", "cpu"]
    assert cli(capsys, *base, "--epochs", "1")[0] == 0
    good = (out / "last.pt").read_bytes()
    with file_size_limit(1_000_000):  # a checkpoint with Adam's state is ~12 MB
        rc, _, err = cli(capsys, *base, "--epochs", "2", "--resume")
    assert rc == 2 and f"{out / 'last.pt'}: cannot write: File too large" in err
    assert "unexpected pos" not in err and "Traceback" not in err
    assert (out / "last.pt").read_bytes() == good and debris(tmp_path) == []
    assert load_checkpoint(out / "last.pt").resume["epoch"] == 1


@pytest.mark.parametrize("command", ["train", "demo", "predict"])
def test_11_and_14_unwritable_output_fails_first_with_one_line(model, tmp_path, capsys, monkeypatch, command):
    unwritable(SYS_KERNEL)
    import napari_cryoddm.predict as predict_mod

    def no_work(*a, **kw):
        raise AssertionError("work started before the output was checked")

    monkeypatch.setattr(predict_mod, "make_runtime", no_work)
    if command == "train":
        fw = make_forward(tmp_path / "data", n=2, window=64, m=2, steps=3, start=2)
        monkeypatch.setattr("napari_cryoddm.train_loop.UDenoiseNet", no_work)
        argv = ["train", fw["folder"], "-o", SYS_KERNEL / "cryoddm-run", "--device", "cpu"]
    elif command == "demo":
        monkeypatch.setattr("napari_cryoddm.simulation.sample.molecule_for", no_work)
        argv = ["demo", "--quick", "--out", SYS_KERNEL / "cryoddm-demo"]
    else:
        (src,) = mics(tmp_path / "in")
        argv = ["predict", model, src, "-o", SYS_KERNEL, *FAST_PREDICT]
    rc, _, err = cli(capsys, *argv)
    assert rc == 2 and str(SYS_KERNEL) in err and "cannot write here" in err
    assert one_error_line(err)


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["pick-noise", "MICS", "--particles", "STAR", "--diameter", "inf", "-o", "boxes.txt"],
            "particle diameter must be a positive number, got inf",
        ),
        (
            ["forward", "MICS", "--particles", "STAR", "--noise", "n.txt", "--diameter-A", "inf", "-o", "fw"],
            "--diameter-A must be a positive number, got inf",
        ),
        (
            ["pick-noise", "MICS", "--particles", "STAR", "--diameter-A", "inf", "-o", "boxes.txt"],
            "particle diameter must be a positive number, got inf Å",
        ),
        (["train", "fw", "-o", "run", "--seed", "-1"], "--seed must be 0 or more, got -1"),
        (
            [
                "forward",
                "MICS",
                "--particles",
                "STAR",
                "--noise",
                "n.txt",
                "--diameter",
                "22",
                "--seed",
                "-1",
                "-o",
                "fw",
            ],
            "--seed must be 0 or more, got -1",
        ),
        (["sample", "s", "--pixel-size", "0"], "--pixel-size must be positive, got 0.0"),
    ],
)
def test_12_impossible_numbers_are_one_line_errors(sample, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    noise_txt(tmp_path / "n.txt")
    argv = [
        str(sample.micrographs[0].parent) if a == "MICS" else str(sample.particles_star) if a == "STAR" else a
        for a in argv
    ]
    rc, _, err = cli(capsys, *argv)
    assert rc == 2 and message in err and one_error_line(err)
    assert "Error:" not in err and "Traceback" not in err


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_13_signals_stop_train_after_the_batch_with_a_resumable_checkpoint(tmp_path, capsys, sig, code):
    fw = make_forward(tmp_path / "data", n=4, window=64, m=4, steps=3, start=2)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "napari_cryoddm",
            "train",
            str(fw["folder"]),
            "-o",
            str(out),
            "--epochs",
            "1000",
            "--batch-size",
            "2",
            "--device",
            "cpu",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env(),
    )
    seen = bytearray()
    started = threading.Event()

    def watch() -> None:
        for chunk in iter(lambda: proc.stderr.read1(4096), b""):
            seen.extend(chunk)
            if b"loss" in seen:
                started.set()

    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    assert started.wait(300), bytes(seen).decode(errors="replace")
    time.sleep(0.5)  # mid-epoch
    proc.send_signal(sig)
    stdout = proc.stdout.read().decode()
    assert proc.wait(300) == code, bytes(seen).decode(errors="replace")
    reader.join(10)
    assert "stopped; resume with" in stdout and "Traceback" not in bytes(seen).decode(errors="replace")
    state = load_checkpoint(out / "last.pt").resume
    assert state is not None and (state["epoch"], state["batch"]) > (0, 0)
    rc, text, _ = cli(
        capsys, "train", fw["folder"], "-o", out, "--resume", "--device", "cpu", "--epochs", str(state["epoch"] + 1)
    )
    assert rc == 0 and f"epoch {state['epoch'] + 1}:" in text


def test_14_existing_forward_output_message_reads_once(sample, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, _, err = cli(
        capsys,
        "forward",
        sample.micrographs[0].parent,
        "--particles",
        sample.particles_star,
        "--noise",
        noise_txt(tmp_path / "n.txt"),
        "--diameter",
        "22",
        "-o",
        afile,
    )
    assert rc == 2 and err.strip().endswith("afile already exists; pass --overwrite to replace it")
    assert "it exists" not in err and afile.read_text() == "x"


def test_14_unsafe_checkpoints_are_refused_without_torchs_advice(tmp_path, capsys):
    (src,) = mics(tmp_path / "in")
    opcode = tmp_path / "opcode.pt"  # a pickle the weights-only unpickler cannot parse
    opcode.write_bytes(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00\x8c\x01a\x94\x85R.")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"a": Evil()}, tmp_path / "global.pt")
    for bad in (opcode, tmp_path / "global.pt"):
        rc, out, err = cli(capsys, "predict", bad, src, "-o", tmp_path / "out", *FAST_PREDICT)
        assert rc == 2 and bad.name in err and "refused" in err and "nothing was run" in err
        text = (out + err).lower()
        assert "weights_only" not in text and "re-running" not in text and "pwned" not in text
        assert "file an issue" not in text


def test_14_unquoted_space_in_a_star_name_names_the_line(sample, tmp_path, capsys):
    bad = tmp_path / "bad.star"
    bad.write_text(
        "data_particles\n\nloop_\n_rlnMicrographName #1\n_rlnCoordinateX #2\n"
        "_rlnCoordinateY #3\nmic_000.mrc 100 100\nmy mic.mrc 120 130\n"
    )
    rc, _, err = cli(
        capsys,
        "pick-noise",
        sample.micrographs[0].parent,
        "--particles",
        bad,
        "--diameter",
        "22",
        "-o",
        tmp_path / "n.txt",
    )
    assert rc == 2 and "bad.star: line 8: 4 values for 3 columns" in err and "quoted" in err
    assert "Length mismatch" not in err


def test_14_a_second_predict_run_counts_the_firsts_files_as_done(model, tmp_path, capsys, monkeypatch):
    sources = mics(tmp_path / "in", [(64, 64)] * 3)
    out = tmp_path / "out"
    argv = ["predict", model, *sources, "-o", out, *FAST_PREDICT]
    import napari_cryoddm.prefetch as prefetch_mod

    # the other run finishes every file while this one is busy with its first
    real_read, other_ran = prefetch_mod.read_prepared, []

    def read_prepared(path, *args):
        if not other_ran:
            other_ran.append(True)
            monkeypatch.setattr(prefetch_mod, "read_prepared", real_read)
            assert main([str(a) for a in argv]) == 0
        return real_read(path, *args)

    monkeypatch.setattr(prefetch_mod, "read_prepared", read_prepared)
    rc, _, err = cli(capsys, *argv)
    assert rc == 0 and other_ran
    assert err.strip().splitlines()[-1].startswith("0 denoised, 3 already done (skipped), 0 failed")
    rc, _, err = cli(capsys, *argv)  # and a rerun afterwards
    assert rc == 0 and "0 denoised, 3 already done (skipped), 0 failed" in err
    (out / "mic_001.mrc").unlink()
    (out / "mic_001.mrc").write_bytes(b"someone else's file")
    rc, _, err = cli(capsys, *argv, "--overwrite")
    assert rc == 1 and "mic_001.mrc: exists and was not written by cryoddm predict" in err
    assert (out / "mic_001.mrc").read_bytes() == b"someone else's file"
