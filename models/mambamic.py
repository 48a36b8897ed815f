"""MambaMIC (Zou et al., "MambaMIC: An Efficient Baseline for Microscopic Image Classification with State
Space Models", arXiv 2409.07896) on scanmae's SS2D and selective scan (Triton on GPU, torch on CPU).

Layout: a stride-4 convolutional stem, four stages of MambaMIC blocks with 2x2 patch merging between
them, global average pooling and a linear classifier. A MambaMIC block splits its channels in two:
- local half: a convolution stack (``LocalConvBranch``);
- global half: LayerNorm, then the channels are cut into ``num_chunks`` groups that all go through one
  shared residual SS2D whose output projection is the Locally Aware Enhanced Filter (LAEF) -- the
  groups run as one batched scan call -- plus a learnt skip, LayerNorm again, a linear projection and a
  channel shuffle;
and the two halves are fused by the Feature Modulation Interaction Aggregation module (FMIA), whose
output is the block output (the block has no outer residual; the global half carries its own).

Where we differ from the authors' code, and why, is listed in docs/models.md.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.layers import DropPath, init_linear_conv_, stochastic_depth_rates, to_2tuple
from models.mambamic_layers import (
    ConvStem,
    FeatureModulationAggregation,
    LocalConvBranch,
    LocallyAwareEnhancedFilter,
    PatchMerging,
    channel_shuffle_last,
)
from models.registry import ModelRegistry
from models.ss2d import SS2D

STEM_STRIDE = 4


class ResidualFilteredSS2D(SS2D):
    """SS2D whose output projection is the LAEF, with a residual connection around the whole module.

    Everything else (input projection, depthwise conv, four-direction scan, gated output norm) is
    ``models.ss2d.SS2D`` unchanged; the LAEF takes the place of ``out_proj`` (hence its parameter names
    ``out_proj.proj`` / ``out_proj.local``). Channels-last ``(B, H, W, d_model)`` in and out.
    """

    def __init__(self, d_model: int, d_state: int, d_conv: int, ssm_ratio: float, laef_ratio: float,
                 scan_backend: str = "auto") -> None:
        super().__init__(d_model, d_state=d_state, d_conv=d_conv, expand=ssm_ratio, scan_backend=scan_backend)
        self.out_proj = LocallyAwareEnhancedFilter(self.d_inner, d_model, ratio=laef_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


class ChunkedGlobalBranch(nn.Module):
    """The global half of a block: shared SS2D over ``num_chunks`` channel groups (one scan call)."""

    def __init__(self, dim: int, num_chunks: int, d_state: int, d_conv: int, ssm_ratio: float,
                 laef_ratio: float, scan_backend: str = "auto") -> None:
        super().__init__()
        if dim % num_chunks:
            raise ValueError(f"MambaMIC: global branch width {dim} does not split into {num_chunks} chunks")
        self.num_chunks = num_chunks
        # One LayerNorm, applied before and after the SSM, as in the authors' code.
        self.norm = nn.LayerNorm(dim)
        self.ssm = ResidualFilteredSS2D(dim // num_chunks, d_state, d_conv, ssm_ratio, laef_ratio, scan_backend)
        self.skip_scale = nn.Parameter(torch.ones(1))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        k = self.num_chunks
        x = self.norm(x)
        # (B, H, W, k * c') -> (k * B, H, W, c'): the chunks share weights, so they form one batch.
        chunks = x.unflatten(-1, (k, c // k)).permute(3, 0, 1, 2, 4).reshape(k * b, h, w, c // k)
        y = self.ssm(chunks) + self.skip_scale * chunks
        y = y.reshape(k, b, h, w, c // k).permute(1, 2, 3, 0, 4).reshape(b, h, w, c)
        return self.proj(self.norm(y))


class MambaMICBlock(nn.Module):
    """Local-global dual-branch block: channels-last ``(B, H, W, dim)`` in and out."""

    def __init__(self, dim: int, drop_path: float = 0.0, d_state: int = 16, d_conv: int = 3,
                 ssm_ratio: float = 2.0, laef_ratio: float = 0.25, num_chunks: int = 4,
                 scan_backend: str = "auto") -> None:
        super().__init__()
        if dim % 4:
            raise ValueError(f"MambaMIC: block width must be a multiple of 4, got {dim}")
        half = dim // 2
        self.local_branch = LocalConvBranch(half)
        self.global_branch = ChunkedGlobalBranch(half, num_chunks, d_state, d_conv, ssm_ratio, laef_ratio,
                                                 scan_backend)
        self.drop_path = DropPath(drop_path)
        self.fusion = FeatureModulationAggregation(half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local_in, global_in = x.chunk(2, dim=-1)
        global_out = self.drop_path(self.global_branch(global_in))
        global_out = channel_shuffle_last(global_out, global_out.shape[-1] // 2)
        local_out = self.local_branch(local_in.permute(0, 3, 1, 2))
        return self.fusion(local_out, global_out.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class MambaMICStage(nn.Module):
    """Optional 2x2 patch merging from the previous stage's width, then ``depth`` blocks."""

    def __init__(self, in_dim: int, dim: int, depth: int, drop_paths: Sequence[float], downsample: bool,
                 **block_kwargs: Any) -> None:
        super().__init__()
        self.downsample = PatchMerging(in_dim, dim) if downsample else nn.Identity()
        self.blocks = nn.ModuleList([MambaMICBlock(dim, drop_paths[i], **block_kwargs) for i in range(depth)])


