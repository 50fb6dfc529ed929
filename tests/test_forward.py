"""The forward process: schedule, chain recurrence, geometry, streaming output, bad input, CLI."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import scipy.ndimage as ndi
import starfile

from napari_cryoddm.cli import main
from napari_cryoddm.errors import CryoDDMError, OutputExistsError
from napari_cryoddm.forward import (
    ForwardConfig,
    chain,
    pair_noise,
    plan_forward,
    preview_chain,
    run_forward,
    schedule_coefficients,
)
from napari_cryoddm.forward_layout import read_manifest
from napari_cryoddm.io.mrc import write_mrc
from napari_cryoddm.io.noise import write_noise_txt
from napari_cryoddm.io.star import read_coordinates, write_coordinates_star
from napari_cryoddm.jobs import Cancelled, CancelToken, collect
from napari_cryoddm.normalise import Normalisation, normalisation_stats

SIGMA = 3.0  # blob width (px) of the synthetic particles


def _blob_micrograph(shape, centres, rng, amp=6.0):
    """Gaussian noise plus Gaussian blobs at (x, y) centres (x = column, y = row)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = rng.normal(0, 1, shape)
    for x, y in centres:
        img += amp * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * SIGMA**2))
    return (1000 + 10 * img).astype(np.float32)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """Two micrographs with blobs at known, non-integer centres; coordinates; noise boxes."""
    d = tmp_path_factory.mktemp("synth")
    rng = np.random.default_rng(1)
    shape = (400, 448)
    mics, rows, noise = [], [], []
    for m in range(2):
        centres = [(100.3 + 60 * i + 7 * m, 110.6 + 45 * (i % 3)) for i in range(5)]
        centres += [(260.0 + 20 * m, 300.2)]
        name = f"mic_{m:03d}.mrc"
        write_mrc(d / name, _blob_micrograph(shape, centres, rng), voxel_size=1.5)
        mics.append(d / name)
        rows += [(f"MotionCorr/job002/{name}", x, y) for x, y in centres]
        noise += [(name, 80, 320), (name, 370, 80), (name, 380, 320)]
    # one particle too close to the edge (skipped and counted)
    rows.append(("mic_000.mrc", 20.0, 20.0))
    star = d / "particles.star"
    write_coordinates_star(star, pd.DataFrame(rows, columns=["micrograph", "x", "y"]))
    noise_txt = d / "noise.txt"
    write_noise_txt(noise_txt, pd.DataFrame(noise, columns=["micrograph", "x", "y"]))
    return {"dir": d, "mics": mics, "star": star, "noise": noise_txt, "shape": shape}


def _run(synth, out, noise=None, **kw):
    kw.setdefault("diameter", 20)
    noise = synth["noise"] if noise is None else noise
    return collect(run_forward(synth["mics"], synth["star"], noise, out, ForwardConfig(**kw)))


# noise boxes (raw frame) that fit a 128-px patch in the 2×-binned 200×224 micrographs
BINNED_NOISE = pd.DataFrame({"micrograph": ["mic_000.mrc", "mic_001.mrc"], "x": [200, 240], "y": [200, 220]})


def _stack(path):
    with mrcfile.open(path, permissive=True) as m:
        return np.array(m.data), m.header, float(m.voxel_size.x)


# ----------------------------------------------------------------------------- schedule


