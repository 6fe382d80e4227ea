"""Tests of the synthetic CT/MR phantoms in medvl.data.phantoms."""

from __future__ import annotations

import dataclasses
import re
import time

import numpy as np
import pytest

from medvl.data import MR_METADATA_KEYS
from medvl.data import phantoms as S
from medvl.data.phantoms import (
    CT_FINDINGS,
    CT_SURFACE_FORMS,
    MR_SEQUENCES,
    MR_TISSUES,
    CTPhantom,
    Finding,
    MRPhantom,
    ct_lobe_slices,
    ct_report,
    make_ct_phantom,
    make_mr_phantom,
    make_phantom_set,
)
from medvl.data.phantoms.ct_findings import AERATED_HU

SHAPE = (64, 96, 96)
SPACING = (5.0, 3.5, 3.5)
T = {name: i for i, name in S.CT_TISSUES.items()}  # tissue name -> label
LUNGS = {T["right lung"], T["left lung"]}
NEGATION = re.compile(r"\b(no|without|not)\b")


def sentences(report: str) -> list[str]:
    return [s for s in re.split(r"(?<=\.)\s+", report.strip()) if s]


def mentions(sentence: str, name: str) -> bool:
    low = sentence.lower()
    return any(form in low for form in CT_SURFACE_FORMS[name])


# ------------------------------------------------------------------------------------------------
# CT: basics
# ------------------------------------------------------------------------------------------------


def test_ct_types_and_shapes():
    p = make_ct_phantom(0)
    assert isinstance(p, CTPhantom)
    assert p.volume.dtype == np.int16 and p.volume.shape == SHAPE
    assert p.spacing == SPACING
    assert p.labels.dtype == bool and p.labels.shape == (len(CT_FINDINGS),)
    assert p.seed == 0 and isinstance(p.report, str) and p.report
    assert p.tissue.shape == SHAPE and not p.tissue.flags.writeable
    assert len(CT_FINDINGS) >= 8 and len(set(CT_FINDINGS)) == len(CT_FINDINGS)
    assert set(CT_SURFACE_FORMS) == set(CT_FINDINGS)


def test_ct_determinism():
    a, b, c = make_ct_phantom(7), make_ct_phantom(7), make_ct_phantom(8)
    assert np.array_equal(a.volume, b.volume)
    assert a.report == b.report and a.findings == b.findings
    assert np.array_equal(a.labels, b.labels) and a.contrast == b.contrast
    assert not np.array_equal(a.volume, c.volume)
    reports = {make_ct_phantom(s).report for s in range(12)}
    assert len(reports) > 6  # varied wording and findings


def test_ct_volume_is_private():
    a = make_ct_phantom(3)
    a.volume[:] = 0
    b = make_ct_phantom(3)
    assert b.volume.std() > 100  # the cache was not touched


def test_ct_tissue_hu_ranges():
    p = make_ct_phantom(11, findings=[])
    v, t = p.volume.astype(np.float32), p.tissue
    lung = v[np.isin(t, list(LUNGS))]
    assert abs(lung.mean() + 850) < 100 and np.percentile(lung, 5) > -1024 and np.percentile(lung, 95) < -700
    air = v[t == T["air"]]
    assert abs(air.mean() + 1000) < 20
    assert abs(float(np.median(v[:2, :2, :2])) + 1000) < 60  # corners are air
    for bone in ("bone", "rib"):
        vals = v[t == T[bone]]
        assert vals.size > 100 and vals.mean() > 300 and np.percentile(vals, 10) > 250
    assert -150 < v[t == T["subcutaneous fat"]].mean() < -50
    assert 20 < v[t == T["muscle"]].mean() < 70
    assert 20 < v[t == T["heart"]].mean() < 250  # unenhanced ~40 or contrast-enhanced
    assert -1024 <= v.min() and v.max() <= 3071


