"""2D selective scan (SS2D, as in VMamba / MedMamba): four scan directions batched into one scan call.

Public API (stable; MambaMIC builds on it):
- ``cross_scan(x)``: ``(B, C, H, W) -> (B, 4, C, H*W)``, the sequences row-major, column-major and both
  reversed;
- ``cross_merge(ys, height, width)``: ``(B, 4, C, H*W) -> (B, C, H*W)`` (row-major), the inverse
  re-ordering of each direction summed;
- ``SS2D(d_model, ...)``: channels-last module ``(B, H, W, d_model) -> (B, H, W, d_model)``;
  ``SS2D.forward_core(x)`` runs only the 4-direction scan on ``(B, d_inner, H, W)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import selective_scan_fn
from models.ssm import (
    KeepSSMParamsFp32,
    dt_bias_init,
    dt_weight_init_,
    init_a_log,
    init_d,
    mark_ssm_param,
    resolve_dt_rank,
)

NUM_DIRECTIONS = 4


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """Unfold a feature map into four 1D scan orders: rows, columns, reversed rows, reversed columns."""
    if x.ndim != 4:
        raise ValueError(f"cross_scan expects (B, C, H, W), got {tuple(x.shape)}")
    rows = x.flatten(2)
    cols = x.transpose(2, 3).flatten(2)
    forward = torch.stack([rows, cols], dim=1)
    return torch.cat([forward, forward.flip(-1)], dim=1)


def cross_merge(ys: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bring the four direction outputs of ``cross_scan`` order back to row-major and sum them."""
    b, k, c, length = ys.shape
    if k != NUM_DIRECTIONS or length != height * width:
        raise ValueError(f"cross_merge expects (B, 4, C, {height * width}), got {tuple(ys.shape)}")
    pairs = ys[:, :2] + ys[:, 2:].flip(-1)
    rows = pairs[:, 0]
    cols = pairs[:, 1].reshape(b, c, width, height).transpose(2, 3).reshape(b, c, length)
    return rows + cols


class SS2D(KeepSSMParamsFp32):
    """Input projection, depthwise 3x3 conv, 4-direction selective scan, gated output projection."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 3, expand: float = 2.0,
                 dt_rank: int | str = "auto", dropout: float = 0.0, conv_bias: bool = True, bias: bool = False,
                 scan_backend: str = "auto") -> None:
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = int(expand * d_model)
        self.dt_rank = resolve_dt_rank(dt_rank, d_model)
        self.scan_backend = scan_backend
        k, d_inner = NUM_DIRECTIONS, self.d_inner

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        self.conv2d = nn.Conv2d(d_inner, d_inner, kernel_size=d_conv, padding=(d_conv - 1) // 2,
                                groups=d_inner, bias=conv_bias)
        self.act = nn.SiLU()
        # One projection per direction, stored stacked so all directions run as one einsum.
        x_proj = torch.empty(k, self.dt_rank + 2 * d_state, d_inner)
        for w in x_proj:
            nn.init.kaiming_uniform_(w, a=5 ** 0.5)
        self.x_proj_weight = nn.Parameter(x_proj)
        dt_w = torch.empty(k, d_inner, self.dt_rank)
        dt_weight_init_(dt_w, self.dt_rank)
        self.dt_projs_weight = nn.Parameter(dt_w)
        self.dt_projs_bias = mark_ssm_param(nn.Parameter(dt_bias_init(d_inner, copies=k).reshape(k, d_inner)))
        self.A_logs = init_a_log(d_inner, d_state, copies=k)
        self.Ds = init_d(d_inner, copies=k)
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward_core(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, d_inner, H, W) -> (B, d_inner, H*W)`` float32, the merged four-direction scan."""
        b, d, h, w = x.shape
        length = h * w
        k = NUM_DIRECTIONS
        # The SSM runs in float32 with autocast off; see models.ssm for why.
        with torch.autocast(device_type=x.device.type, enabled=False):
            xs = cross_scan(x.float())  # (B, K, D, L)
            x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight.float())
            dts, bs, cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
            dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight.float())
            ys = selective_scan_fn(
                xs.reshape(b, k * d, length), dts.reshape(b, k * d, length),
                -torch.exp(self.A_logs.float()), bs.contiguous(), cs.contiguous(), self.Ds.float(),
                delta_bias=self.dt_projs_bias.float().reshape(-1), delta_softplus=True,
                backend=self.scan_backend,
            )
            return cross_merge(ys.reshape(b, k, d, length), h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = self.act(self.conv2d(x.permute(0, 3, 1, 2).contiguous()))
        y = self.forward_core(x).transpose(1, 2).reshape(b, h, w, self.d_inner)
        # Cast to the norm's dtype: float32 normally, bf16 when the whole model was cast (DeepSpeed).
        y = self.out_norm(y.to(self.out_norm.weight.dtype)) * F.silu(z)
        return self.dropout(self.out_proj(y))
