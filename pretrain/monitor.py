"""Optional kNN monitor: how well the current encoder's features separate the classes of a labeled set.

Every ``--monitor_every`` optimizer steps (and at the last step) rank 0 embeds a fixed subset of the monitor
set's train and val splits with the unwrapped encoder in eval mode (``eval_transform``, pooled features,
L2-normalised) and classifies val by weighted cosine kNN (DINO-style, temperature 0.07). The other ranks go
on and wait for rank 0 at the next collective. Nothing here draws from the global RNGs (the subset and the
DataLoader use their own generators), so monitoring never changes the training run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from common.config import ConfigError
from common.data import ImageDataset, build_dataset, eval_canvas_size, eval_transform
from common.data.labels import UnseenClassError, check_classes_seen_in_train
from common.data.source import RandomAccessSource
from common.data.stream import letterbox
from common.metrics import accuracy, macro_auc
from pretrain.precision import forward_autocast

KNN_TEMPERATURE = 0.07


@torch.no_grad()
def knn_scores(train_feats: torch.Tensor, train_labels: torch.Tensor, query_feats: torch.Tensor,
               num_classes: int, k: int = 20, temperature: float = KNN_TEMPERATURE,
               chunk: int = 1024) -> torch.Tensor:
    """Class probabilities (Nq, num_classes) of weighted cosine kNN on L2-normalised features.

    Each of the ``k`` nearest training samples votes for its class with weight ``exp(cos / temperature)``;
    the votes are normalised to sum to one per query. ``k`` is capped at the number of training samples.
    """
    if train_feats.ndim != 2 or query_feats.ndim != 2 or train_feats.shape[1] != query_feats.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D, got {tuple(train_feats.shape)} and "
                         f"{tuple(query_feats.shape)}")
    if len(train_labels) != len(train_feats) or len(train_feats) == 0:
        raise ValueError(f"{len(train_feats)} training features but {len(train_labels)} labels")
    k = min(k, len(train_feats))
    bank = nn.functional.normalize(train_feats.float(), dim=1)
    labels = train_labels.long()
    out = []
    for start in range(0, len(query_feats), chunk):
        q = nn.functional.normalize(query_feats[start:start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        votes = torch.zeros(len(q), num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, labels[idx], weights)
        out.append(votes / votes.sum(dim=1, keepdim=True))
    return torch.cat(out) if out else torch.zeros(0, num_classes)


def knn_metrics(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                val_labels: torch.Tensor, num_classes: int, k: int = 20) -> dict[str, float]:
    """``knn_acc`` (top-1 accuracy on val), plus ``knn_auc`` when there are two classes and val has both."""
    probs = knn_scores(train_feats, train_labels, val_feats, num_classes, k).numpy()
    truth = val_labels.numpy()
    metrics = {"knn_acc": accuracy(truth, probs.argmax(axis=1))}
    if num_classes == 2:
        auc = macro_auc(truth, probs)
        if math.isfinite(auc):
            metrics["knn_auc"] = auc
    return metrics


def _select(dataset: ImageDataset, max_samples: int, seed: int) -> list[Any]:
    """Raw samples of a fixed random subset (all when ``max_samples`` is 0), in storage order."""
    rng = np.random.default_rng(seed)  # own generator: the global RNGs stay untouched
    source = dataset.source
    n = len(source)
    if isinstance(source, RandomAccessSource):
        if not max_samples or n <= max_samples:
            return list(range(n))
        return sorted(int(i) for i in rng.choice(n, size=max_samples, replace=False))
    kept: list[tuple[int, Any]] = []  # reservoir sampling over the stream of (still encoded) samples
    seen = 0
    for shard in range(len(source.shard_counts)):
        for raw in source.iter_raw(shard):
            if not max_samples or len(kept) < max_samples:
                kept.append((seen, raw))
            else:
                slot = int(rng.integers(0, seen + 1))
                if slot < max_samples:
                    kept[slot] = (seen, raw)
            seen += 1
    return [raw for _, raw in sorted(kept, key=lambda item: item[0])]


class _RawSubset(Dataset):
    """The selected raw samples, decoded and letterboxed onto the eval canvas."""

    def __init__(self, dataset: ImageDataset, raws: list[Any], canvas: int):
        self.dataset, self.raws, self.canvas = dataset, raws, canvas

    def __len__(self) -> int:
        return len(self.raws)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image, label, _ = self.dataset.decode_for_batch(self.raws[index])
        canvas, size = letterbox(image, self.canvas)
        return canvas, torch.tensor(size, dtype=torch.int64), int(label)


@dataclass
class KnnMonitor:
    """Holds the monitor splits; ``run`` embeds them with the current encoder and returns the metrics."""

    data_path: str
    every: int
    k: int
    max_samples: int
    input_size: int
    in_chans: int
    mean: list[float]
    std: list[float]
    batch_size: int = 64
    num_workers: int = 0
    seed: int = 0
    splits: dict[str, ImageDataset] = field(default_factory=dict)
    _raws: dict[str, list[Any]] = field(default_factory=dict)

    def open(self) -> KnnMonitor:
        """Open both splits (on every rank, so that a bad path stops all of them with the same error)."""
        for split in ("train", "val"):
            ds = build_dataset(self.data_path, split=split, labeled=True, in_chans=self.in_chans)
            if ds.multilabel:
                raise ConfigError(f"{self.data_path}: the kNN monitor needs single-label classes, the data is "
                                  f"multi-label")
            self.splits[split] = ds
        try:
            # As linprobe / finetune: a val label no train sample has (a typo'd class) is a wrong class list.
            check_classes_seen_in_train(self.data_path, self.splits, None)
        except UnseenClassError as exc:
            raise ConfigError(f"kNN monitor: {exc}") from exc
        return self

    def due(self, step: int, stop_step: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == stop_step)

    @torch.no_grad()
    def _embed(self, encoder: nn.Module, accelerator: Accelerator, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in self._raws:  # chosen once, so every measurement uses the same images
            self._raws[split] = _select(self.splits[split], self.max_samples, self.seed + (split == "val"))
        subset = _RawSubset(self.splits[split], self._raws[split], eval_canvas_size(self.input_size))
        # An explicit generator: a DataLoader without one seeds itself from the global torch RNG.
        loader = DataLoader(subset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                            generator=torch.Generator().manual_seed(self.seed))
        feats, labels = [], []
        for images, sizes, target in loader:
            x = eval_transform(images.to(accelerator.device), sizes, self.input_size, self.mean, self.std)
            with forward_autocast(accelerator):
                pooled = encoder.pool(encoder.forward_features(x.to(next(encoder.parameters()).dtype)))
            feats.append(pooled.float().cpu())
            labels.append(target)
        return torch.cat(feats), torch.cat(labels)

    def run(self, model: nn.Module, accelerator: Accelerator) -> dict[str, float]:
        """Metrics of the current weights of ``model`` (the unwrapped MAE); training modes are restored."""
        start = time.perf_counter()
        mae = accelerator.unwrap_model(model)
        encoder = getattr(mae, "encoder", mae)
        modes = {m: m.training for m in mae.modules()}
        mae.eval()
        try:
            train_feats, train_labels = self._embed(encoder, accelerator, "train")
            val_feats, val_labels = self._embed(encoder, accelerator, "val")
        finally:
            for module, training in modes.items():
                module.train(training)
        num_classes = self.splits["train"].num_classes
        if num_classes is None:  # shards without a declared label space
            num_classes = int(max(train_labels.max(), val_labels.max())) + 1
        metrics: dict[str, Any] = knn_metrics(train_feats, train_labels, val_feats, val_labels, num_classes,
                                              self.k)
        metrics.update(knn_k=min(self.k, len(train_feats)), knn_train=len(train_feats), knn_val=len(val_feats),
                       knn_seconds=round(time.perf_counter() - start, 3))
        return metrics
