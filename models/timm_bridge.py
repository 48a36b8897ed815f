"""Expose the scanmae registry through ``timm.create_model``.

Each scanmae name gets a timm entrypoint that forwards to ``models.create_model``. Names timm already
defines (timm ships its own ``test_vit``) are left to timm rather than overwritten.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from torch import nn

# timm's factory passes these to every entrypoint; they describe hub weights, which scanmae has none of.
_TIMM_FACTORY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _make_entrypoint(name: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: Any = False, **kwargs: Any) -> nn.Module:
        from models.registry import create_model

        for key in _TIMM_FACTORY_KWARGS:
            kwargs.pop(key, None)
        if pretrained is True:
            raise ValueError(f"{name}: no downloadable weights; use checkpoint_path= or "
                             "models.create_model(name, pretrained=path)")
        return create_model(name, pretrained=pretrained or None, **kwargs)

    entrypoint.__name__ = name
    entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    return entrypoint


def register_with_timm(names: list[str]) -> list[str]:
    """Register ``names`` with timm (idempotent); returns the names timm now resolves to scanmae."""
    import timm.models

    registered = []
    module = sys.modules[__name__]
    for name in names:
        existing = getattr(module, name, None)
        if timm.models.is_model(name) and existing is None:
            continue  # a timm model of the same name: keep timm's
        if existing is None:
            existing = _make_entrypoint(name)
            setattr(module, name, existing)
            timm.models.register_model(existing)
        registered.append(name)
    return registered
