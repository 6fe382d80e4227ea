"""Training recipes: a named model / data / loss combination with defaults, and the loss it trains.

``create_loss(recipe)`` returns a :class:`RecipeLoss`; ``RecipeLoss(outputs, batch)`` returns
``{"loss": weighted total, <term>: unweighted value for every term whose weight is non-zero}``.
A RecipeLoss may own parameters (the prompt head and prompt scale of "siglip", the temperature of "mrclip"):
give ``loss_fn.parameters()`` to the optimiser along with the model's.

Keys read from ``outputs`` (what the model produced; B volume/report pairs, D the joint width):

    image_embeddings   (B, D) projected volume embeddings,      when the towers standardise
                       not standardised                        (``CLIPModel.standardizes``): see below
    text_embeddings    (B, D) the same for the reports         idem

    image_features     (B, D) normalised volume embeddings      every contrastive / triplet term
    text_features      (B, D) normalised report embeddings      every contrastive / triplet term, and
                                                                "report_prompts"
    logit_scale        scalar multiplier, already exp'd         "siglip", "siglip-label", "siglip-jaccard"
                                                                (the prompt terms have their own)
    logit_bias         scalar                                   the SigLIP losses
    volume_embeddings  (B, E) pooled volume features before     "prompts" (E = the head's input width,
                       the projection                           or D when the loss has no head)
    prompt_positive    (F, D) or (B, F, D) positive prompt      "prompts", "report_prompts" ((B, F, D):
                       embeddings                               each sample's own template variant)
    prompt_negative    (F, D) or (B, F, D), the negatives       "prompts", "report_prompts"
    depth_features     (B, n_z, E) per-depth volume features    "localization" (the encoder's
                       before the projection                    return_depth=True "depth")
    snippet_features   (B, D) embeddings of one report          "localization"
                       snippet per volume
    depth_mask         (B, n_z) bool valid depth bins           "localization" (optional: all valid)
    depth_target       (B,) long true bin, -1 none              "localization"

Keys read from ``batch`` (as :func:`medvl.data.collate` returns them):

    label              (B,) int64 category, -1 none             "mrclip" / "siglip-label"
    labels             (B, F) bool findings                     "prompts", "report_prompts" (all known) and
                                                                "siglip-jaccard"
    prompt_labels      (B, F) int in {1, 0, -1 unknown}         "prompts", "report_prompts", preferred over
                                                                "labels"
    entities           three (B, K) bool sets                   "medtrim"

``depth_mask``, ``depth_target`` and ``prompt_labels`` are looked up in ``outputs`` first, then in
``batch``. A term whose weight is non-zero and whose input is missing raises a KeyError naming the key.

RadFinder's prompt term ("prompts") scores each volume, through its own head, along each finding's prompt
direction (the positive prompt's embedding minus the negative's); "report_prompts" scores the paired reports along
the same directions with the same labels. The text tower otherwise learns those directions only from that
class-balanced BCE on volumes, and slowly: the prompts of a pair differ by one word ("not"), which mean pooling
adds alike to every finding, so after 500 steps of the tiny model the directions of different findings had a mean
cosine of 0.72 (consolidation and emphysema 0.97), and the zero-shot AUC stayed 0.13 below a linear probe on the
same volumes. A report names its findings and negates some absent ones in words, which is the signal the
directions lack. Measured 2026-12-06, RadFinder's seeds 0 / 1 on 512 held-out phantoms, zero-shot macro AUC: with
the prompt terms' own scale (``PROMPT_SCALE``) 0.737 / 0.651 without the term, 0.746 / 0.720 with it at weight 1,
0.765 / 0.691 at weight 3; with the contrastive term's scale 0.706 / 0.636 without it and 0.722 / 0.684 with it.

Standardisation across the batch (:mod:`medvl.nn.standardize`): when ``outputs`` holds
``image_embeddings`` / ``text_embeddings``, every term reads embeddings standardised with the statistics of
their own kind in this batch before normalising them: the volumes' for ``image_features``; the paired texts'
for ``text_features``; the snippets' for ``snippet_features`` (which then holds unstandardised projections);
and, for RadFinder's prompt head, the statistics of the head's projection of ``volume_embeddings``, for the
volumes and their ``depth_features`` alike. (``prompt_positive`` / ``prompt_negative`` come standardised with
the prompt set's statistics: :class:`medvl.train.radfinder_inputs.RadFinderInputs`.) The statistics are those
of the whole batch the loss sees: the joined micro-batches of a gradient-accumulation step and, with a process
group, every rank (all-reduced with gradient), so the guarantees of the losses hold unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

import torch.nn.functional as F

from medvl.data.sources import SYNTHETIC_SOURCES, synthetic_source
from medvl.nn.disease_prompt_loss import DiseasePromptLoss
from medvl.nn.localization_loss import LOCALIZATION_SIGMA_BINS, LocalizationLoss, center_depth
from medvl.nn.multi_positive_loss import MultiPositiveContrastiveLoss
from medvl.nn.sigmoid_loss import SigLIPLoss
from medvl.nn.standardize import FeatureStandardizer, batch_statistics, standardize
from medvl.nn.triplet_loss import MedTrimLoss
from medvl.options import look_up_option

__all__ = ["Recipe", "RECIPES", "LOSS_TERMS", "PROMPT_SCALE", "get_recipe", "create_loss", "RecipeLoss"]

# The terms each loss name computes, in order; a recipe's loss_weights has exactly these keys.
LOSS_TERMS: Dict[str, Tuple[str, ...]] = {
    "siglip": ("contrastive", "prompts", "report_prompts", "localization"),
    "mrclip": ("contrastive",),
    "siglip-label": ("contrastive",),
    "medtrim": MedTrimLoss.TERMS,
    "siglip-jaccard": ("contrastive",),
}

@dataclass(frozen=True)
class Recipe:
    """A named training setup. ``loss_weights`` maps every term of ``loss`` to its weight (0 turns it off);
    ``loss_options`` are keyword arguments of the loss (e.g. ``margin`` for "medtrim").

    ``lr`` / ``warmup_steps`` default to what the tiny model needs to move off the collapsed start within
    a few hundred CPU steps on new phantoms: with the siglip recipe, 5e-4 took the contrastive loss from the
    collapsed 3.74 to 3.47 in 300 steps of 16, where 2e-3 stayed at 3.75 and 2e-4 reached 3.61; the mrclip and
    medtrim recipes learn at 5e-4 as well (bench/results/reproduce-cpu-epyc-2core.txt). A ViT-B sized model
    wants about 1e-4 and a longer warmup (``--lr``, ``--warmup-steps``)."""

    name: str
    model: str
    data: str
    loss: str
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 20
    batch_size: int = 8
    steps: int = 1000
    loss_weights: Mapping[str, float] = field(default_factory=dict)
    loss_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.loss not in LOSS_TERMS:
            raise ValueError(f"recipe {self.name!r}: unknown loss {self.loss!r}; "
                             f"choose from {', '.join(map(repr, LOSS_TERMS))}")
        if self.data not in SYNTHETIC_SOURCES:
            raise ValueError(f"recipe {self.name!r}: unknown data {self.data!r}; "
                             f"choose from {', '.join(map(repr, SYNTHETIC_SOURCES))}")
        terms = LOSS_TERMS[self.loss]
        weights = dict(self.loss_weights) if self.loss_weights else {t: 1.0 for t in terms}
        unknown = sorted(set(weights) - set(terms))
        if unknown:
            raise ValueError(f"recipe {self.name!r}: loss {self.loss!r} has no term(s) {unknown}; "
                             f"its terms are {list(terms)}")
        weights = {t: float(weights.get(t, 1.0)) for t in terms}
        if not any(weights.values()):
            raise ValueError(f"recipe {self.name!r}: every loss weight is 0; keep at least one term")
        for key in ("lr", "weight_decay"):
            if getattr(self, key) < 0:
                raise ValueError(f"recipe {self.name!r}: {key} must be >= 0, got {getattr(self, key)}")
        for key in ("warmup_steps", "batch_size", "steps"):
            value, least = getattr(self, key), 0 if key == "warmup_steps" else 1
            if int(value) != value or value < least:
                raise ValueError(f"recipe {self.name!r}: {key} must be a positive integer, got {getattr(self, key)!r}")
        object.__setattr__(self, "loss_weights", weights)
        object.__setattr__(self, "loss_options", dict(self.loss_options))


# The prompt terms' own logit multiplier at the start (learnt; "prompt_scale" in loss_options). A finding's prompt
# logit is t * (cos(v, p+) - cos(v, p-)), and the two prompts of a pair lie close (|p+ - p-| of 0.25-1.1 for
# normalised prompts after training), so with the contrastive term's t (10 at the start, 8.5 after 500 steps) the
# logits stay within a few units, where the BCE's gradient (sigmoid(z) - y) is about the same for every sample: it
# keeps pulling the samples it already ranks right as hard as those it ranks wrong. With its own t from 30 (it
# settles near 27) the zero-shot AUC of
# RadFinder's seeds 0 / 1 went from 0.706 / 0.636 to 0.737 / 0.651, and with the report term from 0.722 / 0.684
# to 0.746 / 0.720 (512 held-out phantoms, 2026-12-06).
PROMPT_SCALE = 30.0

RECIPES: Dict[str, Recipe] = {
    # RadFinder: SigLIP pairs + disease-prompt supervision + intra-scan localization.
    "siglip": Recipe("siglip", model="vit3d-tiny", data=synthetic_source("ct"), loss="siglip",
                     loss_weights={"contrastive": 1.0, "prompts": 1.0, "report_prompts": 1.0, "localization": 1.0},
                     loss_options={"max_pos_weight": 20.0, "prompt_scale": PROMPT_SCALE, "temperature": 0.1,
                                   "sigma": LOCALIZATION_SIGMA_BINS}),
    # MR-CLIP: every text of the same contrast category is a positive. loss="siglip-label" swaps in
    # SigLIPLoss(target="label").
    "mrclip": Recipe("mrclip", model="vit3d-tiny", data=synthetic_source("mr"), loss="mrclip",
                     loss_weights={"contrastive": 1.0},
                     loss_options={"init_scale": 1.0 / 0.07, "max_scale": 100.0}),
    # MedTrim: four-direction triplet loss, triplets mined from entity scores (MedTrimLoss' entity weights and
    # score range, whose range reaches down to 0 so that unrelated reports are the negatives).
    "medtrim": Recipe("medtrim", model="vit3d-tiny", data=synthetic_source("ct"), loss="medtrim",
                      loss_weights={t: 1.0 for t in MedTrimLoss.TERMS}, loss_options={"margin": 0.3}),
    # Soft SigLIP: Jaccard targets between finding multi-hots.
    "soft": Recipe("soft", model="vit3d-tiny", data=synthetic_source("ct"), loss="siglip-jaccard",
                   loss_weights={"contrastive": 1.0}),
}

# Options each loss accepts (anything else in loss_options is an error at create_loss).
_OPTIONS = {
    "siglip": {"max_pos_weight", "prompt_scale", "temperature", "sigma", "reduction"},
    "mrclip": {"init_scale", "max_scale", "learn_scale"},
    "siglip-label": {"reduction"},
    "medtrim": {"margin", "distance", "entity_weights", "score_range", "reduction", "mining"},
    "siglip-jaccard": {"reduction"},
}


def get_recipe(name: str, **overrides) -> Recipe:
    """The recipe ``name`` with fields replaced by ``overrides``.

    ``loss_weights`` / ``loss_options`` overrides are merged into the recipe's. Changing ``loss``
    keeps the weights of the terms the new loss shares and gives its other terms weight 1, and
    drops options the new loss does not take.
    """
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; available: {', '.join(sorted(RECIPES))}")
    base = RECIPES[name]
    fields = {f.name for f in dataclasses.fields(Recipe)} - {"name"}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise TypeError(f"get_recipe({name!r}): unknown field(s) {bad}; valid: {sorted(fields)}")
    loss = overrides.get("loss", base.loss)
    look_up_option(loss, LOSS_TERMS, name=f"get_recipe({name!r}): loss")
    weights = {t: w for t, w in base.loss_weights.items() if t in LOSS_TERMS[loss]}
    weights.update(overrides.pop("loss_weights", {}) or {})
    options = {k: v for k, v in base.loss_options.items() if k in _OPTIONS[loss]}
    options.update(overrides.pop("loss_options", {}) or {})
    return dataclasses.replace(base, loss_weights=weights, loss_options=options, **overrides)


def _need(key: str, term: str, *sources: Mapping) -> Any:
    for source in sources:
        if source is not None and source.get(key) is not None:
            return source[key]
    raise KeyError(f"loss term {term!r} needs {key!r}, which is missing (set its weight to 0 to switch it off)")


def _optional(key: str, *sources: Mapping) -> Any:
    for source in sources:
        if source is not None and source.get(key) is not None:
            return source[key]
    return None


class RecipeLoss(nn.Module):
    """The weighted loss of a recipe; see the module docstring for the keys of ``outputs`` and ``batch``."""

    def __init__(self, recipe: Recipe, *, embed_dim: Optional[int] = None, proj_dim: Optional[int] = None,
                 group=None):
        super().__init__()
        self.recipe, self.weights = recipe, dict(recipe.loss_weights)
        options = dict(recipe.loss_options)
        bad = sorted(set(options) - _OPTIONS[recipe.loss])
        if bad:
            raise ValueError(f"recipe {recipe.name!r}: loss {recipe.loss!r} takes no option(s) {bad}; "
                             f"valid: {sorted(_OPTIONS[recipe.loss])}")
        kind = recipe.loss
        # the process group of the standardisation statistics: the contrastive term's (MedTrim mines locally)
        self.group = group
        if kind == "siglip":
            self.contrastive = SigLIPLoss(target="pair", group=group,
                                          **({"reduction": options["reduction"]} if "reduction" in options else {}))
            max_pos_weight = options.get("max_pos_weight", 20.0)
            self.prompts = DiseasePromptLoss(embed_dim, proj_dim, max_pos_weight=max_pos_weight, group=group)
            # The same prompt term on the paired reports (no head: they are already in the text space). A report
            # states its findings and negates some absent ones, so it teaches the text tower what each finding's
            # prompt pair differs by; without it the pairs of different findings differ mostly by "not" (module
            # docstring).
            self.report_prompts = DiseasePromptLoss(max_pos_weight=max_pos_weight, group=group)
            prompt_scale = float(options.get("prompt_scale", PROMPT_SCALE))
            if not (math.isfinite(prompt_scale) and prompt_scale > 0):
                raise ValueError(f"recipe {recipe.name!r}: loss option prompt_scale must be a finite number > 0 (the "
                                 f"prompt terms' starting logit multiplier, default {PROMPT_SCALE}), got {prompt_scale}")
            # both prompt terms' multiplier, learnt (see PROMPT_SCALE)
            self.prompt_log_scale = nn.Parameter(torch.tensor(math.log(prompt_scale)))
            # the stored statistics of the head's projection, for evaluation (calibrated with the towers')
            self.prompt_standardizer = None if proj_dim is None or embed_dim is None else FeatureStandardizer(proj_dim)
            self.localization = LocalizationLoss(temperature=options.get("temperature", 0.1),
                                                 sigma=options.get("sigma", LOCALIZATION_SIGMA_BINS), group=group)
        elif kind == "mrclip":
            self.contrastive = MultiPositiveContrastiveLoss(group=group, **options)
        elif kind in ("siglip-label", "siglip-jaccard"):
            self.contrastive = SigLIPLoss(target="label" if kind == "siglip-label" else "jaccard", group=group,
                                          **options)
        elif kind == "medtrim":
            if group is not None:
                raise ValueError("recipe 'medtrim': MedTrimLoss mines within the local batch; no process group")
            self.triplet = MedTrimLoss(weights=tuple(self.weights[t] for t in MedTrimLoss.TERMS), **options)

    def extra_repr(self) -> str:
        return f"recipe={self.recipe.name!r}, loss={self.recipe.loss!r}, weights={self.weights}"

    def _standardized(self, outputs: Mapping[str, Any]) -> Mapping[str, Any]:
        """``outputs`` with the features the terms read standardised over this batch (module docstring)."""
        image, text = outputs.get("image_embeddings"), outputs.get("text_embeddings")
        if image is None and text is None:
            return outputs
        out = dict(outputs)
        if image is not None:
            out["image_features"] = F.normalize(standardize(image, *batch_statistics(image, self.group)), dim=-1)
        if text is not None:
            out["text_features"] = F.normalize(standardize(text, *batch_statistics(text, self.group)), dim=-1)
        snippets = outputs.get("snippet_features")
        if snippets is not None:  # unstandardised here; the term normalises
            out["snippet_features"] = standardize(snippets, *batch_statistics(snippets, self.group))
        return out

    def forward(self, outputs: Mapping[str, Any], batch: Optional[Mapping[str, Any]] = None) -> Dict[str, torch.Tensor]:
        batch = batch or {}
        kind, w = self.recipe.loss, self.weights
        standardizing = outputs.get("image_embeddings") is not None
        outputs = self._standardized(outputs)
        terms: Dict[str, torch.Tensor] = {}
        if kind == "medtrim":
            parts = self.triplet(_need("image_features", "medtrim", outputs),
                                 _need("text_features", "medtrim", outputs),
                                 tuple(_need("entities", "medtrim", batch)), output_dict=True)
            terms = {t: parts[t] for t in MedTrimLoss.TERMS if w[t]}
            return {"loss": parts["loss"], **terms}
        if w.get("contrastive"):
            image = _need("image_features", "contrastive", outputs)
            text = _need("text_features", "contrastive", outputs)
            if kind == "mrclip":
                terms["contrastive"] = self.contrastive(image, text, _need("label", "contrastive", batch))
            else:
                scale = _need("logit_scale", "contrastive", outputs)
                bias = _need("logit_bias", "contrastive", outputs)
                labels = {}
                if kind == "siglip-label":
                    labels["image_labels"] = _need("label", "contrastive", batch)
                elif kind == "siglip-jaccard":
                    labels["image_labels"] = _need("labels", "contrastive", batch)
                terms["contrastive"] = self.contrastive(image, text, scale, bias, **labels)
        head_statistics = None
        if kind == "siglip" and standardizing and (w.get("prompts") or w.get("localization")):
            volume_side = self.prompts.project(_need("volume_embeddings", "prompts/localization", outputs))
            head_statistics = batch_statistics(volume_side, self.group)
        if kind == "siglip":
            # the same prompt pairs, labels and scale; the volumes through the head, the reports as they are
            prompt_terms = {"prompts": (self.prompts, "volume_embeddings", {"statistics": head_statistics}),
                            "report_prompts": (self.report_prompts, "text_features", {})}
            for term, (loss, scored, extra) in prompt_terms.items():
                if not w.get(term):
                    continue
                labels = _optional("prompt_labels", outputs, batch)
                if labels is None:
                    labels = _need("labels", term, batch).long()     # bool findings: all known
                terms[term] = loss(_need(scored, term, outputs), _need("prompt_positive", term, outputs),
                                   _need("prompt_negative", term, outputs), labels, self.prompt_log_scale.exp(),
                                   **extra)
        if kind == "siglip" and w.get("localization"):
            depth = self.prompts.project(_need("depth_features", "localization", outputs))
            if head_statistics is not None:
                # Which depth of its own volume a snippet describes depends only on how the depth features
                # differ along the volume: each volume's mean over its valid depth bins is removed (a part
                # all bins share, which would otherwise dominate every cosine), the head's scale kept.
                depth = standardize(depth, *head_statistics)
                depth = center_depth(depth, _optional("depth_mask", outputs, batch))
            terms["localization"] = self.localization(
                _need("snippet_features", "localization", outputs), depth,
                _need("depth_target", "localization", outputs, batch),
                _optional("depth_mask", outputs, batch))
        total = sum(w[name] * value for name, value in terms.items())
        return {"loss": total, **terms}


def create_loss(recipe, *, embed_dim: Optional[int] = None, proj_dim: Optional[int] = None, group=None) -> RecipeLoss:
    """The :class:`RecipeLoss` of ``recipe`` (a Recipe or a recipe name).

    ``embed_dim`` / ``proj_dim``: the in / out widths of the image projection; with both, the
    "siglip" prompt term owns a bias-free head of that shape (copy the CLIP projection into it with
    ``loss_fn.prompts.init_from(model.visual.proj)``), applied to ``volume_embeddings`` and
    ``depth_features``; without, those outputs must already be in the joint space. ``group``: the
    process group of the contrastive term (SigLIP / MR-CLIP).
    """
    if isinstance(recipe, str):
        recipe = get_recipe(recipe)
    if not isinstance(recipe, Recipe):
        raise TypeError(f"create_loss expects a Recipe or a recipe name, got {type(recipe).__name__}")
    return RecipeLoss(recipe, embed_dim=embed_dim, proj_dim=proj_dim, group=group)
