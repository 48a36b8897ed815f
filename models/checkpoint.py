"""Encoder export and checkpoint import.

Export: ``export_encoder(model_or_mae, out_dir)`` writes ``encoder.safetensors`` (encoder weights, no
classifier head) and ``encoder.json`` (registry name, the kwargs to rebuild it, geometry, the input
normalisation); ``load_exported_encoder(path)`` rebuilds it.

Import: ``load_pretrained(model, path)`` accepts our exports, facebookresearch/mae and MedMAE checkpoints
(``{"model": state_dict}``, pretraining or fine-tuning layout) and timm ViT state dicts. Files are read
with safetensors or ``torch.load(weights_only=True)``; a file holding pickled objects is refused.
``filter_state_dict`` adapts the keys to the model: wrapper prefixes stripped, the MAE decoder dropped,
position embeddings resized, the patch projection adapted to another channel count, a classifier head of
another class count dropped. Loading is strict except for an explicit list of keys allowed to be missing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.checkpoint import CheckpointError, load_state_dict_any, read_json, save_weights_with_config
from common.logging import get_logger
from models.layers import is_perfect_square, resize_pos_embed, sincos_pos_embed_2d
from models.mae import MaskedAutoencoder

ENCODER_WEIGHTS = "encoder.safetensors"
ENCODER_CONFIG = "encoder.json"
EXPORT_FORMAT_VERSION = 1
# Prefixes added by DDP / DeepSpeed and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# kwargs that describe how an encoder is used downstream, not its architecture: not exported.
USAGE_KWARGS = ("num_classes", "global_pool", "fc_norm", "drop_rate", "attn_drop_rate", "drop_path_rate",
                "learned_pos_embed", "scan_backend")
MAE_DECODER_PREFIXES = ("decoder_", "mask_token")


@dataclass
class FilteredCheckpoint:
    state_dict: dict[str, torch.Tensor]
    dropped: dict[str, str] = field(default_factory=dict)        # key -> why
    adapted: list[str] = field(default_factory=list)              # human-readable notes
    expected_missing: set[str] = field(default_factory=set)       # model keys allowed to stay missing


@dataclass
class LoadReport:
    path: str
    loaded: int
    missing: list[str]
    unexpected: list[str]
    dropped: dict[str, str]
    adapted: list[str]


# -- export -----------------------------------------------------------------------------------------------
def _encoder_of(model: nn.Module) -> nn.Module:
    return model.encoder if isinstance(model, MaskedAutoencoder) else model


def export_encoder(model: nn.Module, out_dir: str | Path, normalization: dict[str, list[float]] | None = None,
                   source: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``out_dir/encoder.safetensors`` and ``out_dir/encoder.json``; returns both paths.

    ``model`` is a registry encoder or a ``MaskedAutoencoder`` (its encoder is exported).
    ``normalization`` is ``{"mean": [...], "std": [...]}`` per input channel, as used in training.
    """
    encoder = _encoder_of(model)
    name = getattr(encoder, "model_name", None)
    if name is None:
        raise ValueError("export_encoder needs a model built by models.create_model (it records the name)")
    if normalization is not None:
        for key in ("mean", "std"):
            values = normalization.get(key)
            if values is None or len(values) != encoder.in_chans:
                raise ValueError(f"normalization[{key!r}] must list {encoder.in_chans} values, got {values!r}")
    kwargs = {k: v for k, v in getattr(encoder, "model_kwargs", {}).items() if k not in USAGE_KWARGS}
    kwargs["img_size"] = list(encoder.img_size)
    kwargs["in_chans"] = int(encoder.in_chans)
    config = {
        "format_version": EXPORT_FORMAT_VERSION,
        "model": name,
        "kwargs": _jsonable(kwargs),
        "in_chans": int(encoder.in_chans),
        "img_size": list(encoder.img_size),
        "patch_size": int(encoder.patch_size),
        "embed_dim": int(encoder.num_features),
        "num_prefix_tokens": int(encoder.num_prefix_tokens),
        "normalization": normalization,
        "source": source or {},
    }
    weights = {k: v for k, v in encoder.state_dict().items() if not k.startswith("head.")}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return save_weights_with_config(weights, config, out_dir / ENCODER_WEIGHTS)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise ValueError(f"model kwarg value {value!r} cannot be written to encoder.json")


