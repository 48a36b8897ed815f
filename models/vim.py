"""Vision Mamba (Vim-style): bidirectional Mamba blocks over the patch sequence.

Each block has a forward and a backward selective scan with their own conv / projection / SSM
parameters (Vim's "v2" layout and parameter names, so ``layers.{i}.mixer.A_b_log`` etc.); the two
directions share the input and output projections and are averaged. The backward direction runs the
scan right to left (``reverse=True``) instead of flipping the sequence. The residual stream is float32;
the SSM parameters stay float32 under autocast and model-wide casts (see ``models.ssm``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels import causal_conv1d_fn, selective_scan_fn
from kernels.strides import with_strides
from models.encoder import EncoderBase
from models.layers import DropPath, PatchEmbed, stochastic_depth_rates, trunc_normal_
from models.ssm import (
    KeepSSMParamsFp32,
    dt_bias_init,
    dt_weight_init_,
    init_a_log,
    init_d,
    mark_ssm_param,
    resolve_dt_rank,
)

NORMS = ("rms", "layer")


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "rms":
        return nn.RMSNorm(dim, eps=eps)
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class _GradInOutputLayout(torch.autograd.Function):
    """Identity whose backward hands the incoming gradient on in the forward output's strides, copied once if it
    arrives in others, so that both scan directions behind it read it as they wrote their outputs."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.strides = y.stride()
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return with_strides(grad, ctx.strides)


