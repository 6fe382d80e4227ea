"""The stored statistics of the towers' standardisation, measured before a checkpoint is saved.

Training standardises the projected embeddings with the statistics of each batch (``medvl.train.recipes``);
evaluation, which encodes one volume or sentence at a time, needs fixed ones. They are measured here on
training samples encoded with the weights being saved: the population statistics of the final model
("precise BatchNorm", Wu & Johnson 2021), not a moving average of batches encoded by older weights. The
volumes' statistics go to ``model.visual.standardizer``, the reports' to ``model.text.standardizer`` (every
text, prompts and snippets included, is standardised with them, as in training), and those of RadFinder's
prompt head, applied to the same volumes, to ``loss_fn.prompt_standardizer``.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["CALIBRATION_SAMPLES", "calibrate_standardizers"]

# Training samples the stored statistics are measured on.
CALIBRATION_SAMPLES = 256


@torch.no_grad()
def calibrate_standardizers(model, loss_fn, dataset, *, device, n: int = CALIBRATION_SAMPLES,
                            batch_size: int = 16, autocast_dtype: Optional[torch.dtype] = None) -> int:
    """Measure and store the standardisation statistics of ``model`` (and of ``loss_fn``'s prompt head) on the
    first ``n`` samples of ``dataset``; returns how many samples were used (0: the model does not
    standardise). The model's train/eval mode is restored; no random number is drawn."""
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
    images, texts, heads = [], [], []
    try:
        for start in range(0, count, batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, count))])
            volume = batch["volume"].to(device)
            with torch.autocast(volume.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                visual = model.visual(volume)
                text = model.text(batch["text"])
            images.append(visual["projected"].float())
            texts.append(text["projected"].float())
            if head_standardizer is not None:
                heads.append(head.project(visual["pooled"].float()))
    finally:
        model.train(was_training)
    model.visual.standardizer.calibrate(torch.cat(images))
    model.text.standardizer.calibrate(torch.cat(texts))
    if head_standardizer is not None:
        head_standardizer.calibrate(torch.cat(heads))
    return count
