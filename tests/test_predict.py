"""Prediction: seam-free tiling (with a negative control), outputs, resume, memory, bad inputs."""

from __future__ import annotations

import os
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch
from torch import nn

from napari_cryoddm.checkpoint import save_checkpoint
from napari_cryoddm.cli import main
from napari_cryoddm.errors import CryoDDMError, InputError
from napari_cryoddm.io.mrc import write_mrc
from napari_cryoddm.jobs import CancelToken, collect
from napari_cryoddm.model import UDenoiseNet
from napari_cryoddm.normalise import Normalisation, normalisation_stats, normalise
from napari_cryoddm.predict import (
    PredictConfig,
    PredictModel,
    denoise_array,
    make_runtime,
    output_path,
    predict_files,
    predict_image,
)
from napari_cryoddm.tiling import (
    DEFAULT_OVERLAP,
    RECEPTIVE_FIELD_PX,
    STRIDE,
    measure_receptive_field,
    pad_image,
    plan_tiles,
    predict_padded_whole,
)

CPU = dict(device="cpu", channels_last=False)


def blobs(rng: np.random.Generator, size: int, n: int = 12) -> np.ndarray:
    """A clean image of Gaussian blobs (particles) of a few sizes."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    img = np.zeros((size, size), np.float32)
    for _ in range(n):
        y, x = rng.uniform(0, size, 2)
        s = rng.uniform(2, 6)
        img += np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * s * s)).astype(np.float32)
    return img


@pytest.fixture(scope="module")
def trained() -> UDenoiseNet:
    """A UDenoiseNet trained for a few dozen steps to denoise blobs: non-trivial weights."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = UDenoiseNet()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    first = last = None
    for _step in range(120):  # until the loss halves (24–60 steps, by CPU kernel)
        clean = np.stack([blobs(rng, 64, 3) for _ in range(4)])
        noisy = clean + rng.normal(0, 0.5, clean.shape).astype(np.float32)
        x, y = torch.from_numpy(noisy)[:, None], torch.from_numpy(clean)[:, None]
        loss = nn.functional.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
        last = float(loss.detach())
        if _step >= 23 and last < 0.5 * first:
            break
    assert last < 0.5 * first, (first, last)  # it learned something: the weights are not random
    return net.eval()


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("shape", [(4096, 4096), (3838, 3710), (927, 959), (100, 70), (1, 1), (33, 4000)])
@pytest.mark.parametrize("tile,overlap", [(1536, 192), (1024, 176), (384, 64), (512, 0)])
def test_tile_grid_covers_image_on_the_pooling_grid(shape, tile, overlap):
    g = plan_tiles(shape, tile, overlap)
    ty, tx = g.tile_shape
    assert ty <= max(tile, 2 * g.margin + STRIDE) and tx <= max(tile, 2 * g.margin + STRIDE)
    assert ty % STRIDE == 0 and tx % STRIDE == 0 and g.margin >= overlap
    cover = np.zeros(shape, int)
    for oy, ox in g.origins():
        assert oy % STRIDE == 0 and ox % STRIDE == 0
        assert oy + ty <= g.padded_shape[0] and ox + tx <= g.padded_shape[1]
        cover[oy : oy + g.core[0], ox : ox + g.core[1]] += 1  # core in image coordinates
    assert (cover == 1).all()  # every pixel from exactly one tile core
    padded = pad_image(np.ones(shape, np.float32), g)
    assert padded.shape == g.padded_shape


def test_tile_too_small_for_overlap_is_refused():
    with pytest.raises(CryoDDMError, match="--tile"):
        plan_tiles((500, 500), 384, 192)
    with pytest.raises(CryoDDMError, match="multiple of 32"):
        PredictConfig(tile=1000)


