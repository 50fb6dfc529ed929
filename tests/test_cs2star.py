"""cs2star: pyem's conversion reproduced on real files, back-to-raw mapping, batch jobs, bad input."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
from scipy.spatial.transform import Rotation

from napari_cryoddm.cli import main
from napari_cryoddm.cs2star import Cs2StarConfig, build_tables, convert, convert_job_dirs
from napari_cryoddm.cs2star.job_dirs import find_job_files
from napari_cryoddm.cs2star.rotations import matrix_to_relion_euler, relion_euler_to_matrix, rotvec_to_relion_matrix
from napari_cryoddm.errors import CryoDDMError, InputError, OutputExistsError
from napari_cryoddm.io import cryosparc as cs_io
from napari_cryoddm.io.cryosparc import load_cs
from napari_cryoddm.jobs import Cancelled, CancelToken, collect

T20S_P = "T20S_J30_extract_particles_from_cryosparc-tools_conftest.cs"
T20S_T = "T20S_J30_extract_passthrough_from_cryosparc-tools_conftest.cs"

# (inputs, pyem output, config) for every file pyem converted
REFERENCES = [
    ((T20S_P, T20S_T), "T20S_J30_csparc2star_default.star", {}),
    ((T20S_P, T20S_T), "T20S_J30_csparc2star_noswapxy.star", {"swap_xy": False}),
    ((T20S_T,), "T20S_J30_passthrough_only_csparc2star_default.star", {}),
    (("cryosparc_P12_J24_001_particles.cs",), "cryosparc_P12_J24_001_particles_csparc2star_default.star", {}),
    (("cryosparc_J2_particles_exported.cs",), "cryosparc_J2_particles_exported_csparc2star_default.star", {}),
    (("empiar_10076_7.cs",), "empiar_10076_7_csparc2star_default.star", {}),
]
ANGLES = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
INTEGER = {
    "rlnCoordinateX",
    "rlnCoordinateY",
    "rlnOpticsGroup",
    "rlnClassNumber",
    "rlnRandomSubset",
    "rlnImageSize",
    "rlnImageDimensionality",
}


def _blocks(path: Path) -> dict[str, pd.DataFrame]:
    return starfile.read(path, always_dict=True)


def _assert_same_values(ours: pd.DataFrame, theirs: pd.DataFrame, what: str) -> None:
    """Integers exactly, text exactly, floats within pyem's printed precision (%.6f)."""
    for col in theirs.columns:
        if col in ANGLES:
            continue
        a, b = ours[col].to_numpy(), theirs[col].to_numpy()
        if col in INTEGER:
            np.testing.assert_array_equal(a.astype(np.int64), b.astype(np.int64), err_msg=f"{what} {col}")
        elif b.dtype.kind in "fi":
            np.testing.assert_allclose(
                a.astype(np.float64), b.astype(np.float64), rtol=0, atol=1.01e-6, err_msg=f"{what} {col}"
            )
        else:
            assert list(map(str, a)) == list(map(str, b)), f"{what} {col}"


@pytest.mark.parametrize("inputs,reference,options", REFERENCES, ids=[r[1] for r in REFERENCES])
def test_output_equals_pyem(real_data, tmp_path, inputs, reference, options):
    ref_dir = real_data / "cs2star_reference"
    out = tmp_path / "out.star"
    config = Cs2StarConfig(keep_image_names=True, **options)
    result = collect(convert(ref_dir / inputs[0], [ref_dir / f for f in inputs[1:]], out, config))
    assert result.outputs == [out]
    ours, theirs = _blocks(out), _blocks(ref_dir / reference)
    assert set(ours) == {"optics", "particles"}
    op, tp = ours["particles"], theirs["particles"]
    assert set(op.columns) == set(tp.columns)
    assert len(op) == len(tp) > 0
    # optics: every pyem column, same values (we add rlnOpticsGroupName where pyem had no group)
    oo, to = ours["optics"], theirs["optics"]
    assert set(to.columns) <= set(oo.columns)
    _assert_same_values(oo.set_index("rlnOpticsGroup", drop=False).loc[to["rlnOpticsGroup"]], to, "optics")
    if "rlnImageName" in tp.columns:
        assert op["rlnImageName"].is_unique
        op = op.set_index("rlnImageName", drop=False).loc[tp["rlnImageName"]]
    else:  # passthrough only: no image names; pyem keeps the file's order and so do we
        assert sorted(zip(op.rlnMicrographName, op.rlnCoordinateX, op.rlnCoordinateY)) == sorted(
            zip(tp.rlnMicrographName, tp.rlnCoordinateX, tp.rlnCoordinateY)
        )
    _assert_same_values(op, tp, reference)
    if set(ANGLES) <= set(tp.columns):
        ra = relion_euler_to_matrix(*(op[c].to_numpy() for c in ANGLES))
        rb = relion_euler_to_matrix(*(tp[c].to_numpy() for c in ANGLES))
        assert np.abs(ra - rb).max() < 1e-5
    elif "rlnAnglePsi" in tp.columns:  # 2D classification: psi only
        d = (op["rlnAnglePsi"].to_numpy() - tp["rlnAnglePsi"].to_numpy() + 180) % 360 - 180
        assert np.abs(d).max() < 1e-5


