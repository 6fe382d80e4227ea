"""The header rules of `medvl qc` (metadata_issues, sequence_family); the command itself is in test_eval_cli.py."""

from medvl.eval.qc import metadata_issues, sequence_family


def test_metadata_issues_clean_phantoms_have_none():
    from medvl.data import make_phantom_set

    _, phantoms = make_phantom_set(0, 60, seed=5, mr_kwargs={"shape": (8, 8, 8)})
    assert {sequence_family(p.metadata) for p in phantoms} >= {"FLAIR", "STIR", "gradient echo", "T1 spin echo"}
    assert [p.sequence for p in phantoms if metadata_issues(p.metadata)] == []


def test_metadata_issues_flag_broken_headers():
    from medvl.data import make_mr_phantom

    flair = make_mr_phantom(1, shape=(8, 8, 8), sequence="FLAIR").metadata
    assert metadata_issues({**flair, "Manufacturer": None}) == ["missing Manufacturer"]
    assert any("EchoTime" in issue and "FLAIR" in issue for issue in metadata_issues({**flair,
                                                                                      "EchoTime": flair["EchoTime"] / 10}))
    assert "IR in ScanningSequence but no InversionTime" in metadata_issues({**flair, "InversionTime": None})
    gd = make_mr_phantom(2, shape=(8, 8, 8), sequence="T1_SE_GD").metadata
    assert metadata_issues({**gd, "ContrastBolusAgent": None}) == [
        "SeriesDescription says contrast but ContrastBolusAgent is empty"]
    plane = {"axial": "coronal", "coronal": "sagittal", "sagittal": "axial"}[gd["Plane"]]
    assert any("SeriesDescription says" in issue for issue in metadata_issues({**gd, "Plane": plane}))
    # Without ScanningSequence the description still names the family, so its ranges still apply.
    broken = {**flair, "ScanningSequence": None, "RepetitionTime": flair["RepetitionTime"] / 10}
    assert sequence_family(broken) == "FLAIR"
    assert {"missing ScanningSequence"} < set(metadata_issues(broken))
