"""The stored statistics of the towers' standardisation, measured before a checkpoint is saved.

Training standardises the projected embeddings with the statistics of each batch (``medvl.train.recipes``);
evaluation, which encodes one volume or sentence at a time, needs fixed ones. They are measured here on
training samples encoded with the weights being saved: the population statistics of the final model
("precise BatchNorm", Wu & Johnson 2021), not a moving average of batches encoded by older weights. The
volumes' statistics go to ``model.visual.standardizer``; each kind of text's to
``model.text.standardizers[kind]`` (the paired texts and the report snippets of the same samples, and the
prompt set, which training standardises with its own statistics at every step); those of RadFinder's prompt
head, applied to the same volumes, to ``loss_fn.prompt_standardizer``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["CALIBRATION_SAMPLES", "calibrate_standardizers"]

# Training samples the stored statistics are measured on.
CALIBRATION_SAMPLES = 256


@torch.no_grad()
def calibrate_standardizers(model, loss_fn, dataset, *, device, n: int = CALIBRATION_SAMPLES,
                            batch_size: int = 16, autocast_dtype: Optional[torch.dtype] = None,
                            prompts: Optional[Sequence[str]] = None) -> int:
    """Measure and store the standardisation statistics of ``model`` (and of ``loss_fn``'s prompt head) on the
    first ``n`` samples of ``dataset`` and, for the "prompt" kind, on ``prompts`` (the set the run encodes);
    returns how many samples were used (0: the model does not standardise). The model's train/eval mode is
    restored; no random number is drawn."""
    from medvl.data import collate

    if not getattr(model, "standardizes", False):
        return 0
    count = min(int(n), len(dataset))
    if count < 2:
        raise ValueError(f"calibrate_standardizers: need at least 2 samples, the dataset holds {len(dataset)}")
    head = getattr(loss_fn, "prompts", None)
    head_standardizer = getattr(loss_fn, "prompt_standardizer", None)
    was_training = model.training
    model.eval()
    images, heads = [], []
    texts: Dict[str, List[torch.Tensor]] = {"text": [], "snippet": [], "prompt": []}
    enabled = autocast_dtype is not None
    try:
        for start in range(0, count, batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, count))])
            volume = batch["volume"].to(device)
            snippets = [s["text"] for meta in batch["meta"] for s in (meta.get("snippets") or [])]
            with torch.autocast(volume.device.type, dtype=autocast_dtype, enabled=enabled):
                visual = model.visual(volume)
                texts["text"].append(model.text(batch["text"])["projected"].float())
                if snippets:
                    texts["snippet"].append(model.text(snippets, kind="snippet")["projected"].float())
            images.append(visual["projected"].float())
            if head_standardizer is not None:
                heads.append(head.project(visual["pooled"].float()))
        if prompts:
            with torch.autocast(device.type if isinstance(device, torch.device) else str(device).split(":")[0],
                                dtype=autocast_dtype, enabled=enabled):
                texts["prompt"].append(model.text(list(prompts), kind="prompt")["projected"].float())
    finally:
        model.train(was_training)
    model.visual.standardizer.calibrate(torch.cat(images))
    for kind, rows in texts.items():
        rows = torch.cat(rows) if rows else None
        if rows is not None and rows.shape[0] >= 2:  # a kind the run never encodes keeps no statistics
            model.text.standardizers[kind].calibrate(rows)
    if head_standardizer is not None:
        head_standardizer.calibrate(torch.cat(heads))
    return count