def test_t20s_coordinates_pinned(real_data):
    """PROVENANCE's worked example: fx 0.8913793, fy 0.945 on [7676, 7420] → (6614, 422)."""
    d = real_data / "cs2star_reference"
    t = build_tables(load_cs(d / T20S_P), [load_cs(d / T20S_T)], Cs2StarConfig())
    p = t.particles
    assert ((p.rlnCoordinateX == 6614) & (p.rlnCoordinateY == 422)).sum() == 1
    assert "rlnImageName" not in p.columns  # dropped by default, with a note saying why
    assert any("re-extract" in n for n in t.notes)
    no_invert = build_tables(load_cs(d / T20S_P), [load_cs(d / T20S_T)], Cs2StarConfig(invert_y=False))
    assert (no_invert.particles.rlnCoordinateY == round(0.945 * 7676)).sum() == 1


@pytest.mark.parametrize(
    "name",
    ["cryosparc_P12_J24_001_particles.cs", "cryosparc_J2_particles_exported.cs", "empiar_10076_7.cs", "4k_dataset.cs"],
)
def test_real_cs_files_convert(real_data, tmp_path, name):
    src = real_data / "cryosparc" / name
    n_rows = len(load_cs(src))
    out = tmp_path / "x.star"
    result = collect(convert(src, (), out, Cs2StarConfig()))
    blocks = _blocks(out)
    assert len(blocks["particles"]) == result.n_particles == n_rows
    if n_rows:  # these files carry no location/*: converted without coordinates, and told so
        assert "rlnCoordinateX" not in blocks["particles"].columns
        assert any("location/center_x_frac" in n and "location/micrograph_shape" in n for n in result.notes)
        assert blocks["optics"]["rlnImagePixelSize"].iloc[0] > 0


def test_exported_paths_lose_the_export_prefix(real_data):
    t = build_tables(
        load_cs(real_data / "cryosparc" / "cryosparc_J2_particles_exported.cs"),
        [],
        Cs2StarConfig(keep_image_names=True, strip_uid=True),
    )
    names = t.particles["rlnImageName"]
    assert names.str.match(r"^\d{6}@J1/imported/18jam15b_0345_ali_DW\.mrcs$").all()


# --------------------------------------------------------------------------------------------
# .cs reading


def test_compressed_csdat_reads_like_numpy(real_data, tmp_path):
    from cryosparc.dataset import CSDAT_FORMAT, Dataset

    d = real_data / "cs2star_reference"
    for name in (T20S_P, T20S_T):
        Dataset.load(d / name).save(tmp_path / name, format=CSDAT_FORMAT)
    assert (tmp_path / T20S_P).read_bytes()[:6] == b"\x95CSDAT"
    a = build_tables(load_cs(tmp_path / T20S_P), [load_cs(tmp_path / T20S_T)], Cs2StarConfig())
    b = build_tables(load_cs(d / T20S_P), [load_cs(d / T20S_T)], Cs2StarConfig())
    pd.testing.assert_frame_equal(a.particles, b.particles)


def test_numpy_fallback_without_cryosparc_tools(real_data, tmp_path, monkeypatch):
    from cryosparc.dataset import CSDAT_FORMAT, Dataset

    d = real_data / "cs2star_reference"
    with_tools = build_tables(load_cs(d / T20S_P), [load_cs(d / T20S_T)], Cs2StarConfig())
    monkeypatch.setattr(cs_io, "_load_with_tools", lambda path: None)
    fallback = build_tables(load_cs(d / T20S_P), [load_cs(d / T20S_T)], Cs2StarConfig())
    pd.testing.assert_frame_equal(with_tools.particles, fallback.particles)
    Dataset.load(d / T20S_P).save(tmp_path / "c.cs", format=CSDAT_FORMAT)
    with pytest.raises(InputError, match="CSDAT.*cryosparc-tools"):
        load_cs(tmp_path / "c.cs")


@pytest.mark.parametrize("content", [b"", b"data_particles\nloop_\n_rlnCoordinateX\n1\n", b"\x93NUMPY garbage"])
def test_not_a_cs_file(tmp_path, content):
    f = tmp_path / "thing.cs"
    f.write_bytes(content)
    out = tmp_path / "out.star"
    with pytest.raises(InputError, match="thing.cs"):
        collect(convert(f, (), out))
    assert not out.exists() and list(tmp_path.iterdir()) == [f]


def test_numpy_array_without_uid_is_refused(tmp_path):
    f = tmp_path / "plain.cs"
    with open(f, "wb") as fh:
        np.save(fh, np.zeros(3, dtype=[("x", "f4")]))
    with pytest.raises(InputError, match="no 'uid' field"):
        load_cs(f)


# --------------------------------------------------------------------------------------------
# Synthetic particle sets with known truth


def _save_cs(path: Path, arr: np.ndarray) -> Path:
    with open(path, "wb") as fh:  # np.save on a name would append .npy
        np.save(fh, arr)
    return path


