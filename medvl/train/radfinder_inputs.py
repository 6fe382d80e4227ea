"""The side inputs of RadFinder's prompt and localization terms, drawn per step from a batch.

* Disease prompts: every (positive, negative) template pair of :data:`medvl.data.PROMPT_TEMPLATES`
  for every finding is encoded once per step (T·F·2 short sentences); each sample then uses the pair of
  one template drawn for it, so the volume side sees a different wording per sample, as RadFinder draws
  a variant per sample. ``prompt_positive`` / ``prompt_negative`` come out (B, F, D).
* Localization: each sample draws one of its report snippets (``meta["snippets"]``: the sentence of
  one finding with its image reference removed and the finding's index along the volume's last axis
  Z); the target is the depth bin ``depth_index // patch_z`` of the volume tower's per-depth
  features. A sample without snippets gets target -1 (skipped by the loss).

Each sample's draws come from a generator seeded by (seed, step, the sample's dataset index), so they
do not depend on how the step's samples are split into micro-batches or ranks, and a resumed run
draws what an uninterrupted one would.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from medvl.data.prompts import PROMPT_TEMPLATES, render
from medvl.nn.standardize import batch_statistics, standardize

__all__ = ["RadFinderInputs"]


class RadFinderInputs:
    """Builds ``extra_texts`` for :meth:`medvl.models.CLIPModel.forward` and the loss outputs from its result.

    Args:
        findings: the names of the label columns, in order (the phantoms' ``CT_FINDINGS``).
        patch_z: the volume tower's patch size along Z (one depth bin per axial patch row).
        prompts, localization: which terms are on.
        seed: the run's seed.
    """

    def __init__(self, findings: Sequence[str], patch_z: int, *, prompts: bool, localization: bool, seed: int = 0,
                 templates=PROMPT_TEMPLATES):
        self.findings, self.patch_z = list(findings), int(patch_z)
        self.prompts, self.localization, self.seed = bool(prompts), bool(localization), int(seed)
        self.templates = tuple(templates)
        # order: template-major, then positive/negative, then finding -> reshape (T, 2, F)
        self.prompt_texts: List[str] = [render(pair[side], f) for pair in self.templates for side in (0, 1)
                                        for f in self.findings]

    @property
    def needs_depth(self) -> bool:
        return self.prompts or self.localization

    def _generator(self, step: int, index: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step * 7_919 + index * 104_729 + 17) % 2 ** 63)

    def prepare(self, batch: Dict[str, Any], step: int) -> Dict[str, Any]:
        """Adds ``prompt_template`` (B,), ``snippet_text`` (list) and ``depth_target`` (B,) to ``batch``."""
        batch = dict(batch)
        rows = batch["volume"].shape[0]
        metas = batch.get("meta") or [{"index": i} for i in range(rows)]
        generators = [self._generator(step, int(meta.get("index", i))) for i, meta in enumerate(metas)]
        if self.prompts:
            if batch.get("labels") is None:
                raise KeyError("the prompt term needs finding labels in the batch (a 'labels' column)")
            if batch["labels"].shape[1] != len(self.findings):
                raise ValueError(f"the batch has {batch['labels'].shape[1]} finding labels, the prompts "
                                 f"{len(self.findings)} findings")
            batch["prompt_template"] = torch.tensor(
                [int(torch.randint(len(self.templates), (1,), generator=g)) for g in generators], dtype=torch.long)
        if self.localization:
            n_z = batch["volume"].shape[-1] // self.patch_z
            texts, targets = [], []
            for meta, generator in zip(metas, generators):
                snippets = list(meta.get("snippets") or [])
                if not snippets:
                    texts.append("")
                    targets.append(-1)
                    continue
                pick = snippets[int(torch.randint(len(snippets), (1,), generator=generator))]
                texts.append(pick["text"])
                targets.append(min(int(pick["depth_index"]) // self.patch_z, n_z - 1))
            batch["snippet_text"] = texts
            batch["depth_target"] = torch.tensor(targets, dtype=torch.long)
        return batch

    def extra_texts(self, batch: Mapping[str, Any]) -> Dict[str, List[str]]:
        texts: Dict[str, List[str]] = {}
        if self.prompts:
            texts["prompt"] = self.prompt_texts
        if self.localization:
            texts["snippet"] = list(batch["snippet_text"])
        return texts

    def loss_outputs(self, outputs: Dict[str, Any], batch: Mapping[str, Any]) -> Dict[str, Any]:
        """``outputs`` with the per-sample prompt pairs, snippet features and depth targets the loss reads.
        When the model standardises (it gives ``*_embeddings``): the prompt pairs standardised with the prompt
        set's statistics, the snippets unstandardised (the loss standardises them)."""
        outputs = dict(outputs)
        # A model that standardises hands over the unstandardised projections too. The prompts are one fixed set
        # encoded whole at every step, so its statistics are the set's own, the same on every rank and in every
        # micro-batch and at evaluation (the stored "prompt" statistics are measured on this set): they
        # standardise it here, before each sample draws its template. The snippets are per sample: the loss
        # standardises them with the statistics of the batch's snippets (medvl.train.recipes).
        raw = outputs.get("prompt_embeddings") is not None or outputs.get("snippet_embeddings") is not None
        if self.prompts:
            encoded = outputs.pop("prompt_embeddings") if raw else outputs["prompt_features"]
            outputs.pop("prompt_features")
            if raw:
                encoded = standardize(encoded, *batch_statistics(encoded))
            table = encoded.reshape(len(self.templates), 2, len(self.findings), encoded.shape[-1])
            chosen = table[batch["prompt_template"].to(encoded.device)]                # (B, 2, F, D)
            outputs["prompt_positive"], outputs["prompt_negative"] = chosen[:, 0], chosen[:, 1]
        if self.localization:
            if raw:
                outputs["snippet_features"] = outputs.pop("snippet_embeddings")
            outputs["depth_target"] = batch["depth_target"].to(outputs["image_features"].device)
        return outputs


def joined_side_inputs(batches: Sequence[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
    """The RadFinder keys of several micro-batches joined (for the accumulated loss)."""
    out: Dict[str, Any] = {}
    for key in ("prompt_template", "depth_target"):
        if batches[0].get(key) is not None:
            out[key] = torch.cat([b[key] for b in batches])
    if batches[0].get("snippet_text") is not None:
        out["snippet_text"] = [t for b in batches for t in b["snippet_text"]]
    return out
