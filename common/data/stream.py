"""The sample stream: shard assignment per rank and worker, shuffle buffer, resumable position, batching.

Everything random is a pure function of ``(seed, pass, global worker)``, so the stream of batches a rank sees
is reproducible and a resumed run can jump to any batch index without replaying the model:

* **Pass** ``p`` of global worker ``g`` (rank r, worker w of W: ``g = r * W + w`` out of ``G``) reads the
  shards ``perm_p[g::G]`` (``perm_p`` a seeded permutation, identity without shuffling), so within a pass
  every sample is read by exactly one worker. In infinite mode with fewer shards than ``G`` (or with
  ``resampled=True``) each worker instead draws ``ceil(S / G)`` shards with replacement per pass, so no
  worker idles and nothing hangs.
* A worker reads ``interleave_shards`` of its shards at a time, one sample from each in turn, then the
  shuffle buffer. A batch comes from a single worker, and curated shards hold their sources in input order, so
  reading one shard after another gave batches (and loss values) of one source at a time. In resampled mode a
  pass of an infinite stream draws at least ``interleave_shards`` shards for the same reason.
* Raw (undecoded) samples go through a shuffle buffer, then are decoded, converted to ``in_chans``,
  letterboxed onto a fixed ``canvas`` and batched inside the worker.
* **Infinite mode** (training) chains passes forever and yields only full batches. The DataLoader takes
  batches from its workers round-robin, so after ``k`` batches worker ``w`` has produced
  ``ceil((k - w) / W)`` of them; a resumed stream skips that many samples (whole passes by arithmetic on the
  shard counts, the rest without decoding).
* **Finite mode** (evaluation, per-epoch loops) reads pass ``epoch`` once, keeping the last partial batch
  unless ``drop_last``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset, get_worker_info

from common.data.dataset import ImageDataset
from common.data.source import RandomAccessSource

_SHARD_ORDER, _RESAMPLE, _INDEX_ORDER, _BUFFER = 0, 1, 2, 3
_END = object()


@dataclass(frozen=True)
class StreamConfig:
    batch_size: int
    rank: int = 0
    world_size: int = 1
    shuffle: bool = True
    shuffle_buffer: int = 2000
    interleave_shards: int = 4  # shards a worker reads at once, one sample from each in turn
    seed: int = 0
    infinite: bool = False
    resampled: bool | None = None  # None: resample exactly when shards < ranks x workers
    drop_last: bool = False
    canvas_size: int = 224
    start_batch: int = 0  # infinite mode: batches this rank has already consumed
    epoch: int = 0  # finite mode: which pass to read

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world_size {self.world_size}")
        if self.interleave_shards < 1:
            raise ValueError(f"interleave_shards must be >= 1, got {self.interleave_shards}")
        if self.start_batch and not self.infinite:
            raise ValueError("start_batch (resume position) is only defined for the infinite training stream")


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng([int(w) for w in words])


def _fit(h: int, w: int, canvas: int) -> tuple[int, int]:
    scale = min(1.0, canvas / max(h, w))
    return max(1, min(canvas, round(h * scale))), max(1, min(canvas, round(w * scale)))


def _shrink(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    resized = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def letterbox_into(out: torch.Tensor, image: torch.Tensor) -> tuple[int, int]:
    """Write (C, H, W) uint8 top-left into the (C, S, S) slot ``out`` (shrunk, antialiased, if larger) and zero
    the rest of the slot; returns the valid (h, w).

    Smaller pictures are not enlarged: the GPU crop/resize reads only the valid region (``size``) and does the
    one resampling, so upscaling here would cost loader time and resample twice. Writing straight into the batch
    slot saves the per-sample canvas and the ``stack`` copy.
    """
    canvas = out.shape[-1]
    nh, nw = _fit(image.shape[1], image.shape[2], canvas)
    if (nh, nw) != tuple(image.shape[1:]):
        image = _shrink(image, (nh, nw))
    out[:, :nh, :nw] = image
    if nh < canvas:  # only the padding is cleared: the valid region is overwritten anyway
        out[:, nh:].zero_()
    if nw < canvas:
        out[:, :nh, nw:].zero_()
    return nh, nw


def letterbox(image: torch.Tensor, canvas: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Paste (C, H, W) uint8 top-left on a zero ``canvas`` square (see ``letterbox_into``)."""
    out = torch.empty((image.shape[0], canvas, canvas), dtype=torch.uint8)
    return out, letterbox_into(out, image)


