"""The findings the CT phantom can draw, each declared in one place: a :class:`FindingKind` record holding its
name, the words reports use for it, where it lies (which sets its side and lobe), how it is graded, how it is
drawn into the volume, the report sentences that describe it and those that negate it.

Adding a finding: write its drawing function and its sentences, declare its record below them, and list the
record in :data:`CT_FINDING_KINDS` (its position there is its label index).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np

from medvl.data.phantoms.ct_anatomy import HEART, LOBE_FRACTIONS, LUNG, LUNG_L, LUNG_R, MEDIASTINAL_FAT, CTAnatomy
from medvl.options import look_up_option

SIZES = ("small", "moderate", "large")
SEVERITIES = ("mild", "moderate", "severe")

# Where a finding lies, which decides the side and lobe it is given:
LOBAR = "lobar"  # in one lobe of one lung: side and lobe drawn (or given)
PLEURAL = "pleural"  # in the right, left or both pleural spaces: side drawn (or given), no lobe
UPPER_LOBES = "upper lobes"  # in both lungs, upper lobe predominant
CENTRAL = "central"  # the heart, mediastinum or aorta: neither side nor lobe
PLACEMENTS = (LOBAR, PLEURAL, UPPER_LOBES, CENTRAL)

# Lung below this many HU is still aerated (normal lung is about -850; the findings that fill it are above -600).
AERATED_HU = -400


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


# ------------------------------------------------------------------------------------------------
# Drawing: what every finding's drawing function shares
# ------------------------------------------------------------------------------------------------

class Canvas:
    """The phantom being drawn: its anatomy, the float32 HU volume the findings are painted into, the tissues'
    HU and the findings' random stream."""

    def __init__(self, anatomy: CTAnatomy, vol: np.ndarray, hu: np.ndarray, rng: np.random.Generator):
        self.A, self.vol, self.hu, self.rng = anatomy, vol, hu, rng
        # the heart's semi-axes relative to normal: cardiomegaly enlarges it, a pericardial effusion surrounds it
        self.heart_scale = np.ones(3)

    def aerated(self, index, side: str) -> np.ndarray:
        """Where ``self.vol[index]`` is still-aerated lung of ``side``: that lung's label, below AERATED_HU (the
        findings drawn so far may have filled some of it)."""
        return (self.A.labels[index] == LUNG[side]) & (self.vol[index] < AERATED_HU)

    def lobe_center(self, side: str, lobe: str, posterior: bool = False) -> tuple[int, int, int]:
        A, rng = self.A, self.rng
        i0, i1 = A.lobes[(side, lobe)]
        m = (i1 - i0) // 5
        lab = A.labels
        for _ in range(20):
            zi = int(rng.integers(i0 + m, max(i1 - m, i0 + m + 1)))
            air = self.aerated(zi, side)
            cand = A.lung[side]["inner"][zi] & air
            if posterior:
                cand = cand & (A.y1 >= A.lung[side]["cy"])[:, None]
            flat = np.flatnonzero(cand)
            if flat.size == 0:
                flat = np.flatnonzero(air)
            if flat.size:
                yi, xi = np.unravel_index(int(rng.choice(flat)), cand.shape)
                return zi, int(yi), int(xi)
        # no aerated lung left (another finding filled the lobe): any voxel of the lobe's lung
        for zi in rng.permutation(np.arange(i0, i1)).tolist():
            flat = np.flatnonzero(lab[zi] == LUNG[side])
            if flat.size:
                yi, xi = np.unravel_index(int(rng.choice(flat)), lab[zi].shape)
                return int(zi), int(yi), int(xi)
        raise RuntimeError(f"no lung voxels in the {side} {lobe}; volume too small?")

    def paint(self, sl, mask, value, allowed=None, mode="set", into=None):
        """Paint ``value`` where the local ``mask`` (on the box ``sl``) holds and the anatomy is ``allowed``;
        returns the painted voxels as a whole-volume mask, ``into`` (or'ed in place) when one is given: a
        finding drawn as many small pieces then builds one mask, not one whole-volume array per piece."""
        if allowed is not None:
            labels = self.A.labels[sl]
            inside = labels == allowed[0]
            for label in allowed[1:]:
                inside |= labels == label
            mask = mask & inside
        v = self.vol[sl]
        if mode == "set":
            v[mask] = value
        elif mode == "max":
            v[mask] = np.maximum(v[mask], value)
        else:  # callable of the old values
            v[mask] = mode(v[mask])
        full = np.zeros(self.A.shape, bool) if into is None else into
        full[sl] |= mask
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

    def lobar_blob(self, f: Finding, rxy, rz, value_fn, posterior=False) -> Finding:
        rng, A = self.rng, self.A
        c = self.lobe_center(f.side, f.lobe, posterior)
        r = (rng.uniform(*rz), rng.uniform(*rxy), rng.uniform(*rxy))
        sl, m = A.ellipsoid(c, r)
        i0, i1 = A.lobes[(f.side, f.lobe)]
        zr = np.arange(sl[0].start, sl[0].stop)
        m = m & ((zr >= i0) & (zr < i1))[:, None, None]
        mask = self.paint(sl, m, None, allowed=[LUNG[f.side]], mode=value_fn)
        return self.finish(f, mask, c)

    def heart_ellipsoid(self, scale, extra_mm=0.0):
        A = self.A
        hz, hy, hx, az, ay, ax = A.heart
        c = A.index_of_mm((hz, hy, hx))
        r = (az * scale[0] + extra_mm, ay * scale[1] + extra_mm, ax * scale[2] + extra_mm)
        # the ellipsoid is centred on the nearest voxel, close enough for drawing
        return c, A.ellipsoid(c, r)


