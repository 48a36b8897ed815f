"""Fine-tuning (or training from scratch) of a registry classifier with MAE's recipe: AdamW, layer-wise
LR decay, warmup + cosine, timm augmentation, mixup / cutmix, label smoothing, optional EMA."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from common.logging import get_logger
from common.optim import adamw, use_fused_adamw
from common.transfer.classifier_export import classifier_meta
from common.transfer.engine import LrSchedule
from common.transfer.errors import TransferUsageError
from common.transfer.loop import FitParts, fit, load_best_weights, score_best, start_state
from common.transfer.losses import build_loss, inverse_frequency_weights, positive_weights
from common.transfer.param_groups import layer_decay_groups, weight_decay_groups
from common.transfer.report import evaluate_splits
from common.transfer.schedule import effective_lr
from common.transfer.setup import RunContext
from common.transfer.transforms import TimmTrainTransform
from finetune.config import FinetuneConfig


def param_groups(model: nn.Module, cfg: FinetuneConfig) -> list[dict[str, Any]]:
    if hasattr(model, "layer_id") and hasattr(model, "num_layer_ids"):
        return layer_decay_groups(model, cfg.weight_decay, cfg.layer_decay)
    if cfg.layer_decay != 1.0:
        raise TransferUsageError(f"{type(model).__name__} has no layer_id()/num_layer_ids, so --layer_decay "
                        f"{cfg.layer_decay} cannot be applied; pass --layer_decay 1.0")
    return weight_decay_groups(model, cfg.weight_decay)


def mixup_fn(cfg: FinetuneConfig, num_classes: int, multilabel: bool) -> Any:
    if cfg.mixup <= 0 and cfg.cutmix <= 0 and cfg.cutmix_minmax is None:
        return None
    from timm.data import Mixup

    if cfg.batch_size % 2:
        raise TransferUsageError(f"--mixup/--cutmix need an even --batch_size (got {cfg.batch_size})")
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax,
                 prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                 label_smoothing=cfg.smoothing, num_classes=num_classes, multi_label=multilabel)


def class_weights(cfg: FinetuneConfig, ctx: RunContext) -> torch.Tensor | None:
    if not cfg.class_weighted_loss:
        return None
    train = ctx.split_targets("train")  # no image decoding needed (kept from the data check when it ran)
    if ctx.labels.multilabel:
        return positive_weights(train)
    return inverse_frequency_weights(train, ctx.labels.num_classes)


def build_optimizer(model: nn.Module, cfg: FinetuneConfig, lr: float, fused: bool) -> torch.optim.Optimizer:
    """AdamW over the layer-decay groups (about two per block, so the fused kernels of
    ``common.optim.use_fused_adamw`` save many launches)."""
    return adamw(param_groups(model, cfg), lr, fused)


def run_finetune(cfg: FinetuneConfig, ctx: RunContext, model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train (or with ``--eval`` only score) the classifier; returns (metrics per split, extra results)."""
    acc, spec, labels = ctx.accelerator, ctx.spec, ctx.labels
    logger = get_logger("scanmae.finetune")
    lr = effective_lr(cfg.blr, cfg.lr, cfg.batch_size, cfg.accum_iter, acc.num_processes)
    optimizer = build_optimizer(model, cfg, lr, fused=use_fused_adamw(acc))
    model, optimizer = acc.prepare(model, optimizer)
    plain = acc.unwrap_model(model)
    ema = None
    if cfg.model_ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(plain, decay=cfg.model_ema_decay)
    scored = ema.module if ema is not None else model
    loaders = ctx.eval_loaders(cfg)
    if cfg.eval:
        load_best_weights(acc.unwrap_model(scored), cfg.resume)
        results = evaluate_splits(scored, loaders, acc, labels, cfg.dist_eval, cfg.n_bootstrap, cfg.seed)
        return results, {"mode": "eval", "evaluated_checkpoint": cfg.resume}

    mix = mixup_fn(cfg, labels.num_classes, labels.multilabel)
    weights = class_weights(cfg, ctx)
    resumable: dict[str, nn.Module] = {"model": model}
    if ema is not None:
        resumable["ema"] = ema.module
    parts = FitParts(model=model, optimizer=optimizer,
                     loss_fn=build_loss(labels.multilabel, mix is not None, cfg.smoothing, weights).to(acc.device),
                     scored=scored, best=scored, resumable=resumable, batch_transform=mix,
                     after_step=(lambda: ema.update(plain)) if ema is not None else None,
                     best_meta={**classifier_meta(plain, spec), "lr": lr, "ema": ema is not None,
                                "class_names": labels.class_names, "multilabel": labels.multilabel})
    train_t = TimmTrainTransform(spec.input_size, spec.mean, spec.std, spec.in_chans, cfg.aa, cfg.color_jitter,
                                 cfg.reprob, cfg.remode, cfg.recount)
    train_loader, sampler = ctx.train_loader(train_t, cfg)
    state = start_state(cfg.resume, cfg.start_epoch, parts, acc, ctx.out_dir)
    logger.info(f"finetune: lr {lr:.3g} (blr {cfg.blr}), layer decay {cfg.layer_decay}, {cfg.epochs} epochs, "
                f"{len(train_loader)} steps/epoch" + (", class-weighted loss" if weights is not None else ""))
    state = fit(parts, train_loader, sampler, loaders["val"], acc,
                LrSchedule(lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs), labels, ctx.out_dir, cfg.epochs,
                cfg.accum_iter, cfg.clip_grad, cfg.select_metric, cfg.dist_eval, state, ctx.log,
                save_every_s=cfg.save_every_s)
    if state.best_epoch < 0:
        raise TransferUsageError("no epoch was trained (--epochs 0, or --start_epoch >= --epochs)")
    results = score_best(parts, ctx.out_dir, loaders, acc, labels, cfg.dist_eval, cfg.n_bootstrap, cfg.seed)
    extra = {"mode": "finetune" if cfg.finetune else "scratch", "lr": lr, "blr": cfg.blr,
             "best_epoch": state.best_epoch, "ema": ema is not None,
             "class_weights": weights.tolist() if weights is not None else None}
    return results, extra
