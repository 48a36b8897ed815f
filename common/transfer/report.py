"""Scoring a model on several splits and writing the run's final outputs."""

from __future__ import annotations

from typing import Any

from accelerate import Accelerator
from torch import nn

from common.transfer.data import LabelSpace
from common.transfer.engine import predict
from common.transfer.results import add_val_operating_point, score, write_confusion, write_results
from common.transfer.setup import RunContext


def evaluate_splits(model: nn.Module, loaders: dict[str, Any], accelerator: Accelerator, labels: LabelSpace,
                    dist_eval: bool, n_bootstrap: int, seed: int) -> dict[str, dict[str, Any]]:
    """Metrics per split; bootstrap confidence intervals on the test split only. For a two-class task the test
    metrics also hold ``at_val_threshold``: those at the decision threshold fitted on validation."""
    results, predictions = {}, {}
    for split, loader in loaders.items():
        scores, targets = predict(model, loader, accelerator, labels.multilabel, dist_eval, split)
        predictions[split] = (scores, targets)
        results[split] = score(scores, targets, labels.multilabel, labels.class_names,
                               n_bootstrap=n_bootstrap if split == "test" else 0, seed=seed)
    if "val" in predictions and "test" in predictions:
        add_val_operating_point(results["test"], *predictions["val"], *predictions["test"], labels.multilabel,
                                n_bootstrap, seed)
    return results


def finalize(ctx: RunContext, scored: dict[str, dict[str, Any]], extra: dict[str, Any],
             select_metric: str) -> dict[str, Any]:
    """Write ``results.json`` and confusion matrices (main process only); return the results dict."""
    extra = {**extra, "model": ctx.spec.model, "checkpoint": ctx.spec.checkpoint, "select_metric": select_metric,
             "num_classes": ctx.labels.num_classes, "class_names": ctx.labels.class_names,
             "multilabel": ctx.labels.multilabel}
    if ctx.accelerator.is_main_process:
        for split, metrics in scored.items():
            write_confusion(metrics, ctx.out_dir, split)
        write_results(ctx.out_dir, scored.get("test"), scored["val"], extra)
    return {"test": scored.get("test"), "val": scored["val"], **extra}