def location(f: Finding) -> str:
    """Where a report says a finding lies: "right upper lobe", "lingula", "left"."""
    if f.lobe == "lingula":
        return "lingula"
    return f"{f.side} {f.lobe}" if f.lobe else f"{f.side}"


@dataclass(frozen=True)
class FindingKind:
    """Everything the phantom knows about one finding.

    ``name``: as CT-RATE's abnormality class. ``surface_forms``: the lower-case words reports use for it,
    positive or negated. ``placement``: one of :data:`PLACEMENTS`; ``lobes_excluded`` the lobes a
    :data:`LOBAR` finding is never drawn in. ``grade``: "size" (:data:`SIZES`), "severity"
    (:data:`SEVERITIES`) or None. ``draw_rank``: findings are drawn in ascending rank (see
    :data:`CT_FINDING_KINDS`). ``draw(canvas, finding)`` paints it and returns the finding with its
    ``slice_index`` and centre. ``sentences(finding)``: the report's wordings of a drawn finding, each with a
    ``{ref}`` slot for its image reference. ``negations``: sentences that say it is absent.
    """

    name: str
    surface_forms: tuple[str, ...]
    placement: str
    grade: str | None
    draw_rank: int
    draw: Callable[[Canvas, Finding], Finding]
    sentences: Callable[[Finding], list[str]]
    negations: tuple[str, ...]
    lobes_excluded: tuple[str, ...] = ()

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"{self.name}: placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.grade not in ("size", "severity", None):
            raise ValueError(f"{self.name}: grade must be 'size', 'severity' or None, got {self.grade!r}")


# ------------------------------------------------------------------------------------------------
# The findings
# ------------------------------------------------------------------------------------------------

# Nodule diameters (mm) by size word. Large enough to cover voxels at the default 64 x 64 x 32 input
# (3.5 x 3.5 x 5 mm): a 7 mm nodule changed about 5 voxels there, below what any model learns to see.
NODULE_MM = {"small": (14.0, 18.0), "moderate": (20.0, 26.0), "large": (28.0, 36.0)}


