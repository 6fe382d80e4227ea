import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medvl.data.entities import (ADJECTIVES, CHEXPERT_FINDINGS, CT_RATE_FINDINGS, DIRECTIONS, DISEASES, Entities,
                                 entities_to_multihot, extract_entities, load_ontology)
from medvl.data.prompts import PROMPT_TEMPLATES, disease_prompts, sample_prompt

EVAL_SET = Path(__file__).with_name("report_eval_set.json")
KINDS = ("diseases", "adjectives", "directions")
# Micro precision / recall reached on report_eval_set.json, minus a small margin.
BOUNDS = {"diseases": (0.97, 0.96), "adjectives": (0.95, 0.91), "directions": (0.97, 0.96)}


def _scores():
    sentences = json.loads(EVAL_SET.read_text())["sentences"]
    counts = {kind: [0, 0, 0] for kind in KINDS}
    for sentence in sentences:
        found = extract_entities(sentence["text"])
        for kind in KINDS:
            got = {name.lower() for name in getattr(found, kind)}
            expected = {name.lower() for name in sentence[kind]}
            counts[kind][0] += len(got & expected)
            counts[kind][1] += len(got - expected)
            counts[kind][2] += len(expected - got)
    return len(sentences), {kind: (tp / max(tp + fp, 1), tp / max(tp + fn, 1)) for kind, (tp, fp, fn) in counts.items()}


def test_eval_set_precision_recall():
    n, scores = _scores()
    assert n >= 80
    for kind, (precision, recall) in scores.items():
        print(f"{kind}: precision {precision:.3f} recall {recall:.3f} over {n} sentences")
        low_p, low_r = BOUNDS[kind]
        assert precision >= low_p, (kind, precision)
        assert recall >= low_r, (kind, recall)


def test_eval_set_names_are_canonical():
    vocab = {"diseases": DISEASES, "adjectives": ADJECTIVES, "directions": DIRECTIONS}
    for sentence in json.loads(EVAL_SET.read_text())["sentences"]:
        for kind in KINDS:
            lowered = {name.lower() for name in vocab[kind]}
            assert all(name.lower() in lowered for name in sentence[kind]), (sentence["text"], kind)


def test_vocabulary_is_union_of_ct_rate_and_chexpert():
    assert len(CT_RATE_FINDINGS) == 18 and len(CHEXPERT_FINDINGS) == 14
    assert DISEASES[:18] == CT_RATE_FINDINGS
    lowered = [name.lower() for name in DISEASES]
    assert len(set(lowered)) == len(lowered)
    assert set(lowered) == {name.lower() for name in CT_RATE_FINDINGS + CHEXPERT_FINDINGS}
    assert len(DISEASES) == 27
    for shared in ("Cardiomegaly", "Consolidation", "Atelectasis", "Lung opacity", "Pleural effusion"):
        assert shared in DISEASES


@pytest.mark.parametrize("finding", sorted(set(CT_RATE_FINDINGS + CHEXPERT_FINDINGS)))
def test_every_class_has_a_surface_form_that_maps_back(finding):
    ontology = load_ontology()
    canonical = ontology.canonical("disease", finding)
    forms = ontology.diseases[canonical]
    assert forms
    hits = [form for form in forms if canonical in extract_entities(form + ".").diseases]
    assert hits, finding


def test_negation_lists_and_clause_break():
    e = extract_entities("No pleural effusion, pneumothorax or consolidation, but mild bibasilar atelectasis.")
    assert e.diseases == ("Atelectasis",)
    assert e.negated == ("Consolidation", "Pleural effusion", "Pneumothorax")
    assert e.adjectives == ("mild",) and e.directions == ("basal", "bilateral")


@pytest.mark.parametrize("text", [
    "No evidence of pneumothorax.", "Without pneumothorax.", "Negative for pneumothorax.",
    "The pleural spaces are free of pneumothorax.", "Pneumothorax is not seen.", "The pneumothorax has resolved.",
    "Absence of pneumothorax.", "Pneumothorax was excluded.", "No signs of pneumothorax.",
])
def test_negation_cues(text):
    e = extract_entities(text)
    assert e.diseases == () and e.negated == ("Pneumothorax",)


def test_negated_clause_drops_adjectives_and_directions():
    e = extract_entities("Small nodule in the RUL and no large left effusion.")
    assert e.diseases == ("Lung nodule",)
    assert e.adjectives == ("small",)
    assert e.directions == ("right", "upper lobe")
    assert e.negated == ("Pleural effusion",)
    assert extract_entities("No large left pleural effusion.") == Entities(negated=("Pleural effusion",))


def test_pseudo_negation_and_affirmed_wins():
    assert extract_entities("No change in the small right pleural effusion.").diseases == ("Pleural effusion",)
    e = extract_entities("No pleural effusion on the left. Small right pleural effusion.")
    assert e.diseases == ("Pleural effusion",) and e.negated == ()


