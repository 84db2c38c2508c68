"""Scores for the supervised tasks, computed by the field's reference libraries.

Classification uses scikit-learn; tagging uses seqeval's entity-level (CoNLL) conventions, so the
numbers in eval.json are the ones a reader would get from those libraries on predictions.*.jsonl.
"""

from __future__ import annotations

from collections.abc import Sequence

from seqeval import metrics as seqeval_metrics
from sklearn import metrics as sklearn_metrics


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy, macro-F1 over ``labels``, per-class precision/recall/F1/support and the confusion
    matrix (rows: true label, columns: predicted label, both in ``labels`` order)."""
    labels = list(labels)
    precision, recall, f1, support = sklearn_metrics.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0)
    return {
        "examples": len(y_true),
        "accuracy": float(sklearn_metrics.accuracy_score(y_true, y_pred)),
        "macro_f1": float(sklearn_metrics.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, support, strict=True)
        },
        "confusion_matrix": {"labels": labels,
                             "matrix": sklearn_metrics.confusion_matrix(y_true, y_pred, labels=labels).tolist()},
    }


def tagging_metrics(true_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> dict:
    """Entity-level micro precision/recall/F1 (an entity counts only with exact type and span),
    per entity type, and token accuracy — seqeval's default (CoNLL script) mode."""
    true_tags, pred_tags = [list(t) for t in true_tags], [list(p) for p in pred_tags]
    report = seqeval_metrics.classification_report(true_tags, pred_tags, output_dict=True, zero_division=0)
    per_type = {
        name: {"precision": float(v["precision"]), "recall": float(v["recall"]), "f1": float(v["f1-score"]),
               "support": int(v["support"])}
        for name, v in report.items() if not name.endswith(" avg")
    }
    return {
        "sentences": len(true_tags),
        "precision": float(seqeval_metrics.precision_score(true_tags, pred_tags, zero_division=0)),
        "recall": float(seqeval_metrics.recall_score(true_tags, pred_tags, zero_division=0)),
        "f1": float(seqeval_metrics.f1_score(true_tags, pred_tags, zero_division=0)),
        "token_accuracy": float(seqeval_metrics.accuracy_score(true_tags, pred_tags)),
        "per_type": per_type,
    }
