"""Name -> model builder registry: ``create_model`` / ``list_models`` / ``register_model``.

Each name maps to a builder and the keyword defaults that define the variant (``vit_base_patch16`` =
``VisionTransformer`` with ``embed_dim=768, depth=12, ...``). Keyword arguments given to ``create_model``
override those defaults; the model remembers its name and the overrides (``model.model_name``,
``model.model_kwargs``) so an exported encoder can be rebuilt from its ``encoder.json``.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

MODEL_KINDS = ("encoder", "mae", "classifier")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    defaults: dict[str, Any] = field(default_factory=dict)
    kind: str = "encoder"


class ModelRegistry:
    """A mapping of model names to specs; the package keeps one instance (``models.registry.REGISTRY``)."""

    def __init__(self) -> None:
        self._specs: dict[str, ModelSpec] = {}

    def register(self, name: str, builder: Callable[..., nn.Module], kind: str = "encoder",
                 **defaults: Any) -> ModelSpec:
        if kind not in MODEL_KINDS:
            raise ValueError(f"model kind must be one of {MODEL_KINDS}, got {kind!r}")
        if name in self._specs and self._specs[name].builder is not builder:
            raise ValueError(f"model name {name!r} is already registered")
        spec = ModelSpec(name=name, builder=builder, defaults=dict(defaults), kind=kind)
        self._specs[name] = spec
        return spec

    def spec(self, name: str) -> ModelSpec:
        try:
            return self._specs[name]
        except KeyError:
            # Typos first (difflib's ratio), then names sharing the first word ("vit" in "vit_bse_patch16").
            close = difflib.get_close_matches(name, list(self._specs), n=8, cutoff=0.75)
            close += [n for n in self._specs if name.split("_")[0] in n and n not in close][:8 - len(close)]
            hint = f"; similar: {', '.join(close)}" if close else ""
            raise KeyError(f"unknown model {name!r}{hint}") from None

    def names(self, pattern: str = "*", kind: str | None = None) -> list[str]:
        return sorted(n for n, s in self._specs.items()
                      if fnmatch.fnmatch(n, pattern) and (kind is None or s.kind == kind))

    def __contains__(self, name: object) -> bool:
        return name in self._specs


REGISTRY = ModelRegistry()


def register_model(name: str, builder: Callable[..., nn.Module], kind: str = "encoder",
                   **defaults: Any) -> ModelSpec:
    """Add a model name (for model files outside this package's zoo, e.g. ``models/mambamic.py``)."""
    return REGISTRY.register(name, builder, kind=kind, **defaults)


def list_models(pattern: str = "*", kind: str | None = None) -> list[str]:
    """Registered names matching a shell-style ``pattern``, optionally only one ``kind``."""
    return REGISTRY.names(pattern, kind)


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Construct ``name`` with ``kwargs`` over its defaults, without loading weights."""
    spec = REGISTRY.spec(name)
    model = spec.builder(**{**spec.defaults, **kwargs})
    model.model_name = name
    model.model_kwargs = dict(kwargs)
    return model


def create_model(name: str, pretrained: str | Path | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered model; ``pretrained`` is a weights file (or an export directory) to load.

    ``pretrained`` accepts our ``encoder.safetensors`` exports, facebookresearch/mae and MedMAE
    ``.pth`` files and timm ViT state dicts (see ``models.checkpoint.load_pretrained``).
    """
    if pretrained is True:
        raise ValueError("pretrained=True: scanmae has no downloadable weights; pass a checkpoint path")
    model = build_model(name, **kwargs)
    if pretrained:
        from models.checkpoint import load_pretrained  # imported here: checkpoint imports this module

        load_pretrained(model, pretrained)
    return model