# A nodule is a soft-tissue ball told apart by the air around it: one drawn against the heart, the chest wall, the
# diaphragm or another finding's density is hardly visible at 3.5 mm voxels (a 23 mm nodule against the heart was
# not). Its centre is the best of NODULE_SITE_TRIES aerated sites by how much of the ball of its radius plus
# NODULE_CLEARANCE_MM is aerated lung. Of the nodules of 400 phantoms (held-out seeds, 64 x 64 x 32), those with over
# 60 % aerated lung in a 2-9 mm shell around them: 66 % with one site, 88 % with the best of eight (median 73 -> 94 %).
NODULE_SITE_TRIES = 8
NODULE_CLEARANCE_MM = 6.0


def _aerated_site(canvas: Canvas, f: Finding, radius_mm: float) -> tuple[int, int, int]:
    """The centre, among aerated sites of the finding's lobe, whose ball of ``radius_mm`` holds the most aerated
    lung of the finding's side (the first that is all aerated lung ends the search)."""
    A, best, best_fraction = canvas.A, None, -1.0
    for _ in range(NODULE_SITE_TRIES):
        c = canvas.lobe_center(f.side, f.lobe)
        sl, ball = A.ellipsoid(c, (radius_mm,) * 3)
        fraction = float(canvas.aerated(sl, f.side)[ball].mean())
        if fraction > best_fraction:
            best, best_fraction = c, fraction
        if fraction >= 1.0:
            break
    return best


def _draw_lung_nodule(canvas: Canvas, f: Finding) -> Finding:
    rng = canvas.rng
    d = {"small": rng.uniform(*NODULE_MM["small"]), "moderate": rng.uniform(*NODULE_MM["moderate"]),
         "large": rng.uniform(*NODULE_MM["large"])}[f.size]
    c = _aerated_site(canvas, f, d / 2 + NODULE_CLEARANCE_MM)
    sl, m = canvas.A.ellipsoid(c, (d / 2,) * 3)
    mask = canvas.paint(sl, m, rng.uniform(30, 60), allowed=[LUNG[f.side]])
    return dataclasses.replace(canvas.finish(f, mask, c), diameter_mm=round(float(d), 1))


def _lung_nodule_sentences(f: Finding) -> list[str]:
    loc, size = location(f), f.size
    d = f"{f.diameter_mm:.0f} mm" if f.diameter_mm else ""
    return [
        f"There is a {size} nodule in the {loc} {{ref}}.",
        f"A {size} pulmonary nodule measuring {d} is seen in the {loc} {{ref}}.",
        f"{size} solid nodule in the {loc} {{ref}}.",
        f"{size} lung nodule noted in the {loc}, measuring {d} {{ref}}.",
    ]


LUNG_NODULE = FindingKind(
    "Lung nodule", surface_forms=("lung nodule", "nodule"), placement=LOBAR, grade="size", draw_rank=5,
    draw=_draw_lung_nodule, sentences=_lung_nodule_sentences,
    negations=("No pulmonary nodules.", "There is no lung nodule.", "No suspicious nodule is seen."))


def _draw_pleural_effusion(canvas: Canvas, f: Finding) -> Finding:
    A, rng = canvas.A, canvas.rng
    tz, fy = {"small": (0.72, 0.45), "moderate": (0.55, 0.1), "large": (0.40, -0.25)}[f.size]
    mask = np.zeros(A.shape, bool)
    for side in (("right", "left") if f.side == "bilateral" else (f.side,)):
        g = A.lung[side]
        zc = A.z1 >= g["apex"] + tz * (g["dome"] - g["apex"])
        yc = A.y1 >= g["cy"] + fy * g["ay"]
        mask |= (A.labels == LUNG[side]) & zc[:, None, None] & yc[None, :, None]
    canvas.vol[mask] = rng.uniform(5, 18)
    return canvas.finish(f, mask)


