"""The named variants: architecture hyper-parameters per registry name.

Sizes follow the ViT / MAE / Vim / MedMamba papers; ``test_*`` variants are tiny CPU-test models.
"""

from __future__ import annotations

import importlib
import importlib.util
from functools import partial

from models.mae import build_mae
from models.registry import ModelRegistry
from models.vit import VisionTransformer

VIT_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}
VIT_PATCHES = (8, 14, 16)
# MAE and Vim come with 16-pixel patches (the papers') and 8-pixel ones, which give small images (64 px: 64
# patches instead of 16) enough tokens for masking to leave a useful visible set.
MAE_PATCHES = (8, 16)
TEST_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
# MAE's decoder (512 dim, 8 blocks, 16 heads) for every size; a 2-block 32-dim one for the test model.
MAE_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
TEST_DECODER = dict(decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2)

VIM_SIZES = {
    "tiny": dict(embed_dim=192, depth=24),
    "small": dict(embed_dim=384, depth=24),
    "base": dict(embed_dim=768, depth=24),
}
TEST_VIM = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, d_state=4)

MEDMAMBA_SIZES = {
    "tiny": dict(depths=(2, 2, 4, 2), dims=(96, 192, 384, 768)),
    "small": dict(depths=(2, 2, 8, 2), dims=(96, 192, 384, 768)),
    "base": dict(depths=(2, 2, 12, 2), dims=(128, 256, 512, 1024)),
}
TEST_MEDMAMBA = dict(img_size=32, depths=(1, 1), dims=(16, 32), d_state=4)

# Model files that register their own names through ``register_models(registry)``.
EXTERNAL_MODEL_MODULES = ("models.mambamic",)


def register_vit(registry: ModelRegistry) -> None:
    for size, arch in VIT_SIZES.items():
        for patch in VIT_PATCHES:
            registry.register(f"vit_{size}_patch{patch}", VisionTransformer, patch_size=patch, **arch)
        for patch in MAE_PATCHES:
            registry.register(f"mae_vit_{size}_patch{patch}", partial(build_mae, f"vit_{size}_patch{patch}"),
                              kind="mae", **MAE_DECODER)
    # MAE's ViT-H uses 14-pixel patches.
    registry.register("mae_vit_huge_patch14", partial(build_mae, "vit_huge_patch14"), kind="mae", **MAE_DECODER)
    registry.register("test_vit", VisionTransformer, **TEST_VIT)
    registry.register("mae_test_vit", partial(build_mae, "test_vit"), kind="mae", **TEST_DECODER)


def register_vim(registry: ModelRegistry) -> None:
    from models.vim import VisionMamba

    for size, arch in VIM_SIZES.items():
        for patch in MAE_PATCHES:
            registry.register(f"vim_{size}_patch{patch}", VisionMamba, patch_size=patch, **arch)
            registry.register(f"mae_vim_{size}_patch{patch}", partial(build_mae, f"vim_{size}_patch{patch}"),
                              kind="mae", **MAE_DECODER)
    registry.register("test_vim", VisionMamba, **TEST_VIM)
    registry.register("mae_test_vim", partial(build_mae, "test_vim"), kind="mae", **TEST_DECODER)


def register_medmamba(registry: ModelRegistry) -> None:
    from models.medmamba import MedMamba

    for size, arch in MEDMAMBA_SIZES.items():
        registry.register(f"medmamba_{size}", MedMamba, kind="classifier", **arch)
    registry.register("test_medmamba", MedMamba, kind="classifier", **TEST_MEDMAMBA)


def register_all(registry: ModelRegistry) -> None:
    register_vit(registry)
    register_vim(registry)
    register_medmamba(registry)
    for module_name in EXTERNAL_MODEL_MODULES:
        if importlib.util.find_spec(module_name) is not None:
            module = importlib.import_module(module_name)
            hook = getattr(module, "register_models", None)
            if hook is not None:
                hook(registry)
