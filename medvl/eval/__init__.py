"""Evaluation layer: metric functions on embeddings and scores (retrieval, P@R, zero-shot AUC,
localization, quality control) and linear / few-shot probes. Pure functions, no model code."""

from medvl.eval.metrics import (cosine_distance, localization_metrics, precision_at_r, predict_depth, qc_auc,
                                retrieval_metrics, zero_shot_auc, zero_shot_scores)
from medvl.eval.probe import draw_shots, few_shot, linear_probe

__all__ = ["cosine_distance", "draw_shots", "few_shot", "linear_probe", "localization_metrics", "precision_at_r",
           "predict_depth", "qc_auc", "retrieval_metrics", "zero_shot_auc", "zero_shot_scores"]