def _pleural_effusion_sentences(f: Finding) -> list[str]:
    size, side = f.size, f.side
    pl = "s" if side == "bilateral" else ""
    return [
        f"{size} {side} pleural effusion{pl} {{ref}}.",
        f"There is a {size} {side} pleural effusion {{ref}}." if not pl
        else f"There are {size} bilateral pleural effusions {{ref}}.",
        f"A {size} {side} pleural effusion is present {{ref}}." if not pl
        else f"{size} pleural effusions are present, bilateral {{ref}}.",
    ]


PLEURAL_EFFUSION = FindingKind(
    "Pleural effusion", surface_forms=("pleural effusion",), placement=PLEURAL, grade="size", draw_rank=0,
    draw=_draw_pleural_effusion, sentences=_pleural_effusion_sentences,
    negations=("No pleural effusion.", "There is no pleural effusion."))


def _draw_consolidation(canvas: Canvas, f: Finding) -> Finding:
    hu = canvas.rng.uniform(25, 45)
    # lobar: most of the lobe (a consolidation the size of a patch row of the 64 x 64 x 32 input)
    return canvas.lobar_blob(f, (26, 44), (18, 30), lambda old: np.full_like(old, hu))


def _consolidation_sentences(f: Finding) -> list[str]:
    loc = location(f)
    return [
        f"There is consolidation in the {loc} {{ref}}.",
        f"Consolidation is present in the {loc} {{ref}}.",
        f"Airspace consolidation in the {loc} {{ref}}.",
    ]


CONSOLIDATION = FindingKind(
    "Consolidation", surface_forms=("consolidation",), placement=LOBAR, grade=None, draw_rank=3,
    draw=_draw_consolidation, sentences=_consolidation_sentences,
    negations=("No consolidation.", "There is no consolidation."))


def _draw_emphysema(canvas: Canvas, f: Finding) -> Finding:
    A, rng = canvas.A, canvas.rng
    n = {"mild": 30, "moderate": 55, "severe": 90}[f.severity]
    mask = np.zeros(A.shape, bool)
    for k in range(n):
        cand = A.emph_candidates["right" if k % 2 == 0 else "left"]
        c = np.unravel_index(int(rng.choice(cand)), A.shape)
        rxy = rng.uniform(6, 12)
        sl, m = A.ellipsoid(c, (max(rxy, 0.75 * A.spacing[0]), rxy, rxy))
        canvas.paint(sl, m, rng.uniform(-1000, -975), allowed=[LUNG_R, LUNG_L], into=mask)
    return canvas.finish(f, mask)


def _emphysema_sentences(f: Finding) -> list[str]:
    sev = f.severity
    return [
        f"{sev} centrilobular emphysema, bilateral and upper lobe predominant {{ref}}.",
        f"There are {sev} bilateral emphysematous changes, predominantly in the upper lobes {{ref}}.",
        f"{sev} emphysema is noted, bilateral with upper lobe predominance {{ref}}.",
    ]


EMPHYSEMA = FindingKind(
    "Emphysema", surface_forms=("emphysema", "emphysematous"), placement=UPPER_LOBES, grade="severity",
    draw_rank=1, draw=_draw_emphysema, sentences=_emphysema_sentences,
    negations=("No emphysema.", "There are no emphysematous changes."))


def _draw_cardiomegaly(canvas: Canvas, f: Finding) -> Finding:
    k = {"mild": 1.2, "moderate": 1.32, "severe": 1.45}[f.severity]
    canvas.heart_scale = np.array([1.1, k, k])
    c, (sl, m) = canvas.heart_ellipsoid(canvas.heart_scale)
    mask = canvas.paint(sl, m, canvas.hu[HEART], allowed=[LUNG_R, LUNG_L, MEDIASTINAL_FAT])
    return canvas.finish(f, mask, c)


def _cardiomegaly_sentences(f: Finding) -> list[str]:
    sev = f.severity
    return [
        f"{sev} cardiomegaly is noted {{ref}}.",
        f"There is {sev} cardiomegaly {{ref}}.",
        f"Enlarged heart, {sev} cardiomegaly {{ref}}.",
    ]


