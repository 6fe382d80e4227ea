"""Ontology-based entity recognition for radiology reports (MedTrim's "OBER").

A report is reduced to three sets of canonical entities -- diseases, adjectives and directions --
which :func:`medvl.triplet_mining` (``strategy="entities"``) scores by weighted IoUs and
:func:`medvl.sigmoid_loss` (``target="jaccard"``) uses as multi-hot labels. Everything the
extractor knows lives in the packaged ``ontology.json``: the surface forms of every canonical
entity, the negation / uncertainty / clause-break cues and the scope windows.

Vocabularies
    ``DISEASES`` is the 18 CT-RATE classes (``CT_RATE_FINDINGS``, CT-RATE's spelling) followed by
    the CheXpert classes (``CHEXPERT_FINDINGS``) that CT-RATE lacks; a class both have keeps the
    CT-RATE spelling ("Lung opacity", "Pleural effusion", ...). Callers compare canonical names
    case-insensitively. ``ADJECTIVES`` and ``DIRECTIONS`` are the ontology's canonical adjectives
    (size, severity, chronicity, course, shape, distribution) and directions (side, lobe, zone).
    The order of the three tuples is the order of the multi-hot vectors.

Matching
    * The report is lower-cased; hyphens, slashes and all other punctuation become word breaks,
      so "Ground-glass", "ground glass" and "GROUND  GLASS" are one form. Matching is on whole
      words (tokens), never on substrings.
    * Simple plurals of the last word of every disease and direction form are added
      (s, es, y->ies, is->es, a->ae, us->i).
    * Sentences split on ``.`` (not between digits: "1.5 cm"), ``;``, ``:``, ``?``, ``!`` and
      newlines; sentences split into clauses at clause-break cues ("but", "however",
      "although", "there is", "which", ...).
    * All forms of all kinds (entities and cues) are found at once and the longest wins where two
      overlap (then the earlier): "pleural effusion" beats "effusion", "right upper lobe" beats
      "right", "no acute cardiopulmonary process" beats the cue "no", "cannot be excluded"
      beats "excluded". Compound forms map to several canonicals: "RUL" -> right + upper lobe,
      "LLL" -> left + lower lobe, "bibasilar" -> bilateral + basal, "pleural or pericardial
      effusion" -> both effusions.
    * "Medical material" and "Support Devices" are equivalent classes: either sets both.

Negation (per disease mention)
    * A *pre* cue ("no", "without", "negative for", "free of", "absence of", "no evidence of",
      "no signs of", ...) negates a mention that starts at most ``negation_window`` tokens after
      the cue's end, in the same clause.
    * Lists: a mention starting at most ``list_window`` tokens after a previous mention of the
      same clause that a pre cue scoped inherits that mention's status ("No pleural effusion,
      pneumothorax or consolidation": all three negated) until a clause break ("..., but mild
      atelectasis").
    * Of several pre cues / list predecessors, the nearest one decides ("Possible atelectasis,
      no pneumonia": pneumonia negated; "No effusion, possible atelectasis": atelectasis
      uncertain).
    * A *post* cue ("is not seen", "has resolved", "is absent", "was excluded", ...) negates the
      closest mention before it in the same clause (at most ``post_window`` tokens before) and
      mentions listed right before that one (at most 2 tokens apart: "effusion and pneumothorax
      have resolved").
    * Pseudo cues ("no change", "no interval change", "no increase", ...) are neither.
    * "No Finding" phrases are never negated or uncertain.

Uncertainty
    * Pre cues ("possible", "probable", "likely", "may represent", "suggestive of",
      "suspicious for", "questionable", ...) and post cues ("cannot be excluded", "is likely",
      "is suspected", ...) use the same windows and list rule as negation. A post uncertainty cue
      overrides the pre cues ("No consolidation, pneumonia cannot be excluded" ->
      pneumonia uncertain).
    * Policy ``uncertain=``: ``"positive"`` (default, CheXpert's U-Ones): uncertain diseases are
      present; ``"negative"`` (U-Zeros): they are counted as negated; ``"ignore"``: they are in
      neither ``diseases`` nor ``negated``. Under every policy they are listed in ``uncertain``.

Report level
    A disease is kept when any mention is affirmed (or uncertain under ``"positive"``); it is in
    ``negated`` when every mention is negated (or uncertain under ``"negative"``); its report
    status is the best of its mentions (affirmed > uncertain > negated). "No Finding" is dropped
    when any other disease except the device classes is kept.

Adjectives and directions
    Each adjective / direction mention attaches to the nearest disease mention (not "No Finding")
    of its clause with no negation pre cue between the two (ties: the following
    mention); it is kept when that mention is kept. So only clauses holding a kept disease
    contribute, and "Nodule in the RUL, no large effusion" keeps right + upper lobe but not
    large.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from medvl.options import look_up_option

__all__ = [
    "ADJECTIVES",
    "CHEXPERT_FINDINGS",
    "CT_RATE_FINDINGS",
    "DIRECTIONS",
    "DISEASES",
    "ENTITY_KINDS",
    "Entities",
    "Ontology",
    "entities_to_multihot",
    "extract_entities",
    "load_ontology",
]

ENTITY_KINDS = ("disease", "adjective", "direction")

CT_RATE_FINDINGS: Tuple[str, ...] = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion", "Mosaic attenuation pattern",
    "Peribronchial thickening", "Consolidation", "Bronchiectasis", "Interlobular septal thickening",
)

CHEXPERT_FINDINGS: Tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices",
)

UNCERTAIN_POLICIES = ("positive", "negative", "ignore")
NO_FINDING = "No Finding"

_CUE_KINDS = ("negation_pre", "negation_post", "uncertainty_pre", "uncertainty_post", "pseudo", "clause_break")
_SENTENCE_SPLIT = re.compile(r"[;:\n?!]|\.(?!\d)")
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def _tokens(text: str) -> List[str]:
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    return _TOKEN.findall(text)


def _plurals(word: str) -> List[str]:
    """Plural variants of a word (over-generating is harmless: unknown words never occur)."""
    out = [word + "s", word + "es"]
    if word.endswith("y") and len(word) > 2:
        out.append(word[:-1] + "ies")
    if word.endswith("is"):
        out.append(word[:-2] + "es")
    if word.endswith("a"):
        out.append(word + "e")
    if word.endswith("us"):
        out.append(word[:-2] + "i")
    return out


# ----------------------------------------------------------------------------------------------
# Ontology
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Ontology:
    """The parsed ``ontology.json``: canonical entities with their surface forms, cues, windows."""

    diseases: Mapping[str, Tuple[str, ...]]
    adjectives: Mapping[str, Tuple[str, ...]]
    directions: Mapping[str, Tuple[str, ...]]
    disease_compounds: Mapping[str, Tuple[str, ...]] = field(default_factory=dict)
    direction_compounds: Mapping[str, Tuple[str, ...]] = field(default_factory=dict)
    equivalent_classes: Tuple[Tuple[str, ...], ...] = ()
    cues: Mapping[str, Tuple[str, ...]] = field(default_factory=dict)
    negation_window: int = 6
    list_window: int = 4
    post_window: int = 6
    source: Optional[str] = None

    @property
    def vocabularies(self) -> Tuple[Tuple[str, ...], Tuple[str, ...], Tuple[str, ...]]:
        return tuple(self.diseases), tuple(self.adjectives), tuple(self.directions)

    def canonical(self, kind: str, name: str) -> str:
        """The canonical spelling of ``name`` (case-insensitive) in vocabulary ``kind``."""
        names = self.vocabularies[ENTITY_KINDS.index(kind)]
        lookup = {n.lower(): n for n in names}
        try:
            return lookup[name.lower()]
        except KeyError:
            raise KeyError(f"{name!r} is not a {kind} of the ontology") from None

    @classmethod
    def from_dict(cls, data: Mapping, source: Optional[str] = None) -> "Ontology":
        def table(key: str) -> Dict[str, Tuple[str, ...]]:
            return {str(k): tuple(str(v) for v in values) for k, values in dict(data.get(key, {})).items()}

        cues = table("cues")
        missing = [k for k in _CUE_KINDS if k not in cues]
        if missing:
            raise ValueError(f"ontology lacks cue lists {missing}")
        scope = dict(data.get("scope", {}))
        ontology = cls(
            diseases=table("diseases"), adjectives=table("adjectives"), directions=table("directions"),
            disease_compounds=table("disease_compounds"), direction_compounds=table("direction_compounds"),
            equivalent_classes=tuple(tuple(group) for group in data.get("equivalent_classes", ())),
            cues=cues, negation_window=int(scope.get("negation_window", 6)),
            list_window=int(scope.get("list_window", 4)), post_window=int(scope.get("post_window", 6)),
            source=source,
        )
        ontology._check()
        return ontology

    def _check(self) -> None:
        for kind, compounds, names in (("disease", self.disease_compounds, self.diseases),
                                       ("direction", self.direction_compounds, self.directions)):
            for form, targets in compounds.items():
                unknown = [t for t in targets if t not in names]
                if unknown:
                    raise ValueError(f"{kind} compound {form!r} names unknown {kind}s {unknown}")
        for group in self.equivalent_classes:
            unknown = [t for t in group if t not in self.diseases]
            if unknown:
                raise ValueError(f"equivalent_classes names unknown diseases {unknown}")


@lru_cache(maxsize=None)
def _default_ontology() -> Ontology:
    try:
        from importlib.resources import files

        text = files("medvl.data").joinpath("ontology.json").read_text(encoding="utf-8")
        source = "medvl.data/ontology.json"
    except (ImportError, FileNotFoundError, ModuleNotFoundError, TypeError):
        path = Path(__file__).with_name("ontology.json")
        text, source = path.read_text(encoding="utf-8"), str(path)
    return Ontology.from_dict(json.loads(text), source=source)


def load_ontology(path: Union[str, Path, None] = None) -> Ontology:
    """The packaged ontology (cached), or the one in the JSON file at ``path``."""
    if path is None:
        return _default_ontology()
    path = Path(path)
    return Ontology.from_dict(json.loads(path.read_text(encoding="utf-8")), source=str(path))


# ----------------------------------------------------------------------------------------------
# Lexicon: token tuple -> roles
# ----------------------------------------------------------------------------------------------

# A role is (kind, canonicals): kind is an entity kind or a cue kind; canonicals is empty for cues.
_Role = Tuple[str, Tuple[str, ...]]


@dataclass(frozen=True)
class _Lexicon:
    entries: Mapping[Tuple[str, ...], Tuple[_Role, ...]]
    longest: int


@lru_cache(maxsize=16)
def _lexicon(ontology: Ontology) -> _Lexicon:
    roles: Dict[Tuple[str, ...], Dict[str, set]] = {}

    def add(form: str, kind: str, canonicals: Iterable[str], plural: bool) -> None:
        words = _tokens(form)
        if not words:
            return
        variants = [tuple(words)]
        if plural:
            variants += [tuple(words[:-1]) + (p,) for p in _plurals(words[-1])]
        for key in variants:
            roles.setdefault(key, {}).setdefault(kind, set()).update(canonicals)

    for name, forms in ontology.diseases.items():
        for form in forms:
            add(form, "disease", (name,), plural=True)
    for form, names in ontology.disease_compounds.items():
        add(form, "disease", names, plural=True)
    for name, forms in ontology.adjectives.items():
        for form in (name, *forms):
            add(form, "adjective", (name,), plural=False)
    for name, forms in ontology.directions.items():
        for form in (name, *forms):
            add(form, "direction", (name,), plural=True)
    for form, names in ontology.direction_compounds.items():
        add(form, "direction", names, plural=True)
    for kind in _CUE_KINDS:
        for form in ontology.cues.get(kind, ()):
            add(form, kind, (), plural=False)
    entries = {key: tuple((kind, tuple(sorted(names))) for kind, names in kinds.items())
               for key, kinds in roles.items()}
    return _Lexicon(entries, max(len(key) for key in entries))


@dataclass
class _Span:
    start: int
    end: int  # exclusive, in tokens of the sentence
    roles: Dict[str, Tuple[str, ...]]
    clause: int = 0


def _spans(words: Sequence[str], lexicon: _Lexicon) -> List[_Span]:
    """Non-overlapping matches, longest first (then leftmost), returned in text order."""
    found = []
    n = len(words)
    for i in range(n):
        for length in range(min(lexicon.longest, n - i), 0, -1):
            roles = lexicon.entries.get(tuple(words[i:i + length]))
            if roles is not None:
                found.append(_Span(i, i + length, dict(roles)))
    found.sort(key=lambda s: (-(s.end - s.start), s.start))
    taken = [False] * n
    chosen = []
    for span in found:
        if not any(taken[span.start:span.end]):
            chosen.append(span)
            for k in range(span.start, span.end):
                taken[k] = True
    chosen.sort(key=lambda s: s.start)
    clause = 0
    for span in chosen:
        if "clause_break" in span.roles:
            clause += 1
        span.clause = clause
    return chosen


# ----------------------------------------------------------------------------------------------
# Mention status
# ----------------------------------------------------------------------------------------------

_AFFIRMED, _UNCERTAIN, _NEGATED = "affirmed", "uncertain", "negated"
_RANK = {_AFFIRMED: 0, _UNCERTAIN: 1, _NEGATED: 2}
_LIST_GAP_POST = 2


def _statuses(spans: List[_Span], mentions: List[_Span], ontology: Ontology) -> List[str]:
    status = [_AFFIRMED] * len(mentions)
    pre_scoped = [False] * len(mentions)
    # Pre cues and lists, left to right: the nearest cue or scoped list predecessor decides.
    for m_index, mention in enumerate(mentions):
        if NO_FINDING in mention.roles["disease"]:
            continue
        best_end, best_status = -1, None
        for cue in spans:
            if cue.clause != mention.clause or cue.end > mention.start:
                continue
            if mention.start - cue.end > ontology.negation_window:
                continue
            if "negation_pre" in cue.roles or "uncertainty_pre" in cue.roles:
                kind = _UNCERTAIN if "uncertainty_pre" in cue.roles else _NEGATED
                if cue.end > best_end:
                    best_end, best_status = cue.end, kind
        if m_index > 0:
            previous = mentions[m_index - 1]
            if (pre_scoped[m_index - 1] and previous.clause == mention.clause
                    and mention.start - previous.end <= ontology.list_window and previous.end > best_end):
                best_end, best_status = previous.end, status[m_index - 1]
        if best_status is not None:
            status[m_index], pre_scoped[m_index] = best_status, True
    # Post cues: the closest mention before the cue, then mentions listed right before it.
    post_status = [None] * len(mentions)
    for cue in spans:
        kinds = [k for k in ("uncertainty_post", "negation_post") if k in cue.roles]
        if not kinds:
            continue
        kind = _UNCERTAIN if kinds[0] == "uncertainty_post" else _NEGATED
        before = [i for i, m in enumerate(mentions) if m.end <= cue.start and m.clause == cue.clause
                  and NO_FINDING not in m.roles["disease"]]
        if not before or cue.start - mentions[before[-1]].end > ontology.post_window:
            continue
        chain = [before[-1]]
        for i in reversed(before[:-1]):
            if mentions[chain[-1]].start - mentions[i].end > _LIST_GAP_POST:
                break
            chain.append(i)
        for i in chain:
            if post_status[i] != _UNCERTAIN:
                post_status[i] = kind
    for i, kind in enumerate(post_status):
        if kind == _UNCERTAIN or (kind == _NEGATED and status[i] == _AFFIRMED):
            status[i] = kind
    return status


# ----------------------------------------------------------------------------------------------
# Entities
# ----------------------------------------------------------------------------------------------

VocabularyLike = Union[None, Ontology, Sequence[Sequence[str]]]


def _vocabularies(vocabulary: VocabularyLike) -> Tuple[Tuple[str, ...], Tuple[str, ...], Tuple[str, ...]]:
    if vocabulary is None:
        return DISEASES, ADJECTIVES, DIRECTIONS
    if isinstance(vocabulary, Ontology):
        return vocabulary.vocabularies
    if len(vocabulary) != 3 or any(isinstance(v, str) for v in vocabulary):
        raise ValueError("vocabulary must be an Ontology or three sequences of names (diseases, adjectives, "
                         "directions)")
    return tuple(tuple(v) for v in vocabulary)  # type: ignore[return-value]


def _multihot(names: Iterable[str], vocabulary: Sequence[str]) -> torch.Tensor:
    index = {name.lower(): i for i, name in enumerate(vocabulary)}
    out = torch.zeros(len(vocabulary), dtype=torch.bool)
    for name in names:
        i = index.get(name.lower())
        if i is not None:
            out[i] = True
    return out


@dataclass(frozen=True)
class Entities:
    """Canonical entities of one report (each tuple sorted and unique)."""

    diseases: Tuple[str, ...] = ()
    adjectives: Tuple[str, ...] = ()
    directions: Tuple[str, ...] = ()
    uncertain: Tuple[str, ...] = ()
    negated: Tuple[str, ...] = ()

    def to_multihot(self, vocabulary: VocabularyLike = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(disease, adjective, direction) 1-D bool tensors over the vocabularies.

        ``vocabulary``: None (``DISEASES``, ``ADJECTIVES``, ``DIRECTIONS``), an :class:`Ontology`, or
        three sequences of names. Names compare case-insensitively; names outside a vocabulary are
        left out (so a narrower vocabulary, e.g. ``CT_RATE_FINDINGS`` only, just drops the rest).
        """
        vocabs = _vocabularies(vocabulary)
        return tuple(_multihot(names, vocab) for names, vocab in  # type: ignore[return-value]
                     zip((self.diseases, self.adjectives, self.directions), vocabs))


