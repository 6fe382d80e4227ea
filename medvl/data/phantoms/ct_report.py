"""The CT phantom's free-text report, and the way back from a report to the sentence describing each finding."""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from medvl.data.phantoms.ct_findings import CT_FINDING_KINDS, CT_FINDINGS, Finding, finding_templates

_NORMAL_SENTENCES = (
    "The lungs are clear. No acute cardiopulmonary abnormality.",
    "The lungs are clear.",
    "Normal CT of the chest. The lungs are clear.",
)
# Any of image_references' forms, with the space before it.
_IMAGE_REFERENCE = re.compile(r"\s*\((?:series\s+\d+,\s*)?image\s+\d+\)", re.IGNORECASE)


def image_references(f: Finding) -> tuple[str, str]:
    """The two ways a report cites the slice of ``f``: "(image N)" and "(series 3, image N)", N = slice_index + 1."""
    n = f.slice_index + 1
    return f"(image {n})", f"(series 3, image {n})"


def _sentence_case(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:]


def ct_report(findings: Sequence[Finding], rng: np.random.Generator | int | None = None) -> str:
    """Free-text report for ``findings``: one sentence per positive finding citing
    "(image N)" or "(series 3, image N)" with N = slice_index + 1, negations of some absent
    findings, and a normal-study sentence when there are none. Deterministic given ``rng``."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    sentences = []
    for i in rng.permutation(len(findings)):
        f = findings[int(i)]
        if f.slice_index < 0:
            raise ValueError(f"{f.name}: slice_index is not set")
        t = finding_templates(f)
        template = t[int(rng.integers(len(t)))]
        plain, with_series = image_references(f)
        sentences.append(_sentence_case(template.format(ref=with_series if rng.random() < 0.5 else plain)))
    present = {f.name for f in findings}
    absent = [n for n in CT_FINDINGS if n not in present]
    if absent:
        k = int(rng.integers(min(2, len(absent)), len(absent) + 1))
        for i in rng.choice(len(absent), size=k, replace=False):
            t = CT_FINDING_KINDS[absent[int(i)]].negations
            sentences.append(t[int(rng.integers(len(t)))])
    if not findings:
        sentences.insert(0, _NORMAL_SENTENCES[int(rng.integers(len(_NORMAL_SENTENCES)))])
    return " ".join(sentences)


def finding_sentence(report: str, f: Finding) -> str | None:
    """The sentence of ``report`` (written by :func:`ct_report`) that describes the finding ``f``, or None.

    The report says nothing about which sentence is whose, and several findings may cite the same image, so
    every wording :func:`ct_report` could have used for ``f`` (its templates with either reference) is looked
    for; wordings of different findings never coincide."""
    for template in finding_templates(f):
        for ref in image_references(f):
            sentence = _sentence_case(template.format(ref=ref))
            if report.startswith(sentence) or (" " + sentence) in report:
                return sentence
    return None


def without_image_reference(sentence: str) -> str:
    """``sentence`` without its "(image N)" / "(series 3, image N)" and the spacing it leaves."""
    text = _IMAGE_REFERENCE.sub("", sentence)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([.,;:])", r"\1", text)  # "effusion ." -> "effusion."
    text = re.sub(r",\s*\.", ".", text)
    return text.strip()