CARDIOMEGALY = FindingKind(
    "Cardiomegaly", surface_forms=("cardiomegaly", "enlarged heart"), placement=CENTRAL, grade="severity",
    draw_rank=6, draw=_draw_cardiomegaly, sentences=_cardiomegaly_sentences,
    negations=("No cardiomegaly.", "The heart is normal in size without cardiomegaly."))


def _draw_atelectasis(canvas: Canvas, f: Finding) -> Finding:
    rng, A = canvas.rng, canvas.A
    # two or three plate-like (subsegmental) bands in the posterior lobe, each thick enough to cover
    # voxels at 5 mm slices: one band of a few mm changed about 30 voxels of the 64 x 64 x 32 input
    i0, i1 = A.lobes[(f.side, f.lobe)]
    hu = rng.uniform(10, 40)
    mask = np.zeros(A.shape, bool)
    first = None
    for _ in range(int(rng.integers(2, 4))):
        c = canvas.lobe_center(f.side, f.lobe, posterior=True)
        r = (max(6.0, 0.75 * A.spacing[0]), rng.uniform(6, 9), rng.uniform(30, 45))
        sl, m = A.ellipsoid(c, r)
        zr = np.arange(sl[0].start, sl[0].stop)
        m = m & ((zr >= i0) & (zr < i1))[:, None, None]
        canvas.paint(sl, m, hu, allowed=[LUNG[f.side]], into=mask)
        first = first or c
    return canvas.finish(f, mask, first)


def _atelectasis_sentences(f: Finding) -> list[str]:
    loc = location(f)
    return [
        f"Linear atelectasis in the {loc} {{ref}}.",
        f"There is a band of atelectasis in the {loc} {{ref}}.",
        f"Subsegmental atelectasis is seen in the {loc} {{ref}}.",
    ]


ATELECTASIS = FindingKind(
    "Atelectasis", surface_forms=("atelectasis",), placement=LOBAR, lobes_excluded=("upper lobe",), grade=None,
    draw_rank=4, draw=_draw_atelectasis, sentences=_atelectasis_sentences,
    negations=("No atelectasis.", "There is no atelectasis."))


def _draw_pericardial_effusion(canvas: Canvas, f: Finding) -> Finding:
    t = {"small": 6.0, "moderate": 11.0, "large": 18.0}[f.size]
    c, (sl, outer) = canvas.heart_ellipsoid(canvas.heart_scale, t)
    _, (sl_in, inner) = canvas.heart_ellipsoid(canvas.heart_scale)
    inner_full = np.zeros(canvas.A.shape, bool)
    inner_full[sl_in] = inner
    shell = outer & ~inner_full[sl]
    mask = canvas.paint(sl, shell, canvas.rng.uniform(8, 20), allowed=[LUNG_R, LUNG_L, MEDIASTINAL_FAT])
    return canvas.finish(f, mask)


def _pericardial_effusion_sentences(f: Finding) -> list[str]:
    size = f.size
    return [
        f"{size} pericardial effusion {{ref}}.",
        f"There is a {size} pericardial effusion {{ref}}.",
        f"A {size} pericardial effusion is present {{ref}}.",
    ]


PERICARDIAL_EFFUSION = FindingKind(
    "Pericardial effusion", surface_forms=("pericardial effusion",), placement=CENTRAL, grade="size",
    draw_rank=7, draw=_draw_pericardial_effusion, sentences=_pericardial_effusion_sentences,
    negations=("No pericardial effusion.", "There is no pericardial effusion."))


def _draw_lymphadenopathy(canvas: Canvas, f: Finding) -> Finding:
    A, rng = canvas.A, canvas.rng
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
        canvas.paint(sl, m, rng.uniform(40, 60), allowed=[MEDIASTINAL_FAT, LUNG_R, LUNG_L], into=mask)
        if d > best[0]:
            best = (d, c)
    out = canvas.finish(f, mask, best[1])
    return dataclasses.replace(out, diameter_mm=round(float(best[0]), 1))


