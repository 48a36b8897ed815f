"""Building blocks shared by the encoders and the MAE decoder.

The transformer pieces keep the parameter names of facebookresearch/mae and timm's ViT (``attn.qkv``,
``mlp.fc1``, ``norm1`` ...) so their checkpoints load by name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels.triton_device import ATTENTION_DTYPES, ATTENTION_HEAD_DIMS, triton_runs_on


def to_2tuple(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if len(value) != 2:
        raise ValueError(f"expected an int or a pair, got {value!r}")
    return (int(value[0]), int(value[1]))


def grid_for(img_size: int | tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Patch grid (rows, cols) of an image size; the size must be a multiple of the patch."""
    h, w = to_2tuple(img_size)
    if h % patch_size or w % patch_size or h <= 0 or w <= 0:
        raise ValueError(f"img_size {(h, w)} must be positive multiples of patch_size {patch_size}")
    return (h // patch_size, w // patch_size)


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
    """Fixed 2D sine-cosine position embedding, shape ``(num_prefix_tokens + rows * cols, dim)``.

    Tokens are in raster order. The first half of the channels encodes the column index and the second
    half the row index, each as ``[sin, cos]`` over ``dim / 4`` frequencies -- the same values MAE uses
    for square grids, extended to rectangular ones. Prefix (class token) rows are zero. Computed in
    float64 and rounded once, as MAE does.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    rows, cols = grid
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    row_idx, col_idx = torch.meshgrid(torch.arange(rows, dtype=torch.float64),
                                      torch.arange(cols, dtype=torch.float64), indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    emb = torch.cat([encode(col_idx), encode(row_idx)], dim=1)
    if num_prefix_tokens:
        emb = torch.cat([torch.zeros(num_prefix_tokens, dim, dtype=torch.float64), emb], dim=0)
    return emb.float()


def resize_pos_embed(pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                     num_prefix_tokens: int) -> torch.Tensor:
    """Bicubic resize of the grid part of a ``(1, prefix + rows * cols, D)`` position embedding."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, grid_part = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    if grid_part.shape[1] != old_grid[0] * old_grid[1]:
        raise ValueError(f"position embedding has {grid_part.shape[1]} grid tokens, not {old_grid[0]}x{old_grid[1]}")
    dim = pos_embed.shape[-1]
    img = grid_part.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=tuple(new_grid), mode="bicubic", align_corners=False)
    grid_part = img.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid_part], dim=1)


class PatchEmbed(nn.Module):
    """Non-overlapping patches, each flattened and projected; output ``(B, rows * cols, D)`` in raster order, or
    ``(B, K, D)`` for the patches ``ids`` (B, K) only.

    The projection's weight lives in a strided ``Conv2d`` (``proj``), the layout MAE / timm checkpoints store, but the
    forward is a matrix product over the flattened patches: with ``ids`` (MAE's visible patches) only those are
    gathered and projected, a quarter of the work at 75 % masking, and cuDNN's algorithm for a stride-equals-kernel
    convolution is slow at high resolution (4.1 ms of a Vim-B 1024 px step on an H100, twentieth session)."""

    def __init__(self, img_size: int | tuple[int, int], patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = int(patch_size)
        self.grid_size = grid_for(self.img_size, self.patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans = int(in_chans)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans or tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"expected input (B, {self.in_chans}, {self.img_size[0]}, {self.img_size[1]}), "
                             f"got {tuple(x.shape)}")
        b, c = x.shape[:2]
        p, (rows, cols) = self.patch_size, self.grid_size
        # (B, rows, cols, C, p, p): a view; flattening a patch as (C, p, p) matches the convolution weight's layout.
        grid = x.reshape(b, c, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5)
        if ids is None:
            patches = grid.reshape(b, rows * cols, c * p * p)
        else:  # indexing the view reads only the selected patches' pixels
            batch_index = torch.arange(b, device=x.device).unsqueeze(1)
            patches = grid[batch_index, ids // cols, ids % cols].reshape(b, ids.shape[1], c * p * p)
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)

    def reset_parameters_like_linear(self) -> None:
        # MAE initialises the patch projection as a linear layer on the flattened patch.
        w = self.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)


