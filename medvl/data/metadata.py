"""Acquisition metadata as text, as contrast categories, and deliberately corrupted.

The metadata dicts are those of ``medvl.data.dicom.mr_metadata`` (DICOM keywords plus "Modality"
and "Plane"). Following the idea of MR-CLIP (acquisition parameters turned into a sentence that a
text encoder can align with the image), ``metadata_to_text`` writes one sentence per configuration;
``contrast_category`` maps a configuration to a stable integer label; ``corrupt_metadata`` makes
negative/robustness examples with one wrong field.

Binning
-------
Echo and repetition times are binned on log-spaced edges (about 19 edges spread geometrically,
rounded to readable values) because contrast depends on their ratio to tissue T1/T2, not on their
absolute difference:

- ``DEFAULT_TE_EDGES`` (ms): 1.5 ... 250, ratio ~1.33 between edges. Bin 0 is TE < 1.5 ms
  (ultra-short), bin 19 TE >= 250 ms (heavily T2-weighted).
- ``DEFAULT_TR_EDGES`` (ms): 3 ... 12000, ratio ~1.58. Bin 0 is TR < 3 ms, bin 19 TR >= 12000 ms.
- ``DEFAULT_TI_EDGES`` (ms): (300, 1200, 2000): < 300 (STIR-like fat suppression), 300-1200
  (T1-FLAIR / MPRAGE), 1200-2000, >= 2000 (FLAIR), and a separate "no inversion" value when TI is
  absent or <= 0 (several vendors write 0 for non-IR sequences).

A value equal to an edge falls in the upper bin (``numpy.searchsorted(edges, v, side="right")``).
``quantize_value`` returns the 0-based bin; sentences print it 1-based ("TE bin 7 of 20").
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Sequence, Union

import numpy as np

from medvl.data.values import finite_float
from medvl.options import look_up_option

__all__ = [
    "MR_METADATA_KEYS",
    "CORRUPTION_KINDS",
    "DEFAULT_TE_EDGES",
    "DEFAULT_TI_EDGES",
    "DEFAULT_TR_EDGES",
    "MISSING_TAG_CANDIDATES",
    "NUMERIC_ERROR_FACTORS",
    "SCANNING_SEQUENCE_TERMS",
    "SEQUENCE_VARIANT_TERMS",
    "WRONG_TAG_VOCABULARY",
    "contrast_category",
    "contrast_key",
    "corrupt_metadata",
    "dicom_terms",
    "metadata_to_text",
    "quantize_value",
]

# The acquisition metadata of an MR series, in order (mr_metadata(), the phantoms): thirteen DICOM
# keywords, then "Modality" and "Plane".
MR_METADATA_KEYS: tuple[str, ...] = (
    "EchoTime",
    "RepetitionTime",
    "InversionTime",
    "FlipAngle",
    "MagneticFieldStrength",
    "Manufacturer",
    "ManufacturerModelName",
    "ScanningSequence",
    "SequenceVariant",
    "ScanOptions",
    "MRAcquisitionType",
    "ContrastBolusAgent",
    "SeriesDescription",
    "Modality",
    "Plane",
)

DEFAULT_TE_EDGES: tuple[float, ...] = (
    1.5, 2.0, 2.6, 3.5, 4.7, 6.2, 8.2, 11.0, 15.0, 19.0,
    26.0, 34.0, 45.0, 60.0, 80.0, 105.0, 140.0, 190.0, 250.0,
)
DEFAULT_TR_EDGES: tuple[float, ...] = (
    3.0, 4.8, 7.5, 12.0, 19.0, 30.0, 48.0, 75.0, 120.0, 190.0,
    300.0, 480.0, 750.0, 1200.0, 1900.0, 3000.0, 4800.0, 7500.0, 12000.0,
)
DEFAULT_TI_EDGES: tuple[float, ...] = (300.0, 1200.0, 2000.0)

# DICOM defined terms of ScanningSequence (0018,0020) and SequenceVariant (0018,0021), in the order
# of their bits in contrast_category. Any other term sets the last ("other") bit.
SCANNING_SEQUENCE_TERMS: tuple[str, ...] = ("SE", "IR", "GR", "EP", "RM")
SEQUENCE_VARIANT_TERMS: tuple[str, ...] = ("SK", "MTC", "SS", "TRSS", "SP", "MP", "OSP")
_ACQ_TYPES: tuple[str, ...] = ("2D", "3D")

_SEQUENCE_WORDS = {
    "IR": "inversion recovery",
    "EP": "echo planar",
    "SE": "spin echo",
    "GR": "gradient echo",
    "RM": "research mode",
}
_SEQUENCE_ORDER = ("IR", "EP", "SE", "GR", "RM")
_VARIANT_WORDS = {
    "SK": "segmented k-space",
    "MTC": "magnetization transfer",
    "SS": "steady state",
    "TRSS": "time-reversed steady state",
    "SP": "spoiled",
    "MP": "magnetization prepared",
    "OSP": "oversampled phase",
}
_VENDOR_NAMES = {
    "SIEMENS": "Siemens",
    "SIEMENS HEALTHINEERS": "Siemens",
    "GE MEDICAL SYSTEMS": "GE",
    "GE HEALTHCARE": "GE",
    "PHILIPS": "Philips",
    "PHILIPS MEDICAL SYSTEMS": "Philips",
    "PHILIPS HEALTHCARE": "Philips",
    "TOSHIBA": "Toshiba",
    "TOSHIBA_MEC": "Toshiba",
    "CANON": "Canon",
    "CANON MEDICAL SYSTEMS": "Canon",
    "HITACHI": "Hitachi",
}


# ----------------------------------------------------------------------------------------------
# binning


def quantize_value(value: Any, edges: Sequence[float]) -> Optional[int]:
    """0-based bin of `value` among len(edges)+1 bins (upper bin on an edge); None when absent."""
    v = finite_float(value)
    if v is None:
        return None
    return int(np.searchsorted(np.asarray(edges, dtype=np.float64), v, side="right"))


def _ti_bin(value: Any, edges: Sequence[float]) -> Optional[int]:
    """None for no inversion (absent or <= 0), else the 0-based TI bin."""
    v = finite_float(value)
    if v is None or v <= 0:
        return None
    return quantize_value(v, edges)


def _fmt(value: float) -> str:
    """Numbers for sentences: at most two decimals, trailing zeros dropped (4000, 2.46, 0.5)."""
    text = f"{round(float(value), 2):.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _ti_range_text(b: int, edges: Sequence[float]) -> str:
    if b == 0:
        return f"TI below {_fmt(edges[0])} ms"
    if b >= len(edges):
        return f"TI {_fmt(edges[-1])} ms or more"
    return f"TI {_fmt(edges[b - 1])}-{_fmt(edges[b])} ms"


# ----------------------------------------------------------------------------------------------
# text


def dicom_terms(value: Any) -> tuple[str, ...]:
    """The upper-case terms of a multi-valued code string ("SE\\IR", or a list as pydicom reads it); () for None."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split("\\")
    return tuple(str(v).strip().upper() for v in value if str(v).strip())


