"""The data layer end to end: phantoms through DICOM, metadata sentences, entities, MONAI and the fused op."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import medvl
from medvl.data import (
    CT_FINDINGS, VolumeTextDataset, collate, contrast_category, ct_transforms, entities_to_multihot, extract_entities,
    make_ct_phantom, make_mr_phantom, metadata_to_text, read_dicom_series, read_series_metadata, write_dicom_series,
)


def test_ct_phantom_round_trips_through_dicom(tmp_path):
    phantom = make_ct_phantom(3, shape=(16, 32, 32))
    write_dicom_series(tmp_path, phantom.volume, phantom.spacing, modality="CT", seed=3)
    series = read_dicom_series(tmp_path)
    assert series.volume.shape == phantom.volume.shape
    np.testing.assert_allclose(series.spacing, phantom.spacing)
    # HU are integers and the default rescale (1, -1024) stores them exactly.
    np.testing.assert_array_equal(series.volume, phantom.volume.astype(np.float32))


def test_mr_phantom_metadata_survives_dicom_and_gives_the_same_sentence(tmp_path):
    for seed, sequence in enumerate(("FLAIR", "T1_MPRAGE", "T2_TSE")):
        phantom = make_mr_phantom(seed, sequence=sequence, shape=(8, 16, 16))
        folder = tmp_path / sequence
        write_dicom_series(folder, phantom.volume, phantom.spacing, modality="MR", metadata=phantom.metadata, seed=seed)
        header_only = read_series_metadata(folder)
        series = read_dicom_series(folder)
        for metadata in (header_only, series.metadata):
            assert metadata_to_text(metadata) == metadata_to_text(phantom.metadata)
            assert contrast_category(metadata) == contrast_category(phantom.metadata)


def test_phantom_reports_parse_back_to_their_findings():
    for seed in range(40):
        phantom = make_ct_phantom(seed, shape=(32, 48, 48))
        entities = extract_entities(phantom.report)
        assert {d.lower() for d in entities.diseases} == {f.name.lower() for f in phantom.findings}, phantom.report
        for finding in phantom.findings:
            if finding.side in ("left", "right", "bilateral"):
                assert finding.side in entities.directions, (finding, phantom.report)


def test_dataset_feeds_raw_hu_to_the_fused_patch_embedding():
    phantoms = [make_ct_phantom(seed, shape=(16, 32, 32)) for seed in range(4)]
    records = [{"image": p.volume, "spacing": p.spacing, "text": p.report, "report": p.report,
                "labels": p.labels} for p in phantoms]
    # window=None keeps raw int16 HU: the fused op windows inside the first layer.
    dataset = VolumeTextDataset(records, ct_transforms(spacing=None, size=(32, 32, 16), window=None),
                                entity_fn=extract_entities)
    batch = collate([dataset[i] for i in range(len(dataset))])
    assert batch["volume"].dtype == torch.int16 and batch["volume"].shape == (4, 1, 32, 32, 16)
    assert batch["labels"].shape == (4, len(CT_FINDINGS))
    disease, adjective, direction = batch["entities"]
    assert disease.shape[0] == adjective.shape[0] == direction.shape[0] == 4
    expected = entities_to_multihot([extract_entities(p.report) for p in phantoms])
    assert all(torch.equal(a, b) for a, b in zip(batch["entities"], expected))
    embed = medvl.nn.PatchEmbed3d(1, 24, img_size=(32, 32, 16), patch_size=(8, 8, 4), window=(-1000, 400))
    tokens = embed(batch["volume"])
    assert tokens.shape == (4, 64, 24) and torch.isfinite(tokens).all()
    # The same as windowing in the pipeline and embedding the floats without a window.
    windowed = VolumeTextDataset(records, ct_transforms(spacing=None, size=(32, 32, 16), window=(-1000, 400)))
    floats = torch.stack([windowed[i].volume for i in range(len(windowed))])
    reference = medvl.patch_embed3d(floats, embed.weight, embed.bias, embed.pos_embed, patch_size=(8, 8, 4))
    torch.testing.assert_close(tokens, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strategy", ["entities"])
def test_phantom_entities_drive_entity_mining(strategy):
    reports = [make_ct_phantom(seed, shape=(16, 32, 32)).report for seed in range(16)]
    entities = entities_to_multihot([extract_entities(r) for r in reports])
    embeddings = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    anchor, positive, negative = medvl.triplet_mining(embeddings, strategy=strategy, entities=entities)
    assert anchor.numel() == positive.numel() == negative.numel()
