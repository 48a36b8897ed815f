"""Final export of the pretrained encoder (``encoder.safetensors`` + ``encoder.json``)."""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator
from torch import nn

from pretrain.config import PretrainConfig


def export_final_encoder(accelerator: Accelerator, model: nn.Module, cfg: PretrainConfig,
                         normalization: dict[str, list[float]], out_dir: Path) -> Path | None:
    """Write the encoder on the main process; under ZeRO-3 the full weights are gathered first."""
    import models
    from models.checkpoint import export_encoder

    ds_plugin = accelerator.state.deepspeed_plugin
    if ds_plugin is not None and ds_plugin.zero_stage == 3:
        state = accelerator.get_state_dict(model)  # collective: every rank takes part
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