def _sequence_phrase(metadata: dict) -> str:
    seq = set(dicom_terms(metadata.get("ScanningSequence")))
    variants = [v for v in dicom_terms(metadata.get("SequenceVariant")) if v != "NONE"]
    words = [_VARIANT_WORDS.get(v, v.lower()) for v in sorted(set(variants), key=_variant_rank)]
    words += [_SEQUENCE_WORDS[t] for t in _SEQUENCE_ORDER if t in seq]
    words += sorted(t.lower() for t in seq if t not in _SEQUENCE_WORDS)
    if not seq:
        words.append("unknown sequence")
    return " ".join(words)


def _variant_rank(term: str) -> tuple[int, str]:
    return (SEQUENCE_VARIANT_TERMS.index(term) if term in SEQUENCE_VARIANT_TERMS else len(SEQUENCE_VARIANT_TERMS), term)


def _vendor(metadata: dict) -> str:
    maker = metadata.get("Manufacturer")
    model = metadata.get("ManufacturerModelName")
    maker_text = None
    if maker:
        maker_text = _VENDOR_NAMES.get(str(maker).strip().upper(), str(maker).strip())
    if maker_text and model:
        return f"a {maker_text} {str(model).strip()}"
    if maker_text:
        return f"a {maker_text} scanner"
    if model:
        return f"a {str(model).strip()} scanner"
    return "an unknown scanner"


