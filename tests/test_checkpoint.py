"""Checkpoints: ours round-trip in a fresh process; the original's pickles load safely; code never runs."""

from __future__ import annotations

import importlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.training import UNET2D_SOURCE
from napari_cryoddm.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from napari_cryoddm.errors import InputError, OutputExistsError
from napari_cryoddm.model import UDenoiseNet

torch.set_num_threads(1)


@pytest.fixture
def unet2d(tmp_path, monkeypatch):
    """The original's `unet2d` module, written to tmp_path and imported under that name."""
    (tmp_path / "orig").mkdir()
    (tmp_path / "orig" / "unet2d.py").write_text(UNET2D_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path / "orig"))
    sys.modules.pop("unet2d", None)
    module = importlib.import_module("unet2d")
    yield module
    sys.modules.pop("unet2d", None)


def _forget(module_name: str = "unet2d") -> None:
    """Make sure loading cannot fall back on the real class: drop it from sys.modules and the path."""
    sys.modules.pop(module_name, None)
    sys.path[:] = [p for p in sys.path if not p.endswith("orig")]


def test_round_trip_in_a_fresh_process(tmp_path):
    torch.manual_seed(3)
    model = UDenoiseNet()
    meta = {
        "window": 384,
        "diameter_px": 200.0,
        "bin_factor": 2.0,
        "normalisation": {"method": "robust"},
        "losses": {"val": 0.25},
        "path": tmp_path,
    }
    path = save_checkpoint(tmp_path / "m.pt", model, meta, resume={"epoch": 3, "batch": 5})
    sums = {k: float(v.double().sum()) for k, v in model.state_dict().items()}
    code = (
        "import json, sys, torch\n"
        "from napari_cryoddm.checkpoint import load_checkpoint\n"
        f"lc = load_checkpoint({str(path)!r})\n"
        "raw = torch.load(sys.argv[1], weights_only=True)\n"  # plain weights_only, no allowlist
        "print(json.dumps({'kind': lc.kind, 'meta': lc.metadata, 'resume': lc.resume,\n"
        "  'format': raw['format'], 'training': lc.model.training,\n"
        "  'sums': {k: float(v.double().sum()) for k, v in lc.model.state_dict().items()}}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["kind"] == "cryoddm" and got["format"] == FORMAT and got["training"] is False
    assert got["meta"]["window"] == 384 and got["meta"]["bin_factor"] == 2.0
    assert got["meta"]["path"] == str(tmp_path) and got["meta"]["architecture"]["nf"] == 48
    assert got["meta"]["package_version"]
    assert got["resume"] == {"epoch": 3, "batch": 5}
    assert got["sums"] == pytest.approx(sums, rel=0, abs=0)


def test_save_is_atomic_and_refuses_to_overwrite_unless_asked(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "m.pt", UDenoiseNet(), {"epoch": 1})
    before = path.read_bytes()
    with pytest.raises(OutputExistsError):
        save_checkpoint(path, UDenoiseNet(), {"epoch": 2}, overwrite=False)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, UDenoiseNet(), {"epoch": 2})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary left behind


def test_original_whole_module_pth_loads_with_equal_tensors(unet2d, tmp_path):
    torch.manual_seed(7)
    original = unet2d.UDenoiseNet()
    assert sum(p.numel() for p in original.parameters()) == 973_201
    torch.save(original, tmp_path / "71.pth")
    want = {k: v.clone() for k, v in original.state_dict().items()}
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        y_orig = original(x)
    _forget()
    lc = load_checkpoint(tmp_path / "71.pth")
    assert "unet2d" not in sys.modules  # nothing imported the original's code
    assert lc.kind == "original-module"
    got = lc.model.state_dict()
    assert list(got) == list(want) and len(got) == 34
    for k in want:
        assert torch.equal(got[k], want[k]), k
    with torch.no_grad():
        assert torch.equal(lc.model(x), y_orig)
    m = lc.metadata
    assert m["normalisation"]["method"] == "minmax" and m["bin_factor"] == 1
    assert m["window"] is None and "original" in m["source"]


