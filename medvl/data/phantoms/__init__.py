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
* MR: see :data:`MR_TISSUE_PARAMS`.

Modules: ``geometry`` (the grid), ``ct_anatomy`` (the normal chest), ``ct_findings`` (each finding's record:
how it is placed, graded, drawn and reported), ``ct_report``, ``ct`` (the CT generator), ``mr`` (the MR
generator), ``sets`` (sets of phantoms and their seeds).
"""

from medvl.data.phantoms.ct import CTPhantom, make_ct_phantom
from medvl.data.phantoms.ct_anatomy import CT_TISSUES, ct_lobe_slices
from medvl.data.phantoms.ct_findings import CT_FINDING_KINDS, CT_FINDINGS, CT_SURFACE_FORMS, Finding, FindingKind, \
    finding_templates
from medvl.data.phantoms.ct_report import ct_report, finding_sentence, without_image_reference
from medvl.data.phantoms.mr import MR_IMAGE_INDEPENDENT_TAGS, MR_SEQUENCES, MR_TISSUE_PARAMS, MR_TISSUES, MRPhantom, \
    make_mr_phantom, mr_signal
from medvl.data.phantoms.sets import HELD_OUT_SEED, make_phantom_set, phantom_seeds

__all__ = [
    "HELD_OUT_SEED",
    "CT_FINDINGS",
    "CT_FINDING_KINDS",
    "CT_SURFACE_FORMS",
    "CT_TISSUES",
    "Finding",
    "FindingKind",
    "CTPhantom",
    "make_ct_phantom",
    "ct_report",
    "ct_lobe_slices",
    "finding_sentence",
    "finding_templates",
    "without_image_reference",
    "MR_SEQUENCES",
    "MR_TISSUES",
    "MR_TISSUE_PARAMS",
    "MR_IMAGE_INDEPENDENT_TAGS",
    "MRPhantom",
    "make_mr_phantom",
    "mr_signal",
    "make_phantom_set",
    "phantom_seeds",
]
