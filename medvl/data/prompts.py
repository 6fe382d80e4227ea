"""Text prompts for zero-shot classification of findings.

``PROMPT_TEMPLATES`` holds (positive, negative) template pairs with a ``{finding}`` slot. The first
pair is the CT-CLIP style ``("{finding} is present.", "{finding} is not present.")``.

Casing: the finding's canonical name is lower-cased ("Pleural effusion" -> "pleural effusion",
"Lung Lesion" -> "lung lesion") and, when the slot opens the sentence, its first letter is
upper-cased ("Pleural effusion is present."). Lower-casing is skipped for words written fully in
capitals (abbreviations such as "CT").
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from medvl.data.entities import CT_RATE_FINDINGS

__all__ = ["PROMPT_TEMPLATES", "disease_prompts", "finding_text", "render", "sample_prompt"]

PROMPT_TEMPLATES: Tuple[Tuple[str, str], ...] = (
    ("{finding} is present.", "{finding} is not present."),
    ("There is {finding}.", "There is no {finding}."),
    ("Findings consistent with {finding}.", "No evidence of {finding}."),
    ("The scan shows {finding}.", "The scan shows no {finding}."),
    ("{finding} is seen.", "No {finding} is seen."),
)


def finding_text(finding: str) -> str:
    """The canonical name as it reads inside a sentence: lower case, abbreviations kept."""
    return " ".join(word if (word.isupper() and len(word) > 1) else word.lower() for word in finding.split())


def render(template: str, finding: str) -> str:
    """Fill ``template`` with ``finding``, capitalising it when it starts the sentence."""
    text = finding_text(finding)
    if template.startswith("{finding}"):
        text = text[:1].upper() + text[1:]
    return template.format(finding=text)


def disease_prompts(findings: Optional[Sequence[str]] = None,
                    templates: Optional[Sequence[Tuple[str, str]]] = None) -> Dict[str, Tuple[List[str], List[str]]]:
    """finding -> (positive prompts, negative prompts), one of each per template pair.

    ``findings`` defaults to ``CT_RATE_FINDINGS``; ``templates`` to ``PROMPT_TEMPLATES``.
    """
    findings = CT_RATE_FINDINGS if findings is None else tuple(findings)
    templates = PROMPT_TEMPLATES if templates is None else tuple(templates)
    if not templates:
        raise ValueError("templates must hold at least one (positive, negative) pair")
    for pair in templates:
        if len(pair) != 2 or any("{finding}" not in t for t in pair):
            raise ValueError(f"each template pair must be two strings with a {{finding}} slot, got {pair!r}")
    return {finding: ([render(p, finding) for p, _ in templates], [render(n, finding) for _, n in templates])
            for finding in findings}


def sample_prompt(finding: str, positive: bool, rng: np.random.Generator,
                  templates: Optional[Sequence[Tuple[str, str]]] = None) -> str:
    """One prompt for ``finding`` from a template pair drawn with ``rng`` (deterministic by seed)."""
    templates = PROMPT_TEMPLATES if templates is None else tuple(templates)
    if not templates:
        raise ValueError("templates must hold at least one (positive, negative) pair")
    pair = templates[int(rng.integers(len(templates)))]
    return render(pair[0] if positive else pair[1], finding)