def test_ct_orientation():
    p = make_ct_phantom(0, findings=[])
    t = p.tissue
    Z, Y, X = t.shape
    zr, yr, xr = np.nonzero(t == T["right lung"])
    zl, yl, xl = np.nonzero(t == T["left lung"])
    assert xr.mean() < (X - 1) / 2 < xl.mean()  # patient right on the image left
    zh, yh, xh = np.nonzero(t == T["heart"])
    assert yh.mean() < (Y - 1) / 2 < np.nonzero(t == T["bone"])[1].mean()  # heart anterior, spine posterior
    assert xh.mean() > (X - 1) / 2  # heart to the left
    assert not (t[0] == T["right lung"]).any()  # slice 0 is cranial to the apices
    assert (t[-1] == T["liver"]).any()  # the last slice is below the diaphragm
    lobes = ct_lobe_slices()
    assert lobes[("right", "upper lobe")][0] < lobes[("right", "middle lobe")][0] < lobes[("right", "lower lobe")][0]
    assert ("left", "lingula") in lobes and ("left", "middle lobe") not in lobes


# ------------------------------------------------------------------------------------------------
# CT: findings, one at a time
# ------------------------------------------------------------------------------------------------

LOBAR = {"Lung nodule", "Consolidation", "Atelectasis", "Lung opacity"}

# name -> (tissues the changed voxels may lie in (None: any), lowest and highest mean HU of them)
EXPECTED = {
    "Lung nodule": ("side", 0, 90),
    "Pleural effusion": (LUNGS, -10, 35),
    "Consolidation": ("side", 5, 70),
    "Emphysema": (LUNGS, -1024, -930),
    "Cardiomegaly": (LUNGS | {T["mediastinal fat"]}, 20, 260),
    "Atelectasis": ("side", -10, 70),
    "Pericardial effusion": (LUNGS | {T["mediastinal fat"]}, -5, 35),
    "Lymphadenopathy": (LUNGS | {T["mediastinal fat"]}, 25, 70),
    "Lung opacity": ("side", -650, -400),
    "Arterial wall calcification": (None, 300, 1200),
}


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("name", CT_FINDINGS)
def test_ct_forced_finding(name, seed):
    p = make_ct_phantom(seed, findings=[name])
    base = make_ct_phantom(seed, findings=[])
    assert np.array_equal(p.tissue, base.tissue)
    assert [f.name for f in p.findings] == [name]
    assert p.labels.tolist() == [n == name for n in CT_FINDINGS]
    f = p.findings[0]
    Z, Y, X = p.volume.shape

    diff = p.volume != base.volume
    assert diff.any(), "the finding changed nothing"
    zs = np.nonzero(diff.any(axis=(1, 2)))[0]
    assert zs.min() <= f.slice_index <= zs.max()
    assert diff[f.slice_index].any(), "the cited image does not show the finding"
    assert f.center_mm is not None and abs(f.center_mm[0] - f.slice_index * p.spacing[0]) < 1e-6

    allowed, lo, hi = EXPECTED[name]
    if allowed == "side":
        allowed = {T[f"{f.side} lung"]}
    if allowed is not None:
        assert set(np.unique(p.tissue[diff]).tolist()) <= allowed
    mean_hu = p.volume[diff].astype(np.float64).mean()
    assert lo <= mean_hu <= hi, f"{name}: mean HU {mean_hu:.0f} outside [{lo}, {hi}]"

    _, yy, xx = np.nonzero(diff)
    if f.side == "right":
        assert xx.max() < X / 2
    elif f.side == "left":
        assert xx.min() > X / 2
    elif f.side == "bilateral":
        assert xx.min() < X / 2 < xx.max()
    if name in LOBAR:
        i0, i1 = ct_lobe_slices()[(f.side, f.lobe)]
        assert i0 <= zs.min() and zs.max() < i1
    if name == "Pleural effusion":
        assert yy.mean() > (Y - 1) / 2  # dependent: posterior
        assert zs.mean() > Z / 2  # at the lung bases
    if name == "Lymphadenopathy":
        assert np.abs(xx - (X - 1) / 2).max() * p.spacing[2] < 70  # central
    if name == "Arterial wall calcification":
        aorta = p.tissue == T["aorta"]
        for z, y, x in zip(*np.nonzero(diff)):
            assert aorta[z, max(y - 2, 0) : y + 3, max(x - 2, 0) : x + 3].any()
    if name == "Cardiomegaly":
        heart = p.volume[p.tissue == T["heart"]].astype(np.float64).mean()
        assert abs(mean_hu - heart) < 30

    # The report: a sentence naming the finding cites its image and its attributes.
    cited = [s for s in sentences(p.report) if mentions(s, name) and not NEGATION.search(s.lower())]
    assert len(cited) == 1, p.report
    s = cited[0].lower()
    assert re.search(rf"\((series 3, )?image {f.slice_index + 1}\)", s), s
    for word in (f.lobe, f.size, f.severity):
        if word:
            assert word in s, (word, s)
    if f.side and f.lobe != "lingula":
        assert f.side in s, (f.side, s)


