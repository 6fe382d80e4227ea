import copy

import numpy as np
import pytest

from medvl.data.metadata import (
    CORRUPTION_KINDS,
    DEFAULT_TE_EDGES,
    DEFAULT_TI_EDGES,
    DEFAULT_TR_EDGES,
    MISSING_TAG_CANDIDATES,
    NUMERIC_ERROR_FACTORS,
    WRONG_TAG_VOCABULARY,
    contrast_category,
    contrast_key,
    corrupt_metadata,
    metadata_to_text,
    quantize_value,
)

FLAIR = {
    "EchoTime": 9.0,
    "RepetitionTime": 9000.0,
    "InversionTime": 2500.0,
    "FlipAngle": 150.0,
    "MagneticFieldStrength": 3.0,
    "Manufacturer": "SIEMENS",
    "ManufacturerModelName": "Prisma",
    "ScanningSequence": ("SE", "IR"),
    "SequenceVariant": ("SK", "SP", "MP"),
    "ScanOptions": None,
    "MRAcquisitionType": "3D",
    "ContrastBolusAgent": None,
    "SeriesDescription": "FLAIR",
    "Modality": "MR",
    "Plane": "axial",
}


def test_default_edges():
    for edges in (DEFAULT_TE_EDGES, DEFAULT_TR_EDGES):
        assert len(edges) == 19
        assert all(a < b for a, b in zip(edges, edges[1:]))
    assert DEFAULT_TI_EDGES == (300.0, 1200.0, 2000.0)
    assert quantize_value(None, DEFAULT_TE_EDGES) is None
    assert quantize_value(0.5, DEFAULT_TE_EDGES) == 0
    assert quantize_value(DEFAULT_TE_EDGES[3], DEFAULT_TE_EDGES) == 4  # an edge goes to the upper bin
    assert quantize_value(1e6, DEFAULT_TR_EDGES) == 19


def test_text_quantized():
    text = metadata_to_text(FLAIR)
    assert text == metadata_to_text(copy.deepcopy(FLAIR))  # deterministic
    assert text.startswith("Axial 3D ")
    assert "inversion recovery spin echo MR image on a Siemens Prisma at 3.0 T" in text
    te_bin = int(np.searchsorted(DEFAULT_TE_EDGES, 9.0, side="right")) + 1
    tr_bin = int(np.searchsorted(DEFAULT_TR_EDGES, 9000.0, side="right")) + 1
    assert f"TE bin {te_bin} of 20" in text and f"TR bin {tr_bin} of 20" in text
    assert "TI 2000 ms or more" in text
    assert "flip angle 150 degrees" in text and "no contrast agent" in text
    assert text.endswith(".")


def test_text_raw_values():
    meta = dict(FLAIR, EchoTime=9.456, InversionTime=350.0, ContrastBolusAgent="Gadovist")
    text = metadata_to_text(meta, quantize=False)
    assert "TE 9.46 ms" in text and "TR 9000 ms" in text and "TI 350 ms" in text
    assert "bin" not in text
    assert "contrast agent Gadovist" in text
    assert "TI 300-1200 ms" in metadata_to_text(meta)


def test_text_absent_values():
    meta = {k: None for k in FLAIR}
    text = metadata_to_text(meta)
    for phrase in ("Unknown plane", "unknown sequence", "unknown scanner", "unknown field strength",
                   "TE unknown", "TR unknown", "no inversion", "flip angle unknown", "no contrast agent"):
        assert phrase in text
    assert metadata_to_text({}) == text  # missing keys read like None values
    assert "no inversion" in metadata_to_text(dict(FLAIR, InversionTime=0.0))


def test_text_custom_edges_and_ct():
    text = metadata_to_text(FLAIR, te_edges=(5.0, 50.0), tr_edges=(1000.0,))
    assert "TE bin 2 of 3" in text and "TR bin 2 of 2" in text
    ct = metadata_to_text({"Modality": "CT", "Plane": "axial", "Manufacturer": "GE MEDICAL SYSTEMS"})
    assert ct == "Axial CT image on a GE scanner, no contrast agent."


