"""The markdown report: a section per task from its record, the collapse section, skipped tasks, figures."""

from medvl.eval.report import format_report
from medvl.eval.tasks import TASKS

PROBE = {"accuracy": 0.75, "balanced_accuracy": 0.7, "macro_f1": 0.6, "majority_accuracy": 0.5, "n_train": 12,
         "n_test": 12, "target": "sequence", "n_classes": 3, "split": "evaluation set, stratified halves (seed 0)"}
SPREAD = {"n": 24, "image_offdiagonal_cosine": {"mean": 0.99, "max": 1.0}, "text_offdiagonal_cosine": {"mean": 0.2},
          "matched_cosine": 0.1, "unmatched_cosine": 0.1, "collapsed": True, "reasons": ["two volumes agree"],
          "threshold": 0.95}


def _summary(results, **extra):
    return {"checkpoint": None, "recipe": "mrclip", "data": "synthetic-mr", "kind": "mr", "n": 24, "seed": 0,
            "size": [32, 32, 16], "device": "cpu", "encoding": {"volumes_encoded": 24}, "results": results,
            **extra}


def test_each_task_reports_through_its_record():
    report = format_report(_summary({"probe": PROBE}, skipped={"qc": "task 'qc' needs metadata"},
                                    files={"report": "/x/report.md", "embedding_map": "/x/embeddings_pca.png"}))
    assert report.startswith("# medvl evaluation\n\n- checkpoint: in-memory model (recipe mrclip)")
    assert "## probe\n\n" + TASKS["probe"].report(PROBE) + "\n" in report
    assert "## qc (skipped)\n\ntask 'qc' needs metadata" in report
    assert "## plots\n\n- embedding_map: embeddings_pca.png" in report and "report.md" not in report


def test_collapse_has_the_collapse_section_only():
    report = format_report(_summary({"collapse": SPREAD}))
    assert "## collapse diagnostics" in report and "## collapse\n" not in report
    assert "- **WARNING**: collapsed embeddings: two volumes agree" in report


def test_a_result_of_an_unknown_task_is_shown_as_saved():
    report = format_report(_summary({"newtask": {"score": 1}}))
    assert '## newtask\n\n```\n{\n "score": 1\n}\n```' in report