def test_ct_finding_objects_are_respected():
    f = Finding("Lung nodule", side="right", lobe="middle lobe", size="large")
    p = make_ct_phantom(4, findings=[f, "Pleural effusion"])
    nod = p.findings[0]
    assert (nod.side, nod.lobe, nod.size) == ("right", "middle lobe", "large")
    assert nod.diameter_mm >= 20
    assert p.findings[1].name == "Pleural effusion"
    with pytest.raises(ValueError):
        make_ct_phantom(0, findings=[Finding("Lung nodule", side="left", lobe="middle lobe")])
    with pytest.raises(ValueError):
        make_ct_phantom(0, findings=["Pneumothorax"])


def test_ct_all_findings_together_and_none():
    p = make_ct_phantom(5, p_finding=1.0)
    assert p.labels.all() and len(p.findings) == len(CT_FINDINGS)
    for f in p.findings:
        assert 0 <= f.slice_index < p.volume.shape[0]
        assert f"image {f.slice_index + 1})" in p.report
    q = make_ct_phantom(5, p_finding=0.0)
    assert not q.labels.any() and q.findings == []
    assert "The lungs are clear." in q.report


def test_ct_other_geometry():
    p = make_ct_phantom(2, shape=(40, 64, 72), spacing=(7.0, 5.0, 4.5), p_finding=1.0)
    assert p.volume.shape == (40, 64, 72) and p.labels.all()
    q = make_ct_phantom(2, shape=(40, 64, 72), spacing=(7.0, 5.0, 4.5), findings=[])
    lung = q.volume[np.isin(q.tissue, list(LUNGS))]
    assert abs(lung.mean() + 850) < 100


# ------------------------------------------------------------------------------------------------
# CT: reports
# ------------------------------------------------------------------------------------------------


def test_reports_negate_absent_findings_and_cite_present_ones():
    for seed in range(40):
        p = make_ct_phantom(seed, shape=(32, 64, 64), spacing=(10.0, 5.25, 5.25))
        present = {f.name for f in p.findings}
        assert p.labels.tolist() == [n in present for n in CT_FINDINGS]
        for s in sentences(p.report):
            negated = bool(NEGATION.search(s.lower()))
            for name in CT_FINDINGS:
                if name not in present and mentions(s, name):
                    assert negated, f"absent {name} stated in: {s!r}"
                if name in present and mentions(s, name) and negated:
                    pytest.fail(f"present {name} negated in: {s!r}")
        for f in p.findings:
            assert re.search(rf"\((series 3, )?image {f.slice_index + 1}\)", p.report)
        if not p.findings:
            assert "The lungs are clear." in p.report


def test_ct_report_function():
    f = Finding("Pleural effusion", side="bilateral", size="small", slice_index=40)
    r1 = ct_report([f], np.random.default_rng(0))
    r2 = ct_report([f], np.random.default_rng(0))
    assert r1 == r2
    assert "image 41)" in r1 and "bilateral" in r1.lower() and "small" in r1.lower()
    forms = set()
    for seed in range(30):
        forms.add(ct_report([f], np.random.default_rng(seed)).split(".")[0])
    assert len(forms) >= 2  # several templates
    assert "The lungs are clear." in ct_report([], np.random.default_rng(1))
    with pytest.raises(ValueError):
        ct_report([Finding("Consolidation", side="left", lobe="lower lobe")], np.random.default_rng(0))


