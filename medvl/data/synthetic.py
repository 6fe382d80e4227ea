"""Synthetic CT chest and MR head phantoms with matching reports and DICOM-like metadata.

No real patient data can be downloaded in this project, so these phantoms are the embedded default
for demos and tests. Everything is plain numpy and deterministic by ``seed``.

CT chest phantom (:func:`make_ct_phantom`)
    ``volume`` is int16 Hounsfield units, shape ``(z, y, x)`` = (slices, rows, cols):

    * ``z``: slice index from **head to feet** (slice 0 is the most cranial, above the lung apices;
      the last slice is below the diaphragm). Reports cite ``image N`` with ``N = slice_index + 1``.
    * ``y``: rows from **anterior** (row 0) to **posterior**.
    * ``x``: columns from the **patient's right** (col 0) to the patient's left, i.e. the
      radiological display convention, so the right lung lies in the low-``x`` half.

    ``spacing`` is in mm, ``(z, y, x)``. The anatomy scales with the field of view, so other shapes
    and spacings give the same torso resampled; lesion sizes are in real millimetres.

    Randomness is split into independent streams derived from ``seed`` (anatomy/tissue jitter,
    findings, noise, report wording), so ``make_ct_phantom(s, findings=[...])`` and
    ``make_ct_phantom(s, findings=[])`` share anatomy and noise exactly and differ only where the
    findings were drawn: counterfactual pairs for free.

MR head phantom (:func:`make_mr_phantom`)
    Tissue labels x (PD, T1, T2) at 1.5 T or 3 T through the standard signal equations; metadata
    uses DICOM keywords. Orientation depends on the plane (see :func:`make_mr_phantom`).

Tissue values (representative, not patient specific):

* CT (HU): air -1000; lung parenchyma -850 (normal inspiratory lung ~ -700..-900); fat -100
  (-50..-150); muscle 45; unenhanced blood/heart 40 (30..45); aorta 40 unenhanced, 150..300
  enhanced; liver 55 (100 enhanced); water/effusion 0..20; vertebral bone ~550, ribs ~750 (trabecular
  300..700, cortical >1000); ground glass -600..-450; emphysema < -950 (the LAA-950 threshold);
  calcification > 130 (Agatston threshold), drawn at 500..1000.
* MR: see :data:`MR_TISSUE_PARAMS` (values in the range reported by Wansapura et al., JMRI 1999
  (3 T); Stanisz et al., MRM 2005 (1.5/3 T, incl. blood); Gold et al., AJR 2004 (fat); the review of
  Bojorquez et al., MRI 2017). WM/GM proton densities 0.70/0.80 relative to CSF (water content).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from medvl.data.metadata import MR_METADATA_KEYS

__all__ = [
    "HELD_OUT_SEED",
    "CT_FINDINGS",
    "CT_SURFACE_FORMS",
    "CT_TISSUES",
    "Finding",
    "CTPhantom",
    "make_ct_phantom",
    "ct_report",
    "ct_lobe_slices",
    "MR_SEQUENCES",
    "MR_TISSUES",
    "MR_TISSUE_PARAMS",
    "MR_IMAGE_INDEPENDENT_TAGS",
    "MR_METADATA_KEYS",
    "MRPhantom",
    "make_mr_phantom",
    "mr_signal",
    "make_phantom_set",
]

#: The seed of held-out phantom sets (evaluation, the trainer's diagnostics): phantom i of a set comes from
#: (seed, i), and training runs use small seeds, so no held-out phantom is ever trained on.
HELD_OUT_SEED = 100_000

# ------------------------------------------------------------------------------------------------
# CT: vocabulary
# ------------------------------------------------------------------------------------------------

#: Findings the CT phantom can draw, named exactly as CT-RATE's abnormality classes.
CT_FINDINGS: tuple[str, ...] = (
    "Lung nodule",
    "Pleural effusion",
    "Consolidation",
    "Emphysema",
    "Cardiomegaly",
    "Atelectasis",
    "Pericardial effusion",
    "Lymphadenopathy",
    "Lung opacity",
    "Arterial wall calcification",
)

#: Lower-case surface forms the reports use for each finding (positive or negated).
CT_SURFACE_FORMS: dict[str, tuple[str, ...]] = {
    "Lung nodule": ("lung nodule", "nodule"),
    "Pleural effusion": ("pleural effusion",),
    "Consolidation": ("consolidation",),
    "Emphysema": ("emphysema", "emphysematous"),
    "Cardiomegaly": ("cardiomegaly", "enlarged heart"),
    "Atelectasis": ("atelectasis",),
    "Pericardial effusion": ("pericardial effusion",),
    "Lymphadenopathy": ("lymphadenopathy", "lymph node"),
    "Lung opacity": ("lung opacity", "ground-glass opacity", "opacity"),
    "Arterial wall calcification": (
        "arterial wall calcification",
        "atherosclerotic calcification",
        "calcification",
    ),
}

SIDES = ("left", "right", "bilateral")

# Nodule diameters (mm) by size word. Large enough to cover voxels at the default 64 x 64 x 32 input
# (3.5 x 3.5 x 5 mm): a 7 mm nodule changed about 5 voxels there, below what any model learns to see.
_NODULE_MM = {"small": (14.0, 18.0), "moderate": (20.0, 26.0), "large": (28.0, 36.0)}
LOBES = ("upper lobe", "middle lobe", "lower lobe", "lingula")
SIZES = ("small", "moderate", "large")
SEVERITIES = ("mild", "moderate", "severe")

# Lobes approximated along z as fractions of the lung height (apex = 0, dome = 1).
_LOBE_FRACTIONS = {
    "right": {"upper lobe": (0.0, 0.42), "middle lobe": (0.42, 0.62), "lower lobe": (0.62, 1.0)},
    "left": {"upper lobe": (0.0, 0.45), "lingula": (0.45, 0.62), "lower lobe": (0.62, 1.0)},
}

# Tissue label map of the CT phantom (``CTPhantom.tissue``); findings are not in it.
CT_TISSUES: dict[int, str] = {
    0: "air",
    1: "skin",
    2: "subcutaneous fat",
    3: "muscle",
    4: "right lung",
    5: "left lung",
    6: "mediastinal fat",
    7: "heart",
    8: "aorta",
    9: "airway",
    10: "bone",
    11: "intervertebral disc",
    12: "spinal canal",
    13: "liver",
    14: "rib",
}
_AIR, _SKIN, _FAT, _MUSCLE, _LUNG_R, _LUNG_L, _MEDFAT, _HEART, _AORTA, _AIRWAY = range(10)
_BONE, _DISC, _CANAL, _LIVER, _RIB = range(10, 15)
_LUNG = {"right": _LUNG_R, "left": _LUNG_L}

# (mean HU, sd of the per-phantom jitter) per label; contrast-enhanced values override some.
_CT_HU = np.array(
    [
        (-1000, 0),  # air
        (30, 5),  # skin
        (-100, 8),  # subcutaneous fat
        (45, 4),  # muscle
        (-850, 12),  # right lung
        (-850, 12),  # left lung
        (-90, 8),  # mediastinal fat
        (40, 4),  # heart (unenhanced blood pool + myocardium)
        (40, 4),  # aorta (unenhanced)
        (-990, 3),  # airway
        (550, 40),  # bone (vertebrae, sternum)
        (80, 8),  # disc
        (15, 4),  # spinal canal (CSF/cord)
        (55, 4),  # liver
        (750, 60),  # rib
    ],
    dtype=np.float32,
)


@dataclass
class Finding:
    """One abnormality drawn into a CT phantom.

    ``slice_index`` is the 0-based axial slice at the finding's centre (the slice showing most of
    it); reports cite it 1-based as "image N". ``center_mm`` is ``(z, y, x)`` in mm from the centre
    of voxel ``(0, 0, 0)`` (i.e. index * spacing). ``diameter_mm`` is given for nodules and nodes.
    """

    name: str
    side: str | None = None
    lobe: str | None = None
    size: str | None = None
    severity: str | None = None
    slice_index: int = -1
    center_mm: tuple[float, float, float] | None = None
    diameter_mm: float | None = None


@dataclass
class CTPhantom:
    """A chest CT phantom: int16 HU volume ``(z, y, x)`` (z head to feet), spacing in mm ``(z, y, x)``."""

    volume: np.ndarray
    spacing: tuple[float, float, float]
    findings: list[Finding]
    report: str
    labels: np.ndarray
    seed: int
    tissue: np.ndarray | None = None  # uint8 CT_TISSUES map of the normal anatomy (read-only, shared)
    contrast: bool = False  # intravenous contrast (aorta/heart/liver enhanced)


# ------------------------------------------------------------------------------------------------
# CT: anatomy (cached per shape, spacing and body-size variant)
# ------------------------------------------------------------------------------------------------

_BODY_SCALES = (0.92, 0.97, 1.02)


class _CTAnatomy:
    """Label map, coordinates and the geometry findings need; arrays are read-only."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float], variant: int):
        Z, Y, X = shape
        sz, sy, sx = spacing
        self.shape, self.spacing = shape, spacing
        kz = Z * sz / 320.0  # reference torso: 320 mm cranio-caudal
        kxy = min(Y * sy, X * sx) / 336.0  # and a 336 mm field of view
        s = _BODY_SCALES[variant]

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
        lab2[ell2(0, 0, by, bx) <= 1] = _SKIN
        lab2[ell2(0, 0, by - L(2), bx - L(2)) <= 1] = _FAT
        lab2[ell2(0, 0, by - L(14), bx - L(16)) <= 1] = _MUSCLE
        cav2 = ell2(0, 0, by - L(26), bx - L(28)) <= 1
        lab = np.empty(shape, np.uint8)
        lab[:] = lab2

        # Diaphragm: a dome, lower laterally and posteriorly, the right side a little higher.
        r2 = np.clip((x2 / (L(110) * s)) ** 2 + ((y2 - L(10)) / (L(85) * s)) ** 2, 0, 1)
        zdia = Lz(250) + Lz(30) * r2 - Lz(6) * (x2 < 0)
        above = z < zdia[None]
        lab[cav2[None] & above] = _MEDFAT
        lab[cav2[None] & ~above] = _LIVER

        # Lungs: ellipses whose cross-section grows from the apex, cut by cavity and diaphragm.
        self.lung = {}
        apex, dome = Lz(15), Lz(250)
        for side, cx, ax in (("right", -66.0, 50.0), ("left", 68.0, 48.0)):
            cx, ax, cy, ay = L(cx) * s, L(ax) * s, L(8) * s, L(80) * s
            t = (z1 - apex) / (dome - apex)
            sc = np.sqrt(np.clip(t / 0.3, 0, 1))[:, None, None]
            q = ((y - cy) / ay) ** 2 + ((x - cx) / ax) ** 2
            m = (q <= sc**2) & (t > 0)[:, None, None] & above & cav2[None]
            lab[m] = _LUNG[side]
            inner = m & (q <= (0.5 * sc) ** 2)
            self.lung[side] = dict(cx=cx, cy=cy, ax=ax, ay=ay, apex=apex, dome=dome, inner=inner)

        # Heart, anterior and to the left, above the diaphragm.
        self.heart = (Lz(200), L(-22) * s, L(18) * s, Lz(50), L(50) * s, L(62) * s)  # (c, semi-axes)
        hz, hy, hx, az, ay_, ax_ = self.heart
        heart = (((z - hz) / az) ** 2 + ((y - hy) / ay_) ** 2 + ((x - hx) / ax_) ** 2 <= 1) & above
        lab[heart] = _HEART

        # Aorta: ascending, arch, descending (radius ~13 mm).
        ra = L(13)
        asc, desc = (L(-30) * s, L(-8) * s), (L(28) * s, L(22) * s)
        self.aorta_radius, self.aorta_asc, self.aorta_desc = ra, asc, desc
        self.aorta_z = (Lz(78), Lz(100), Lz(160))  # arch top, arch bottom, ascending ends in heart
        d_asc = (y2 - asc[0]) ** 2 + (x2 - asc[1]) ** 2 <= ra**2
        d_desc = (y2 - desc[0]) ** 2 + (x2 - desc[1]) ** 2 <= ra**2
        d_arch = _segment_dist2(y2, x2, asc, desc) <= ra**2
        zz = z1[:, None, None]
        lab[d_desc[None] & (zz >= Lz(88))] = _AORTA
        lab[d_asc[None] & (zz >= Lz(88)) & (zz <= Lz(160))] = _AORTA
        lab[d_arch[None] & (zz >= Lz(78)) & (zz <= Lz(100))] = _AORTA

        # Airway: trachea to the carina, main bronchi towards the hila.
        lab[((((y2 + L(5)) ** 2 + x2**2) <= L(9) ** 2)[None]) & (zz <= Lz(112))] = _AIRWAY
        for hxb in (-L(42) * s, L(42) * s):
            d2 = _segment_dist2_3d(z, y, x, (Lz(112), L(-5), 0.0), (Lz(138), L(2), hxb))
            lab[d2 <= L(6) ** 2] = _AIRWAY

        # Spine: vertebral bodies with discs, spinal canal, posterior elements; sternum; ribs.
        vb = (y2 - L(48)) ** 2 + x2**2 <= L(17) ** 2
        disc = ((z1 % Lz(27)) < Lz(6))[:, None, None]
        lab[vb[None] & ~disc] = _BONE
        lab[vb[None] & disc] = _DISC
        rc = np.sqrt((y2 - L(76)) ** 2 + x2**2)
        post = ((rc > L(7)) & (rc <= L(13)) & (y2 >= L(70))) | (
            (np.abs(x2) < L(4)) & (y2 >= L(82)) & (y2 <= L(100) * s)
        )
        lab[:, post] = _BONE
        lab[:, rc <= L(7)] = _CANAL
        stern = (np.abs(x2) <= L(16)) & (y2 >= -by + L(14)) & (y2 <= -by + L(24))
        lab[stern[None] & (zz >= Lz(55)) & (zz <= Lz(230))] = _BONE
        ring = (ell2(0, 0, by - L(20), bx - L(20)) <= 1) & (ell2(0, 0, by - L(27), bx - L(27)) > 1)
        ring &= ~((np.abs(x2) < L(22)) & (y2 < 0)) & ~((np.abs(x2) < L(28)) & (y2 > 0))
        zeff = z + Lz(30) * (y / by)  # ribs run obliquely: posterior ends more cranial
        ribs = ring[None] & (np.cos(2 * np.pi * zeff / Lz(26)) > 0.55) & (zz >= Lz(10)) & (zz <= Lz(275))
        lab[ribs] = _RIB

        for side in ("right", "left"):
            self.lung[side]["inner"] &= lab == _LUNG[side]
        lab.setflags(write=False)
        self.labels = lab
        lungs = (lab == _LUNG_R) | (lab == _LUNG_L)
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
        for side, fr in _LOBE_FRACTIONS.items():
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
            m = (lab == _LUNG[side]) & (z1 <= zlim)[:, None, None]
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
def _ct_anatomy(shape: tuple[int, int, int], spacing: tuple[float, float, float], variant: int) -> _CTAnatomy:
    return _CTAnatomy(shape, spacing, variant)


