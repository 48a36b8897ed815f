"""Vision Transformer, numerically the encoder of facebookresearch/mae (and timm's ViT key layout)."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from models.encoder import EncoderBase
from models.layers import Block, PatchEmbed, init_mae_style, stochastic_depth_rates


class VisionTransformer(EncoderBase):
    """ViT with a class token and fixed 2D sin-cos position embeddings.

    ``global_pool="token"`` uses the class token after the final norm; ``"avg"`` averages the patch
    tokens. ``fc_norm`` (default: on for ``"avg"``) moves the final LayerNorm after pooling, as MAE and
    timm do for average pooling; the token-wise ``norm`` then becomes the identity.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 0, global_pool: str = "token", embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, fc_norm: bool | None = None,
                 norm_eps: float = 1e-6, learned_pos_embed: bool = False) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_prefix_tokens = 1
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        use_fc_norm = (global_pool == "avg") if fc_norm is None else bool(fc_norm)

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = self._build_pos_embed(learned_pos_embed)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = stochastic_depth_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
                  drop_path_rate=rates[i], norm_eps=norm_eps)
            for i in range(depth)
        ])
        self.norm = nn.Identity() if use_fc_norm else norm_layer(embed_dim)
        self._init_head(num_classes, global_pool, use_fc_norm, drop_rate, norm_layer)
        self._init_weights()

    def _init_weights(self) -> None:
        head = self.head
        self.patch_embed.reset_parameters_like_linear()
        nn.init.normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if module is not head:
                init_mae_style(module)

    def _run_blocks(self, x: torch.Tensor, n_last_blocks: int = 1) -> list[torch.Tensor]:
        """The normalised tokens after each of the last ``n_last_blocks`` blocks (the last one is the output)."""
        outputs = []
        for index, blk in enumerate(self.blocks):
            x = self._maybe_checkpoint(blk, x)
            if index >= self.depth - n_last_blocks:
                outputs.append(self.norm(x))
        return outputs

    def _with_cls(self, patches: torch.Tensor) -> torch.Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_last_blocks(x, 1)[0]

    def forward_last_blocks(self, x: torch.Tensor, n_last_blocks: int) -> list[torch.Tensor]:
        self._check_n_last_blocks(n_last_blocks)
        return self._run_blocks(self.pos_drop(self._with_cls(self._embed_patches(x))), n_last_blocks)

    def forward_visible(self, x: torch.Tensor, ids_keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self._run_blocks(self.pos_drop(self._with_cls(self._embed_patches(x, ids_keep))))[0]
        return tokens[:, 1:], tokens[:, :1]
