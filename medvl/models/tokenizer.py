"""A small BERT-style WordPiece tokenizer trained in memory on the phantom corpus.

    texts = default_corpus()                       # CT reports, MR metadata sentences, disease prompts
    tok = train_wordpiece(texts, vocab_size=2000)  # transformers.PreTrainedTokenizerFast
    tok = default_tokenizer()                      # trained once, then loaded from the on-disk cache

Nothing here touches the network. The cache is a plain ``save_pretrained`` directory
(``tokenizer.json``, ``tokenizer_config.json``, ...) plus ``medvl_tokenizer.json`` recording the
recipe it was trained from; it lives under ``<root>/<key>`` where ``root`` is ``cache_dir``,
else ``$MEDVL_CACHE/tokenizers``, else ``~/.cache/medvl/tokenizers``, and ``key`` is a hash of
the corpus recipe (sizes, seed, the source of the ``medvl.data`` generators) and the training
parameters. Directories are written to a temporary sibling and renamed into place, so
processes racing to build the same entry never see a half-written one.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import string
import tempfile
from pathlib import Path
from typing import Iterable, List, Optional

__all__ = ["SPECIAL_TOKENS", "default_corpus", "train_wordpiece", "default_tokenizer", "tokenizer_cache_dir"]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_PAD, _UNK, _CLS, _SEP, _MASK = SPECIAL_TOKENS
# Bump when the training recipe below changes in a way that alters the vocabulary.
_FORMAT_VERSION = 1
_RECIPE_FILE = "medvl_tokenizer.json"


def default_corpus(n_ct: int = 200, n_mr: int = 200, seed: int = 0) -> List[str]:
    """Phantom CT reports, MR metadata sentences and the disease prompts, in a fixed order.

    CT phantom ``i`` uses seed ``seed + i``; MR phantom ``i`` uses seed ``seed + n_ct + i``.
    Deterministic for given arguments. Building the CT phantoms dominates the cost (a few
    seconds for 200), which is why :func:`default_tokenizer` caches its result.
    """
    from medvl.data import disease_prompts, make_ct_phantom, make_mr_phantom, metadata_to_text

    texts: List[str] = []
    for i in range(int(n_ct)):
        texts.append(make_ct_phantom(seed + i).report)
    for i in range(int(n_mr)):
        texts.append(metadata_to_text(make_mr_phantom(seed + n_ct + i).metadata))
    prompts = disease_prompts()
    for finding in sorted(prompts):
        positive, negative = prompts[finding]
        texts.extend(positive)
        texts.extend(negative)
    return texts


def _initial_alphabet(lowercase: bool) -> List[str]:
    # Printable ASCII is always in the vocabulary, so digits/punctuation that happen to be
    # absent from the corpus still tokenize; anything else unseen becomes [UNK].
    chars = string.ascii_lowercase + string.digits + string.punctuation
    if not lowercase:
        chars += string.ascii_uppercase
    return sorted(set(chars))


def train_wordpiece(texts: Iterable[str], vocab_size: int = 2000, lowercase: bool = True):
    """Train a BERT-style WordPiece tokenizer on ``texts`` in memory.

    Returns a ``transformers.PreTrainedTokenizerFast`` whose special tokens are
    ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (ids 0..4) and whose post-processor wraps a sequence as
    ``[CLS] A [SEP]`` (pairs as ``[CLS] A [SEP] B [SEP]`` with token type ids 0/1).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [str(t) for t in texts]
    normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=lowercase, lowercase=lowercase)
    # The trainer numbers "##x" continuation tokens in hash-map order, and ties between equally
    # frequent merges are broken by those numbers, so the vocabulary would change from run to run.
    # Registering every "##x" up front (as placeholder special tokens, sorted) fixes their ids;
    # the final tokenizer below is rebuilt from the learnt vocabulary with only the real specials.
    chars = set(_initial_alphabet(lowercase))
    for t in texts:
        chars.update(normalizer.normalize_str(t))
    chars = sorted(c for c in chars if not c.isspace())
    pinned = [f"##{c}" for c in chars]
    trainer_tok = Tokenizer(models.WordPiece(unk_token=_UNK, continuing_subword_prefix="##"))
    trainer_tok.normalizer = normalizer
    trainer_tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=int(vocab_size),
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS) + pinned,
        initial_alphabet=chars,
        continuing_subword_prefix="##",
        show_progress=False,
    )
    trainer_tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    vocab = trainer_tok.get_vocab(with_added_tokens=False)
    vocab.update({t: i for i, t in enumerate(SPECIAL_TOKENS)})
    vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    tok = Tokenizer(models.WordPiece(vocab, unk_token=_UNK, continuing_subword_prefix="##",
                                     max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    cls_id, sep_id = tok.token_to_id(_CLS), tok.token_to_id(_SEP)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{_CLS}:0 $A:0 {_SEP}:0",
        pair=f"{_CLS}:0 $A:0 {_SEP}:0 $B:1 {_SEP}:1",
        special_tokens=[(_CLS, cls_id), (_SEP, sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=_UNK, pad_token=_PAD, cls_token=_CLS, sep_token=_SEP, mask_token=_MASK,
        model_max_length=512,
        padding_side="right",
        do_lower_case=lowercase,
    )


def _recipe(n_ct: int, n_mr: int, seed: int, vocab_size: int, lowercase: bool) -> dict:
    """What determines the trained vocabulary; hashed into the cache key.

    The corpus is described by its recipe (sizes, seed and the source code of the generators
    that produce it) rather than by its text, so a cache hit does not have to rebuild the
    phantoms; editing the generators changes the key.
    """
    import tokenizers

    from medvl.data import metadata, phantoms, prompts

    src = hashlib.sha256()
    for path in sorted(Path(phantoms.__file__).parent.glob("*.py")):
        src.update(path.read_bytes())
    for mod in (metadata, prompts):
        src.update(inspect.getsource(mod).encode())
    return {
        "format": _FORMAT_VERSION,
        "corpus": {"n_ct": int(n_ct), "n_mr": int(n_mr), "seed": int(seed), "source_sha256": src.hexdigest()},
        "vocab_size": int(vocab_size),
        "lowercase": bool(lowercase),
        "tokenizers": tokenizers.__version__,
    }


def tokenizer_cache_dir(cache_dir: Optional[os.PathLike | str] = None) -> Path:
    """The root under which cached tokenizers live (see the module docstring)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("MEDVL_CACHE")
    if env:
        return Path(env).expanduser() / "tokenizers"
    return Path("~/.cache/medvl/tokenizers").expanduser()


def _load(path: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)


def default_tokenizer(cache_dir: Optional[os.PathLike | str] = None, *, n_ct: int = 200, n_mr: int = 200,
                      seed: int = 0, vocab_size: int = 2000, lowercase: bool = True):
    """The WordPiece tokenizer trained on :func:`default_corpus`, built once and cached on disk.

    The first call trains and writes ``<root>/<key>/`` atomically; later calls (from any
    process) load it from there. Returns a ``transformers.PreTrainedTokenizerFast``.
    """
    recipe = _recipe(n_ct, n_mr, seed, vocab_size, lowercase)
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    root = tokenizer_cache_dir(cache_dir)
    final = root / key
    if (final / _RECIPE_FILE).is_file():
        return _load(final)

    tok = train_wordpiece(default_corpus(n_ct, n_mr, seed), vocab_size=vocab_size, lowercase=lowercase)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
    try:
        tok.save_pretrained(str(tmp))
        # Written last: its presence marks a complete entry.
        (tmp / _RECIPE_FILE).write_text(json.dumps(recipe, indent=2, sort_keys=True))
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process won the race (the target exists and is not empty); use theirs.
            if not (final / _RECIPE_FILE).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _load(final)
