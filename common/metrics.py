"""Classification metrics for medical transfer evaluation, in plain numpy.

Inputs are class indices ``y_true`` of shape (N,) and scores ``probs`` of shape (N, K) (softmax
probabilities) for single-label problems, or multi-hot ``y_true`` (N, L) and per-label scores (N, L) for
multi-label problems. Metrics that are undefined on the given data (an AUC for a class with no positive or
no negative example) are NaN rather than an exception, so that a bootstrap resample or a tiny validation
split never aborts a run; averages skip the undefined entries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.io import atomic_write, atomic_write_json


def _as_labels(y_true: Any) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"expected class indices of shape (N,), got shape {y.shape}")
    return y.astype(np.int64)


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """Counts ``cm[i, j]`` of samples with true class ``i`` predicted as class ``j``."""
    t, p = _as_labels(y_true), _as_labels(y_pred)
    if t.shape != p.shape:
        raise ValueError(f"y_true {t.shape} and y_pred {p.shape} differ in shape")
    for name, arr in (("y_true", t), ("y_pred", p)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(f"{name} has labels outside [0, {num_classes}): min {arr.min()}, max {arr.max()}")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy(y_true: Any, y_pred: Any) -> float:
    t, p = _as_labels(y_true), _as_labels(y_pred)
    return float(np.mean(t == p)) if t.size else float("nan")


def precision_recall_f1(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall and F1 from a confusion matrix; 0 where the denominator is 0."""
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    actual = cm.sum(axis=1).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1


def balanced_accuracy(y_true: Any, y_pred: Any, num_classes: int) -> float:
    """Mean recall over the classes that occur in ``y_true``."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    present = cm.sum(axis=1) > 0
    if not present.any():
        return float("nan")
    _, recall, _ = precision_recall_f1(cm)
    return float(recall[present].mean())


def macro_f1(y_true: Any, y_pred: Any, num_classes: int) -> float:
    """Unweighted mean F1 over all ``num_classes`` classes (a class never seen nor predicted counts 0)."""
    _, _, f1 = precision_recall_f1(confusion_matrix(y_true, y_pred, num_classes))
    return float(f1.mean())


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with tied values sharing their mean rank."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Start index of each run of equal values, and the run each sorted element belongs to.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    run_rank = (starts + ends + 1) / 2.0  # mean of 1-based positions starts+1 .. ends
    run_of = np.repeat(np.arange(len(starts)), ends - starts)
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = run_rank[run_of]
    return ranks


def binary_auc(is_positive: Any, score: Any) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count one half); NaN if one class."""
    pos = np.asarray(is_positive).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def per_class_auc(y_true: Any, probs: Any) -> np.ndarray:
    """One-vs-rest AUC of each class (NaN for a class absent from, or the only class in, ``y_true``)."""
    t = _as_labels(y_true)
    p = np.asarray(probs, dtype=np.float64)
    return np.array([binary_auc(t == k, p[:, k]) for k in range(p.shape[1])])