def interleave(iterators: Iterable[Iterator[Any]], width: int) -> Iterator[Any]:
    """Items of up to ``width`` iterators at a time, one from each in turn; the next iterator replaces one that
    ends. Every item of every iterator comes out exactly once, in a deterministic order."""
    pending = iter(iterators)
    active = [it for it in (next(pending, None) for _ in range(width)) if it is not None]
    while active:
        still = []
        for it in active:
            item = next(it, _END)
            if item is _END:
                refill = next(pending, None)
                if refill is not None:
                    still.append(refill)
                continue
            yield item
            still.append(it)
        active = still


def shuffle_buffer(items: Iterable[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Classic reservoir-style shuffle: keep ``size`` items, emit a random one for every new item."""
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(len(buf)))
        yield buf[j]
        buf[j] = item
    order = rng.permutation(len(buf))
    for j in order:
        yield buf[int(j)]


class BatchStream(IterableDataset):
    """Batches of one rank: ``{"image": uint8 (B,C,S,S), "size": (B,2) valid h,w, "key": [...], "label"}``; sizes
    and labels as numpy arrays here (``ImageLoader`` hands them out as tensors)."""

    def __init__(self, dataset: ImageDataset, cfg: StreamConfig, num_workers: int):
        super().__init__()
        self.dataset = dataset
        self.cfg = cfg
        self.num_workers = max(1, num_workers)
        self.counts = np.asarray(dataset.source.shard_counts, dtype=np.int64)
        total_workers = cfg.world_size * self.num_workers
        # Only a training stream resamples by default: a finite pass (evaluation, decoding a whole split) must
        # read every sample exactly once, and idle workers cost it nothing.
        self.resampled = cfg.resampled if cfg.resampled is not None else (
            cfg.infinite and len(self.counts) < total_workers)
        if cfg.infinite and not self.resampled and len(self.counts) < total_workers:
            raise ValueError(f"{dataset.source.path}: {len(self.counts)} shards < {cfg.world_size} ranks x "
                             f"{self.num_workers} workers; use resampled mode or fewer workers")

    # ---- the plan of one pass (pure functions of seed, pass and worker) ----
    def shards_for(self, pass_index: int, worker: int) -> np.ndarray:
        g = self.cfg.rank * self.num_workers + worker
        total = self.cfg.world_size * self.num_workers
        n = len(self.counts)
        if self.resampled:
            draws = max(1, math.ceil(n / total))
            if self.cfg.infinite:  # a pass is only a unit of drawing here; several shards mix sources
                draws = max(draws, self.cfg.interleave_shards)
            return _rng(self.cfg.seed, pass_index, g, _RESAMPLE).integers(0, n, size=draws)
        order = _rng(self.cfg.seed, pass_index, _SHARD_ORDER).permutation(n) if self.cfg.shuffle else np.arange(n)
        return order[g::total]

    def pass_length(self, pass_index: int, worker: int) -> int:
        return int(self.counts[self.shards_for(pass_index, worker)].sum())

    def num_batches(self) -> int:
        """Finite mode: batches this rank yields in the current epoch."""
        total = 0
        for w in range(self.num_workers):
            n = self.pass_length(self.cfg.epoch, w)
            total += n // self.cfg.batch_size if self.cfg.drop_last else math.ceil(n / self.cfg.batch_size)
        return total

    def raw_pass(self, pass_index: int, worker: int) -> Iterator[Any]:
        source = self.dataset.source
        g = self.cfg.rank * self.num_workers + worker
        order = None
        if self.cfg.shuffle and isinstance(source, RandomAccessSource):
            order = _rng(self.cfg.seed, pass_index, _INDEX_ORDER).permutation(len(source))

        shards = (source.iter_raw(int(shard), order) for shard in self.shards_for(pass_index, worker))
        if not self.cfg.shuffle:  # evaluation order: shard after shard
            return interleave(shards, 1)
        raws = interleave(shards, self.cfg.interleave_shards)
        return shuffle_buffer(raws, self.cfg.shuffle_buffer, _rng(self.cfg.seed, pass_index, g, _BUFFER))

    # ---- iteration ----
    def _worker(self) -> int:
        """The stream role of this DataLoader worker.

        A resumed DataLoader starts its round-robin at worker 0, but batch ``start_batch`` belongs to role
        ``start_batch % W``; rotating the roles keeps the batch order identical to an uninterrupted run.
        """
        info = get_worker_info()
        if info is None:
            return 0
        if info.num_workers != self.num_workers:
            raise RuntimeError(f"BatchStream built for {self.num_workers} workers, DataLoader has {info.num_workers}")
        return (info.id + self.cfg.start_batch) % self.num_workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = self._worker()
        raws = self._infinite_raws(worker) if self.cfg.infinite else self.raw_pass(self.cfg.epoch, worker)
        batch: list[Any] = []
        for raw in raws:
            batch.append(raw)
            if len(batch) == self.cfg.batch_size:
                yield self.collate(batch)
                batch = []
        if batch and not self.cfg.drop_last and not self.cfg.infinite:
            yield self.collate(batch)

    def _infinite_raws(self, worker: int) -> Iterator[Any]:
        w, workers = worker, self.num_workers
        consumed = max(0, (self.cfg.start_batch - w + workers - 1) // workers)
        skip = consumed * self.cfg.batch_size
        pass_index = 0
        while True:
            length = self.pass_length(pass_index, worker)
            if length == 0:
                raise RuntimeError(f"{self.dataset.source.path}: worker {worker} of rank {self.cfg.rank} has no "
                                   f"samples in pass {pass_index}")
            if skip < length:
                break
            skip -= length
            pass_index += 1
        while True:
            for raw in self.raw_pass(pass_index, worker):
                if skip:
                    skip -= 1
                    continue
                yield raw
            pass_index += 1

    def collate(self, raws: list[Any]) -> dict[str, Any]:
        decoded = [self.dataset.decode_for_batch(raw) for raw in raws]
        canvas = self.cfg.canvas_size
        chans = decoded[0][0].shape[0]
        # In a DataLoader worker the batch goes to the main process through shared memory; allocating it there
        # directly saves the copy torch would make when sending a private tensor.
        images = torch.empty((len(raws), chans, canvas, canvas), dtype=torch.uint8)
        if get_worker_info() is not None:
            images.share_memory_()
        sizes = [letterbox_into(images[i], image) for i, (image, _, _) in enumerate(decoded)]
        # Only the image travels as a shared tensor. Sizes and labels are small numpy arrays, pickled by value:
        # every shared tensor costs the receiver a round trip to this worker (see common.data.loader), and
        # ImageLoader turns them back into tensors. int32 sizes stay on the CPU (crop boxes are drawn there).
        batch: dict[str, Any] = {"image": images, "size": np.asarray(sizes, dtype=np.int32),
                                 "key": [key for _, _, key in decoded]}
        if self.dataset.labeled:
            labels = [label for _, label, _ in decoded]
            if isinstance(labels[0], torch.Tensor):
                batch["label"] = torch.stack(labels).float().numpy()
            else:
                batch["label"] = np.asarray(labels, dtype=np.int64)
        return batch