def _resolve_weights_path(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / ENCODER_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def read_export_config(path: str | Path) -> dict[str, Any] | None:
    """The ``encoder.json`` next to an exported weights file (or in an export directory), if any."""
    weights = _resolve_weights_path(path)
    config_path = weights.with_suffix(".json")
    if not config_path.is_file():
        return None
    config = read_json(config_path)
    for key in ("model", "kwargs", "img_size", "patch_size", "in_chans"):
        if key not in config:
            raise CheckpointError(f"{config_path}: missing key {key!r} (not an encoder.json export)")
    return config


def load_exported_encoder(path: str | Path, **overrides: Any) -> nn.Module:
    """Rebuild and load an exported encoder; ``overrides`` (e.g. ``num_classes``, ``img_size``) win."""
    from models.registry import build_model

    weights = _resolve_weights_path(path)
    config = read_export_config(weights)
    if config is None:
        raise CheckpointError(f"{weights}: no {weights.with_suffix('.json').name} next to it")
    model = build_model(config["model"], **{**config["kwargs"], **overrides})
    load_pretrained(model, weights)
    return model


# -- filtering --------------------------------------------------------------------------------------------
def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes shared by every key; reduce our MAE state dict to encoder + decoder keys."""
    sd = dict(state_dict)
    stripped = True
    while stripped and sd:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                stripped = True
    if any(k.startswith("encoder.") for k in sd):
        sd = {k.removeprefix("encoder."): v for k, v in sd.items()
              if k.startswith("encoder.") or k.startswith(MAE_DECODER_PREFIXES)}
    return sd


def _checkpoint_grid(num_grid_tokens: int, source_grid: tuple[int, int] | None, key: str) -> tuple[int, int]:
    if source_grid is not None:
        if source_grid[0] * source_grid[1] != num_grid_tokens:
            raise CheckpointError(f"{key}: {num_grid_tokens} grid tokens do not fit the source grid {source_grid}")
        return tuple(source_grid)
    if not is_perfect_square(num_grid_tokens):
        raise CheckpointError(f"{key}: {num_grid_tokens} grid tokens is not a square grid; "
                              "pass source_grid=(rows, cols) or keep the encoder.json next to the weights")
    side = math.isqrt(num_grid_tokens)
    return (side, side)


def _adapt_pos_embed(weight: torch.Tensor, model: nn.Module, has_cls: bool, source_grid: tuple[int, int] | None,
                     notes: list[str], key: str = "pos_embed") -> torch.Tensor:
    target = model.state_dict()[key]
    prefix_model = int(getattr(model, "num_prefix_tokens", 1))
    grid_model = tuple(model.grid_size)
    prefix_ckpt = 1 if has_cls else 0
    if weight.ndim != 3 or weight.shape[-1] != target.shape[-1]:
        raise CheckpointError(f"{key}: checkpoint shape {tuple(weight.shape)} does not fit the model's "
                              f"{tuple(target.shape)}")
    if weight.shape[1] - prefix_ckpt <= 0:
        raise CheckpointError(f"{key}: shape {tuple(weight.shape)} has no grid tokens")
    grid_ckpt = _checkpoint_grid(weight.shape[1] - prefix_ckpt, source_grid, key)
    prefix_part, grid_part = weight[:, :prefix_ckpt], weight[:, prefix_ckpt:]
    if grid_ckpt != grid_model:
        fixed = sincos_pos_embed_2d(weight.shape[-1], grid_ckpt).unsqueeze(0)
        if torch.allclose(grid_part.float(), fixed, atol=1e-5):
            # A fixed sin-cos table: recompute it exactly for the new grid instead of interpolating.
            grid_part = sincos_pos_embed_2d(weight.shape[-1], grid_model).unsqueeze(0).to(weight.dtype)
            notes.append(f"{key}: sin-cos table recomputed for grid {grid_ckpt} -> {grid_model}")
        else:
            grid_part = resize_pos_embed(grid_part, grid_ckpt, grid_model, 0)
            notes.append(f"{key}: bicubic resize {grid_ckpt} -> {grid_model}")
    if prefix_ckpt != prefix_model:
        if prefix_model == 0:
            prefix_part = prefix_part[:, :0]
        else:
            prefix_part = torch.zeros(1, prefix_model, weight.shape[-1], dtype=weight.dtype)
        notes.append(f"{key}: class-token rows {prefix_ckpt} -> {prefix_model}")
    out = torch.cat([prefix_part, grid_part], dim=1)
    if out.shape != target.shape:
        raise CheckpointError(f"{key}: checkpoint shape {tuple(weight.shape)} does not fit the model's "
                              f"{tuple(target.shape)} after adaptation")
    return out


def _adapt_in_chans(weight: torch.Tensor, in_chans: int, notes: list[str], key: str) -> torch.Tensor:
    """Patch projection of another input channel count: sum to 1 channel, or cycle and rescale."""
    src = weight.shape[1]
    if src == in_chans:
        return weight
    if in_chans == 1:
        adapted = weight.sum(dim=1, keepdim=True)
    else:
        reps = math.ceil(in_chans / src)
        adapted = weight.repeat(1, reps, 1, 1)[:, :in_chans] * (src / in_chans)
    notes.append(f"{key}: input channels {src} -> {in_chans}")
    return adapted


def filter_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module,
                      source_grid: tuple[int, int] | None = None) -> FilteredCheckpoint:
    """Map a foreign or own encoder state dict onto ``model`` (an encoder, not the MAE wrapper)."""
    sd = _strip_prefixes(dict(state_dict))
    result = FilteredCheckpoint(state_dict={})
    own = model.state_dict()
    for key in list(sd):
        if key.startswith(MAE_DECODER_PREFIXES):
            result.dropped[key] = "MAE decoder"
            sd.pop(key)

    has_cls = "cls_token" in sd
    if "pos_embed" in sd and "pos_embed" in own:
        sd["pos_embed"] = _adapt_pos_embed(sd["pos_embed"], model, has_cls, source_grid, result.adapted)
    if "cls_token" in sd and "cls_token" not in own:
        result.dropped["cls_token"] = "model has no class token"
        sd.pop("cls_token")
    proj = "patch_embed.proj.weight"
    if proj in sd and proj in own:
        if sd[proj].shape[2:] != own[proj].shape[2:]:
            raise CheckpointError(f"{proj}: checkpoint patch size {tuple(sd[proj].shape[2:])} differs from the "
                                  f"model's {tuple(own[proj].shape[2:])}")
        sd[proj] = _adapt_in_chans(sd[proj], own[proj].shape[1], result.adapted, proj)

    # Classifier head: keep only when it fits; a missing head is expected (pretrained encoders have none).
    head_keys = [k for k in own if k.startswith("head.")]
    for key in [k for k in sd if k.startswith("head.")]:
        if key not in own or sd[key].shape != own[key].shape:
            result.dropped[key] = "classifier head of another class count"
            sd.pop(key)
    if any(k not in sd for k in head_keys):
        result.expected_missing.update(head_keys)

    # Final norm placement: MAE / timm average pooling moves it after pooling (fc_norm), token pooling
    # keeps it token-wise (norm). Pretraining checkpoints have ``norm``; a fresh ``fc_norm`` is expected.
    fc_norm_keys = [k for k in own if k.startswith("fc_norm.")]
    norm_keys = [k for k in own if k.startswith("norm.")]
    if fc_norm_keys and not any(k.startswith("fc_norm.") for k in sd):
        result.expected_missing.update(fc_norm_keys)
        for key in [k for k in sd if k.startswith("norm.") and k not in own]:
            result.dropped[key] = "token-wise final norm; the model normalises after pooling (fc_norm)"
            sd.pop(key)
    if norm_keys and not any(k.startswith("norm.") for k in sd) and any(k.startswith("fc_norm.") for k in sd):
        result.expected_missing.update(norm_keys)
        for key in [k for k in sd if k.startswith("fc_norm.") and k not in own]:
            result.dropped[key] = "pooled final norm; the model normalises tokens (norm)"
            sd.pop(key)
    if "pos_embed" in own and not _is_trainable(model, "pos_embed"):
        result.expected_missing.add("pos_embed")  # fixed sin-cos: the model's own table is exact

    for key, value in sd.items():
        if key in own and value.shape != own[key].shape:
            raise CheckpointError(f"{key}: checkpoint shape {tuple(value.shape)} does not fit the model's "
                                  f"{tuple(own[key].shape)}")
    result.state_dict = sd
    return result


def _is_trainable(model: nn.Module, name: str) -> bool:
    return bool(dict(model.named_parameters()).get(name, torch.empty(0)).requires_grad)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm-style filter: the state dict adapted to ``model`` (see ``filter_state_dict``)."""
    return filter_state_dict(state_dict, _encoder_of(model)).state_dict


# -- loading ----------------------------------------------------------------------------------------------
def _apply_state_dict(module: nn.Module, filtered: FilteredCheckpoint, strict: bool, path: Path,
                      prefix: str = "") -> tuple[list[str], list[str]]:
    result = module.load_state_dict(filtered.state_dict, strict=False)
    missing = sorted(result.missing_keys)
    unexpected = sorted(result.unexpected_keys)
    unexplained = [k for k in missing if k not in filtered.expected_missing]
    if strict and (unexplained or unexpected):
        raise CheckpointError(
            f"{path}: checkpoint does not fit {type(module).__name__}: "
            f"missing {[prefix + k for k in unexplained][:20]}, unexpected {[prefix + k for k in unexpected][:20]}"
        )
    return [prefix + k for k in missing], [prefix + k for k in unexpected]


def _source_grid_from_config(config: dict[str, Any] | None) -> tuple[int, int] | None:
    if config is None:
        return None
    h, w = config["img_size"]
    p = int(config["patch_size"])
    return (int(h) // p, int(w) // p)


def load_pretrained(model: nn.Module, path: str | Path, strict: bool = True,
                    source_grid: tuple[int, int] | None = None) -> LoadReport:
    """Load a checkpoint into an encoder, a classifier or an MAE wrapper; see the module docstring.

    For a ``MaskedAutoencoder``, a checkpoint with the MAE decoder (ours or facebookresearch/mae's
    pretraining file) loads both parts; an encoder-only checkpoint leaves the decoder as initialised.
    ``source_grid`` gives the checkpoint's patch grid when it is not square and has no encoder.json.
    """
    weights = _resolve_weights_path(path)
    config = read_export_config(weights) if weights.suffix == ".safetensors" else None
    source_grid = source_grid or _source_grid_from_config(config)
    raw = _strip_prefixes(load_state_dict_any(weights))
    encoder = _encoder_of(model)
    filtered = filter_state_dict(raw, encoder, source_grid)
    missing, unexpected = _apply_state_dict(encoder, filtered, strict, weights,
                                            "encoder." if encoder is not model else "")
    loaded = len(filtered.state_dict) - len(unexpected)
    if isinstance(model, MaskedAutoencoder):
        decoder_sd = {k: v for k, v in raw.items() if k.startswith(MAE_DECODER_PREFIXES)}
        decoder_keys = [k for k in model.state_dict() if k.startswith(MAE_DECODER_PREFIXES)]
        if decoder_sd:
            decoder = _filter_decoder(decoder_sd, model, filtered.adapted)
            result = model.load_state_dict(decoder.state_dict, strict=False)
            stray = [k for k in result.missing_keys if k in decoder_keys and k not in decoder.expected_missing]
            if strict and stray:
                raise CheckpointError(f"{weights}: MAE decoder keys missing from the checkpoint: {stray[:20]}")
            missing += [k for k in result.missing_keys if k in decoder_keys]
            loaded += len(decoder.state_dict)
        else:
            missing += decoder_keys
            filtered.adapted.append("MAE decoder left as initialised (encoder-only checkpoint)")
    report = LoadReport(path=str(weights), loaded=loaded, missing=missing, unexpected=unexpected,
                        dropped=filtered.dropped, adapted=filtered.adapted)
    log = get_logger("scanmae.models")
    log.info("loaded %d tensors from %s; missing %d, dropped %d%s", report.loaded, weights, len(missing),
             len(filtered.dropped), "".join(f"; {n}" for n in filtered.adapted))
    return report


def _filter_decoder(decoder_sd: dict[str, torch.Tensor], mae: MaskedAutoencoder,
                    notes: list[str]) -> FilteredCheckpoint:
    own = mae.state_dict()
    result = FilteredCheckpoint(state_dict={})
    for key, value in decoder_sd.items():
        if key == "decoder_pos_embed":
            # The decoder table is fixed sin-cos of the model's own grid; keep the model's.
            result.expected_missing.add(key)
            continue
        if key not in own:
            continue
        if value.shape != own[key].shape:
            if key.startswith("decoder_pred."):
                # Another channel count or patch size: the pixel predictor cannot transfer.
                result.expected_missing.add(key)
                notes.append(f"{key}: shape {tuple(value.shape)} != {tuple(own[key].shape)}, left as initialised")
                continue
            raise CheckpointError(f"{key}: checkpoint shape {tuple(value.shape)} does not fit the model's "
                                  f"{tuple(own[key].shape)}")
        result.state_dict[key] = value
    return result
