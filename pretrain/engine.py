"""The pretraining loop: one optimizer step = ``accum_iter`` micro-batches, then logging, visualisation,
checkpointing and the preemption check.

The steady-state step never waits for the GPU: losses stay on the device (``pretrain.health``), the masking
noise and crop parameters travel in pinned asynchronous copies, and the non-finite and preemption checks are one
collective every ``log_every`` steps and before every checkpoint, visualisation and the end. A NaN between two
checks therefore still stops the run before anything is saved, and the message names the first bad step. A stop
signal is acted on at the next check (at most ``log_every`` steps later); keep ``log_every x step time`` well
under the scheduler's grace period (120 s on our clusters).

Randomness per step (crop boxes, flips, masks) comes from generators seeded by (seed, step, micro-batch,
rank), and the data position is ``step x accum_iter`` batches, so a resumed run repeats exactly what an
uninterrupted run would have done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from common.data import ImageLoader, gpu_augment
from common.data.resident import ResidentLoader
from common.logging import JsonlLogger, get_logger, progress
from pretrain.checkpointing import CheckpointManager
from pretrain.config import PretrainConfig
from pretrain.health import CheckResult, StepHealth
from pretrain.master_weights import MasterWeights
from pretrain.monitor import KnnMonitor
from pretrain.precision import forward_autocast
from pretrain.preempt import EXIT_PREEMPTED, PreemptionFlag
from pretrain.profiling import StepProfiler
from pretrain.schedule import Schedule
from pretrain.visualize import save_reconstruction_grid

EXIT_OK = 0
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs
EXIT_NONFINITE = 1
_AUGMENT, _MASK = 0, 1


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; nothing was saved after the last good checkpoint."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step  # the first optimizer step (1-based) whose loss was not finite


def step_generator(seed: int, step: int, micro: int, rank: int, purpose: int) -> torch.Generator:
    """A CPU generator that depends only on its arguments (device independent, resumable)."""
    state = np.random.SeedSequence([seed, step, micro, rank, purpose]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass
class TrainContext:
    cfg: PretrainConfig
    accelerator: Accelerator
    model: nn.Module  # prepared (possibly DDP / DeepSpeed wrapped)
    optimizer: torch.optim.Optimizer
    loader: ImageLoader | ResidentLoader
    schedule: Schedule
    steps_per_epoch: int
    stop_step: int
    mean: list[float]
    std: list[float]
    checkpoints: CheckpointManager
    log: JsonlLogger
    flops_per_image: float | None
    peak_flops: float | None
    preempt: PreemptionFlag
    visualize: bool = True
    monitor: KnnMonitor | None = None  # kNN monitor, run by rank 0 only
    profiler: StepProfiler | None = None  # --profile_steps window
    masters: MasterWeights | None = None  # --precision bf16_weights: the float32 weights the optimizer steps

    @property
    def cuda_graphs(self) -> bool:
        """Whether the compiled model replays CUDA graphs (``--compile`` in a mode that captures them, on CUDA)."""
        c = self.cfg
        return bool(c.compile) and c.compile_mode in CUDA_GRAPH_MODES and self.accelerator.device.type == "cuda"

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.accum_iter * self.accelerator.num_processes


def train_state(ctx: TrainContext, step: int) -> dict[str, Any]:
    """What ``train_state.json`` records next to accelerate's files."""
    c = ctx.cfg
    return {"step": step, "epoch": step / ctx.steps_per_epoch, "data_batches_per_rank": step * c.accum_iter,
            "batch_size": c.batch_size, "accum_iter": c.accum_iter, "world_size": ctx.accelerator.num_processes,
            "num_workers": c.num_workers, "seed": c.seed, "interleave_shards": c.interleave_shards,
            "data_on_device": c.data_on_device, "master_weights": ctx.masters is not None,
            "data_path": c.data_path, "model": c.model, "input_size": c.input_size, "in_chans": c.in_chans,
            "lr": ctx.schedule.lr_at(max(0, step - 1))}


def save_checkpoint(ctx: TrainContext, step: int) -> Path:
    """accelerate's state, ``train_state.json`` and, under bf16_weights, the float32 master weights."""
    writer = ctx.masters.save if ctx.masters is not None else None
    return ctx.checkpoints.save(ctx.accelerator, step, train_state(ctx, step), write_extra=writer)


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device without a sync: a pageable ``.to(cuda)`` waits for the stream, a pinned one queues."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def mark_compiled_step(ctx: TrainContext) -> None:
    """Tell CUDA graphs that a new model call begins and that no output of an earlier call is read again (the
    loss handed on is a copy, the gradients are owned: see ``_own_gradients``). Without it the first H100 run of
    ``--compile_mode reduce-overhead --accum_iter 2`` failed in its backward ("accessing tensor output of CUDAGraphs
    that has been overwritten by a subsequent run")."""
    if ctx.cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()


