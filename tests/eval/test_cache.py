"""The embedding cache on disk: safetensors shards, one folder per model."""

import torch

from medvl.eval.cache import EmbeddingCache, text_key


def test_embedding_cache_round_trips_through_safetensors(tmp_path):
    first = EmbeddingCache(tmp_path, "abc123")
    first.put_many({"k1": {"features": torch.arange(4.0)}, "k2": {"a": torch.ones(2, 3), "b": torch.zeros(1)}})
    shards = list((tmp_path / "abc123").glob("*.safetensors"))
    assert len(shards) == 1 and not list((tmp_path / "abc123").glob("*.pt"))
    again = EmbeddingCache(tmp_path, "abc123")
    assert len(again) == 2 and "k1" in again
    assert torch.equal(again.get("k1")["features"], torch.arange(4.0))
    assert set(again.get_many(["k2", "missing"])) == {"k2"}
    assert len(EmbeddingCache(tmp_path, "other-model")) == 0  # another model never sees these entries
    assert text_key("a b") == text_key("a b") != text_key("a  b")


def test_eval_set_generates_each_phantom_once(monkeypatch):
    """Reading an evaluation set's texts, labels and cache keys generates each phantom once, also when the set is
    larger than the records the dataset keeps (256): the keys are taken in the same pass as the texts."""
    import medvl.data.sources as sources
    from medvl.eval.cache import volume_ids
    from medvl.eval.eval_set import EvalSet

    made = []
    real = sources.make_ct_phantom
    monkeypatch.setattr(sources, "make_ct_phantom", lambda seed, **kw: made.append(seed) or real(seed, **kw))
    dataset = sources.synthetic_dataset("ct", n=300, seed=7, size=(16, 16, 8))
    data = EvalSet.from_dataset(dataset, "ct", source="synthetic-ct", size=(16, 16, 8))
    assert len(made) == 300 and len(set(made)) == 300
    assert [d["seed"] for d in data.ids] == made
    assert data.ids == volume_ids(dataset, "synthetic-ct", (16, 16, 8), "ct")  # the same keys as a pass of their own
