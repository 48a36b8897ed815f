"""Packaging, configuration and checkpoint I/O of the shared foundation."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import pickle
from pathlib import Path

import pytest
import torch

from common.checkpoint import (
    CheckpointError,
    load_state_dict_any,
    load_weights,
    save_weights,
    torch_load_safe,
)
from common.config import ConfigError, load_config, merge_mapping, parse_config, save_config
from common.io import atomic_write_text, file_sha256

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["common", "data_curation", "kernels", "models", "pretrain", "linprobe", "finetune", "bench"]


@pytest.mark.parametrize("name", PACKAGES)
def test_project_package_resolves_inside_checkout(name: str) -> None:
    # PyPI has unrelated packages called `kernels` and `models`; ours must win.
    module = importlib.import_module(name)
    location = Path(module.__file__).resolve()
    assert REPO in location.parents, f"{name} imported from {location}, not from the checkout {REPO}"


@dataclasses.dataclass
class _Cfg:
    batch_size: int = 64
    blr: float = 1.5e-4
    norm_pix_loss: bool = False
    data_path: str = "data"
    output_dir: str | None = None
    input_size: list[int] = dataclasses.field(default_factory=lambda: [224, 224])


def test_config_defaults_yaml_then_flags(tmp_path: Path) -> None:
    yml = tmp_path / "cfg.yaml"
    yml.write_text("batch_size: 32\nblr: 0.001\ninput_size: [64, 96]\n")
    cfg = parse_config(_Cfg, ["--config", str(yml), "--batch_size", "8", "--norm_pix_loss"])
    assert cfg.batch_size == 8  # flag beats file
    assert cfg.blr == pytest.approx(1e-3)  # file beats default
    assert cfg.input_size == [64, 96]
    assert cfg.norm_pix_loss is True
    assert cfg.data_path == "data"  # default kept


def test_config_saved_yaml_reproduces_run(tmp_path: Path) -> None:
    cfg = parse_config(_Cfg, ["--blr", "2e-4", "--output_dir", "out", "--input_size", "32", "48"])
    path = save_config(cfg, tmp_path / "config.yaml")
    assert load_config(_Cfg, path) == cfg


def test_config_unknown_key_is_named(tmp_path: Path) -> None:
    yml = tmp_path / "cfg.yaml"
    yml.write_text("batch_sise: 32\n")
    with pytest.raises(ConfigError, match=r"unknown key 'batch_sise' \(did you mean 'batch_size'\?\)"):
        parse_config(_Cfg, ["--config", str(yml)])
    yml.write_text("zzz: 1\n")  # nothing close: the known keys are listed
    with pytest.raises(ConfigError, match=r"unknown key 'zzz' \(known keys: .*batch_size"):
        parse_config(_Cfg, ["--config", str(yml)])


@pytest.mark.parametrize("key,value", [("batch_size", "many"), ("blr", [1]), ("norm_pix_loss", "maybe"),
                                       ("batch_size", 1.5), ("data_path", None)])
def test_config_wrong_type_is_named(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        merge_mapping(_Cfg(), {key: value})


def test_config_bad_flag_value_is_named() -> None:
    with pytest.raises(ConfigError, match="'batch_size'"):
        parse_config(_Cfg, ["--batch_size", "x"])


def test_safetensors_round_trip_with_shared_storage(tmp_path: Path) -> None:
    w = torch.randn(4, 3)
    sd = {"a": w, "b": w, "c": torch.arange(5, dtype=torch.int64), "d": torch.randn(2, 2).t()}
    path = save_weights(sd, tmp_path / "w.safetensors")
    loaded = load_weights(path)
    assert set(loaded) == set(sd)
    for k in sd:
        assert torch.equal(loaded[k], sd[k])
    assert not list(tmp_path.glob("*.tmp")), "temporary file left behind"


def test_torch_checkpoint_with_pickled_object_is_refused(tmp_path: Path) -> None:
    import argparse

    path = tmp_path / "mae.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        torch_load_safe(path)
    with pytest.raises(CheckpointError, match=str(path.name)):
        load_state_dict_any(path)


def test_torch_checkpoint_of_plain_tensors_loads(tmp_path: Path) -> None:
    path = tmp_path / "ok.pth"
    torch.save({"model": {"w": torch.ones(2), "b": torch.zeros(1)}, "epoch": 3}, path)
    sd = load_state_dict_any(path)
    assert set(sd) == {"w", "b"}


def test_raw_pickle_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"x": Path("/etc/passwd")}))  # any non-tensor class must be refused
    with pytest.raises(CheckpointError):
        torch_load_safe(path)


def test_corrupt_safetensors_names_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        load_weights(path)


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path) -> None:
    from common.io import atomic_write

    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")

    def failing(p: Path) -> None:
        p.write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_file_sha256_matches_whole_file_digest_across_block_boundaries(tmp_path: Path) -> None:
    # A real DICOM file, read in blocks that do not divide its size, so the last block is partial.
    import pydicom

    src = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
    data = src.read_bytes()
    assert file_sha256(src, block_size=1000) == file_sha256(src) == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert file_sha256(empty) == hashlib.sha256(b"").hexdigest()


def test_logger_follows_replaced_stdout(capsys) -> None:
    import io
    import sys

    from common.logging import get_logger

    logger = get_logger("scanmae.test_stdout")
    logger.info("first")
    old, sys.stdout = sys.stdout, io.StringIO()
    try:
        logger.info("second")  # a handler bound to the old stream would write there (or fail if it closed)
        assert "second" in sys.stdout.getvalue()
    finally:
        sys.stdout = old