def macro_auc(y_true: Any, probs: Any) -> float:
    """Binary: AUC of the positive-class score. Multi-class: mean one-vs-rest AUC over defined classes."""
    t = _as_labels(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != t.shape[0]:
        raise ValueError(f"probs must have shape (N, K) with N={t.shape[0]}, got {p.shape}")
    if p.shape[1] == 2:
        return binary_auc(t == 1, p[:, 1])
    aucs = per_class_auc(t, p)
    return float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")


def multilabel_auc(y_true: Any, scores: Any) -> tuple[float, np.ndarray]:
    """(mean AUC over labels with both outcomes present, per-label AUC with NaN where undefined)."""
    t = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if t.shape != s.shape or t.ndim != 2:
        raise ValueError(f"multi-label targets {t.shape} and scores {s.shape} must both be (N, L)")
    aucs = np.array([binary_auc(t[:, j] > 0.5, s[:, j]) for j in range(t.shape[1])])
    mean = float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")
    return mean, aucs


def bootstrap_ci(metric: Callable[[np.ndarray, np.ndarray], float], y_true: Any, scores: Any,
                 n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric(y_true[idx], scores[idx])`` over resampled cases.

    Resamples on which the metric is undefined (NaN) are dropped; (NaN, NaN) if none is defined.
    """
    t = np.asarray(y_true)
    s = np.asarray(scores)
    rng = np.random.default_rng(seed)
    n = t.shape[0]
    values = []
    for _ in range(n_resamples):
        idx = rng.integers(0, n, size=n)
        v = metric(t[idx], s[idx])
        if np.isfinite(v):
            values.append(v)
    if not values:
        return float("nan"), float("nan")
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(np.asarray(values), [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _nan_to_none(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)


def classification_metrics(y_true: Any, probs: Any, class_names: Sequence[str] | None = None,
                           n_bootstrap: int = 0, seed: int = 0) -> dict[str, Any]:
    """All single-label metrics as a JSON-ready dict (undefined values become null).

    Top-level numbers: ``acc``, ``balanced_acc``, ``auc``, ``f1``; plus ``per_class`` precision / recall /
    F1 / AUC / support, ``confusion_matrix`` (rows = true class) and, if ``n_bootstrap`` > 0, ``ci95``
    holding a [low, high] interval for each of the four headline metrics.
    """
    t = _as_labels(y_true)
    p = np.asarray(probs, dtype=np.float64)
    k = p.shape[1]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for {k} classes")
    pred = p.argmax(axis=1)
    cm = confusion_matrix(t, pred, k)
    precision, recall, f1 = precision_recall_f1(cm)
    aucs = per_class_auc(t, p)
    out: dict[str, Any] = {
        "acc": _nan_to_none(accuracy(t, pred)),
        "balanced_acc": _nan_to_none(balanced_accuracy(t, pred, k)),
        "auc": _nan_to_none(macro_auc(t, p)),
        "f1": _nan_to_none(float(f1.mean())),
        "num_samples": int(t.size),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "auc": _nan_to_none(aucs[i]), "support": int(cm[i].sum())}
            for i, name in enumerate(names)
        },
        "confusion_matrix": {"labels": names, "matrix": cm.tolist()},
    }
    if n_bootstrap > 0:
        headline: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
            "acc": lambda a, b: accuracy(a, b.argmax(1)),
            "balanced_acc": lambda a, b: balanced_accuracy(a, b.argmax(1), k),
            "auc": macro_auc,
            "f1": lambda a, b: macro_f1(a, b.argmax(1), k),
        }
        out["ci95"] = {name: [_nan_to_none(v) for v in bootstrap_ci(fn, t, p, n_bootstrap, 0.95, seed)]
                       for name, fn in headline.items()}
    return out


def fit_binary_threshold(y_true: Any, positive_scores: Any) -> float | None:
    """The cut on the positive class's score that maximises balanced accuracy on ``(y_true, positive_scores)``
    (a sample is called positive when its score is >= the cut): the midpoint between the lowest score called
    positive and the next lower score, so that unseen scores between them fall on the side the data supports.
    Among equally good cuts the one nearest 0.5 wins (the argmax rule's). None when a class is missing or a score
    is not finite (a diverged head)."""
    t = _as_labels(y_true)
    s = np.asarray(positive_scores, dtype=np.float64)
    n_pos, n_neg = int((t == 1).sum()), int((t != 1).sum())
    if n_pos == 0 or n_neg == 0 or not np.isfinite(s).all():
        return None
    distinct = np.unique(s)[::-1]  # descending: each is a candidate lowest positive score
    order = np.argsort(-s, kind="mergesort")
    sorted_s, sorted_pos = s[order], (t[order] == 1)
    # Samples with a score >= each candidate: one past the last index of that score in descending order.
    called = np.searchsorted(-sorted_s, -distinct, side="right")
    tp = np.cumsum(sorted_pos)[called - 1]
    fp = called - tp
    balanced = (tp / n_pos + (n_neg - fp) / n_neg) / 2.0
    below = np.r_[distinct[1:], distinct[-1] - 1.0]  # the next lower score (below the lowest: one less)
    cuts = (distinct + below) / 2.0
    best = np.flatnonzero(balanced >= balanced.max() - 1e-12)
    return float(cuts[best[np.argmin(np.abs(cuts[best] - 0.5))]])


def binary_threshold_metrics(y_true: Any, positive_scores: Any, threshold: float, n_bootstrap: int = 0,
                             seed: int = 0) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro F1 and the confusion matrix of a two-class task when a sample is called
    positive at ``positive_scores >= threshold``; ``ci95`` as in ``classification_metrics``."""
    t = _as_labels(y_true)
    s = np.asarray(positive_scores, dtype=np.float64)

    def call(scores: np.ndarray) -> np.ndarray:
        return (scores >= threshold).astype(np.int64)

    pred = call(s)
    out: dict[str, Any] = {"threshold": float(threshold), "acc": _nan_to_none(accuracy(t, pred)),
                           "balanced_acc": _nan_to_none(balanced_accuracy(t, pred, 2)),
                           "f1": _nan_to_none(macro_f1(t, pred, 2)),
                           "confusion_matrix": confusion_matrix(t, pred, 2).tolist()}
    if n_bootstrap > 0:
        metrics: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
            "acc": lambda a, b: accuracy(a, call(b)),
            "balanced_acc": lambda a, b: balanced_accuracy(a, call(b), 2),
            "f1": lambda a, b: macro_f1(a, call(b), 2),
        }
        out["ci95"] = {name: [_nan_to_none(v) for v in bootstrap_ci(fn, t, s, n_bootstrap, 0.95, seed)]
                       for name, fn in metrics.items()}
    return out


def _multilabel_thresholded(t: np.ndarray, pred: np.ndarray) -> tuple[float, float, float]:
    """(mean per-label accuracy, mean per-label balanced accuracy, macro F1 over labels)."""
    accs, baccs, f1s = [], [], []
    for j in range(t.shape[1]):
        cm = confusion_matrix(t[:, j], pred[:, j], 2)
        _, _, f1 = precision_recall_f1(cm)
        accs.append(accuracy(t[:, j], pred[:, j]))
        baccs.append(balanced_accuracy(t[:, j], pred[:, j], 2))
        f1s.append(float(f1[1]))
    bacc = float(np.nanmean(baccs)) if np.isfinite(baccs).any() else float("nan")
    return float(np.mean(accs)), bacc, float(np.mean(f1s))


def multilabel_metrics(y_true: Any, scores: Any, label_names: Sequence[str] | None = None,
                       threshold: float = 0.5, n_bootstrap: int = 0, seed: int = 0) -> dict[str, Any]:
    """Multi-label metrics: mean/per-label AUC, and thresholded accuracy, balanced accuracy and F1.

    ``acc`` is the mean per-label accuracy, ``balanced_acc`` the mean per-label balanced accuracy and ``f1``
    the macro F1 over labels, each after thresholding ``scores`` (probabilities) at ``threshold``.
    """
    t = (np.asarray(y_true) > 0.5).astype(np.int64)
    s = np.asarray(scores, dtype=np.float64)
    mean_auc, aucs = multilabel_auc(t, s)
    n_labels = t.shape[1]
    names = list(label_names) if label_names is not None else [str(i) for i in range(n_labels)]
    if len(names) != n_labels:
        raise ValueError(f"{len(names)} label names for {n_labels} labels")
    pred = (s >= threshold).astype(np.int64)
    per_label: dict[str, Any] = {}
    for j, name in enumerate(names):
        precision, recall, f1 = precision_recall_f1(confusion_matrix(t[:, j], pred[:, j], 2))
        per_label[name] = {"auc": _nan_to_none(aucs[j]), "precision": float(precision[1]),
                           "recall": float(recall[1]), "f1": float(f1[1]), "support": int(t[:, j].sum())}
    acc, bacc, f1_macro = _multilabel_thresholded(t, pred)
    out: dict[str, Any] = {
        "acc": _nan_to_none(acc),
        "balanced_acc": _nan_to_none(bacc),
        "auc": _nan_to_none(mean_auc),
        "f1": _nan_to_none(f1_macro),
        "num_samples": int(t.shape[0]),
        "threshold": threshold,
        "per_label": per_label,
    }
    if n_bootstrap > 0:
        headline: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
            "acc": lambda a, b: _multilabel_thresholded(a, (b >= threshold).astype(np.int64))[0],
            "balanced_acc": lambda a, b: _multilabel_thresholded(a, (b >= threshold).astype(np.int64))[1],
            "auc": lambda a, b: multilabel_auc(a, b)[0],
            "f1": lambda a, b: _multilabel_thresholded(a, (b >= threshold).astype(np.int64))[2],
        }
        out["ci95"] = {name: [_nan_to_none(v) for v in bootstrap_ci(fn, t, s, n_bootstrap, 0.95, seed)]
                       for name, fn in headline.items()}
    return out


def save_confusion_matrix(cm: Any, labels: Sequence[str], path_stem: str | Path,
                          title: str = "confusion matrix") -> tuple[Path, Path]:
    """Write ``<stem>.json`` (labels + counts, rows = true class) and a ``<stem>.png`` heat map."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = np.asarray(cm)
    stem = Path(path_stem)
    json_path = atomic_write_json(stem.with_suffix(".json"), {"labels": list(labels), "matrix": cm.tolist(),
                                                              "rows": "true", "columns": "predicted"})
    k = len(labels)
    size = max(3.0, 0.6 * k + 1.5)
    fig = Figure(figsize=(size, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), labels=list(labels), rotation=45, ha="right")
    ax.set_yticks(range(k), labels=list(labels))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = cm.max() / 2.0 if cm.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                    color="white" if cm[i, j] > threshold else "black")
    fig.tight_layout()
    png_path = atomic_write(stem.with_suffix(".png"), lambda p: fig.savefig(p, format="png", dpi=100))
    return json_path, png_path