def test_default_overlap_covers_the_measured_receptive_field():
    up, down = measure_receptive_field()
    assert max(up, down) == RECEPTIVE_FIELD_PX  # 161: the original's 64 px is far too little
    assert DEFAULT_OVERLAP >= max(up, down) and DEFAULT_OVERLAP % 32 == 0


# ----------------------------------------------------------------------------- seams


@pytest.mark.slow
def test_tiled_equals_untiled_and_64px_overlap_fails(trained):
    """1024² image, 2×2 tiles: our margins reproduce one pass over the padded image; the
    original's 64 px margin does not (the negative control that makes this test able to fail)."""
    rng = np.random.default_rng(1)
    img = blobs(rng, 1024, 60) + rng.normal(0, 0.5, (1024, 1024)).astype(np.float32)
    img = normalise(img, Normalisation())
    torch.set_num_threads(2)
    ref = predict_padded_whole(trained, img, overlap=192, tile=896)  # padded 1408², one pass
    rt = make_runtime(trained, PredictConfig(**CPU, tile=896, overlap=192, batch_size=2))
    ours = predict_image(rt, img)
    assert plan_tiles(img.shape, 896, 192).n_tiles == 4  # there are seams to get wrong
    control = predict_image(make_runtime(trained, PredictConfig(**CPU, tile=640, overlap=64, batch_size=2)), img)
    assert plan_tiles(img.shape, 640, 64).n_tiles == 4
    scale = float(ref.std())
    assert scale > 0.05  # a real output, not a constant
    tol = 1e-6 * scale  # float rounding only: in practice the two agree bit for bit
    err_ours = np.abs(ours - ref).max()
    # compare the control away from the image border (where its own padding differs from the
    # reference's): only the seams at row/column 512 remain
    inner = (slice(200, 824), slice(200, 824))
    err_control = np.abs(control - ref)[inner].max()
    assert err_ours <= tol, (err_ours, tol)
    assert err_control > 30 * tol, (err_control, tol)
    # and the control's error sits on the seams (row and column 512), not elsewhere
    seam = np.abs(control - ref)[250:330, 480:544].max()
    away = np.abs(control - ref)[250:330, 250:330].max()
    assert seam > 30 * tol and away <= tol, (seam, away, tol)


def test_small_and_odd_sizes_are_padded_not_refused():
    torch.manual_seed(0)
    net = UDenoiseNet().eval()
    rng = np.random.default_rng(2)
    for shape in [(40, 70), (131, 97)]:
        img = rng.normal(size=shape).astype(np.float32)
        out = predict_image(net, img, config=PredictConfig(**CPU, tile=512, overlap=192))
        ref = predict_padded_whole(net, img, 192, 512)
        assert out.shape == shape and out.dtype == np.float32
        assert np.abs(out - ref).max() < 1e-4 * (ref.std() + 1e-6)


# ----------------------------------------------------------------------------- files


