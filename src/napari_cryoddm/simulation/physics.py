"""The image formation of the synthetic micrographs: a pseudo-atomic molecule, its projections
at RELION/cryoSPARC poses, the CTF, the particle envelope (where SNR is measured) and the ice.

Conventions are those of `sample` (arrays [y, x]; p_image = Rᵀ·p; RELION's ZYZ angles;
cryoSPARC's pose is R.as_rotvec()).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import fft as sfft
from scipy import special
from scipy.spatial.transform import Rotation

from ..errors import CryoDDMError

ICE_K = 3.0  # ice: Fourier support |k| ≤ 3 cycles per image


ENVELOPE_BLUR_PX = 3.0  # envelope: CTF-free projection blurred by 3 px …


ENVELOPE_FRACTION = 0.05  # … above 5 % of its maximum


ATOM_SIGMA_A = 2.0  # Gaussian atom width (Å)


DOMAIN_FRACTION = 0.2  # conformation B turns a rigid domain holding 20 % of the atoms


def stream(seed: int, *key: int) -> np.random.Generator:
    """An independent random stream per purpose and micrograph (SeedSequence spawn keys): 0 the
    molecule, (1, i) micrograph i, 2 micrograph uids, 3 particle uids."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in key)))


@dataclass(eq=False)
class Molecule:
    """Gaussian pseudo-atoms in Å, centred on conformation A's centre of mass.

    `coords[0]` is conformation A, `coords[1]` conformation B (the domain turned about the hinge;
    identical to A when the hinge angle is 0). Both share one frame: the body does not move.
    """

    coords: np.ndarray  # (2, N, 3) Å, x y z
    weights: np.ndarray  # (N,)
    sigma: float  # atom Gaussian σ, Å
    domain: np.ndarray  # (N,) bool: atoms that turn in conformation B
    hinge_point: np.ndarray  # (3,) Å
    hinge_axis: np.ndarray  # (3,) unit vector
    hinge_angle: float  # degrees
    diameter: float  # Å (no atom centre lies further than diameter/2 from the origin)

    def conformation(self, k: int) -> np.ndarray:
        """Atom coordinates (N, 3) of conformation k = 1 (A) or 2 (B)."""
        if k not in (1, 2):
            raise CryoDDMError(f"conformation must be 1 or 2, got {k}")
        return self.coords[k - 1]

    def summary(self) -> dict:
        return {
            "atoms": int(self.weights.size),
            "diameter_A": self.diameter,
            "atom_sigma_A": self.sigma,
            "domain_atoms": int(self.domain.sum()),
            "hinge_point_A": self.hinge_point.tolist(),
            "hinge_axis": self.hinge_axis.tolist(),
            "hinge_angle_deg": self.hinge_angle,
        }