def metadata_to_text(
    metadata: dict,
    quantize: bool = True,
    te_edges: Sequence[float] = DEFAULT_TE_EDGES,
    tr_edges: Sequence[float] = DEFAULT_TR_EDGES,
    ti_edges: Sequence[float] = DEFAULT_TI_EDGES,
) -> str:
    """One sentence describing the acquisition, e.g.

    "Axial 3D inversion recovery spin echo MR image on a Siemens Prisma at 3.0 T, TE bin 7 of 20,
    TR bin 15 of 20, TI 1200-2000 ms, flip angle 90 degrees, no contrast agent."

    With ``quantize=False`` TE/TR/TI are printed as values in ms (two decimals at most).

    Absent values are always said explicitly, never silently dropped: "Unknown plane",
    "unknown sequence", "an unknown scanner", "unknown field strength", "TE unknown",
    "TR unknown", "flip angle unknown". An absent or non-positive InversionTime reads
    "no inversion" and an absent ContrastBolusAgent "no contrast agent" (DICOM writes the agent only
    when one was given). The one exception is MRAcquisitionType: "2D"/"3D" is a word in front of the
    sequence and has no word when absent.

    Non-MR modalities (e.g. CT) get only plane, modality, scanner and contrast: the MR timing
    parts are left out.
    """
    m = metadata
    modality = (m.get("Modality") or "MR").strip().upper()
    plane = m.get("Plane")
    plane_text = str(plane).capitalize() if plane else "Unknown plane"
    head = [plane_text]
    acq = m.get("MRAcquisitionType")
    is_mr = modality == "MR"
    if is_mr and acq:
        head.append(str(acq).strip().upper())
    if is_mr:
        head.append(_sequence_phrase(m))
    head.append(f"{modality} image on {_vendor(m)}")
    parts = [" ".join(head)]
    if is_mr:
        b0 = finite_float(m.get("MagneticFieldStrength"))
        if b0 is None:
            parts[0] += " at unknown field strength"
        else:
            one_decimal = abs(b0 * 10 - round(b0 * 10)) < 1e-9
            parts[0] += f" at {f'{b0:.1f}' if one_decimal else _fmt(b0)} T"
        te, tr = finite_float(m.get("EchoTime")), finite_float(m.get("RepetitionTime"))
        if quantize:
            parts.append(f"TE bin {quantize_value(te, te_edges) + 1} of {len(te_edges) + 1}" if te is not None else "TE unknown")
            parts.append(f"TR bin {quantize_value(tr, tr_edges) + 1} of {len(tr_edges) + 1}" if tr is not None else "TR unknown")
            ti_b = _ti_bin(m.get("InversionTime"), ti_edges)
            parts.append("no inversion" if ti_b is None else _ti_range_text(ti_b, ti_edges))
        else:
            parts.append(f"TE {_fmt(te)} ms" if te is not None else "TE unknown")
            parts.append(f"TR {_fmt(tr)} ms" if tr is not None else "TR unknown")
            ti = finite_float(m.get("InversionTime"))
            parts.append(f"TI {_fmt(ti)} ms" if ti is not None and ti > 0 else "no inversion")
        flip = finite_float(m.get("FlipAngle"))
        parts.append(f"flip angle {_fmt(flip)} degrees" if flip is not None else "flip angle unknown")
    agent = m.get("ContrastBolusAgent")
    parts.append(f"contrast agent {str(agent).strip()}" if agent else "no contrast agent")
    return ", ".join(parts) + "."


# ----------------------------------------------------------------------------------------------
# contrast categories


def _acq_type(metadata: dict) -> Optional[str]:
    acq = metadata.get("MRAcquisitionType")
    return str(acq).strip().upper() or None if acq is not None else None