def cheap_model() -> PredictModel:
    """A tiny convolution standing in for the U-Net where only the file handling is tested."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 1, 3, padding=1)
    return PredictModel(conv, Normalisation(), 1.0, "cheap")


def write_micrographs(folder: Path, shapes, voxel=1.25, seed=0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, shape in enumerate(shapes):
        p = folder / f"mic_{i:03d}.mrc"
        write_mrc(p, rng.normal(100, 5, shape).astype(np.float32), voxel_size=voxel)
        paths.append(p)
    return paths


def test_outputs_keep_voxel_size_shape_and_name_and_inputs_are_untouched(tmp_path):
    paths = write_micrographs(tmp_path / "in", [(200, 160), (96, 250)])
    before = {p: p.read_bytes() for p in paths}
    cfg = PredictConfig(**CPU, tile=256, overlap=32)
    res = collect(predict_files(cheap_model(), tmp_path / "in", tmp_path / "out", cfg))
    assert len(res.written) == 2 and not res.failed
    for p in paths:
        out = output_path(p, tmp_path / "out")
        assert out == tmp_path / "out" / p.name
        with mrcfile.open(out) as m:
            assert m.data.shape == mrcfile.read(p).shape and m.data.dtype == np.float32
            assert m.voxel_size.x == pytest.approx(1.25)
            labels = [bytes(m.header.label[i]).decode() for i in range(int(m.header.nlabl))]
            assert any(p.name in la for la in labels)
    assert {p: p.read_bytes() for p in paths} == before
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_files_equal_in_memory_chain_and_intensity_mapping(tmp_path):
    (p,) = write_micrographs(tmp_path / "in", [(150, 190)])
    pm = cheap_model()
    norm_cfg = PredictConfig(**CPU, tile=256, overlap=32)
    inp_cfg = PredictConfig(**CPU, tile=256, overlap=32, intensity="input", suffix="_in")
    collect(predict_files(pm, p, tmp_path / "out", norm_cfg))
    collect(predict_files(pm, p, tmp_path / "out", inp_cfg))
    a = mrcfile.read(tmp_path / "out" / "mic_000.mrc")
    b = mrcfile.read(tmp_path / "out" / "mic_000_in.mrc")
    raw = mrcfile.read(p)
    np.testing.assert_array_equal(a, denoise_array(pm, raw, norm_cfg))
    _lo, _hi, off, sc = normalisation_stats(raw, pm.normalisation)
    np.testing.assert_allclose(b, a * sc + off, rtol=1e-5, atol=1e-3)
    assert abs(float(np.median(b)) - float(np.median(raw))) < 3  # back in the input's units


def test_binned_checkpoint_bins_first_and_updates_voxel_size(tmp_path):
    (p,) = write_micrographs(tmp_path / "in", [(256, 320)], voxel=1.0)
    pm = cheap_model()
    pm.bin_factor = 2.0
    collect(predict_files(pm, p, tmp_path / "out", PredictConfig(**CPU, tile=256, overlap=32)))
    with mrcfile.open(tmp_path / "out" / "mic_000.mrc") as m:
        assert m.data.shape == (128, 160)
        assert m.voxel_size.x == pytest.approx(2.0)


def test_resume_skips_finished_files_and_overwrite_replaces(tmp_path):
    write_micrographs(tmp_path / "in", [(100, 100)] * 3)
    cfg = PredictConfig(**CPU, tile=128, overlap=0)
    collect(predict_files(cheap_model(), tmp_path / "in", tmp_path / "out", cfg))
    done = tmp_path / "out" / "mic_001.mrc"
    stamp = done.stat().st_mtime_ns
    (tmp_path / "out" / "mic_002.mrc").unlink()  # as if the run had been interrupted
    res = collect(predict_files(cheap_model(), tmp_path / "in", tmp_path / "out", cfg))
    assert [p.name for p in res.written] == ["mic_002.mrc"] and len(res.skipped) == 2
    assert done.stat().st_mtime_ns == stamp
    cfg.overwrite = True
    res = collect(predict_files(cheap_model(), tmp_path / "in", tmp_path / "out", cfg))
    assert len(res.written) == 3 and done.stat().st_mtime_ns != stamp


def test_cancel_keeps_finished_outputs_and_leaves_no_partial(tmp_path):
    write_micrographs(tmp_path / "in", [(100, 100)] * 4)
    cancel = CancelToken()
    job = predict_files(
        cheap_model(), tmp_path / "in", tmp_path / "out", PredictConfig(**CPU, tile=128, overlap=0), cancel=cancel
    )
    next(job)
    next(job)  # first micrograph done
    cancel.cancel()
    res = collect(job)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [p.name for p in res.written] and 1 <= len(names) < 4


def test_peak_rss_flat_over_50_micrographs(tmp_path):
    psutil = pytest.importorskip("psutil")
    write_micrographs(tmp_path / "in", [(512, 512)] * 50)  # 1 MB each: a kept copy would show
    proc = psutil.Process()
    rss = []
    for ev in predict_files(
        cheap_model(), tmp_path / "in", tmp_path / "out", PredictConfig(**CPU, tile=512, overlap=0)
    ):
        if ev.done:
            rss.append(proc.memory_info().rss)
    assert len(rss) == 50 and len(list((tmp_path / "out").glob("*.mrc"))) == 50
    growth = max(rss[25:]) - max(rss[5:15])
    assert growth < 15 * 2**20, f"RSS grew by {growth / 2**20:.1f} MB over 35 micrographs"


# ----------------------------------------------------------------------------- bad input


def test_nan_pixels_are_reported_by_name_and_others_finish(tmp_path):
    paths = write_micrographs(tmp_path / "in", [(80, 80)] * 3)
    data = mrcfile.read(paths[1]).copy()
    data[5, 7] = np.nan
    write_mrc(paths[1], data, voxel_size=1.25, overwrite=True)
    res = collect(
        predict_files(cheap_model(), tmp_path / "in", tmp_path / "out", PredictConfig(**CPU, tile=128, overlap=0))
    )
    assert len(res.written) == 2 and len(res.failed) == 1
    assert "mic_001.mrc" in res.failed[0][1] and "NaN" in res.failed[0][1]
    assert not (tmp_path / "out" / "mic_001.mrc").exists()
    assert "mic_001.mrc" in res.summary()


def test_not_a_checkpoint_and_unwritable_output_give_clear_messages(tmp_path, capsys):
    (p,) = write_micrographs(tmp_path / "in", [(64, 64)])
    bogus = tmp_path / "model.pt"
    bogus.write_text("definitely not a network")
    with pytest.raises(InputError, match="model.pt.*not a PyTorch checkpoint"):
        collect(predict_files(bogus, p, tmp_path / "out"))
    assert main(["predict", str(bogus), str(p), "-o", str(tmp_path / "out")]) == 2
    assert "model.pt" in capsys.readouterr().err
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(InputError, match="afile"):
        collect(predict_files(cheap_model(), p, blocker))
    with pytest.raises(InputError, match="afile"):
        collect(predict_files(cheap_model(), p, blocker / "sub"))


def test_output_would_replace_input_is_refused(tmp_path):
    (p,) = write_micrographs(tmp_path / "in", [(64, 64)])
    with pytest.raises(CryoDDMError, match="replace the input"):
        collect(predict_files(cheap_model(), p, tmp_path / "in", PredictConfig(**CPU, overwrite=True)))
    assert mrcfile.read(p).shape == (64, 64)


# ----------------------------------------------------------------------------- speed and safety


class OomAbove(nn.Module):
    """Raises CUDA's out-of-memory error for batches or tiles above a size (an injected OOM)."""

    def __init__(self, inner: nn.Module, max_batch: int, max_tile: int) -> None:
        super().__init__()
        self.inner, self.max_batch, self.max_tile, self.ooms = inner, max_batch, max_tile, 0

    def forward(self, x):
        if x.shape[0] > self.max_batch or x.shape[-1] > self.max_tile:
            self.ooms += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        return self.inner(x)