def synthetic(
    tmp_path: Path,
    n: int = 40,
    shape=(3838, 3710),
    bin_factor: float = 1.0,
    seed: int = 0,
    mic_names=("mic_0001", "mic_0002", "mic_0003"),
    uid_prefix: bool = True,
):
    """A refinement's particles.cs + passthrough.cs built from known pixel positions and poses.

    Truth is in the raw frame (x = column, y = row, origin at the first stored pixel); cryoSPARC
    saw micrographs binned by `bin_factor`, with fractions from the bottom-left.
    """
    rng = np.random.default_rng(seed)
    ny, nx = shape
    bny, bnx = int(round(ny / bin_factor)), int(round(nx / bin_factor))
    x = rng.uniform(100, nx - 100, n)
    y = rng.uniform(100, ny - 100, n)
    rot = rng.uniform(-180, 180, n)
    tilt = rng.uniform(1, 179, n)
    psi = rng.uniform(-180, 180, n)
    rmat = relion_euler_to_matrix(rot, tilt, psi)
    rotvec = Rotation.from_matrix(rmat.transpose(0, 2, 1)).as_rotvec()  # RELION matrix = Rᵀ
    uid = rng.integers(1, 2**63, n, dtype=np.uint64)
    mic = rng.integers(0, len(mic_names), n)
    pre = (lambda k: f"{10**20 + 7 * int(k):021d}_") if uid_prefix else (lambda k: "")
    mic_paths = [f"J5/imported/{pre(k)}{mic_names[k]}.mrc" for k in mic]
    stack = [f"J9/extract/{pre(k)}{mic_names[k]}_particles.mrc" for k in mic]
    apix = 1.06 * bin_factor
    particles = np.zeros(
        n,
        dtype=[
            ("uid", "<u8"),
            ("blob/path", "S80"),
            ("blob/idx", "<u4"),
            ("blob/shape", "<u4", (2,)),
            ("blob/psize_A", "<f4"),
            ("ctf/exp_group_id", "<u4"),
            ("ctf/accel_kv", "<f4"),
            ("ctf/cs_mm", "<f4"),
            ("ctf/amp_contrast", "<f4"),
            ("ctf/df1_A", "<f4"),
            ("ctf/df2_A", "<f4"),
            ("ctf/df_angle_rad", "<f4"),
            ("ctf/phase_shift_rad", "<f4"),
            ("ctf/bfactor", "<f4"),
            ("alignments3D/split", "<u4"),
            ("alignments3D/shift", "<f4", (2,)),
            ("alignments3D/pose", "<f4", (3,)),
            ("alignments3D/psize_A", "<f4"),
            ("alignments3D/class_posterior", "<f4"),
            ("alignments3D/class", "<u4"),
        ],
    )
    particles["uid"] = uid
    particles["blob/path"] = [s.encode() for s in stack]
    particles["blob/idx"] = np.arange(n)
    particles["blob/shape"] = 128
    particles["blob/psize_A"] = apix
    particles["ctf/exp_group_id"] = mic % 2
    particles["ctf/accel_kv"] = 300
    particles["ctf/cs_mm"] = 2.7
    particles["ctf/amp_contrast"] = 0.1
    particles["ctf/df1_A"] = rng.uniform(8000, 20000, n)
    particles["ctf/df2_A"] = particles["ctf/df1_A"] - 200
    particles["ctf/df_angle_rad"] = rng.uniform(-np.pi, np.pi, n)
    particles["ctf/phase_shift_rad"] = 0.5
    particles["alignments3D/split"] = np.arange(n) % 2
    particles["alignments3D/shift"] = rng.uniform(-5, 5, (n, 2))
    particles["alignments3D/pose"] = rotvec
    particles["alignments3D/psize_A"] = apix
    particles["alignments3D/class_posterior"] = 1
    particles["alignments3D/class"] = mic % 3
    passthrough = np.zeros(
        n,
        dtype=[
            ("uid", "<u8"),
            ("location/micrograph_path", "S80"),
            ("location/micrograph_shape", "<u4", (2,)),
            ("location/micrograph_psize_A", "<f4"),
            ("location/center_x_frac", "<f4"),
            ("location/center_y_frac", "<f4"),
        ],
    )
    passthrough["uid"] = uid[::-1]  # a different order: the join must use uid
    passthrough["location/micrograph_path"] = [s.encode() for s in mic_paths][::-1]
    passthrough["location/micrograph_shape"] = (bny, bnx)
    passthrough["location/micrograph_psize_A"] = apix
    passthrough["location/center_x_frac"] = (x / bin_factor / bnx)[::-1]
    passthrough["location/center_y_frac"] = (1 - y / bin_factor / bny)[::-1]  # bottom-left origin
    p = _save_cs(tmp_path / "J9_004_particles.cs", particles)
    t = _save_cs(tmp_path / "J9_passthrough_particles.cs", passthrough)
    truth = pd.DataFrame(
        {
            "mic": [mic_names[k] for k in mic],
            "x": x,
            "y": y,
            "rot": rot,
            "tilt": tilt,
            "psi": psi,
            "df1": particles["ctf/df1_A"],
            "class": mic % 3,
            "group": mic % 2,
            "name": [f"{i + 1:06d}@{s}" for i, s in enumerate(stack)],
        }
    )
    truth["shift_A"] = list(particles["alignments3D/shift"].astype(np.float64) * apix)
    return p, t, truth


def _by_name(tables, truth):
    return tables.particles.set_index("rlnImageName").loc[truth["name"]].reset_index()


