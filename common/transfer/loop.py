"""The epoch loop shared by the slow linear probe and fine-tuning: train, validate, keep the best,
checkpoint for ``--resume``, and score the best weights on the test split."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from common.checkpoint import CheckpointError, load_state_dict_any, save_weights_with_config, torch_load_safe
from common.io import atomic_write_bytes
from common.logging import JsonlLogger, get_logger, progress
from common.transfer.data import LabelSpace
from common.transfer.engine import BatchTransform, LrSchedule, predict, train_one_epoch
from common.transfer.results import headline, score, selection_value

BEST_NAME = "checkpoint-best.safetensors"
LAST_NAME = "checkpoint-last.pt"


@dataclass
class FitParts:
    """What the loop trains, scores and saves.

    ``model`` is the (accelerate-prepared) module that trains; ``scored`` the module evaluated each epoch
    (the model itself, or its EMA copy); ``best`` the module whose weights form ``checkpoint-best`` (the
    probe head, or the scored classifier); ``resumable`` every module whose state ``checkpoint-last``
    keeps.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Any
    scored: nn.Module
    best: nn.Module
    resumable: dict[str, nn.Module]
    batch_transform: BatchTransform | None = None
    after_step: Any = None
    best_meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class FitState:
    start_epoch: int = 0
    best_value: float = float("-inf")
    best_epoch: int = -1
    best_val: dict[str, Any] | None = None


def save_last(path: Path, parts: FitParts, accelerator: Accelerator, epoch: int, state: FitState) -> None:
    """``checkpoint-last.pt``: tensors and plain containers only, so it loads with weights_only=True."""
    payload = {name: accelerator.unwrap_model(m).state_dict() for name, m in parts.resumable.items()}
    payload.update(optimizer=parts.optimizer.state_dict(), epoch=epoch, best_value=state.best_value,
                   best_epoch=state.best_epoch, best_val=state.best_val, architecture=_architecture(parts))
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _architecture(parts: FitParts) -> str:
    """What a last checkpoint records of the run's model, to refuse resuming another one with a short message:
    the kind and the model (a linear probe's encoder) as its best checkpoint names them."""
    meta = parts.best_meta
    model = meta.get("model") or (meta.get("encoder") or {}).get("model", "")
    return f"{meta.get('kind', '')}:{model}"


def load_last(path: str, parts: FitParts, accelerator: Accelerator) -> FitState:
    payload = torch_load_safe(path)
    if not isinstance(payload, dict) or "optimizer" not in payload:
        raise CheckpointError(f"{path}: not a {LAST_NAME} written by linprobe/finetune (keys: "
                              f"{list(payload)[:8] if isinstance(payload, dict) else type(payload).__name__})")
    recorded, current = payload.get("architecture"), _architecture(parts)
    if recorded is not None and recorded != current:  # checkpoints from before it was recorded: shapes decide
        raise CheckpointError(f"{path} was written by another run ({recorded}); this run is {current}")
    for name, module in parts.resumable.items():
        if name not in payload:
            raise CheckpointError(f"{path}: no '{name}' state to resume from (has {sorted(payload)})")
        try:
            accelerator.unwrap_model(module).load_state_dict(payload[name])
        except RuntimeError as exc:  # torch lists every key; the first line says what kind of mismatch it is
            lines = str(exc).splitlines()
            raise CheckpointError(f"{path}: its '{name}' state does not fit this run's model: {lines[0]} "
                                  f"{lines[1].strip()[:200] if len(lines) > 1 else ''}") from None
    parts.optimizer.load_state_dict(payload["optimizer"])
    return FitState(start_epoch=int(payload["epoch"]) + 1, best_value=float(payload["best_value"]),
                    best_epoch=int(payload["best_epoch"]), best_val=payload.get("best_val"))


def check_resume(resume: str, eval_only: bool) -> None:
    """Check ``--resume`` before any data is opened or decoded: the file exists and is a checkpoint of the kind
    the run needs (``--eval`` scores a best or last checkpoint, training continues from a last one only)."""
    if not resume:
        return
    from common.transfer.encoder import check_checkpoint_bytes

    path = Path(resume)
    if path.is_dir():
        inside = [name for name in (LAST_NAME, BEST_NAME) if (path / name).is_file()]
        hint = (f"pass {path / inside[0]}" if inside else
                f"it has no {LAST_NAME}{' or ' + BEST_NAME if eval_only else ''} (is it a linprobe/finetune "
                "output folder?)")
        raise CheckpointError(f"--resume {path}: is a folder, not a checkpoint file; {hint}")
    if not path.is_file():
        raise CheckpointError(f"--resume {path}: file not found")
    check_checkpoint_bytes(path, "--resume")
    if path.suffix == ".safetensors" and not eval_only:
        last = path.parent / LAST_NAME
        raise CheckpointError(f"--resume {path}: a .safetensors file holds weights only, training continues from "
                              f"a {LAST_NAME}" + (f" ({last})" if last.is_file() else "")
                              + "; to score these weights, add --eval")