# ------------------------------------------------------------------------------------------------
# CT: every finding visible at the default model input
# ------------------------------------------------------------------------------------------------


def _tiny_vision():
    from medvl.models.factory import model_config

    return model_config("vit3d-tiny")["vision"]


def _default_input_shape():
    """The phantom shape (slices, rows, cols) of the tiny model's input."""
    x, y, z = _tiny_vision()["img_size"]
    return z, y, x


@pytest.mark.parametrize("name", CT_FINDINGS)
def test_every_finding_is_visible_at_the_default_input(name):
    """At the tiny model's input (64 x 64 x 32, its HU window), each finding changes enough voxels by enough:
    the same phantom with and without it (counterfactual pairs share anatomy and noise) differs in at least
    60 voxels by more than 0.05 of the window (70 HU; the noise is 8-15 HU), 30 windowed units in all. Before
    the sizes were set for this input a nodule changed 30 voxels, atelectasis 31 and a calcification 9."""
    shape = _default_input_shape()
    lo, hi = _tiny_vision()["window"]

    def windowed(volume):
        return (np.clip(volume.astype(np.float32), lo, hi) - lo) / (hi - lo)

    changed, total = [], []
    for seed in range(6):
        with_it = make_ct_phantom(seed, shape=shape, findings=[name])
        without = make_ct_phantom(seed, shape=shape, findings=[])
        diff = np.abs(windowed(with_it.volume) - windowed(without.volume))
        changed.append(int((diff > 0.05).sum()))
        total.append(float(diff.sum()))
    assert np.mean(changed) >= 60 and min(changed) >= 15, (name, changed)
    assert np.mean(total) >= 30, (name, total)


@pytest.mark.parametrize("others, least_median, least_share", [
    ((), 0.95, 0.85), (("Pleural effusion", "Consolidation", "Atelectasis"), 0.85, 0.65)])
def test_nodules_lie_in_aerated_lung(others, least_median, least_share):
    """A nodule is seen by the air around it: the 2-9 mm shell around it is mostly aerated lung (< -400 HU), also
    with the lung-filling findings drawn first. Its share with over 80 % aerated must reach ``least_share``. With
    the centre drawn once (not the best of several sites) the medians were 0.83 and 0.63, the shares 0.54 and 0.25."""
    shape = _default_input_shape()
    fractions = []
    for seed in range(24):
        p = make_ct_phantom(seed, shape=shape, findings=["Lung nodule", *others])
        nodule = next(f for f in p.findings if f.name == "Lung nodule")
        grid = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, p.spacing)], indexing="ij")
        distance = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, nodule.center_mm)))
        radius = nodule.diameter_mm / 2
        shell = (distance > radius + 2) & (distance <= radius + 9)
        fractions.append(float((p.volume[shell] < AERATED_HU).mean()))
    fractions = np.array(fractions)
    assert np.median(fractions) >= least_median and np.mean(fractions > 0.8) >= least_share, fractions.round(2)


def test_calcification_does_not_touch_the_spine():
    """The window shows a plaque and the vertebra alike (both clip at its top), so a plaque on the aortic wall
    that faces the spine merges into the bone's outline: no calcified voxel lies next to bone."""
    shape = _default_input_shape()
    bone = T["bone"]
    for seed in range(12):
        p = make_ct_phantom(seed, shape=shape, findings=["Arterial wall calcification"])
        base = make_ct_phantom(seed, shape=shape, findings=[])
        for z, y, x in zip(*np.nonzero(p.volume != base.volume)):
            around = p.tissue[z, max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2]
            assert not (around == bone).any(), (seed, (z, y, x))