def test_synthetic_round_trip(tmp_path):
    p, t, truth = synthetic(tmp_path)
    tables = build_tables(load_cs(p), [load_cs(t)], Cs2StarConfig(keep_image_names=True))
    out = _by_name(tables, truth)
    assert np.abs(out.rlnCoordinateX - truth.x).max() <= 0.5 + 1e-6
    assert np.abs(out.rlnCoordinateY - truth.y).max() <= 0.5 + 1e-6
    ra = relion_euler_to_matrix(out.rlnAngleRot, out.rlnAngleTilt, out.rlnAnglePsi)
    rb = relion_euler_to_matrix(truth.rot, truth.tilt, truth.psi)
    assert np.abs(ra - rb).max() < 1e-5
    np.testing.assert_allclose(out.rlnAngleTilt, truth.tilt, atol=1e-3)  # tilt away from 0/180: unique
    shift = np.stack(truth.shift_A.to_numpy())
    np.testing.assert_allclose(out[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(), shift, atol=1e-4)
    np.testing.assert_allclose(out.rlnDefocusU, truth.df1, rtol=1e-6)
    np.testing.assert_allclose(out.rlnPhaseShift, np.rad2deg(0.5), rtol=1e-6)
    np.testing.assert_array_equal(out.rlnClassNumber, truth["class"] + 1)
    np.testing.assert_array_equal(out.rlnOpticsGroup, truth.group + 1)
    assert set(out.rlnRandomSubset) == {1, 2}
    assert sorted(tables.optics.rlnOpticsGroup) == [1, 2]
    assert tables.optics.rlnOpticsGroupName.tolist() == ["opticsGroup1", "opticsGroup2"]
    assert out.rlnMicrographName.str.match(r"^J5/imported/\d{21}_mic_000\d\.mrc$").all()


@pytest.mark.parametrize("how", [{"scale": 2.0}, {"denoised_apix": 2.12, "raw_apix": 1.06}, {"raw_apix": 1.06}])
def test_binned_by_two_back_to_raw(tmp_path, how):
    """cryoSPARC saw ×2-binned micrographs: coordinates come back to the raw frame within 1 px."""
    p, t, truth = synthetic(tmp_path, bin_factor=2.0)
    tables = build_tables(load_cs(p), [load_cs(t)], Cs2StarConfig(keep_image_names=True, **how))
    assert tables.scale == pytest.approx(2.0)
    out = _by_name(tables, truth)
    assert np.abs(out.rlnCoordinateX - truth.x).max() <= 1.0
    assert np.abs(out.rlnCoordinateY - truth.y).max() <= 1.0
    unscaled = _by_name(build_tables(load_cs(p), [load_cs(t)], Cs2StarConfig(keep_image_names=True)), truth)
    assert np.abs(unscaled.rlnCoordinateX - truth.x / 2).max() <= 0.5 + 1e-6
    # origins in Å are physical: the binning does not change them
    np.testing.assert_allclose(out.rlnOriginXAngst, unscaled.rlnOriginXAngst)


def test_raw_apix_sets_the_optics_for_reextraction(tmp_path):
    p, t, truth = synthetic(tmp_path, bin_factor=2.0)
    tables = build_tables(load_cs(p), [load_cs(t)], Cs2StarConfig(raw_apix=1.06))
    assert tables.scale == pytest.approx(2.0)  # from location/micrograph_psize_A
    assert tables.optics.rlnImagePixelSize.tolist() == [1.06, 1.06]
    assert tables.optics.rlnImageSize.tolist() == [256, 256]  # the same 271 Å box at 1.06 Å/px


def test_scale_options_are_checked(tmp_path):
    p, t, _ = synthetic(tmp_path)
    for bad, msg in [
        ({"scale": 2.0, "denoised_apix": 2.0, "raw_apix": 1.0}, "not both"),
        ({"denoised_apix": 2.0}, "needs --raw-apix"),
        ({"scale": -1.0}, "positive"),
    ]:
        with pytest.raises(CryoDDMError, match=msg):
            build_tables(load_cs(p), [load_cs(t)], Cs2StarConfig(**bad))


def _raw_micrographs_star(path: Path, names, defocus) -> Path:
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": ["opticsGroup1", "opticsGroup2"],
            "rlnOpticsGroup": [1, 2],
            "rlnMicrographOriginalPixelSize": [0.53, 0.53],
            "rlnVoltage": [300.0, 300.0],
            "rlnSphericalAberration": [2.7, 2.7],
            "rlnAmplitudeContrast": [0.1, 0.1],
            "rlnMicrographPixelSize": [1.06, 1.06],
        }
    )
    mics = pd.DataFrame(
        {
            "rlnMicrographName": [f"MotionCorr/job002/Movies/{n}.mrc" for n in names],
            "rlnOpticsGroup": [1 + (i % 2) for i in range(len(names))],
            "rlnCtfImage": [f"CtfFind/job004/Movies/{n}.ctf:mrc" for n in names],
            "rlnDefocusU": defocus,
            "rlnDefocusV": [d - 100 for d in defocus],
            "rlnDefocusAngle": [12.5] * len(names),
            "rlnCtfMaxResolution": [3.1] * len(names),
        }
    )
    starfile.write({"optics": optics, "micrographs": mics}, path)
    return path


