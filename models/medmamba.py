"""MedMamba-style hierarchical classifier (a from-scratch baseline for ``finetune``).

Stages of SS-Conv-SSM blocks at decreasing resolution: each block splits its channels in two halves,
one through a convolutional branch (BN, 3x3, 3x3, 1x1 convs), the other through LayerNorm + SS2D
(4-direction selective scan), concatenates them, shuffles channels between the halves and adds the
input. Patch merging (2x2 -> linear) halves the resolution and doubles the width between stages.
Feature maps are channels-last ``(B, H, W, C)`` throughout.
"""

from __future__ import annotations

import re
from functools import partial

import torch
from torch import nn

from models.encoder import EncoderBase
from models.layers import DropPath, init_linear_conv_, stochastic_depth_rates, to_2tuple
from models.ss2d import SS2D


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave channel groups of a channels-last tensor (ShuffleNet) so the halves mix."""
    b, h, w, c = x.shape
    return x.reshape(b, h, w, groups, c // groups).transpose(3, 4).reshape(b, h, w, c)


class SSConvSSM(nn.Module):
    def __init__(self, dim: int, drop_path_rate: float, d_state: int, norm_eps: float = 1e-6,
                 scan_backend: str = "auto") -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"SS-Conv-SSM needs an even channel count, got {dim}")
        half = dim // 2
        self.ln_1 = nn.LayerNorm(half, eps=norm_eps)
        self.ss2d = SS2D(half, d_state=d_state, scan_backend=scan_backend)
        self.drop_path = DropPath(drop_path_rate)
        self.conv_branch = nn.Sequential(
            nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 3, padding=1), nn.BatchNorm2d(half), nn.ReLU(),
            nn.Conv2d(half, half, 3, padding=1), nn.BatchNorm2d(half), nn.ReLU(),
            nn.Conv2d(half, half, 1), nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv_half, ssm_half = x.chunk(2, dim=-1)
        ssm_out = self.drop_path(self.ss2d(self.ln_1(ssm_half)))
        conv_out = self.conv_branch(conv_half.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return channel_shuffle(torch.cat([conv_out, ssm_out.to(conv_out.dtype)], dim=-1), 2) + x


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> concatenated channels -> LayerNorm -> linear to twice the width."""

    def __init__(self, dim: int, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=norm_eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"patch merging needs an even feature map, got {h}x{w}")
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class Stage(nn.Module):
    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample if downsample is not None else nn.Identity()


class ConvPatchEmbed(nn.Module):
    """Strided-conv stem to channels-last ``(B, H/p, W/p, C)`` with LayerNorm."""

    def __init__(self, img_size: int | tuple[int, int], patch_size: int, in_chans: int, embed_dim: int,
                 stride_total: int) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        if any(s % stride_total for s in self.img_size):
            raise ValueError(f"img_size {self.img_size} must be a multiple of {stride_total} "
                             "(patch size times the downsampling of every stage)")
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans or tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"expected input (B, {self.in_chans}, {self.img_size[0]}, {self.img_size[1]}), "
                             f"got {tuple(x.shape)}")
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class MedMamba(EncoderBase):
    """Hierarchical SS-Conv-SSM classifier; tokens are the last stage's positions, pooled by their mean."""

    _stem_names = ("patch_embed",)

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 0, global_pool: str = "avg", depths: tuple[int, ...] = (2, 2, 4, 2),
                 dims: tuple[int, ...] = (96, 192, 384, 768), d_state: int = 16, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, scan_backend: str = "auto") -> None:
        super().__init__()
        if len(depths) != len(dims):
            raise ValueError(f"depths {depths} and dims {dims} must have the same length")
        if any(dims[i + 1] != 2 * dims[i] for i in range(len(dims) - 1)):
            raise ValueError(f"each stage doubles the width (patch merging): dims {dims}")
        self.depths = tuple(depths)
        self.depth = sum(depths)
        self.embed_dim = dims[-1]
        self.num_prefix_tokens = 0
        self.patch_embed = ConvPatchEmbed(img_size, patch_size, in_chans, dims[0],
                                          patch_size * 2 ** (len(dims) - 1))
        rates = stochastic_depth_rates(drop_path_rate, self.depth)
        stages, start = [], 0
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            blocks = [SSConvSSM(dim, rates[start + j], d_state, scan_backend=scan_backend) for j in range(depth)]
            downsample = PatchMerging(dim) if i < len(dims) - 1 else None
            stages.append(Stage(blocks, downsample))
            start += depth
        self.layers = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(self.embed_dim)
        self._init_head(num_classes, global_pool, False, drop_rate, partial(nn.LayerNorm, eps=1e-6))
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            init_linear_conv_(module)

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Last-stage feature map ``(B, H/32, W/32, C)`` (for the default 4 stages)."""
        x = self.patch_embed(x)
        for stage in self.layers:
            for blk in stage.blocks:
                x = self._maybe_checkpoint(blk, x)
            x = stage.downsample(x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_feature_map(x).flatten(1, 2)

    def no_weight_decay(self) -> set[str]:
        return {n for n, p in self.named_parameters() if getattr(p, "_no_weight_decay", False)}

    def layer_id(self, param_name: str) -> int:
        """Blocks numbered 1..depth across stages; a stage's patch merging shares its last block's id."""
        if param_name.startswith(self._stem_names):
            return 0
        match = re.match(r"^layers\.(\d+)\.(blocks\.(\d+)|downsample)\.", param_name)
        if match:
            stage = int(match.group(1))
            before = sum(self.depths[:stage])
            block = int(match.group(3)) if match.group(3) is not None else self.depths[stage] - 1
            return before + block + 1
        return self.depth + 1

    def group_matcher(self, coarse: bool = False) -> dict[str, object]:
        return {
            "stem": r"^patch_embed",
            "blocks": r"^layers\.(\d+)" if coarse
            else [(r"^layers\.(\d+)\.downsample", (0,)), (r"^layers\.(\d+)\.blocks\.(\d+)", None),
                  (r"^norm", (99999,))],
        }