def test_contrast_key_and_category():
    key = contrast_key(FLAIR)
    assert key == (7, 18, 3, ("IR", "SE"), ("MP", "SK", "SP"), "3D", False)
    # The documented mixed-radix formula, by hand:
    te, tr, ti = 7 + 1, 18 + 1, 3 + 1
    ss = 1 + 2  # SE, IR
    sv = 1 + 16 + 32  # SK, SP, MP
    acq, contrast = 2, 0  # 3D, no agent
    expected = ((((((te * 21 + tr) * 5 + ti) * 64 + ss) * 256 + sv) * 4 + acq) * 2 + contrast)
    assert expected == 123083148
    assert contrast_category(FLAIR) == expected
    assert contrast_category(copy.deepcopy(FLAIR)) == expected
    # term order and case, scanner and description do not matter
    same = dict(FLAIR, ScanningSequence=["ir", "se"], Manufacturer="GE", SeriesDescription="x", EchoTime=9.9)
    assert contrast_key(same) == key and contrast_category(same) == expected
    assert 0 <= contrast_category({}) < 2**31
    assert contrast_category({}) == 0


@pytest.mark.parametrize(
    "change",
    [
        {"EchoTime": 100.0},
        {"RepetitionTime": 500.0},
        {"InversionTime": None},
        {"InversionTime": 150.0},
        {"ScanningSequence": ("SE",)},
        {"SequenceVariant": ("SK",)},
        {"MRAcquisitionType": "2D"},
        {"ContrastBolusAgent": "Gadovist"},
    ],
)
def test_category_changes_with_configuration(change):
    other = dict(FLAIR, **change)
    assert contrast_key(other) != contrast_key(FLAIR)
    assert contrast_category(other) != contrast_category(FLAIR)


def test_category_custom_edges():
    a = contrast_category(FLAIR, te_edges=(5.0, 50.0))
    b = contrast_category(dict(FLAIR, EchoTime=60.0), te_edges=(5.0, 50.0))
    assert a != b
    assert contrast_key(FLAIR, te_edges=(5.0, 50.0))[0] == 1


def _diff(a, b):
    return {k for k in set(a) | set(b) if a.get(k) != b.get(k)}


def test_corrupt_missing_tag():
    original = copy.deepcopy(FLAIR)
    seen = set()
    for seed in range(30):
        out = corrupt_metadata(FLAIR, "missing_tag", seed)
        (tag,) = _diff(FLAIR, out)
        assert tag in MISSING_TAG_CANDIDATES and out[tag] is None and FLAIR[tag] is not None
        seen.add(tag)
    assert len(seen) > 1
    assert FLAIR == original  # input untouched


def test_corrupt_wrong_tag():
    seen = set()
    for seed in range(40):
        out = corrupt_metadata(FLAIR, "wrong_tag", seed)
        (tag,) = _diff(FLAIR, out)
        assert tag in WRONG_TAG_VOCABULARY and out[tag] in WRONG_TAG_VOCABULARY[tag]
        if tag == "ScanningSequence":
            assert set(out[tag]) != set(FLAIR[tag])
        if tag == "Manufacturer":
            assert out[tag] != "SIEMENS"
        seen.add(tag)
    assert seen == set(WRONG_TAG_VOCABULARY)


def test_corrupt_numeric_error():
    for seed in range(30):
        out = corrupt_metadata(FLAIR, "numeric_error", seed)
        (tag,) = _diff(FLAIR, out)
        assert tag in ("EchoTime", "RepetitionTime", "InversionTime")
        assert out[tag] / FLAIR[tag] == pytest.approx(
            min(NUMERIC_ERROR_FACTORS, key=lambda f: abs(f - out[tag] / FLAIR[tag]))
        )
    only_te = dict(FLAIR, RepetitionTime=None, InversionTime=None)
    assert _diff(only_te, corrupt_metadata(only_te, "numeric_error", 0)) == {"EchoTime"}
    with pytest.raises(ValueError, match="numeric_error"):
        corrupt_metadata({"EchoTime": None}, "numeric_error", 0)


@pytest.mark.parametrize("kind", CORRUPTION_KINDS)
def test_corrupt_reproducible(kind):
    assert corrupt_metadata(FLAIR, kind, 123) == corrupt_metadata(FLAIR, kind, 123)
    a = corrupt_metadata(FLAIR, kind, np.random.default_rng(9))
    b = corrupt_metadata(FLAIR, kind, np.random.default_rng(9))
    assert a == b
    outs = {repr(sorted(corrupt_metadata(FLAIR, kind, s).items())) for s in range(20)}
    assert len(outs) > 1


def test_corrupt_unknown_kind():
    with pytest.raises(ValueError) as err:
        corrupt_metadata(FLAIR, "flip", 0)
    for kind in CORRUPTION_KINDS:
        assert kind in str(err.value)
    with pytest.raises(TypeError):
        corrupt_metadata(FLAIR, "missing_tag", 1.5)
