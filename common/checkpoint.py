"""Checkpoint I/O that never unpickles arbitrary objects.

Weights are stored as safetensors (with a JSON sidecar for configuration). Foreign ``.pth`` files are
read with ``torch.load(weights_only=True)``, which refuses pickled Python objects such as an argparse
Namespace; the error says so and names the file.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from common.io import atomic_write, atomic_write_json


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read safely or does not fit the model."""


def save_weights(state_dict: dict[str, torch.Tensor], path: str | Path,
                 metadata: dict[str, str] | None = None) -> Path:
    """Atomically save a flat tensor dict as safetensors (tensors made contiguous, shared storage split)."""
    # safetensors refuses tensors that share storage (tied weights): give those their own copy
    users = Counter(v.untyped_storage().data_ptr() for v in state_dict.values())
    tensors = {k: v.detach().contiguous().clone() if users[v.untyped_storage().data_ptr()] > 1
               else v.detach().contiguous() for k, v in state_dict.items()}
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def load_weights(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return load_file(str(path), device=device)
    except Exception as exc:  # safetensors raises several error types for a damaged header
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def torch_load_safe(path: str | Path, map_location: str = "cpu") -> Any:
    """``torch.load`` restricted to tensors and plain containers (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as exc:
        msg = str(exc)
        if "weights_only" in msg or "Unsupported global" in msg or "Weights only load failed" in msg:
            raise CheckpointError(
                f"{path}: refused to load: the checkpoint contains pickled Python objects "
                f"(only tensors and plain containers are accepted). Details: {msg.splitlines()[0]}"
            ) from exc
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({exc})") from exc


def load_state_dict_any(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensor dict from a ``.safetensors`` file or a ``.pth``/``.pt``/``.bin`` torch file.

    Torch files may wrap the weights as ``{"model": ...}``, ``{"state_dict": ...}`` or ``{"module": ...}``.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_weights(path)
    obj = torch_load_safe(path)
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "module", "model_ema"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: no tensor state dict found (top-level keys: {list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__})")
    return obj


def save_weights_with_config(state_dict: dict[str, torch.Tensor], config: dict[str, Any],
                             weights_path: str | Path) -> tuple[Path, Path]:
    """Save ``X.safetensors`` and its ``X.json`` sidecar."""
    weights_path = Path(weights_path)
    json_path = weights_path.with_suffix(".json")
    save_weights(state_dict, weights_path, metadata={"format": "pt"})
    atomic_write_json(json_path, config)
    return weights_path, json_path


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"config not found: {path}") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from exc
