"""Synthetic single-particle micrographs whose clean signal and particles are known exactly.

No public micrograph set with a clean truth exists, so every step is tested against these (the
picker, forward crops, training and prediction, cs2star). The physics matches the quality
metrics of docs/quality.md:

* a pseudo-atomic, asymmetric molecule: ~2,000 Gaussian atoms in a few overlapping ellipsoidal
  lobes, ~135 Å across; optionally a second conformation in which a rigid domain holding 20 % of
  the atoms is turned about a hinge;
* projections at uniformly random orientations (scipy `Rotation.random`), placed without overlap;
* a CTF (300 kV, Cs 2.7 mm, amplitude contrast 0.07, defocus 1.0–2.5 µm per micrograph, no
  astigmatism) applied to the whole micrograph in Fourier space, padded so nothing wraps around;
* a smooth ice background (a random field with Fourier support |k| ≤ 3 cycles per image,
  std 0.3 × the noise σ) and white Gaussian noise at the requested SNR, where
  SNR = var(clean signal over the particle envelopes) / var(noise) and the envelope is where the
  CTF-free projection, blurred by 3 px, exceeds 5 % of its maximum.

Conventions (the project's, RELION's): arrays are [y, x]; x = column, y = row, origin at
`data[0, 0]`. A particle's rotation R (scipy, active) maps molecule coordinates into the image
frame as p_image = Rᵀ·p, which is RELION's A = Rᵀ with (rot, tilt, psi) = R.as_euler("ZYZ")
(intrinsic); cryoSPARC's `alignments3D/pose` is R.as_rotvec(), so pyem's
`rot2euler(expmap(pose))` (expmap returns the transposed Rodrigues matrix) gives these angles back.
Micrographs are scaled so the white noise has σ = 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import special
from scipy import fft as sfft
from scipy.spatial.transform import Rotation

from . import __version__
from .atomic import atomic_dir, atomic_write
from .config import to_jsonable
from .errors import CryoDDMError
from .io.mrc import write_mrc
from .io.star import write_particles_star
from .jobs import CancelToken, Job, Progress
from .params import window_for_diameter

FORMAT = "napari-cryoddm-sample"
FORMAT_VERSION = 1
ICE_K = 3.0                 # ice: Fourier support |k| ≤ 3 cycles per image
ENVELOPE_BLUR_PX = 3.0      # envelope: CTF-free projection blurred by 3 px …
ENVELOPE_FRACTION = 0.05    # … above 5 % of its maximum
ATOM_SIGMA_A = 2.0          # Gaussian atom width (Å)
DOMAIN_FRACTION = 0.2       # conformation B turns a rigid domain holding 20 % of the atoms
MIN_SEPARATION = 1.2        # particle centres at least 1.2 diameters apart (no overlap, some room)
PLACEMENT_BATCHES = 20      # × 128 random candidates per particle before giving up
TRUTH_COLUMNS = ("micrograph", "index", "x", "y", "rot", "tilt", "psi", "defocus", "conformation", "subset")


def stream(seed: int, *key: int) -> np.random.Generator:
    """An independent random stream per purpose and micrograph (SeedSequence spawn keys): 0 the
    molecule, (1, i) micrograph i, 2 micrograph uids, 3 particle uids."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in key)))


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

def _f(default, help: str, unit: str | None = None, **meta):
    md = {"help": help, **meta}
    if unit:
        md["unit"] = unit
    return field(default=default, metadata=md)


