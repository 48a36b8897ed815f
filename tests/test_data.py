"""common.data: readers, label handling, channel policy, stream splitting/resume and the GPU transforms."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_fixtures import BREAST_NPZ, SHARED, breast_shards, write_shards

from common.data import (
    DataSourceError,
    ImageDecodeError,
    build_dataset,
    build_loader,
    eval_transform,
    gpu_augment,
)
from common.data.images import convert_channels, to_uint8

ADRENAL_NPZ = SHARED / "medmnist" / "adrenalmnist3d.npz"
XRAY = SHARED / "xray" / "kermany_cxr_224"


def test_npz_2d_labels_and_channels() -> None:
    ds = build_dataset(BREAST_NPZ, split="val", labeled=True, in_chans=3)
    assert len(ds) == 78 and ds.num_classes == 2 and not ds.multilabel
    image, label = ds.sample(0)
    assert image.shape == (3, 28, 28) and image.dtype == torch.uint8
    assert torch.equal(image[0], image[1])  # gray repeated
    with np.load(BREAST_NPZ) as d:
        assert label == int(d["val_labels"][0, 0])
        assert np.array_equal(image[0].numpy(), d["val_images"][0])


def test_npz_3d_refused_unless_slices() -> None:
    with pytest.raises(DataSourceError, match="3D volumes.*volume_slices"):
        build_dataset(ADRENAL_NPZ, split="val")
    ds = build_dataset(ADRENAL_NPZ, split="val", labeled=True, in_chans=1, volume_slices=True)
    assert len(ds) == 98 * 28
    image, label = ds.sample(28 + 5)  # volume 1, slice 5
    with np.load(ADRENAL_NPZ) as d:
        assert np.array_equal(image[0].numpy(), d["val_images"][1, 5])
        assert label == int(d["val_labels"][1, 0])


def test_image_folder_splits_and_errors(tmp_path: Path) -> None:
    ds = build_dataset(XRAY, split="test", labeled=True, in_chans=1)
    assert ds.class_names == ["NORMAL", "PNEUMONIA"] and len(ds) == 624
    labels = Counter(ds.source.samples[i][1] for i in range(len(ds)))
    assert labels == {0: 234, 1: 390}
    with pytest.raises(DataSourceError, match="split folder 'val' missing"):
        build_dataset(XRAY, split="val")
    flat = tmp_path / "flat"
    for cls in ("NORMAL", "PNEUMONIA"):
        (flat / cls).mkdir(parents=True)
        for p in sorted((XRAY / "test" / cls).iterdir())[:3]:
            shutil.copy(p, flat / cls / p.name)
    assert len(build_dataset(flat, split=None, labeled=True)) == 6
    with pytest.raises(DataSourceError, match="only provide the train split"):
        build_dataset(flat, split="test")
    (flat / "EMPTY").mkdir()
    with pytest.raises(DataSourceError, match="EMPTY: class folder has no images"):
        build_dataset(flat)
    shutil.rmtree(flat / "EMPTY")
    (flat / "NORMAL" / "broken.png").write_bytes(b"not a png")
    ds = build_dataset(flat, labeled=True)
    with pytest.raises(ImageDecodeError, match="broken.png: cannot decode"):
        list(ds)


def test_csv_single_multi_and_class_columns(tmp_path: Path) -> None:
    ds = build_dataset(XRAY / "labels.csv", split="test", labeled=True, in_chans=3)
    assert ds.class_names == ["NORMAL", "PNEUMONIA"] and len(ds) == 624
    image, label = ds.sample(0)
    assert image.shape == (3, 224, 224) and label in (0, 1)
    files = sorted((XRAY / "test" / "NORMAL").iterdir())[:3]
    multi = tmp_path / "multi.csv"
    multi.write_text("path,label\n" + "".join(f"{f},{lab}\n" for f, lab in zip(files, ["a;c", "b", ""])))
    ds = build_dataset(multi, split=None, labeled=True, in_chans=1)
    assert ds.multilabel and ds.class_names == ["a", "b", "c"]
    assert [ds.sample(i)[1].tolist() for i in range(3)] == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]
    cols = tmp_path / "cols.csv"
    cols.write_text("path,effusion,mass\n" + f"{files[0]},1,0\n{files[1]},1,1\n")
    ds = build_dataset(cols, split=None, labeled=True, in_chans=1)
    assert ds.class_names == ["effusion", "mass"] and ds.sample(1)[1].tolist() == [1.0, 1.0]


def test_shard_dir_manifest_counts_and_16bit(tmp_path: Path) -> None:
    breast_shards(tmp_path / "cur", n=25, per_shard=10)
    with np.load(BREAST_NPZ) as d:
        ct_like = (d["val_images"][:4].astype(np.uint16) * 16 + 1000)  # 12-bit-like real intensities
    write_shards(tmp_path / "cur", ct_like, None, "val", per_shard=4, prefix="v")
    ds = build_dataset(tmp_path / "cur", split="train", labeled=True, in_chans=1)
    assert ds.source.shard_counts == [10, 10, 5] and ds.num_classes is None
    assert len(list(ds)) == 25
    val = build_dataset(tmp_path / "cur", split="val", in_chans=1)
    image = val.sample(next(val.source.iter_raw(0)))
    assert image.dtype == torch.uint8 and int(image.min()) == 0 and int(image.max()) == 255
    with pytest.raises(DataSourceError, match="no shards for split 'test'"):
        build_dataset(tmp_path / "cur", split="test")
    with pytest.raises(DataSourceError, match="sample has no label"):
        list(build_dataset(tmp_path / "cur", split="val", labeled=True))
    pattern = str(tmp_path / "cur" / "shards" / "train-{000000..000002}.tar")
    assert build_dataset(pattern).source.shard_counts == [10, 10, 5]


def test_pixel_policy() -> None:
    arr = np.array([[[100], [1100]]], dtype=np.uint16)
    assert to_uint8(arr).ravel().tolist() == [0, 255]
    rgb = np.array([[[255, 0, 0]]], dtype=np.uint8)
    assert convert_channels(rgb, 1).ravel().tolist() == [76]
    with pytest.raises(ImageDecodeError, match="2 channels but in_chans=3"):
        convert_channels(np.zeros((2, 2, 2), np.uint8), 3)


def _keys(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


def test_two_ranks_two_workers_see_each_sample_once(tmp_path: Path) -> None:
    root = breast_shards(tmp_path / "cur", n=70, per_shard=10)  # 7 shards >= 2 ranks x 2 workers
    ds = build_dataset(root, in_chans=1)
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            loader = build_loader(ds, 4, rank=rank, world_size=2, num_workers=2, seed=3, canvas_size=28,
                                  resampled=False, shuffle_buffer=16, epoch=epoch)
            keys = _keys(loader)
            assert len(keys) == sum(len(b["key"]) for b in loader)
            seen += keys
        assert sorted(seen) == sorted(f"{root / 'shards'}/train-{s:06d}.tar:img{i:05d}"
                                      for s in range(7) for i in range(s * 10, s * 10 + 10))
    # the shuffled order differs between epochs
    l0 = build_loader(ds, 4, num_workers=0, seed=3, canvas_size=28, epoch=0)
    l1 = build_loader(ds, 4, num_workers=0, seed=3, canvas_size=28, epoch=1)
    assert _keys(l0) != _keys(l1)


def test_interleave_yields_every_item_once_width_at_a_time() -> None:
    from common.data.stream import interleave

    parts = [iter("ab"), iter("cdef"), iter(""), iter("g")]
    assert "".join(interleave(iter(parts), 2)) == "acbdefg"
    assert "".join(interleave(iter([iter("ab"), iter("cd")]), 1)) == "abcd"
    assert list(interleave(iter([]), 3)) == []


def test_a_batch_mixes_shards_when_interleaving(tmp_path: Path) -> None:
    """Curated shards hold their sources in input order and a batch comes from one worker: reading one shard at
    a time gave one-shard batches; with interleave_shards=4 a batch holds samples of 4 shards."""
    root = breast_shards(tmp_path / "cur", n=80, per_shard=10)

    def shards_per_batch(width: int, shuffle: bool = True) -> list[int]:
        loader = build_loader(build_dataset(root, in_chans=1), 8, num_workers=0, seed=5, canvas_size=28,
                              shuffle=shuffle, shuffle_buffer=1, interleave_shards=width, resampled=False)
        return [len({key.split(".tar:")[0] for key in batch["key"]}) for batch in loader]

    assert shards_per_batch(4) == [4] * 10
    assert max(shards_per_batch(1)) <= 2  # a batch of 8 straddles at most one shard boundary
    assert max(shards_per_batch(4, shuffle=False)) <= 2  # evaluation order stays shard after shard
    with pytest.raises(ValueError, match="interleave_shards must be >= 1"):
        build_loader(build_dataset(root, in_chans=1), 8, interleave_shards=0)


def test_resampled_pass_draws_enough_shards_to_mix(tmp_path: Path) -> None:
    root = breast_shards(tmp_path / "cur", n=40, per_shard=10)  # 4 shards < 2 ranks x 4 workers
    loader = build_loader(build_dataset(root, in_chans=1), 4, world_size=2, num_workers=4, infinite=True,
                          canvas_size=28, interleave_shards=3)
    assert loader.stream.resampled
    assert all(len(loader.stream.shards_for(p, w)) == 3 for p in range(3) for w in range(4))


def test_resampled_when_fewer_shards_than_workers(tmp_path: Path) -> None:
    root = breast_shards(tmp_path / "cur", n=12, per_shard=12)  # one shard, 2 ranks x 2 workers
    ds = build_dataset(root, in_chans=1)
    for rank in (0, 1):
        loader = build_loader(ds, 5, rank=rank, world_size=2, num_workers=2, infinite=True, canvas_size=28)
        assert loader.stream.resampled
        it = iter(loader)
        batches = [next(it) for _ in range(6)]  # more than one pass, no hang
        assert all(b["image"].shape == (5, 1, 28, 28) for b in batches)
        del it


@pytest.mark.parametrize("per_shard", [10, 20])  # 4 shards = 2 ranks x 2 workers; 2 shards: resampled passes
def test_infinite_stream_resume_position(tmp_path: Path, per_shard: int) -> None:
    root = breast_shards(tmp_path / "cur", n=40, per_shard=per_shard)
    ds = build_dataset(root, in_chans=1)
    kw = {"rank": 1, "world_size": 2, "num_workers": 2, "infinite": True, "canvas_size": 28, "seed": 7,
          "shuffle_buffer": 8}
    it = iter(build_loader(ds, 3, **kw))
    full = [next(it)["key"] for _ in range(14)]  # 14 batches x 3 > one pass (20 samples per rank)
    del it
    it = iter(build_loader(ds, 3, start_batch=9, **kw))
    resumed = [next(it)["key"] for _ in range(5)]
    del it
    assert resumed == full[9:]


def test_batch_is_letterboxed_in_place_with_zero_padding(tmp_path: Path) -> None:
    """Batches are written slot by slot into uninitialised memory: the padding must still be zero, big pictures
    shrunk, and the valid region the decoded picture; through a worker the batch arrives in shared memory."""
    root = breast_shards(tmp_path / "cur", n=8, per_shard=4)
    ds = build_dataset(root, in_chans=1)
    for canvas in (40, 20):  # the 28 px pictures padded, then shrunk
        for workers in (0, 1):
            batch = next(iter(build_loader(ds, 4, canvas_size=canvas, shuffle=False, num_workers=workers)))
            assert batch["image"].shape == (4, 1, canvas, canvas) and batch["size"].dtype == torch.int32
            for i, key in enumerate(batch["key"]):
                h, w = batch["size"][i].tolist()
                assert (h, w) == ((28, 28) if canvas == 40 else (20, 20))
                slot = batch["image"][i]
                assert slot[:, h:].eq(0).all() and slot[:, :, w:].eq(0).all()
                if canvas == 40:
                    raw = next(r for r in ds.source.iter_raw(i // 4) if ds.decode_for_batch(r)[2] == key)
                    assert torch.equal(slot[:, :h, :w], ds.decode_for_batch(raw)[0])
                else:
                    assert slot.float().std() > 0  # a real shrunk picture, not an empty slot


def test_gpu_augment_stays_in_valid_region_and_flips() -> None:
    canvas = torch.zeros((6, 1, 40, 40), dtype=torch.uint8)
    canvas[:, :, :20, :37] = 255  # letterboxed images of 20 x 37 with zero padding
    sizes = torch.tensor([[20, 37]] * 6)
    g = torch.Generator().manual_seed(0)
    out = gpu_augment(canvas, sizes, 16, [0.0], [1.0], generator=g, interpolation="bilinear")
    assert out.shape == (6, 1, 16, 16) and torch.allclose(out, torch.ones_like(out), atol=1e-5)
    ramp = torch.arange(16, dtype=torch.uint8).repeat(1, 1, 16, 1) * 10  # value = 10 * column
    full = torch.tensor([[16, 16]])
    flipped = gpu_augment(ramp, full, 16, [0.0], [1.0], generator=torch.Generator().manual_seed(0),
                          scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0, interpolation="bilinear")
    assert torch.allclose(flipped[0, 0] * 255, ramp[0, 0].flip(-1).float(), atol=1e-3)
    same = eval_transform(ramp, full, 16, [0.0], [1.0], crop_pct=1.0, interpolation="bilinear")
    assert torch.allclose(same[0, 0] * 255, ramp[0, 0].float(), atol=1e-3)
    again = gpu_augment(canvas, sizes, 16, [0.5], [0.5], generator=torch.Generator().manual_seed(1),
                        intensity=0.3)
    repeat = gpu_augment(canvas, sizes, 16, [0.5], [0.5], generator=torch.Generator().manual_seed(1),
                         intensity=0.3)
    assert torch.equal(again, repeat)


def test_worker_batches_share_only_the_image(tmp_path: Path) -> None:
    """A worker hands over one shared tensor per batch (the image); sizes and labels travel by value and arrive as
    tensors, and the batches hold what the single-process stream yields (common.data.loader)."""
    breast_shards(tmp_path / "cur", n=24, per_shard=6)
    ds = build_dataset(tmp_path / "cur", split="train", in_chans=1, labeled=True)
    expected = list(build_loader(ds, 4, num_workers=0, shuffle=False))
    got = list(build_loader(ds, 4, num_workers=2, shuffle=False))
    for b in got:
        assert b["image"].is_shared() and not b["size"].is_shared() and not b["label"].is_shared()
        assert b["size"].dtype == torch.int32 and b["label"].dtype == torch.int64
    by_key = lambda batches: sorted(  # noqa: E731
        (k, int(img.sum()), tuple(size.tolist()), int(label))
        for b in batches for k, img, size, label in zip(b["key"], b["image"], b["size"], b["label"]))
    assert len(got) == 6 and by_key(got) == by_key(expected)