def _norm_geometry(shape, spacing) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or len(spacing) != 3 or min(shape) < 8 or min(spacing) <= 0:
        raise ValueError(f"need a 3D shape (each >= 8) and positive spacing, got {shape}, {spacing}")
    return shape, spacing  # type: ignore[return-value]


def ct_lobe_slices(
    shape: Sequence[int] = (64, 96, 96), spacing: Sequence[float] = (5.0, 3.5, 3.5)
) -> dict[tuple[str, str], tuple[int, int]]:
    """``{(side, lobe): (first_slice, end_slice)}`` (half-open, 0-based) of the phantom's lobes."""
    shape, spacing = _norm_geometry(shape, spacing)
    return dict(_ct_anatomy(shape, spacing, 1).lobes)


# ------------------------------------------------------------------------------------------------
# CT: findings
# ------------------------------------------------------------------------------------------------

_DRAW_ORDER = (
    "Pleural effusion",
    "Emphysema",
    "Lung opacity",
    "Consolidation",
    "Atelectasis",
    "Lung nodule",
    "Cardiomegaly",
    "Pericardial effusion",
    "Lymphadenopathy",
    "Arterial wall calcification",
)


def _random_attributes(f: Finding, rng: np.random.Generator) -> Finding:
    """Fill the attributes a finding needs (keeping those given) and check them."""
    n = f.name
    if n not in CT_FINDINGS:
        raise ValueError(f"unknown finding {n!r}; expected one of {CT_FINDINGS}")
    side, lobe, size, sev = f.side, f.lobe, f.size, f.severity
    lobar = n in ("Lung nodule", "Consolidation", "Atelectasis", "Lung opacity")
    if lobar:
        if side is None:
            side = str(rng.choice(["right", "left"]))
        if side not in ("right", "left"):
            raise ValueError(f"{n}: side must be 'right' or 'left', got {side!r}")
        if lobe is None:
            choices = list(_LOBE_FRACTIONS[side])
            if n == "Atelectasis":
                choices = [c for c in choices if c != "upper lobe"]
            lobe = str(rng.choice(choices))
        if lobe not in _LOBE_FRACTIONS[side]:
            raise ValueError(f"{n}: the {side} lung has no {lobe!r}")
    elif n == "Pleural effusion":
        side = side or str(rng.choice(["right", "left", "bilateral"], p=[0.3, 0.3, 0.4]))
        lobe = None
    elif n == "Emphysema":
        side, lobe = "bilateral", "upper lobe"
    else:
        side, lobe = None, None
    if n in ("Lung nodule", "Pleural effusion", "Pericardial effusion"):
        size = size or str(rng.choice(SIZES))
        sev = None
    elif n in ("Emphysema", "Cardiomegaly", "Arterial wall calcification"):
        sev = sev or str(rng.choice(SEVERITIES))
        size = None
    else:
        size, sev = None, None
    if size is not None and size not in SIZES:
        raise ValueError(f"{n}: size must be one of {SIZES}")
    if sev is not None and sev not in SEVERITIES:
        raise ValueError(f"{n}: severity must be one of {SEVERITIES}")
    return dataclasses.replace(f, side=side, lobe=lobe, size=size, severity=sev)


