"""Encoders (ViT, Vision Mamba), the MAE wrapper, MedMamba-style classifiers and their registry.

Importing the package fills the registry and, as documented, registers the same names with timm so
``timm.create_model(name)`` works too (timm's own ``test_vit`` is left alone).
"""

from models.registry import REGISTRY, build_model, create_model, list_models, register_model
from models.timm_bridge import register_with_timm
from models.zoo import register_all

register_all(REGISTRY)
register_with_timm(REGISTRY.names())

__all__ = ["REGISTRY", "build_model", "create_model", "list_models", "register_model"]
