"""common.data.tar_reader: the header-parsing fast path reads what the standard library's tarfile reads, for every
tar flavour tarfile writes, and names the byte offset when an archive is truncated or corrupt."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from test_data_fixtures import BREAST_NPZ, breast_shards

from common.data import DataSourceError, build_dataset
from common.data.tar_reader import TarFormatError, iter_tar_files


def _real_members() -> list[tuple[str, bytes]]:
    """Names of several lengths and depths with real image bytes (BreastMNIST rows as raw bytes)."""
    with np.load(BREAST_NPZ) as d:
        rows = [d["train_images"][i].tobytes() for i in range(6)]
    names = ["a.png", "dir/sub/b.json", "x" * 99 + ".png", "deep/" * 30 + "long.png", "ü-ñ.png", "empty.txt"]
    return list(zip(names, rows[:5] + [b""]))


def _write(path: Path, members: list[tuple[str, bytes]], fmt: int, mode: str = "w") -> None:
    with tarfile.open(path, mode, format=fmt) as tf:
        info = tarfile.TarInfo("a_directory")
        info.type = tarfile.DIRTYPE
        tf.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("a_link")
        link.type = tarfile.SYMTYPE
        link.linkname = "a.png"
        tf.addfile(link)


def _stdlib(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_every_format_reads_like_tarfile(tmp_path: Path, fmt: int) -> None:
    members = _real_members()
    if fmt == tarfile.USTAR_FORMAT:  # ustar has no long-name extension beyond prefix + name
        members = [(n, d) for n, d in members if len(n) <= 100 or "/" in n[-100:]][:4]
    path = tmp_path / "t.tar"
    _write(path, members, fmt)
    ours = list(iter_tar_files(path))
    assert ours == _stdlib(path) and [n for n, _ in ours] == [n for n, _ in members]
    assert list(iter_tar_files(path, read_data=False)) == [(n, len(d)) for n, d in ours]


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz"])
def test_compressed_archives_go_through_tarfile(tmp_path: Path, mode: str) -> None:
    members = _real_members()
    path = tmp_path / "t.tar.x"
    _write(path, members, tarfile.PAX_FORMAT, mode)
    assert list(iter_tar_files(path)) == _stdlib(path)


def test_truncated_and_corrupt_archives_name_the_offset(tmp_path: Path) -> None:
    path = tmp_path / "t.tar"
    _write(path, _real_members(), tarfile.GNU_FORMAT)
    whole = path.read_bytes()
    path.write_bytes(whole[:2000])
    with pytest.raises(TarFormatError, match=r"truncated at byte 2000"):
        list(iter_tar_files(path))
    corrupt = bytearray(whole)
    corrupt[512 + 130] ^= 0x01  # the second header's size field: its checksum no longer matches
    path.write_bytes(bytes(corrupt))
    with pytest.raises(TarFormatError, match="bad header checksum at byte 512"):
        list(iter_tar_files(path))
    path.write_bytes(b"this is not a tar archive at all" * 40)
    with pytest.raises(TarFormatError, match="header at byte 0"):
        list(iter_tar_files(path))


def test_curated_shards_read_the_same_and_a_bad_shard_names_its_file(tmp_path: Path) -> None:
    breast_shards(tmp_path / "cur", n=12, per_shard=5)
    shards = sorted((tmp_path / "cur" / "shards").glob("train-*.tar"))
    for shard in shards:
        assert list(iter_tar_files(shard)) == _stdlib(shard)
    shards[1].write_bytes(shards[1].read_bytes()[:1500])
    ds = build_dataset(tmp_path / "cur", split="train", in_chans=1)
    with pytest.raises(DataSourceError, match=rf"{shards[1].name}: cannot read tar shard \(truncated"):
        list(ds.source.iter_raw(1))


def test_pax_size_and_path_records_and_global_headers(tmp_path: Path) -> None:
    """pax records override the ustar fields (tarfile writes a size record for members of 8 GiB and more; here it
    is forced on a small one) and a global header applies to no member by itself."""
    members = _real_members()[:3]
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "global"}) as tf:
        for name, data in members:
            info = tarfile.TarInfo("ustar_name_ignored")
            info.size = len(data)
            info.pax_headers = {"size": str(len(data)), "path": "pax/" + name}
            tf.addfile(info, io.BytesIO(data))
    ours = list(iter_tar_files(path))
    assert ours == _stdlib(path) == [("pax/" + n, d) for n, d in members]
