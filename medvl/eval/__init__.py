"""Evaluation layer: metric functions on embeddings and scores (retrieval, P@R, zero-shot AUC,
localization, quality control), linear / few-shot probes, the evaluation tasks (one module each under
:mod:`medvl.eval.tasks`) that run a trained model over held-out data through an embedding cache,
:func:`evaluate` and its report (``medvl eval``), and the DICOM header QC of ``medvl qc``."""

from medvl.eval.cache import CachedEncoder, EmbeddingCache, VolumeEmbeddings, model_fingerprint
from medvl.eval.eval_set import EvalSet
from medvl.eval.evaluation import DEFAULT_EVAL_SEED, evaluate
from medvl.eval.metrics import (cosine_distance, localization_metrics, precision_at_r, predict_depth,
                                prompt_separation, qc_auc, retrieval_metrics, zero_shot_auc, zero_shot_scores)
from medvl.eval.probe import draw_shots, few_shot, linear_probe, stratified_halves
from medvl.eval.qc import REQUIRED_MR_TAGS, SEQUENCE_RANGES, find_series_folders, metadata_issues, qc_dicom, \
    sequence_family
from medvl.eval.report import format_report
from medvl.eval.tasks import TASK_KINDS, TASKS, NotEnoughData, Task, parse_tasks, task_requirement
from medvl.eval.tasks.collapse import collapse_task
from medvl.eval.tasks.fewshot import fewshot_task
from medvl.eval.tasks.localization import localization_task
from medvl.eval.tasks.precision import precision_task
from medvl.eval.tasks.probe import probe_task
from medvl.eval.tasks.qc import qc_task
from medvl.eval.tasks.retrieval import retrieval_task
from medvl.eval.tasks.zeroshot import zeroshot_task

__all__ = ["CachedEncoder", "DEFAULT_EVAL_SEED", "EmbeddingCache", "EvalSet", "NotEnoughData", "REQUIRED_MR_TAGS",
           "SEQUENCE_RANGES", "TASKS", "TASK_KINDS", "Task", "VolumeEmbeddings", "collapse_task", "cosine_distance",
           "draw_shots", "evaluate", "few_shot", "fewshot_task", "find_series_folders", "format_report",
           "linear_probe", "localization_metrics", "localization_task", "metadata_issues", "model_fingerprint",
           "parse_tasks", "precision_at_r", "precision_task", "predict_depth", "probe_task", "prompt_separation",
           "qc_auc", "qc_dicom",
           "qc_task", "retrieval_metrics", "retrieval_task", "sequence_family", "stratified_halves",
           "task_requirement", "zero_shot_auc", "zero_shot_scores", "zeroshot_task"]
