"""Linear-probe heads: BatchNorm (no affine) + Linear on frozen features, alone or as an LR grid."""

from __future__ import annotations

import torch
from torch import nn


def init_linear(linear: nn.Linear, seed: int) -> None:
    """MAE's probe init (truncated normal, std 0.01; zero bias) from a private generator, so that a
    grid head and a single head built with the same seed start identical."""
    gen = torch.Generator().manual_seed(int(seed))
    weight = torch.empty(linear.weight.shape)
    nn.init.trunc_normal_(weight, std=0.01, a=-0.02, b=0.02, generator=gen)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.zero_()


class ProbeHead(nn.Module):
    """``Linear(BatchNorm1d(features))``: the BN whitens the features so one LR range fits any encoder."""

    def __init__(self, num_features: int, num_classes: int, seed: int = 0):
        super().__init__()
        self.norm = nn.BatchNorm1d(num_features, affine=False, eps=1e-6)
        self.linear = nn.Linear(num_features, num_classes)
        init_linear(self.linear, seed)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(feats))


class ProbeHeadGrid(nn.Module):
    """Several probe heads trained at once on the same features (one per learning rate).

    One BatchNorm serves all heads: without affine parameters its output, and its running statistics, do
    not depend on the head, so this equals ``len(heads)`` separate :class:`ProbeHead` runs.
    """

    def __init__(self, num_features: int, num_classes: int, num_heads: int, seed: int = 0):
        super().__init__()
        self.norm = nn.BatchNorm1d(num_features, affine=False, eps=1e-6)
        self.linears = nn.ModuleList(nn.Linear(num_features, num_classes) for _ in range(num_heads))
        for linear in self.linears:
            init_linear(linear, seed)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (num_heads, B, num_classes) logits."""
        normed = self.norm(feats)
        return torch.stack([linear(normed) for linear in self.linears])

    def export_head(self, index: int) -> ProbeHead:
        """Head ``index`` as a stand-alone :class:`ProbeHead` (same weights and BN statistics)."""
        head = ProbeHead(self.norm.num_features, self.linears[index].out_features)
        head.norm.load_state_dict(self.norm.state_dict())
        head.linear.load_state_dict(self.linears[index].state_dict())
        return head


def probe_feature_dim(encoder: nn.Module, n_last_blocks: int = 1) -> int:
    """Width of the features :class:`FrozenEncoderProbe` hands its head."""
    return int(encoder.num_features) * int(n_last_blocks)


class FrozenEncoderProbe(nn.Module):
    """A frozen encoder (always in eval mode, no gradients) followed by a trainable :class:`ProbeHead`.

    ``n_last_blocks`` > 1 feeds the head the pooled outputs of the encoder's last blocks side by side
    (``forward_last_blocks``), each pooled as the encoder pools its output."""

    def __init__(self, encoder: nn.Module, head: ProbeHead, n_last_blocks: int = 1):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.n_last_blocks = int(n_last_blocks)
        self.encoder.requires_grad_(False)
        self.encoder.eval()

    def train(self, mode: bool = True) -> FrozenEncoderProbe:
        super().train(mode)
        self.encoder.eval()  # dropout / drop-path / BN of the encoder stay frozen during probing
        return self

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.n_last_blocks == 1:
            return self.encoder.pool(self.encoder.forward_features(x)).float()
        tokens = self.encoder.forward_last_blocks(x, self.n_last_blocks)
        return torch.cat([self.encoder.pool(t) for t in tokens], dim=-1).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