def test_out_of_memory_halves_batch_then_tile_and_carries_on():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 1, 3, padding=1)
    img = np.random.default_rng(3).normal(size=(300, 300)).astype(np.float32)
    expect = predict_image(conv, img, config=PredictConfig(**CPU, tile=512, overlap=32, batch_size=1))
    # too many tiles at once: the batch halves until it fits, the tile stays
    rt = make_runtime(
        OomAbove(conv, max_batch=2, max_tile=10_000), PredictConfig(**CPU, tile=256, overlap=32, batch_size=8)
    )
    out = predict_image(rt, img)
    assert (rt.batch_size, rt.tile) == (2, 256)
    assert rt.oom_events == ["batch size → 4", "batch size → 2"]
    np.testing.assert_allclose(out, expect, atol=1e-5)
    # a tile too big even alone: batch down to 1, then the tile halves; the run carries on
    rt = make_runtime(
        OomAbove(conv, max_batch=8, max_tile=300), PredictConfig(**CPU, tile=512, overlap=32, batch_size=2)
    )
    out = predict_image(rt, img)
    assert (rt.batch_size, rt.tile) == (1, 256)
    assert rt.oom_events == ["batch size → 1", "tile → 256 px"]
    np.testing.assert_allclose(out, expect, atol=1e-5)
    hopeless = make_runtime(OomAbove(conv, 0, 0), PredictConfig(**CPU, tile=256, overlap=32))
    with pytest.raises(CryoDDMError, match="out of memory"):
        predict_image(hopeless, img)