def test_raw_micrographs_join_by_stem(tmp_path):
    p, t, truth = synthetic(tmp_path, bin_factor=2.0)
    raw = _raw_micrographs_star(tmp_path / "micrographs_ctf.star", ["mic_0001", "mic_0002"], [11000.0, 12000.0])
    tables = build_tables(
        load_cs(p), [load_cs(t)], Cs2StarConfig(scale=2.0, raw_micrographs=raw, keep_image_names=True)
    )
    out = tables.particles
    kept = truth[truth.mic != "mic_0003"]
    assert len(out) == len(kept) and any("mic_0003" in n and "left out" in n for n in tables.notes)
    out = out.set_index("rlnImageName").loc[kept["name"]].reset_index()
    expected = [f"MotionCorr/job002/Movies/{m}.mrc" for m in kept.mic]
    assert out.rlnMicrographName.tolist() == expected
    np.testing.assert_array_equal(out.rlnDefocusU, np.where(kept.mic == "mic_0001", 11000.0, 12000.0))
    assert (out.rlnDefocusAngle == 12.5).all() and "rlnCtfBfactor" not in out.columns
    assert "rlnCtfImage" in out.columns
    np.testing.assert_array_equal(out.rlnOpticsGroup, np.where(kept.mic == "mic_0001", 1, 2))
    assert np.abs(out.rlnCoordinateX - kept.x.to_numpy()).max() <= 1.0
    opt = tables.optics
    assert opt.rlnMicrographPixelSize.tolist() == [1.06, 1.06] and opt.rlnImagePixelSize.tolist() == [1.06, 1.06]
    assert opt.rlnImageSize.tolist() == [256, 256] and opt.rlnImageDimensionality.tolist() == [2, 2]


def test_raw_micrographs_that_match_nothing(tmp_path):
    p, t, _ = synthetic(tmp_path)
    raw = _raw_micrographs_star(tmp_path / "other.star", ["zzz_1", "zzz_2"], [1.0, 2.0])
    with pytest.raises(InputError, match="other.star.*no micrograph matches.*zzz_1"):
        build_tables(load_cs(p), [load_cs(t)], Cs2StarConfig(raw_micrographs=raw))


def test_strip_uid_and_micrograph_folder(tmp_path):
    p, t, truth = synthetic(tmp_path)
    tables = build_tables(
        load_cs(p), [load_cs(t)], Cs2StarConfig(strip_uid=True, micrograph_folder="/data/raw", keep_image_names=True)
    )
    out = _by_name_stripped(tables, truth)
    assert out.rlnMicrographName.tolist() == [f"/data/raw/{m}.mrc" for m in truth.mic]
    assert out.rlnImageName.str.match(r"^\d{6}@J9/extract/mic_000\d_particles\.mrc$").all()


def _by_name_stripped(tables, truth):
    names = truth["name"].str.replace(r"[0-9]{21}_", "", regex=True)
    return tables.particles.set_index("rlnImageName", drop=False).loc[names].reset_index(drop=True)


def test_relion30_single_block(tmp_path):
    p, t, truth = synthetic(tmp_path)
    out = tmp_path / "r30.star"
    collect(convert(p, [t], out, Cs2StarConfig(relion30=True, keep_image_names=True)))
    blocks = _blocks(out)
    assert list(blocks) == ["particles"]
    b = blocks["particles"].set_index("rlnImageName").loc[truth["name"]]
    assert {"rlnOriginX", "rlnOriginY", "rlnMagnification", "rlnDetectorPixelSize", "rlnVoltage"} <= set(b.columns)
    assert not {"rlnOriginXAngst", "rlnOpticsGroup", "rlnImageSize"} & set(b.columns)
    np.testing.assert_allclose(b.rlnOriginX * b.rlnDetectorPixelSize, np.stack(truth.shift_A)[:, 0], atol=1e-4)


def test_legacy_invert_writes_the_original_flip_with_a_warning(tmp_path):
    p, t, truth = synthetic(tmp_path)
    out = tmp_path / "particles.star"
    res = collect(convert(p, [t], out, Cs2StarConfig(legacy_invert=True)))
    inv = tmp_path / "particles_invert.star"
    assert res.outputs == [out, inv]
    assert any("undo" in n for n in res.notes)
    a, b = _blocks(out)["particles"], _blocks(inv)["particles"]
    np.testing.assert_array_equal(b.rlnCoordinateY, 3838 - a.rlnCoordinateY)
    np.testing.assert_array_equal(b.rlnCoordinateX, a.rlnCoordinateX)


def test_rotation_conversions_round_trip():
    rng = np.random.default_rng(3)
    r = Rotation.random(500, random_state=4).as_matrix()
    special = relion_euler_to_matrix(
        np.array([0.0, 30, 0, 10]), np.array([0.0, 0, 180, 180]), np.array([40.0, -20, 15, 0])
    )
    mats = np.concatenate([r, special])
    back = relion_euler_to_matrix(*matrix_to_relion_euler(mats))
    assert np.abs(back - mats).max() < 1e-9
    rot, tilt, psi = matrix_to_relion_euler(mats)
    assert (tilt >= 0).all() and (tilt <= 180).all()
    v = rng.normal(size=(50, 3))
    np.testing.assert_allclose(
        rotvec_to_relion_matrix(v), Rotation.from_rotvec(v).as_matrix().transpose(0, 2, 1), atol=1e-12
    )
    np.testing.assert_allclose(rotvec_to_relion_matrix(np.zeros((1, 3)))[0], np.eye(3))


# --------------------------------------------------------------------------------------------
# Passthrough problems, outputs, cancel


def test_passthrough_with_other_uids(tmp_path):
    p, t, _ = synthetic(tmp_path)
    other = np.load(t)
    other["uid"] = other["uid"] + np.uint64(1)
    bad = _save_cs(tmp_path / "J8_passthrough_particles.cs", other)
    out = tmp_path / "out.star"
    with pytest.raises(InputError, match="J8_passthrough_particles.cs: none of its 40 particle uids"):
        collect(convert(p, [bad], out))
    assert not out.exists()


