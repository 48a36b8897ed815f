"""MAE pretraining entry point.

``python pretrain/main.py [--config cfg.yaml] [flags]`` or ``accelerate launch [--config_file
launch/accelerate/...] pretrain/main.py ...``. Without any argument it runs ``configs/demo.yaml``.
Exit codes: 0 done, 1 non-finite loss (nothing saved), 2 bad configuration, 75 preempted (checkpoint saved).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs, ProjectConfiguration  # noqa: E402

from common.config import ConfigError, build_parser, config_to_dict, parse_config, save_config  # noqa: E402
from common.data import (  # noqa: E402
    DataSourceError,
    ImageDataset,
    ImageLoader,
    build_dataset,
    build_loader,
    default_normalization,
)
from common.data.resident import ResidentLoader, decode_all, resident_bytes  # noqa: E402
from common.logging import JsonlLogger, get_logger  # noqa: E402
from common.optim import use_fused_adamw  # noqa: E402
from common.seed import seed_everything, set_deterministic  # noqa: E402
from common.torch_compile import compile_in_place  # noqa: E402
from models.layers import check_attention_backend, set_backend  # noqa: E402
from pretrain.checkpointing import CheckpointManager, CheckpointMismatch  # noqa: E402
from pretrain.config import DEMO_CONFIG, REPO_ROOT, PretrainConfig  # noqa: E402
from pretrain.deepspeed_settings import fill_script_fields  # noqa: E402
from pretrain.engine import EXIT_OK, TrainContext, train  # noqa: E402
from pretrain.export import export_final_encoder  # noqa: E402
from pretrain.flops import peak_flops, train_flops_per_image  # noqa: E402
from pretrain.master_weights import MasterWeights  # noqa: E402
from pretrain.monitor import KnnMonitor  # noqa: E402
from pretrain.precision import BF16_WEIGHTS, PRECISIONS  # noqa: E402
from pretrain.preempt import PreemptionFlag  # noqa: E402
from pretrain.profiling import ProfileSpecError, StepProfiler, parse_profile_steps  # noqa: E402
from pretrain.schedule import Schedule, absolute_lr, build_optimizer  # noqa: E402

EXIT_CONFIG = 2
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def validate(cfg: PretrainConfig) -> PretrainConfig:
    """Check values and resolve a relative ``data_path`` against the repository when not found here."""
    import models  # the registry (kept out of module import: `--help` stays fast)

    try:
        kind = models.REGISTRY.spec(cfg.model).kind
    except KeyError as exc:
        raise ConfigError(f"--model: {exc.args[0]}") from None
    if kind != "mae":
        hint = f" (here mae_{cfg.model})" if f"mae_{cfg.model}" in models.REGISTRY else ""
        article = "an" if kind[0] in "aeiou" else "a"
        raise ConfigError(f"--model {cfg.model} is {article} {kind} model, not an MAE: pretraining takes an mae_* "
                          f"name{hint}; see models.list_models(kind='mae')")
    if not cfg.data_path:
        raise ConfigError("data_path is empty: give --data_path (shard dir, tar pattern, ImageFolder, .npz, CSV)")
    if not Path(cfg.data_path).exists() and "{" not in cfg.data_path and (REPO_ROOT / cfg.data_path).exists():
        cfg.data_path = str(REPO_ROOT / cfg.data_path)
    for name in ("batch_size", "accum_iter", "epochs", "input_size", "in_chans", "save_every", "log_every"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    if cfg.compile_mode not in COMPILE_MODES:
        raise ConfigError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {cfg.compile_mode!r}")
    if cfg.ddp_comm_hook not in ("no", "bf16", "fp16") or cfg.ddp_bucket_mb < 1:
        raise ConfigError(f"ddp_comm_hook must be no, bf16 or fp16 and ddp_bucket_mb >= 1, got "
                          f"{cfg.ddp_comm_hook!r}, {cfg.ddp_bucket_mb}")
    try:
        check_attention_backend(cfg.attention_backend)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if cfg.interpolation not in ("bicubic", "bilinear"):
        raise ConfigError(f"interpolation must be bicubic or bilinear, got {cfg.interpolation!r}")
    if not 0.0 <= cfg.mask_ratio < 1.0:
        raise ConfigError(f"mask_ratio must be in [0, 1), got {cfg.mask_ratio}")
    if cfg.monitor_every < 0 or cfg.monitor_k < 1 or cfg.monitor_max_samples < 0:
        raise ConfigError(f"monitor_every must be >= 0, monitor_k >= 1 and monitor_max_samples >= 0, got "
                          f"{cfg.monitor_every}, {cfg.monitor_k}, {cfg.monitor_max_samples}")
    if cfg.monitor_every and not cfg.monitor_data_path:
        raise ConfigError("--monitor_every needs --monitor_data_path (a labeled set with train and val splits)")
    try:
        parse_profile_steps(cfg.profile_steps)
    except ProfileSpecError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.monitor_data_path and not Path(cfg.monitor_data_path).exists() \
            and (REPO_ROOT / cfg.monitor_data_path).exists():
        cfg.monitor_data_path = str(REPO_ROOT / cfg.monitor_data_path)
    return cfg


def _mixed_precision(cfg: PretrainConfig) -> str | None:
    if cfg.precision == BF16_WEIGHTS:
        return "no"  # the model itself is bf16: no autocast
    if cfg.precision != "auto":
        return cfg.precision
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):  # set by `accelerate launch --config_file`
        return None
    return "bf16" if torch.cuda.is_available() else "no"


def build_accelerator(cfg: PretrainConfig) -> Accelerator:
    log_dir = cfg.log_dir or str(Path(cfg.output_dir) / "tb")
    trackers = (["tensorboard"] if cfg.tensorboard else []) + (["wandb"] if cfg.wandb else [])
    # Only read when accelerate wraps the model in DDP; a half-precision all-reduce halves the bytes per step.
    ddp = DistributedDataParallelKwargs(bucket_cap_mb=cfg.ddp_bucket_mb,
                                        comm_hook=DDPCommunicationHookType(cfg.ddp_comm_hook))
    accelerator = Accelerator(gradient_accumulation_steps=cfg.accum_iter, mixed_precision=_mixed_precision(cfg),
                              log_with=trackers or None, kwargs_handlers=[ddp],
                              project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=log_dir))
    ds_plugin = accelerator.state.deepspeed_plugin
    if ds_plugin is not None:
        fill_script_fields(ds_plugin.deepspeed_config, cfg.batch_size, cfg.clip_grad)
    return accelerator


def _hparams(cfg: PretrainConfig) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config_to_dict(cfg).items()}


def run(cfg: PretrainConfig) -> int:
    import models  # the registry; imported here so `--help` stays fast

    cfg = validate(cfg)
    accelerator = build_accelerator(cfg)
    logger = get_logger("pretrain")
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    seed_everything(cfg.seed)
    if cfg.deterministic:
        set_deterministic(True)

    dataset = build_dataset(cfg.data_path, split=cfg.split, labeled=False, in_chans=cfg.in_chans,
                            volume_slices=cfg.volume_slices)
    world = accelerator.num_processes
    eff_batch = cfg.batch_size * cfg.accum_iter * world
    steps_per_epoch = len(dataset) // eff_batch
    if steps_per_epoch == 0:
        raise ConfigError(f"{cfg.data_path}: {len(dataset)} samples are fewer than one effective batch of {eff_batch}")
    total_steps = cfg.epochs * steps_per_epoch
    stop_step = min(total_steps, cfg.max_steps) if cfg.max_steps > 0 else total_steps
    lr = absolute_lr(cfg.blr, cfg.lr, eff_batch)
    logger.info(f"data: {dataset}")
    logger.info(f"base lr: {cfg.blr:.3e}  actual lr: {lr:.3e}  effective batch: {eff_batch} "
                f"({cfg.batch_size} x {cfg.accum_iter} accum x {world} processes)")
    logger.info(f"{steps_per_epoch} steps/epoch, schedule {total_steps} steps, this run stops at {stop_step}")

    model = models.create_model(cfg.model, img_size=cfg.input_size, in_chans=cfg.in_chans,
                                norm_pix_loss=cfg.norm_pix_loss)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    try:
        check_attention_backend(cfg.attention_backend, accelerator.device.type == "cuda")
        set_backend(model, "attention_backend", cfg.attention_backend)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    model.to(accelerator.device)
    flops = train_flops_per_image(model, cfg.input_size, cfg.in_chans, cfg.mask_ratio, accelerator.device)
    masters = None
    if cfg.precision == BF16_WEIGHTS:
        if accelerator.state.deepspeed_plugin is not None:
            raise ConfigError("--precision bf16_weights is DeepSpeed's own bf16 mode: with a DeepSpeed config, "
                              "enable its bf16 section instead")
        masters = MasterWeights(model)  # casts the model to bf16
    optimizer = build_optimizer(model, lr, cfg.weight_decay, fused=use_fused_adamw(accelerator), masters=masters)
    if cfg.compile:  # in place, so parameter names, checkpoints and unwrap_model stay those of the eager model
        compile_in_place(model, cfg.compile_mode)
    model, optimizer = accelerator.prepare(model, optimizer)

    checkpoints = CheckpointManager(out, cfg.keep_last)
    start_step = cfg.start_epoch * steps_per_epoch
    resume_from = _resume_path(cfg, checkpoints)
    if resume_from is not None:
        try:
            state = checkpoints.load(accelerator, resume_from, {"model": cfg.model, "input_size": cfg.input_size,
                                                               "in_chans": cfg.in_chans,
                                                               "master_weights": masters is not None})
            if masters is not None:
                masters.load(resume_from)
        except CheckpointMismatch as exc:
            raise ConfigError(str(exc)) from None
        start_step = int(state["step"])
        geometry = {"batch_size": cfg.batch_size, "accum_iter": cfg.accum_iter, "world_size": world,
                    "seed": cfg.seed, "data_on_device": cfg.data_on_device}
        if not cfg.data_on_device:  # the resident order depends on neither
            geometry.update(num_workers=cfg.num_workers, interleave_shards=cfg.interleave_shards)
        # Checkpoints written before --data_on_device existed streamed their data.
        recorded = {k: state.get(k, False if k == "data_on_device" else None) for k in geometry}
        changed = {k: (recorded[k], v) for k, v in geometry.items() if recorded[k] != v}
        if changed:
            logger.warning(f"resuming with changed {changed}: the data order is not the one of the original run")
        logger.info(f"resumed from {resume_from} at step {start_step}")

    mean, std = default_normalization(cfg.in_chans)
    loader = build_train_loader(cfg, dataset, accelerator, start_batch=start_step * cfg.accum_iter)
    if cfg.tensorboard or cfg.wandb:
        accelerator.init_trackers("pretrain", config=_hparams(cfg))
    ds_plugin = accelerator.state.deepspeed_plugin
    zero3 = ds_plugin is not None and ds_plugin.zero_stage == 3
    monitor = _build_monitor(cfg, mean, std) if not zero3 else None
    if zero3 and cfg.monitor_every:
        logger.warning("the kNN monitor is off under ZeRO-3 (rank 0 alone cannot run the sharded encoder)")
    ctx = TrainContext(cfg=cfg, accelerator=accelerator, model=model, optimizer=optimizer, loader=loader,
                       schedule=Schedule(lr, cfg.min_lr, cfg.warmup_epochs * steps_per_epoch, total_steps),
                       steps_per_epoch=steps_per_epoch, stop_step=stop_step, mean=mean, std=std, masters=masters,
                       checkpoints=checkpoints, log=JsonlLogger(out / "log.jsonl", accelerator.is_main_process),
                       flops_per_image=flops, peak_flops=peak_flops(accelerator.device, cfg.peak_tflops),
                       preempt=PreemptionFlag().install(),
                       visualize=not zero3, monitor=monitor,
                       profiler=StepProfiler(parse_profile_steps(cfg.profile_steps), out / "profile",
                                             accelerator.process_index, cfg.profile_trace)
                       if cfg.profile_steps else None)
    try:
        code = train(ctx, start_step)
        if code == EXIT_OK and cfg.export_encoder:
            export_final_encoder(accelerator, model, cfg, {"mean": mean, "std": std}, out, masters)
    finally:
        ctx.preempt.uninstall()
        accelerator.end_training()
    return code


def build_train_loader(cfg: PretrainConfig, dataset: ImageDataset, accelerator: Accelerator,
                       start_batch: int) -> ImageLoader | ResidentLoader:
    """This rank's infinite training stream from ``start_batch`` on: streamed by loader workers, or cut from
    the whole split decoded onto the device (``--data_on_device``)."""
    canvas = cfg.canvas_size or cfg.input_size
    rank, world = accelerator.process_index, accelerator.num_processes
    if not cfg.data_on_device:
        return build_loader(dataset, cfg.batch_size, rank=rank, world_size=world, num_workers=cfg.num_workers,
                            shuffle=True, seed=cfg.seed, infinite=True, start_batch=start_batch,
                            canvas_size=canvas, resampled=cfg.resampled, shuffle_buffer=cfg.shuffle_buffer,
                            interleave_shards=cfg.interleave_shards,
                            pin_memory=cfg.pin_mem and torch.cuda.is_available())
    need = resident_bytes(len(dataset), cfg.in_chans, canvas)
    if need > cfg.data_on_device_max_gb * 1e9:
        raise ConfigError(f"--data_on_device: {cfg.data_path} split {cfg.split!r} is {need / 1e9:.1f} GB as "
                          f"{len(dataset)} uint8 {cfg.in_chans}x{canvas}x{canvas} canvases, over "
                          f"--data_on_device_max_gb {cfg.data_on_device_max_gb:g}; stream it (drop the flag), "
                          f"lower --canvas_size, or raise the limit")
    start = time.perf_counter()
    images, sizes = decode_all(dataset, canvas, num_workers=cfg.num_workers)
    images = images.to(accelerator.device)
    get_logger("pretrain").info(f"data on {accelerator.device}: {images.shape[0]} samples, {need / 1e6:.0f} MB, "
                                f"decoded in {time.perf_counter() - start:.1f} s")
    return ResidentLoader(images, sizes, cfg.batch_size, rank=rank, world_size=world, seed=cfg.seed,
                          start_batch=start_batch)


def _build_monitor(cfg: PretrainConfig, mean: list[float], std: list[float]) -> KnnMonitor | None:
    if not cfg.monitor_every:
        return None
    return KnnMonitor(data_path=cfg.monitor_data_path, every=cfg.monitor_every, k=cfg.monitor_k,
                      max_samples=cfg.monitor_max_samples, input_size=cfg.input_size, in_chans=cfg.in_chans,
                      mean=mean, std=std, batch_size=max(cfg.batch_size, 64), num_workers=min(cfg.num_workers, 4),
                      seed=cfg.seed).open()


def _resume_path(cfg: PretrainConfig, checkpoints: CheckpointManager) -> Path | None:
    if cfg.resume.lower() in ("", "none", "no", "false"):
        return None
    if cfg.resume == "auto":
        return checkpoints.latest()
    path = Path(cfg.resume)
    if (path / "checkpoints").is_dir():  # an output_dir: take its latest checkpoint
        latest = CheckpointManager(path).latest()
        if latest is None:
            raise ConfigError(f"--resume {path}: no complete checkpoint under {path / 'checkpoints'}")
        return latest
    if not path.is_dir():
        raise ConfigError(f"--resume {path}: not a checkpoint directory")
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        argv = ["--config", str(DEMO_CONFIG)]
    parser = build_parser(PretrainConfig, prog="pretrain", description="MAE pretraining on curated medical images")
    try:
        cfg = parse_config(PretrainConfig, argv, parser=parser)
        return run(cfg)
    except (ConfigError, DataSourceError) as exc:
        get_logger("pretrain").error(f"error: {exc}")
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
