"""MRC I/O: modes, stacks, gzip, headers of real files, lazy stacks, pyramids, laziness, bad input."""

from __future__ import annotations

import gzip
import mmap
import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from napari_cryoddm.errors import CryoDDMError, InputError, OutputExistsError
from napari_cryoddm.io import mrc as mrcio
from napari_cryoddm.io import stack as stackio
from napari_cryoddm.io.mrc import (
    MRC_PATTERNS,
    list_micrographs,
    read_header,
    read_image,
    read_micrograph,
    read_slice,
    write_mrc,
    write_mrc_slices,
)
from napari_cryoddm.io.stack import contrast_limits, level_shapes, open_stack


def _write(path: Path, data: np.ndarray, voxel: float | None = 1.5, stack: bool = False) -> Path:
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(data)
        if voxel:
            m.voxel_size = voxel
        if stack:
            m.header.ispg = 0
    return path


# ---- modes and files -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, mode", [(np.int8, 0), (np.int16, 1), (np.float32, 2), (np.uint16, 6), (np.float16, 12), (np.uint8, 6)]
)
def test_every_mode_reads_back_exact_values(tmp_path, dtype, mode):
    rng = np.random.default_rng(0)
    info_ = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    if info_ is not None:
        data = rng.integers(info_.min, info_.max, size=(37, 53), endpoint=True).astype(dtype)
    else:
        data = rng.normal(3, 2, size=(37, 53)).astype(dtype)
    path = _write(tmp_path / f"m{mode}.mrc", data, voxel=0.83)
    info = read_header(path)
    assert info.mode == mode
    assert info.shape == (37, 53)
    assert info.voxel_size == pytest.approx(0.83, rel=1e-6)
    image = read_image(path)
    assert image.dtype == np.float32
    np.testing.assert_array_equal(image, data.astype(np.float32))


def test_imod_unsigned_bytes_in_mode_0(tmp_path):
    """IMOD writes unsigned bytes in mode 0 (its stamp without the 'signed' flag)."""
    data = np.array([[0, 100, 200, 255]], dtype=np.uint8)
    path = tmp_path / "imod.mrc"
    _write(path, data.view(np.int8))
    raw = bytearray(path.read_bytes())
    raw[152:160] = np.array([1146047817, 0], dtype="<i4").tobytes()  # imodStamp, imodFlags
    path.write_bytes(bytes(raw))
    info = read_header(path)
    assert info.mode == 0 and np.dtype(info.dtype) == np.uint8
    np.testing.assert_array_equal(read_image(path), data.astype(np.float32))
    # MRC2014 mode 0 without the IMOD stamp is signed
    plain = _write(tmp_path / "plain.mrc", data.view(np.int8))
    assert read_image(plain)[0, 2] == -56


def test_complex_mode_shows_amplitude(tmp_path):
    data = (np.arange(12).reshape(3, 4) * (0.6 + 0.8j)).astype(np.complex64)
    path = _write(tmp_path / "fft.mrc", data)
    assert read_header(path).mode == 4
    np.testing.assert_allclose(read_image(path), np.arange(12).reshape(3, 4), rtol=1e-6)
    lo, hi = open_stack(path).contrast_limits
    assert 0 <= lo < hi <= 11


def test_mode_101_four_bit_packed(tmp_path):
    """SerialEM/IMOD 4-bit data: two pixels a byte, low nibble first, rows padded to a byte."""
    nx, ny, nz = 5, 3, 2
    pixels = (np.arange(nz * ny * nx) % 16).astype(np.uint8).reshape(nz, ny, nx)
    padded = np.zeros((nz, ny, 6), np.uint8)
    padded[..., :nx] = pixels
    packed = (padded[..., 0::2] | (padded[..., 1::2] << 4)).astype(np.uint8)
    path = _write(tmp_path / "frames.mrcs", packed.view(np.int8), stack=True)
    raw = bytearray(path.read_bytes())
    raw[0:4] = np.int32(nx).tobytes()
    raw[12:16] = np.int32(101).tobytes()
    path.write_bytes(bytes(raw))
    info = read_header(path)
    assert info.mode == 101 and info.shape == (nz, ny, nx)
    np.testing.assert_array_equal(read_image(path, 1), pixels[1].astype(np.float32))
    np.testing.assert_array_equal(open_stack(path).data[0].compute(), pixels[0])
    path.write_bytes(bytes(raw[:-2]))
    with pytest.raises(InputError, match="truncated"):
        read_header(path)