# ------------------------------------------------------------------------------------------------
# CT: speed (measured, not asserted)
# ------------------------------------------------------------------------------------------------


def test_ct_speed(record_property):
    make_ct_phantom(0)  # warm the anatomy cache
    t0 = time.perf_counter()
    for s in range(100):
        make_ct_phantom(s)
    dt = time.perf_counter() - t0
    record_property("ct_100_phantoms_s", round(dt, 3))
    print(f"100 CT phantoms {SHAPE}: {dt:.2f} s")


# ------------------------------------------------------------------------------------------------
# MR
# ------------------------------------------------------------------------------------------------


def tissue_means(m: MRPhantom) -> dict[str, float]:
    return {MR_TISSUES[i]: float(m.volume[m.tissue == i].mean()) for i in MR_TISSUES if (m.tissue == i).any()}


def test_mr_types_determinism():
    a, b = make_mr_phantom(3), make_mr_phantom(3)
    assert isinstance(a, MRPhantom)
    assert a.volume.dtype == np.float32 and a.volume.shape == (32, 64, 64)
    assert a.spacing == (4.0, 3.0, 3.0) and a.seed == 3 and a.sequence in MR_SEQUENCES
    assert np.array_equal(a.volume, b.volume) and a.metadata == b.metadata
    c = make_mr_phantom(4, sequence=a.sequence)
    assert not np.array_equal(a.volume, c.volume)
    assert len({make_mr_phantom(s).sequence for s in range(30)}) >= 5
    assert (a.volume >= 0).all()


@pytest.mark.parametrize("seq", sorted(MR_SEQUENCES))
def test_mr_metadata(seq):
    for seed in range(4):
        m = make_mr_phantom(seed, seq)
        md = m.metadata
        assert tuple(md) == MR_METADATA_KEYS and len(md) == 15
        p = MR_SEQUENCES[seq]
        for k in ("EchoTime", "RepetitionTime", "FlipAngle", "MagneticFieldStrength"):
            assert isinstance(md[k], float), k
        assert p["TE"][0] - 0.01 <= md["EchoTime"] <= p["TE"][1] + 0.01
        assert p["TR"][0] - 0.1 <= md["RepetitionTime"] <= p["TR"][1] + 0.1
        assert p["FA"][0] - 0.1 <= md["FlipAngle"] <= p["FA"][1] + 0.1
        assert md["MagneticFieldStrength"] in (1.5, 3.0)
        assert md["Manufacturer"] in ("SIEMENS", "GE MEDICAL SYSTEMS", "Philips")
        assert isinstance(md["ManufacturerModelName"], str) and md["ManufacturerModelName"]
        for k in ("ScanningSequence", "SequenceVariant", "ScanOptions"):
            assert isinstance(md[k], tuple) and all(isinstance(x, str) for x in md[k]), k
        assert md["MRAcquisitionType"] in ("2D", "3D")
        assert md["Modality"] == "MR"
        assert md["Plane"] in ("axial", "sagittal", "coronal")
        assert isinstance(md["SeriesDescription"], str) and md["SeriesDescription"]
        is_ir = "IR" in md["ScanningSequence"]
        assert (md["InversionTime"] is not None) == is_ir
        if is_ir:
            assert isinstance(md["InversionTime"], float)
            assert p["TI"][0] - 0.1 <= md["InversionTime"] <= p["TI"][1] + 0.1
        assert md["ContrastBolusAgent"] == ("GADOLINIUM" if seq == "T1_SE_GD" else None)
    assert MR_SEQUENCES["T1_MPRAGE"]["MRAcquisitionType"] == "3D"
    assert MR_SEQUENCES["T1_MPRAGE"]["ScanningSequence"] == ("GR", "IR")
    assert MR_SEQUENCES["FLAIR"]["ScanningSequence"] == ("IR", "SE")