def test_uncertainty_policy():
    text = "Possible pneumonia in the left lower lobe. No pneumothorax."
    positive = extract_entities(text)
    assert positive.diseases == ("Pneumonia",) and positive.uncertain == ("Pneumonia",)
    assert positive.directions == ("left", "lower lobe")
    negative = extract_entities(text, uncertain="negative")
    assert negative.diseases == () and negative.negated == ("Pneumonia", "Pneumothorax")
    assert negative.directions == ()
    ignore = extract_entities(text, uncertain="ignore")
    assert ignore.diseases == () and ignore.negated == ("Pneumothorax",) and ignore.uncertain == ("Pneumonia",)
    assert extract_entities("Atelectasis cannot be excluded.").uncertain == ("Atelectasis",)
    with pytest.raises(ValueError):
        extract_entities(text, uncertain="maybe")


def test_nearest_cue_decides():
    e = extract_entities("Possible atelectasis, no pneumonia.")
    assert e.diseases == ("Atelectasis",) and e.uncertain == ("Atelectasis",) and e.negated == ("Pneumonia",)


def test_longest_match_first():
    assert extract_entities("Pericardial effusion.").diseases == ("Pericardial effusion",)
    assert extract_entities("Coronary artery calcification.").diseases == ("Coronary artery wall calcification",)
    assert extract_entities("Pleural thickening.").diseases == ("Pleural Other",)
    e = extract_entities("Ground-glass   OPACITIES in the right upper lobe.")
    assert e.diseases == ("Lung opacity",) and e.directions == ("right", "upper lobe")


@pytest.mark.parametrize("abbreviation, expected", [
    ("RUL", ("right", "upper lobe")), ("RML", ("middle lobe", "right")), ("RLL", ("lower lobe", "right")),
    ("LUL", ("left", "upper lobe")), ("LLL", ("left", "lower lobe")), ("lingula", ("left", "lingula")),
    ("bibasilar", ("basal", "bilateral")),
])
def test_lobe_abbreviations(abbreviation, expected):
    assert extract_entities(f"Consolidation in the {abbreviation}.").directions == expected


def test_no_finding_and_devices():
    assert extract_entities("No acute cardiopulmonary process.").diseases == ("No Finding",)
    assert extract_entities("No acute cardiopulmonary process. Mild cardiomegaly.").diseases == ("Cardiomegaly",)
    devices = extract_entities("Endotracheal tube in place. No acute cardiopulmonary process.")
    assert devices.diseases == ("Medical material", "No Finding", "Support Devices")


def test_to_multihot_shapes_and_vocabularies():
    e = extract_entities("Moderate left pleural effusion and patchy RLL consolidation.")
    disease, adjective, direction = e.to_multihot()
    for tensor, vocab, names in ((disease, DISEASES, e.diseases), (adjective, ADJECTIVES, e.adjectives),
                                 (direction, DIRECTIONS, e.directions)):
        assert tensor.dtype == torch.bool and tensor.shape == (len(vocab),)
        assert {vocab[i] for i in tensor.nonzero().flatten().tolist()} == set(names)
    narrow, _, _ = e.to_multihot((CT_RATE_FINDINGS, ADJECTIVES, DIRECTIONS))
    assert narrow.shape == (18,) and narrow.sum() == 2


def test_entities_to_multihot_feeds_triplet_mining():
    import medvl

    reports = ["Small nodule in the RUL.", "Small nodule in the LLL.", "Large right pleural effusion.",
               "Moderate left pleural effusion.", "Mild cardiomegaly.", "No acute cardiopulmonary process."]
    batch = entities_to_multihot([extract_entities(r) for r in reports])
    assert [t.shape for t in batch] == [(6, len(DISEASES)), (6, len(ADJECTIVES)), (6, len(DIRECTIONS))]
    assert all(t.dtype == torch.bool for t in batch)
    empty = entities_to_multihot([])
    assert [t.shape[0] for t in empty] == [0, 0, 0]
    emb = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    triplets = medvl.triplet_mining(emb, strategy="entities", entities=batch)
    anchor = triplets[0]
    assert anchor.dtype == torch.int64


def test_prompt_templates():
    assert PROMPT_TEMPLATES[0] == ("{finding} is present.", "{finding} is not present.")
    prompts = disease_prompts()
    assert list(prompts) == list(CT_RATE_FINDINGS)
    positive, negative = prompts["Pleural effusion"]
    assert positive[0] == "Pleural effusion is present." and negative[0] == "Pleural effusion is not present."
    assert "There is no pleural effusion." in negative
    assert len(positive) == len(negative) == len(PROMPT_TEMPLATES)
    custom = disease_prompts(["Lung Lesion"], [("A {finding}.", "No {finding}.")])
    assert custom == {"Lung Lesion": (["A lung lesion."], ["No lung lesion."])}


def test_sample_prompt_is_deterministic():
    draw = lambda seed: [sample_prompt("Emphysema", i % 2 == 0, np.random.default_rng(seed)) for i in range(20)]
    assert draw(3) == draw(3)
    rng = np.random.default_rng(0)
    many = {sample_prompt("Emphysema", True, rng) for _ in range(200)}
    assert many == set(disease_prompts(["Emphysema"])["Emphysema"][0])
