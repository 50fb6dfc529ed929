"""The quality harness kept honest: known answers on images whose truth is built here."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_cryoddm.errors import CryoDDMError
from napari_cryoddm.simulation import quality as q

N = 256


def _clean(seed: int = 0, n: int = N) -> np.ndarray:
    """Particle-like blobs: fine texture under a smooth envelope, zero elsewhere (like projections)."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((n, n))
    for y, x in rng.integers(30, n - 30, size=(12, 2)):
        centres[y, x] = 1.0
    env = ndimage.gaussian_filter(centres, 10)
    env = (env > 0.2 * env.max()).astype(float)
    return ndimage.gaussian_filter(rng.normal(size=(n, n)), 1.0) * ndimage.gaussian_filter(env, 2) * 10


def _ice(seed: int, n: int = N) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ice = q.ice_component(rng.normal(size=(n, n)))
    return ice / ice.std()


def _raw(clean: np.ndarray, snr: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sigma = clean.std() / np.sqrt(snr)
    return clean + 0.3 * sigma * _ice(seed + 100, clean.shape[0]) + rng.normal(size=clean.shape) * sigma


def test_clean_signal_scores_perfectly():
    c = _clean()
    s = q.score(c, c)
    assert s.r == pytest.approx(1.0, abs=1e-9)
    assert s.r_plain == pytest.approx(1.0, abs=1e-9)
    for band in q.BANDS:
        assert s.frc[band] == pytest.approx(1.0, abs=1e-9)
        assert s.transfer[band] == pytest.approx(1.0, abs=1e-9)


def test_scale_offset_and_ice_do_not_matter_for_r_but_do_for_the_plain_fit():
    c = _clean()
    ice = _ice(5)
    d = -2.5 * c + 7.0 + 6 * c.std() * ice  # inverted contrast, offset, strong ice
    f, a = q.ice_fit(d, c)
    assert a == pytest.approx(-0.4, rel=1e-6)
    assert q.correlation(d, c) == pytest.approx(1.0, abs=1e-9)
    np.testing.assert_allclose(f, c, atol=1e-9)
    assert q.plain_correlation(d, c) < 0.5  # the ice dominates a plain fit
    s = q.score(d, c)
    assert s.transfer["high"] == pytest.approx(1.0, abs=1e-9)


def test_ice_projection_is_exactly_the_low_modes():
    rng = np.random.default_rng(3)
    img = rng.normal(size=(64, 80))
    low = q.ice_component(img)
    spec = np.fft.fft2(low)
    ky = np.fft.fftfreq(64, 1 / 64)[:, None]
    kx = np.fft.fftfreq(80, 1 / 80)[None, :]
    outside = ky**2 + kx**2 > 9
    assert np.abs(spec[outside]).max() < 1e-9
    np.testing.assert_allclose(q.ice_component(low), low, atol=1e-12)  # a projection
    assert abs(q.remove_ice(img).mean()) < 1e-12  # DC is in the band


def test_raw_scores_below_the_denoisers_that_work():
    c = _clean()
    raw = _raw(c, snr=0.05)
    r_raw = q.score(raw, c)
    for name in ("gaussian σ=1.5 px", "wiener (radial)"):
        s = q.score(q.PEERS[name](raw), c)
        assert s.r > r_raw.r + 0.1, (name, s.r, r_raw.r)
    assert r_raw.r < 0.4


def test_over_smoothing_shows_in_signal_transfer_not_in_frc():
    c = _clean()
    blurred = q.gaussian_lowpass(c, 3.0)
    s = q.score(blurred, c)
    assert s.transfer["high"] < 0.5
    assert s.transfer["high"] < 0.05  # σ = 3 px kills 0.15–0.25 cycles/px
    # FRC is blind to a linear blur: without noise it stays ≈ 1 in every band
    assert s.frc["mid"] > 0.99 and s.frc["low"] > 0.99
    s15 = q.score(q.gaussian_lowpass(c, 1.5), c)
    assert 0.1 < s15.transfer["high"] < 0.4  # 0.23 expected for this blur
    # noisy raw data keeps the signal at the low-band gain in every band
    cs = [_clean(seed) for seed in range(4)]
    raws = [_raw(ci, snr=0.5, seed=seed) for seed, ci in enumerate(cs)]
    s_raw = q.score(raws, cs)
    assert 0.85 < s_raw.transfer["high"] < 1.15
    s_g3 = q.score([q.gaussian_lowpass(r, 3.0) for r in raws], cs)
    assert s_g3.transfer["high"] < 0.5


def test_frc_falls_with_noise_and_bands_are_fractions_of_nyquist():
    c = _clean()
    s = q.score(_raw(c, snr=0.05), c)
    assert s.frc["low"] > s.frc["high"]
    rings = s.rings
    assert rings is not None
    # 1-px rings: ring r holds |k| ≈ r cycles per image; Nyquist is ring N/2
    assert rings.q[N // 2] == pytest.approx(1.0)
    high = np.flatnonzero(rings.band_rings("high"))
    assert high.min() == int(np.ceil(0.3 * N / 2)) and high.max() == int(np.ceil(0.5 * N / 2)) - 1
    low = np.flatnonzero(rings.band_rings("low"))
    assert low.min() == 4  # the ice rings (|k| ≤ 3) are left out


def test_ring_sums_pool_only_equal_shapes():
    a = q.ring_sums(np.ones((64, 64)), np.ones((64, 64)))
    b = q.ring_sums(np.ones((96, 96)), np.ones((96, 96)))
    with pytest.raises(CryoDDMError):
        _ = a + b
    with pytest.raises(CryoDDMError):
        q.score([np.ones((8, 8))], [])
    with pytest.raises(CryoDDMError):
        q.ice_fit(np.ones((8, 8)), np.ones((8, 9)))


def test_wiener_keeps_signal_and_removes_white_noise():
    rng = np.random.default_rng(7)
    noise = rng.normal(size=(N, N))
    assert q.wiener_lowpass(noise).std() < 0.2 * noise.std()
    c = _clean()
    raw = _raw(c, snr=0.5)
    assert q.correlation(q.wiener_lowpass(raw), c) > q.correlation(raw, c) + 0.15


def test_radial_power_of_white_noise_is_flat():
    rng = np.random.default_rng(8)
    f, p = q.radial_power(rng.normal(size=(N, N)), taper=0)
    assert f[0] == 0 and f[-1] <= 1.0
    mid = p[(f > 0.2) & (f < 0.9)]
    assert mid.mean() == pytest.approx(1.0, rel=0.05)
    assert mid.std() / mid.mean() < 0.2


def _two_templates(box: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    base = ndimage.gaussian_filter(rng.normal(size=(box, box)), 1.5)
    yy, xx = np.mgrid[:box, :box] - box // 2
    disk = (yy**2 + xx**2 < (box / 3) ** 2).astype(float)
    a = base * disk
    moved = ndimage.rotate(base, 6, reshape=False, order=1) * disk
    b = a.copy()
    b[box // 2 :, :] = moved[box // 2 :, :] * disk[box // 2 :, :]
    return a, b


def test_conformation_calls_and_paired_accuracy():
    box = 48
    ref_a, ref_b = _two_templates(box)
    rng = np.random.default_rng(12)
    n_side = 8
    img = np.zeros((n_side * box + box, n_side * box + box))
    centres, truth = [], []
    for i in range(n_side):
        for j in range(n_side):
            y, x = box // 2 + box // 2 + i * box, box // 2 + box // 2 + j * box
            conf = int(rng.integers(0, 2))
            img[y - box // 2 : y + box // 2, x - box // 2 : x + box // 2] += ref_b if conf else ref_a
            centres.append((y, x))
            truth.append(conf)
    truth = np.array(truth)
    refs = [(ref_a, ref_b)] * len(centres)
    calls = q.conformation_calls(img, centres, refs, box)
    np.testing.assert_array_equal(calls, truth)  # clean: every call right
    noisy = img + rng.normal(size=img.shape) * 6 * img.std()
    calls_noisy = q.conformation_calls(noisy, centres, refs, box)
    acc_noisy = float((calls_noisy == truth).mean())
    assert 0.3 < acc_noisy < 1.0  # near chance once drowned
    # a box leaving the image is not scored
    assert q.conformation_calls(img, [(2, 2)], refs[:1], box)[0] == -1
    res = q.paired_accuracy(calls == truth, calls_noisy == truth)
    assert res.n == len(truth) and res.acc == 1.0 and res.acc_raw == pytest.approx(acc_noisy)
    assert res.diff == pytest.approx(1.0 - acc_noisy)
    d = (calls == truth).astype(float) - (calls_noisy == truth)
    assert res.se_diff == pytest.approx(d.std(ddof=1) / np.sqrt(d.size))


def test_paired_accuracy_hand_numbers():
    res = q.paired_accuracy(np.array([1, 1, 0, 1]), np.array([1, 0, 0, 1]))
    assert res.acc == 0.75 and res.acc_raw == 0.5 and res.diff == 0.25
    assert res.se == pytest.approx(np.std([1, 1, 0, 1], ddof=1) / 2)
    with pytest.raises(CryoDDMError):
        q.paired_accuracy(np.array([1, 0]), np.array([1]))


def test_box_and_table_helpers():
    assert q.box_size_for(90) == 136
    img = np.arange(100.0).reshape(10, 10)
    box = q.cut_box(img, 5, 5, 4)
    assert box is not None and box[2, 2] == img[5, 5]
    assert q.cut_box(img, 1, 5, 4) is None
    table = q.markdown_table({"raw": {"r": 0.14, "frc_low": float("nan")}}, columns=("r", "frc_low"))
    assert table.splitlines()[2] == "| raw | 0.140 | – |"


def test_conformation_evidence_on_sample_particles():
    """The clean signal calls every sample particle right; the raw data at SNR 0.01 / 6° less so."""
    sample = pytest.importorskip("napari_cryoddm.simulation.sample")
    cfg = sample.SampleConfig(
        n_micrographs=2, width=512, height=512, pixel_size=3.0, particles=6, snr=0.01, hinge_angle=6.0, seed=3
    )
    arr = sample.sample_arrays(cfg)
    box = q.box_size_for(cfg.diameter_px)
    refs = q.sample_references(arr.table, arr.molecule, cfg, box)
    clean = list(arr.clean)
    right_clean = q.conformation_correct(clean, clean, arr.table, refs, box)
    assert (right_clean == 1).all()
    right_raw = q.conformation_correct(list(arr.noisy), clean, arr.table, refs, box)
    acc = q.conformation_accuracy(right_clean, right_raw)
    assert acc.n == len(arr.table) and acc.acc == 1.0
    assert set(arr.table["conformation"]) == {1, 2}  # both conformations, so "all right" means something
    assert 0.5 <= acc.acc_raw <= 1.0
