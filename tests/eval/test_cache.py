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
