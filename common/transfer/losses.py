"""Training losses for fine-tuning: (class-weighted) cross-entropy with label smoothing, soft-target
cross-entropy for mixup / cutmix, and (class-weighted) BCE for multi-label data."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def inverse_frequency_weights(targets: np.ndarray, num_classes: int) -> torch.Tensor:
    """``N / (K * count_k)`` per class (1 for a class absent from training): balanced-class weighting."""
    counts = np.bincount(targets.astype(np.int64), minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, len(targets) / (num_classes * np.maximum(counts, 1)), 1.0)
    return torch.tensor(weights, dtype=torch.float32)


def positive_weights(targets: np.ndarray) -> torch.Tensor:
    """``negatives / positives`` per label (1 for a label never positive): BCE ``pos_weight``."""
    t = (targets > 0.5).astype(np.float64)
    pos = t.sum(axis=0)
    neg = len(t) - pos
    return torch.tensor(np.where(pos > 0, neg / np.maximum(pos, 1), 1.0), dtype=torch.float32)


class SoftTargetCrossEntropy(nn.Module):
    """Cross-entropy against a probability vector per sample (mixup targets), optionally class-weighted."""

    def __init__(self, weight: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight if weight is not None else None, persistent=False)

    def forward(self, logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(logits.float(), dim=-1)
        t = soft_targets.float()
        if self.weight is not None:
            t = t * self.weight
        return -(t * log_probs).sum(dim=-1).mean()


class MultiLabelBCE(nn.Module):
    """BCE with logits for multi-hot (or mixed, soft) targets, optional per-label ``pos_weight``."""

    def __init__(self, pos_weight: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), pos_weight=self.pos_weight)


def build_loss(multilabel: bool, mixup: bool, smoothing: float, class_weights: torch.Tensor | None) -> nn.Module:
    """The fine-tuning criterion; ``class_weights`` are per-class weights (single-label) or
    ``pos_weight`` (multi-label), held as buffers: move the criterion to the model's device with ``.to``.
    With mixup, label smoothing is already in the mixed targets."""
    if multilabel:
        return MultiLabelBCE(class_weights)
    if mixup:
        return SoftTargetCrossEntropy(class_weights)
    return nn.CrossEntropyLoss(weight=class_weights, label_smoothing=smoothing)
