"""The MR head phantom: tissue labels x (PD, T1, T2) at 1.5 T or 3 T through the standard signal equations,
Rician noise, and acquisition metadata with DICOM keywords.

Tissue values: see :data:`MR_TISSUE_PARAMS` (values in the range reported by Wansapura et al., JMRI 1999
(3 T); Stanisz et al., MRM 2005 (1.5/3 T, incl. blood); Gold et al., AJR 2004 (fat); the review of
Bojorquez et al., MRI 2017). WM/GM proton densities 0.70/0.80 relative to CSF (water content).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from medvl.data.phantoms.geometry import checked_geometry
from medvl.options import look_up_option

#: The MR phantom's default grid: (slices, rows, cols) voxels and their spacing in mm.
MR_SHAPE = (32, 64, 64)
MR_SPACING = (4.0, 3.0, 3.0)

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
    shape: Sequence[int] = MR_SHAPE,
    spacing: Sequence[float] = MR_SPACING,
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
    shape, spacing = checked_geometry(shape, spacing)
    seed = int(seed)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x4D52]))
    if sequence is None:
        sequence = str(rng.choice(sorted(MR_SEQUENCES)))
    look_up_option(sequence, sorted(MR_SEQUENCES), name="sequence")
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
