"""The CT chest phantom's normal anatomy: tissue labels and their HU, the torso, lungs and lobes, heart, aorta,
airway and skeleton on a given grid, and the geometry the findings are drawn with.

Axes ``(z, y, x)``: z head to feet, y anterior to posterior, x from the patient's right (see
:mod:`medvl.data.phantoms`). The anatomy scales with the field of view, so any grid shows the same torso.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from medvl.data.phantoms.geometry import checked_geometry

#: The CT phantom's default grid: (z, y, x) voxels and their spacing in mm.
CT_SHAPE = (64, 96, 96)
CT_SPACING = (5.0, 3.5, 3.5)

# Each tissue of the label map: (name, mean HU, sd of the per-phantom jitter); its label is its position.
# Contrast enhancement replaces the values of some (make_ct_phantom).
_TISSUES = (
    ("air", -1000, 0),
    ("skin", 30, 5),
    ("subcutaneous fat", -100, 8),
    ("muscle", 45, 4),
    ("right lung", -850, 12),
    ("left lung", -850, 12),
    ("mediastinal fat", -90, 8),
    ("heart", 40, 4),  # unenhanced blood pool + myocardium
    ("aorta", 40, 4),  # unenhanced
    ("airway", -990, 3),
    ("bone", 550, 40),  # vertebrae, sternum
    ("intervertebral disc", 80, 8),
    ("spinal canal", 15, 4),  # CSF/cord
    ("liver", 55, 4),
    ("rib", 750, 60),
)
#: Tissue label map of the CT phantom (``CTPhantom.tissue``); findings are not in it.
CT_TISSUES: dict[int, str] = {label: name for label, (name, _, _) in enumerate(_TISSUES)}
#: (mean HU, sd of the per-phantom jitter) of each label.
TISSUE_HU = np.array([(mean, sd) for _, mean, sd in _TISSUES], dtype=np.float32)
(AIR, SKIN, FAT, MUSCLE, LUNG_R, LUNG_L, MEDIASTINAL_FAT, HEART, AORTA, AIRWAY, BONE, DISC, CANAL, LIVER,
 RIB) = range(len(_TISSUES))
LUNG = {"right": LUNG_R, "left": LUNG_L}

# Lobes approximated along z as fractions of the lung height (apex = 0, dome = 1).
LOBE_FRACTIONS = {
    "right": {"upper lobe": (0.0, 0.42), "middle lobe": (0.42, 0.62), "lower lobe": (0.62, 1.0)},
    "left": {"upper lobe": (0.0, 0.45), "lingula": (0.45, 0.62), "lower lobe": (0.62, 1.0)},
}


# The body sizes a phantom is drawn from (semi-axes of the torso relative to the reference).
BODY_SCALES = (0.92, 0.97, 1.02)


class CTAnatomy:
    """Label map, coordinates and the geometry findings need; arrays are read-only."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float], variant: int):
        Z, Y, X = shape
        sz, sy, sx = spacing
        self.shape, self.spacing = shape, spacing
        kz = Z * sz / 320.0  # reference torso: 320 mm cranio-caudal
        kxy = min(Y * sy, X * sx) / 336.0  # and a 336 mm field of view
        s = BODY_SCALES[variant]

        def Lz(v: float) -> float:
            return v * kz

        def L(v: float) -> float:
            return v * kxy

        self.kz, self.kxy = kz, kxy
        self.offset = np.array([0.5 * sz, -(Y - 1) / 2 * sy, -(X - 1) / 2 * sx])
        z1 = ((np.arange(Z) + 0.5) * sz).astype(np.float32)
        y1 = ((np.arange(Y) - (Y - 1) / 2) * sy).astype(np.float32)
        x1 = ((np.arange(X) - (X - 1) / 2) * sx).astype(np.float32)
        self.z1, self.y1, self.x1 = z1, y1, x1
        z, y, x = z1[:, None, None], y1[None, :, None], x1[None, None, :]
        y2, x2 = y1[:, None], x1[None, :]

        def ell2(cy: float, cx: float, ay: float, ax: float) -> np.ndarray:
            return ((y2 - cy) / ay) ** 2 + ((x2 - cx) / ax) ** 2

        by, bx = L(105) * s, L(150) * s
        self.body_axes = (by, bx)
        lab2 = np.zeros((Y, X), np.uint8)
        lab2[ell2(0, 0, by, bx) <= 1] = SKIN
        lab2[ell2(0, 0, by - L(2), bx - L(2)) <= 1] = FAT
        lab2[ell2(0, 0, by - L(14), bx - L(16)) <= 1] = MUSCLE
        cav2 = ell2(0, 0, by - L(26), bx - L(28)) <= 1
        lab = np.empty(shape, np.uint8)
        lab[:] = lab2

        # Diaphragm: a dome, lower laterally and posteriorly, the right side a little higher.
        r2 = np.clip((x2 / (L(110) * s)) ** 2 + ((y2 - L(10)) / (L(85) * s)) ** 2, 0, 1)
        zdia = Lz(250) + Lz(30) * r2 - Lz(6) * (x2 < 0)
        above = z < zdia[None]
        lab[cav2[None] & above] = MEDIASTINAL_FAT
        lab[cav2[None] & ~above] = LIVER

        # Lungs: ellipses whose cross-section grows from the apex, cut by cavity and diaphragm.
        self.lung = {}
        apex, dome = Lz(15), Lz(250)
        for side, cx, ax in (("right", -66.0, 50.0), ("left", 68.0, 48.0)):
            cx, ax, cy, ay = L(cx) * s, L(ax) * s, L(8) * s, L(80) * s
            t = (z1 - apex) / (dome - apex)
            sc = np.sqrt(np.clip(t / 0.3, 0, 1))[:, None, None]
            q = ((y - cy) / ay) ** 2 + ((x - cx) / ax) ** 2
            m = (q <= sc**2) & (t > 0)[:, None, None] & above & cav2[None]
            lab[m] = LUNG[side]
            inner = m & (q <= (0.5 * sc) ** 2)
            self.lung[side] = dict(cx=cx, cy=cy, ax=ax, ay=ay, apex=apex, dome=dome, inner=inner)

        # Heart, anterior and to the left, above the diaphragm.
        self.heart = (Lz(200), L(-22) * s, L(18) * s, Lz(50), L(50) * s, L(62) * s)  # (c, semi-axes)
        hz, hy, hx, az, ay_, ax_ = self.heart
        heart = (((z - hz) / az) ** 2 + ((y - hy) / ay_) ** 2 + ((x - hx) / ax_) ** 2 <= 1) & above
        lab[heart] = HEART

        # Aorta: ascending, arch, descending (radius ~13 mm).
        ra = L(13)
        asc, desc = (L(-30) * s, L(-8) * s), (L(28) * s, L(22) * s)
        self.aorta_radius, self.aorta_asc, self.aorta_desc = ra, asc, desc
        self.aorta_z = (Lz(78), Lz(100), Lz(160))  # arch top, arch bottom, ascending ends in heart
        d_asc = (y2 - asc[0]) ** 2 + (x2 - asc[1]) ** 2 <= ra**2
        d_desc = (y2 - desc[0]) ** 2 + (x2 - desc[1]) ** 2 <= ra**2
        d_arch = _segment_dist2(y2, x2, asc, desc) <= ra**2
        zz = z1[:, None, None]
        lab[d_desc[None] & (zz >= Lz(88))] = AORTA
        lab[d_asc[None] & (zz >= Lz(88)) & (zz <= Lz(160))] = AORTA
        lab[d_arch[None] & (zz >= Lz(78)) & (zz <= Lz(100))] = AORTA

        # Airway: trachea to the carina, main bronchi towards the hila.
        lab[((((y2 + L(5)) ** 2 + x2**2) <= L(9) ** 2)[None]) & (zz <= Lz(112))] = AIRWAY
        for hxb in (-L(42) * s, L(42) * s):
            d2 = _segment_dist2_3d(z, y, x, (Lz(112), L(-5), 0.0), (Lz(138), L(2), hxb))
            lab[d2 <= L(6) ** 2] = AIRWAY

        # Spine: vertebral bodies with discs, spinal canal, posterior elements; sternum; ribs.
        self.vertebra_center = (L(48), 0.0)  # (y, x) mm of the vertebral bodies' axis
        vb = (y2 - self.vertebra_center[0]) ** 2 + (x2 - self.vertebra_center[1]) ** 2 <= L(17) ** 2
        disc = ((z1 % Lz(27)) < Lz(6))[:, None, None]
        lab[vb[None] & ~disc] = BONE
        lab[vb[None] & disc] = DISC
        rc = np.sqrt((y2 - L(76)) ** 2 + x2**2)
        post = ((rc > L(7)) & (rc <= L(13)) & (y2 >= L(70))) | (
            (np.abs(x2) < L(4)) & (y2 >= L(82)) & (y2 <= L(100) * s)
        )
        lab[:, post] = BONE
        lab[:, rc <= L(7)] = CANAL
        stern = (np.abs(x2) <= L(16)) & (y2 >= -by + L(14)) & (y2 <= -by + L(24))
        lab[stern[None] & (zz >= Lz(55)) & (zz <= Lz(230))] = BONE
        ring = (ell2(0, 0, by - L(20), bx - L(20)) <= 1) & (ell2(0, 0, by - L(27), bx - L(27)) > 1)
        ring &= ~((np.abs(x2) < L(22)) & (y2 < 0)) & ~((np.abs(x2) < L(28)) & (y2 > 0))
        zeff = z + Lz(30) * (y / by)  # ribs run obliquely: posterior ends more cranial
        ribs = ring[None] & (np.cos(2 * np.pi * zeff / Lz(26)) > 0.55) & (zz >= Lz(10)) & (zz <= Lz(275))
        lab[ribs] = RIB

        for side in ("right", "left"):
            self.lung[side]["inner"] &= lab == LUNG[side]
        lab.setflags(write=False)
        self.labels = lab
        lungs = (lab == LUNG_R) | (lab == LUNG_L)
        self.lungf = lungs.astype(np.float32)
        self.lungf.setflags(write=False)

        # Smooth lung texture: a field a little larger than the volume, cropped at random offsets.
        trng = np.random.default_rng(20240611)
        pad = 8
        gz, gy, gx = (np.arange(n + pad, dtype=np.float32) for n in shape)
        tex = np.zeros((Z + pad, Y + pad, X + pad), np.float32)
        for _ in range(6):
            k = trng.normal(0, 0.55, 3)
            ph = trng.uniform(0, 2 * np.pi)
            tex += np.cos(k[0] * gz[:, None, None] + k[1] * gy[None, :, None] + k[2] * gx[None, None, :] + ph)
        tex /= tex.std() + 1e-6
        tex.setflags(write=False)
        self.texture, self.pad = tex, pad

        # Lobe slice ranges (z index half-open intervals) and emphysema candidates (upper lungs).
        self.lobes: dict[tuple[str, str], tuple[int, int]] = {}
        for side, fr in LOBE_FRACTIONS.items():
            g = self.lung[side]
            for lobe, (a, b) in fr.items():
                z0 = g["apex"] + a * (g["dome"] - g["apex"])
                z1_ = g["apex"] + b * (g["dome"] - g["apex"])
                if b >= 1.0:
                    z1_ = Z * sz  # lower lobes include the posterior/lateral recesses
                i0 = int(np.searchsorted(z1, z0))
                i1 = max(int(np.searchsorted(z1, z1_)), i0 + 1)
                self.lobes[(side, lobe)] = (i0, min(i1, Z))
        self.emph_candidates = {}
        for side in ("right", "left"):
            g = self.lung[side]
            zlim = g["apex"] + 0.65 * (g["dome"] - g["apex"])
            m = (lab == LUNG[side]) & (z1 <= zlim)[:, None, None]
            self.emph_candidates[side] = np.flatnonzero(m)

    # -- helpers used by the finding routines -------------------------------------------------

    def index_of_mm(self, c_mm: Sequence[float]) -> tuple[int, int, int]:
        idx = np.rint((np.asarray(c_mm, float) - self.offset) / np.asarray(self.spacing)).astype(int)
        return tuple(int(np.clip(i, 0, n - 1)) for i, n in zip(idx, self.shape))

    def ellipsoid(self, c_idx: Sequence[int], r_mm: Sequence[float]):
        """Bounding-box slices and the local bool mask of an ellipsoid centred on a voxel."""
        sp = np.asarray(self.spacing)
        r = np.maximum(np.asarray(r_mm, float), 1e-3)
        half = np.floor(r / sp).astype(int)
        sl, grids = [], []
        for a in range(3):
            lo, hi = max(c_idx[a] - half[a], 0), min(c_idx[a] + half[a] + 1, self.shape[a])
            sl.append(slice(lo, hi))
            grids.append(((np.arange(lo, hi) - c_idx[a]) * sp[a] / r[a]) ** 2)
        d = grids[0][:, None, None] + grids[1][None, :, None] + grids[2][None, None, :]
        return tuple(sl), d <= 1.0


