"""The "auto" fields of launch/deepspeed/*.json that pretrain/main.py fills itself.

accelerate fills batch sizes and precision when it prepares the model; the fields below need the run's own
settings or the installed DeepSpeed version, so they are resolved before that.
"""

from __future__ import annotations

from typing import Any


def deepspeed_bf16_fields() -> set[str]:
    """Keys the installed DeepSpeed accepts in its "bf16" section (its config model forbids unknown keys)."""
    try:
        from deepspeed.runtime.precision_config import DeepSpeedBF16Config
    except ImportError:  # older DeepSpeed: a plain dict read, no per-field model
        return {"enabled"}
    return set(DeepSpeedBF16Config.model_fields)


def fill_script_fields(ds_cfg: dict[str, Any], batch_size: int, clip_grad: float | None,
                       bf16_fields: set[str] | None = None) -> dict[str, Any]:
    """Fill, in place, the "auto" fields accelerate cannot infer without a prepared DataLoader.

    ``bf16.check_grad_overflow`` "auto" becomes false where DeepSpeed knows the key and is dropped where it does
    not: from DeepSpeed 0.19 its bf16 ZeRO optimizer otherwise scans every gradient for inf/NaN and reads the
    flag on the host each step (a device sync that stalls the step), and our own health check already stops a
    run whose loss is not finite before anything is saved.
    """
    if ds_cfg.get("train_micro_batch_size_per_gpu") in (None, "auto"):
        ds_cfg["train_micro_batch_size_per_gpu"] = batch_size
    if ds_cfg.get("gradient_clipping") == "auto":
        ds_cfg["gradient_clipping"] = clip_grad or 0.0
    bf16 = ds_cfg.get("bf16")
    if isinstance(bf16, dict) and bf16.get("check_grad_overflow") == "auto":
        fields = deepspeed_bf16_fields() if bf16_fields is None else bf16_fields
        if "check_grad_overflow" in fields:
            bf16["check_grad_overflow"] = False
        else:
            del bf16["check_grad_overflow"]
    return ds_cfg
