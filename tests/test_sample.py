"""Sample data with ground truth: the physics (SNR, CTF, envelopes), the files (MRC, STAR, truth,
the cryoSPARC pair), their conventions, reproducibility, speed, and napari's sample menu."""

from __future__ import annotations

import hashlib
import json
import os
import re
import runpy
import time
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
from cryosparc.dataset import Dataset
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from napari_cryoddm.cli import main
from napari_cryoddm.config import ConfigError
from napari_cryoddm.errors import CryoDDMError, InputError, OutputExistsError
from napari_cryoddm.io.star import read_coordinates, read_star_blocks
from napari_cryoddm.jobs import Cancelled, CancelToken, collect
from napari_cryoddm.simulation.physics import (
    Molecule,
    build_molecule,
    ctf,
    electron_wavelength,
    envelope,
    project,
    rotation_from_relion,
)
from napari_cryoddm.simulation.sample import (
    MIN_SEPARATION,
    config_from_truth,
    generate_sample,
    iter_micrographs,
    molecule_for,
    particle_reference,
    read_truth,
    sample_arrays,
)
from napari_cryoddm.simulation.sample_config import SampleConfig
from napari_cryoddm.simulation.sample_files import cs_datasets

REPO = Path(__file__).resolve().parents[1]
# non-square, so a swapped x/y anywhere (STAR, .cs fractions, micrograph_shape) shows
SMALL = SampleConfig(n_micrographs=2, width=448, height=320, particles=4, seed=5)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    return collect(generate_sample(tmp_path_factory.mktemp("sample") / "small", SMALL))


def _remove_ice_band(image: np.ndarray, k_max: float = 3.0) -> np.ndarray:
    """The image without its Fourier modes |k| ≤ k_max cycles per image (DC included)."""
    ny, nx = image.shape
    spec = np.fft.rfft2(image)
    ky = np.fft.fftfreq(ny, 1.0 / ny)[:, None]
    kx = np.fft.rfftfreq(nx, 1.0 / nx)[None, :]
    spec[ky**2 + kx**2 <= k_max**2 + 1e-9] = 0
    return np.fft.irfft2(spec, s=image.shape)


def _ctf_free_from_truth(table: pd.DataFrame, config: SampleConfig, name: str) -> np.ndarray:
    """Rebuild a micrograph's CTF-free projections from the truth file alone."""
    molecule = molecule_for(config)
    out = np.zeros(config.shape)
    for row in table[table.micrograph == name].itertuples():
        out += project(
            molecule,
            rotation_from_relion(row.rot, row.tilt, row.psi),
            config.pixel_size,
            config.shape,
            row.conformation,
            center=(row.x, row.y),
        )
    return out