def test_passthrough_missing_some_particles(tmp_path):
    p, t, truth = synthetic(tmp_path)
    arr = np.load(t)[5:]
    part = _save_cs(tmp_path / "part.cs", arr)
    tables = build_tables(load_cs(p), [load_cs(part)], Cs2StarConfig(keep_image_names=True))
    assert len(tables.particles) == 35
    assert any("5 of 40 particles" in n for n in tables.notes)


def test_existing_output_is_kept(tmp_path):
    p, t, _ = synthetic(tmp_path)
    out = tmp_path / "out.star"
    out.write_text("mine")
    with pytest.raises(OutputExistsError):
        collect(convert(p, [t], out))
    assert out.read_text() == "mine"
    with pytest.raises(InputError, match="not written by cryoddm cs2star"):  # not ours: kept
        collect(convert(p, [t], out, Cs2StarConfig(overwrite=True)))
    assert out.read_text() == "mine"
    out.unlink()
    collect(convert(p, [t], out))
    collect(convert(p, [t], out, Cs2StarConfig(overwrite=True)))  # ours: replaced
    assert len(_blocks(out)["particles"]) == 40


def test_cancel_writes_nothing(tmp_path):
    p, t, _ = synthetic(tmp_path)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        collect(convert(p, [t], tmp_path / "out.star", cancel=token))
    assert not (tmp_path / "out.star").exists()


# --------------------------------------------------------------------------------------------
# cryoSPARC job folders


def _job(project: Path, number: int, iterations=(2, 5), n: int = 40, seed: int = 0) -> Path:
    job = project / f"J{number}"
    job.mkdir(parents=True)
    p, t, _ = synthetic(job, n=n, seed=seed)
    arr = np.load(p)
    for it in iterations:
        _save_cs(job / f"J{number}_{it:03d}_particles.cs", arr[: n - (max(iterations) - it)])
    p.unlink()
    t.rename(job / f"J{number}_passthrough_particles.cs")
    return job


def test_job_dirs_batch(tmp_path):
    project = tmp_path / "CS-proj"
    j10 = _job(project, 10, seed=1)
    _job(project, 11, iterations=(7, 12), n=30, seed=2)
    files = find_job_files(j10)
    assert files.particles.name == "J10_005_particles.cs"
    out = tmp_path / "out"
    results = collect(convert_job_dirs(j10, out, 2, Cs2StarConfig(legacy_invert=True)))
    assert [r.n_particles for r in results] == [40, 30]
    for k in range(2):
        names = sorted(f.name for f in (out / f"class{k}").iterdir())
        assert names == ["cleaned_particles_relion.star", "invert.star", "particles_relion.star"]
    plain = _blocks(out / "class0" / "particles_relion.star")["particles"]
    clean = _blocks(out / "class0" / "cleaned_particles_relion.star")["particles"]
    assert plain.rlnMicrographName.str.contains(r"\d{21}_").all()
    assert not clean.rlnMicrographName.str.contains(r"\d{21}_").any()
    np.testing.assert_array_equal(plain.rlnCoordinateY, clean.rlnCoordinateY)
    assert not (tmp_path / "out.partial").exists()


