"""Building blocks of MambaMIC (Zou et al., arXiv 2409.07896) other than the selective scan.

Layouts: the local branch and the fusion module work channels-first (B, C, H, W) because they are
convolution stacks; the filter that sits inside the SS2D branch works channels-last (B, H, W, C) like the
SS2D module it plugs into. Sizes follow the authors' public code (the paper's parameter counts are
reproduced from it), see docs/models.md.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def channel_shuffle_last(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet channel shuffle on the last dim: (..., groups * k) -> interleave the groups.

    Output channel ``j * groups + g`` is input channel ``g * k + j``.
    """
    channels = x.shape[-1]
    if groups < 1 or channels % groups:
        raise ValueError(f"channel_shuffle_last: {channels} channels do not split into {groups} groups")
    per_group = channels // groups
    return x.unflatten(-1, (groups, per_group)).transpose(-1, -2).flatten(-2)


def channel_shuffle_first(x: torch.Tensor, groups: int) -> torch.Tensor:
    """The same shuffle for channels-first (B, C, H, W) tensors."""
    return channel_shuffle_last(x.movedim(1, -1), groups).movedim(-1, 1)


class ConvBN(nn.Sequential):
    """Conv2d without bias followed by BatchNorm2d."""

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_chans),
        )


class ConvStem(nn.Module):
    """Two stride-2 3x3 Conv-BN layers with a GELU between: image -> (B, H/4, W/4, dim) channels-last.

    Odd sizes are fine (each conv rounds up), so 28x28 MedMNIST images give a 7x7 map.
    """

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(in_chans, dim // 2, 3, stride=2)
        self.act = nn.GELU()
        self.conv2 = ConvBN(dim // 2, dim, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(x))).permute(0, 2, 3, 1)


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat -> LayerNorm(4C) -> Linear(4C, 2C): halves H and W, doubles C.

    Channels-last. An odd H or W is zero-padded to even first (the authors' code crops instead, which
    drops the last row/column; padding keeps every pixel and makes 28-px inputs usable).
    """

    def __init__(self, dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim or 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[1], x.shape[2]
        if height % 2 or width % 2:
            x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        # Order (even row, even col), (odd row, even col), (even row, odd col), (odd row, odd col).
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class LocalConvBranch(nn.Sequential):
    """Local branch: BN, depthwise 3x3, BN-ReLU, grouped 3x3 doubling the channels, BN-ReLU,
    pointwise back to ``dim``, BN-ReLU. Captures pixel neighbourhoods that the scan tends to forget."""

    def __init__(self, dim: int) -> None:
        super().__init__(
            nn.BatchNorm2d(dim),
            nn.Conv2d(dim, dim, 3, padding=1, groups=dim),
            nn.BatchNorm2d(dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim, 2 * dim, 3, padding=1, groups=dim),
            nn.BatchNorm2d(2 * dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * dim, dim, 1),
            nn.BatchNorm2d(dim),
            nn.ReLU(inplace=True),
        )


class LocallyAwareEnhancedFilter(nn.Module):
    """LAEF: the output projection of the SS2D branch, replacing its last linear layer.

    Pointwise projection ``in_dim -> out_dim`` + SiLU; a fraction ``ratio`` of the channels then goes
    through a depthwise 3x3 conv + SiLU (local awareness at low cost) while the rest passes unchanged;
    a channel shuffle (pairs of channels) mixes the filtered and the untouched channels.
    Channels-last in and out: (B, H, W, in_dim) -> (B, H, W, out_dim).
    """

    def __init__(self, in_dim: int, out_dim: int, ratio: float = 0.25) -> None:
        super().__init__()
        if out_dim % 2:
            raise ValueError(f"LocallyAwareEnhancedFilter: out_dim must be even for the shuffle, got {out_dim}")
        self.filtered_dim = int(out_dim * ratio)
        if self.filtered_dim < 1:
            raise ValueError(f"LocallyAwareEnhancedFilter: ratio {ratio} of {out_dim} channels filters none")
        self.proj = nn.Linear(in_dim, out_dim)
        self.local = nn.Conv2d(self.filtered_dim, self.filtered_dim, 3, padding=1, groups=self.filtered_dim)
        self.act = nn.SiLU()
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.proj(x))
        filtered, passed = x.split([self.filtered_dim, self.out_dim - self.filtered_dim], dim=-1)
        filtered = self.act(self.local(filtered.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
        return channel_shuffle_last(torch.cat([filtered, passed], dim=-1), self.out_dim // 2)


class FeatureModulationAggregation(nn.Module):
    """FMIA: fuses the local map ``l`` and the global map ``g`` (both (B, C, H, W)) into (B, 2C, H, W).

    One depthwise 3x3 conv (shared by both inputs) turns each branch into a sigmoid gate (ReLU before
    the sigmoid for the local gate, GELU for the global one); each branch is modulated by the *other*
    branch's gate; the two results are concatenated, channel-shuffled (groups of 4) and re-weighted by
    a per-channel attention sigmoid(w * global_average) (ECA with a kernel of 1).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"FeatureModulationAggregation: dim must be even, got {dim}")
        self.gate_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        # Per-channel scale of the channel attention; the authors' ECA conv1d(k=1) starts in U(-1, 1).
        self.channel_scale = nn.Parameter(torch.empty(2 * dim).uniform_(-1.0, 1.0))
        self.dim = dim

    def forward(self, local: torch.Tensor, global_: torch.Tensor) -> torch.Tensor:
        local_gate = torch.sigmoid(F.relu(self.gate_conv(local)))
        global_gate = torch.sigmoid(F.gelu(self.gate_conv(global_)))
        fused = torch.cat([local_gate * global_, global_gate * local], dim=1)
        fused = channel_shuffle_first(fused, self.dim // 2)
        attention = torch.sigmoid(fused.mean(dim=(2, 3)) * self.channel_scale)
        return fused * attention[:, :, None, None]
