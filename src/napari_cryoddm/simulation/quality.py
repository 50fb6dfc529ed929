"""Denoising quality against a known clean signal (the quality metrics of docs/quality.md).

Every number here follows those definitions exactly, so figures from the demo, the benchmark
harness and the research screens compare:

* **r** — least-squares fit F = a·D + b + s(x, y), s spanning the Fourier modes with |k| ≤ 3 cycles
  per image (the "ice band": the truth omits the ice, a denoiser rightly keeps it); r = Pearson(F, C).
  `r_plain` (the plain a·D + b fit) is a secondary number only: the ice dominates it.
* **FRC per band** between F and C, ice band removed from both, 32-px cosine edge taper, averaged
  over 1-px rings in bands given as fractions of Nyquist (low 0–0.1, mid 0.1–0.3, high 0.3–0.5).
* **Signal transfer T per band**: g = Σ Re(F·C*) / Σ|C|² over the band's rings, T = g_band / g_low.
  FRC is blind to a per-ring gain; T is what shows over-smoothing.
* **Conformation evidence**: NCC of a 1.5×diameter box of F against the clean CTF-modulated
  projections of both conformations at the true pose; the better match is the call; reported paired
  against the raw data's calls on the same particles, with standard errors.

Peers that need no training live here too (Gaussian low-pass, a radial Wiener-like low-pass), so
the demo and the harness run them identically.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from ..errors import CryoDDMError
from .physics import rotation_from_relion
from .sample import particle_reference

ICE_K = 3.0  # cycles per image: the ice band the fit absorbs and the FRC ignores
TAPER_PX = 32  # cosine edge taper before the Fourier transform (FRC, T)
BANDS: dict[str, tuple[float, float]] = {"low": (0.0, 0.1), "mid": (0.1, 0.3), "high": (0.3, 0.5)}
BOX_FACTOR = 1.5  # conformation boxes are 1.5 × the particle diameter


# ----------------------------------------------------------------------------------------------
# Fourier helpers
# ----------------------------------------------------------------------------------------------


def _freq_grids(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Integer frequencies (cycles per image) on the rfft2 grid: ky (column vector), kx (row)."""
    ny, nx = shape
    ky = np.fft.fftfreq(ny, 1.0 / ny)[:, None]
    kx = np.fft.rfftfreq(nx, 1.0 / nx)[None, :]
    return ky, kx


def ice_mask(shape: tuple[int, int], k_max: float = ICE_K) -> np.ndarray:
    """True on the rfft2 grid where |k| ≤ k_max cycles per image (DC included)."""
    ky, kx = _freq_grids(shape)
    return ky**2 + kx**2 <= k_max**2 + 1e-9


def ice_component(image: np.ndarray, k_max: float = ICE_K) -> np.ndarray:
    """Orthogonal projection of `image` onto the ice band (exact: DFT modes are orthogonal)."""
    image = np.asarray(image, dtype=np.float64)
    spec = np.fft.rfft2(image)
    spec[~ice_mask(image.shape, k_max)] = 0
    return np.fft.irfft2(spec, s=image.shape)


def remove_ice(image: np.ndarray, k_max: float = ICE_K) -> np.ndarray:
    """The image with its ice band (|k| ≤ k_max, DC included) removed."""
    image = np.asarray(image, dtype=np.float64)
    return image - ice_component(image, k_max)