def test_config1_coefficients_match_the_original_table():
    c = schedule_coefficients(0.1288, 5)
    table = {  # the original program's table: α_k, x-coef, noise coef, cumulative x-coef
        "alpha": [0.8712, 0.7424, 0.6136, 0.4848, 0.3560],
        "x_coef": [0.9095, 0.7914, 0.6486, 0.4783, 0.2730],
        "noise_coef": [0.1288, 0.2576, 0.3864, 0.5152, 0.6440],
        "cumulative_x_coef": [0.910, 0.720, 0.467, 0.223, 0.061],
    }
    for key in ("alpha", "x_coef", "noise_coef"):  # to 4 decimals
        np.testing.assert_array_equal(np.round(c[key], 4), table[key], err_msg=key)
    # the table prints the cumulative product to 3 decimals (0.9095 → 0.910)
    np.testing.assert_allclose(c["cumulative_x_coef"], table["cumulative_x_coef"], atol=6e-4)
    c2 = schedule_coefficients(0.1, 6)
    assert np.round(c2["alpha"], 4).tolist() == [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    assert round(float(c2["cumulative_x_coef"][-1]), 3) == 0.065


def test_presets_and_custom_defaults():
    assert ForwardConfig().schedule == (0.1288, 5, 2)
    assert ForwardConfig(preset="config2").schedule == (0.1, 6, 2)
    assert ForwardConfig(preset="custom", beta=0.05, steps=8, start=3).schedule == (0.05, 8, 3)
    assert ForwardConfig(preset="custom", beta=0.1).schedule == (0.1, 5, 2)


@pytest.mark.parametrize(
    "beta, steps, start, words",
    [
        (0.0, 5, 2, "β must be positive"),
        (-0.1, 5, 2, "β must be positive"),
        (0.2, 5, 2, "β·T"),
        (0.25, 4, 2, "β·T"),
        (0.1, 5, 0, "start must be at least 1"),
        (0.1, 5, 5, "smaller than T"),
        (0.1, 5, 7, "smaller than T"),
    ],
)
def test_invalid_schedules_are_refused(beta, steps, start, words):
    with pytest.raises(CryoDDMError, match=words):
        ForwardConfig(preset="custom", beta=beta, steps=steps, start=start)


def test_preset_with_custom_values_is_refused():
    with pytest.raises(CryoDDMError, match="custom preset"):
        ForwardConfig(preset="config1", beta=0.1)


def test_chain_is_the_closed_form_recurrence():
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(8, 8)).astype(np.float32)
    n = rng.normal(size=(5, 8, 8)).astype(np.float32)
    xs = chain(x0, n, 0.1288)
    for k in range(1, 6):
        a = 1 - 0.1288 * k
        # the original's two-line form: residual r, then x_k = √α x + √(1−α) r
        r = (np.sqrt(a) - 1) * xs[k - 1].astype(np.float64) + np.sqrt(1 - a) * n[k - 1]
        want = np.sqrt(a) * xs[k - 1] + np.sqrt(1 - a) * r
        np.testing.assert_allclose(xs[k], want, rtol=1e-5, atol=1e-5)


def test_pairing_follows_the_original():
    rng = np.random.default_rng(3)
    few = pair_noise(5, 12, 4, rng)  # N ≤ M: without replacement, same set re-shuffled each step
    assert all(len(set(few[:, k])) == 5 for k in range(4))
    assert all(set(few[:, k]) == set(few[:, 0]) for k in range(4))
    assert not all((few[:, k] == few[:, 0]).all() for k in range(1, 4))
    many = pair_noise(10, 3, 3, rng)  # N > M: tiled ⌈N/M⌉ times, cut to N, shuffled
    counts = np.bincount(many[:, 0], minlength=3)
    assert sorted(counts.tolist()) == [3, 3, 4] and counts.tolist() == [4, 3, 3]
    for k in range(3):
        assert np.bincount(many[:, k], minlength=3).tolist() == counts.tolist()
    with pytest.raises(CryoDDMError):
        pair_noise(3, 0, 2, rng)


# ----------------------------------------------------------------------------- a full run