class _CTCanvas:
    def __init__(self, A: _CTAnatomy, vol: np.ndarray, hu: np.ndarray, rng: np.random.Generator):
        self.A, self.vol, self.hu, self.rng = A, vol, hu, rng
        self.heart_scale = np.ones(3)

    # Placement ------------------------------------------------------------------------------
    def lobe_center(self, side: str, lobe: str, posterior: bool = False) -> tuple[int, int, int]:
        A, rng = self.A, self.rng
        i0, i1 = A.lobes[(side, lobe)]
        m = (i1 - i0) // 5
        lab = A.labels
        for _ in range(20):
            zi = int(rng.integers(i0 + m, max(i1 - m, i0 + m + 1)))
            cand = A.lung[side]["inner"][zi] & (self.vol[zi] < -400)  # still aerated lung
            if posterior:
                cand = cand & (A.y1 >= A.lung[side]["cy"])[:, None]
            flat = np.flatnonzero(cand)
            if flat.size == 0:
                flat = np.flatnonzero((lab[zi] == _LUNG[side]) & (self.vol[zi] < -400))
            if flat.size:
                yi, xi = np.unravel_index(int(rng.choice(flat)), cand.shape)
                return zi, int(yi), int(xi)
        # no aerated lung left (another finding filled the lobe): any voxel of the lobe's lung
        for zi in rng.permutation(np.arange(i0, i1)).tolist():
            flat = np.flatnonzero(lab[zi] == _LUNG[side])
            if flat.size:
                yi, xi = np.unravel_index(int(rng.choice(flat)), lab[zi].shape)
                return int(zi), int(yi), int(xi)
        raise RuntimeError(f"no lung voxels in the {side} {lobe}; volume too small?")

    def paint(self, sl, mask, value, allowed=None, mode="set"):
        if allowed is not None:
            mask = mask & np.isin(self.A.labels[sl], allowed)
        v = self.vol[sl]
        if mode == "set":
            v[mask] = value
        elif mode == "max":
            v[mask] = np.maximum(v[mask], value)
        else:  # callable of the old values
            v[mask] = mode(v[mask])
        full = np.zeros(self.A.shape, bool)
        full[sl] = mask
        return full

    def finish(self, f: Finding, mask: np.ndarray, center_idx=None) -> Finding:
        counts = mask.sum(axis=(1, 2))
        if counts.sum() == 0:
            raise RuntimeError(f"{f.name}: nothing was drawn (volume too small?)")
        if center_idx is None:
            zi = int(np.argmax(counts))
            yy, xx = np.nonzero(mask[zi])
            center_idx = (zi, int(round(yy.mean())), int(round(xx.mean())))
        c = tuple(float(v) for v in np.asarray(center_idx) * np.asarray(self.A.spacing))
        return dataclasses.replace(f, slice_index=int(center_idx[0]), center_mm=c)

    # Finding routines -----------------------------------------------------------------------
    def lung_nodule(self, f: Finding) -> Finding:
        rng = self.rng
        d = {"small": rng.uniform(*_NODULE_MM["small"]), "moderate": rng.uniform(*_NODULE_MM["moderate"]),
             "large": rng.uniform(*_NODULE_MM["large"])}[f.size]
        c = self.lobe_center(f.side, f.lobe)
        sl, m = self.A.ellipsoid(c, (d / 2,) * 3)
        mask = self.paint(sl, m, rng.uniform(30, 60), allowed=[_LUNG[f.side]])
        return dataclasses.replace(self.finish(f, mask, c), diameter_mm=round(float(d), 1))

    def _lobar_blob(self, f: Finding, rxy, rz, value_fn, posterior=False) -> Finding:
        rng, A = self.rng, self.A
        c = self.lobe_center(f.side, f.lobe, posterior)
        r = (rng.uniform(*rz), rng.uniform(*rxy), rng.uniform(*rxy))
        sl, m = A.ellipsoid(c, r)
        i0, i1 = A.lobes[(f.side, f.lobe)]
        zr = np.arange(sl[0].start, sl[0].stop)
        m = m & ((zr >= i0) & (zr < i1))[:, None, None]
        mask = self.paint(sl, m, None, allowed=[_LUNG[f.side]], mode=value_fn)
        return self.finish(f, mask, c)

    def consolidation(self, f: Finding) -> Finding:
        hu = self.rng.uniform(25, 45)
        # lobar: most of the lobe (a consolidation the size of a patch row of the 64 x 64 x 32 input)
        return self._lobar_blob(f, (26, 44), (18, 30), lambda old: np.full_like(old, hu))

    def lung_opacity(self, f: Finding) -> Finding:
        hu = self.rng.uniform(-600, -450)
        return self._lobar_blob(f, (24, 42), (16, 28), lambda old: hu + 0.5 * (old + 850.0))

    def atelectasis(self, f: Finding) -> Finding:
        rng, A = self.rng, self.A
        # two or three plate-like (subsegmental) bands in the posterior lobe, each thick enough to cover
        # voxels at 5 mm slices: one band of a few mm changed about 30 voxels of the 64 x 64 x 32 input
        i0, i1 = A.lobes[(f.side, f.lobe)]
        hu = rng.uniform(10, 40)
        mask = np.zeros(A.shape, bool)
        first = None
        for _ in range(int(rng.integers(2, 4))):
            c = self.lobe_center(f.side, f.lobe, posterior=True)
            r = (max(6.0, 0.75 * A.spacing[0]), rng.uniform(6, 9), rng.uniform(30, 45))
            sl, m = A.ellipsoid(c, r)
            zr = np.arange(sl[0].start, sl[0].stop)
            m = m & ((zr >= i0) & (zr < i1))[:, None, None]
            mask |= self.paint(sl, m, hu, allowed=[_LUNG[f.side]])
            first = first or c
        return self.finish(f, mask, first)

    def pleural_effusion(self, f: Finding) -> Finding:
        A, rng = self.A, self.rng
        tz, fy = {"small": (0.72, 0.45), "moderate": (0.55, 0.1), "large": (0.40, -0.25)}[f.size]
        mask = np.zeros(A.shape, bool)
        for side in (("right", "left") if f.side == "bilateral" else (f.side,)):
            g = A.lung[side]
            zc = A.z1 >= g["apex"] + tz * (g["dome"] - g["apex"])
            yc = A.y1 >= g["cy"] + fy * g["ay"]
            mask |= (A.labels == _LUNG[side]) & zc[:, None, None] & yc[None, :, None]
        self.vol[mask] = rng.uniform(5, 18)
        return self.finish(f, mask)

    def emphysema(self, f: Finding) -> Finding:
        A, rng = self.A, self.rng
        n = {"mild": 30, "moderate": 55, "severe": 90}[f.severity]
        mask = np.zeros(A.shape, bool)
        for k in range(n):
            cand = A.emph_candidates["right" if k % 2 == 0 else "left"]
            c = np.unravel_index(int(rng.choice(cand)), A.shape)
            rxy = rng.uniform(6, 12)
            sl, m = A.ellipsoid(c, (max(rxy, 0.75 * A.spacing[0]), rxy, rxy))
            mask |= self.paint(sl, m, rng.uniform(-1000, -975), allowed=[_LUNG_R, _LUNG_L])
        return self.finish(f, mask)

    def _heart_ellipsoid(self, scale, extra_mm=0.0):
        A = self.A
        hz, hy, hx, az, ay, ax = A.heart
        c = A.index_of_mm((hz, hy, hx))
        r = (az * scale[0] + extra_mm, ay * scale[1] + extra_mm, ax * scale[2] + extra_mm)
        # the ellipsoid is centred on the nearest voxel, close enough for drawing
        return c, A.ellipsoid(c, r)

    def cardiomegaly(self, f: Finding) -> Finding:
        k = {"mild": 1.2, "moderate": 1.32, "severe": 1.45}[f.severity]
        self.heart_scale = np.array([1.1, k, k])
        c, (sl, m) = self._heart_ellipsoid(self.heart_scale)
        mask = self.paint(sl, m, self.hu[_HEART], allowed=[_LUNG_R, _LUNG_L, _MEDFAT])
        return self.finish(f, mask, c)

    def pericardial_effusion(self, f: Finding) -> Finding:
        t = {"small": 6.0, "moderate": 11.0, "large": 18.0}[f.size]
        c, (sl, outer) = self._heart_ellipsoid(self.heart_scale, t)
        _, (sl_in, inner) = self._heart_ellipsoid(self.heart_scale)
        inner_full = np.zeros(self.A.shape, bool)
        inner_full[sl_in] = inner
        shell = outer & ~inner_full[sl]
        mask = self.paint(sl, shell, self.rng.uniform(8, 20), allowed=[_LUNG_R, _LUNG_L, _MEDFAT])
        return self.finish(f, mask)

    def lymphadenopathy(self, f: Finding) -> Finding:
        A, rng = self.A, self.rng
        sites = [  # (z, y, x) reference mm: paratracheal, prevascular, AP window, subcarinal, hila
            (85, -8, -17), (95, -55, 0), (100, -5, 14), (128, 12, 0), (135, 5, -40), (135, 5, 42)
        ]
        pick = rng.choice(len(sites), size=int(rng.integers(3, 6)), replace=False)
        mask = np.zeros(A.shape, bool)
        best = (-1.0, None)
        for i in pick:
            z, y, x = sites[int(i)]
            c = A.index_of_mm((z * A.kz, y * A.kxy, x * A.kxy))
            d = rng.uniform(15, 26)  # short axis > 10 mm: enlarged
            sl, m = A.ellipsoid(c, (0.65 * d, d / 2, d / 2))
            mask |= self.paint(sl, m, rng.uniform(40, 60), allowed=[_MEDFAT, _LUNG_R, _LUNG_L])
            if d > best[0]:
                best = (d, c)
        out = self.finish(f, mask, best[1])
        return dataclasses.replace(out, diameter_mm=round(float(best[0]), 1))

    def arterial_wall_calcification(self, f: Finding) -> Finding:
        A, rng = self.A, self.rng
        # Plaques: arcs of the descending aorta's wall, a few mm thick and 10-20 mm long, so that each covers
        # voxels at 3.5 x 3.5 x 5 mm (a point-like calcification vanishes into one partial voxel there).
        n = {"mild": 4, "moderate": 8, "severe": 12}[f.severity]
        ra = A.aorta_radius
        cy, cx = A.aorta_desc
        zs = np.sort(rng.uniform(A.aorta_z[1] + 5, A.shape[0] * A.spacing[0] - 10, n))
        y2, x2 = A.y1[:, None] - cy, A.x1[None, :] - cx
        radius, angle = np.sqrt(y2**2 + x2**2), np.arctan2(y2, x2)
        wall = (radius >= ra - max(1.5, 0.4 * A.spacing[1])) & (radius <= ra + max(3.0, 0.9 * A.spacing[1]))
        mask = np.zeros(A.shape, bool)
        centers = []
        for zmm in zs:
            th, half = rng.uniform(-np.pi, np.pi), rng.uniform(0.8, 1.3)  # arc of 90-150 degrees
            arc = wall & (np.abs(np.angle(np.exp(1j * (angle - th)))) <= half)
            hz = max(rng.uniform(8, 14), 0.5 * A.spacing[0])
            zsel = np.abs(A.z1 - zmm) <= hz
            plaque = zsel[:, None, None] & arc[None]
            if not plaque.any():
                continue
            sl = (slice(None),) * 3
            mask |= self.paint(sl, plaque, rng.uniform(500, 1000), mode="max")
            zi = int(np.argmin(np.abs(A.z1 - zmm)))
            yy, xx = np.nonzero(arc)
            centers.append((zi, int(round(yy.mean())), int(round(xx.mean()))))
        return self.finish(f, mask, centers[len(centers) // 2])


_ROUTINES = {
    "Lung nodule": _CTCanvas.lung_nodule,
    "Pleural effusion": _CTCanvas.pleural_effusion,
    "Consolidation": _CTCanvas.consolidation,
    "Emphysema": _CTCanvas.emphysema,
    "Cardiomegaly": _CTCanvas.cardiomegaly,
    "Atelectasis": _CTCanvas.atelectasis,
    "Pericardial effusion": _CTCanvas.pericardial_effusion,
    "Lymphadenopathy": _CTCanvas.lymphadenopathy,
    "Lung opacity": _CTCanvas.lung_opacity,
    "Arterial wall calcification": _CTCanvas.arterial_wall_calcification,
}


def make_ct_phantom(
    seed: int,
    shape: Sequence[int] = (64, 96, 96),
    spacing: Sequence[float] = (5.0, 3.5, 3.5),
    findings: Sequence[str | Finding] | None = None,
    p_finding: float = 0.35,
) -> CTPhantom:
    """A chest CT phantom with findings and a matching free-text report.

    ``findings=None`` draws each of :data:`CT_FINDINGS` independently with probability
    ``p_finding``; a list of names or :class:`Finding` objects forces exactly those (unset
    attributes are drawn at random). See the module docstring for orientation and determinism.
    """
    shape, spacing = _norm_geometry(shape, spacing)
    seed = int(seed)
    r_anat, r_find, r_noise, r_report = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4))

    variant = int(r_anat.integers(len(_BODY_SCALES)))
    A = _ct_anatomy(shape, spacing, variant)
    contrast = bool(r_anat.random() < 0.5)
    hu = _CT_HU[:, 0] + _CT_HU[:, 1] * r_anat.standard_normal(len(_CT_HU)).astype(np.float32)
    if contrast:
        hu[_AORTA] = r_anat.uniform(150, 300)
        hu[_HEART] = r_anat.uniform(120, 220)
        hu[_LIVER] = r_anat.uniform(90, 110)
    tex_amp = np.float32(r_anat.uniform(15, 30))
    off = r_anat.integers(0, A.pad + 1, 3)
    sigma = np.float32(r_anat.uniform(8, 15))

    vol = hu[A.labels]  # gather: float32 copy
    Z, Y, X = shape
    tex = A.texture[off[0] : off[0] + Z, off[1] : off[1] + Y, off[2] : off[2] + X]
    vol += tex_amp * tex * A.lungf

    # Findings.
    if findings is None:
        wanted = [Finding(n) for n in CT_FINDINGS if r_find.random() < p_finding]
    else:
        wanted = [f if isinstance(f, Finding) else Finding(str(f)) for f in findings]
    wanted = [_random_attributes(f, r_find) for f in wanted]
    canvas = _CTCanvas(A, vol, hu, r_find)
    drawn: list[Finding | None] = [None] * len(wanted)
    order = sorted(range(len(wanted)), key=lambda i: _DRAW_ORDER.index(wanted[i].name))
    for i in order:
        drawn[i] = _ROUTINES[wanted[i].name](canvas, wanted[i])
    out_findings = [f for f in drawn if f is not None]

    vol += sigma * r_noise.standard_normal(shape, dtype=np.float32)
    np.clip(vol, -1024, 3071, out=vol)
    volume = np.rint(vol).astype(np.int16)

    labels = np.zeros(len(CT_FINDINGS), bool)
    for f in out_findings:
        labels[CT_FINDINGS.index(f.name)] = True
    report = ct_report(out_findings, r_report)
    return CTPhantom(volume, spacing, out_findings, report, labels, seed, A.labels, contrast)


