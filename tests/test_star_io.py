"""STAR coordinates: every real dialect into one table, RELION 3.1 out, clear errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import starfile

from napari_cryoddm.errors import InputError, OutputExistsError
from napari_cryoddm.io.star import read_coordinates, read_star_blocks, write_coordinates_star, write_particles_star

# file: (rows, distinct micrographs, first micrograph, first x, first y)
DIALECTS = {
    "Ucsf_stack_1142_DW_autopick.star": (45, 1, "Ucsf_stack_1142_DW_autopick", 839.125024, 19.979167),
    "EMPIAR-10025_particles.star": (1500, 30, "14sep05c_c_00003gr_00014sq_00004hl_00004es_c.mrc", 6924.0, 2481.0),
    "FinalRefinement-OriginalParticles-PfCRT.star": (
        5,
        3,
        "Patch2_micrographs/18jun08i_b1g1_00001gr_00021sq_v02_00003hln_00002enn-b-DW.mrc",
        323.0,
        3210.0,
    ),
    "falcon_2012_06_12-14_33_35_0_applepick.star": (504, 1, "falcon_2012_06_12-14_33_35_0_applepick", 2063.0, 151.0),
    "relion31.star": (
        5,
        1,
        "Micrographs/18aug10a_MC2_FoilHole_10984848_Data_10985376_10985377_20180810_2123-144102_DW.mrc",
        3277.0,
        983.0,
    ),
    "relion31.v2.star": (
        5,
        1,
        "Micrographs/18aug10a_MC2_FoilHole_10984848_Data_10985376_10985377_20180810_2123-144102_DW.mrc",
        3277.0,
        983.0,
    ),
    "relion31.6opticsgroups.star": (139, 139, "MotionCorr/job002/Micrographs/0003.mrc", 2417.658855, 1078.795983),
    "relion5.star": (
        17,
        2,
        "MotionCorr/job003/Movies/GridSquare_347700/Data/FoilHole_353510_Data_342200_1_20250401_174947_EER.mrc",
        1736.0,
        228.0,
    ),
    "sample_particles_relion31.star": (17, 1, "micrograph.mrc", 2158.111921, 3073.912046),
    "sta_testing_bin8.star": (219, 39, "ay19102021_L3_position6_21.mrc", 1722.254, 3483.084),
}


@pytest.mark.parametrize("name", sorted(DIALECTS))
def test_real_dialects(real_data, name):
    rows, n_mics, first, x0, y0 = DIALECTS[name]
    table = read_coordinates(real_data / "coordinates" / name)
    assert list(table.columns[:3]) == ["micrograph", "x", "y"]
    assert len(table) == rows and table["micrograph"].nunique() == n_mics
    assert table["micrograph"].iloc[0] == first
    assert table["x"].iloc[0] == pytest.approx(x0) and table["y"].iloc[0] == pytest.approx(y0)
    assert table["x"].dtype == np.float64
    assert "rlnCoordinateX" not in table.columns and "rlnMicrographName" not in table.columns


def test_optics_block_order_does_not_matter(real_data):
    a = read_coordinates(real_data / "coordinates/relion31.star")
    b = read_coordinates(real_data / "coordinates/relion31.v2.star")
    pd.testing.assert_frame_equal(a, b)
    blocks = read_star_blocks(real_data / "coordinates/relion31.star")
    assert set(blocks) == {"optics", "particles"}


def test_other_columns_kept(real_data):
    t = read_coordinates(real_data / "coordinates/Ucsf_stack_1142_DW_autopick.star")
    assert t["rlnAutopickFigureOfMerit"].iloc[0] == pytest.approx(0.624705)
    assert set(t.columns) == {"micrograph", "x", "y", "rlnAutopickFigureOfMerit", "rlnClassNumber", "rlnAnglePsi"}


@pytest.mark.parametrize(
    "name, n", [("TcdA1-0018_frames_sum.cbox", 120), ("TcdA1-0019_frames_sum.cbox", 129), ("ActLifeact_03211.cbox", 16)]
)
def test_cbox_corner_becomes_centre(real_data, name, n):
    path = real_data / "coordinates" / name
    raw = starfile.read(path, always_dict=True)
    block = next(b for b in raw.values() if isinstance(b, pd.DataFrame) and "CoordinateX" in b.columns)
    t = read_coordinates(path)
    assert len(t) == n and t["micrograph"].iloc[0] == path.stem
    np.testing.assert_allclose(t["x"], block["CoordinateX"] + block["Width"] / 2)
    np.testing.assert_allclose(t["y"], block["CoordinateY"] + block["Height"] / 2)


def test_star_without_coordinates_is_explained(real_data):
    path = real_data / "coordinates/empiar_10076_7.star"
    with pytest.raises(InputError) as exc:
        read_coordinates(path)
    msg = str(exc.value)
    assert str(path) in msg and "no coordinate columns" in msg and "particle images" in msg


def test_bad_star_inputs(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_coordinates(tmp_path / "absent.star")
    only_x = tmp_path / "onlyx.star"
    only_x.write_text("data_\n\nloop_\n_rlnCoordinateX #1\n_rlnMicrographName #2\n10 a.mrc\n")
    with pytest.raises(InputError, match=r"onlyx\.star: no coordinate columns"):
        read_coordinates(only_x)
    nan = tmp_path / "nan.star"
    nan.write_text("data_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n10 20\nabc 3\n")
    with pytest.raises(InputError, match=r"nan\.star: 1 rows have non-numeric coordinates \(first: row 2\)"):
        read_coordinates(nan)
    binary = tmp_path / "bin.star"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(InputError, match=r"bin\.star"):
        read_coordinates(binary)


def test_write_coordinates_round_trip_relion31(tmp_path):
    table = pd.DataFrame(
        {
            "micrograph": ["a.mrc", "a.mrc", "b/c.mrc"],
            "x": [1.5, 200.25, 3.0],
            "y": [4.0, 5.5, 600.125],
            "rlnAutopickFigureOfMerit": [0.1, 0.2, 0.3],
            "not_relion": [1, 2, 3],
        }
    )
    out = write_coordinates_star(tmp_path / "c.star", table)
    back = read_coordinates(out)
    assert back["micrograph"].tolist() == ["a.mrc", "a.mrc", "b/c.mrc"]
    np.testing.assert_allclose(back["x"], table["x"])
    np.testing.assert_allclose(back["y"], table["y"])
    np.testing.assert_allclose(back["rlnAutopickFigureOfMerit"], table["rlnAutopickFigureOfMerit"])
    assert "not_relion" not in back.columns
    text = out.read_text()
    assert "data_particles" in text and "_rlnCoordinateX" in text
    with pytest.raises(OutputExistsError):
        write_coordinates_star(out, table)


def test_write_particles_with_optics(tmp_path):
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [1.1]})
    parts = pd.DataFrame(
        {"rlnMicrographName": ["m.mrc"], "rlnCoordinateX": [1.0], "rlnCoordinateY": [2.0], "rlnOpticsGroup": [1]}
    )
    out = write_particles_star(tmp_path / "p.star", parts, optics)
    blocks = read_star_blocks(out)
    assert list(blocks) == ["optics", "particles"]
    assert read_coordinates(out)[["x", "y"]].to_numpy().tolist() == [[1.0, 2.0]]
