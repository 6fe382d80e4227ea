"""Evaluation layer: metric functions on embeddings and scores (retrieval, P@R, zero-shot AUC,
localization, quality control), linear / few-shot probes, the evaluation tasks that run a trained
model over held-out data through an embedding cache, and :func:`evaluate` (``medvl eval``)."""

from medvl.eval.cache import CachedEncoder, EmbeddingCache, VolumeEmbeddings, model_fingerprint
from medvl.eval.metrics import (cosine_distance, localization_metrics, precision_at_r, predict_depth, qc_auc,
                                retrieval_metrics, zero_shot_auc, zero_shot_scores)
from medvl.eval.probe import draw_shots, few_shot, linear_probe
from medvl.eval.tasks import (TASKS, EvalSet, evaluate, fewshot_task, localization_task, metadata_issues,
                              precision_task, probe_task, qc_dicom, qc_task, retrieval_task, zeroshot_task)

__all__ = ["CachedEncoder", "EmbeddingCache", "EvalSet", "TASKS", "VolumeEmbeddings", "cosine_distance", "draw_shots",
           "evaluate", "few_shot", "fewshot_task", "linear_probe", "localization_metrics", "localization_task",
           "metadata_issues", "model_fingerprint", "precision_at_r", "precision_task", "predict_depth", "probe_task",
           "qc_auc", "qc_dicom", "qc_task", "retrieval_metrics", "retrieval_task", "zero_shot_auc", "zero_shot_scores",
           "zeroshot_task"]
