"""Settings of a pretraining run; flag names and meanings follow facebookresearch/mae ``main_pretrain.py``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"


def _h(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class PretrainConfig:
    # --- facebookresearch/mae flags (same names, meanings and defaults) ---
    model: str = field(default="mae_vit_large_patch16", metadata=_h("MAE model name from models.list_models()"))
    input_size: int = field(default=224, metadata=_h("image size fed to the model"))
    mask_ratio: float = field(default=0.75, metadata=_h("fraction of patches removed"))
    norm_pix_loss: bool = field(default=False, metadata=_h("per-patch normalised pixels as targets"))
    batch_size: int = field(default=64, metadata=_h("batch size per GPU (effective = batch_size x accum_iter x GPUs)"))
    accum_iter: int = field(default=1, metadata=_h("gradient accumulation steps"))
    epochs: int = field(default=400, metadata=_h("epochs of the schedule (epoch = sample count / effective batch)"))
    warmup_epochs: float = field(default=40, metadata=_h("epochs of linear LR warmup"))
    blr: float = field(default=1e-3, metadata=_h("base LR: lr = blr x effective batch / 256"))
    lr: float | None = field(default=None, metadata=_h("absolute LR (overrides blr)"))
    min_lr: float = field(default=0.0, metadata=_h("final LR of the cosine schedule"))
    weight_decay: float = field(default=0.05, metadata=_h("AdamW weight decay (not on norms, biases, tokens, positions)"))
    data_path: str = field(default="", metadata=_h("curated shard dir, tar brace pattern, ImageFolder, .npz or CSV"))
    output_dir: str = field(default="./output_dir", metadata=_h("checkpoints, logs, visualisations, exported encoder"))
    log_dir: str | None = field(default=None, metadata=_h("TensorBoard dir (default: OUTPUT_DIR/tb)"))
    resume: str = field(default="auto", metadata=_h("'auto' (latest checkpoint in output_dir), 'none', or a checkpoint dir"))
    start_epoch: int = field(default=0, metadata=_h("schedule position to start at when not resuming"))
    num_workers: int = field(default=10, metadata=_h("data loader worker processes per GPU"))
    pin_mem: bool = field(default=True, metadata=_h("pin host memory of batches (CUDA only)"))
    seed: int = field(default=0, metadata=_h("seed of init, data order, augmentation and masks"))
    # --- ours ---
    in_chans: int = field(default=3, metadata=_h("model input channels (gray repeated, RGB -> luminance for 1)"))
    split: str = field(default="train", metadata=_h("split of the data to pretrain on"))
    max_steps: int = field(default=0, metadata=_h("stop after this many optimizer steps (0: run the schedule); "
                                                   "the schedule is unchanged"))
    save_every: int = field(default=1000, metadata=_h("checkpoint every N optimizer steps (and at the end)"))
    keep_last: int = field(default=3, metadata=_h("checkpoints kept"))
    vis_every: int = field(default=1000, metadata=_h("reconstruction grid PNG every N steps (0: never)"))
    vis_samples: int = field(default=8, metadata=_h("images in the reconstruction grid"))
    log_every: int = field(default=20, metadata=_h("log.jsonl / TensorBoard record every N steps"))
    compile: bool = field(default=False, metadata=_h("torch.compile the model (fused AdamW stays eager)"))
    attention_backend: str = field(default="auto", metadata=_h("attention blocks on 'auto' (kernels/triton_attention.py "
                                                                "on CUDA wherever it applies; SDPA on the CPU, with "
                                                                "attention dropout or heads it does not take), 'sdpa' "
                                                                "(torch's) or 'triton' (ours, CUDA or the interpreter)"))
    compile_mode: str = field(default="default", metadata=_h("torch.compile mode: default, reduce-overhead (CUDA "
                                                             "graphs), max-autotune, max-autotune-no-cudagraphs"))
    ddp_comm_hook: str = field(default="no", metadata=_h("DDP gradient all-reduce in 'no' (float32), 'bf16' or 'fp16' "
                                                         "(half the bytes; multi-GPU DDP only)"))
    ddp_bucket_mb: int = field(default=25, metadata=_h("DDP gradient bucket size in MB"))
    grad_checkpointing: bool = field(default=False, metadata=_h("activation checkpointing in the encoder"))
    clip_grad: float | None = field(default=None, metadata=_h("max gradient norm (none: no clipping)"))
    precision: str = field(default="auto", metadata=_h("'auto' (bf16 autocast on CUDA, else fp32), 'bf16', 'fp16', 'no', "
                                                       "or 'bf16_weights' (the model in bf16 without autocast, float32 "
                                                       "master weights in the optimizer: pretrain/master_weights.py)"))
    canvas_size: int = field(default=0, metadata=_h("loader canvas (0: input_size); crops are cut from it on the GPU"))
    min_crop_scale: float = field(default=0.2, metadata=_h("RandomResizedCrop scale lower bound"))
    hflip: float = field(default=0.5, metadata=_h("horizontal flip probability"))
    intensity_aug: float = field(default=0.0, metadata=_h("brightness/contrast jitter strength (0: off)"))
    interpolation: str = field(default="bicubic", metadata=_h("'bicubic' or 'bilinear' crop resampling"))
    shuffle_buffer: int = field(default=2000, metadata=_h("samples in the shuffle buffer of each worker"))
    interleave_shards: int = field(default=4, metadata=_h("shards each worker reads at once, one sample from each "
                                                          "in turn, so a batch mixes shards (and sources)"))
    resampled: bool | None = field(default=None, metadata=_h("draw shards with replacement (default: when shards "
                                                              "< GPUs x workers)"))
    data_on_device: bool = field(default=False, metadata=_h("decode the whole split once and hold it on the "
                                                             "training device, instead of streaming it through "
                                                             "loader workers (small sets: see data_on_device_max_gb)"))
    data_on_device_max_gb: float = field(default=4.0, metadata=_h("largest split, as uint8 canvases, that "
                                                                  "--data_on_device accepts (GB)"))
    volume_slices: bool = field(default=False, metadata=_h("read 3D .npz volumes slice by slice"))
    tensorboard: bool = field(default=True, metadata=_h("log to TensorBoard through accelerate trackers"))
    wandb: bool = field(default=False, metadata=_h("also log to Weights & Biases (needs wandb installed)"))
    peak_tflops: float = field(default=0.0, metadata=_h("accelerator peak TFLOP/s for MFU (0: from the GPU name)"))
    profile_steps: str = field(default="", metadata=_h("A:B: profile optimizer steps A..B (1-based) with torch.profiler "
                                                        "into OUTPUT_DIR/profile/ (per rank; empty: off)"))
    profile_trace: bool = field(default=False, metadata=_h("with --profile_steps, also write the Chrome trace"))
    deterministic: bool = field(default=False, metadata=_h("deterministic kernels (slower)"))
    export_encoder: bool = field(default=True, metadata=_h("write encoder.safetensors + encoder.json at the end"))
    monitor_data_path: str = field(default="", metadata=_h("labeled data (.npz, ImageFolder, CSV, curated shards) "
                                                           "with train and val splits for the kNN monitor"))
    monitor_every: int = field(default=0, metadata=_h("kNN monitor every N optimizer steps and at the end (0: off)"))
    monitor_k: int = field(default=20, metadata=_h("neighbours of the kNN monitor"))
    monitor_max_samples: int = field(default=5000, metadata=_h("kNN monitor: at most this many images per split "
                                                               "(a fixed random subset; 0: all)"))