def start_state(resume: str, start_epoch: int, parts: FitParts, accelerator: Accelerator,
                out_dir: Path | None = None) -> FitState:
    """Where training begins: the state saved in ``resume`` (a ``checkpoint-last.pt``, loaded into
    ``parts``) when one is given, else a fresh state at ``start_epoch``.

    Resuming into another ``out_dir`` than the checkpoint's folder copies that run's best checkpoint along, so
    that the final scoring finds it even when no later epoch beats it."""
    if not resume:
        return FitState(start_epoch=start_epoch)
    state = load_last(resume, parts, accelerator)
    if out_dir is not None and state.best_epoch >= 0:
        _carry_best(Path(resume), out_dir, state.best_epoch, accelerator)
    get_logger("scanmae.transfer").info(f"resumed from {resume} at epoch {state.start_epoch}")
    return state


def _carry_best(resume: Path, out_dir: Path, best_epoch: int, accelerator: Accelerator) -> None:
    if (out_dir / BEST_NAME).is_file() or resume.parent.resolve() == out_dir.resolve():
        return
    source = resume.parent / BEST_NAME
    if not source.is_file():
        raise CheckpointError(f"--resume {resume}: its run's best epoch ({best_epoch}) was saved as {source}, "
                              f"which is missing; resume with --output_dir {resume.parent} or put that file "
                              f"back next to the checkpoint")
    if accelerator.is_main_process:
        import shutil

        for src in (source, source.with_suffix(".json")):
            if src.is_file():
                shutil.copy2(src, out_dir / src.name)
        get_logger("scanmae.transfer").info(f"copied the resumed run's best checkpoint (epoch {best_epoch}) "
                                            f"from {source} to {out_dir}")
    accelerator.wait_for_everyone()


def load_best_weights(module: nn.Module, path: str | Path) -> None:
    """Load ``checkpoint-best.safetensors`` (or the ``head`` / ``model`` entry of a last checkpoint)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state = load_state_dict_any(path)
    else:
        payload = torch_load_safe(path)
        state = next((payload[k] for k in ("head", "ema", "model") if isinstance(payload, dict) and k in payload),
                     None)
        if state is None:
            raise CheckpointError(f"{path}: no 'head' / 'ema' / 'model' weights inside")
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{path}: does not fit this run's {type(module).__name__}: {exc}") from exc
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not fit this run's {type(module).__name__} "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")


def fit(parts: FitParts, train_loader: Any, train_sampler: Any, val_loader: Any, accelerator: Accelerator,
        schedule: LrSchedule, labels: LabelSpace, out_dir: Path, epochs: int, accum_iter: int,
        clip_grad: float | None, select_metric: str, dist_eval: bool, state: FitState,
        log: JsonlLogger, save_every_s: float) -> FitState:
    """Train ``epochs`` epochs from ``state.start_epoch``; the best validation epoch is saved as it occurs, the
    last state (for ``--resume``) after the final epoch and whenever ``save_every_s`` seconds have passed."""
    logger = get_logger("scanmae.transfer")
    main = accelerator.is_main_process
    last_write = time.monotonic()
    for epoch in progress(range(state.start_epoch, epochs), total=epochs - state.start_epoch, desc="epochs"):
        train_sampler.set_epoch(epoch)
        train = train_one_epoch(parts.model, train_loader, parts.optimizer, parts.loss_fn, accelerator, epoch,
                                schedule, accum_iter, clip_grad, parts.batch_transform, parts.after_step)
        scores, targets = predict(parts.scored, val_loader, accelerator, labels.multilabel, dist_eval, "val")
        val = score(scores, targets, labels.multilabel, labels.class_names)
        value = selection_value(val, select_metric)
        improved = value > state.best_value
        if improved:
            state.best_value, state.best_epoch, state.best_val = value, epoch, val
            if main:
                best = accelerator.unwrap_model(parts.best)
                save_weights_with_config(best.state_dict(), {**parts.best_meta, "epoch": epoch,
                                                             "val": headline(val)}, out_dir / BEST_NAME)
        if main and (epoch + 1 == epochs or time.monotonic() - last_write >= save_every_s):
            save_last(out_dir / LAST_NAME, parts, accelerator, epoch, state)
            last_write = time.monotonic()
        log.log({"epoch": epoch, "train_loss": train["loss"], "lr": train["lr"],
                 **{f"val_{k}": v for k, v in headline(val).items()}, "best": improved})
        shown = val.get(select_metric)
        shown = f"{shown:.4f}" if isinstance(shown, float) else shown  # None or NaN when undefined on this split
        logger.info(f"epoch {epoch}: train loss {train['loss']:.4f}, val {select_metric} "
                    f"{shown} (best {state.best_value:.4f} @ {state.best_epoch})")
        accelerator.wait_for_everyone()
    return state


def score_best(parts: FitParts, out_dir: Path, loaders: dict[str, Any], accelerator: Accelerator,
               labels: LabelSpace, dist_eval: bool, n_bootstrap: int, seed: int) -> dict[str, dict[str, Any]]:
    """Reload ``checkpoint-best`` into the best module and score every split in ``loaders``."""
    from common.transfer.report import evaluate_splits

    load_best_weights(accelerator.unwrap_model(parts.best), out_dir / BEST_NAME)
    return evaluate_splits(parts.scored, loaders, accelerator, labels, dist_eval, n_bootstrap, seed)