class BiMamba(KeepSSMParamsFp32):
    """Mamba mixer with separate forward and backward SSM branches: ``(B, L, D) -> (B, L, D)``."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", scan_backend: str = "auto") -> None:
        super().__init__()
        self.d_inner = int(expand * d_model)
        self.d_state = d_state
        self.dt_rank = resolve_dt_rank(dt_rank, d_model)
        self.scan_backend = scan_backend
        self.conv_backend = "auto"  # causal_conv1d_fn's backend: the Triton conv on CUDA (bench --conv_backend)
        d_inner = self.d_inner
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        for suffix in ("", "_b"):
            conv = nn.Conv1d(d_inner, d_inner, kernel_size=d_conv, groups=d_inner, padding=d_conv - 1)
            x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
            dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
            dt_weight_init_(dt_proj.weight, self.dt_rank)
            with torch.no_grad():
                dt_proj.bias.copy_(dt_bias_init(d_inner))
            mark_ssm_param(dt_proj.bias)
            setattr(self, f"conv1d{suffix}", conv)
            setattr(self, f"x_proj{suffix}", x_proj)
            setattr(self, f"dt_proj{suffix}", dt_proj)
        # Vim's names: A_log / D forward, A_b_log / D_b backward.
        self.A_log = init_a_log(d_inner, d_state)
        self.D = init_d(d_inner)
        self.A_b_log = init_a_log(d_inner, d_state)
        self.D_b = init_d(d_inner)

    def _direction(self, x: torch.Tensor, z: torch.Tensor, reverse: bool) -> torch.Tensor:
        suffix = "_b" if reverse else ""
        conv: nn.Conv1d = getattr(self, f"conv1d{suffix}")
        x_proj: nn.Linear = getattr(self, f"x_proj{suffix}")
        dt_proj: nn.Linear = getattr(self, f"dt_proj{suffix}")
        a_log, d = (self.A_b_log, self.D_b) if reverse else (self.A_log, self.D)
        # Backward direction: the anti-causal conv (the causal conv of the reversed sequence, without flipped copies).
        x = causal_conv1d_fn(x, conv.weight.squeeze(1), conv.bias, activation="silu", backend=self.conv_backend,
                             reverse=reverse)
        # The projections run in the autocast dtype and the scan takes its inputs in that dtype, as upstream Mamba
        # does; it accumulates in float32 and A, D and the dt bias stay float32 parameters (models.ssm).
        x_dbl = F.linear(x.transpose(1, 2), x_proj.weight)  # (B, L, R + 2N)
        dt, b_ssm, c_ssm = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, dt_proj.weight).transpose(1, 2)
        x, z = x.to(dt.dtype), z.to(dt.dtype)
        # B and C stay strided views of x_dbl: the Triton scan reads them in place (other backends copy).
        return selective_scan_fn(
            x, dt, -torch.exp(a_log.float()), b_ssm.transpose(1, 2), c_ssm.transpose(1, 2), d.float(), z=z,
            delta_bias=dt_proj.bias.float(), delta_softplus=True, reverse=reverse,
            backend=self.scan_backend,
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # Split in the projection's (B, L, 2 * d_inner) layout, then viewed (B, d_inner, L): the backward then joins
        # the two (B, L, d_inner) gradients along their last axis straight into the projection's layout.
        x, z = (t.transpose(1, 2) for t in self.in_proj(hidden).chunk(2, dim=-1))
        # x and z stay channel-last views of the projection: the Triton conv and the (v1 / v2) Triton scan read them in
        # place, and with the Triton conv the scan's u, delta, output and gradients are all channel-last, so the
        # projections around them need no copies either. The output's gradient is put in the output's layout once
        # for both directions.
        y = _GradInOutputLayout.apply(
            (self._direction(x, z, reverse=False) + self._direction(x, z, reverse=True)) / 2)
        if not torch.is_autocast_enabled(y.device.type):  # under autocast the product casts y itself: no float32 copy
            y = y.to(self.out_proj.weight.dtype)
        return self.out_proj(y.transpose(1, 2))


class VimBlock(nn.Module):
    """Pre-norm residual block; the residual is carried separately in float32 (Vim's fused-add-norm order)."""

    def __init__(self, dim: int, mixer: nn.Module, norm: str, norm_eps: float, drop_path_rate: float) -> None:
        super().__init__()
        self.mixer = mixer
        self.norm = make_norm(norm, dim, norm_eps)
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        residual = hidden if residual is None else residual + self.drop_path(hidden)
        residual = residual.float()
        hidden = self.mixer(self.norm(residual.to(self.norm.weight.dtype)))
        return hidden, residual


class VisionMamba(EncoderBase):
    """Vim encoder with fixed 2D sin-cos positions and a class token in the middle of the sequence.

    ``global_pool="token"`` pools the middle class token, ``"avg"`` the mean of the patch tokens;
    ``cls_token=False`` (only with ``"avg"``) drops the class token. ``forward_features`` returns the
    class token first, then the patch tokens in raster order, like the ViT.
    """

    _stem_names = ("cls_token", "pos_embed", "patch_embed")

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 0, global_pool: str = "token", embed_dim: int = 192, depth: int = 24,
                 d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: int | str = "auto",
                 norm: str = "rms", norm_eps: float = 1e-5, cls_token: bool = True, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, fc_norm: bool | None = None, scan_backend: str = "auto",
                 learned_pos_embed: bool = False) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_prefix_tokens = 1 if cls_token else 0
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if cls_token else None
        self.pos_embed = self._build_pos_embed(learned_pos_embed)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = stochastic_depth_rates(drop_path_rate, depth)
        self.layers = nn.ModuleList([
            VimBlock(embed_dim, BiMamba(embed_dim, d_state, d_conv, expand, dt_rank, scan_backend),
                     norm, norm_eps, rates[i])
            for i in range(depth)
        ])
        self.drop_path_final = DropPath(rates[-1] if rates else 0.0)
        self.norm_f = make_norm(norm, embed_dim, norm_eps)
        self._init_head(num_classes, global_pool, bool(fc_norm), drop_rate,
                        lambda dim: make_norm(norm, dim, norm_eps))
        self._init_weights()

    def _init_weights(self) -> None:
        self.patch_embed.reset_parameters_like_linear()
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)
        for layer in self.layers:
            # Prenorm residual rescaling (GPT-2 / Mamba): keeps the residual stream's variance flat in depth.
            nn.init.kaiming_uniform_(layer.mixer.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                layer.mixer.out_proj.weight /= math.sqrt(self.depth)

    def set_scan_backend(self, backend: str) -> None:
        for layer in self.layers:
            layer.mixer.scan_backend = backend

    def _run(self, tokens: torch.Tensor, n_last_blocks: int = 1) -> list[torch.Tensor]:
        """The normalised residual stream after each of the last ``n_last_blocks`` layers (the last one is the
        encoder's output)."""
        hidden, residual = self.pos_drop(tokens), None
        outputs = []
        for index, layer in enumerate(self.layers):
            hidden, residual = self._maybe_checkpoint(layer, hidden, residual)
            if index >= self.depth - n_last_blocks:
                # The stream the next layer would read: the block's output added to the residual it carries.
                stream = residual + (self.drop_path_final(hidden) if index == self.depth - 1 else hidden)
                outputs.append(self.norm_f(stream.to(self.norm_f.weight.dtype)))
        return outputs

    def _encode(self, patches: torch.Tensor, n_last_blocks: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Insert the class token in the middle, run the blocks; (patch tokens, prefix tokens) after each of the
        last ``n_last_blocks`` blocks."""
        if self.cls_token is None:
            return [(out, out[:, :0]) for out in self._run(patches, n_last_blocks)]
        mid = patches.shape[1] // 2
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(patches.shape[0], -1, -1).to(patches.dtype)
        outs = self._run(torch.cat([patches[:, :mid], cls, patches[:, mid:]], dim=1), n_last_blocks)
        return [(torch.cat([out[:, :mid], out[:, mid + 1:]], dim=1), out[:, mid:mid + 1]) for out in outs]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_last_blocks(x, 1)[0]

    def forward_last_blocks(self, x: torch.Tensor, n_last_blocks: int) -> list[torch.Tensor]:
        self._check_n_last_blocks(n_last_blocks)
        blocks = self._encode(self._embed_patches(x), n_last_blocks)
        return [torch.cat([prefix, patches], dim=1) for patches, prefix in blocks]

    def forward_visible(self, x: torch.Tensor, ids_keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._encode(self._embed_patches(x, ids_keep))[0]
