"""common.data.resident: the whole split decoded once and cut into training batches on the device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_data_fixtures import breast_shards

from common.data import build_dataset, build_loader
from common.data.resident import ResidentLoader, decode_all, resident_bytes


def _take(loader: ResidentLoader, n: int) -> list[dict]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_finite_pass_reads_each_sample_once_with_more_workers_than_shards(tmp_path: Path) -> None:
    root = breast_shards(tmp_path / "cur", n=12, per_shard=12)  # one shard, two workers
    loader = build_loader(build_dataset(root, in_chans=1), 5, num_workers=2, shuffle=False, canvas_size=28)
    keys = [k for batch in loader for k in batch["key"]]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 12


def test_decode_all_matches_the_evaluation_stream(tmp_path: Path) -> None:
    root = breast_shards(tmp_path / "cur", n=30, per_shard=7, big=True)  # 64 px onto a 48 px canvas: shrunk
    ds = build_dataset(root, in_chans=1)
    images, sizes = decode_all(ds, 48, num_workers=2, batch_size=8)
    assert torch.equal(images, decode_all(ds, 48, num_workers=0, batch_size=5)[0])  # order: by key, not by worker
    streamed = list(build_loader(ds, 30, shuffle=False, canvas_size=48, num_workers=0))[0]
    by_key = sorted(range(30), key=lambda i: streamed["key"][i])
    assert images.shape == (30, 1, 48, 48) and images.dtype == torch.uint8 and sizes.dtype == torch.int32
    assert torch.equal(images, streamed["image"][by_key]) and torch.equal(sizes, streamed["size"][by_key])
    assert (sizes == 48).all()  # the 64 px pictures were shrunk to fill the canvas
    assert resident_bytes(30, 1, 48) == images.numel()


def test_ranks_split_each_pass_and_passes_reshuffle() -> None:
    n, batch = 23, 4
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    sizes = torch.stack([torch.arange(n), torch.arange(n)], 1).to(torch.int32)
    ranks = [ResidentLoader(images, sizes, batch, rank=r, world_size=2, seed=3) for r in (0, 1)]
    assert len(ranks[0]) == 2  # 23 // 2 = 11 samples per rank: two full batches
    for p in range(3):
        firsts = [_take(loader, 2 * (p + 1))[2 * p:] for loader in ranks]
        ids = [int(b["image"][i, 0, 0, 0]) for rank in firsts for b in rank for i in range(batch)]
        assert len(ids) == len(set(ids)) == 16  # no sample twice in a pass, on any rank
        for rank in firsts:
            for b in rank:  # each size still belongs to its image
                assert torch.equal(b["size"][:, 0].to(torch.uint8), b["image"][:, 0, 0, 0])
    assert ranks[0].pass_indices(0).tolist() != ranks[0].pass_indices(1).tolist()


def test_resumed_stream_repeats_the_uninterrupted_one() -> None:
    n = 19
    images = torch.randint(0, 255, (n, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    sizes = torch.full((n, 2), 4, dtype=torch.int32)
    full = _take(ResidentLoader(images, sizes, 3, rank=1, world_size=2, seed=7), 11)  # 3 batches per pass
    resumed = _take(ResidentLoader(images, sizes, 3, rank=1, world_size=2, seed=7, start_batch=4), 7)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(full[4:], resumed))


def test_too_few_samples_for_a_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="fewer than one batch"):
        ResidentLoader(torch.zeros(5, 1, 2, 2, dtype=torch.uint8), torch.zeros(5, 2, dtype=torch.int32), 4,
                       rank=0, world_size=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resident_batches_on_cuda_equal_the_cpu_ones() -> None:
    """On CUDA the pass's indices travel in one pinned, non-blocking copy: the batches must still be exactly
    those of the CPU path, across a pass boundary, with sizes left on the CPU."""
    n = 37
    images = torch.randint(0, 255, (n, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    sizes = torch.randint(1, 9, (n, 2), dtype=torch.int32, generator=torch.Generator().manual_seed(2))
    cpu = _take(ResidentLoader(images, sizes, 5, rank=1, world_size=2, seed=11, start_batch=2), 9)
    gpu = _take(ResidentLoader(images.cuda(), sizes, 5, rank=1, world_size=2, seed=11, start_batch=2), 9)
    for a, b in zip(cpu, gpu):
        assert b["image"].is_cuda and not b["size"].is_cuda
        assert torch.equal(a["image"], b["image"].cpu()) and torch.equal(a["size"], b["size"])
