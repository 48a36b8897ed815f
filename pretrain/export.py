"""Final export of the pretrained encoder (``encoder.safetensors`` + ``encoder.json``)."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from pretrain.config import PretrainConfig
from pretrain.master_weights import MasterWeights, cpu_float32_state
from pretrain.precision import deepspeed_half_dtype


def export_final_encoder(accelerator: Accelerator, model: nn.Module, cfg: PretrainConfig,
                         normalization: dict[str, list[float]], out_dir: Path,
                         masters: MasterWeights | None = None) -> Path | None:
    """Write the encoder on the main process; under ZeRO-3 the full weights are gathered first, under bf16 weights
    (DeepSpeed's, or ``masters``) the float32 master copies are exported."""
    import models
    from models.checkpoint import export_encoder

    ds_plugin = accelerator.state.deepspeed_plugin
    zero3 = ds_plugin is not None and ds_plugin.zero_stage == 3
    if zero3 or deepspeed_half_dtype(accelerator) is not None or masters is not None:
        # ZeRO-3 shards the weights; ZeRO-1/2 in bf16/fp16 hold 16-bit weights in the module and the float32
        # master copies in the optimizer's partitions. Both are gathered (collectives: every rank takes part).
        # bf16_weights: every rank holds the same masters.
        if masters is not None:
            state = masters.float32_state_dict(accelerator.unwrap_model(model))
        elif zero3:
            state = accelerator.get_state_dict(model)
        else:
            state = zero_fp32_state_dict(accelerator.unwrap_model(model))
        mae = None
        if accelerator.is_main_process:
            mae = models.create_model(cfg.model, img_size=cfg.input_size, in_chans=cfg.in_chans,
                                      norm_pix_loss=cfg.norm_pix_loss)
            mae.load_state_dict(state)
    else:
        mae = accelerator.unwrap_model(model)
    path = None
    if accelerator.is_main_process:
        path = export_encoder(mae, out_dir, normalization=normalization)
    accelerator.wait_for_everyone()
    return path


def zero_fp32_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict with every trained parameter replaced by its float32 ZeRO-1/2 master copy
    (gathered from the optimizer partitions of all ranks); frozen parameters and buffers as stored, in float32."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = cpu_float32_state(module)
    for name, param in module.named_parameters():  # same order on every rank: the all-reduces pair up
        full = safe_get_full_fp32_param(param)
        if full is not None:
            state[name] = full.detach().cpu()
    return state