def test_run_layout_recurrence_and_manifest(synth, tmp_path):
    out = tmp_path / "fw"
    res = _run(synth, out, jitter=0.1, seed=5)
    assert out.is_dir() and not (tmp_path / "fw.partial").exists()
    m = read_manifest(out)
    n, mm, w = m["counts"]["crops"], m["counts"]["noise"], m["window"]
    assert (n, mm, w) == (12, 6, 128) and res.counts["skipped_outside"] == 1
    assert m["counts"]["s2_pairs"] == 3 * n and m["counts"]["val_pairs"] == n
    for key in (
        "format",
        "version",
        "window",
        "diameter_px",
        "bin_factor",
        "voxel_size",
        "schedule",
        "normalisation",
        "jitter",
        "seed",
        "noisier_member",
        "counts",
        "micrographs",
        "crops",
        "noise",
        "package_version",
        "complete",
    ):
        assert key in m, key
    assert m["format"] == "napari-cryoddm-forward" and m["noisier_member"] == "label"
    assert m["normalisation"] == Normalisation().to_dict()
    assert (m["schedule"]["beta"], m["schedule"]["steps"], m["schedule"]["start"]) == (0.1288, 5, 2)
    assert m["micrographs"][0]["path"] == str(synth["mics"][0].resolve())
    assert m["micrographs"][0]["shape"] == list(synth["shape"])

    s1, h1, vs = _stack(out / "s1/particles.mrcs")
    s3, _, _ = _stack(out / "s3/noise.mrcs")
    s2i, _, _ = _stack(out / "s2/input.mrcs")
    s2l, _, _ = _stack(out / "s2/label.mrcs")
    vi, _, _ = _stack(out / "val/input.mrcs")
    vl, _, _ = _stack(out / "val/label.mrcs")
    assert s1.shape == (n, w, w) and s3.shape == (mm, w, w)
    assert s2i.shape == s2l.shape == (3 * n, w, w) and vi.shape == vl.shape == (n, w, w)
    assert all(a.dtype == np.float32 for a in (s1, s3, s2i, s2l, vi, vl))
    assert vs == pytest.approx(1.5) and int(h1.ispg) == 0
    import io

    for f in (
        "s1/particles.mrcs",
        "s2/input.mrcs",
        "s2/label.mrcs",
        "val/input.mrcs",
        "val/label.mrcs",
        "s3/noise.mrcs",
    ):
        assert mrcfile.validate(out / f, print_file=io.StringIO()), f
    assert float(h1.dmax) == pytest.approx(float(s1.max()), rel=1e-6)
    assert float(h1.dmean) == pytest.approx(float(s1.astype(np.float64).mean()), rel=1e-4, abs=1e-4)

    # every saved pair from pairs.npz, s1 and s3 alone
    p = np.load(out / "pairs.npz")
    assert len(p["crop"]) == 4 * n and p["noise"].shape == (4 * n, 5)
    coef = schedule_coefficients(float(p["beta"]), int(p["steps"]))
    for crop, k, which, idx, noise in zip(p["crop"], p["k"], p["set"], p["index"], p["noise"]):
        x = s1[crop]
        for step in range(1, k + 1):
            prev = x
            x = (
                np.float32(coef["x_coef"][step - 1]) * prev
                + np.float32(coef["noise_coef"][step - 1]) * s3[noise[step - 1]]
            )
        inp, lab = (s2i, s2l) if which == "s2" else (vi, vl)
        np.testing.assert_allclose(inp[idx], prev, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(lab[idx], x, rtol=1e-5, atol=1e-5)
    # the noisier member is the label: its share of x_0 is smaller
    assert np.abs(s2l - s2i).sum() > 0
    # the same crop uses different noise patches at different steps (re-shuffled)
    assert (p["noise"][:, 1:] != p["noise"][:, :1]).any()

    # crops and noise patches are cut where the manifest says, from the normalised micrograph
    from napari_cryoddm.preprocess import read_prepared

    img = read_prepared(synth["mics"][1], 1.0, Normalisation()).image
    c = next(i for i, e in enumerate(m["crops"]) if e["micrograph"] == 1)
    e = m["crops"][c]
    np.testing.assert_array_equal(s1[c], img[e["y"] - 64 : e["y"] + 64, e["x"] - 64 : e["x"] + 64])
    j = next(i for i, e in enumerate(m["noise"]) if e["micrograph"] == 1)
    e = m["noise"][j]
    np.testing.assert_array_equal(s3[j], img[e["y"] - 64 : e["y"] + 64, e["x"] - 64 : e["x"] + 64])


def _assert_centred(stack, atol=1, sigma=SIGMA, reach=16):
    """Cross-correlation of each crop with the blob template peaks at the window centre: the
    maximum within ±reach px of the centre sits on it, and stands far above the background (a
    crop cut at the wrong place has no blob there). Neighbouring particles lie further out."""
    w = stack.shape[-1]
    c = w // 2
    for crop in stack:
        cc = ndi.gaussian_filter(crop.astype(np.float64), sigma)
        near = cc[c - reach : c + reach + 1, c - reach : c + reach + 1]
        py, px = np.unravel_index(np.argmax(near), near.shape)
        assert abs(py - reach) <= atol and abs(px - reach) <= atol, (py - reach, px - reach)
        assert near.max() > np.median(cc) + 6 * cc.std() / 2, "no particle at the centre"


def test_zero_jitter_centres_particles_in_relion_convention(synth, tmp_path):
    out = tmp_path / "fw"
    _run(synth, out, jitter=0.0)
    m = read_manifest(out)
    s1, _, _ = _stack(out / "s1/particles.mrcs")
    _assert_centred(s1)
    truth = read_coordinates(synth["star"])
    for e in m["crops"]:
        assert (e["x"], e["y"]) == (int(np.floor(e["particle_x"] + 0.5)), int(np.floor(e["particle_y"] + 0.5)))
        assert ((truth["x"] - e["particle_x"]).abs() + (truth["y"] - e["particle_y"]).abs()).min() < 1e-6


def test_binning_scales_coordinates_and_keeps_crops_centred(synth, tmp_path):
    out = tmp_path / "fw"
    _run(synth, out, BINNED_NOISE, jitter=0.0, bin=2, window=128, diameter=40)
    m = read_manifest(out)
    assert m["bin_factor"] == 2 and m["voxel_size"] == pytest.approx(3.0)
    assert m["diameter_px"] == pytest.approx(20.0)
    assert m["micrographs"][0]["shape"] == [200, 224]
    s1, _, _ = _stack(out / "s1/particles.mrcs")
    # only particles ≥ 64 binned px from every edge fit: x/2 in [64, 160), y/2 in [64, 136)
    assert len(s1) == m["counts"]["crops"] > 0
    for e in m["crops"]:
        assert abs(e["x"] - e["particle_x"]) <= 0.5 and 64 <= e["x"] <= 160
    _assert_centred(s1, sigma=SIGMA / 2, reach=8)  # blobs of σ = 1.5 px after binning


def test_diameter_in_angstrom_and_target_apix(synth, tmp_path):
    plan = plan_forward(
        synth["mics"], synth["star"], BINNED_NOISE, ForwardConfig(diameter_A=30.0, target_apix=3.0, jitter=0.0)
    )
    assert plan.factor == pytest.approx(2.0) and plan.diameter_px == pytest.approx(10.0)
    assert plan.window == 128 and plan.voxel_size == pytest.approx(3.0)


def test_same_seed_is_byte_identical_and_another_seed_differs(synth, tmp_path):
    import time

    _run(synth, tmp_path / "a", seed=11)
    time.sleep(1.1)  # nothing may depend on the clock (mrcfile stamps labels to the second)
    _run(synth, tmp_path / "b", seed=11)
    _run(synth, tmp_path / "c", seed=12)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 9  # 6 stacks, forward.json, pairs.npz and the output marker
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a/s2/label.mrcs").read_bytes() != (tmp_path / "c/s2/label.mrcs").read_bytes()


def test_more_crops_than_noise_and_limits(synth, tmp_path):
    out = tmp_path / "fw"
    res = _run(synth, out, per_micrograph=4, max_crops=7)
    assert res.counts["crops"] == 7 and res.counts["skipped_limit"] == 12 - 7
    m = read_manifest(out)
    assert [e["micrograph"] for e in m["crops"]] == [0] * 4 + [1] * 3
    p = np.load(out / "pairs.npz")
    assert p["noise"].max() < 6 and set(p["noise"][:, 0]) == set(range(6))


def test_memory_does_not_grow_with_the_number_of_crops(tmp_path):
    """Python-side peak allocation is the same for 32 and 128 crops (stacks go straight to disk;
    the chains run a block of 32 crops at a time)."""
    rng = np.random.default_rng(2)
    mics, rows = [], []
    for m in range(16):
        centres = [(96 + 40 * (i % 5), 96 + 60 * (i // 5)) for i in range(8)]
        write_mrc(tmp_path / f"m{m}.mrc", _blob_micrograph((320, 352), centres, rng))
        mics.append(tmp_path / f"m{m}.mrc")
        rows += [(f"m{m}.mrc", x, y) for x, y in centres]
    table = pd.DataFrame(rows, columns=["micrograph", "x", "y"])
    noise = pd.DataFrame([(f"m{m}.mrc", 270, 250) for m in range(16)], columns=["micrograph", "x", "y"])
    peaks = []
    for n_mics in (4, 16):
        tracemalloc.start()
        collect(
            run_forward(mics[:n_mics], table, noise, tmp_path / f"out{n_mics}", ForwardConfig(diameter=20, jitter=0.0))
        )
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert read_manifest(tmp_path / "out16")["counts"]["crops"] == 128
    # 128 crops' stacks hold 128·(1 + 6 + 2)·64 KB ≈ 75 MB; the run stays at the 32-crop peak
    assert peaks[1] < 1.15 * peaks[0], peaks


def test_cancel_leaves_no_finished_folder(synth, tmp_path):
    cancel = CancelToken()
    job = run_forward(synth["mics"], synth["star"], synth["noise"], tmp_path / "fw", ForwardConfig(diameter=20), cancel)
    with pytest.raises(Cancelled):
        for i, _ in enumerate(job):
            if i == 2:
                cancel.cancel()
    assert not (tmp_path / "fw").exists()
    assert not (tmp_path / "fw.partial" / "forward.json").exists()


def test_preview_chain_matches_the_run_geometry(synth):
    xs, plan = preview_chain(
        synth["mics"], synth["star"], synth["noise"], ForwardConfig(diameter=20, jitter=0.0), crop=3
    )
    assert xs.shape == (6, 128, 128) and xs.dtype == np.float32
    _assert_centred(xs[:1])
    # x_T keeps 6 % of x_0 (cumulative coefficient 0.061) under noise of weight 0.644
    assert np.std(xs[5]) != pytest.approx(np.std(xs[0]), rel=0.05)


# ----------------------------------------------------------------------------- bad input


def _nothing_written(tmp_path):
    assert not any(tmp_path.iterdir()), list(tmp_path.iterdir())


def test_no_particle_matches_any_micrograph(synth, tmp_path):
    star = tmp_path.parent / f"{tmp_path.name}_other.star"
    write_coordinates_star(
        star,
        pd.DataFrame({"micrograph": ["grid3_0001.mrc", "grid3_0002.mrc"], "x": [100.0, 120.0], "y": [100.0, 130.0]}),
    )
    with pytest.raises(CryoDDMError) as err:
        collect(run_forward(synth["mics"], star, synth["noise"], tmp_path / "fw", ForwardConfig(diameter=20)))
    msg = str(err.value)
    assert "grid3_0001.mrc" in msg and "mic_000.mrc" in msg and "particle" in msg
    _nothing_written(tmp_path)


def test_no_noise_boxes(synth, tmp_path):
    empty = tmp_path.parent / f"{tmp_path.name}_empty_noise.txt"
    empty.write_text("\n")
    with pytest.raises(CryoDDMError, match="holds no noise boxes"):
        collect(run_forward(synth["mics"], synth["star"], empty, tmp_path / "fw", ForwardConfig(diameter=20)))
    edge = pd.DataFrame({"micrograph": ["mic_000.mrc"], "x": [10], "y": [10]})
    with pytest.raises(CryoDDMError, match="fits a 128×128 patch"):
        collect(run_forward(synth["mics"], synth["star"], edge, tmp_path / "fw", ForwardConfig(diameter=20)))
    _nothing_written(tmp_path)


def test_window_larger_than_a_micrograph(synth, tmp_path):
    with pytest.raises(CryoDDMError, match=r"mic_000.mrc: the window W = 512 px is larger"):
        collect(
            run_forward(
                synth["mics"], synth["star"], synth["noise"], tmp_path / "fw", ForwardConfig(diameter=20, window=512)
            )
        )
    with pytest.raises(CryoDDMError, match="multiple of 32"):
        ForwardConfig(diameter=20, window=200)
    _nothing_written(tmp_path)


def test_existing_finished_output_is_refused_unless_overwrite(synth, tmp_path):
    out = tmp_path / "fw"
    _run(synth, out, seed=1)
    before = (out / "s2/label.mrcs").read_bytes()
    with pytest.raises(OutputExistsError, match="finished forward dataset"):
        _run(synth, out, seed=2)
    assert (out / "s2/label.mrcs").read_bytes() == before
    _run(synth, out, seed=2, overwrite=True)
    assert (out / "s2/label.mrcs").read_bytes() != before and read_manifest(out)["seed"] == 2
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("keep me")
    with pytest.raises(CryoDDMError, match="not written by napari-cryoddm forward"):
        _run(synth, other, overwrite=True)
    assert (other / "thesis.tex").read_text() == "keep me"


def test_large_particle_at_default_jitter_warns(synth, tmp_path):
    with pytest.warns(UserWarning, match="jitter"):
        _run(synth, tmp_path / "fw", diameter=80, window=128)  # 80 > 0.6·128
    assert read_manifest(tmp_path / "fw")["warnings"]
    import warnings

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _run(synth, tmp_path / "fw2", diameter=76, window=128)  # 76 < 0.6·128 = 76.8
        _run(synth, tmp_path / "fw3", diameter=100, window=128, jitter=0.0)  # fits without jitter
    assert not [w for w in rec if "jitter" in str(w.message)]
    assert not read_manifest(tmp_path / "fw2")["warnings"]


# ----------------------------------------------------------------------------- normalisation


def test_robust_scale_ignores_hot_pixels_where_minmax_does_not(real_data):
    with mrcfile.open(real_data / "micrographs/fei-extended_crop1024_unbinned.mrc", permissive=True) as m:
        raw = np.array(m.data, dtype=np.float32)
    med = ndi.median_filter(raw, size=3)
    hot = raw > med + 8 * np.std(raw - med)
    assert 0 < hot.sum() < 200
    clean = np.where(hot, med, raw)
    robust = [normalisation_stats(a, Normalisation()) for a in (raw, clean)]
    minmax = [normalisation_stats(a, Normalisation("minmax")) for a in (raw, clean)]
    assert robust[0][3] == pytest.approx(robust[1][3], rel=0.02)
    assert robust[0][2] == pytest.approx(robust[1][2], rel=0.02)
    assert abs(minmax[0][3] / minmax[1][3] - 1) > 0.2


# ----------------------------------------------------------------------------- real data

UCSF_NOISE = [
    (144, 112),
    (112, 368),
    (432, 432),
    (800, 432),
    (240, 528),
    (720, 560),
    (176, 688),
    (848, 688),
    (432, 720),
    (352, 816),
]


@pytest.mark.parametrize("boxes", ["picker", "hand-placed"])
def test_real_micrograph_with_autopicks_and_noise_boxes(real_data, tmp_path, boxes):
    mic = real_data / "micrographs/Ucsf_stack_1142_DW.mrc"
    star = real_data / "coordinates/Ucsf_stack_1142_DW_autopick.star"
    picks = read_coordinates(star)
    d, w = 24, 128
    if boxes == "picker":  # the team's automatic noise picker: boxes clear of every pick
        from napari_cryoddm.box_placement import auto_boxes_from_particles

        xy = auto_boxes_from_particles((927, 959), picks[["x", "y"]].to_numpy(), d, w, max_boxes=12)
        assert len(xy) >= 4
        boxes_xy = [tuple(map(int, b)) for b in xy]
    else:
        boxes_xy = UCSF_NOISE
    # the noise boxes hold no pick (with a particle radius of margin)
    for x, y in boxes_xy:
        assert not ((abs(picks["x"] - x) < w / 2 + d / 2) & (abs(picks["y"] - y) < w / 2 + d / 2)).any()
    UCSF = boxes_xy
    noise = tmp_path / "noise.txt"
    write_noise_txt(
        noise, pd.DataFrame([("Ucsf_stack_1142_DW.mrc", x, y) for x, y in UCSF], columns=["micrograph", "x", "y"])
    )
    out = tmp_path / "fw"
    rc = main(
        [
            "forward",
            str(mic),
            "--particles",
            str(star),
            "--noise",
            str(noise),
            "--diameter",
            str(d),
            "--jitter",
            "0",
            "--per-micrograph",
            "50",
            "-o",
            str(out),
        ]
    )
    assert rc == 0
    m = read_manifest(out)
    inside = (
        (picks.x.round() >= 64)
        & (picks.x.round() + 64 <= 959)
        & (picks.y.round() >= 64)
        & (picks.y.round() + 64 <= 927)
    )
    assert m["counts"]["crops"] == int(inside.sum()) and m["counts"]["skipped_outside"] == int((~inside).sum())
    assert m["counts"]["noise"] == len(UCSF) and m["micrographs"][0]["shape"] == [927, 959]
    raw = mrcfile.read(mic)
    s1, _, _ = _stack(out / "s1/particles.mrcs")
    for crop, e in zip(s1, m["crops"]):
        # the crop is the raw array at rows y−64…, cols x−64… (x = column), normalised
        ref = raw[e["y"] - 64 : e["y"] + 64, e["x"] - 64 : e["x"] + 64]
        assert np.corrcoef(crop.ravel(), ref.ravel())[0, 1] > 0.99
    # robust normalisation brings this low-contrast, offset micrograph to unit scale
    s3, _, _ = _stack(out / "s3/noise.mrcs")
    # boxes on the contamination blob (the picker only knows the picks) are flagged, not hidden
    med = float(np.median(raw))
    blob = ndi.gaussian_filter(raw.astype(np.float64), 4) < med - 3 * 1.4826 * np.median(np.abs(raw - med))
    on_blob = [
        i for i, e in enumerate(m["noise"]) if blob[e["y"] - 64 : e["y"] + 64, e["x"] - 64 : e["x"] + 64].mean() > 0.5
    ]
    assert m["noise_suspect"] == on_blob and m["counts"]["noise_suspect"] == len(on_blob)
    clean = np.delete(s3, on_blob, axis=0)
    assert abs(float(np.median(clean))) < 0.5 and 0.5 < float(clean.std()) < 2
    if boxes == "hand-placed":
        assert on_blob == []
    vl, _, _ = _stack(out / "val/label.mrcs")
    assert np.isfinite(vl).all() and vl.shape == (m["counts"]["crops"], 128, 128)


# ----------------------------------------------------------------------------- CLI


def test_cli_bad_input_exits_2_and_writes_nothing(synth, tmp_path, capsys):
    args = [
        *map(str, synth["mics"]),
        "--particles",
        str(synth["star"]),
        "--noise",
        str(synth["noise"]),
        "--diameter",
        "20",
        "-o",
        str(tmp_path / "fw"),
    ]
    assert main(["forward", *args, "--beta", "0.3", "--steps", "4"]) == 2
    assert "β·T" in capsys.readouterr().err
    assert main(["forward", *args, "--preset", "config2", "--beta", "0.1"]) == 2
    assert "--preset config2 fixes the schedule" in capsys.readouterr().err
    assert main(["forward", *args, "--window", "100"]) == 2
    assert main(["forward", *args, "--dry-run", "--diameter", "80", "--window", "128"]) == 0
    said = capsys.readouterr().out
    assert "would write 12 crops from 2 of 2 micrographs (1 leave the image" in said
    assert "6 noise patches, W = 128 px" in said and "warning: the particle (d = 80 px)" in said
    _nothing_written(tmp_path)
    assert main(["forward", *args, "--preset", "config2", "--normalise", "minmax"]) == 0
    m = read_manifest(tmp_path / "fw")
    assert m["schedule"]["steps"] == 6 and m["normalisation"]["method"] == "minmax"
    s1, _, _ = _stack(tmp_path / "fw/s1/particles.mrcs")
    assert s1.min() >= 0 and s1.max() <= 1
    assert main(["forward", *args]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["forward", *args, "--beta", "0.05", "--steps", "8", "--start", "3", "--overwrite"]) == 0
    m = read_manifest(tmp_path / "fw")
    assert (m["schedule"]["beta"], m["schedule"]["steps"], m["schedule"]["start"]) == (0.05, 8, 3)
    assert m["counts"]["s2_pairs"] == 5 * m["counts"]["crops"]


def test_sample_data_crops_are_centred_on_the_true_particles(tmp_path):
    """The team's simulated sample: with jitter 0 the cross-correlation of each noisy crop with the
    clean signal cut at the true particle position peaks at zero shift."""
    sample = pytest.importorskip("napari_cryoddm.simulation.sample")
    from napari_cryoddm.box_placement import auto_boxes_from_particles

    cfg = sample.SampleConfig(n_micrographs=2, width=512, height=448, particles=5, snr=1.0, seed=3)
    s = collect(sample.generate_sample(tmp_path / "sample", cfg))
    _, truth = sample.read_truth(s.truth_json)
    d = cfg.diameter_px
    noise = []
    for p in s.micrographs:
        mine = truth[truth["micrograph"].map(lambda n: Path(str(n)).name) == p.name]
        xy = auto_boxes_from_particles(cfg.shape, mine[["x", "y"]].to_numpy(), d, cfg.window, max_boxes=4)
        noise += [(p.name, int(x), int(y)) for x, y in xy]
    noise = pd.DataFrame(noise, columns=["micrograph", "x", "y"])
    out = tmp_path / "fw"
    collect(
        run_forward(s.micrographs, s.particles_star, noise, out, ForwardConfig(diameter_A=cfg.diameter, jitter=0.0))
    )
    m = read_manifest(out)
    w = m["window"]
    assert w == cfg.window and m["counts"]["crops"] > 0
    s1, _, _ = _stack(out / "s1/particles.mrcs")
    for crop, e in zip(s1, m["crops"]):
        name = m["micrographs"][e["micrograph"]]["name"]
        mine = truth[truth["micrograph"].map(lambda n: Path(str(n)).name) == name]
        j = int(np.argmin(np.hypot(mine["x"] - e["particle_x"], mine["y"] - e["particle_y"])))
        tx, ty = int(np.floor(mine["x"].iloc[j] + 0.5)), int(np.floor(mine["y"].iloc[j] + 0.5))
        assert (tx, ty) == (e["x"], e["y"])
        clean = mrcfile.read(s.clean[[p.name for p in s.micrographs].index(name)])
        ref = clean[ty - w // 2 : ty + w // 2, tx - w // 2 : tx + w // 2].astype(np.float64)
        a, b = crop - crop.mean(), ref - ref.mean()
        cc = np.fft.ifft2(np.fft.fft2(a) * np.conj(np.fft.fft2(b))).real
        shift = np.unravel_index(np.argmax(cc), cc.shape)
        assert shift == (0, 0), (name, e, shift)


def test_micrographs_with_the_same_stem_are_refused(synth, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "mic_000.mrc").write_bytes(synth["mics"][0].read_bytes())
    with pytest.raises(CryoDDMError, match="share a name stem"):
        plan_forward([*synth["mics"], other / "mic_000.mrc"], synth["star"], synth["noise"], ForwardConfig(diameter=20))


def test_fractional_binning_keeps_crops_centred(synth, tmp_path):
    out = tmp_path / "fw"
    _run(synth, out, BINNED_NOISE.assign(x=[180, 200], y=[170, 190]), jitter=0.0, bin=1.6, window=128, diameter=32)
    m = read_manifest(out)
    assert m["bin_factor"] == 1.6 and m["micrographs"][0]["shape"] == [250, 280]
    for e in m["crops"]:
        assert (e["x"], e["y"]) == (int(np.floor(e["particle_x"] + 0.5)), int(np.floor(e["particle_y"] + 0.5)))
    s1, _, _ = _stack(out / "s1/particles.mrcs")
    assert len(s1) > 0
    _assert_centred(s1, sigma=SIGMA / 1.6, reach=10)


def test_gzipped_micrographs_give_the_same_dataset(synth, tmp_path):
    import gzip

    gz = []
    for p in synth["mics"]:
        q = tmp_path / "gz" / (p.name + ".gz")
        q.parent.mkdir(exist_ok=True)
        q.write_bytes(gzip.compress(p.read_bytes()))
        gz.append(q)
    collect(run_forward(gz, synth["star"], synth["noise"], tmp_path / "a", ForwardConfig(diameter=20)))
    _run(synth, tmp_path / "b")
    for f in ("s1/particles.mrcs", "s2/label.mrcs", "s3/noise.mrcs", "pairs.npz"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert read_manifest(tmp_path / "a")["micrographs"][0]["name"] == "mic_000.mrc.gz"


def test_a_folder_of_per_micrograph_star_files(synth, tmp_path):
    """RELION autopick writes one `<micrograph>_autopick.star` per micrograph, without names."""
    table = read_coordinates(synth["star"])
    folder = tmp_path / "autopick"
    for name, grp in table.groupby(table["micrograph"].map(lambda n: Path(n).name)):
        stem = Path(name).stem
        folder.mkdir(exist_ok=True)
        starfile.write(
            {"": pd.DataFrame({"rlnCoordinateX": grp.x, "rlnCoordinateY": grp.y})}, folder / f"{stem}_autopick.star"
        )
    plan = plan_forward(synth["mics"], folder, synth["noise"], ForwardConfig(diameter=20))
    assert plan.counts["crops"] == 12 and plan.counts["unmatched_particles"] == 0
    with pytest.raises(CryoDDMError, match="holds no particle coordinate files"):
        plan_forward(synth["mics"], tmp_path, synth["noise"], ForwardConfig(diameter=20))
