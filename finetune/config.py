"""finetune settings: facebookresearch/mae ``main_finetune.py`` flags and defaults, plus EMA and
class-weighted / multi-label losses."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.transfer.config import TransferConfig, _h


@dataclass
class FinetuneConfig(TransferConfig):
    min_lr: float = field(default=1e-6, metadata=_h("LR at the end of the cosine schedule"))
    layer_decay: float = field(default=0.75, metadata=_h("layer-wise LR decay (1.0 = off)"))
    drop_path: float = field(default=0.1, metadata=_h("stochastic depth rate"))
    clip_grad: float | None = field(default=None, metadata=_h("max gradient norm (default: no clipping)"))

    # augmentation (timm)
    color_jitter: float | None = field(default=None, metadata=_h("color jitter factor (only without --aa)"))
    aa: str | None = field(default="rand-m9-mstd0.5-inc1", metadata=_h(
        "timm AutoAugment / RandAugment policy, e.g. rand-m9-mstd0.5-inc1; 'none' disables"))
    smoothing: float = field(default=0.1, metadata=_h("label smoothing"))
    reprob: float = field(default=0.25, metadata=_h("random erase probability"))
    remode: str = field(default="pixel", metadata=_h("random erase mode"))
    recount: int = field(default=1, metadata=_h("random erase count"))
    mixup: float = field(default=0.0, metadata=_h("mixup alpha (> 0 enables)"))
    cutmix: float = field(default=0.0, metadata=_h("cutmix alpha (> 0 enables)"))
    cutmix_minmax: list[float] | None = field(default=None, metadata=_h("cutmix min/max area ratio"))
    mixup_prob: float = field(default=1.0, metadata=_h("probability of applying mixup or cutmix"))
    mixup_switch_prob: float = field(default=0.5, metadata=_h("probability of cutmix when both are on"))
    mixup_mode: str = field(default="batch", metadata=_h("'batch', 'pair' or 'elem'"))

    # beyond MAE
    model_ema: bool = field(default=False, metadata=_h("keep an exponential moving average of the weights "
                                                        "and evaluate it"))
    model_ema_decay: float = field(default=0.9999, metadata=_h("EMA decay per optimizer step"))
    class_weighted_loss: bool = field(default=False, metadata=_h(
        "weight the loss by inverse training-class frequency (imbalanced data)"))
