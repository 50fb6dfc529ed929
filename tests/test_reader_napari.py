"""The plugin in a real napari viewer: micrographs + coordinates opened through npe2, attached,
saved; bad input explained. Also the manifest's reader/writer/attach commands import."""

from __future__ import annotations

import gzip
import shutil
import warnings
from pathlib import Path

import mrcfile
import napari
import numpy as np
import pandas as pd
import pytest

from napari_cryoddm._napari.layers import (
    add_boxes_layer,
    current_slice,
    micrograph_layers,
    micrograph_names,
    points_table,
)
from napari_cryoddm._napari.reader import (
    coordinate_layer_data,
    get_coordinate_reader,
    get_micrograph_reader,
    micrograph_layer_data,
)
from napari_cryoddm._napari.widgets.attach import AttachWidget
from napari_cryoddm._napari.writer import points_to_table, write_image, write_points
from napari_cryoddm.errors import CryoDDMError, InputError
from napari_cryoddm.io import stack as stackio
from napari_cryoddm.io.noise import read_noise_txt
from napari_cryoddm.io.star import read_coordinates

PLUGIN = "napari-cryoddm"
VOXEL = 2.5


def _write(path: Path, data: np.ndarray, voxel: float = VOXEL) -> Path:
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.asarray(data, dtype=np.float32))
        m.voxel_size = voxel
    return path