def entities_to_multihot(entities: Sequence[Entities], vocabulary: VocabularyLike = None
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three (B, K_kind) bool tensors, ready for ``medvl.triplet_mining(..., entities=...)``."""
    vocabs = _vocabularies(vocabulary)
    if len(entities) == 0:
        return tuple(torch.zeros(0, len(v), dtype=torch.bool) for v in vocabs)  # type: ignore[return-value]
    rows = [e.to_multihot(vocabs) for e in entities]
    return tuple(torch.stack([row[k] for row in rows]) for k in range(3))  # type: ignore[return-value]


def extract_entities(report: str, ontology: Optional[Ontology] = None, *, uncertain: str = "positive") -> Entities:
    """Parse one report into :class:`Entities` (rules in the module docstring).

    Args:
        report: free text, any case, any number of sentences.
        ontology: default the packaged one (:func:`load_ontology`).
        uncertain: "positive" (uncertain diseases are present, U-Ones), "negative" (they count as
            negated) or "ignore" (neither). They are listed in ``Entities.uncertain`` in every case.
    """
    look_up_option(uncertain, UNCERTAIN_POLICIES, name="uncertain")
    if not isinstance(report, str):
        raise TypeError(f"report must be a str, got {type(report).__name__}")
    ontology = load_ontology() if ontology is None else ontology
    lexicon = _lexicon(ontology)
    equivalents: Dict[str, set] = {}
    for group in ontology.equivalent_classes:
        for name in group:
            equivalents.setdefault(name, set()).update(group)

    best: Dict[str, str] = {}
    adjectives: set = set()
    directions: set = set()
    kept_status = {_AFFIRMED} | ({_UNCERTAIN} if uncertain == "positive" else set())

    for sentence in _SENTENCE_SPLIT.split(report):
        words = _tokens(sentence)
        if not words:
            continue
        spans = _spans(words, lexicon)
        mentions = [s for s in spans if "disease" in s.roles]
        status = _statuses(spans, mentions, ontology)
        for mention, state in zip(mentions, status):
            for name in mention.roles["disease"]:
                for target in equivalents.get(name, {name}):
                    if target not in best or _RANK[state] < _RANK[best[target]]:
                        best[target] = state
        # Adjectives and directions attach to the nearest reachable disease mention of their clause.
        blockers = [s for s in spans if "negation_pre" in s.roles]
        for span in spans:
            kinds = [k for k in ("adjective", "direction") if k in span.roles]
            if not kinds:
                continue
            choice = None
            for mention, state in zip(mentions, status):
                if mention.clause != span.clause or NO_FINDING in mention.roles["disease"]:
                    continue
                lo, hi = (span.end, mention.start) if span.end <= mention.start else (mention.end, span.start)
                if any(lo <= b.start and b.end <= hi for b in blockers):
                    continue
                key = (hi - lo, 0 if mention.start >= span.end else 1)
                if choice is None or key < choice[0]:
                    choice = (key, state)
            if choice is not None and choice[1] in kept_status:
                for kind in kinds:
                    (adjectives if kind == "adjective" else directions).update(span.roles[kind])

    present = {name for name, state in best.items() if state in kept_status}
    if any(name != NO_FINDING and name not in equivalents for name in present):
        present.discard(NO_FINDING)
    unsure = {name for name, state in best.items() if state == _UNCERTAIN}
    negated = {name for name, state in best.items() if state == _NEGATED}
    if uncertain == "negative":
        negated |= unsure
    def ordered(names: Iterable[str]) -> Tuple[str, ...]:
        return tuple(sorted(set(names)))

    return Entities(diseases=ordered(present), adjectives=ordered(adjectives), directions=ordered(directions),
                    uncertain=ordered(unsure), negated=ordered(negated))


_ONTOLOGY = load_ontology()
DISEASES: Tuple[str, ...] = _ONTOLOGY.vocabularies[0]
ADJECTIVES: Tuple[str, ...] = _ONTOLOGY.vocabularies[1]
DIRECTIONS: Tuple[str, ...] = _ONTOLOGY.vocabularies[2]
del _ONTOLOGY