def test_big_endian_file(tmp_path):
    data = np.arange(12, dtype=">f4").reshape(3, 4)
    path = _write(tmp_path / "be.mrc", data)
    info = read_header(path)
    assert info.dtype == ">f4"
    np.testing.assert_array_equal(read_image(path), data.astype(np.float32))


def test_stack_slices_and_errors(tmp_path):
    data = np.arange(3 * 8 * 9, dtype=np.float32).reshape(3, 8, 9)
    path = _write(tmp_path / "p.mrcs", data, stack=True)
    info = read_header(path)
    assert info.is_stack and info.n_images == 3 and info.shape == (3, 8, 9)
    np.testing.assert_array_equal(read_image(path, 2), data[2])
    np.testing.assert_array_equal(read_image(path, -1), data[2])
    with pytest.raises(InputError, match="holds 3 images; choose one"):
        read_image(path)
    with pytest.raises(InputError, match="has no image 3"):
        read_image(path, 3)
    with pytest.raises(InputError, match="stack of 3 images, not a micrograph"):
        read_micrograph(path)


def test_gzip_decompressed_once_and_memory_mapped(tmp_path, monkeypatch):
    data = np.random.default_rng(1).normal(size=(4, 64, 48)).astype(np.float32)
    plain = _write(tmp_path / "s.mrcs", data, voxel=2.0, stack=True)
    gz = tmp_path / "s.mrcs.gz"
    with open(plain, "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    calls = []
    real = mrcio._open_stream
    monkeypatch.setattr(mrcio, "_open_stream", lambda p: (calls.append(p), real(p))[1])
    info = read_header(gz)
    assert info.compressed and info.is_stack and info.shape == (4, 64, 48)
    assert info.voxel_size == pytest.approx(2.0)
    n_header = len(calls)
    for k in range(4):
        np.testing.assert_array_equal(read_slice(info, k), data[k])
    assert len(calls) == n_header + 1, "the .gz must be decompressed exactly once"
    cached = mrcio.decompressed_path(info)
    assert cached.stat().st_size == plain.stat().st_size
    assert isinstance(mrcio.memmap(info), np.memmap)


def test_truncated_gzip_is_an_input_error(tmp_path):
    data = np.zeros((64, 64), dtype=np.float32)
    plain = _write(tmp_path / "t.mrc", data)
    raw = plain.read_bytes()[:-5000]
    gz = tmp_path / "t.mrc.gz"
    gz.write_bytes(gzip.compress(raw))
    info = read_header(gz)
    with pytest.raises(InputError, match=r"t\.mrc\.gz: truncated"):
        read_slice(info)


# ---- bad input --------------------------------------------------------------------------------


def test_truncated_mrc_names_file_and_sizes(tmp_path):
    path = _write(tmp_path / "cut.mrc", np.zeros((100, 100), np.float32))
    path.write_bytes(path.read_bytes()[:20000])
    with pytest.raises(InputError) as exc:
        read_header(path)
    msg = str(exc.value)
    assert str(path) in msg and "truncated" in msg and "41024" in msg and "20000" in msg


def test_text_file_named_mrc(tmp_path):
    path = tmp_path / "notes.mrc"
    path.write_text("this is not an image\n" * 80)
    with pytest.raises(InputError, match=r"notes\.mrc: not an MRC file"):
        read_header(path)
    short = tmp_path / "short.mrc"
    short.write_text("tiny")
    with pytest.raises(InputError, match=r"short\.mrc: not a readable MRC file \(shorter than"):
        read_header(short)


def test_empty_folder_missing_file_and_bad_glob(tmp_path):
    with pytest.raises(InputError, match="folder holds no MRC files"):
        list_micrographs(tmp_path)
    with pytest.raises(InputError, match="no such file"):
        read_header(tmp_path / "absent.mrc")
    with pytest.raises(InputError, match="pattern matches no MRC files"):
        list_micrographs(str(tmp_path / "*.mrc"))
    with pytest.raises(InputError, match="is a folder"):
        read_header(tmp_path)


def test_list_micrographs_file_folder_glob_list(tmp_path):
    for name in ("b.mrc", "a.mrcs", "c.mrc.gz", "d.st", "e.map", "f.rec", "g.txt", "h.tif"):
        (tmp_path / name).write_bytes(b"")
    got = [p.name for p in list_micrographs(tmp_path)]
    assert got == ["a.mrcs", "b.mrc", "c.mrc.gz", "d.st", "e.map", "f.rec"]
    assert [p.name for p in list_micrographs(str(tmp_path / "*.mrc*"))] == ["a.mrcs", "b.mrc", "c.mrc.gz"]
    assert [p.name for p in list_micrographs([tmp_path / "d.st", tmp_path / "b.mrc", tmp_path / "b.mrc"])] == [
        "d.st",
        "b.mrc",
    ]
    assert len(MRC_PATTERNS) == 7


# ---- writing ----------------------------------------------------------------------------------


def test_write_mrc_atomic_voxel_size_and_no_overwrite(tmp_path):
    data = np.random.default_rng(2).normal(size=(20, 30)).astype(np.float64)
    path = write_mrc(tmp_path / "o.mrc", data, voxel_size=1.25, labels=["made by a test"])
    info = read_header(path)
    assert info.dtype == "<f4" and info.voxel_size == pytest.approx(1.25)
    assert "made by a test" in info.labels
    np.testing.assert_allclose(read_image(path), data.astype(np.float32))
    with pytest.raises(OutputExistsError):
        write_mrc(path, data)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


def test_write_mrc_slices_streams_a_stack_and_fails_cleanly(tmp_path):
    data = np.random.default_rng(3).normal(size=(5, 16, 12)).astype(np.float32)
    out = write_mrc_slices(tmp_path / "st.mrc", data.shape, iter(data), voxel_size=3.0)
    with mrcfile.open(out) as m:
        np.testing.assert_array_equal(m.data, data)
        assert m.header.ispg == 0 and float(m.voxel_size.x) == pytest.approx(3.0)
        assert float(m.header.dmax) == pytest.approx(float(data.max()))

    def broken():
        yield data[0]
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_mrc_slices(tmp_path / "bad.mrc", data.shape, broken())
    assert not (tmp_path / "bad.mrc").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["st.mrc"]
    with pytest.raises(CryoDDMError, match="got 2 slices for a stack of 5"):
        write_mrc_slices(tmp_path / "few.mrc", data.shape, iter(data[:2]))


# ---- lazy stacks ------------------------------------------------------------------------------


def test_stack_one_chunk_per_image_and_padding(tmp_path):
    rng = np.random.default_rng(4)
    a = rng.normal(10, 1, size=(40, 50)).astype(np.float32)
    b = rng.normal(-5, 1, size=(30, 60)).astype(np.float32)
    c = rng.normal(0, 1, size=(2, 20, 20)).astype(np.float32)
    _write(tmp_path / "a.mrc", a)
    _write(tmp_path / "b.mrc", b)
    _write(tmp_path / "c.mrcs", c, stack=True)
    plain = open_stack(tmp_path, pyramid=False, contrast=False)
    arr, infos = plain.data, [s.info for s in plain.slices]
    assert arr.shape == (4, 40, 60) and arr.dtype == np.float32
    assert arr.chunks == ((1, 1, 1, 1), (40,), (60,))
    assert [i.path.name for i in infos] == ["a.mrc", "b.mrc", "c.mrcs", "c.mrcs"]
    s0, s1 = arr[0].compute(), arr[1].compute()
    # true pixels at the top-left, padding with the slice's own median
    np.testing.assert_array_equal(s0[:, :50], a)
    assert np.all(s0[:, 50:] == pytest.approx(np.median(a), abs=0.05))
    np.testing.assert_array_equal(s1[:30], b)
    assert np.all(s1[30:] == pytest.approx(np.median(b), abs=0.05))
    np.testing.assert_array_equal(arr[3].compute()[:20, :20], c[1])
    stack = open_stack(tmp_path)
    assert stack.names == ["a.mrc", "b.mrc", "000001@c.mrcs", "000002@c.mrcs"]
    assert [s.shape for s in stack.slices] == [(40, 50), (30, 60), (20, 20), (20, 20)]
    meta = stack.metadata()["micrographs"]
    assert meta[1] == {**meta[1], "name": "b.mrc", "shape": [30, 60], "voxel_size": pytest.approx(1.5)}
    assert meta[3]["index"] == 1
    np.testing.assert_array_equal(stackio.read_entry(meta[1]), b)  # the file, not the padding
    np.testing.assert_array_equal(stackio.read_entry(meta[3]), c[1])


def test_volume_opens_alone(tmp_path):
    vol = np.zeros((6, 16, 16), np.float32)
    _write(tmp_path / "v.map", vol)
    _write(tmp_path / "m.mrc", vol[0])
    assert open_stack(tmp_path / "v.map").is_volume
    with pytest.raises(InputError, match="is a 3-D volume; open it on its own"):
        open_stack(tmp_path)


def test_pyramid_levels_are_block_means(tmp_path):
    assert level_shapes((1000, 1000)) == [(1000, 1000)]
    assert level_shapes((4092, 5760)) == [(4092, 5760), (2046, 2880), (1023, 1440), (511, 720)]
    assert level_shapes((8192, 8192))[-1] == (512, 512)
    data = np.random.default_rng(5).normal(size=(2, 2048, 2050)).astype(np.float32)
    _write(tmp_path / "big.mrcs", data, stack=True)
    stack = open_stack(tmp_path / "big.mrcs")
    assert stack.multiscale and [lv.shape for lv in stack.levels] == [(2, 2048, 2050), (2, 1024, 1025), (2, 512, 512)]
    lvl2 = stack.levels[2][1].compute()
    expected = data[1, :2048, :2048].reshape(512, 4, 512, 4).mean(axis=(1, 3))
    np.testing.assert_allclose(lvl2, expected, rtol=1e-5, atol=1e-5)
    assert all(lv.chunks[0] == (1, 1) for lv in stack.levels)


def _files(tmp_path: Path, n: int, shape=(256, 256)) -> Path:
    folder = tmp_path / "mics"
    folder.mkdir()
    rng = np.random.default_rng(6)
    for k in range(n):
        _write(folder / f"mic_{k:03d}.mrc", rng.normal(k, 1, size=shape).astype(np.float32))
    return folder


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_opening_50_micrographs_reads_headers_and_bounded_sample_only(tmp_path, monkeypatch):
    """Count every byte read through read() and every memory map made while opening."""
    from napari_cryoddm._napari.reader import micrograph_layer_data

    folder = _files(tmp_path, 50)
    micrograph_layer_data(folder)  # warm up imports, so only file reads are counted below
    maps: list = []
    real_mmap = mmap.mmap
    monkeypatch.setattr(mmap, "mmap", lambda *a, **k: (maps.append(a), real_mmap(*a, **k))[1])
    renders: list = []
    real_read = stackio.read_slice
    monkeypatch.setattr(stackio, "read_slice", lambda *a, **k: (renders.append(a), real_read(*a, **k))[1])
    probe = _rchar()
    before = _rchar()  # reading /proc/self/io is itself counted: measure that once
    data, kw, kind = micrograph_layer_data(folder)
    read = _rchar() - before - (before - probe)
    headers = 50 * 1024
    sample = stackio.CONTRAST_SLICES * stackio.CONTRAST_ROWS * 256 * 4
    total = sum(p.stat().st_size for p in folder.iterdir())
    assert kind == "image" and data.shape == (50, 256, 256)
    assert maps == [] and renders == [], "opening must not map or read any image"
    assert read <= headers + sample, f"read {read} bytes, budget {headers + sample}"
    assert read < 0.02 * total
    assert kw["contrast_limits"][0] < 1 < kw["contrast_limits"][1]
    # showing one micrograph reads that one only
    np.testing.assert_allclose(data[7].compute().mean(), 7, atol=0.05)
    assert len(renders) == 1 and len(maps) == 1


def test_contrast_sample_is_bounded_for_any_stack(tmp_path):
    folder = _files(tmp_path, 9, shape=(64, 80))
    stack = open_stack(folder, contrast=False)
    lo, hi = contrast_limits(stack.slices)
    assert -3 < lo < 1 and 7 < hi < 12  # slices 0 … 8 have means 0 … 8
    rows = stackio.read_rows(stack.slices[0], 32)
    assert rows.shape == (32, 80)


# ---- real files -------------------------------------------------------------------------------

REAL_FILES = {
    "micrographs/Ucsf_stack_1142_DW.mrc": ((927, 959), "<f4", 1.0, ""),
    "micrographs/epu2.9_example_bin4.mrc": ((1016, 1016), "<f4", 2.666, ""),
    "micrographs/epu2.9_example_bin8.mrc": ((512, 512), "<f4", 5.332, ""),
    "micrographs/epu2.9_example_crop1024_unbinned.mrc": ((1024, 1024), "<u2", 0.6666, ""),
    "micrographs/fei-extended_bin4.mrc": ((959, 927), "<f4", 3.415, ""),
    "micrographs/fei-extended_bin8.mrc": ((479, 463), "<f4", 6.830, ""),
    "micrographs/fei-extended_crop1024_unbinned.mrc": ((1024, 1024), "<u2", 0.8538, ""),
    "full_size/epu2.9_example.mrc": ((4096, 4096), "<u2", 0.6666, "FEI2"),
    "full_size/fei-extended.mrc": ((3838, 3710), "<u2", 0.8538, "FEI1"),
    "particle_stacks/empiar_10076_7.mrc": ((7, 320, 320), "<f4", 0.0, ""),
    "particle_stacks/relion31.mrcs": ((5, 256, 256), "<f4", 1.0, ""),
    "particle_stacks/sample.mrcs": ((17, 200, 200), "<f4", 0.0, ""),
}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_every_real_file_opens_right(real_data):
    found = sorted(
        str(p.relative_to(real_data))
        for sub in ("micrographs", "full_size", "particle_stacks")
        for p in (real_data / sub).iterdir()
    )
    assert found == sorted(REAL_FILES), "a real file is not covered by this test"
    for rel, (shape, dtype, voxel, ext) in REAL_FILES.items():
        path = real_data / rel
        info = read_header(path)
        assert info.shape == shape, rel
        assert info.dtype == dtype, rel
        assert info.voxel_size == pytest.approx(voxel, abs=1e-3), rel
        assert info.exttyp == ext, rel
        stack = open_stack(path)
        n = shape[0] if len(shape) == 3 else 1
        assert stack.shape == (n, *shape[-2:]), rel
        # the lazy slice equals what mrcfile itself reads
        with mrcfile.open(path, permissive=True) as m:
            expected = np.asarray(m.data if m.data.ndim == 2 else m.data[n - 1], dtype=np.float32)
        np.testing.assert_array_equal(stack.data[n - 1].compute(), expected)
    assert open_stack(real_data / "particle_stacks/relion31.mrcs").names[0] == "000001@relion31.mrcs"
    big = open_stack(real_data / "full_size")
    assert big.multiscale and big.shape == (2, 4096, 4096)
    # fei-extended (3838×3710) at level 3: its binned pixels, then its median as padding
    coarse = big.levels[3][1].compute()
    true = big.slices[1].read()
    np.testing.assert_allclose(
        coarse[:479, :463], true[:3832, :3704].reshape(479, 8, 463, 8).mean(axis=(1, 3)), rtol=1e-5
    )
    pad = coarse[480:]
    assert np.ptp(pad) == 0 and pad[0, 0] == pytest.approx(np.median(coarse[:479, :463]), rel=1e-3)
