"""cryoSPARC poses (rotation vectors) → RELION rotation matrices → RELION's ZYZ Euler angles."""

from __future__ import annotations

import numpy as np


def rotvec_to_relion_matrix(rotvec: np.ndarray) -> np.ndarray:
    """cryoSPARC pose (rotation vector, N×3) → RELION rotation matrices (N×3×3).

    RELION's matrix is the transpose of the rotation the vector describes (Rodrigues formula).
    """
    v = np.asarray(rotvec, dtype=np.float64).reshape(-1, 3)
    theta = np.linalg.norm(v, axis=1)
    safe = np.where(theta > 1e-12, theta, 1.0)
    k = v / safe[:, None]
    kx, ky, kz = k[:, 0], k[:, 1], k[:, 2]
    zero = np.zeros_like(kx)
    kmat = np.stack([np.stack([zero, -kz, ky], -1), np.stack([kz, zero, -kx], -1), np.stack([-ky, kx, zero], -1)], -2)
    s = np.sin(theta)[:, None, None]
    c = (1.0 - np.cos(theta))[:, None, None]
    r = np.eye(3)[None] + s * kmat + c * (kmat @ kmat)
    r[theta <= 1e-12] = np.eye(3)
    return np.ascontiguousarray(r.transpose(0, 2, 1))


def relion_euler_to_matrix(rot: np.ndarray, tilt: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """RELION's Euler_angles2matrix (ZYZ, degrees) for arrays of angles."""
    a, b, g = (np.deg2rad(np.asarray(x, dtype=np.float64)) for x in (rot, tilt, psi))
    ca, cb, cg, sa, sb, sg = np.cos(a), np.cos(b), np.cos(g), np.sin(a), np.sin(b), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return np.stack(
        [
            np.stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], -1),
            np.stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], -1),
            np.stack([sc, ss, cb], -1),
        ],
        -2,
    )


def matrix_to_relion_euler(r: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RELION rotation matrices (N×3×3) → (rot, tilt, psi) in degrees, RELION's decomposition
    (tilt in [0°, 180°]; at tilt 0°/180° rot is 0 and psi carries the in-plane angle)."""
    r = np.asarray(r, dtype=np.float64).reshape(-1, 3, 3)
    abs_sb = np.hypot(r[:, 0, 2], r[:, 1, 2])
    regular = abs_sb > 16 * np.finfo(np.float64).eps
    psi = np.arctan2(r[:, 1, 2], -r[:, 0, 2])
    rot = np.arctan2(r[:, 2, 1], r[:, 2, 0])
    tilt = np.arctan2(abs_sb, r[:, 2, 2])  # sin(tilt) ≥ 0: RELION's branch
    top = r[:, 2, 2] > 0
    psi_deg = np.where(top, np.arctan2(-r[:, 1, 0], r[:, 0, 0]), np.arctan2(r[:, 1, 0], -r[:, 0, 0]))
    rot = np.where(regular, rot, 0.0)
    tilt = np.where(regular, tilt, np.where(top, 0.0, np.pi))
    psi = np.where(regular, psi, psi_deg)
    return np.rad2deg(rot), np.rad2deg(tilt), np.rad2deg(psi)
