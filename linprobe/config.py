"""linprobe settings: facebookresearch/mae ``main_linprobe.py`` flags and defaults, plus ``--fast``."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.transfer.config import TransferConfig, _h


@dataclass
class LinprobeConfig(TransferConfig):
    batch_size: int = field(default=512, metadata=_h("batch size per process"))
    epochs: int = field(default=90, metadata=_h("training epochs"))
    blr: float = field(default=0.1, metadata=_h("base LR: lr = blr * effective batch / 256"))
    warmup_epochs: int = field(default=10, metadata=_h("epochs of linear LR warmup"))
    weight_decay: float = field(default=0.0, metadata=_h("LARS weight decay on the head's weight matrix"))
    global_pool: bool | None = field(default=None, metadata=_h(
        "average-pool the tokens (--cls_token: use the class token); default: the class token, as MAE's "
        "linear probe, unless the model has none (MedMamba, MambaMIC, Vim without one: average pooling) or "
        "the --finetune checkpoint is a fine-tuned classifier (its own pooling)"))
    n_last_blocks: int = field(default=1, metadata=_h(
        "probe the pooled features of the last N blocks, concatenated (DINO's linear evaluation: 4 for ViT-S); "
        "1 = the encoder's output only, as MAE's linear probe. The deepest blocks of an MAE encoder are tuned to "
        "pixel reconstruction; earlier ones can separate classes better"))
    train_aug: str = field(default="crop_flip", metadata=_h(
        "training augmentation: 'crop_flip' (random resized crop + horizontal flip, as MAE) or 'none'"))
    fast: bool = field(default=False, metadata=_h(
        "extract features once (cached on disk) and train one head per --lr_grid value at once, "
        "keeping the best on validation; implies --train_aug none"))
    lr_grid: list[float] = field(default_factory=lambda: [0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0], metadata=_h(
        "base LRs (blr) tried together by --fast"))
    feature_cache: str | None = field(default=None, metadata=_h(
        "folder for --fast feature files (default: OUTPUT_DIR/features)"))