def _lymphadenopathy_sentences(f: Finding) -> list[str]:
    d = f"{f.diameter_mm:.0f} mm" if f.diameter_mm else "over 10 mm"
    return [
        f"Mediastinal lymphadenopathy, the largest node measuring {d} in short axis {{ref}}.",
        "Enlarged mediastinal lymph nodes are present {ref}.",
        "There is mediastinal and hilar lymphadenopathy {ref}.",
    ]


LYMPHADENOPATHY = FindingKind(
    "Lymphadenopathy", surface_forms=("lymphadenopathy", "lymph node"), placement=CENTRAL, grade=None,
    draw_rank=8, draw=_draw_lymphadenopathy, sentences=_lymphadenopathy_sentences,
    negations=("No mediastinal lymphadenopathy.", "There are no enlarged lymph nodes."))


def _draw_lung_opacity(canvas: Canvas, f: Finding) -> Finding:
    hu = canvas.rng.uniform(-600, -450)
    return canvas.lobar_blob(f, (24, 42), (16, 28), lambda old: hu + 0.5 * (old + 850.0))


def _lung_opacity_sentences(f: Finding) -> list[str]:
    loc = location(f)
    return [
        f"Ground-glass opacity in the {loc} {{ref}}.",
        f"There is a patchy ground-glass opacity in the {loc} {{ref}}.",
        f"An area of increased opacity is seen in the {loc} {{ref}}.",
    ]


LUNG_OPACITY = FindingKind(
    "Lung opacity", surface_forms=("lung opacity", "ground-glass opacity", "opacity"), placement=LOBAR,
    grade=None, draw_rank=2, draw=_draw_lung_opacity, sentences=_lung_opacity_sentences,
    negations=("No ground-glass opacity.", "There is no focal lung opacity."))


SPINE_CLEARANCE_RAD = np.pi / 4


