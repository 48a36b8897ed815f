"""Deterministic, rank-sharded index orders for training and evaluation.

The same (seed, epoch) always gives the same order, whether the images go through the encoder every step
(slow linear probe, finetune) or the cached features are indexed directly (``linprobe --fast``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def train_order(n: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """This rank's shuffled indices for ``epoch``; padded by wrap-around so every rank gets as many."""
    if n <= 0:
        raise ValueError("cannot sample from an empty training set")
    gen = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
    perm = torch.randperm(n, generator=gen)
    per_rank = -(-n // world_size)
    total = per_rank * world_size
    if total > n:
        perm = torch.cat([perm, perm[: total - n]])
    return perm[rank::world_size]


def batches(order: torch.Tensor, batch_size: int, drop_last: bool) -> list[torch.Tensor]:
    """Split an index order into batches (the last partial batch dropped if ``drop_last``)."""
    chunks = list(torch.split(order, batch_size))
    if drop_last and chunks and len(chunks[-1]) < batch_size:
        chunks = chunks[:-1]
    return chunks


class EpochShuffleSampler(Sampler[int]):
    """:func:`train_order` as a DataLoader sampler; call :meth:`set_epoch` before each epoch."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(train_order(self.n, self.epoch, self.seed, self.rank, self.world_size).tolist())

    def __len__(self) -> int:
        return -(-self.n // self.world_size)


class StridedSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` in order (no padding): sharded evaluation."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