# ------------------------------------------------------------------------------------------------
# CT: reports
# ------------------------------------------------------------------------------------------------


def _ref(rng: np.random.Generator, f: Finding) -> str:
    n = f.slice_index + 1
    return f"(series 3, image {n})" if rng.random() < 0.5 else f"(image {n})"


def _loc(f: Finding) -> str:
    if f.lobe == "lingula":
        return "lingula"
    return f"{f.side} {f.lobe}" if f.lobe else f"{f.side}"


def _positive_templates(f: Finding) -> list[str]:
    n = f.name
    loc, size, sev, side = _loc(f), f.size, f.severity, f.side
    if n == "Lung nodule":
        d = f"{f.diameter_mm:.0f} mm" if f.diameter_mm else ""
        return [
            f"There is a {size} nodule in the {loc} {{ref}}.",
            f"A {size} pulmonary nodule measuring {d} is seen in the {loc} {{ref}}.",
            f"{size} solid nodule in the {loc} {{ref}}.",
            f"{size} lung nodule noted in the {loc}, measuring {d} {{ref}}.",
        ]
    if n == "Pleural effusion":
        pl = "s" if side == "bilateral" else ""
        return [
            f"{size} {side} pleural effusion{pl} {{ref}}.",
            f"There is a {size} {side} pleural effusion {{ref}}." if not pl
            else f"There are {size} bilateral pleural effusions {{ref}}.",
            f"A {size} {side} pleural effusion is present {{ref}}." if not pl
            else f"{size} pleural effusions are present, bilateral {{ref}}.",
        ]
    if n == "Consolidation":
        return [
            f"There is consolidation in the {loc} {{ref}}.",
            f"Consolidation is present in the {loc} {{ref}}.",
            f"Airspace consolidation in the {loc} {{ref}}.",
        ]
    if n == "Emphysema":
        return [
            f"{sev} centrilobular emphysema, bilateral and upper lobe predominant {{ref}}.",
            f"There are {sev} bilateral emphysematous changes, predominantly in the upper lobes {{ref}}.",
            f"{sev} emphysema is noted, bilateral with upper lobe predominance {{ref}}.",
        ]
    if n == "Cardiomegaly":
        return [
            f"{sev} cardiomegaly is noted {{ref}}.",
            f"There is {sev} cardiomegaly {{ref}}.",
            f"Enlarged heart, {sev} cardiomegaly {{ref}}.",
        ]
    if n == "Atelectasis":
        return [
            f"Linear atelectasis in the {loc} {{ref}}.",
            f"There is a band of atelectasis in the {loc} {{ref}}.",
            f"Subsegmental atelectasis is seen in the {loc} {{ref}}.",
        ]
    if n == "Pericardial effusion":
        return [
            f"{size} pericardial effusion {{ref}}.",
            f"There is a {size} pericardial effusion {{ref}}.",
            f"A {size} pericardial effusion is present {{ref}}.",
        ]
    if n == "Lymphadenopathy":
        d = f"{f.diameter_mm:.0f} mm" if f.diameter_mm else "over 10 mm"
        return [
            f"Mediastinal lymphadenopathy, the largest node measuring {d} in short axis {{ref}}.",
            f"Enlarged mediastinal lymph nodes are present {{ref}}.",
            f"There is mediastinal and hilar lymphadenopathy {{ref}}.",
        ]
    if n == "Lung opacity":
        return [
            f"Ground-glass opacity in the {loc} {{ref}}.",
            f"There is a patchy ground-glass opacity in the {loc} {{ref}}.",
            f"An area of increased opacity is seen in the {loc} {{ref}}.",
        ]
    if n == "Arterial wall calcification":
        return [
            f"{sev} atherosclerotic calcification of the aorta {{ref}}.",
            f"Arterial wall calcification is seen in the aorta, {sev} {{ref}}.",
            f"There is {sev} arterial wall calcification of the descending aorta {{ref}}.",
        ]
    raise ValueError(f"unknown finding {n!r}")