def test_bf16_on_cpu_is_close_to_fp32(trained):
    rng = np.random.default_rng(4)
    img = normalise(blobs(rng, 64, 3) + rng.normal(0, 0.5, (64, 64)).astype(np.float32))
    # small: bf16 is emulated on CPUs without AVX-512/AMX (a 128² pass takes ~20 s there)
    fp32 = predict_image(trained, img, config=PredictConfig(**CPU, tile=96, overlap=16))
    bf16 = predict_image(trained, img, config=PredictConfig(**CPU, tile=96, overlap=16, precision="bf16"))
    rel = np.abs(bf16 - fp32).max() / fp32.std()
    assert 0 < rel < 0.1  # bf16 changes results (hence opt-in on CPUs), but only a little


def test_channels_last_matches_contiguous(trained):
    img = np.random.default_rng(5).normal(size=(128, 128)).astype(np.float32)
    a = predict_image(trained, img, config=PredictConfig(device="cpu", tile=480, channels_last=False))
    b = predict_image(trained, img, config=PredictConfig(device="cpu", tile=480, channels_last=True))
    np.testing.assert_allclose(a, b, atol=1e-4 * a.std())


def test_cli_predicts_from_a_checkpoint_and_resumes(tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = save_checkpoint(
        tmp_path / "m.pt", UDenoiseNet(), {"normalisation": Normalisation().to_dict(), "bin_factor": 1, "window": 64}
    )
    paths = write_micrographs(tmp_path / "in", [(64, 64), (40, 90)])
    argv = [
        "predict",
        str(ckpt),
        str(tmp_path / "in"),
        "-o",
        str(tmp_path / "out"),
        "--device",
        "cpu",
        "--tile",
        "448",
        "--no-channels-last",
    ]
    assert main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [p.name for p in paths]
    assert "2 denoised" in capsys.readouterr().err
    assert main(argv) == 0
    assert "2 already done" in capsys.readouterr().err
    assert os.path.exists(tmp_path / "out" / "mic_001.mrc")


def test_cpu_tile_is_chosen_to_fit_the_memory_budget():
    from napari_cryoddm.tiling import CPU_BYTES_PER_TILE_PX, CPU_MEMORY_BUDGET, auto_cpu_tile

    assert auto_cpu_tile((4096, 4096), 192) == 1792  # 9 tiles of 1760²: 1.66× redundancy
    assert auto_cpu_tile((8192, 8192), 192) == 1536  # 1760² tiles would pass 2 GB on an 8k
    for shape in [(8192, 8192), (11520, 8184), (4096, 4096)]:
        g = plan_tiles(shape, auto_cpu_tile(shape, 192), 192)
        need = 8 * shape[0] * shape[1] + g.tile_shape[0] * g.tile_shape[1] * CPU_BYTES_PER_TILE_PX
        assert need <= CPU_MEMORY_BUDGET
    rt = make_runtime(nn.Conv2d(1, 1, 3, padding=1), PredictConfig(device="cpu"))
    assert rt.auto_tile  # automatic on a CPU unless --tile is given
    assert not make_runtime(nn.Conv2d(1, 1, 1), PredictConfig(device="cpu", tile=512)).auto_tile