def cosine_taper(shape: tuple[int, int], width: int = TAPER_PX) -> np.ndarray:
    """A separable window: 1 inside, a raised-cosine fall to 0 over `width` px at every edge."""

    def ramp(n: int) -> np.ndarray:
        w = np.ones(n)
        m = min(width, n // 2)
        if m > 0:
            t = (np.arange(m) + 0.5) / m
            edge = 0.5 - 0.5 * np.cos(np.pi * t)
            w[:m] = edge
            w[n - m :] = edge[::-1]
        return w

    return ramp(shape[0])[:, None] * ramp(shape[1])[None, :]


def ring_index(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, float]:
    """1-px Fourier rings on the rfft2 grid, the radius of each ring as a fraction of Nyquist,
    and the ice radius in ring units. For square images ring r holds |k| ∈ [r − ½, r + ½)."""
    ny, nx = shape
    ky, kx = _freq_grids(shape)
    q = np.sqrt((2.0 * ky / ny) ** 2 + (2.0 * kx / nx) ** 2)  # fraction of Nyquist
    half = min(ny, nx) / 2.0
    rings = np.rint(q * half).astype(np.int64)
    n_rings = int(rings.max()) + 1
    return rings, np.arange(n_rings) / half, ICE_K


def _rfft_weights(shape: tuple[int, int]) -> np.ndarray:
    """Weights that make sums over the rfft2 half-plane equal sums over the full plane."""
    nx = shape[1]
    w = np.full((1, nx // 2 + 1), 2.0)
    w[0, 0] = 1.0
    if nx % 2 == 0:
        w[0, -1] = 1.0
    return w


# ----------------------------------------------------------------------------------------------
# r: the fit with the ice band
# ----------------------------------------------------------------------------------------------


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / den if den > 0 else 0.0


def ice_fit(denoised: np.ndarray, clean: np.ndarray, k_max: float = ICE_K) -> tuple[np.ndarray, float]:
    """Least-squares F = a·D + b + s(x, y) with s in the ice band; returns (F, a).

    The ice modes (DC included, so b too) are orthogonal to their complement, so a comes from the
    ice-free parts alone and s = P_ice(C − a·D).
    """
    d = np.asarray(denoised, dtype=np.float64)
    c = np.asarray(clean, dtype=np.float64)
    if d.shape != c.shape or d.ndim != 2:
        raise CryoDDMError(f"denoised {d.shape} and clean {c.shape} must be 2-D images of one shape")
    d_hi = remove_ice(d, k_max)
    c_hi = remove_ice(c, k_max)
    den = float(np.vdot(d_hi, d_hi))
    a = float(np.vdot(d_hi, c_hi)) / den if den > 0 else 0.0
    f = a * d + ice_component(c - a * d, k_max)
    return f, a


def correlation(denoised: np.ndarray, clean: np.ndarray, k_max: float = ICE_K) -> float:
    """r: Pearson(F, C) after the fit with the ice band."""
    f, _ = ice_fit(denoised, clean, k_max)
    return _pearson(f, clean)


def plain_correlation(denoised: np.ndarray, clean: np.ndarray) -> float:
    """Secondary r: Pearson after a plain a·D + b fit (= |Pearson(D, C)|)."""
    return abs(_pearson(denoised, clean))


# ----------------------------------------------------------------------------------------------
# FRC and signal transfer per band
# ----------------------------------------------------------------------------------------------


@dataclass
class RingSums:
    """Per-ring sums Σ Re(F·C*), Σ|F|², Σ|C|² (addable across micrographs of one shape)."""

    cross: np.ndarray
    ff: np.ndarray
    cc: np.ndarray
    q: np.ndarray  # ring radius as a fraction of Nyquist
    ice_ring: float

    def __add__(self, other: RingSums) -> RingSums:
        if self.cross.shape != other.cross.shape:
            raise CryoDDMError("ring sums of micrographs with different shapes cannot be pooled")
        return RingSums(self.cross + other.cross, self.ff + other.ff, self.cc + other.cc, self.q, self.ice_ring)

    def frc(self) -> np.ndarray:
        den = np.sqrt(self.ff * self.cc)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, self.cross / np.where(den > 0, den, 1), 0.0)

    def band_rings(self, band: str) -> np.ndarray:
        lo, hi = BANDS[band]
        r = np.arange(self.q.size)
        return (self.q >= lo) & (self.q < hi) & (r > self.ice_ring)

    def band_frc(self, band: str) -> float:
        sel = self.band_rings(band)
        return float(self.frc()[sel].mean()) if sel.any() else float("nan")

    def band_gain(self, band: str) -> float:
        sel = self.band_rings(band)
        den = float(self.cc[sel].sum())
        return float(self.cross[sel].sum()) / den if den > 0 else float("nan")

    def transfer(self, band: str) -> float:
        g_low = self.band_gain("low")
        return self.band_gain(band) / g_low if g_low else float("nan")


def ring_sums(f: np.ndarray, c: np.ndarray, k_max: float = ICE_K, taper: int = TAPER_PX) -> RingSums:
    """Ring sums of F and C with the ice band removed from both and a cosine edge taper."""
    f = np.asarray(f, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    win = cosine_taper(f.shape, taper)
    ff = np.fft.rfft2(remove_ice(f, k_max) * win)
    cc = np.fft.rfft2(remove_ice(c, k_max) * win)
    rings, q, ice_ring = ring_index(f.shape)
    w = _rfft_weights(f.shape)
    n = q.size
    flat = rings.ravel()
    cross = np.bincount(flat, (w * (ff * np.conj(cc)).real).ravel(), minlength=n)
    pf = np.bincount(flat, (w * np.abs(ff) ** 2).ravel(), minlength=n)
    pc = np.bincount(flat, (w * np.abs(cc) ** 2).ravel(), minlength=n)
    return RingSums(cross, pf, pc, q, ice_ring)


def radial_power(image: np.ndarray, taper: int = TAPER_PX) -> tuple[np.ndarray, np.ndarray]:
    """Rotationally averaged power spectrum (mean removed, tapered): (fraction of Nyquist, power)."""
    img = np.asarray(image, dtype=np.float64)
    img = (img - img.mean()) * cosine_taper(img.shape, taper)
    spec = np.abs(np.fft.rfft2(img)) ** 2
    rings, q, _ = ring_index(img.shape)
    w = _rfft_weights(img.shape)
    flat = rings.ravel()
    tot = np.bincount(flat, (w * spec).ravel(), minlength=q.size)
    cnt = np.bincount(flat, np.broadcast_to(w, spec.shape).ravel(), minlength=q.size)
    keep = q <= 1.0
    return q[keep], (tot / np.maximum(cnt, 1))[keep] / img.size


# ----------------------------------------------------------------------------------------------
# Scores of a set of micrographs
# ----------------------------------------------------------------------------------------------


@dataclass
class Scores:
    """The image metrics of one method over a set of micrographs."""

    r: float
    r_plain: float
    frc: dict[str, float]
    transfer: dict[str, float]
    r_each: list[float] = field(default_factory=list)
    rings: RingSums | None = field(default=None, repr=False)

    def as_row(self) -> dict[str, float]:
        row = {"r": self.r, "r_plain": self.r_plain}
        row.update({f"frc_{b}": v for b, v in self.frc.items()})
        row.update({f"T_{b}": v for b, v in self.transfer.items() if b != "low"})
        return row


def score(
    denoised: Sequence[np.ndarray] | np.ndarray, clean: Sequence[np.ndarray] | np.ndarray, k_max: float = ICE_K
) -> Scores:
    """Score denoised micrographs against their clean signal.

    r is fitted per micrograph (each has its own ice, scale and offset) and averaged; the ring
    sums for FRC and T are pooled over micrographs of one shape, which steadies the high band.
    """
    ds = [denoised] if np.ndim(denoised) == 2 else list(denoised)
    cs = [clean] if np.ndim(clean) == 2 else list(clean)
    if len(ds) != len(cs) or not ds:
        raise CryoDDMError(f"{len(ds)} denoised and {len(cs)} clean micrographs: need equal, non-zero counts")
    rs, rps = [], []
    sums: RingSums | None = None
    for d, c in zip(ds, cs):
        f, _ = ice_fit(d, c, k_max)
        rs.append(_pearson(f, c))
        rps.append(plain_correlation(d, c))
        rsum = ring_sums(f, c, k_max)
        sums = rsum if sums is None else sums + rsum
    assert sums is not None
    return Scores(
        r=float(np.mean(rs)),
        r_plain=float(np.mean(rps)),
        frc={b: sums.band_frc(b) for b in BANDS},
        transfer={b: sums.transfer(b) for b in BANDS},
        r_each=[float(v) for v in rs],
        rings=sums,
    )


# ----------------------------------------------------------------------------------------------
# Conformation evidence
# ----------------------------------------------------------------------------------------------


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised cross-correlation at zero shift (Pearson over the box)."""
    return _pearson(a, b)


def cut_box(image: np.ndarray, y: float, x: float, size: int) -> np.ndarray | None:
    """The size×size box whose centre pixel is (round(y), round(x)), or None if it leaves the image.

    Centre pixel convention: index size // 2 of the box is the particle centre.
    """
    cy, cx = int(round(y)), int(round(x))
    y0, x0 = cy - size // 2, cx - size // 2
    if y0 < 0 or x0 < 0 or y0 + size > image.shape[0] or x0 + size > image.shape[1]:
        return None
    return np.asarray(image[y0 : y0 + size, x0 : x0 + size])


def box_size_for(diameter_px: float) -> int:
    """1.5 × diameter, rounded to an even number of pixels."""
    return int(2 * round(BOX_FACTOR * diameter_px / 2))


def conformation_calls(
    image: np.ndarray,
    centres: Iterable[tuple[float, float]],
    references: Iterable[tuple[np.ndarray, np.ndarray]],
    box: int,
) -> np.ndarray:
    """For each particle: +1 when its box matches reference B better than A, 0 when A wins,
    -1 when the box leaves the image (not scored). References are box×box clean projections."""
    calls = []
    for (y, x), (ref_a, ref_b) in zip(centres, references):
        patch = cut_box(image, y, x, box)
        if patch is None:
            calls.append(-1)
            continue
        calls.append(1 if ncc(patch, ref_b) > ncc(patch, ref_a) else 0)
    return np.asarray(calls, dtype=np.int8)


@dataclass
class Accuracy:
    """Conformation accuracy of a method and of the raw data on the same particles (paired)."""

    n: int
    acc: float
    se: float
    acc_raw: float
    se_raw: float
    diff: float  # acc − acc_raw
    se_diff: float  # standard error of the paired difference

    def as_row(self) -> dict[str, float]:
        return {
            "acc": self.acc,
            "acc_se": self.se,
            "acc_raw": self.acc_raw,
            "acc_diff": self.diff,
            "acc_diff_se": self.se_diff,
            "n_particles": self.n,
        }


def paired_accuracy(correct: np.ndarray, correct_raw: np.ndarray) -> Accuracy:
    """Accuracy with standard errors; `correct`/`correct_raw` are 0/1 per particle (same particles)."""
    c = np.asarray(correct, dtype=np.float64)
    r = np.asarray(correct_raw, dtype=np.float64)
    if c.shape != r.shape or c.ndim != 1 or c.size == 0:
        raise CryoDDMError("paired accuracy needs two equal, non-empty 1-D arrays of 0/1")
    n = c.size
    d = c - r
    se = lambda v: float(v.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")  # noqa: E731
    return Accuracy(n, float(c.mean()), se(c), float(r.mean()), se(r), float(d.mean()), se(d))


def sample_references(table: Any, molecule: Any, config: Any, box: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Both conformations' clean CTF-modulated projections at each particle's true pose and
    defocus, from the sample generator (`sample.particle_reference`): computed once, reused for
    every method scored on the same particles."""
    refs = []
    for row in table.itertuples(index=False):
        rot = rotation_from_relion(float(row.rot), float(row.tilt), float(row.psi))
        refs.append(tuple(particle_reference(molecule, rot, float(row.defocus), config, box, k) for k in (1, 2)))
    return refs  # type: ignore[return-value]


def conformation_correct(
    denoised: Sequence[np.ndarray],
    clean: Sequence[np.ndarray],
    table: Any,
    references: Sequence[tuple[np.ndarray, np.ndarray]],
    box: int,
) -> np.ndarray:
    """Per particle of `table` (columns index, x, y, conformation ∈ {1, 2}): 1 when the call from
    F (the ice-band fit of the denoised micrograph to its clean signal) is right, 0 when wrong,
    -1 when the box leaves the micrograph."""
    index = np.asarray(table["index"], dtype=np.int64)
    xs = np.asarray(table["x"], dtype=np.float64)
    ys = np.asarray(table["y"], dtype=np.float64)
    truth = np.asarray(table["conformation"], dtype=np.int64) - 1
    out = np.full(index.size, -1, dtype=np.int8)
    for mi in np.unique(index):
        sel = np.flatnonzero(index == mi)
        f, _ = ice_fit(denoised[mi], clean[mi])
        calls = conformation_calls(f, zip(ys[sel], xs[sel]), (references[i] for i in sel), box)
        out[sel] = np.where(calls < 0, -1, (calls == truth[sel]).astype(np.int8))
    return out


def conformation_accuracy(correct: np.ndarray, correct_raw: np.ndarray) -> Accuracy:
    """`paired_accuracy` over the particles both methods could score."""
    keep = (np.asarray(correct) >= 0) & (np.asarray(correct_raw) >= 0)
    return paired_accuracy(np.asarray(correct)[keep], np.asarray(correct_raw)[keep])


# ----------------------------------------------------------------------------------------------
# Peers that need no training
# ----------------------------------------------------------------------------------------------


def gaussian_lowpass(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian low-pass, σ in pixels (the peers of docs/quality.md: σ = 1.5 and 3 px)."""
    return ndimage.gaussian_filter(np.asarray(image, dtype=np.float32), sigma, mode="reflect")


def wiener_lowpass(
    image: np.ndarray, noise_band: tuple[float, float] = (0.8, 1.0), smooth_rings: float = 2.0
) -> np.ndarray:
    """A radial Wiener-like low-pass that needs no truth: H(q) = max(P(q) − N, 0) / P(q).

    P is the rotationally averaged power of the image, N the white-noise floor read from the rings
    in `noise_band` (fractions of Nyquist, where a cryo-EM particle's signal has died out under the
    CTF envelope); H is smoothed over a few rings and applied radially.
    """
    img = np.asarray(image, dtype=np.float64)
    mean = img.mean()
    spec = np.fft.rfft2(img - mean)
    rings, q, _ = ring_index(img.shape)
    w = _rfft_weights(img.shape)
    flat = rings.ravel()
    power = np.abs(spec) ** 2
    tot = np.bincount(flat, (w * power).ravel(), minlength=q.size)
    cnt = np.bincount(flat, np.broadcast_to(w, power.shape).ravel(), minlength=q.size)
    p = tot / np.maximum(cnt, 1)
    floor_sel = (q >= noise_band[0]) & (q <= noise_band[1])
    if not floor_sel.any():
        raise CryoDDMError(f"image {img.shape} too small for a Wiener noise estimate")
    noise = float(np.median(p[floor_sel]))
    h = np.clip((p - noise) / np.maximum(p, 1e-30), 0.0, 1.0)
    if smooth_rings > 0:
        h = ndimage.gaussian_filter1d(h, smooth_rings, mode="nearest")
    h[0] = 1.0
    out = np.fft.irfft2(spec * h[rings], s=img.shape) + mean
    return out.astype(np.float32)


def topaz_available() -> bool:
    """Topaz-Denoise (`topaz-em`) is a benchmark peer when importable, never a dependency."""
    try:
        import topaz  # noqa: F401
    except Exception:
        return False
    return True


PEERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "gaussian σ=1.5 px": lambda im: gaussian_lowpass(im, 1.5),
    "gaussian σ=3 px": lambda im: gaussian_lowpass(im, 3.0),
    "wiener (radial)": wiener_lowpass,
}


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------

COLUMNS = ("r", "r_plain", "frc_low", "frc_mid", "frc_high", "T_mid", "T_high")


def markdown_table(rows: dict[str, dict[str, Any]], columns: Sequence[str] = COLUMNS, digits: int = 3) -> str:
    """A Markdown table: one row per method, the given metric columns (missing → '–')."""
    head = "| method | " + " | ".join(columns) + " |"
    sep = "|---|" + "---:|" * len(columns)
    lines = [head, sep]
    for name, row in rows.items():
        cells = []
        for col in columns:
            v = row.get(col)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append("–")
            elif isinstance(v, float):
                cells.append(f"{v:.{digits}f}")
            else:
                cells.append(str(v))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
