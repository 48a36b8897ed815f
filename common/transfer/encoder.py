"""Checkpoint -> model for transfer: resolve the architecture, input size and channels, then load.

The architecture comes from ``--model`` or, for our exports, from the ``encoder.json`` written next to
``encoder.safetensors`` (for our pretraining checkpoints ``step_N/``, from their ``train_state.json``);
foreign checkpoints (facebookresearch/mae, MedMAE, timm) need ``--model``.
Weight loading, position-embedding resizing and the strict key check are ``models.checkpoint``'s job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from common.checkpoint import CheckpointError, load_state_dict_any, read_json
from common.transfer.classifier_export import check_reusable
from common.transfer.errors import TransferUsageError
from common.transfer.pooling import accepted_kwargs, choose_pool
from common.transfer.transforms import default_normalization


@dataclass
class EncoderSpec:
    """Everything needed to rebuild the classifier: registry name, constructor kwargs, preprocessing."""

    model: str
    kwargs: dict[str, Any]
    input_size: int
    in_chans: int
    mean: list[float]
    std: list[float]
    checkpoint: str | None = None
    source: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "kwargs": self.kwargs, "input_size": self.input_size,
                "in_chans": self.in_chans, "normalization": {"mean": self.mean, "std": self.std},
                "checkpoint": self.checkpoint, "source": self.source}


def sidecar_json(checkpoint: str | Path) -> Path | None:
    """``encoder.json`` for ``encoder.safetensors`` (``X.json`` for ``X.safetensors``), if present."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "encoder.safetensors"
    candidate = path.with_suffix(".json")
    return candidate if path.suffix == ".safetensors" and candidate.is_file() else None


TRAIN_STATE = "train_state.json"
TRAIN_WEIGHTS = "model.safetensors"


def _checkpoint_file(checkpoint: str | Path) -> Path:
    path = Path(checkpoint)
    if path.is_dir():
        folder = path
        path = path / (TRAIN_WEIGHTS if (path / TRAIN_STATE).is_file() else "encoder.safetensors")
        if not path.is_file():
            steps = sorted(folder.glob(f"*/{TRAIN_STATE}"))
            hint = (f"it holds pretraining checkpoints: pass one of them, e.g. {steps[-1].parent} (the latest)"
                    if steps else f"pass the encoder.safetensors a pretraining run exported, or a "
                    f"checkpoints/step_N folder (with {TRAIN_STATE} and {TRAIN_WEIGHTS})")
            raise CheckpointError(f"--finetune {folder}: this folder has no encoder.safetensors and no "
                                  f"{TRAIN_STATE}; {hint}")
    if not path.is_file():
        raise CheckpointError(f"--finetune {path}: checkpoint not found")
    check_checkpoint_bytes(path, "--finetune")
    return path


