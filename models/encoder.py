"""The encoder interface of docs/architecture.md, shared by ViT, Vision Mamba and the classifiers.

A subclass builds ``patch_embed`` (with ``img_size``, ``patch_size``, ``grid_size``, ``in_chans``),
``pos_embed`` through ``_build_pos_embed``, its blocks and final norm, sets ``embed_dim``, ``depth`` and
``num_prefix_tokens``, calls ``_init_head`` and implements ``forward_features`` (and ``forward_visible``
when it can serve MAE). Pooling, the classifier, layer ids and weight-decay exemptions live here so the
encoders agree on them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.layers import sincos_pos_embed_2d, trunc_normal_

POOL_TYPES = ("token", "avg")


class EncoderBase(nn.Module):
    """Pooling, classifier head, layer ids and gradient checkpointing common to every encoder."""

    # Set by subclasses.
    patch_embed: nn.Module
    pos_embed: nn.Parameter
    num_prefix_tokens: int
    depth: int
    embed_dim: int
    # Parameter names (exact or prefixes) before the first block: layer id 0.
    _stem_names: tuple[str, ...] = ("cls_token", "pos_embed", "patch_embed")

    def _init_head(self, num_classes: int, global_pool: str, fc_norm: bool, drop_rate: float,
                   norm_layer: Callable[[int], nn.Module]) -> None:
        if global_pool not in POOL_TYPES:
            raise ValueError(f"global_pool must be one of {POOL_TYPES}, got {global_pool!r}")
        if global_pool == "token" and self.num_prefix_tokens == 0:
            raise ValueError("global_pool='token' needs a class token (cls_token=True)")
        self.global_pool = global_pool
        self.num_features = self.embed_dim
        self.num_classes = int(num_classes)
        self.fc_norm = norm_layer(self.embed_dim) if fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._make_head(self.num_classes)
        self.grad_checkpointing = False

    def _make_head(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        head = nn.Linear(self.num_features, num_classes)
        # Small head init as MAE fine-tuning does, so the first steps do not disturb the encoder.
        trunc_normal_(head.weight, std=2e-5)
        nn.init.zeros_(head.bias)
        return head

    # -- geometry -------------------------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.patch_embed.grid_size

    @property
    def img_size(self) -> tuple[int, int]:
        return self.patch_embed.img_size

    @property
    def in_chans(self) -> int:
        return self.patch_embed.in_chans

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def _build_pos_embed(self, trainable: bool = False) -> nn.Parameter:
        # A parameter (not a buffer) so the key ``pos_embed`` matches MAE / timm checkpoints. Frozen for
        # pretraining; ``trainable`` for fine-tuning as MAE does (its fine-tuning ViT learns pos_embed).
        table = sincos_pos_embed_2d(self.embed_dim, self.grid_size, self.num_prefix_tokens)
        return nn.Parameter(table.unsqueeze(0), requires_grad=trainable)

    def _embed_patches(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens with their position embeddings, ``(B, num_patches, D)``, or only the patches ``ids`` (B, K)
        (MAE's kept patches: the others are never projected)."""
        positions = self.pos_embed[0, self.num_prefix_tokens:]
        return self.patch_embed(x, ids) + (positions if ids is None else positions[ids])

    # -- pooling and head -----------------------------------------------------------------------------
    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, T, D) -> (B, D)``: the class token (first) or the mean of the patch tokens."""
        if self.global_pool == "avg":
            x = tokens[:, self.num_prefix_tokens:].mean(dim=1)
        else:
            x = tokens[:, 0]
        return self.fc_norm(x)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.pool(tokens))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_last_blocks(self, x: torch.Tensor, n_last_blocks: int) -> list[torch.Tensor]:
        """Token sequences ``(B, T, D)`` after each of the last ``n_last_blocks`` blocks, in block order, each
        through the final norm as ``forward_features`` puts its output; the last equals ``forward_features(x)``.
        (DINO's linear evaluation concatenates features of the last blocks; the deepest block of an MAE encoder
        is the one most tuned to pixel reconstruction.) Not named ``forward_intermediates``: timm's method of that
        name takes other arguments and returns other things, and our models are exposed through timm too."""
        raise NotImplementedError(f"{type(self).__name__} has no sequence of token blocks to read features from "
                                  "(it is a hierarchy of feature maps); use n_last_blocks=1")

    def _check_n_last_blocks(self, n_last_blocks: int) -> None:
        if not 1 <= int(n_last_blocks) <= self.depth:
            raise ValueError(f"n_last_blocks must be between 1 and the encoder's depth {self.depth}, "
                             f"got {n_last_blocks}")

    def forward_visible(self, x: torch.Tensor, ids_keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode only the patches ``ids_keep`` (B, K), raster indices in increasing order.

        Returns ``(patch_tokens (B, K, D), prefix_tokens (B, num_prefix_tokens, D))``, both normalised.
        Encoders that cannot drop patches (convolutional hierarchies such as MedMamba or MambaMIC) keep this
        default, which says why they cannot sit inside MAE.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot encode a subset of patches, so it cannot be "
                                  "used inside MAE (use a ViT or Vim encoder)")

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in POOL_TYPES:
                raise ValueError(f"global_pool must be one of {POOL_TYPES}, got {global_pool!r}")
            if global_pool == "token" and self.num_prefix_tokens == 0:
                raise ValueError("global_pool='token' needs a class token")
            self.global_pool = global_pool
        self.num_classes = int(num_classes)
        device = next(self.parameters()).device
        self.head = self._make_head(self.num_classes).to(device)

    # -- optimisation helpers -------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        names = {"pos_embed", "cls_token"}
        for name, param in self.named_parameters():
            if getattr(param, "_no_weight_decay", False):
                names.add(name)
        return names

    @property
    def num_layer_ids(self) -> int:
        """Stem (0), one id per block (1..depth), everything after the blocks (depth + 1)."""
        return self.depth + 2

    def layer_id(self, param_name: str) -> int:
        if param_name.startswith(self._stem_names):
            return 0
        match = re.match(r"^(?:blocks|layers)\.(\d+)\.", param_name)
        if match:
            return int(match.group(1)) + 1
        return self.depth + 1

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        stem = "^(?:" + "|".join(re.escape(n) for n in self._stem_names) + ")"
        return {
            "stem": stem,
            "blocks": r"^(?:blocks|layers)\.(\d+)" if coarse
            else [(r"^(?:blocks|layers)\.(\d+)", None), (r"^(?:norm|norm_f|fc_norm)\.", (99999,))],
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = bool(enable)

    def _maybe_checkpoint(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)