_NEGATIVE_TEMPLATES = {
    "Lung nodule": ("No pulmonary nodules.", "There is no lung nodule.", "No suspicious nodule is seen."),
    "Pleural effusion": ("No pleural effusion.", "There is no pleural effusion."),
    "Consolidation": ("No consolidation.", "There is no consolidation."),
    "Emphysema": ("No emphysema.", "There are no emphysematous changes."),
    "Cardiomegaly": ("No cardiomegaly.", "The heart is normal in size without cardiomegaly."),
    "Atelectasis": ("No atelectasis.", "There is no atelectasis."),
    "Pericardial effusion": ("No pericardial effusion.", "There is no pericardial effusion."),
    "Lymphadenopathy": ("No mediastinal lymphadenopathy.", "There are no enlarged lymph nodes."),
    "Lung opacity": ("No ground-glass opacity.", "There is no focal lung opacity."),
    "Arterial wall calcification": (
        "No arterial wall calcification.",
        "There is no atherosclerotic calcification.",
    ),
}

_NORMAL_SENTENCES = (
    "The lungs are clear. No acute cardiopulmonary abnormality.",
    "The lungs are clear.",
    "Normal CT of the chest. The lungs are clear.",
)


def ct_report(findings: Sequence[Finding], rng: np.random.Generator | int | None = None) -> str:
    """Free-text report for ``findings``: one sentence per positive finding citing
    "(image N)" or "(series 3, image N)" with N = slice_index + 1, negations of some absent
    findings, and a normal-study sentence when there are none. Deterministic given ``rng``."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    sentences = []
    for i in rng.permutation(len(findings)):
        f = findings[int(i)]
        if f.slice_index < 0:
            raise ValueError(f"{f.name}: slice_index is not set")
        t = _positive_templates(f)
        s = t[int(rng.integers(len(t)))].format(ref=_ref(rng, f))
        sentences.append(s[0].upper() + s[1:])
    present = {f.name for f in findings}
    absent = [n for n in CT_FINDINGS if n not in present]
    if absent:
        k = int(rng.integers(min(2, len(absent)), len(absent) + 1))
        for i in rng.choice(len(absent), size=k, replace=False):
            t = _NEGATIVE_TEMPLATES[absent[int(i)]]
            sentences.append(t[int(rng.integers(len(t)))])
    if not findings:
        sentences.insert(0, _NORMAL_SENTENCES[int(rng.integers(len(_NORMAL_SENTENCES)))])
    return " ".join(sentences)


# ------------------------------------------------------------------------------------------------
# MR head phantom
# ------------------------------------------------------------------------------------------------

#: Tissue labels of the MR phantom (``MRPhantom.tissue``).
MR_TISSUES: dict[int, str] = {0: "air", 1: "fat", 2: "bone", 3: "csf", 4: "gm", 5: "wm", 6: "blood"}

#: name -> (PD relative to CSF, {field T: T1 ms}, {field T: T2 ms}); representative in vivo values:
#: WM/GM from Wansapura et al. JMRI 1999 (3 T: WM 832/80, GM 1331/110) and Stanisz et al. MRM 2005
#: (T2 WM 72/69, GM 95/99 at 1.5/3 T), within the 1.5 T range of Bojorquez et al. MRI 2017;
#: CSF T1 ~4000-4300 ms, T2 ~1800-2000 ms; fat from Gold et al. AJR 2004 (T1 288/371, T2 165/133);
#: blood from Stanisz et al. 2005 (T1 1441/1932, T2 290/275); cortical bone: tiny PD, T2 ~1 ms.
MR_TISSUE_PARAMS: dict[str, tuple[float, dict[float, float], dict[float, float]]] = {
    "air": (0.0, {1.5: 1000.0, 3.0: 1000.0}, {1.5: 1.0, 3.0: 1.0}),
    "fat": (0.90, {1.5: 288.0, 3.0: 371.0}, {1.5: 165.0, 3.0: 133.0}),
    "bone": (0.05, {1.5: 250.0, 3.0: 300.0}, {1.5: 1.0, 3.0: 1.0}),
    "csf": (1.00, {1.5: 4000.0, 3.0: 4300.0}, {1.5: 2000.0, 3.0: 1800.0}),
    "gm": (0.80, {1.5: 1050.0, 3.0: 1350.0}, {1.5: 95.0, 3.0: 100.0}),
    "wm": (0.70, {1.5: 650.0, 3.0: 850.0}, {1.5: 75.0, 3.0: 75.0}),
    "blood": (0.85, {1.5: 1441.0, 3.0: 1932.0}, {1.5: 290.0, 3.0: 275.0}),
}
# Gadolinium relaxivity r1 (1/(mM s)) at 1.5/3 T (Rohrer et al. 2005, gadopentetate ~4.1/3.7)
# and an assumed 1 mM blood concentration for the post-contrast T1 series.
_GD_R1 = {1.5: 4.1, 3.0: 3.7}
_GD_CONC_MM = 1.0


#: Sequence name -> acquisition parameter ranges (ms, degrees) and DICOM attributes.
#: ``equation`` is "SE", "IR" (IR spin echo), "GR" (spoiled gradient echo) or "IRGR" (MPRAGE-like).
#: ``TI`` "null_csf"/"null_fat" picks the inversion time nulling that tissue (clipped to the range).
MR_SEQUENCES: dict[str, dict[str, Any]] = {
    "T1_SE": dict(
        equation="SE", TE=(10, 20), TR=(400, 700), TI=None, FA=(90, 90),
        ScanningSequence=("SE",), SequenceVariant=("SP",), ScanOptions=(), MRAcquisitionType="2D",
        ContrastBolusAgent=None, description="T1 SE", planes=("axial", "sagittal", "coronal"),
    ),
    "T1_SE_GD": dict(
        equation="SE", TE=(10, 20), TR=(400, 700), TI=None, FA=(90, 90),
        ScanningSequence=("SE",), SequenceVariant=("SP",), ScanOptions=(), MRAcquisitionType="2D",
        ContrastBolusAgent="GADOLINIUM", description="T1 SE +C", planes=("axial", "sagittal", "coronal"),
    ),
    "T2_TSE": dict(
        equation="SE", TE=(80, 120), TR=(3000, 6000), TI=None, FA=(90, 90),
        ScanningSequence=("SE",), SequenceVariant=("SK", "SP"), ScanOptions=(), MRAcquisitionType="2D",
        ContrastBolusAgent=None, description="T2 TSE", planes=("axial", "coronal"),
    ),
    "PD_TSE": dict(
        equation="SE", TE=(10, 30), TR=(2000, 4000), TI=None, FA=(90, 90),
        ScanningSequence=("SE",), SequenceVariant=("SK", "SP"), ScanOptions=(), MRAcquisitionType="2D",
        ContrastBolusAgent=None, description="PD TSE", planes=("axial", "coronal"),
    ),
    "FLAIR": dict(
        equation="IR", TE=(80, 140), TR=(8000, 10000), TI=(2000, 2500), TI_rule="null_csf", FA=(90, 90),
        ScanningSequence=("IR", "SE"), SequenceVariant=("SK", "SP", "MP"), ScanOptions=("IR",),
        MRAcquisitionType="2D", ContrastBolusAgent=None, description="T2 FLAIR", planes=("axial", "coronal"),
    ),
    "T1_MPRAGE": dict(
        equation="IRGR", TE=(2, 4), TR=(1800, 2300), TI=(900, 1100), FA=(8, 9),
        ScanningSequence=("GR", "IR"), SequenceVariant=("SK", "SP", "MP"), ScanOptions=("IR",),
        MRAcquisitionType="3D", ContrastBolusAgent=None, description="T1 MPRAGE", planes=("sagittal", "axial"),
    ),
    "STIR": dict(
        equation="IR", TE=(30, 70), TR=(3000, 5000), TI=(150, 250), TI_rule="null_fat", FA=(90, 90),
        ScanningSequence=("IR", "SE"), SequenceVariant=("SK", "SP", "MP"), ScanOptions=("IR",),
        MRAcquisitionType="2D", ContrastBolusAgent=None, description="STIR", planes=("coronal", "axial"),
    ),
    "T2STAR_GRE": dict(
        equation="GR", TE=(15, 25), TR=(400, 800), TI=None, FA=(15, 25),
        ScanningSequence=("GR",), SequenceVariant=("SP",), ScanOptions=(), MRAcquisitionType="2D",
        ContrastBolusAgent=None, description="T2* GRE", planes=("axial",),
    ),
}

# Vendor naming of the same sequence family, and scanner models per field strength.
_VENDOR_DESC = {
    "GE MEDICAL SYSTEMS": {"T2 TSE": "T2 FSE", "PD TSE": "PD FSE", "T1 MPRAGE": "3D T1 BRAVO", "T2* GRE": "T2* GRE"},
    "Philips": {"T1 MPRAGE": "3D T1 TFE", "T2* GRE": "T2* FFE"},
    "SIEMENS": {"T2* GRE": "T2* GRE", "STIR": "TIRM"},
}
_MODELS = {
    1.5: {
        "SIEMENS": ("Avanto", "Aera"),
        "GE MEDICAL SYSTEMS": ("Signa HDxt", "Optima MR450w"),
        "Philips": ("Achieva", "Ingenia"),
    },
    3.0: {
        "SIEMENS": ("Skyra", "Prisma"),
        "GE MEDICAL SYSTEMS": ("Discovery MR750", "Signa Premier"),
        "Philips": ("Ingenia", "Achieva dStream"),
    },
}
_PLANE_ABBR = {"axial": "AX", "sagittal": "SAG", "coronal": "COR"}

#: Metadata of the MR phantom that its image does not depend on: the scanner's maker and model are drawn
#: independently of the sequence, timings, field strength and plane that shape the image (as on real
#: scanners, where they leave no mark a model could read). Every other tag is determined by the image,
#: directly (timings, field strength, plane, contrast agent) or through the sequence (ScanningSequence,
#: SequenceVariant, ScanOptions, MRAcquisitionType).
MR_IMAGE_INDEPENDENT_TAGS: tuple[str, ...] = ("Manufacturer", "ManufacturerModelName")


@dataclass
class MRPhantom:
    """A head MR phantom: float32 magnitude signal ``(z, y, x)`` = (slices, rows, cols)."""

    volume: np.ndarray
    spacing: tuple[float, float, float]
    metadata: dict
    sequence: str
    seed: int
    tissue: np.ndarray | None = None  # uint8 MR_TISSUES map (read-only, shared)


def mr_signal(pd, t1, t2, equation: str, TE: float, TR: float, TI: float | None = None, FA: float = 90.0):
    """Signal (same units as ``pd``) of the standard equations; times in ms, FA in degrees.

    SE: PD (1 - e^{-TR/T1}) e^{-TE/T2}; IR: PD |1 - 2e^{-TI/T1} + e^{-TR/T1}| e^{-TE/T2};
    GR (spoiled): PD sin a (1 - E1) / (1 - cos a E1) e^{-TE/T2*}, T2* ~ 0.7 T2;
    IRGR (MPRAGE-like, readout saturation ignored): PD sin a |1 - 2e^{-TI/T1} + e^{-TR/T1}| e^{-TE/T2*}.
    """
    pd, t1, t2 = (np.asarray(v, np.float64) for v in (pd, t1, t2))
    if equation == "SE":
        return pd * (1 - np.exp(-TR / t1)) * np.exp(-TE / t2)
    if equation == "IR":
        return pd * np.abs(1 - 2 * np.exp(-TI / t1) + np.exp(-TR / t1)) * np.exp(-TE / t2)
    a = math.radians(FA)
    t2s = 0.7 * t2
    if equation == "GR":
        e1 = np.exp(-TR / t1)
        return pd * math.sin(a) * (1 - e1) / (1 - math.cos(a) * e1) * np.exp(-TE / t2s)
    if equation == "IRGR":
        return pd * math.sin(a) * np.abs(1 - 2 * np.exp(-TI / t1) + np.exp(-TR / t1)) * np.exp(-TE / t2s)
    raise ValueError(f"unknown equation {equation!r}")


@functools.lru_cache(maxsize=16)
def _mr_anatomy(shape: tuple[int, int, int], spacing: tuple[float, float, float], plane: str) -> np.ndarray:
    """Tissue label map of the head; array axes depend on the plane (see make_mr_phantom)."""
    axes = []
    for n, sp in zip(shape, spacing):
        axes.append(((np.arange(n) - (n - 1) / 2) * sp).astype(np.float32))
    a0, a1, a2 = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    # physical: x patient right->left, y anterior->posterior, z inferior->superior
    if plane == "axial":
        x, y, z = a2, a1, a0
    elif plane == "sagittal":
        x, y, z = a0, a2, -a1
    elif plane == "coronal":
        x, y, z = a2, a0, -a1
    else:
        raise ValueError(f"plane must be axial, sagittal or coronal, got {plane!r}")
    lab = np.zeros(shape, np.uint8)

    def rho(ax, ay, az, cx=0.0, cy=0.0, cz=0.0):
        return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2

    head = (70.0, 90.0, 80.0)
    lab[rho(*head) <= 1] = 1  # scalp fat
    lab[rho(*(h - 3 for h in head)) <= 1] = 2  # skull
    inner = rho(*(h - 9 for h in head)) <= 1
    lab[inner] = 3  # CSF
    bx, by, bz = (h - 12 for h in head)
    rb = np.sqrt(rho(bx, by, bz))
    brain = rb <= 1
    lab[brain] = 5  # WM
    thick = (4.0 + 1.5 * np.sin(x / 6.0) * np.cos(y / 7.0) * np.sin(z / 5.0 + 1.0)) / 65.0
    lab[brain & (rb > 1 - thick)] = 4  # cortex
    sulci = brain & (rb > 1 - 9.0 / 65.0) & (np.sin(x / 5.0) * np.sin(y / 6.0 + 0.5) * np.sin(z / 5.5) > 0.55)
    lab[sulci] = 3
    for sx_ in (-1.0, 1.0):
        lab[rho(9.0, 14.0, 10.0, cx=20 * sx_) <= 1] = 4  # basal ganglia / thalamus
    for sx_ in (-1.0, 1.0):
        lab[rho(5.0, 28.0, 9.0, cx=9 * sx_, cy=-3.0, cz=10.0) <= 1] = 3  # lateral ventricles
    lab[rho(2.5, 10.0, 8.0, cy=5.0, cz=-2.0) <= 1] = 3  # third ventricle
    lab[(np.abs(x) < 5.0) & inner & ~brain & (z > 15.0)] = 6  # superior sagittal sinus
    lab.setflags(write=False)
    return lab


def _uniform(rng: np.random.Generator, lo_hi) -> float:
    lo, hi = lo_hi
    return float(lo) if lo == hi else float(rng.uniform(lo, hi))


def make_mr_phantom(
    seed: int,
    sequence: str | None = None,
    shape: Sequence[int] = (32, 64, 64),
    spacing: Sequence[float] = (4.0, 3.0, 3.0),
    *,
    plane: str | None = None,
    field_strength: float | None = None,
) -> MRPhantom:
    """A head MR phantom of ``sequence`` (a key of :data:`MR_SEQUENCES`, random when None).

    Axes of ``volume`` (slices, rows, cols): axial (inferior->superior, anterior->posterior,
    patient right->left); sagittal (right->left, superior->inferior, anterior->posterior); coronal
    (anterior->posterior, superior->inferior, right->left). The signal is magnitude with Rician
    noise (sigma ~1.5% of the brightest tissue), scaled by a random receiver gain (~1000 units).
    """
    shape, spacing = _norm_geometry(shape, spacing)
    seed = int(seed)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x4D52]))
    if sequence is None:
        sequence = str(rng.choice(sorted(MR_SEQUENCES)))
    if sequence not in MR_SEQUENCES:
        raise ValueError(f"unknown sequence {sequence!r}; expected one of {sorted(MR_SEQUENCES)}")
    p = MR_SEQUENCES[sequence]
    b0 = float(field_strength) if field_strength is not None else float(rng.choice([1.5, 3.0]))
    if b0 not in (1.5, 3.0):
        raise ValueError("field_strength must be 1.5 or 3.0")
    plane = plane or str(rng.choice(p["planes"]))
    manufacturer = str(rng.choice(sorted(_MODELS[b0])))
    model = str(rng.choice(_MODELS[b0][manufacturer]))

    TE, TR, FA = _uniform(rng, p["TE"]), _uniform(rng, p["TR"]), _uniform(rng, p["FA"])
    TI = None
    # per-phantom tissue jitter (relaxation +-4%, PD +-2%)
    names = [MR_TISSUES[i] for i in range(len(MR_TISSUES))]
    pd = np.array([MR_TISSUE_PARAMS[n][0] for n in names]) * rng.uniform(0.98, 1.02, len(names))
    t1 = np.array([MR_TISSUE_PARAMS[n][1][b0] for n in names]) * rng.uniform(0.96, 1.04, len(names))
    t2 = np.array([MR_TISSUE_PARAMS[n][2][b0] for n in names]) * rng.uniform(0.96, 1.04, len(names))
    if p["ContrastBolusAgent"]:
        blood = names.index("blood")
        t1[blood] = 1.0 / (1.0 / t1[blood] + _GD_R1[b0] * _GD_CONC_MM / 1000.0)
    if p["TI"] is not None:
        rule = p.get("TI_rule")
        if rule in ("null_csf", "null_fat"):
            t1n = t1[names.index("csf" if rule == "null_csf" else "fat")]
            TI = t1n * math.log(2.0 / (1.0 + math.exp(-TR / t1n))) * rng.uniform(0.98, 1.02)
            TI = float(np.clip(TI, *p["TI"]))
        else:
            TI = _uniform(rng, p["TI"])
    sig = mr_signal(pd, t1, t2, p["equation"], TE, TR, TI, FA)
    gain = 1000.0 * rng.uniform(0.8, 1.2) / max(sig.max(), 1e-6)
    lut = (sig * gain).astype(np.float32)

    lab = _mr_anatomy(shape, spacing, plane)
    vol = lut[lab]
    sigma = np.float32(rng.uniform(0.01, 0.02) * 1000.0)
    nrng = np.random.default_rng(np.random.SeedSequence([seed, 0x4E]))
    n1 = nrng.standard_normal(shape, dtype=np.float32)
    n2 = nrng.standard_normal(shape, dtype=np.float32)
    vol += sigma * n1
    n2 *= sigma
    vol = np.sqrt(vol * vol + n2 * n2)

    desc = _VENDOR_DESC.get(manufacturer, {}).get(p["description"], p["description"])
    metadata = {
        "EchoTime": round(TE, 2),
        "RepetitionTime": round(TR, 1),
        "InversionTime": None if TI is None else round(TI, 1),
        "FlipAngle": round(FA, 1),
        "MagneticFieldStrength": b0,
        "Manufacturer": manufacturer,
        "ManufacturerModelName": model,
        "ScanningSequence": tuple(p["ScanningSequence"]),
        "SequenceVariant": tuple(p["SequenceVariant"]),
        "ScanOptions": tuple(p["ScanOptions"]),
        "MRAcquisitionType": p["MRAcquisitionType"],
        "ContrastBolusAgent": p["ContrastBolusAgent"],
        "SeriesDescription": f"{desc} {_PLANE_ABBR[plane]}",
        "Modality": "MR",
        "Plane": plane,
    }
    return MRPhantom(vol.astype(np.float32, copy=False), spacing, metadata, sequence, seed, lab)


# ------------------------------------------------------------------------------------------------
# Sets
# ------------------------------------------------------------------------------------------------


def make_phantom_set(
    n_ct: int,
    n_mr: int,
    seed: int = 0,
    *,
    ct_kwargs: dict | None = None,
    mr_kwargs: dict | None = None,
    **kwargs: Any,
) -> tuple[list[CTPhantom], list[MRPhantom]]:
    """``n_ct`` CT and ``n_mr`` MR phantoms, deterministic by ``seed`` (and prefix-stable: the
    first k phantoms do not depend on n). Extra ``kwargs`` go to :func:`make_ct_phantom`;
    ``ct_kwargs``/``mr_kwargs`` go to the respective generator."""
    ct_kw = {**kwargs, **(ct_kwargs or {})}
    mr_kw = dict(mr_kwargs or {})
    ct_seeds = np.random.SeedSequence([int(seed), 1]).generate_state(max(n_ct, 1), dtype=np.uint32)[:n_ct]
    mr_seeds = np.random.SeedSequence([int(seed), 2]).generate_state(max(n_mr, 1), dtype=np.uint32)[:n_mr]
    cts = [make_ct_phantom(int(s), **ct_kw) for s in ct_seeds]
    mrs = [make_mr_phantom(int(s), **mr_kw) for s in mr_seeds]
    return cts, mrs