class MambaMIC(nn.Module):
    """Hierarchical MambaMIC classifier implementing the encoder interface of docs/architecture.md.

    ``forward_features`` returns the last stage's map as tokens ``(B, H/32 * W/32, dims[-1])`` in raster
    order (no class token, so only ``global_pool="avg"``). Any input size works (odd maps are padded
    before merging); ``img_size`` is recorded for exports. ``patch_size`` is the stem stride and must
    be 4.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = STEM_STRIDE, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "avg", depths: Sequence[int] = (2, 2, 4, 2),
                 dims: Sequence[int] = (96, 192, 384, 768), d_state: int = 16, d_conv: int = 3,
                 ssm_ratio: float = 2.0, laef_ratio: float = 0.25, num_chunks: int = 4, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, scan_backend: str = "auto") -> None:
        super().__init__()
        if patch_size != STEM_STRIDE:
            raise ValueError(f"MambaMIC: the stem has a fixed stride of {STEM_STRIDE}, got patch_size={patch_size}")
        if len(depths) != len(dims) or not depths:
            raise ValueError(f"MambaMIC: depths {tuple(depths)} and dims {tuple(dims)} must have the same length")
        if in_chans < 1:
            raise ValueError(f"MambaMIC: in_chans must be >= 1, got {in_chans}")
        self.img_size = to_2tuple(img_size)
        self.patch_size = patch_size
        self.in_chans = int(in_chans)
        self.depths = tuple(int(d) for d in depths)
        self.dims = tuple(int(d) for d in dims)
        self.depth = sum(self.depths)
        self.num_features = self.dims[-1]
        self.num_prefix_tokens = 0

        self.stem = ConvStem(in_chans, self.dims[0])
        rates = stochastic_depth_rates(drop_path_rate, self.depth)
        block_kwargs = dict(d_state=d_state, d_conv=d_conv, ssm_ratio=ssm_ratio, laef_ratio=laef_ratio,
                            num_chunks=num_chunks, scan_backend=scan_backend)
        self.stages = nn.ModuleList()
        # First layer id of each stage's blocks (the stem is id 0).
        self._stage_first_id: list[int] = []
        start = 0
        for i, (depth, dim) in enumerate(zip(self.depths, self.dims)):
            in_dim = self.dims[i - 1] if i else dim
            self.stages.append(MambaMICStage(in_dim, dim, depth, rates[start:start + depth], downsample=i > 0,
                                             **block_kwargs))
            self._stage_first_id.append(start + 1)
            start += depth

        self.head_drop = nn.Dropout(drop_rate)
        self.global_pool = "avg"
        self.num_classes = 0
        self.head: nn.Module = nn.Identity()
        self.grad_checkpointing = False
        self.apply(self._init_weights)
        self.reset_classifier(num_classes, global_pool)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # As the authors' code: truncated-normal linears, He-normal (fan-out) convolutions, unit norms.
        # The SSM parameters of SS2D are plain Parameters and keep their Mamba initialisation.
        init_linear_conv_(module)
        if isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, LocallyAwareEnhancedFilter):
            # Its projection is a 1x1 convolution in the authors' code: keep the conv init (``apply``
            # visits this module after its child Linear, so this wins).
            nn.init.kaiming_normal_(module.proj.weight, mode="fan_out", nonlinearity="relu")

    # -- forward --------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"MambaMIC: expected input (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        x = self.stem(x)
        for stage in self.stages:
            x = stage.downsample(x)
            for block in stage.blocks:
                if self.grad_checkpointing and torch.is_grad_enabled():
                    x = checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
        return x.flatten(1, 2)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, T, D) -> (B, D)``: mean over the final stage's positions."""
        return tokens.mean(dim=1)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.pool(tokens))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # -- classifier -----------------------------------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None and global_pool != "avg":
            raise ValueError(f"MambaMIC: global_pool must be 'avg' (there is no class token), got {global_pool!r}")
        self.num_classes = int(num_classes)
        head: nn.Module = nn.Identity()
        if self.num_classes > 0:
            head = nn.Linear(self.num_features, self.num_classes)
            self._init_weights(head)
            head = head.to(self.stem.conv1[0].weight.device)
        self.head = head

    # -- optimisation helpers -------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """Full names of the SSM parameters (A_log, D, dt bias) flagged by ``models.ssm``."""
        return {name for name, p in self.named_parameters() if getattr(p, "_no_weight_decay", False)}

    @property
    def num_layer_ids(self) -> int:
        """Stem (0), one id per block (1..depth), the head (depth + 1)."""
        return self.depth + 2

    def layer_id(self, param_name: str) -> int:
        if param_name.startswith("stem."):
            return 0
        match = re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.", param_name)
        if match:
            return self._stage_first_id[int(match.group(1))] + int(match.group(2))
        match = re.match(r"^stages\.(\d+)\.downsample\.", param_name)
        if match:
            # Patch merging feeds the stage's first block and shares its id.
            return self._stage_first_id[int(match.group(1))]
        return self.depth + 1

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        if coarse:
            return {"stem": r"^stem", "blocks": r"^stages\.(\d+)"}
        return {"stem": r"^stem",
                "blocks": [(r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)]}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = bool(enable)

    def set_scan_backend(self, backend: str) -> None:
        """Selective-scan backend of every SS2D ("auto", "triton", "chunked", "reference", "mamba_ssm")."""
        for module in self.modules():
            if isinstance(module, SS2D):
                module.scan_backend = backend


MAMBAMIC_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(depths=(2, 2, 4, 2), dims=(96, 192, 384, 768)),
    "small": dict(depths=(2, 2, 8, 2), dims=(96, 192, 384, 768)),
    "base": dict(depths=(2, 2, 12, 2), dims=(128, 256, 512, 1024)),
}
# Smallest sensible shape for CPU tests: each SS2D chunk is 4 channels wide at the first stage.
TEST_MAMBAMIC: dict[str, Any] = dict(img_size=32, depths=(1, 1, 1, 1), dims=(32, 64, 128, 256), d_state=4)


def register_models(registry: ModelRegistry) -> None:
    """Registry hook called by ``models.zoo``: ``mambamic_{tiny,small,base}`` and ``test_mambamic``."""
    for size, arch in MAMBAMIC_SIZES.items():
        registry.register(f"mambamic_{size}", MambaMIC, kind="classifier", **arch)
    registry.register("test_mambamic", MambaMIC, kind="classifier", **TEST_MAMBAMIC)
