"""``build_loader``: a DataLoader over ``BatchStream`` with per-epoch control and a resumable position."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from common.data.dataset import ImageDataset
from common.data.stream import BatchStream, StreamConfig

_WORKER_SWITCH_INTERVAL_S = 2e-4


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
                      "worker_init_fn": _answer_handle_requests_fast}
        # collate_fn: keep the stream's numpy arrays as they are (the default would make shared tensors of them)
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.pin_memory, collate_fn=_as_is, **kwargs)
        return _with_tensors(iter(loader), self.pin_memory)


def _answer_handle_requests_fast(_worker_id: int) -> None:
    """Worker init: a short GIL switch interval, so the worker's resource-sharer thread, which hands each batch
    image's file descriptor to the consumer, gets the GIL from the decoding loop within ~0.2 ms instead of the
    default 5 ms. It costs nothing while that thread sleeps (no one asks for the GIL)."""
    sys.setswitchinterval(_WORKER_SWITCH_INTERVAL_S)


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def _with_tensors(batches: Iterator[dict[str, Any]], pin_memory: bool) -> Iterator[dict[str, Any]]:
    """The stream's numpy sizes and labels as tensors (labels pinned when batches are, so that their
    ``non_blocking`` copy to the GPU does not wait for the stream).

    Why numpy in between: a worker sends every tensor of a batch as its own shared-memory segment, passed by
    file descriptor, and the receiving pin-memory thread fetches each descriptor with a socket round trip to
    the worker, which must first win the worker's GIL from the decoding loop. One tensor per batch (the image)
    instead of two or three cut that hand-off, the per-step ceiling of our GPU loader rows. (Named segments,
    torch's ``file_system`` strategy, avoid the round trip entirely but leave files in /dev/shm for batches
    still in flight when a loader is torn down.)
    """
    for batch in batches:
        batch["size"] = torch.from_numpy(batch["size"])
        if "label" in batch:
            label = torch.from_numpy(batch["label"])
            batch["label"] = label.pin_memory() if pin_memory else label
        yield batch


def build_loader(dataset: ImageDataset, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, shuffle: bool = True, seed: int = 0, infinite: bool = False,
                 start_batch: int = 0, canvas_size: int = 224, drop_last: bool = False,
                 resampled: bool | None = None, shuffle_buffer: int = 2000, interleave_shards: int = 4,
                 epoch: int = 0, pin_memory: bool | None = None) -> ImageLoader:
    """Batches of ``batch_size`` for one rank (``rank`` / ``world_size`` come from accelerate or torchrun).

    Each batch: ``image`` uint8 (B, C, canvas, canvas) with the picture pasted top-left (shrunk if larger than
    the canvas), ``size`` int32 (B, 2) its valid height/width (keep it on the CPU: crop boxes are drawn there),
    ``key`` sample names and, in labeled mode, ``label`` (int64 (B,) or float32 (B, K) multi-hot). Feed
    ``image``/``size`` to ``gpu_augment`` or ``eval_transform``.
    """
    cfg = StreamConfig(batch_size=batch_size, rank=rank, world_size=world_size, shuffle=shuffle,
                       shuffle_buffer=shuffle_buffer, interleave_shards=interleave_shards, seed=seed,
                       infinite=infinite, resampled=resampled,
                       drop_last=drop_last, canvas_size=canvas_size, start_batch=start_batch, epoch=epoch)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return ImageLoader(dataset, cfg, num_workers=num_workers, pin_memory=pin_memory)


def usable_workers(requested: int) -> int:
    """``requested`` DataLoader workers capped to the CPUs this process may use, shared by the processes of
    its node (``LOCAL_WORLD_SIZE``): more workers than CPUs only add start-up time and memory (and make
    PyTorch warn). 0 (load in the main process) stays 0."""
    if requested <= 0:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_processes = 1
    return max(1, min(requested, cpus // local_processes))
