"""The linear probe through the encoder: every step sees the images, so crop/flip augmentation is possible."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from common.checkpoint import read_json
from common.logging import get_logger
from common.transfer.engine import LrSchedule
from common.transfer.errors import TransferUsageError
from common.transfer.heads import FrozenEncoderProbe, ProbeHead, probe_feature_dim
from common.transfer.lars import LARS
from common.transfer.loop import FitParts, fit, load_best_weights, score_best, start_state
from common.transfer.report import evaluate_splits
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


def check_head_blocks(resume: str, n_last_blocks: int) -> None:
    """A saved probe head reads as many blocks as it was trained on (its sidecar records the count; heads saved
    before ``--n_last_blocks`` existed read one)."""
    sidecar = Path(resume).with_suffix(".json")
    if Path(resume).suffix != ".safetensors" or not sidecar.is_file():
        return
    trained = int(read_json(sidecar).get("n_last_blocks", 1))
    if trained != n_last_blocks:
        raise TransferUsageError(f"{resume}: the head was trained on the last {trained} block(s); pass "
                                 f"--n_last_blocks {trained} (got {n_last_blocks})")


def run_probe(cfg: LinprobeConfig, ctx: RunContext, encoder: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train (or with ``--eval`` only score) a probe head; returns (metrics per split, extra results)."""
    acc, spec, labels = ctx.accelerator, ctx.spec, ctx.labels
    logger = get_logger("scanmae.linprobe")
    head = ProbeHead(probe_feature_dim(encoder, cfg.n_last_blocks), labels.num_classes, seed=cfg.seed)
    probe = FrozenEncoderProbe(encoder, head, cfg.n_last_blocks)
    lr = effective_lr(cfg.blr, cfg.lr, cfg.batch_size, cfg.accum_iter, acc.num_processes)
    optimizer = LARS(head.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    probe, optimizer = acc.prepare(probe, optimizer)
    loaders = ctx.eval_loaders(cfg)
    if cfg.eval:
        check_head_blocks(cfg.resume, cfg.n_last_blocks)
        load_best_weights(head, cfg.resume)
        scored = evaluate_splits(probe, loaders, acc, labels, cfg.dist_eval, cfg.n_bootstrap, cfg.seed)
        return scored, {"mode": "eval", "evaluated_checkpoint": cfg.resume}

    parts = FitParts(model=probe, optimizer=optimizer, loss_fn=probe_loss(labels.multilabel), scored=probe,
                     best=head, resumable={"head": head},
                     best_meta={"kind": "linprobe_head", "encoder": spec.to_json(), "lr": lr,
                                "n_last_blocks": cfg.n_last_blocks,
                                "class_names": labels.class_names, "multilabel": labels.multilabel})
    train_loader, sampler = ctx.train_loader(train_transform(cfg, ctx), cfg)
    state = start_state(cfg.resume, cfg.start_epoch, parts, acc, ctx.out_dir)
    logger.info(f"linear probe: lr {lr:.3g} (blr {cfg.blr}), {cfg.epochs} epochs, {len(train_loader)} steps/epoch")
    state = fit(parts, train_loader, sampler, loaders["val"], acc, LrSchedule(lr, cfg.min_lr, cfg.warmup_epochs,
                                                                             cfg.epochs),
                labels, ctx.out_dir, cfg.epochs, cfg.accum_iter, None, cfg.select_metric, cfg.dist_eval, state,
                ctx.log, save_every_s=cfg.save_every_s)
    if state.best_epoch < 0:
        raise TransferUsageError("no epoch was trained (--epochs 0, or --start_epoch >= --epochs)")
    scored = score_best(parts, ctx.out_dir, loaders, acc, labels, cfg.dist_eval, cfg.n_bootstrap, cfg.seed)
    return scored, {"mode": "linprobe", "lr": lr, "blr": cfg.blr, "best_epoch": state.best_epoch}
