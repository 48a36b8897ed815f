"""Optimizer parameter groups: weight decay only on weight matrices, and layer-wise LR decay.

Layer ids come from the encoder interface (``layer_id(name)``, ``num_layer_ids``, ``no_weight_decay()``,
see docs/architecture.md): id 0 is the input stem, the last id the head. A parameter with layer id ``i``
trains at ``layer_decay ** (num_layer_ids - 1 - i)`` times the base LR, so the head keeps the full LR and
early blocks move least.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _no_decay_names(model: nn.Module) -> set[str]:
    fn = getattr(model, "no_weight_decay", None)
    return set(fn()) if callable(fn) else set()


def _is_no_decay(name: str, param: torch.nn.Parameter, skip: set[str]) -> bool:
    # 1-D tensors are biases and norm scales; ``skip`` lists e.g. pos_embed / cls_token (matched per module too).
    return param.ndim <= 1 or name in skip or name.split(".")[-1] in skip


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: decayed weight matrices and undecayed biases / norms / listed tokens."""
    skip = _no_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _is_no_decay(name, p, skip) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """Groups keyed by (layer id, decay or not), each with an ``lr_scale`` for :func:`schedule.apply_schedule`.

    ``model`` must implement ``layer_id(name)`` and ``num_layer_ids`` (every registry encoder does).
    """
    if not (hasattr(model, "layer_id") and hasattr(model, "num_layer_ids")):
        raise TypeError(f"{type(model).__name__} has no layer_id()/num_layer_ids: layer-wise LR decay "
                        "needs an encoder that implements the interface in docs/architecture.md")
    num_ids = int(model.num_layer_ids)
    skip = _no_decay_names(model)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = int(model.layer_id(name))
        if not 0 <= layer < num_ids:
            raise ValueError(f"layer_id({name!r}) = {layer} is outside [0, {num_ids})")
        no_decay = _is_no_decay(name, p, skip)
        key = (layer, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "param_names": [], "layer_id": layer,
                           "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": layer_decay ** (num_ids - 1 - layer)}
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]
