"""A training stream from a dataset decoded once and held whole on the training device.

Small sets (MedMNIST-sized pools, a few hundred MB of uint8 canvases at most) decode in seconds, and then a
streaming loader's per-batch work, worker hand-off and host copies are pure overhead: at 64 px a ViT-S/8 MAE
step is shorter than the time the workers need to deliver its batch. ``ResidentLoader`` keeps every canvas in
one uint8 tensor on the device and cuts batches out of it with ``index_select``; the crops and flips stay in
``gpu_augment`` as with the streaming loader.

Order: pass ``p`` is a permutation of all samples seeded by ``(seed, p)``, the same on every rank; rank ``r`` of
``R`` reads ``perm[r::R]`` cut to ``len // R`` samples (so every rank has as many) and makes full batches of it,
dropping the last partial one. Batch ``k`` of a rank is therefore a pure function of ``(seed, k)``: a resumed run
starts at ``start_batch`` and repeats exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from common.data.dataset import ImageDataset
from common.data.loader import build_loader, usable_workers

_RESIDENT_ORDER = 4  # rng stream id, distinct from common.data.stream's


def resident_bytes(num_samples: int, in_chans: int, canvas_size: int) -> int:
    """Device memory the decoded canvases of ``num_samples`` images take."""
    return num_samples * in_chans * canvas_size * canvas_size


def decode_all(dataset: ImageDataset, canvas_size: int, num_workers: int = 0,
               batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample of ``dataset`` letterboxed onto a ``canvas_size`` canvas, ordered by sample key: uint8 images
    (N, C, S, S) and int32 valid sizes (N, 2) on the CPU. Workers hand their batches over in an order that
    depends on their number; sorting by key makes the training order (an index permutation of this tensor)
    independent of it. Decoding errors surface as the streaming loader's do."""
    # More workers than CPUs only cost start-up time here; the key order makes the count irrelevant to the result.
    loader = build_loader(dataset, batch_size, num_workers=usable_workers(num_workers), shuffle=False,
                          infinite=False, canvas_size=canvas_size, pin_memory=False)
    images, sizes, keys = [], [], []
    for batch in loader:
        images.append(batch["image"])
        sizes.append(batch["size"])
        keys += batch["key"]
    if not images:
        raise ValueError(f"{dataset}: no samples to hold on the device")
    order = torch.from_numpy(np.argsort(np.asarray(keys), kind="stable"))
    return torch.cat(images)[order], torch.cat(sizes).to(torch.int32)[order]


class ResidentLoader:
    """Infinite training batches ``{"image": uint8 (B, C, S, S) on the device, "size": int32 (B, 2) on the CPU}``
    of one rank, cut from canvases held on the device (see the module docstring for the order)."""

    def __init__(self, images: torch.Tensor, sizes: torch.Tensor, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, start_batch: int = 0):
        if images.shape[0] != sizes.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {sizes.shape[0]} sizes")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.images, self.sizes = images, sizes.cpu()
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.start_batch = seed, start_batch
        self.per_rank = images.shape[0] // world_size
        if self.per_rank < batch_size:
            raise ValueError(f"{images.shape[0]} samples give each of {world_size} ranks {self.per_rank}, fewer than "
                             f"one batch of {batch_size}")

    def __len__(self) -> int:
        """Batches per pass of this rank."""
        return self.per_rank // self.batch_size

    def pass_indices(self, pass_index: int) -> np.ndarray:
        """The sample indices this rank reads in pass ``pass_index``, in order (whole batches only)."""
        order = np.random.default_rng([self.seed, pass_index, _RESIDENT_ORDER]).permutation(self.images.shape[0])
        return order[self.rank::self.world_size][: len(self) * self.batch_size]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        pass_index, batch = divmod(self.start_batch, len(self))
        while True:
            cpu_index = torch.from_numpy(self.pass_indices(pass_index))
            # One host-to-device copy per pass, the batches slices of it; from pinned memory, so that the copy
            # queues behind the running steps instead of making the host wait for them.
            index = cpu_index.pin_memory().to(self.images.device, non_blocking=True) \
                if self.images.is_cuda else cpu_index
            for b in range(batch, len(self)):
                rows = slice(b * self.batch_size, (b + 1) * self.batch_size)
                yield {"image": self.images.index_select(0, index[rows]), "size": self.sizes[cpu_index[rows]]}
            pass_index, batch = pass_index + 1, 0
