"""``linprobe --fast``: features extracted once (cached on disk), a grid of heads trained at once.

Every head sees exactly the batches, initial weights and schedule that a slow run (``--train_aug none``)
at its learning rate would see, so the head picked here equals that slow run's head.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common.checkpoint import load_weights, save_weights, save_weights_with_config
from common.logging import get_logger, progress
from common.transfer.data import make_loader
from common.transfer.engine import gather_strided
from common.transfer.errors import TransferUsageError
from common.transfer.heads import FrozenEncoderProbe, ProbeHead, ProbeHeadGrid, probe_feature_dim
from common.transfer.lars import LARS
from common.transfer.loop import BEST_NAME
from common.transfer.results import add_val_operating_point, headline, score, selection_value
from common.transfer.sampling import StridedSampler, batches, train_order
from common.transfer.schedule import apply_schedule, effective_lr
from common.transfer.setup import RunContext
from linprobe.config import LinprobeConfig
from linprobe.train import probe_loss


def cache_key(ctx: RunContext, split: str, n_last_blocks: int = 1) -> str:
    """Changes whenever the checkpoint file, the architecture, the preprocessing, the blocks read or the data
    change."""
    def stamp(path: str | None) -> Any:
        if not path or not os.path.exists(path):
            return None
        st = os.stat(path)
        return [os.path.abspath(path), st.st_size, st.st_mtime_ns]

    spec = ctx.spec
    blob = json.dumps({"spec": spec.to_json(), "weights": stamp(spec.checkpoint),
                       "data": stamp(ctx.splits[split].source.path), "split": split,
                       "n": len(ctx.splits[split]), "version": 1,
                       **({"n_last_blocks": n_last_blocks} if n_last_blocks != 1 else {})},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@torch.no_grad()
def extract(ctx: RunContext, probe: FrozenEncoderProbe, split: str, batch_size: int, num_workers: int,
            pin_mem: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32, targets) of a split, each process encoding a strided share."""
    acc = ctx.accelerator
    ds = ctx.eval_split(split)
    loader = make_loader(ds, batch_size, StridedSampler(len(ds), acc.process_index, acc.num_processes),
                         num_workers, pin_mem)
    feats, targets = [], []
    for images, target in progress(loader, desc=f"features {split}", leave=False):
        with acc.autocast():
            feats.append(probe.features(images.to(acc.device)).float().cpu().numpy())
        targets.append(target.numpy())
    f = gather_strided(acc, np.concatenate(feats), sharded=True)
    t = gather_strided(acc, np.concatenate(targets), sharded=True)
    return torch.from_numpy(f), torch.from_numpy(t)


def cached_features(ctx: RunContext, probe: FrozenEncoderProbe, split: str, cache_dir: Path,
                    batch_size: int, num_workers: int, pin_mem: bool) -> tuple[torch.Tensor, torch.Tensor]:
    path = cache_dir / f"{split}-{cache_key(ctx, split, probe.n_last_blocks)}.safetensors"
    logger = get_logger("scanmae.linprobe")
    if path.is_file():
        logger.info(f"features {split}: cached {path}")
        cached = load_weights(path)
        return cached["features"], cached["targets"]
    feats, targets = extract(ctx, probe, split, batch_size, num_workers, pin_mem)
    if ctx.accelerator.is_main_process:
        save_weights({"features": feats, "targets": targets}, path)
    return feats, targets


def _scores(logits: torch.Tensor, multilabel: bool) -> np.ndarray:
    return (torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=-1)).numpy()