def _draw_arterial_wall_calcification(canvas: Canvas, f: Finding) -> Finding:
    A, rng = canvas.A, canvas.rng
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
    # The descending aorta lies against the vertebral body, which the window shows as bright as a plaque: an arc
    # facing the spine is part of the bone's outline there. Arcs keep SPINE_CLEARANCE_RAD away from that direction.
    spine = np.arctan2(A.vertebra_center[0] - cy, A.vertebra_center[1] - cx)
    for zmm in zs:
        half = rng.uniform(0.8, 1.3)  # arc of 90-150 degrees
        reach = np.pi - half - SPINE_CLEARANCE_RAD
        th = spine + np.pi + rng.uniform(-reach, reach)
        arc = wall & (np.abs(np.angle(np.exp(1j * (angle - th)))) <= half)
        hz = max(rng.uniform(8, 14), 0.5 * A.spacing[0])
        zs_in = np.flatnonzero(np.abs(A.z1 - zmm) <= hz)
        if zs_in.size == 0 or not arc.any():
            continue
        sl = (slice(int(zs_in[0]), int(zs_in[-1]) + 1), slice(None), slice(None))  # the slices are contiguous
        plaque = np.broadcast_to(arc, (zs_in.size, *arc.shape))
        canvas.paint(sl, plaque, rng.uniform(500, 1000), mode="max", into=mask)
        zi = int(np.argmin(np.abs(A.z1 - zmm)))
        yy, xx = np.nonzero(arc)
        centers.append((zi, int(round(yy.mean())), int(round(xx.mean()))))
    return canvas.finish(f, mask, centers[len(centers) // 2])


def _arterial_wall_calcification_sentences(f: Finding) -> list[str]:
    sev = f.severity
    return [
        f"{sev} atherosclerotic calcification of the aorta {{ref}}.",
        f"Arterial wall calcification is seen in the aorta, {sev} {{ref}}.",
        f"There is {sev} arterial wall calcification of the descending aorta {{ref}}.",
    ]


ARTERIAL_WALL_CALCIFICATION = FindingKind(
    "Arterial wall calcification",
    surface_forms=("arterial wall calcification", "atherosclerotic calcification", "calcification"),
    placement=CENTRAL, grade="severity", draw_rank=9, draw=_draw_arterial_wall_calcification,
    sentences=_arterial_wall_calcification_sentences,
    negations=("No arterial wall calcification.", "There is no atherosclerotic calcification."))


#: Every finding the CT phantom can draw, by name, in label order (``CTPhantom.labels[i]`` is the i-th).
#: Their draw ranks order the drawing: the findings that fill lung (effusion, emphysema, opacity,
#: consolidation, atelectasis) before the nodule, which is placed in lung still aerated; the heart before
#: the pericardial effusion around it; calcification, painted over whatever lies there, last.
CT_FINDING_KINDS: dict[str, FindingKind] = {kind.name: kind for kind in (
    LUNG_NODULE, PLEURAL_EFFUSION, CONSOLIDATION, EMPHYSEMA, CARDIOMEGALY, ATELECTASIS, PERICARDIAL_EFFUSION,
    LYMPHADENOPATHY, LUNG_OPACITY, ARTERIAL_WALL_CALCIFICATION)}
#: Findings the CT phantom can draw, named exactly as CT-RATE's abnormality classes, in label order.
CT_FINDINGS: tuple[str, ...] = tuple(CT_FINDING_KINDS)
#: Lower-case surface forms the reports use for each finding (positive or negated).
CT_SURFACE_FORMS: dict[str, tuple[str, ...]] = {name: kind.surface_forms for name, kind in CT_FINDING_KINDS.items()}


def finding_kind(name: str) -> FindingKind:
    """The record of the finding called ``name``; a ValueError naming the known ones when there is none."""
    return CT_FINDING_KINDS[look_up_option(name, CT_FINDINGS, name="finding")]


def finding_templates(f: Finding) -> list[str]:
    """The wordings a report may describe the drawn finding ``f`` with, each with a ``{ref}`` slot for its image
    reference."""
    return finding_kind(f.name).sentences(f)


def with_attributes(f: Finding, rng: np.random.Generator) -> Finding:
    """``f`` with the side, lobe, size and severity its kind needs drawn from ``rng`` (those given are kept),
    checked, and the others cleared."""
    kind = finding_kind(f.name)
    n = kind.name
    side, lobe, size, sev = f.side, f.lobe, f.size, f.severity
    if kind.placement == LOBAR:
        if side is None:
            side = str(rng.choice(["right", "left"]))
        if side not in ("right", "left"):
            raise ValueError(f"{n}: side must be 'right' or 'left', got {side!r}")
        if lobe is None:
            lobe = str(rng.choice([c for c in LOBE_FRACTIONS[side] if c not in kind.lobes_excluded]))
        if lobe not in LOBE_FRACTIONS[side]:
            raise ValueError(f"{n}: the {side} lung has no {lobe!r}")
    elif kind.placement == PLEURAL:
        side = side or str(rng.choice(["right", "left", "bilateral"], p=[0.3, 0.3, 0.4]))
        lobe = None
    elif kind.placement == UPPER_LOBES:
        side, lobe = "bilateral", "upper lobe"
    else:
        side, lobe = None, None
    if kind.grade == "size":
        size = size or str(rng.choice(SIZES))
        sev = None
    elif kind.grade == "severity":
        sev = sev or str(rng.choice(SEVERITIES))
        size = None
    else:
        size, sev = None, None
    if size is not None and size not in SIZES:
        raise ValueError(f"{n}: size must be one of {SIZES}")
    if sev is not None and sev not in SEVERITIES:
        raise ValueError(f"{n}: severity must be one of {SEVERITIES}")
    return dataclasses.replace(f, side=side, lobe=lobe, size=size, severity=sev)
