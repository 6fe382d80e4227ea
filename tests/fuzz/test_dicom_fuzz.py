"""The DICOM reader under mutation: no crash, every refusal names a file, and no accepted series holds a
geometry or rescale value that is unparseable or non-finite (see tests/fuzz/dicom_fuzz.py; the larger run
is ``python -m tests.fuzz.dicom_fuzz --cases 3000``)."""

import time

from tests.fuzz.dicom_fuzz import FuzzReport, check_case, run_fuzz

CASES = 300  # about 15 s on a 2-core VM; the bound below leaves room for a busy machine


def test_mutated_series_are_refused_or_sound(tmp_path):
    start = time.perf_counter()
    report = run_fuzz(CASES, seed=19, workdir=str(tmp_path))
    elapsed = time.perf_counter() - start
    assert report.cases == CASES
    assert not report.crashes, report.summary()
    assert not report.unnamed, report.summary()
    assert not report.accepted_damaged, report.summary()
    assert not report.inconsistent, report.summary()
    # the mix exercises both outcomes, and the value mutations the promise is about
    assert report.accepted > 0.1 * CASES and report.rejected > 0.5 * CASES, report.summary()
    assert report.kinds["value"] > 0.4 * CASES, report.summary()
    assert elapsed < 60, f"the bounded fuzz run took {elapsed:.0f} s"


def test_the_oracle_catches_a_damaged_accepted_series(tmp_path, monkeypatch):
    """check_case must flag a reader that reads a damaged value as absent (what the old reader did)."""
    import numpy as np

    import medvl.data.dicom as dicom
    from medvl.data.dicom_write import write_dicom_series, write_raw_element

    paths = write_dicom_series(tmp_path / "s", np.zeros((3, 4, 4), np.float32), (2.0, 1.0, 1.0))
    write_raw_element(paths[1], "RescaleIntercept", b"-10x4")
    monkeypatch.setattr(dicom, "_rescale", lambda ds, where: (1.0, 0.0))
    report = FuzzReport()
    check_case(str(tmp_path / "s"), report, "planted")
    assert report.accepted == 1 and len(report.accepted_damaged) == 1
    assert "RescaleIntercept" in report.accepted_damaged[0]