def check_checkpoint_bytes(path: Path, flag: str) -> None:
    """Refuse a file that is neither safetensors nor a torch checkpoint by its first bytes (an empty or text
    file, an image, ...), with a message instead of the unpickler's (``torch.load`` says e.g. "(105)")."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if not head:
        raise CheckpointError(f"{flag} {path}: empty file (0 bytes), not a checkpoint")
    safetensors = len(head) == 9 and head[8:9] == b"{"
    torch_file = head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"  # torch.save zip, or legacy pickle
    if not (safetensors or torch_file):
        raise CheckpointError(f"{flag} {path}: not a checkpoint (neither a .safetensors file nor a torch "
                              f".pth/.pt file); pass the checkpoint file itself")


def _training_checkpoint_meta(weights: Path) -> dict[str, Any] | None:
    """For a pretraining checkpoint ``RUN/checkpoints/step_N/model.safetensors`` (+ ``train_state.json``):
    the encoder's registry name (the MAE name without ``mae_``) and the run's input normalisation, taken
    from ``RUN/encoder.json`` when the run has exported one."""
    state_path = weights.parent / TRAIN_STATE
    if weights.name != TRAIN_WEIGHTS or not state_path.is_file():
        return None
    from models.registry import REGISTRY

    state = read_json(state_path)
    mae_name = str(state.get("model", ""))
    name = mae_name.removeprefix("mae_")
    if name not in REGISTRY:
        raise CheckpointError(f"{state_path}: model {mae_name!r} has no encoder '{name}' in the registry")
    meta: dict[str, Any] = {"model": name, "source": {"training_checkpoint": str(weights.parent),
                                                      "step": state.get("step"), "mae_model": mae_name}}
    export = weights.parent.parent.parent / "encoder.json"
    if export.is_file():
        meta["normalization"] = read_json(export).get("normalization")
    return meta


def _side(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise CheckpointError(f"non-square input size {value} is not supported by linprobe/finetune")
        return int(value[0])
    return int(value)


def _geometry_from_weights(path: Path) -> tuple[int | None, int | None]:
    """(input channels, input side) of a foreign ViT checkpoint: the channels from the patch-embedding
    kernel ``(D, C, p, p)``, the side from ``p`` times the square grid of ``pos_embed`` (class token or not)."""
    state = load_state_dict_any(path)
    kernel = next((t for k, t in state.items() if k.endswith("patch_embed.proj.weight") and t.ndim == 4), None)
    if kernel is None:
        return None, None
    chans, patch = int(kernel.shape[1]), int(kernel.shape[-1])
    pos = next((t for k, t in state.items() if k.endswith("pos_embed") and not k.startswith("decoder")
                and t.ndim == 3), None)
    side = None
    if pos is not None:
        for prefix in (1, 0):
            grid = math.isqrt(pos.shape[1] - prefix)
            if grid > 0 and grid * grid == pos.shape[1] - prefix:
                side = grid * patch
                break
    return chans, side


def resolve_spec(model: str | None, checkpoint: str | None, input_size: int | None, in_chans: int | None,
                 num_classes: int, global_pool: bool | None, drop_path: float | None,
                 default_pool: str = "avg") -> EncoderSpec:
    """Decide the architecture and preprocessing before anything is built; errors name the file.

    ``global_pool``: True / False force average / class-token pooling; None takes the pooling recorded by a
    fine-tuned checkpoint, else ``default_pool``, and averages for models without a class token.
    """
    meta: dict[str, Any] = {}
    ckpt_path: Path | None = None
    training = False
    if checkpoint:
        ckpt_path = _checkpoint_file(checkpoint)
        side = sidecar_json(ckpt_path)
        meta = read_json(side) if side is not None else {}
        if side is not None:
            check_reusable(meta, str(side))
        training_meta = _training_checkpoint_meta(ckpt_path)
        if training_meta is not None:
            meta, training = training_meta, True
    recorded = meta.get("model")
    if model and recorded and model != recorded:
        raise CheckpointError(f"{ckpt_path}: checkpoint holds a '{recorded}' encoder (per its encoder.json) "
                              f"but --model is '{model}'")
    name = model or recorded
    if not name:
        raise CheckpointError(f"{ckpt_path}: no encoder.json next to the checkpoint, so the architecture is "
                              "unknown; pass --model (e.g. vit_base_patch16)" if ckpt_path else
                              "no --model given and no --finetune checkpoint to read it from")
    kwargs = dict(meta.get("kwargs") or {}) if recorded else {}
    from_weights = ckpt_path is not None and (training or not recorded)
    foreign_chans, foreign_side = _geometry_from_weights(ckpt_path) if from_weights else (None, None)
    size = input_size or _side(meta.get("img_size")) or _side(kwargs.get("img_size")) or foreign_side or 224
    chans = int(in_chans or meta.get("in_chans") or kwargs.get("in_chans") or foreign_chans or 3)
    norm = meta.get("normalization") or {}
    mean, std = default_normalization(chans)
    if norm.get("mean") and norm.get("std"):
        mean, std = list(norm["mean"]), list(norm["std"])
    kwargs.update(img_size=size, in_chans=chans, num_classes=num_classes)
    kwargs["global_pool"] = choose_pool(name, kwargs, global_pool, meta.get("global_pool"), default_pool)
    if drop_path is not None:
        kwargs["drop_path_rate"] = drop_path
    return EncoderSpec(model=name, kwargs=kwargs, input_size=size, in_chans=chans, mean=mean, std=std,
                       checkpoint=str(ckpt_path) if ckpt_path else None, source=dict(meta.get("source") or {}))


def build_model(spec: EncoderSpec, attention_backend: str = "sdpa") -> nn.Module:
    """Create the model and load the checkpoint (if any) through ``models.create_model``, its attention blocks on
    ``attention_backend`` (``models.layers.ATTENTION_BACKENDS``)."""
    import models
    from models.layers import set_backend

    try:
        model = models.create_model(spec.model, pretrained=spec.checkpoint,
                                    **accepted_kwargs(spec.model, spec.kwargs))
    except KeyError as exc:
        raise CheckpointError(f"--model: {exc.args[0] if exc.args else exc}") from exc
    except (RuntimeError, ValueError) as exc:
        if spec.checkpoint and spec.checkpoint not in str(exc):
            raise CheckpointError(f"{spec.checkpoint}: does not fit model '{spec.model}': {exc}") from exc
        raise
    try:
        set_backend(model, "attention_backend", attention_backend)
    except ValueError as exc:  # heads our kernels do not take
        raise TransferUsageError(f"--attention_backend: {exc}") from exc
    return model
