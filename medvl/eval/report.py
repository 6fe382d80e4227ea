"""The markdown report of :func:`~medvl.eval.evaluation.evaluate`'s result (``report.md``, and what ``medvl eval``
prints): a header, the collapse diagnostics, a section per task (each task's own ``report``), the skipped tasks
with the reason, and the figures."""

from __future__ import annotations

import os
from typing import Any, List, Mapping

from medvl.eval.markdown import fmt, json_block
from medvl.eval.tasks import TASKS

__all__ = ["format_report"]


def _collapse_lines(summary: Mapping[str, Any]) -> List[str]:
    """The report's collapse section: this evaluation's held-out measures, the training run's diagnostics, and
    a warning line for each sign of collapse."""
    spread, training = summary["results"].get("collapse"), summary.get("training_diagnostics")
    if spread is None and training is None:
        return []
    lines, warnings = ["## collapse diagnostics", ""], []
    if spread is not None:
        text = spread.get("text_offdiagonal_cosine") or {}
        lines.append(f"- these {spread['n']} samples: mean cosine between two volumes "
                     f"{fmt(spread['image_offdiagonal_cosine']['mean'])}, between two different texts "
                     f"{fmt(text.get('mean'))} (collapsed above {spread['threshold']}); a volume with its own text "
                     f"{fmt(spread.get('matched_cosine'))}, with the others {fmt(spread.get('unmatched_cosine'))}")
        if spread["collapsed"]:
            warnings.append("collapsed embeddings: " + "; ".join(spread["reasons"]))
    if training is not None:
        loss = training.get("loss") or {}
        if loss.get("final") is not None and loss.get("collapsed_level") is not None:
            lines.append(f"- training: final contrastive loss {fmt(loss['final'])} against the collapsed solution's "
                         f"{fmt(loss['collapsed_level'])} (global batch {loss.get('global_batch')})")
        if training.get("gap") is not None:
            lines.append(f"- training run's R@5: train {fmt(training['train']['R@5'])}, held-out "
                         f"{fmt(training['held_out']['R@5'])} (gap {training['gap']['R@5']:+.3f}; chance "
                         f"{fmt(training['held_out']['chance_R@5'])})")
        warnings += [w for w in training.get("warnings", []) if not w.startswith("collapsed embeddings")
                     or spread is None]
    lines += [f"- **WARNING**: {w}" for w in warnings] or ["- no sign of collapse"]
    return lines + [""]


def format_report(summary: Mapping[str, Any]) -> str:
    """The markdown report of :func:`evaluate`'s result: a header, then a section per task."""
    lines = ["# medvl evaluation", "",
             f"- checkpoint: {summary.get('checkpoint') or 'in-memory model'} (recipe {summary.get('recipe')})",
             f"- data: {summary['data']} ({str(summary['kind']).upper()}), {summary['n']} samples, seed "
             f"{summary['seed']}, size {tuple(summary['size'])}, device {summary['device']}",
             "- encoding: " + ", ".join(f"{k} {v}" for k, v in summary["encoding"].items()), ""]
    lines += _collapse_lines(summary)
    for task, result in summary["results"].items():
        # a task this version does not know (a results.json of another) is shown as it was saved
        section = TASKS[task].report if task in TASKS else json_block
        if section is not None:
            lines += [f"## {task}", "", section(result), ""]
    for task, reason in summary.get("skipped", {}).items():
        lines += [f"## {task} (skipped)", "", reason, ""]
    plots = {k: v for k, v in summary.get("files", {}).items() if str(v).endswith(".png")}
    if plots:
        lines += ["## plots", ""] + [f"- {k}: {os.path.basename(v)}" for k, v in plots.items()] + [""]
    return "\n".join(lines)