def test_job_dir_without_particles(tmp_path):
    job = tmp_path / "J7"
    job.mkdir()
    (job / "J7_passthrough_particles.cs").write_bytes(b"")
    with pytest.raises(InputError, match=re.escape(str(job)) + ".*holds no J7_NNN_particles.cs"):
        collect(convert_job_dirs(job, tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="J<number>"):
        collect(convert_job_dirs(tmp_path, tmp_path / "out"))


def test_batch_checks_every_job_before_writing(tmp_path):
    project = tmp_path / "P"
    j3 = _job(project, 3)
    with pytest.raises(InputError, match="J4: no such cryoSPARC job folder"):
        collect(convert_job_dirs(j3, tmp_path / "out", 2))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# --------------------------------------------------------------------------------------------
# Command line


def test_cli_files_and_job_dir(tmp_path, capsys):
    p, t, _ = synthetic(tmp_path)
    out = tmp_path / "cli.star"
    assert main(["cs2star", str(p), str(t), "-o", str(out), "--strip-uid", "--noswapxy"]) == 0
    assert "40 particles on 3 micrographs" in capsys.readouterr().out
    b = _blocks(out)["particles"]
    assert "rlnImageName" not in b.columns and not b.rlnMicrographName.str.contains(r"\d{21}").any()
    assert main(["cs2star", str(p), str(t), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["cs2star", str(tmp_path / "nope.cs"), "-o", str(tmp_path / "x.star")]) == 2
    assert "nope.cs: no such file" in capsys.readouterr().err
    job = _job(tmp_path / "proj", 20)
    assert main(["cs2star", "--job-dir", str(job), "-o", str(tmp_path / "batch")]) == 0
    assert (tmp_path / "batch" / "class0" / "cleaned_particles_relion.star").is_file()
    assert main(["cs2star", "-o", str(tmp_path / "y.star")]) == 2


# --------------------------------------------------------------------------------------------
# The sample data's .cs pair (known truth)


@pytest.fixture(scope="module")
def sample_set(tmp_path_factory):
    from napari_cryoddm.simulation.sample import generate_sample
    from napari_cryoddm.simulation.sample_config import SampleConfig

    out = tmp_path_factory.mktemp("sample") / "sample"
    config = SampleConfig(n_micrographs=2, width=320, height=256, particles=4, pixel_size=3.0)
    return collect(generate_sample(out, config))


def _match_truth(particles: pd.DataFrame, truth: pd.DataFrame, factor: float = 1.0) -> np.ndarray:
    """Distance (px) from each converted particle to the nearest truth particle of its micrograph;
    also checks that no two converted particles claim the same truth particle."""
    stems = particles["rlnMicrographName"].map(lambda s: re.sub(r"^\d{21}_", "", Path(s).stem))
    distances, claimed = [], set()
    for stem, x, y in zip(stems, particles.rlnCoordinateX, particles.rlnCoordinateY):
        mine = truth[truth.micrograph.map(lambda m: Path(m).stem) == stem]
        d = np.hypot(mine.x.to_numpy() * factor - x, mine.y.to_numpy() * factor - y)
        k = int(np.argmin(d))
        claimed.add((stem, k))
        distances.append(d[k])
    assert len(claimed) == len(particles) == len(truth)
    return np.asarray(distances)


def test_sample_pair_back_to_truth(sample_set, tmp_path):
    from napari_cryoddm.simulation.sample import read_truth

    _, truth = read_truth(sample_set.truth_json)
    out = tmp_path / "s.star"
    res = collect(convert(sample_set.particles_cs, [sample_set.passthrough_cs], out, Cs2StarConfig(strip_uid=True)))
    p = _blocks(out)["particles"]
    assert res.n_particles == len(truth) == 8 and res.n_micrographs == 2
    assert p.rlnMicrographName.str.match(r"^J1/imported/mic_00[01]\.mrc$").all()
    assert _match_truth(p, truth).max() <= 1.0
    # poses: the sample's cryoSPARC pose is rotvec(R), RELION's angles R.as_euler("ZYZ")
    for _, row in p.iterrows():
        stem = Path(row.rlnMicrographName).stem
        mine = truth[truth.micrograph.str.startswith(stem)]
        t = mine.iloc[int(np.argmin(np.hypot(mine.x - row.rlnCoordinateX, mine.y - row.rlnCoordinateY)))]
        ra = relion_euler_to_matrix(row.rlnAngleRot, row.rlnAngleTilt, row.rlnAnglePsi)
        rb = relion_euler_to_matrix(t.rot, t.tilt, t.psi)
        assert np.abs(ra - rb).max() < 1e-5
        assert row.rlnClassNumber == t.conformation and row.rlnDefocusU == pytest.approx(t.defocus, rel=1e-6)


def test_sample_pair_binned_by_two(sample_set, tmp_path):
    """cryoSPARC saw the micrographs binned ×2 (half the shape, the same fractions)."""
    from cryosparc.dataset import Dataset

    from napari_cryoddm.simulation.sample import read_truth

    _, truth = read_truth(sample_set.truth_json)
    files = []
    for src in (sample_set.particles_cs, sample_set.passthrough_cs):
        ds = Dataset.load(src)
        ds["location/micrograph_shape"] = ds["location/micrograph_shape"] // 2
        if "blob/psize_A" in ds.fields():
            ds["blob/psize_A"] = ds["blob/psize_A"] * 2
        ds.save(tmp_path / src.name)
        files.append(tmp_path / src.name)
    binned = build_tables(load_cs(files[0]), [load_cs(files[1])], Cs2StarConfig())
    assert _match_truth(binned.particles, truth, factor=0.5).max() <= np.sqrt(0.5) + 1e-6  # rounding per axis
    back = build_tables(load_cs(files[0]), [load_cs(files[1])], Cs2StarConfig(denoised_apix=6.0, raw_apix=3.0))
    assert back.scale == 2.0
    assert _match_truth(back.particles, truth).max() <= 1.0


def test_binning_read_from_the_raw_micrographs_star(tmp_path):
    """No --scale: the raw STAR's rlnMicrographPixelSize against location/micrograph_psize_A."""
    p, t, truth = synthetic(tmp_path, bin_factor=2.0)
    raw = _raw_micrographs_star(tmp_path / "mics.star", ["mic_0001", "mic_0002", "mic_0003"], [1.0, 2.0, 3.0])
    tables = build_tables(load_cs(p), [load_cs(t)], Cs2StarConfig(raw_micrographs=raw, keep_image_names=True))
    assert tables.scale == 2.0 and any("coordinates × 2" in n for n in tables.notes)
    out = _by_name(tables, truth)
    assert np.abs(out.rlnCoordinateX - truth.x).max() <= 1.0
    assert np.abs(out.rlnCoordinateY - truth.y).max() <= 1.0
    forced = build_tables(load_cs(p), [load_cs(t)], Cs2StarConfig(raw_micrographs=raw, scale=1.0))
    assert forced.scale == 1.0


def test_denoised_suffix_maps_back_to_raw_names(tmp_path):
    """Prediction run with --suffix _denoised: the suffix goes, the raw names come back."""
    p, t, truth = synthetic(tmp_path, mic_names=("a_denoised", "b_denoised", "c_denoised"))
    tables = build_tables(
        load_cs(p), [load_cs(t)], Cs2StarConfig(denoised_suffix="_denoised", strip_uid=True, micrograph_folder="Raw")
    )
    assert set(tables.particles.rlnMicrographName) == {"Raw/a.mrc", "Raw/b.mrc", "Raw/c.mrc"}
    raw = _raw_micrographs_star(tmp_path / "m.star", ["a", "b", "c"], [1.0, 2.0, 3.0])
    joined = build_tables(load_cs(p), [load_cs(t)], Cs2StarConfig(raw_micrographs=raw))  # stems + suffix
    assert set(joined.particles.rlnMicrographName) == {f"MotionCorr/job002/Movies/{m}.mrc" for m in "abc"}


def test_multi_class_alignments_take_the_most_probable_class(tmp_path):
    """Heterogeneous refinement outputs: alignments_class_K/*, no alignments3D."""
    rng = np.random.default_rng(5)
    n = 12
    rots = Rotation.random(2 * n, random_state=6).as_rotvec().reshape(2, n, 3)
    post = rng.uniform(0, 1, (2, n))
    dtype = [("uid", "<u8"), ("blob/path", "S20"), ("blob/idx", "<u4"), ("blob/psize_A", "<f4")]
    for k in range(2):
        dtype += [
            (f"alignments_class_{k}/pose", "<f4", (3,)),
            (f"alignments_class_{k}/shift", "<f4", (2,)),
            (f"alignments_class_{k}/psize_A", "<f4"),
            (f"alignments_class_{k}/class_posterior", "<f4"),
            (f"alignments_class_{k}/class", "<u4"),
        ]
    arr = np.zeros(n, dtype=dtype)
    arr["uid"] = np.arange(1, n + 1)
    arr["blob/path"] = b"J3/stack.mrc"
    arr["blob/idx"] = np.arange(n)
    arr["blob/psize_A"] = 1.0
    for k in range(2):
        arr[f"alignments_class_{k}/pose"] = rots[k]
        arr[f"alignments_class_{k}/shift"] = k + 1
        arr[f"alignments_class_{k}/psize_A"] = 1.0
        arr[f"alignments_class_{k}/class_posterior"] = post[k]
        arr[f"alignments_class_{k}/class"] = k
    f = _save_cs(tmp_path / "J3_020_particles.cs", arr)
    tables = build_tables(load_cs(f), [], Cs2StarConfig(keep_image_names=True))
    best = np.argmax(post, axis=0)
    p = tables.particles
    np.testing.assert_array_equal(p.rlnClassNumber, best + 1)
    np.testing.assert_allclose(p.rlnOriginXAngst, best + 1.0)
    want = rotvec_to_relion_matrix(rots[best, np.arange(n)])
    got = relion_euler_to_matrix(p.rlnAngleRot, p.rlnAngleTilt, p.rlnAnglePsi)
    assert np.abs(want - got).max() < 1e-5
    assert any("most probable of 2" in note for note in tables.notes)


def test_filament_tube_ids(tmp_path):
    arr = np.zeros(5, dtype=[("uid", "<u8"), ("filament/filament_uid", "<u8")])
    arr["uid"] = np.arange(1, 6)
    arr["filament/filament_uid"] = [900, 900, 17, 900, 17]
    tables = build_tables(load_cs(_save_cs(tmp_path / "f.cs", arr)), [], Cs2StarConfig())
    assert tables.particles.rlnHelicalTubeID.tolist() == [2, 2, 1, 2, 1]


def test_raw_micrographs_star_without_optics_block(tmp_path):
    """A RELION 3.0 micrographs STAR: optics values in the micrograph rows."""
    p, t, truth = synthetic(tmp_path)
    mics = pd.DataFrame(
        {
            "rlnMicrographName": [f"Raw/mic_000{k}.mrc" for k in (1, 2, 3)],
            "rlnDefocusU": [1e4, 2e4, 3e4],
            "rlnDefocusV": [1e4, 2e4, 3e4],
            "rlnDefocusAngle": [0.0, 0.0, 0.0],
            "rlnVoltage": [200.0] * 3,
            "rlnSphericalAberration": [2.0] * 3,
            "rlnAmplitudeContrast": [0.07] * 3,
        }
    )
    starfile.write(mics, tmp_path / "r30.star")
    tables = build_tables(load_cs(p), [load_cs(t)], Cs2StarConfig(raw_micrographs=tmp_path / "r30.star"))
    assert tables.optics.rlnVoltage.tolist() == [200.0] and tables.optics.rlnOpticsGroup.tolist() == [1]
    assert set(tables.particles.rlnOpticsGroup) == {1}
    assert tables.optics.rlnImagePixelSize.tolist() == [pytest.approx(1.06)]  # the cs value, scale 1
    assert sorted(set(tables.particles.rlnDefocusU)) == [1e4, 2e4, 3e4]


def test_legacy_invert_needs_coordinates(real_data, tmp_path):
    out = tmp_path / "x.star"
    with pytest.raises(CryoDDMError, match="legacy-invert needs particle coordinates"):
        collect(convert(real_data / "cryosparc" / "empiar_10076_7.cs", (), out, Cs2StarConfig(legacy_invert=True)))
    assert list(tmp_path.iterdir()) == []


def test_real_micrograph_is_not_a_cs(real_data, tmp_path):
    mrc = real_data / "micrographs" / "Ucsf_stack_1142_DW.mrc"
    with pytest.raises(InputError, match="Ucsf_stack_1142_DW.mrc: is neither a numpy .cs nor"):
        collect(convert(mrc, (), tmp_path / "x.star"))
    with pytest.raises(InputError, match="is a folder"):
        load_cs(real_data)
