"""VolumeTextDataset and collate with small fake records (no DICOM, phantom or entity modules needed)."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medvl.data.dataset import Sample, VolumeTextDataset, collate
from medvl.data.transforms import ct_transforms, volume_to_metatensor

SHAPE_ZYX = (20, 24, 28)
SIZE = (16, 16, 16)
KINDS = (5, 3, 4)  # fake entity vocabulary sizes


class FakeEntities:
    def __init__(self, report):
        self.report = report

    def to_multihot(self):
        words = self.report.split()
        return tuple(torch.tensor([i < len(words) for i in range(k)]) for k in KINDS)


def fake_entity_fn(report):
    return FakeEntities(report)


def _records(n=4, seed=0, **extra):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        out.append({
            "image": rng.integers(-1100, 1500, size=SHAPE_ZYX, dtype=np.int16),
            "spacing": (3.0, 1.0, 1.0),
            "text": f"CT chest case {i}",
            "label": i % 3,
            "labels": [i % 2 == 0, True, False],
            "report": " ".join(["finding"] * (i + 1)),
            "meta": {"id": f"case{i}"},
            **extra,
        })
    return out


def _ct_pipe(window=(-1000.0, 400.0)):
    return ct_transforms(spacing=(2.0, 2.0, 3.0), size=SIZE, window=window)


def test_sample_and_batch_layout():
    ds = VolumeTextDataset(_records(), _ct_pipe(), entity_fn=fake_entity_fn)
    assert len(ds) == 4
    s = ds[1]
    assert isinstance(s, Sample)
    assert type(s.volume) is torch.Tensor  # plain tensor, not a MetaTensor
    assert s.volume.shape == (1, *SIZE) and s.volume.dtype == torch.float32
    assert 0.0 <= s.volume.min() and s.volume.max() <= 1.0
    assert s.text == "CT chest case 1" and s.label == 1
    assert s.labels.dtype == torch.bool and s.labels.tolist() == [False, True, False]
    assert [e.tolist() for e in s.entities] == [[True, True, False, False, False], [True, True, False],
                                                [True, True, False, False]]
    assert s.meta["id"] == "case1" and s.meta["index"] == 1
    np.testing.assert_allclose(np.diag(s.meta["affine"].numpy()), [2.0, 2.0, 3.0, 1.0])
    assert ds[-1].meta["index"] == 3

    loader = DataLoader(ds, batch_size=2, collate_fn=collate, shuffle=False, num_workers=0)
    batches = list(loader)
    assert len(batches) == 2
    b = batches[0]
    assert set(b) == {"volume", "text", "label", "labels", "entities", "meta"}
    assert b["volume"].shape == (2, 1, *SIZE) and b["volume"].dtype == torch.float32
    assert b["text"] == ["CT chest case 0", "CT chest case 1"]
    assert b["label"].dtype == torch.long and b["label"].tolist() == [0, 1]
    assert b["labels"].shape == (2, 3) and b["labels"].dtype == torch.bool
    assert isinstance(b["entities"], tuple) and len(b["entities"]) == 3
    assert [tuple(e.shape) for e in b["entities"]] == [(2, k) for k in KINDS]
    assert all(e.dtype == torch.bool for e in b["entities"])
    assert [m["id"] for m in b["meta"]] == ["case0", "case1"]
    assert torch.equal(b["volume"][1], ds[1].volume)


def test_raw_pipeline_keeps_int16_for_fused_op():
    records = _records(2)
    ds = VolumeTextDataset(records, _ct_pipe(window=None))
    b = collate([ds[0], ds[1]])
    assert b["volume"].dtype == torch.int16 and b["volume"].shape == (2, 1, *SIZE)
    assert b["entities"] is None  # no entity_fn
    # equal to the windowed pipeline after MONAI-style windowing (the fused op's arithmetic)
    windowed = VolumeTextDataset(records, _ct_pipe())[0].volume
    lo, hi = -1000.0, 400.0
    by_hand = ((b["volume"][0].float() - lo) / (hi - lo)).clamp(0, 1)
    torch.testing.assert_close(by_hand, windowed, atol=0.5 / (hi - lo) + 1e-6, rtol=0)  # int16 rounding: 0.5 HU


def test_no_transform_defaults_and_optional_fields():
    vol = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    ds = VolumeTextDataset([{"image": vol, "spacing": (2.0, 1.0, 1.0), "text": "t"}])
    s = ds[0]
    assert s.volume.shape == (1, 4, 3, 2) and s.volume.dtype == torch.int16
    assert s.volume[0, 3, 2, 1].item() == vol[1, 2, 3]
    assert s.label == -1 and s.labels is None and s.entities is None and s.meta["index"] == 0
    b = collate([s, s])
    assert b["label"].tolist() == [-1, -1] and b["labels"] is None and b["entities"] is None

    # MetaTensor input is used as is
    mt = volume_to_metatensor(vol, (2.0, 1.0, 1.0))
    assert torch.equal(VolumeTextDataset([{"image": mt, "text": "t"}])[0].volume, mt.as_tensor())


def test_text_fn_label_fn_and_cache():
    calls = []

    def transform(d):
        calls.append(1)
        return ct_transforms(spacing=None, size=(8, 8, 8))(d)

    records = [{"image": np.zeros((4, 5, 6), np.int16), "spacing": (1.0, 1.0, 1.0),
                "metadata": {"Modality": "CT", "contrast": i}} for i in range(2)]
    ds = VolumeTextDataset(records, transform, text_fn=lambda m: f"{m['Modality']} study",
                           label_fn=lambda m: m["contrast"], cache=True)
    assert ds[1].text == "CT study" and ds[1].label == 1
    assert ds[1] is ds[1]
    assert len(calls) == 1
    ds[0]
    assert len(calls) == 2

    nocache = VolumeTextDataset(records, transform, text_fn=lambda m: "x", label_fn=lambda m: 0)
    nocache[0]
    nocache[0]
    assert len(calls) == 4

    # precomputed entities on the record are accepted too
    rec = dict(records[0], text="t", entities=([1, 0], [0], [1, 1, 0]))
    s = VolumeTextDataset([rec], transform)[0]
    assert [e.dtype for e in s.entities] == [torch.bool] * 3 and s.entities[2].tolist() == [True, True, False]


def test_record_errors():
    good = _records(1)[0]
    with pytest.raises(KeyError, match="record 0 has no 'image'"):
        VolumeTextDataset([{"text": "x"}])
    with pytest.raises(KeyError, match="'text'"):
        VolumeTextDataset([{"image": good["image"], "spacing": good["spacing"]}])
    with pytest.raises(TypeError):
        VolumeTextDataset({"image": 1, "text": "x"})
    with pytest.raises(TypeError, match="record 1"):
        VolumeTextDataset([good, "not a dict"])
    with pytest.raises(TypeError):
        VolumeTextDataset([good], transform="ct")

    def first(rec, **kw):
        return VolumeTextDataset([rec], **kw)[0]

    with pytest.raises(KeyError, match="spacing"):
        first({"image": good["image"], "text": "x"})
    with pytest.raises(TypeError, match="'image'"):
        first({"image": [[1, 2]], "text": "x", "spacing": (1, 1, 1)})
    with pytest.raises(TypeError, match="load=True"):
        first({"image": "/nonexistent/ct.nii.gz", "text": "x"})
    with pytest.raises(TypeError, match="text must be a str"):
        first(dict(good, text=3))
    with pytest.raises(TypeError, match="label"):
        first(dict(good, label=1.5))
    with pytest.raises(TypeError, match="label"):
        first(dict(good, label=True))
    with pytest.raises(ValueError, match="label"):
        first(dict(good, label=-2))
    with pytest.raises(ValueError, match="labels"):
        first(dict(good, labels=[[1, 0]]))
    with pytest.raises(ValueError, match="labels"):
        first(dict(good, labels=[0.5, 1.0]))
    with pytest.raises(TypeError, match="to_multihot"):
        first(good, entity_fn=lambda r: r)
    with pytest.raises(ValueError, match="three"):
        first(dict(good, entities=([1], [0])))
    with pytest.raises(TypeError, match="'meta'"):
        first(dict(good, meta=["x"]))
    with pytest.raises(IndexError):
        VolumeTextDataset([good])[1]


def test_collate_errors():
    ds = VolumeTextDataset(_records(2), _ct_pipe(), entity_fn=fake_entity_fn)
    a, b = ds[0], ds[1]
    with pytest.raises(ValueError, match="empty"):
        collate([])
    with pytest.raises(TypeError, match="item 1"):
        collate([a, {"volume": b.volume}])
    other = Sample(volume=torch.zeros(1, 8, 8, 8), text="x", label=0, labels=b.labels, entities=b.entities)
    with pytest.raises(ValueError, match="sample 1 volume has shape"):
        collate([a, other])
    other = Sample(volume=a.volume.to(torch.float16), text="x", labels=b.labels, entities=b.entities)
    with pytest.raises(ValueError, match="sample 1 volume is torch.float16"):
        collate([a, other])
    no_ent = Sample(volume=b.volume, text="x", labels=b.labels)
    with pytest.raises(ValueError, match=r"entities: samples \[1\]"):
        collate([a, no_ent])
    no_labels = Sample(volume=b.volume, text="x", entities=b.entities)
    with pytest.raises(ValueError, match=r"labels: samples \[1\]"):
        collate([a, no_labels])
    short = Sample(volume=b.volume, text="x", labels=b.labels[:2], entities=b.entities)
    with pytest.raises(ValueError, match="sample 1 has shape"):
        collate([a, short])


def test_raw_batch_through_reference_patch_embed_matches_windowed_batch():
    """The raw pipeline + the op's window gives the tokens of the windowed pipeline (padding included)."""
    from medvl.reference import patch_embed3d as reference

    records = _records(2, seed=3)
    raw = collate([VolumeTextDataset(records, _ct_pipe(window=None))[i] for i in range(2)])["volume"]
    win = collate([VolumeTextDataset(records, _ct_pipe())[i] for i in range(2)])["volume"]
    weight = torch.randn(8, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    tokens_raw = reference.patch_embed3d(raw, weight, patch_size=(4, 4, 4), window=(-1000.0, 400.0),
                                         out_range=(0.0, 1.0), out_dtype=torch.float32)
    tokens_win = reference.patch_embed3d(win, weight, patch_size=(4, 4, 4), out_dtype=torch.float32)
    assert tokens_raw.shape == (2, 64, 8)
    # int16 rounding of the raw HU: at most 0.5 HU -> 0.5 / 1400 per voxel, 64 voxels per patch
    torch.testing.assert_close(tokens_raw, tokens_win, atol=64 * 0.5 / 1400 * weight.abs().max().item(), rtol=0)


@pytest.mark.parametrize("spacing", [(float("nan"), 1.0, 1.0), (1.0, 0.0, 1.0), (1.0, -0.8, 1.0), (1.0, 1.0), "abc"])
def test_array_record_spacing_must_be_finite_and_positive(spacing):
    good = _records(1)[0]
    with pytest.raises(ValueError, match=r"record 0: 'spacing' must be three finite positive numbers"):
        VolumeTextDataset([{"image": good["image"], "text": "x", "spacing": spacing}], transform=_ct_pipe())[0]
