"""The linear probe through the encoder: every step sees the images, so crop/flip augmentation is possible."""

from __future__ import annotations

from typing import Any

from torch import nn

from common.logging import get_logger
from common.transfer.data import IndexedSplit, make_loader
from common.transfer.engine import LrSchedule
from common.transfer.errors import TransferUsageError
from common.transfer.heads import FrozenEncoderProbe, ProbeHead
from common.transfer.lars import LARS
from common.transfer.loop import FitParts, FitState, fit, load_best_weights, load_last, score_best
from common.transfer.report import evaluate_splits
from common.transfer.sampling import EpochShuffleSampler
from common.transfer.schedule import effective_lr
from common.transfer.setup import RunContext
from common.transfer.transforms import crop_flip_transform, eval_transform
from linprobe.config import LinprobeConfig

TRAIN_AUGS = ("crop_flip", "none")


def probe_loss(multilabel: bool) -> nn.Module:
    return nn.BCEWithLogitsLoss() if multilabel else nn.CrossEntropyLoss()


def train_transform(cfg: LinprobeConfig, ctx: RunContext) -> Any:
    spec = ctx.spec
    if cfg.train_aug == "crop_flip":
        return crop_flip_transform(spec.input_size, spec.mean, spec.std, spec.in_chans)
    return eval_transform(spec.input_size, spec.mean, spec.std, spec.in_chans)


def run_probe(cfg: LinprobeConfig, ctx: RunContext, encoder: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train (or with ``--eval`` only score) a probe head; returns (metrics per split, extra results)."""
    acc, spec, labels = ctx.accelerator, ctx.spec, ctx.labels
    logger = get_logger("scanmae.linprobe")
    head = ProbeHead(encoder.num_features, labels.num_classes, seed=cfg.seed)
    probe = FrozenEncoderProbe(encoder, head)
    lr = effective_lr(cfg.blr, cfg.lr, cfg.batch_size, cfg.accum_iter, acc.num_processes)
    optimizer = LARS(head.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    probe, optimizer = acc.prepare(probe, optimizer)
    loaders = {s: ctx.eval_loader(s, cfg.batch_size, cfg.num_workers, cfg.pin_mem, cfg.dist_eval)
               for s in ctx.splits if s != "train"}
    if cfg.eval:
        load_best_weights(head, cfg.resume)
        scored = evaluate_splits(probe, loaders, acc, labels, cfg.dist_eval, cfg.n_bootstrap, cfg.seed)
        return scored, {"mode": "eval", "evaluated_checkpoint": cfg.resume}

    parts = FitParts(model=probe, optimizer=optimizer, loss_fn=probe_loss(labels.multilabel), scored=probe,
                     best=head, resumable={"head": head},
                     best_meta={"kind": "linprobe_head", "encoder": spec.to_json(), "lr": lr,
                                "class_names": labels.class_names, "multilabel": labels.multilabel})
    train_ds = IndexedSplit(ctx.splits["train"], train_transform(cfg, ctx), labels.num_classes)
    sampler = EpochShuffleSampler(len(train_ds), cfg.seed, acc.process_index, acc.num_processes)
    train_loader = make_loader(train_ds, cfg.batch_size, sampler, cfg.num_workers, cfg.pin_mem, drop_last=True,
                               persistent=True)
    if len(train_loader) == 0:
        raise TransferUsageError(f"{cfg.data_path}: {len(sampler)} training samples per process are fewer than one "
                         f"batch of {cfg.batch_size} (only full batches are used); lower --batch_size")
    state = FitState(start_epoch=cfg.start_epoch)
    if cfg.resume:
        state = load_last(cfg.resume, parts, acc)
        logger.info(f"resumed from {cfg.resume} at epoch {state.start_epoch}")
    logger.info(f"linear probe: lr {lr:.3g} (blr {cfg.blr}), {cfg.epochs} epochs, {len(train_loader)} steps/epoch")
    state = fit(parts, train_loader, sampler, loaders["val"], acc, LrSchedule(lr, cfg.min_lr, cfg.warmup_epochs,
                                                                             cfg.epochs),
                labels, ctx.out_dir, cfg.epochs, cfg.accum_iter, None, cfg.select_metric, cfg.dist_eval, state,
                ctx.log)
    if state.best_epoch < 0:
        raise TransferUsageError("no epoch was trained (--epochs 0, or --start_epoch >= --epochs)")
    scored = score_best(parts, ctx.out_dir, loaders, acc, labels, cfg.dist_eval, cfg.n_bootstrap, cfg.seed)
    return scored, {"mode": "linprobe", "lr": lr, "blr": cfg.blr, "best_epoch": state.best_epoch}