@dataclass
class SampleConfig:
    """What the sample holds. The defaults suit a CPU: 1024² micrographs at 3 Å/px (the 135 Å
    molecule is 45 px, so the forward window is 128) with 7 particles each, which leaves room for
    ≥ 30 noise boxes per micrograph as real micrographs do. The quality benchmark uses
    `pixel_size=1.5` (90 px particles, W = 256)."""

    n_micrographs: int = _f(8, "number of micrographs", flag=["-n", "--n-micrographs"])
    width: int = _f(1024, "micrograph width (columns, x)", "px")
    height: int = _f(1024, "micrograph height (rows, y)", "px")
    pixel_size: float = _f(3.0, "pixel size", "Å/px")
    particles: int = _f(7, "particles per micrograph (placed without overlap, ≥ 1.2 diameters apart)")
    diameter: float = _f(135.0, "molecule diameter", "Å", flag="--diameter-A")
    snr: float = _f(0.05, "SNR = var(clean signal over the particle envelopes) / var(noise)")
    conformations: int = _f(2, "1: one conformation; 2: half the particles have a domain turned "
                               "by the hinge angle (rlnClassNumber 1/2)", choices=(1, 2))
    hinge_angle: float = _f(12.0, "rotation of the hinged domain (a fifth of the atoms) in conformation 2", "°")
    defocus_min: float = _f(1.0, "smallest defocus (underfocus, one per micrograph)", "µm")
    defocus_max: float = _f(2.5, "largest defocus", "µm")
    voltage: float = _f(300.0, "acceleration voltage", "kV")
    cs: float = _f(2.7, "spherical aberration", "mm")
    amplitude_contrast: float = _f(0.07, "amplitude contrast fraction")
    ice: float = _f(0.3, "std of the smooth ice background, as a fraction of the noise σ")
    atoms: int = _f(2000, "Gaussian atoms in the molecule")
    seed: int = _f(0, "random seed: the same seed gives byte-identical files")

    @property
    def diameter_px(self) -> float:
        return self.diameter / self.pixel_size

    @property
    def window(self) -> int:
        """The forward window W for this particle diameter (the original's rule)."""
        return window_for_diameter(self.diameter_px)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    def validate(self) -> SampleConfig:
        """Raise `CryoDDMError` naming the first impossible setting."""
        for name in ("pixel_size", "diameter", "snr", "hinge_angle", "defocus_min", "defocus_max",
                     "voltage", "cs", "amplitude_contrast", "ice"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise CryoDDMError(f"{name.replace('_', ' ')} must be a finite number, got {value}")
        checks = [
            (self.n_micrographs >= 1, f"n_micrographs must be at least 1, got {self.n_micrographs}"),
            (self.width >= 64 and self.height >= 64,
             f"micrographs must be at least 64×64 px, got {self.width}×{self.height}"),
            (self.pixel_size > 0, f"pixel size must be positive, got {self.pixel_size} Å/px"),
            (self.particles >= 0, f"particles must be ≥ 0, got {self.particles}"),
            (self.diameter > 0, f"diameter must be positive, got {self.diameter} Å"),
            # a callable: the diameter in pixels divides by the pixel size checked just above
            (lambda: self.diameter_px >= 8,
             lambda: f"the molecule would be {self.diameter_px:.1f} px across (diameter "
                     f"{self.diameter} Å at {self.pixel_size} Å/px); use a smaller pixel size or "
                     "a larger diameter (≥ 8 px)"),
            (self.snr > 0, f"SNR must be positive, got {self.snr}"),
            (self.conformations in (1, 2), f"conformations must be 1 or 2, got {self.conformations}"),
            (0 < self.defocus_min <= self.defocus_max,
             f"need 0 < defocus_min ≤ defocus_max, got {self.defocus_min}–{self.defocus_max} µm"),
            (self.voltage > 0, f"voltage must be positive, got {self.voltage} kV"),
            (self.cs >= 0, f"Cs must be ≥ 0, got {self.cs} mm"),
            (0 <= self.amplitude_contrast < 1,
             f"amplitude contrast must be in [0, 1), got {self.amplitude_contrast}"),
            (self.ice >= 0, f"ice must be ≥ 0, got {self.ice}"),
            (self.atoms >= 10, f"atoms must be at least 10, got {self.atoms}"),
            (self.seed >= 0, f"seed must be ≥ 0, got {self.seed}"),
        ]
        for ok, message in checks:
            if not (ok() if callable(ok) else ok):
                raise CryoDDMError(message() if callable(message) else message)
        return self


# ----------------------------------------------------------------------------------------------
# The molecule
# ----------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Molecule:
    """Gaussian pseudo-atoms in Å, centred on conformation A's centre of mass.

    `coords[0]` is conformation A, `coords[1]` conformation B (the domain turned about the hinge;
    identical to A when the hinge angle is 0). Both share one frame: the body does not move.
    """

    coords: np.ndarray          # (2, N, 3) Å, x y z
    weights: np.ndarray         # (N,)
    sigma: float                # atom Gaussian σ, Å
    domain: np.ndarray          # (N,) bool: atoms that turn in conformation B
    hinge_point: np.ndarray     # (3,) Å
    hinge_axis: np.ndarray      # (3,) unit vector
    hinge_angle: float          # degrees
    diameter: float             # Å (no atom centre lies further than diameter/2 from the origin)

    def conformation(self, k: int) -> np.ndarray:
        """Atom coordinates (N, 3) of conformation k = 1 (A) or 2 (B)."""
        if k not in (1, 2):
            raise CryoDDMError(f"conformation must be 1 or 2, got {k}")
        return self.coords[k - 1]

    def summary(self) -> dict:
        return {"atoms": int(self.weights.size), "diameter_A": self.diameter,
                "atom_sigma_A": self.sigma, "domain_atoms": int(self.domain.sum()),
                "hinge_point_A": self.hinge_point.tolist(), "hinge_axis": self.hinge_axis.tolist(),
                "hinge_angle_deg": self.hinge_angle}


def build_molecule(diameter: float = 135.0, atoms: int = 2000, hinge_angle: float = 12.0,
                   seed: int = 0, sigma: float = ATOM_SIGMA_A) -> Molecule:
    """An asymmetric multi-lobe pseudo-atomic molecule and its hinged second conformation.

    Atoms fill the union of a core and four random ellipsoidal lobes touching it (uniform density,
    random weights 0.5–1.5); the
    domain is the 20 % of atoms nearest the most peripheral lobe's tip, turned about a pivot at its
    inner boundary around an axis perpendicular to its arm — a hinge motion, not a rigid-body
    wobble. The whole thing is scaled so both conformations fit in a sphere of `diameter`.
    """
    rng = stream(seed, 0)
    radius = diameter / 2.0
    n_lobes = 5
    dirs = rng.standard_normal((n_lobes, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    centres = dirs * rng.uniform(0.35, 0.55, (n_lobes, 1)) * radius
    centres[0] = 0.0                                     # a core that every lobe touches
    axes = rng.uniform(0.2, 0.36, (n_lobes, 3)) * radius
    axes[0] = rng.uniform(0.36, 0.45, 3) * radius
    frames = Rotation.random(n_lobes, rng).as_matrix()     # (L, 3, 3)
    pts: list[np.ndarray] = []
    have = 0
    while have < atoms:
        cand = rng.uniform(-radius, radius, (4 * atoms, 3))
        inside = np.zeros(len(cand), dtype=bool)
        for c, a, f in zip(centres, axes, frames):
            local = (cand - c) @ f                       # coordinates in the lobe's frame
            inside |= np.sum((local / a) ** 2, axis=1) <= 1.0
        got = cand[inside]
        pts.append(got)
        have += len(got)
    xyz = np.concatenate(pts)[:atoms]
    weights = rng.uniform(0.5, 1.5, atoms)
    xyz -= np.average(xyz, axis=0, weights=weights)

    # the domain: atoms nearest the tip of the most peripheral lobe
    far = int(np.argmax(np.linalg.norm(centres, axis=1) + np.max(axes, axis=1)))
    arm = centres[far] / max(np.linalg.norm(centres[far]), 1e-9)
    tip = xyz[int(np.argmax(xyz @ arm))]
    dist = np.linalg.norm(xyz - tip, axis=1)
    n_dom = max(1, int(round(DOMAIN_FRACTION * atoms)))
    order = np.argsort(dist, kind="stable")
    domain = np.zeros(atoms, dtype=bool)
    domain[order[:n_dom]] = True
    inner = order[max(0, n_dom - max(1, n_dom // 10)):n_dom]          # the domain's inner boundary
    pivot = xyz[inner].mean(axis=0)
    lever = xyz[domain].mean(axis=0) - pivot
    lever /= max(np.linalg.norm(lever), 1e-9)
    helper = rng.standard_normal(3)
    axis = np.cross(lever, helper)
    axis /= np.linalg.norm(axis)
    turn = Rotation.from_rotvec(np.deg2rad(hinge_angle) * axis).as_matrix()
    xyz_b = xyz.copy()
    if hinge_angle:
        xyz_b[domain] = (xyz[domain] - pivot) @ turn.T + pivot

    # scale so every atom centre of both conformations lies within radius − σ of the origin
    reach = max(np.linalg.norm(xyz, axis=1).max(), np.linalg.norm(xyz_b, axis=1).max())
    scale = (radius - sigma) / reach
    return Molecule(coords=np.stack([xyz * scale, xyz_b * scale]), weights=weights, sigma=float(sigma),
                    domain=domain, hinge_point=pivot * scale, hinge_axis=axis,
                    hinge_angle=float(hinge_angle), diameter=float(diameter))


def molecule_for(config: SampleConfig) -> Molecule:
    """The molecule a sample set with this configuration is made of."""
    return build_molecule(config.diameter, config.atoms, config.hinge_angle, config.seed)


# ----------------------------------------------------------------------------------------------
# Projection, CTF, envelope
# ----------------------------------------------------------------------------------------------

def relion_angles(rotation: Rotation) -> np.ndarray:
    """RELION (rot, tilt, psi) in degrees of a particle rotation (ZYZ, A = Rᵀ)."""
    return rotation.as_euler("ZYZ", degrees=True)


def rotation_from_relion(rot: float, tilt: float, psi: float) -> Rotation:
    """The particle rotation for RELION Euler angles in degrees (inverse of `relion_angles`)."""
    return Rotation.from_euler("ZYZ", [rot, tilt, psi], degrees=True)


def cryosparc_pose(rotation: Rotation) -> np.ndarray:
    """cryoSPARC `alignments3D/pose` (a Rodrigues vector, radians) of a particle rotation."""
    return rotation.as_rotvec()


def image_positions(coords: np.ndarray, rotation: Rotation, pixel_size: float) -> np.ndarray:
    """(N, 2) image-plane offsets (x, y) in pixels of atoms (N, 3 Å) under `rotation`: Rᵀ·p."""
    rotated = np.einsum("nk,kj->nj", coords, rotation.as_matrix())   # row-vector form of Rᵀ·p (no BLAS threads)
    return rotated[:, :2] / pixel_size


def splat(image: np.ndarray, x: np.ndarray, y: np.ndarray, weights: np.ndarray, sigma_px: float) -> np.ndarray:
    """Add 2-D Gaussians (pixel-integrated, so exact for small σ) at (x, y) into `image` in place.

    Pixel j covers [j − ½, j + ½); each atom touches a (2r+1)² patch, r = ⌈3.5σ⌉. Vectorised: the
    Gaussian's CDF at the 2r+2 pixel edges per axis, differenced, then one `bincount` into the
    atoms' bounding box only (cache-friendly when called per particle).
    """
    ny, nx = image.shape
    if len(x) == 0:
        return image
    r = max(1, int(math.ceil(3.5 * sigma_px)))
    cx = np.rint(x).astype(np.int64)
    cy = np.rint(y).astype(np.int64)
    x0, x1 = max(int(cx.min()) - r, 0), min(int(cx.max()) + r + 1, nx)
    y0, y1 = max(int(cy.min()) - r, 0), min(int(cy.max()) + r + 1, ny)
    if x1 <= x0 or y1 <= y0:
        return image
    bw = x1 - x0
    edges = np.arange(-r, r + 2) - 0.5                         # 2r+2 pixel edges around the centre
    s = 1.0 / (sigma_px * math.sqrt(2.0))
    ex = special.erf(((cx - x)[:, None] + edges[None, :]) * s)
    ey = special.erf(((cy - y)[:, None] + edges[None, :]) * s)
    wx = 0.5 * np.diff(ex, axis=1)                             # (N, 2r+1)
    wy = 0.5 * (np.diff(ey, axis=1) * weights[:, None])
    contrib = wy[:, :, None] * wx[:, None, :]
    offs = np.arange(-r, r + 1)
    px = cx[:, None] + offs[None, :]
    py = cy[:, None] + offs[None, :]
    idx = (py - y0)[:, :, None] * bw + (px - x0)[:, None, :]
    inside = ((px >= x0) & (px < x1))[:, None, :] & ((py >= y0) & (py < y1))[:, :, None]
    size = (y1 - y0) * bw
    if inside.all():
        flat = np.bincount(idx.ravel(), contrib.ravel(), minlength=size)
    else:
        flat = np.bincount(idx[inside], contrib[inside], minlength=size)
    image[y0:y1, x0:x1] += flat.reshape(y1 - y0, bw).astype(image.dtype, copy=False)
    return image


def project(molecule: Molecule, rotation: Rotation, pixel_size: float, box: int | tuple[int, int],
            conformation: int = 1, center: tuple[float, float] | None = None) -> np.ndarray:
    """CTF-free projection of one conformation at `rotation`, its centre at `center` (x, y) —
    by default (box//2, box//2), where a box cut around a STAR coordinate puts the particle."""
    shape = (box, box) if isinstance(box, int) else tuple(box)
    cx, cy = center if center is not None else (shape[1] // 2, shape[0] // 2)
    xy = image_positions(molecule.conformation(conformation), rotation, pixel_size)
    out = np.zeros(shape, dtype=np.float64)
    return splat(out, xy[:, 0] + cx, xy[:, 1] + cy, molecule.weights, molecule.sigma / pixel_size)


def electron_wavelength(voltage_kv: float) -> float:
    """Relativistic electron wavelength in Å."""
    v = voltage_kv * 1e3
    return 12.2642598 / math.sqrt(v * (1.0 + 0.978475e-6 * v))


def ctf(shape: tuple[int, int], pixel_size: float, defocus_u: float, defocus_v: float | None = None,
        defocus_angle: float = 0.0, voltage: float = 300.0, cs: float = 2.7,
        amplitude_contrast: float = 0.07, phase_shift: float = 0.0, bfactor: float = 0.0,
        half: bool = True, dtype: type = np.float64) -> np.ndarray:
    """The CTF on the rfft2 grid of `shape` (the full fft2 grid with `half=False`).

    Defocus in Å (positive = underfocus, RELION's rlnDefocusU/V), angle and phase shift in
    degrees, Cs in mm, voltage in kV, B-factor in Å². CTF = −(√(1−Q²)·sin χ + Q·cos χ) with
    χ = πλΔf k² − (π/2)·Cs·λ³·k⁴ + φ, so protein density (positive) images dark at low
    frequency, as in raw micrographs. `dtype=np.float32` halves the cost (χ error ~1e-5 rad).
    """
    ny, nx = shape
    ky = np.fft.fftfreq(ny, d=pixel_size).astype(dtype)[:, None]
    kx = (np.fft.rfftfreq(nx, d=pixel_size) if half else np.fft.fftfreq(nx, d=pixel_size)).astype(dtype)[None, :]
    k2 = kx * kx + ky * ky
    lam = electron_wavelength(voltage)
    if defocus_v is None or defocus_v == defocus_u:
        df = dtype(defocus_u)
    else:
        theta = np.arctan2(ky, kx)
        df = 0.5 * (defocus_u + defocus_v) + 0.5 * (defocus_u - defocus_v) * np.cos(
            2.0 * (theta - np.deg2rad(defocus_angle)))
    q = amplitude_contrast
    # √(1−Q²)·sin χ + Q·cos χ = sin(χ + asin Q): one transcendental per pixel
    chi = k2 * (dtype(np.pi * lam) * df - dtype(0.5 * np.pi * (cs * 1e7) * lam ** 3) * k2)
    chi += dtype(np.deg2rad(phase_shift) + math.asin(q))
    out = np.sin(chi, out=chi)
    np.negative(out, out=out)
    if bfactor:
        out *= np.exp(dtype(-0.25 * bfactor) * k2)
    return out


def gaussian_transfer(shape: tuple[int, int], sigma_px: float, dtype: type = np.float64) -> np.ndarray:
    """The Fourier transfer of a Gaussian blur of σ px on the rfft2 grid of `shape`."""
    ny, nx = shape
    ky = np.fft.fftfreq(ny).astype(dtype)[:, None]
    kx = np.fft.rfftfreq(nx).astype(dtype)[None, :]
    return np.exp(dtype(-2.0 * np.pi ** 2 * sigma_px ** 2) * (kx * kx + ky * ky))


def delocalisation_px(pixel_size: float, defocus: float, voltage: float = 300.0, cs: float = 2.7) -> int:
    """How far (px) the CTF spreads signal at Nyquist: λΔf·k + Cs·λ³·k³, k = 1/(2·pixel size)."""
    lam = electron_wavelength(voltage)
    k = 0.5 / pixel_size
    return int(math.ceil((lam * defocus * k + cs * 1e7 * lam ** 3 * k ** 3) / pixel_size))


def _padded_spectrum(image: np.ndarray, pad: int, dtype: type) -> tuple[np.ndarray, tuple[int, int]]:
    """rfft2 of `image` zero-padded by ≥ `pad` px on the bottom/right (a fast FFT size).

    Filtering on this grid is a linear (not circular) convolution as long as the kernel is
    shorter than `pad`: what spreads past the right/bottom edge lands in the padding, what
    spreads past the left/top edge wraps to the far end of the padding; both are cropped away.
    """
    ny, nx = image.shape
    shape = (sfft.next_fast_len(ny + 2 * pad, real=True), sfft.next_fast_len(nx + 2 * pad, real=True))
    buf = np.zeros(shape, dtype=dtype)
    buf[:ny, :nx] = image
    return sfft.rfft2(buf, workers=-1), shape


def _filtered(spec: np.ndarray, transfer: np.ndarray, shape: tuple[int, int],
              crop: tuple[int, int]) -> np.ndarray:
    return sfft.irfft2(spec * transfer, s=shape, workers=-1)[:crop[0], :crop[1]]


def apply_ctf(image: np.ndarray, pixel_size: float, defocus: float, voltage: float = 300.0,
              cs: float = 2.7, amplitude_contrast: float = 0.07, pad: int | None = None,
              dtype: type = np.float64) -> np.ndarray:
    """Convolve with the CTF (constant defocus), zero-padded so signal does not wrap around."""
    if pad is None:
        pad = delocalisation_px(pixel_size, defocus, voltage, cs) + 8
    spec, shape = _padded_spectrum(image, pad, dtype)
    transfer = ctf(shape, pixel_size, defocus, voltage=voltage, cs=cs,
                   amplitude_contrast=amplitude_contrast, dtype=dtype)
    return _filtered(spec, transfer, shape, image.shape)


def _above(blurred: np.ndarray, fraction: float) -> np.ndarray:
    peak = float(blurred.max())
    if peak <= 0:
        return np.zeros(blurred.shape, dtype=bool)
    return blurred > fraction * peak


def envelope(ctf_free: np.ndarray, blur_px: float = ENVELOPE_BLUR_PX,
             fraction: float = ENVELOPE_FRACTION) -> np.ndarray:
    """Where the particles are: the CTF-free projection blurred by a Gaussian of `blur_px` (zero
    outside the image) above `fraction` of its maximum — the SNR definition's mask."""
    image = np.asarray(ctf_free, dtype=np.float64)
    spec, shape = _padded_spectrum(image, int(math.ceil(5 * blur_px)) + 1, np.float64)
    return _above(_filtered(spec, gaussian_transfer(shape, blur_px), shape, image.shape), fraction)


def envelope_snr(clean: np.ndarray, noise_var: float, mask: np.ndarray) -> float:
    """SNR = var(clean over the envelope) / var(noise)."""
    return float(np.var(np.asarray(clean, dtype=np.float64)[mask]) / noise_var)


def ice_field(rng: np.random.Generator, shape: tuple[int, int], k_max: float = ICE_K) -> np.ndarray:
    """A smooth random field of unit std with Fourier support 0 < |k| ≤ k_max cycles per image.

    The same field as `irfft2` of random coefficients on those modes, summed directly as
    Re(E_y · C · E_x) over the few modes (much cheaper than a full-size inverse FFT)."""
    ny, nx = shape
    ky = np.fft.fftfreq(ny, 1.0 / ny)
    kx = np.fft.rfftfreq(nx, 1.0 / nx)
    rows = np.flatnonzero(np.abs(ky) <= k_max)
    cols = np.flatnonzero(kx <= k_max)
    support = (ky[rows, None] ** 2 + kx[None, cols] ** 2 <= k_max ** 2 + 1e-9) & \
        ((ky[rows, None] != 0) | (kx[None, cols] != 0))
    n = int(support.sum())
    coef = np.zeros(support.shape, dtype=np.complex128)
    coef[support] = rng.standard_normal(n) + 1j * rng.standard_normal(n)
    # irfft2 counts each kx > 0 column twice (its mirror image); kx = 0 once
    coef[:, kx[cols] > 0] *= 2.0
    ey = np.exp(2j * np.pi * np.outer(np.arange(ny), ky[rows]) / ny)
    ex = np.exp(2j * np.pi * np.outer(kx[cols], np.arange(nx)) / nx)
    # einsum, not @: with an inner dimension of 4, BLAS threads only add overhead (measured 30×)
    left = np.einsum("ik,kj->ij", ey, coef)              # (ny, modes) complex, small
    field_ = np.einsum("ik,kj->ij", left.real.astype(np.float32), ex.real.astype(np.float32))
    field_ -= np.einsum("ik,kj->ij", left.imag.astype(np.float32), ex.imag.astype(np.float32))
    field_ /= np.float32(field_.std(dtype=np.float64))
    return field_


def particle_reference(molecule: Molecule, rotation: Rotation, defocus: float, config: SampleConfig,
                       box: int, conformation: int = 1) -> np.ndarray:
    """The clean CTF-modulated image of one particle in a box×box window centred on it, in the
    same units as the `clean` micrographs only up to a scale (use normalised correlation)."""
    proj = project(molecule, rotation, config.pixel_size, box, conformation)
    return apply_ctf(proj, config.pixel_size, defocus, config.voltage, config.cs,
                     config.amplitude_contrast, pad=box // 2 + delocalisation_px(
                         config.pixel_size, defocus, config.voltage, config.cs))


# ----------------------------------------------------------------------------------------------
# One micrograph
# ----------------------------------------------------------------------------------------------

def micrograph_name(index: int, n_micrographs: int) -> str:
    digits = max(3, len(str(max(n_micrographs - 1, 0))))
    return f"mic_{index:0{digits}d}.mrc"


def place_particles(rng: np.random.Generator, n: int, shape: tuple[int, int], diameter_px: float,
                    margin: int) -> np.ndarray:
    """(n, 2) integer centres (x, y), at least `margin` px from every edge and
    `MIN_SEPARATION` × diameter apart (random sequential placement)."""
    ny, nx = shape
    if n == 0:
        return np.zeros((0, 2), dtype=np.int64)
    lo_x, hi_x, lo_y, hi_y = margin, nx - 1 - margin, margin, ny - 1 - margin
    if hi_x < lo_x or hi_y < lo_y:
        raise CryoDDMError(f"a {nx}×{ny} micrograph has no room for particles {margin} px from its "
                           f"edges; make it larger or the particles smaller")
    min_d2 = (MIN_SEPARATION * diameter_px) ** 2
    placed = np.zeros((n, 2), dtype=np.int64)
    for count in range(n):
        for _ in range(PLACEMENT_BATCHES):
            cand = np.stack([rng.integers(lo_x, hi_x + 1, 128), rng.integers(lo_y, hi_y + 1, 128)], axis=1)
            if count:
                d2 = ((cand[:, None, :] - placed[None, :count, :]) ** 2).sum(axis=2).min(axis=1)
                ok = np.flatnonzero(d2 >= min_d2)
            else:
                ok = np.arange(1)
            if ok.size:
                placed[count] = cand[ok[0]]
                break
        else:
            break
    else:
        return placed
    raise CryoDDMError(f"could not place {n} particles of {diameter_px:.0f} px without overlap in a "
                       f"{nx}×{ny} micrograph (centres ≥ {margin} px from the edges); "
                       f"lower --particles or enlarge the micrographs")


@dataclass(eq=False)
class SimulatedMicrograph:
    """One micrograph and everything known about it (float32 images, as written)."""

    name: str
    noisy: np.ndarray
    clean: np.ndarray           # CTF-modulated signal, the truth a denoiser should approach
    ctf_free: np.ndarray        # the projections without CTF (defines the envelope)
    ice: np.ndarray
    defocus: float              # Å
    signal_scale: float         # clean = signal_scale × CTF(projections); noise σ is 1
    snr: float                  # measured over the envelope against the realised noise
    particles: pd.DataFrame


@dataclass(eq=False)
class Layout:
    """Where and how the particles of one micrograph are, before any image is made."""

    name: str
    defocus: float              # Å
    centres: np.ndarray         # (n, 2) int (x, y)
    rotations: Rotation | None
    conformations: np.ndarray   # (n,) 1 or 2
    subsets: np.ndarray         # (n,) 1 or 2 (RELION random halves)
    rng: np.random.Generator    # the micrograph's stream, positioned for the ice and the noise


def micrograph_layout(config: SampleConfig, index: int) -> Layout:
    """Micrograph `index`'s defocus and particles (cheap: no pixels). Its random stream depends
    only on the seed and the index, so any micrograph can be regenerated without the others."""
    rng = stream(config.seed, 1, index)
    defocus = float(rng.uniform(config.defocus_min, config.defocus_max) * 1e4)      # Å
    n = config.particles
    margin = max(int(math.ceil(config.diameter_px / 2 + 2)), config.window // 2)
    centres = place_particles(rng, n, config.shape, config.diameter_px, margin)
    rotations = Rotation.random(n, rng) if n else None
    if config.conformations == 2:
        n_a = n // 2 + (n % 2) * (index % 2)
        labels = np.array([1] * n_a + [2] * (n - n_a), dtype=np.int64)
        rng.shuffle(labels)
    else:
        labels = np.ones(n, dtype=np.int64)
    subsets = rng.integers(1, 3, n)
    return Layout(micrograph_name(index, config.n_micrographs), defocus, centres, rotations, labels,
                  subsets, rng)


def simulate_micrograph(config: SampleConfig, molecule: Molecule, index: int) -> SimulatedMicrograph:
    """Micrograph `index` of the set, reproducible on its own (see `micrograph_layout`)."""
    lay = micrograph_layout(config, index)
    rng, shape, name, defocus, n = lay.rng, config.shape, lay.name, lay.defocus, config.particles
    centres, rotations, labels, subsets = lay.centres, lay.rotations, lay.conformations, lay.subsets

    ctf_free = np.zeros(shape, dtype=np.float64)
    for k in range(n):   # one particle at a time: its bounding box stays in cache
        xy = image_positions(molecule.conformation(int(labels[k])), rotations[k], config.pixel_size)
        splat(ctf_free, xy[:, 0] + centres[k, 0], xy[:, 1] + centres[k, 1], molecule.weights,
              molecule.sigma / config.pixel_size)
    # one padded FFT of the projections serves both the CTF and the envelope's blur
    pad = max(delocalisation_px(config.pixel_size, defocus, config.voltage, config.cs),
              int(math.ceil(5 * ENVELOPE_BLUR_PX))) + 8
    spec, pshape = _padded_spectrum(ctf_free, pad, np.float32)
    signal = _filtered(spec, ctf(pshape, config.pixel_size, defocus, voltage=config.voltage,
                                 cs=config.cs, amplitude_contrast=config.amplitude_contrast,
                                 dtype=np.float32), pshape, shape)
    mask = _above(_filtered(spec, gaussian_transfer(pshape, ENVELOPE_BLUR_PX, np.float32),
                            pshape, shape), ENVELOPE_FRACTION)
    var_env = float(np.var(signal[mask], dtype=np.float64)) if mask.any() else 0.0
    scale = math.sqrt(config.snr / var_env) if var_env > 0 else 1.0   # makes the noise σ = 1
    clean = signal * np.float32(scale)
    ice = ice_field(rng, shape) * np.float32(config.ice)
    noisy = rng.standard_normal(shape).astype(np.float32)   # numpy's standard float64 draws
    noise_var = float(np.var(noisy, dtype=np.float64))
    noisy += clean
    noisy += ice
    snr = envelope_snr(clean, noise_var, mask) if mask.any() else 0.0

    angles = relion_angles(rotations) if n else np.zeros((0, 3))
    particles = pd.DataFrame({
        "micrograph": [name] * n,
        "index": np.full(n, index, dtype=np.int64),
        "x": centres[:, 0].astype(np.int64),
        "y": centres[:, 1].astype(np.int64),
        "rot": angles[:, 0], "tilt": angles[:, 1], "psi": angles[:, 2],
        "defocus": np.full(n, defocus),
        "conformation": labels,
        "subset": subsets.astype(np.int64),
    })
    return SimulatedMicrograph(name, noisy, clean, ctf_free.astype(np.float32), ice, defocus, scale,
                               snr, particles)


def default_workers() -> int:
    """Threads simulating micrographs ahead. One: each micrograph's FFTs already use every core,
    and on 2 busy cores a second thread measured slower (benchmarks/bench_sample.py)."""
    return 1


def iter_micrographs(config: SampleConfig, molecule: Molecule | None = None,
                     workers: int | None = None) -> Iterator[SimulatedMicrograph]:
    """Every micrograph of the set in order. With `workers` > 1, that many are simulated ahead in
    threads (memory stays a few micrographs); the output is identical whatever `workers` is,
    since each micrograph has its own random stream."""
    config.validate()
    molecule = molecule if molecule is not None else molecule_for(config)
    workers = default_workers() if workers is None else max(1, int(workers))
    n = config.n_micrographs
    if workers == 1 or n == 1:
        for i in range(n):
            yield simulate_micrograph(config, molecule, i)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cryoddm-sample") as pool:
        pending = deque(pool.submit(simulate_micrograph, config, molecule, i)
                        for i in range(min(workers, n)))
        nxt = len(pending)
        try:
            while pending:
                result = pending.popleft().result()
                if nxt < n:
                    pending.append(pool.submit(simulate_micrograph, config, molecule, nxt))
                    nxt += 1
                yield result
        finally:
            for f in pending:
                f.cancel()


@dataclass(eq=False)
class SampleArrays:
    """A sample set in memory. Unpacks as `noisy, clean, table = sample_arrays(config)`."""

    noisy: np.ndarray           # (n, y, x) float32
    clean: np.ndarray           # (n, y, x) float32
    table: pd.DataFrame         # one row per particle: micrograph, index, x, y, rot, tilt, psi, defocus, conformation, subset
    ctf_free: np.ndarray        # (n, y, x) float32
    ice: np.ndarray             # (n, y, x) float32
    molecule: Molecule
    config: SampleConfig
    micrographs: list[dict] = field(default_factory=list)   # name, defocus, signal_scale, snr

    def __iter__(self):
        return iter((self.noisy, self.clean, self.table))


def sample_arrays(config: SampleConfig | None = None) -> SampleArrays:
    """The whole set in memory: the same float32 pixels `generate_sample` writes."""
    config = (config or SampleConfig()).validate()
    molecule = molecule_for(config)
    n, (ny, nx) = config.n_micrographs, config.shape
    noisy, clean, free, ice = (np.empty((n, ny, nx), dtype=np.float32) for _ in range(4))
    tables, infos = [], []
    for i, sim in enumerate(iter_micrographs(config, molecule)):
        noisy[i], clean[i], free[i], ice[i] = sim.noisy, sim.clean, sim.ctf_free, sim.ice
        tables.append(sim.particles)
        infos.append(_mic_info(sim))
    return SampleArrays(noisy, clean, pd.concat(tables, ignore_index=True), free, ice, molecule,
                        config, infos)


def _mic_info(sim: SimulatedMicrograph) -> dict:
    return {"name": sim.name, "defocus_A": sim.defocus, "signal_scale": sim.signal_scale,
            "noise_sigma": 1.0, "snr_envelope": sim.snr, "particles": int(len(sim.particles))}


# ----------------------------------------------------------------------------------------------
# Files: MRC, RELION STAR, truth JSON, cryoSPARC .cs pair
# ----------------------------------------------------------------------------------------------

@dataclass
class SampleSet:
    """What `generate_sample` wrote."""

    out_dir: Path
    micrographs: list[Path]
    clean: list[Path]
    particles_star: Path
    truth_json: Path
    particles_cs: Path
    passthrough_cs: Path
    config: SampleConfig
    n_particles: int


def particles_star_tables(table: pd.DataFrame, config: SampleConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """RELION 3.1 optics and particles tables for a truth table."""
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
        "rlnMicrographPixelSize": [config.pixel_size], "rlnVoltage": [config.voltage],
        "rlnSphericalAberration": [config.cs], "rlnAmplitudeContrast": [config.amplitude_contrast],
        "rlnImagePixelSize": [config.pixel_size], "rlnImageSize": [config.window],
        "rlnImageDimensionality": [2],
    })
    n = len(table)
    particles = pd.DataFrame({
        "rlnMicrographName": table["micrograph"].astype(str).to_numpy(),
        "rlnCoordinateX": table["x"].to_numpy(np.float64),
        "rlnCoordinateY": table["y"].to_numpy(np.float64),
        "rlnAngleRot": table["rot"].to_numpy(np.float64),
        "rlnAngleTilt": table["tilt"].to_numpy(np.float64),
        "rlnAnglePsi": table["psi"].to_numpy(np.float64),
        "rlnOriginXAngst": np.zeros(n), "rlnOriginYAngst": np.zeros(n),
        "rlnDefocusU": table["defocus"].to_numpy(np.float64),
        "rlnDefocusV": table["defocus"].to_numpy(np.float64),
        "rlnDefocusAngle": np.zeros(n), "rlnPhaseShift": np.zeros(n), "rlnCtfBfactor": np.zeros(n),
        "rlnOpticsGroup": np.ones(n, dtype=np.int64),
        "rlnClassNumber": table["conformation"].to_numpy(np.int64),
        "rlnRandomSubset": table["subset"].to_numpy(np.int64),
    })
    return optics, particles


def micrograph_uids(config: SampleConfig) -> np.ndarray:
    """cryoSPARC-style uint64 uids of the micrographs (their 21-digit path prefixes)."""
    rng = stream(config.seed, 2)
    return rng.integers(1, 2 ** 63, config.n_micrographs, dtype=np.uint64)


def cs_datasets(table: pd.DataFrame, config: SampleConfig):
    """The cryoSPARC particles and passthrough datasets (cryosparc-tools `Dataset`s).

    Fields mirror a real Extract job: `blob/*` names `J2/extract/<uid:021d>_mic_000_particles.mrc`,
    `location/micrograph_path` is `J1/imported/<uid:021d>_mic_000.mrc`, `micrograph_shape` is
    [ny, nx], `center_x_frac = x/nx`, `center_y_frac = 1 − y/ny` (bottom-left origin), the pose a
    Rodrigues vector, `alignments3D/class` 0-based. The passthrough holds `location/*` and `ctf/*`.
    """
    from cryosparc.dataset import Dataset

    n = len(table)
    ny, nx = config.shape
    mic_uids = micrograph_uids(config)
    uid_rng = stream(config.seed, 3)
    uids = np.unique(uid_rng.integers(1, 2 ** 63, n + 16, dtype=np.uint64))[:n]
    uids = uid_rng.permutation(uids)
    if len(uids) < n:  # pragma: no cover - 2⁶³ makes collisions practically impossible
        raise CryoDDMError("uid collision; choose another seed")
    index = table["index"].to_numpy(np.int64)
    stems = [Path(m).stem for m in table["micrograph"]]
    prefix = [f"{int(mic_uids[i]):021d}_{s}" for i, s in zip(index, stems)]
    blob_idx = table.groupby("index").cumcount().to_numpy(np.uint32)
    rotations = Rotation.from_euler("ZYZ", table[["rot", "tilt", "psi"]].to_numpy(np.float64), degrees=True) \
        if n else None
    defocus = table["defocus"].to_numpy(np.float32)

    ctf_fields = {
        "ctf/type": np.array(["imported"] * n, dtype=object),
        "ctf/exp_group_id": np.zeros(n, np.uint32),
        "ctf/accel_kv": np.full(n, config.voltage, np.float32),
        "ctf/cs_mm": np.full(n, config.cs, np.float32),
        "ctf/amp_contrast": np.full(n, config.amplitude_contrast, np.float32),
        "ctf/df1_A": defocus, "ctf/df2_A": defocus.copy(),
        "ctf/df_angle_rad": np.zeros(n, np.float32),
        "ctf/phase_shift_rad": np.zeros(n, np.float32),
        "ctf/scale": np.ones(n, np.float32), "ctf/scale_const": np.zeros(n, np.float32),
        "ctf/bfactor": np.zeros(n, np.float32),
    }
    location_fields = {
        "location/micrograph_uid": mic_uids[index] if n else np.zeros(0, np.uint64),
        "location/exp_group_id": np.zeros(n, np.uint32),
        "location/micrograph_path": np.array([f"J1/imported/{p}.mrc" for p in prefix], dtype=object),
        "location/micrograph_shape": np.tile(np.array([ny, nx], np.uint32), (n, 1)),
        "location/center_x_frac": (table["x"].to_numpy(np.float64) / nx).astype(np.float32),
        "location/center_y_frac": (1.0 - table["y"].to_numpy(np.float64) / ny).astype(np.float32),
        "location/min_dist_A": np.full(n, config.diameter, np.float32),
    }
    particle_fields = {
        "blob/path": np.array([f"J2/extract/{p}_particles.mrc" for p in prefix], dtype=object),
        "blob/idx": blob_idx,
        "blob/shape": np.tile(np.array([config.window, config.window], np.uint32), (n, 1)),
        "blob/psize_A": np.full(n, config.pixel_size, np.float32),
        "blob/sign": np.full(n, -1.0, np.float32),
        "blob/import_sig": np.zeros(n, np.uint64),
        **ctf_fields,
        **location_fields,
        "alignments3D/split": (table["subset"].to_numpy(np.int64) - 1).astype(np.uint32),
        "alignments3D/shift": np.zeros((n, 2), np.float32),
        "alignments3D/pose": (cryosparc_pose(rotations) if n else np.zeros((0, 3))).astype(np.float32),
        "alignments3D/psize_A": np.full(n, config.pixel_size, np.float32),
        "alignments3D/class_posterior": np.ones(n, np.float32),
        "alignments3D/class": (table["conformation"].to_numpy(np.int64) - 1).astype(np.uint32),
        "alignments3D/class_ess": np.ones(n, np.float32),
    }

    def build(fields: dict) -> Dataset:
        return Dataset([("uid", uids), *fields.items()])

    return build(particle_fields), build({**location_fields, **ctf_fields})


def truth_document(table: pd.DataFrame, config: SampleConfig, molecule: Molecule,
                   micrographs: list[dict]) -> dict:
    """The truth JSON: configuration, molecule, per micrograph and per particle facts."""
    rows = table.to_dict(orient="records")
    return {
        "format": FORMAT, "version": FORMAT_VERSION, "package_version": __version__,
        "conventions": {
            "coordinates": "x = column, y = row, pixels, origin at data[0, 0] (RELION)",
            "angles": "RELION ZYZ (rot, tilt, psi), degrees; particle rotation R with A = R^T; "
                      "cryoSPARC pose = rotvec(R)",
            "defocus": "Å, underfocus positive, no astigmatism",
            "noise": "white Gaussian, sigma 1 in the micrograph's units",
            "snr": "var(clean over envelope) / var(noise); envelope: CTF-free projection blurred "
                   f"{ENVELOPE_BLUR_PX} px > {ENVELOPE_FRACTION} of its maximum",
        },
        "config": to_jsonable(config),
        "window": config.window, "diameter_px": config.diameter_px,
        "molecule": molecule.summary(),
        "micrographs": to_jsonable(micrographs),
        "particles": [{"micrograph": r["micrograph"], "index": int(r["index"]),
                       "x": int(r["x"]), "y": int(r["y"]),
                       "rot": float(r["rot"]), "tilt": float(r["tilt"]), "psi": float(r["psi"]),
                       "defocus": float(r["defocus"]), "conformation": int(r["conformation"]),
                       "subset": int(r["subset"])} for r in rows],
    }


# what a sample folder holds (recognised for --overwrite in folders written before markers)
SAMPLE_LAYOUT = ("micrographs/*.mrc", "clean/*.mrc", "particles.star", "particles.cs",
                 "passthrough.cs", "truth.json")


def _is_sample_folder(folder: Path) -> bool:
    try:
        return json.loads((folder / "truth.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def generate_sample(out_dir: str | Path, config: SampleConfig | None = None,
                    cancel: CancelToken | None = None, overwrite: bool = False) -> Job[SampleSet]:
    """Write a sample set (a job: one progress event per micrograph, then the tables).

    Layout of `out_dir`: `micrographs/mic_000.mrc …` (noisy, float32, voxel size set),
    `clean/mic_000.mrc …` (the CTF-modulated signal), `particles.star` (RELION 3.1),
    `truth.json`, `particles.cs` + `passthrough.cs` (cryoSPARC). Everything is written into
    `OUT.partial/` and renamed when complete; a stopped run leaves only `OUT.partial/`.
    """
    config = (config or SampleConfig()).validate()
    out_dir = Path(out_dir)
    molecule = molecule_for(config)
    total = config.n_micrographs + 1
    tables: list[pd.DataFrame] = []
    infos: list[dict] = []
    names: list[str] = []
    label = (f"napari-cryoddm {__version__} sample seed {config.seed} SNR {config.snr:g} "
             f"{config.pixel_size:g} A/px")
    with atomic_dir(out_dir, overwrite=overwrite, kind="sample", layout=SAMPLE_LAYOUT,
                    manifest=_is_sample_folder) as tmp:
        (tmp / "micrographs").mkdir()
        (tmp / "clean").mkdir()
        for sim in iter_micrographs(config, molecule):
            if cancel is not None:
                cancel.raise_if_cancelled()
            write_mrc(tmp / "micrographs" / sim.name, sim.noisy, voxel_size=config.pixel_size,
                      labels=[label, f"{sim.name}: noisy, defocus {sim.defocus:.0f} A"], stamp=False)
            write_mrc(tmp / "clean" / sim.name, sim.clean, voxel_size=config.pixel_size,
                      labels=[label, f"{sim.name}: clean CTF-modulated signal (truth)"], stamp=False)
            tables.append(sim.particles)
            infos.append(_mic_info(sim))
            names.append(sim.name)
            yield Progress(len(names), total, sim.name,
                           {"path": str(out_dir / "micrographs" / sim.name)})
        if cancel is not None:
            cancel.raise_if_cancelled()
        table = pd.concat(tables, ignore_index=True)
        optics, particles = particles_star_tables(table, config)
        write_particles_star(tmp / "particles.star", particles, optics,
                             header=f"{label}: particles (truth)")
        particles_cs, passthrough_cs = cs_datasets(table, config)
        for name, ds in (("particles.cs", particles_cs), ("passthrough.cs", passthrough_cs)):
            with atomic_write(tmp / name) as t:
                with open(t, "wb") as fh:
                    ds.save(fh)
        with atomic_write(tmp / "truth.json") as t:
            t.write_text(json.dumps(truth_document(table, config, molecule, infos), indent=1) + "\n")
        yield Progress(total, total, "tables written")
    return SampleSet(
        out_dir=out_dir,
        micrographs=[out_dir / "micrographs" / n for n in names],
        clean=[out_dir / "clean" / n for n in names],
        particles_star=out_dir / "particles.star",
        truth_json=out_dir / "truth.json",
        particles_cs=out_dir / "particles.cs",
        passthrough_cs=out_dir / "passthrough.cs",
        config=config,
        n_particles=int(len(table)),
    )


def read_truth(path: str | Path) -> tuple[dict, pd.DataFrame]:
    """A sample set's truth JSON (the folder or the file) → (document, particle table)."""
    path = Path(path)
    if path.is_dir():
        path = path / "truth.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        from .errors import InputError
        raise InputError(path, "no such file") from None
    except (OSError, ValueError) as exc:
        from .errors import InputError
        raise InputError(path, f"not a readable truth JSON ({exc})") from None
    if doc.get("format") != FORMAT:
        from .errors import InputError
        raise InputError(path, f"not a napari-cryoddm sample truth file (format {doc.get('format')!r})")
    return doc, pd.DataFrame(doc["particles"], columns=TRUTH_COLUMNS)


def config_from_truth(doc: dict) -> SampleConfig:
    """The SampleConfig a truth document was written with."""
    names = {f.name for f in dataclasses.fields(SampleConfig)}
    return SampleConfig(**{k: v for k, v in doc["config"].items() if k in names})