def _relion_matrix(rot: float, tilt: float, psi: float) -> np.ndarray:
    """RELION's Euler matrix A (Euler_angles2matrix), written out from its definition."""
    a, b, g = np.deg2rad([rot, tilt, psi])
    ca, cb, cg, sa, sb, sg = np.cos(a), np.cos(b), np.cos(g), np.sin(a), np.sin(b), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return np.array(
        [
            [cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
            [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
            [sc, ss, cb],
        ]
    )


def _pyem_expmap(e: np.ndarray) -> np.ndarray:
    """pyem's `geom.expmap`: the Rodrigues matrix of an axis-angle vector, transposed."""
    theta = np.linalg.norm(e)
    if theta < 1e-16:
        return np.eye(3)
    w = e / theta
    k = np.array([[0, -w[2], w[1]], [w[2], 0, -w[0]], [-w[1], w[0], 0]])
    r = np.eye(3) + np.sin(theta) * k + (1 - np.cos(theta)) * k @ k
    return r.T


# ------------------------------------------------------------------------------------------------
# must show: SNR over the particle envelopes


def test_snr_over_envelopes_within_ten_percent_from_the_files(small_set):
    """Envelopes rebuilt from truth.json alone; noise measured as noisy − clean without the ice band."""
    doc, table = read_truth(small_set.out_dir)
    config = config_from_truth(doc)
    assert config == SMALL
    for noisy_path, clean_path in zip(small_set.micrographs, small_set.clean):
        noisy = mrcfile.read(noisy_path).astype(np.float64)
        clean = mrcfile.read(clean_path).astype(np.float64)
        env = envelope(_ctf_free_from_truth(table, config, noisy_path.name))
        assert 0.005 < env.mean() < 0.5
        residual = noisy - clean
        noise = _remove_ice_band(residual)
        snr = np.var(clean[env]) / np.var(noise)
        assert snr == pytest.approx(config.snr, rel=0.10)
        ice = residual - noise
        assert ice.std() == pytest.approx(config.ice * noise.std(), rel=0.05)
        # the ice is smooth: no structure below 1/3 of the image
        assert np.abs(np.diff(ice, axis=1)).max() < 0.05 * config.ice * 20


@pytest.mark.parametrize("snr, pixel_size", [(0.01, 1.5), (0.5, 3.0)])
def test_snr_in_memory_other_regimes(snr, pixel_size):
    """The benchmark's regime (1.5 Å/px, 90 px particles, W = 256, SNR 0.01) and an easy one."""
    cfg = SampleConfig(n_micrographs=1, width=512, height=512, particles=3, snr=snr, pixel_size=pixel_size, seed=11)
    arr = sample_arrays(cfg)
    assert cfg.window == (256 if pixel_size == 1.5 else 128)
    env = envelope(arr.ctf_free[0])
    noise = arr.noisy[0].astype(np.float64) - arr.clean[0] - arr.ice[0]
    assert np.var(arr.clean[0][env], dtype=np.float64) / np.var(noise) == pytest.approx(snr, rel=0.10)
    assert arr.micrographs[0]["snr_envelope"] == pytest.approx(snr, rel=0.05)
    noisy, clean, table = arr  # unpacks as (noisy, clean, table)
    assert noisy.dtype == clean.dtype == np.float32 and len(table) == 3


# ------------------------------------------------------------------------------------------------
# must show: every STAR coordinate sits on its particle


def test_star_coordinates_sit_on_their_clean_particles(small_set):
    """Cross-correlating the clean micrograph with each particle's own clean reference (pose,
    defocus and conformation from the STAR file) peaks at its STAR coordinate."""
    blocks = read_star_blocks(small_set.particles_star)
    optics, particles = blocks["optics"], blocks["particles"]
    assert optics.rlnVoltage[0] == 300 and optics.rlnSphericalAberration[0] == pytest.approx(2.7)
    assert optics.rlnAmplitudeContrast[0] == pytest.approx(0.07)
    assert optics.rlnMicrographPixelSize[0] == pytest.approx(SMALL.pixel_size)
    assert len(particles) == SMALL.n_micrographs * SMALL.particles
    coords = read_coordinates(small_set.particles_star)
    assert set(coords.micrograph) == {p.name for p in small_set.micrographs}
    molecule = molecule_for(SMALL)
    box = SMALL.window
    checked = 0
    for path in small_set.clean:
        clean = mrcfile.read(path).astype(np.float64)
        ny, nx = clean.shape
        assert (ny, nx) == SMALL.shape
        mine = particles[particles.rlnMicrographName == path.name]
        spec = np.fft.rfft2(clean)
        for row in mine.itertuples():
            assert row.rlnDefocusU == row.rlnDefocusV and row.rlnDefocusAngle == 0
            assert row.rlnClassNumber in (1, 2)
            ref = particle_reference(
                molecule,
                rotation_from_relion(row.rlnAngleRot, row.rlnAngleTilt, row.rlnAnglePsi),
                row.rlnDefocusU,
                SMALL,
                box,
                int(row.rlnClassNumber),
            )
            kernel = np.zeros((ny, nx))
            kernel[:box, :box] = ref
            kernel = np.roll(kernel, (-(box // 2), -(box // 2)), axis=(0, 1))  # centre at [0, 0]
            cc = np.fft.irfft2(spec * np.conj(np.fft.rfft2(kernel)), s=(ny, nx))
            py, px = np.unravel_index(np.argmax(cc), cc.shape)
            assert abs(px - row.rlnCoordinateX) <= 1 and abs(py - row.rlnCoordinateY) <= 1, (
                path.name,
                row.rlnCoordinateX,
                row.rlnCoordinateY,
                px,
                py,
            )
            checked += 1
    assert checked == len(particles)


def test_the_right_conformation_matches_better(small_set):
    """In the clean signal every particle correlates better with its own conformation."""
    _, table = read_truth(small_set.truth_json)
    molecule = molecule_for(SMALL)
    box = SMALL.window
    for path in small_set.clean:
        clean = mrcfile.read(path).astype(np.float64)
        for row in table[table.micrograph == path.name].itertuples():
            cut = clean[row.y - box // 2 : row.y + box // 2, row.x - box // 2 : row.x + box // 2]
            rot = rotation_from_relion(row.rot, row.tilt, row.psi)
            scores = []
            for k in (1, 2):
                ref = particle_reference(molecule, rot, row.defocus, SMALL, box, k)
                a, b = cut - cut.mean(), ref - ref.mean()
                scores.append(float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum())))
            assert scores[row.conformation - 1] > scores[2 - row.conformation]
    # alone in its micrograph, a particle is its reference (neighbours' fringes lower the NCC above)
    single = SampleConfig(n_micrographs=1, width=448, height=320, particles=1, seed=5)
    arr = sample_arrays(single)
    row = arr.table.iloc[0]
    cut = arr.clean[0][row.y - box // 2 : row.y + box // 2, row.x - box // 2 : row.x + box // 2].astype(float)
    ref = particle_reference(
        arr.molecule, rotation_from_relion(row.rot, row.tilt, row.psi), row.defocus, single, box, int(row.conformation)
    )
    assert np.corrcoef(cut.ravel(), ref.ravel())[0, 1] > 0.9999


# ------------------------------------------------------------------------------------------------
# must show: the cryoSPARC pair converts back to the STAR coordinates


def test_cs_pair_gives_back_the_star_coordinates_and_poses(small_set):
    """pyem's documented default: X = round(fx·shape[1]), Y = round((1 − fy)·shape[0]),
    shape = micrograph_shape = [ny, nx]; pose → expmap (transposed Rodrigues) = RELION's A."""
    parts = Dataset.load(small_set.particles_cs)
    passthrough = Dataset.load(small_set.passthrough_cs)
    assert np.array_equal(parts["uid"], passthrough["uid"])
    assert len(np.unique(parts["uid"])) == len(parts)
    assert {f for f in passthrough.fields() if f != "uid"} == {
        f for f in parts.fields() if f.startswith(("location/", "ctf/"))
    }
    star = read_star_blocks(small_set.particles_star)["particles"]
    assert len(parts) == len(star)
    shape = passthrough["location/micrograph_shape"]
    assert (shape == np.array([SMALL.height, SMALL.width])).all()
    x = np.round(passthrough["location/center_x_frac"] * shape[:, 1])
    y = np.round((1 - passthrough["location/center_y_frac"]) * shape[:, 0])
    names = [re.sub(r"^\d{21}_", "", Path(str(p)).name) for p in passthrough["location/micrograph_path"]]
    converted = pd.DataFrame({"name": names, "x": x, "y": y})
    truth = pd.DataFrame({"name": star.rlnMicrographName, "x": star.rlnCoordinateX, "y": star.rlnCoordinateY})
    # match each converted particle to the STAR particles of its micrograph
    for (name, cx, cy), pose, cls, df1 in zip(
        converted.itertuples(index=False), parts["alignments3D/pose"], parts["alignments3D/class"], parts["ctf/df1_A"]
    ):
        mine = star[star.rlnMicrographName == name]
        d = np.hypot(mine.rlnCoordinateX - cx, mine.rlnCoordinateY - cy)
        assert d.min() <= 1.0
        row = mine.iloc[int(np.argmin(d))]
        a_cs = _pyem_expmap(pose.astype(np.float64))
        a_star = _relion_matrix(row.rlnAngleRot, row.rlnAngleTilt, row.rlnAnglePsi)
        assert np.abs(a_cs - a_star).max() < 1e-5
        assert cls + 1 == row.rlnClassNumber
        assert df1 == pytest.approx(row.rlnDefocusU, rel=1e-6)
    assert len(converted.merge(truth, on=["name", "x", "y"])) == len(truth)  # exact here
    # cryoSPARC-style names: 21-digit uid prefixes, Extract-job blob paths, one uid per micrograph
    for mic, blob, muid in zip(
        passthrough["location/micrograph_path"], parts["blob/path"], passthrough["location/micrograph_uid"]
    ):
        m = re.fullmatch(r"J1/imported/(\d{21})_(mic_\d{3})\.mrc", str(mic))
        assert m and int(m.group(1)) == int(muid)
        assert str(blob) == f"J2/extract/{m.group(1)}_{m.group(2)}_particles.mrc"
    # pyem assigns 3-D poses only when alignments3D/class_posterior exists
    for f in (
        "alignments3D/class_posterior",
        "alignments3D/split",
        "alignments3D/shift",
        "blob/idx",
        "blob/shape",
        "blob/psize_A",
        "ctf/accel_kv",
        "ctf/cs_mm",
        "ctf/amp_contrast",
        "ctf/df_angle_rad",
        "ctf/phase_shift_rad",
        "ctf/exp_group_id",
        "ctf/bfactor",
    ):
        assert f in parts.fields(), f
    assert (parts["blob/shape"] == SMALL.window).all()
    assert (parts["ctf/accel_kv"] == 300).all() and (parts["ctf/exp_group_id"] == 0).all()


@settings(max_examples=30, deadline=None)
@given(ny=st.integers(64, 12000), nx=st.integers(64, 12000), data=st.data())
def test_cs_fractions_round_trip_on_any_micrograph_shape(ny, nx, data):
    """float32 fractions on K3-sized (and any) micrographs still give back exact integer pixels."""
    n = 12
    xs = data.draw(st.lists(st.integers(0, nx - 1), min_size=n, max_size=n))
    ys = data.draw(st.lists(st.integers(0, ny - 1), min_size=n, max_size=n))
    table = pd.DataFrame(
        {
            "micrograph": ["mic_000.mrc"] * n,
            "index": [0] * n,
            "x": xs,
            "y": ys,
            "rot": np.linspace(-170, 170, n),
            "tilt": np.linspace(1, 179, n),
            "psi": np.linspace(-90, 90, n),
            "defocus": [15000.0] * n,
            "conformation": [1, 2] * (n // 2),
            "subset": [1, 2] * (n // 2),
        }
    )
    config = SampleConfig(n_micrographs=1, width=nx, height=ny)
    parts, passthrough = cs_datasets(table, config)
    shape = passthrough["location/micrograph_shape"]
    assert (np.round(passthrough["location/center_x_frac"] * shape[:, 1]) == xs).all()
    assert (np.round((1 - passthrough["location/center_y_frac"]) * shape[:, 0]) == ys).all()
    for pose, row in zip(parts["alignments3D/pose"], table.itertuples()):
        assert np.abs(_pyem_expmap(pose.astype(float)) - _relion_matrix(row.rot, row.tilt, row.psi)).max() < 1e-5


def test_cs_fields_have_the_types_of_real_cryosparc_files(small_set, real_data):
    """Every field we share with real Extract outputs has the same numpy type and shape."""
    ref = real_data / "cs2star_reference"
    real = {}
    for name in (
        "T20S_J30_extract_particles_from_cryosparc-tools_conftest.cs",
        "T20S_J30_extract_passthrough_from_cryosparc-tools_conftest.cs",
        "cryosparc_P12_J24_001_particles.cs",
    ):
        arr = np.load(ref / name)
        real.update({n: arr.dtype[n] for n in arr.dtype.names})
    ours = np.load(small_set.particles_cs)  # the numpy .cs format pyem reads with np.load
    shared = [n for n in ours.dtype.names if n in real]
    assert len(shared) >= 25
    for n in shared:
        a, b = ours.dtype[n], real[n]
        assert (a.base.kind, a.shape) == (b.base.kind, b.shape), n
        if a.base.kind != "S":
            assert a.base == b.base, n


# ------------------------------------------------------------------------------------------------
# must show: seeds reproduce byte-identical output


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_seed_reproduces_byte_identical_files(small_set, tmp_path):
    again = collect(generate_sample(tmp_path / "again", SMALL))
    first, second = _digests(small_set.out_dir), _digests(again.out_dir)
    assert len(first) == 2 * SMALL.n_micrographs + 5  # + the output marker (.napari-cryoddm.json)
    assert first == second
    other = collect(generate_sample(tmp_path / "other", SampleConfig(**{**SMALL.__dict__, "seed": 6})))
    changed = _digests(other.out_dir)
    assert all(changed[k] != first[k] for k in first if k != ".napari-cryoddm.json")
    # the in-memory set holds exactly the written pixels
    arr = sample_arrays(SMALL)
    for i, path in enumerate(small_set.micrographs):
        assert np.array_equal(mrcfile.read(path), arr.noisy[i])
        assert np.array_equal(mrcfile.read(small_set.clean[i]), arr.clean[i])
    # a micrograph depends only on (seed, index): threads or a longer set change nothing
    longer = SampleConfig(**{**SMALL.__dict__, "n_micrographs": 3})
    serial = list(iter_micrographs(longer, workers=1))
    assert np.array_equal(serial[1].noisy.astype(np.float32), arr.noisy[1])
    threaded = list(iter_micrographs(longer, workers=2))
    assert all(np.array_equal(a.noisy, b.noisy) for a, b in zip(serial, threaded))


def test_files_headers_and_truth(small_set):
    for path in [*small_set.micrographs, *small_set.clean]:
        with mrcfile.open(path) as mrc:
            assert mrc.data.dtype == np.float32 and mrc.data.shape == SMALL.shape
            assert float(mrc.voxel_size.x) == pytest.approx(SMALL.pixel_size)
    doc = json.loads(small_set.truth_json.read_text())
    assert doc["format"] == "napari-cryoddm-sample" and doc["window"] == SMALL.window
    assert [m["name"] for m in doc["micrographs"]] == ["mic_000.mrc", "mic_001.mrc"]
    defoci = [m["defocus_A"] for m in doc["micrographs"]]
    assert all(1.0e4 <= d <= 2.5e4 for d in defoci)
    _, table = read_truth(small_set.truth_json)
    # placed without overlap, away from the edges so every window fits
    for _name, mine in table.groupby("micrograph"):
        xy = mine[["x", "y"]].to_numpy(float)
        dist = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
        assert dist[np.triu_indices(len(xy), 1)].min() >= MIN_SEPARATION * SMALL.diameter_px
        half = SMALL.window // 2
        assert (xy[:, 0] >= half).all() and (xy[:, 0] <= SMALL.width - 1 - half).all()
        assert (xy[:, 1] >= half).all() and (xy[:, 1] <= SMALL.height - 1 - half).all()
    assert sorted(table.conformation.value_counts()) == [4, 4]


# ------------------------------------------------------------------------------------------------
# defaults: room for noise boxes, speed


def _picker_rule_count(xy: np.ndarray, shape: tuple[int, int], diameter: float, box: int, seed: int) -> int:
    """The picker's rule, written out: box-sized candidates on a grid of step box/8 inside the
    micrograph, visited in seeded random order, kept when no particle disc reaches into the box
    and the box overlaps no kept box."""
    ny, nx = shape
    step, half = box // 8, box // 2
    ys, xs = np.meshgrid(np.arange(half, ny - half + 1, step), np.arange(half, nx - half + 1, step), indexing="ij")
    cand = np.column_stack([xs.ravel(), ys.ravel()]).astype(float)
    clear = np.ones(len(cand), dtype=bool)
    for px, py in xy:  # distance from the particle centre to the box's square
        gx = np.maximum(np.abs(cand[:, 0] - px) - half, 0)
        gy = np.maximum(np.abs(cand[:, 1] - py) - half, 0)
        clear &= np.hypot(gx, gy) >= diameter / 2
    kept: list[np.ndarray] = []
    for c in cand[clear][np.random.default_rng(seed).permutation(int(clear.sum()))]:
        if all(abs(c[0] - k[0]) >= box or abs(c[1] - k[1]) >= box for k in kept):
            kept.append(c)
    return len(kept)


def test_defaults_leave_room_for_noise_boxes_and_generate_in_seconds(tmp_path):
    config = SampleConfig()
    assert (config.width, config.height, config.pixel_size) == (1024, 1024, 3.0)
    assert config.diameter_px == 45 and config.window == 128
    t0 = time.perf_counter()
    result = collect(generate_sample(tmp_path / "defaults", config))
    seconds = time.perf_counter() - t0
    assert len(result.micrographs) == 8 and result.n_particles == 8 * config.particles
    assert seconds < 30, f"8 default micrographs took {seconds:.1f} s"
    _, table = read_truth(result.truth_json)
    try:
        from napari_cryoddm.box_placement import auto_boxes_from_particles
    except ImportError:  # pragma: no cover - the picker ships with the package
        auto_boxes_from_particles = None
    for i, (name, mine) in enumerate(table.groupby("micrograph")):
        xy = mine[["x", "y"]].to_numpy(float)
        assert _picker_rule_count(xy, config.shape, config.diameter_px, config.window, seed=i) >= 30
        if auto_boxes_from_particles is not None:
            boxes = auto_boxes_from_particles(config.shape, xy, config.diameter_px, config.window, name=name, seed=0)
            assert len(boxes) >= 30, name


# ------------------------------------------------------------------------------------------------
# physics pieces


def test_molecule_size_asymmetry_and_hinge():
    mol = build_molecule(135.0, 2000, 12.0, seed=0)
    a, b = mol.conformation(1), mol.conformation(2)
    assert a.shape == b.shape == (2000, 3)
    assert mol.domain.sum() == 400
    assert np.linalg.norm(mol.coords, axis=2).max() <= 135.0 / 2
    extent = np.linalg.norm(a[:, None, :] - a[None, :, :], axis=2).max()
    assert 0.85 * 135 <= extent + 2 * mol.sigma <= 135 + 1e-6
    assert np.allclose(np.average(a, axis=0, weights=mol.weights), 0, atol=1e-9)
    # asymmetric: distinct principal moments, and not its own mirror image
    cov = np.cov(a.T, aweights=mol.weights)
    moments = np.sort(np.linalg.eigvalsh(cov))
    assert np.diff(moments).min() > 0.05 * moments.max()
    # B is A with a rigid domain turned by 12° about the hinge; the body does not move
    assert np.array_equal(a[~mol.domain], b[~mol.domain])
    moved = Rotation.align_vectors(b[mol.domain] - mol.hinge_point, a[mol.domain] - mol.hinge_point)[0]
    assert np.rad2deg(moved.magnitude()) == pytest.approx(12.0, abs=1e-6)
    assert np.allclose(moved.as_rotvec() / moved.magnitude(), mol.hinge_axis, atol=1e-6)
    same = build_molecule(135.0, 2000, 0.0, seed=0)
    assert np.array_equal(same.conformation(1), same.conformation(2))
    with pytest.raises(CryoDDMError):
        mol.conformation(3)


def _atoms(*xyz: tuple[float, float, float]) -> Molecule:
    coords = np.array(xyz, dtype=float)
    return Molecule(
        coords=np.stack([coords, coords]),
        weights=np.ones(len(coords)),
        sigma=1.0,
        domain=np.zeros(len(coords), bool),
        hinge_point=np.zeros(3),
        hinge_axis=np.array([0.0, 0.0, 1.0]),
        hinge_angle=0.0,
        diameter=100.0,
    )


def _spot(image: np.ndarray) -> tuple[float, float]:
    """(x, y) centroid of the brightest pixel's neighbourhood."""
    y, x = np.unravel_index(np.argmax(image), image.shape)
    win = image[y - 3 : y + 4, x - 3 : x + 4]
    yy, xx = np.mgrid[y - 3 : y + 4, x - 3 : x + 4]
    return float((win * xx).sum() / win.sum()), float((win * yy).sum() / win.sum())


@pytest.mark.parametrize(
    "angles, atom, expect",
    [
        ((0, 0, 0), (10, 0, 0), (10, 0)),  # identity: x → column, y → row
        ((0, 0, 0), (0, 20, 0), (0, 20)),
        ((90, 0, 0), (10, 0, 0), (0, -10)),  # A = Rz(90)ᵀ: x_img = y, y_img = −x
        ((90, 0, 0), (0, 20, 0), (20, 0)),
        ((0, 90, 0), (0, 0, 30), (-30, 0)),  # A = Ry(90)ᵀ: x_img = −z
        ((0, 0, 90), (10, 0, 0), (0, -10)),  # psi turns in the image plane like rot at tilt 0
        ((30, 40, 50), (12, -7, 21), None),  # general: A·p with RELION's matrix
    ],
)
def test_projection_follows_relions_euler_convention(angles, atom, expect):
    """x_image = A·x_molecule with RELION's A(rot, tilt, psi); centre at (box//2, box//2); Å → px."""
    apix, box = 2.0, 64
    image = project(_atoms(atom), rotation_from_relion(*angles), apix, box)
    if expect is None:
        expect = tuple((_relion_matrix(*angles) @ np.array(atom, float))[:2])
    x, y = _spot(image)
    assert x == pytest.approx(box // 2 + expect[0] / apix, abs=0.02)
    assert y == pytest.approx(box // 2 + expect[1] / apix, abs=0.02)
    assert image.sum() == pytest.approx(1.0, abs=1e-5)  # pixel-integrated Gaussian: mass kept


def test_ctf_formula_and_thon_rings():
    lam = electron_wavelength(300)
    assert lam == pytest.approx(0.019687, rel=1e-4)
    grid = ctf((256, 256), 2.0, 20000.0, amplitude_contrast=0.07)
    assert grid[0, 0] == pytest.approx(-0.07, abs=1e-12)  # dark particles at low frequency
    k1 = 1 / np.sqrt(lam * 20000.0)  # first zero with Q = 0, Cs = 0
    line = ctf((1, 4096), 0.5, 20000.0, cs=0.0, amplitude_contrast=0.0)[0]
    k = np.fft.rfftfreq(4096, 0.5)
    assert abs(np.interp(k1, k, line)) < 1e-3 and line[1] < 0
    assert np.allclose(ctf((64, 64), 2.0, 15000.0, dtype=np.float32), ctf((64, 64), 2.0, 15000.0), atol=1e-4)
    astig = ctf((64, 64), 2.0, 15000.0, 25000.0, defocus_angle=30.0, half=False)
    assert astig.shape == (64, 64) and not np.allclose(astig, astig.T)
    # visible Thon rings: the clean micrograph's rotationally averaged power dips at the CTF zeros
    cfg = SampleConfig(n_micrographs=1, width=512, height=512, particles=6, seed=2)
    sim = next(iter_micrographs(cfg))
    ps = np.abs(np.fft.fftshift(np.fft.fft2(sim.clean))) ** 2
    yy, xx = np.indices(ps.shape)
    r = np.hypot(yy - 256, xx - 256).astype(int)
    radial = np.bincount(r.ravel(), ps.ravel()) / np.bincount(r.ravel())
    kr = np.arange(len(radial)) / (512 * cfg.pixel_size)
    chi = np.pi * lam * sim.defocus * kr**2 - 0.5 * np.pi * cfg.cs * 1e7 * lam**3 * kr**4 + np.arcsin(0.07)
    zeros = [int(np.argmin(np.abs(chi - n * np.pi))) for n in (1, 2, 3)]
    for n, z in enumerate(zeros, start=1):
        peak = int(np.argmin(np.abs(chi - (n + 0.5) * np.pi)))
        assert radial[z] < 0.25 * radial[peak], (n, z, peak)


# ------------------------------------------------------------------------------------------------
# bad input, cancel, CLI


def test_bad_settings_are_named():
    for bad, word in (
        (dict(snr=0), "--snr must be positive"),
        (dict(conformations=3), "--conformations must be 1 or 2"),
        (dict(defocus_min=3.0), "--defocus-min needs"),
        (dict(pixel_size=40.0), "px across"),
        (dict(n_micrographs=0), "--n-micrographs must be at least 1"),
    ):
        with pytest.raises(ConfigError, match=word) as info:
            SampleConfig(**bad)
        assert info.value.field in bad
    with pytest.raises(CryoDDMError, match="could not place 60 particles"):
        next(iter_micrographs(SampleConfig(n_micrographs=1, width=512, height=512, particles=60)))


def test_existing_output_is_kept_and_cancel_leaves_no_output(small_set, tmp_path):
    before = _digests(small_set.out_dir)
    with pytest.raises(OutputExistsError):
        collect(generate_sample(small_set.out_dir, SMALL))
    assert _digests(small_set.out_dir) == before
    cancel = CancelToken()
    job = generate_sample(tmp_path / "stopped", SMALL, cancel=cancel)
    next(job)
    cancel.cancel()
    with pytest.raises(Cancelled):
        collect(job)
    assert not (tmp_path / "stopped").exists()
    assert not (tmp_path / "stopped.partial" / "particles.star").exists()


def test_read_truth_refuses_other_files(tmp_path):
    (tmp_path / "x.json").write_text('{"format": "something else"}')
    with pytest.raises(InputError, match="not a napari-cryoddm sample"):
        read_truth(tmp_path / "x.json")
    with pytest.raises(InputError, match="no such file"):
        read_truth(tmp_path / "missing.json")


def test_cli_writes_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "cli"
    args = [
        "sample",
        str(out),
        "-n",
        "1",
        "--width",
        "256",
        "--height",
        "192",
        "--particles",
        "2",
        "--diameter-A",
        "120",
        "--snr",
        "0.1",
        "--seed",
        "3",
        "-q",
    ]
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "wrote 1 micrograph (256×192 px" in said and "2 particles" in said
    doc, table = read_truth(out)
    assert doc["config"]["diameter"] == 120 and doc["config"]["height"] == 192 and len(table) == 2
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert main(["sample", str(tmp_path / "bad"), "--snr", "-1", "-q"]) == 2
    assert "--snr must be positive" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_figure_script_writes_a_png(tmp_path):
    script = runpy.run_path(str(REPO / "scripts" / "sample_figure.py"), run_name="sample_figure")
    out = tmp_path / "sample.png"
    script["main"](out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 50_000


# ------------------------------------------------------------------------------------------------
# napari sample data


def test_napari_sample_layers(tmp_path, monkeypatch):
    monkeypatch.setenv("CRYODDM_CACHE_DIR", str(tmp_path / "cache"))
    from napari_cryoddm._napari.sample_data import STACK_CONFIG, sample_micrograph, sample_stack

    t0 = time.perf_counter()
    layers = sample_micrograph()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = sample_micrograph()
    cached = time.perf_counter() - t0
    assert first < 5 and cached < 0.5, (first, cached)
    (img, ikw, itype), (cln, ckw, ctype), (pts, pkw, ptype) = layers
    assert (itype, ctype, ptype) == ("image", "image", "points")
    assert img.shape == (1, 1024, 1024) and ckw["visible"] is False
    entries = ikw["metadata"]["cryoddm"]["micrographs"]
    assert entries[0]["name"] == "mic_000.mrc" and entries[0]["shape"] == [1024, 1024]
    assert Path(entries[0]["path"]).is_file() and entries[0]["voxel_size"] == pytest.approx(3.0)
    assert np.array_equal(np.asarray(img[0]), mrcfile.read(entries[0]["path"]))
    meta = pkw["metadata"]["cryoddm"]
    assert meta["kind"] == "particles" and meta["box_size"] == 128 and Path(meta["source"]).is_file()
    _, table = read_truth(ikw["metadata"]["cryoddm"]["sample"]["truth"])
    assert np.array_equal(pts, np.column_stack([np.zeros(len(table)), table.y, table.x]))
    assert list(pkw["features"]["micrograph"]) == list(table.micrograph)
    assert tuple(pkw["scale"]) == tuple(ikw["scale"]) == (1.0, 3.0, 3.0)
    assert np.array_equal(np.asarray(again[0][0]), np.asarray(img))

    stack = sample_stack()
    assert stack[0][0].shape == (STACK_CONFIG.n_micrographs, 1024, 1024)
    assert sorted(set(stack[2][0][:, 0].astype(int))) == list(range(STACK_CONFIG.n_micrographs))
    # the stack's first micrograph is the single sample's micrograph (same seed and index)
    assert np.array_equal(np.asarray(stack[0][0][0]), np.asarray(img[0]))


def test_napari_sample_falls_back_when_the_cache_cannot_be_written(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("CRYODDM_CACHE_DIR", str(blocker))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # the fallback lands in tmp_path
    from napari_cryoddm._napari.sample_data import sample_micrograph

    layers = sample_micrograph()
    path = Path(layers[0][1]["metadata"]["cryoddm"]["micrographs"][0]["path"])
    assert path.is_file() and blocker not in path.parents and tmp_path in path.parents
    assert blocker.read_text().startswith("a file")


@pytest.mark.viewer
def test_open_sample_in_viewer(make_napari_viewer, tmp_path, monkeypatch):
    monkeypatch.setenv("CRYODDM_CACHE_DIR", str(tmp_path / "cache"))
    viewer = make_napari_viewer()
    viewer.open_sample("napari-cryoddm", "micrograph")
    names = [layer.name for layer in viewer.layers]
    assert names == ["CryoDDM sample", "CryoDDM sample clean signal (truth)", "CryoDDM sample particles"]
    points = viewer.layers["CryoDDM sample particles"]
    assert len(points.data) == SampleConfig().particles
    assert list(points.features.columns[:2]) == ["micrograph", "conformation"]
    assert points.metadata["cryoddm"]["kind"] == "particles"
    t0 = time.perf_counter()
    viewer.open_sample("napari-cryoddm", "stack")
    assert time.perf_counter() - t0 < 5
    assert viewer.layers["CryoDDM sample stack"].data.shape[0] == 4
    assert (
        os.environ["CRYODDM_CACHE_DIR"]
        in viewer.layers["CryoDDM sample stack"].metadata["cryoddm"]["micrographs"][0]["path"]
    )
