"""Scoring predictions and writing ``results.json`` plus confusion matrices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from common.io import atomic_write_json
from common.metrics import (
    binary_threshold_metrics,
    classification_metrics,
    fit_binary_threshold,
    multilabel_metrics,
    save_confusion_matrix,
)
from common.transfer.engine import mean_log_loss

SELECT_METRICS = ("acc", "balanced_acc", "auc", "f1", "loss")


def score(scores: np.ndarray, targets: np.ndarray, multilabel: bool, class_names: list[str],
          n_bootstrap: int = 0, seed: int = 0) -> dict[str, Any]:
    """All metrics for one split, plus its mean ``loss``."""
    if multilabel:
        out = multilabel_metrics(targets, scores, class_names, n_bootstrap=n_bootstrap, seed=seed)
    else:
        out = classification_metrics(targets, scores, class_names, n_bootstrap=n_bootstrap, seed=seed)
    out["loss"] = mean_log_loss(scores, targets, multilabel)
    return out


def add_val_operating_point(test_metrics: dict[str, Any], val_scores: np.ndarray, val_targets: np.ndarray,
                            test_scores: np.ndarray, test_targets: np.ndarray, multilabel: bool, n_bootstrap: int = 0,
                            seed: int = 0) -> None:
    """For a two-class single-label task, put ``at_val_threshold`` into ``test_metrics``: the test metrics at the
    decision threshold fitted on validation (the cut on the positive class's probability with the best validation
    balanced accuracy), beside the argmax rule's headline numbers. A head chosen by validation AUC can rank well and
    still sit on the wrong side of 0.5 (an early, underfit epoch under class weights); a clinical operating point is
    set on validation data, never on test. Nothing for other tasks or when validation lacks a class."""
    if multilabel or val_scores.ndim != 2 or val_scores.shape[1] != 2:
        return
    threshold = fit_binary_threshold(val_targets, val_scores[:, 1])
    if threshold is None:
        return
    point = binary_threshold_metrics(test_targets, test_scores[:, 1], threshold, n_bootstrap, seed)
    test_metrics["at_val_threshold"] = {**point, "fitted_on": "val"}


def selection_value(metrics: dict[str, Any], name: str) -> float:
    """Higher-is-better value of the model-selection metric (loss is negated; undefined is -inf)."""
    if name not in SELECT_METRICS:
        raise ValueError(f"unknown selection metric {name!r} (choose from {', '.join(SELECT_METRICS)})")
    value = metrics.get(name)
    if value is None or not np.isfinite(value):
        return float("-inf")
    return -float(value) if name == "loss" else float(value)


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The four headline numbers and the loss, for the per-epoch log."""
    return {k: metrics.get(k) for k in ("acc", "balanced_acc", "auc", "f1", "loss")}


def write_confusion(metrics: dict[str, Any], output_dir: str | Path, split: str) -> None:
    """``confusion_matrix_<split>.json/.png`` for single-label results (multi-label has none)."""
    cm = metrics.get("confusion_matrix")
    if cm is not None:
        save_confusion_matrix(np.asarray(cm["matrix"]), cm["labels"], Path(output_dir) / f"confusion_matrix_{split}",
                              title=f"{split} confusion matrix")


def write_results(output_dir: str | Path, test: dict[str, Any] | None, val: dict[str, Any],
                  extra: dict[str, Any]) -> Path:
    """``results.json``: top-level test ``acc``, ``balanced_acc``, ``auc``, ``f1`` (numbers), the full test
    and validation metrics, and ``extra`` (best epoch, selected LR, checkpoint, config ...).

    Without a test split the headline numbers come from validation and ``evaluated_on`` says so.
    """
    primary = test if test is not None else val
    body: dict[str, Any] = {k: primary.get(k) for k in ("acc", "balanced_acc", "auc", "f1")}
    body["evaluated_on"] = "test" if test is not None else "val"
    body["ci95"] = primary.get("ci95", {})
    body.update(extra)
    body["test"] = test
    body["val"] = val
    return atomic_write_json(Path(output_dir) / "results.json", body)