def _own_gradients(model: nn.Module) -> None:
    """Give every ``.grad`` its own memory. Under CUDA graphs the first backward of a step can hand autograd the
    graph's output buffers as the gradients themselves; the next micro-batch's replay then overwrites them before
    its gradients are added (pytorch/pytorch#169545: accumulated gradients silently wrong in the torch versions
    without the fix). One copy of the gradients per accumulating micro-batch."""
    with torch.no_grad():
        for param in model.parameters():
            if param.grad is not None:
                param.grad = param.grad.clone()


def _micro_step(ctx: TrainContext, batch: dict[str, Any], step: int, micro: int,
                num_patches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward/backward (and the optimizer step at the last micro-batch); returns the detached loss and input."""
    c, acc = ctx.cfg, ctx.accelerator
    images = batch["image"].to(acc.device, non_blocking=True)  # pinned by the DataLoader on CUDA
    x = gpu_augment(images, batch["size"], c.input_size, ctx.mean, ctx.std,
                    generator=step_generator(c.seed, step, micro, acc.process_index, _AUGMENT),
                    scale=(c.min_crop_scale, 1.0), hflip=c.hflip, interpolation=c.interpolation,
                    intensity=c.intensity_aug)
    # The same numbers the model would draw from this generator, made on the CPU and sent ahead asynchronously.
    noise = torch.rand(images.shape[0], num_patches,
                       generator=step_generator(c.seed, step, micro, acc.process_index, _MASK))
    with acc.accumulate(ctx.model):
        mark_compiled_step(ctx)
        loss, _, _ = ctx.model(x, mask_ratio=c.mask_ratio, noise=to_device_async(noise, acc.device))
        acc.backward(loss)
        if not acc.sync_gradients and ctx.cuda_graphs:  # the next micro-batch adds to these gradients
            _own_gradients(ctx.model)
        if acc.sync_gradients and ctx.masters is not None:
            ctx.masters.grads_to_masters()  # the bf16 gradients, all-reduced and accumulated, as float32
        if acc.sync_gradients and c.clip_grad:
            # the parameters the optimizer steps (the masters under bf16_weights); returns a tensor: no sync
            acc.clip_grad_norm_([p for group in ctx.optimizer.param_groups for p in group["params"]], c.clip_grad)
        ctx.optimizer.step()
        ctx.optimizer.zero_grad(set_to_none=True)
        if acc.sync_gradients and ctx.masters is not None:
            ctx.masters.masters_to_model()
    # A copy: under CUDA graphs the loss lives in the graph's memory, which the next micro-batch's replay overwrites
    # while this step's sum (accum_iter > 1) still holds it.
    return loss.detach().to(torch.float32, copy=True), x


def _check_due(ctx: TrainContext, step: int) -> bool:
    """Steps where all ranks read the health state: logs, checkpoints, pictures and the end (same on every rank)."""
    c = ctx.cfg
    return (step % c.log_every == 0 or step == ctx.stop_step or step % c.save_every == 0
            or bool(c.vis_every and step % c.vis_every == 0))


def _non_finite(ctx: TrainContext, status: CheckResult, step: int) -> NonFiniteLossError:
    last = ctx.checkpoints.latest()
    lr = ctx.schedule.lr_at(status.first_bad_step - 1)
    return NonFiniteLossError(
        f"non-finite loss ({status.first_bad_loss}) at step {status.first_bad_step} (found at the check after "
        f"step {step}), lr {lr:.6g}; stopped without saving; last good checkpoint: "
        f"{last if last else 'none (no checkpoint written yet)'}", status.first_bad_step)


def _record(ctx: TrainContext, step: int, loss: float, lr: float, steps: int, seconds: float) -> dict[str, Any]:
    img_s = steps * ctx.global_batch / max(seconds, 1e-9)
    rec: dict[str, Any] = {"step": step, "epoch": round(step / ctx.steps_per_epoch, 4), "loss": loss, "lr": lr,
                           "img_per_s": round(img_s, 2),
                           "eta_s": round((ctx.stop_step - step) * seconds / max(steps, 1), 1)}
    if ctx.flops_per_image:
        per_gpu = ctx.flops_per_image * img_s / ctx.accelerator.num_processes
        rec["tflops_per_gpu"] = float(f"{per_gpu / 1e12:.4g}")
        if ctx.peak_flops:
            rec["mfu"] = float(f"{per_gpu / ctx.peak_flops:.4g}")
    return rec


def _visualize(ctx: TrainContext, x: torch.Tensor, step: int) -> None:
    if not (ctx.visualize and ctx.accelerator.is_main_process):
        return
    mae = ctx.accelerator.unwrap_model(ctx.model)
    path = Path(ctx.cfg.output_dir) / "vis" / f"step_{step:08d}.png"
    mark_compiled_step(ctx)
    with forward_autocast(ctx.accelerator):
        save_reconstruction_grid(mae, x[: ctx.cfg.vis_samples].detach(), ctx.cfg.mask_ratio, ctx.mean, ctx.std,
                                 path, seed=ctx.cfg.seed)


def _monitor(ctx: TrainContext, step: int, bar: Any, postfix: dict[str, str]) -> None:
    metrics = ctx.monitor.run(ctx.model, ctx.accelerator)
    # An event record: readers of the loss curve (bench.scaling, the demo report) skip it.
    rec = {"event": "monitor", "step": step, "epoch": round(step / ctx.steps_per_epoch, 4), **metrics}
    ctx.log.log(rec)
    ctx.accelerator.log({k: v for k, v in metrics.items() if k in ("knn_acc", "knn_auc")}, step=step)
    postfix.update({k: f"{metrics[k]:.3f}" for k in ("knn_acc", "knn_auc") if k in metrics})
    bar.set_postfix(postfix)


def train(ctx: TrainContext, start_step: int) -> int:
    """Run from ``start_step`` to ``ctx.stop_step``; returns the process exit code."""
    c, acc = ctx.cfg, ctx.accelerator
    logger = get_logger("pretrain")
    step = start_step
    num_patches = int(acc.unwrap_model(ctx.model).num_patches)
    health = StepHealth(acc.device)
    batches = iter(ctx.loader)
    bar = progress(total=ctx.stop_step, initial=step, desc="pretrain", disable=not acc.is_main_process)
    t0 = time.perf_counter()
    postfix: dict[str, str] = {}
    try:
        while step < ctx.stop_step:
            lr = ctx.schedule.lr_at(step)
            for group in ctx.optimizer.param_groups:
                group["lr"] = lr
            step_loss = None
            if ctx.profiler is not None:
                ctx.profiler.before_step(step + 1)
            for micro in range(c.accum_iter):
                loss, x = _micro_step(ctx, next(batches), step, micro, num_patches)
                step_loss = loss if step_loss is None else step_loss + loss
            step += 1
            if ctx.profiler is not None and (report := ctx.profiler.after_step(step)) is not None:
                logger.info(f"profile of steps {c.profile_steps} written to {report}")
            health.add(step, step_loss / c.accum_iter)
            bar.update(1)
            status = health.check(acc, ctx.preempt.requested) if _check_due(ctx, step) else None
            if status is not None:
                if status.first_bad_step:
                    raise _non_finite(ctx, status, step)
                if step % c.log_every == 0 or step == ctx.stop_step:
                    rec = _record(ctx, step, status.loss, lr, health.steps, time.perf_counter() - t0)
                    postfix.update(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{rec['img_per_s']:.0f}")
                    bar.set_postfix(postfix)
                    ctx.log.log(rec)
                    acc.log({k: v for k, v in rec.items() if k != "step"}, step=step)
                    health.reset_window()
                    t0 = time.perf_counter()
                if c.vis_every and (step % c.vis_every == 0 or step == ctx.stop_step):
                    _visualize(ctx, x, step)  # also at the last step, so every run ends with a picture
            if ctx.monitor is not None and acc.is_main_process and ctx.monitor.due(step, ctx.stop_step):
                _monitor(ctx, step, bar, postfix)
            if status is not None and status.preempt:
                path = save_checkpoint(ctx, step)
                logger.info(f"preemption signal received: checkpoint {path} saved, exiting with {EXIT_PREEMPTED}")
                ctx.log.log({"event": "preempted", "step": step, "checkpoint": str(path)})
                return EXIT_PREEMPTED
            if step % c.save_every == 0 or step == ctx.stop_step:  # always a check step (see _check_due)
                save_checkpoint(ctx, step)
    except NonFiniteLossError as exc:
        logger.error(str(exc))
        ctx.log.log({"event": "non_finite_loss", "step": exc.step, "message": str(exc)})
        return EXIT_NONFINITE
    finally:
        bar.close()
        del batches
    if start_step >= ctx.stop_step:
        save_checkpoint(ctx, step)
    return EXIT_OK