@pytest.fixture
def folder(tmp_path, real_data) -> Path:
    """Three micrographs of different sizes, one gzipped: the real Ucsf micrograph (re-written
    with a known voxel size), a wider one and a smaller one."""
    d = tmp_path / "mics"
    d.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.open(real_data / "micrographs/Ucsf_stack_1142_DW.mrc", permissive=True) as m:
            ucsf = np.array(m.data)
    _write(d / "Ucsf_stack_1142_DW.mrc", ucsf)
    rng = np.random.default_rng(0)
    _write(d / "mic_a.mrc", rng.normal(100, 5, size=(800, 1200)))
    plain = _write(tmp_path / "mic_b.mrc", rng.normal(-3, 1, size=(500, 600)))
    with open(plain, "rb") as src, gzip.open(d / "mic_b.mrc.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    (d / "notes.txt").write_text("not a micrograph")
    return d


@pytest.mark.viewer
def test_open_folder_and_star_attach_save(make_napari_viewer, folder, real_data, tmp_path, monkeypatch):
    viewer = make_napari_viewer()
    star = real_data / "coordinates/Ucsf_stack_1142_DW_autopick.star"
    # coordinates first: nothing to attach to yet, so the leading index is provisional
    (points,) = viewer.open(star, plugin=PLUGIN)
    assert points.metadata["cryoddm"]["attached_to"] is None
    assert points.features["micrograph"].iloc[0] == "Ucsf_stack_1142_DW_autopick"

    renders: list = []
    real_render = stackio._render
    monkeypatch.setattr(
        stackio, "_render", lambda sl, shape, f: (renders.append(sl.name), real_render(sl, shape, f))[1]
    )
    (image,) = viewer.open(folder, plugin=PLUGIN)
    assert image.data.shape == (3, 927, 1200) and image.data.chunksize == (1, 927, 1200)
    assert not image.multiscale
    np.testing.assert_allclose(image.scale, (1, VOXEL, VOXEL))
    assert set(renders) == {"Ucsf_stack_1142_DW.mrc"}, "napari renders the shown slice only"
    assert micrograph_layers(viewer) == [image]
    entries = image.metadata["cryoddm"]["micrographs"]
    assert [e["name"] for e in entries] == ["Ucsf_stack_1142_DW.mrc", "mic_a.mrc", "mic_b.mrc.gz"]
    assert [e["shape"] for e in entries] == [[927, 959], [800, 1200], [500, 600]]
    lo, hi = image.contrast_limits
    assert lo < hi

    widget = AttachWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.points.value = points
    widget.image.value = image
    widget.box_size.value = 64
    result = widget.attach()
    assert result is not None and result.n_points == 45 and result.unmatched == []
    table = read_coordinates(star)
    expected = np.column_stack([np.zeros(45), table["y"], table["x"]])
    np.testing.assert_allclose(points.data, expected)
    np.testing.assert_allclose(points.scale, image.scale)
    assert np.all(points.size == 64) and str(points.symbol[0]) == "square"
    assert set(points.features["micrograph"]) == {"Ucsf_stack_1142_DW.mrc"}
    assert "attached 45 points" in widget.result.value
    # a point and the pixel under it share the same world position
    k = 3
    world_pt = points.data_to_world(points.data[k])
    world_px = image.data_to_world([0, table["y"][k], table["x"][k]])
    np.testing.assert_allclose(world_pt, world_px)
    # the points are drawn on the micrograph they belong to
    viewer.dims.set_point(0, 2 * 1.0)
    assert current_slice(viewer, image) == 2
    viewer.dims.set_point(0, 0)
    assert current_slice(viewer, image) == 0

    # saving: noise text and RELION STAR through the plugin's writer
    out_txt = tmp_path / "boxes_noise.txt"
    napari.save_layers(str(out_txt), [points], plugin=PLUGIN)
    back = read_noise_txt(out_txt)
    assert len(back) == 45 and back["micrograph"].iloc[0] == "Ucsf_stack_1142_DW.mrc"
    assert back[["x", "y"]].iloc[0].tolist() == [round(table["x"][0]), round(table["y"][0])]
    out_star = tmp_path / "boxes.star"
    napari.save_layers(str(out_star), [points], plugin=PLUGIN)
    star_back = read_coordinates(out_star)
    np.testing.assert_allclose(star_back[["x", "y"]], table[["x", "y"]], atol=1e-5)
    # a box drawn by hand on micrograph 1 takes that micrograph's name on export
    points.add([1, 100, 200])
    assert points_table(points, image)["micrograph"].iloc[-1] == "mic_a.mrc"
    write_points(str(out_txt), points.data, points._get_state())
    assert read_noise_txt(out_txt).values.tolist()[-1] == ["mic_a.mrc", 200, 100]

    # re-opening the STAR now attaches at once (one micrograph stack, every name matches)
    (again,) = viewer.open(star, plugin=PLUGIN)
    assert again.metadata["cryoddm"]["attached_to"] == image.name
    np.testing.assert_allclose(again.data, expected)
    np.testing.assert_allclose(again.scale, image.scale)

    # the image writer keeps the voxel size, float32, a stack of the padded display
    out_mrc = tmp_path / "stack.mrc"
    napari.save_layers(str(out_mrc), [image], plugin=PLUGIN)
    with mrcfile.open(out_mrc) as m:
        assert m.data.shape == (3, 927, 1200) and m.data.dtype == np.float32
        assert float(m.voxel_size.x) == pytest.approx(VOXEL)
        np.testing.assert_array_equal(m.data[2, :500, :600], image.data[2, :500, :600].compute())


@pytest.mark.viewer
def test_unmatched_names_are_listed_and_nothing_changes(make_napari_viewer, folder, tmp_path):
    viewer = make_napari_viewer()
    (image,) = viewer.open(folder, plugin=PLUGIN)
    coords = tmp_path / "two_noise.txt"
    coords.write_text("mic_a.mrc 10 20\nmic_a.mrc 30 40\nelsewhere_0001.mrc 5 6\n")
    (points,) = viewer.open(coords, plugin=PLUGIN)  # not every name matches: not auto-attached
    assert points.metadata["cryoddm"]["kind"] == "noise"
    assert points.metadata["cryoddm"]["attached_to"] is None
    widget = AttachWidget(viewer)
    widget.points.value, widget.image.value = points, image
    result = widget.attach()
    assert result.unmatched == ["elsewhere_0001.mrc"] and result.n_unmatched_points == 1
    assert "elsewhere_0001.mrc" in widget.result.value and "1 points on 1 unmatched" in widget.result.value
    np.testing.assert_allclose(points.data, [[1, 20, 10], [1, 40, 30]])

    none_open = tmp_path / "none_noise.txt"
    none_open.write_text("other_1.mrc 1 2\nother_2.mrc 3 4\n")
    (orphan,) = viewer.open(none_open, plugin=PLUGIN)
    before = orphan.data.copy()
    widget.points.value = orphan
    assert widget.attach() is None
    assert "none of the coordinates' micrographs is open" in widget.result.value
    assert "other_1.mrc" in widget.result.value and "Ucsf_stack_1142_DW.mrc" in widget.result.value
    np.testing.assert_array_equal(orphan.data, before)


@pytest.mark.viewer
def test_large_micrographs_open_as_a_pyramid(make_napari_viewer, real_data):
    viewer = make_napari_viewer()
    (layer,) = viewer.open(real_data / "full_size", plugin=PLUGIN)
    assert layer.multiscale
    assert [lv.shape for lv in layer.data] == [(2, 4096, 4096), (2, 2048, 2048), (2, 1024, 1024), (2, 512, 512)]
    np.testing.assert_allclose(layer.scale, (1, 0.66655, 0.66655), rtol=1e-4)
    assert layer.metadata["cryoddm"]["micrographs"][1]["shape"] == [3838, 3710]
    assert layer.metadata["cryoddm"]["micrographs"][0]["exttyp"] == "FEI2"


@pytest.mark.viewer
@pytest.mark.parametrize("case", ["empty folder", "truncated", "text as mrc", "no coordinates"])
def test_bad_input_through_the_viewer(make_napari_viewer, tmp_path, real_data, case):
    viewer = make_napari_viewer()
    if case == "empty folder":
        path = tmp_path / "empty"
        path.mkdir()
        expected = "folder holds no MRC files"
    elif case == "truncated":
        path = _write(tmp_path / "cut.mrc", np.zeros((64, 64)))
        path.write_bytes(path.read_bytes()[:3000])
        expected = "truncated"
    elif case == "text as mrc":
        path = tmp_path / "readme.mrc"
        path.write_text("hello\n" * 300)
        expected = "not an MRC file"
    else:
        path = real_data / "coordinates/empiar_10076_7.star"
        expected = "no coordinate columns"
    with pytest.raises(Exception) as exc:
        viewer.open(path, plugin=PLUGIN)
    chain, e = [], exc.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__
    cause = next((c for c in chain if expected in c), None)
    assert cause is not None, chain
    assert str(path) in cause
    assert len(viewer.layers) == 0


def test_reader_hooks_claim_only_their_files(tmp_path, folder):
    assert get_micrograph_reader(str(folder)) is not None
    assert get_micrograph_reader([str(folder / "mic_a.mrc"), str(folder / "mic_b.mrc.gz")]) is not None
    assert get_micrograph_reader(str(folder / "notes.txt")) is None
    tifs = tmp_path / "tifs"
    tifs.mkdir()
    (tifs / "a.tif").write_bytes(b"")
    assert get_micrograph_reader(str(tifs)) is None  # leave other folders to other readers
    zarr = tmp_path / "x.zarr"
    zarr.mkdir()
    assert get_micrograph_reader(str(zarr)) is None
    assert get_coordinate_reader("a.star") is not None and get_coordinate_reader("a.cbox") is not None
    assert get_coordinate_reader("noise_coordinates.txt") is not None
    assert get_coordinate_reader("readme.txt") is None and get_coordinate_reader(str(folder)) is None


def test_reader_layer_data_without_a_viewer(real_data):
    data, kw, kind = micrograph_layer_data(real_data / "particle_stacks/relion31.mrcs")
    assert kind == "image" and data.shape == (5, 256, 256)
    names = [m["name"] for m in kw["metadata"]["cryoddm"]["micrographs"]]
    assert names[0] == "000001@relion31.mrcs" and kw["scale"] == (1.0, 1.0, 1.0)
    pts, pkw, pkind = coordinate_layer_data(real_data / "coordinates/EMPIAR-10025_particles.star")
    assert pkind == "points" and pts.shape == (1500, 3)
    assert pts[:, 0].max() == 29  # 30 micrographs, provisional order of first appearance
    assert pkw["features"]["micrograph"].nunique() == 30
    assert pkw["symbol"] == "square" and pkw["face_color"] == "transparent"
    cbox = coordinate_layer_data(real_data / "coordinates/TcdA1-0018_frames_sum.cbox")[1]
    assert cbox["size"] == 220 and cbox["metadata"]["cryoddm"]["box_size"] == 220


def test_writers_without_a_viewer(tmp_path):
    data = np.random.default_rng(0).normal(size=(40, 30)).astype(np.float64)
    meta = {"name": "x", "scale": (1.7, 1.7), "metadata": {}, "multiscale": False}
    (out,) = write_image(str(tmp_path / "one.mrc"), data, meta)
    with mrcfile.open(out) as m:
        assert m.data.shape == (40, 30) and m.data.dtype == np.float32
        assert float(m.voxel_size.x) == pytest.approx(1.7)
    with pytest.raises(CryoDDMError, match="no micrograph name"):
        write_points(str(tmp_path / "p.txt"), np.array([[0, 1.0, 2.0]]), {"features": pd.DataFrame()})
    with pytest.raises(CryoDDMError, match=r"saved as \.txt .* or \.star"):
        write_points(
            str(tmp_path / "p.csv"), np.array([[0, 1.0, 2.0]]), {"features": pd.DataFrame({"micrograph": ["a.mrc"]})}
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.mrc"]


def test_manifest_commands_of_this_part_import():
    import importlib

    import npe2

    pm = npe2.PluginManager.instance()
    pm.discover()
    manifest = pm.get_manifest(PLUGIN)
    ours = {"get_micrograph_reader", "get_coordinate_reader", "write_image", "write_points", "attach_widget"}
    checked = 0
    for cmd in manifest.contributions.commands:
        if cmd.id.split(".")[-1] in ours:
            module, attr = cmd.python_name.split(":")
            assert callable(getattr(importlib.import_module(module), attr)), cmd.python_name
            checked += 1
    assert checked == len(ours)


@pytest.mark.viewer
def test_add_boxes_layer_helper(make_napari_viewer, folder):
    viewer = make_napari_viewer()
    (image,) = viewer.open(folder, plugin=PLUGIN)
    layer = add_boxes_layer(viewer, np.array([[2, 10, 20]]), "noise", 128, image_layer=image)
    assert layer.features["micrograph"].tolist() == ["mic_b.mrc.gz"]
    assert layer.metadata["cryoddm"] == {
        "kind": "noise",
        "source": None,
        "box_size": 128,
        "attached_to": image.name,
        "micrograph_names": micrograph_names(image),
    }
    np.testing.assert_allclose(layer.scale, image.scale)
    assert micrograph_names(image)[2] == "mic_b.mrc.gz"
    with pytest.raises(CryoDDMError, match="kind must be one of"):
        add_boxes_layer(viewer, None, "dirt", 10)
    assert isinstance(InputError("x", "y"), CryoDDMError)
    layer.add([0, 5, 5])
    assert layer.features["micrograph"].tolist() == ["mic_b.mrc.gz", ""]
    assert points_table(layer, image)["micrograph"].tolist() == ["mic_b.mrc.gz", "Ucsf_stack_1142_DW.mrc"]
    # the writer names the hand-drawn box from the stored slice names, without the viewer
    table = points_to_table(layer.data, layer._get_state())
    assert table["micrograph"].tolist() == ["mic_b.mrc.gz", "Ucsf_stack_1142_DW.mrc"]


@pytest.mark.viewer
def test_files_opened_as_stack_and_dock_widget_from_manifest(make_napari_viewer, folder):
    viewer = make_napari_viewer()
    # npe2 stacks only files of one extension (a folder mixes them freely)
    files = [str(folder / "mic_a.mrc"), str(folder / "Ucsf_stack_1142_DW.mrc")]
    (layer,) = viewer.open(files, stack=True, plugin=PLUGIN)
    assert layer.data.shape == (2, 927, 1200)
    assert micrograph_names(layer) == ["mic_a.mrc", "Ucsf_stack_1142_DW.mrc"]
    # the smaller micrograph (800 rows) is padded with its own median to the stack's 927 rows
    a = np.asarray(layer.data[0])
    assert np.all(a[800:] == pytest.approx(np.median(a[:800]), abs=0.05))
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Attach coordinates")
    assert isinstance(widget, AttachWidget)
    assert [name for name, _ in widget._image_choices()] == [layer.name]


def test_attach_core_outside_unmatched_and_round_trip():
    from napari_cryoddm.attach import attach_coordinates, detach_points

    table = pd.DataFrame(
        {
            "micrograph": ["Micrographs/a.mrc", "a_autopick", "b.mrc", "zz.mrc", "b.mrc"],
            "x": [10.0, 2000.0, 5.5, 1.0, -3.0],
            "y": [20.0, 30.0, 6.5, 1.0, 4.0],
            "rlnAutopickFigureOfMerit": [0.1, 0.2, 0.3, 0.4, 0.5],
        }
    )
    r = attach_coordinates(table, ["a.mrcs.gz", "b.mrc"], shapes=[[100, 1000], [50, 60]])
    assert r.unmatched == ["zz.mrc"] and r.n_unmatched_points == 1
    np.testing.assert_allclose(r.points, [[0, 20, 10], [0, 30, 2000], [1, 6.5, 5.5], [1, 4, -3]])
    assert r.features["micrograph"].tolist() == ["a.mrcs.gz", "a.mrcs.gz", "b.mrc", "b.mrc"]
    assert r.features["source_micrograph"].tolist()[:2] == ["Micrographs/a.mrc", "a_autopick"]
    assert r.n_outside == 2  # x = 2000 beyond 1000 columns; x = −3
    assert "attached 4 points to 2 micrographs" in r.summary() and "zz.mrc" in r.summary()
    back = detach_points(r.points, r.features)
    assert back.columns.tolist() == ["micrograph", "x", "y", "rlnAutopickFigureOfMerit"]
    np.testing.assert_allclose(back["x"], [10, 2000, 5.5, -3])
    with pytest.raises(CryoDDMError, match="none of the coordinates' micrographs is open"):
        attach_coordinates(table.iloc[3:4], ["a.mrc"])
    with pytest.raises(CryoDDMError, match="no micrographs to attach"):
        attach_coordinates(table, [])


@pytest.mark.viewer
def test_an_empty_boxes_layer_accepts_hand_drawn_points(make_napari_viewer):
    viewer = make_napari_viewer()
    entries = [{"path": f"{n}.mrc", "name": f"{n}.mrc", "shape": [64, 64], "voxel_size": 1.0} for n in ("a", "b")]
    image = viewer.add_image(np.zeros((2, 64, 64), np.float32), metadata={"cryoddm": {"micrographs": entries}})
    layer = add_boxes_layer(viewer, None, "noise", 32, image_layer=image)
    assert layer.features["micrograph"].dtype == object
    layer.add([1, 10, 10])
    assert len(layer.data) == 1 and layer.features["micrograph"].iloc[0] == ""
