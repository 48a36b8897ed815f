"""finetune: fine-tune a pretrained encoder (or train a classifier from scratch) on labeled medical images.

Follows facebookresearch/mae main_finetune.py (AdamW, layer-wise LR decay, RandAugment, mixup/cutmix,
label smoothing, random erasing, drop path). Without --finetune the model trains from scratch.
Results: OUTPUT_DIR/results.json, log.jsonl, checkpoint-best.safetensors (+ .json), checkpoint-last.pt.

    finetune --data_path data/ --finetune runs/pretrain/encoder.safetensors --epochs 50
    finetune --data_path data/ --model medmamba_tiny --layer_decay 1.0 --epochs 100
    accelerate launch finetune/main.py --data_path DIR --finetune CKPT
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch finetune/main.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from typing import Any  # noqa: E402

from common.transfer.cli import run_cli  # noqa: E402
from common.transfer.errors import TransferUsageError  # noqa: E402
from finetune.config import FinetuneConfig  # noqa: E402


def run(cfg: FinetuneConfig) -> dict[str, Any]:
    """The whole fine-tuning run for a parsed config; returns what results.json holds."""
    from common.transfer.encoder import build_model
    from common.transfer.report import finalize
    from common.transfer.setup import prepare_run
    from finetune.train import run_finetune

    if cfg.eval and not cfg.resume:
        raise TransferUsageError("--eval needs --resume (a checkpoint-best.safetensors or checkpoint-last.pt)")
    if not 0.0 < cfg.layer_decay <= 1.0:
        raise TransferUsageError(f"--layer_decay must be in (0, 1], got {cfg.layer_decay}")
    if cfg.mixup_mode not in ("batch", "pair", "elem"):
        raise TransferUsageError(f"--mixup_mode must be batch, pair or elem, got {cfg.mixup_mode!r}")
    ctx = prepare_run(cfg, "finetune", classifier_head=True, drop_path=cfg.drop_path, default_pool="avg")
    model = build_model(ctx.spec, cfg.attention_backend)
    if cfg.verify_data:
        ctx.verify(("train", "val", "test"), cfg.batch_size, cfg.num_workers)
    scored, extra = run_finetune(cfg, ctx, model)
    return finalize(ctx, scored, extra, cfg.select_metric)


def main(argv: list[str] | None = None) -> int:
    return run_cli("finetune", FinetuneConfig, __doc__ or "", argv, run)


if __name__ == "__main__":
    sys.exit(main())