def _as_if_saved_on_cuda(src: Path, dst: Path) -> None:
    """Rewrite a torch.save zip so its storages say `cuda:1`, as the original's N.pth files do
    (trained on a GPU); only the pickled location string changes."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name.endswith("data.pkl"):
                assert data.count(b"X\x03\x00\x00\x00cpu") == 1
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:1")
            zout.writestr(name, data)


def test_original_pth_saved_on_a_gpu_loads_on_the_cpu(unet2d, tmp_path):
    original = unet2d.UDenoiseNet()
    torch.save(original, tmp_path / "cpu.pth")
    _as_if_saved_on_cuda(tmp_path / "cpu.pth", tmp_path / "10059.pth")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "10059.pth", weights_only=False)  # what a plain load does here
    _forget()
    lc = load_checkpoint(tmp_path / "10059.pth")
    assert lc.kind == "original-module"
    assert all(p.device.type == "cpu" for p in lc.model.parameters())
    for k, v in original.state_dict().items():
        assert torch.equal(lc.model.state_dict()[k], v)


def test_original_checkpoint_dict_and_bare_state_dict(unet2d, tmp_path):
    original = unet2d.UDenoiseNet()
    opt = torch.optim.SGD(original.parameters(), lr=1e-3)
    torch.save(
        {"epoch": 70, "model_state_dict": original.state_dict(), "optimizer_state_dict": opt.state_dict()},
        tmp_path / "checkpoint.pth",
    )
    torch.save(original.state_dict(), tmp_path / "bare.pth")
    ddp_style = {"module." + k: v for k, v in original.state_dict().items()}
    torch.save(ddp_style, tmp_path / "ddp.pth")
    _forget()
    for name in ("checkpoint.pth", "bare.pth", "ddp.pth"):
        lc = load_checkpoint(tmp_path / name)
        assert lc.kind == "original-dict"
        for k, v in original.state_dict().items():
            assert torch.equal(lc.model.state_dict()[k], v)
    assert load_checkpoint(tmp_path / "checkpoint.pth").metadata["epoch"] == 71


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_os_system_is_refused_without_running(tmp_path):
    marker = tmp_path / "PWNED"
    torch.save({"state_dict": _RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match=r"evil.pt: refused: .*(posix|os)\.system.*nothing was run"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    # a legacy (non-zip) pickle and a module-level payload are refused the same way
    with open(tmp_path / "legacy.pth", "wb") as fh:
        pickle.dump(_RunsCode(marker), fh, protocol=2)
    with pytest.raises(InputError, match="refused"):
        load_checkpoint(tmp_path / "legacy.pth")
    assert not marker.exists()
    # sanity: the payload does run when unpickled unsafely, so the test can fail
    with open(tmp_path / "legacy.pth", "rb") as fh:
        pickle.load(fh)
    assert marker.exists()


def test_other_architecture_is_refused_naming_keys_and_shapes(unet2d, tmp_path):
    narrow = unet2d.UDenoiseNet(nf=32)
    torch.save(narrow, tmp_path / "narrow.pth")
    torch.save({"model_state_dict": torch.nn.Conv2d(1, 4, 3).state_dict()}, tmp_path / "conv.pth")
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3)), tmp_path / "seq.pth")
    _forget()
    with pytest.raises(
        InputError,
        match=r"enc1\.0\.weight has shape \[32, 1, 11, 11\], UDenoiseNet needs "
        r"\[48, 1, 11, 11\]",
    ):
        load_checkpoint(tmp_path / "narrow.pth")
    with pytest.raises(InputError, match=r"missing 34 keys \(enc1\.0\.weight.*unexpected 2 keys \(weight, bias\)"):
        load_checkpoint(tmp_path / "conv.pth")
    with pytest.raises(InputError, match="holds a Sequential module"):
        load_checkpoint(tmp_path / "seq.pth")


def test_unreadable_inputs(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(InputError, match="not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "notes.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(InputError, match="holds a list"):
        load_checkpoint(tmp_path / "list.pt")
    with pytest.raises(InputError, match="is a folder"):
        load_checkpoint(tmp_path)
    torch.save(
        {"format": FORMAT, "version": 99, "state_dict": UDenoiseNet().state_dict(), "metadata": {}},
        tmp_path / "future.pt",
    )
    with pytest.raises(InputError, match="version 99 is newer"):
        load_checkpoint(tmp_path / "future.pt")
