"""Masked autoencoder around any encoder that can encode only its visible patches.

Differences from facebookresearch/mae, all deliberate:
- the visible tokens reach the encoder in raster order (a sequence model such as Vision Mamba depends on
  token order; MAE's shuffled order only happens to be harmless for a ViT);
- patchify / unpatchify handle any channel count and non-square images;
- the masking noise comes from an optional ``torch.Generator`` (or is given), so masks are reproducible.
The decoder is MAE's: a linear embedding, mask tokens, fixed sin-cos positions, transformer blocks,
a linear prediction of the patch pixels; the loss is the mean squared error on masked patches only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from models.layers import Block, init_mae_style, sincos_pos_embed_2d


class Masking(NamedTuple):
    ids_keep: torch.Tensor     # (B, K) visible patch indices, increasing (raster order)
    ids_shuffle: torch.Tensor  # (B, L) patch indices sorted by noise: the first K are kept
    ids_restore: torch.Tensor  # (B, L) inverse permutation of ids_shuffle
    mask: torch.Tensor         # (B, L) 0 = visible, 1 = masked, in raster order


def random_masking(batch: int, num_patches: int, mask_ratio: float, device: torch.device | str = "cpu",
                   generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> Masking:
    """Per-sample uniform random masking: keep ``int(L * (1 - mask_ratio))`` patches."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    len_keep = int(num_patches * (1 - mask_ratio))
    if len_keep < 1:
        raise ValueError(f"mask_ratio {mask_ratio} leaves no visible patch out of {num_patches}")
    if noise is None:
        noise_device = generator.device if generator is not None else device
        noise = torch.rand(batch, num_patches, generator=generator, device=noise_device)
    elif tuple(noise.shape) != (batch, num_patches):
        raise ValueError(f"noise must have shape {(batch, num_patches)}, got {tuple(noise.shape)}")
    noise = noise.to(device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = torch.sort(ids_shuffle[:, :len_keep], dim=1).values
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return Masking(ids_keep, ids_shuffle, ids_restore, mask)


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, H, W) -> (B, (H/p) * (W/p), p * p * C)``; pixels ordered (row, col, channel) as in MAE."""
    b, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {(h, w)} is not a multiple of patch size {p}")
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int) -> torch.Tensor:
    """Inverse of ``patchify`` for a ``grid`` of (rows, cols) patches."""
    b, n, d = x.shape
    p = patch_size
    rows, cols = grid
    if n != rows * cols or d != p * p * channels:
        raise ValueError(f"cannot unpatchify {tuple(x.shape)} into a {rows}x{cols} grid of {p}x{p}x{channels}")
    x = x.reshape(b, rows, cols, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, channels, rows * p, cols * p)


class MaskedAutoencoder(nn.Module):
    """MAE pretraining model: ``loss, pred, mask = mae(imgs, mask_ratio=0.75, generator=None)``.

    ``encoder`` must provide ``forward_visible(x, ids_keep)``, ``grid_size``, ``patch_size``,
    ``in_chans``, ``embed_dim`` and ``num_prefix_tokens`` (see ``models.encoder.EncoderBase``).
    """

    def __init__(self, encoder: nn.Module, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, decoder_mlp_ratio: float = 4.0, norm_pix_loss: bool = False,
                 norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.encoder = encoder
        self.norm_pix_loss = bool(norm_pix_loss)
        self.patch_size = int(encoder.patch_size)
        self.grid_size = tuple(encoder.grid_size)
        self.in_chans = int(encoder.in_chans)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.num_prefix_tokens = int(encoder.num_prefix_tokens)

        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        pos = sincos_pos_embed_2d(decoder_embed_dim, self.grid_size, self.num_prefix_tokens)
        self.decoder_pos_embed = nn.Parameter(pos.unsqueeze(0), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, decoder_mlp_ratio, qkv_bias=True, norm_eps=norm_eps)
            for _ in range(decoder_depth)
        ])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=norm_eps)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size ** 2 * self.in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        for name, module in self.named_modules():
            if name.startswith("decoder_"):
                init_mae_style(module)

    # -- pixels <-> patches ---------------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.patch_size, self.grid_size, self.in_chans)

    # -- model ----------------------------------------------------------------------------------------
    def random_masking(self, batch: int, mask_ratio: float, device: torch.device | str = "cpu",
                       generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> Masking:
        return random_masking(batch, self.num_patches, mask_ratio, device, generator, noise)

    def forward_decoder(self, patch_tokens: torch.Tensor, prefix_tokens: torch.Tensor,
                        ids_keep: torch.Tensor) -> torch.Tensor:
        """Decoder prediction ``(B, L, p * p * C)`` for every patch, from the visible tokens."""
        visible = self.decoder_embed(patch_tokens)
        prefix = self.decoder_embed(prefix_tokens)
        b, _, d = visible.shape
        full = self.mask_token.to(visible.dtype).expand(b, self.num_patches, d)
        full = full.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, d), visible)
        x = torch.cat([prefix, full], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, self.num_prefix_tokens:]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the masked patches only."""
        target = self.patchify(imgs.float())
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred.float() - target.float()) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        masking = self.random_masking(imgs.shape[0], mask_ratio, imgs.device, generator, noise)
        # Without autocast (DeepSpeed's bf16 mode holds the weights in bf16) the encoder takes the weights' dtype,
        # while the target and its per-patch normalisation stay in float32 from the original pixels.
        weight_dtype = self.decoder_pred.weight.dtype
        encoder_in = imgs.to(weight_dtype) if imgs.is_floating_point() else imgs
        patch_tokens, prefix_tokens = self.encoder.forward_visible(encoder_in, masking.ids_keep)
        pred = self.forward_decoder(patch_tokens, prefix_tokens, masking.ids_keep)
        loss = self.forward_loss(imgs, pred, masking.mask)
        return loss, pred, masking.mask

    def no_weight_decay(self) -> set[str]:
        names = {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
        return names | {"mask_token", "decoder_pos_embed"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)


def build_mae(encoder_name: str, decoder_embed_dim: int = 512, decoder_depth: int = 8,
              decoder_num_heads: int = 16, decoder_mlp_ratio: float = 4.0, norm_pix_loss: bool = False,
              **encoder_kwargs: object) -> MaskedAutoencoder:
    """MAE around the registered encoder ``encoder_name`` built with ``encoder_kwargs``."""
    from models.registry import build_model

    # The MAE objective reads normalised tokens, so the final norm stays token-wise (no fc_norm).
    encoder_kwargs.setdefault("fc_norm", False)
    encoder = build_model(encoder_name, **encoder_kwargs)
    return MaskedAutoencoder(encoder, decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth,
                             decoder_num_heads=decoder_num_heads, decoder_mlp_ratio=decoder_mlp_ratio,
                             norm_pix_loss=norm_pix_loss)