def train_grid(cfg: LinprobeConfig, ctx: RunContext, feats: dict[str, torch.Tensor],
               targets: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Train one head per ``--lr_grid`` value on cached features; keep each head's best validation epoch."""
    labels = ctx.labels
    world = ctx.accelerator.num_processes
    device = ctx.accelerator.device
    feats = {k: v.to(device) for k, v in feats.items()}
    targets = {k: v.to(device) for k, v in targets.items()}
    n, dim = feats["train"].shape
    grid = ProbeHeadGrid(dim, labels.num_classes, len(cfg.lr_grid), seed=cfg.seed).to(device)
    peaks = [effective_lr(blr, None, cfg.batch_size, cfg.accum_iter, world) for blr in cfg.lr_grid]
    if cfg.lr is not None:
        raise TransferUsageError("--fast takes its learning rates from --lr_grid (base LRs); drop --lr")
    groups = [{"params": list(lin.parameters()), "peak_lr": peak} for lin, peak in zip(grid.linears, peaks)]
    optimizer = LARS(groups, lr=0.0, weight_decay=cfg.weight_decay)
    loss_fn = probe_loss(labels.multilabel)
    # One process sees what ``world`` processes of a slow run see together: its effective batch.
    batch = cfg.batch_size * world
    best: list[dict[str, Any]] = [{"value": float("-inf"), "epoch": -1, "val": None, "state": None}
                                  for _ in peaks]
    x_train, y_train = feats["train"], targets["train"]
    for epoch in progress(range(cfg.epochs), total=cfg.epochs, desc="grid epochs"):
        grid.train()
        steps = [idx.to(device) for idx in batches(train_order(n, epoch, cfg.seed), batch, drop_last=True)]
        if not steps:
            raise TransferUsageError(f"{cfg.data_path}: {n} training samples are fewer than one batch of {batch}")
        losses = []
        for i, idx in enumerate(steps):
            if i % cfg.accum_iter == 0:
                apply_schedule(optimizer, epoch + i / len(steps), peaks[0], cfg.min_lr, cfg.warmup_epochs,
                               cfg.epochs)
            logits = grid(x_train[idx])
            y = y_train[idx]
            loss = torch.stack([loss_fn(head_logits, y) for head_logits in logits]).sum()
            (loss / cfg.accum_iter).backward()
            if (i + 1) % cfg.accum_iter == 0 or i + 1 == len(steps):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()) / len(peaks))
        grid.eval()
        with torch.no_grad():
            val_logits = grid(feats["val"])
        record: dict[str, Any] = {"epoch": epoch, "train_loss": float(np.mean(losses))}
        for h, logits in enumerate(val_logits):
            val = score(_scores(logits.cpu(), labels.multilabel), targets["val"].cpu().numpy(), labels.multilabel,
                        labels.class_names)
            value = selection_value(val, cfg.select_metric)
            record[f"val_{cfg.select_metric}@blr={cfg.lr_grid[h]:g}"] = val.get(cfg.select_metric)
            if value > best[h]["value"]:
                head = grid.export_head(h)
                best[h] = {"value": value, "epoch": epoch, "val": val,
                           "state": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}}
        ctx.log.log(record)
    return {"best": best, "peaks": peaks}


def run_fast(cfg: LinprobeConfig, ctx: RunContext, encoder: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Extract (or load) features, train the grid, pick the head with the best validation metric."""
    logger = get_logger("scanmae.linprobe")
    if cfg.train_aug != "none":
        logger.info("--fast: features are extracted once, without training augmentation")
    if not cfg.lr_grid:
        raise TransferUsageError("--fast needs at least one --lr_grid value")
    acc = ctx.accelerator
    dim = probe_feature_dim(encoder, cfg.n_last_blocks)
    probe = FrozenEncoderProbe(encoder, ProbeHead(dim, ctx.labels.num_classes), cfg.n_last_blocks).to(acc.device)
    cache_dir = Path(cfg.feature_cache) if cfg.feature_cache else ctx.out_dir / "features"
    feats, targets = {}, {}
    for split in ctx.splits:
        feats[split], targets[split] = cached_features(ctx, probe, split, cache_dir, cfg.batch_size,
                                                       cfg.num_workers, cfg.pin_mem)
    outcome = train_grid(cfg, ctx, feats, targets)
    best, peaks = outcome["best"], outcome["peaks"]
    winner = max(range(len(best)), key=lambda h: (best[h]["value"], -h))
    if best[winner]["epoch"] < 0:
        raise TransferUsageError("no epoch was trained (--epochs 0?)")
    head = ProbeHead(feats["train"].shape[1], ctx.labels.num_classes)
    head.load_state_dict(best[winner]["state"])
    head.eval()
    if acc.is_main_process:
        save_weights_with_config(head.state_dict(), {
            "kind": "linprobe_head", "encoder": ctx.spec.to_json(), "lr": peaks[winner],
            "n_last_blocks": cfg.n_last_blocks,
            "blr": cfg.lr_grid[winner], "epoch": best[winner]["epoch"], "class_names": ctx.labels.class_names,
            "multilabel": ctx.labels.multilabel, "val": headline(best[winner]["val"])}, ctx.out_dir / BEST_NAME)
    scored = {"val": best[winner]["val"]}
    if "test" in feats:
        with torch.no_grad():
            test_scores = _scores(head(feats["test"]), ctx.labels.multilabel)
            val_scores = _scores(head(feats["val"]), ctx.labels.multilabel)
        scored["test"] = score(test_scores, targets["test"].numpy(), ctx.labels.multilabel,
                               ctx.labels.class_names, cfg.n_bootstrap, cfg.seed)
        add_val_operating_point(scored["test"], val_scores, targets["val"].cpu().numpy(), test_scores,
                                targets["test"].numpy(), ctx.labels.multilabel, cfg.n_bootstrap, cfg.seed)
    grid_summary = [{"blr": blr, "lr": peaks[h], "best_epoch": best[h]["epoch"],
                     f"val_{cfg.select_metric}": best[h]["val"].get(cfg.select_metric) if best[h]["val"] else None}
                    for h, blr in enumerate(cfg.lr_grid)]
    logger.info(f"--fast: best blr {cfg.lr_grid[winner]:g} (lr {peaks[winner]:.3g}) at epoch "
                f"{best[winner]['epoch']}")
    return scored, {"mode": "linprobe_fast", "blr": cfg.lr_grid[winner], "lr": peaks[winner],
                    "best_epoch": best[winner]["epoch"], "lr_grid": grid_summary}