def contrast_key(
    metadata: dict,
    te_edges: Sequence[float] = DEFAULT_TE_EDGES,
    tr_edges: Sequence[float] = DEFAULT_TR_EDGES,
    ti_edges: Sequence[float] = DEFAULT_TI_EDGES,
) -> tuple:
    """The canonical tuple behind contrast_category:

    (te_bin, tr_bin, ti_bin, scanning_sequence, sequence_variant, acquisition_type, contrast)

    te_bin/tr_bin: 0-based bins, None when absent. ti_bin: None for no inversion (absent or <= 0),
    else the 0-based TI bin. scanning_sequence / sequence_variant: sorted tuples of the distinct
    upper-case terms ("NONE" dropped from the variants; () when absent). acquisition_type: "2D",
    "3D", another upper-case string, or None. contrast: True when ContrastBolusAgent is given.
    """
    seq = tuple(sorted(set(dicom_terms(metadata.get("ScanningSequence")))))
    var = tuple(sorted(set(t for t in dicom_terms(metadata.get("SequenceVariant")) if t != "NONE")))
    return (
        quantize_value(metadata.get("EchoTime"), te_edges),
        quantize_value(metadata.get("RepetitionTime"), tr_edges),
        _ti_bin(metadata.get("InversionTime"), ti_edges),
        seq,
        var,
        _acq_type(metadata),
        bool(metadata.get("ContrastBolusAgent")),
    )


def _mask(terms: Sequence[str], vocabulary: Sequence[str]) -> int:
    bits = 0
    for t in terms:
        bits |= 1 << (vocabulary.index(t) if t in vocabulary else len(vocabulary))
    return bits


def contrast_category(
    metadata: dict,
    te_edges: Sequence[float] = DEFAULT_TE_EDGES,
    tr_edges: Sequence[float] = DEFAULT_TR_EDGES,
    ti_edges: Sequence[float] = DEFAULT_TI_EDGES,
) -> int:
    """A deterministic integer id of the contrast configuration (a mixed-radix code of contrast_key).

    Digits, most significant first, with their radix:

    - te = TE bin + 1, 0 when absent                           radix len(te_edges) + 2 (21)
    - tr = TR bin + 1, 0 when absent                           radix len(tr_edges) + 2 (21)
    - ti = TI bin + 1, 0 for no inversion                      radix len(ti_edges) + 2 (5)
    - ss = ScanningSequence bit mask, bit k for SCANNING_SEQUENCE_TERMS[k] (SE=1, IR=2, GR=4,
      EP=8, RM=16), bit 5 (32) for any other term              radix 64
    - sv = SequenceVariant bit mask, bit k for SEQUENCE_VARIANT_TERMS[k] (SK=1, MTC=2, SS=4,
      TRSS=8, SP=16, MP=32, OSP=64), bit 7 (128) for any other term; NONE/absent = 0   radix 256
    - acq = 0 absent, 1 "2D", 2 "3D", 3 other                  radix 4
    - contrast = 1 when ContrastBolusAgent is given, else 0    radix 2

    id = ((((((te * R_tr + tr) * R_ti + ti) * 64 + ss) * 256 + sv) * 4 + acq) * 2 + contrast)

    With the default edges ids are below 21*21*5*64*256*4*2 = 289,013,760 < 2**31. The code depends
    only on the key, never on Python's hash(), so it is the same in every process. Two keys that
    differ only in unknown ("other") terms share an id; use contrast_key for an exact label map.
    """
    te, tr, ti, seq, var, acq, contrast = contrast_key(metadata, te_edges, tr_edges, ti_edges)
    digits = [
        (0 if te is None else te + 1, len(te_edges) + 2),
        (0 if tr is None else tr + 1, len(tr_edges) + 2),
        (0 if ti is None else ti + 1, len(ti_edges) + 2),
        (_mask(seq, SCANNING_SEQUENCE_TERMS), 1 << (len(SCANNING_SEQUENCE_TERMS) + 1)),
        (_mask(var, SEQUENCE_VARIANT_TERMS), 1 << (len(SEQUENCE_VARIANT_TERMS) + 1)),
        (0 if acq is None else (_ACQ_TYPES.index(acq) + 1 if acq in _ACQ_TYPES else 3), 4),
        (int(contrast), 2),
    ]
    code = 0
    for digit, radix in digits:
        code = code * radix + digit
    return code


# ----------------------------------------------------------------------------------------------
# corruption