def _segment_dist2(y, x, a, b):
    """Squared 2D distance from points (y, x) to the segment a-b (points as (y, x))."""
    ay, ax = a
    by, bx = b
    vy, vx = by - ay, bx - ax
    t = np.clip(((y - ay) * vy + (x - ax) * vx) / (vy * vy + vx * vx), 0, 1)
    return (y - ay - t * vy) ** 2 + (x - ax - t * vx) ** 2


def _segment_dist2_3d(z, y, x, a, b):
    v = [b[i] - a[i] for i in range(3)]
    vv = sum(c * c for c in v)
    t = np.clip(((z - a[0]) * v[0] + (y - a[1]) * v[1] + (x - a[2]) * v[2]) / vv, 0, 1)
    return (z - a[0] - t * v[0]) ** 2 + (y - a[1] - t * v[1]) ** 2 + (x - a[2] - t * v[2]) ** 2


@functools.lru_cache(maxsize=16)
def ct_anatomy(shape: tuple[int, int, int], spacing: tuple[float, float, float], variant: int) -> CTAnatomy:
    """The anatomy of body size ``BODY_SCALES[variant]`` on a checked grid, built once per process."""
    return CTAnatomy(shape, spacing, variant)



def ct_lobe_slices(
    shape: Sequence[int] = CT_SHAPE, spacing: Sequence[float] = CT_SPACING
) -> dict[tuple[str, str], tuple[int, int]]:
    """``{(side, lobe): (first_slice, end_slice)}`` (half-open, 0-based) of the phantom's lobes."""
    shape, spacing = checked_geometry(shape, spacing)
    return dict(ct_anatomy(shape, spacing, 1).lobes)