@pytest.mark.parametrize("b0", [1.5, 3.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_mr_contrast_follows_physics(seed, b0):
    def means(seq):
        return tissue_means(make_mr_phantom(seed, seq, plane="axial", field_strength=b0))

    t1 = means("T1_SE")
    assert t1["wm"] > t1["gm"] > t1["csf"]
    mp = means("T1_MPRAGE")
    assert mp["wm"] > mp["gm"] > 1.5 * mp["csf"]
    t2 = means("T2_TSE")
    assert t2["csf"] > t2["gm"] > t2["wm"]
    fl = means("FLAIR")
    assert 3 * fl["csf"] < min(fl["wm"], fl["gm"])  # CSF nulled
    assert t2["csf"] / t2["wm"] > 1.5 and fl["csf"] / fl["wm"] < 0.5
    pd = means("PD_TSE")
    vals = [pd["wm"], pd["gm"], pd["csf"]]
    assert max(vals) / min(vals) < 1.5  # roughly flat
    st = means("STIR")
    assert st["fat"] < 0.3 * st["wm"] and st["csf"] > st["wm"]  # fat suppressed
    gre = means("T2STAR_GRE")
    assert gre["csf"] > gre["wm"]
    gd = means("T1_SE_GD")
    assert gd["blood"] > max(t1["blood"], gd["wm"])  # gadolinium shortens blood T1


def test_mr_planes_and_signal_equations():
    for plane in ("axial", "sagittal", "coronal"):
        m = make_mr_phantom(0, "T2_TSE", plane=plane, shape=(24, 64, 72), spacing=(5.0, 3.0, 3.0))
        assert m.volume.shape == (24, 64, 72) and m.metadata["Plane"] == plane
        assert m.metadata["SeriesDescription"].endswith({"axial": "AX", "sagittal": "SAG", "coronal": "COR"}[plane])
        present = set(np.unique(m.tissue).tolist())
        assert {3, 4, 5} <= present
    s = S.mr_signal(1.0, 1000.0, 100.0, "SE", TE=0.0, TR=1e9)
    assert s == pytest.approx(1.0)
    assert S.mr_signal(1.0, 1000.0, 100.0, "IR", TE=0.0, TR=1e9, TI=1000.0 * np.log(2)) == pytest.approx(0.0, abs=1e-9)
    ernst = np.degrees(np.arccos(np.exp(-20 / 1000.0)))
    g = [float(S.mr_signal(1.0, 1000.0, 100.0, "GR", TE=0.0, TR=20.0, FA=a)) for a in (ernst - 5, ernst, ernst + 5)]
    assert g[1] > g[0] and g[1] > g[2]
    with pytest.raises(ValueError):
        make_mr_phantom(0, "DWI")


# ------------------------------------------------------------------------------------------------
# Sets
# ------------------------------------------------------------------------------------------------


def test_phantom_set():
    cts, mrs = make_phantom_set(3, 2, seed=5)
    assert len(cts) == 3 and len(mrs) == 2
    assert all(isinstance(c, CTPhantom) for c in cts) and all(isinstance(m, MRPhantom) for m in mrs)
    cts2, mrs2 = make_phantom_set(4, 1, seed=5)
    for a, b in zip(cts, cts2):  # prefix-stable
        assert a.seed == b.seed and np.array_equal(a.volume, b.volume) and a.report == b.report
    assert np.array_equal(mrs[0].volume, mrs2[0].volume)
    cts3, _ = make_phantom_set(3, 0, seed=6)
    assert [c.seed for c in cts3] != [c.seed for c in cts]
    assert len({c.seed for c in cts}) == 3
    small, _ = make_phantom_set(2, 0, seed=1, shape=(32, 64, 64), spacing=(10.0, 5.25, 5.25), p_finding=1.0)
    assert small[0].volume.shape == (32, 64, 64) and small[0].labels.all()
    _, m = make_phantom_set(0, 2, seed=1, mr_kwargs={"sequence": "FLAIR"})
    assert all(x.sequence == "FLAIR" for x in m)


def test_finding_is_a_dataclass():
    names = {f.name for f in dataclasses.fields(Finding)}
    assert {"name", "side", "lobe", "size", "severity", "slice_index", "center_mm"} <= names