def drop_path(x: torch.Tensor, prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones."""
    if prob == 0.0 or not training:
        return x
    keep = 1.0 - prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(shape).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, prob: float = 0.0) -> None:
        super().__init__()
        self.prob = float(prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.prob, self.training)

    def extra_repr(self) -> str:
        return f"prob={self.prob}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


ATTENTION_BACKENDS = ("sdpa", "triton", "auto")


def attention_kernel(backend: str, head_dim: int, dtype: torch.dtype, is_cuda: bool, dropout: bool) -> str:
    """"sdpa" or "triton": what an attention block on ``backend`` runs for a projection with heads of ``head_dim`` in
    ``dtype``, on a CUDA (``is_cuda``) or CPU input; ``dropout``: attention dropout is active. "auto" runs our kernels
    on CUDA wherever they apply and SDPA elsewhere: on the CPU (Triton's interpreter is for tests, not speed), with
    attention dropout, or for head sizes and dtypes they do not take, so any model runs on it. Our kernels won at
    every MAE shape on one H100 (thirty-seventh session, fwd+bwd of the attention alone against SDPA's default:
    ViT-B encoder 0.191 vs 0.537 ms, ViT-S encoder 0.061 vs 0.235, MAE decoder 1.481 vs 2.085; compiled ViT-B step
    +8.4 % at batch 256, +3.7 % at 1536 against ours in the decoder only; on another host in the thirty-ninth
    session the batch-256 step lost 3.5 %, not explained), and at Vim-B's 4,097-token decoder at 1,024 px (thirty-ninth
    session: 7.31 vs 9.22 ms; the compiled Vim-B step 68.5 vs 63.8 img/s)."""
    if backend != "auto":
        return backend
    use_triton = is_cuda and not dropout and head_dim in ATTENTION_HEAD_DIMS and dtype in ATTENTION_DTYPES
    return "triton" if use_triton else "sdpa"


def check_attention_backend(backend: str, is_cuda: bool | None = None) -> None:
    """Raises ValueError when ``backend`` is not one of ``ATTENTION_BACKENDS`` or, given the device kind
    (``is_cuda``), when it is "triton" where our kernels cannot run (a CPU without Triton's interpreter)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {backend!r}")
    if is_cuda is not None and backend == "triton" and not triton_runs_on(is_cuda):
        raise ValueError("--attention_backend triton needs a CUDA device (or TRITON_INTERPRET=1 on the CPU)")


def set_backend(model: nn.Module, attribute: str, backend: str) -> None:
    """Put every module of ``model`` that has ``attribute`` on ``backend``: ``attention_backend`` (the attention
    blocks, ``ATTENTION_BACKENDS``), ``scan_backend`` (the Vim and SS2D mixers, encoder and decoder) or
    ``conv_backend`` (the Vim mixers' causal conv). Attention blocks with heads our kernels do not take (sizes other
    than ``ATTENTION_HEAD_DIMS``) raise ValueError here for "triton", not at their first forward ("auto" runs SDPA
    in them)."""
    modules = [(name, module) for name, module in model.named_modules() if hasattr(module, attribute)]
    if attribute == "attention_backend" and backend == "triton":
        for name, module in modules:
            if module.head_dim not in ATTENTION_HEAD_DIMS:
                raise ValueError(f"attention_backend 'triton' takes heads of {ATTENTION_HEAD_DIMS} channels; "
                                 f"{name} has {module.head_dim} (use 'auto', which runs SDPA there)")
    for _, module in modules:
        setattr(module, attribute, backend)


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` (flash / memory-efficient on GPU)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = float(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # "sdpa": F.scaled_dot_product_attention on head-first views; "triton": kernels/triton_attention.py on the
        # packed projection (CUDA, no attention dropout; bench --attention_backend); "auto": ours on CUDA where they
        # apply (attention_kernel).
        self.attention_backend = "sdpa"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim)
        dropout = self.training and self.attn_drop > 0
        if attention_kernel(self.attention_backend, self.head_dim, qkv.dtype, x.is_cuda, dropout) == "triton":
            from kernels.triton_attention import packed_attention_triton

            if dropout:
                raise ValueError("attention_backend 'triton' has no attention dropout")
            x = packed_attention_triton(qkv)  # (b, n, heads, head_dim): the reshape below is a view
        else:
            # q / k / v split along the fused projection's own axis, then viewed head-first: the backward stacks dq /
            # dk / dv straight into the projection's (b, n, 3 * c) gradient. Splitting a head-first permute instead
            # (timm's way) costs a second full copy of that gradient: ViT-B MAE step 8.6 % slower eager on an H100
            # (bench/attention.py, docs/pretrain_benchmarks.md); the same compiled.
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
            x = x.transpose(1, 2)
        return self.proj_drop(self.proj(x.reshape(b, n, c)))


class Block(nn.Module):
    """Pre-norm transformer block (attention + MLP), with stochastic depth on both branches."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path_rate: float = 0.0,
                 norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path1 = DropPath(drop_path_rate)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.drop_path2 = DropPath(drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def init_mae_style(module: nn.Module) -> None:
    """Xavier-uniform linear weights with zero bias and unit LayerNorm, as MAE initialises its ViT."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def init_linear_conv_(module: nn.Module) -> None:
    """Truncated-normal (std 0.02) linear weights with zero bias and He-normal (fan-out) Conv2d weights, the
    initialisation of the VMamba-family models (MedMamba, MambaMIC); other modules are left as they are."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


def stochastic_depth_rates(rate: float, depth: int) -> list[float]:
    """Linearly increasing drop-path rate over the blocks."""
    if depth <= 1:
        return [0.0] * depth  # torch.linspace(0, rate, 1) == [0], as MAE / timm schedule it
    return [rate * i / (depth - 1) for i in range(depth)]


def trunc_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    return nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


def is_perfect_square(n: int) -> bool:
    r = math.isqrt(n)
    return r * r == n
