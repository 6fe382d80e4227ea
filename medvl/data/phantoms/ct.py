"""The CT chest phantom: anatomy with per-phantom tissue values, findings, noise, and the report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from medvl.data.phantoms.ct_anatomy import AORTA, BODY_SCALES, CT_SHAPE, CT_SPACING, HEART, LIVER, TISSUE_HU, \
    ct_anatomy
from medvl.data.phantoms.ct_findings import CT_FINDING_KINDS, CT_FINDINGS, Canvas, Finding, with_attributes
from medvl.data.phantoms.ct_report import ct_report
from medvl.data.phantoms.geometry import checked_geometry


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


def make_ct_phantom(
    seed: int,
    shape: Sequence[int] = CT_SHAPE,
    spacing: Sequence[float] = CT_SPACING,
    findings: Sequence[str | Finding] | None = None,
    p_finding: float = 0.35,
) -> CTPhantom:
    """A chest CT phantom with findings and a matching free-text report.

    ``findings=None`` draws each of :data:`CT_FINDINGS` independently with probability
    ``p_finding``; a list of names or :class:`Finding` objects forces exactly those (unset
    attributes are drawn at random). See :mod:`medvl.data.phantoms` for orientation and determinism.
    """
    shape, spacing = checked_geometry(shape, spacing)
    seed = int(seed)
    r_anat, r_find, r_noise, r_report = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4))

    variant = int(r_anat.integers(len(BODY_SCALES)))
    A = ct_anatomy(shape, spacing, variant)
    contrast = bool(r_anat.random() < 0.5)
    hu = TISSUE_HU[:, 0] + TISSUE_HU[:, 1] * r_anat.standard_normal(len(TISSUE_HU)).astype(np.float32)
    if contrast:
        hu[AORTA] = r_anat.uniform(150, 300)
        hu[HEART] = r_anat.uniform(120, 220)
        hu[LIVER] = r_anat.uniform(90, 110)
    tex_amp = np.float32(r_anat.uniform(15, 30))
    off = r_anat.integers(0, A.pad + 1, 3)
    sigma = np.float32(r_anat.uniform(8, 15))

    vol = hu[A.labels]  # gather: float32 copy
    Z, Y, X = shape
    tex = A.texture[off[0] : off[0] + Z, off[1] : off[1] + Y, off[2] : off[2] + X]
    vol += tex_amp * tex * A.lungf

    if findings is None:
        wanted = [Finding(n) for n in CT_FINDINGS if r_find.random() < p_finding]
    else:
        wanted = [f if isinstance(f, Finding) else Finding(str(f)) for f in findings]
    wanted = [with_attributes(f, r_find) for f in wanted]
    canvas = Canvas(A, vol, hu, r_find)
    drawn: list[Finding | None] = [None] * len(wanted)
    for i in sorted(range(len(wanted)), key=lambda i: CT_FINDING_KINDS[wanted[i].name].draw_rank):
        drawn[i] = CT_FINDING_KINDS[wanted[i].name].draw(canvas, wanted[i])
    out_findings = [f for f in drawn if f is not None]

    vol += sigma * r_noise.standard_normal(shape, dtype=np.float32)
    np.clip(vol, -1024, 3071, out=vol)
    volume = np.rint(vol).astype(np.int16)

    labels = np.zeros(len(CT_FINDINGS), bool)
    for f in out_findings:
        labels[CT_FINDINGS.index(f.name)] = True
    report = ct_report(out_findings, r_report)
    return CTPhantom(volume, spacing, out_findings, report, labels, seed, A.labels, contrast)