CORRUPTION_KINDS: tuple[str, ...] = ("missing_tag", "wrong_tag", "numeric_error")

# "missing_tag" sets one of these (among those not already None) to None.
MISSING_TAG_CANDIDATES: tuple[str, ...] = (
    "Manufacturer",
    "ManufacturerModelName",
    "ScanningSequence",
    "SequenceVariant",
    "MRAcquisitionType",
    "ContrastBolusAgent",
    "Plane",
)

# "wrong_tag" replaces one of these tags by a different value of its vocabulary. Manufacturers count
# as the same when their first word matches case-insensitively (SIEMENS vs Siemens Healthineers);
# sequences as the same when they hold the same set of terms.
WRONG_TAG_VOCABULARY: dict[str, tuple] = {
    "Manufacturer": ("SIEMENS", "GE MEDICAL SYSTEMS", "Philips", "Canon"),
    "ScanningSequence": (("SE",), ("GR",), ("IR",), ("EP",), ("SE", "IR"), ("GR", "IR"), ("SE", "EP"), ("GR", "EP")),
    "MRAcquisitionType": ("2D", "3D"),
    "Plane": ("axial", "coronal", "sagittal"),
}

# "numeric_error" multiplies one of EchoTime, RepetitionTime, InversionTime (among those present and
# positive) by one of these: halving/doubling-type errors and decimal shifts (0.1, 10).
NUMERIC_ERROR_FACTORS: tuple[float, ...] = (0.25, 0.5, 2.0, 4.0, 0.1, 10.0)
_NUMERIC_TAGS: tuple[str, ...] = ("EchoTime", "RepetitionTime", "InversionTime")


def _rng(rng: Union[np.random.Generator, int, np.integer]) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy Generator or an int seed, got {type(rng).__name__}")


def _same_value(tag: str, a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if tag == "Manufacturer":
        return str(a).strip().split()[0].lower() == str(b).strip().split()[0].lower() if str(a).strip() and str(b).strip() else False
    if tag == "ScanningSequence":
        return set(dicom_terms(a)) == set(dicom_terms(b))
    return str(a).strip().lower() == str(b).strip().lower()


def corrupt_metadata(metadata: dict, kind: str, rng: Union[np.random.Generator, int]) -> dict:
    """A corrupted copy of `metadata` (the input is not modified); exactly one field changes.

    kind:
      "missing_tag": one of MISSING_TAG_CANDIDATES that is not None becomes None.
      "wrong_tag": one of WRONG_TAG_VOCABULARY's tags gets a different value from its vocabulary
          (a tag that was None gets any vocabulary value).
      "numeric_error": one of EchoTime/RepetitionTime/InversionTime that is present and positive
          is multiplied by a factor from NUMERIC_ERROR_FACTORS.
    rng: numpy Generator or int seed; the same seed gives the same corruption.
    Raises ValueError for an unknown kind, or when no field can be corrupted that way.
    """
    look_up_option(kind, CORRUPTION_KINDS, name="kind")
    gen = _rng(rng)
    out = copy.deepcopy(dict(metadata))
    if kind == "missing_tag":
        candidates = [t for t in MISSING_TAG_CANDIDATES if out.get(t) is not None]
        if not candidates:
            raise ValueError(f"missing_tag: none of {MISSING_TAG_CANDIDATES} is set")
        out[candidates[int(gen.integers(len(candidates)))]] = None
    elif kind == "wrong_tag":
        tags = list(WRONG_TAG_VOCABULARY)
        tag = tags[int(gen.integers(len(tags)))]
        current = out.get(tag)
        choices = [v for v in WRONG_TAG_VOCABULARY[tag] if not _same_value(tag, v, current)]
        out[tag] = choices[int(gen.integers(len(choices)))]
    else:
        candidates = [t for t in _NUMERIC_TAGS if (finite_float(out.get(t)) or 0.0) > 0]
        if not candidates:
            raise ValueError(f"numeric_error: none of {_NUMERIC_TAGS} is a positive number")
        tag = candidates[int(gen.integers(len(candidates)))]
        factor = NUMERIC_ERROR_FACTORS[int(gen.integers(len(NUMERIC_ERROR_FACTORS)))]
        out[tag] = float(out[tag]) * factor
    return out
