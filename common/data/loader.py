"""``build_loader``: a DataLoader over ``BatchStream`` with per-epoch control and a resumable position."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from common.data.dataset import ImageDataset
from common.data.stream import BatchStream, StreamConfig


def _share_batches_by_filename(_worker_id: int) -> None:
    """DataLoader worker init: send batches as named shared-memory files instead of file descriptors.

    With the default strategy every shared tensor of a batch costs the receiving process a socket round trip to
    the worker's resource-sharer thread, which must win the worker's GIL from the decoding loop first: measured
    10 ms per batch on 2 idle cores (cProfile, prefilled queue), and it serialises in the pin-memory thread, so
    it capped the whole loader on a busy 16-core GPU host. By name the receiver maps the file itself (1.3 ms).
    torch's shm manager unlinks the files of crashed processes.
    """
    torch.multiprocessing.set_sharing_strategy("file_system")


class ImageLoader:
    """Iterable of batch dicts (see ``BatchStream``); ``len()`` is the batches per epoch of this rank.

    In infinite mode (training) a single iterator runs for the whole run and ``start_batch`` is the
    resume position (batches this rank consumed before). In finite mode call ``set_epoch`` before each epoch.
    """

    def __init__(self, dataset: ImageDataset, cfg: StreamConfig, num_workers: int = 0,
                 pin_memory: bool = False, prefetch_factor: int = 4):
        self.dataset = dataset
        self.cfg = cfg
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor

    @property
    def stream(self) -> BatchStream:
        return BatchStream(self.dataset, self.cfg, self.num_workers)

    def set_epoch(self, epoch: int) -> None:
        self.cfg = dataclasses.replace(self.cfg, epoch=epoch)

    def __len__(self) -> int:
        if self.cfg.infinite:
            per_rank = len(self.dataset) // self.cfg.world_size
            return per_rank // self.cfg.batch_size
        return self.stream.num_batches()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs = {"prefetch_factor": self.prefetch_factor, "persistent_workers": False,
                      "worker_init_fn": _share_batches_by_filename}
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.pin_memory, **kwargs)
        return iter(loader)


def build_loader(dataset: ImageDataset, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, shuffle: bool = True, seed: int = 0, infinite: bool = False,
                 start_batch: int = 0, canvas_size: int = 224, drop_last: bool = False,
                 resampled: bool | None = None, shuffle_buffer: int = 2000, epoch: int = 0,
                 pin_memory: bool | None = None) -> ImageLoader:
    """Batches of ``batch_size`` for one rank (``rank`` / ``world_size`` come from accelerate or torchrun).

    Each batch: ``image`` uint8 (B, C, canvas, canvas) with the picture pasted top-left (shrunk if larger than the canvas), ``size``
    int32 (B, 2) its valid height/width (keep it on the CPU: crop boxes are drawn there), ``key`` sample names and, in labeled mode, ``label`` (int64 (B,) or
    float32 (B, K) multi-hot). Feed ``image``/``size`` to ``gpu_augment`` or ``eval_transform``.
    """
    cfg = StreamConfig(batch_size=batch_size, rank=rank, world_size=world_size, shuffle=shuffle,
                       shuffle_buffer=shuffle_buffer, seed=seed, infinite=infinite, resampled=resampled,
                       drop_last=drop_last, canvas_size=canvas_size, start_batch=start_batch, epoch=epoch)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return ImageLoader(dataset, cfg, num_workers=num_workers, pin_memory=pin_memory)
