"""linprobe: linear probing of a frozen pretrained encoder on a labeled medical image dataset.

A BatchNorm (no affine) + Linear head is trained with LARS on the frozen encoder's class token (the mean of
its tokens with --global_pool, or when it has no class token). Results: OUTPUT_DIR/results.json, log.jsonl, checkpoint-best.safetensors.

    linprobe --data_path data/breastmnist.npz --finetune runs/pretrain/encoder.safetensors
    accelerate launch linprobe/main.py --data_path DIR --finetune CKPT --fast
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch linprobe/main.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from typing import Any  # noqa: E402

from common.transfer.cli import run_cli  # noqa: E402
from common.transfer.errors import TransferUsageError  # noqa: E402
from linprobe.config import LinprobeConfig  # noqa: E402


def run(cfg: LinprobeConfig) -> dict[str, Any]:
    """The whole linear-probe run for a parsed config; returns what results.json holds."""
    from common.transfer.encoder import build_model
    from common.transfer.report import finalize
    from common.transfer.setup import prepare_run
    from linprobe.fast import run_fast
    from linprobe.train import TRAIN_AUGS, run_probe

    if cfg.train_aug not in TRAIN_AUGS:
        raise TransferUsageError(f"--train_aug must be one of {', '.join(TRAIN_AUGS)}, got {cfg.train_aug!r}")
    if cfg.eval and not cfg.resume:
        raise TransferUsageError("--eval needs --resume (a checkpoint-best.safetensors or checkpoint-last.pt)")
    if cfg.n_last_blocks < 1:
        raise TransferUsageError(f"--n_last_blocks must be at least 1, got {cfg.n_last_blocks}")
    if cfg.fast and (cfg.eval or cfg.resume):
        raise TransferUsageError("--fast trains from scratch on cached features; use --eval/--resume without --fast")
    ctx = prepare_run(cfg, "linprobe", classifier_head=False, drop_path=None, default_pool="token")
    if not cfg.finetune:
        from common.logging import get_logger

        get_logger("scanmae.linprobe").warning(
            f"no --finetune checkpoint: probing a randomly initialised {ctx.spec.model} (a baseline only)")
    encoder = build_model(ctx.spec, cfg.attention_backend)
    if not all(hasattr(encoder, a) for a in ("forward_features", "pool", "num_features")):
        raise TransferUsageError(f"model '{ctx.spec.model}' is not an encoder (no forward_features/pool): "
                        "linear probing needs one of the registry encoders")
    check_n_last_blocks(encoder, cfg.n_last_blocks, ctx.spec.model)
    if cfg.verify_data and not cfg.fast:  # --fast decodes everything while extracting features anyway
        ctx.verify(("train", "val", "test"), cfg.batch_size, cfg.num_workers)
    if cfg.fast:
        scored, extra = run_fast(cfg, ctx, encoder)
    else:
        scored, extra = run_probe(cfg, ctx, encoder)
    return finalize(ctx, scored, extra, cfg.select_metric)


def check_n_last_blocks(encoder: Any, n_last_blocks: int, name: str) -> None:
    """``--n_last_blocks`` > 1 needs an encoder with a sequence of blocks (ViT, Vim), at least that many."""
    if n_last_blocks == 1:
        return
    from models.encoder import EncoderBase

    if type(encoder).forward_last_blocks is EncoderBase.forward_last_blocks:
        raise TransferUsageError(f"--n_last_blocks {n_last_blocks}: model '{name}' is a hierarchy of feature maps "
                                 "with no sequence of token blocks to read; drop --n_last_blocks")
    if n_last_blocks > encoder.depth:
        raise TransferUsageError(f"--n_last_blocks {n_last_blocks}: model '{name}' has {encoder.depth} blocks")


def main(argv: list[str] | None = None) -> int:
    return run_cli("linprobe", LinprobeConfig, __doc__ or "", argv, run)


if __name__ == "__main__":
    sys.exit(main())