def build_molecule(
    diameter: float = 135.0, atoms: int = 2000, hinge_angle: float = 12.0, seed: int = 0, sigma: float = ATOM_SIGMA_A
) -> Molecule:
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
    centres[0] = 0.0  # a core that every lobe touches
    axes = rng.uniform(0.2, 0.36, (n_lobes, 3)) * radius
    axes[0] = rng.uniform(0.36, 0.45, 3) * radius
    frames = Rotation.random(n_lobes, rng).as_matrix()  # (L, 3, 3)
    pts: list[np.ndarray] = []
    have = 0
    while have < atoms:
        cand = rng.uniform(-radius, radius, (4 * atoms, 3))
        inside = np.zeros(len(cand), dtype=bool)
        for c, a, f in zip(centres, axes, frames):
            local = (cand - c) @ f  # coordinates in the lobe's frame
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
    inner = order[max(0, n_dom - max(1, n_dom // 10)) : n_dom]  # the domain's inner boundary
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
    return Molecule(
        coords=np.stack([xyz * scale, xyz_b * scale]),
        weights=weights,
        sigma=float(sigma),
        domain=domain,
        hinge_point=pivot * scale,
        hinge_axis=axis,
        hinge_angle=float(hinge_angle),
        diameter=float(diameter),
    )


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
    rotated = np.einsum("nk,kj->nj", coords, rotation.as_matrix())  # row-vector form of Rᵀ·p (no BLAS threads)
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
    edges = np.arange(-r, r + 2) - 0.5  # 2r+2 pixel edges around the centre
    s = 1.0 / (sigma_px * math.sqrt(2.0))
    ex = special.erf(((cx - x)[:, None] + edges[None, :]) * s)
    ey = special.erf(((cy - y)[:, None] + edges[None, :]) * s)
    wx = 0.5 * np.diff(ex, axis=1)  # (N, 2r+1)
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


def project(
    molecule: Molecule,
    rotation: Rotation,
    pixel_size: float,
    box: int | tuple[int, int],
    conformation: int = 1,
    center: tuple[float, float] | None = None,
) -> np.ndarray:
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


def ctf(
    shape: tuple[int, int],
    pixel_size: float,
    defocus_u: float,
    defocus_v: float | None = None,
    defocus_angle: float = 0.0,
    voltage: float = 300.0,
    cs: float = 2.7,
    amplitude_contrast: float = 0.07,
    phase_shift: float = 0.0,
    bfactor: float = 0.0,
    half: bool = True,
    dtype: type = np.float64,
) -> np.ndarray:
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
            2.0 * (theta - np.deg2rad(defocus_angle))
        )
    q = amplitude_contrast
    # √(1−Q²)·sin χ + Q·cos χ = sin(χ + asin Q): one transcendental per pixel
    chi = k2 * (dtype(np.pi * lam) * df - dtype(0.5 * np.pi * (cs * 1e7) * lam**3) * k2)
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
    return np.exp(dtype(-2.0 * np.pi**2 * sigma_px**2) * (kx * kx + ky * ky))


def delocalisation_px(pixel_size: float, defocus: float, voltage: float = 300.0, cs: float = 2.7) -> int:
    """How far (px) the CTF spreads signal at Nyquist: λΔf·k + Cs·λ³·k³, k = 1/(2·pixel size)."""
    lam = electron_wavelength(voltage)
    k = 0.5 / pixel_size
    return int(math.ceil((lam * defocus * k + cs * 1e7 * lam**3 * k**3) / pixel_size))


def padded_spectrum(image: np.ndarray, pad: int, dtype: type) -> tuple[np.ndarray, tuple[int, int]]:
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


def filtered(spec: np.ndarray, transfer: np.ndarray, shape: tuple[int, int], crop: tuple[int, int]) -> np.ndarray:
    return sfft.irfft2(spec * transfer, s=shape, workers=-1)[: crop[0], : crop[1]]


def apply_ctf(
    image: np.ndarray,
    pixel_size: float,
    defocus: float,
    voltage: float = 300.0,
    cs: float = 2.7,
    amplitude_contrast: float = 0.07,
    pad: int | None = None,
    dtype: type = np.float64,
) -> np.ndarray:
    """Convolve with the CTF (constant defocus), zero-padded so signal does not wrap around."""
    if pad is None:
        pad = delocalisation_px(pixel_size, defocus, voltage, cs) + 8
    spec, shape = padded_spectrum(image, pad, dtype)
    transfer = ctf(
        shape, pixel_size, defocus, voltage=voltage, cs=cs, amplitude_contrast=amplitude_contrast, dtype=dtype
    )
    return filtered(spec, transfer, shape, image.shape)


def above_fraction(blurred: np.ndarray, fraction: float) -> np.ndarray:
    peak = float(blurred.max())
    if peak <= 0:
        return np.zeros(blurred.shape, dtype=bool)
    return blurred > fraction * peak


def envelope(
    ctf_free: np.ndarray, blur_px: float = ENVELOPE_BLUR_PX, fraction: float = ENVELOPE_FRACTION
) -> np.ndarray:
    """Where the particles are: the CTF-free projection blurred by a Gaussian of `blur_px` (zero
    outside the image) above `fraction` of its maximum — the SNR definition's mask."""
    image = np.asarray(ctf_free, dtype=np.float64)
    spec, shape = padded_spectrum(image, int(math.ceil(5 * blur_px)) + 1, np.float64)
    return above_fraction(filtered(spec, gaussian_transfer(shape, blur_px), shape, image.shape), fraction)


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
    support = (ky[rows, None] ** 2 + kx[None, cols] ** 2 <= k_max**2 + 1e-9) & (
        (ky[rows, None] != 0) | (kx[None, cols] != 0)
    )
    n = int(support.sum())
    coef = np.zeros(support.shape, dtype=np.complex128)
    coef[support] = rng.standard_normal(n) + 1j * rng.standard_normal(n)
    # irfft2 counts each kx > 0 column twice (its mirror image); kx = 0 once
    coef[:, kx[cols] > 0] *= 2.0
    ey = np.exp(2j * np.pi * np.outer(np.arange(ny), ky[rows]) / ny)
    ex = np.exp(2j * np.pi * np.outer(kx[cols], np.arange(nx)) / nx)
    # einsum, not @: with an inner dimension of 4, BLAS threads only add overhead (measured 30×)
    left = np.einsum("ik,kj->ij", ey, coef)  # (ny, modes) complex, small
    field_ = np.einsum("ik,kj->ij", left.real.astype(np.float32), ex.real.astype(np.float32))
    field_ -= np.einsum("ik,kj->ij", left.imag.astype(np.float32), ex.imag.astype(np.float32))
    field_ /= np.float32(field_.std(dtype=np.float64))
    return field_
